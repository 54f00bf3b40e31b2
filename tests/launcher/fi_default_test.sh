#!/usr/bin/env bash
# CHORUS_TRANSPORT=libfabric without CHORUS_FI_PROVIDER on one host picks
# libfabric's shm provider (docs/transports.md), wherever fi_getinfo lists it
# (libfabric 1.17 lists tcp;ofi_rxm first); 2 ranks, the INFO line of each
# rank names the provider and why. Exit 77 when libfabric is not here.
# usage: fi_default_test.sh CHORUSRUN HELLO_ALLREDUCE
set -uo pipefail
run=$1
hello=$2
command -v fi_info >/dev/null && fi_info -p shm >/dev/null 2>&1 ||
  { echo "SKIP: libfabric's shm provider is not installed (fi_info -p shm)"; exit 77; }
out=$(env -u CHORUS_FI_PROVIDER CHORUS_TRANSPORT=libfabric CHORUS_DEBUG=info "$run" -n 2 -- "$hello" 2>&1)
rc=$?
if grep -q "unknown transport 'libfabric'" <<<"$out"; then
  echo "SKIP: this build has no libfabric transport"; exit 77
fi
echo "$out" | grep "libfabric transport"
[[ $rc -eq 0 ]] || { echo "$out"; echo "FAIL: the job failed (rc $rc)"; exit 1; }
n=$(grep -c "libfabric transport: rank [01] on .*provider shm, domain shm (every rank is on this host)" <<<"$out")
[[ $n -eq 2 ]] || { echo "FAIL: $n of 2 ranks report provider shm (every rank is on this host)"; exit 1; }
echo "PASS: both ranks chose libfabric's shm provider on one host"
