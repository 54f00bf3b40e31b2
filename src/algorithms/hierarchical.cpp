// Hierarchical allreduce for jobs whose ranks span several hosts with more
// than one rank on a host (L ranks on each of H hosts):
//
//   1. intra-host ring reduce-scatter: local rank j ends with shard (j+1)%L
//      of the buffer, reduced over its host (shared memory);
//   2. inter-host ring allreduce of that shard among the H ranks that hold
//      it, one per host: the L shards cross the network in parallel, so every
//      rank's link works and each byte crosses a host boundary
//      2(H-1)/H times instead of the flat ring's share of the 2(n-1)/n;
//   3. intra-host ring allgather of the shards.
//
// Bytes leaving a host: 2(H-1)/H x B (the flat ring over hosts in rank order
// sends 2(n-1)/n x B over each of its H host-crossing edges). For 2 hosts x 2
// ranks: 2B against 3B, two thirds.

#include "algorithms/algorithms.hpp"

#include "reduce/reduce.hpp"

#include <cstring>

namespace chorus::algo {
namespace {

std::string hierarchical_constraint(const Layout& l, const Call&) {
  if (l.single_host()) return "hierarchical needs ranks on more than one host";
  if (l.max_per_host < 2) return "hierarchical needs more than one rank on some host";
  for (int h = 0; h < l.hosts; ++h)
    if (static_cast<int>(l.host_ranks(h).size()) != l.max_per_host)
      return "hierarchical needs the same number of ranks on every host";
  return {};
}

double hierarchical_cost(const Layout& l, const Model& m, const Call& call) {
  const double L = l.max_per_host, H = l.hosts;
  const double b = static_cast<double>(call.bytes());
  const double shard = b / L;
  const double local = (L - 1) * (2 * m.local.alpha_us + 2 * shard * m.local.us_per_byte()) +
                       (L - 1) * shard * m.reduce_us_per_byte();
  const double net = 2 * (H - 1) * m.net.alpha_us + 2 * (H - 1) / H * shard * m.net.us_per_byte() +
                     (H - 1) / H * shard * m.reduce_us_per_byte();
  return local + net;
}

void hierarchical_allreduce(Context& c, const Args& a) {
  if (trivial_allreduce(c, a)) return;
  const Layout& l = *c.layout;
  const int host = l.host_of[static_cast<std::size_t>(c.rank)];
  Group local;
  local.ranks = l.host_ranks(host);
  for (int i = 0; i < local.size(); ++i)
    if (local.ranks[static_cast<std::size_t>(i)] == c.rank) local.me = i;
  // The ranks with my local index on every host, in host order.
  Group cross;
  for (int h = 0; h < l.hosts; ++h) {
    if (h == host) cross.me = cross.size();
    cross.ranks.push_back(l.host_ranks(h)[static_cast<std::size_t>(local.me)]);
  }
  const std::size_t esize = size_of(a.dtype);
  char* out = static_cast<char*>(a.recv);
  const int L = local.size();
  group_ring_reduce_scatter(c, local, out, static_cast<const char*>(a.send), a.count, a.dtype, a.op);
  const int shard = (local.me + 1) % L;
  const std::size_t off = part_offset(a.count, L, shard), len = part_length(a.count, L, shard);
  group_ring_allreduce(c, cross, out + off * esize, out + off * esize, len, a.dtype, a.op);
  if (a.op == ReduceOp::Avg) reduce::finalize_avg(out + off * esize, len, a.dtype, c.size);
  group_ring_allgather(c, local, out, a.count, a.dtype);
}

}  // namespace

const Algorithm kHierarchicalAllreduce = {
    "hierarchical", Coll::Allreduce,
    "intra-host reduce-scatter, inter-host allreduce per shard, intra-host allgather",
    hierarchical_constraint, hierarchical_cost, hierarchical_allreduce};

}  // namespace chorus::algo
