// chorus-bench: nccl-tests compatible benchmark driver. Every rank runs it
// (chorusrun -n N -- chorus-bench ...); rank 0 prints the nccl-tests table, so
// that numbers compare column for column with all_reduce_perf and friends.

#include "bench_util.hpp"
#include "device_memory.hpp"
#include "p2p.hpp"

#include <chorus/chorus.hpp>

#include <nlohmann/json.hpp>
#include "cli/cli.hpp"
#include "sweep_options.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <cmath>
#include <limits>
#include <sstream>
#include <ctime>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using chorus::Communicator;
using chorus::DataType;
using chorus::ReduceOp;
namespace bench = chorus::bench;

struct Options {
  std::string minbytes = "8";
  std::string maxbytes = "32M";
  std::string stepbytes = "1M";
  int stepfactor = 2;
  int iters = 20;
  int warmup_iters = 5;
  int check = 1;
  std::string datatype = "float";
  std::string op = "sum";
  int root = 0;
  std::vector<std::string> colls{"allreduce"};
  std::string json;
  std::string algorithm;  // a name, "all" (one column group per algorithm), or empty
  int rounds = 3;         // --algo all: interleaved rounds per size (median taken)
  std::string calibrate;  // write a tuning file here instead of the tables
  bool p2p = false;       // --p2p: the point-to-point matrix (bench/p2p.cpp) instead
  std::string p2p_bytes = "4M";
  int p2p_window = 8;
  bool p2p_distinct = false;
  std::string p2p_lat_bytes = "8";
  std::string device = "host";  // --device cuda: buffers in GPU memory
  bool huge_pages = false;       // --huge-pages: host buffers on THP
  bool registered = false;       // --registered: host buffers from chorus::mem_alloc
  int offset = 0;                // --offset B: rank r's host buffers r*B bytes into a page
};

// One table row's measurement of one mode (out-of-place or in-place).
struct Result {
  bool ran = false;  // false: the collective has no such mode (N/A columns)
  double time_us = 0;
  double algbw = 0;
  double busbw = 0;
  bool checked = false;
  std::uint64_t wrong = 0;
};

// The sizes nccl-tests visits: multiply by the step factor when it is > 1,
// otherwise add the step in bytes.
std::vector<std::size_t> make_sizes(std::size_t min_bytes, std::size_t max_bytes, int factor,
                                    std::size_t step_bytes) {
  if (min_bytes > max_bytes) throw std::invalid_argument("--minbytes is larger than --maxbytes");
  if (factor <= 1 && step_bytes == 0)
    throw std::invalid_argument("--stepbytes must be > 0 when --stepfactor is 1");
  std::vector<std::size_t> sizes;
  for (std::size_t s = min_bytes; s <= max_bytes;) {
    sizes.push_back(s);
    const std::size_t next = factor > 1 ? s * static_cast<std::size_t>(factor) : s + step_bytes;
    if (next <= s) break;  // 0 bytes times a factor, or overflow: no further sizes
    s = next;
  }
  return sizes;
}

// Which rank this process will be, before the communicator exists: only rank 0
// reports usage errors, instead of N identical copies.
int rank_from_env() {
  try {
    return chorus::launch_info_from_env().rank;
  } catch (const std::exception&) {
    return 0;
  }
}

class Bench {
 public:
  Bench(Communicator& comm, const Options& opt, std::vector<std::size_t> sizes,
        std::vector<const bench::Collective*> colls, std::vector<DataType> dtypes,
        std::vector<ReduceOp> ops, std::FILE* out)
      : comm_(comm), opt_(opt), sizes_(std::move(sizes)), colls_(std::move(colls)),
        dtypes_(std::move(dtypes)), ops_(std::move(ops)), out_(out), rank_(comm.rank()),
        nranks_(comm.size()) {
    if (opt_.algorithm != "all") call_options_.algorithm = opt_.algorithm;
    cuda_ = opt_.device == "cuda";
  }
  ~Bench() {
    bench::device::free(dsend_);
    bench::device::free(drecv_);
  }

  // Runs every table; returns the JSON report (meaningful on rank 0).
  nlohmann::json run();
  std::uint64_t total_wrong() const { return total_wrong_; }

 private:
  void print_header();
  void run_table(const bench::Collective& coll, DataType dtype, ReduceOp op);
  // --algo all: one column group (time, busbw) per algorithm, out-of-place,
  // and the selector's pick for each size.
  void run_algo_table(const bench::Collective& coll, DataType dtype, ReduceOp op);
  // One JSON record of a measured row.
  nlohmann::json record(const bench::Collective& coll, DataType dtype, ReduceOp op, int root,
                        std::size_t size_bytes, const bench::CollCounts& cc, bool in_place,
                        const std::string& algorithm, const Result& res) const;
  Result measure(const bench::Collective& coll, DataType dtype, ReduceOp op,
                 const bench::CollCounts& cc, std::size_t size_bytes, bool in_place);
  // printf to the table's stream, on rank 0 only.
  void print(const char* fmt, ...) __attribute__((format(printf, 2, 3)));

