// The parameterised collective suite (design.md section 6): every collective
// over world size x count x dtype x op x in-place x root, with ranks as real
// processes (RankPool) and expected values computed here in closed form,
// never by calling library code.
//
// How inputs are chosen: every value is a small integer times a per-dtype
// scale, so that every input, partial result and final result is exactly
// representable in the dtype (fp16 holds integers up to 2048 exactly, bf16 up
// to 256, float up to 2^24), and the comparison can be exact. Values come from
// a hash of (case seed, element index[, rank]) rather than a short period, so
// that a block landing at the wrong offset does not match by accident.
//
// What every case checks on every rank: each element of the output (the
// first few wrong ones are reported as index, got, expected), that the
// output buffer was completely written (it is poisoned with 0xA5 first), that
// nothing was written in guard regions before and after each buffer, and that
// send buffers (const in the API) are unchanged.
//
// Running: one binary; meson runs it once per collective (--gtest_filter).
// A failing case prints each rank's complaint and the case's seed; run just
// that case with --gtest_filter='<Collective>/Matrix.MatchesClosedForm/<name>'.
// What is trimmed at the largest count, and why: see big_modes().

#include "matrix.hpp"
#include "transport_probe.hpp"

#include <chorus/communicator.hpp>
#include <chorus/error.hpp>
#include <chorus/memory.hpp>
#include <chorus/types.hpp>

#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace chorus_test {
namespace {

using namespace std::chrono_literals;

// ---------------------------------------------------------------------------
// The matrix

constexpr int kWorlds[] = {1, 2, 3, 4, 5, 7, 8};
constexpr std::uint64_t kBig = (std::uint64_t{1} << 20) + 3;  // 1 Mi + 3: odd, not a multiple of any chunk
constexpr std::uint64_t kCounts[] = {0, 1, 7, 1000, kBig};
constexpr DataType kTypes[] = {DataType::Int8,    DataType::UInt8,    DataType::Int32,
                               DataType::UInt32,  DataType::Int64,    DataType::UInt64,
                               DataType::Float16, DataType::BFloat16, DataType::Float32,
                               DataType::Float64};
constexpr ReduceOp kOps[] = {ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max,
                             ReduceOp::Avg};


const char* coll_name(Coll c) {
  switch (c) {
    case Coll::Allreduce: return "allreduce";
    case Coll::Broadcast: return "broadcast";
    case Coll::Allgather: return "allgather";
    case Coll::ReduceScatter: return "reduce_scatter";
    case Coll::Reduce: return "reduce";
    case Coll::Gather: return "gather";
    case Coll::Scatter: return "scatter";
    case Coll::Alltoall: return "alltoall";
    case Coll::Alltoallv:
      return "alltoallv";
    case Coll::Allgatherv:
      return "allgatherv";
    case Coll::ReduceScatterv:
      return "reduce_scatterv";
    case Coll::SendRecv: return "sendrecv";
    case Coll::Barrier: return "barrier";
    case Coll::AsyncOrder: return "async_order";
    case Coll::AsyncAll: return "async_all";
    case Coll::WaitTimeout: return "wait_timeout";
    case Coll::Split: return "split";
    case Coll::ManySmall: return "many_small";
    case Coll::PageOffsets:
      return "page_offsets";
    case Coll::HarnessWrong: return "harness_wrong";
    case Coll::HarnessCrash: return "harness_crash";
    case Coll::HarnessHang: return "harness_hang";
    case Coll::HarnessLeak: return "harness_leak";
  }
  return "?";
}

// Our own names: the suite does not trust chorus::to_string to name its cases.
const char* type_name(DataType t) {
  switch (t) {
    case DataType::Int8: return "int8";
    case DataType::UInt8: return "uint8";
    case DataType::Int32: return "int32";
    case DataType::UInt32: return "uint32";
    case DataType::Int64: return "int64";
    case DataType::UInt64: return "uint64";
    case DataType::Float16: return "float16";
    case DataType::BFloat16: return "bfloat16";
    case DataType::Float32: return "float32";
    case DataType::Float64: return "float64";
  }
  return "?";
}

const char* op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Prod: return "prod";
    case ReduceOp::Min: return "min";
    case ReduceOp::Max: return "max";
    case ReduceOp::Avg: return "avg";
  }
  return "?";
}

