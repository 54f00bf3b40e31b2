// Unit tests for the CPU reduction kernels (src/reduce).
//
// Every expected value is computed here from the definition of the format or
// the operation (ldexp, a search over all encodings, 64-bit modular integer
// arithmetic), never by calling the code under test. Buffers carry canary
// bytes on both sides, so a vector loop that writes past its tail fails.

#include "reduce/reduce.hpp"

#include <chorus/error.hpp>
#include <chorus/types.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iomanip>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace {

using chorus::DataType;
using chorus::ErrorCode;
using chorus::ReduceOp;
namespace reduce = chorus::reduce;
using Byte = unsigned char;

constexpr DataType kAllTypes[] = {
    DataType::Int8,   DataType::UInt8,   DataType::Int32,    DataType::UInt32,  DataType::Int64,
    DataType::UInt64, DataType::Float16, DataType::BFloat16, DataType::Float32, DataType::Float64,
};
constexpr ReduceOp kAllOps[] = {ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max,
                                ReduceOp::Avg};
// Empty, scalar-only, a partial vector, past one vector, many vectors, and
// several 256-element blocks plus a ragged tail.
constexpr std::size_t kLengths[] = {0, 1, 7, 33, 1000, 4099};

// ---------------------------------------------------------------------------
// The 16-bit float formats, described from scratch.

struct Format16 {
  int exp_bits;
  int mant_bits;

  std::uint16_t exp_mask() const {
    return static_cast<std::uint16_t>(((1u << exp_bits) - 1u) << mant_bits);
  }
  std::uint16_t mant_mask() const { return static_cast<std::uint16_t>((1u << mant_bits) - 1u); }
  int bias() const { return (1 << (exp_bits - 1)) - 1; }
  std::uint16_t max_finite() const {
    return static_cast<std::uint16_t>(exp_mask() - (1u << mant_bits) + mant_mask());
  }
  std::uint16_t inf() const { return exp_mask(); }
  std::uint16_t quiet_nan() const {
    return static_cast<std::uint16_t>(exp_mask() | (1u << (mant_bits - 1)));
  }
  bool is_nan(std::uint16_t b) const {
    return (b & exp_mask()) == exp_mask() && (b & mant_mask()) != 0;
  }
};

constexpr Format16 kHalfFormat{5, 10};
constexpr Format16 kBf16Format{8, 7};

// The value of an encoding, straight from the definition:
// 2^(e - bias) * 1.m for normal numbers, 2^(1 - bias) * 0.m for e == 0.
double decode(const Format16& f, std::uint16_t bits) {
  const bool negative = (bits & 0x8000u) != 0;
  const int e = (bits & f.exp_mask()) >> f.mant_bits;
  const int m = bits & f.mant_mask();
  double v;
  if (e == (1 << f.exp_bits) - 1)
    v = m != 0 ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (e == 0)
    v = std::ldexp(m, 1 - f.bias() - f.mant_bits);
  else
    v = std::ldexp(m + (1 << f.mant_bits), e - f.bias() - f.mant_bits);
  return negative ? -v : v;
}

// Values of the non-negative finite encodings 0..max_finite, which are ordered
// like their bit patterns.
const std::vector<double>& finite_values(const Format16& f) {
  static const auto build = [](const Format16& g) {
    std::vector<double> v;
    for (unsigned b = 0; b <= g.max_finite(); ++b) v.push_back(decode(g, static_cast<std::uint16_t>(b)));
    return v;
  };
  static const std::vector<double> half = build(kHalfFormat);
  static const std::vector<double> bf16 = build(kBf16Format);
  return f.exp_bits == kHalfFormat.exp_bits ? half : bf16;
}

// The encoding nearest to x: ties to the even encoding, overflow (at or past
// the midpoint between the largest finite value and the next power of two) to
// infinity. All differences below are exact in double for the inputs we use.
std::uint16_t encode_nearest(const Format16& f, double x) {
  if (std::isnan(x)) return f.quiet_nan();
  const auto sign = static_cast<std::uint16_t>(std::signbit(x) ? 0x8000u : 0u);
  const double d = std::fabs(x);
  const std::vector<double>& values = finite_values(f);
  const std::size_t top = values.size() - 1;
  const double overflow = values[top] + (values[top] - values[top - 1]) / 2;
  if (d >= overflow) return static_cast<std::uint16_t>(sign | f.inf());
  // Largest encoding whose value is <= d.
  const std::size_t lo =
      static_cast<std::size_t>(std::upper_bound(values.begin(), values.end(), d) - values.begin()) - 1;
  std::size_t pick = lo;
  if (lo < top && values[lo] != d) {
    const double below = d - values[lo];
    const double above = values[lo + 1] - d;
    if (above < below || (above == below && (lo & 1u) != 0)) pick = lo + 1;
  }
  return static_cast<std::uint16_t>(sign | pick);
}

// ---------------------------------------------------------------------------
// Typed element helpers. The 16-bit float types get their own storage structs
// so that overloads and templates can tell them apart from uint16_t.

struct Half {
  std::uint16_t bits;
};
struct BFloat16 {
  std::uint16_t bits;
};

template <class T>
constexpr bool kIs16 = std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>;

template <class T>
const Format16& format_of() {
  return std::is_same_v<T, Half> ? kHalfFormat : kBf16Format;
}

// Calls f(T{}) with T the storage type of `t`.
template <class F>
void with_type(DataType t, F&& f) {
  switch (t) {
    case DataType::Int8: return f(std::int8_t{});
    case DataType::UInt8: return f(std::uint8_t{});
    case DataType::Int32: return f(std::int32_t{});
    case DataType::UInt32: return f(std::uint32_t{});
    case DataType::Int64: return f(std::int64_t{});
    case DataType::UInt64: return f(std::uint64_t{});
    case DataType::Float16: return f(Half{});
    case DataType::BFloat16: return f(BFloat16{});
    case DataType::Float32: return f(float{});
    case DataType::Float64: return f(double{});
  }
  FAIL() << "unknown dtype " << static_cast<int>(t);
}

template <class T>
bool is_nan_value(T v) {
  if constexpr (std::is_integral_v<T>)
    return false;
  else if constexpr (std::is_floating_point_v<T>)
    return std::isnan(v);
  else
    return format_of<T>().is_nan(v.bits);
}

template <class T>
double as_double(T v) {
  if constexpr (kIs16<T>)
    return decode(format_of<T>(), v.bits);
  else
    return static_cast<double>(v);
}

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// memcmp with an empty vector's null data() is UB, hence the guard.
bool same_bytes(const void* a, const void* b, std::size_t n) {
  return n == 0 || std::memcmp(a, b, n) == 0;
}

template <class T>
std::string show(T v) {
  std::ostringstream os;
  if constexpr (std::is_integral_v<T>) {
    os << +v;
  } else if constexpr (std::is_floating_point_v<T>) {
    os << std::hexfloat << v << std::defaultfloat << " (" << v << ")";
  } else {
    os << "0x" << std::hex << std::setw(4) << std::setfill('0') << v.bits << std::dec << " ("
       << as_double(v) << ")";
  }
  return os.str();
}

