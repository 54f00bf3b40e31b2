#!/usr/bin/env bash
# The selector end to end (docs/algorithms.md):
#  1. chorus-bench --calibrate writes a tuning file with the model's keys;
#  2. with that file and CHORUS_DEBUG=info, every rank logs the same
#     algorithm for each distinct call (the log lines match rank for rank);
#  3. ranks with different CHORUS_DEBUG settings make the same choices: only
#     rank 0 logs, and the run still completes with every result right (the
#     algorithm id travels in every message header, so a rank that chose
#     differently would fail the call with InvalidUsage).
# usage: selector_test.sh CHORUSRUN CHORUS_BENCH
set -euo pipefail
run=$1
bench=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "selector_test: $*" >&2; exit 1; }

"$run" -n 3 -- "$bench" --calibrate "$tmp/tuning" > "$tmp/calibrate.out" 2>&1 ||
  { cat "$tmp/calibrate.out"; fail "chorus-bench --calibrate failed"; }
cat "$tmp/tuning"
for key in local.alpha_us local.gbps reduce_gbps; do
  grep -Eq "^$key = [0-9.e+-]+$" "$tmp/tuning" || fail "tuning file lacks '$key = <number>'"
done

export CHORUS_TUNING_FILE=$tmp/tuning
sizes=(-b 8 -e 4M -f 4 -n 2 -w 1 -c 1)
colls=allreduce,broadcast,allgather,reduce_scatter
CHORUS_DEBUG=info "$run" -n 4 -- "$bench" "${sizes[@]}" --coll $colls > "$tmp/info.log" 2>&1 ||
  { tail -30 "$tmp/info.log"; fail "chorus-bench with CHORUS_DEBUG=info failed"; }
for r in 0 1 2 3; do
  grep "^\[$r\] .*algorithm: " "$tmp/info.log" | sed 's/.*algorithm: //' | sort > "$tmp/choices.$r"
done
n=$(wc -l < "$tmp/choices.0")
# 4 collectives x 7 size buckets, plus the harness's own small calls.
[[ $n -ge 20 ]] || fail "rank 0 logged only $n decisions"
grep -q "$tmp/tuning" "$tmp/choices.0" || fail "the decisions do not name the tuning file's model"
for r in 1 2 3; do
  diff "$tmp/choices.0" "$tmp/choices.$r" > /dev/null ||
    { diff "$tmp/choices.0" "$tmp/choices.$r" | head; fail "rank $r chose differently from rank 0"; }
done
echo "selector_test: 4 ranks logged the same $n decisions"

# shellcheck disable=SC2016
"$run" -n 4 -- sh -c 'if [ "$CHORUS_RANK" = 0 ]; then export CHORUS_DEBUG=info; else export CHORUS_DEBUG=off; fi; exec "$0" "$@"' \
  "$bench" "${sizes[@]}" --coll $colls > "$tmp/mixed.log" 2>&1 ||
  { tail -30 "$tmp/mixed.log"; fail "ranks with different CHORUS_DEBUG did not complete"; }
grep -q "Out of bounds values : 0 OK" "$tmp/mixed.log" || fail "wrong results with mixed CHORUS_DEBUG"
grep "^\[0\] .*algorithm: " "$tmp/mixed.log" | sed 's/.*algorithm: //' | sort > "$tmp/mixed.0"
diff "$tmp/choices.0" "$tmp/mixed.0" > /dev/null || fail "rank 0's choices changed with the others' CHORUS_DEBUG"
if grep -q "^\[[123]\] .*algorithm: " "$tmp/mixed.log"; then fail "ranks with CHORUS_DEBUG=off logged"; fi
echo "selector_test: mixed CHORUS_DEBUG: same choices, 0 wrong"
