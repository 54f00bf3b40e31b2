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
// that case with --gtest_filter='Matrix/<Suite>.MatchesClosedForm/<name>'.
// What is trimmed at the largest count, and why: see big_modes().

#include "rank_pool.hpp"
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

using chorus::DataType;
using chorus::ReduceOp;
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

enum class Coll : std::uint8_t {
  Allreduce,
  Broadcast,
  Allgather,
  ReduceScatter,
  Reduce,
  Gather,
  Scatter,
  Alltoall,
  SendRecv,
  Barrier,
  AsyncOrder,
  AsyncAll,
  WaitTimeout,
  Split,
  ManySmall,
  // Cases that test the harness itself (never in the matrix).
  HarnessWrong,
  HarnessCrash,
  HarnessHang,
  HarnessLeak,
};

// One test case, sent as bytes to every rank of the pool.
struct Case {
  Coll coll = Coll::Allreduce;
  DataType dtype = DataType::Float32;
  ReduceOp op = ReduceOp::Sum;
  bool in_place = false;
  bool async = false;
  std::int32_t variant = 0;  // meaning depends on coll (Split: how keys are chosen)
  std::int32_t world = 1;
  std::int32_t root = 0;
  std::int32_t misalign = 0;  // bytes by which send buffers miss 64-byte alignment
  std::uint64_t count = 0;
  std::uint64_t seed = 0;  // varies the data from case to case
  bool registered = false;  // buffers from chorus::mem_alloc
};

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
    case Coll::SendRecv: return "sendrecv";
    case Coll::Barrier: return "barrier";
    case Coll::AsyncOrder: return "async_order";
    case Coll::AsyncAll: return "async_all";
    case Coll::WaitTimeout: return "wait_timeout";
    case Coll::Split: return "split";
    case Coll::ManySmall: return "many_small";
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
  return c == Coll::Allreduce || c == Coll::ReduceScatter || c == Coll::Reduce;
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
  else if (c.coll != Coll::Alltoall) s << (c.in_place ? "_inplace" : "_outofplace");
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
    case Coll::Allgather:
      if (t == DataType::Int8 || t == DataType::Float32) return kIn;
      if (t == DataType::Float16) return kOut;
      return 0;
    case Coll::Alltoall:
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

std::uint64_t mix(std::uint64_t z) {  // splitmix64's finaliser
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
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
            if (coll == Coll::Alltoall && mode == 1) break;  // buffers must not overlap
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
      default:
        break;
    }
  }
  return cases;
}

// ---------------------------------------------------------------------------
// Element encoding, independent of the library

struct Half {
  std::uint16_t bits;
};
struct BFloat {
  std::uint16_t bits;
};

// Encodes an integer that the format holds exactly (normal numbers only);
// anything else is a bug in this test's choice of inputs.
std::uint16_t encode_small_float(std::int64_t v, int exp_bits, int mant_bits) {
  if (v == 0) return 0;
  const std::uint16_t sign = v < 0 ? 0x8000 : 0;
  const std::uint64_t m = v < 0 ? static_cast<std::uint64_t>(-v) : static_cast<std::uint64_t>(v);
  const int e = std::bit_width(m) - 1;  // m in [2^e, 2^(e+1))
  std::uint64_t frac = m - (std::uint64_t{1} << e);
  if (e > mant_bits) {
    if ((frac & ((std::uint64_t{1} << (e - mant_bits)) - 1)) != 0)
      throw std::logic_error("test bug: " + std::to_string(v) + " is not exact in this format");
    frac >>= (e - mant_bits);
  } else {
    frac <<= (mant_bits - e);
  }
  const int biased = e + (1 << (exp_bits - 1)) - 1;
  if (biased >= (1 << exp_bits) - 1)
    throw std::logic_error("test bug: " + std::to_string(v) + " overflows this format");
  return static_cast<std::uint16_t>(sign | (static_cast<unsigned>(biased) << mant_bits) | frac);
}

double decode_small_float(std::uint16_t b, int exp_bits, int mant_bits) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const int biased = (b >> mant_bits) & ((1 << exp_bits) - 1);
  const int frac = b & ((1 << mant_bits) - 1);
  double mag;
  if (biased == (1 << exp_bits) - 1)
    mag = frac != 0 ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (biased == 0)
    mag = std::ldexp(frac, 1 - bias - mant_bits);
  else
    mag = std::ldexp(frac + (1 << mant_bits), biased - bias - mant_bits);
  return (b & 0x8000) != 0 ? -mag : mag;
}

template <typename T>
T encode(std::int64_t v) {
  if constexpr (std::is_same_v<T, Half>) return Half{encode_small_float(v, 5, 10)};
  else if constexpr (std::is_same_v<T, BFloat>) return BFloat{encode_small_float(v, 8, 7)};
  else return static_cast<T>(v);
}

template <typename T>
bool matches(T got, std::int64_t want) {
  if constexpr (std::is_same_v<T, Half>) return decode_small_float(got.bits, 5, 10) == static_cast<double>(want);
  else if constexpr (std::is_same_v<T, BFloat>) return decode_small_float(got.bits, 8, 7) == static_cast<double>(want);
  else if constexpr (std::is_floating_point_v<T>) return got == static_cast<T>(want);
  else return got == static_cast<T>(want);
}

template <typename T>
std::string show(T got) {
  std::ostringstream s;
  s.precision(17);
  if constexpr (std::is_same_v<T, Half>) s << decode_small_float(got.bits, 5, 10) << " (0x" << std::hex << got.bits << ")";
  else if constexpr (std::is_same_v<T, BFloat>) s << decode_small_float(got.bits, 8, 7) << " (0x" << std::hex << got.bits << ")";
  else if constexpr (sizeof(T) == 1) s << static_cast<int>(got);
  else s << got;
  return s.str();
}

// Calls fn.template operator()<T>() with T the C++ type of `t`.
template <typename Fn>
decltype(auto) with_type(DataType t, Fn&& fn) {
  switch (t) {
    case DataType::Int8: return fn.template operator()<std::int8_t>();
    case DataType::UInt8: return fn.template operator()<std::uint8_t>();
    case DataType::Int32: return fn.template operator()<std::int32_t>();
    case DataType::UInt32: return fn.template operator()<std::uint32_t>();
    case DataType::Int64: return fn.template operator()<std::int64_t>();
    case DataType::UInt64: return fn.template operator()<std::uint64_t>();
    case DataType::Float16: return fn.template operator()<Half>();
    case DataType::BFloat16: return fn.template operator()<BFloat>();
    case DataType::Float32: return fn.template operator()<float>();
    case DataType::Float64: return fn.template operator()<double>();
  }
  throw std::logic_error("unknown dtype");
}

