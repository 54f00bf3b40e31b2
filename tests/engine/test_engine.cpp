// The negotiated tensor engine (include/chorus/engine.hpp): ranks are forked
// processes. Every expected value is a closed form of the ranks' inputs.

#include <chorus/chorus.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "fork_ranks.hpp"

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <numeric>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

using chorus::Communicator;
using chorus::DataType;
using chorus::Engine;
using chorus::EngineConfig;
using chorus::ErrorCode;
using chorus::ReduceOp;
using chorus::Work;
using namespace std::chrono_literals;

namespace {

using Body = std::function<int(int rank, int n, Communicator& comm, const std::string& dir)>;

// Forks `n` ranks that join one communicator through a FileStore and run
// `body`; returns their exit codes (-1: killed, or still running at the limit).
std::vector<int> run_ranks(int n, const Body& body, std::chrono::seconds limit = 60s) {
  return chorus_test::fork_ranks(
      n,
      [&](int r, int size, const std::string& dir) {
        chorus::Config cfg;
        cfg.timeout = 30s;
        auto comm =
            Communicator::create(r, size, std::make_shared<chorus::FileStore>(dir + "/store"), cfg);
        return body(r, size, comm, dir);
      },
      limit, "chorus-engine-test");
}

void expect_all_zero(const std::vector<int>& codes, const std::string& what) {
  for (std::size_t r = 0; r < codes.size(); ++r)
    EXPECT_EQ(codes[r], 0) << what << ": rank " << r << " (-1: killed or hung)";
}

// Waits for `w` and checks that it failed with `code` and a message holding
// every one of `parts`; prints why not and returns false otherwise.
bool fails_with(Work& w, ErrorCode code, const std::vector<std::string>& parts, int rank) {
  try {
    if (!w.wait(20s)) {
      std::cerr << "rank " << rank << ": still waiting after 20 s\n";
      return false;
    }
    std::cerr << "rank " << rank << ": completed, but should have failed\n";
    return false;
  } catch (const chorus::Error& e) {
    bool ok = e.code() == code;
    for (const auto& p : parts) ok = ok && std::string(e.what()).find(p) != std::string::npos;
    if (!ok) std::cerr << "rank " << rank << ": failed with " << e.what() << "\n";
    return ok;
  }
}

// prefix + i, built in steps: GCC 12's -Wrestrict misfires on
// "t" + std::to_string(i) at -O3.
std::string named(const char* prefix, int i) {
  std::string s = prefix;
  s += std::to_string(i);
  return s;
}

// Whether some tensors shared collectives (two at least fused, fewer
// collectives than tensors, and at least `min_collectives`); says why not.
bool some_fused(const chorus::EngineStats& st, int rank, std::uint64_t min_collectives = 1) {
  if (st.fused >= 2 && st.collectives < st.tensors && st.collectives >= min_collectives)
    return true;
  std::cerr << "rank " << rank << ": " << st.tensors << " tensors in " << st.collectives
            << " collectives, " << st.fused << " fused\n";
  return false;
}

// An allgatherv's or alltoall's allocator body: keeps the counts in
// `*seen` (when given) and returns room for their sum in `out`, every
// element `fill` first.
template <typename T>
void* room_for(const std::vector<std::size_t>& counts, std::vector<T>& out, T fill,
               std::vector<std::size_t>* seen = nullptr) {
  if (seen != nullptr) *seen = counts;
  out.assign(std::accumulate(counts.begin(), counts.end(), std::size_t{0}), fill);
  return out.data();
}

std::size_t size_of_tensor(int i) { return static_cast<std::size_t>(1 + (i * 997) % 3000); }

// Submission orders differ per rank; every tensor's allreduce sum, allgather
// and broadcast are the closed forms; small allreduces share collectives.
TEST(Engine, TensorsSubmittedInAnyOrderCompleteWithTheRightValues) {
  const auto codes = run_ranks(3, [](int rank, int n, Communicator& comm, const std::string&) {
    EngineConfig cfg;
    cfg.cycle = 20ms;  // the whole batch lands in few cycles
    Engine eng = Engine::start(comm, cfg);
    constexpr int kTensors = 24;
    std::vector<int> order(kTensors);
    for (int i = 0; i < kTensors; ++i) order[static_cast<std::size_t>(i)] = i;
    if (rank == 1) std::reverse(order.begin(), order.end());
    if (rank == 2) std::rotate(order.begin(), order.begin() + 7, order.end());
    std::vector<std::vector<float>> in(kTensors), out(kTensors);
    std::vector<Work> works(kTensors);
    for (int i : order) {
      const std::size_t cnt = size_of_tensor(i);
      auto& x = in[static_cast<std::size_t>(i)];
      auto& y = out[static_cast<std::size_t>(i)];
      x.resize(cnt);
      for (std::size_t k = 0; k < cnt; ++k) x[k] = static_cast<float>(rank + 1) * static_cast<float>(k % 7 + i);
      y.assign(cnt * (i % 6 == 5 ? static_cast<std::size_t>(n) : 1), -1.0f);
      const std::string name = named("t", i);
      if (i % 6 == 5) works[static_cast<std::size_t>(i)] = eng.allgather(name, x.data(), y.data(), cnt, DataType::Float32);
      else if (i % 6 == 4) works[static_cast<std::size_t>(i)] = eng.broadcast(name, x.data(), y.data(), cnt, DataType::Float32, i % n);
      else works[static_cast<std::size_t>(i)] = eng.allreduce(name, x.data(), y.data(), cnt, DataType::Float32, ReduceOp::Sum);
    }
    for (auto& w : works) w.wait();
    const float ranks_sum = static_cast<float>(n * (n + 1) / 2);
    for (int i = 0; i < kTensors; ++i) {
      const std::size_t cnt = size_of_tensor(i);
      const auto& y = out[static_cast<std::size_t>(i)];
      for (std::size_t k = 0; k < y.size(); ++k) {
        const float base = static_cast<float>(k % cnt % 7 + static_cast<std::size_t>(i));
        float want = base * ranks_sum;
        if (i % 6 == 5) want = base * static_cast<float>(k / cnt + 1);
        if (i % 6 == 4) want = base * static_cast<float>(i % n + 1);
        if (y[k] != want) {
          std::cerr << "rank " << rank << ": tensor t" << i << " element " << k << ": " << y[k]
                    << " want " << want << "\n";
          return 2;
        }
      }
    }
    const auto s = eng.stats();
    if (s.tensors != kTensors || s.fused < 2 || s.collectives >= s.tensors) {
      std::cerr << "rank " << rank << ": tensors " << s.tensors << ", collectives " << s.collectives
                << ", fused " << s.fused << "\n";
      return 3;
    }
    eng.shutdown();
    return 0;
  });
  expect_all_zero(codes, "any order");
}

// The second round of the same names is agreed on by cache bits alone: no
// descriptions exchanged, every tensor a cache hit, the values right.
TEST(Engine, RepeatedNamesAreAgreedOnByTheCache) {
  const auto codes = run_ranks(2, [](int rank, int, Communicator& comm, const std::string&) {
    Engine eng = Engine::start(comm);
    constexpr int kTensors = 12;
    std::uint64_t negotiations_after_first = 0;
    for (int round = 0; round < 3; ++round) {
      std::vector<std::vector<double>> buf(kTensors);
      std::vector<Work> works;
      for (int i = 0; i < kTensors; ++i) {
        auto& b = buf[static_cast<std::size_t>(i)];
        b.assign(static_cast<std::size_t>(10 + i), static_cast<double>((rank + 1) * (round + 1)));
        works.push_back(eng.allreduce(named("layer", i), b.data(), b.data(), b.size(),
                                      DataType::Float64, ReduceOp::Max));
      }
      for (auto& w : works) w.wait();
      for (const auto& b : buf)
        for (double v : b)
          if (v != 2.0 * (round + 1)) {
            std::cerr << "rank " << rank << " round " << round << ": got " << v << "\n";
            return 2;
          }
      if (round == 0) negotiations_after_first = eng.stats().negotiations;
    }
    const auto s = eng.stats();
    if (s.cache_hits != 2 * kTensors || s.negotiations != negotiations_after_first) {
      std::cerr << "rank " << rank << ": cache hits " << s.cache_hits << " (want " << 2 * kTensors
                << "), negotiations " << negotiations_after_first << " then " << s.negotiations << "\n";
      return 3;
    }
    eng.shutdown();
    return 0;
  });
  expect_all_zero(codes, "cache");
}

// One name, two descriptions: every rank's Work fails with InvalidUsage
// naming the tensor, both ranks and both descriptions; the engine goes on.
// The same for a cached name submitted later with another dtype.
TEST(Engine, MismatchedSubmissionsFailOnEveryRankNamingBoth) {
  const auto codes = run_ranks(2, [](int rank, int, Communicator& comm, const std::string&) {
    Engine eng = Engine::start(comm);
    std::vector<float> a(12, 1.0f), b(12, 0.0f);
    Work w = eng.allreduce("w", a.data(), b.data(), rank == 0 ? 10 : 12, DataType::Float32,
                           ReduceOp::Sum);
    if (!fails_with(w, ErrorCode::InvalidUsage,
                    {"tensor 'w'", "allreduce of 10 ", "rank 0", "allreduce of 12 ", "rank 1"},
                    rank))
      return 2;
    Work ok = eng.allreduce("ok", a.data(), b.data(), 12, DataType::Float32, ReduceOp::Sum);
    ok.wait();
    if (b[11] != 2.0f) return 3;
    // "ok" is cached now; rank 1 submits it as int32.
    std::vector<std::int32_t> ia(12, 1), ib(12, 0);
    Work again = rank == 0 ? eng.allreduce("ok", a.data(), b.data(), 12, DataType::Float32, ReduceOp::Sum)
                           : eng.allreduce("ok", ia.data(), ib.data(), 12, DataType::Int32, ReduceOp::Sum);
    if (!fails_with(again, ErrorCode::InvalidUsage,
                    {"tensor 'ok'", std::string(chorus::to_string(DataType::Float32)),
                     std::string(chorus::to_string(DataType::Int32))},
                    rank))
      return 4;
    Work after = eng.allreduce("after", a.data(), b.data(), 12, DataType::Float32, ReduceOp::Sum);
    after.wait();
    eng.shutdown();
    return b[0] == 2.0f ? 0 : 5;
  });
  expect_all_zero(codes, "mismatch");
}

// Small allgathers of one dtype share a collective, as small allreduces do:
// ten of different counts, submitted in another order on each rank.
TEST(Engine, SmallAllgathersAreFusedAndEachGetsItsShares) {
  const auto codes = run_ranks(3, [](int rank, int n, Communicator& comm, const std::string&) {
    EngineConfig cfg;
    cfg.cycle = 30ms;  // the ten land in one or two cycles
    Engine eng = Engine::start(comm, cfg);
    constexpr int kTensors = 10;
    // Element k of rank p's share of tensor i (count i + 1): 1000 p + 10 i + k.
    std::vector<std::vector<std::int32_t>> in(kTensors), out(kTensors);
    std::vector<Work> works(kTensors);
    for (int j = 0; j < kTensors; ++j) {
      const int i = (j + 3 * rank) % kTensors;
      const auto cnt = static_cast<std::size_t>(i + 1);
      auto& x = in[static_cast<std::size_t>(i)];
      for (std::size_t k = 0; k < cnt; ++k)
        x.push_back(1000 * rank + 10 * i + static_cast<std::int32_t>(k));
      out[static_cast<std::size_t>(i)].assign(cnt * static_cast<std::size_t>(n), -1);
      works[static_cast<std::size_t>(i)] = eng.allgather(
          named("g", i), x.data(), out[static_cast<std::size_t>(i)].data(), cnt, DataType::Int32);
    }
    for (auto& w : works) w.wait();
    for (int i = 0; i < kTensors; ++i) {
      const auto cnt = static_cast<std::size_t>(i + 1);
      for (int p = 0; p < n; ++p)
        for (std::size_t k = 0; k < cnt; ++k) {
          const std::int32_t got =
              out[static_cast<std::size_t>(i)][static_cast<std::size_t>(p) * cnt + k];
          if (got != 1000 * p + 10 * i + static_cast<std::int32_t>(k)) {
            std::cerr << "rank " << rank << ": g" << i << " from rank " << p << " element " << k
                      << ": " << got << "\n";
            return 2;
          }
        }
    }
    const auto st = eng.stats();
    eng.shutdown();
    if (!some_fused(st, rank)) return 3;
    return 0;
  });
  expect_all_zero(codes, "fused allgathers");
}

// Broadcasts from one root share a collective (a framework broadcasting its
// parameters at the start): twelve, half of them in place, from roots 1 and
// 2, submitted in another order on each rank.
TEST(Engine, BroadcastsFromOneRootAreFusedInPlaceOrNot) {
  const auto codes = run_ranks(3, [](int rank, int, Communicator& comm, const std::string&) {
    EngineConfig cfg;
    cfg.cycle = 30ms;
    Engine eng = Engine::start(comm, cfg);
    constexpr int kTensors = 12;
    // Tensor i (count i + 2) comes from root 1 + i % 2; element k is 100 i + k there.
    std::vector<std::vector<double>> send(kTensors), recv(kTensors);
    std::vector<Work> works(kTensors);
    for (int j = 0; j < kTensors; ++j) {
      const int i = (j + 5 * rank) % kTensors;
      const int root = 1 + i % 2;
      const auto cnt = static_cast<std::size_t>(i + 2);
      auto& x = send[static_cast<std::size_t>(i)];
      auto& y = recv[static_cast<std::size_t>(i)];
      x.assign(cnt, -7.0);
      if (rank == root)
        for (std::size_t k = 0; k < cnt; ++k) x[k] = 100.0 * i + static_cast<double>(k);
      y.assign(cnt, -9.0);
      const bool in_place = i % 4 < 2;
      works[static_cast<std::size_t>(i)] = eng.broadcast(
          named("p", i), x.data(), in_place ? x.data() : y.data(), cnt, DataType::Float64, root);
    }
    for (auto& w : works) w.wait();
    for (int i = 0; i < kTensors; ++i) {
      const bool in_place = i % 4 < 2;
      const auto& got =
          in_place ? send[static_cast<std::size_t>(i)] : recv[static_cast<std::size_t>(i)];
      for (std::size_t k = 0; k < got.size(); ++k)
        if (got[k] != 100.0 * i + static_cast<double>(k)) {
          std::cerr << "rank " << rank << ": p" << i << (in_place ? " (in place)" : "")
                    << " element " << k << ": " << got[k] << "\n";
          return 2;
        }
    }
    const auto st = eng.stats();
    eng.shutdown();
    if (!some_fused(st, rank)) return 3;
    return 0;
  });
  expect_all_zero(codes, "fused broadcasts");
}

// allgatherv: rank r shares 2r elements (rank 0 none), different again in
// each of three rounds, among allreduces submitted in another order per rank.
// The allocator must see every rank's count, and the result must be every
// rank's share in rank order; a failing allocator fails that rank alone; a
// dtype that differs fails every rank.
TEST(Engine, AllgathervGathersSharesOfDifferentSizes) {
  const auto codes = run_ranks(3, [](int rank, int n, Communicator& comm, const std::string&) {
    EngineConfig cfg;
    cfg.cycle = 5ms;
    Engine eng = Engine::start(comm, cfg);
    // Element k of rank p's share in round t: 1000 t + 100 p + k.
    auto share_count = [](int p, int t) { return static_cast<std::size_t>(2 * p + t); };
    for (int t = 0; t < 3; ++t) {
      std::vector<std::int64_t> mine(share_count(rank, t));
      for (std::size_t k = 0; k < mine.size(); ++k)
        mine[k] = 1000 * t + 100 * rank + static_cast<std::int64_t>(k);
      std::vector<std::int64_t> out;
      std::vector<std::size_t> seen;
      std::vector<float> x(64, static_cast<float>(rank + 1)), y(64, 0.0f);
      Work g, a;
      auto gather = [&] {
        g = eng.allgatherv("shares", mine.data(), mine.size(), DataType::Int64,
                           [&](const std::vector<std::size_t>& counts) {
                             return room_for<std::int64_t>(counts, out, -1, &seen);
                           });
      };
      auto reduce = [&] {
        a = eng.allreduce("sum", x.data(), y.data(), 64, DataType::Float32, ReduceOp::Sum);
      };
      if (rank % 2 == 0) {
        gather();
        reduce();
      } else {
        reduce();
        gather();
      }
      g.wait();
      a.wait();
      std::vector<std::int64_t> want;
      for (int p = 0; p < n; ++p) {
        if (seen.size() != static_cast<std::size_t>(n) ||
            seen[static_cast<std::size_t>(p)] != share_count(p, t)) {
          std::cerr << "rank " << rank << " round " << t
                    << ": the allocator saw the wrong counts\n";
          return 2;
        }
        for (std::size_t k = 0; k < share_count(p, t); ++k)
          want.push_back(1000 * t + 100 * p + static_cast<std::int64_t>(k));
      }
      if (out != want) {
        std::cerr << "rank " << rank << " round " << t << ": wrong concatenation\n";
        return 3;
      }
      if (y[63] != static_cast<float>(n * (n + 1) / 2)) return 4;
    }
    // An allocator that throws on rank 1: rank 1's tensor fails, the others' do not.
    std::int32_t v = rank;
    std::vector<std::int32_t> all;
    Work w =
        eng.allgatherv("throws", &v, 1, DataType::Int32, [&](const std::vector<std::size_t>& c) {
          if (rank == 1) throw std::runtime_error("no room here");
          all.resize(c.size());
          return static_cast<void*>(all.data());
        });
    if (rank == 1) {
      if (!fails_with(w, ErrorCode::InvalidArgument,
                      {"tensor 'throws'", "allocator threw: no room here"}, rank))
        return 5;
    } else {
      w.wait();
      if (all != std::vector<std::int32_t>{0, 1, 2}) return 6;
    }
    // One name, two dtypes: every rank fails, naming both.
    float f = 1.0f;
    Work bad = rank == 2 ? eng.allgatherv("mixed", &f, 1, DataType::Float32,
                                          [&](const auto&) { return static_cast<void*>(nullptr); })
                         : eng.allgatherv("mixed", &v, 1, DataType::Int32,
                                          [&](const auto&) { return static_cast<void*>(nullptr); });
    if (!fails_with(
            bad, ErrorCode::InvalidUsage,
            {"tensor 'mixed'", "allgatherv", std::string(chorus::to_string(DataType::Int32)),
             std::string(chorus::to_string(DataType::Float32))},
            rank))
      return 7;
    // Nothing anywhere: the allocator may return nullptr.
    Work none = eng.allgatherv("empty", nullptr, 0, DataType::Int32,
                               [](const auto&) { return static_cast<void*>(nullptr); });
    none.wait();
    const auto st = eng.stats();
    eng.shutdown();
    // "sum" came from the cache in rounds 2 and 3; "shares" never did.
    if (st.cache_hits != 2) {
      std::cerr << "rank " << rank << ": " << st.cache_hits << " cache hits, want 2\n";
      return 8;
    }
    return 0;
  });
  expect_all_zero(codes, "allgatherv");
}

// Work::wait starts the next cycle: with a cycle of 120 s, tensors every
// rank submitted and waits for complete within a minute (the wait's limit),
// twice (the second time from the cache). Work::test does not wake the
// engine: a tensor only polled is still waiting 300 ms later.
TEST(Engine, WaitingForATensorStartsTheNextCycle) {
  const auto codes = run_ranks(3, [](int rank, int n, Communicator& comm, const std::string&) {
    EngineConfig cfg;
    cfg.cycle = std::chrono::seconds(120);
    Engine eng = Engine::start(comm, cfg);
    std::vector<float> polled(4, 1.0f);
    Work p = eng.allreduce("polled", polled.data(), polled.data(), polled.size(), DataType::Float32,
                           ReduceOp::Sum);
    for (int i = 0; i < 30; ++i) {
      if (p.test()) {
        std::cerr << "rank " << rank << ": a tensor only polled completed\n";
        return 2;
      }
      std::this_thread::sleep_for(10ms);
    }
    for (int round = 0; round < 2; ++round) {
      std::vector<std::vector<double>> x(4);
      std::vector<Work> works;
      for (int j = 0; j < 4; ++j) {
        const int i = (j + rank) % 4;
        auto& v = x[static_cast<std::size_t>(i)];
        v.assign(static_cast<std::size_t>(10 + i), static_cast<double>(rank + i + round));
        works.push_back(eng.allreduce(named("w", i), v.data(), v.data(), v.size(),
                                      DataType::Float64, ReduceOp::Sum));
      }
      for (auto& w : works)
        if (!w.wait(60s)) {
          std::cerr << "rank " << rank << " round " << round << ": still waiting after 60 s\n";
          return 3;
        }
      for (int i = 0; i < 4; ++i) {
        // sum over ranks r of (r + i + round)
        const double want = n * (n - 1) / 2.0 + n * static_cast<double>(i + round);
        for (double got : x[static_cast<std::size_t>(i)])
          if (got != want) {
            std::cerr << "rank " << rank << ": w" << i << " = " << got << ", want " << want << "\n";
            return 4;
          }
      }
    }
    // "polled" went with the first cycle; waiting for it is immediate now.
    if (!p.wait(60s) || polled[0] != static_cast<float>(n)) return 5;
    const auto st = eng.stats();
    eng.shutdown();
    if (st.cache_hits < 4) {
      std::cerr << "rank " << rank << ": " << st.cache_hits << " cache hits, want 4\n";
      return 6;
    }
    return 0;
  });
  expect_all_zero(codes, "waiting wakes the engine");
}

// Small allgathervs of one dtype share collectives, within the fusion bound
// on all ranks' shares: eight tensors, rank p's share of tensor i
// (i + p) % 4 elements (36 in all), submitted in another order per rank,
// with room for 24 elements: at least two collectives. The
// allocator of tensor 5 throws on rank 2: that tensor fails there alone.
TEST(Engine, SmallAllgathervsAreFusedWithinTheBoundAndEachGetsItsShares) {
  const auto codes = run_ranks(3, [](int rank, int n, Communicator& comm, const std::string&) {
    EngineConfig cfg;
    cfg.cycle = 30ms;  // the eight land in one or two cycles
    cfg.fusion_bytes = 3 * 8 * sizeof(std::int32_t);
    Engine eng = Engine::start(comm, cfg);
    constexpr int kTensors = 8;
    auto count = [](int p, int i) { return static_cast<std::size_t>((i + p) % 4); };
    // Element k of rank p's share of tensor i: 1000 p + 10 i + k.
    auto value = [](int p, int i, std::size_t k) {
      return 1000 * p + 10 * i + static_cast<std::int32_t>(k);
    };
    std::vector<std::vector<std::int32_t>> in(kTensors), out(kTensors);
    std::vector<std::vector<std::size_t>> seen(kTensors);
    std::vector<Work> works(kTensors);
    for (int j = 0; j < kTensors; ++j) {
      const int i = (j + 3 * rank) % kTensors;
      const auto u = static_cast<std::size_t>(i);
      for (std::size_t k = 0; k < count(rank, i); ++k) in[u].push_back(value(rank, i, k));
      works[u] = eng.allgatherv(named("v", i), in[u].data(), in[u].size(), DataType::Int32,
                                [&, i, u](const std::vector<std::size_t>& c) {
                                  if (i == 5 && rank == 2) throw std::runtime_error("no room");
                                  return room_for<std::int32_t>(c, out[u], -1, &seen[u]);
                                });
    }
    for (int i = 0; i < kTensors; ++i) {
      auto& w = works[static_cast<std::size_t>(i)];
      if (i == 5 && rank == 2) {
        if (!fails_with(w, ErrorCode::InvalidArgument, {"tensor 'v5'", "no room"}, rank)) return 2;
        continue;
      }
      w.wait();
      std::vector<std::int32_t> want;
      std::vector<std::size_t> want_counts;
      for (int p = 0; p < n; ++p) {
        want_counts.push_back(count(p, i));
        for (std::size_t k = 0; k < count(p, i); ++k) want.push_back(value(p, i, k));
      }
      if (seen[static_cast<std::size_t>(i)] != want_counts ||
          out[static_cast<std::size_t>(i)] != want) {
        std::cerr << "rank " << rank << ": v" << i << " has the wrong counts or values\n";
        return 3;
      }
    }
    const auto st = eng.stats();
    eng.shutdown();
    if (st.tensors != kTensors || !some_fused(st, rank, 2)) return 4;
    return 0;
  });
  expect_all_zero(codes, "fused allgathervs");
}

// Alltoalls with splits (Horovod's): rank p sends rank q (p + 2q + i) % 4
// elements of tensor i, 1000 p + 100 q + 10 i + k, so every rank's splits
// differ, some are 0, and a misrouted block shows. Six tensors submitted in
// another order per rank, with room for about two at a time: several
// collectives, some fused. Tensor 4's allocator throws on rank 1: that
// tensor fails there alone. Then one alltoall on its own (straight into the
// allocator's memory) in two rounds with other splits (never from the
// cache), a dtype that differs (every rank fails), and a join: rank 2 joins
// without submitting, the others' alltoall gets nothing from it and what
// they send it is dropped.
TEST(Engine, AlltoallsDeliverEachRanksSplitsAndAreFused) {
  const auto codes = run_ranks(3, [](int rank, int n, Communicator& comm, const std::string&) {
    EngineConfig cfg;
    cfg.cycle = 30ms;  // the six land in one or two cycles
    cfg.fusion_bytes = 200;
    Engine eng = Engine::start(comm, cfg);
    constexpr int kTensors = 6;
    auto split = [](int p, int q, int i) { return static_cast<std::size_t>((p + 2 * q + i) % 4); };
    auto value = [](int p, int q, int i, std::size_t k) {
      return 1000 * p + 100 * q + 10 * i + static_cast<std::int32_t>(k);
    };
    std::vector<std::vector<std::int32_t>> in(kTensors), out(kTensors);
    std::vector<std::vector<std::size_t>> seen(kTensors);
    std::vector<Work> works(kTensors);
    for (int j = 0; j < kTensors; ++j) {
      const int i = (j + 2 * rank) % kTensors;
      const auto u = static_cast<std::size_t>(i);
      std::vector<std::size_t> splits;
      for (int q = 0; q < n; ++q) {
        splits.push_back(split(rank, q, i));
        for (std::size_t k = 0; k < split(rank, q, i); ++k) in[u].push_back(value(rank, q, i, k));
      }
      works[u] = eng.alltoall(named("a", i), in[u].data(), splits, DataType::Int32,
                              [&, i, u](const std::vector<std::size_t>& c) {
                                if (i == 4 && rank == 1) throw std::runtime_error("no room");
                                return room_for<std::int32_t>(c, out[u], -1, &seen[u]);
                              });
    }
    for (int i = 0; i < kTensors; ++i) {
      auto& w = works[static_cast<std::size_t>(i)];
      if (i == 4 && rank == 1) {
        if (!fails_with(w, ErrorCode::InvalidArgument,
                        {"tensor 'a4'", "alltoall allocator threw: no room"}, rank))
          return 2;
        continue;
      }
      w.wait();
      std::vector<std::int32_t> want;
      std::vector<std::size_t> want_counts;
      for (int p = 0; p < n; ++p) {
        want_counts.push_back(split(p, rank, i));
        for (std::size_t k = 0; k < split(p, rank, i); ++k) want.push_back(value(p, rank, i, k));
      }
      if (seen[static_cast<std::size_t>(i)] != want_counts ||
          out[static_cast<std::size_t>(i)] != want) {
        std::cerr << "rank " << rank << ": a" << i << " has the wrong counts or values\n";
        return 3;
      }
    }
    const auto fused = eng.stats();
    if (fused.tensors != kTensors || !some_fused(fused, rank, 2)) return 4;
    // One alltoall alone, twice, with other splits each time: rank p sends
    // rank q (p + q + t) % 3 floats; rank 0 sends nothing in round 1.
    for (int t = 0; t < 2; ++t) {
      std::vector<float> mine;
      std::vector<std::size_t> splits;
      auto solo = [t](int p, int q) {
        return (t == 1 && p == 0) ? std::size_t{0} : static_cast<std::size_t>((p + q + t) % 3);
      };
      for (int q = 0; q < n; ++q) {
        splits.push_back(solo(rank, q));
        for (std::size_t k = 0; k < solo(rank, q); ++k)
          mine.push_back(static_cast<float>(value(rank, q, 9, k)));
      }
      std::vector<float> got;
      eng.alltoall("solo", mine.data(), splits, DataType::Float32,
                   [&](const std::vector<std::size_t>& c) { return room_for(c, got, -1.0f); })
          .wait();
      std::vector<float> want;
      for (int p = 0; p < n; ++p)
        for (std::size_t k = 0; k < solo(p, rank); ++k)
          want.push_back(static_cast<float>(value(p, rank, 9, k)));
      if (got != want) {
        std::cerr << "rank " << rank << ": solo round " << t << " is wrong\n";
        return 5;
      }
    }
    // One name, two dtypes: every rank fails, naming both.
    std::vector<std::size_t> ones(static_cast<std::size_t>(n), 1);
    std::vector<double> d3(3, 1.0);
    std::vector<std::int32_t> i3(3, 1);
    auto nowhere = [](const std::vector<std::size_t>&) { return static_cast<void*>(nullptr); };
    Work bad = rank == 0 ? eng.alltoall("mixed", d3.data(), ones, DataType::Float64, nowhere)
                         : eng.alltoall("mixed", i3.data(), ones, DataType::Int32, nowhere);
    if (!fails_with(
            bad, ErrorCode::InvalidUsage,
            {"tensor 'mixed'", "alltoall", std::string(chorus::to_string(DataType::Float64)),
             std::string(chorus::to_string(DataType::Int32))},
            rank))
      return 6;
    // Rank 2 joins; ranks 0 and 1 send everyone 2 elements of "late".
    // "late" waits for rank 2's join, so rank 0 or 1 joins last.
    if (rank == 2) {
      const int last = eng.join();
      if (last != 0 && last != 1) return 7;
    } else {
      std::vector<std::int32_t> mine;
      for (int q = 0; q < n; ++q)
        for (std::size_t k = 0; k < 2; ++k) mine.push_back(value(rank, q, 7, k));
      std::vector<std::size_t> counts;
      std::vector<std::int32_t> got;
      eng.alltoall("late", mine.data(), std::vector<std::size_t>(static_cast<std::size_t>(n), 2),
                   DataType::Int32,
                   [&](const std::vector<std::size_t>& c) {
                     counts = c;
                     got.assign(4, -1);
                     return static_cast<void*>(got.data());
                   })
          .wait();
      const std::vector<std::int32_t> want = {value(0, rank, 7, 0), value(0, rank, 7, 1),
                                              value(1, rank, 7, 0), value(1, rank, 7, 1)};
      if (counts != std::vector<std::size_t>{2, 2, 0} || got != want) {
        std::cerr << "rank " << rank << ": the alltoall beside a joined rank is wrong\n";
        return 8;
      }
      const int last = eng.join();
      if (last != 0 && last != 1) return 9;
    }
    const auto st = eng.stats();
    eng.shutdown();
    if (st.cache_hits != 0) {
      std::cerr << "rank " << rank << ": " << st.cache_hits << " cache hits; alltoalls never hit\n";
      return 10;
    }
    return 0;
  });
  expect_all_zero(codes, "alltoall");
}

// A name one rank never submits: rank 0 warns, naming the tensor and the
// missing rank; after CHORUS_STALL_ABORT it fails on the ranks that did
// submit it, with Timeout naming the missing rank, and the engine stops on
// every rank. Once through the table (a new name), once through the cache.
void stall_case(bool cached) {
  const auto codes = run_ranks(3, [cached](int rank, int, Communicator& comm, const std::string& dir) {
    const std::string log = dir + "/stderr-" + std::to_string(rank);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 2);
    ::close(fd);
    EngineConfig cfg;
    cfg.stall_warning = 200ms;
    cfg.stall_abort = 1000ms;
    Engine eng = Engine::start(comm, cfg);
    std::vector<float> x(64, 1.0f);
    if (cached) eng.allreduce("lonely", x.data(), x.data(), 64, DataType::Float32, ReduceOp::Sum).wait();
    int rc = 0;
    if (rank != 1) {
      Work w = eng.allreduce("lonely", x.data(), x.data(), 64, DataType::Float32, ReduceOp::Sum);
      if (!fails_with(w, ErrorCode::Timeout, {"tensor 'lonely'", "not submitted by rank 1", "CHORUS_STALL_ABORT"}, rank))
        rc = 2;
    } else {
      // Rank 1 learns of it at its next submission: the engine has stopped.
      std::this_thread::sleep_for(2s);
      try {
        eng.allreduce("late", x.data(), x.data(), 64, DataType::Float32, ReduceOp::Sum).wait();
        rc = 3;
      } catch (const chorus::Error& e) {
        if (e.code() != ErrorCode::Timeout || std::string(e.what()).find("lonely") == std::string::npos) rc = 4;
      }
    }
    std::fflush(stderr);
    if (rank == 0 && rc == 0) {
      std::ifstream in(log);
      std::stringstream all;
      all << in.rdbuf();
      if (all.str().find("engine: tensor 'lonely' was submitted by ranks 0 and 2 but not by rank 1") ==
          std::string::npos)
        rc = 5;
    }
    return rc;
  });
  EXPECT_EQ(codes[0], 0) << "rank 0: 2 wrong error, 5 no stall warning naming rank 1";
  EXPECT_EQ(codes[1], 0) << "rank 1: 3 a submission after the stop ran, 4 wrong error";
  EXPECT_EQ(codes[2], 0) << "rank 2: 2 wrong error";
}

