// Unit tests for the public vocabulary types: DataType, ReduceOp (types.hpp)
// and chorus::Error (error.hpp).

#include <chorus/error.hpp>
#include <chorus/types.hpp>

#include <gtest/gtest.h>

#include <iterator>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace {

using chorus::DataType;
using chorus::Error;
using chorus::ErrorCode;
using chorus::ReduceOp;

TEST(DataType, SizeOfEveryType) {
  const std::pair<DataType, std::size_t> expected[] = {
      {DataType::Int8, 1},    {DataType::UInt8, 1},    {DataType::Int32, 4},
      {DataType::UInt32, 4},  {DataType::Int64, 8},    {DataType::UInt64, 8},
      {DataType::Float16, 2}, {DataType::BFloat16, 2}, {DataType::Float32, 4},
      {DataType::Float64, 8},
  };
  static_assert(std::size(expected) == chorus::kNumDataTypes);
  for (const auto& [t, size] : expected) EXPECT_EQ(chorus::size_of(t), size) << chorus::to_string(t);
}

TEST(DataType, SizeOfInvalidThrowsInvalidArgument) {
  try {
    (void)chorus::size_of(static_cast<DataType>(chorus::kNumDataTypes));
    FAIL() << "no exception";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::InvalidArgument);
  }
}

TEST(DataType, NcclTestsSpellingsParse) {
  const std::pair<std::string_view, DataType> spellings[] = {
      {"float", DataType::Float32},     {"half", DataType::Float16},  {"bfloat16", DataType::BFloat16},
      {"double", DataType::Float64},    {"int8", DataType::Int8},     {"uint8", DataType::UInt8},
      {"int32", DataType::Int32},       {"uint32", DataType::UInt32}, {"int64", DataType::Int64},
      {"uint64", DataType::UInt64},
  };
  for (const auto& [name, t] : spellings) {
    EXPECT_EQ(chorus::parse_data_type(name), t) << name;
    // These are also the canonical names, so printing gives back the spelling.
    EXPECT_EQ(chorus::to_string(t), name);
  }
}

TEST(DataType, AliasesParse) {
  const std::pair<std::string_view, DataType> aliases[] = {
      {"float16", DataType::Float16}, {"fp16", DataType::Float16}, {"bf16", DataType::BFloat16},
      {"float32", DataType::Float32}, {"fp32", DataType::Float32}, {"float64", DataType::Float64},
      {"fp64", DataType::Float64},
  };
  for (const auto& [name, t] : aliases) EXPECT_EQ(chorus::parse_data_type(name), t) << name;
}

TEST(DataType, ToStringRoundTripsForEveryType) {
  for (int i = 0; i < chorus::kNumDataTypes; ++i) {
    const auto t = static_cast<DataType>(i);
    EXPECT_EQ(chorus::parse_data_type(chorus::to_string(t)), t) << i;
  }
}

TEST(DataType, ParseErrorsThrowInvalidArgument) {
  for (std::string_view bad : {"", "Float", "FLOAT", "int16", "float ", "fp8", "complex64"}) {
    try {
      (void)chorus::parse_data_type(bad);
      ADD_FAILURE() << "'" << bad << "' parsed";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::InvalidArgument) << bad;
      // The message names what is accepted, so a user can fix the typo.
      EXPECT_NE(std::string(e.what()).find("bfloat16"), std::string::npos) << e.what();
    }
  }
}

TEST(DataType, IsValidRejectsOutOfRangeCasts) {
  for (int i = 0; i < chorus::kNumDataTypes; ++i) EXPECT_TRUE(chorus::is_valid(static_cast<DataType>(i)));
  for (int i : {chorus::kNumDataTypes, 11, 77, 255})
    EXPECT_FALSE(chorus::is_valid(static_cast<DataType>(i))) << i;
  EXPECT_EQ(chorus::to_string(static_cast<DataType>(77)), "invalid-dtype");
}

TEST(DataType, IsFloatingPoint) {
  for (int i = 0; i < chorus::kNumDataTypes; ++i) {
    const auto t = static_cast<DataType>(i);
    const bool want = t == DataType::Float16 || t == DataType::BFloat16 || t == DataType::Float32 ||
                      t == DataType::Float64;
    EXPECT_EQ(chorus::is_floating_point(t), want) << chorus::to_string(t);
  }
}

