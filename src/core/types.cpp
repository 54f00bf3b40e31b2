#include <chorus/error.hpp>
#include <chorus/types.hpp>

#include <string>

namespace chorus {

bool is_valid(DataType t) noexcept { return static_cast<int>(t) < kNumDataTypes; }
bool is_valid(ReduceOp op) noexcept { return static_cast<int>(op) < kNumReduceOps; }

std::size_t size_of(DataType t) {
  switch (t) {
    case DataType::Int8:
    case DataType::UInt8: return 1;
    case DataType::Float16:
    case DataType::BFloat16: return 2;
    case DataType::Int32:
    case DataType::UInt32:
    case DataType::Float32: return 4;
    case DataType::Int64:
    case DataType::UInt64:
    case DataType::Float64: return 8;
  }
  throw Error(ErrorCode::InvalidArgument,
              "unknown DataType value " + std::to_string(static_cast<int>(t)) +
                  " (valid: 0.." + std::to_string(kNumDataTypes - 1) + ")");
}

std::string_view to_string(DataType t) noexcept {
  switch (t) {
    case DataType::Int8: return "int8";
    case DataType::UInt8: return "uint8";
    case DataType::Int32: return "int32";
    case DataType::UInt32: return "uint32";
    case DataType::Int64: return "int64";
    case DataType::UInt64: return "uint64";
    case DataType::Float16: return "half";
    case DataType::BFloat16: return "bfloat16";
    case DataType::Float32: return "float";
    case DataType::Float64: return "double";
  }
  return "invalid-dtype";
}

std::string_view to_string(ReduceOp op) noexcept {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Prod: return "prod";
    case ReduceOp::Min: return "min";
    case ReduceOp::Max: return "max";
    case ReduceOp::Avg: return "avg";
  }
  return "invalid-op";
}

DataType parse_data_type(std::string_view n) {
  struct Alias { std::string_view name; DataType t; };
  static constexpr Alias kAliases[] = {
      {"int8", DataType::Int8},         {"uint8", DataType::UInt8},
      {"int32", DataType::Int32},       {"int", DataType::Int32},
      {"uint32", DataType::UInt32},     {"int64", DataType::Int64},
      {"uint64", DataType::UInt64},     {"half", DataType::Float16},
      {"float16", DataType::Float16},   {"fp16", DataType::Float16},
      {"bfloat16", DataType::BFloat16}, {"bf16", DataType::BFloat16},
      {"float", DataType::Float32},     {"float32", DataType::Float32},
      {"fp32", DataType::Float32},      {"double", DataType::Float64},
      {"float64", DataType::Float64},   {"fp64", DataType::Float64},
  };
  for (const auto& a : kAliases)
    if (a.name == n) return a.t;
  throw Error(ErrorCode::InvalidArgument,
              "unknown data type '" + std::string(n) +
                  "'; use one of int8, uint8, int32, uint32, int64, uint64, half, bfloat16, "
                  "float, double");
}

ReduceOp parse_reduce_op(std::string_view n) {
  for (int i = 0; i < kNumReduceOps; ++i)
    if (to_string(static_cast<ReduceOp>(i)) == n) return static_cast<ReduceOp>(i);
  throw Error(ErrorCode::InvalidArgument,
              "unknown reduction op '" + std::string(n) + "'; use one of sum, prod, min, max, avg");
}

bool is_floating_point(DataType t) noexcept {
  return t == DataType::Float16 || t == DataType::BFloat16 || t == DataType::Float32 ||
         t == DataType::Float64;
}

}  // namespace chorus
