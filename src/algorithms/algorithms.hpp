#pragma once

// Collective algorithms over the transport interface.
//
// Each algorithm is one file in this folder that defines an `Algorithm`
// descriptor: its name, the collective it implements, its constraints (when
// it can run a call at all), its alpha-beta cost estimate, and the function
// that runs one call on one rank. Every rank runs the same algorithm with the
// same arguments (the selector guarantees it; the wire header checks the
// call). selector.hpp chooses among the descriptors; docs/algorithms.md
// explains each one with its steps and cost.

#include "transport.hpp"

#include <chorus/types.hpp>

#include <cstddef>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace chorus::algo {

using transport::Coll;

// Where the ranks of a communicator live: agreed at creation (identical on
// every rank), never read from a clock or a local file at call time.
struct Layout {
  int size = 1;
  std::vector<int> host_of;  // host index of each rank; hosts numbered in order of their lowest rank
  int hosts = 1;             // number of distinct hosts
  int max_per_host = 1;      // most ranks on one host
  // Same-host peers talk through shared memory (not a socket): one-shot
  // "everyone reads everyone" algorithms pay off only then.
  bool local_shm = false;

  bool single_host() const { return hosts <= 1; }
  // A rank's peers on its own host, ascending (including itself).
  std::vector<int> host_ranks(int host) const;
  // Builds a layout from the host index of every rank.
  static Layout from_hosts(std::vector<int> host_of, bool local_shm);
};

// Alpha-beta parameters of the links and the reduction (docs/algorithms.md).
// A message of b bytes over a link costs alpha_us + b / (gbps * 1e3) us; a
// reduction of b bytes (per operand) costs b / (reduce_gbps * 1e3) us.
struct Model {
  struct Link {
    double alpha_us = 10.0;  // per message (latency, software overhead)
    double gbps = 1.0;       // per-byte bandwidth, GB/s
    double us_per_byte() const { return 1e-3 / gbps; }
  };
  Link local;                // between ranks of one host
  Link net;                  // between hosts
  double reduce_gbps = 8.0;  // combine-on-receive reduction rate
  std::string source = "built-in defaults";  // where the numbers came from (logged)
  // Per-algorithm corrections measured by `chorus-bench --calibrate`
  // ("allreduce.tree" -> scales): what the formulas cannot know about an
  // implementation (how well it overlaps, what its pipeline costs). An
  // estimate becomes lat x cost(1 element) + bw x (cost(B) - cost(1 element));
  // with knots (sizes in bytes, ascending, each with a scale) the part of the
  // cost between one knot and the next is scaled by the later knot's scale,
  // and only the part beyond the last knot by bw: the measured curve is
  // followed piecewise (a pipeline that is still filling at mid sizes is not
  // what its steady state predicts).
  struct Fit {
    double lat = 1.0;
    double bw = 1.0;
    struct Knot {
      double bytes = 0;
      double scale = 1.0;
    };
    std::vector<Knot> knots;
  };
  std::map<std::string, Fit> fits;

  double reduce_us_per_byte() const { return 1e-3 / reduce_gbps; }
  // The link a flat (topology-unaware) algorithm is bounded by: the network
  // when the ranks span hosts, the local link otherwise.
  const Link& flat(const Layout& l) const { return l.single_host() ? local : net; }

  // Built-in defaults for a transport name ("tcp", "shm", "auto", ...).
  static Model defaults_for(const std::string& transport, const Layout& layout);
};

// The call being placed, as the selector sees it.
struct Call {
  Coll coll = Coll::None;
  std::size_t count = 0;  // the count argument of the API call
  DataType dtype = DataType::Float32;
  ReduceOp op = ReduceOp::Sum;
  int root = -1;
  std::size_t bytes() const { return count * size_of(dtype); }
};

// Arguments of one call (root and op where the collective has them).
struct Args {
  const void* send = nullptr;
  void* recv = nullptr;
  std::size_t count = 0;
  DataType dtype = DataType::Float32;
  ReduceOp op = ReduceOp::Sum;
  int root = -1;
};

// A rank's cache share when the host's last-level cache is unknown: calls
// whose buffers span more than this stream their final copies.
inline constexpr std::size_t kUnknownCacheShare = std::size_t{32} << 20;

struct Hierarchy;  // sub-communicator contexts of a multi-host job (hierarchical.cpp)

struct Context {
  transport::Transport& t;
  int rank;
  int size;
  transport::CallDesc call;
  transport::Deadline deadline;
  std::size_t chunk_bytes;       // pipeline granularity
  std::vector<char>& scratch;    // per-communicator, reused across calls
  const Layout* layout = nullptr;
  Hierarchy* hierarchy = nullptr;  // set for multi-host jobs with shared hosts
  // This rank's share of the host's last-level cache (CommImpl: the cache
  // over the ranks of this host; kUnknownCacheShare when the kernel does not
  // say). See streams().
  std::size_t cache_share = kUnknownCacheShare;
};

