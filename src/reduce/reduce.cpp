// CPU reduction kernels.
//
// Shape of this file, bottom up:
//   1. scalar fp16/bf16 conversions, written branch-free so that the same code
//      vectorises when it is inlined into a block loop;
//   2. one elementwise loop per (element type, op), always inlined into
//   3. thin per-ISA wrappers: a baseline x86-64 (SSE2) copy and, on x86, an
//      AVX2+F16C copy selected once at run time, so that the library runs on
//      any x86-64 without -march=native yet uses 256-bit vectors where it can
//      (CHORUS_CPU_FEATURES=baseline forces the baseline copy);
//   4. the public entry points, which validate, resolve aliasing and dispatch.
//
// Buffers are reached through an aligned(1), may_alias view of the element
// type (see Unaligned): the transport may hand us a pointer into a byte stream,
// and vector loads and stores are unaligned ones anyway.

#include "reduce/reduce.hpp"

#include "core/enforce.hpp"
#include "core/log.hpp"

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define CHORUS_REDUCE_X86 1
#else
#define CHORUS_REDUCE_X86 0
#endif

namespace chorus::reduce {
namespace {

using Byte = unsigned char;

// Elements per block for the 16-bit float types (converted to float on the
// stack) and for the aliasing fallback. 256 floats x 2 arrays = 2 KiB: the
// block stays in L1, and the float loop over it has one vector tail per block.
constexpr std::size_t kBlock = 256;
// Largest element, for sizing the aliasing fallback's scratch copy.
constexpr std::size_t kMaxElemSize = 8;

// ---------------------------------------------------------------------------
// 1. Scalar conversions. Every select below is computed on both sides and
// chosen without a branch, so GCC if-converts them and the block loops
// vectorise. (float_to_half_impl needs per-lane shifts, i.e. AVX2, to
// vectorise; the AVX2 copy converts fp16 with F16C anyway, so only the
// baseline copy runs it, scalar.)

[[gnu::always_inline]] inline float half_to_float_impl(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t em = h & 0x7fffu;  // exponent and mantissa
  const std::uint32_t exp = em & 0x7c00u;
  // Normal: rebias the exponent from 15 to 127.
  const std::uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  // Inf/NaN. NaNs are quietened as F16C's vcvtph2ps does, so that the hardware
  // and portable paths agree bit for bit (every rank must produce the same bits).
  const std::uint32_t special = 0x7f800000u | (em << 13) | (em > 0x7c00u ? 0x00400000u : 0u);
  // Zero/subnormal, m * 2^-24: build the normal float 2^-14 * (1 + m/1024) and
  // subtract 2^-14. The subtraction is exact, so neither the rounding mode nor
  // FTZ/DAZ set by an application can change the result.
  const std::uint32_t subnormal = std::bit_cast<std::uint32_t>(
      std::bit_cast<float>(0x38800000u | (em << 13)) - 0x1p-14f);
  // Select the subnormal case with a mask, not ?: -- GCC would sink the float
  // subtraction into a branch and then refuse to if-convert it (it may trap),
  // and the block loop would not vectorise.
  const std::uint32_t rest = exp == 0x7c00u ? special : normal;
  const std::uint32_t is_subnormal = 0u - static_cast<std::uint32_t>(exp == 0);
  const std::uint32_t mag = (subnormal & is_subnormal) | (rest & ~is_subnormal);
  return std::bit_cast<float>(sign | mag);
}

[[gnu::always_inline]] inline std::uint16_t float_to_half_impl(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7fffffffu;
  // Normal half, |f| in [2^-14, 65536): rebias and round the 13 dropped bits to
  // nearest even (0xfff + lsb). A carry out of the mantissa bumps the exponent,
  // which is exactly right, up to and including rounding to infinity.
  const std::uint32_t normal = (a - ((127u - 15u) << 23) + 0x0fffu + ((a >> 13) & 1u)) >> 13;
  // Subnormal half, |f| < 2^-14: shift the 24-bit significand down to units of
  // 2^-24 with the same round-to-nearest-even trick, in integers so that the FP
  // environment does not matter. The clamps keep the shift defined in lanes
  // whose result is discarded; a shift of 25 rounds everything to zero. (No
  // boolean temporaries here: they stop GCC from vectorising the loop.)
  const std::uint32_t s = std::clamp(126u - std::min(a >> 23, 126u), 14u, 25u);
  const std::uint32_t sig = (a & 0x7fffffu) | 0x800000u;
  const std::uint32_t subnormal = (sig + ((1u << (s - 1u)) - 1u) + ((sig >> s) & 1u)) >> s;
  // NaN: keep the top payload bits and set the quiet bit (as vcvtps2ph does), so
  // a NaN whose payload lives only in the low bits cannot turn into infinity.
  const std::uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
  std::uint32_t mag = a < 0x38800000u ? subnormal : normal;
  mag = a >= 0x47800000u ? 0x7c00u : mag;
  mag = a > 0x7f800000u ? nan : mag;
  return static_cast<std::uint16_t>(sign | mag);
}

[[gnu::always_inline]] inline float bfloat16_to_float_impl(std::uint16_t b) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

[[gnu::always_inline]] inline std::uint16_t float_to_bfloat16_impl(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  // Round to nearest even on the 16 dropped bits; the carry handles overflow to
  // infinity. Plain truncation of a NaN could leave an all-zero mantissa
  // (infinity), so NaNs keep their top bits and get the quiet bit instead.
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t nan = (u >> 16) | 0x0040u;
  return static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// ---------------------------------------------------------------------------
// 2. Elementwise loops.

// T as GCC/Clang let us declare it for memory of unknown alignment and type:
// aligned(1) makes an access at any address well-defined (documented for
// typedefs), may_alias makes it valid whatever the bytes were written as (a
// transport fills buffers with memcpy or recv). std::memcpy would be equally
// correct, but GCC then selects min/max on the raw bits (vpcmpltps+vpblendvb)
// instead of emitting vminps.
template <class T>
struct Unaligned {
  typedef T type __attribute__((aligned(1), may_alias));
};

template <class T>
[[gnu::always_inline]] inline T load(const Byte* p, std::size_t i) noexcept {
  return reinterpret_cast<const typename Unaligned<T>::type*>(p)[i];
}

template <class T>
[[gnu::always_inline]] inline void store(Byte* p, std::size_t i, T v) noexcept {
  reinterpret_cast<typename Unaligned<T>::type*>(p)[i] = v;
}

// One op on two values. Avg never reaches here (it combines as Sum).
template <class T, ReduceOp Op>
[[gnu::always_inline]] inline T apply(T a, T b) noexcept {
  if constexpr (Op == ReduceOp::Sum || Op == ReduceOp::Prod) {
    if constexpr (std::is_integral_v<T>) {
      // Signed overflow is UB and the tests run under UBSan: do the arithmetic
      // unsigned, which wraps, and convert back (modular since C++20). The 8-bit
      // types promote to int, where neither sum nor product can overflow.
      using U = std::make_unsigned_t<T>;
      if constexpr (Op == ReduceOp::Sum)
        return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
      else
        return static_cast<T>(static_cast<U>(a) * static_cast<U>(b));
    } else {
      if constexpr (Op == ReduceOp::Sum)
        return a + b;
      else
        return a * b;
    }
  } else if constexpr (Op == ReduceOp::Min) {
    // The shape of minps/maxps: with a NaN operand the result is b (the incoming
    // value); fixed either way, so every rank gets the same bits.
    return a < b ? a : b;
  } else {
    static_assert(Op == ReduceOp::Max);
    return a > b ? a : b;
  }
}

// dst = dst op src. __restrict is a promise the public entry points keep (they
// route every aliasing case through a scratch copy), and spares the vectoriser
// a run-time overlap check.
template <class T, ReduceOp Op>
[[gnu::always_inline]] inline void loop2(Byte* __restrict dst, const Byte* __restrict src,
                                         std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i)
    store<T>(dst, i, apply<T, Op>(load<T>(dst, i), load<T>(src, i)));
}

// dst = a op b. a == b is fine: restrict only forbids aliasing with a write.
template <class T, ReduceOp Op>
[[gnu::always_inline]] inline void loop3(Byte* __restrict dst, const Byte* __restrict a,
                                         const Byte* __restrict b, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i)
    store<T>(dst, i, apply<T, Op>(load<T>(a, i), load<T>(b, i)));
}

template <class T>
[[gnu::always_inline]] inline T divide(T x, int divisor) noexcept {
  if constexpr (std::is_floating_point_v<T>) {
    // A true division, not a multiply by the reciprocal: correctly rounded.
    return x / static_cast<T>(divisor);
  } else if constexpr (std::is_same_v<T, std::uint64_t>) {
    return x / static_cast<std::uint64_t>(divisor);
  } else {
    // In 64 bits: an 8-bit type could not hold the divisor. divisor > 0, so
    // this truncates toward zero and never overflows.
    return static_cast<T>(static_cast<std::int64_t>(x) / divisor);
  }
}

template <class T>
[[gnu::always_inline]] inline void loop_avg(Byte* buf, std::size_t n, int divisor) noexcept {
  for (std::size_t i = 0; i < n; ++i) store<T>(buf, i, divide<T>(load<T>(buf, i), divisor));
}

// 16-bit float types: convert a block to float on the stack, run the float
// loop there (vectorised), convert back. Reading both inputs of a block before
// writing it also makes any exact aliasing of dst, a and b harmless.
struct Bf16Codec {
  [[gnu::always_inline]] static void to_float(const Byte* src, float* dst, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) dst[i] = bfloat16_to_float_impl(load<std::uint16_t>(src, i));
  }
  [[gnu::always_inline]] static void from_float(const float* src, Byte* dst, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) store<std::uint16_t>(dst, i, float_to_bfloat16_impl(src[i]));
  }
};