bool is_float(DataType t) {
  return t == DataType::Float16 || t == DataType::BFloat16 || t == DataType::Float32 ||
         t == DataType::Float64;
}
bool is_signed(DataType t) {
  return is_float(t) || t == DataType::Int8 || t == DataType::Int32 || t == DataType::Int64;
}

// Scale of the inputs: 1 for the narrow types; for wider ones it spreads the
// bits (2^16 + 1, 2^33 + 1) so that a kernel that drops high bytes or
// mantissa bits is caught, while sums of 8 ranks stay exact (< 2^24 for float).
std::int64_t scale(DataType t) {
  switch (t) {
    case DataType::Int32:
    case DataType::UInt32:
    case DataType::Float32: return (1 << 16) + 1;
    case DataType::Int64:
    case DataType::UInt64:
    case DataType::Float64: return (std::int64_t{1} << 33) + 1;
    default: return 1;
  }
}

// ---------------------------------------------------------------------------
// Inputs and closed-form expected values

std::uint64_t elem_hash(const Case& c, std::uint64_t j) { return mix(c.seed ^ (j * 0xD6E8FEB86659FD93ull)); }

// Data that only moves (broadcast, gather, ...): identifies rank and index.
std::int64_t payload(const Case& c, int rank, std::uint64_t j) {
  const std::uint64_t h = mix(c.seed ^ (j * 0xD6E8FEB86659FD93ull) ^
                              (static_cast<std::uint64_t>(rank + 1) * 0x9E3779B97F4A7C15ull));
  std::int64_t v = static_cast<std::int64_t>(h % 101);  // <= 100: exact in bf16, fits int8
  if (is_signed(c.dtype)) v -= 50;
  return v * scale(c.dtype);
}

// Reduction inputs. Every element j draws its parameters from a hash, and
// rank r's value is built from a permutation of the ranks, (r + p) mod n, so
// that the result has a closed form that costs O(1) per element to check
// (checking by folding n contributions per element would cost more than the
// collective itself at 8 ranks).
struct ReductionElement {
  std::int64_t s;     // base value
  int p;              // rotation of the ranks
  int special_rank;   // Sum/Avg: the rank that adds `extra`
  std::int64_t extra; // Sum/Avg: makes the sum not divide by n
  int twos;           // Prod: how many ranks give a factor 2
  int negatives;      // Prod: how many ranks give a negative factor
  int q;              // Prod: rotation for the signs
};

// A value in [0, n) from 32 hash bits, without a division (a 64-bit
// division by a runtime n costs more than everything else per element).
int below(std::uint64_t bits, int n) {
  return static_cast<int>(((bits & 0xFFFFFFFFu) * static_cast<std::uint64_t>(n)) >> 32);
}

ReductionElement element(const Case& c, int n, std::uint64_t j) {
  const std::uint64_t h = elem_hash(c, j);
  const bool sgn = is_signed(c.dtype);
  ReductionElement e{};
  e.p = below(h >> 32, n);
  switch (c.op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg:
      // Signed: s in [-3, 3]; unsigned: s >= n - 1 keeps every value >= 0.
      e.s = sgn ? static_cast<std::int64_t>(h % 7) - 3 : (n - 1) + static_cast<std::int64_t>(h % 5);
      e.special_rank = below(h >> 16, n);
      // Float Avg must divide exactly; integer Avg checks truncation toward
      // zero, including negative sums (-1 / 2 == 0, not -1).
      e.extra = (c.op == ReduceOp::Avg && is_float(c.dtype)) ? 0 : below(h, n);
      break;
    case ReduceOp::Min:
    case ReduceOp::Max:
      e.s = sgn ? static_cast<std::int64_t>(h % 11) - 5 : static_cast<std::int64_t>(h % 6);
      break;
    case ReduceOp::Prod:
      // |product| <= 2^6 = 64: exact and in range for int8 and bf16.
      e.twos = std::min(n, static_cast<int>((h >> 8) % 7));
      e.negatives = sgn ? below(h >> 16, n + 1) : 0;
      e.q = below(h, n);
      break;
  }
  return e;
}

// Rank `rank`'s input. Bounds, for n <= 8: Sum/Avg |x| <= 17 (and the sum of
// |x| over ranks <= 136, so every partial sum is exact in bf16), Min/Max |x|
// <= 12, all times scale(dtype).
std::int64_t contribution(const Case& c, int n, int rank, const ReductionElement& e) {
  const int rot = rank + e.p < n ? rank + e.p : rank + e.p - n;  // (rank + p) mod n
  switch (c.op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg:
      // rank - rot sums to 0 over the ranks (rot is a permutation of rank).
      return (e.s + rank - rot + (rank == e.special_rank ? e.extra : 0)) * scale(c.dtype);
    case ReduceOp::Min:
    case ReduceOp::Max:
      return (e.s + rot) * scale(c.dtype);
    case ReduceOp::Prod: {
      const std::int64_t mag = rot < e.twos ? 2 : 1;
      const int sign_rot = rank + e.q < n ? rank + e.q : rank + e.q - n;
      return sign_rot < e.negatives ? -mag : mag;
    }
  }
  return 0;
}

std::int64_t reduced(const Case& c, int n, const ReductionElement& e) {
  const std::int64_t k = scale(c.dtype);
  switch (c.op) {
    case ReduceOp::Sum: return (n * e.s + e.extra) * k;
    case ReduceOp::Avg: return (n * e.s + e.extra) * k / n;  // C++ division truncates toward zero
    case ReduceOp::Min: return e.s * k;
    case ReduceOp::Max: return (e.s + n - 1) * k;
    case ReduceOp::Prod: return (e.negatives % 2 != 0 ? -1 : 1) * (std::int64_t{1} << e.twos);
  }
  return 0;
}

std::int64_t contribution(const Case& c, int n, int rank, std::uint64_t j) {
  return contribution(c, n, rank, element(c, n, j));
}
std::int64_t reduced(const Case& c, int n, std::uint64_t j) { return reduced(c, n, element(c, n, j)); }

// ---------------------------------------------------------------------------
// Buffers and checks