  Communicator& comm_;
  const Options& opt_;
  std::vector<std::size_t> sizes_;
  std::vector<const bench::Collective*> colls_;
  std::vector<DataType> dtypes_;
  std::vector<ReduceOp> ops_;
  std::FILE* out_;
  int rank_;
  int nranks_;
  chorus::CallOptions call_options_;
  chorus::CallOptions plain_options_;  // the harness's own barrier and reductions
  bench::Buffer send_;
  bench::Buffer recv_;
  // Where the collectives' host buffers start: --offset's bytes into send_
  // and recv_.
  unsigned char* hsend_ = nullptr;
  unsigned char* hrecv_ = nullptr;
  // --device cuda: the buffers the collectives use live on the GPU; the host
  // ones above hold the check's inputs and the results copied back.
  bool cuda_ = false;
  unsigned char* dsend_ = nullptr;
  unsigned char* drecv_ = nullptr;
  nlohmann::json records_ = nlohmann::json::array();
  double busbw_sum_ = 0;
  int busbw_count_ = 0;
  std::uint64_t total_wrong_ = 0;
};

void Bench::print(const char* fmt, ...) {
  if (rank_ != 0) return;
  va_list args;
  va_start(args, fmt);
  std::vfprintf(out_, fmt, args);
  va_end(args);
}

void Bench::print_header() {
  // Who runs where, like nccl-tests' "# Using devices" block.
  const std::string ranks = bench::rank_table(comm_, plain_options_);

  std::string colls;
  for (const auto* c : colls_) {  // in steps: GCC 12's false -Wrestrict at -O3 on "," + string
    if (!colls.empty()) colls += ',';
    colls += c->name;
  }
  const std::string transport = comm_.transport_name();
  print("# Chorus chorus-bench %s: coll %s, %d ranks, transport %s%s%s\n", CHORUS_VERSION,
        colls.c_str(), nranks_, transport.c_str(), opt_.algorithm.empty() ? "" : ", algorithm ",
        opt_.algorithm.c_str());
  const bool multiply = opt_.stepfactor > 1;
  print("# minBytes %zu maxBytes %zu step: %zu(%s) warmup iters: %d iters: %d validation: %d\n",
        sizes_.front(), bench::parse_size(opt_.maxbytes),
        multiply ? static_cast<std::size_t>(opt_.stepfactor) : bench::parse_size(opt_.stepbytes),
        multiply ? "factor" : "bytes", opt_.warmup_iters, opt_.iters, opt_.check);
  if (opt_.offset > 0)
    print("# host buffers of rank r start r*%d bytes (mod 4096) into a page\n", opt_.offset);
  print("%s", ranks.c_str());
}

nlohmann::json Bench::run() {
  print_header();
  // Buffers are allocated once, at the largest size, and touched now: the
  // first write to a page costs a fault that must not land in a timed loop.
  const std::size_t max_bytes = sizes_.back();
  const auto shift = static_cast<std::size_t>(opt_.offset) * static_cast<std::size_t>(rank_) % 4096;
  send_ = bench::allocate_touched(max_bytes + shift);
  recv_ = bench::allocate_touched(max_bytes + shift);
  hsend_ = send_.get() + shift;
  hrecv_ = recv_.get() + shift;
  if (cuda_) {
    dsend_ = static_cast<unsigned char*>(bench::device::alloc(max_bytes));
    drecv_ = static_cast<unsigned char*>(bench::device::alloc(max_bytes));
    // Calls are enqueued on a stream, as a framework would; the timed loop
    // ends with a synchronisation (nccl-tests does the same).
    call_options_.stream = bench::device::stream();
  }

  for (const auto* coll : colls_) {
    for (DataType dtype : dtypes_) {
      auto table = [&](ReduceOp op) {
        if (opt_.algorithm == "all") run_algo_table(*coll, dtype, op);
        else run_table(*coll, dtype, op);
      };
      if (coll->reduces) {
        for (ReduceOp op : ops_) table(op);
      } else {
        table(ReduceOp::Sum);
      }
    }
  }
  const double avg_busbw = busbw_count_ > 0 ? busbw_sum_ / busbw_count_ : 0.0;
  print("# Out of bounds values : %llu %s\n", static_cast<unsigned long long>(total_wrong_),
        total_wrong_ ? "FAILED" : "OK");
  print("# Avg bus bandwidth    : %g \n#\n", avg_busbw);
  if (rank_ == 0) std::fflush(out_);

  nlohmann::json report;
  report["tool"] = "chorus-bench";
  report["version"] = CHORUS_VERSION;
  report["nranks"] = nranks_;
  report["transport"] = comm_.transport_name();
  report["algorithm"] = opt_.algorithm;
  nlohmann::json colls = nlohmann::json::array();
  for (const auto* c : colls_) colls.push_back(c->name);
  report["colls"] = colls;
  nlohmann::json dtypes = nlohmann::json::array();
  for (DataType t : dtypes_) dtypes.push_back(std::string(chorus::to_string(t)));
  report["datatypes"] = dtypes;
  nlohmann::json ops = nlohmann::json::array();
  for (ReduceOp o : ops_) ops.push_back(std::string(chorus::to_string(o)));
  report["ops"] = ops;
  report["minbytes"] = sizes_.front();
  report["maxbytes"] = bench::parse_size(opt_.maxbytes);
  report["stepfactor"] = opt_.stepfactor;
  report["stepbytes"] = bench::parse_size(opt_.stepbytes);
  report["iters"] = opt_.iters;
  report["warmup_iters"] = opt_.warmup_iters;
  report["check"] = opt_.check;
  report["device"] = opt_.device;
  report["root"] = opt_.root;
  report["results"] = records_;
  report["avg_busbw"] = avg_busbw;
  report["wrong_total"] = total_wrong_;
  return report;
}

