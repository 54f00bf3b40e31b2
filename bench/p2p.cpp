// chorus-bench --p2p: bandwidth and latency of every ordered pair of ranks.
//
// The ranks visit the pairs (src, dst), src != dst, in the same order. For a
// pair, only src and dst communicate; then every rank joins a small allreduce
// that carries the pair's results, which is also what keeps the pairs apart:
// nothing of the next pair starts before every rank has contributed to it.
//
//  * Bandwidth (osu_bw): per iteration src posts `window` send_async of
//    `bytes` from one buffer, dst posts as many recv_async, waits for them
//    and answers with a 1-byte acknowledgement that src receives. bw =
//    window * bytes * iters / time on src. As in osu_bw and ucx_perftest,
//    the timed receives share one buffer (--p2p-distinct-buffers: one
//    each); the checked iterations always receive into distinct slots, so
//    that every message is verified.
//  * Latency (osu_latency): ping-pong of `lat_bytes` with blocking send and
//    recv; one-way latency = round-trip time / 2, averaged.
//  * Check: after the timed iterations, `check` iterations of each test with
//    a pattern of (src, dst, iteration, byte index); the receivers poison
//    their buffers first and count the bytes that differ.
//
// Only the public Communicator API is used, so every transport is measured
// the same way.

#include "p2p.hpp"

#include "bench_common.hpp"
#include "bench_util.hpp"

#include <chorus/chorus.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstring>
#include <string>
#include <vector>