TEST(Engine, AStalledNameIsReportedNamingTheMissingRank) { stall_case(false); }
TEST(Engine, AStalledCachedNameIsReportedNamingTheMissingRank) { stall_case(true); }

// Reduce-scatters, submitted in another order per rank: rank r's block of
// tensor i holds the closed form over every rank's send blocks; the small
// float sums share collectives; one runs in place (NCCL's convention).
TEST(Engine, ReduceScattersAreFusedAndEachRankGetsItsBlock) {
  const auto codes = run_ranks(3, [](int rank, int n, Communicator& comm, const std::string&) {
    Engine eng = Engine::start(comm);
    const auto N = static_cast<std::size_t>(n);
    const int T = 8;
    std::vector<std::vector<float>> send(T), recv(T);
    for (int i = 0; i < T; ++i) {
      const std::size_t c = static_cast<std::size_t>(i + 1);
      send[static_cast<std::size_t>(i)].resize(c * N);
      for (std::size_t p = 0; p < N; ++p)
        for (std::size_t j = 0; j < c; ++j)
          send[static_cast<std::size_t>(i)][p * c + j] = static_cast<float>(
              rank * 1000 + static_cast<int>(p) * 100 + i * 10 + static_cast<int>(j));
      recv[static_cast<std::size_t>(i)].assign(c, -1.0f);
    }
    std::vector<std::int32_t> mx(4 * N), inplace(3 * N);
    for (std::size_t k = 0; k < mx.size(); ++k) mx[k] = rank * 7 + static_cast<std::int32_t>(k);
    for (std::size_t k = 0; k < inplace.size(); ++k)
      inplace[k] = rank + static_cast<std::int32_t>(k);
    std::vector<std::int32_t> mx_out(4, -1);
    std::vector<Work> ws;
    for (int k = 0; k < T; ++k) {
      const int i = (k + 3 * rank) % T;
      ws.push_back(eng.reducescatter(named("rs.", i), send[static_cast<std::size_t>(i)].data(),
                                     recv[static_cast<std::size_t>(i)].data(),
                                     static_cast<std::size_t>(i + 1), DataType::Float32,
                                     ReduceOp::Sum));
    }
    ws.push_back(
        eng.reducescatter("max", mx.data(), mx_out.data(), 4, DataType::Int32, ReduceOp::Max));
    std::int32_t* own = inplace.data() + 3 * static_cast<std::size_t>(rank);
    ws.push_back(
        eng.reducescatter("inplace", inplace.data(), own, 3, DataType::Int32, ReduceOp::Sum));
    for (auto& w : ws) w.wait();
    int bad = 0;
    for (int i = 0; i < T; ++i)
      for (int j = 0; j <= i; ++j) {
        // the sum over ranks q of q*1000 + rank*100 + i*10 + j
        const float want =
            static_cast<float>(1000 * n * (n - 1) / 2 + n * (rank * 100 + i * 10 + j));
        bad += recv[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)] == want ? 0 : 1;
      }
    // max over q of q*7 + (rank*4 + j); the sum over q of q + rank*3 + j
    for (int j = 0; j < 4; ++j)
      bad += mx_out[static_cast<std::size_t>(j)] == (n - 1) * 7 + rank * 4 + j ? 0 : 1;
    for (int j = 0; j < 3; ++j) bad += own[j] == n * (n - 1) / 2 + n * (rank * 3 + j) ? 0 : 1;
    if (bad != 0) {
      std::cerr << "rank " << rank << ": " << bad << " wrong elements\n";
      return 2;
    }
    const auto st = eng.stats();
    eng.shutdown();
    return some_fused(st, rank) ? 0 : 3;
  });
  expect_all_zero(codes, "reduce-scatter (2 wrong value, 3 nothing fused)");
}