struct HalfCodec {
  [[gnu::always_inline]] static void to_float(const Byte* src, float* dst, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) dst[i] = half_to_float_impl(load<std::uint16_t>(src, i));
  }
  [[gnu::always_inline]] static void from_float(const float* src, Byte* dst, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) store<std::uint16_t>(dst, i, float_to_half_impl(src[i]));
  }
};

#if CHORUS_REDUCE_X86
// Hardware fp16 conversion (F16C). Out of line and with their own target
// attribute because the intrinsics may only be inlined into F16C code; the
// call costs nothing next to a 256-element block. A tail of fewer than 8
// elements goes through a zero-padded 8-element copy, so every element is
// converted by the same instruction.
[[gnu::target("avx2,f16c")]] void half_to_float_f16c(const Byte* src, float* dst,
                                                      std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i_u*>(src + 2 * i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  if (i < n) {
    alignas(16) std::uint16_t h[8] = {};
    alignas(32) float f[8];
    std::memcpy(h, src + 2 * i, 2 * (n - i));
    _mm256_store_ps(f, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h))));
    std::memcpy(dst + i, f, 4 * (n - i));
  }
}

[[gnu::target("avx2,f16c")]] void float_to_half_f16c(const float* src, Byte* dst,
                                                      std::size_t n) noexcept {
  // Explicit round-to-nearest-even, not MXCSR's mode: results must not depend
  // on how the application set up its FP environment.
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRound);
    _mm_storeu_si128(reinterpret_cast<__m128i_u*>(dst + 2 * i), h);
  }
  if (i < n) {
    alignas(32) float f[8] = {};
    alignas(16) std::uint16_t h[8];
    std::memcpy(f, src + i, 4 * (n - i));
    _mm_store_si128(reinterpret_cast<__m128i*>(h), _mm256_cvtps_ph(_mm256_load_ps(f), kRound));
    std::memcpy(dst + 2 * i, h, 2 * (n - i));
  }
}

