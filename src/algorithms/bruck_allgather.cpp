// Bruck's allgather: ceil(log2 n) rounds for any n (the ring needs n-1).
// Blocks of different sizes (allgatherv) take the same rounds: a round's
// blocks are one range of recv either way.
// Before the round with distance d = 2^k a rank r holds the blocks of ranks
// r, r+1, ..., r+d-1 (mod n); it sends the first min(d, n-d) of them to
// r - d and receives as many from r + d, namely blocks r+d, r+d+1, ...
// After the last round it holds all n.
//
// Bruck's original keeps the blocks in a scratch buffer in that rotated
// order and rotates them into place at the end. Here each block goes
// straight to its place in recv instead: the blocks a round moves are
// consecutive modulo n, so they are one contiguous range of recv, or two
// when the range wraps past the end; sender and receiver cut it at the same
// block (the same numbers: start r + d seen from the receiver is the
// sender's own start), so the pieces match. No scratch, no final copy.

#include "algorithms/algorithms.hpp"

#include "reduce/reduce.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

namespace chorus::algo {
namespace {

using transport::Combine;
using transport::Request;

// The rounds, for blocks whose byte offsets in recv are `off(0)` ..
// `off(n)` (block i is [off(i), off(i + 1))): this rank's block must be in
// place already.
template <typename Off>
void bruck_rounds(Context& c, char* out, Off off) {
  const int n = c.size, rank = c.rank;
  std::vector<Request> reqs;
  reqs.reserve(4);
  // Blocks [first, first + cnt) modulo n as at most two contiguous ranges
  // (empty ones still go: every round exchanges a message each way, so the
  // sizes of sender and receiver are compared).
  auto pieces = [&](int first, int cnt, auto&& fn) {
    const int end = std::min(first + cnt, n);
    fn(off(first), off(end) - off(first));
    if (first + cnt > n) fn(off(0), off(first + cnt - n) - off(0));
  };
  for (int d = 1; d < n; d *= 2) {
    const int cnt = std::min(d, n - d);
    const int to = (rank - d + n) % n, from = (rank + d) % n;
    reqs.clear();
    // Receive blocks from .. from+cnt-1, send rank .. rank+cnt-1: disjoint,
    // since cnt <= d and d + cnt <= n.
    pieces(from, cnt, [&](std::size_t o, std::size_t len) {
      reqs.push_back(c.t.irecv(from, c.call, out + o, len, Combine::copy()));
    });
    pieces(rank, cnt, [&](std::size_t o, std::size_t len) {
      reqs.push_back(c.t.isend(to, c.call, out + o, len));
    });
    c.t.wait(reqs, c.deadline);
  }
}

void bruck_allgather(Context& c, const Args& a) {
  const std::size_t block = a.count * size_of(a.dtype);
  const int n = c.size, rank = c.rank;
  char* out = static_cast<char*>(a.recv);
  if (block == 0) return;
  char* mine = out + static_cast<std::size_t>(rank) * block;
  if (a.send != mine) reduce::move(mine, a.send, block);
  if (n == 1) return;
  bruck_rounds(c, out, [block](int i) { return static_cast<std::size_t>(i) * block; });
}

// ceil(log2 n) rounds (a round whose range wraps sends two messages back to
// back to the same peer: one latency); the rounds move n-1 blocks in all;
// the out-of-place copy of the own block, costed like a reduction of it:
//   ceil_log2(n) alpha + (n-1)/n * n*block * beta + block * gamma.
double bruck_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1) return 0;
  const Model::Link& L = m.flat(l);
  const double block = static_cast<double>(call.bytes());
  const double total = block * n;
  return ceil_log2(n) * L.alpha_us + static_cast<double>(n - 1) / n * total * L.us_per_byte() +
         block * m.reduce_us_per_byte();
}

}  // namespace

void bruck_allgatherv(Context& c, const void* send, void* recv, std::span<const std::size_t> counts,
                      DataType dtype) {
  const std::size_t es = size_of(dtype);
  const int n = c.size;
  std::vector<std::size_t> off(static_cast<std::size_t>(n) + 1, 0);
  for (int i = 0; i < n; ++i)
    off[static_cast<std::size_t>(i) + 1] =
        off[static_cast<std::size_t>(i)] + counts[static_cast<std::size_t>(i)] * es;
  if (off.back() == 0) return;
  char* out = static_cast<char*>(recv);
  const auto me = static_cast<std::size_t>(c.rank);
  const std::size_t mine = off[me + 1] - off[me];
  if (mine > 0 && send != out + off[me]) reduce::move(out + off[me], send, mine);
  if (n == 1) return;
  bruck_rounds(c, out, [&off](int i) { return off[static_cast<std::size_t>(i)]; });
}

const Algorithm kBruckAllgather = {
    "bruck", Coll::Allgather,
    "Bruck's algorithm: ceil(log2 n) rounds of doubling block ranges; small blocks",
    no_constraint, bruck_cost, bruck_allgather};

}  // namespace chorus::algo