void Bench::run_table(const bench::Collective& coll, DataType dtype, ReduceOp op) {
  const std::string type_name(chorus::to_string(dtype));
  const std::string op_name = coll.reduces ? std::string(chorus::to_string(op)) : "none";
  const int root = coll.rooted ? opt_.root : -1;
  print("# Collective: %s\n", coll.name);
  print("#\n");
  print("# %10s  %12s  %8s  %6s  %6s           out-of-place                       in-place          \n",
        "", "", "", "", "");
  print("# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s %6s  %7s  %6s  %6s %6s\n", "size", "count",
        "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time", "algbw", "busbw",
        "#wrong");
  print("# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %5s  %7s  %6s  %6s  %5s\n", "(B)",
        "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", "");

  const std::size_t ws = chorus::size_of(dtype);
  for (std::size_t size : sizes_) {
    const bench::CollCounts cc = coll.counts(size / ws, nranks_);
    // nccl-tests: the size column is the larger of the send and receive buffers.
    const std::size_t size_bytes = std::max(cc.send_count, cc.recv_count) * ws;
    char row[256];
    std::snprintf(row, sizeof row, "%12zu  %12zu  %8s  %6s  %6d", size_bytes, cc.param_count,
                  type_name.c_str(), op_name.c_str(), root);
    std::string line = row;
    for (bool in_place : {false, true}) {
      const Result res = measure(coll, dtype, op, cc, size_bytes, in_place);
      if (!res.ran) {
        std::snprintf(row, sizeof row, "  %7s  %6s  %6s  %5s", "N/A", "N/A", "N/A", "N/A");
        line += row;
        continue;
      }
      const std::string time = bench::format_time_us(res.time_us);
      if (res.checked) {
        std::snprintf(row, sizeof row, "  %7s  %6.2f  %6.2f  %5llu", time.c_str(), res.algbw,
                      res.busbw, static_cast<unsigned long long>(res.wrong));
      } else {
        std::snprintf(row, sizeof row, "  %7s  %6.2f  %6.2f  %5s", time.c_str(), res.algbw,
                      res.busbw, "N/A");
      }
      line += row;
      busbw_sum_ += res.busbw;
      ++busbw_count_;
      total_wrong_ += res.wrong;
      records_.push_back(record(coll, dtype, op, root, size_bytes, cc, in_place,
                                opt_.algorithm.empty()
                                    ? comm_.algorithm_for(coll.name, cc.param_count, dtype, op,
                                                          root < 0 ? 0 : root)
                                    : opt_.algorithm,
                                res));
    }
    print("%s\n", line.c_str());
    if (rank_ == 0) std::fflush(out_);
  }
}

nlohmann::json Bench::record(const bench::Collective& coll, DataType dtype, ReduceOp op, int root,
                             std::size_t size_bytes, const bench::CollCounts& cc, bool in_place,
                             const std::string& algorithm, const Result& res) const {
  nlohmann::json rec;
  rec["coll"] = coll.name;
  rec["datatype"] = std::string(chorus::to_string(dtype));
  rec["op"] = coll.reduces ? std::string(chorus::to_string(op)) : "none";
  rec["root"] = root;
  rec["size"] = size_bytes;
  rec["count"] = cc.param_count;
  rec["inplace"] = in_place;
  rec["time_us"] = res.time_us;
  rec["algbw"] = res.algbw;
  rec["busbw"] = res.busbw;
  rec["algorithm"] = algorithm;
  if (res.checked) rec["wrong"] = res.wrong;
  else rec["wrong"] = nullptr;
  return rec;
}

void Bench::run_algo_table(const bench::Collective& coll, DataType dtype, ReduceOp op) {
  const std::string type_name(chorus::to_string(dtype));
  const std::string op_name = coll.reduces ? std::string(chorus::to_string(op)) : "none";
  const int root = coll.rooted ? opt_.root : -1;
  const std::vector<std::string> algos = chorus::algorithm_names(coll.name);
  print("# Collective: %s, every algorithm forced in turn (out-of-place), and the selector's pick\n",
        coll.name);
  print("#\n# %10s  %12s  %8s  %6s", "size", "count", "type", "redop");
  for (const auto& a : algos) print("  %20s", (a + " us  GB/s").c_str());
  print("  %-20s  %s\n", "pick", "pick/best");
  const std::size_t ws = chorus::size_of(dtype);
  for (std::size_t size : sizes_) {
    const bench::CollCounts cc = coll.counts(size / ws, nranks_);
    const std::size_t size_bytes = std::max(cc.send_count, cc.recv_count) * ws;
    char cell[128];
    std::snprintf(cell, sizeof cell, "  %12zu  %12zu  %8s  %6s", size_bytes, cc.param_count,
                  type_name.c_str(), op_name.c_str());
    std::string line = cell;
    const std::string pick =
        comm_.algorithm_for(coll.name, cc.param_count, dtype, op, root < 0 ? 0 : root);
    // Rounds: every algorithm once per round, in turn, and the median of its
    // rounds reported. On a shared or oversubscribed machine a burst of
    // noise then lands on all algorithms alike instead of on whichever was
    // being timed, and one bad round does not decide the row.
    std::vector<std::vector<Result>> runs(algos.size());
    std::vector<bool> outside(algos.size(), false);
    for (int round = 0; round < std::max(1, opt_.rounds); ++round) {
      for (std::size_t i = 0; i < algos.size(); ++i) {
        if (outside[i]) continue;
        call_options_.algorithm = algos[i];
        try {
          runs[i].push_back(measure(coll, dtype, op, cc, size_bytes, false));
        } catch (const chorus::Error& e) {
          // Outside the algorithm's constraints: every rank throws the same
          // error at submission, before anything is sent.
          if (e.code() != chorus::ErrorCode::InvalidArgument) throw;
          outside[i] = true;
        }
      }
    }
    double best = 0, pick_us = 0;
    for (std::size_t i = 0; i < algos.size(); ++i) {
      const std::string& a = algos[i];
      Result res;
      if (!outside[i] && !runs[i].empty()) {
        std::vector<Result>& r = runs[i];
        std::sort(r.begin(), r.end(),
                  [](const Result& x, const Result& y) { return x.time_us < y.time_us; });
        std::uint64_t wrong = 0;  // checked in every round
        for (const Result& x : r) wrong += x.wrong;
        res = r[r.size() / 2];
        res.wrong = wrong;
      }
      if (!res.ran) {
        std::snprintf(cell, sizeof cell, "  %20s", "N/A");
      } else {
        const std::string t = bench::format_time_us(res.time_us);
        std::snprintf(cell, sizeof cell, "  %11s %8.2f", t.c_str(), res.busbw);
        total_wrong_ += res.wrong;
        if (best == 0 || res.time_us < best) best = res.time_us;
        if (a == pick) pick_us = res.time_us;
        nlohmann::json rec = record(coll, dtype, op, root, size_bytes, cc, false, a, res);
        rec["picked"] = a == pick;
        records_.push_back(std::move(rec));
      }
      line += cell;
    }
    call_options_.algorithm.clear();
    std::snprintf(cell, sizeof cell, "  %-20s  %.2f", pick.c_str(), best > 0 ? pick_us / best : 0.0);
    line += cell;
    print("%s\n", line.c_str());
    if (rank_ == 0) std::fflush(out_);
  }
}

