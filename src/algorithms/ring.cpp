#include "algorithms/algorithms.hpp"

#include "core/enforce.hpp"
#include "reduce/reduce.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>

namespace chorus::algo {
namespace {

using transport::Combine;
using transport::Request;

int mod(long long a, int n) { return static_cast<int>(((a % n) + n) % n); }

// A partition of a buffer into `n` segments (offsets and lengths in elements).
struct Segments {
  std::vector<std::size_t> off;
  std::vector<std::size_t> len;
  // Near-equal split of `count` (the first count % n segments get one more).
  static Segments balanced(std::size_t count, int n) {
    Segments s;
    std::size_t o = 0;
    for (int i = 0; i < n; ++i) {
      const std::size_t l = count / n + (static_cast<std::size_t>(i) < count % n ? 1 : 0);
      s.off.push_back(o);
      s.len.push_back(l);
      o += l;
    }
    return s;
  }
  // Equal blocks of `block` elements.
  static Segments blocks(std::size_t block, int n) {
    Segments s;
    for (int i = 0; i < n; ++i) {
      s.off.push_back(block * static_cast<std::size_t>(i));
      s.len.push_back(block);
    }
    return s;
  }
  // Segment i of counts[i] elements, packed in order.
  static Segments of(std::span<const std::size_t> counts) {
    Segments s;
    std::size_t o = 0;
    for (std::size_t k : counts) {
      s.off.push_back(o);
      s.len.push_back(k);
      o += k;
    }
    return s;
  }
  std::size_t total() const { return off.empty() ? 0 : off.back() + len.back(); }
};

// One ring pass. For step g in [0, steps): send segment (rank + shift - g)
// to the right, receive segment (rank + shift - g - 1) from the left, into
// `work`. The first `reduce_steps` steps reduce what arrives with this rank's
// own contribution, read from `own` (== work for in-place); later steps copy.
// Step 0 sends straight from `own`, so an out-of-place call never copies its
// input first. The segment sent at step g is the one received at step g - 1,
// so each chunk is forwarded as soon as it has arrived. `on_final` runs on
// each chunk of the fully reduced segment (received at step reduce_steps - 1).
// With `stream_last`, the copies of the last step go past the caches.
// With `first_src`, step 0 reads the segment it sends from there (its first
// element) instead of from `own` (allgather: the caller's send buffer).
// The ring runs over `grp` (the whole communicator, or a subgroup such as
// the ranks of one host); positions are indices into grp.ranks.
//
// The schedule is a wavefront: chunk k of step g goes out at nominal time
// k + g * lag (ties in step order), so a chunk is forwarded once `lag` more
// chunks of the stream ahead of it are queued, where lag is what the
// transport wants queued ahead (Capabilities::run_ahead). Over shared memory
// that is one chunk, so a reduced chunk is forwarded while it is still in
// cache; forwarding it after its step's whole segment sent every forwarded
// byte from DRAM a second time (1.3-1.5x slower at 16-256 MiB on 2 ranks,
// docs/benchmarks.md). Over sockets the lag is unbounded, i.e. each step's
// sends are all queued at once (a full socket keeps the link busy; a lag of
// one chunk measured 10-15% slower over loopback TCP). Messages between a
// pair are matched in post order, so each receive is posted in its slot, in
// the same order as the left neighbour's sends. Within a slot the sends go
// first, then the receives: a send waits only for a receive posted at an
// earlier slot (t - lag), and posting it before this slot's receive lets the
// right neighbour start on it at once (2 ranks, shm: 512 KiB - 2 MiB
// allreduce 10-20% faster than receives first, docs/benchmarks.md). An item
// at time t waits only for a message sent at time t - lag: no deadlock.
template <typename OnFinal>
void ring_pass(Context& c, const Group& grp, char* work, const char* own, const Segments& seg,
               std::size_t esize, int shift, int steps, int reduce_steps, DataType dtype,
               ReduceOp op, bool stream_last, OnFinal on_final, const char* first_src = nullptr) {
  const int n = grp.size();
  const int me = grp.me;
  const int right = grp.ranks[static_cast<std::size_t>(mod(me + 1, n))];
  const int left = grp.ranks[static_cast<std::size_t>(mod(me - 1, n))];
  const std::size_t chunk = std::max<std::size_t>(1, c.chunk_bytes / esize);
  auto send_seg = [&](int g) { return mod(me + shift - g, n); };
  auto recv_seg = [&](int g) { return mod(me + shift - g - 1, n); };
  auto chunks = [&](int segment) { return (seg.len[segment] + chunk - 1) / chunk; };
  std::size_t most = 0;
  for (int i = 0; i < n; ++i) most = std::max(most, chunks(i));
  if (most == 0 || steps <= 0) return;
  // Both ends of a link must use the same lag (the receiver posts in the
  // sender's order), so the lag must be the same on every rank of the ring:
  // it is taken from the transport only when all ranks share one host (then
  // every link has the same transport); across hosts, where a ring mixes
  // shm and network links, it stays unbounded (the old step-by-step order).
  const bool one_host = c.layout != nullptr && c.layout->single_host();
  const std::size_t ahead = one_host ? c.t.capabilities(right).run_ahead / (chunk * esize) : most;
  const std::size_t lag = std::clamp<std::size_t>(ahead, 1, most);
  // One nominal time slot: the items (g, t - g * lag) of every step g, in
  // step order, for the segments `of` gives.
  auto slot = [&](std::size_t t, auto of, auto fn) {
    const std::size_t g_lo = t < most ? 0 : (t - most) / lag + 1;
    const std::size_t g_hi = std::min(static_cast<std::size_t>(steps - 1), t / lag);
    for (std::size_t gi = g_lo; gi <= g_hi; ++gi) {
      const int g = static_cast<int>(gi);
      const std::size_t k = t - gi * lag;
      const int segment = of(g);
      if (k >= chunks(segment)) continue;
      const std::size_t first = seg.off[segment] + k * chunk;
      const std::size_t m = std::min(chunk, seg.len[segment] - k * chunk);
      fn(g, k, first * esize, m);
    }
  };
  std::vector<std::vector<Request>> recvs(static_cast<std::size_t>(steps));
  for (int g = 0; g < steps; ++g) recvs[g].resize(chunks(recv_seg(g)));
  std::vector<Request> sends;
  for (std::size_t t = 0; t < most + static_cast<std::size_t>(steps - 1) * lag; ++t) {
    slot(t, send_seg, [&](int g, std::size_t k, std::size_t off, std::size_t m) {
      if (g > 0) {
        c.t.wait({&recvs[g - 1][k], 1}, c.deadline);
        if (g == reduce_steps) on_final(work + off, m);
      }
      const char* src = g > 0                ? work + off
                        : first_src != nullptr ? first_src + (off - seg.off[send_seg(0)] * esize)
                                               : own + off;
      // The right neighbour reduces what it receives at the same step g.
      sends.push_back(g < reduce_steps ? c.t.isend_reduced(right, c.call, src, m * esize)
                                       : c.t.isend(right, c.call, src, m * esize));
    });
    slot(t, recv_seg, [&](int g, std::size_t k, std::size_t off, std::size_t m) {
      // The last step's copies are not forwarded: with stream_last they
      // bypass the caches (see streams()).
      const Combine comb = g >= reduce_steps ? (stream_last && g == steps - 1 ? Combine::copy_streaming()
                                                                             : Combine::copy())
                           : own == work     ? Combine::reduce(dtype, op)
                                             : Combine::reduce_from(own + off, dtype, op);
      recvs[g][k] = c.t.irecv(left, c.call, work + off, m * esize, comb);
    });
  }
  c.t.wait(recvs[steps - 1], c.deadline);
  if (steps == reduce_steps) {
    const int last = recv_seg(steps - 1);
    for (std::size_t k = 0; k < seg.len[last]; k += chunk)
      on_final(work + (seg.off[last] + k) * esize, std::min(chunk, seg.len[last] - k));
  }
  c.t.wait(sends, c.deadline);
}

}  // namespace

Group Group::all(const Context& c) {
  Group g;
  g.ranks.resize(static_cast<std::size_t>(c.size));
  for (int r = 0; r < c.size; ++r) g.ranks[static_cast<std::size_t>(r)] = r;
  g.me = c.rank;
  return g;
}

void group_ring_reduce_scatter(Context& c, const Group& g, char* work, const char* own,
                               std::size_t count, DataType dtype, ReduceOp op) {
  if (g.size() == 1 || count == 0) {
    if (own != work && count > 0) reduce::copy(work, own, count * size_of(dtype));
    return;
  }
  const int n = g.size();
  ring_pass(c, g, work, own, Segments::balanced(count, n), size_of(dtype), 0, n - 1, n - 1, dtype,
            op, false, [](char*, std::size_t) {});
}

void group_ring_allgather(Context& c, const Group& g, char* work, std::size_t count,
                          DataType dtype) {
  if (g.size() == 1 || count == 0) return;
  const int n = g.size();
  // Member i starts with part (i + 1) % n, which it sends first.
  ring_pass(c, g, work, work, Segments::balanced(count, n), size_of(dtype), 1, n - 1, 0, dtype,
            ReduceOp::Sum, false, [](char*, std::size_t) {});
}

void group_ring_allreduce(Context& c, const Group& g, char* work, const char* own,
                          std::size_t count, DataType dtype, ReduceOp op) {
  if (g.size() == 1 || count == 0) {
    if (own != work && count > 0) reduce::copy(work, own, count * size_of(dtype));
    return;
  }
  const int n = g.size();
  ring_pass(c, g, work, own, Segments::balanced(count, n), size_of(dtype), 0, 2 * (n - 1), n - 1,
            dtype, op, false, [](char*, std::size_t) {});
}

void ring_allreduce(Context& c, const void* send, void* recv, std::size_t count, DataType dtype,
                    ReduceOp op) {
  const std::size_t esize = size_of(dtype);
  char* buf = static_cast<char*>(recv);
  if (c.size == 1 || count == 0) {
    if (send != recv && count > 0) reduce::copy(buf, send, count * esize);
    if (op == ReduceOp::Avg) reduce::finalize_avg(buf, count, dtype, c.size);
    return;
  }
  const auto seg = Segments::balanced(count, c.size);
  const int n = c.size;
  auto finalize = [&](char* p, std::size_t m) {
    if (op == ReduceOp::Avg) reduce::finalize_avg(p, m, dtype, n);
  };
  // Every segment but this rank's own is received (reduced) in the first
  // half, and its own comes back in the second: recv is fully written.
  ring_pass(c, Group::all(c), buf, static_cast<const char*>(send), seg, esize, 0, 2 * (n - 1), n - 1, dtype, op,
            streams(c, (send == recv ? 1 : 2) * count * esize), finalize);
}

namespace {
// Ring reduce-scatter over the blocks `seg` gives (block r: rank r's): the
// fixed-count call's equal ones or a reduce_scatterv's (empty ones pass as
// empty steps).
void ring_reduce_scatter_blocks(Context& c, const void* send, void* recv, const Segments& seg,
                                DataType dtype, ReduceOp op) {
  const std::size_t esize = size_of(dtype);
  const int n = c.size;
  const std::size_t total = seg.total();
  const auto me = static_cast<std::size_t>(c.rank);
  char* out = static_cast<char*>(recv);
  if (total == 0) return;
  if (n == 1) {
    if (send != recv) reduce::copy(out, send, total * esize);
    if (op == ReduceOp::Avg) reduce::finalize_avg(out, total, dtype, n);
    return;
  }
  // Partial sums go to scratch (the send buffer is const); shift -1 makes the
  // last received, fully reduced segment this rank's own block.
  char* buf = ensure_scratch(c, total * esize);
  ring_pass(c, Group::all(c), buf, static_cast<const char*>(send), seg, esize, -1, n - 1, n - 1,
            dtype, op, false, [&](char* p, std::size_t m) {
              if (op == ReduceOp::Avg) reduce::finalize_avg(p, m, dtype, n);
            });
  if (seg.len[me] > 0) reduce::copy(out, buf + seg.off[me] * esize, seg.len[me] * esize);
}
}  // namespace

void ring_reduce_scatter(Context& c, const void* send, void* recv, std::size_t count,
                         DataType dtype, ReduceOp op) {
  ring_reduce_scatter_blocks(c, send, recv, Segments::blocks(count, c.size), dtype, op);
}

void ring_reduce_scatterv(Context& c, const void* send, void* recv,
                          std::span<const std::size_t> counts, DataType dtype, ReduceOp op) {
  ring_reduce_scatter_blocks(c, send, recv, Segments::of(counts), dtype, op);
}

void ring_allgather(Context& c, const void* send, void* recv, std::size_t count, DataType dtype) {
  const std::size_t esize = size_of(dtype);
  char* buf = static_cast<char*>(recv);
  char* mine = buf + static_cast<std::size_t>(c.rank) * count * esize;
  if (count == 0) return;
  const std::size_t block = count * esize;
  const std::size_t total = block * static_cast<std::size_t>(c.size);
  // The send buffer counts unless it overlaps recv (in place).
  const auto in = reinterpret_cast<std::uintptr_t>(send), out = reinterpret_cast<std::uintptr_t>(buf);
  const bool overlaps = in < out + total && out < in + block;
  const bool stream = streams(c, total + (overlaps ? 0 : block));
  if (overlaps || c.size == 1) {
    if (send != mine) reduce::move(mine, send, block);
    if (c.size == 1) return;
  }
  const auto seg = Segments::blocks(count, c.size);
  // Out of place, this rank's block goes out from the send buffer and is
  // copied into recv last: nobody else reads it from recv, so that copy
  // writes lines no other core holds (copied first and sent from recv, each
  // call's copy had to take back every line the neighbour had read the call
  // before: 2 ranks, registered, 1 MiB 3.5 -> 12.4 GB/s busbw,
  // docs/benchmarks.md). It is final, so it streams with the received ones.
  ring_pass(c, Group::all(c), buf, buf, seg, esize, 0, c.size - 1, 0, dtype, ReduceOp::Sum, stream,
            [](char*, std::size_t) {}, overlaps ? nullptr : static_cast<const char*>(send));
  if (!overlaps) copy_final(mine, send, block, stream);
}

void ring_allgatherv(Context& c, const void* send, void* recv, std::span<const std::size_t> counts,
                     DataType dtype) {
  const std::size_t esize = size_of(dtype);
  const Segments seg = Segments::of(counts);
  const std::size_t total = seg.total();
  char* buf = static_cast<char*>(recv);
  const auto me = static_cast<std::size_t>(c.rank);
  char* mine = buf + seg.off[me] * esize;
  const std::size_t block = seg.len[me] * esize;
  if (total == 0) return;
  // As ring_allgather: in place, this rank's block is already at its place;
  // out of place it goes out from the send buffer and is copied in last.
  const bool in_place = send == mine;
  const bool stream = streams(c, total * esize + (in_place ? 0 : block));
  if (c.size == 1) {
    if (!in_place && block > 0) reduce::move(mine, send, block);
    return;
  }
  ring_pass(
      c, Group::all(c), buf, buf, seg, esize, 0, c.size - 1, 0, dtype, ReduceOp::Sum, stream,
      [](char*, std::size_t) {}, in_place ? nullptr : static_cast<const char*>(send));
  if (!in_place && block > 0) copy_final(mine, send, block, stream);
}

namespace {
void ring_reduce(Context& c, const void* send, void* recv, std::size_t count, DataType dtype,
                 ReduceOp op, int root) {
  const std::size_t esize = size_of(dtype);
  const int n = c.size;
  if (count == 0) return;
  if (n == 1) {
    if (send != recv) reduce::copy(recv, send, count * esize);
    if (op == ReduceOp::Avg) reduce::finalize_avg(recv, count, dtype, n);
    return;
  }
  char* buf = ensure_scratch(c, count * esize);
  const auto seg = Segments::balanced(count, n);
  // After a reduce-scatter pass (shift -1), rank r holds segment r reduced.
  ring_pass(c, Group::all(c), buf, static_cast<const char*>(send), seg, esize, -1, n - 1, n - 1, dtype, op,
            false, [&](char* p, std::size_t m) {
    if (op == ReduceOp::Avg) reduce::finalize_avg(p, m, dtype, n);
  });
  if (c.rank == root) {
    char* out = static_cast<char*>(recv);
    std::vector<Request> reqs;
    for (int r = 0; r < n; ++r) {
      if (r == root || seg.len[r] == 0) continue;
      reqs.push_back(c.t.irecv(r, c.call, out + seg.off[r] * esize, seg.len[r] * esize,
                               transport::Combine::copy()));
    }
    reduce::copy(out + seg.off[root] * esize, buf + seg.off[root] * esize, seg.len[root] * esize);
    c.t.wait(reqs, c.deadline);
  } else if (seg.len[c.rank] > 0) {
    Request r = c.t.isend(root, c.call, buf + seg.off[c.rank] * esize, seg.len[c.rank] * esize);
    c.t.wait({&r, 1}, c.deadline);
  }
}
}  // namespace

// ---- descriptors -----------------------------------------------------------
//
// Costs (n ranks, B bytes of the call's buffer, alpha/beta of the flat link,
// gamma per byte reduced): each of the 2(n-1) ring steps moves B/n bytes and
// the first n-1 reduce them. Chunking pipelines a step's send with the
// previous step's reduction, so per step only the slower of the two counts
// once the pipeline is full; the model keeps the simple sum (an upper bound).

namespace {
double ring_allreduce_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1) return 0;
  const Model::Link& L = m.flat(l);
  const double b = static_cast<double>(call.bytes());
  const double f = static_cast<double>(n - 1) / n;
  return 2 * (n - 1) * L.alpha_us + 2 * f * b * L.us_per_byte() + f * b * m.reduce_us_per_byte();
}

