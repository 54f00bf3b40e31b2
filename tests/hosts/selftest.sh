#!/usr/bin/env bash
# Checks of the multi-host harness (hosts.sh), run by meson (suite 'hosts'):
#   selftest.sh shm-isolation
#       a file made in /dev/shm by a rank of host 0 is seen by the other rank
#       of host 0, but not by the ranks of host 1 nor from the root namespace
#   selftest.sh transports PROG
#       PROG (hello_allreduce) on 2 hosts x 2 ranks with CHORUS_DEBUG=info:
#       every rank says multi-host, shm between the ranks of a host, tcp across
#   selftest.sh rate MIN_BYTES PROG ARGS...
#       PROG on 2 hosts x 1 rank with --rate 100mbit: a tbf qdisc is on both
#       ends of both links, each sent at least MIN_BYTES, and the shaper held
#       packets back (overlimits > 0). No timing is asserted.
# Exit status 77 (skip) where hosts.sh check says namespaces cannot be made.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
hosts=$here/hosts.sh
mode=${1:?mode: shm-isolation, transports or rate}
shift

fail=0
check() {  # check CONDITION-STATUS MESSAGE
  if [[ $1 -eq 0 ]]; then echo "ok: $2"; else echo "FAIL: $2"; fail=1; fi
}

case $mode in
  shm-isolation)
    "$hosts" check || exit 77
    dir=$(mktemp -d /tmp/chorus-hosts-shmtest.XXXXXX)
    trap 'rm -rf "$dir"' EXIT
    probe=chorus-hosts-probe-$$
    # Rank 0 (host 0) makes the file and keeps its host alive until the root
    # namespace has looked; the others look once it exists.
    PROBE=$probe DIR=$dir "$hosts" run --hosts 2 --ranks-per-host 2 --timeout 60 -- sh -c '
      wait_for() { i=0; while [ ! -e "$1" ]; do i=$((i+1)); [ $i -gt 400 ] && { echo "no $1"; exit 1; }; sleep 0.05; done; }
      if [ "$CHORUS_RANK" = 0 ]; then
        echo hello >/dev/shm/$PROBE || exit 1
        touch "$DIR/created"
        wait_for "$DIR/root-checked"
        wait_for "$DIR/done.1"; wait_for "$DIR/done.2"; wait_for "$DIR/done.3"
        echo "made /dev/shm/$PROBE on $(hostname)"
        exit 0
      fi
      wait_for "$DIR/created"
      if [ -e /dev/shm/$PROBE ]; then seen=yes; else seen=no; fi
      echo "host $CHORUS_HOSTS_HOST sees /dev/shm/$PROBE: $seen"
      echo "$seen" >"$DIR/seen.$CHORUS_RANK"
      touch "$DIR/done.$CHORUS_RANK"
    ' &
    pid=$!
    for _ in $(seq 1 400); do [[ -e $dir/created ]] && break; sleep 0.05; done
    [[ -e $dir/created ]]; check $? "rank 0 created its /dev/shm file"
    [[ ! -e /dev/shm/$probe ]]; check $? "the root namespace does not see it"
    touch "$dir/root-checked"
    wait $pid; rc=$?
    check $rc "hosts.sh run exited 0"
    [[ $(cat "$dir/seen.1" 2>/dev/null) == yes ]]; check $? "rank 1 (host 0) sees it"
    [[ $(cat "$dir/seen.2" 2>/dev/null) == no ]]; check $? "rank 2 (host 1) does not"
    [[ $(cat "$dir/seen.3" 2>/dev/null) == no ]]; check $? "rank 3 (host 1) does not"
    [[ ! -e /dev/shm/$probe ]]; check $? "nothing left in the root /dev/shm"
    ;;

  transports)
    prog=${1:?PROG}
    "$hosts" check || exit 77
    out=$(CHORUS_DEBUG=info CHORUS_TRANSPORT=auto "$hosts" run --hosts 2 --ranks-per-host 2 --timeout 100 -- "$prog" 2>&1)
    rc=$?
    echo "$out"
    check $rc "hosts.sh run exited 0"
    [[ $(grep -c "(multi-host)" <<<"$out") -eq 4 ]]; check $? "all 4 ranks say multi-host"
    [[ $(grep -c "transport shm+tcp (auto)" <<<"$out") -eq 4 ]]; check $? "all 4 ranks use shm+tcp"
    [[ $(grep -c "shm transport: .*1 host peers" <<<"$out") -eq 4 ]]; check $? "each rank has 1 shm peer (its host's other rank)"
    grep -q "^\[h1 r2\] .*listening on 10\." <<<"$out"; check $? "host 1 listens on its 10.x address"
    [[ $(grep -c " OK$" <<<"$out") -eq 4 ]]; check $? "all 4 ranks got the right sum"
    ;;

  rate)
    min=${1:?MIN_BYTES}
    shift
    "$hosts" check --rate || exit 77
    out=$("$hosts" run --hosts 2 --ranks-per-host 1 --rate 100mbit --show-qdisc --timeout 100 -- "$@" 2>&1)
    rc=$?
    echo "$out"
    check $rc "hosts.sh run exited 0"
    qd=$(grep '^\[qdisc ' <<<"$out")
    [[ $(grep -c "qdisc tbf .*rate 100Mbit" <<<"$qd") -eq 4 ]]; check $? "tbf 100Mbit on both ends of both links"
    low=0 held=0
    while read -r line; do
      sent=$(sed -n 's/.* Sent \([0-9]*\) bytes.*/\1/p' <<<"$line")
      over=$(sed -n 's/.*overlimits \([0-9]*\).*/\1/p' <<<"$line")
      [[ -n $sent && $sent -ge $min ]] || low=1
      [[ -n $over && $over -gt 0 ]] && held=1
    done <<<"$qd"
    [[ $low -eq 0 ]]; check $? "every qdisc sent at least $min bytes"
    if [[ $min -ge 1000000 ]]; then
      [[ $held -eq 1 ]]; check $? "the shaper held packets back (overlimits > 0)"
    fi
    ;;

  *)
    echo "unknown mode '$mode'" >&2
    exit 2
    ;;
esac
exit $fail