struct HalfCodecF16c {
  static void to_float(const Byte* src, float* dst, std::size_t n) noexcept {
    half_to_float_f16c(src, dst, n);
  }
  static void from_float(const float* src, Byte* dst, std::size_t n) noexcept {
    float_to_half_f16c(src, dst, n);
  }
};
#endif

template <class Codec, ReduceOp Op>
[[gnu::always_inline]] inline void loop3_16(Byte* dst, const Byte* a, const Byte* b,
                                            std::size_t n) noexcept {
  alignas(32) float fa[kBlock];
  alignas(32) float fb[kBlock];
  for (std::size_t off = 0; off < n; off += kBlock) {
    const std::size_t m = std::min(kBlock, n - off);
    Codec::to_float(a + 2 * off, fa, m);
    Codec::to_float(b + 2 * off, fb, m);
    for (std::size_t i = 0; i < m; ++i) fa[i] = apply<float, Op>(fa[i], fb[i]);
    Codec::from_float(fa, dst + 2 * off, m);
  }
}

template <class Codec>
[[gnu::always_inline]] inline void loop_avg_16(Byte* buf, std::size_t n, int divisor) noexcept {
  alignas(32) float f[kBlock];
  const float d = static_cast<float>(divisor);
  for (std::size_t off = 0; off < n; off += kBlock) {
    const std::size_t m = std::min(kBlock, n - off);
    Codec::to_float(buf + 2 * off, f, m);
    for (std::size_t i = 0; i < m; ++i) f[i] = f[i] / d;
    Codec::from_float(f, buf + 2 * off, m);
  }
}

