#!/usr/bin/env bash
# hosts.sh: emulates several hosts on one machine for multi-host Chorus tests.
#
#   hosts.sh run [--hosts H] [--ranks-per-host R | --layout 2,1,...] [--rate 10gbit]
#                [--timeout SEC] [--shm-size 512M] [--keep-going] [--show-qdisc]
#                [--skip-if-unavailable] -- CMD ARGS...
#       H hosts (default 2), R ranks each (default 1) or a count per host;
#       --rate: tbf qdisc on both ends of every host link; --timeout (300 s)
#       kills everything (exit 124); --keep-going lets the other ranks finish
#       after a failure; --show-qdisc prints `tc -s qdisc` of every link at
#       the end; --skip-if-unavailable exits 77 (not 2) without namespaces.
#       Exit status: 0, or the first nonzero status of a rank (named).
#   hosts.sh check [--rate]    0 if namespaces (and with --rate a tbf qdisc) can
#                              be made here, else 77 (meson's skip) and why
#   hosts.sh cleanup [--force] removes what killed runs left (chorus-h* namespaces)
#
# Ranks get CHORUS_RANK (host-major), CHORUS_WORLD_SIZE, CHORUS_LOCAL_RANK,
# CHORUS_LOCAL_SIZE, CHORUS_STORE=<host 0>:<port> (rank 0 hosts the store),
# CHORUS_JOB_ID, CHORUS_HOSTS_HOST (host index), CHORUS_HOSTS_COUNT and
# CHORUS_HOSTS_ADDR, plus the caller's environment (CHORUS_STORE_EXTERNAL
# removed), stdin /dev/null, output prefixed "[h<host> r<rank>] ".
#
# Each host is a network namespace joined by a veth pair to a Linux bridge that
# lives in a namespace of its own, with an address 10.A.B.<host+1>/24, and a
# private /dev/shm (a tmpfs in a mount namespace held open by one `sleep`
# process per host). Every rank runs inside its host's network, mount, UTS and
# IPC namespaces. Nothing is created in, and no packet is sent from, the root
# network namespace. See README.md.
set -uo pipefail

me=$(basename "$0")
say() { echo "$me: $*" >&2; }
die() { say "$*"; exit 2; }

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}

# ---------------------------------------------------------------- check
# Prints the reason and returns 1 when namespaces cannot be made here.
can_run() {
  local want_rate=$1
  if [[ $(id -u) -ne 0 ]]; then echo "not root (network namespaces need CAP_SYS_ADMIN/CAP_NET_ADMIN)"; return 1; fi
  local t
  for t in ip unshare nsenter setpriv sed; do
    command -v "$t" >/dev/null 2>&1 || { echo "'$t' not found (scripts/install-deps installs iproute2 and util-linux)"; return 1; }
  done
  if [[ $want_rate -eq 1 ]]; then
    command -v tc >/dev/null 2>&1 || { echo "'tc' not found (iproute2)"; return 1; }
  fi
  local ns="chorus-h$$-check" err
  if ! err=$(ip netns add "$ns" 2>&1); then echo "cannot create a network namespace: $err"; return 1; fi
  local ok=0 why=""
  if ! err=$(ip -n "$ns" link add chk0 type veth peer name chk1 2>&1); then
    why="cannot create a veth pair: $err"
  elif ! err=$(ip -n "$ns" link add chkbr type bridge 2>&1); then
    why="cannot create a bridge: $err"
  elif ! err=$(ip netns exec "$ns" unshare --mount --uts --ipc --propagation private -- \
                 sh -c 'mount -t tmpfs -o size=1M tmpfs /dev/shm' 2>&1); then
    why="cannot mount a private /dev/shm (unshare --mount): $err"
  elif [[ $want_rate -eq 1 ]] && ! err=$(add_qdisc "$ns" chk0 100mbit 2>&1); then
    why="$err"
  else
    ok=1
  fi
  ip netns del "$ns" 2>/dev/null
  if [[ $ok -eq 0 ]]; then echo "$why"; return 1; fi
  return 0
}

cmd_check() {
  local want_rate=0
  while (($#)); do
    case $1 in
      --rate) want_rate=1 ;;
      *) die "check: unknown option '$1'" ;;
    esac
    shift
  done
  local why
  if ! why=$(can_run "$want_rate"); then
    say "SKIP: $why"
    exit 77
  fi
  exit 0
}