bool reduces(Coll c) {
  return c == Coll::Allreduce || c == Coll::ReduceScatter || c == Coll::Reduce ||
         c == Coll::ReduceScatterv;
}
bool rooted(Coll c) {
  return c == Coll::Broadcast || c == Coll::Reduce || c == Coll::Gather || c == Coll::Scatter;
}

std::string case_label(const Case& c) {
  std::ostringstream s;
  s << "n" << c.world;
  switch (c.coll) {
    case Coll::Barrier:
    case Coll::WaitTimeout:
    case Coll::ManySmall:
    case Coll::PageOffsets:
    case Coll::HarnessWrong:
    case Coll::HarnessCrash:
    case Coll::HarnessHang:
    case Coll::HarnessLeak:
      s << (c.async ? "_async" : "");
      return s.str();
    case Coll::AsyncOrder:
      s << "_c" << c.count;
      return s.str();
    case Coll::AsyncAll:
      s << "_" << type_name(c.dtype) << "_c" << c.count << "_root" << c.root;
      return s.str();
    case Coll::Split:
      s << "_keys" << (c.variant == 0 ? "ascending" : c.variant == 1 ? "descending" : "tied");
      return s.str();
    default:
      break;
  }
  s << "_" << type_name(c.dtype) << "_c" << c.count;
  if (reduces(c.coll)) s << "_" << op_name(c.op);
  if (c.coll == Coll::SendRecv) s << (c.async ? "_async" : "_blocking");
  else if (c.coll != Coll::Alltoall && c.coll != Coll::Alltoallv)
    s << (c.in_place ? "_inplace" : "_outofplace");
  if (rooted(c.coll)) s << "_root" << c.root;
  if (c.misalign != 0) s << "_misaligned" << c.misalign;
  if (c.registered) s << "_registered";
  return s.str();
}

// Which in-place modes run at count kBig: bit 0 out-of-place, bit 1 in-place.
//
// Deliberately trimmed: at kBig one case moves up to 8 ranks x 8 MiB (x 8
// for the collectives whose buffers hold size() blocks) through loopback TCP
// on 2 cores, and the full cross product there would take many minutes. What
// stays at kBig, at every world size (the chunking and the uneven split of
// 1 Mi + 3 elements into blocks depend on the world size):
//  - allreduce, reduce: every dtype with Sum (each element size and each Sum
//    kernel at full length, including fp16/bf16 conversion), every op with
//    Float32 and Int32 (the other kernels, float and integer); the in-place
//    mode alternates, and Float32 Sum runs both;
//  - broadcast, gather, scatter: one dtype per element size (Int8, Float16,
//    Float32, Float64; they only move bytes), modes alternating for gather
//    and scatter, both for broadcast; the root rotates;
//  - reduce_scatter, allgather, alltoall (size() x 1 Mi + 3 elements per
//    rank, 8x the data at 8 ranks): three dtypes (two for alltoall) of 1, 2
//    and 4 bytes, both modes; 8-byte elements run at kBig in allreduce and
//    reduce, and here at count 1000.
// Everything else runs at counts 0, 1, 7 and 1000.
unsigned big_modes(Coll coll, DataType t, ReduceOp op) {
  constexpr unsigned kOut = 1, kIn = 2, kBoth = 3;
  const auto ti = static_cast<unsigned>(t);
  switch (coll) {
    case Coll::Allreduce:
    case Coll::Reduce:
      if (op == ReduceOp::Sum) return t == DataType::Float32 ? kBoth : (ti % 2 == 0 ? kOut : kIn);
      if (t == DataType::Float32 || t == DataType::Int32)
        return (static_cast<unsigned>(op) + ti) % 2 == 0 ? kOut : kIn;
      return 0;
    case Coll::ReduceScatter:
      if (t == DataType::Float32 && op == ReduceOp::Sum) return kOut;
      if (t == DataType::Int8 && op == ReduceOp::Sum) return kIn;
      if (t == DataType::Int32 && op == ReduceOp::Max) return kIn;
      return 0;
    case Coll::ReduceScatterv:  // blocks of up to 1 Mi + 3 elements
      if (t == DataType::Float32 && op == ReduceOp::Sum) return kIn;
      if (t == DataType::Float16 && op == ReduceOp::Avg) return kOut;
      return 0;
    case Coll::Allgather:
    case Coll::Allgatherv:
      if (t == DataType::Int8 || t == DataType::Float32) return kIn;
      if (t == DataType::Float16) return kOut;
      return 0;
    case Coll::Alltoall:
    case Coll::Alltoallv:
      return t == DataType::Int8 || t == DataType::Float32 ? kOut : 0;
    case Coll::Broadcast:
    case Coll::Gather:
    case Coll::Scatter:
    case Coll::SendRecv:
      if (t != DataType::Int8 && t != DataType::Float16 && t != DataType::Float32 &&
          t != DataType::Float64)
        return 0;
      if (coll == Coll::Broadcast || coll == Coll::SendRecv) return kBoth;  // SendRecv: blocking and async
      return ti % 2 == 0 ? kOut : kIn;
    default:
      return 0;
  }
}

