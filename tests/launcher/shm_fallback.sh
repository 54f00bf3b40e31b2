#!/usr/bin/env bash
# With a /dev/shm too small for the shared-memory segments (a private tmpfs of
# 1 MiB in a mount namespace, like a container's), CHORUS_TRANSPORT=auto must
# fall back to tcp and work, and CHORUS_TRANSPORT=shm must fail with a clear
# error instead of crashing (SIGBUS on first touch) or hanging.
set -u
chorusrun=$1
hello=$2
if ! unshare -m true 2>/dev/null; then
  echo "SKIP: cannot create a mount namespace (needs root or user namespaces)"
  exit 77
fi
out=$(unshare -m bash -c '
  mount -t tmpfs -o size=1M tmpfs /dev/shm || exit 77
  echo "== auto"
  CHORUS_DEBUG=info timeout 60 "$1" -n 2 -- "$2" 2>&1; echo "rc=$?"
  echo "== shm"
  CHORUS_TRANSPORT=shm timeout 60 "$1" -n 2 -- "$2" 2>&1; echo "rc=$?"
' _ "$chorusrun" "$hello")
status=$?
[[ $status -eq 77 ]] && { echo "SKIP: cannot mount a tmpfs"; exit 77; }
echo "$out"
fail=0
auto=$(sed -n '/^== auto/,/^== shm/p' <<<"$out")
shm=$(sed -n '/^== shm/,$p' <<<"$out")
grep -q "rc=0" <<<"$auto" || { echo "FAIL: auto did not succeed on a full /dev/shm"; fail=1; }
grep -q "transport tcp (auto)" <<<"$auto" || { echo "FAIL: auto did not fall back to tcp"; fail=1; }
[[ $(grep -c "OK" <<<"$auto") -ge 2 ]] || { echo "FAIL: the ranks did not both report OK"; fail=1; }
grep -q "rc=0" <<<"$shm" && { echo "FAIL: CHORUS_TRANSPORT=shm succeeded without room in /dev/shm"; fail=1; }
grep -q "is /dev/shm full or too small" <<<"$shm" || { echo "FAIL: no clear error for forced shm"; fail=1; }
grep -q "signal" <<<"$shm" && { echo "FAIL: a rank died by a signal"; fail=1; }
[[ $fail -eq 0 ]] && echo "PASS: auto fell back to tcp; forced shm failed with a clear error"
exit $fail