// ---------------------------------------------------------------------------
// 3. Per-ISA instantiations. Each wrapper is the same always-inline loop
// compiled for a different target; the loop is vectorised after inlining, so
// the AVX2 copy gets 256-bit vectors and the baseline copy SSE2.

using Kernel2 = void (*)(Byte*, const Byte*, std::size_t);
using Kernel3 = void (*)(Byte*, const Byte*, const Byte*, std::size_t);
using KernelAvg = void (*)(Byte*, std::size_t, int);

template <class T, ReduceOp Op>
void two_base(Byte* __restrict d, const Byte* __restrict s, std::size_t n) noexcept {
  loop2<T, Op>(d, s, n);
}
template <class T, ReduceOp Op>
void three_base(Byte* __restrict d, const Byte* __restrict a, const Byte* __restrict b,
                std::size_t n) noexcept {
  loop3<T, Op>(d, a, b, n);
}
template <class Codec, ReduceOp Op>
void three16_base(Byte* d, const Byte* a, const Byte* b, std::size_t n) noexcept {
  loop3_16<Codec, Op>(d, a, b, n);
}
template <class T>
void avg_base(Byte* buf, std::size_t n, int divisor) noexcept {
  loop_avg<T>(buf, n, divisor);
}
template <class Codec>
void avg16_base(Byte* buf, std::size_t n, int divisor) noexcept {
  loop_avg_16<Codec>(buf, n, divisor);
}

#if CHORUS_REDUCE_X86
template <class T, ReduceOp Op>
[[gnu::target("avx2,f16c")]] void two_avx2(Byte* __restrict d, const Byte* __restrict s,
                                           std::size_t n) noexcept {
  loop2<T, Op>(d, s, n);
}
template <class T, ReduceOp Op>
[[gnu::target("avx2,f16c")]] void three_avx2(Byte* __restrict d, const Byte* __restrict a,
                                             const Byte* __restrict b, std::size_t n) noexcept {
  loop3<T, Op>(d, a, b, n);
}
template <class Codec, ReduceOp Op>
[[gnu::target("avx2,f16c")]] void three16_avx2(Byte* d, const Byte* a, const Byte* b,
                                               std::size_t n) noexcept {
  loop3_16<Codec, Op>(d, a, b, n);
}
template <class T>
[[gnu::target("avx2,f16c")]] void avg_avx2(Byte* buf, std::size_t n, int divisor) noexcept {
  loop_avg<T>(buf, n, divisor);
}
template <class Codec>
[[gnu::target("avx2,f16c")]] void avg16_avx2(Byte* buf, std::size_t n, int divisor) noexcept {
  loop_avg_16<Codec>(buf, n, divisor);
}
#endif

// CHORUS_CPU_FEATURES=baseline forces the portable kernels on any CPU, so that
// the path of CPUs without AVX2 can be tested (tests/unit/test_reduce.cpp
// re-runs its kernel tests under it) and measured (bench/micro) on one that
// has it. auto (the default) takes the best copy the CPU supports. An unknown
// value is reported and treated as auto, as CHORUS_DEBUG does: the kernels are
// chosen on a transport's receive path, where an exception would fail a
// collective rather than the setting.
bool baseline_forced() {
  const char* v = std::getenv("CHORUS_CPU_FEATURES");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return false;
  if (std::strcmp(v, "baseline") == 0) return true;
  CHORUS_WARN("CHORUS_CPU_FEATURES=" << v << " not understood (auto|baseline); using auto");
  return false;
}