std::vector<int> roots_for(int world) {
  std::vector<int> roots = {0};
  if (world - 1 != 0) roots.push_back(world - 1);
  if (world / 2 != 0 && world / 2 != world - 1) roots.push_back(world / 2);
  return roots;
}


// Whether the comma-separated list in environment variable `var` has an
// item for which `match` holds; true when the variable is unset or empty.
template <class Match>
bool env_list_allows(const char* var, Match match) {
  const char* v = std::getenv(var);
  if (v == nullptr || *v == '\0') return true;
  // Compare item by item (string concatenation here trips GCC 12's -Wrestrict).
  const std::string_view list(v);
  std::size_t start = 0;
  while (start <= list.size()) {
    const std::size_t comma = std::min(list.find(',', start), list.size());
    if (match(std::string(list.substr(start, comma - start)))) return true;
    start = comma + 1;
  }
  return false;
}

// The meson tests run the matrix once per algorithm with CHORUS_ALGO set
// (tests/collectives/meson.build); forced_one_shot() reads which one is forced.
// CHORUS_TEST_DTYPES=int8,float32,... restricts the matrix to those types
// (the sanitizer build's forced-algorithm runs use one type per element
// size: memory errors in an algorithm depend on sizes, not on arithmetic).
bool dtype_selected(DataType t) {
  return env_list_allows("CHORUS_TEST_DTYPES",
                         [t](const std::string& item) { return chorus::parse_data_type(item) == t; });
}

// CHORUS_TEST_WORLDS=2,3,4 restricts the matrix to those world sizes (the
// libfabric and UCX runs: the sizes, and a shorter suite).
bool world_selected(int world) {
  return env_list_allows("CHORUS_TEST_WORLDS",
                         [world](const std::string& item) { return item == std::to_string(world); });
}

bool forced_one_shot() {
  const char* v = std::getenv("CHORUS_ALGO");
  return v != nullptr && std::string(v).find("allreduce:one_shot") != std::string::npos;
}

// CHORUS_TRANSPORT is unset, auto or shm: the ranks of one host talk over shm.
bool shm_may_carry() {
  const char* v = std::getenv("CHORUS_TRANSPORT");
  return v == nullptr || std::string(v).empty() || std::string(v) == "auto" || std::string(v) == "shm";
}

