#include "bench_util.hpp"

#include <unistd.h>

#include <cstdio>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <new>
#include <stdexcept>

namespace chorus::bench {

const Collective* find_collective(const std::string& name) {
  for (const Collective* c :
       {&allreduce_collective(), &broadcast_collective(), &allgather_collective(),
        &reduce_scatter_collective(), &alltoall_collective(), &alltoallv_collective(),
        &allgatherv_collective(), &reduce_scatterv_collective()}) {
    if (name == c->name) return c;
  }
  return nullptr;
}

std::string collective_names() {
  return "allreduce, broadcast, allgather, reduce_scatter, alltoall, alltoallv, allgatherv, "
         "reduce_scatterv";
}

// --- element encoding -------------------------------------------------------

std::uint16_t float_to_half(float f) noexcept {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  if (abs >= 0x47800000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 2^16: infinity
  const std::uint32_t e = abs >> 23;
  if (e < 113) {  // below 2^-14: a half subnormal (or zero)
    if (e < 102) return static_cast<std::uint16_t>(sign);  // below 2^-25: rounds to zero
    const std::uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126 - e;  // 14..24
    std::uint32_t q = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return static_cast<std::uint16_t>(sign | q);
  }
  std::uint32_t h = ((e - 112) << 10) | ((abs >> 13) & 0x3ffu);
  const std::uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry may round up to infinity: correct
  return static_cast<std::uint16_t>(sign | h);
}

float half_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  std::uint32_t x;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    return sign ? -v : v;
  }
  if (exp == 31) {
    x = sign | 0x7f800000u | (mant << 13);
  } else {
    x = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

std::uint16_t float_to_bfloat16(float f) noexcept {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(x >> 16);
}

float bfloat16_to_float(std::uint16_t b) noexcept {
  const std::uint32_t x = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

namespace {

template <typename T>
void put(void* buf, std::size_t i, T v) noexcept {
  std::memcpy(static_cast<unsigned char*>(buf) + i * sizeof(T), &v, sizeof(T));
}

template <typename T>
T get(const void* buf, std::size_t i) noexcept {
  T v;
  std::memcpy(&v, static_cast<const unsigned char*>(buf) + i * sizeof(T), sizeof(T));
  return v;
}

}  // namespace

void store_element(void* buf, std::size_t i, DataType t, double v) noexcept {
  switch (t) {
    case DataType::Int8: put(buf, i, static_cast<std::int8_t>(v)); break;
    case DataType::UInt8: put(buf, i, static_cast<std::uint8_t>(v)); break;
    case DataType::Int32: put(buf, i, static_cast<std::int32_t>(v)); break;
    case DataType::UInt32: put(buf, i, static_cast<std::uint32_t>(v)); break;
    case DataType::Int64: put(buf, i, static_cast<std::int64_t>(v)); break;
    case DataType::UInt64: put(buf, i, static_cast<std::uint64_t>(v)); break;
    case DataType::Float16: put(buf, i, float_to_half(static_cast<float>(v))); break;
    case DataType::BFloat16: put(buf, i, float_to_bfloat16(static_cast<float>(v))); break;
    case DataType::Float32: put(buf, i, static_cast<float>(v)); break;
    case DataType::Float64: put(buf, i, v); break;
  }
}

double load_element(const void* buf, std::size_t i, DataType t) noexcept {
  switch (t) {
    case DataType::Int8: return get<std::int8_t>(buf, i);
    case DataType::UInt8: return get<std::uint8_t>(buf, i);
    case DataType::Int32: return get<std::int32_t>(buf, i);
    case DataType::UInt32: return get<std::uint32_t>(buf, i);
    case DataType::Int64: return static_cast<double>(get<std::int64_t>(buf, i));
    case DataType::UInt64: return static_cast<double>(get<std::uint64_t>(buf, i));
    case DataType::Float16: return half_to_float(get<std::uint16_t>(buf, i));
    case DataType::BFloat16: return bfloat16_to_float(get<std::uint16_t>(buf, i));
    case DataType::Float32: return get<float>(buf, i);
    case DataType::Float64: return get<double>(buf, i);
  }
  return std::numeric_limits<double>::quiet_NaN();
}

// --- input patterns ---------------------------------------------------------

namespace {

// Largest value below which every integer, and so every partial sum of the
// patterns, is exact in `t`. For the wide types the patterns stay far below it.
std::size_t exact_limit(DataType t) noexcept {
  switch (t) {
    case DataType::Int8: return 127;
    case DataType::UInt8: return 255;
    case DataType::BFloat16: return 256;
    case DataType::Float16: return 2048;
    default: return std::size_t{1} << 20;
  }
}

constexpr std::size_t kMaxSumValue = 7;      // sum inputs are 1..7
constexpr std::size_t kMinMaxPeriod = 11;    // min/max inputs are 1..11
constexpr int kMaxProdRanks = 6;             // at most 3 of them contribute a 2: product <= 8
constexpr std::size_t kMaxAvgValue = 5;      // avg inputs are 1..5

// Period of the sum pattern; 0 when even all-ones would overflow the type.
std::size_t sum_period(DataType t, int nranks) noexcept {
  return std::min(kMaxSumValue, exact_limit(t) / static_cast<std::size_t>(nranks));
}

// sum over k in [0, n) of ((s + k) mod m), for s < m.
std::size_t cyclic_sum(std::size_t s, std::size_t n, std::size_t m) noexcept {
  const std::size_t full = n / m;
  const std::size_t rem = n % m;
  std::size_t total = full * (m * (m - 1) / 2);
  const std::size_t a = std::min(rem, m - s);  // terms s, s+1, ... before wrapping
  total += a * s + a * (a - 1) / 2;
  const std::size_t b = rem - a;  // terms 0, 1, ... after wrapping
  total += b * (b - 1) / 2;
  return total;
}

enum class AvgTier { Full, Ones, Zeros };

AvgTier avg_tier(DataType t, int nranks) noexcept {
  const std::size_t n = static_cast<std::size_t>(nranks);
  if (kMaxAvgValue * n <= exact_limit(t)) return AvgTier::Full;
  if (n <= exact_limit(t)) return AvgTier::Ones;
  return AvgTier::Zeros;
}

}  // namespace

double reduce_input(ReduceOp op, DataType t, int rank, int nranks, std::size_t index) noexcept {
  const std::size_t r = static_cast<std::size_t>(rank);
  const std::size_t n = static_cast<std::size_t>(nranks);
  switch (op) {
    case ReduceOp::Sum: {
      const std::size_t m = sum_period(t, nranks);
      if (m == 0) return r == index % n ? 1.0 : 0.0;  // a single 1 per element
      return static_cast<double>((r + index) % m + 1);
    }
    case ReduceOp::Prod:
      return (rank < kMaxProdRanks && (r + index) % 2 == 0) ? 2.0 : 1.0;
    case ReduceOp::Min:
    case ReduceOp::Max:
      return static_cast<double>((r + index) % kMinMaxPeriod + 1);
    case ReduceOp::Avg: {
      switch (avg_tier(t, nranks)) {
        case AvgTier::Full: {
          // base +- delta, with rank r and rank n-1-r carrying opposite deltas:
          // the sum is exactly n * base, so the average is exact (and integer).
          const double base = static_cast<double>(index % 3 + 2);
          const double delta = index % 2 == 0 ? 1.0 : 0.0;
          const std::size_t h = n / 2;
          if (r < h) return base + delta;
          if (r >= n - h) return base - delta;
          return base;
        }
        case AvgTier::Ones: return 1.0;
        case AvgTier::Zeros: return 0.0;
      }
      return 0.0;
    }
  }
  return 0.0;
}

double reduce_expected(ReduceOp op, DataType t, int nranks, std::size_t index) noexcept {
  const std::size_t n = static_cast<std::size_t>(nranks);
  switch (op) {
    case ReduceOp::Sum: {
      const std::size_t m = sum_period(t, nranks);
      if (m == 0) return 1.0;
      return static_cast<double>(n + cyclic_sum(index % m, n, m));
    }
    case ReduceOp::Prod: {
      const std::size_t k = static_cast<std::size_t>(std::min(nranks, kMaxProdRanks));
      // ranks r < k with r of the same parity as index contribute a 2
      const std::size_t twos = index % 2 == 0 ? (k + 1) / 2 : k / 2;
      return static_cast<double>(std::size_t{1} << twos);
    }
    case ReduceOp::Min:
    case ReduceOp::Max: {
      // The inputs over ranks form the cyclic window s, s+1, ..., s+n-1 (mod period).
      const std::size_t m = kMinMaxPeriod;
      const std::size_t s = index % m;
      const bool wraps = n >= m || s + n - 1 >= m;
      if (op == ReduceOp::Min) return static_cast<double>(wraps ? 1 : s + 1);
      return static_cast<double>(wraps ? m : s + n);
    }
    case ReduceOp::Avg:
      switch (avg_tier(t, nranks)) {
        case AvgTier::Full: return static_cast<double>(index % 3 + 2);
        case AvgTier::Ones: return 1.0;
        case AvgTier::Zeros: return 0.0;
      }
      return 0.0;
  }
  return 0.0;
}

double plain_value(int rank, std::size_t index) noexcept {
  return static_cast<double>((static_cast<std::size_t>(rank) * 7 + index) % 97 + 1);
}

void fill_send(void* buf, std::size_t n, const Collective& coll, const CheckContext& ctx) {
  for (std::size_t i = 0; i < n; ++i) store_element(buf, i, ctx.dtype, coll.send_value(ctx, i));
}

std::uint64_t count_wrong(const void* buf, std::size_t n, const Collective& coll,
                          const CheckContext& ctx) {
  std::uint64_t wrong = 0;
  for (std::size_t i = 0; i < n; ++i)
    if (load_element(buf, i, ctx.dtype) != coll.expected(ctx, i)) ++wrong;
  return wrong;
}

std::string rank_table(Communicator& comm, const CallOptions& options) {
  struct RankInfo {
    std::int64_t pid;
    char host[56];
  };
  static_assert(sizeof(RankInfo) == 64);
  RankInfo mine{};
  mine.pid = ::getpid();
  ::gethostname(mine.host, sizeof mine.host - 1);
  std::vector<RankInfo> all(static_cast<std::size_t>(comm.size()));
  comm.allgather(&mine, all.data(), sizeof(RankInfo), DataType::UInt8, options);
  std::string out = "#\n# Using ranks\n";
  char line[128];
  for (int r = 0; r < comm.size(); ++r) {
    const RankInfo& ri = all[static_cast<std::size_t>(r)];
    std::snprintf(line, sizeof line, "#  Rank %2d Pid %6lld on %10s\n", r, static_cast<long long>(ri.pid), ri.host);
    out += line;
  }
  return out + "#\n";
}

}  // namespace chorus::bench
