// Reduce-scatter by recursive halving: log2(p) rounds (the ring needs n-1).
// In the round with distance d (p/2, p/4, ..., 1) a rank keeps half of its
// current range of blocks and sends the other half to its partner (index ^
// d), which keeps that half and sends this one; each side reduces what it
// receives into the half it keeps. The data sent halves every round, so the
// total is (p-1)/p of the buffer, as for the ring.
//
// Any world size: with p the largest power of two <= n and rem = n - p, the
// first 2*rem ranks pair up (2i, 2i+1) and the even one hands its whole
// input to the odd one, which reduces it in (as in recursive_doubling.cpp).
// Active rank i then stands for the blocks of its ranks: blocks 2i and 2i+1
// for i < rem, block i + rem after that. That map is increasing, so a group
// of active ranks always stands for a contiguous range of blocks, and the
// halving splits the group. At the end the odd ranks send the even ones their
// block.
//
// Every block is reduced on one rank only; operands go in rank order (lower
// first) all the same, so results do not depend on the run.

#include "algorithms/algorithms.hpp"

#include "reduce/reduce.hpp"

#include <cstring>
#include <vector>

namespace chorus::algo {
namespace {

using transport::Combine;
using transport::Request;

// The rounds over blocks of any size: block j is elements [off(j),
// off(j + 1)) of send, off(n) the total. Rank r ends with block r, reduced,
// in recv.
template <typename Off>
void halving_rounds(Context& c, const char* send, char* recv, DataType dtype, ReduceOp op,
                    Off off) {
  const std::size_t esize = size_of(dtype);
  const int n = c.size, rank = c.rank;
  const std::size_t total = off(n) * esize;
  const std::size_t mine = off(rank + 1) - off(rank);  // elements of this rank's block
  if (total == 0) return;
  if (n == 1) {
    if (send != recv) reduce::copy(recv, send, total);
    if (op == ReduceOp::Avg) reduce::finalize_avg(recv, mine, dtype, n);
    return;
  }
  const Fold fold(rank, n);
  const int p = fold.p;

  if (fold.sits_out) {
    // Folded out: the partner returns our block, reduced and divided. In
    // place, recv lies inside send; it is written only after the partner has
    // received all of send.
    Request reqs[2] = {c.t.isend_reduced(rank + 1, c.call, send, total),
                       c.t.irecv(rank + 1, c.call, recv, mine * esize, Combine::copy())};
    c.t.wait(reqs, c.deadline);
    return;
  }
  const bool folded = fold.stands_for_two;
  const int me = fold.me;
  auto active_rank = [&fold](int i) { return fold.rank_of(i); };
  // Byte offset of the first block active rank i stands for (i == p: the end).
  const int rem = fold.rem;
  auto at = [&](int i) { return off(i < rem ? 2 * i : i + rem) * esize; };

  // Partial results go to scratch (send is const, recv holds one block); the
  // last round of a rank that stands for its own block only reduces straight
  // into recv. `own` is the current partial: send until scratch is written.
  char* work = ensure_scratch(c, total);
  const char* own = send;
  if (folded) {
    Request r = c.t.irecv(rank - 1, c.call, work, total,
                          Combine::reduce_from(own, dtype, op, /*incoming_first=*/true));
    c.t.wait({&r, 1}, c.deadline);
    own = work;
  }
  std::vector<Request> reqs;
  reqs.reserve(2);
  for (int d = p / 2; d >= 1; d /= 2) {
    const int partner_idx = me ^ d;
    const int partner = active_rank(partner_idx);
    const int base = me & ~(2 * d - 1);
    const bool lower = (me & d) == 0;
    const int keep = lower ? base : base + d;
    const int give = lower ? base + d : base;
    const std::size_t keep_off = at(keep), keep_len = at(keep + d) - keep_off;
    const std::size_t give_off = at(give), give_len = at(give + d) - give_off;
    // In the last round the kept range is this rank's own blocks. In place,
    // recv is own's block when own is still send: combining into it is fine
    // (the same bytes as the operand, and never part of what is sent).
    // Ranges of empty blocks still exchange (empty) messages: both sides
    // of every round expect one.
    char* dst = d == 1 && !folded ? recv : work + keep_off;
    reqs.clear();
    reqs.push_back(c.t.irecv(partner, c.call, dst, keep_len,
                             Combine::reduce_from(own + keep_off, dtype, op,
                                                  /*incoming_first=*/partner_idx < me)));
    reqs.push_back(c.t.isend_reduced(partner, c.call, own + give_off, give_len));
    c.t.wait(reqs, c.deadline);
    own = work;
  }

  if (!folded) {
    if (op == ReduceOp::Avg) reduce::finalize_avg(recv, mine, dtype, n);
    return;
  }
  // Blocks rank-1 (the partner's) and rank (ours) are final in work, side
  // by side.
  const std::size_t theirs_n = off(rank) - off(rank - 1);
  char* theirs = work + off(rank - 1) * esize;
  char* ours = work + off(rank) * esize;
  if (op == ReduceOp::Avg) reduce::finalize_avg(theirs, theirs_n + mine, dtype, n);
  Request r = c.t.isend(rank - 1, c.call, theirs, theirs_n * esize);
  reduce::copy(recv, ours, mine * esize);
  c.t.wait({&r, 1}, c.deadline);
}

void halving_reduce_scatter(Context& c, const Args& a) {
  const std::size_t count = a.count;
  halving_rounds(c, static_cast<const char*>(a.send), static_cast<char*>(a.recv), a.dtype, a.op,
                 [count](int j) { return static_cast<std::size_t>(j) * count; });
}

// With T = n blocks of the call: log2(p) rounds moving and reducing (p-1)/p
// of T in all; the fold adds a whole-buffer message and reduction, and a
// block going back:
//   log2(p) alpha + (p-1)/p T (beta + gamma)
//   + (rem ? 2 alpha + T beta + block beta + T gamma : 0).
double halving_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1) return 0;
  const Model::Link& L = m.flat(l);
  const double block = static_cast<double>(call.bytes());
  const double total = block * n;
  const int p = floor_pow2(n);
  const double f = static_cast<double>(p - 1) / p;
  double t = ceil_log2(p) * L.alpha_us + f * total * (L.us_per_byte() + m.reduce_us_per_byte());
  if (p != n)
    t += 2 * L.alpha_us + (total + block) * L.us_per_byte() + total * m.reduce_us_per_byte();
  return t;
}

}  // namespace

void halving_reduce_scatterv(Context& c, const void* send, void* recv,
                             std::span<const std::size_t> counts, DataType dtype, ReduceOp op) {
  std::vector<std::size_t> off(counts.size() + 1, 0);
  for (std::size_t j = 0; j < counts.size(); ++j) off[j + 1] = off[j] + counts[j];
  halving_rounds(c, static_cast<const char*>(send), static_cast<char*>(recv), dtype, op,
                 [&off](int j) { return off[static_cast<std::size_t>(j)]; });
}

const Algorithm kHalvingReduceScatter = {
    "recursive_halving", Coll::ReduceScatter,
    "log2(n) rounds, each sending half of the remaining blocks to rank ^ 2^k (fold for "
    "non-powers of two)",
    no_constraint, halving_cost, halving_reduce_scatter};

}  // namespace chorus::algo