constexpr unsigned char kPoison = 0xA5;
constexpr unsigned char kGuardByte = 0x3C;
constexpr std::size_t kGuardBytes = 64;

// A buffer poisoned with kPoison, between two guard regions.
// `misalign` shifts the start by that many bytes from a 64-byte boundary:
// the API does not require aligned buffers, and vectorised kernels must cope.
//
// While a case with `registered` runs, buffers come from chorus::mem_alloc.
bool g_registered = false;

class Buffer {
 public:
  Buffer(std::size_t bytes, int misalign)
      : bytes_(bytes), front_(kGuardBytes + static_cast<std::size_t>(misalign)),
        storage_(g_registered ? 0 : bytes + front_ + kGuardBytes, kGuardByte) {
    if (g_registered) {
      shared_ = static_cast<unsigned char*>(chorus::mem_alloc(bytes + front_ + kGuardBytes));
      std::memset(shared_, kGuardByte, bytes + front_ + kGuardBytes);
    }
    std::memset(data(), kPoison, bytes);
  }
  ~Buffer() {
    if (shared_) chorus::mem_free(shared_);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  unsigned char* data() { return base() + front_; }
  std::size_t bytes() const { return bytes_; }
  // Index of the first modified guard byte relative to data() (negative:
  // before the buffer), or nullopt.
  std::optional<long> guard_hit() const {
    const unsigned char* b = shared_ ? shared_ : storage_.data();
    for (std::size_t i = 0; i < front_; ++i)
      if (b[i] != kGuardByte) return static_cast<long>(i) - static_cast<long>(front_);
    for (std::size_t i = 0; i < kGuardBytes; ++i)
      if (b[front_ + bytes_ + i] != kGuardByte) return static_cast<long>(bytes_ + i);
    return std::nullopt;
  }

 private:
  unsigned char* base() { return shared_ ? shared_ : storage_.data(); }
  std::size_t bytes_;
  std::size_t front_;
  std::vector<unsigned char> storage_;
  unsigned char* shared_ = nullptr;  // mem_alloc memory in place of storage_
};

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

class Checker {
 public:
  template <typename T, typename Want>
  void expect(const std::string& what, const unsigned char* buf, std::uint64_t n, Want want) {
    std::uint64_t wrong = 0;
    for (std::uint64_t i = 0; i < n; ++i) {
      T got;
      std::memcpy(&got, buf + i * sizeof(T), sizeof(T));
      const std::int64_t w = want(i);
      if (!matches(got, w)) {
        if (wrong < kShown)
          text_ << "\n  " << what << "[" << i << "] = " << show(got) << ", expected " << w;
        ++wrong;
      }
    }
    if (wrong > kShown) text_ << "\n  ... " << wrong << " of " << n << " elements of " << what << " wrong";
    failed_ = failed_ || wrong > 0;
  }

  // `blocks` blocks of n elements; want(b, i) is element i of block b.
  template <typename T, typename Want>
  void expect_blocks(const std::string& what, const unsigned char* buf, int blocks, std::uint64_t n,
                     Want want) {
    for (int b = 0; b < blocks; ++b)
      expect<T>(what + " block " + std::to_string(b), buf + static_cast<std::uint64_t>(b) * n * sizeof(T),
                n, [&](std::uint64_t i) { return want(b, i); });
  }

  void guards(const char* what, const Buffer& b) {
    if (auto at = b.guard_hit()) {
      text_ << "\n  wrote outside " << what << " (" << b.bytes() << " bytes): byte offset " << *at;
      failed_ = true;
    }
  }

  void fail(const std::string& why) {
    text_ << "\n  " << why;
    failed_ = true;
  }

  WorkerReply reply() const {
    if (!failed_) return {};
    return {WorkerReply::Status::Failed, text_.str()};
  }

