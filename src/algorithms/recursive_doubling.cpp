// Recursive-doubling allreduce for small messages: log2(p) rounds in which
// partners (rank ^ mask) swap their partial results and combine them. One
// latency per round instead of the ring's 2(n-1) steps; each rank sends the
// whole buffer every round, so it only pays for small messages.
//
// Any world size, by the usual fold: with p the largest power of two <= n
// and rem = n - p, the first 2*rem ranks pair up (2i, 2i+1). The even one
// hands its whole vector to the odd one, which reduces it in and stands for
// both in the recursive doubling among p ranks; at the end it hands the
// result back. So a non-power-of-two size costs two extra steps.
//
// Determinism: every combination takes its operands in rank order (the
// lower rank's partial first), and both partners of a round combine the same
// two values in the same order, so every rank ends with the same bits (min
// and max of -0 and +0, NaN payloads) and every run with the same ones.

#include "algorithms/algorithms.hpp"

#include "reduce/reduce.hpp"

#include <cstring>

namespace chorus::algo {
namespace {

using transport::Combine;
using transport::Request;

void recursive_doubling_allreduce(Context& c, const Args& a) {
  if (trivial_allreduce(c, a)) return;
  const int n = c.size, rank = c.rank;
  const std::size_t bytes = a.count * size_of(a.dtype);
  const char* send = static_cast<const char*>(a.send);
  char* recv = static_cast<char*>(a.recv);
  const Fold fold(rank, n);
  const int p = fold.p;

  if (fold.sits_out) {
    // Folded out: the odd partner reduces our vector in and returns the
    // (already Avg-divided) result. In-place is safe: the result is sent only
    // after the partner has received all of our buffer.
    Request reqs[2] = {c.t.isend_reduced(rank + 1, c.call, send, bytes),
                       c.t.irecv(rank + 1, c.call, recv, bytes, Combine::copy())};
    c.t.wait(reqs, c.deadline);
    return;
  }
  const bool folded = fold.stands_for_two;
  const int me = fold.me;
  auto active_rank = [&fold](int i) { return fold.rank_of(i); };
  const int rounds = ceil_log2(p);

  // Each step writes a buffer other than the one it sends from (a send reads
  // its buffer until it completes, while the receive combines into the
  // destination). Steps alternate between recv and scratch so that the last
  // one writes recv: step j of `steps` writes recv when steps - j is even.
  const int steps = rounds + (folded ? 1 : 0);
  char* scratch = ensure_scratch(c, 2 * bytes);
  char* spare = scratch + bytes;
  auto dst_of = [&](int j) { return (steps - j) % 2 == 0 ? recv : scratch; };
  const char* src = send;
  int step = 1;
  if (folded) {
    // Nothing is sent in this step, so it may combine in place (in-place
    // call, dst == recv == send): dst = partner's vector (lower rank, first) op ours.
    char* dst = dst_of(step++);
    Request r = c.t.irecv(rank - 1, c.call, dst, bytes,
                          Combine::reduce_from(src, a.dtype, a.op, /*incoming_first=*/true));
    c.t.wait({&r, 1}, c.deadline);
    src = dst;
  } else if (send == recv && dst_of(1) == recv) {
    // In-place, and the first round would send and combine into the same
    // buffer: send from a copy instead (a small message, by this algorithm's use).
    reduce::copy(spare, send, bytes);
    src = spare;
  }
  for (int mask = 1; mask < p; mask <<= 1) {
    const int partner_idx = me ^ mask;
    const int partner = active_rank(partner_idx);
    char* dst = dst_of(step++);
    // The send first: the partner waits for it, and posting the receive
    // overlaps with its journey instead of delaying it. The receive's
    // Combine is built before the send: built after it, its narrow stores
    // read back whole wait behind the send's store to the partner's line
    // (a store-forwarding stall the length of a cross-core transfer).
    const Combine comb = Combine::reduce_from(src, a.dtype, a.op, /*incoming_first=*/partner_idx < me);
    Request reqs[2] = {c.t.isend_reduced(partner, c.call, src, bytes),
                       c.t.irecv(partner, c.call, dst, bytes, comb)};
    c.t.wait(reqs, c.deadline);
    src = dst;
  }
  // The last step wrote recv. Divide once, before the result goes back to a
  // folded-out partner, so that it gets the divided bits too.
  if (a.op == ReduceOp::Avg) reduce::finalize_avg(recv, a.count, a.dtype, n);
  if (folded) {
    Request r = c.t.isend(rank - 1, c.call, recv, bytes);
    c.t.wait({&r, 1}, c.deadline);
  }
}

// log2(p) rounds of one whole-buffer message and one reduction each, plus,
// when n is not a power of two, the fold (a message and a reduction) and the
// hand-back (a message):
//   (log2 p + (rem ? 2 : 0)) * (alpha + B*beta) + (log2 p + (rem ? 1 : 0)) * B*gamma.
double recursive_doubling_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1) return 0;
  const Model::Link& L = m.flat(l);
  const double b = static_cast<double>(call.bytes());
  const int p = floor_pow2(n);
  const int log2p = ceil_log2(p);
  const bool fold = p != n;
  return (log2p + (fold ? 2 : 0)) * (L.alpha_us + b * L.us_per_byte()) +
         (log2p + (fold ? 1 : 0)) * b * m.reduce_us_per_byte();
}

}  // namespace

const Algorithm kRecursiveDoublingAllreduce = {
    "recursive_doubling", Coll::Allreduce,
    "log2(n) rounds of whole-buffer exchange with rank ^ 2^k (fold for non-powers of two); "
    "small messages",
    no_constraint, recursive_doubling_cost, recursive_doubling_allreduce};

}  // namespace chorus::algo
