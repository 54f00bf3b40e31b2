// The call check that every message carries, and the transport registry.

#include "transport.hpp"

#include <gtest/gtest.h>

#include <string>

namespace {

using chorus::DataType;
using chorus::ErrorCode;
using chorus::ReduceOp;
using chorus::transport::CallDesc;
using chorus::transport::Coll;

CallDesc allreduce(std::uint64_t count, std::uint64_t seq = 4) {
  CallDesc d;
  d.coll = Coll::Allreduce;
  d.dtype = DataType::Float32;
  d.op = ReduceOp::Sum;
  d.count = count;
  d.seq = seq;
  return d;
}

TEST(CallCheck, SameCallPasses) {
  EXPECT_NO_THROW(chorus::transport::check_same_call(allreduce(10), 0, allreduce(10), 1));
}

TEST(CallCheck, EveryFieldIsCompared) {
  const CallDesc mine = allreduce(200);
  CallDesc variants[6] = {mine, mine, mine, mine, mine, mine};
  variants[0].count = 100;
  variants[1].dtype = DataType::Int32;
  variants[2].op = ReduceOp::Max;
  variants[3].coll = Coll::Broadcast;
  variants[4].root = 2;
  variants[5].seq = 5;
  for (const auto& theirs : variants) {
    try {
      chorus::transport::check_same_call(mine, 0, theirs, 3);
      ADD_FAILURE() << "mismatch not detected: " << chorus::transport::describe(theirs);
    } catch (const chorus::Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::InvalidUsage);
      EXPECT_EQ(e.peer(), 3);
      const std::string what = e.what();
      // Both calls are named, each with its rank.
      EXPECT_NE(what.find(chorus::transport::describe(mine)), std::string::npos) << what;
      EXPECT_NE(what.find(chorus::transport::describe(theirs)), std::string::npos) << what;
      EXPECT_NE(what.find("rank 3"), std::string::npos) << what;
      EXPECT_NE(what.find("rank 0"), std::string::npos) << what;
    }
  }
}

TEST(CallCheck, DescribeIsReadable) {
  CallDesc b;
  b.coll = Coll::Broadcast;
  b.dtype = DataType::BFloat16;
  b.count = 7;
  b.root = 2;
  b.seq = 9;
  EXPECT_EQ(chorus::transport::describe(b), "broadcast #9 (count 7, bfloat16, root 2)");
  EXPECT_EQ(chorus::transport::describe(allreduce(1000, 5)), "allreduce #5 (count 1000, float, sum)");
  CallDesc garbage = allreduce(1);
  garbage.dtype = static_cast<DataType>(200);  // as if read off a corrupt wire
  EXPECT_NE(chorus::transport::describe(garbage).find("dtype 200"), std::string::npos);
}

TEST(Registry, TcpIsRegisteredAndUnknownNamesAreRejected) {
  const auto names = chorus::transport::transport_names();
  EXPECT_NE(std::find(names.begin(), names.end(), "tcp"), names.end());
  chorus::transport::TransportContext ctx;
  try {
    chorus::transport::create_transport("carrier-pigeon", ctx);
    ADD_FAILURE() << "unknown transport accepted";
  } catch (const chorus::Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find("tcp"), std::string::npos) << "should list known transports";
  }
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