struct Algorithm {
  const char* name;         // what CHORUS_ALGO and CallOptions::algorithm name
  Coll coll;                // the collective it implements
  const char* summary;      // one line for logs and --help
  // Empty when the algorithm can run `call` on `layout`; otherwise why not
  // (a sentence, used in the error of a forced algorithm).
  std::string (*constraint)(const Layout& layout, const Call& call);
  // Estimated time of the call in microseconds under `model`.
  double (*cost)(const Layout& layout, const Model& model, const Call& call);
  void (*run)(Context& c, const Args& a);
};

// Every algorithm, in a fixed order (ties in cost go to the earlier one).
std::span<const Algorithm* const> all_algorithms();
// The algorithm `name` for `coll`, or nullptr.
const Algorithm* find_algorithm(Coll coll, const std::string& name);

// ---- descriptors, one per file ---------------------------------------------
extern const Algorithm kRingAllreduce;               // ring.cpp
extern const Algorithm kRecursiveDoublingAllreduce;  // recursive_doubling.cpp
extern const Algorithm kRabenseifnerAllreduce;       // rabenseifner.cpp
extern const Algorithm kTreeAllreduce;               // tree.cpp
extern const Algorithm kOneShotAllreduce;            // one_shot.cpp
extern const Algorithm kHierarchicalAllreduce;       // hierarchical.cpp
extern const Algorithm kChainBroadcast;              // broadcast.cpp
extern const Algorithm kBinomialBroadcast;           // binomial_broadcast.cpp
extern const Algorithm kScatterAllgatherBroadcast;   // scatter_allgather_broadcast.cpp
extern const Algorithm kRingAllgather;               // ring.cpp
extern const Algorithm kBruckAllgather;              // bruck_allgather.cpp
extern const Algorithm kRingReduceScatter;           // ring.cpp
extern const Algorithm kHalvingReduceScatter;        // recursive_halving.cpp
extern const Algorithm kRingReduce;                  // ring.cpp
extern const Algorithm kLinearGather;                // rooted.cpp
extern const Algorithm kLinearScatter;               // rooted.cpp
extern const Algorithm kPairwiseAlltoall;            // rooted.cpp
extern const Algorithm kDisseminationBarrier;        // rooted.cpp

// ---- building blocks shared by several algorithms --------------------------

// Alltoallv by pairwise exchange (its only algorithm, outside the selector,
// whose calls have one count): block j of `send` (sendcounts[j] elements,
// blocks packed in rank order) goes to rank j, block i of `recv`
// (recvcounts[i] elements) comes from rank i. Every pair exchanges a
// message, empty ones included, each described with its own count (the
// sender's sendcounts[j], the receiver's recvcounts[i]), so that counts
// that disagree fail as a mismatch instead of as a short message.
void pairwise_alltoallv(Context& c, const void* send, std::span<const std::size_t> sendcounts,
                        void* recv, std::span<const std::size_t> recvcounts, DataType dtype);

// Allgatherv by the ring (its only algorithm, outside the selector): block
// p of `recv` (counts[p] elements, blocks packed in rank order) comes from
// rank p; this rank's is `send` (in place when send is its block of recv).
// Every rank must pass the same counts: the call's description carries
// their sum and a hash of them.
void ring_allgatherv(Context& c, const void* send, void* recv, std::span<const std::size_t> counts,
                     DataType dtype);
// The same by Bruck's rounds (bruck_allgather.cpp): ceil(log2 n) messages
// each way where the ring needs n-1, for small shares.
void bruck_allgatherv(Context& c, const void* send, void* recv, std::span<const std::size_t> counts,
                      DataType dtype);

// Reduce-scatter with a count per rank: rank r ends with block r of the
// reduction (counts[r] elements; blocks packed in rank order in `send`),
// in `recv` (in place when recv is its block of send). By the ring
// (ring.cpp) or by recursive halving (recursive_halving.cpp: log2 rounds,
// for small blocks). Every rank must pass the same counts: the call's
// description carries their sum and a hash of them.
void ring_reduce_scatterv(Context& c, const void* send, void* recv,
                          std::span<const std::size_t> counts, DataType dtype, ReduceOp op);
void halving_reduce_scatterv(Context& c, const void* send, void* recv,
                             std::span<const std::size_t> counts, DataType dtype, ReduceOp op);

// Ring allreduce as ring reduce-scatter + ring allgather, chunked and
// pipelined: the send of chunk k in step s starts as soon as chunk k of step
// s-1 has been reduced, so sending and reducing overlap.
void ring_allreduce(Context& c, const void* send, void* recv, std::size_t count, DataType dtype,
                    ReduceOp op);