std::vector<Case> matrix(Coll coll) {
  std::vector<Case> cases;
  for (int world : kWorlds) {
    if (coll == Coll::SendRecv && world == 1) continue;  // no peer to talk to
    if (!world_selected(world)) continue;
    for (std::uint64_t count : kCounts) {
      for (std::size_t ti = 0; ti < std::size(kTypes); ++ti) {
        for (std::size_t oi = 0; oi < std::size(kOps); ++oi) {
          if (!reduces(coll) && oi > 0) break;
          const DataType t = kTypes[ti];
          const ReduceOp op = kOps[oi];
          if (!dtype_selected(t)) break;
          for (int mode = 0; mode < 2; ++mode) {
            // buffers must not overlap
            if ((coll == Coll::Alltoall || coll == Coll::Alltoallv) && mode == 1) break;
            if (count == kBig && (big_modes(coll, t, op) & (1u << mode)) == 0) continue;
            // one_shot is documented to take messages up to 64 KiB only
            // (forcing it beyond is an error, tested in test_misuse).
            if (coll == Coll::Allreduce && forced_one_shot() &&
                count * chorus::size_of(t) > (64u << 10))
              continue;
            Case c;
            c.coll = coll;
            c.world = world;
            c.count = count;
            c.dtype = t;
            c.op = op;
            c.in_place = coll != Coll::SendRecv && mode == 1;
            c.async = coll == Coll::SendRecv && mode == 1;
            std::vector<int> roots = {0};
            if (coll == Coll::Reduce) {
              // Reduce already has the op axis: rotate the root through
              // first, last and middle instead of multiplying the cases by 3.
              const auto all = roots_for(world);
              const std::size_t k = (ti + oi + static_cast<std::size_t>(mode) +
                                     static_cast<std::size_t>(count % 5)) % all.size();
              roots = {all[k]};
            } else if (rooted(coll)) {
              roots = roots_for(world);
              // At the big count, one root per case, rotating.
              if (count == kBig) roots = {roots[(ti + static_cast<std::size_t>(mode)) % roots.size()]};
            }
            // Half the dtypes at count 1000 use unaligned buffers (send and
            // recv shifted differently, so their relative alignment differs too).
            c.misalign = (count == 1000 && ti % 2 == 1) ? 1 + static_cast<int>(ti + oi + static_cast<std::size_t>(mode)) % 7 : 0;
            for (int root : roots) {
              c.root = root;
              c.seed = mix(cases.size() * 1000003u + static_cast<std::uint64_t>(coll));
              cases.push_back(c);
            }
          }
        }
      }
    }
  }
  // The large cases below: one per world size of 2 and 3 and mode (0: out
  // of place, 1: in place), as `make(world, mode)` sets them up.
  auto add_per_world_and_mode = [&](std::uint64_t salt, auto make) {
    for (int world : {2, 3}) {
      if (!world_selected(world)) continue;
      for (int mode = 0; mode < 2; ++mode) {
        Case c = make(world, mode);
        c.coll = coll;
        c.world = world;
        c.in_place = mode == 1;
        c.seed = mix(cases.size() * 1000003u + static_cast<std::uint64_t>(coll) + salt);
        cases.push_back(c);
      }
    }
  };
  // Calls whose buffers span more than a rank's share of the last-level
  // cache (algo::streams: the host's cache over its ranks, 32 MiB when
  // unknown): there the final copies write past the caches. 36 MiB of
  // float32 results, out of place (send misaligned by 3 bytes) and in
  // place, at 2 and 3 ranks. (The forced-algorithm runs assume a 256 KiB
  // cache, so that smaller and odd-sized calls stream too.)
  if ((coll == Coll::Allreduce || coll == Coll::Allgather) && dtype_selected(DataType::Float32) &&
      !forced_one_shot()) {
    const std::uint64_t total = (std::uint64_t{9} << 20) + 3;  // elements of the result
    add_per_world_and_mode(17, [&](int world, int mode) {
      Case c;
      c.count = coll == Coll::Allreduce ? total : total / static_cast<std::uint64_t>(world);
      c.misalign = mode == 0 ? 3 : 0;
      return c;
    });
  }
  // Buffers from chorus::mem_alloc, in calls large enough (1 MiB and more;
  // tests/meson.build sets CHORUS_SHM_MAPPED_MIN to 1 MiB for the shm
  // suites, the default being 16 MiB) for the shm transport to move their
  // messages Mapped: the receiver reads the sender's buffer through a
  // mapping of its own. Only where shm carries the messages: to the other
  // transports that memory is memory like any other.
  if ((coll == Coll::Allreduce || coll == Coll::Allgather || coll == Coll::Broadcast ||
       coll == Coll::ReduceScatter) &&
      dtype_selected(DataType::Float32) && !forced_one_shot() && shm_may_carry()) {
    add_per_world_and_mode(29, [&](int world, int) {
      Case c;
      c.count = (std::uint64_t{2} << 20) + 5;
      c.root = coll == Coll::Broadcast ? world - 1 : 0;
      c.registered = true;
      return c;
    });
  }
  return cases;
}