 private:
  static constexpr std::uint64_t kShown = 5;
  std::ostringstream text_;
  bool failed_ = false;
};

int recv_misalign(const Case& c) { return (c.misalign * 3) % 8; }

template <typename T, typename Value>
void fill(unsigned char* buf, std::uint64_t n, Value value) {
  for (std::uint64_t i = 0; i < n; ++i) {
    const T x = encode<T>(value(i));
    std::memcpy(buf + i * sizeof(T), &x, sizeof(T));
  }
}

// ---------------------------------------------------------------------------
// The cases, as each rank runs them

template <typename T>
WorkerReply run_allreduce(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  auto in = [&](std::uint64_t i) { return contribution(c, x.size, x.rank, i); };
  auto want = [&](std::uint64_t i) { return reduced(c, x.size, i); };
  Checker chk;
  Buffer recv(n * sizeof(T), recv_misalign(c));
  if (c.in_place) {
    fill<T>(recv.data(), n, in);
    x.comm.allreduce(recv.data(), recv.data(), n, c.dtype, c.op);
  } else {
    Buffer send(n * sizeof(T), c.misalign);
    fill<T>(send.data(), n, in);
    x.comm.allreduce(send.data(), recv.data(), n, c.dtype, c.op);
    chk.expect<T>("sendbuf (must not change)", send.data(), n, in);
    chk.guards("sendbuf", send);
  }
  chk.expect<T>("recvbuf", recv.data(), n, want);
  chk.guards("recvbuf", recv);
  return chk.reply();
}

template <typename T>
WorkerReply run_broadcast(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const bool root = x.rank == c.root;
  auto src = [&](std::uint64_t i) { return payload(c, c.root, i); };
  Checker chk;
  Buffer recv(n * sizeof(T), recv_misalign(c));
  if (c.in_place) {
    if (root) fill<T>(recv.data(), n, src);
    x.comm.broadcast(recv.data(), recv.data(), n, c.dtype, c.root);
  } else {
    // sendbuf is read on the root only: the others pass null.
    std::optional<Buffer> send;
    if (root) {
      send.emplace(n * sizeof(T), c.misalign);
      fill<T>(send->data(), n, src);
    }
    x.comm.broadcast(root ? send->data() : nullptr, recv.data(), n, c.dtype, c.root);
    if (root) {
      chk.expect<T>("sendbuf (must not change)", send->data(), n, src);
      chk.guards("sendbuf", *send);
    }
  }
  chk.expect<T>("recvbuf", recv.data(), n, src);
  chk.guards("recvbuf", recv);
  return chk.reply();
}

template <typename T>
WorkerReply run_allgather(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const std::uint64_t total = n * static_cast<std::uint64_t>(x.size);
  auto mine = [&](std::uint64_t i) { return payload(c, x.rank, i); };
  auto want = [&](int b, std::uint64_t i) { return payload(c, b, i); };
  Checker chk;
  Buffer recv(total * sizeof(T), recv_misalign(c));
  unsigned char* my_block = recv.data() + static_cast<std::uint64_t>(x.rank) * n * sizeof(T);
  if (c.in_place) {
    fill<T>(my_block, n, mine);
    x.comm.allgather(my_block, recv.data(), n, c.dtype);
  } else {
    Buffer send(n * sizeof(T), c.misalign);
    fill<T>(send.data(), n, mine);
    x.comm.allgather(send.data(), recv.data(), n, c.dtype);
    chk.expect<T>("sendbuf (must not change)", send.data(), n, mine);
    chk.guards("sendbuf", send);
  }
  chk.expect_blocks<T>("recvbuf", recv.data(), x.size, n, want);
  chk.guards("recvbuf", recv);
  return chk.reply();
}

template <typename T>
WorkerReply run_reduce_scatter(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const std::uint64_t total = n * static_cast<std::uint64_t>(x.size);
  const std::uint64_t first = static_cast<std::uint64_t>(x.rank) * n;
  auto in = [&](std::uint64_t j) { return contribution(c, x.size, x.rank, j); };
  auto want = [&](std::uint64_t i) { return reduced(c, x.size, first + i); };
  Checker chk;
  Buffer send(total * sizeof(T), c.misalign);
  fill<T>(send.data(), total, in);
  if (c.in_place) {
    unsigned char* my_block = send.data() + first * sizeof(T);
    x.comm.reduce_scatter(send.data(), my_block, n, c.dtype, c.op);
    chk.expect<T>("recvbuf (block of sendbuf)", my_block, n, want);
  } else {
    Buffer recv(n * sizeof(T), recv_misalign(c));
    x.comm.reduce_scatter(send.data(), recv.data(), n, c.dtype, c.op);
    chk.expect<T>("recvbuf", recv.data(), n, want);
    chk.guards("recvbuf", recv);
    chk.expect<T>("sendbuf (must not change)", send.data(), total, in);
  }
  chk.guards("sendbuf", send);
  return chk.reply();
}

template <typename T>
WorkerReply run_reduce(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const bool root = x.rank == c.root;
  auto in = [&](std::uint64_t i) { return contribution(c, x.size, x.rank, i); };
  auto want = [&](std::uint64_t i) { return reduced(c, x.size, i); };
  Checker chk;
  if (c.in_place) {
    Buffer buf(n * sizeof(T), c.misalign);
    fill<T>(buf.data(), n, in);
    x.comm.reduce(buf.data(), buf.data(), n, c.dtype, c.op, c.root);
    // Only the root's recvbuf receives the result; elsewhere it is the
    // (const) sendbuf and must be left alone.
    if (root) chk.expect<T>("recvbuf", buf.data(), n, want);
    else chk.expect<T>("non-root buffer (must not change)", buf.data(), n, in);
    chk.guards("buffer", buf);
  } else {
    Buffer send(n * sizeof(T), c.misalign);
    fill<T>(send.data(), n, in);
    std::optional<Buffer> recv;
    if (root) recv.emplace(n * sizeof(T), recv_misalign(c));
    // recvbuf may be null on the non-roots.
    x.comm.reduce(send.data(), root ? recv->data() : nullptr, n, c.dtype, c.op, c.root);
    chk.expect<T>("sendbuf (must not change)", send.data(), n, in);
    chk.guards("sendbuf", send);
    if (root) {
      chk.expect<T>("recvbuf", recv->data(), n, want);
      chk.guards("recvbuf", *recv);
    }
  }
  return chk.reply();
}

template <typename T>
WorkerReply run_gather(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const std::uint64_t total = n * static_cast<std::uint64_t>(x.size);
  const bool root = x.rank == c.root;
  auto mine = [&](std::uint64_t i) { return payload(c, x.rank, i); };
  auto want = [&](int b, std::uint64_t i) { return payload(c, b, i); };
  Checker chk;
  std::optional<Buffer> recv;
  if (root) recv.emplace(total * sizeof(T), recv_misalign(c));
  if (c.in_place && root) {
    unsigned char* my_block = recv->data() + static_cast<std::uint64_t>(x.rank) * n * sizeof(T);
    fill<T>(my_block, n, mine);
    x.comm.gather(my_block, recv->data(), n, c.dtype, c.root);
  } else {
    Buffer send(n * sizeof(T), c.misalign);
    fill<T>(send.data(), n, mine);
    // recvbuf is used on the root only: the others pass null.
    x.comm.gather(send.data(), root ? recv->data() : nullptr, n, c.dtype, c.root);
    chk.expect<T>("sendbuf (must not change)", send.data(), n, mine);
    chk.guards("sendbuf", send);
  }
  if (root) {
    chk.expect_blocks<T>("recvbuf", recv->data(), x.size, n, want);
    chk.guards("recvbuf", *recv);
  }
  return chk.reply();
}

template <typename T>
WorkerReply run_scatter(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const std::uint64_t total = n * static_cast<std::uint64_t>(x.size);
  const std::uint64_t first = static_cast<std::uint64_t>(x.rank) * n;
  const bool root = x.rank == c.root;
  auto src = [&](std::uint64_t k) { return payload(c, c.root, k); };
  auto want = [&](std::uint64_t i) { return payload(c, c.root, first + i); };
  Checker chk;
  std::optional<Buffer> send;
  if (root) {
    send.emplace(total * sizeof(T), c.misalign);
    fill<T>(send->data(), total, src);
  }
  if (c.in_place && root) {
    unsigned char* my_block = send->data() + first * sizeof(T);
    x.comm.scatter(send->data(), my_block, n, c.dtype, c.root);
    // The root's block is already in place; nothing in sendbuf may change.
    chk.expect<T>("sendbuf with the root's block in place", send->data(), total, src);
  } else {
    Buffer recv(n * sizeof(T), recv_misalign(c));
    // sendbuf is used on the root only: the others pass null.
    x.comm.scatter(root ? send->data() : nullptr, recv.data(), n, c.dtype, c.root);
    chk.expect<T>("recvbuf", recv.data(), n, want);
    chk.guards("recvbuf", recv);
    if (root) chk.expect<T>("sendbuf (must not change)", send->data(), total, src);
  }
  if (root) chk.guards("sendbuf", *send);
  return chk.reply();
}

template <typename T>
WorkerReply run_alltoall(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const std::uint64_t total = n * static_cast<std::uint64_t>(x.size);
  const std::uint64_t first = static_cast<std::uint64_t>(x.rank) * n;
  auto mine = [&](std::uint64_t k) { return payload(c, x.rank, k); };
  // Block b of my recvbuf is block `rank` of rank b's sendbuf.
  auto want = [&](int b, std::uint64_t i) { return payload(c, b, first + i); };
  Checker chk;
  Buffer send(total * sizeof(T), c.misalign);
  Buffer recv(total * sizeof(T), recv_misalign(c));
  fill<T>(send.data(), total, mine);
  x.comm.alltoall(send.data(), recv.data(), n, c.dtype);
  chk.expect_blocks<T>("recvbuf", recv.data(), x.size, n, want);
  chk.guards("recvbuf", recv);
  chk.expect<T>("sendbuf (must not change)", send.data(), total, mine);
  chk.guards("sendbuf", send);
  return chk.reply();
}

// Ring shift: rank r sends to r+1 and receives from r-1.
template <typename T>
WorkerReply run_sendrecv(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const int next = (x.rank + 1) % x.size;
  const int prev = (x.rank + x.size - 1) % x.size;
  auto mine = [&](std::uint64_t i) { return payload(c, x.rank, i); };
  auto want = [&](std::uint64_t i) { return payload(c, prev, i); };
  Checker chk;
  Buffer send(n * sizeof(T), c.misalign);
  Buffer recv(n * sizeof(T), recv_misalign(c));
  fill<T>(send.data(), n, mine);
  if (c.async) {
    // Posted send first: operations run in submission order, and a posted
    // receive ahead of the send would wait for a peer that waits in turn.
    chorus::Work s = x.comm.send_async(send.data(), n, c.dtype, next);
    chorus::Work r = x.comm.recv_async(recv.data(), n, c.dtype, prev);
    r.wait();  // reverse order on purpose
    s.wait();
    if (!s.completed() || !r.completed()) chk.fail("completed() is false after wait()");
  } else if (x.rank % 2 == 0) {
    // Even ranks send first, odd ranks receive first: no cycle of blocked
    // sends even without buffering in the transport.
    x.comm.send(send.data(), n, c.dtype, next);
    x.comm.recv(recv.data(), n, c.dtype, prev);
  } else {
    x.comm.recv(recv.data(), n, c.dtype, prev);
    x.comm.send(send.data(), n, c.dtype, next);
  }
  chk.expect<T>("recvbuf", recv.data(), n, want);
  chk.guards("recvbuf", recv);
  chk.expect<T>("sendbuf (must not change)", send.data(), n, mine);
  chk.guards("sendbuf", send);
  return chk.reply();
}

// Each round, ranks arrive at different times (rank-dependent sleeps) and
// count themselves in shared memory before entering the barrier; whoever
// leaves must see every rank's arrival of that round.
WorkerReply run_barrier(WorkerContext& x, const Case& c) {
  Checker chk;
  constexpr int kRounds = 4;
  auto& arrived = x.shared.counter[0];
  for (int k = 0; k < kRounds; ++k) {
    std::this_thread::sleep_for(std::chrono::milliseconds(((x.rank + k) % x.size) * 3));
    arrived.fetch_add(1);
    if (c.async) {
      chorus::Work w = x.comm.barrier_async();
      if (!w.wait(std::chrono::milliseconds(std::chrono::seconds(60))))
        chk.fail("barrier_async did not complete within 60 s");
    } else {
      x.comm.barrier();
    }
    const std::int64_t seen = arrived.load();
    if (seen < static_cast<std::int64_t>(x.size) * (k + 1))
      chk.fail("round " + std::to_string(k) + ": barrier returned after only " + std::to_string(seen) +
               " of " + std::to_string(x.size * (k + 1)) + " arrivals");
  }
  return chk.reply();
}

// Several allreduce_async in flight on shared buffers, waited in reverse
// order: results prove that each ran after the earlier ones on the same
// buffer (e.g. sum-then-max differs from max-then-sum), and completed()
// proves that waiting for a later one implies the earlier ones are done.
WorkerReply run_async_order(WorkerContext& x, const Case& c) {
  Checker chk;
  const std::uint64_t n = c.count;
  const int size = x.size;
  // x(r, i) = s + (r + p) mod n, with s and p hashed per element: the sum is
  // n * s + n(n-1)/2 and the max s + n - 1, in closed form.
  auto element_of = [&](std::uint64_t i, std::uint64_t salt) {
    const std::uint64_t h = mix(c.seed + salt * 0x9E3779B97F4A7C15ull + i);
    return std::pair<std::int64_t, int>(static_cast<std::int64_t>(h % 5) + 1,
                                        static_cast<int>((h >> 8) % static_cast<std::uint64_t>(size)));
  };
  auto value = [&](std::pair<std::int64_t, int> e) { return e.first + (x.rank + e.second) % size; };
  auto sum_of = [&](std::pair<std::int64_t, int> e) { return size * e.first + size * (size - 1) / 2; };
  std::vector<std::int64_t> a(n), b(n), want_a(n), want_b(n);
  std::vector<float> f_send(n), f_recv(n, -1.0f), want_f(n);
  for (std::uint64_t i = 0; i < n; ++i) {
    const auto ea = element_of(i, 1), eb = element_of(i, 2), ef = element_of(i, 3);
    a[i] = value(ea);
    b[i] = value(eb);
    f_send[i] = static_cast<float>(value(ef));
    want_a[i] = size * sum_of(ea);              // a: sum, max, sum -> n * sum
    want_b[i] = size * (eb.first + size - 1);   // b: max, sum, min -> n * max
    want_f[i] = static_cast<float>(sum_of(ef));
  }
  const DataType i64 = DataType::Int64;
  std::vector<chorus::Work> w;
  w.push_back(x.comm.allreduce_async(a.data(), a.data(), n, i64, ReduceOp::Sum));
  w.push_back(x.comm.allreduce_async(b.data(), b.data(), n, i64, ReduceOp::Max));
  w.push_back(x.comm.allreduce_async(f_send.data(), f_recv.data(), n, DataType::Float32, ReduceOp::Sum));
  w.push_back(x.comm.allreduce_async(a.data(), a.data(), n, i64, ReduceOp::Max));
  w.push_back(x.comm.allreduce_async(b.data(), b.data(), n, i64, ReduceOp::Sum));
  w.push_back(x.comm.allreduce_async(b.data(), b.data(), n, i64, ReduceOp::Min));
  w.push_back(x.comm.allreduce_async(a.data(), a.data(), n, i64, ReduceOp::Sum));
  for (std::size_t k = w.size(); k-- > 0;) {
    if (!w[k].wait(std::chrono::milliseconds(std::chrono::seconds(60))))
      chk.fail("async op " + std::to_string(k) + ": wait(60 s) returned false");
    for (std::size_t e = 0; e < k; ++e)
      if (!w[e].completed())
        chk.fail("async op " + std::to_string(e) + " not completed although op " + std::to_string(k) +
                 ", submitted after it, is");
    if (!w[k].test()) chk.fail("async op " + std::to_string(k) + ": test() false after wait");
  }
  auto as_value = [](const auto& v) { return [&v](std::uint64_t i) { return static_cast<std::int64_t>(v[i]); }; };
  chk.expect<std::int64_t>("a (sum, max, sum)", reinterpret_cast<const unsigned char*>(a.data()), n, as_value(want_a));
  chk.expect<std::int64_t>("b (max, sum, min)", reinterpret_cast<const unsigned char*>(b.data()), n, as_value(want_b));
  chk.expect<float>("float sum", reinterpret_cast<const unsigned char*>(f_recv.data()), n, as_value(want_f));

  // A blocking call queues behind earlier async ones: when it returns, they
  // have all run.
  std::vector<chorus::Work> later;
  for (int k = 0; k < 3; ++k)
    later.push_back(x.comm.allreduce_async(a.data(), a.data(), n, i64, ReduceOp::Max));
  std::int32_t one = 1, total = 0;
  x.comm.allreduce(&one, &total, 1, DataType::Int32, ReduceOp::Sum);
  if (total != size) chk.fail("blocking allreduce after async ones: got " + std::to_string(total));
  for (std::size_t k = 0; k < later.size(); ++k) {
    if (!later[k].completed())
      chk.fail("async op " + std::to_string(k) + " submitted before a blocking call is not completed after it");
    later[k].wait();
  }
  chk.expect<std::int64_t>("a after more max", reinterpret_cast<const unsigned char*>(a.data()), n, as_value(want_a));
  return chk.reply();
}

// Every *_async entry point, all in flight together (one of each, in a
// fixed order on every rank) and waited in reverse order; then each result is
// checked as in the matrix.
template <typename T>
WorkerReply run_async_all(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const std::uint64_t total = n * static_cast<std::uint64_t>(x.size);
  const std::uint64_t first = static_cast<std::uint64_t>(x.rank) * n;
  const std::size_t es = sizeof(T);
  const bool root = x.rank == c.root;
  const DataType t = c.dtype;
  auto sub = [&](ReduceOp op, std::uint64_t salt) {
    Case s = c;
    s.op = op;
    s.seed = mix(c.seed + salt);
    return s;
  };
  const Case ar = sub(ReduceOp::Sum, 1), bc = sub(ReduceOp::Sum, 2), ag = sub(ReduceOp::Sum, 3),
             rs = sub(ReduceOp::Max, 4), rd = sub(ReduceOp::Min, 5), ga = sub(ReduceOp::Sum, 6),
             sc = sub(ReduceOp::Sum, 7), aa = sub(ReduceOp::Sum, 8), pp = sub(ReduceOp::Sum, 9);
  auto in_of = [&](const Case& k) { return [&x, &k](std::uint64_t j) { return contribution(k, x.size, x.rank, j); }; };
  auto mine_of = [&](const Case& k) { return [&x, &k](std::uint64_t j) { return payload(k, x.rank, j); }; };

  Buffer ar_send(n * es, 0), ar_recv(n * es, 0), bc_buf(n * es, 0), ag_send(n * es, 0),
      ag_recv(total * es, 0), rs_send(total * es, 0), rs_recv(n * es, 0), rd_send(n * es, 0),
      rd_recv(n * es, 0), ga_send(n * es, 0), ga_recv(total * es, 0), sc_send(total * es, 0),
      sc_recv(n * es, 0), aa_send(total * es, 0), aa_recv(total * es, 0), pp_send(n * es, 0),
      pp_recv(n * es, 0);
  fill<T>(ar_send.data(), n, in_of(ar));
  if (root) fill<T>(bc_buf.data(), n, [&](std::uint64_t i) { return payload(bc, c.root, i); });
  fill<T>(ag_send.data(), n, mine_of(ag));
  fill<T>(rs_send.data(), total, in_of(rs));
  fill<T>(rd_send.data(), n, in_of(rd));
  fill<T>(ga_send.data(), n, mine_of(ga));
  if (root) fill<T>(sc_send.data(), total, [&](std::uint64_t k) { return payload(sc, c.root, k); });
  fill<T>(aa_send.data(), total, mine_of(aa));
  fill<T>(pp_send.data(), n, mine_of(pp));

  std::vector<std::pair<const char*, chorus::Work>> works;
  works.emplace_back("allreduce_async", x.comm.allreduce_async(ar_send.data(), ar_recv.data(), n, t, ReduceOp::Sum));
  works.emplace_back("broadcast_async", x.comm.broadcast_async(bc_buf.data(), bc_buf.data(), n, t, c.root));
  works.emplace_back("allgather_async", x.comm.allgather_async(ag_send.data(), ag_recv.data(), n, t));
  works.emplace_back("reduce_scatter_async", x.comm.reduce_scatter_async(rs_send.data(), rs_recv.data(), n, t, ReduceOp::Max));
  works.emplace_back("reduce_async", x.comm.reduce_async(rd_send.data(), rd_recv.data(), n, t, ReduceOp::Min, c.root));
  works.emplace_back("gather_async", x.comm.gather_async(ga_send.data(), ga_recv.data(), n, t, c.root));
  works.emplace_back("scatter_async", x.comm.scatter_async(sc_send.data(), sc_recv.data(), n, t, c.root));
  works.emplace_back("alltoall_async", x.comm.alltoall_async(aa_send.data(), aa_recv.data(), n, t));
  works.emplace_back("barrier_async", x.comm.barrier_async());
  const int next = (x.rank + 1) % x.size;
  const int prev = (x.rank + x.size - 1) % x.size;
  if (x.size > 1) {
    works.emplace_back("send_async", x.comm.send_async(pp_send.data(), n, t, next));
    works.emplace_back("recv_async", x.comm.recv_async(pp_recv.data(), n, t, prev));
  }
  Checker chk;
  for (std::size_t k = works.size(); k-- > 0;) {
    if (!works[k].second.wait(std::chrono::milliseconds(std::chrono::seconds(60))))
      chk.fail(std::string(works[k].first) + ": wait(60 s) returned false");
    for (std::size_t e = 0; e < k; ++e)
      if (!works[e].second.completed())
        chk.fail(std::string(works[e].first) + " is not completed although " + works[k].first +
                 ", submitted after it, is");
  }

  chk.expect<T>("allreduce recvbuf", ar_recv.data(), n, [&](std::uint64_t i) { return reduced(ar, x.size, i); });
  chk.expect<T>("broadcast buffer", bc_buf.data(), n, [&](std::uint64_t i) { return payload(bc, c.root, i); });
  chk.expect_blocks<T>("allgather recvbuf", ag_recv.data(), x.size, n,
                       [&](int b, std::uint64_t i) { return payload(ag, b, i); });
  chk.expect<T>("reduce_scatter recvbuf", rs_recv.data(), n,
                [&](std::uint64_t i) { return reduced(rs, x.size, first + i); });
  if (root) chk.expect<T>("reduce recvbuf", rd_recv.data(), n, [&](std::uint64_t i) { return reduced(rd, x.size, i); });
  if (root)
    chk.expect_blocks<T>("gather recvbuf", ga_recv.data(), x.size, n,
                         [&](int b, std::uint64_t i) { return payload(ga, b, i); });
  chk.expect<T>("scatter recvbuf", sc_recv.data(), n, [&](std::uint64_t i) { return payload(sc, c.root, first + i); });
  chk.expect_blocks<T>("alltoall recvbuf", aa_recv.data(), x.size, n,
                       [&](int b, std::uint64_t i) { return payload(aa, b, first + i); });
  if (x.size > 1)
    chk.expect<T>("recv_async buffer", pp_recv.data(), n, [&](std::uint64_t i) { return payload(pp, prev, i); });
  for (const Buffer* b : {&ar_recv, &bc_buf, &ag_recv, &rs_recv, &rd_recv, &ga_recv, &sc_recv, &aa_recv, &pp_recv})
    chk.guards("a receive buffer", *b);
  return chk.reply();
}

// Work::wait(timeout): false while a peer has not joined yet, true once done.
// Rank 0 submits only after every other rank has seen wait() time out (told
// through shared memory), so the false case does not depend on timing.
WorkerReply run_wait_timeout(WorkerContext& x, const Case& c) {
  Checker chk;
  auto& checked = x.shared.counter[1];
  std::int64_t mine = x.rank + 1, sum = 0;
  const std::int64_t want = static_cast<std::int64_t>(x.size) * (x.size + 1) / 2;
  chorus::Work w;
  if (x.rank != 0) {
    w = x.comm.allreduce_async(&mine, &sum, 1, DataType::Int64, ReduceOp::Sum);
    if (w.wait(10ms)) chk.fail("wait(10 ms) returned true before rank 0 had joined");
    if (w.completed() || w.test()) chk.fail("completed()/test() true before rank 0 had joined");
    checked.fetch_add(1);
  } else {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (checked.load() < x.size - 1 && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(1ms);
    w = x.comm.allreduce_async(&mine, &sum, 1, DataType::Int64, ReduceOp::Sum);
  }
  if (!w.wait(std::chrono::milliseconds(std::chrono::seconds(60))))
    chk.fail("wait(60 s) returned false");
  if (!w.completed()) chk.fail("completed() false after wait returned true");
  if (sum != want) chk.fail("sum " + std::to_string(sum) + ", expected " + std::to_string(want));
  (void)c;
  return chk.reply();
}

// split(color, key): even/odd ranks; the last rank (world >= 3) passes color
// -1. Variant 0: key = rank; 1: key = -rank (reverses the order); 2: all keys
// equal (ties keep the old order).
WorkerReply run_split(WorkerContext& x, const Case& c) {
  Checker chk;
  const int n = x.size;
  auto color_of = [&](int r) { return (n >= 3 && r == n - 1) ? -1 : r % 2; };
  auto key_of = [&](int r) { return c.variant == 0 ? r : c.variant == 1 ? -r : 7; };
  const int color = color_of(x.rank);
  chorus::Communicator sub = x.comm.split(color, key_of(x.rank));
  if (color < 0) {
    if (sub.valid()) chk.fail("split with color -1 returned a valid communicator");
    try {
      std::int32_t v = 0;
      sub.allreduce(&v, &v, 1, DataType::Int32, ReduceOp::Sum);
      chk.fail("allreduce on the invalid handle did not throw");
    } catch (const chorus::Error& e) {
      if (e.code() != chorus::ErrorCode::InvalidUsage)
        chk.fail(std::string("invalid handle threw the wrong code: ") + e.what());
    }
  } else {
    // Members in the new order: by key, then by old rank.
    std::vector<int> members;
    for (int r = 0; r < n; ++r)
      if (color_of(r) == color) members.push_back(r);
    std::stable_sort(members.begin(), members.end(),
                     [&](int p, int q) { return key_of(p) < key_of(q); });
    const int want_rank = static_cast<int>(std::find(members.begin(), members.end(), x.rank) - members.begin());
    if (!sub.valid()) chk.fail("split returned an invalid communicator for color " + std::to_string(color));
    if (sub.size() != static_cast<int>(members.size()) || sub.rank() != want_rank) {
      chk.fail("sub-communicator is rank " + std::to_string(sub.rank()) + " of " + std::to_string(sub.size()) +
               ", expected " + std::to_string(want_rank) + " of " + std::to_string(members.size()));
      return chk.reply();  // the calls below would mismatch
    }
    std::int64_t mine = x.rank + 1, sum = 0;
    sub.allreduce(&mine, &sum, 1, DataType::Int64, ReduceOp::Sum);
    std::int64_t want_sum = 0;
    for (int r : members) want_sum += r + 1;
    if (sum != want_sum) chk.fail("allreduce on the sub-communicator: " + std::to_string(sum) + ", expected " + std::to_string(want_sum));
    std::int32_t old_rank = x.rank;
    std::vector<std::int32_t> order(members.size(), -1);
    sub.allgather(&old_rank, order.data(), 1, DataType::Int32);
    chk.expect<std::int32_t>("allgather of old ranks on the sub-communicator",
                             reinterpret_cast<const unsigned char*>(order.data()), order.size(),
                             [&](std::uint64_t i) { return members[i]; });
    // A split of a split, reversing it.
    chorus::Communicator nested = sub.split(0, -sub.rank());
    if (!nested.valid() || nested.size() != sub.size() || nested.rank() != sub.size() - 1 - sub.rank()) {
      chk.fail("nested split: rank " + std::to_string(nested.rank()) + " of " + std::to_string(nested.size()));
    } else {
      std::int64_t nested_sum = 0;
      nested.allreduce(&mine, &nested_sum, 1, DataType::Int64, ReduceOp::Sum);
      if (nested_sum != want_sum) chk.fail("allreduce on the nested split: " + std::to_string(nested_sum));
    }
  }
  // The parent communicator is unaffected.
  std::int32_t one = 1, total = 0;
  x.comm.allreduce(&one, &total, 1, DataType::Int32, ReduceOp::Sum);
  if (total != n) chk.fail("allreduce on the parent after split: " + std::to_string(total));
  return chk.reply();
}

// Thousands of tiny calls: sequence numbers, buffer reuse and per-call
// bookkeeping over a long run.
WorkerReply run_many_small(WorkerContext& x, const Case& c) {
  Checker chk;
  const std::int64_t n = x.size;
  const std::int64_t rank_sum = n * (n - 1) / 2;
  int wrong = 0;
  for (std::uint64_t k = 0; k < c.count; ++k) {
    std::int32_t in = static_cast<std::int32_t>(x.rank + static_cast<std::int64_t>(k)), out = -1;
    if (k % 2 == 0) x.comm.allreduce(&in, &out, 1, DataType::Int32, ReduceOp::Sum);
    else x.comm.allreduce(&in, &in, 1, DataType::Int32, ReduceOp::Sum), out = in;
    const std::int64_t want = rank_sum + n * static_cast<std::int64_t>(k);
    if (out != want && wrong++ < 5)
      chk.fail("call " + std::to_string(k) + ": " + std::to_string(out) + ", expected " + std::to_string(want));
  }
  return chk.reply();
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
  auto typed = [&]<typename Fn>(Fn fn) { return with_type(c.dtype, fn); };
  WorkerReply reply;
  g_registered = c.registered;
  const std::set<std::string> mappings_before = shared_mappings();
  switch (c.coll) {
    case Coll::Allreduce: reply = typed([&]<typename T>() { return run_allreduce<T>(x, c); }); break;
    case Coll::Broadcast: reply = typed([&]<typename T>() { return run_broadcast<T>(x, c); }); break;
    case Coll::Allgather: reply = typed([&]<typename T>() { return run_allgather<T>(x, c); }); break;
    case Coll::ReduceScatter: reply = typed([&]<typename T>() { return run_reduce_scatter<T>(x, c); }); break;
    case Coll::Reduce: reply = typed([&]<typename T>() { return run_reduce<T>(x, c); }); break;
    case Coll::Gather: reply = typed([&]<typename T>() { return run_gather<T>(x, c); }); break;
    case Coll::Scatter: reply = typed([&]<typename T>() { return run_scatter<T>(x, c); }); break;
    case Coll::Alltoall: reply = typed([&]<typename T>() { return run_alltoall<T>(x, c); }); break;
    case Coll::SendRecv: reply = typed([&]<typename T>() { return run_sendrecv<T>(x, c); }); break;
    case Coll::Barrier: reply = run_barrier(x, c); break;
    case Coll::AsyncOrder: reply = run_async_order(x, c); break;
    case Coll::AsyncAll: reply = typed([&]<typename T>() { return run_async_all<T>(x, c); }); break;
    case Coll::WaitTimeout: reply = run_wait_timeout(x, c); break;
    case Coll::Split: reply = run_split(x, c); break;
    case Coll::ManySmall: reply = run_many_small(x, c); break;
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

// gtest prints the parameter of a failed case with this (found by ADL).
void PrintTo(const Case& c, std::ostream* os) {
  *os << coll_name(c.coll) << " " << case_label(c) << " (seed " << c.seed << ")";
}


#define CHORUS_COLLECTIVE_SUITE(Suite, cases)                                              \
  class Suite : public testing::TestWithParam<Case> {};                                    \
  TEST_P(Suite, MatchesClosedForm) { run_case(GetParam()); }                               \
  INSTANTIATE_TEST_SUITE_P(Matrix, Suite, testing::ValuesIn(cases), param_name)

CHORUS_COLLECTIVE_SUITE(Allreduce, matrix(Coll::Allreduce));
CHORUS_COLLECTIVE_SUITE(Broadcast, matrix(Coll::Broadcast));
CHORUS_COLLECTIVE_SUITE(Allgather, matrix(Coll::Allgather));
CHORUS_COLLECTIVE_SUITE(ReduceScatter, matrix(Coll::ReduceScatter));
CHORUS_COLLECTIVE_SUITE(Reduce, matrix(Coll::Reduce));
CHORUS_COLLECTIVE_SUITE(Gather, matrix(Coll::Gather));
CHORUS_COLLECTIVE_SUITE(Scatter, matrix(Coll::Scatter));
CHORUS_COLLECTIVE_SUITE(Alltoall, matrix(Coll::Alltoall));
CHORUS_COLLECTIVE_SUITE(SendRecv, matrix(Coll::SendRecv));
CHORUS_COLLECTIVE_SUITE(Barrier, special(Coll::Barrier));
CHORUS_COLLECTIVE_SUITE(AsyncOrder, special(Coll::AsyncOrder));
CHORUS_COLLECTIVE_SUITE(AsyncAll, special(Coll::AsyncAll));
CHORUS_COLLECTIVE_SUITE(WaitTimeout, special(Coll::WaitTimeout));
CHORUS_COLLECTIVE_SUITE(Split, special(Coll::Split));
CHORUS_COLLECTIVE_SUITE(ManySmall, special(Coll::ManySmall));

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
}  // namespace chorus_test

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  if (chorus_test::skip_unavailable_transport()) return 77;
  testing::AddGlobalTestEnvironment(new chorus_test::PoolEnvironment);
  return RUN_ALL_TESTS();
}
