// chorus-engine-bench: what the tensor engine (docs/engine.md) costs and
// saves. Each step averages T tensors of B bytes (float32 sum) in one of
// three ways, and the median step time is printed:
//   engine  - T named tensors through chorus::Engine (negotiated, fused)
//   async   - T allreduce_async calls, one per tensor, then wait for all
//   packed  - the T tensors copied into one buffer by hand, one allreduce
//
//   chorusrun -n 4 -- chorus-engine-bench --tensors 64 --bytes 4K --mode all

#include <chorus/chorus.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

std::size_t parse_size(const std::string& s) {
  std::size_t pos = 0;
  const unsigned long long n = std::stoull(s, &pos);
  const std::string unit = s.substr(pos);
  if (unit.empty()) return n;
  if (unit == "K") return n << 10;
  if (unit == "M") return n << 20;
  throw CLI::ValidationError("--bytes", "expected a number with an optional K or M suffix");
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
  CLI::App app{"chorus-engine-bench: T tensors of B bytes averaged per step through the tensor "
               "engine, one allreduce_async each, or one hand-packed allreduce"};
  app.add_option("--tensors", tensors, "tensors per step")->check(CLI::Range(1, 100000));
  app.add_option("--bytes", bytes_text, "bytes per tensor (K, M suffixes)");
  app.add_option("--steps", steps, "timed steps")->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "untimed steps first")->check(CLI::NonNegativeNumber);
  app.add_option("--mode", mode, "engine, async, packed or all")
      ->check(CLI::IsMember({"engine", "async", "packed", "all"}));
  CLI11_PARSE(app, argc, argv);
  try {
    const std::size_t bytes = parse_size(bytes_text);
    const std::size_t count = std::max<std::size_t>(1, bytes / 4);
    auto comm = chorus::Communicator::from_env();
    const auto T = static_cast<std::size_t>(tensors);
    std::vector<std::vector<float>> grads(T, std::vector<float>(count, 1.0f));
    std::vector<float> packed(T * count);
    std::vector<std::string> names;
    for (std::size_t i = 0; i < T; ++i) names.push_back("grad." + std::to_string(i));
    if (comm.rank() == 0)
      std::printf("# %d ranks over %s, %zu tensors of %zu bytes per step, median of %d steps\n"
                  "# %-8s %12s %14s %s\n",
                  comm.size(), comm.transport_name().c_str(), T, count * 4, steps, "mode",
                  "step (us)", "per tensor (us)", "");
    for (const std::string m : {"engine", "async", "packed"}) {
      if (mode != "all" && mode != m) continue;
      chorus::Engine eng;
      if (m == "engine") eng = chorus::Engine::start(comm);
      std::vector<double> times;
      std::vector<chorus::Work> works;
      for (int s = 0; s < warmup + steps; ++s) {
        comm.barrier();
        const auto t0 = Clock::now();
        works.clear();
        if (m == "engine") {
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
        for (auto& w : works) w.wait();
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
          std::printf("   (%.2f allreduces per step)",
                      static_cast<double>(st.collectives) / static_cast<double>(warmup + steps));
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