std::vector<Case> special(Coll coll) {
  std::vector<Case> cases;
  for (int world : kWorlds) {
    if (!world_selected(world)) continue;
    Case c;
    c.coll = coll;
    c.world = world;
    c.seed = mix(static_cast<std::uint64_t>(world) * 77 + static_cast<std::uint64_t>(coll));
    switch (coll) {
      case Coll::Barrier:
      case Coll::WaitTimeout:
        for (bool async : {false, true}) {
          if (coll == Coll::WaitTimeout && !async) continue;
          c.async = async;
          cases.push_back(c);
        }
        break;
      case Coll::AsyncOrder:
        // The largest is big enough (several chunks per op) that the ops are
        // really still in flight when the waiting starts.
        for (std::uint64_t count : {std::uint64_t{1}, std::uint64_t{1000}, std::uint64_t{200003}}) {
          c.count = count;
          cases.push_back(c);
        }
        break;
      case Coll::AsyncAll:
        for (DataType t : {DataType::Float32, DataType::Int32, DataType::BFloat16}) {
          for (std::uint64_t count : {std::uint64_t{1}, std::uint64_t{1000}}) {
            c.dtype = t;
            c.count = count;
            c.root = t == DataType::Int32 ? 0 : t == DataType::Float32 ? world - 1 : world / 2;
            c.seed = mix(c.seed + 1);
            cases.push_back(c);
          }
        }
        break;
      case Coll::Split:
        for (int variant = 0; variant < 3; ++variant) {
          c.variant = variant;
          cases.push_back(c);
        }
        break;
      case Coll::ManySmall:
        // 2000 calls of one element each. World sizes 4 and 7 are left out to
        // save time: the matrix itself runs thousands of calls on every pool.
        if (world == 4 || world == 7) break;
        c.count = 2000;
        cases.push_back(c);
        break;
      case Coll::PageOffsets:
        // 300000 int32 (1.2 MB): past shm's eager limit and split size, so
        // the copies go rendezvous; at 2, 3 and 5 ranks.
        if (world != 2 && world != 3 && world != 5) break;
        c.count = 300000;
        cases.push_back(c);
        break;
      default:
        break;
    }
  }
  return cases;
}

// The mem_alloc regions (memfds named "chorus-mem") this process has
// mapped, by inode: its own buffers, and the regions of peers that the shm
// transport mapped to read their messages or write into their buffers.
std::set<std::string> shared_mappings() {
  std::ifstream maps("/proc/self/maps");
  std::set<std::string> inodes;
  for (std::string line; std::getline(maps, line);) {
    if (line.find("memfd:chorus-mem") == std::string::npos) continue;
    std::istringstream fields(line);
    std::string range, perms, offset, dev, inode;
    fields >> range >> perms >> offset >> dev >> inode;
    inodes.insert(dev + ":" + inode);
  }
  return inodes;
}

// Loses the only pointer to a block (for the harness's leak-check test).
[[gnu::noinline]] void leak_memory() {
  void* p = std::malloc(4096);
  std::memset(p, 1, 4096);
  asm volatile("" : : "r"(p) : "memory");  // keeps the allocation from being optimised away
}