// Random values. Integers: all bits random (so sums and products wrap). Floats:
// half the time any non-NaN pattern (infinities, subnormals, huge), half the
// time exponents within a narrow band so that sums really mix their operands.
template <class T>
T random_value(std::mt19937_64& rng) {
  if constexpr (std::is_integral_v<T>) {
    return static_cast<T>(rng());
  } else if constexpr (std::is_same_v<T, float>) {
    for (;;) {
      auto bits = static_cast<std::uint32_t>(rng());
      if (rng() & 1u) bits = (bits & 0x807fffffu) | static_cast<std::uint32_t>((120 + rng() % 16) << 23);
      const float v = std::bit_cast<float>(bits);
      if (!std::isnan(v)) return v;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    for (;;) {
      std::uint64_t bits = rng();
      if (rng() & 1u) bits = (bits & 0x800fffffffffffffull) | ((1016 + rng() % 16) << 52);
      const double v = std::bit_cast<double>(bits);
      if (!std::isnan(v)) return v;
    }
  } else {
    const Format16& f = format_of<T>();
    for (;;) {
      auto bits = static_cast<std::uint16_t>(rng());
      if (rng() & 1u)
        bits = static_cast<std::uint16_t>((bits & ~f.exp_mask()) |
                                          ((f.bias() - 8 + rng() % 16) << f.mant_bits));
      if (!f.is_nan(bits)) return T{bits};
    }
  }
}

// a (op) b by the book. Integers wrap modulo 2^64 and then to the width of T.
template <class T>
T reference(ReduceOp op, T a, T b) {
  if constexpr (std::is_integral_v<T>) {
    const auto ua = static_cast<std::uint64_t>(a);
    const auto ub = static_cast<std::uint64_t>(b);
    switch (op) {
      case ReduceOp::Sum:
      case ReduceOp::Avg: return static_cast<T>(ua + ub);
      case ReduceOp::Prod: return static_cast<T>(ua * ub);
      case ReduceOp::Min: return std::min(a, b);
      case ReduceOp::Max: return std::max(a, b);
    }
  } else if constexpr (std::is_floating_point_v<T>) {
    switch (op) {
      case ReduceOp::Sum:
      case ReduceOp::Avg: return a + b;
      case ReduceOp::Prod: return a * b;
      case ReduceOp::Min: return std::min(a, b);
      case ReduceOp::Max: return std::max(a, b);
    }
  } else {
    // Exact (or, for huge bf16 exponent gaps, double-rounded with 53 >= 2*8+2
    // bits, which is innocuous) in double, then rounded once to the format.
    const Format16& f = format_of<T>();
    const double x = decode(f, a.bits);
    const double y = decode(f, b.bits);
    switch (op) {
      case ReduceOp::Sum:
      case ReduceOp::Avg: return T{encode_nearest(f, x + y)};
      case ReduceOp::Prod: return T{encode_nearest(f, x * y)};
      case ReduceOp::Min: return y < x ? b : a;
      case ReduceOp::Max: return x < y ? b : a;
    }
  }
  return T{};
}

// NaN matches any NaN; min/max may return either zero for (+0, -0), so they
// compare by value; everything else must match bit for bit.
template <class T>
bool matches(ReduceOp op, T got, T want) {
  if constexpr (std::is_integral_v<T>) {
    return got == want;
  } else {
    if (is_nan_value(want)) return is_nan_value(got);
    if (op == ReduceOp::Min || op == ReduceOp::Max) return as_double(got) == as_double(want);
    return same_bits(got, want);
  }
}

// A buffer of `bytes` at `offset` bytes into storage with canaries around it.
class Region {
 public:
  static constexpr Byte kCanary = 0xa5;
  static constexpr std::size_t kGuard = 64;

  Region(std::size_t offset, std::size_t bytes)
      : storage_(offset + bytes + kGuard, kCanary), offset_(offset), bytes_(bytes) {}

  Byte* data() { return storage_.data() + offset_; }

  template <class T>
  void put(const std::vector<T>& v) {
    ASSERT_EQ(v.size() * sizeof(T), bytes_);
    if (!v.empty()) std::memcpy(data(), v.data(), bytes_);
  }
  template <class T>
  std::vector<T> get() {
    std::vector<T> v(bytes_ / sizeof(T));
    if (!v.empty()) std::memcpy(v.data(), data(), bytes_);
    return v;
  }
  bool guards_intact() const {
    for (std::size_t i = 0; i < storage_.size(); ++i)
      if ((i < offset_ || i >= offset_ + bytes_) && storage_[i] != kCanary) return false;
    return true;
  }

 private:
  std::vector<Byte> storage_;
  std::size_t offset_;
  std::size_t bytes_;
};

template <class T>
void expect_elements(ReduceOp op, const std::vector<T>& got, const std::vector<T>& want,
                     const std::vector<T>& a, const std::vector<T>& b) {
  ASSERT_EQ(got.size(), want.size());
  std::size_t bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (matches(op, got[i], want[i])) continue;
    if (++bad <= 5)
      ADD_FAILURE() << "element " << i << ": " << show(a[i]) << " " << chorus::to_string(op) << " "
                    << show(b[i]) << " gave " << show(got[i]) << ", expected " << show(want[i]);
  }
  EXPECT_EQ(bad, 0u) << "mismatching elements";
}

template <class T>
std::vector<T> random_vector(std::mt19937_64& rng, std::size_t n) {
  std::vector<T> v(n);
  for (auto& x : v) x = random_value<T>(rng);
  return v;
}

template <class T>
std::vector<T> reference_vector(ReduceOp op, const std::vector<T>& a, const std::vector<T>& b) {
  std::vector<T> r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = reference(op, a[i], b[i]);
  return r;
}

std::string trace(std::size_t len, std::size_t off1, std::size_t off2) {
  return "len=" + std::to_string(len) + " offsets(bytes)=" + std::to_string(off1) + "," +
         std::to_string(off2);
}

// Byte offsets: aligned, one element in, and misaligned for every type wider
// than a byte.
template <class T>
std::vector<std::size_t> offsets() {
  return {0, sizeof(T), 3};
}

// ---------------------------------------------------------------------------
// Every (dtype, op).

using Param = std::tuple<DataType, ReduceOp>;

class ReduceKernel : public ::testing::TestWithParam<Param> {
 protected:
  DataType dtype() const { return std::get<0>(GetParam()); }
  ReduceOp op() const { return std::get<1>(GetParam()); }
  std::mt19937_64 rng_{0x5eed0000u + 16u * static_cast<unsigned>(std::get<0>(GetParam())) +
                       static_cast<unsigned>(std::get<1>(GetParam()))};
};

TEST_P(ReduceKernel, CombineMatchesReference) {
  with_type(dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (std::size_t len : kLengths) {
      for (std::size_t dst_off : offsets<T>()) {
        for (std::size_t src_off : offsets<T>()) {
          SCOPED_TRACE(trace(len, dst_off, src_off));
          const auto x = random_vector<T>(rng_, len);
          const auto y = random_vector<T>(rng_, len);
          Region dst(dst_off, len * sizeof(T));
          Region src(src_off, len * sizeof(T));
          dst.put(x);
          src.put(y);
          reduce::combine(dst.data(), src.data(), len, dtype(), op());
          expect_elements(op(), dst.get<T>(), reference_vector(op(), x, y), x, y);
          EXPECT_TRUE(dst.guards_intact()) << "wrote outside dst";
          EXPECT_TRUE(src.guards_intact()) << "wrote outside src";
          EXPECT_TRUE(same_bytes(src.data(), y.data(), len * sizeof(T))) << "src modified";
        }
      }
    }
  });
}

