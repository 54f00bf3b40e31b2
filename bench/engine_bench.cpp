// chorus-engine-bench: what the tensor engine (docs/engine.md) costs and
// saves. Each step averages T tensors of B bytes (float32 sum) in one of
// three ways, and the median step time is printed:
//   engine  - T named tensors through chorus::Engine (negotiated, fused)
//   async   - T allreduce_async calls, one per tensor, then wait for all
//   packed  - the T tensors copied into one buffer by hand, one allreduce
//
//   chorusrun -n 4 -- chorus-engine-bench --tensors 64 --bytes 4K --mode all
//   (--coll allgather or allgatherv: T tensors gathered instead; --coll
//   reducescatter: T tensors of n blocks of B bytes reduce-scattered; --coll
//   reducescatter-rows: T tensors of n * B/4 + 1 float rows of one element,
//   which do not divide by the ranks (rank 0 gets one more); --coll
//   alltoall: T tensors of n blocks of B bytes, block j to rank j; --gap-ms G:
//   every rank sleeps G ms before each step, as a training loop computes
//   between its collectives, and the engine sits idle meanwhile; --poll:
//   wait by polling Work::test() every 50 us, as a framework that only
//   checks its tensors does; --idle-s S: first, the CPU this process uses
//   while its engine sits idle S seconds, and the cycles it runs)

#include <chorus/chorus.hpp>

#include "cli/cli.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>

namespace {

using Clock = std::chrono::steady_clock;

std::size_t parse_size(const std::string& s) {
  std::size_t pos = 0;
  const unsigned long long n = std::stoull(s, &pos);
  const std::string unit = s.substr(pos);
  if (unit.empty()) return n;
  if (unit == "K") return n << 10;
  if (unit == "M") return n << 20;
  throw std::invalid_argument("--bytes " + s +
                              ": expected a number with an optional K or M suffix");
}

// One step of T allgathers: through the engine, one allgather_async each, or
// packed by hand into one allgather (each rank's shares side by side) and
// unpacked per tensor. With `varying` (--coll allgatherv) this rank's share
// is `mine` of the `count` elements: the engine gathers it by allgatherv,
// negotiating the counts; the other two, which a caller who knew every
// rank's count could write, pad every share to `count`.
void run_allgather_step(const std::string& m, chorus::Engine& eng, chorus::Communicator& comm,
                        const std::vector<std::string>& names,
                        std::vector<std::vector<float>>& shares,
                        std::vector<std::vector<float>>& gathered, std::vector<float>& packed,
                        std::vector<float>& packed_all, std::size_t count, bool varying,
                        std::size_t mine, std::vector<chorus::Work>& works) {
  const std::size_t T = shares.size();
  const auto n = static_cast<std::size_t>(comm.size());
  if (m == "engine" && varying) {
    for (std::size_t i = 0; i < T; ++i)
      works.push_back(eng.allgatherv(names[i], shares[i].data(), mine, chorus::DataType::Float32,
                                     [&gathered, i](const std::vector<std::size_t>&) {
                                       return static_cast<void*>(gathered[i].data());
                                     }));
  } else if (m == "engine") {
    for (std::size_t i = 0; i < T; ++i)
      works.push_back(eng.allgather(names[i], shares[i].data(), gathered[i].data(), count,
                                    chorus::DataType::Float32));
  } else if (m == "async") {
    for (std::size_t i = 0; i < T; ++i)
      works.push_back(comm.allgather_async(shares[i].data(), gathered[i].data(), count,
                                           chorus::DataType::Float32));
  } else {
    for (std::size_t i = 0; i < T; ++i)
      std::memcpy(packed.data() + i * count, shares[i].data(), count * 4);
    comm.allgather(packed.data(), packed_all.data(), T * count, chorus::DataType::Float32);
    for (std::size_t i = 0; i < T; ++i)
      for (std::size_t p = 0; p < n; ++p)
        std::memcpy(gathered[i].data() + p * count, packed_all.data() + (p * T + i) * count,
                    count * 4);
  }
}

// User and system CPU of this process so far, every thread's.
double cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  auto s = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) * 1e-6;
  };
  return s(u.ru_utime) + s(u.ru_stime);
}