// Decided once, with CHORUS_CPU_FEATURES read at the same time: the CPU does
// not change under us, and every rank must keep the kernels it started with.
// F16C is required alongside AVX2 because the AVX2 copy converts fp16 with it
// (every AVX2 CPU has it).
bool use_avx2() noexcept {
  static const bool kUseAvx2 = [] {
    const bool forced = baseline_forced();
    bool avx2 = false;
#if CHORUS_REDUCE_X86
    __builtin_cpu_init();
    // avx2 via the builtin, which also checks that the OS saves ymm state;
    // F16C via cpuid, because clang's builtin does not know "f16c".
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
    avx2 = __builtin_cpu_supports("avx2") && f16c;
#endif
    CHORUS_INFO("reduce kernels: " << (avx2 && !forced ? "avx2+f16c"
                                       : forced        ? "baseline (CHORUS_CPU_FEATURES=baseline)"
                                                       : "baseline (no AVX2+F16C)"));
    return avx2 && !forced;
  }();
  return kUseAvx2;
}

// The kernels for one (dtype, op). The 16-bit float kernels tolerate exact
// aliasing (they read a whole block before writing it), so they have no
// two-operand form and skip the scratch copy.
struct Kernels {
  Kernel2 two = nullptr;  // dst op= src, no aliasing; null for the 16-bit float types
  Kernel3 three = nullptr;
  bool alias_safe = false;
};

template <class T, ReduceOp Op>
Kernels kernels_for() noexcept {
#if CHORUS_REDUCE_X86
  if (use_avx2()) return {&two_avx2<T, Op>, &three_avx2<T, Op>, false};
#endif
  return {&two_base<T, Op>, &three_base<T, Op>, false};
}

template <ReduceOp Op>
Kernels kernels16_for(DataType dtype) noexcept {
  if (dtype == DataType::BFloat16) {
#if CHORUS_REDUCE_X86
    if (use_avx2()) return {nullptr, &three16_avx2<Bf16Codec, Op>, true};
#endif
    return {nullptr, &three16_base<Bf16Codec, Op>, true};
  }
#if CHORUS_REDUCE_X86
  if (use_avx2()) return {nullptr, &three16_avx2<HalfCodecF16c, Op>, true};
#endif
  return {nullptr, &three16_base<HalfCodec, Op>, true};
}

template <ReduceOp Op>
Kernels kernels_for(DataType dtype) noexcept {
  switch (dtype) {
    case DataType::Int8: return kernels_for<std::int8_t, Op>();
    case DataType::UInt8: return kernels_for<std::uint8_t, Op>();
    case DataType::Int32: return kernels_for<std::int32_t, Op>();
    case DataType::UInt32: return kernels_for<std::uint32_t, Op>();
    case DataType::Int64: return kernels_for<std::int64_t, Op>();
    case DataType::UInt64: return kernels_for<std::uint64_t, Op>();
    case DataType::Float16:
    case DataType::BFloat16: return kernels16_for<Op>(dtype);
    case DataType::Float32: return kernels_for<float, Op>();
    case DataType::Float64: return kernels_for<double, Op>();
  }
  return {};  // unreachable: validated by the caller
}

void check_dtype(DataType dtype, const char* fn) {
  if (!is_valid(dtype))
    CHORUS_THROW(InvalidArgument, "reduce::" << fn << ": unknown DataType value "
                                             << static_cast<int>(dtype) << " (valid: 0.."
                                             << kNumDataTypes - 1 << ")");
}