// Reduce-scatters by rows that do not divide by the 3 ranks (Horovod's
// reducescatter): tensor i has 3i + 1 + i % 3 rows of i + 1 elements (two
// of them divide evenly and run as plain reduce-scatters), submitted in
// another order per rank; element j of rank q's input is q * 1000 + i *
// 100 + j, so rank r's rows hold the closed form over q at their place.
// Rank r gets rows / 3 rows, plus one for r < rows % 3. Also: two rows of 3
// (rank 2 gets none, with a null recvbuf), a Max, one in place; a row
// length that differs between ranks fails every rank; bad arguments fail
// at once.
TEST(Engine, ReduceScattersByRowsSplitUnevenlyAndFuse) {
  const auto codes = run_ranks(3, [](int rank, int n, Communicator& comm, const std::string&) {
    Engine eng = Engine::start(comm);
    const auto N = static_cast<std::size_t>(n), me = static_cast<std::size_t>(rank);
    // This rank's first row and its number of rows, of `rows` rows.
    auto share = [&](std::size_t rows) {
      std::size_t first = 0;
      for (std::size_t p = 0; p < me; ++p) first += rows / N + (p < rows % N ? 1 : 0);
      return std::pair{first, rows / N + (me < rows % N ? 1 : 0)};
    };
    const int T = 6;
    std::vector<std::vector<std::int32_t>> in(T), out(T);
    std::vector<Work> ws;
    auto rows_of = [](int i) { return static_cast<std::size_t>(3 * i + 1 + i % 3); };
    for (int i = 0; i < T; ++i) {
      const std::size_t row = static_cast<std::size_t>(i + 1);
      in[static_cast<std::size_t>(i)].resize(rows_of(i) * row);
      for (std::size_t j = 0; j < in[static_cast<std::size_t>(i)].size(); ++j)
        in[static_cast<std::size_t>(i)][j] = rank * 1000 + i * 100 + static_cast<std::int32_t>(j);
      out[static_cast<std::size_t>(i)].assign(share(rows_of(i)).second * row, -1);
    }
    for (int k = 0; k < T; ++k) {
      const int i = (k + 2 * rank) % T;
      const auto u = static_cast<std::size_t>(i);
      ws.push_back(eng.reducescatter(named("rows.", i), in[u].data(), out[u].data(), rows_of(i),
                                     u + 1, DataType::Int32, ReduceOp::Sum));
    }
    std::vector<std::int32_t> two(6), two_out(3, -1), mx(7 * 2), mx_out(6, -1), inplace(5 * 4);
    for (std::size_t j = 0; j < two.size(); ++j) two[j] = rank + static_cast<std::int32_t>(j);
    for (std::size_t j = 0; j < mx.size(); ++j)
      mx[j] = (rank * 5 + static_cast<std::int32_t>(j)) % 11;
    for (std::size_t j = 0; j < inplace.size(); ++j)
      inplace[j] = rank + static_cast<std::int32_t>(j);
    ws.push_back(eng.reducescatter("two", two.data(), rank == 2 ? nullptr : two_out.data(), 2, 3,
                                   DataType::Int32, ReduceOp::Sum));
    ws.push_back(
        eng.reducescatter("max", mx.data(), mx_out.data(), 7, 2, DataType::Int32, ReduceOp::Max));
    std::int32_t* own = inplace.data() + share(5).first * 4;
    ws.push_back(
        eng.reducescatter("inplace", inplace.data(), own, 5, 4, DataType::Int32, ReduceOp::Sum));
    for (auto& w : ws) w.wait();
    int bad = 0;
    for (int i = 0; i < T; ++i) {
      const std::size_t row = static_cast<std::size_t>(i + 1);
      const auto [first, rows] = share(rows_of(i));
      for (std::size_t e = 0; e < rows * row; ++e) {
        const auto j = static_cast<std::int32_t>(first * row + e);
        bad += out[static_cast<std::size_t>(i)][e] == 1000 * n * (n - 1) / 2 + n * (i * 100 + j)
                   ? 0
                   : 1;
      }
    }
    // two rows of 3: the sum over q of q + j; rank 2 has none
    for (std::size_t e = 0; e < 3; ++e) {
      const auto j = static_cast<std::int32_t>(me * 3 + e);
      bad += two_out[e] == (rank < 2 ? n * (n - 1) / 2 + n * j : -1) ? 0 : 1;
    }
    {
      const auto [first, rows] = share(7);
      for (std::size_t e = 0; e < rows * 2; ++e) {
        const auto j = static_cast<std::int32_t>(first * 2 + e);
        std::int32_t want = 0;
        for (int q = 0; q < n; ++q) want = std::max(want, (q * 5 + j) % 11);
        bad += mx_out[e] == want ? 0 : 1;
      }
      const auto [ifirst, irows] = share(5);
      for (std::size_t e = 0; e < irows * 4; ++e)
        bad += own[e] == n * (n - 1) / 2 + n * static_cast<std::int32_t>(ifirst * 4 + e) ? 0 : 1;
    }
    if (bad != 0) {
      std::cerr << "rank " << rank << ": " << bad << " wrong elements\n";
      return 2;
    }
    const auto st = eng.stats();
    if (!some_fused(st, rank)) return 3;
    // Rows of 3 on rank 1, of 2 elsewhere: the same 12 elements.
    std::vector<std::int32_t> mixed(12, 1), mixed_out(8);
    Work w = rank == 1 ? eng.reducescatter("mixed", mixed.data(), mixed_out.data(), 4, 3,
                                           DataType::Int32, ReduceOp::Sum)
                       : eng.reducescatter("mixed", mixed.data(), mixed_out.data(), 6, 2,
                                           DataType::Int32, ReduceOp::Sum);
    if (!fails_with(w, ErrorCode::InvalidUsage, {"tensor 'mixed'", "in rows of"}, rank)) return 4;
    // Bad arguments: no row length; recvbuf overlapping sendbuf elsewhere
    // than at this rank's rows.
    try {
      eng.reducescatter("no-row", mixed.data(), mixed_out.data(), 4, 0, DataType::Int32,
                        ReduceOp::Sum);
      return 5;
    } catch (const chorus::Error& e) {
      if (e.code() != ErrorCode::InvalidArgument) return 5;
    }
    try {
      eng.reducescatter("overlap", mixed.data(), mixed.data() + (rank == 0 ? 1 : 0), 4, 2,
                        DataType::Int32, ReduceOp::Sum);
      return 6;
    } catch (const chorus::Error& e) {
      if (e.code() != ErrorCode::InvalidArgument ||
          std::string(e.what()).find("in place means") == std::string::npos)
        return 6;
    }
    eng.shutdown();
    return 0;
  });
  expect_all_zero(codes,
                  "reduce-scatter by rows (2 wrong value, 3 nothing fused, 4 no mismatch, 5 6 "
                  "bad arguments accepted)");
}

