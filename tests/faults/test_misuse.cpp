// Misuse: ranks that disagree on a call, bad arguments, empty handles and
// launch mistakes must fail with a precise code and a message that names the
// problem, never hang or crash. See fault_harness.hpp for the process model.

#include "fault_harness.hpp"

#include <chorus/communicator.hpp>
#include <chorus/error.hpp>
#include <chorus/store.hpp>
#include <chorus/types.hpp>

#include <gtest/gtest.h>

#include "transport_probe.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;
using chorus::Communicator;
using chorus::DataType;
using chorus::ErrorCode;
using chorus::ReduceOp;
using faults::Group;
using faults::RankContext;
using faults::Result;
using faults::kHangBound;
using faults::kLongTimeout;
using faults::kReportWait;

double bound_s() { return std::chrono::duration<double>(kHangBound).count(); }

faults::Nanos after_ns(faults::Nanos t, std::chrono::nanoseconds d) { return t + d.count(); }

// ---- 3. Ranks that disagree on a call -----------------------------------------

constexpr int kRanks = 4;
constexpr std::size_t kCount = 200;

struct Mismatch {
  const char* name;
  // Runs this rank's (possibly different) call on `comm`.
  void (*call)(Communicator& comm, int rank, std::vector<float>& buf);
  // Every rank's error message must contain both.
  const char* mine;
  const char* theirs;
};

// The mismatches force the algorithms the first version always ran for
// these calls (recursive doubling, chain), whose message patterns make every
// rank meet the mismatch inside the mismatched call, so that every error
// names the two calls that disagree. With other pairs of algorithms (a
// binomial broadcast, or a ring allreduce against a chain broadcast) a rank
// that has nothing more to receive completes the call and meets a peer's
// message in its next call: it still fails with InvalidUsage, but the
// message names that next call (docs/errors.md). The "Algorithm" case covers
// ranks forcing different algorithms.
chorus::CallOptions forced(const char* algorithm) {
  chorus::CallOptions o;
  o.algorithm = algorithm;
  return o;
}

void allreduce_sum(Communicator& comm, std::vector<float>& buf, std::size_t count) {
  comm.allreduce(buf.data(), buf.data(), count, DataType::Float32, ReduceOp::Sum, forced("recursive_doubling"));
}

const Mismatch kMismatches[] = {
    {"Count",
     [](Communicator& comm, int rank, std::vector<float>& buf) {
       allreduce_sum(comm, buf, rank == 1 ? 100 : kCount);
     },
     "count 100", "count 200"},
    {"Collective",
     [](Communicator& comm, int rank, std::vector<float>& buf) {
       if (rank == 0) comm.broadcast(buf.data(), buf.data(), kCount, DataType::Float32, 0, forced("chain"));
       else allreduce_sum(comm, buf, kCount);
     },
     "broadcast", "allreduce"},
    {"DataType",
     [](Communicator& comm, int rank, std::vector<float>& buf) {
       // Same byte size on every rank: only the call description differs.
       if (rank == 2) comm.allreduce(buf.data(), buf.data(), kCount, DataType::Int32, ReduceOp::Sum, forced("recursive_doubling"));
       else allreduce_sum(comm, buf, kCount);
     },
     "int32", "float"},
    {"Root",
     [](Communicator& comm, int rank, std::vector<float>& buf) {
       comm.broadcast(buf.data(), buf.data(), kCount, DataType::Float32, rank == 3 ? 1 : 0,
                      forced("chain"));
     },
     "root 0", "root 1"},
    {"Op",
     [](Communicator& comm, int rank, std::vector<float>& buf) {
       comm.allreduce(buf.data(), buf.data(), kCount, DataType::Float32,
                      rank == 0 ? ReduceOp::Max : ReduceOp::Sum, forced("recursive_doubling"));
     },
     "max", "sum"},
    {"Algorithm",
     [](Communicator& comm, int rank, std::vector<float>& buf) {
       // Everything equal but the algorithm, forced differently per call.
       chorus::CallOptions o;
       o.algorithm = rank == 1 ? "ring" : "recursive_doubling";
       comm.allreduce(buf.data(), buf.data(), kCount, DataType::Float32, ReduceOp::Sum, o);
     },
     "algorithm #1", "algorithm #2"},
};

// gtest prints a parameter of a failed case; the name says it all.
void PrintTo(const Mismatch& m, std::ostream* os) { *os << m.name; }

class MismatchedCalls : public ::testing::TestWithParam<Mismatch> {};

TEST_P(MismatchedCalls, EveryRankFailsWithInvalidUsageNamingBothCalls) {
  const Mismatch m = GetParam();
  Group g(kRanks, [m](RankContext& ctx) {
    auto comm = ctx.create(kLongTimeout);
    std::vector<float> buf(kCount, 1.0f);
    ctx.started();
    ctx.attempt("call", [&] { m.call(comm, ctx.rank(), buf); });
    // A rank whose part of the call needs nothing from the others (a
    // broadcast root) can return before anyone sees the mismatch; it must
    // learn of it no later than its next call.
    ctx.attempt("next", [&] { comm.barrier(); });
    ctx.hold();
  });
  std::string why;
  ASSERT_TRUE(g.wait_started(60s, &why)) << why;
  // One deadline for all ranks: a rank that hangs costs kReportWait once.
  const faults::Nanos deadline = faults::now_ns() + std::chrono::nanoseconds(kReportWait).count();
  for (int r = 0; r < kRanks; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const auto call = g.result(r, "call", deadline);
    const auto next = call ? g.result(r, "next", deadline) : std::nullopt;
    if (!call || !next) {
      ADD_FAILURE() << (call ? "the call after the mismatch" : "the mismatched call")
                    << " did not return within " << kReportWait.count() << " s (hang?); rank " << r
                    << " is " << g.status(r) << (call ? "; the call was " + call->describe() : "");
      continue;
    }
    std::printf("[ outcome  ] %s rank %d: %s | %s\n", m.name, r, call->describe().c_str(),
                next->describe().c_str());
    // Every rank learns of the mismatch as InvalidUsage, at the latest in its next call.
    const Result& first = call->ok ? *next : *call;
    EXPECT_EQ(first.error_code(), ErrorCode::InvalidUsage) << first.describe();
    EXPECT_TRUE(first.has("disagree")) << first.describe();
    EXPECT_LT(faults::seconds_between(call->start_ns, first.end_ns), bound_s()) << first.describe();
    EXPECT_FALSE(next->ok) << "a call after a mismatch must fail: " << next->describe();
    // The message names both of the calls that disagree (not a later call
    // caught in the fallout). A rank that only sends in the mismatched call
    // (a broadcast root, the chain upstream of the odd rank) may complete it:
    // nothing in that call comes back to it (docs/errors.md).
    EXPECT_TRUE(first.has(m.mine) && first.has(m.theirs))
        << "the message must name both calls (\"" << m.mine << "\", \"" << m.theirs
        << "\"): " << first.describe();
  }
}