TEST_P(ReduceKernel, CombineInPlace) {
  with_type(dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (std::size_t len : kLengths) {
      SCOPED_TRACE(trace(len, 3, 3));
      const auto x = random_vector<T>(rng_, len);
      Region buf(3, len * sizeof(T));
      buf.put(x);
      reduce::combine(buf.data(), buf.data(), len, dtype(), op());
      expect_elements(op(), buf.get<T>(), reference_vector(op(), x, x), x, x);
      EXPECT_TRUE(buf.guards_intact());
    }
  });
}

enum class Alias { None, DstIsA, DstIsB, DstIsAIsB, AIsB };

TEST_P(ReduceKernel, Combine3WithEveryAliasing) {
  with_type(dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (std::size_t len : kLengths) {
      for (Alias alias : {Alias::None, Alias::DstIsA, Alias::DstIsB, Alias::DstIsAIsB, Alias::AIsB}) {
        SCOPED_TRACE(trace(len, sizeof(T), 1) + " alias=" + std::to_string(static_cast<int>(alias)));
        const auto x = random_vector<T>(rng_, len);
        const auto y = (alias == Alias::DstIsAIsB || alias == Alias::AIsB) ? x : random_vector<T>(rng_, len);
        const std::size_t bytes = len * sizeof(T);
        Region r0(sizeof(T), bytes), r1(1, bytes), r2(0, bytes);
        Byte* dst = r0.data();
        Byte* a = r1.data();
        Byte* b = r2.data();
        r1.put(x);
        r2.put(y);
        switch (alias) {
          case Alias::None: break;
          case Alias::DstIsA: r0.put(x); a = dst; break;
          case Alias::DstIsB: r0.put(y); b = dst; break;
          case Alias::DstIsAIsB: r0.put(x); a = b = dst; break;
          case Alias::AIsB: b = a; break;
        }
        reduce::combine3(dst, a, b, len, dtype(), op());
        expect_elements(op(), r0.get<T>(), reference_vector(op(), x, y), x, y);
        EXPECT_TRUE(r0.guards_intact());
        if (alias == Alias::None) {
          EXPECT_TRUE(same_bytes(r1.data(), x.data(), bytes)) << "a modified";
          EXPECT_TRUE(same_bytes(r2.data(), y.data(), bytes)) << "b modified";
        }
      }
    }
  });
}

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  return std::string(chorus::to_string(std::get<0>(info.param))) + "_" +
         std::string(chorus::to_string(std::get<1>(info.param)));
}

INSTANTIATE_TEST_SUITE_P(AllTypesAndOps, ReduceKernel,
                         ::testing::Combine(::testing::ValuesIn(kAllTypes), ::testing::ValuesIn(kAllOps)),
                         param_name);

// ---------------------------------------------------------------------------
// Integer semantics, spelled out.

template <class T>
std::vector<T> combined(std::vector<T> a, const std::vector<T>& b, DataType t, ReduceOp op) {
  reduce::combine(a.data(), b.data(), a.size(), t, op);
  return a;
}

TEST(ReduceIntegers, SumAndProdWrapAround) {
  using L8 = std::numeric_limits<std::int8_t>;
  using L32 = std::numeric_limits<std::int32_t>;
  using L64 = std::numeric_limits<std::int64_t>;
  EXPECT_EQ(combined<std::int8_t>({L8::max(), L8::min(), -1}, {1, -1, -128}, DataType::Int8, ReduceOp::Sum),
            (std::vector<std::int8_t>{L8::min(), L8::max(), 127}));
  EXPECT_EQ(combined<std::uint8_t>({255, 200}, {1, 100}, DataType::UInt8, ReduceOp::Sum),
            (std::vector<std::uint8_t>{0, 44}));
  EXPECT_EQ(combined<std::int8_t>({16, -128, 127}, {16, -1, 127}, DataType::Int8, ReduceOp::Prod),
            (std::vector<std::int8_t>{0, -128, 1}));
  EXPECT_EQ(combined<std::uint8_t>({16, 255}, {17, 255}, DataType::UInt8, ReduceOp::Prod),
            (std::vector<std::uint8_t>{16, 1}));
  EXPECT_EQ(combined<std::int32_t>({L32::max(), L32::min()}, {1, -1}, DataType::Int32, ReduceOp::Sum),
            (std::vector<std::int32_t>{L32::min(), L32::max()}));
  EXPECT_EQ(combined<std::int32_t>({65536, L32::min()}, {65536, -1}, DataType::Int32, ReduceOp::Prod),
            (std::vector<std::int32_t>{0, L32::min()}));
  EXPECT_EQ(combined<std::uint32_t>({0xffffffffu}, {0xffffffffu}, DataType::UInt32, ReduceOp::Prod),
            (std::vector<std::uint32_t>{1u}));
  EXPECT_EQ(combined<std::int64_t>({L64::max(), L64::min()}, {1, -1}, DataType::Int64, ReduceOp::Sum),
            (std::vector<std::int64_t>{L64::min(), L64::max()}));
  EXPECT_EQ(combined<std::int64_t>({L64::min(), std::int64_t{1} << 32}, {-1, std::int64_t{1} << 32},
                                   DataType::Int64, ReduceOp::Prod),
            (std::vector<std::int64_t>{L64::min(), 0}));
  EXPECT_EQ(combined<std::uint64_t>({~0ull, ~0ull}, {~0ull, 2}, DataType::UInt64, ReduceOp::Prod),
            (std::vector<std::uint64_t>{1, ~0ull - 1}));
}

TEST(ReduceIntegers, MinMaxWithNegatives) {
  EXPECT_EQ(combined<std::int8_t>({-128, 5, -3}, {127, -5, -4}, DataType::Int8, ReduceOp::Min),
            (std::vector<std::int8_t>{-128, -5, -4}));
  EXPECT_EQ(combined<std::int8_t>({-128, 5, -3}, {127, -5, -4}, DataType::Int8, ReduceOp::Max),
            (std::vector<std::int8_t>{127, 5, -3}));
  EXPECT_EQ(combined<std::int32_t>({-7, 0, -2147483647 - 1}, {3, -1, 2147483647}, DataType::Int32,
                                   ReduceOp::Min),
            (std::vector<std::int32_t>{-7, -1, -2147483647 - 1}));
  EXPECT_EQ(combined<std::int64_t>({-7, 0}, {3, -1}, DataType::Int64, ReduceOp::Max),
            (std::vector<std::int64_t>{3, 0}));
  // The same bit patterns order differently when unsigned.
  EXPECT_EQ(combined<std::uint8_t>({0x80, 0x01}, {0x7f, 0xff}, DataType::UInt8, ReduceOp::Min),
            (std::vector<std::uint8_t>{0x7f, 0x01}));
  EXPECT_EQ(combined<std::uint64_t>({1ull << 63}, {1}, DataType::UInt64, ReduceOp::Max),
            (std::vector<std::uint64_t>{1ull << 63}));
  EXPECT_EQ(combined<double>({-0.5, -1e300}, {-0.25, 1e300}, DataType::Float64, ReduceOp::Min),
            (std::vector<double>{-0.5, -1e300}));
  EXPECT_EQ(combined<float>({-0.5f, -3.0f}, {-0.25f, -2.0f}, DataType::Float32, ReduceOp::Max),
            (std::vector<float>{-0.25f, -2.0f}));
}