// Horovod's process sets: an engine on a split communicator runs beside
// the world's. 4 ranks: one engine over all, one over the even or the odd
// ranks; the same names in both, submitted interleaved, in another order
// per rank. Each sum must be over its own set.
TEST(Engine, EnginesOnSplitCommunicatorsRunSideBySide) {
  const auto codes = run_ranks(4, [](int rank, int n, Communicator& comm, const std::string&) {
    Engine world = Engine::start(comm);
    Communicator half = comm.split(rank % 2, rank);
    Engine part = Engine::start(half);
    const int parity = rank % 2;
    for (int round = 0; round < 3; ++round) {
      std::vector<std::vector<std::int64_t>> a(4, std::vector<std::int64_t>(5, rank + 1)),
          b(4, std::vector<std::int64_t>(5, 10 * (rank + 1)));
      std::vector<Work> ws;
      for (int k = 0; k < 4; ++k) {
        const int i = (k + rank) % 4;
        const std::string name = named("t", i);
        ws.push_back(world.allreduce(name, a[static_cast<std::size_t>(i)].data(),
                                     a[static_cast<std::size_t>(i)].data(), 5, DataType::Int64,
                                     ReduceOp::Sum));
        ws.push_back(part.allreduce(name, b[static_cast<std::size_t>(i)].data(),
                                    b[static_cast<std::size_t>(i)].data(), 5, DataType::Int64,
                                    ReduceOp::Sum));
      }
      for (auto& w : ws) w.wait();
      // world: 1 + 2 + ... + n; the set: 10 * (r + 1) over r of this parity
      std::int64_t set = 0;
      for (int r = parity; r < n; r += 2) set += 10 * (r + 1);
      for (int i = 0; i < 4; ++i)
        if (a[static_cast<std::size_t>(i)] != std::vector<std::int64_t>(5, n * (n + 1) / 2) ||
            b[static_cast<std::size_t>(i)] != std::vector<std::int64_t>(5, set)) {
          std::cerr << "rank " << rank << " round " << round << " tensor " << i << ": world "
                    << a[static_cast<std::size_t>(i)][0] << ", set "
                    << b[static_cast<std::size_t>(i)][0] << " (want " << set << ")\n";
          return 2;
        }
    }
    part.shutdown();
    world.shutdown();
    return 0;
  });
  expect_all_zero(codes, "process sets (2 a sum over the wrong ranks)");
}