// An alltoallv whose counts disagree on one pair: rank 0 sends rank 1 five
// elements, rank 1 expects four from it; every other pair agrees. Rank 1
// meets it in the header and fails naming both counts; rank 0 and rank 2,
// whose own messages all matched, learn of it no later than their next call.
TEST(MismatchedAlltoallv, ThePairsCountsAreNamedAndEveryRankFails) {
  Group g(3, [](RankContext& ctx) {
    auto comm = ctx.create(kLongTimeout);
    std::vector<float> send(32, 1.0f), recv(32, 0.0f);
    std::vector<std::size_t> sendcounts(3, 2), recvcounts(3, 2);
    if (ctx.rank() == 0) sendcounts[1] = 5;
    if (ctx.rank() == 1) recvcounts[0] = 4;
    ctx.started();
    ctx.attempt("call", [&] {
      comm.alltoallv(send.data(), sendcounts, recv.data(), recvcounts, DataType::Float32);
    });
    ctx.attempt("next", [&] { comm.barrier(); });
    ctx.hold();
  });
  std::string why;
  ASSERT_TRUE(g.wait_started(60s, &why)) << why;
  const faults::Nanos deadline = faults::now_ns() + std::chrono::nanoseconds(kReportWait).count();
  const auto one = g.result(1, "call", deadline);
  ASSERT_TRUE(one) << "rank 1's alltoallv did not return; it is " << g.status(1);
  EXPECT_EQ(one->error_code(), ErrorCode::InvalidUsage) << one->describe();
  EXPECT_TRUE(one->has("rank 0 sends 5 elements to rank 1") && one->has("expects 4 from rank 0"))
      << one->describe();
  for (int r : {0, 2}) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const auto call = g.result(r, "call", deadline);
    const auto next = call ? g.result(r, "next", deadline) : std::nullopt;
    ASSERT_TRUE(call && next) << "rank " << r << " did not return (hang?); it is " << g.status(r);
    const Result& first = call->ok ? *next : *call;
    EXPECT_FALSE(first.ok) << "rank " << r << " never learned of the mismatch";
    EXPECT_TRUE(first.has("sends 5 elements")) << first.describe();
    EXPECT_LT(faults::seconds_between(one->end_ns, first.end_ns), bound_s()) << first.describe();
  }
}

// A call with a count per rank whose counts differ on one rank but sum to
// the same: rank 1 passes {3, 1, 2} where the others pass {1, 3, 2}.
// `call(comm, counts)` makes it. Every rank must fail with InvalidUsage
// naming the counts, no later than its next call.
template <typename Call>
void expect_counts_mismatch(const std::string& name, Call call) {
  Group g(3, [call](RankContext& ctx) {
    auto comm = ctx.create(kLongTimeout);
    std::vector<std::size_t> counts = {1, 3, 2};
    if (ctx.rank() == 1) counts = {3, 1, 2};
    ctx.started();
    ctx.attempt("call", [&] { call(comm, counts); });
    ctx.attempt("next", [&] { comm.barrier(); });
    ctx.hold();
  });
  std::string why;
  ASSERT_TRUE(g.wait_started(60s, &why)) << why;
  const faults::Nanos deadline = faults::now_ns() + std::chrono::nanoseconds(kReportWait).count();
  for (int r = 0; r < 3; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const auto first_call = g.result(r, "call", deadline);
    const auto next = first_call ? g.result(r, "next", deadline) : std::nullopt;
    ASSERT_TRUE(first_call && next)
        << "rank " << r << " did not return (hang?); it is " << g.status(r);
    const Result& first = first_call->ok ? *next : *first_call;
    EXPECT_EQ(first.error_code(), ErrorCode::InvalidUsage) << first.describe();
    EXPECT_TRUE(first.has("disagree on the counts of " + name) && first.has("summing to 6"))
        << first.describe();
  }
}

TEST(MismatchedAllgatherv, DifferentCountsWithTheSameSumFailEveryRank) {
  expect_counts_mismatch("allgatherv",
                         [](chorus::Communicator& comm, const std::vector<std::size_t>& counts) {
                           std::vector<float> send(4, 1.0f), recv(8, 0.0f);
                           comm.allgatherv(send.data(), recv.data(), counts, DataType::Float32);
                         });
}

// The same for a reduce_scatterv: rank 1 expects another block of the
// reduction and would combine the wrong elements.
TEST(MismatchedReduceScatterv, DifferentCountsWithTheSameSumFailEveryRank) {
  expect_counts_mismatch(
      "reduce_scatterv", [](chorus::Communicator& comm, const std::vector<std::size_t>& counts) {
        std::vector<float> send(6, 1.0f), recv(3, 0.0f);
        comm.reduce_scatterv(send.data(), recv.data(), counts, DataType::Float32, ReduceOp::Sum);
      });
}