// Reduce-scatter and allgather: the call's count is one rank's block, so the
// whole buffer is n blocks.
double ring_reduce_scatter_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1) return 0;
  const Model::Link& L = m.flat(l);
  const double b = static_cast<double>(call.bytes());
  return (n - 1) * (L.alpha_us + b * L.us_per_byte() + b * m.reduce_us_per_byte());
}

double ring_allgather_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1) return 0;
  const Model::Link& L = m.flat(l);
  return (n - 1) * (L.alpha_us + static_cast<double>(call.bytes()) * L.us_per_byte());
}

double ring_reduce_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1) return 0;
  const Model::Link& L = m.flat(l);
  const double b = static_cast<double>(call.bytes());
  const double f = static_cast<double>(n - 1) / n;
  // Reduce-scatter, then the root receives n-1 blocks.
  return n * L.alpha_us + 2 * f * b * L.us_per_byte() + f * b * m.reduce_us_per_byte();
}
}  // namespace

const Algorithm kRingAllreduce = {
    "ring", Coll::Allreduce,
    "ring reduce-scatter + ring allgather, chunked and pipelined; bandwidth-optimal",
    no_constraint, ring_allreduce_cost,
    [](Context& c, const Args& a) { ring_allreduce(c, a.send, a.recv, a.count, a.dtype, a.op); }};

const Algorithm kRingReduceScatter = {
    "ring", Coll::ReduceScatter, "n-1 ring steps, reducing on receive", no_constraint,
    ring_reduce_scatter_cost,
    [](Context& c, const Args& a) { ring_reduce_scatter(c, a.send, a.recv, a.count, a.dtype, a.op); }};

const Algorithm kRingAllgather = {
    "ring", Coll::Allgather, "n-1 ring steps, each forwarding the block received last", no_constraint,
    ring_allgather_cost,
    [](Context& c, const Args& a) { ring_allgather(c, a.send, a.recv, a.count, a.dtype); }};

const Algorithm kRingReduce = {
    "ring", Coll::Reduce, "ring reduce-scatter, then every rank sends its block to the root",
    no_constraint, ring_reduce_cost,
    [](Context& c, const Args& a) { ring_reduce(c, a.send, a.recv, a.count, a.dtype, a.op, a.root); }};

}  // namespace chorus::algo