// Join (Horovod's, for inputs of different lengths): rank r has 2 + 2r
// batches. Each batch's tensors (an allreduce of every op, two fused
// averages, reduce-scatters of blocks and of rows, an allgatherv) must be reduced over the ranks
// that still have data, whatever the joined ranks hold: the closed forms below are over ranks
// first..n-1, where first is the lowest rank still in. Every rank's join() returns 2, the rank with
// the most batches. Then the engine takes work again; in a second round rank 0 joins at once: an
// allgather, and a broadcast from rank 0, fail naming it; a broadcast from rank 1 runs; a
// submission while join() waits is refused.
TEST(Engine, JoinedRanksStandInUntilEveryRankHasJoined) {
  const auto codes = run_ranks(3, [](int rank, int n, Communicator& comm, const std::string&) {
    Engine eng = Engine::start(comm);
    const int batches = 2 + 2 * rank;
    for (int step = 0; step < batches; ++step) {
      int first = 0;  // the lowest rank with a batch `step`
      while (2 + 2 * first <= step) ++first;
      const auto f = static_cast<float>(rank + 1);
      std::vector<float> sum(8, f * static_cast<float>(step + 1)), avg_a(3, f), avg_b(3, 2 * f);
      std::vector<float> scatter_in(2 * static_cast<std::size_t>(n), f), scatter_out(2, -1.0f);
      // 2n + 1 rows of 2: rank 0 gets 3 rows, the others 2.
      const std::size_t my_rows = rank == 0 ? 3 : 2;
      std::vector<float> rows_in(2 * (2 * static_cast<std::size_t>(n) + 1), f),
          rows_out(2 * my_rows, -1.0f);
      std::vector<std::int32_t> mn(4, rank * 10 + step);
      std::vector<double> mx(2, -(rank + 1.0) - step);
      std::vector<std::int64_t> prod(2, rank + 2),
          share(static_cast<std::size_t>(rank + 1), rank * 100 + step);
      std::vector<std::int64_t> rows;
      std::vector<std::size_t> seen;
      std::vector<std::function<Work()>> submit = {
          [&] {
            return eng.allreduce("sum", sum.data(), sum.data(), 8, DataType::Float32,
                                 ReduceOp::Sum);
          },
          [&] {
            return eng.allreduce("avg.a", avg_a.data(), avg_a.data(), 3, DataType::Float32,
                                 ReduceOp::Avg);
          },
          [&] {
            return eng.allreduce("avg.b", avg_b.data(), avg_b.data(), 3, DataType::Float32,
                                 ReduceOp::Avg);
          },
          [&] {
            return eng.allreduce("min", mn.data(), mn.data(), 4, DataType::Int32, ReduceOp::Min);
          },
          [&] {
            return eng.allreduce("max", mx.data(), mx.data(), 2, DataType::Float64, ReduceOp::Max);
          },
          [&] {
            return eng.allreduce("prod", prod.data(), prod.data(), 2, DataType::Int64,
                                 ReduceOp::Prod);
          },
          [&] {
            return eng.reducescatter("scatter", scatter_in.data(), scatter_out.data(), 2,
                                     DataType::Float32, ReduceOp::Avg);
          },
          [&] {
            return eng.reducescatter("scatter.rows", rows_in.data(), rows_out.data(),
                                     2 * static_cast<std::size_t>(n) + 1, 2, DataType::Float32,
                                     ReduceOp::Avg);
          },
          [&] {
            return eng.allgatherv("rows", share.data(), share.size(), DataType::Int64,
                                  [&](const std::vector<std::size_t>& counts) {
                                    return room_for<std::int64_t>(counts, rows, 0, &seen);
                                  });
          }};
      std::vector<Work> ws;
      for (std::size_t i = 0; i < submit.size(); ++i)
        ws.push_back(submit[(i + static_cast<std::size_t>(rank) * 3) % submit.size()]());
      for (auto& w : ws) {
        try {
          if (!w.wait(20s)) return 2;
        } catch (const chorus::Error& e) {
          std::cerr << "rank " << rank << " step " << step << ": " << e.what() << "\n";
          return 3;
        }
      }
      float want_sum = 0, in = 0;
      double want_mean = 0;
      std::int64_t want_prod = 1;
      std::vector<std::int64_t> want_rows;
      std::vector<std::size_t> want_seen(static_cast<std::size_t>(n), 0);
      for (int r = first; r < n; ++r) {
        want_sum += static_cast<float>((r + 1) * (step + 1));
        want_mean += r + 1;
        in += 1;
        want_prod *= r + 2;
        want_rows.insert(want_rows.end(), static_cast<std::size_t>(r + 1), r * 100 + step);
        want_seen[static_cast<std::size_t>(r)] = static_cast<std::size_t>(r + 1);
      }
      want_mean /= in;
      const bool ok = sum == std::vector<float>(8, want_sum) &&
                      avg_a == std::vector<float>(3, static_cast<float>(want_mean)) &&
                      avg_b == std::vector<float>(3, static_cast<float>(2 * want_mean)) &&
                      scatter_out == std::vector<float>(2, static_cast<float>(want_mean)) &&
                      rows_out == std::vector<float>(2 * my_rows, static_cast<float>(want_mean)) &&
                      mn == std::vector<std::int32_t>(4, first * 10 + step) &&
                      mx == std::vector<double>(2, -(first + 1.0) - step) &&
                      prod == std::vector<std::int64_t>(2, want_prod) && rows == want_rows &&
                      seen == want_seen;
      if (!ok) {
        std::cerr << "rank " << rank << " step " << step << " (ranks " << first << ".." << n - 1
                  << " in): sum " << sum[0] << "/" << want_sum << ", avg " << avg_a[0] << "/"
                  << want_mean << ", min " << mn[0] << ", max " << mx[0] << ", prod " << prod[0]
                  << "/" << want_prod << ", rows " << rows.size() << "/" << want_rows.size()
                  << "\n";
        return 4;
      }
    }
    if (eng.join() != n - 1) return 5;
    std::int32_t one = 1, total = 0;
    eng.allreduce("after", &one, &total, 1, DataType::Int32, ReduceOp::Sum).wait();
    if (total != n) return 6;

    // Round 2: rank 0 joins at once.
    std::vector<float> b(4, static_cast<float>(rank));
    if (rank == 0) {
      int last = -1;
      std::thread joiner([&] { last = eng.join(); });
      comm.barrier();  // ranks 1 and 2 have seen rank 0 joined
      int rc = 7;
      try {
        eng.allreduce("probe", &one, &one, 1, DataType::Int32, ReduceOp::Sum);
      } catch (const chorus::Error& e) {
        if (e.code() == ErrorCode::InvalidUsage &&
            std::string(e.what()).find("join() waits") != std::string::npos)
          rc = 0;
      }
      comm.barrier();
      joiner.join();
      if (rc != 0) return rc;
      if (last != 1 && last != 2) return 8;
    } else {
      std::vector<float> g(2, 1.0f), gathered(6);
      Work wg = eng.allgather("g", g.data(), gathered.data(), 2, DataType::Float32);
      if (!fails_with(wg, ErrorCode::InvalidUsage, {"tensor 'g'", "rank 0 has joined", "allgather"},
                      rank))
        return 9;
      comm.barrier();
      comm.barrier();
      Work w0 = eng.broadcast("b0", b.data(), b.data(), 4, DataType::Float32, 0);
      if (!fails_with(w0, ErrorCode::InvalidUsage, {"its root, rank 0"}, rank)) return 10;
      eng.broadcast("b1", b.data(), b.data(), 4, DataType::Float32, 1).wait();
      if (b != std::vector<float>(4, 1.0f)) return 11;
      const int last = eng.join();
      if (last != 1 && last != 2) return 8;
    }
    eng.shutdown();
    return 0;
  });
  expect_all_zero(codes,
                  "join (2 hung, 3 failed, 4 wrong value, 5 join() did not return 2, 6 no work "
                  "after join, 7 a submission during join() taken, 8 wrong last rank, 9-10 no "
                  "clear error for what cannot be stood in for, 11 broadcast from rank 1 wrong)");
}

