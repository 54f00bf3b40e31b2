#!/usr/bin/env bash
# Hierarchical allreduce across emulated hosts (docs/algorithms.md): 2 hosts
# x 2 ranks, shm inside each host, tcp between them. Counts the bytes the
# transports sent across the host boundary (the tcp part of each rank's
# CHORUS_DEBUG=info traffic line) for a 16 MiB allreduce forced to
# `hierarchical` and to the flat `ring`, and checks them against the closed
# forms: per call the flat ring over ranks 0,1 | 2,3 crosses the boundary on
# 2 of its 4 edges, each carrying 2(n-1)/n x B = 1.5 B, so 3 B; hierarchical
# sends each host's shard across once each way, 2(H-1)/H x B per host, so 2 B:
# two thirds. Also checks that the selector picks hierarchical here.
# usage: hierarchical_test.sh HOSTS_SH CHORUS_BENCH
set -euo pipefail
hosts=$1
bench=$2
"$hosts" check >&2 || exit $?   # 77: skip, with the reason
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "hierarchical_test: $*" >&2; exit 1; }
bytes=$((16 << 20))
iters=3   # timed; plus 1 warmup and 1 checked call
for algo in hierarchical ring; do
  CHORUS_DEBUG=info "$hosts" run --hosts 2 --ranks-per-host 2 --timeout 200 -- \
    "$bench" -b $bytes -e $bytes -n $iters -w 1 -c 1 --coll allreduce --algo $algo \
    > "$tmp/$algo.log" 2>&1 || { tail -30 "$tmp/$algo.log"; fail "$algo run failed"; }
  grep -q "Out of bounds values : 0 OK" "$tmp/$algo.log" || fail "$algo: wrong results"
  # The benchmark's own communicator: sum of the tcp bytes every rank sent.
  grep -o "traffic of chorus/c[0-9]* rank [0-9]*:.*" "$tmp/$algo.log" > "$tmp/$algo.traffic"
  [[ $(wc -l < "$tmp/$algo.traffic") -ge 4 ]] || fail "$algo: fewer than 4 traffic lines"
  sed -n 's/.*\[tcp sent \([0-9]*\) B.*/\1/p' "$tmp/$algo.traffic" | awk '{s += $1} END {print s + 0}' > "$tmp/$algo.tcp"
  echo "hierarchical_test: $algo sent $(cat "$tmp/$algo.tcp") B between hosts"
done
h=$(cat "$tmp/hierarchical.tcp")
r=$(cat "$tmp/ring.tcp")
calls=$((2 * (iters + 2)))  # out-of-place and in-place
# Expected: 2 B and 3 B per call; the harness's own small calls add a little.
awk -v h="$h" -v r="$r" -v b=$bytes -v c=$calls 'BEGIN {
  eh = 2 * b * c; er = 3 * b * c;
  if (h < eh || h > eh * 1.01) { printf "hierarchical crossed %d B, expected %d\n", h, eh; exit 1 }
  if (r < er || r > er * 1.01) { printf "ring crossed %d B, expected %d\n", r, er; exit 1 }
  printf "hierarchical/ring bytes across hosts = %.3f (closed form 2/3)\n", h / r }' ||
  fail "byte counts off"
# Unforced, the selector takes hierarchical for this call on this layout.
CHORUS_DEBUG=info "$hosts" run --hosts 2 --ranks-per-host 2 --timeout 200 -- \
  "$bench" -b $bytes -e $bytes -n 1 -w 0 -c 1 --coll allreduce > "$tmp/auto.log" 2>&1 ||
  { tail -30 "$tmp/auto.log"; fail "unforced run failed"; }
grep -q "algorithm: allreduce 16 MiB on 4 ranks / 2 host(s): hierarchical (cheapest)" "$tmp/auto.log" ||
  { grep "algorithm: allreduce 16 MiB" "$tmp/auto.log" | head -2; fail "the selector did not pick hierarchical at 16 MiB"; }
echo "hierarchical_test: the selector picks hierarchical at 16 MiB on 2 hosts x 2 ranks"