// ---------------------------------------------------------------------------
// fill_identity: x (op) identity must be x, for every type and op, on fresh
// random inputs (the reference is x itself); and the identities spelled
// out from each format's definition.

TEST(FillIdentity, LeavesEveryValueAsItIs) {
  std::mt19937_64 rng(7);
  for (DataType t : kAllTypes) {
    for (ReduceOp op : kAllOps) {
      SCOPED_TRACE(std::string(chorus::to_string(t)) + " " + std::string(chorus::to_string(op)));
      with_type(t, [&](auto tag) {
        using T = decltype(tag);
        const std::size_t len = 1000;
        Region id(0, len * sizeof(T));
        reduce::fill_identity(id.data(), len, t, op);
        EXPECT_TRUE(id.guards_intact());
        const auto x = random_vector<T>(rng, len);
        std::vector<T> got = x;
        const std::vector<T> identity = id.get<T>();
        reduce::combine(got.data(), identity.data(), len, t, op);
        std::size_t bad = 0;
        for (std::size_t i = 0; i < len; ++i) {
          const bool same =
              is_nan_value(x[i]) ? is_nan_value(got[i]) : as_double(got[i]) == as_double(x[i]);
          if (!same && ++bad <= 3)
            ADD_FAILURE() << show(x[i]) << " with the identity " << show(identity[i]) << " gave "
                          << show(got[i]);
        }
        EXPECT_EQ(bad, 0u);
      });
    }
  }
}

TEST(FillIdentity, TheIdentitiesOfEachFormat) {
  auto one = [](DataType t, ReduceOp op, auto want) {
    using T = decltype(want);
    T got{};
    reduce::fill_identity(&got, 1, t, op);
    EXPECT_TRUE(same_bits(got, want)) << chorus::to_string(t) << " " << chorus::to_string(op);
  };
  const double inf = std::numeric_limits<double>::infinity();
  one(DataType::Int8, ReduceOp::Min, std::int8_t{127});
  one(DataType::Int8, ReduceOp::Max, std::int8_t{-128});
  one(DataType::UInt8, ReduceOp::Min, std::uint8_t{255});
  one(DataType::UInt8, ReduceOp::Max, std::uint8_t{0});
  one(DataType::Int32, ReduceOp::Prod, std::int32_t{1});
  one(DataType::UInt32, ReduceOp::Min, std::uint32_t{0xffffffffu});
  one(DataType::Int64, ReduceOp::Max, std::int64_t{-9223372036854775807LL - 1});
  one(DataType::UInt64, ReduceOp::Avg, std::uint64_t{0});
  one(DataType::Float32, ReduceOp::Min, static_cast<float>(inf));
  one(DataType::Float64, ReduceOp::Max, -inf);
  one(DataType::Float64, ReduceOp::Sum, 0.0);
  // fp16: 1 sign, 5 exponent, 10 mantissa bits; bf16: 1, 8, 7.
  one(DataType::Float16, ReduceOp::Min, Half{0x7c00});
  one(DataType::Float16, ReduceOp::Max, Half{0xfc00});
  one(DataType::Float16, ReduceOp::Prod, Half{0x3c00});
  one(DataType::BFloat16, ReduceOp::Min, BFloat16{0x7f80});
  one(DataType::BFloat16, ReduceOp::Max, BFloat16{0xff80});
  one(DataType::BFloat16, ReduceOp::Prod, BFloat16{0x3f80});
  float x = 0;
  EXPECT_THROW(reduce::fill_identity(&x, 1, static_cast<DataType>(42), ReduceOp::Sum),
               chorus::Error);
  EXPECT_THROW(reduce::fill_identity(&x, 1, DataType::Float32, static_cast<ReduceOp>(9)),
               chorus::Error);
  EXPECT_THROW(reduce::fill_identity(nullptr, 1, DataType::Float32, ReduceOp::Sum), chorus::Error);
}

// ---------------------------------------------------------------------------
// finalize_avg.

template <class T>
std::vector<T> averaged(std::vector<T> v, DataType t, int divisor) {
  reduce::finalize_avg(v.data(), v.size(), t, divisor);
  return v;
}

TEST(FinalizeAvg, IntegersTruncateTowardZero) {
  EXPECT_EQ(averaged<std::int8_t>({-128, -7, -1, 0, 1, 7, 127}, DataType::Int8, 3),
            (std::vector<std::int8_t>{-42, -2, 0, 0, 0, 2, 42}));
  EXPECT_EQ(averaged<std::int8_t>({-128, -7, -1, 127}, DataType::Int8, 2),
            (std::vector<std::int8_t>{-64, -3, 0, 63}));
  // A divisor wider than the element type.
  EXPECT_EQ(averaged<std::int8_t>({-128, 127}, DataType::Int8, 200), (std::vector<std::int8_t>{0, 0}));
  EXPECT_EQ(averaged<std::uint8_t>({255, 254, 3}, DataType::UInt8, 2),
            (std::vector<std::uint8_t>{127, 127, 1}));
  EXPECT_EQ(averaged<std::int32_t>({-2147483647 - 1, -7, 7, 2147483647}, DataType::Int32, 2),
            (std::vector<std::int32_t>{-1073741824, -3, 3, 1073741823}));
  EXPECT_EQ(averaged<std::uint32_t>({0xffffffffu}, DataType::UInt32, 3),
            (std::vector<std::uint32_t>{1431655765u}));
  EXPECT_EQ(averaged<std::int64_t>({std::numeric_limits<std::int64_t>::min(), -7}, DataType::Int64, 3),
            (std::vector<std::int64_t>{-3074457345618258602, -2}));
  EXPECT_EQ(averaged<std::uint64_t>({~0ull, ~0ull}, DataType::UInt64, 7),
            (std::vector<std::uint64_t>{2635249153387078802ull, 2635249153387078802ull}));
}

// q = a / d truncated toward zero, computed on magnitudes in unsigned 64-bit.
template <class T>
T truncating_div(T a, int d) {
  const auto ud = static_cast<std::uint64_t>(d);
  if constexpr (std::is_signed_v<T>) {
    if (a < 0) return static_cast<T>(0 - ((0 - static_cast<std::uint64_t>(a)) / ud));
  }
  return static_cast<T>(static_cast<std::uint64_t>(a) / ud);
}

template <class T>
T reference_avg(T a, int d) {
  if constexpr (std::is_integral_v<T>)
    return truncating_div(a, d);
  else if constexpr (std::is_floating_point_v<T>)
    return a / static_cast<T>(d);
  else  // double rounding via double is innocuous here (53 >= 2*11+2)
    return T{encode_nearest(format_of<T>(), decode(format_of<T>(), a.bits) / d)};
}

