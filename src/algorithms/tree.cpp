// Double-binary-tree allreduce (as in NCCL): two binary trees over the n
// ranks, each carrying half of the buffer: reduced up to its root, then
// broadcast back down, pipelined in chunks of chunk_bytes. A rank has
// children in at most one of the two trees, so the interior work (two
// receives and reductions up, two sends down) is spread over all ranks
// instead of falling on half of them; each rank sends and receives about 2B
// in all, like the ring, but a chunk needs only 2*height hops instead of the
// ring's 2(n-1) steps.
//
// The trees. Tree 0 is NCCL's in-order binary tree over positions 0..m-1
// (m = n rounded down to even): the root 0 has one child, odd positions are
// leaves. Tree 1 mirrors it (rank r at position m-1-r), so its interior
// ranks are odd and tree 0's are even. For odd n the last rank (n-1) is a
// leaf of both, the second child of both roots. build() checks the property.
//
// The schedule. Every message belongs to a stream: the chunks of one tree
// going up from a child or down from a parent. Between one pair of ranks
// there can be two streams (one per tree), and messages between a pair are
// matched in post order, so both ranks must post the two streams' messages
// in the same interleaving. Each rank runs its events (per tree and chunk:
// "up": receive from the children, reduce, send to the parent; "down":
// receive from the parent, send to the children) in order of a nominal time:
//     up(k)   at k + height - depth      down(k) at k + height + depth
// ties broken by tree, then up before down. A message is always sent at time
// t and received at time t + 1 (the depths of parent and child differ by
// one), so both ends of a pair order its messages identically. The order also
// matches when data actually arrives in a full pipeline (chunk k reaches
// depth d going up at k + height - d and coming down at k + height + d), and
// it cannot deadlock: an event at time t waits only for messages sent at
// t - 1, so a chain of waiting ranks has strictly decreasing times.
//
// Reductions combine on receive straight into the output: the first child's
// chunk with this rank's input (reduce_from the send buffer when out of
// place), the second child's after it (two receives must not combine into
// the same bytes at once). The root divides Avg once per chunk before it
// goes down; everyone else copies the root's bits, so all ranks agree.

#include "algorithms/algorithms.hpp"

#include "core/enforce.hpp"
#include "reduce/reduce.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

