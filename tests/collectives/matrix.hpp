// What the collective matrix's translation units share: the case
// descriptor, the encoding of elements independent of the library, the
// inputs and their closed-form expected values, and the guarded buffers and
// checker. test_collectives.cpp has the matrix itself, the parent side and
// each rank's entry point; cases_reducing.cpp, cases_moving.cpp and
// cases_special.cpp run the cases. Four units rather than one, so that
// none of them is the long tail of a 2-core build (the single file took
// 113 s under ASan at -O1).
#pragma once

#include "rank_pool.hpp"

#include <chorus/communicator.hpp>
#include <chorus/memory.hpp>
#include <chorus/types.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iosfwd>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace chorus_test {

using chorus::DataType;
using chorus::ReduceOp;

enum class Coll : std::uint8_t {
  Allreduce,
  Broadcast,
  Allgather,
  ReduceScatter,
  Reduce,
  Gather,
  Scatter,
  Alltoall,
  Alltoallv,
  Allgatherv,
  ReduceScatterv,
  SendRecv,
  Barrier,
  AsyncOrder,
  AsyncAll,
  WaitTimeout,
  Split,
  ManySmall,
  PageOffsets,
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

inline std::uint64_t mix(std::uint64_t z) {  // splitmix64's finaliser
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
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
inline std::uint16_t encode_small_float(std::int64_t v, int exp_bits, int mant_bits) {
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

inline double decode_small_float(std::uint16_t b, int exp_bits, int mant_bits) {
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

inline bool is_float(DataType t) {
  return t == DataType::Float16 || t == DataType::BFloat16 || t == DataType::Float32 ||
         t == DataType::Float64;
}
inline bool is_signed(DataType t) {
  return is_float(t) || t == DataType::Int8 || t == DataType::Int32 || t == DataType::Int64;
}

// Scale of the inputs: 1 for the narrow types; for wider ones it spreads the
// bits (2^16 + 1, 2^33 + 1) so that a kernel that drops high bytes or
// mantissa bits is caught, while sums of 8 ranks stay exact (< 2^24 for float).
inline std::int64_t scale(DataType t) {
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

inline std::uint64_t elem_hash(const Case& c, std::uint64_t j) { return mix(c.seed ^ (j * 0xD6E8FEB86659FD93ull)); }

// Data that only moves (broadcast, gather, ...): identifies rank and index.
inline std::int64_t payload(const Case& c, int rank, std::uint64_t j) {
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
// How many elements rank p has in an allgatherv or reduce_scatterv case: a
// hash of p in [0, count], 0 for about one rank in five.
inline std::uint64_t share_count(const Case& c, int p) {
  const std::uint64_t h = mix(c.seed ^ (static_cast<std::uint64_t>(p + 1) * 0x94D049BB133111EBull));
  if (c.count == 0 || (h >> 20) % 5 == 0) return 0;
  return h % (c.count + 1);
}

inline int below(std::uint64_t bits, int n) {
  return static_cast<int>(((bits & 0xFFFFFFFFu) * static_cast<std::uint64_t>(n)) >> 32);
}

inline ReductionElement element(const Case& c, int n, std::uint64_t j) {
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
inline std::int64_t contribution(const Case& c, int n, int rank, const ReductionElement& e) {
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

inline std::int64_t reduced(const Case& c, int n, const ReductionElement& e) {
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

inline std::int64_t contribution(const Case& c, int n, int rank, std::uint64_t j) {
  return contribution(c, n, rank, element(c, n, j));
}
inline std::int64_t reduced(const Case& c, int n, std::uint64_t j) { return reduced(c, n, element(c, n, j)); }

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
inline bool g_registered = false;

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

inline int recv_misalign(const Case& c) { return (c.misalign * 3) % 8; }

template <typename T, typename Value>
void fill(unsigned char* buf, std::uint64_t n, Value value) {
  for (std::uint64_t i = 0; i < n; ++i) {
    const T x = encode<T>(value(i));
    std::memcpy(buf + i * sizeof(T), &x, sizeof(T));
  }
}


// Runs a case of a collective that reduces (allreduce, reduce_scatter,
// reduce) on this rank: cases_reducing.cpp.
WorkerReply run_reducing_case(WorkerContext& x, const Case& c);
// Runs a case of a collective that moves data (broadcast, allgather,
// gather, scatter, alltoall, send/recv) on this rank: cases_moving.cpp.
WorkerReply run_moving_case(WorkerContext& x, const Case& c);
// Runs one of the special cases (barrier, asynchronous calls, timeouts,
// split, many small calls) on this rank: cases_special.cpp.
WorkerReply run_special_case(WorkerContext& x, const Case& c);

// gtest prints the parameter of a failed case with this (found by ADL):
// test_collectives.cpp.
void PrintTo(const Case& c, std::ostream* os);

}  // namespace chorus_test