namespace chorus::bench {
namespace {

using Clock = std::chrono::steady_clock;

constexpr unsigned char kPoison = 0xA5;

// Byte k of the message from src to dst in checked iteration `iter`: differs
// between neighbouring bytes, pairs, directions and iterations, so a shifted,
// stale, misrouted or missing message shows.
unsigned char pattern_byte(int src, int dst, int iter, std::size_t k) noexcept {
  const std::uint64_t x = static_cast<std::uint64_t>(k) * 0x9E3779B97F4A7C15ull +
                          static_cast<std::uint64_t>(src) * 0xC2B2AE3D27D4EB4Full +
                          static_cast<std::uint64_t>(dst) * 0x165667B19E3779F9ull +
                          static_cast<std::uint64_t>(iter) * 0x27D4EB2F165667C5ull;
  return static_cast<unsigned char>(x >> 56);
}

void fill_pattern(unsigned char* buf, std::size_t n, int src, int dst, int iter) noexcept {
  for (std::size_t k = 0; k < n; ++k) buf[k] = pattern_byte(src, dst, iter, k);
}

std::uint64_t count_wrong(const unsigned char* buf, std::size_t n, int src, int dst,
                          int iter) noexcept {
  std::uint64_t wrong = 0;
  for (std::size_t k = 0; k < n; ++k) wrong += buf[k] != pattern_byte(src, dst, iter, k);
  return wrong;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// One pair's numbers, as the allreduce after the pair carries them (every
// field a double: the sum over ranks of what each participant knows).
struct PairResult {
  double bw_gbps = 0;  // measured by src
  double time_us = 0;  // one bandwidth iteration (window messages + ack), on src
  double lat_us = 0;   // half a round trip, on src
  double wrong = 0;    // bytes, counted by whichever side received them
};
static_assert(sizeof(PairResult) == 4 * sizeof(double));

class P2P {
 public:
  P2P(Communicator& comm, const P2POptions& opt, std::FILE* out)
      : comm_(comm), opt_(opt), out_(out), rank_(comm.rank()), n_(comm.size()) {}

  P2PResult run();

 private:
  void print(const char* fmt, ...) __attribute__((format(printf, 2, 3)));
  void print_header();
  // This rank's part of the pair's measurement (nothing unless src or dst).
  PairResult measure(int src, int dst);
  // `distinct`: each receive of the window into its own slot (else all into slot 0).
  void bw_iteration(int src, int dst, bool distinct);
  void lat_round_trip(int src, int dst);
  // Matrix of one field, "-" on the diagonal.
  void print_matrix(const char* title, const std::vector<PairResult>& res,
                    double PairResult::*field);

  Communicator& comm_;
  const P2POptions& opt_;
  std::FILE* out_;
  int rank_;
  int n_;
  CallOptions plain_;
  Buffer send_;                     // bandwidth messages (one buffer for the window)
  std::vector<Buffer> slots_;       // bandwidth receives, one per message of the window
  Buffer ping_, pong_;              // latency messages
  std::vector<Work> works_;
};

void P2P::print(const char* fmt, ...) {
  if (rank_ != 0) return;
  va_list args;
  va_start(args, fmt);
  std::vfprintf(out_, fmt, args);
  va_end(args);
}

void P2P::print_header() {
  // Who runs where (the same block as the collective tables): a slow link is
  // usually explained by the hosts at its ends.
  const std::string ranks = bench::rank_table(comm_, plain_);

  print("# Chorus chorus-bench %s: p2p, %d ranks, transport %s\n", CHORUS_VERSION, n_,
        comm_.transport_name().c_str());
  print("# bandwidth: %zu bytes x window %d (%s), warmup iters: %d iters: %d validation: %d\n",
        opt_.bytes, opt_.window,
        opt_.distinct_buffers ? "a receive buffer per message" : "one receive buffer, as osu_bw",
        opt_.warmup_iters, opt_.iters, opt_.check);
  print("# latency: %zu bytes ping-pong, %d warmup and %d timed round trips\n", opt_.lat_bytes,
        opt_.warmup_iters * kLatencyRoundTrips, opt_.iters * kLatencyRoundTrips);
  print("%s", ranks.c_str());
}

void P2P::bw_iteration(int src, int dst, bool distinct) {
  unsigned char ack = 0;
  works_.clear();
  if (rank_ == src) {
    for (int k = 0; k < opt_.window; ++k)
      works_.push_back(comm_.send_async(send_.get(), opt_.bytes, DataType::UInt8, dst, plain_));
    comm_.recv(&ack, 1, DataType::UInt8, dst, plain_);
    for (Work& w : works_) w.wait();
  } else {
    for (int k = 0; k < opt_.window; ++k)
      works_.push_back(comm_.recv_async(slots_[distinct ? static_cast<std::size_t>(k) : 0].get(), opt_.bytes,
                                        DataType::UInt8, src, plain_));
    for (Work& w : works_) w.wait();
    comm_.send(&ack, 1, DataType::UInt8, src, plain_);
  }
}

void P2P::lat_round_trip(int src, int dst) {
  if (rank_ == src) {
    comm_.send(ping_.get(), opt_.lat_bytes, DataType::UInt8, dst, plain_);
    comm_.recv(pong_.get(), opt_.lat_bytes, DataType::UInt8, dst, plain_);
  } else {
    comm_.recv(ping_.get(), opt_.lat_bytes, DataType::UInt8, src, plain_);
    comm_.send(pong_.get(), opt_.lat_bytes, DataType::UInt8, src, plain_);
  }
}

PairResult P2P::measure(int src, int dst) {
  PairResult res;
  if (rank_ != src && rank_ != dst) return res;
  const bool sender = rank_ == src;

  // Bandwidth.
  for (int i = 0; i < opt_.warmup_iters; ++i) bw_iteration(src, dst, opt_.distinct_buffers);
  const Clock::time_point t0 = Clock::now();
  for (int i = 0; i < opt_.iters; ++i) bw_iteration(src, dst, opt_.distinct_buffers);
  const double bw_sec = seconds_since(t0);
  if (sender && bw_sec > 0) {
    res.time_us = bw_sec * 1e6 / opt_.iters;
    res.bw_gbps = static_cast<double>(opt_.bytes) * opt_.window * opt_.iters / bw_sec / 1e9;
  }
  for (int c = 0; c < opt_.check; ++c) {
    if (sender) {
      fill_pattern(send_.get(), opt_.bytes, src, dst, c);
    } else {
      for (Buffer& s : slots_) std::memset(s.get(), kPoison, opt_.bytes);
    }
    bw_iteration(src, dst, true);
    if (!sender)
      for (const Buffer& s : slots_) res.wrong += static_cast<double>(count_wrong(s.get(), opt_.bytes, src, dst, c));
  }

  // Latency.
  for (int i = 0; i < opt_.warmup_iters * kLatencyRoundTrips; ++i) lat_round_trip(src, dst);
  const int trips = opt_.iters * kLatencyRoundTrips;
  const Clock::time_point t1 = Clock::now();
  for (int i = 0; i < trips; ++i) lat_round_trip(src, dst);
  const double lat_sec = seconds_since(t1);
  if (sender) res.lat_us = lat_sec * 1e6 / trips / 2;
  for (int c = 0; c < opt_.check; ++c) {
    // The ping carries (src, dst, c), the pong (dst, src, c).
    if (sender) {
      fill_pattern(ping_.get(), opt_.lat_bytes, src, dst, c);
      std::memset(pong_.get(), kPoison, opt_.lat_bytes);
      lat_round_trip(src, dst);
      res.wrong += static_cast<double>(count_wrong(pong_.get(), opt_.lat_bytes, dst, src, c));
    } else {
      std::memset(ping_.get(), kPoison, opt_.lat_bytes);
      fill_pattern(pong_.get(), opt_.lat_bytes, dst, src, c);
      // The pong must not echo the ping: it is filled before the ping lands.
      comm_.recv(ping_.get(), opt_.lat_bytes, DataType::UInt8, src, plain_);
      res.wrong += static_cast<double>(count_wrong(ping_.get(), opt_.lat_bytes, src, dst, c));
      comm_.send(pong_.get(), opt_.lat_bytes, DataType::UInt8, src, plain_);
    }
  }
  return res;
}

void P2P::print_matrix(const char* title, const std::vector<PairResult>& res,
                       double PairResult::*field) {
  print("#\n# %s\n# %8s", title, "src\\dst");
  for (int d = 0; d < n_; ++d) print(" %9d", d);
  print("\n");
  for (int s = 0; s < n_; ++s) {
    print("  %8d", s);
    for (int d = 0; d < n_; ++d) {
      if (s == d) print(" %9s", "-");
      else print(" %9.2f", res[static_cast<std::size_t>(s * n_ + d)].*field);
    }
    print("\n");
  }
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

P2PResult P2P::run() {
  P2PResult out;
  nlohmann::json& report = out.report;
  report["tool"] = "chorus-bench";
  report["version"] = CHORUS_VERSION;
  report["mode"] = "p2p";
  report["nranks"] = n_;
  report["transport"] = comm_.transport_name();
  report["bytes"] = opt_.bytes;
  report["window"] = opt_.window;
  report["distinct_buffers"] = opt_.distinct_buffers;
  report["lat_bytes"] = opt_.lat_bytes;
  report["iters"] = opt_.iters;
  report["warmup_iters"] = opt_.warmup_iters;
  report["lat_round_trips"] = opt_.iters * kLatencyRoundTrips;
  report["check"] = opt_.check;
  report["results"] = nlohmann::json::array();

  if (n_ < 2) {
    print("# chorus-bench --p2p: %d rank, no pair to measure (run it with chorusrun -n 2 or more)\n",
          n_);
    report["wrong_total"] = 0;
    return out;
  }
  print_header();

  // Buffers are allocated and touched once: page faults stay out of the timings.
  send_ = allocate_touched(opt_.bytes);
  slots_.clear();
  for (int k = 0; k < opt_.window; ++k) slots_.push_back(allocate_touched(opt_.bytes));
  ping_ = allocate_touched(opt_.lat_bytes);
  pong_ = allocate_touched(opt_.lat_bytes);
  works_.reserve(static_cast<std::size_t>(opt_.window));

  print("# %6s %6s %12s %7s %10s %9s %10s %9s %8s\n", "src", "dst", "size", "window", "time",
        "bw", "lat size", "lat", "#wrong");
  print("# %6s %6s %12s %7s %10s %9s %10s %9s %8s\n", "", "", "(B)", "", "(us)", "(GB/s)", "(B)",
        "(us)", "");
  const std::size_t nn = static_cast<std::size_t>(n_) * static_cast<std::size_t>(n_);
  std::vector<PairResult> results(nn);
  for (int src = 0; src < n_; ++src) {
    for (int dst = 0; dst < n_; ++dst) {
      if (src == dst) continue;
      const PairResult mine = measure(src, dst);
      PairResult& all = results[static_cast<std::size_t>(src * n_ + dst)];
      comm_.allreduce(&mine, &all, 4, DataType::Float64, ReduceOp::Sum, plain_);
      const std::string t = format_time_us(all.time_us);
      if (opt_.check > 0) {
        print("  %6d %6d %12zu %7d %10s %9.2f %10zu %9.2f %8.0f\n", src, dst, opt_.bytes,
              opt_.window, t.c_str(), all.bw_gbps, opt_.lat_bytes, all.lat_us, all.wrong);
      } else {
        print("  %6d %6d %12zu %7d %10s %9.2f %10zu %9.2f %8s\n", src, dst, opt_.bytes,
              opt_.window, t.c_str(), all.bw_gbps, opt_.lat_bytes, all.lat_us, "N/A");
      }
      if (rank_ == 0) std::fflush(out_);

      nlohmann::json rec;
      rec["mode"] = "p2p";
      rec["src"] = src;
      rec["dst"] = dst;
      rec["bytes"] = opt_.bytes;
      rec["window"] = opt_.window;
      rec["time_us"] = all.time_us;
      rec["bw_gbps"] = all.bw_gbps;
      rec["lat_bytes"] = opt_.lat_bytes;
      rec["lat_us"] = all.lat_us;
      if (opt_.check > 0) rec["wrong"] = static_cast<std::uint64_t>(all.wrong);
      else rec["wrong"] = nullptr;
      report["results"].push_back(std::move(rec));
      out.wrong += static_cast<std::uint64_t>(all.wrong);
    }
  }
  slots_.clear();

  char title[160];
  std::snprintf(title, sizeof title, "p2p bandwidth (GB/s), %zu bytes x window %d (rows: sender, columns: receiver)",
                opt_.bytes, opt_.window);
  print_matrix(title, results, &PairResult::bw_gbps);
  std::snprintf(title, sizeof title, "p2p latency (us), %zu bytes, half round trip (rows: sender, columns: receiver)",
                opt_.lat_bytes);
  print_matrix(title, results, &PairResult::lat_us);

  // The slowest link: lowest bandwidth, highest latency, against the median
  // of all links (one bad link stands out from the median, not the mean).
  int bw_s = -1, bw_d = -1, lat_s = -1, lat_d = -1;
  std::vector<double> bws, lats;
  for (int s = 0; s < n_; ++s) {
    for (int d = 0; d < n_; ++d) {
      if (s == d) continue;
      const PairResult& r = results[static_cast<std::size_t>(s * n_ + d)];
      bws.push_back(r.bw_gbps);
      lats.push_back(r.lat_us);
      if (bw_s < 0 || r.bw_gbps < results[static_cast<std::size_t>(bw_s * n_ + bw_d)].bw_gbps) {
        bw_s = s;
        bw_d = d;
      }
      if (lat_s < 0 || r.lat_us > results[static_cast<std::size_t>(lat_s * n_ + lat_d)].lat_us) {
        lat_s = s;
        lat_d = d;
      }
    }
  }
  const double bw_min = results[static_cast<std::size_t>(bw_s * n_ + bw_d)].bw_gbps;
  const double lat_max = results[static_cast<std::size_t>(lat_s * n_ + lat_d)].lat_us;
  const double bw_med = median(bws), lat_med = median(lats);
  print("#\n# Transport: %s\n", comm_.transport_name().c_str());
  print("# Slowest link: bandwidth %d -> %d at %.2f GB/s (median of all links %.2f GB/s); "
        "latency %d -> %d at %.2f us (median %.2f us)\n",
        bw_s, bw_d, bw_min, bw_med, lat_s, lat_d, lat_max, lat_med);
  if (opt_.check > 0) {
    print("# Data check: %llu wrong bytes (%d checked iteration(s) of each test per pair)\n",
          static_cast<unsigned long long>(out.wrong), opt_.check);
  } else {
    print("# Data check: off (-c 0)\n");
  }
  print("# Out of bounds values : %llu %s\n#\n", static_cast<unsigned long long>(out.wrong),
        out.wrong ? "FAILED" : "OK");
  if (rank_ == 0) std::fflush(out_);

  nlohmann::json slowest;
  slowest["bw"] = {{"src", bw_s}, {"dst", bw_d}, {"bw_gbps", bw_min}, {"median_bw_gbps", bw_med}};
  slowest["lat"] = {{"src", lat_s}, {"dst", lat_d}, {"lat_us", lat_max}, {"median_lat_us", lat_med}};
  report["slowest"] = slowest;
  report["wrong_total"] = out.wrong;
  return out;
}

}  // namespace

P2PResult run_p2p(Communicator& comm, const P2POptions& opt, std::FILE* out) {
  P2P p2p(comm, opt, out);
  return p2p.run();
}

}  // namespace chorus::bench