TEST(FinalizeAvg, EveryTypeMatchesReference) {
  std::mt19937_64 rng(42);
  for (DataType t : kAllTypes) {
    SCOPED_TRACE(std::string(chorus::to_string(t)));
    with_type(t, [&](auto tag) {
      using T = decltype(tag);
      for (int divisor : {1, 2, 3, 7, 8}) {
        for (std::size_t len : kLengths) {
          SCOPED_TRACE(trace(len, 1, 0) + " divisor=" + std::to_string(divisor));
          const auto x = random_vector<T>(rng, len);
          std::vector<T> want(len);
          for (std::size_t i = 0; i < len; ++i) want[i] = reference_avg(x[i], divisor);
          Region buf(1, len * sizeof(T));
          buf.put(x);
          reduce::finalize_avg(buf.data(), len, t, divisor);
          expect_elements(ReduceOp::Avg, buf.get<T>(), want, x, std::vector<T>(len));
          EXPECT_TRUE(buf.guards_intact());
        }
      }
    });
  }
}

// Every 16-bit pattern, so that the rare quotients next to a rounding midpoint
// are covered.
template <class T>
void expect_avg_on_every_pattern(DataType t) {
  std::vector<T> all(65536);
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = T{static_cast<std::uint16_t>(i)};
  for (int divisor : {3, 5, 6, 7, 11, 100, 2047}) {
    SCOPED_TRACE(std::string(chorus::to_string(t)) + " divisor=" + std::to_string(divisor));
    std::vector<T> want(all.size());
    for (std::size_t i = 0; i < all.size(); ++i) want[i] = reference_avg(all[i], divisor);
    std::vector<T> got = all;
    reduce::finalize_avg(got.data(), got.size(), t, divisor);
    expect_elements(ReduceOp::Avg, got, want, all, std::vector<T>(all.size()));
  }
}

TEST(FinalizeAvg, Fp16AndBf16EveryPattern) {
  expect_avg_on_every_pattern<Half>(DataType::Float16);
  expect_avg_on_every_pattern<BFloat16>(DataType::BFloat16);
}

TEST(FinalizeAvg, AvgOfThreeRanks) {
  // What an allreduce(Avg) over three ranks does: combine as Sum, divide once.
  std::vector<float> acc{1, 2, 3};
  const std::vector<float> r1{4, 5, 6}, r2{7, 8, 9};
  reduce::combine(acc.data(), r1.data(), 3, DataType::Float32, ReduceOp::Avg);
  reduce::combine(acc.data(), r2.data(), 3, DataType::Float32, ReduceOp::Avg);
  reduce::finalize_avg(acc.data(), 3, DataType::Float32, 3);
  EXPECT_EQ(acc, (std::vector<float>{4, 5, 6}));

  std::vector<std::int32_t> iacc{-3, 3, -1};
  const std::vector<std::int32_t> i1{-4, 4, 0};
  reduce::combine(iacc.data(), i1.data(), 3, DataType::Int32, ReduceOp::Avg);
  reduce::finalize_avg(iacc.data(), 3, DataType::Int32, 2);
  EXPECT_EQ(iacc, (std::vector<std::int32_t>{-3, 3, 0}));
}

TEST(FinalizeAvg, RejectsNonPositiveDivisor) {
  float x = 1;
  for (int bad : {0, -1}) {
    try {
      reduce::finalize_avg(&x, 1, DataType::Float32, bad);
      ADD_FAILURE() << "divisor " << bad << " accepted";
    } catch (const chorus::Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::InvalidArgument);
    }
  }
  EXPECT_EQ(x, 1.0f);
}

// ---------------------------------------------------------------------------
// Invalid arguments.

void expect_invalid_argument(const std::function<void()>& f, const std::string& what) {
  try {
    f();
    ADD_FAILURE() << what << ": no exception";
  } catch (const chorus::Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::InvalidArgument) << what << ": " << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": threw a non-chorus exception: " << e.what();
  }
}

TEST(ReduceErrors, InvalidDtypeOrOpThrowsInvalidArgument) {
  float a[4] = {1, 2, 3, 4}, b[4] = {1, 2, 3, 4};
  const auto bad_t = static_cast<DataType>(77);
  const auto bad_op = static_cast<ReduceOp>(9);
  expect_invalid_argument([&] { reduce::combine(a, b, 4, bad_t, ReduceOp::Sum); }, "combine dtype");
  expect_invalid_argument([&] { reduce::combine(a, b, 4, DataType::Float32, bad_op); }, "combine op");
  expect_invalid_argument([&] { reduce::combine(a, b, 0, bad_t, ReduceOp::Sum); }, "combine dtype, count 0");
  expect_invalid_argument([&] { reduce::combine3(a, a, b, 4, bad_t, ReduceOp::Max); }, "combine3 dtype");
  expect_invalid_argument([&] { reduce::combine3(a, a, b, 4, DataType::Int8, bad_op); }, "combine3 op");
  expect_invalid_argument([&] { reduce::finalize_avg(a, 4, bad_t, 2); }, "finalize_avg dtype");
  expect_invalid_argument([&] { reduce::combine(nullptr, b, 4, DataType::Float32, ReduceOp::Sum); },
                          "combine null dst");
  expect_invalid_argument([&] { reduce::combine3(a, a, nullptr, 4, DataType::Float32, ReduceOp::Sum); },
                          "combine3 null b");
  EXPECT_EQ(a[0], 1.0f) << "a failed call must not touch the buffer";
}

TEST(ReduceErrors, CountZeroAcceptsNullBuffers) {
  EXPECT_NO_THROW(reduce::combine(nullptr, nullptr, 0, DataType::Float64, ReduceOp::Prod));
  EXPECT_NO_THROW(reduce::combine3(nullptr, nullptr, nullptr, 0, DataType::Int8, ReduceOp::Min));
  EXPECT_NO_THROW(reduce::finalize_avg(nullptr, 0, DataType::BFloat16, 4));
}

// ---------------------------------------------------------------------------
// Float edge cases shared by all four float types.

TEST(ReduceFloats, NanPropagatesThroughSumAndProd) {
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Prod}) {
    std::vector<float> f{qnan, 1.0f, std::numeric_limits<float>::infinity()};
    const std::vector<float> g{1.0f, qnan, op == ReduceOp::Sum ? -std::numeric_limits<float>::infinity() : 0.0f};
    reduce::combine(f.data(), g.data(), 3, DataType::Float32, op);
    for (float v : f) EXPECT_TRUE(std::isnan(v)) << chorus::to_string(op);

    // 0x7e00 is a half NaN, 0x7fc0 a bfloat16 NaN.
    for (auto [t, nan] : {std::pair{DataType::Float16, std::uint16_t{0x7e00}},
                          std::pair{DataType::BFloat16, std::uint16_t{0x7fc0}}}) {
      const Format16& fmt = t == DataType::Float16 ? kHalfFormat : kBf16Format;
      std::vector<std::uint16_t> h{nan, encode_nearest(fmt, 1.0), fmt.inf()};
      const std::vector<std::uint16_t> k{encode_nearest(fmt, 1.0), nan,
                                         op == ReduceOp::Sum ? static_cast<std::uint16_t>(0x8000u | fmt.inf())
                                                             : std::uint16_t{0}};
      reduce::combine(h.data(), k.data(), 3, t, op);
      for (std::uint16_t v : h) EXPECT_TRUE(fmt.is_nan(v)) << chorus::to_string(t) << " 0x" << std::hex << v;
    }
  }
}

