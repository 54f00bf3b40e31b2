// Scatter-allgather broadcast (van de Geijn): the root scatters n
// near-equal parts down a binomial tree, then a ring allgather brings every
// part to every rank. Each rank receives about 2B in all, whatever n, instead
// of the binomial tree's B per round at the root: the large-message broadcast
// when a pipelined chain's n-1 hops of latency are too many.
//
// Ranks are relative to the root (v = rank - root mod n) and part i belongs
// to relative rank i, so a binomial subtree (relative ranks [v, v + span))
// owns a contiguous range of the buffer and each scatter message is one
// contiguous piece. Parts are part_offset/part_length splits of count, so
// some are empty when count < n; empty messages are skipped on both sides.
//
// The allgather is a ring 0 -> 1 -> ... -> n-1 over relative ranks that
// never sends to the root (it has everything): at step s, v sends part v - s
// and receives part v - s - 1. A part the receiver already holds from the
// scatter (its subtree's parts) is neither sent nor received: both sides
// know what the scatter gave whom. Parts move in chunks of chunk_bytes, each
// forwarded as soon as it has arrived.

#include "algorithms/algorithms.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

namespace chorus::algo {
namespace {

using transport::Combine;
using transport::Request;

void scatter_allgather_broadcast(Context& c, const Args& a) {
  const std::size_t esize = size_of(a.dtype);
  const std::size_t count = a.count;
  const int n = c.size, root = a.root;
  char* out = static_cast<char*>(a.recv);
  const bool is_root = c.rank == root;
  if (trivial_broadcast(c, a)) return;

  const int v = (c.rank - root + n) % n;
  auto real = [&](int rel) { return (rel + root) % n; };
  auto at = [&](int part) { return part_offset(count, n, part) * esize; };  // part == n: the end
  // Relative rank x's binomial subtree is [x, x + span(x)) (cut at n).
  int pow2 = 1;
  while (pow2 < n) pow2 <<= 1;
  auto span = [&](int x) { return x == 0 ? pow2 : x & -x; };
  auto holds = [&](int x, int part) { return part >= x && part < x + span(x); };
  // The root sends from its send buffer (the data, in place or not).
  const char* src = is_root ? static_cast<const char*>(a.send) : out;

  // Binomial scatter: receive the subtree's parts, pass each child its own.
  std::vector<Request> sends;
  if (v != 0) {
    const int end = std::min(v + span(v), n);
    if (at(end) > at(v)) {
      Request r =
          c.t.irecv(real(v - span(v)), c.call, out + at(v), at(end) - at(v), Combine::copy());
      c.t.wait({&r, 1}, c.deadline);
    }
  }
  for (int mask = span(v) >> 1; mask >= 1; mask >>= 1) {
    const int child = v + mask;
    if (child >= n) continue;
    const int end = std::min(child + mask, n);
    if (at(end) > at(child))
      sends.push_back(c.t.isend(real(child), c.call, src + at(child), at(end) - at(child)));
  }

  // Ring allgather towards higher relative ranks, stopping before the root.
  const std::size_t chunk = std::max<std::size_t>(esize, c.chunk_bytes / esize * esize);
  const bool has_right = v + 1 < n;
  // Every receive, in post order; a step's chunks follow those of the step
  // before, and all are waited for at the end (not every part is forwarded).
  std::vector<Request> recvs;
  std::size_t prev_first = 0;  // index of the previous step's first chunk
  for (int s = 0; s + 1 < n; ++s) {
    const int rp = ((v - s - 1) % n + n) % n;  // part received at this step
    const int sp = ((v - s) % n + n) % n;      // part sent: the one received at step s - 1
    const std::size_t cur_first = recvs.size();
    if (v != 0 && !holds(v, rp)) {
      for (std::size_t o = at(rp); o < at(rp + 1); o += chunk)
        recvs.push_back(c.t.irecv(real(v - 1), c.call, out + o, std::min(chunk, at(rp + 1) - o),
                                  Combine::copy()));
    }
    if (has_right && !holds(v + 1, sp)) {
      const bool arriving = v != 0 && !holds(v, sp);  // received at step s - 1 (s > 0 then)
      std::size_t idx = prev_first;
      for (std::size_t o = at(sp); o < at(sp + 1); o += chunk, ++idx) {
        if (arriving) c.t.wait({&recvs[idx], 1}, c.deadline);
        sends.push_back(c.t.isend(real(v + 1), c.call, src + o, std::min(chunk, at(sp + 1) - o)));
      }
    }
    prev_first = cur_first;
  }
  c.t.wait(recvs, c.deadline);
  c.t.wait(sends, c.deadline);
}

// ceil(log2 n) scatter rounds moving (n-1)/n of B in all, then n-1 ring
// steps of B/n each (the parts a rank got in the scatter are skipped, so this
// is an upper bound):
//   (ceil_log2(n) + n - 1) alpha + 2 (n-1)/n B beta.
double scatter_allgather_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1) return 0;
  const Model::Link& L = m.flat(l);
  const double f = static_cast<double>(n - 1) / n;
  return (ceil_log2(n) + n - 1) * L.alpha_us +
         2 * f * static_cast<double>(call.bytes()) * L.us_per_byte();
}

}  // namespace

const Algorithm kScatterAllgatherBroadcast = {
    "scatter_allgather", Coll::Broadcast,
    "binomial scatter of n parts + ring allgather; large messages, many ranks",
    no_constraint, scatter_allgather_cost, scatter_allgather_broadcast};

}  // namespace chorus::algo