# ---------------------------------------------------------------- rate limiting
# Bytes per second of a tc rate ("10gbit", "100mbit", "500kbit", "1gbps", ...).
rate_bytes() {
  local r=${1,,}
  [[ $r =~ ^([0-9]+)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)$ ]] || return 1
  local n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]}
  case $u in
    bit) echo $((n / 8)) ;;
    kbit) echo $((n * 1000 / 8)) ;;
    mbit) echo $((n * 1000000 / 8)) ;;
    gbit) echo $((n * 1000000000 / 8)) ;;
    tbit) echo $((n * 1000000000000 / 8)) ;;
    bps) echo "$n" ;;
    kbps) echo $((n * 1000)) ;;
    mbps) echo $((n * 1000000)) ;;
    gbps) echo $((n * 1000000000)) ;;
    tbps) echo $((n * 1000000000000)) ;;
  esac
}

# add_qdisc NS DEV RATE: a token bucket on DEV's egress. The bucket holds at
# least 64 KiB (a GSO super-packet of veth) and 4 ms at the rate (HZ=250 tick).
add_qdisc() {
  local ns=$1 dev=$2 rate=$3 bps burst
  bps=$(rate_bytes "$rate") || { echo "bad --rate '$rate' (e.g. 10gbit, 100mbit, 500kbit, 1gbps)"; return 1; }
  ((bps > 0)) || { echo "--rate '$rate' is zero"; return 1; }
  burst=$((bps / 250))
  ((burst < 65536)) && burst=65536
  local err
  if ! err=$(ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 50ms 2>&1); then
    # The module may just not be loaded yet.
    command -v modprobe >/dev/null 2>&1 && modprobe sch_tbf 2>/dev/null
    if ! err=$(ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 50ms 2>&1); then
      echo "cannot add a tbf qdisc (rate $rate) on $dev: $err; the kernel needs sch_tbf (CONFIG_NET_SCH_TBF, 'modprobe sch_tbf')"
      return 1
    fi
  fi
}

