#!/usr/bin/env bash
# One transport across emulated hosts (2 network namespaces x 2 ranks, each
# with its own /dev/shm): every collective of chorus-bench, every dtype and
# op, checked against closed forms; then every algorithm forced (four runs,
# as the collective suites do); then kill -9 of one rank of 4: the three
# survivors must fail with PeerFailure naming it within 10 s.
#
# TRANSPORT: tcp, libfabric (provider tcp;ofi_rxm) or ucx (UCX_TLS=tcp on the
# namespace's veth, eth0: by default UCX would find another way between
# ranks of one machine). Every rank runs inside a namespace.
# usage: fabric_test.sh TRANSPORT HOSTS_SH CHORUS_BENCH
set -uo pipefail
transport=$1
hosts=$2
bench=$3
"$hosts" check >&2 || exit $?   # 77: skip, with the reason
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "fabric_test($transport): FAIL: $*" >&2; exit 1; }

export CHORUS_TRANSPORT=$transport CHORUS_DEBUG=warn
case $transport in
  tcp) ;;
  libfabric) export CHORUS_FI_PROVIDER='tcp;ofi_rxm' ;;
  ucx) export UCX_TLS=tcp UCX_NET_DEVICES=eth0 ;;
  *) fail "unknown transport $transport" ;;
esac

# run NAME ARGS...: chorus-bench on 2 hosts x 2 ranks; all results checked.
run() {
  local name=$1; shift
  local start=$SECONDS
  "$hosts" run --hosts 2 --ranks-per-host 2 --timeout 200 -- "$bench" "$@" > "$tmp/$name.log" 2>&1
  local rc=$?
  if grep -q "unknown transport '$transport'" "$tmp/$name.log"; then
    echo "fabric_test: SKIP: this build has no $transport transport" >&2
    exit 77
  fi
  if grep -q "no provider offers\|no usable provider" "$tmp/$name.log"; then
    echo "fabric_test: SKIP: $(grep -m1 -o 'libfabric: no .*' "$tmp/$name.log")" >&2
    exit 77
  fi
  [[ $rc -eq 0 ]] || { tail -30 "$tmp/$name.log"; fail "$name: exit status $rc"; }
  grep -q "Out of bounds values : 0 OK" "$tmp/$name.log" || { tail -30 "$tmp/$name.log"; fail "$name: wrong results"; }
  echo "fabric_test($transport): $name: 0 wrong ($((SECONDS - start)) s)"
}

# alltoallv with the alltoall's counts; allgatherv and reduce_scatterv with
# odd ranks one element short, by the allgather's and the reduce_scatter's
# algorithms (forced below).
colls=allreduce,broadcast,allgather,reduce_scatter,alltoall,alltoallv,allgatherv,reduce_scatterv
run all-dtypes -b 8 -e 1M -f 16 -d all -o all -n 1 -w 0 -c 1 --coll "$colls"
sets=(
  'allreduce:ring,broadcast:chain,allgather:ring,reduce_scatter:ring'
  'allreduce:recursive_doubling,broadcast:binomial,allgather:bruck,reduce_scatter:recursive_halving'
  'allreduce:rabenseifner,broadcast:scatter_allgather'
  'allreduce:tree'
  'allreduce:hierarchical'
)
for i in "${!sets[@]}"; do
  CHORUS_ALGO=${sets[$i]} run "algorithms-$((i + 1))" -b 8 -e 8M -f 8 -n 1 -w 0 -c 1 -d float -o all --coll "$colls"
done

# kill -9 rank 2 (on host 1) during a long allreduce loop. The victim kills
# itself (exec keeps the shell's pid) after the loop has started; every
# rank notes when it ended.
victim=2
"$hosts" run --hosts 2 --ranks-per-host 2 --timeout 120 --keep-going -- sh -c '
  if [ "$CHORUS_RANK" = '$victim' ]; then
    (sleep 3; date +%s.%N > '"$tmp"'/killed_at; kill -9 $$) &
    exec "$0" "$@"
  fi
  "$0" "$@"; rc=$?
  echo "rank $CHORUS_RANK ended with status $rc at $(date +%s.%N)"
  exit $rc' "$bench" -b 4M -e 4M -n 1000000 -w 1 -c 0 > "$tmp/kill.log" 2>&1
[[ -s "$tmp/killed_at" ]] || { tail -30 "$tmp/kill.log"; fail "the victim was not killed (did the job start?)"; }
killed_at=$(cat "$tmp/killed_at")
for r in 0 1 3; do
  line=$(grep -m1 "rank $r ended with status" "$tmp/kill.log") || { tail -30 "$tmp/kill.log"; fail "rank $r never ended"; }
  status=$(sed 's/.*status \([0-9]*\) at.*/\1/' <<< "$line")
  at=$(sed 's/.* at //' <<< "$line")
  [[ $status -ne 0 ]] || fail "rank $r exited 0 after rank $victim was killed"
  grep -E "r$r\].*PeerFailure.*rank $victim" "$tmp/kill.log" > /dev/null ||
    { grep -E "r$r\]" "$tmp/kill.log" | tail -5; fail "rank $r did not report PeerFailure naming rank $victim"; }
  took=$(echo "$at - $killed_at" | bc)
  echo "fabric_test($transport): kill -9 rank $victim: rank $r failed after $took s"
  (( $(echo "$took < 10" | bc) )) || fail "rank $r took $took s (> 10 s) to fail"
done
echo "fabric_test($transport): PASS"