// Ring reduce-scatter: rank r ends with block r (count elements) of the sum.
void ring_reduce_scatter(Context& c, const void* send, void* recv, std::size_t count,
                         DataType dtype, ReduceOp op);
// Ring allgather: block r of every recv comes from rank r.
void ring_allgather(Context& c, const void* send, void* recv, std::size_t count, DataType dtype);

// A subset of the communicator's ranks in ring order (e.g. the ranks of one
// host); `me` is this rank's index in `ranks`.
struct Group {
  std::vector<int> ranks;
  int me = 0;
  int size() const { return static_cast<int>(ranks.size()); }
  static Group all(const Context& c);
};
// Ring reduce-scatter over a group on balanced parts of `count` elements:
// afterwards member i holds part (i + 1) % n, reduced over the group, in
// `work` at that part's offset (other parts hold partial results). `own` is
// this rank's input (== work for in-place).
void group_ring_reduce_scatter(Context& c, const Group& g, char* work, const char* own,
                               std::size_t count, DataType dtype, ReduceOp op);
// Ring allgather over a group: member i contributes part (i + 1) % n of `work`
// (the layout group_ring_reduce_scatter leaves); afterwards all parts are everywhere.
void group_ring_allgather(Context& c, const Group& g, char* work, std::size_t count,
                          DataType dtype);
// Ring allreduce over a group (no Avg division: the caller divides once).
void group_ring_allreduce(Context& c, const Group& g, char* work, const char* own,
                          std::size_t count, DataType dtype, ReduceOp op);

// Near-equal split of `count` elements into `n` parts (the first count % n
// parts get one more): offset and length of part i.
inline std::size_t part_offset(std::size_t count, int n, int i) {
  const auto q = count / static_cast<std::size_t>(n), r = count % static_cast<std::size_t>(n);
  const auto k = static_cast<std::size_t>(i);
  return k * q + (k < r ? k : r);
}
inline std::size_t part_length(std::size_t count, int n, int i) {
  return count / static_cast<std::size_t>(n) + (static_cast<std::size_t>(i) < count % static_cast<std::size_t>(n) ? 1 : 0);
}

int ceil_log2(int n);
int floor_pow2(int n);

// The constraint of an algorithm that can run every call.
std::string no_constraint(const Layout&, const Call&);

// The standard fix for power-of-two algorithms on n ranks (recursive
// doubling, Rabenseifner, recursive halving): with p the largest power of
// two <= n and rem = n - p, the first 2 rem ranks pair up (2i, 2i+1); the
// even one hands its data to the odd one and sits out, the odd one stands
// for both among the p active ranks, and hands the result back at the end.
struct Fold {
  int p = 1, rem = 0;
  bool sits_out = false;        // even rank < 2 rem
  bool stands_for_two = false;  // odd rank < 2 rem
  int me = 0;                   // index among the p active ranks (when active)
  Fold(int rank, int n)
      : p(floor_pow2(n)), rem(n - floor_pow2(n)), sits_out(rank < 2 * rem && rank % 2 == 0),
        stands_for_two(rank < 2 * rem && rank % 2 == 1), me(rank < 2 * rem ? rank / 2 : rank - rem) {}
  // The rank of active index i; increasing, so index order is rank order.
  int rank_of(int i) const { return i < rem ? 2 * i + 1 : i + rem; }
};

// Makes c.scratch at least `bytes` long and returns it.
char* ensure_scratch(Context& c, std::size_t bytes);

// The copy that size-1 and count-0 calls reduce to; applies Avg's division.
// Returns true when the call is complete (n == 1 or nothing to move).
bool trivial_allreduce(Context& c, const Args& a);

// Whether a call whose buffers span `footprint` bytes on this rank (send
// and receive; the receive buffer alone when in place) outgrows the rank's
// share of the last-level cache (Context::cache_share). Then the copies that
// end the call, whose destination nobody reads again in it, bypass the
// caches (Combine::copy_streaming, copy_final): the destination line is not
// read first, and the buffers still to be read are not evicted.
bool streams(const Context& c, std::size_t footprint);

// memcpy(dst, src, bytes); past the caches when `stream`. dst and src must
// not overlap.
void copy_final(void* dst, const void* src, std::size_t bytes, bool stream);

// The root's copy of send into recv (out-of-place) that every broadcast
// starts with (past the caches when the root's buffers outgrow its share). Returns true when the call is then complete (n == 1 or
// nothing to move).
bool trivial_broadcast(Context& c, const Args& a);

// Cost helpers: ceil(log2(n)), and the number of rounds of a power-of-two
// algorithm on n ranks with the fold-in for the remainder (2 extra steps when
// n is not a power of two).
int ceil_log2(int n);
int floor_pow2(int n);

}  // namespace chorus::algo