Result Bench::measure(const bench::Collective& coll, DataType dtype, ReduceOp op,
                      const bench::CollCounts& cc, std::size_t size_bytes, bool in_place) {
  Result res;
  if (in_place && !coll.in_place) return res;
  res.ran = true;
  const std::size_t ws = chorus::size_of(dtype);
  const std::size_t rank = static_cast<std::size_t>(rank_);
  unsigned char* send = hsend_;
  unsigned char* recv = hrecv_;
  if (in_place) {
    // One buffer, laid out as nccl-tests does for each collective.
    send = hrecv_ + cc.send_inplace_offset * rank * ws;
    recv = hrecv_ + cc.recv_inplace_offset * rank * ws;
  }
  // The buffers the collective is given: the host ones, or their GPU twins
  // at the same offsets.
  auto on_gpu = [&](unsigned char* host) {
    if (!cuda_) return host;
    return host >= hrecv_ && host < hrecv_ + sizes_.back() ? drecv_ + (host - hrecv_)
                                                           : dsend_ + (host - hsend_);
  };
  unsigned char* const csend = on_gpu(send);
  unsigned char* const crecv = on_gpu(recv);
  const std::size_t count = cc.param_count;
  const int root = opt_.root;
  auto call = [&] { coll.run(comm_, csend, crecv, count, dtype, op, root, call_options_); };
  auto drain = [&] {
    if (cuda_) bench::device::synchronize();
  };

  // Zeros are valid input for every type and op and stay finite however many
  // times an in-place iteration reduces them again.
  std::memset(hsend_, 0, cc.send_count * ws);
  std::memset(hrecv_, 0, std::max(cc.send_count, cc.recv_count) * ws);
  if (cuda_) {
    bench::device::memset(dsend_, 0, cc.send_count * ws);
    bench::device::memset(drecv_, 0, std::max(cc.send_count, cc.recv_count) * ws);
  }

  for (int i = 0; i < opt_.warmup_iters; ++i) call();
  drain();
  comm_.barrier(plain_options_);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < opt_.iters; ++i) call();
  drain();
  const auto t1 = std::chrono::steady_clock::now();
  const double my_us = std::chrono::duration<double, std::micro>(t1 - t0).count() / opt_.iters;
  // The slowest rank defines the collective's time.
  double max_us = 0;
  comm_.allreduce(&my_us, &max_us, 1, DataType::Float64, ReduceOp::Max, plain_options_);
  res.time_us = max_us;
  const double sec = max_us * 1e-6;
  res.algbw = sec > 0 ? static_cast<double>(size_bytes) / 1e9 / sec : 0.0;
  res.busbw = res.algbw * coll.bus_factor(nranks_);

  if (opt_.check > 0) {
    bench::CheckContext ctx;
    ctx.dtype = dtype;
    ctx.op = op;
    ctx.rank = rank_;
    ctx.nranks = nranks_;
    ctx.root = root;
    ctx.count = count;
    std::uint64_t wrong = 0;
    for (int c = 0; c < opt_.check; ++c) {
      // Poison the output first: in place, the input is then written over it.
      std::memset(in_place ? hrecv_ : recv, bench::kPoisonByte,
                  (in_place ? std::max(cc.send_count, cc.recv_count) : cc.recv_count) * ws);
      bench::fill_send(send, cc.send_count, coll, ctx);
      if (cuda_) {
        if (in_place) {
          bench::device::to_device(drecv_, hrecv_, std::max(cc.send_count, cc.recv_count) * ws);
        } else {
          bench::device::to_device(csend, send, cc.send_count * ws);
          bench::device::to_device(crecv, recv, cc.recv_count * ws);
        }
      }
      call();
      drain();
      if (cuda_) bench::device::to_host(recv, crecv, cc.recv_count * ws);
      wrong += bench::count_wrong(recv, cc.recv_count, coll, ctx);
    }
    std::uint64_t all_wrong = 0;
    comm_.allreduce(&wrong, &all_wrong, 1, DataType::UInt64, ReduceOp::Sum, plain_options_);
    res.checked = true;
    res.wrong = all_wrong;
  }
  return res;
}