WorkerReply handle_case(WorkerContext& x, const void* bytes, std::size_t size) {
  Case c;
  if (size != sizeof c) throw std::logic_error("bad case descriptor size");
  std::memcpy(&c, bytes, sizeof c);
  if (x.size != c.world) throw std::logic_error("case for another world size");
  WorkerReply reply;
  g_registered = c.registered;
  const std::set<std::string> mappings_before = shared_mappings();
  switch (c.coll) {
    case Coll::Allreduce:
    case Coll::ReduceScatter:
    case Coll::ReduceScatterv:
    case Coll::Reduce: reply = run_reducing_case(x, c); break;
    case Coll::Broadcast:
    case Coll::Allgather:
    case Coll::Gather:
    case Coll::Scatter:
    case Coll::Alltoall:
    case Coll::Alltoallv:
    case Coll::Allgatherv:
    case Coll::SendRecv: reply = run_moving_case(x, c); break;
    case Coll::Barrier:
    case Coll::AsyncOrder:
    case Coll::AsyncAll:
    case Coll::WaitTimeout:
    case Coll::Split:
    case Coll::ManySmall:
    case Coll::PageOffsets:
      reply = run_special_case(x, c);
      break;
    case Coll::HarnessWrong:
      if (x.rank == x.size - 1) reply = {WorkerReply::Status::Failed, "deliberately wrong"};
      break;
    case Coll::HarnessCrash:
      if (x.rank == x.size - 1) raise(SIGKILL);
      break;
    case Coll::HarnessHang:
      if (x.rank == x.size - 1) std::this_thread::sleep_for(std::chrono::seconds(300));
      break;
    case Coll::HarnessLeak:
      if (x.rank == x.size - 1) leak_memory();
      break;
  }
  g_registered = false;
  // With registered buffers, 2 ranks on shm and the selector's algorithm
  // (each sends from the user's buffers), every rank that receives reads
  // its peer's buffer through a mapping of its own, which stays cached:
  // the single-copy path ran. Its own buffers are gone again by now. With
  // CHORUS_SHM_SPLIT=sender the sender writes every piece of a message
  // received by a copy into the receiver's buffer, through a writable
  // mapping: then a broadcast's root maps its peer's buffer too. And the
  // regions of the previous cases, which the peer has freed, are no longer
  // mapped once this case mapped a new one (the transport drops a peer's
  // freed regions when it maps a new region of that peer).
  const char* mapped_min = std::getenv("CHORUS_SHM_MAPPED_MIN");  // bytes, as meson.build sets it
  const std::uint64_t threshold = mapped_min ? std::strtoull(mapped_min, nullptr, 10) : 16u << 20;
  const char* split = std::getenv("CHORUS_SHM_SPLIT");
  const bool sender_writes = split != nullptr && std::string_view(split) == "sender";
  if (c.registered && reply.status == WorkerReply::Status::Ok && x.size == 2 &&
      c.count * sizeof(float) >= threshold &&
      x.comm.transport_name() == "shm" && std::getenv("CHORUS_ALGO") == nullptr &&
      !(c.coll == Coll::Broadcast && x.rank == c.root && !sender_writes)) {
    const std::set<std::string> after = shared_mappings();
    std::size_t fresh = 0, stale = 0;
    for (const auto& m : after) (mappings_before.count(m) ? stale : fresh) += 1;
    if (fresh == 0 || stale > 0)
      reply = {WorkerReply::Status::Failed,
               "registered buffers: " + std::to_string(fresh) + " peer regions mapped in this case (want > 0), " +
                   std::to_string(stale) + " freed regions of earlier cases still mapped (want 0); " +
                   std::to_string(mappings_before.size()) + " mappings before the case"};
  }
  return reply;
}

// ---------------------------------------------------------------------------
// The parent side

PoolRegistry& registry() {
  static PoolRegistry r(handle_case);
  return r;
}

class PoolEnvironment : public testing::Environment {
 public:
  void TearDown() override {
    const std::string problems = registry().shutdown_all();
    EXPECT_TRUE(problems.empty()) << problems;
  }
};