// A point-to-point size mismatch: rank 0 sends `sent` elements, rank 1
// receives `asked`. Rank 1 sees it in the header; a small send has already
// completed, so rank 0 can only learn of it from rank 1's notice, in its next
// call, which must fail rather than wait for a peer that has given up.
void expect_mismatch_reported(std::size_t sent, std::size_t asked) {
  Group g(2, [sent, asked](RankContext& ctx) {
    auto comm = ctx.create(kLongTimeout);
    std::vector<float> buf(std::max(sent, asked), 1.0f);
    ctx.started();
    if (ctx.rank() == 0) {
      ctx.attempt("call", [&] { comm.send(buf.data(), sent, DataType::Float32, 1); });
      ctx.attempt("next", [&] { comm.recv(buf.data(), 1, DataType::Float32, 1); });
    } else {
      ctx.attempt("call", [&] { comm.recv(buf.data(), asked, DataType::Float32, 0); });
      ctx.attempt("next", [&] { comm.send(buf.data(), 1, DataType::Float32, 0); });
    }
    ctx.hold();
  });
  const std::string says_sent = "count " + std::to_string(sent);
  const std::string says_asked = "count " + std::to_string(asked);
  std::string why;
  ASSERT_TRUE(g.wait_started(60s, &why)) << why;
  const auto recv = g.result(1, "call", kReportWait);
  ASSERT_TRUE(recv) << "rank 1's recv did not return; it is " << g.status(1);
  EXPECT_EQ(recv->error_code(), ErrorCode::InvalidUsage) << recv->describe();
  EXPECT_TRUE(recv->has(says_sent) && recv->has(says_asked)) << recv->describe();
  const auto send = g.result(0, "call", kReportWait);
  ASSERT_TRUE(send) << "rank 0's send did not return; it is " << g.status(0);
  const auto next = g.result(0, "next", after_ns(recv->end_ns, kReportWait));
  ASSERT_TRUE(next) << "rank 0's next call waits on rank 1, which failed " << kReportWait.count()
                    << " s ago and did not tell rank 0 (send was: " << send->describe() << ")";
  const Result& first = send->ok ? *next : *send;
  EXPECT_EQ(first.error_code(), ErrorCode::InvalidUsage) << first.describe();
  EXPECT_TRUE(first.has(says_sent) && first.has(says_asked)) << first.describe();
  EXPECT_LT(faults::seconds_between(recv->end_ns, first.end_ns), bound_s()) << first.describe();
}

TEST(MismatchedPointToPoint, SenderLearnsOfTheMismatchInItsNextCall) {
  expect_mismatch_reported(10, 20);
}

// The same with payloads of megabytes, which the fabric transports deliver
// after the receiver's Ready (and by one-sided writes where they can): the
// sender must fail too, naming both calls, not write or wait.
TEST(MismatchedPointToPoint, LargeMessagesFailOnBothSides) {
  expect_mismatch_reported(std::size_t{1} << 20, std::size_t{2} << 20);
}

// The data of a receive arrived before another rank's failure notice: the
// receive completes with it, and the rank learns of the failure in its next
// call. (The last rank to leave a collective must not fail it because the
// others failed in the next one: seen in CI, a barrier that failed on rank 2
// with the mismatch ranks 0 and 1 met after leaving it.) Rank 0 sends rank 2
// four values, then rank 0 and rank 1 disagree on a message's size; rank 2
// posts its receive only once rank 1 has failed and told it so.
TEST(MismatchedPointToPoint, DataThatArrivedBeforeAFailureNoticeIsStillReceived) {
  Group g(3, [](RankContext& ctx) {
    auto comm = ctx.create(kLongTimeout);
    std::vector<float> buf(20, 0.0f);
    // Every pair connected first: over a fabric, a send to a peer it has not
    // met completes only once that peer takes part in the handshake. Ranks
    // 0 and 1 go on only once every rank has left the barrier: rank 1's
    // notice read while rank 2 is still in it would rightly fail rank 2's
    // next call.
    comm.barrier();
    ctx.started();
    if (ctx.rank() != 2 && !ctx.wait_go()) return;
    if (ctx.rank() == 0) {
      const std::vector<float> data = {1.5f, -2.0f, 3.25f, 4.0f};
      ctx.attempt("data", [&] { comm.send(data.data(), data.size(), DataType::Float32, 2); });
      ctx.attempt("call", [&] { comm.send(buf.data(), 10, DataType::Float32, 1); });
    } else if (ctx.rank() == 1) {
      ctx.attempt("call", [&] { comm.recv(buf.data(), 20, DataType::Float32, 0); });
    } else {
      if (!ctx.wait_go()) return;
      ctx.attempt("recv", [&] {
        comm.recv(buf.data(), 4, DataType::Float32, 0);
        if (buf[0] != 1.5f || buf[1] != -2.0f || buf[2] != 3.25f || buf[3] != 4.0f)
          throw std::runtime_error("wrong values received: " + std::to_string(buf[0]) + " " +
                                   std::to_string(buf[1]) + " " + std::to_string(buf[2]) + " " +
                                   std::to_string(buf[3]));
      });
      ctx.attempt("next", [&] { comm.barrier(); });
    }
    ctx.hold();
  });
  std::string why;
  ASSERT_TRUE(g.wait_started(60s, &why)) << why;
  g.go(0);
  g.go(1);
  const auto data = g.result(0, "data", kReportWait);
  ASSERT_TRUE(data) << "rank 0's send to rank 2 did not return; it is " << g.status(0);
  ASSERT_TRUE(data->ok) << data->describe();
  const auto failed = g.result(1, "call", kReportWait);
  ASSERT_TRUE(failed) << "rank 1's recv did not return; it is " << g.status(1);
  ASSERT_EQ(failed->error_code(), ErrorCode::InvalidUsage) << failed->describe();
  // Rank 1 wrote its notice before its call returned; give a socket a
  // moment to carry it, so that rank 2 finds both waiting.
  std::this_thread::sleep_for(200ms);
  g.go(2);
  const auto recv = g.result(2, "recv", kReportWait);
  ASSERT_TRUE(recv) << "rank 2's recv did not return; it is " << g.status(2);
  EXPECT_TRUE(recv->ok) << "the data had arrived before the notice: " << recv->describe();
  const auto next = g.result(2, "next", kReportWait);
  ASSERT_TRUE(next) << "rank 2's next call did not return; it is " << g.status(2);
  EXPECT_EQ(next->error_code(), ErrorCode::InvalidUsage) << next->describe();
  EXPECT_TRUE(next->has("rank 1") && next->has("count 10") && next->has("count 20"))
      << next->describe();
}

INSTANTIATE_TEST_SUITE_P(Calls, MismatchedCalls, ::testing::ValuesIn(kMismatches),
                         [](const ::testing::TestParamInfo<Mismatch>& param_info) {
                           return std::string(param_info.param.name);
                         });

// ---- 5. Invalid arguments -------------------------------------------------------

struct Expect {
  const char* label;
  ErrorCode code;
  const char* text;  // the message must contain it
};

