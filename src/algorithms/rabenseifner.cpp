// Rabenseifner's allreduce: a reduce-scatter by recursive halving, then an
// allgather by recursive doubling. log2(p) rounds each way, like recursive
// doubling, but each round moves half the previous round's data, so every
// rank sends and receives about 2B in all instead of B*log2(p): the
// medium-to-large message algorithm when latency still matters.
//
// The buffer is split into p near-equal parts (part_offset/part_length; some
// are empty when count < p). Halving round with distance d (p/2, p/4, ..., 1):
// a rank's current range is the 2d parts of its aligned group of 2d ranks;
// the lower half of the group keeps the lower d parts and sends the upper
// ones to its partner (index ^ d), which does the opposite. After the last
// round active rank i holds part i, fully reduced. The allgather runs the
// same rounds backwards, copying instead of reducing.
//
// Any world size: the first 2*rem ranks (rem = n - p, p the largest power
// of two <= n) fold in pairs as in recursive_doubling.cpp: the even rank's
// vector is reduced into the odd one's, the p remaining ranks run the
// algorithm, and the odd ranks hand the result back.
//
// Every part is reduced on exactly one rank and copied from there, so all
// ranks get the same bits; operands still go in rank order (lower first),
// so the result does not depend on the run either.

#include "algorithms/algorithms.hpp"

#include "reduce/reduce.hpp"

#include <vector>

namespace chorus::algo {
namespace {

using transport::Combine;
using transport::Request;

void rabenseifner_allreduce(Context& c, const Args& a) {
  if (trivial_allreduce(c, a)) return;
  const int n = c.size, rank = c.rank;
  const std::size_t esize = size_of(a.dtype);
  const std::size_t count = a.count;
  const std::size_t bytes = count * esize;
  const char* send = static_cast<const char*>(a.send);
  char* recv = static_cast<char*>(a.recv);
  const Fold fold(rank, n);
  const int p = fold.p;

  if (fold.sits_out) {
    // Folded out (see recursive_doubling.cpp): the odd partner returns the
    // finished, Avg-divided vector after it has received all of ours.
    Request reqs[2] = {c.t.isend_reduced(rank + 1, c.call, send, bytes),
                       c.t.irecv(rank + 1, c.call, recv, bytes, Combine::copy())};
    c.t.wait(reqs, c.deadline);
    return;
  }
  const bool folded = fold.stands_for_two;
  const int me = fold.me;
  auto active_rank = [&fold](int i) { return fold.rank_of(i); };
  // Byte offset of part i (i == p: the end of the buffer).
  auto at = [&](int i) { return part_offset(count, p, i) * esize; };

  // `own` is this rank's current partial result: the send buffer until the
  // first combine has written recv, then recv. Every receive combines into
  // recv as own (op) incoming in rank order; in a round the range received
  // and the range sent are disjoint, so a send never reads bytes being written.
  const char* own = send;
  if (folded) {
    Request r = c.t.irecv(rank - 1, c.call, recv, bytes,
                          Combine::reduce_from(own, a.dtype, a.op, /*incoming_first=*/true));
    c.t.wait({&r, 1}, c.deadline);
    own = recv;
  }

  // Reduce-scatter by recursive halving.
  std::vector<Request> reqs;
  reqs.reserve(2);
  for (int d = p / 2; d >= 1; d /= 2) {
    const int partner_idx = me ^ d;
    const int partner = active_rank(partner_idx);
    const int base = me & ~(2 * d - 1);
    const bool lower = (me & d) == 0;
    const int keep = lower ? base : base + d;  // first part of the half kept
    const int give = lower ? base + d : base;  // first part of the half sent
    const std::size_t keep_off = at(keep), keep_len = at(keep + d) - keep_off;
    const std::size_t give_off = at(give), give_len = at(give + d) - give_off;
    // Empty halves (count < p) are skipped on both sides: the partner's
    // `give` is our `keep`, computed from the same numbers.
    reqs.clear();
    if (keep_len > 0)
      reqs.push_back(c.t.irecv(partner, c.call, recv + keep_off, keep_len,
                               Combine::reduce_from(own + keep_off, a.dtype, a.op,
                                                    /*incoming_first=*/partner_idx < me)));
    if (give_len > 0) reqs.push_back(c.t.isend_reduced(partner, c.call, own + give_off, give_len));
    c.t.wait(reqs, c.deadline);
    own = recv;
  }

  // Part `me` is final here and nowhere else: divide it once, before it is
  // copied to every other rank.
  if (a.op == ReduceOp::Avg)
    reduce::finalize_avg(recv + at(me), (at(me + 1) - at(me)) / esize, a.dtype, n);

  // Allgather by recursive doubling: before the round with distance d a rank
  // holds the d parts of its aligned group of d; it swaps them for the
  // partner group's.
  for (int d = 1; d < p; d *= 2) {
    const int partner_idx = me ^ d;
    const int partner = active_rank(partner_idx);
    const int mine = me & ~(d - 1), theirs = partner_idx & ~(d - 1);
    const std::size_t mine_off = at(mine), mine_len = at(mine + d) - mine_off;
    const std::size_t theirs_off = at(theirs), theirs_len = at(theirs + d) - theirs_off;
    reqs.clear();
    if (theirs_len > 0)
      reqs.push_back(c.t.irecv(partner, c.call, recv + theirs_off, theirs_len, Combine::copy()));
    if (mine_len > 0) reqs.push_back(c.t.isend(partner, c.call, recv + mine_off, mine_len));
    c.t.wait(reqs, c.deadline);
  }

  if (folded) {
    Request r = c.t.isend(rank - 1, c.call, recv, bytes);
    c.t.wait({&r, 1}, c.deadline);
  }
}

// Halving and doubling: log2(p) messages each; each moves (p-1)/p of B in
// all, and the halving reduces (p-1)/p of B. The fold adds a whole-buffer
// message and reduction and the hand-back another whole-buffer message:
//   2 log2(p) alpha + 2 (p-1)/p B beta + (p-1)/p B gamma
//   + (rem ? 2 (alpha + B beta) + B gamma : 0).
double rabenseifner_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1) return 0;
  const Model::Link& L = m.flat(l);
  const double b = static_cast<double>(call.bytes());
  const int p = floor_pow2(n);
  const double f = static_cast<double>(p - 1) / p;
  double t =
      2 * ceil_log2(p) * L.alpha_us + 2 * f * b * L.us_per_byte() + f * b * m.reduce_us_per_byte();
  if (p != n) t += 2 * (L.alpha_us + b * L.us_per_byte()) + b * m.reduce_us_per_byte();
  return t;
}

}  // namespace

const Algorithm kRabenseifnerAllreduce = {
    "rabenseifner", Coll::Allreduce,
    "reduce-scatter by recursive halving + allgather by recursive doubling; medium messages",
    no_constraint, rabenseifner_cost, rabenseifner_allreduce};

}  // namespace chorus::algo
