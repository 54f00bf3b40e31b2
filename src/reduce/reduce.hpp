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