void expect_reports(Group& g, int rank, const std::vector<Expect>& expects) {
  for (const Expect& e : expects) {
    SCOPED_TRACE(std::string("rank ") + std::to_string(rank) + ": " + e.label);
    const auto r = g.result(rank, e.label, kReportWait);
    ASSERT_TRUE(r) << "no report (crash or hang?); rank is " << g.status(rank);
    EXPECT_FALSE(r->ok) << "the call was accepted";
    EXPECT_EQ(r->error_code(), e.code) << r->describe();
    EXPECT_TRUE(r->has(e.text)) << "message lacks \"" << e.text << "\": " << r->describe();
    EXPECT_LT(r->seconds(), 1.0) << "argument checks must not wait: " << r->describe();
  }
}

TEST(InvalidArguments, SingleRankRejectsBadArgumentsAndStaysUsable) {
  const std::vector<Expect> expects = {
      {"allreduce null sendbuf", ErrorCode::InvalidArgument, "sendbuf is null"},
      {"allreduce null recvbuf", ErrorCode::InvalidArgument, "recvbuf is null"},
      {"broadcast null recvbuf", ErrorCode::InvalidArgument, "recvbuf is null"},
      {"allgather null sendbuf", ErrorCode::InvalidArgument, "sendbuf is null"},
      {"reduce_scatter null recvbuf", ErrorCode::InvalidArgument, "recvbuf is null"},
      {"alltoall null sendbuf", ErrorCode::InvalidArgument, "sendbuf is null"},
      {"dtype 42", ErrorCode::InvalidArgument, "DataType value 42"},
      {"op 9", ErrorCode::InvalidArgument, "ReduceOp value 9"},
      {"broadcast dtype 42", ErrorCode::InvalidArgument, "DataType value 42"},
      {"broadcast root -1", ErrorCode::InvalidArgument, "root -1"},
      {"broadcast root size", ErrorCode::InvalidArgument, "root 1"},
      {"reduce root size", ErrorCode::InvalidArgument, "root 1"},
      {"gather root -1", ErrorCode::InvalidArgument, "root -1"},
      {"scatter root size", ErrorCode::InvalidArgument, "root 1"},
      {"send to self", ErrorCode::InvalidArgument, "peer is this rank"},
      {"recv from self", ErrorCode::InvalidArgument, "peer is this rank"},
      {"send to rank size", ErrorCode::InvalidArgument, "peer 1"},
      {"recv from rank 5", ErrorCode::InvalidArgument, "peer 5"},
      {"send to rank -1", ErrorCode::InvalidArgument, "peer -1"},
      {"allreduce overlapping", ErrorCode::InvalidArgument, "overlap"},
      {"alltoall overlapping", ErrorCode::InvalidArgument, "overlap"},
      {"allreduce wrapped count", ErrorCode::InvalidArgument, "too large"},
      {"allreduce_async dtype 42", ErrorCode::InvalidArgument, "DataType value 42"},
      {"unknown algorithm", ErrorCode::InvalidArgument, "unknown algorithm"},
      {"alltoallv too few counts", ErrorCode::InvalidArgument, "one per rank (1)"},
      {"alltoallv self counts differ", ErrorCode::InvalidArgument, "recvcounts[0] is 3"},
      {"alltoallv null recvbuf", ErrorCode::InvalidArgument, "recvbuf is null"},
      {"alltoallv overlapping", ErrorCode::InvalidArgument, "overlap"},
      {"alltoallv wrapped count", ErrorCode::InvalidArgument, "too large"},
      {"alltoallv unknown algorithm", ErrorCode::InvalidArgument, "'pairwise'"},
      {"allgatherv too many counts", ErrorCode::InvalidArgument, "one per rank (1)"},
      {"allgatherv null sendbuf", ErrorCode::InvalidArgument, "sendbuf is null"},
      {"allgatherv overlapping", ErrorCode::InvalidArgument, "in place means"},
      {"allgatherv unknown algorithm", ErrorCode::InvalidArgument, "unknown algorithm"},
      {"reduce_scatterv too many counts", ErrorCode::InvalidArgument, "one per rank (1)"},
      {"reduce_scatterv null sendbuf", ErrorCode::InvalidArgument, "sendbuf is null"},
      {"reduce_scatterv overlapping", ErrorCode::InvalidArgument, "in place means"},
      {"reduce_scatterv op 9", ErrorCode::InvalidArgument, "ReduceOp value 9"},
      {"reduce_scatterv wrapped count", ErrorCode::InvalidArgument, "too large"},
  };
  Group g(1, [](RankContext& ctx) {
    auto comm = ctx.create(kLongTimeout);
    std::vector<float> buf(64, 1.0f);
    float* b = buf.data();
    const auto bad_type = static_cast<DataType>(42);
    const auto bad_op = static_cast<ReduceOp>(9);
    const auto f32 = DataType::Float32;
    const auto sum = ReduceOp::Sum;
    ctx.attempt("allreduce null sendbuf", [&] { comm.allreduce(nullptr, b, 4, f32, sum); });
    ctx.attempt("allreduce null recvbuf", [&] { comm.allreduce(b, nullptr, 4, f32, sum); });
    ctx.attempt("broadcast null recvbuf", [&] { comm.broadcast(b, nullptr, 4, f32, 0); });
    ctx.attempt("allgather null sendbuf", [&] { comm.allgather(nullptr, b, 4, f32); });
    ctx.attempt("reduce_scatter null recvbuf", [&] { comm.reduce_scatter(b, nullptr, 4, f32, sum); });
    ctx.attempt("alltoall null sendbuf", [&] { comm.alltoall(nullptr, b, 4, f32); });
    ctx.attempt("dtype 42", [&] { comm.allreduce(b, b, 4, bad_type, sum); });
    ctx.attempt("op 9", [&] { comm.allreduce(b, b, 4, f32, bad_op); });
    ctx.attempt("broadcast dtype 42", [&] { comm.broadcast(b, b, 4, bad_type, 0); });
    ctx.attempt("broadcast root -1", [&] { comm.broadcast(b, b, 4, f32, -1); });
    ctx.attempt("broadcast root size", [&] { comm.broadcast(b, b, 4, f32, 1); });
    ctx.attempt("reduce root size", [&] { comm.reduce(b, b, 4, f32, sum, 1); });
    ctx.attempt("gather root -1", [&] { comm.gather(b, b, 4, f32, -1); });
    ctx.attempt("scatter root size", [&] { comm.scatter(b, b, 4, f32, 1); });
    ctx.attempt("send to self", [&] { comm.send(b, 4, f32, 0); });
    ctx.attempt("recv from self", [&] { comm.recv(b, 4, f32, 0); });
    ctx.attempt("send to rank size", [&] { comm.send(b, 4, f32, 1); });
    ctx.attempt("recv from rank 5", [&] { comm.recv(b, 4, f32, 5); });
    ctx.attempt("send to rank -1", [&] { comm.send(b, 4, f32, -1); });
    // Overlapping but not equal: recvbuf starts one element into sendbuf.
    ctx.attempt("allreduce overlapping", [&] { comm.allreduce(b, b + 1, 8, f32, sum); });
    ctx.attempt("alltoall overlapping", [&] { comm.alltoall(b, b + 2, 4, f32); });
    ctx.attempt("allreduce wrapped count", [&] {
      comm.allreduce(b, b, std::numeric_limits<std::size_t>::max(), f32, sum);
    });
    ctx.attempt("allreduce_async dtype 42", [&] { comm.allreduce_async(b, b, 4, bad_type, sum).wait(); });
    ctx.attempt("unknown algorithm", [&] {
      chorus::CallOptions o;
      o.algorithm = "no-such-algorithm";
      comm.allreduce(b, b, 4, f32, sum, o);
    });
    const std::vector<std::size_t> four = {4}, three = {3}, none = {},
                                   huge = {std::numeric_limits<std::size_t>::max()};
    ctx.attempt("alltoallv too few counts", [&] { comm.alltoallv(b, none, b + 8, none, f32); });
    ctx.attempt("alltoallv self counts differ",
                [&] { comm.alltoallv(b, four, b + 8, three, f32); });
    ctx.attempt("alltoallv null recvbuf", [&] { comm.alltoallv(b, four, nullptr, four, f32); });
    ctx.attempt("alltoallv overlapping", [&] { comm.alltoallv(b, four, b + 2, four, f32); });
    ctx.attempt("alltoallv wrapped count", [&] { comm.alltoallv(b, huge, b + 8, huge, f32); });
    const std::vector<std::size_t> two = {4, 4};
    ctx.attempt("allgatherv too many counts", [&] { comm.allgatherv(b, b + 8, two, f32); });
    ctx.attempt("allgatherv null sendbuf", [&] { comm.allgatherv(nullptr, b, four, f32); });
    ctx.attempt("allgatherv overlapping", [&] { comm.allgatherv(b + 1, b, four, f32); });
    ctx.attempt("allgatherv unknown algorithm", [&] {
      // Equal counts (one rank's): an allgather, whose algorithms are named.
      chorus::CallOptions o;
      o.algorithm = "no_such_ring";
      comm.allgatherv(b, b + 8, four, f32, o);
    });
    ctx.attempt("reduce_scatterv too many counts",
                [&] { comm.reduce_scatterv(b, b + 8, two, f32, sum); });
    ctx.attempt("reduce_scatterv null sendbuf",
                [&] { comm.reduce_scatterv(nullptr, b, four, f32, sum); });
    ctx.attempt("reduce_scatterv overlapping",
                [&] { comm.reduce_scatterv(b, b + 1, four, f32, sum); });
    ctx.attempt("reduce_scatterv op 9", [&] { comm.reduce_scatterv(b, b + 8, four, f32, bad_op); });
    ctx.attempt("reduce_scatterv wrapped count",
                [&] { comm.reduce_scatterv(b, b + 8, huge, f32, sum); });
    ctx.attempt("alltoallv unknown algorithm", [&] {
      chorus::CallOptions o;
      o.algorithm = "ring";
      comm.alltoallv(b, four, b + 8, four, f32, o);
    });
    // None of the above may have poisoned the communicator.
    ctx.attempt("error() after invalid arguments", [&] {
      if (auto e = comm.error()) throw *e;
    });
    ctx.attempt("valid allreduce", [&] {
      std::vector<float> out(64, 0.0f);
      comm.allreduce(buf.data(), out.data(), out.size(), f32, sum);
      if (out != buf) throw std::runtime_error("wrong allreduce result on one rank");
    });
  });
  expect_reports(g, 0, expects);
  for (const char* label : {"error() after invalid arguments", "valid allreduce"}) {
    const auto r = g.result(0, label, kReportWait);
    ASSERT_TRUE(r) << label << ": no report; rank is " << g.status(0);
    EXPECT_TRUE(r->ok) << "the communicator is unusable after InvalidArgument: " << r->describe();
  }
}

