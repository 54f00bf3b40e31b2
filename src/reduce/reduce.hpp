#pragma once

// CPU reduction kernels. One templated loop per (dtype, op), written so that
// the compiler vectorises it; fp16/bf16 go through float.

#include <chorus/types.hpp>

#include <cstddef>
#include <cstdint>

namespace chorus::reduce {

// dst[i] = dst[i] (op) src[i] for i in [0, count). Avg combines as Sum
// (finalize_avg divides once at the end). dst and src may be unaligned for
// their type; they must not partially overlap (dst == src is allowed).
void combine(void* dst, const void* src, std::size_t count, DataType dtype, ReduceOp op);

// dst[i] = a[i] (op) b[i]: the out-of-place form (lets an algorithm skip the
// initial copy). dst may equal a or b.
void combine3(void* dst, const void* a, const void* b, std::size_t count, DataType dtype,
              ReduceOp op);

// memcpy(dst, src, bytes) with stores that bypass the caches (x86-64:
// non-temporal SSE2 stores; elsewhere plain memcpy): for a destination
// nobody reads again soon, it saves the read-for-ownership of each line.
// dst and src must not overlap.
void copy_streaming(void* dst, const void* src, std::size_t bytes);

// The copy `copy` takes instead of memcpy: a loop of 16-byte moves.
void copy_near(void* dst, const void* src, std::size_t bytes);

// memcpy(dst, src, bytes), except where the destination lies 1 to 15 bytes
// past the source modulo 4 KiB: there glibc's memcpy (rep movsb, from 4 KiB
// up to about 1 MiB) ran 16-30x slower on this project's machines (AMD
// EPYC: 3.5 GB/s instead of 57 for 64 KiB in cache; docs/benchmarks.md),
// so those copies take a loop of vector moves (43-45 GB/s). Every copy of a
// caller's data goes through here: user buffers sit at any offset. dst and
// src must not overlap.
inline void copy(void* dst, const void* src, std::size_t bytes) {
  const auto ahead =
      (reinterpret_cast<std::uintptr_t>(dst) - reinterpret_cast<std::uintptr_t>(src)) & 4095;
  if (bytes >= 2048 && ahead != 0 && ahead < 16)
    copy_near(dst, src, bytes);
  else
    __builtin_memcpy(dst, src, bytes);
}

// memmove(dst, src, bytes) for ranges that may overlap; those that do not
// go through copy().
inline void move(void* dst, const void* src, std::size_t bytes) {
  const auto d = reinterpret_cast<std::uintptr_t>(dst), s = reinterpret_cast<std::uintptr_t>(src);
  if (d < s + bytes && s < d + bytes)
    __builtin_memmove(dst, src, bytes);
  else
    copy(dst, src, bytes);
}

// buf[i] /= divisor, for ReduceOp::Avg after the sum. Integer types use integer
// division (truncation toward zero, as C++); fp16/bf16 go through float.
void finalize_avg(void* buf, std::size_t count, DataType dtype, int divisor);

// buf[i] = the identity of `op` for `dtype`: 0 for Sum and Avg, 1 for Prod,
// the largest value (+inf for floating types) for Min, the lowest (-inf)
// for Max, so that combine(x, identity) leaves x as it is. What a rank
// that has nothing to contribute (the engine's join) adds to an allreduce.
void fill_identity(void* buf, std::size_t count, DataType dtype, ReduceOp op);

// Scalar conversions used by the kernels, the tests and the benchmark.
float half_to_float(std::uint16_t h) noexcept;
std::uint16_t float_to_half(float f) noexcept;        // round to nearest even
float bfloat16_to_float(std::uint16_t b) noexcept;
std::uint16_t float_to_bfloat16(float f) noexcept;    // round to nearest even, NaN stays NaN

}  // namespace chorus::reduce