TEST(DataType, WireValuesAreStable) {
  // Part of the wire format and the C ABI: renumbering breaks mixed versions.
  EXPECT_EQ(static_cast<int>(DataType::Int8), 0);
  EXPECT_EQ(static_cast<int>(DataType::Float16), 6);
  EXPECT_EQ(static_cast<int>(DataType::Float64), 9);
  EXPECT_EQ(static_cast<int>(ReduceOp::Sum), 0);
  EXPECT_EQ(static_cast<int>(ReduceOp::Avg), 4);
  EXPECT_EQ(static_cast<int>(ErrorCode::InvalidArgument), 1);
  EXPECT_EQ(static_cast<int>(ErrorCode::Internal), 9);
}

TEST(ReduceOpNames, RoundTripAndSpellings) {
  const std::pair<std::string_view, ReduceOp> names[] = {
      {"sum", ReduceOp::Sum}, {"prod", ReduceOp::Prod}, {"min", ReduceOp::Min},
      {"max", ReduceOp::Max}, {"avg", ReduceOp::Avg},
  };
  static_assert(std::size(names) == chorus::kNumReduceOps);
  for (const auto& [name, op] : names) {
    EXPECT_EQ(chorus::parse_reduce_op(name), op) << name;
    EXPECT_EQ(chorus::to_string(op), name);
  }
}

TEST(ReduceOpNames, ParseErrorsAndValidity) {
  for (std::string_view bad : {"", "Sum", "mean", "product"}) {
    try {
      (void)chorus::parse_reduce_op(bad);
      ADD_FAILURE() << "'" << bad << "' parsed";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::InvalidArgument) << bad;
    }
  }
  for (int i = 0; i < chorus::kNumReduceOps; ++i) EXPECT_TRUE(chorus::is_valid(static_cast<ReduceOp>(i)));
  for (int i : {chorus::kNumReduceOps, 9, 200}) EXPECT_FALSE(chorus::is_valid(static_cast<ReduceOp>(i))) << i;
  EXPECT_EQ(chorus::to_string(static_cast<ReduceOp>(9)), "invalid-op");
}

TEST(ErrorType, WhatCodeAndPeer) {
  const Error e(ErrorCode::PeerFailure, "rank 3 closed its connection", 3);
  EXPECT_EQ(std::string(e.what()), "chorus: PeerFailure: rank 3 closed its connection");
  EXPECT_EQ(e.code(), ErrorCode::PeerFailure);
  EXPECT_EQ(e.peer(), 3);
  EXPECT_EQ(e.message(), "rank 3 closed its connection");

  const Error t(ErrorCode::Timeout, "allreduce took longer than 30 s");
  EXPECT_EQ(t.peer(), -1);  // no single peer to blame by default
  EXPECT_EQ(std::string(t.what()).rfind("chorus: Timeout: ", 0), 0u) << t.what();
}

TEST(ErrorType, EveryCodeHasItsNameInWhat) {
  const std::pair<ErrorCode, std::string_view> codes[] = {
      {ErrorCode::InvalidArgument, "InvalidArgument"}, {ErrorCode::InvalidUsage, "InvalidUsage"},
      {ErrorCode::Timeout, "Timeout"},                 {ErrorCode::PeerFailure, "PeerFailure"},
      {ErrorCode::Transport, "Transport"},             {ErrorCode::System, "System"},
      {ErrorCode::Aborted, "Aborted"},                 {ErrorCode::Cuda, "Cuda"},
      {ErrorCode::Internal, "Internal"},
  };
  for (const auto& [code, name] : codes) {
    EXPECT_EQ(chorus::to_string(code), name);
    const Error e(code, "x");
    EXPECT_EQ(std::string(e.what()), "chorus: " + std::string(name) + ": x");
    EXPECT_EQ(e.code(), code);
  }
}

TEST(ErrorType, IsARuntimeError) {
  // Callers that only know the standard library still see the message.
  try {
    throw Error(ErrorCode::Aborted, "communicator aborted", 1);
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "chorus: Aborted: communicator aborted");
    const auto* ce = dynamic_cast<const Error*>(&e);
    ASSERT_NE(ce, nullptr);
    EXPECT_EQ(ce->peer(), 1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