TEST(InvalidArguments, TwoRanksRejectBadArgumentsAndStayInStep) {
  const std::vector<Expect> expects = {
      {"broadcast root size", ErrorCode::InvalidArgument, "root 2"},
      {"send to rank size", ErrorCode::InvalidArgument, "peer 2"},
      {"recv from self", ErrorCode::InvalidArgument, "peer is this rank"},
      {"recv null buf", ErrorCode::InvalidArgument, "buf is null"},
      {"reduce null sendbuf", ErrorCode::InvalidArgument, "sendbuf is null"},
  };
  Group g(2, [](RankContext& ctx) {
    auto comm = ctx.create(kLongTimeout);
    const int me = ctx.rank();
    const int other = 1 - me;
    std::vector<float> buf(32, float(me + 1));
    float* b = buf.data();
    const auto f32 = DataType::Float32;
    ctx.attempt("broadcast root size", [&] { comm.broadcast(b, b, 4, f32, 2); });
    ctx.attempt("send to rank size", [&] { comm.send(b, 4, f32, 2); });
    ctx.attempt("recv from self", [&] { comm.recv(b, 4, f32, me); });
    ctx.attempt("recv null buf", [&] { comm.recv(nullptr, 4, f32, other); });
    ctx.attempt("reduce null sendbuf", [&] { comm.reduce(nullptr, b, 4, f32, ReduceOp::Sum, 0); });
    // Only rank 1 makes extra rejected calls: a rejected call must not use up
    // a call number, or the ranks would fall out of step below.
    if (me == 1) {
      ctx.attempt("extra bad dtype", [&] { comm.allreduce(b, b, 4, static_cast<DataType>(42), ReduceOp::Sum); });
      ctx.attempt("extra bad send", [&] { comm.send(b, 4, f32, 7); });
    }
    ctx.attempt("valid allreduce", [&] {
      std::vector<float> out(buf.size(), 0.0f);
      comm.allreduce(buf.data(), out.data(), out.size(), f32, ReduceOp::Sum);
      for (float v : out)
        if (v != 3.0f) throw std::runtime_error("allreduce gave " + std::to_string(v) + ", expected 3");
    });
    ctx.attempt("valid send/recv", [&] {
      float x = float(10 + me);
      float y = 0;
      if (me == 0) {
        comm.send(&x, 1, f32, 1);
        comm.recv(&y, 1, f32, 1);
      } else {
        comm.recv(&y, 1, f32, 0);
        comm.send(&x, 1, f32, 0);
      }
      if (y != float(10 + other)) throw std::runtime_error("send/recv delivered a wrong value");
    });
  });
  for (int r = 0; r < 2; ++r) {
    expect_reports(g, r, expects);
    for (const char* label : {"valid allreduce", "valid send/recv"}) {
      const auto res = g.result(r, label, kReportWait);
      ASSERT_TRUE(res) << label << ": no report; rank " << r << " is " << g.status(r);
      EXPECT_TRUE(res->ok) << "rank " << r << ": " << res->describe();
    }
  }
  expect_reports(g, 1, {{"extra bad dtype", ErrorCode::InvalidArgument, "DataType value 42"},
                        {"extra bad send", ErrorCode::InvalidArgument, "peer 7"}});
}

