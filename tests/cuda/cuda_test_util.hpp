#pragma once

// Helpers of the CUDA tests: element access in every dtype (fp16/bf16 by bit
// manipulation, independent of the library's converters).

#include <chorus/types.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>


namespace cuda_test {

inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      std::uint32_t m = man;
      do { ++e; m <<= 1; } while ((m & 0x400u) == 0);
      bits = sign | static_cast<std::uint32_t>(127 - 15 - e) << 23 | (m & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, through the hardware's own float16 type.
inline std::uint16_t float_to_half(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  std::uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

inline float bf16_to_float(std::uint16_t b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even (no NaN inputs here)
  return static_cast<std::uint16_t>(bits >> 16);
}

inline double load(chorus::DataType t, const void* p, std::size_t i) {
  using chorus::DataType;
  switch (t) {
    case DataType::Int8: return static_cast<const std::int8_t*>(p)[i];
    case DataType::UInt8: return static_cast<const std::uint8_t*>(p)[i];
    case DataType::Int32: return static_cast<const std::int32_t*>(p)[i];
    case DataType::UInt32: return static_cast<const std::uint32_t*>(p)[i];
    case DataType::Int64: return static_cast<double>(static_cast<const std::int64_t*>(p)[i]);
    case DataType::UInt64: return static_cast<double>(static_cast<const std::uint64_t*>(p)[i]);
    case DataType::Float16: return half_to_float(static_cast<const std::uint16_t*>(p)[i]);
    case DataType::BFloat16: return bf16_to_float(static_cast<const std::uint16_t*>(p)[i]);
    case DataType::Float32: return static_cast<const float*>(p)[i];
    case DataType::Float64: return static_cast<const double*>(p)[i];
  }
  return NAN;
}

inline void store(chorus::DataType t, void* p, std::size_t i, double v) {
  using chorus::DataType;
  switch (t) {
    case DataType::Int8: static_cast<std::int8_t*>(p)[i] = static_cast<std::int8_t>(v); break;
    case DataType::UInt8: static_cast<std::uint8_t*>(p)[i] = static_cast<std::uint8_t>(v); break;
    case DataType::Int32: static_cast<std::int32_t*>(p)[i] = static_cast<std::int32_t>(v); break;
    case DataType::UInt32: static_cast<std::uint32_t*>(p)[i] = static_cast<std::uint32_t>(v); break;
    case DataType::Int64: static_cast<std::int64_t*>(p)[i] = static_cast<std::int64_t>(v); break;
    case DataType::UInt64: static_cast<std::uint64_t*>(p)[i] = static_cast<std::uint64_t>(v); break;
    case DataType::Float16:
      static_cast<std::uint16_t*>(p)[i] = float_to_half(static_cast<float>(v));
      break;
    case DataType::BFloat16:
      static_cast<std::uint16_t*>(p)[i] = float_to_bf16(static_cast<float>(v));
      break;
    case DataType::Float32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DataType::Float64: static_cast<double*>(p)[i] = v; break;
  }
}

}  // namespace cuda_test