Kernels select(DataType dtype, ReduceOp op, const char* fn) {
  check_dtype(dtype, fn);
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg: return kernels_for<ReduceOp::Sum>(dtype);
    case ReduceOp::Prod: return kernels_for<ReduceOp::Prod>(dtype);
    case ReduceOp::Min: return kernels_for<ReduceOp::Min>(dtype);
    case ReduceOp::Max: return kernels_for<ReduceOp::Max>(dtype);
  }
  CHORUS_THROW(InvalidArgument, "reduce::" << fn << ": unknown ReduceOp value "
                                           << static_cast<int>(op) << " (valid: 0.."
                                           << kNumReduceOps - 1 << ")");
}

template <class T>
KernelAvg avg_for() noexcept {
#if CHORUS_REDUCE_X86
  if (use_avx2()) return &avg_avx2<T>;
#endif
  return &avg_base<T>;
}

// Codec is the portable one; the AVX2 copy swaps in F16C for fp16.
template <class Codec>
KernelAvg avg16_for() noexcept {
#if CHORUS_REDUCE_X86
  if (use_avx2()) {
    if constexpr (std::is_same_v<Codec, HalfCodec>)
      return &avg16_avx2<HalfCodecF16c>;
    else
      return &avg16_avx2<Codec>;
  }
#endif
  return &avg16_base<Codec>;
}

// dst = a op b with any exact aliasing among the three.
void run(const Kernels& k, Byte* dst, const Byte* a, const Byte* b, std::size_t count,
         std::size_t elem) noexcept {
  if (k.alias_safe || (dst != a && dst != b)) return k.three(dst, a, b, count);
  if (dst != b) return k.two(dst, b, count);
  // dst aliases b (and perhaps a): the restrict kernels need disjoint inputs,
  // so copy b a block at a time into L1-resident scratch. Rare, and the copy
  // is cheap next to the memory traffic of the reduction itself.
  alignas(64) Byte scratch[kBlock * kMaxElemSize];
  for (std::size_t off = 0; off < count; off += kBlock) {
    const std::size_t m = std::min(kBlock, count - off);
    std::memcpy(scratch, b + off * elem, m * elem);
    if (dst == a)
      k.two(dst + off * elem, scratch, m);
    else
      k.three(dst + off * elem, a + off * elem, scratch, m);
  }
}

}  // namespace

void combine(void* dst, const void* src, std::size_t count, DataType dtype, ReduceOp op) {
  const Kernels k = select(dtype, op, "combine");
  if (count == 0) return;
  CHORUS_ENFORCE(dst != nullptr && src != nullptr, InvalidArgument,
                 "reduce::combine: null buffer with count " << count);
  auto* d = static_cast<Byte*>(dst);
  run(k, d, d, static_cast<const Byte*>(src), count, size_of(dtype));
}

void combine3(void* dst, const void* a, const void* b, std::size_t count, DataType dtype,
              ReduceOp op) {
  const Kernels k = select(dtype, op, "combine3");
  if (count == 0) return;
  CHORUS_ENFORCE(dst != nullptr && a != nullptr && b != nullptr, InvalidArgument,
                 "reduce::combine3: null buffer with count " << count);
  run(k, static_cast<Byte*>(dst), static_cast<const Byte*>(a), static_cast<const Byte*>(b),
      count, size_of(dtype));
}

void finalize_avg(void* buf, std::size_t count, DataType dtype, int divisor) {
  check_dtype(dtype, "finalize_avg");
  CHORUS_ENFORCE(divisor > 0, InvalidArgument,
                 "reduce::finalize_avg: divisor must be positive, got " << divisor);
  if (count == 0) return;
  CHORUS_ENFORCE(buf != nullptr, InvalidArgument,
                 "reduce::finalize_avg: null buffer with count " << count);
  KernelAvg kernel = nullptr;
  switch (dtype) {
    case DataType::Int8: kernel = avg_for<std::int8_t>(); break;
    case DataType::UInt8: kernel = avg_for<std::uint8_t>(); break;
    case DataType::Int32: kernel = avg_for<std::int32_t>(); break;
    case DataType::UInt32: kernel = avg_for<std::uint32_t>(); break;
    case DataType::Int64: kernel = avg_for<std::int64_t>(); break;
    case DataType::UInt64: kernel = avg_for<std::uint64_t>(); break;
    case DataType::Float16: kernel = avg16_for<HalfCodec>(); break;
    case DataType::BFloat16: kernel = avg16_for<Bf16Codec>(); break;
    case DataType::Float32: kernel = avg_for<float>(); break;
    case DataType::Float64: kernel = avg_for<double>(); break;
  }
  kernel(static_cast<Byte*>(buf), count, divisor);
}