TEST(InvalidArguments, EmptyHandleThrowsInvalidUsage) {
  // No process needed: an empty handle has no state, so nothing here creates
  // a communicator or a thread in the test process.
  Communicator comm;
  EXPECT_FALSE(comm.valid());
  float x = 0;
  const std::vector<std::pair<const char*, std::function<void()>>> calls = {
      {"allreduce", [&] { comm.allreduce(&x, &x, 1, DataType::Float32, ReduceOp::Sum); }},
      {"allreduce_async", [&] { comm.allreduce_async(&x, &x, 1, DataType::Float32, ReduceOp::Sum); }},
      {"barrier", [&] { comm.barrier(); }},
      {"send", [&] { comm.send(&x, 1, DataType::Float32, 1); }},
      {"rank", [&] { (void)comm.rank(); }},
      {"size", [&] { (void)comm.size(); }},
      {"error", [&] { (void)comm.error(); }},
      {"abort", [&] { comm.abort(); }},
      {"split", [&] { (void)comm.split(0, 0); }},
  };
  for (const auto& [name, call] : calls) {
    SCOPED_TRACE(name);
    try {
      call();
      ADD_FAILURE() << name << " on an empty handle did not throw";
    } catch (const chorus::Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::InvalidUsage) << e.what();
      EXPECT_NE(e.message().find("empty"), std::string::npos) << e.what();
    }
  }
}

TEST(InvalidArguments, CreateRejectsBadRankSizeAndStore) {
  // Every case must be rejected before any rendezvous (so, at once, and
  // without creating anything): run them in a child all the same, so that a
  // library that did create a communicator could not leave threads here.
  Group g(1, [](RankContext& ctx) {
    auto store = ctx.store();
    chorus::Config config;
    config.timeout = 2s;
    ctx.attempt("rank == size", [&] { Communicator::create(1, 1, store, config); });
    ctx.attempt("rank > size", [&] { Communicator::create(5, 2, store, config); });
    ctx.attempt("rank -1", [&] { Communicator::create(-1, 2, store, config); });
    ctx.attempt("size 0", [&] { Communicator::create(0, 0, store, config); });
    ctx.attempt("size -3", [&] { Communicator::create(0, -3, store, config); });
    ctx.attempt("null store", [&] { Communicator::create(0, 1, nullptr, config); });
  });
  expect_reports(g, 0,
                 {{"rank == size", ErrorCode::InvalidArgument, "rank 1 is outside [0, 1)"},
                  {"rank > size", ErrorCode::InvalidArgument, "rank 5 is outside [0, 2)"},
                  {"rank -1", ErrorCode::InvalidArgument, "rank -1"},
                  {"size 0", ErrorCode::InvalidArgument, "world size 0"},
                  {"size -3", ErrorCode::InvalidArgument, "world size -3"},
                  {"null store", ErrorCode::InvalidArgument, "store is null"}});
}

// ---- 9a. Two processes claiming one rank -----------------------------------------

// Each rank numbers the communicators it creates on a store, so a second
// process claiming rank 0 lands in the next generation and waits there for a
// rank 1 that never comes. That cannot be told apart from a slow rank until the
// deadline; then the Timeout must say why.
TEST(Rendezvous, TwoProcessesClaimingOneRankAreDiagnosedAtTheDeadline) {
  static constexpr auto kTimeout = 2s;
  // Processes 0 and 1 both claim rank 0 of 2; process 2 is rank 1.
  auto claim = [](int rank) {
    return [rank](RankContext& ctx) {
      chorus::Config config;
      config.timeout = kTimeout;
      ctx.attempt("create", [&] { Communicator::create(rank, 2, ctx.store(), config); });
      ctx.hold();  // a successful communicator must outlive the other reports
    };
  };
  Group g(3, std::vector<faults::Body>{claim(0), claim(0), claim(1)});
  std::vector<Result> claimers;
  for (int p = 0; p < 3; ++p) {
    const auto r = g.result(p, "create", kReportWait);
    ASSERT_TRUE(r) << "create() of process " << p << " did not return (hang?); it is " << g.status(p);
    std::printf("[ outcome  ] process %d: %s\n", p, r->describe().c_str());
    EXPECT_LT(r->seconds(), bound_s()) << r->describe();
    if (p < 2) claimers.push_back(*r);
  }
  int diagnosed = 0;
  int succeeded = 0;
  for (const Result& r : claimers) {
    if (r.ok) ++succeeded;
    else if (r.error_code() == ErrorCode::Timeout && r.has("two processes claim the same rank"))
      ++diagnosed;
    else ADD_FAILURE() << "a duplicate claim must be diagnosed as such: " << r.describe();
  }
  EXPECT_EQ(succeeded, 1) << "exactly one claimant joins the group with rank 1";
  EXPECT_EQ(diagnosed, 1) << claimers[0].describe() << " / " << claimers[1].describe();
}

