// What the algorithm files share: the registry of descriptors, the layout,
// the built-in model defaults, and small helpers.

#include "algorithms/algorithms.hpp"

#include "reduce/reduce.hpp"

#include <algorithm>
#include <cstring>

namespace chorus::algo {

std::span<const Algorithm* const> all_algorithms() {
  // Order matters twice: ties in estimated cost go to the earlier entry, and
  // an algorithm's position among those of its collective is its id on the
  // wire (CallDesc::algo), so append new algorithms at the end of their
  // collective's group.
  static const Algorithm* const kAll[] = {
      &kRingAllreduce,        &kRecursiveDoublingAllreduce, &kRabenseifnerAllreduce,
      &kTreeAllreduce,        &kOneShotAllreduce,           &kHierarchicalAllreduce,
      &kChainBroadcast,       &kBinomialBroadcast,          &kScatterAllgatherBroadcast,
      &kRingAllgather,        &kBruckAllgather,             &kRingReduceScatter,
      &kHalvingReduceScatter, &kRingReduce,                 &kLinearGather,
      &kLinearScatter,        &kPairwiseAlltoall,           &kDisseminationBarrier,
  };
  return kAll;
}

const Algorithm* find_algorithm(Coll coll, const std::string& name) {
  for (const Algorithm* a : all_algorithms())
    if (a->coll == coll && name == a->name) return a;
  return nullptr;
}

std::vector<int> Layout::host_ranks(int host) const {
  std::vector<int> out;
  for (int r = 0; r < size; ++r)
    if (host_of[static_cast<std::size_t>(r)] == host) out.push_back(r);
  return out;
}

Layout Layout::from_hosts(std::vector<int> host_of, bool local_shm) {
  Layout l;
  l.size = static_cast<int>(host_of.size());
  // Renumber hosts in order of their lowest rank, whatever ids came in.
  std::vector<int> seen;
  for (int& h : host_of) {
    auto it = std::find(seen.begin(), seen.end(), h);
    if (it == seen.end()) {
      seen.push_back(h);
      h = static_cast<int>(seen.size()) - 1;
    } else {
      h = static_cast<int>(it - seen.begin());
    }
  }
  l.host_of = std::move(host_of);
  l.hosts = std::max(1, static_cast<int>(seen.size()));
  std::vector<int> per(static_cast<std::size_t>(l.hosts), 0);
  for (int h : l.host_of) ++per[static_cast<std::size_t>(h)];
  l.max_per_host = per.empty() ? 1 : *std::max_element(per.begin(), per.end());
  l.local_shm = local_shm;
  return l;
}

Model Model::defaults_for(const std::string& transport, const Layout& layout) {
  // Measured on the development machine (2 vCPU EPYC VM, docs/algorithms.md)
  // and rounded; `chorus-bench --calibrate` replaces them for a real system.
  Model m;
  const bool shm = layout.local_shm && transport != "tcp";
  if (shm) m.local = {1.0, 9.0};     // shared-memory slots and bulk ring
  else m.local = {12.0, 3.0};        // TCP over loopback
  m.net = {30.0, 1.2};               // TCP across a 10 Gbit/s network
  m.reduce_gbps = 10.0;
  m.source = "built-in defaults for " + std::string(shm ? "shm" : "tcp");
  return m;
}

std::string no_constraint(const Layout&, const Call&) { return {}; }

char* ensure_scratch(Context& c, std::size_t bytes) {
  if (c.scratch.size() < bytes) c.scratch.resize(bytes);
  return c.scratch.data();
}

bool trivial_allreduce(Context& c, const Args& a) {
  if (c.size > 1 && a.count > 0) return false;
  if (a.send != a.recv && a.count > 0) reduce::copy(a.recv, a.send, a.count * size_of(a.dtype));
  if (a.op == ReduceOp::Avg) reduce::finalize_avg(a.recv, a.count, a.dtype, c.size);
  return true;
}

// Measured on a 2-vCPU EPYC VM whose kernel reports an 8 MiB L3 (4 MiB a
// rank at 2 ranks), 2 ranks on shm, registered buffers, median busbw of 3
// interleaved rounds, the old fixed threshold (32 MiB a rank) against the
// share (docs/benchmarks.md, "Two states of the host, final copies past
// the caches"): allgather out of place 4 MiB 2.11 -> 3.54 GB/s, 16 MiB 1.77
// -> 3.22; allreduce 4 MiB 2.42 -> 4.39, 16 MiB 2.59 -> 3.62; broadcast 16
// MiB 2.78 -> 4.64. Calls that fit the share keep their copies in the
// caches: an in-place allgather of 4 MiB runs at 16-20 GB/s from them.
bool streams(const Context& c, std::size_t footprint) { return footprint > c.cache_share; }

void copy_final(void* dst, const void* src, std::size_t bytes, bool stream) {
  if (stream) reduce::copy_streaming(dst, src, bytes);
  else
    reduce::copy(dst, src, bytes);
}

bool trivial_broadcast(Context& c, const Args& a) {
  const std::size_t bytes = a.count * size_of(a.dtype);
  if (c.rank == a.root && a.send != a.recv && bytes > 0)
    copy_final(a.recv, a.send, bytes, streams(c, 2 * bytes));
  return c.size == 1 || bytes == 0;
}

int ceil_log2(int n) {
  int k = 0;
  while ((1 << k) < n) ++k;
  return k;
}

int floor_pow2(int n) {
  int p = 1;
  while (p * 2 <= n) p *= 2;
  return p;
}

}  // namespace chorus::algo