// With signed zeros and NaNs min/max are not symmetric; whichever answer the
// kernels give, every aliasing path must give the same one (ranks that reach
// the same data through different paths must agree bit for bit).
TEST(ReduceFloats, MinMaxOperandOrderIsTheSameOnEveryPath) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> a{-0.0f, 0.0f, nan, 1.0f, nan, -0.0f, 2.0f, -2.0f, 0.0f};
  const std::vector<float> b{0.0f, -0.0f, 1.0f, nan, -nan, -0.0f, -2.0f, 2.0f, 0.0f};
  const std::size_t n = a.size();
  for (ReduceOp op : {ReduceOp::Min, ReduceOp::Max}) {
    std::vector<float> out(n);
    reduce::combine3(out.data(), a.data(), b.data(), n, DataType::Float32, op);
    std::vector<float> via_a = a;
    reduce::combine(via_a.data(), b.data(), n, DataType::Float32, op);
    std::vector<float> via_b = b;
    reduce::combine3(via_b.data(), a.data(), via_b.data(), n, DataType::Float32, op);
    EXPECT_EQ(0, std::memcmp(out.data(), via_a.data(), n * sizeof(float))) << chorus::to_string(op);
    EXPECT_EQ(0, std::memcmp(out.data(), via_b.data(), n * sizeof(float))) << chorus::to_string(op);
    // And it is one of the operands, numerically.
    for (std::size_t i = 0; i < n; ++i) {
      if (std::isnan(a[i]) || std::isnan(b[i])) continue;
      EXPECT_EQ(out[i], op == ReduceOp::Min ? std::min(a[i], b[i]) : std::max(a[i], b[i]));
    }
  }
}

TEST(ReduceFloats, Fp16AndBf16SumsThatAreExact) {
  // Multiples of 1/4 up to 75 need at most 9 significant bits: exact in half.
  std::vector<std::uint16_t> h, k;
  std::vector<double> want;
  for (int i = -100; i <= 100; ++i) {
    for (int j : {-100, -37, -1, 0, 3, 64, 99}) {
      h.push_back(encode_nearest(kHalfFormat, i * 0.5));
      k.push_back(encode_nearest(kHalfFormat, j * 0.25));
      want.push_back(i * 0.5 + j * 0.25);
    }
  }
  // Subnormals: 2^-24 + 2^-24 = 2^-23, and 1023 * 2^-24 + 2^-24 = 2^-14 (the smallest normal).
  h.insert(h.end(), {0x0001, 0x03ff});
  k.insert(k.end(), {0x0001, 0x0001});
  want.insert(want.end(), {std::ldexp(1.0, -23), std::ldexp(1.0, -14)});
  reduce::combine(h.data(), k.data(), h.size(), DataType::Float16, ReduceOp::Sum);
  for (std::size_t i = 0; i < h.size(); ++i) EXPECT_EQ(decode(kHalfFormat, h[i]), want[i]) << i;

  // bfloat16 has 8 significant bits: multiples of 1/2 up to 90.5 fit.
  std::vector<std::uint16_t> p, q;
  want.clear();
  for (int i = -60; i <= 60; ++i) {
    for (int j : {-60, -7, 0, 1, 59}) {
      p.push_back(encode_nearest(kBf16Format, i));
      q.push_back(encode_nearest(kBf16Format, j * 0.5));
      want.push_back(i + j * 0.5);
    }
  }
  reduce::combine(p.data(), q.data(), p.size(), DataType::BFloat16, ReduceOp::Sum);
  for (std::size_t i = 0; i < p.size(); ++i) EXPECT_EQ(decode(kBf16Format, p[i]), want[i]) << i;
}

// The block kernels may convert fp16 with F16C, the scalar functions never do:
// x + (-0) is x for every non-NaN x, and NaNs must come out as the scalar
// round trip makes them, so that mixed hardware still agrees bit for bit.
TEST(ReduceFloats, BlockConversionsMatchScalarOnEveryPattern) {
  for (DataType t : {DataType::Float16, DataType::BFloat16}) {
    const Format16& fmt = t == DataType::Float16 ? kHalfFormat : kBf16Format;
    const auto to_float = t == DataType::Float16 ? reduce::half_to_float : reduce::bfloat16_to_float;
    const auto from_float = t == DataType::Float16 ? reduce::float_to_half : reduce::float_to_bfloat16;
    std::vector<std::uint16_t> all(65536);
    for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint16_t>(i);
    const std::vector<std::uint16_t> minus_zero(all.size(), 0x8000);
    std::vector<std::uint16_t> whole = all;
    reduce::combine(whole.data(), minus_zero.data(), whole.size(), t, ReduceOp::Sum);
    std::vector<std::uint16_t> one_by_one = all;  // every element on the tail path
    for (std::size_t i = 0; i < all.size(); ++i)
      reduce::combine(&one_by_one[i], &minus_zero[i], 1, t, ReduceOp::Sum);
    int bad = 0;
    for (std::size_t i = 0; i < all.size() && bad < 5; ++i) {
      const std::uint16_t want =
          fmt.is_nan(all[i]) ? from_float(to_float(all[i]) + -0.0f) : all[i];
      if (whole[i] != want || one_by_one[i] != want) {
        ++bad;
        ADD_FAILURE() << chorus::to_string(t) << " 0x" << std::hex << all[i] << " + -0 gave 0x"
                      << whole[i] << " (block) / 0x" << one_by_one[i] << " (single), want 0x" << want;
      }
    }
    EXPECT_EQ(bad, 0);
  }
}

// ---------------------------------------------------------------------------
// Scalar conversions.