// Rank 0 asks for tcp, rank 1 for shm: both must fail at creation with
// InvalidUsage naming the other's choice, not wait for a segment or an
// address that never comes.
TEST(Rendezvous, RanksAskingForDifferentTransportsFailAtCreation) {
  auto with = [](const char* transport) {
    return [transport](RankContext& ctx) {
      chorus::Config config;
      config.timeout = 20s;
      config.transport = transport;
      ctx.attempt("create", [&] { Communicator::create(ctx.rank(), 2, ctx.store(), config); });
      ctx.hold();
    };
  };
  Group g(2, std::vector<faults::Body>{with("tcp"), with("shm")});
  for (int p = 0; p < 2; ++p) {
    const auto r = g.result(p, "create", kReportWait);
    ASSERT_TRUE(r) << "create() of rank " << p << " did not return (hang?); it is " << g.status(p);
    EXPECT_EQ(r->error_code(), ErrorCode::InvalidUsage) << r->describe();
    EXPECT_TRUE(r->has("ranks disagree on the transport")) << r->describe();
    EXPECT_TRUE(r->has(p == 0 ? "'shm'" : "'tcp'")) << r->describe();
    EXPECT_LT(r->seconds(), 10.0) << r->describe();
  }
}

// Forcing an algorithm that cannot run a call fails at submission on every
// rank alike (the constraint depends only on agreed inputs), before anything
// is sent, so the communicator stays usable.
TEST(Algorithms, ForcedOutsideItsConstraintsFailsClearlyAndLeavesTheCommunicatorUsable) {
  Group g(2, [](RankContext& ctx) {
    auto comm = ctx.create(kLongTimeout);
    std::vector<float> buf(1 << 16, 1.0f), out(1 << 16, 0.0f);
    auto forced = [&](const char* name, std::size_t count) {
      chorus::CallOptions o;
      o.algorithm = name;
      comm.allreduce(buf.data(), out.data(), count, DataType::Float32, ReduceOp::Sum, o);
    };
    ctx.attempt("hierarchical", [&] { forced("hierarchical", 16); });
    ctx.attempt("one_shot_big", [&] { forced("one_shot", 1 << 16); });
    ctx.attempt("unknown", [&] { forced("quantum", 16); });
    ctx.attempt("broadcast_ring", [&] {
      chorus::CallOptions o;
      o.algorithm = "ring";
      comm.broadcast(buf.data(), out.data(), 16, DataType::Float32, 0, o);
    });
    ctx.attempt("after", [&] {
      comm.allreduce(buf.data(), out.data(), 1 << 16, DataType::Float32, ReduceOp::Sum);
      if (out[12345] != 2.0f) throw std::runtime_error("wrong sum after the refused calls");
    });
    ctx.hold();
  });
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const struct {
      const char* step;
      const char* says;
    } refused[] = {{"hierarchical", "more than one host"},
                   {"one_shot_big", "one_shot"},  // "64 KiB" on shm, "shared memory" on tcp
                   {"unknown", "available: ring"},
                   {"broadcast_ring", "available: chain"}};
    for (const auto& x : refused) {
      const auto res = g.result(r, x.step, kReportWait);
      ASSERT_TRUE(res) << x.step << " did not return; rank is " << g.status(r);
      EXPECT_EQ(res->error_code(), ErrorCode::InvalidArgument) << res->describe();
      EXPECT_TRUE(res->has(x.says)) << res->describe();
    }
    const auto after = g.result(r, "after", kReportWait);
    ASSERT_TRUE(after) << "the call after the refused ones did not return";
    EXPECT_TRUE(after->ok) << after->describe();
  }
}

TEST(Rendezvous, RanksDisagreeingOnChorusAlgoFailAtCreation) {
  auto with = [](const char* algo) {
    return [algo](RankContext& ctx) {
      ::setenv("CHORUS_ALGO", algo, 1);  // this rank's process only
      chorus::Config config;
      config.timeout = 20s;
      ctx.attempt("create", [&] { Communicator::create(ctx.rank(), 2, ctx.store(), config); });
      ctx.hold();
    };
  };
  Group g(2, std::vector<faults::Body>{with("allreduce:ring"), with("allreduce:tree")});
  for (int p = 0; p < 2; ++p) {
    const auto r = g.result(p, "create", kReportWait);
    ASSERT_TRUE(r) << "create() of rank " << p << " did not return (hang?); it is " << g.status(p);
    EXPECT_EQ(r->error_code(), ErrorCode::InvalidUsage) << r->describe();
    EXPECT_TRUE(r->has("ranks disagree on CHORUS_ALGO")) << r->describe();
    EXPECT_TRUE(r->has(p == 0 ? "allreduce:tree" : "allreduce:ring")) << r->describe();
    EXPECT_LT(r->seconds(), 10.0) << r->describe();
  }
}

// On a communicator from split(), an error names ranks in its own
// numbering; the message also says which ranks of the top-level communicator
// those are (all of them, up to 16 ranks). 4 ranks split by parity with the
// keys reversed: in the even half, rank 0 is top-level rank 2 and rank 1 is
// top-level rank 0.
TEST(MismatchedCalls, OnASplitCommunicatorNameTheTopLevelRanks) {
  Group g(4, [](RankContext& ctx) {
    auto comm = ctx.create(kLongTimeout);
    ctx.started();
    Communicator half;
    ctx.attempt("split", [&] { half = comm.split(ctx.rank() % 2, -ctx.rank()); });
    if (ctx.rank() % 2 == 0) {
      std::vector<float> buf(20, 1.0f);
      const std::size_t count = ctx.rank() == 0 ? 20 : 10;
      ctx.attempt("call", [&] {
        half.allreduce(buf.data(), buf.data(), count, DataType::Float32, ReduceOp::Sum);
      });
    }
    ctx.hold();
  });
  std::string why;
  ASSERT_TRUE(g.wait_started(60s, &why)) << why;
  for (int top : {0, 2}) {
    const auto r = g.result(top, "call", kReportWait);
    ASSERT_TRUE(r) << "rank " << top << "'s call did not return; it is " << g.status(top);
    EXPECT_EQ(r->error_code(), ErrorCode::InvalidUsage) << r->describe();
    EXPECT_TRUE(r->has("count 10") && r->has("count 20")) << r->describe();
    EXPECT_TRUE(r->has("its ranks 0, 1 are ranks 2, 0 of the top-level communicator"))
        << r->describe();
    EXPECT_TRUE(r->has(top == 0 ? "this rank is 1 here" : "this rank is 0 here")) << r->describe();
  }
}