// --calibrate: fits the selector's alpha-beta model (docs/algorithms.md) to
// this machine by timing the ring allreduce, whose cost the model states
// exactly: 2(n-1) steps of alpha, 2(n-1)/n of the bytes over the link, and
// (n-1)/n of them reduced. A tiny message gives alpha; a large one, after
// alpha and the reduction rate (timed here with a plain a += b loop), gives
// the link's bandwidth. Ranks spread over several hosts measure the network
// (a flat ring crosses it); ranks of one host measure the local link.
int calibrate(Communicator& comm, const std::string& path) {
  const int n = comm.size();
  const int rank = comm.rank();
  if (n < 2) {
    if (rank == 0) std::fprintf(stderr, "chorus-bench --calibrate: needs at least 2 ranks\n");
    return 2;
  }
  chorus::CallOptions ring, plain;
  ring.algorithm = "ring";
  const std::size_t big_count = std::size_t{16} << 20;  // 64 MiB of float
  bench::Buffer a = bench::allocate_touched(big_count * 4), b = bench::allocate_touched(big_count * 4);
  auto timed = [&](std::size_t count, int iters) {
    // Best of five batches: the smallest time is the least disturbed.
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) {
      for (int i = 0; i < 2; ++i) comm.allreduce(a.get(), b.get(), count, DataType::Float32, ReduceOp::Sum, ring);
      comm.barrier(plain);
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i)
        comm.allreduce(a.get(), b.get(), count, DataType::Float32, ReduceOp::Sum, ring);
      const double mine = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / iters;
      double slowest = 0;
      comm.allreduce(&mine, &slowest, 1, DataType::Float64, ReduceOp::Max, plain);
      if (rep == 0 || slowest < best) best = slowest;
    }
    return best;
  };
  std::memset(a.get(), 0, big_count * 4);
  const double t_small = timed(2, 500);
  const double t_big = timed(big_count, 3);
  // Reduction rate: bytes of one operand per second of dst += src.
  auto* x = reinterpret_cast<float*>(a.get());
  auto* y = reinterpret_cast<float*>(b.get());
  double t_red = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t i = 0; i < big_count; ++i) y[i] += x[i];
    const double t = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    if (rep == 0 || t < t_red) t_red = t;
  }
  double t_red_all = 0;  // the slowest rank's
  comm.allreduce(&t_red, &t_red_all, 1, DataType::Float64, ReduceOp::Max, plain);
  const double bytes = static_cast<double>(big_count) * 4;
  const double f = static_cast<double>(n - 1) / n;
  const double alpha = t_small / (2.0 * (n - 1));
  const double reduce_gbps = bytes / t_red_all / 1e3;
  const double t_link = std::max(1e-3, t_big - 2.0 * (n - 1) * alpha - f * bytes / (reduce_gbps * 1e3));
  const double gbps = 2 * f * bytes / t_link / 1e3;
  // One host or several: compare each rank's host identity (name + network namespace).
  char id[64] = {};
  std::string who(64, '\0');
  ::gethostname(who.data(), 32);
  who.resize(std::strlen(who.c_str()));
  char ns[64] = {};
  if (::readlink("/proc/self/ns/net", ns, sizeof ns - 1) > 0) who += ns;
  std::memcpy(id, who.data(), std::min(who.size(), sizeof id - 1));
  std::vector<char> ids(64 * static_cast<std::size_t>(n));
  comm.allgather(id, ids.data(), 64, DataType::UInt8, plain);
  bool one_host = true;
  for (int r = 1; r < n; ++r)
    one_host = one_host && std::memcmp(ids.data(), ids.data() + 64 * static_cast<std::size_t>(r), 64) == 0;
  const std::string link = one_host ? "local" : "net";
  std::ostringstream base;
  base << link << ".alpha_us = " << alpha << "\n" << link << ".gbps = " << gbps << "\n"
       << "reduce_gbps = " << reduce_gbps << "\n";

  // Then each algorithm of the collectives with several, timed at one
  // element and at a large size (16 MiB, or the largest it takes), against
  // the base model's estimates at the same sizes: the latency and bandwidth
  // scales that make the model match this implementation on this machine.
  std::ostringstream fits;
  const bench::Collective* colls[] = {&bench::allreduce_collective(), &bench::broadcast_collective(),
                                      &bench::allgather_collective(), &bench::reduce_scatter_collective()};
  for (const bench::Collective* coll : colls) {
    const auto names = chorus::algorithm_names(coll->name);
    if (names.size() < 2) continue;
    auto counts_for = [&](std::size_t total_elems) { return coll->counts(total_elems, n); };
    // The small point: one element per rank, not one in all. The
    // algorithms that split the message among the ranks (Rabenseifner,
    // scatter-allgather) skip their empty pieces when count < n, so one
    // element timed a shorter algorithm than the one that runs at 32 B: at
    // 2 ranks Rabenseifner tied recursive doubling there and was picked up
    // to 32 KiB, 1.5-1.7x slower (docs/algorithms.md).
    const std::size_t small_total = static_cast<std::size_t>(n);
    // Each algorithm's points: n elements; knots at 32 KiB and 256 KiB,
    // where pipelines are still filling and log-step algorithms pay their
    // steps' fixed costs (between one element and 256 KiB a straight line
    // missed Rabenseifner's 16-32 KiB time by 1.5x); 16 MiB, or the largest
    // it takes. And the base model's estimates there.
    struct Point {
      bench::CollCounts cc{};
      double est = 0;
      int iters = 0, rounds = 0;
      int slot = 0;  // when it is timed: 0 small, 1 and 2 the knots, 3 large
      std::vector<double> batches;  // us per call
    };
    struct Candidate {
      std::string name;
      std::vector<Point> points;  // ascending; first: small, last: large
    };
    std::vector<Candidate> cands;
    for (const std::string& name : names) {
      auto est = [&](std::size_t count) {
        for (const auto& [alg, us] : comm.algorithm_estimates(coll->name, count, DataType::Float32,
                                                              ReduceOp::Sum, 0, base.str()))
          if (alg == name) return us;
        return std::numeric_limits<double>::quiet_NaN();
      };
      Candidate c;
      c.name = name;
      const bench::CollCounts small = counts_for(small_total);
      if (!std::isfinite(est(small.param_count))) continue;
      bench::CollCounts large{};
      bool found = false;
      for (std::size_t total : {big_count, std::size_t{16} << 10}) {  // 16 MiB, else 16 KiB
        large = counts_for(total / 4);
        if (std::isfinite(est(large.param_count))) {
          found = true;
          break;
        }
      }
      if (!found) continue;
      // Tiny calls take a few microseconds and jitter by as much: many of
      // them, seven batches.
      c.points.push_back({small, est(small.param_count), 300, 7, 0, {}});
      int slot = 1;
      for (std::size_t knot : {std::size_t{32} << 10, std::size_t{256} << 10}) {
        const bench::CollCounts k = counts_for(knot / 4);
        if (k.param_count > c.points.back().cc.param_count && k.param_count < large.param_count &&
            std::isfinite(est(k.param_count)))
          c.points.push_back({k, est(k.param_count), slot == 1 ? 100 : 30, 5, slot, {}});
        ++slot;
      }
      c.points.push_back(
          {large, est(large.param_count), large.param_count * 4 >= (std::size_t{1} << 20) ? 2 : 50, 5, 3, {}});
      cands.push_back(std::move(c));
    }
    // One batch: a warm-up call, then `iters` calls; the slowest rank's time.
    auto batch = [&](const std::string& name, const bench::CollCounts& cc, int iters) {
      chorus::CallOptions forced;
      forced.algorithm = name;
      coll->run(comm, a.get(), b.get(), cc.param_count, DataType::Float32, ReduceOp::Sum, 0, forced);
      comm.barrier(plain);
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i)
        coll->run(comm, a.get(), b.get(), cc.param_count, DataType::Float32, ReduceOp::Sum, 0, forced);
      const double mine =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / iters;
      double slowest = 0;
      comm.allreduce(&mine, &slowest, 1, DataType::Float64, ReduceOp::Max, plain);
      return slowest;
    };
    // The batches are interleaved (each round times every algorithm once),
    // so that a burst of noise on this shared machine lands on all of them
    // alike, and each point is the median of its batches, not the best: the
    // tables this fit is judged against report averages, and with more
    // ranks than cores an algorithm of many short steps (the ring) has rare
    // fast batches that its typical call never sees. At 4 ranks on 2 cores
    // the best-of fit made the ring look faster than recursive halving at
    // 32 B - 8 KiB reduce-scatter, where it is 1.4x slower; timed one
    // algorithm after the other, a noisy second at 8 ranks made the tree
    // look 1.6x slower than the ring at 16 MiB, where it is 1.2x faster
    // (docs/algorithms.md). Every rank builds the same candidate list, so
    // all take part in the same calls in the same order.
    for (int slot = 0; slot <= 3; ++slot) {
      for (int round = 0;; ++round) {
        bool any = false;
        for (Candidate& c : cands)
          for (Point& pt : c.points)
            if (pt.slot == slot && round < pt.rounds) {
              pt.batches.push_back(batch(c.name, pt.cc, pt.iters));
              any = true;
            }
        if (!any) break;
      }
    }
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    auto scale = [](double dt, double de) { return de > 0 ? std::clamp(dt / de, 0.05, 50.0) : 1.0; };
    for (const Candidate& c : cands) {
      std::vector<double> t;
      for (const Point& pt : c.points) t.push_back(median(pt.batches));
      const auto& p = c.points;
      const std::size_t last = p.size() - 1;
      const double lat = p[0].est > 0 ? std::clamp(t[0] / p[0].est, 0.05, 50.0) : 1.0;
      fits << "fit." << coll->name << "." << c.name << " = " << lat << " "
           << scale(t[last] - t[last - 1], p[last].est - p[last - 1].est);
      for (std::size_t i = 1; i < last; ++i)
        fits << " " << p[i].cc.param_count * 4 << " " << scale(t[i] - t[i - 1], p[i].est - p[i - 1].est);
      fits << "   #";
      for (std::size_t i = 0; i <= last; ++i)
        fits << (i ? ", " : " ") << t[i] << " us at " << p[i].cc.param_count;
      fits << " (model";
      for (std::size_t i = 0; i <= last; ++i) fits << (i ? ", " : " ") << p[i].est;
      fits << ")\n";
    }
  }
  if (rank == 0) {
    std::ofstream out(path);
    const std::time_t now = std::time(nullptr);
    char date[32];
    std::strftime(date, sizeof date, "%Y-%m-%d %H:%M", std::localtime(&now));
    out << "# Chorus tuning file: chorus-bench --calibrate on " << n << " ranks ("
        << (one_host ? "one host" : "several hosts") << ", transport " << comm.transport_name()
        << "), " << date << "\n"
        << "# ring allreduce: 8 B in " << t_small << " us, 64 MiB in " << t_big
        << " us; float a += b over 64 MiB in " << t_red_all << " us\n"
        << "# Read with CHORUS_TUNING_FILE=" << path << " (rank 0's file decides for all ranks).\n"
        << base.str() << fits.str();
    if (!out) {
      std::fprintf(stderr, "chorus-bench: cannot write %s\n", path.c_str());
      return 2;
    }
    std::printf("# calibrated on %d ranks (%s): %s.alpha_us = %.3g, %s.gbps = %.3g, reduce_gbps = %.3g -> %s\n",
                n, one_host ? "one host" : "several hosts", link.c_str(), alpha, link.c_str(), gbps,
                reduce_gbps, path.c_str());
  }
  return 0;
}

