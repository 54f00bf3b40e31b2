#pragma once

// chorus-bench --p2p: point-to-point bandwidth and latency between every
// ordered pair of ranks (osu_bw / osu_latency over all pairs), one pair at a
// time, through the public send/recv API only, so that it runs on every
// transport. Rank 0 prints two matrices (rows: sender, columns: receiver) and
// names the slowest link.

#include <chorus/communicator.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>

namespace chorus::bench {

struct P2POptions {
  std::size_t bytes = std::size_t{4} << 20;  // bandwidth message size
  int window = 8;                            // messages in flight per bandwidth iteration
  // Timed bandwidth receives each into a buffer of their own; by default the
  // window's receives share one (as osu_bw and ucx_perftest do).
  bool distinct_buffers = false;
  std::size_t lat_bytes = 8;                 // ping-pong message size
  int iters = 20;                            // timed bandwidth iterations (latency: x kLatencyRoundTrips)
  int warmup_iters = 5;                      // untimed iterations before them (same factor)
  int check = 1;                             // checked (untimed) iterations per pair; 0: none
};

// Round trips of the latency test per iteration of -n / -w.
inline constexpr int kLatencyRoundTrips = 50;

struct P2PResult {
  nlohmann::json report;     // the --json document (meaningful on rank 0)
  std::uint64_t wrong = 0;   // wrong bytes over all pairs (every rank)
};

// Runs on every rank; prints on rank 0 to `out`. With one rank it prints a
// note and measures nothing.
P2PResult run_p2p(Communicator& comm, const P2POptions& opt, std::FILE* out);

}  // namespace chorus::bench