// One step of T reduce-scatters (each tensor n blocks of `count`): through
// the engine, one reduce_scatter_async each, or packed by hand (block p of
// every tensor side by side in block p of one buffer) into one.
void run_scatter_step(const std::string& m, chorus::Engine& eng, chorus::Communicator& comm,
                      const std::vector<std::string>& names, std::vector<std::vector<float>>& sends,
                      std::vector<std::vector<float>>& outs, std::vector<float>& packed,
                      std::vector<float>& packed_out, std::size_t count,
                      std::vector<chorus::Work>& works) {
  const std::size_t T = sends.size();
  const auto n = static_cast<std::size_t>(comm.size());
  if (m == "engine") {
    for (std::size_t i = 0; i < T; ++i)
      works.push_back(eng.reducescatter(names[i], sends[i].data(), outs[i].data(), count,
                                        chorus::DataType::Float32, chorus::ReduceOp::Sum));
  } else if (m == "async") {
    for (std::size_t i = 0; i < T; ++i)
      works.push_back(comm.reduce_scatter_async(sends[i].data(), outs[i].data(), count,
                                                chorus::DataType::Float32, chorus::ReduceOp::Sum));
  } else {
    for (std::size_t p = 0; p < n; ++p)
      for (std::size_t i = 0; i < T; ++i)
        std::memcpy(packed.data() + (p * T + i) * count, sends[i].data() + p * count, count * 4);
    comm.reduce_scatter(packed.data(), packed_out.data(), T * count, chorus::DataType::Float32,
                        chorus::ReduceOp::Sum);
    for (std::size_t i = 0; i < T; ++i)
      std::memcpy(outs[i].data(), packed_out.data() + i * count, count * 4);
  }
}

// One step of T reduce-scatters by rows (each tensor n * count + 1 rows of
// one element: rank 0 gets count + 1, the others count): through the
// engine, one reduce_scatterv_async each, or packed by hand (rank p's rows
// of every tensor side by side in block p of one buffer) into one.
void run_rows_step(const std::string& m, chorus::Engine& eng, chorus::Communicator& comm,
                   const std::vector<std::string>& names, std::vector<std::vector<float>>& sends,
                   std::vector<std::vector<float>>& outs, std::vector<float>& packed,
                   std::vector<float>& packed_out, std::size_t count,
                   std::vector<chorus::Work>& works) {
  const std::size_t T = sends.size();
  const auto n = static_cast<std::size_t>(comm.size());
  const std::size_t rows = n * count + 1;
  std::vector<std::size_t> each(n, count), block(n, T * count);
  each[0] = count + 1;
  block[0] = T * (count + 1);
  if (m == "engine") {
    for (std::size_t i = 0; i < T; ++i)
      works.push_back(eng.reducescatter(names[i], sends[i].data(), outs[i].data(), rows, 1,
                                        chorus::DataType::Float32, chorus::ReduceOp::Sum));
  } else if (m == "async") {
    for (std::size_t i = 0; i < T; ++i)
      works.push_back(comm.reduce_scatterv_async(sends[i].data(), outs[i].data(), each,
                                                 chorus::DataType::Float32, chorus::ReduceOp::Sum));
  } else {
    std::size_t at = 0;
    for (std::size_t p = 0; p < n; ++p) {
      const std::size_t first = p == 0 ? 0 : count + 1 + (p - 1) * count;
      for (std::size_t i = 0; i < T; ++i, at += each[p])
        std::memcpy(packed.data() + at, sends[i].data() + first, each[p] * 4);
    }
    comm.reduce_scatterv(packed.data(), packed_out.data(), block, chorus::DataType::Float32,
                         chorus::ReduceOp::Sum);
    const std::size_t mine = each[static_cast<std::size_t>(comm.rank())];
    for (std::size_t i = 0; i < T; ++i)
      std::memcpy(outs[i].data(), packed_out.data() + i * mine, mine * 4);
  }
}