// An idle engine backs off: a second with nothing submitted runs far fewer
// cycles than a second of 2 ms cycles would (about 80 against up to 500),
// yet still some (a dead peer is still noticed). Work submitted afterwards,
// polled or waited for, completes with its closed form.
TEST(Engine, AnIdleEngineBacksOffAndStillTakesWork) {
  const auto codes = run_ranks(3, [](int rank, int n, Communicator& comm, const std::string&) {
    EngineConfig cfg;
    cfg.cycle = 2ms;
    Engine eng = Engine::start(comm, cfg);
    std::vector<float> x(6, 1.0f);
    eng.allreduce("warm", x.data(), x.data(), 6, DataType::Float32, ReduceOp::Sum).wait();
    const auto before = eng.stats().cycles;
    std::this_thread::sleep_for(1s);
    const auto idle = eng.stats().cycles - before;
    if (idle == 0 || idle >= 200) {
      std::cerr << "rank " << rank << ": " << idle << " cycles in an idle second\n";
      return 2;
    }
    const float want = static_cast<float>(n * (n + 1) / 2);
    std::vector<float> polled(6, static_cast<float>(rank + 1)),
        waited(6, static_cast<float>(rank + 1));
    Work p =
        eng.allreduce("polled", polled.data(), polled.data(), 6, DataType::Float32, ReduceOp::Sum);
    const auto limit = std::chrono::steady_clock::now() + 20s;
    while (!p.test()) {
      if (std::chrono::steady_clock::now() > limit) return 3;
      std::this_thread::sleep_for(1ms);
    }
    if (polled != std::vector<float>(6, want)) return 4;
    std::this_thread::sleep_for(300ms);  // idle again
    Work w =
        eng.allreduce("waited", waited.data(), waited.data(), 6, DataType::Float32, ReduceOp::Sum);
    if (!w.wait(20s)) return 5;
    if (waited != std::vector<float>(6, want)) return 6;
    eng.shutdown();
    return 0;
  });
  expect_all_zero(codes,
                  "idle (2 cycle count, 3 polled tensor hung, 4 its value, 5 waited tensor "
                  "hung, 6 its value)");
}