namespace {

template <class T>
T identity_of(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg:
      return T{0};
    case ReduceOp::Prod:
      return T{1};
    case ReduceOp::Min:
      return std::numeric_limits<T>::has_infinity ? std::numeric_limits<T>::infinity()
                                                  : std::numeric_limits<T>::max();
    case ReduceOp::Max:
      return std::numeric_limits<T>::has_infinity ? -std::numeric_limits<T>::infinity()
                                                  : std::numeric_limits<T>::lowest();
  }
  return T{0};
}

template <class T>
void fill_as(void* buf, std::size_t count, T v) {
  auto* b = static_cast<Byte*>(buf);
  for (std::size_t i = 0; i < count; ++i) std::memcpy(b + i * sizeof(T), &v, sizeof(T));
}

}  // namespace

void fill_identity(void* buf, std::size_t count, DataType dtype, ReduceOp op) {
  check_dtype(dtype, "fill_identity");
  CHORUS_ENFORCE(is_valid(op), InvalidArgument,
                 "reduce::fill_identity: unknown ReduceOp value " << static_cast<int>(op));
  if (count == 0) return;
  CHORUS_ENFORCE(buf != nullptr, InvalidArgument,
                 "reduce::fill_identity: null buffer with count " << count);
  switch (dtype) {
    case DataType::Int8:
      fill_as(buf, count, identity_of<std::int8_t>(op));
      break;
    case DataType::UInt8:
      fill_as(buf, count, identity_of<std::uint8_t>(op));
      break;
    case DataType::Int32:
      fill_as(buf, count, identity_of<std::int32_t>(op));
      break;
    case DataType::UInt32:
      fill_as(buf, count, identity_of<std::uint32_t>(op));
      break;
    case DataType::Int64:
      fill_as(buf, count, identity_of<std::int64_t>(op));
      break;
    case DataType::UInt64:
      fill_as(buf, count, identity_of<std::uint64_t>(op));
      break;
    case DataType::Float16:
      fill_as(buf, count, float_to_half(identity_of<float>(op)));
      break;
    case DataType::BFloat16:
      fill_as(buf, count, float_to_bfloat16(identity_of<float>(op)));
      break;
    case DataType::Float32:
      fill_as(buf, count, identity_of<float>(op));
      break;
    case DataType::Float64:
      fill_as(buf, count, identity_of<double>(op));
      break;
  }
}

void copy_near(void* dst, const void* src, std::size_t bytes) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  std::size_t i = 0;
#if CHORUS_REDUCE_X86
  for (; i + 64 <= bytes; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), a);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
  }
#endif
  if (i < bytes) std::memcpy(d + i, s + i, bytes - i);
}

void copy_streaming(void* dst, const void* src, std::size_t bytes) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
#if CHORUS_REDUCE_X86
  // Up to the first 16-byte boundary of dst by memcpy, then 64 bytes a turn
  // (a cache line), then the tail.
  const std::size_t head =
      std::min(bytes, (16 - (reinterpret_cast<std::uintptr_t>(d) & 15)) & 15);
  std::memcpy(d, s, head);
  d += head;
  s += head;
  bytes -= head;
  std::size_t i = 0;
  for (; i + 64 <= bytes; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
  }
  // The streamed stores are weakly ordered: make them visible before
  // whatever the caller publishes next (a flag, a completion).
  _mm_sfence();
  std::memcpy(d + i, s + i, bytes - i);
#else
  std::memcpy(d, s, bytes);
#endif
}

float half_to_float(std::uint16_t h) noexcept { return half_to_float_impl(h); }
std::uint16_t float_to_half(float f) noexcept { return float_to_half_impl(f); }
float bfloat16_to_float(std::uint16_t b) noexcept { return bfloat16_to_float_impl(b); }
std::uint16_t float_to_bfloat16(float f) noexcept { return float_to_bfloat16_impl(f); }

}  // namespace chorus::reduce