// One step of T alltoalls (each tensor n blocks of `count`, block j for
// rank j): through the engine (splits of `count` each, the result where the
// allocator says), one alltoall_async each, or packed by hand (block j of
// every tensor side by side in block j of one buffer) into one alltoall.
void run_alltoall_step(const std::string& m, chorus::Engine& eng, chorus::Communicator& comm,
                       const std::vector<std::string>& names,
                       std::vector<std::vector<float>>& sends,
                       std::vector<std::vector<float>>& outs, std::vector<float>& packed,
                       std::vector<float>& packed_out, std::size_t count,
                       std::vector<chorus::Work>& works) {
  const std::size_t T = sends.size();
  const auto n = static_cast<std::size_t>(comm.size());
  if (m == "engine") {
    const std::vector<std::size_t> splits(n, count);
    for (std::size_t i = 0; i < T; ++i)
      works.push_back(eng.alltoall(names[i], sends[i].data(), splits, chorus::DataType::Float32,
                                   [&outs, i](const std::vector<std::size_t>&) {
                                     return static_cast<void*>(outs[i].data());
                                   }));
  } else if (m == "async") {
    for (std::size_t i = 0; i < T; ++i)
      works.push_back(
          comm.alltoall_async(sends[i].data(), outs[i].data(), count, chorus::DataType::Float32));
  } else {
    for (std::size_t p = 0; p < n; ++p)
      for (std::size_t i = 0; i < T; ++i)
        std::memcpy(packed.data() + (p * T + i) * count, sends[i].data() + p * count, count * 4);
    comm.alltoall(packed.data(), packed_out.data(), T * count, chorus::DataType::Float32);
    for (std::size_t p = 0; p < n; ++p)
      for (std::size_t i = 0; i < T; ++i)
        std::memcpy(outs[i].data() + p * count, packed_out.data() + (p * T + i) * count, count * 4);
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int tensors = 64;
  std::string bytes_text = "4K";
  int steps = 200;
  int warmup = 20;
  std::string mode = "all";
  std::string coll = "allreduce";
  double gap_ms = 0;
  bool poll = false;
  double idle_s = 0;
  chorus::cli::Parser app{
      "chorus-engine-bench: T tensors of B bytes averaged (or gathered) per step through the "
      "tensor engine, one allreduce_async (allgather_async) each, or one hand-packed call"};
  app.add("--tensors", tensors, "tensors per step").range(1, 100000);
  app.add("--bytes", bytes_text, "bytes per tensor (K, M suffixes)");
  app.add("--steps", steps, "timed steps").positive();
  app.add("--warmup", warmup, "untimed steps first").non_negative();
  app.add("--mode", mode, "engine, async, packed or all")
      .one_of({"engine", "async", "packed", "all"});
  app.add("--coll", coll,
          "allreduce, allgather (B is each rank's share), allgatherv (rank r shares "
          "(r+1)/n of B), reducescatter (B is each rank's block), reducescatter-rows (n B/4 + 1 "
          "rows of one float: rank 0 gets one more) or alltoall (B to each rank)")
      .one_of({"allreduce", "allgather", "allgatherv", "reducescatter", "reducescatter-rows",
               "alltoall"})
      .show_default();
  app.add("--gap-ms", gap_ms, "milliseconds every rank sleeps before each step (untimed)")
      .non_negative();
  app.flag("--poll", poll, "wait by polling Work::test() every 50 us (engine and async modes)");
  app.add("--idle-s", idle_s,
          "first, the CPU used while the engine sits idle this many seconds (engine mode)")
      .non_negative();
  if (const std::optional<int> status = app.parse(argc, argv)) return *status;
  try {
    const std::size_t bytes = parse_size(bytes_text);
    const std::size_t count = std::max<std::size_t>(1, bytes / 4);
    auto comm = chorus::Communicator::from_env();
    const auto T = static_cast<std::size_t>(tensors);
    std::vector<std::vector<float>> grads(T, std::vector<float>(count, 1.0f));
    const bool varying = coll == "allgatherv";
    const bool gather = coll == "allgather" || varying;
    const auto n = static_cast<std::size_t>(comm.size());
    const std::size_t mine =
        varying ? std::max<std::size_t>(1, count * static_cast<std::size_t>(comm.rank() + 1) / n)
                : count;
    const bool by_rows = coll == "reducescatter-rows";
    const bool scatter = coll == "reducescatter" || by_rows;
    const bool exchange = coll == "alltoall";
    if (scatter || exchange)
      for (auto& g : grads) g.assign(count * n + (by_rows ? 1 : 0), 1.0f);
    std::vector<float> packed(T * (count * (scatter || exchange ? n : 1) + (by_rows ? 1 : 0))),
        packed_all(gather ? T * count * n : 0);
    std::vector<float> packed_out(scatter    ? T * (count + (by_rows ? 1 : 0))
                                  : exchange ? T * count * n
                                             : 0);
    std::vector<std::vector<float>> gathered(gather ? T : 0, std::vector<float>(count * n));
    std::vector<std::vector<float>> outs(
        scatter || exchange ? T : 0,
        std::vector<float>(count * (exchange ? n : 1) + (by_rows ? 1 : 0)));
    std::vector<std::string> names;
    for (std::size_t i = 0; i < T; ++i) names.push_back("grad." + std::to_string(i));
    if (comm.rank() == 0)
      std::printf(
          "# %s: %d ranks over %s, %zu tensors of %zu bytes per step, median of %d steps\n"
          "# %-8s %12s %14s %s\n",
          coll.c_str(), comm.size(), comm.transport_name().c_str(), T, count * 4, steps, "mode",
          "step (us)", "per tensor (us)", "");
    for (const std::string m : {"engine", "async", "packed"}) {
      if (mode != "all" && mode != m) continue;
      chorus::Engine eng;
      if (m == "engine") eng = chorus::Engine::start(comm);
      std::uint64_t idle_cycles = 0;  // not counted per step
      if (m == "engine" && idle_s > 0) {
        comm.barrier();
        const double cpu0 = cpu_seconds();
        const auto cycles0 = eng.stats().cycles;
        std::this_thread::sleep_for(std::chrono::duration<double>(idle_s));
        double cpu = cpu_seconds() - cpu0;
        const auto cycles = eng.stats().cycles - cycles0;
        idle_cycles = eng.stats().cycles;
        comm.allreduce(&cpu, &cpu, 1, chorus::DataType::Float64, chorus::ReduceOp::Max);
        if (comm.rank() == 0)
          std::printf("# idle %.1f s: %.3f s of CPU (the busiest rank), %llu cycles\n", idle_s, cpu,
                      static_cast<unsigned long long>(cycles));
      }
      std::vector<double> times;
      std::vector<chorus::Work> works;
      for (int s = 0; s < warmup + steps; ++s) {
        if (gap_ms > 0)
          std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(gap_ms));
        comm.barrier();
        const auto t0 = Clock::now();
        works.clear();
        if (gather) {
          run_allgather_step(m, eng, comm, names, grads, gathered, packed, packed_all, count,
                             varying, mine, works);
        } else if (by_rows) {
          run_rows_step(m, eng, comm, names, grads, outs, packed, packed_out, count, works);
        } else if (scatter) {
          run_scatter_step(m, eng, comm, names, grads, outs, packed, packed_out, count, works);
        } else if (exchange) {
          run_alltoall_step(m, eng, comm, names, grads, outs, packed, packed_out, count, works);
        } else if (m == "engine") {
          for (std::size_t i = 0; i < T; ++i)
            works.push_back(eng.allreduce(names[i], grads[i].data(), grads[i].data(), count,
                                          chorus::DataType::Float32, chorus::ReduceOp::Sum));
        } else if (m == "async") {
          for (std::size_t i = 0; i < T; ++i)
            works.push_back(comm.allreduce_async(grads[i].data(), grads[i].data(), count,
                                                 chorus::DataType::Float32, chorus::ReduceOp::Sum));
        } else {
          for (std::size_t i = 0; i < T; ++i)
            std::memcpy(packed.data() + i * count, grads[i].data(), count * 4);
          comm.allreduce(packed.data(), packed.data(), T * count, chorus::DataType::Float32,
                         chorus::ReduceOp::Sum);
          for (std::size_t i = 0; i < T; ++i)
            std::memcpy(grads[i].data(), packed.data() + i * count, count * 4);
        }
        for (auto& w : works) {
          if (!poll) {
            w.wait();
            continue;
          }
          while (!w.test()) std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
        const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
        if (s >= warmup) times.push_back(us);
        // Keep the values small: the sums would overflow float after enough steps.
        for (auto& g : grads) std::fill(g.begin(), g.end(), 1.0f);
      }
      // Every rank's median, the slowest reported.
      double med = median(times);
      comm.allreduce(&med, &med, 1, chorus::DataType::Float64, chorus::ReduceOp::Max);
      if (comm.rank() == 0) {
        std::printf("  %-8s %12.1f %14.2f", m.c_str(), med, med / static_cast<double>(T));
        if (m == "engine") {
          const auto st = eng.stats();
          std::printf(
              gather     ? "   (%.2f allgathers, %.2f cycles per step)"
              : scatter  ? "   (%.2f reduce-scatters, %.2f cycles per step)"
              : exchange ? "   (%.2f collectives, %.2f cycles per step)"
                         : "   (%.2f allreduces, %.2f cycles per step)",
              static_cast<double>(st.collectives) / static_cast<double>(warmup + steps),
              static_cast<double>(st.cycles - idle_cycles) / static_cast<double>(warmup + steps));
        }
        std::printf("\n");
      }
      if (m == "engine") eng.shutdown();
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "chorus-engine-bench: %s\n", e.what());
    return 1;
  }
}
