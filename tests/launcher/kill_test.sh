#!/usr/bin/env bash
# kill -9 one of 4 ranks during a long allreduce loop under chorusrun:
# the 3 survivors must fail with PeerFailure naming it, within 10 s, and
# chorusrun must exit non-zero naming the dead rank.
set -u
chorusrun=$1
bench=$2
victim=2
log=$(mktemp)
trap 'rm -f "$log"' EXIT

"$chorusrun" -n 4 -- "$bench" -b 4M -e 4M -n 1000000 -w 1 -c 0 >"$log" 2>&1 &
launcher=$!

# Find the victim: the child whose environment says CHORUS_RANK=2.
pid=""
for _ in $(seq 1 100); do
  for p in $(pgrep -P "$launcher"); do
    if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "CHORUS_RANK=$victim"; then pid=$p; fi
  done
  # The table header comes right before the timed loop starts.
  [[ -n "$pid" ]] && grep -q "Collective: allreduce" "$log" && break
  sleep 0.1
done
if [[ -z "$pid" ]]; then echo "FAIL: rank $victim never started"; cat "$log"; kill "$launcher"; exit 1; fi
sleep 1  # let the loop run
start=$(date +%s.%N)
kill -9 "$pid"
wait "$launcher"
rc=$?
elapsed=$(echo "$(date +%s.%N) - $start" | bc)
echo "chorusrun exited $rc, $elapsed s after the kill"
cat "$log" | grep -v '^\[0\] *[0-9]' | tail -20

fail=0
[[ $rc -ne 0 ]] || { echo "FAIL: chorusrun exited 0"; fail=1; }
grep -q "chorusrun: rank $victim .*signal 9" "$log" || { echo "FAIL: chorusrun did not name rank $victim as killed"; fail=1; }
for r in 0 1 3; do
  grep -E "^\[$r\].*PeerFailure.*rank $victim" "$log" >/dev/null ||
    { echo "FAIL: rank $r did not report PeerFailure naming rank $victim"; fail=1; }
done
if (( $(echo "$elapsed > 10" | bc) )); then echo "FAIL: took $elapsed s (> 10 s)"; fail=1; fi
# Shared memory (the default transport within a host): nothing of this job
# may stay in /dev/shm.
left=$(ls /dev/shm | grep "^chorus-j$launcher-" || true)
[[ -z "$left" ]] || { echo "FAIL: /dev/shm still holds: $left"; fail=1; }

# A rank that dies between creating its segment and unlinking it: chorusrun
# removes what it left (segments are named chorus-<CHORUS_JOB_ID>-...).
"$chorusrun" -n 2 -- sh -c 'touch "/dev/shm/chorus-$CHORUS_JOB_ID-r$CHORUS_RANK"; kill -9 $$' >"$log" 2>&1
rc=$?
[[ $rc -ne 0 ]] || { echo "FAIL: chorusrun exited 0 after its ranks were killed"; fail=1; }
left=$(ls /dev/shm | grep '^chorus-j' | grep -- "-r[01]$" || true)
[[ -z "$left" ]] || { echo "FAIL: chorusrun left segments of dead ranks: $left"; fail=1; }

[[ $fail -eq 0 ]] && echo "PASS: survivors failed with PeerFailure naming rank $victim in $elapsed s; /dev/shm clean"
exit $fail