std::vector<std::string> split_list(const std::vector<std::string>& items) {
  std::vector<std::string> out;
  for (const std::string& item : items) {
    std::size_t start = 0;
    for (;;) {
      const std::size_t comma = item.find(',', start);
      std::string part = item.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      if (!part.empty()) out.push_back(part);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  // Under chorusrun stdout is a pipe: flush each row as it is measured.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const int env_rank = rank_from_env();
  Options opt;
  chorus::cli::Parser app{
      "chorus-bench: nccl-tests style benchmark of Chorus collectives.\n"
      "Run every rank, e.g.: chorusrun -n 4 -- chorus-bench -b 8 -e 128M -f 2 --coll allreduce",
      "chorus-bench"};
  app.footer(
      "Each size runs warmup iterations, then timed iterations (the time shown is the\n"
      "slowest rank's average), then checked iterations whose results are compared\n"
      "exactly with closed-form expectations; #wrong counts wrong elements over all\n"
      "ranks and checked iterations. Out-of-place and in-place are both measured\n"
      "(alltoall, alltoallv and allgatherv: N/A). size, count, algbw and busbw follow\n"
      "nccl-tests (allgather/reduce_scatter/alltoall(v): size is n blocks of count).\n"
      "Exit status: 0 if every check passed, 1 if any element was wrong, 2 on error.");
  bench::add_sweep_options(app, opt);
  app.add("-d,--datatype", opt.datatype,
          "float, half, bfloat16, double, int8, uint8, int32, uint32, int64, uint64, or all")
      .show_default();
  app.add("-o,--op", opt.op, "sum, prod, min, max, avg, or all").show_default();
  app.add("-r,--root", opt.root, "Root rank of rooted collectives").show_default();
  app.add("--coll", opt.colls, "Collectives, comma-separated: " + bench::collective_names())
      .show_default();
  app.add("--json", opt.json,
          "Also write the results as JSON to FILE ('-': stdout, the table then goes to stderr)");
  app.add("-A,--algo,--algorithm", opt.algorithm,
          "Force an algorithm by name (e.g. ring; see docs/algorithms.md), or 'all': one "
          "column group per algorithm plus the selector's pick");
  app.add("--rounds", opt.rounds,
          "--algo all: time every algorithm this many times per size, in turn, and report "
          "the median")
      .range(1, 100)
      .show_default();
  chorus::cli::Option calibrate_opt =
      app.add("--calibrate", opt.calibrate,
              "Measure the alpha-beta model's parameters on these ranks and write them to "
              "FILE (read it back with CHORUS_TUNING_FILE)");
  app.add("--device", opt.device,
          "Where the collectives' buffers live: host, or cuda (GPU memory; rank r uses GPU "
          "r mod the visible GPUs; calls are enqueued on a stream)")
      .show_default()
      .one_of({"host", "cuda"});
  app.flag("--p2p", opt.p2p,
           "Point-to-point bandwidth and latency of every ordered pair of ranks, one pair at "
           "a time (matrices: rows sender, columns receiver); -n, -w, -c and --json apply")
      .excludes(calibrate_opt);
  app.add("--p2p-bytes", opt.p2p_bytes, "--p2p bandwidth message size (K/M/G suffixes)")
      .show_default();
  app.add("--p2p-window", opt.p2p_window,
          "--p2p messages in flight per bandwidth iteration (the receiver holds this many "
          "buffers of --p2p-bytes for the checked iterations)")
      .show_default()
      .positive();
  app.flag("--p2p-distinct-buffers", opt.p2p_distinct,
           "--p2p timed bandwidth receives each into a buffer of their own (default: the "
           "window's receives share one, as osu_bw and ucx_perftest do; checked iterations "
           "always use one per message)");
  app.add("--p2p-lat-bytes", opt.p2p_lat_bytes,
          "--p2p latency (ping-pong) message size (K/M/G suffixes)")
      .show_default();
  app.flag("--huge-pages", opt.huge_pages,
           "Host buffers of 2 MiB and more on transparent huge pages (madvise "
           "MADV_HUGEPAGE): kernel copies between processes (CMA) pin 512x fewer pages");

  app.add("--offset", opt.offset,
          "Rank r's host buffers start r*B bytes (modulo 4096) into a page, so that the ranks' "
          "buffers sit at different offsets, as two allocators' may (docs/benchmarks.md: copies "
          "to 1-15 bytes past their source modulo 4 KiB)")
      .non_negative();

  app.flag("--registered", opt.registered,
           "Host buffers from chorus::mem_alloc (nccl-tests' -R): same-host ranks read "
           "large messages straight from one another's buffers, one copy instead of two");

  // Every rank parses the same line; rank 0 reports.
  if (const std::optional<int> status = app.parse(argc, argv, env_rank == 0))
    return *status == 0 ? 0 : 2;
  bench::set_huge_pages(opt.huge_pages);
  if (opt.registered) {
    if (opt.huge_pages) {
      if (env_rank == 0) std::fprintf(stderr, "chorus-bench: --registered and --huge-pages exclude each other\n");
      return 2;
    }
    bench::set_allocator([](std::size_t n) { return chorus::mem_alloc(n); },
                         [](void* p) { chorus::mem_free(p); });
  }
  bench::settle_step(app, opt);

  std::vector<std::size_t> sizes;
  std::vector<const bench::Collective*> colls;
  std::vector<DataType> dtypes;
  std::vector<ReduceOp> ops;
  bench::P2POptions p2p_opt;
  try {
    if (opt.p2p) {
      p2p_opt.bytes = bench::parse_size(opt.p2p_bytes);
      p2p_opt.lat_bytes = bench::parse_size(opt.p2p_lat_bytes);
      if (p2p_opt.bytes == 0 || p2p_opt.lat_bytes == 0)
        throw std::invalid_argument("--p2p-bytes and --p2p-lat-bytes must be at least 1");
      p2p_opt.window = opt.p2p_window;
      p2p_opt.distinct_buffers = opt.p2p_distinct;
      p2p_opt.iters = opt.iters;
      p2p_opt.warmup_iters = opt.warmup_iters;
      p2p_opt.check = opt.check;
    }
    sizes = make_sizes(bench::parse_size(opt.minbytes), bench::parse_size(opt.maxbytes),
                       opt.stepfactor, bench::parse_size(opt.stepbytes));
    for (const std::string& name : split_list(opt.colls)) {
      const bench::Collective* c = bench::find_collective(name);
      if (c == nullptr)
        throw std::invalid_argument("unknown collective '" + name + "' (use " +
                                    bench::collective_names() + ")");
      if (std::find(colls.begin(), colls.end(), c) == colls.end()) colls.push_back(c);
    }
    if (colls.empty()) throw std::invalid_argument("--coll names no collective");
    if (opt.datatype == "all") {
      for (int t = 0; t < chorus::kNumDataTypes; ++t) dtypes.push_back(static_cast<DataType>(t));
    } else {
      dtypes.push_back(chorus::parse_data_type(opt.datatype));
    }
    if (opt.op == "all") {
      for (int o = 0; o < chorus::kNumReduceOps; ++o) ops.push_back(static_cast<ReduceOp>(o));
    } else {
      ops.push_back(chorus::parse_reduce_op(opt.op));
    }
  } catch (const std::exception& e) {
    if (env_rank == 0) std::fprintf(stderr, "chorus-bench: %s\n", e.what());
    return 2;
  }

  std::FILE* out = opt.json == "-" ? stderr : stdout;
  int rank = env_rank;
  try {
    Communicator comm = Communicator::from_env();
    rank = comm.rank();
    if (opt.root < 0 || opt.root >= comm.size()) {
      if (rank == 0)
        std::fprintf(stderr, "chorus-bench: --root %d is not a rank (0..%d)\n", opt.root,
                     comm.size() - 1);
      return 2;
    }
    if (opt.device == "cuda") {
      if (opt.p2p || !opt.calibrate.empty()) {
        if (rank == 0) std::fprintf(stderr, "chorus-bench: --device cuda applies to the collective tables only\n");
        return 2;
      }
      if (const std::string why = bench::device::unavailable_reason(); !why.empty()) {
        if (rank == 0) std::fprintf(stderr, "chorus-bench: --device cuda: %s\n", why.c_str());
        return 2;
      }
      const std::string gpu = bench::device::bind(rank);
      if (rank == 0) std::fprintf(out, "# device cuda: rank 0 on %s\n", gpu.c_str());
    }
    if (!opt.calibrate.empty()) return calibrate(comm, opt.calibrate);
    nlohmann::json report;
    std::uint64_t wrong = 0;
    if (opt.p2p) {
      bench::P2PResult res = bench::run_p2p(comm, p2p_opt, out);
      report = std::move(res.report);
      wrong = res.wrong;
    } else {
      Bench bench_run(comm, opt, sizes, colls, dtypes, ops, out);
      report = bench_run.run();
      wrong = bench_run.total_wrong();
    }
    if (rank == 0 && !opt.json.empty()) {
      if (opt.json == "-") {
        std::cout << report.dump(2) << std::endl;
      } else {
        std::ofstream f(opt.json);
        f << report.dump(2) << '\n';
        if (!f) {
          std::fprintf(stderr, "chorus-bench: cannot write %s\n", opt.json.c_str());
          return 2;
        }
      }
    }
    return wrong > 0 ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "chorus-bench: rank %d: %s\n", rank, e.what());
    return 2;
  }
}