void run_case(const Case& c) {
  std::string error;
  RankPool* pool = registry().get(c.world, &error);
  ASSERT_NE(pool, nullptr) << error;
  const RankPool::Outcome out = pool->run(c);
  ASSERT_TRUE(out.ok) << coll_name(c.coll) << " " << case_label(c) << " (seed " << c.seed
                      << ") failed:\n" << out.message;
}

std::string param_name(const testing::TestParamInfo<Case>& info) { return case_label(info.param); }



// One fixture for every collective, instantiated once per collective with
// the collective as the prefix: tests are named
// <Collective>/Matrix.MatchesClosedForm/<case>. (One fixture class per
// collective made gtest's registration code most of this file's build.)
class Matrix : public testing::TestWithParam<Case> {};
TEST_P(Matrix, MatchesClosedForm) { run_case(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Allreduce, Matrix, testing::ValuesIn(matrix(Coll::Allreduce)), param_name);
INSTANTIATE_TEST_SUITE_P(Broadcast, Matrix, testing::ValuesIn(matrix(Coll::Broadcast)), param_name);
INSTANTIATE_TEST_SUITE_P(Allgather, Matrix, testing::ValuesIn(matrix(Coll::Allgather)), param_name);
INSTANTIATE_TEST_SUITE_P(ReduceScatter, Matrix, testing::ValuesIn(matrix(Coll::ReduceScatter)), param_name);
INSTANTIATE_TEST_SUITE_P(Reduce, Matrix, testing::ValuesIn(matrix(Coll::Reduce)), param_name);
INSTANTIATE_TEST_SUITE_P(Gather, Matrix, testing::ValuesIn(matrix(Coll::Gather)), param_name);
INSTANTIATE_TEST_SUITE_P(Scatter, Matrix, testing::ValuesIn(matrix(Coll::Scatter)), param_name);
INSTANTIATE_TEST_SUITE_P(Alltoall, Matrix, testing::ValuesIn(matrix(Coll::Alltoall)), param_name);
INSTANTIATE_TEST_SUITE_P(Alltoallv, Matrix, testing::ValuesIn(matrix(Coll::Alltoallv)), param_name);
INSTANTIATE_TEST_SUITE_P(ReduceScatterv, Matrix, testing::ValuesIn(matrix(Coll::ReduceScatterv)),
                         param_name);
INSTANTIATE_TEST_SUITE_P(Allgatherv, Matrix, testing::ValuesIn(matrix(Coll::Allgatherv)),
                         param_name);
INSTANTIATE_TEST_SUITE_P(SendRecv, Matrix, testing::ValuesIn(matrix(Coll::SendRecv)), param_name);
INSTANTIATE_TEST_SUITE_P(Barrier, Matrix, testing::ValuesIn(special(Coll::Barrier)), param_name);
INSTANTIATE_TEST_SUITE_P(AsyncOrder, Matrix, testing::ValuesIn(special(Coll::AsyncOrder)), param_name);
INSTANTIATE_TEST_SUITE_P(AsyncAll, Matrix, testing::ValuesIn(special(Coll::AsyncAll)), param_name);
INSTANTIATE_TEST_SUITE_P(WaitTimeout, Matrix, testing::ValuesIn(special(Coll::WaitTimeout)), param_name);
INSTANTIATE_TEST_SUITE_P(Split, Matrix, testing::ValuesIn(special(Coll::Split)), param_name);
INSTANTIATE_TEST_SUITE_P(ManySmall, Matrix, testing::ValuesIn(special(Coll::ManySmall)), param_name);
INSTANTIATE_TEST_SUITE_P(PageOffsets, Matrix, testing::ValuesIn(special(Coll::PageOffsets)),
                         param_name);

// The harness itself: a wrong result fails the case and keeps the ranks; a
// rank that dies or hangs fails its case promptly, with a message naming it,
// and the next case gets fresh ranks.
Case harness_case(Coll coll, int world = 3) {
  Case c;
  c.coll = coll;
  c.world = world;
  return c;
}

void expect_pool_works(int world) {
  Case c;
  c.coll = Coll::Allreduce;
  c.world = world;
  c.count = 7;
  c.seed = 42;
  run_case(c);
}

TEST(RankPoolHarness, WrongResultFailsTheCaseAndKeepsTheRanks) {
  std::string error;
  RankPool* pool = registry().get(3, &error);
  ASSERT_NE(pool, nullptr) << error;
  const RankPool::Outcome out = pool->run(harness_case(Coll::HarnessWrong));
  EXPECT_FALSE(out.ok);
  EXPECT_FALSE(out.broken);
  EXPECT_TRUE(pool->alive());
  EXPECT_NE(out.message.find("rank 2: deliberately wrong"), std::string::npos) << out.message;
  EXPECT_EQ(registry().get(3, &error), pool) << "a failed case must not restart the ranks";
  expect_pool_works(3);
}

TEST(RankPoolHarness, CrashedRankFailsTheCaseAndIsReplaced) {
  std::string error;
  RankPool* pool = registry().get(3, &error);
  ASSERT_NE(pool, nullptr) << error;
  const RankPool::Outcome out = pool->run(harness_case(Coll::HarnessCrash));
  EXPECT_FALSE(out.ok);
  EXPECT_TRUE(out.broken);
  EXPECT_FALSE(pool->alive());
  EXPECT_NE(out.message.find("rank 2: worker process killed by signal 9"), std::string::npos)
      << out.message;
  expect_pool_works(3);
}

TEST(RankPoolHarness, HungRankTimesOutAndIsReplaced) {
  std::string error;
  RankPool* pool = registry().get(3, &error);
  ASSERT_NE(pool, nullptr) << error;
  const auto start = std::chrono::steady_clock::now();
  const RankPool::Outcome out = pool->run(harness_case(Coll::HarnessHang), std::chrono::seconds(2));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(60));
  EXPECT_FALSE(out.ok);
  EXPECT_TRUE(out.broken);
  EXPECT_FALSE(pool->alive());
  EXPECT_NE(out.message.find("rank 2: no reply"), std::string::npos) << out.message;
  expect_pool_works(3);
}

