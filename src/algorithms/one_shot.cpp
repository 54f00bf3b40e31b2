// One-shot allreduce for tiny messages on shared memory: every rank sends its
// whole buffer to every other rank, then reduces the n contributions itself.
// One step of latency instead of log2(n) or 2(n-1); each rank receives
// (n-1) x B bytes, so it only pays when B is tiny and a message costs a few
// cache-line stores (the shm transport's slots), not a system call.
//
// Determinism: contributions land in scratch and are combined in rank order
// (x0 op x1 op ... op x_{n-1}) on every rank, so every rank computes the same
// bits whatever order the messages arrive in.

#include "algorithms/algorithms.hpp"

#include "reduce/reduce.hpp"

#include <cstring>

namespace chorus::algo {
namespace {

// Beyond this every rank would receive too much: (n-1) x 64 KiB.
constexpr std::size_t kMaxBytes = 64 << 10;

std::string one_shot_constraint(const Layout& l, const Call& call) {
  if (l.size > 1 && (!l.single_host() || !l.local_shm))
    return "one_shot needs every rank on one host, talking through shared memory";
  if (call.bytes() > kMaxBytes)
    return "one_shot is for messages up to " + std::to_string(kMaxBytes >> 10) + " KiB (this one has " +
           std::to_string(call.bytes()) + "); every rank would receive n-1 copies";
  return {};
}

// One latency, then n-1 messages received and reduced per rank. Posting a
// message on shared memory costs a fraction of a full latency.
double one_shot_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1) return 0;
  const Model::Link& L = m.flat(l);
  const double b = static_cast<double>(call.bytes());
  return L.alpha_us * (1.0 + 0.25 * (n - 2)) + (n - 1) * b * (L.us_per_byte() + m.reduce_us_per_byte());
}

void one_shot_allreduce(Context& c, const Args& a) {
  if (trivial_allreduce(c, a)) return;
  const int n = c.size;
  const std::size_t bytes = a.count * size_of(a.dtype);
  // Slot r of scratch holds rank r's contribution (this rank's own stays in send).
  char* slots = ensure_scratch(c, bytes * static_cast<std::size_t>(n));
  const char* own = static_cast<const char*>(a.send);
  if (a.send == a.recv) {
    reduce::copy(slots + static_cast<std::size_t>(c.rank) * bytes, a.send, bytes);
    own = slots + static_cast<std::size_t>(c.rank) * bytes;
  }
  std::vector<transport::Request> reqs;
  reqs.reserve(2 * static_cast<std::size_t>(n - 1));
  // Sends first: the others wait for them, and posting the receives
  // overlaps with their journey.
  for (int k = 1; k < n; ++k) reqs.push_back(c.t.isend((c.rank + k) % n, c.call, own, bytes));
  for (int k = 1; k < n; ++k) {
    const int from = (c.rank - k + n) % n;
    reqs.push_back(c.t.irecv(from, c.call, slots + static_cast<std::size_t>(from) * bytes, bytes,
                             transport::Combine::copy()));
  }
  c.t.wait(reqs, c.deadline);
  auto contribution = [&](int r) {
    return r == c.rank ? own : slots + static_cast<std::size_t>(r) * bytes;
  };
  reduce::combine3(a.recv, contribution(0), contribution(1), a.count, a.dtype, a.op);
  for (int r = 2; r < n; ++r) reduce::combine(a.recv, contribution(r), a.count, a.dtype, a.op);
  if (a.op == ReduceOp::Avg) reduce::finalize_avg(a.recv, a.count, a.dtype, n);
}

}  // namespace

const Algorithm kOneShotAllreduce = {
    "one_shot", Coll::Allreduce,
    "every rank sends its buffer to every rank and reduces all n itself; tiny messages on shm",
    one_shot_constraint, one_shot_cost, one_shot_allreduce};

}  // namespace chorus::algo
