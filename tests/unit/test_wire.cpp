// The call check that every message carries, and the transport registry.

#include "transport.hpp"

#include <gtest/gtest.h>

#include <stdlib.h>

#include <filesystem>
#include <string>
#include <thread>

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

// The wait chain a timed-out rank follows through the timeout reports of
// the others (rank -> the rank it gave up waiting for).
TEST(TimeoutChain, EndsAtTheRankThatReportedNothing) {
  // 3 waited for 2, 2 for 1; 1 (stopped) never reported.
  const chorus::Error e = chorus::transport::timeout_chain_error({{3, 2}, {2, 1}}, 3, 4);
  EXPECT_EQ(e.code(), ErrorCode::Timeout);
  EXPECT_EQ(e.peer(), 1);
  EXPECT_EQ(e.message(),
            "rank 1 did not respond within the deadline (rank 3 waited for rank 2, rank "
            "2 waited for rank 1); it is stopped, stuck or much slower. Raise "
            "CHORUS_TIMEOUT if it is only slow.");
}

TEST(TimeoutChain, ACycleBlamesTheOneRankThatReportedNothing) {
  // Ranks 0 and 2 gave up on each other (0 with a shorter deadline); 3 too,
  // on 2. Rank 1, stopped, is the only one that never reported.
  const chorus::Error e = chorus::transport::timeout_chain_error({{0, 2}, {2, 0}, {3, 2}}, 2, 4);
  EXPECT_EQ(e.peer(), 1);
  EXPECT_EQ(e.message(),
            "the ranks that timed out waited for one another in a cycle (rank 2 waited "
            "for rank 0, rank 0 waited for rank 2); rank 1 reported nothing: it is "
            "stopped, stuck or much slower. Raise CHORUS_TIMEOUT if it is only slow.");
}

TEST(TimeoutChain, ACycleWithSeveralSilentRanksNamesThemAndBlamesNone) {
  const chorus::Error e = chorus::transport::timeout_chain_error({{0, 2}, {2, 0}}, 0, 4);
  EXPECT_EQ(e.peer(), -1);
  EXPECT_NE(e.message().find("rank 1 and rank 3 reported nothing"), std::string::npos)
      << e.message();
}

TEST(TimeoutChain, ACycleOfEveryRankIsADeadlock) {
  const chorus::Error e = chorus::transport::timeout_chain_error({{0, 1}, {1, 0}}, 1, 2);
  EXPECT_EQ(e.peer(), -1);
  EXPECT_NE(e.message().find("(rank 1 waited for rank 0, rank 0 waited for rank 1), and every rank "
                             "did: a deadlock"),
            std::string::npos)
      << e.message();
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

// Two TCP transport endpoints of one communicator in this process, their
// addresses exchanged through a FileStore in a fresh directory.
class TcpPair : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/chorus-wire-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto store = std::make_shared<chorus::FileStore>(dir_);
    for (int r = 0; r < 2; ++r) {
      chorus::transport::TransportContext ctx;
      ctx.rank = r;
      ctx.size = 2;
      ctx.comm_id = 77;
      ctx.store = store;
      ctx.connect_timeout = std::chrono::seconds(5);
      t_[r] = chorus::transport::create_transport("tcp", ctx);
    }
  }
  void TearDown() override {
    t_[0].reset();
    t_[1].reset();
    std::filesystem::remove_all(dir_);
  }
  static chorus::transport::Deadline soon() {
    return chorus::transport::Clock::now() + std::chrono::seconds(5);
  }
  // Drives `t` for a while; returns the error it throws, or "" if none.
  static std::string drive(chorus::transport::Transport& t, std::chrono::milliseconds how_long) {
    const auto until = chorus::transport::Clock::now() + how_long;
    try {
      while (chorus::transport::Clock::now() < until) {
        t.progress();
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    } catch (const chorus::Error& e) {
      return e.what();
    }
    return "";
  }
  std::string dir_;
  std::unique_ptr<chorus::transport::Transport> t_[2];
};

// A frame nobody receives (the tagged transports open their control
// connections with one) and a connection the peer has not accepted yet must
// not turn the peer's clean exit into a reset, which reads as a crash.
TEST_F(TcpPair, CleanExitWithAnUnreadFrameIsNotACrash) {
  CallDesc hello;  // like tagged.cpp's first contact: a zero-byte frame
  auto req = t_[0]->isend(1, hello, nullptr, 0);
  ASSERT_NO_THROW(t_[0]->wait({&req, 1}, soon()));
  t_[1].reset();  // never read the frame, never accepted the connection
  EXPECT_EQ(drive(*t_[0], std::chrono::milliseconds(300)), "");
}

// The same with traffic both ways before the exit.
TEST_F(TcpPair, CleanExitAfterAnExchangeIsNotACrash) {
  std::int32_t a = 5, b = 0;
  CallDesc d = allreduce(1);
  d.dtype = DataType::Int32;
  auto s = t_[1]->isend(0, d, &a, sizeof a);
  auto r = t_[0]->irecv(1, d, &b, sizeof b, chorus::transport::Combine::copy());
  const auto until = soon();
  while (!(s->done && r->done) && chorus::transport::Clock::now() < until) {
    t_[0]->progress();
    t_[1]->progress();
  }
  ASSERT_TRUE(s->done && r->done);
  EXPECT_EQ(b, 5);
  CallDesc hello;
  auto req = t_[0]->isend(1, hello, nullptr, 0);  // unread by rank 1
  ASSERT_NO_THROW(t_[0]->wait({&req, 1}, soon()));
  t_[1].reset();
  EXPECT_EQ(drive(*t_[0], std::chrono::milliseconds(300)), "");
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
