#pragma once

/// @file types.hpp
/// Element types and reduction operations understood by every collective.

#include <chorus/export.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace chorus {

/// Element type of a buffer. The numeric values are part of the wire format
/// and of the C ABI: never renumber.
enum class DataType : std::uint8_t {
  Int8 = 0,      ///< signed 8-bit integer
  UInt8 = 1,     ///< unsigned 8-bit integer
  Int32 = 2,     ///< signed 32-bit integer
  UInt32 = 3,    ///< unsigned 32-bit integer
  Int64 = 4,     ///< signed 64-bit integer
  UInt64 = 5,    ///< unsigned 64-bit integer
  Float16 = 6,   ///< IEEE 754 binary16 (reduced through float)
  BFloat16 = 7,  ///< bfloat16 (reduced through float)
  Float32 = 8,   ///< IEEE 754 binary32
  Float64 = 9,   ///< IEEE 754 binary64
};

/// Number of DataType values; a value >= kNumDataTypes is invalid.
inline constexpr int kNumDataTypes = 10;

/// Reduction operation. Numeric values are part of the wire format.
enum class ReduceOp : std::uint8_t {
  Sum = 0,   ///< elementwise sum
  Prod = 1,  ///< elementwise product
  Min = 2,   ///< elementwise minimum
  Max = 3,   ///< elementwise maximum
  Avg = 4,   ///< sum divided by the world size (integer division for integer types)
};

/// Number of ReduceOp values; a value >= kNumReduceOps is invalid.
inline constexpr int kNumReduceOps = 5;

/// Where a buffer lives. Chorus tells them apart itself (docs/cuda.md): every
/// collective accepts either kind.
enum class MemoryKind : std::uint8_t {
  Host = 0,  ///< ordinary or pinned host memory
  Cuda = 1,  ///< CUDA device memory
};

/// True if `t` is one of the enumerators above (guards casts from integers).
CHORUS_API bool is_valid(DataType t) noexcept;
/// True if `op` is one of the enumerators above.
CHORUS_API bool is_valid(ReduceOp op) noexcept;

/// Size in bytes of one element of `t`. Throws Error(InvalidArgument) for an invalid type.
CHORUS_API std::size_t size_of(DataType t);

/// Lower-case name of `t` as used by chorus-bench ("float", "half", "bfloat16", "int32", ...).
CHORUS_API std::string_view to_string(DataType t) noexcept;
/// Lower-case name of `op` ("sum", "prod", "min", "max", "avg").
CHORUS_API std::string_view to_string(ReduceOp op) noexcept;

/// Parses a type name. Accepts the nccl-tests spellings (float, half, bfloat16,
/// double, int8, uint8, int32, uint32, int64, uint64) and the aliases float16,
/// float32, float64, fp16, bf16, fp32, fp64. Throws Error(InvalidArgument) naming
/// the accepted values.
CHORUS_API DataType parse_data_type(std::string_view name);
/// Parses an op name (sum, prod, min, max, avg). Throws Error(InvalidArgument).
CHORUS_API ReduceOp parse_reduce_op(std::string_view name);

/// True for the floating-point types (Float16, BFloat16, Float32, Float64).
CHORUS_API bool is_floating_point(DataType t) noexcept;

}  // namespace chorus