# ---------------------------------------------------------------- cleanup
# kill_ns_pids NS...: TERM, then KILL, every process inside the namespaces.
kill_ns_pids() {
  local ns i
  local -a pids
  for i in $(seq 1 30); do
    pids=()
    for ns in "$@"; do
      [[ -e /run/netns/$ns ]] || continue
      mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null)
    done
    ((${#pids[@]})) || return 0
    if ((i < 20)); then kill -TERM "${pids[@]}" 2>/dev/null; else kill -KILL "${pids[@]}" 2>/dev/null; fi
    sleep 0.1
  done
}

# cleanup [--force]: removes chorus-h<pid>-* namespaces whose hosts.sh is gone.
cmd_cleanup() {
  local force=0
  [[ ${1:-} == --force ]] && force=1
  local -A prefixes=()
  local ns
  while read -r ns _; do
    [[ $ns =~ ^(chorus-h([0-9]+)-) ]] || continue
    local prefix=${BASH_REMATCH[1]} owner=${BASH_REMATCH[2]}
    if [[ $force -eq 0 && -r /proc/$owner/cmdline ]] && tr '\0' ' ' </proc/"$owner"/cmdline | grep -q hosts.sh; then
      say "leaving $ns: its run (pid $owner) is still going (--force removes it anyway)"
      continue
    fi
    prefixes[$prefix]=1
  done < <(ip netns list 2>/dev/null)
  local n=0 p
  for p in "${!prefixes[@]}"; do
    local list=()
    while read -r ns _; do [[ $ns == "$p"* ]] && list+=("$ns"); done < <(ip netns list)
    kill_ns_pids "${list[@]}"
    for ns in "${list[@]}"; do ip netns del "$ns" && say "removed namespace $ns" && n=$((n + 1)); done
  done
  # The exit-status directories of runs that were killed.
  local d
  for d in /tmp/chorus-h[0-9]*-??????; do
    [[ -d $d && $d =~ ^/tmp/chorus-h([0-9]+)- ]] || continue
    [[ $force -eq 0 && -d /proc/${BASH_REMATCH[1]} ]] && continue
    rm -rf "$d"
  done
  say "cleanup: removed $n namespace(s)"
}

# ---------------------------------------------------------------- run
PREFIX="chorus-h$$-"
BRNS="${PREFIX}br"
NAMESPACES=()  # every namespace this run made, bridge first
HOLDERS=()     # holder pid per host
RANK_JOBS=()   # background job (pid) per rank
WORK=""        # temporary directory (exit codes)
CLEANED=0

cleanup_run() {
  ((CLEANED)) && return
  CLEANED=1
  ((${#NAMESPACES[@]})) && kill_ns_pids "${NAMESPACES[@]}"
  # The per-rank subshells end once their rank has; a rank caught between
  # fork and setns ran in the root namespace: wait for the subshells a while.
  local j i
  for i in $(seq 1 30); do
    local alive=0
    for j in "${RANK_JOBS[@]}"; do kill -0 "$j" 2>/dev/null && alive=1; done
    ((alive)) || break
    ((${#NAMESPACES[@]})) && kill_ns_pids "${NAMESPACES[@]}"
    sleep 0.1
  done
  for j in "${RANK_JOBS[@]}" "${HOLDERS[@]}"; do wait "$j" 2>/dev/null; done
  local ns
  for ns in "${NAMESPACES[@]}"; do
    ip netns del "$ns" 2>/dev/null || say "could not delete namespace $ns (try: $0 cleanup)"
  done
  [[ -n $WORK ]] && rm -rf "$WORK"
}

on_signal() {
  say "interrupted by SIG$1: stopping the ranks and removing the hosts"
  trap - EXIT
  cleanup_run
  case $1 in INT) exit 130 ;; TERM) exit 143 ;; *) exit 129 ;; esac
}

# setup_hosts H RATE SHM_SIZE: namespaces, bridge, veths, addresses, holders.
setup_hosts() {
  local nhosts=$1 rate=$2 shm_size=$3 h err
  ip netns add "$BRNS" || die "cannot create namespace $BRNS"
  NAMESPACES+=("$BRNS")
  ip -n "$BRNS" link set lo up
  ip -n "$BRNS" link add br0 type bridge || die "cannot create a bridge in $BRNS"
  ip -n "$BRNS" link set br0 up
  for ((h = 0; h < nhosts; h++)); do
    local ns="${PREFIX}${h}"
    ip netns add "$ns" || die "cannot create namespace $ns"
    NAMESPACES+=("$ns")
    # Both ends are made inside namespaces: nothing appears in the root one.
    ip -n "$BRNS" link add "h$h" type veth peer name eth0 netns "$ns" || die "cannot create the veth of host $h"
    ip -n "$BRNS" link set "h$h" master br0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$(host_addr "$h")/24" dev eth0
    ip -n "$ns" link set eth0 up
    if [[ -n $rate ]]; then
      err=$(add_qdisc "$ns" eth0 "$rate") || die "$err"
      err=$(add_qdisc "$BRNS" "h$h" "$rate") || die "$err"
    fi
  done
  # Every host resolves every host's name (its own /etc/hosts, bind-mounted
  # in its mount namespace; the root one is untouched).
  {
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
    for ((h = 0; h < nhosts; h++)); do printf '%s\t%s\n' "$(host_addr "$h")" "${PREFIX}${h}"; done
  } >"$WORK/hosts"
  chmod 644 "$WORK/hosts"
  for ((h = 0; h < nhosts; h++)); do
    # The holder: a sleep in the host's network namespace and in a private
    # mount (own /dev/shm and /etc/hosts; /sys of that netns, from ip netns
    # exec), UTS (hostname) and IPC namespace. It dies with this script
    # (pdeathsig) and its mounts with it.
    setpriv --pdeathsig TERM ip netns exec "${PREFIX}${h}" \
      unshare --mount --uts --ipc --propagation private -- \
      sh -c 'mount -t tmpfs -o "size=$1,mode=1777" chorus-shm /dev/shm && hostname "$2" &&
             mount --bind "$3" /etc/hosts && exec sleep infinity' \
      _ "$shm_size" "${PREFIX}${h}" "$WORK/hosts" </dev/null &
    HOLDERS+=($!)
  done
  # Ready when each holder is the sleep (its mount and hostname are done).
  local i
  for ((h = 0; h < nhosts; h++)); do
    local pid=${HOLDERS[$h]}
    for i in $(seq 1 100); do
      [[ $(cat /proc/"$pid"/comm 2>/dev/null) == sleep ]] && break
      kill -0 "$pid" 2>/dev/null || die "the /dev/shm holder of host $h failed (tmpfs mount or unshare)"
      sleep 0.05
    done
    [[ $(cat /proc/"$pid"/comm 2>/dev/null) == sleep ]] || die "the /dev/shm holder of host $h did not start"
  done
}

host_addr() { echo "${NET}.$(($1 + 1))"; }

show_qdiscs() {
  local h
  for ((h = 0; h < ${#HOLDERS[@]}; h++)); do
    echo "[qdisc h$h eth0] $(ip netns exec "${PREFIX}${h}" tc -s qdisc show dev eth0 | tr -s ' \n' ' ')"
    echo "[qdisc h$h bridge-side] $(ip netns exec "$BRNS" tc -s qdisc show dev "h$h" | tr -s ' \n' ' ')"
  done
}

cmd_run() {
  local nhosts=2 rpp=1 layout="" rate="" timeout=300 keep_going=0 shm_size=512M show_qdisc=0
  local skip_unavailable=0
  while (($#)); do
    case $1 in
      --hosts) nhosts=${2:?}; shift ;;
      --ranks-per-host) rpp=${2:?}; shift ;;
      --layout) layout=${2:?}; shift ;;
      --rate) rate=${2:?}; shift ;;
      --timeout) timeout=${2:?}; shift ;;
      --shm-size) shm_size=${2:?}; shift ;;
      --keep-going) keep_going=1 ;;
      --show-qdisc) show_qdisc=1 ;;
      --skip-if-unavailable) skip_unavailable=1 ;;
      --) shift; break ;;
      -h|--help) usage ;;
      *) die "run: unknown option '$1' (the command goes after --)" ;;
    esac
    shift
  done
  (($#)) || die "run: no command (hosts.sh run [options] -- CMD ARGS...)"
  local cmd=("$@")

  local counts=()
  if [[ -n $layout ]]; then
    [[ $layout =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--layout '$layout': a comma-separated list of ranks per host (each >= 1)"
    IFS=, read -ra counts <<<"$layout"
  else
    [[ $nhosts =~ ^[1-9][0-9]*$ ]] || die "--hosts '$nhosts' is not a positive integer"
    [[ $rpp =~ ^[1-9][0-9]*$ ]] || die "--ranks-per-host '$rpp' is not a positive integer"
    local h
    for ((h = 0; h < nhosts; h++)); do counts+=("$rpp"); done
  fi
  nhosts=${#counts[@]}
  ((nhosts <= 250)) || die "at most 250 hosts"
  [[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout '$timeout' is not a positive number of seconds"
  if [[ -n $rate ]]; then
    rate_bytes "$rate" >/dev/null || die "bad --rate '$rate' (e.g. 10gbit, 100mbit, 500kbit, 1gbps)"
  fi
  local why
  if ! why=$(can_run "$([[ -n $rate ]] && echo 1 || echo 0)"); then
    if ((skip_unavailable)); then say "SKIP: $why"; exit 77; fi
    die "cannot emulate hosts here: $why"
  fi

  # A private /24 and a store port, both from the pid. The addresses exist
  # only inside this run's namespaces, so even two runs with equal numbers
  # would not meet.
  NET="10.$((64 + ($$ >> 8) % 128)).$(($$ & 255))"
  local port=$((29500 + $$ % 1000))
  local store="${NET}.1:$port"
  local world=0 c
  for c in "${counts[@]}"; do world=$((world + c)); done

  trap 'cleanup_run' EXIT
  trap 'on_signal INT' INT
  trap 'on_signal TERM' TERM
  trap 'on_signal HUP' HUP
  WORK=$(mktemp -d "/tmp/${PREFIX}XXXXXX")

  setup_hosts "$nhosts" "$rate" "$shm_size"
  say "$nhosts host(s) ${NET}.0/24 [${counts[*]}] ranks, world $world, store $(host_addr 0):$port${rate:+, rate $rate}, namespaces ${PREFIX}*"

  # Launch, host-major: host 0 has ranks 0..counts[0]-1.
  local rank=0 h l
  local -a rank_host=()
  for ((h = 0; h < nhosts; h++)); do
    for ((l = 0; l < counts[h]; l++)); do
      rank_host[rank]=$h
      local tag="[h$h r$rank]"
      (
        trap - EXIT INT TERM HUP
        unset CHORUS_STORE_EXTERNAL
        export CHORUS_RANK=$rank CHORUS_WORLD_SIZE=$world CHORUS_LOCAL_RANK=$l \
          CHORUS_LOCAL_SIZE=${counts[h]} CHORUS_STORE="$store" \
          CHORUS_JOB_ID="hosts$$" CHORUS_HOSTS_HOST=$h CHORUS_HOSTS_COUNT=$nhosts \
          CHORUS_HOSTS_ADDR="${NET}.$((h + 1))"
        # The rank's stderr goes through a prefixer to fd 3 (the real
        # stderr), its stdout through fd 4 to the other prefixer. The exit
        # status is written once both prefixers are done, so the rank's
        # output precedes anything said about it.
        exec 3>&2
        {
          exec 2>/dev/null  # this shell's own notes ("Terminated"): the summary says it
          nsenter --target "${HOLDERS[$h]}" --net --mount --uts --ipc --wd="$PWD" -- "${cmd[@]}" \
            </dev/null 2>&1 1>&4 4>&- | sed -u "s/^/$tag /" >&3
          exit "${PIPESTATUS[0]}"
        } 4>&1 | sed -u "s/^/$tag /"
        rc=${PIPESTATUS[0]}
        echo "$rc" >"$WORK/rc.$rank"
        exit "$rc"
      ) &
      RANK_JOBS+=($!)
      rank=$((rank + 1))
    done
  done

  # Wait: all done, the first failure (unless --keep-going), or the timeout.
  local deadline=$((SECONDS + timeout)) first_rank=-1 first_rc=0 timed_out=0 r
  local -a done_rc=()
  while :; do
    local finished=0
    for ((r = 0; r < world; r++)); do
      if [[ -z ${done_rc[$r]:-} && -s $WORK/rc.$r ]]; then
        done_rc[r]=$(<"$WORK/rc.$r")
        if [[ ${done_rc[$r]} -ne 0 && $first_rank -lt 0 ]]; then
          first_rank=$r
          first_rc=${done_rc[$r]}
          say "rank $r (host ${rank_host[$r]}) exited with status $first_rc"
        fi
      fi
      [[ -n ${done_rc[$r]:-} ]] && finished=$((finished + 1))
    done
    ((finished == world)) && break
    if ((first_rank >= 0 && keep_going == 0)); then
      say "stopping the other ranks (--keep-going lets them finish)"
      break
    fi
    if ((SECONDS >= deadline)); then
      timed_out=1
      local running=""
      for ((r = 0; r < world; r++)); do [[ -z ${done_rc[$r]:-} ]] && running+=" $r"; done
      say "timeout after ${timeout}s: killing everything (still running: rank(s)$running)"
      break
    fi
    sleep 0.1
  done

  ((show_qdisc)) && [[ -n $rate ]] && show_qdiscs
  # Stop whatever still runs (also what a rank left behind), then wait for the
  # output of every rank.
  kill_ns_pids "${NAMESPACES[@]:1}"
  for r in "${RANK_JOBS[@]}"; do wait "$r" 2>/dev/null; done
  local failed=""
  for ((r = 0; r < world; r++)); do
    [[ -z ${done_rc[$r]:-} && -s $WORK/rc.$r ]] && done_rc[r]=$(<"$WORK/rc.$r")
    [[ ${done_rc[$r]:-0} -ne 0 ]] && failed+=" r$r=${done_rc[$r]}"
  done
  [[ -n $failed ]] && say "nonzero exit statuses:$failed"
  cleanup_run
  trap - EXIT INT TERM HUP
  if ((first_rank >= 0)); then
    say "FAILED: rank $first_rank (host ${rank_host[$first_rank]}) exited with status $first_rc (the first failure seen)"
    exit "$first_rc"
  fi
  if ((timed_out)); then exit 124; fi
  exit 0
}

case ${1:-} in
  run) shift; cmd_run "$@" ;;
  check) shift; cmd_check "$@" ;;
  cleanup) shift; cmd_cleanup "$@" ;;
  *) usage ;;
esac