// A rank that never joins: ranks 0 and 2 join, rank 1 goes quiet. Rank 0
// must warn naming rank 1; with CHORUS_STALL_ABORT, join() must throw
// Timeout on ranks 0 and 2 naming rank 1 instead of waiting forever, and
// rank 1's next submission must fail too.
TEST(Engine, ARankThatNeverJoinsIsReportedAndJoinFails) {
  const auto codes = run_ranks(3, [](int rank, int, Communicator& comm, const std::string& dir) {
    const std::string log = dir + "/stderr-" + std::to_string(rank);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 2);
    ::close(fd);
    EngineConfig cfg;
    cfg.stall_warning = 200ms;
    cfg.stall_abort = 1000ms;
    Engine eng = Engine::start(comm, cfg);
    std::vector<float> x(4, 1.0f);
    eng.allreduce("before", x.data(), x.data(), 4, DataType::Float32, ReduceOp::Sum).wait();
    int rc = 0;
    if (rank != 1) {
      try {
        eng.join();
        rc = 2;
      } catch (const chorus::Error& e) {
        const std::string what = e.what();
        if (e.code() != ErrorCode::Timeout ||
            what.find("rank 1 neither joined") == std::string::npos) {
          std::cerr << "rank " << rank << ": " << what << "\n";
          rc = 3;
        }
      }
    } else {
      std::this_thread::sleep_for(4s);  // well past the abort (1 s after the others joined)
      try {
        eng.allreduce("late", x.data(), x.data(), 4, DataType::Float32, ReduceOp::Sum).wait();
        rc = 4;
      } catch (const chorus::Error& e) {
        if (e.code() != ErrorCode::Timeout) rc = 5;
      }
    }
    std::fflush(stderr);
    if (rank == 0 && rc == 0) {
      std::ifstream in(log);
      std::stringstream all;
      all << in.rdbuf();
      if (all.str().find("engine: ranks 0 and 2 have joined, but rank 1 neither joined nor had a "
                         "tensor run") == std::string::npos)
        rc = 6;
    }
    return rc;
  });
  EXPECT_EQ(codes[0], 0) << "rank 0: 2 join() returned, 3 wrong error, 6 no warning naming rank 1";
  EXPECT_EQ(codes[1], 0) << "rank 1: 4 a submission after the stop ran, 5 wrong error";
  EXPECT_EQ(codes[2], 0) << "rank 2: 2 join() returned, 3 wrong error";
}

// A rank that dies makes the other's waiting tensor fail, naming it.
TEST(Engine, ADeadRankFailsTheOthersTensors) {
  const auto codes = run_ranks(2, [](int rank, int, Communicator& comm, const std::string&) {
    Engine eng = Engine::start(comm);
    std::vector<float> x(8, 1.0f);
    eng.allreduce("first", x.data(), x.data(), 8, DataType::Float32, ReduceOp::Sum).wait();
    if (rank == 1) std::_Exit(0);  // dies without a word
    Work w = eng.allreduce("second", x.data(), x.data(), 8, DataType::Float32, ReduceOp::Sum);
    try {
      if (!w.wait(20s)) return 2;
      return 3;
    } catch (const chorus::Error& e) {
      const bool names = e.peer() == 1 || std::string(e.what()).find("rank 1") != std::string::npos;
      if ((e.code() != ErrorCode::PeerFailure && e.code() != ErrorCode::Timeout) || !names) {
        std::cerr << "rank 0: " << e.what() << "\n";
        return 4;
      }
    }
    return 0;
  });
  EXPECT_EQ(codes[0], 0) << "rank 0: 2 hung, 3 completed, 4 wrong error";
}

// A rank that dies inside a collective the engine runs (here: in its
// alltoall's allocator, called on the engine's thread once the splits are
// exchanged and before the data moves): the others' tensors in that
// collective fail naming it, instead of waiting forever (they were no
// longer among the pending ones that a stopping engine fails).
TEST(Engine, ARankThatDiesInsideACollectiveFailsItsTensorsOnTheOthers) {
  const auto codes = run_ranks(3, [](int rank, int n, Communicator& comm, const std::string&) {
    Engine eng = Engine::start(comm);
    std::vector<float> x(static_cast<std::size_t>(4 * n), 1.0f), got;
    Work w =
        eng.alltoall("fatal", x.data(), std::vector<std::size_t>(static_cast<std::size_t>(n), 4),
                     DataType::Float32, [&](const std::vector<std::size_t>& c) {
                       if (rank == 2) std::_Exit(0);  // dies without a word
                       got.resize(c.size() * 4);
                       return static_cast<void*>(got.data());
                     });
    try {
      if (!w.wait(20s)) return 2;
      return 3;
    } catch (const chorus::Error& e) {
      const bool names = e.peer() == 2 || std::string(e.what()).find("rank 2") != std::string::npos;
      if ((e.code() != ErrorCode::PeerFailure && e.code() != ErrorCode::Timeout) || !names) {
        std::cerr << "rank " << rank << ": " << e.what() << "\n";
        return 4;
      }
    }
    return 0;
  });
  for (int r : {0, 1})
    EXPECT_EQ(codes[static_cast<std::size_t>(r)], 0)
        << "rank " << r << ": 2 hung, 3 completed, 4 wrong error";
}

// The timeline: valid JSON; a row per tensor; negotiation, the ranks'
// arrivals, the fused allreduce and its copies, the cached round.
TEST(Engine, TheTimelineIsValidJsonWithEveryPhase) {
  const auto codes = run_ranks(2, [](int rank, int, Communicator& comm, const std::string& dir) {
    EngineConfig cfg;
    cfg.timeline = dir + "/timeline.json";
    cfg.cycle = 20ms;
    Engine eng = Engine::start(comm, cfg);
    std::vector<std::vector<float>> b(3, std::vector<float>(100, 1.0f));
    for (int round = 0; round < 2; ++round) {
      std::vector<Work> ws;
      for (int i = 0; i < 3; ++i) {
        // A quote in the name: the timeline must escape it.
        std::string name = named("grad/\"", i);
        name += '"';
        ws.push_back(eng.allreduce(name, b[static_cast<std::size_t>(i)].data(),
                                   b[static_cast<std::size_t>(i)].data(), 100, DataType::Float32, ReduceOp::Sum));
      }
      for (auto& w : ws) w.wait();
    }
    // A join round: rank 1 joins a few cycles after rank 0.
    if (rank == 1) std::this_thread::sleep_for(100ms);
    if (eng.join() != 1) return 6;
    eng.shutdown();
    eng = Engine();
    if (rank != 0) return 0;
    std::ifstream in(cfg.timeline.value());
    nlohmann::json events;
    try {
      events = nlohmann::json::parse(in);
    } catch (const std::exception& e) {
      std::cerr << "the timeline is not JSON: " << e.what() << "\n";
      return 2;
    }
    // Each round's three tensors are fused when one cycle takes all three
    // from both ranks (nearly always: they are submitted microseconds
    // apart and a cycle is 20 ms); at least one round must show it.
    std::map<std::string, int> count;
    std::vector<std::string> rows;
    int fused_events = 0, shared = 0;
    for (const auto& ev : events) {
      const std::string name = ev.at("name");
      ++count[name];
      if (name == "process_name") rows.push_back(ev.at("args").at("name"));
      if (name == "JOIN" && ev.at("args").at("last") != 1) return 7;
      if (name == "ALLREDUCE") {
        const int t = ev.at("args").at("tensors");
        if (t < 1 || t > 3) return 3;
        fused_events += t == 3 ? 1 : 0;
        shared += t > 1 ? 1 : 0;
      }
    }
    if (fused_events < 3) {
      std::cerr << "no round fused its three tensors\n";
      return 3;
    }
    std::sort(rows.begin(), rows.end());
    if (rows != std::vector<std::string>{"(join)", "grad/\"0\"", "grad/\"1\"", "grad/\"2\""})
      return 4;
    if (count["NEGOTIATE_allreduce"] != 3 || count["NEGOTIATE_allreduce (cached)"] != 3 ||
        count["rank 0 ready"] != 3 || count["rank 1 ready"] != 3 || count["ALLREDUCE"] != 6 ||
        count["MEMCPY_IN_FUSION_BUFFER"] != shared || count["MEMCPY_OUT_FUSION_BUFFER"] != shared ||
        count["rank 0 joined"] != 1 || count["rank 1 joined"] != 1 || count["JOIN"] != 1) {
      for (const auto& [k, v] : count) std::cerr << k << ": " << v << "\n";
      return 5;
    }
    return 0;
  });
  EXPECT_EQ(codes[0], 0) << "rank 0: 2 not JSON, 3 not fused, 4 wrong rows, 5 wrong events, "
                            "6 join() did not return 1, 7 JOIN names another last rank";
  EXPECT_EQ(codes[1], 0) << "rank 1: 6 join() did not return 1";
}

// Bad arguments fail at once, in the caller's thread.
TEST(Engine, BadArgumentsAreRejectedAtOnce) {
  const auto codes = run_ranks(1, [](int, int, Communicator& comm, const std::string&) {
    EngineConfig cfg;
    cfg.cycle = 200ms;  // "dup" below is still pending when submitted again
    Engine eng = Engine::start(comm, cfg);
    float x[4] = {1, 2, 3, 4};
    int bad = 0;
    auto expect = [&](ErrorCode code, const std::function<void()>& f, const char* what) {
      try {
        f();
        std::cerr << what << ": no error\n";
        ++bad;
      } catch (const chorus::Error& e) {
        if (e.code() != code) {
          std::cerr << what << ": " << e.what() << "\n";
          ++bad;
        }
      }
    };
    expect(ErrorCode::InvalidArgument, [&] { eng.allreduce("", x, x, 4, DataType::Float32, ReduceOp::Sum); }, "empty name");
    expect(ErrorCode::InvalidArgument, [&] { eng.allreduce("n", nullptr, x, 4, DataType::Float32, ReduceOp::Sum); }, "null send");
    expect(ErrorCode::InvalidArgument, [&] { eng.allreduce("n", x, x, 4, static_cast<DataType>(77), ReduceOp::Sum); }, "dtype");
    expect(ErrorCode::InvalidArgument, [&] { eng.allreduce("n", x, x, 4, DataType::Float32, static_cast<ReduceOp>(9)); }, "op");
    expect(ErrorCode::InvalidArgument, [&] { eng.broadcast("n", x, x, 4, DataType::Float32, 1); }, "root");
    // A name pending twice: the second is refused, the first completes.
    Work first = eng.allreduce("dup", x, x, 4, DataType::Float32, ReduceOp::Sum);
    expect(ErrorCode::InvalidUsage, [&] { eng.allreduce("dup", x, x, 4, DataType::Float32, ReduceOp::Sum); }, "duplicate");
    first.wait();
    eng.shutdown();
    expect(ErrorCode::InvalidUsage, [&] { eng.allreduce("late", x, x, 4, DataType::Float32, ReduceOp::Sum); }, "after shutdown");
    Engine empty;
    expect(ErrorCode::InvalidUsage, [&] { empty.allreduce("e", x, x, 4, DataType::Float32, ReduceOp::Sum); }, "empty handle");
    return bad;
  });
  EXPECT_EQ(codes[0], 0) << "that many checks failed (see stderr)";
}