// Under LeakSanitizer each rank checks for leaks when its pool shuts down
// (after destroying its communicator); a leak must be reported, not lost.
TEST(RankPoolHarness, LeakInARankIsReportedAtShutdown) {
  if (!ranks_check_leaks())
    GTEST_SKIP() << "needs LeakSanitizer (build with -Db_sanitize=address, no detect_leaks=0)";
  std::string error;
  auto pool = RankPool::start(2, handle_case, &error);  // its own, not the registry's
  ASSERT_NE(pool, nullptr) << error;
  const RankPool::Outcome out = pool->run(harness_case(Coll::HarnessLeak, 2));
  ASSERT_TRUE(out.ok) << out.message;
  std::fprintf(stderr, "[ note     ] the LeakSanitizer report below is this test's deliberate leak\n");
  const std::string problems = pool->shutdown();
  // The sanitizer's exitcode (1 under ASan, 23 standalone), or SIGABRT with
  // ASAN_OPTIONS=abort_on_error=1 (as scripts/test sets it).
  EXPECT_TRUE(problems.find("rank 1: worker exited with status") != std::string::npos ||
              problems.find("rank 1: worker killed by signal") != std::string::npos)
      << problems;
  EXPECT_EQ(problems.find("rank 0"), std::string::npos) << problems;
}

}  // namespace

// gtest prints the parameter of a failed case with this (found by ADL).
void PrintTo(const Case& c, std::ostream* os) {
  *os << coll_name(c.coll) << " " << case_label(c) << " (seed " << c.seed << ")";
}

}  // namespace chorus_test

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  if (chorus_test::skip_unavailable_transport()) return 77;
  testing::AddGlobalTestEnvironment(new chorus_test::PoolEnvironment);
  return RUN_ALL_TESTS();
}