TEST(Conversions, HalfKnownValues) {
  EXPECT_EQ(reduce::float_to_half(1.0f), 0x3c00);
  EXPECT_EQ(reduce::float_to_half(-2.0f), 0xc000);
  EXPECT_EQ(reduce::float_to_half(0.1f), 0x2e66);
  EXPECT_EQ(reduce::float_to_half(65504.0f), 0x7bff);
  EXPECT_EQ(reduce::float_to_half(65519.996f), 0x7bff);
  EXPECT_EQ(reduce::float_to_half(65520.0f), 0x7c00);  // the midpoint to 2^16 rounds to infinity
  EXPECT_EQ(reduce::float_to_half(-1e10f), 0xfc00);
  EXPECT_EQ(reduce::float_to_half(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(reduce::float_to_half(std::ldexp(1.0f, -25)), 0x0000);  // tie, to even (zero)
  EXPECT_EQ(reduce::float_to_half(std::ldexp(3.0f, -25)), 0x0002);  // tie, to even (2)
  EXPECT_EQ(reduce::float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie, to even
  EXPECT_EQ(reduce::float_to_half(1.0f + std::ldexp(3.0f, -11)), 0x3c02);      // tie, to even
  EXPECT_EQ(reduce::float_to_half(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(reduce::float_to_half(-0.0f), 0x8000);
  EXPECT_EQ(reduce::half_to_float(0x3555), 0x1.554p-2f);
  EXPECT_EQ(reduce::half_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(reduce::half_to_float(0xfbff), -65504.0f);
  EXPECT_TRUE(std::isnan(reduce::half_to_float(0x7c01)));
  // A float NaN whose payload is only in the low 13 bits must not become infinity.
  EXPECT_TRUE(kHalfFormat.is_nan(reduce::float_to_half(std::bit_cast<float>(0x7f800001u))));
  EXPECT_EQ(reduce::float_to_half(std::bit_cast<float>(0xff800001u)) & 0x8000, 0x8000);
}

TEST(Conversions, Bf16KnownValues) {
  EXPECT_EQ(reduce::float_to_bfloat16(1.0f), 0x3f80);
  EXPECT_EQ(reduce::float_to_bfloat16(3.14159265f), 0x4049);
  EXPECT_EQ(reduce::float_to_bfloat16(std::bit_cast<float>(0x3f808000u)), 0x3f80);  // tie, to even
  EXPECT_EQ(reduce::float_to_bfloat16(std::bit_cast<float>(0x3f818000u)), 0x3f82);  // tie, to even
  EXPECT_EQ(reduce::float_to_bfloat16(std::bit_cast<float>(0x3f808001u)), 0x3f81);
  EXPECT_EQ(reduce::float_to_bfloat16(std::numeric_limits<float>::max()), 0x7f80);  // rounds to inf
  EXPECT_EQ(reduce::float_to_bfloat16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(reduce::bfloat16_to_float(0x0001), std::ldexp(1.0f, -133));
  EXPECT_TRUE(kBf16Format.is_nan(reduce::float_to_bfloat16(std::bit_cast<float>(0x7f800001u))));
  EXPECT_TRUE(kBf16Format.is_nan(reduce::float_to_bfloat16(std::bit_cast<float>(0xffffffffu))));
}

// The whole of both formats: decoding matches the definition, and decoding
// then encoding gives back the same bits (NaN stays NaN, with its sign).
TEST(Conversions, ExhaustiveRoundTrip) {
  for (bool half : {true, false}) {
    const Format16& fmt = half ? kHalfFormat : kBf16Format;
    const auto to_float = half ? reduce::half_to_float : reduce::bfloat16_to_float;
    const auto from_float = half ? reduce::float_to_half : reduce::float_to_bfloat16;
    int bad = 0;
    for (unsigned u = 0; u <= 0xffff && bad < 5; ++u) {
      const auto bits = static_cast<std::uint16_t>(u);
      const float f = to_float(bits);
      const std::uint16_t back = from_float(f);
      bool ok;
      if (fmt.is_nan(bits)) {
        // half: payload kept and quiet bit set, as F16C's vcvtph2ps does, so
        // the scalar and hardware paths give the same bits. bfloat16: the
        // upper half of a float, so widening is exact.
        const std::uint32_t want_bits =
            half ? (static_cast<std::uint32_t>(bits & 0x8000u) << 16) | 0x7fc00000u |
                       (static_cast<std::uint32_t>(bits & fmt.mant_mask()) << 13)
                 : static_cast<std::uint32_t>(bits) << 16;
        ok = std::isnan(f) && fmt.is_nan(back) && (back & 0x8000) == (bits & 0x8000) &&
             std::bit_cast<std::uint32_t>(f) == want_bits;
      } else {
        ok = static_cast<double>(f) == decode(fmt, bits) &&
             std::signbit(f) == ((bits & 0x8000) != 0) && back == bits;
      }
      if (!ok) {
        ++bad;
        ADD_FAILURE() << (half ? "half" : "bfloat16") << " 0x" << std::hex << u << " -> "
                      << std::hexfloat << f << " -> 0x" << back;
      }
    }
    EXPECT_EQ(bad, 0);
  }
}

// Rounding float -> 16 bits against the nearest-encoding search, on every
// representable value, every midpoint and its neighbours, specials, and an
// even sweep over all 2^32 float bit patterns.
TEST(Conversions, FloatToHalfRoundsToNearestEven) {
  std::vector<float> in;
  const std::vector<double>& values = finite_values(kHalfFormat);
  for (std::size_t i = 0; i < values.size(); ++i) {
    const auto v = static_cast<float>(values[i]);
    in.push_back(v);
    if (i + 1 < values.size()) {
      const auto mid = static_cast<float>((values[i] + values[i + 1]) / 2);  // 12 bits: exact
      in.insert(in.end(), {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f)});
    }
  }
  in.insert(in.end(), {65520.0f, std::nextafter(65520.0f, 0.0f), 65536.0f, 1e30f,
                       std::numeric_limits<float>::max(), std::numeric_limits<float>::infinity(),
                       std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(),
                       std::ldexp(1.0f, -25), std::nextafter(std::ldexp(1.0f, -25), 1.0f),
                       std::bit_cast<float>(0x7f800001u), std::bit_cast<float>(0x7f801fffu),
                       std::bit_cast<float>(0x7fc00000u), std::bit_cast<float>(0x7fffffffu)});
  for (std::uint64_t u = 0; u <= 0xffffffffu; u += 4093) in.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(u)));
  const std::size_t n = in.size();
  for (std::size_t i = 0; i < n; ++i) in.push_back(-in[i]);

  int bad = 0;
  for (float f : in) {
    const std::uint16_t got = reduce::float_to_half(f);
    const bool ok = std::isnan(f) ? kHalfFormat.is_nan(got) && (got & 0x8000) == (std::signbit(f) ? 0x8000 : 0)
                                  : got == encode_nearest(kHalfFormat, f);
    if (!ok && ++bad <= 5)
      ADD_FAILURE() << std::hexfloat << f << " -> 0x" << std::hex << got << ", want 0x"
                    << encode_nearest(kHalfFormat, f);
  }
  EXPECT_EQ(bad, 0) << "of " << in.size() << " inputs";
}

TEST(Conversions, FloatToBf16RoundsToNearestEven) {
  // Every upper half with the lower halves that decide rounding: exact, just
  // above, just below and at the midpoint, and the extremes.
  std::mt19937 rng(7);
  int bad = 0;
  std::size_t checked = 0;
  for (std::uint32_t hi = 0; hi <= 0xffff; ++hi) {
    for (std::uint32_t lo : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu,
                             static_cast<std::uint32_t>(rng() & 0xffffu)}) {
      const float f = std::bit_cast<float>((hi << 16) | lo);
      const std::uint16_t got = reduce::float_to_bfloat16(f);
      ++checked;
      const bool ok = std::isnan(f) ? kBf16Format.is_nan(got) && (got & 0x8000) == (hi & 0x8000)
                                    : got == encode_nearest(kBf16Format, f);
      if (!ok && ++bad <= 5)
        ADD_FAILURE() << std::hexfloat << f << " -> 0x" << std::hex << got << ", want 0x"
                      << encode_nearest(kBf16Format, f);
    }
  }
  EXPECT_EQ(bad, 0) << "of " << checked << " inputs";
}

// ---------------------------------------------------------------------------
// The portable kernels. On a CPU with AVX2+F16C every test above ran the AVX2
// copy, but CPUs without it run the baseline one. The copy is chosen once per
// process, so run the tests again in a child with CHORUS_CPU_FEATURES=baseline,
// and check from its CHORUS_DEBUG=info log that the choice was taken.

// Runs this binary with `args` and the environment changed by `set` (GTEST_*
// variables dropped, so that the child cannot overwrite our XML report).
// Returns the exit status (-1 if it did not exit) and stdout+stderr.
std::pair<int, std::string> run_self(const std::vector<std::string>& args,
                                     const std::vector<std::string>& set) {
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string kv = *e;
    const std::string name = kv.substr(0, kv.find('='));
    const bool replaced = std::any_of(set.begin(), set.end(), [&](const std::string& s) {
      return s.compare(0, name.size() + 1, name + "=") == 0;
    });
    if (!replaced && name.rfind("GTEST_", 0) != 0) env.push_back(kv);
  }
  env.insert(env.end(), set.begin(), set.end());
  std::vector<std::string> argv_s{"/proc/self/exe"};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv_p, env_p;
  for (auto& a : argv_s) argv_p.push_back(a.data());
  for (auto& e : env) env_p.push_back(e.data());
  argv_p.push_back(nullptr);
  env_p.push_back(nullptr);

  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return {-1, "pipe2 failed"};
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
  posix_spawn_file_actions_adddup2(&actions, fds[1], 2);
  pid_t pid = -1;
  const int rc =
      posix_spawn(&pid, "/proc/self/exe", &actions, nullptr, argv_p.data(), env_p.data());
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  std::string out;
  if (rc == 0) {
    char chunk[4096];
    ssize_t got;
    while ((got = read(fds[0], chunk, sizeof chunk)) > 0 || (got < 0 && errno == EINTR))
      if (got > 0) out.append(chunk, static_cast<std::size_t>(got));
  }
  close(fds[0]);
  if (rc != 0) return {-1, "posix_spawn failed: " + std::string(std::strerror(rc))};
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// copy_streaming: every byte of [dst, dst+n) is the source's, nothing
// around it is touched, whatever the alignment of either end and the size
// (the 16-byte head, the 64-byte body, the tail).
TEST(CopyStreaming, CopiesEveryByteAndNothingElse) {
  std::vector<unsigned char> src(300000 + 64), dst(300000 + 128);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<unsigned char>((i * 131 + 7) >> 3);
  for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{15}, std::size_t{16},
                        std::size_t{63}, std::size_t{64}, std::size_t{65}, std::size_t{1000},
                        std::size_t{65536}, std::size_t{300000}}) {
    for (std::size_t soff : {0, 1, 8, 17}) {
      for (std::size_t doff : {0, 3, 16, 31}) {
        std::fill(dst.begin(), dst.end(), 0xA5);
        chorus::reduce::copy_streaming(dst.data() + 32 + doff, src.data() + soff, n);
        std::size_t wrong = 0;
        for (std::size_t i = 0; i < dst.size(); ++i) {
          const bool inside = i >= 32 + doff && i < 32 + doff + n;
          const unsigned char want = inside ? src[soff + (i - 32 - doff)] : 0xA5;
          wrong += dst[i] != want;
        }
        EXPECT_EQ(wrong, 0u) << "n " << n << ", source offset " << soff << ", destination offset " << doff;
      }
    }
  }
}

// copy: every byte of [dst, dst+n) is the source's and nothing around it
// changes, at every distance modulo 4 KiB that takes the vector loop (1 to
// 15 bytes past the source) and some that do not, for sizes below, at and
// past the loop's threshold (with tails that are not whole 64-byte blocks).
TEST(Copy, CopiesEveryByteAtEveryDistance) {
  constexpr std::size_t kMax = 70000;
  std::vector<unsigned char> src(kMax + 8192), dst(kMax + 8192 + 128);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<unsigned char>((i * 131 + 7) >> 3);
  const auto page_offset = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) & 4095; };
  for (std::size_t n : {std::size_t{0}, std::size_t{100}, std::size_t{2047}, std::size_t{2048},
                        std::size_t{4096 + 13}, std::size_t{kMax}}) {
    for (std::size_t ahead : {0, 1, 4, 8, 15, 16, 17, 64, 4095}) {
      const unsigned char* from = src.data() + 5;
      // The destination `ahead` bytes past the source modulo 4 KiB, with
      // 64 bytes of guard before it.
      const std::size_t at =
          64 + ((page_offset(from) + ahead - page_offset(dst.data() + 64)) & 4095);
      unsigned char* to = dst.data() + at;
      ASSERT_EQ((reinterpret_cast<std::uintptr_t>(to) - reinterpret_cast<std::uintptr_t>(from)) & 4095,
                ahead);
      std::fill(dst.begin(), dst.end(), 0xA5);
      chorus::reduce::copy(to, from, n);
      std::size_t wrong = 0;
      for (std::size_t i = 0; i < dst.size(); ++i) {
        const bool inside = i >= at && i < at + n;
        wrong += dst[i] != (inside ? from[i - at] : 0xA5);
      }
      EXPECT_EQ(wrong, 0u) << "n " << n << ", destination " << ahead << " bytes past the source";
    }
  }
}