// libfabric: whether large messages go by one-sided writes is each rank's
// setting (CHORUS_FI_RMA); ranks that differ would wait for each other's
// Ready forever, so the first message between them says why instead.
TEST(Rendezvous, RanksDisagreeingOnFiRmaFailAtFirstContact) {
  const char* transport = std::getenv("CHORUS_TRANSPORT");
  if (transport == nullptr || std::string(transport) != "libfabric")
    GTEST_SKIP() << "libfabric only (CHORUS_TRANSPORT=libfabric)";
  auto with = [](const char* rma) {
    return [rma](RankContext& ctx) {
      ::setenv("CHORUS_FI_RMA", rma, 1);  // this rank's process only
      chorus::Config config;
      config.timeout = 20s;
      std::optional<Communicator> comm;
      ctx.attempt("create", [&] { comm = Communicator::create(ctx.rank(), 2, ctx.store(), config); });
      std::vector<float> buf(std::size_t{1} << 20, 1.0f);
      if (comm)
        ctx.attempt("call", [&] {
          comm->allreduce(buf.data(), buf.data(), buf.size(), DataType::Float32, ReduceOp::Sum);
        });
      ctx.hold();
    };
  };
  Group g(2, std::vector<faults::Body>{with("on"), with("off")});
  const auto created = g.result(0, "create", kReportWait);
  ASSERT_TRUE(created) << "create() did not return; rank 0 is " << g.status(0);
  if (!created->ok && created->has("no provider"))
    GTEST_SKIP() << "no libfabric provider: " << created->describe();
  const auto first = g.result(0, "call", kReportWait);
  ASSERT_TRUE(first) << "rank 0's call did not return (hang?); it is " << g.status(0);
  if (first->ok) GTEST_SKIP() << "this provider offers no one-sided writes (FI_RMA)";
  for (int p = 0; p < 2; ++p) {
    const auto r = g.result(p, "call", kReportWait);
    ASSERT_TRUE(r) << "rank " << p << "'s call did not return (hang?); it is " << g.status(p);
    EXPECT_EQ(r->error_code(), ErrorCode::InvalidUsage) << r->describe();
    EXPECT_TRUE(r->has("CHORUS_FI_RMA")) << r->describe();
    EXPECT_LT(r->seconds(), 10.0) << r->describe();
  }
}

// libfabric's shm provider keeps an endpoint's queues in a /dev/shm file,
// by default named "<pid>:0:0", which a killed process leaves behind. A
// later process with the same pid failed fi_enable with EBUSY; Chorus names
// its endpoints "chorus-<job>-fi-r<rank>-<pid>-..." instead, so such a stale
// file is harmless, and a leftover is the job's to remove (chorusrun).
TEST(SharedMemory, StaleLibfabricShmFilesDoNotCollide) {
  const char* transport = std::getenv("CHORUS_TRANSPORT");
  if (transport == nullptr || std::string(transport) != "libfabric")
    GTEST_SKIP() << "libfabric only (CHORUS_TRANSPORT=libfabric)";
  // This rank's files in /dev/shm named "chorus-...-fi-r<rank>-<pid>-".
  auto mine = [](int rank) {
    const std::string tag = "-fi-r" + std::to_string(rank) + "-" + std::to_string(::getpid()) + "-";
    int n = 0;
    for (const auto& e : std::filesystem::directory_iterator("/dev/shm")) {
      const std::string name = e.path().filename().string();
      if (name.rfind("chorus-", 0) == 0 && name.find(tag) != std::string::npos) ++n;
    }
    return n;
  };
  auto body = [&](RankContext& ctx) {
    ::setenv("CHORUS_FI_PROVIDER", "shm", 1);  // this rank's process only
    // What a killed process with this pid would have left under the default name.
    const std::string stale = "/dev/shm/" + std::to_string(::getpid()) + ":0:0";
    const int fd = ::open(stale.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    chorus::Config config;
    config.timeout = 20s;
    {
      std::optional<Communicator> comm;
      ctx.attempt("create", [&] {
        if (fd < 0) throw std::runtime_error("cannot create " + stale);
        comm = Communicator::create(ctx.rank(), 2, ctx.store(), config);
      });
      ctx.attempt("call", [&] {
        if (!comm) throw std::runtime_error("no communicator");
        std::vector<float> buf(1024, 1.0f);
        comm->allreduce(buf.data(), buf.data(), buf.size(), DataType::Float32, ReduceOp::Sum);
        if (buf[0] != 2.0f) throw std::runtime_error("allreduce gave " + std::to_string(buf[0]));
        if (mine(ctx.rank()) != 1)
          throw std::runtime_error(std::to_string(mine(ctx.rank())) +
                                   " endpoint files named chorus-...-fi-r<rank>-<pid>- in /dev/shm, "
                                   "expected 1");
      });
    }
    // Gone before the last report: the parent kills the ranks once it has it.
    if (fd >= 0) {
      ::close(fd);
      ::unlink(stale.c_str());
    }
    ctx.attempt("after", [&] {
      if (mine(ctx.rank()) != 0)
        throw std::runtime_error("the endpoint's file stayed in /dev/shm after destruction");
    });
    ctx.hold();
  };
  Group g(2, body);
  const auto created = g.result(0, "create", kReportWait);
  ASSERT_TRUE(created) << "create() did not return; rank 0 is " << g.status(0);
  if (!created->ok && created->has("no provider"))
    GTEST_SKIP() << "no libfabric shm provider: " << created->describe();
  for (int p = 0; p < 2; ++p)
    for (const char* label : {"create", "call", "after"}) {
      const auto r = g.result(p, label, kReportWait);
      ASSERT_TRUE(r) << "rank " << p << ": " << label << " did not return; it is " << g.status(p);
      EXPECT_TRUE(r->ok) << "rank " << p << ": " << label << ": " << r->describe();
    }
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (chorus_test::skip_unavailable_transport()) return 77;
  return RUN_ALL_TESTS();
}