// The environment: fusion and the cache switched off, a malformed value
// refused naming its variable.
TEST(Engine, TheEnvironmentSetsWhatTheConfigLeavesUnset) {
  const auto codes = run_ranks(2, [](int rank, int, Communicator& comm, const std::string&) {
    ::setenv("CHORUS_ENGINE_CYCLE_MS", "30", 1);
    ::setenv("CHORUS_FUSION_BYTES", "off", 1);
    ::setenv("CHORUS_ENGINE_CACHE", "0", 1);
    Engine eng = Engine::start(comm);
    std::vector<float> x(16, 1.0f);
    for (int round = 0; round < 2; ++round) {
      std::vector<Work> ws;
      for (int i = 0; i < 3; ++i)
        ws.push_back(eng.allreduce(named("x", i), x.data() + 4 * i, x.data() + 4 * i, 4, DataType::Float32,
                                   ReduceOp::Max));
      for (auto& w : ws) w.wait();
    }
    const auto s = eng.stats();
    eng.shutdown();
    if (s.fused != 0 || s.collectives != 6 || s.cache_hits != 0 || s.negotiations < 2) {
      std::cerr << "rank " << rank << ": fused " << s.fused << ", collectives " << s.collectives
                << ", cache hits " << s.cache_hits << ", negotiations " << s.negotiations << "\n";
      return 2;
    }
    ::setenv("CHORUS_ENGINE_CYCLE_MS", "soon", 1);
    try {
      Engine::start(comm);
      return 3;
    } catch (const chorus::Error& e) {
      if (e.code() != ErrorCode::InvalidArgument ||
          std::string(e.what()).find("CHORUS_ENGINE_CYCLE_MS=soon") == std::string::npos)
        return 4;
    }
    ::setenv("CHORUS_ENGINE_CYCLE_MS", "1", 1);
    ::setenv("CHORUS_FUSION_BYTES", "lots", 1);
    try {
      Engine::start(comm);
      return 5;
    } catch (const chorus::Error& e) {
      if (e.code() != ErrorCode::InvalidArgument ||
          std::string(e.what()).find("CHORUS_FUSION_BYTES") == std::string::npos)
        return 6;
    }
    // Set to the empty string: unset, the defaults apply (fusion and the cache on).
    ::setenv("CHORUS_FUSION_BYTES", "", 1);
    ::setenv("CHORUS_ENGINE_CACHE", "", 1);
    ::setenv("CHORUS_ENGINE_CYCLE_MS", "", 1);
    try {
      Engine again = Engine::start(comm);
      for (int round = 0; round < 2; ++round)
        again.allreduce("y", x.data(), x.data(), 4, DataType::Float32, ReduceOp::Max).wait();
      const auto st = again.stats();
      again.shutdown();
      if (st.cache_hits != 1) return 7;
    } catch (const chorus::Error& e) {
      std::cerr << "rank " << rank << ": empty variables refused: " << e.what() << "\n";
      return 8;
    }
    return 0;
  });
  expect_all_zero(codes,
                  "environment (2 counts wrong, 3-6 a malformed value not refused clearly, "
                  "7-8 an empty one not taken as unset)");
}

// Every rank shuts down at once, just after submitting: what every rank
// submitted still runs, with its closed-form value; what only rank 0
// submitted fails with Aborted.
TEST(Engine, ShutdownRunsWhatEveryRankSubmittedAndFailsTheRest) {
  const auto codes = run_ranks(2, [](int rank, int n, Communicator& comm, const std::string&) {
    Engine eng = Engine::start(comm);
    std::vector<float> every(5, static_cast<float>(rank + 1));
    float x[2] = {1, 1};
    Work w_every =
        eng.allreduce("every", every.data(), every.data(), 5, DataType::Float32, ReduceOp::Sum);
    Work w_only;
    if (rank == 0) w_only = eng.allreduce("only-0", x, x, 2, DataType::Float32, ReduceOp::Sum);
    eng.shutdown();
    try {
      if (!w_every.wait(20s)) return 2;
    } catch (const chorus::Error& e) {
      std::cerr << "rank " << rank << ": 'every' failed: " << e.what() << "\n";
      return 3;
    }
    const float want = static_cast<float>(n * (n + 1) / 2);
    for (float v : every)
      if (v != want) return 4;
    if (rank == 0 && !fails_with(w_only, ErrorCode::Aborted, {"only-0", "shut down"}, rank))
      return 5;
    return 0;
  });
  expect_all_zero(codes, "shutdown (2 hung, 3 failed, 4 wrong value, 5 'only-0' not Aborted)");
}

// Rank 1 leaves early: its Engine goes out of scope (as when an exception
// unwinds a training loop) while ranks 0 and 2 go on. A name rank 1
// submitted still completes when the others submit it; a new name and a
// cached one that rank 1 never submitted fail at once with Aborted naming
// rank 1, where they used to wait forever (no CHORUS_STALL_ABORT here).
// Rank 1's destructor returns once the others shut down too.
TEST(Engine, ARankThatShutsDownFailsTheNamesItNeverSubmitted) {
  const auto codes = run_ranks(3, [](int rank, int n, Communicator& comm, const std::string&) {
    std::vector<float> kept(3, static_cast<float>(rank + 1));
    std::vector<float> c(4, 1.0f);
    const float want = static_cast<float>(n * (n + 1) / 2);
    if (rank == 1) {
      Work w;
      {
        Engine eng = Engine::start(comm);
        eng.allreduce("cached", c.data(), c.data(), 4, DataType::Float32, ReduceOp::Sum).wait();
        w = eng.allreduce("kept", kept.data(), kept.data(), 3, DataType::Float32, ReduceOp::Sum);
      }  // ~Engine: shutdown, which returns when ranks 0 and 2 have shut down too
      try {
        if (!w.wait(1s)) return 2;  // the engine has stopped: it completed or failed
      } catch (const chorus::Error& e) {
        std::cerr << "rank 1: 'kept' failed: " << e.what() << "\n";
        return 3;
      }
      return kept == std::vector<float>(3, want) ? 0 : 4;
    }
    Engine eng = Engine::start(comm);
    eng.allreduce("cached", c.data(), c.data(), 4, DataType::Float32, ReduceOp::Sum).wait();
    std::this_thread::sleep_for(300ms);  // rank 1's shutdown has (most likely) been announced
    Work w_kept =
        eng.allreduce("kept", kept.data(), kept.data(), 3, DataType::Float32, ReduceOp::Sum);
    Work w_fresh = eng.allreduce("fresh", c.data(), c.data(), 4, DataType::Float32, ReduceOp::Sum);
    Work w_cached =
        eng.allreduce("cached", c.data(), c.data(), 4, DataType::Float32, ReduceOp::Sum);
    try {
      if (!w_kept.wait(20s)) return 5;
    } catch (const chorus::Error& e) {
      std::cerr << "rank " << rank << ": 'kept' failed: " << e.what() << "\n";
      return 6;
    }
    if (kept != std::vector<float>(3, want)) return 7;
    // Rank 1, and the other of ranks 0 and 2 if it has finished its own
    // checks and shut down meanwhile.
    const std::regex names_rank_1(
        "can never complete: (rank 1 has|ranks (0 and )?1( and 2)? have) shut down");
    auto fails_naming_rank_1 = [&](Work& w) {
      try {
        if (!w.wait(20s)) {
          std::cerr << "rank " << rank << ": still waiting after 20 s\n";
          return false;
        }
        std::cerr << "rank " << rank << ": completed, but should have failed\n";
        return false;
      } catch (const chorus::Error& e) {
        const bool ok = e.code() == ErrorCode::Aborted && std::regex_search(e.what(), names_rank_1);
        if (!ok) std::cerr << "rank " << rank << ": failed with " << e.what() << "\n";
        return ok;
      }
    };
    if (!fails_naming_rank_1(w_fresh)) return 8;
    if (!fails_naming_rank_1(w_cached)) return 9;
    // The name can be submitted again, and fails the same way.
    Work again = eng.allreduce("fresh", c.data(), c.data(), 4, DataType::Float32, ReduceOp::Sum);
    if (!fails_naming_rank_1(again)) return 10;
    eng.shutdown();
    return 0;
  });
  EXPECT_EQ(codes[1], 0) << "rank 1: 2 'kept' still waiting, 3 failed, 4 wrong value (-1: hung)";
  for (int r : {0, 2})
    EXPECT_EQ(codes[static_cast<std::size_t>(r)], 0)
        << "rank " << r << ": 5 'kept' hung, 6 failed, 7 wrong value, 8-10 a name rank 1 never "
        << "submitted did not fail naming it";
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