namespace chorus::algo {
namespace {

using transport::Combine;
using transport::Request;

// Parent of position r in NCCL's in-order binary tree over m positions:
// clear r's lowest set bit and set the next one up, or only clear it when
// that lands past the end. The root 0 has a single child.
int btree_parent(int r, int m) {
  if (r == 0) return -1;
  const int bit = r & -r;
  const int up = (r ^ bit) | (bit << 1);
  return up < m ? up : r ^ bit;
}

struct DoubleTree {
  std::array<std::vector<int>, 2> parent;  // per tree, parent of each rank (-1: root)
  std::array<std::vector<int>, 2> depth;   // per tree, edges from the root
  std::array<int, 2> height = {0, 0};      // per tree, largest depth
};

std::size_t idx(int i) { return static_cast<std::size_t>(i); }

// n >= 2. Checks what the schedule relies on (one root, no cycle, at most two
// children) and the point of the construction (no rank interior in both).
DoubleTree build(int n) {
  DoubleTree t;
  const int m = n % 2 == 0 ? n : n - 1;
  for (auto& p : t.parent) p.assign(idx(n), -1);
  for (int r = 0; r < m; ++r) {
    t.parent[0][idx(r)] = btree_parent(r, m);
    const int q = btree_parent(m - 1 - r, m);
    t.parent[1][idx(r)] = q < 0 ? -1 : m - 1 - q;
  }
  if (m < n) {  // odd n: the last rank is a leaf under both roots
    t.parent[0][idx(n - 1)] = 0;
    t.parent[1][idx(n - 1)] = m - 1;
  }
  std::vector<int> interior(idx(n), 0);
  for (std::size_t k = 0; k < 2; ++k) {
    const auto& par = t.parent[k];
    auto& dep = t.depth[k];
    dep.assign(idx(n), 0);
    std::vector<int> kids(idx(n), 0);
    int roots = 0;
    for (int r = 0; r < n; ++r) {
      if (par[idx(r)] < 0) {
        ++roots;
        continue;
      }
      ++kids[idx(par[idx(r)])];
      int d = 0;
      for (int x = r; par[idx(x)] >= 0 && d <= n; x = par[idx(x)]) ++d;
      dep[idx(r)] = d;
      t.height[k] = std::max(t.height[k], d);
    }
    CHORUS_ENFORCE(roots == 1 && t.height[k] < n, Internal,
                   "tree allreduce: tree " << k << " over " << n << " ranks is not a tree");
    for (int r = 0; r < n; ++r) {
      CHORUS_ENFORCE(
          kids[idx(r)] <= 2, Internal,
          "tree allreduce: rank " << r << " has " << kids[idx(r)] << " children in tree " << k);
      if (kids[idx(r)] > 0) ++interior[idx(r)];
    }
  }
  for (int r = 0; r < n; ++r)
    CHORUS_ENFORCE(interior[idx(r)] <= 1, Internal,
                   "tree allreduce: rank " << r << " is interior in both trees of " << n);
  return t;
}

struct Event {
  std::int64_t time;
  int tree;
  int down;  // 0: up (reduce), 1: down (broadcast)
  std::size_t chunk;
};

void tree_allreduce(Context& c, const Args& a) {
  if (trivial_allreduce(c, a)) return;
  const int n = c.size, rank = c.rank;
  const std::size_t esize = size_of(a.dtype);
  const char* in = static_cast<const char*>(a.send);
  char* out = static_cast<char*>(a.recv);
  const bool in_place = a.send == a.recv;
  const DoubleTree dt = build(n);
  const std::size_t chunk = std::max<std::size_t>(1, c.chunk_bytes / esize);

  struct Half {
    std::size_t off = 0, len = 0, chunks = 0;
    int parent = -1, depth = 0, height = 0;
    std::vector<int> children;  // ascending
  };
  std::array<Half, 2> half;
  std::vector<Event> events;
  for (int k = 0; k < 2; ++k) {
    Half& h = half[idx(k)];
    const auto& par = dt.parent[idx(k)];
    h.off = part_offset(a.count, 2, k);
    h.len = part_length(a.count, 2, k);
    h.chunks = (h.len + chunk - 1) / chunk;  // 0 for an empty half (count 1): no messages
    h.parent = par[idx(rank)];
    h.depth = dt.depth[idx(k)][idx(rank)];
    h.height = dt.height[idx(k)];
    for (int r = 0; r < n; ++r)
      if (par[idx(r)] == rank) h.children.push_back(r);
    for (std::size_t j = 0; j < h.chunks; ++j) {
      const auto t0 = static_cast<std::int64_t>(j) + h.height;
      events.push_back({t0 - h.depth, k, 0, j});
      events.push_back({t0 + h.depth, k, 1, j});
    }
  }
  std::sort(events.begin(), events.end(), [](const Event& x, const Event& y) {
    if (x.time != y.time) return x.time < y.time;
    if (x.tree != y.tree) return x.tree < y.tree;
    return x.down < y.down;
  });

  std::vector<Request> sends;
  sends.reserve(events.size() * 2);
  for (const Event& e : events) {
    const Half& h = half[idx(e.tree)];
    const std::size_t first = h.off + e.chunk * chunk;
    const std::size_t len = std::min(chunk, h.off + h.len - first);
    const std::size_t off = first * esize, nbytes = len * esize;
    char* dst = out + off;
    if (e.down == 0) {
      const char* up = in + off;  // what goes to the parent (a leaf's own input)
      for (std::size_t i = 0; i < h.children.size(); ++i) {
        // The first child's chunk meets our input; each later one meets the
        // result of the previous receive, so each waits for the one before.
        const Combine comb = i > 0 || in_place ? Combine::reduce(a.dtype, a.op)
                                               : Combine::reduce_from(in + off, a.dtype, a.op);
        Request r = c.t.irecv(h.children[i], c.call, dst, nbytes, comb);
        c.t.wait({&r, 1}, c.deadline);
        up = dst;
      }
      if (h.parent >= 0) {
        sends.push_back(c.t.isend_reduced(h.parent, c.call, up, nbytes));
      } else if (a.op == ReduceOp::Avg) {
        reduce::finalize_avg(dst, len, a.dtype, n);  // the root: this chunk is final
      }
    } else {
      // This overwrites the bytes our up-send of the chunk read (out of place
      // too, for an interior rank). Safe: the parent sends the chunk down only
      // after the root has it, so after it has received all of ours.
      if (h.parent >= 0) {
        Request r = c.t.irecv(h.parent, c.call, dst, nbytes, Combine::copy());
        c.t.wait({&r, 1}, c.deadline);
      }
      for (int child : h.children) sends.push_back(c.t.isend(child, c.call, dst, nbytes));
    }
  }
  c.t.wait(sends, c.deadline);
}

// The model's chunk size: the default of CHORUS_CHUNK_BYTES (the cost
// function does not see the communicator's setting).
constexpr double kModelChunkBytes = 512 << 10;

// With h the trees' height, half = B/2 per tree, c = min(chunk, half) and K =
// ceil(half / c) chunks per tree: the first chunk takes 2h hops up and down,
// each at most a message of c bytes to each of two children; after it, every
// further chunk costs the busiest rank 4c bytes sent (an interior rank sends
// one chunk up and two down in its interior tree, one up in the other) and a
// message latency; every rank interior in one tree reduces two chunks per
// step, B gamma in all:
//   2h (alpha + 2c beta) + (K - 1) (alpha + 4c beta) + B gamma.
double tree_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1 || call.count == 0) return 0;
  const Model::Link& L = m.flat(l);
  const double b = static_cast<double>(call.bytes());
  // Both trees are ceil_log2(m) deep, m = n rounded down to even (the extra
  // rank of an odd n hangs at depth 1); closed form, so that estimating costs
  // builds no trees.
  const int h = ceil_log2(n % 2 == 0 ? n : n - 1);
  const double half = b / 2;
  const double cb = std::min(kModelChunkBytes, half);
  const double k = cb > 0 ? std::ceil(half / cb) : 0;
  // Two ranks: each is the root of one tree with a single child, so per
  // chunk it sends c down in one tree and c up in the other (2c, not 4c),
  // and reduces one chunk (B/2 in all).
  const double per_chunk = n == 2 ? 2 : 4;
  const double reduced = n == 2 ? b / 2 : b;
  return 2 * h * (L.alpha_us + 2 * cb * L.us_per_byte()) +
         std::max(0.0, k - 1) * (L.alpha_us + per_chunk * cb * L.us_per_byte()) +
         reduced * m.reduce_us_per_byte();
}

}  // namespace

const Algorithm kTreeAllreduce = {
    "tree", Coll::Allreduce,
    "double binary tree (NCCL): each half reduced up one tree and broadcast down, pipelined",
    no_constraint, tree_cost, tree_allreduce};

}  // namespace chorus::algo