// move: overlapping ranges either way give memmove's result; others copy.
TEST(Copy, MoveHandlesOverlapEitherWay) {
  for (std::ptrdiff_t shift : {-4, -1, 1, 4, 3000, -3000, 12000}) {
    std::vector<unsigned char> buf(40000);
    for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<unsigned char>(i * 7 + 1);
    std::vector<unsigned char> want(buf);
    const std::size_t n = 6000, from = 7000;
    const auto to = static_cast<std::size_t>(static_cast<std::ptrdiff_t>(from) + shift);
    std::memmove(want.data() + to, want.data() + from, n);
    chorus::reduce::move(buf.data() + to, buf.data() + from, n);
    EXPECT_EQ(buf, want) << "shift " << shift;
  }
}

TEST(PortableKernels, KernelTestsPassOnTheBaselinePath) {
  const char* forced = std::getenv("CHORUS_CPU_FEATURES");
  if (forced != nullptr && std::string(forced) == "baseline")
    GTEST_SKIP() << "this process already runs the baseline kernels";
  // Everything but the scalar conversions, which do not dispatch (and this test).
  const auto [status, out] = run_self({"--gtest_filter=-Conversions.*:PortableKernels.*"},
                                      {"CHORUS_CPU_FEATURES=baseline", "CHORUS_DEBUG=info"});
  const std::string tail = out.size() > 4000 ? out.substr(out.size() - 4000) : out;
  EXPECT_NE(out.find("reduce kernels: baseline (CHORUS_CPU_FEATURES=baseline)"), std::string::npos)
      << "the child did not report the baseline kernels:\n"
      << tail;
  // The filter matched the kernel tests (a typo in it would pass vacuously).
  EXPECT_NE(out.find("[       OK ] AllTypesAndOps/ReduceKernel.CombineMatchesReference/half_sum"),
            std::string::npos)
      << tail;
  EXPECT_EQ(status, 0) << tail;
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
