#!/usr/bin/env bash
# chorusrun's CPU binding (src/core/topology): --bind-to core puts each rank on
# a core of its own (no CPU shared), tells the ranks CHORUS_CPU_BIND=none so
# that their communicators leave the binding alone, --bind-to none and
# CHORUS_CPU_BIND=none bind nothing, and a bad CPU list is a launcher error.
# Exit 77 (skipped) when this process may use fewer than 2 cores.
set -u
chorusrun=$1
hello=${2:-}
show='grep Cpus_allowed_list: /proc/self/status; echo "bind=${CHORUS_CPU_BIND:-unset}"'
fail=0

# "0-2,5" -> "0 1 2 5"
expand() {
  local item out=""
  for item in ${1//,/ }; do
    if [[ $item == *-* ]]; then out+=" $(seq -s ' ' "${item%-*}" "${item#*-}")"; else out+=" $item"; fi
  done
  echo $out
}
# The CPU list rank $2 printed in output $1.
cpus_of() { sed -n "s/^\[$2\] Cpus_allowed_list:[[:space:]]*//p" <<<"$1"; }

mine=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)
probe=$("$chorusrun" -n 2 --bind-to core -v -- true 2>&1)
if grep -q "not binding" <<<"$probe"; then
  echo "SKIP: fewer than 2 usable cores: $probe"
  exit 77
fi

out=$("$chorusrun" -n 2 --bind-to core -- /bin/sh -c "$show" 2>&1)
c0=$(cpus_of "$out" 0)
c1=$(cpus_of "$out" 1)
if [[ -z $c0 || -z $c1 ]]; then
  echo "FAIL: no affinity reported:"; echo "$out"; fail=1
else
  for a in $(expand "$c0"); do
    for b in $(expand "$c1"); do
      [[ $a == "$b" ]] && { echo "FAIL: ranks 0 ($c0) and 1 ($c1) share CPU $a"; fail=1; }
    done
  done
  [[ $c0 == "$mine" || $c1 == "$mine" ]] && { echo "FAIL: a rank was left unbound ($c0 / $c1)"; fail=1; }
fi
[[ $(grep -c '^\[[01]\] bind=none$' <<<"$out") == 2 ]] ||
  { echo "FAIL: the ranks did not get CHORUS_CPU_BIND=none:"; echo "$out"; fail=1; }

for how in "--bind-to none" "env CHORUS_CPU_BIND=none"; do
  if [[ $how == env* ]]; then
    out=$(CHORUS_CPU_BIND=none "$chorusrun" -n 2 -- /bin/sh -c "$show" 2>&1)
  else
    out=$("$chorusrun" -n 2 $how -- /bin/sh -c "$show" 2>&1)
  fi
  for r in 0 1; do
    [[ $(cpus_of "$out" $r) == "$mine" ]] ||
      { echo "FAIL: $how: rank $r has CPUs '$(cpus_of "$out" $r)', expected '$mine'"; fail=1; }
  done
done

out=$("$chorusrun" -n 2 --bind-to 0,0 -- true 2>&1)
rc=$?
[[ $rc == 1 ]] && grep -q "named twice" <<<"$out" ||
  { echo "FAIL: --bind-to 0,0 exited $rc: $out"; fail=1; }

# The ranks' communicators see CHORUS_CPU_BIND=none and say so.
if [[ -n $hello ]]; then
  out=$(CHORUS_DEBUG=info "$chorusrun" -n 2 -- "$hello" 2>&1)
  [[ $(grep -c "CPU binding: none" <<<"$out") == 2 ]] ||
    { echo "FAIL: the communicators did not leave the binding to chorusrun:"; echo "$out"; fail=1; }
fi

[[ $fail == 0 ]] && echo "PASS: ranks on CPUs '$c0' and '$c1'; none and bad lists behave"
exit $fail
