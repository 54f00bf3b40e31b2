#include "peer_bench.hpp"

#include "bench_common.hpp"
#include "sweep_options.hpp"

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>

namespace chorus_peer {
namespace {

// Same byte as chorus-bench poisons receive buffers with: as a float it is
// -2.9e-16, which no pattern below yields.
constexpr unsigned char kPoisonByte = 0xA5;

struct CollInfo {
  Coll coll;
  const char* name;
  bool reduces;
  bool rooted;
};

constexpr CollInfo kColls[] = {
    {Coll::Allreduce, "allreduce", true, false},
    {Coll::Broadcast, "broadcast", false, true},
    {Coll::Allgather, "allgather", false, false},
};

const CollInfo& info(Coll c) {
  for (const CollInfo& i : kColls)
    if (i.coll == c) return i;
  throw std::logic_error("unknown collective");
}

// nccl-tests' bus factors (PERFORMANCE.md).
double bus_factor(Coll c, int n) {
  switch (c) {
    case Coll::Allreduce:
      return 2.0 * (n - 1) / n;
    case Coll::Allgather:
      return static_cast<double>(n - 1) / n;
    case Coll::Broadcast:
      return 1.0;
  }
  return 1.0;
}

// Element counts as nccl-tests (and chorus-bench) define them: for allgather
// the size is the gathered total, n blocks of `param` elements.
struct Counts {
  std::size_t send = 0;
  std::size_t recv = 0;
  std::size_t param = 0;
};

Counts counts(Coll c, std::size_t elems, int n) {
  if (c == Coll::Allgather) {
    const std::size_t block = elems / static_cast<std::size_t>(n);
    return {block, block * static_cast<std::size_t>(n), block};
  }
  return {elems, elems, elems};
}

// Small integers: every partial sum any algorithm can form is exact in float.
float reduce_input(int rank, std::size_t i) {
  return static_cast<float>((i + 3 * static_cast<std::size_t>(rank)) % 8);
}
float reduce_expected(int nranks, std::size_t i) {
  std::size_t s = 0;
  for (int r = 0; r < nranks; ++r) s += (i + 3 * static_cast<std::size_t>(r)) % 8;
  return static_cast<float>(s);
}
// Data of the non-reducing collectives: 1..97, different on every rank.
float plain_value(int rank, std::size_t i) {
  return static_cast<float>((i * 7 + static_cast<std::size_t>(rank) * 13) % 97 + 1);
}

using chorus::bench::allocate_touched;
using chorus::bench::Buffer;
using chorus::bench::format_time_us;
using chorus::bench::parse_size;

struct Result {
  bool ran = false;
  double time_us = 0;
  double algbw = 0;
  double busbw = 0;
  bool checked = false;
  std::uint64_t wrong = 0;
};

class Runner {
 public:
  Runner(Comm& comm, const Options& opt, const Plan& plan)
      : comm_(comm),
        opt_(opt),
        plan_(plan),
        rank_(comm.rank()),
        nranks_(comm.size()),
        out_(opt.json == "-" ? stderr : stdout) {}

  nlohmann::json run();
  std::uint64_t total_wrong() const { return total_wrong_; }

 private:
  void header();
  void table(Coll coll);
  Result measure(Coll coll, const Counts& cc, std::size_t size_bytes, bool in_place);
  void print(const char* fmt, ...) __attribute__((format(printf, 2, 3)));
  void fill_check(Coll coll, const Counts& cc, float* send, float* recv);
  std::uint64_t count_wrong(Coll coll, const Counts& cc, const float* result) const;

  Comm& comm_;
  const Options& opt_;
  const Plan& plan_;
  int rank_;
  int nranks_;
  std::FILE* out_;
  Buffer send_;
  Buffer recv_;
  std::size_t max_elems_ = 0;
  nlohmann::json records_ = nlohmann::json::array();
  double busbw_sum_ = 0;
  int busbw_count_ = 0;
  std::uint64_t total_wrong_ = 0;
};

void Runner::print(const char* fmt, ...) {
  if (rank_ != 0) return;
  va_list args;
  va_start(args, fmt);
  std::vfprintf(out_, fmt, args);
  va_end(args);
}

void Runner::header() {
  const std::vector<std::int64_t> pids = comm_.allgather_i64(static_cast<std::int64_t>(::getpid()));
  std::string colls;
  for (Coll c : plan_.colls) {  // in steps: GCC 12's false -Wrestrict at -O3 on "," + string
    if (!colls.empty()) colls += ',';
    colls += info(c).name;
  }
  print("# %s (%s): coll %s, %d ranks, transport %s\n", comm_.tool().c_str(),
        comm_.version().c_str(), colls.c_str(), nranks_, comm_.transport().c_str());
  const bool multiply = opt_.stepfactor > 1;
  print("# minBytes %zu maxBytes %zu step: %zu(%s) warmup iters: %d iters: %d validation: %d\n",
        plan_.sizes.front(), parse_size(opt_.maxbytes),
        multiply ? static_cast<std::size_t>(opt_.stepfactor) : parse_size(opt_.stepbytes),
        multiply ? "factor" : "bytes", opt_.warmup_iters, opt_.iters, opt_.check);
  char host[64] = {};
  ::gethostname(host, sizeof host - 1);
  print("#\n# Using ranks\n");
  for (int r = 0; r < nranks_; ++r)
    print("#  Rank %2d Pid %6lld on %10s\n", r,
          static_cast<long long>(pids[static_cast<std::size_t>(r)]), host);
  print("#\n");
}

nlohmann::json Runner::run() {
  header();
  // Allocated once at the largest size, before any timing.
  const std::size_t max_bytes = plan_.sizes.back();
  max_elems_ = max_bytes / sizeof(float);
  send_ = allocate_touched(max_bytes);
  recv_ = allocate_touched(max_bytes);
  for (Coll c : plan_.colls) table(c);

  const double avg = busbw_count_ > 0 ? busbw_sum_ / busbw_count_ : 0.0;
  print("# Out of bounds values : %llu %s\n", static_cast<unsigned long long>(total_wrong_),
        total_wrong_ ? "FAILED" : "OK");
  print("# Avg bus bandwidth    : %g \n#\n", avg);
  if (rank_ == 0) std::fflush(out_);

  nlohmann::json report;
  report["tool"] = comm_.tool();
  report["version"] = comm_.version();
  report["nranks"] = nranks_;
  report["transport"] = comm_.transport();
  nlohmann::json colls = nlohmann::json::array();
  for (Coll c : plan_.colls) colls.push_back(info(c).name);
  report["colls"] = colls;
  report["datatypes"] = nlohmann::json::array({"float"});
  report["ops"] = nlohmann::json::array({"sum"});
  report["minbytes"] = plan_.sizes.front();
  report["maxbytes"] = parse_size(opt_.maxbytes);
  report["stepfactor"] = opt_.stepfactor;
  report["stepbytes"] = parse_size(opt_.stepbytes);
  report["iters"] = opt_.iters;
  report["warmup_iters"] = opt_.warmup_iters;
  report["check"] = opt_.check;
  report["root"] = opt_.root;
  report["results"] = records_;
  report["avg_busbw"] = avg;
  report["wrong_total"] = total_wrong_;
  return report;
}

void Runner::table(Coll coll) {
  const CollInfo& ci = info(coll);
  const char* op_name = ci.reduces ? "sum" : "none";
  const int root = ci.rooted ? opt_.root : -1;
  print("# Collective: %s\n", ci.name);
  print("#\n");
  print(
      "# %10s  %12s  %8s  %6s  %6s           out-of-place                       in-place          "
      "\n",
      "", "", "", "", "");
  print("# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s %6s  %7s  %6s  %6s %6s\n", "size", "count",
        "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time", "algbw", "busbw",
        "#wrong");
  print("# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %5s  %7s  %6s  %6s  %5s\n", "(B)",
        "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", "");

  for (std::size_t size : plan_.sizes) {
    const Counts cc = counts(coll, size / sizeof(float), nranks_);
    const std::size_t size_bytes = std::max(cc.send, cc.recv) * sizeof(float);
    char row[256];
    std::snprintf(row, sizeof row, "%12zu  %12zu  %8s  %6s  %6d", size_bytes, cc.param, "float",
                  op_name, root);
    std::string line = row;
    for (bool in_place : {false, true}) {
      const Result res = measure(coll, cc, size_bytes, in_place);
      if (!res.ran) {
        std::snprintf(row, sizeof row, "  %7s  %6s  %6s  %5s", "N/A", "N/A", "N/A", "N/A");
        line += row;
        continue;
      }
      const std::string time = format_time_us(res.time_us);
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
      nlohmann::json rec;
      rec["coll"] = ci.name;
      rec["datatype"] = "float";
      rec["op"] = op_name;
      rec["root"] = root;
      rec["size"] = size_bytes;
      rec["count"] = cc.param;
      rec["inplace"] = in_place;
      rec["time_us"] = res.time_us;
      rec["algbw"] = res.algbw;
      rec["busbw"] = res.busbw;
      if (res.checked)
        rec["wrong"] = res.wrong;
      else
        rec["wrong"] = nullptr;
      records_.push_back(std::move(rec));
    }
    print("%s\n", line.c_str());
    if (rank_ == 0) std::fflush(out_);
  }
}

// Layout of one call, as nccl-tests lays out in-place runs in one buffer.
struct Layout {
  float* send;
  float* recv;
};

Layout layout(Coll coll, const Counts& cc, int rank, float* send_buf, float* recv_buf,
              bool in_place) {
  if (!in_place) return {send_buf, recv_buf};
  if (coll == Coll::Allgather)
    return {recv_buf + cc.param * static_cast<std::size_t>(rank), recv_buf};
  return {recv_buf, recv_buf};
}

void Runner::fill_check(Coll coll, const Counts& cc, float* send, float* recv) {
  // Poison the output first: in place, the input (which lies inside the
  // output buffer) is then written over it.
  std::memset(recv, kPoisonByte, cc.recv * sizeof(float));
  for (std::size_t i = 0; i < cc.send; ++i)
    send[i] = coll == Coll::Allreduce ? reduce_input(rank_, i) : plain_value(rank_, i);
}

std::uint64_t Runner::count_wrong(Coll coll, const Counts& cc, const float* result) const {
  std::uint64_t wrong = 0;
  for (std::size_t i = 0; i < cc.recv; ++i) {
    float want = 0;
    switch (coll) {
      case Coll::Allreduce:
        want = reduce_expected(nranks_, i);
        break;
      case Coll::Broadcast:
        want = plain_value(opt_.root, i);
        break;
      case Coll::Allgather:
        want = plain_value(static_cast<int>(i / cc.param), i % cc.param);
        break;
    }
    if (result[i] != want) ++wrong;
  }
  return wrong;
}

Result Runner::measure(Coll coll, const Counts& cc, std::size_t size_bytes, bool in_place) {
  Result res;
  const Layout lay = layout(coll, cc, rank_, reinterpret_cast<float*>(send_.get()),
                           reinterpret_cast<float*>(recv_.get()), in_place);
  // Zeros are valid input and stay zero however often they are summed.
  std::memset(send_.get(), 0, cc.send * sizeof(float));
  std::memset(recv_.get(), 0, std::max(cc.send, cc.recv) * sizeof(float));
  const Prepared p = comm_.prepare(coll, lay.send, lay.recv, cc.param, opt_.root, in_place);
  if (!p.supported) return res;
  res.ran = true;

  for (int i = 0; i < opt_.warmup_iters; ++i) p.call();
  comm_.barrier();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < opt_.iters; ++i) p.call();
  const auto t1 = std::chrono::steady_clock::now();
  const double my_us = std::chrono::duration<double, std::micro>(t1 - t0).count() / opt_.iters;
  // The slowest rank defines the collective's time.
  res.time_us = comm_.max_over_ranks(my_us);
  const double sec = res.time_us * 1e-6;
  res.algbw = sec > 0 ? static_cast<double>(size_bytes) / 1e9 / sec : 0.0;
  res.busbw = res.algbw * bus_factor(coll, nranks_);

  if (opt_.check > 0) {
    std::uint64_t wrong = 0;
    for (int c = 0; c < opt_.check; ++c) {
      fill_check(coll, cc, lay.send, lay.recv);
      p.call();
      wrong += count_wrong(coll, cc, p.result);
    }
    res.checked = true;
    res.wrong = comm_.sum_over_ranks(wrong);
  }
  return res;
}

std::vector<std::string> split_list(const std::vector<std::string>& items) {
  std::vector<std::string> out;
  for (const std::string& item : items) {
    std::size_t start = 0;
    for (;;) {
      const std::size_t comma = item.find(',', start);
      std::string part =
          item.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      if (!part.empty()) out.push_back(part);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  return out;
}

}  // namespace

void add_options(chorus::cli::Parser& app, Options& opt) {
  chorus::bench::add_sweep_options(app, opt);
  app.add("-d,--datatype", opt.datatype, "float (the only type measured)").show_default();
  app.add("-o,--op", opt.op, "sum (the only reduction measured)").show_default();
  app.add("-r,--root", opt.root, "Root rank of broadcast").show_default();
  app.add("--coll", opt.colls, "Collectives, comma-separated: allreduce, broadcast, allgather")
      .show_default();
  app.add("--json", opt.json,
          "Also write the results as JSON (chorus-bench's schema) to FILE ('-': stdout, the "
          "table then goes to stderr)");
}

Plan finish_options(chorus::cli::Parser& app, Options& opt) {
  chorus::bench::settle_step(app, opt);
  if (opt.datatype != "float" && opt.datatype != "float32")
    throw std::invalid_argument("-d " + opt.datatype + ": only float is measured");
  if (opt.op != "sum") throw std::invalid_argument("-o " + opt.op + ": only sum is measured");
  Plan plan;
  const std::size_t min_bytes = parse_size(opt.minbytes);
  const std::size_t max_bytes = parse_size(opt.maxbytes);
  const std::size_t step = parse_size(opt.stepbytes);
  if (min_bytes > max_bytes) throw std::invalid_argument("--minbytes is larger than --maxbytes");
  if (opt.stepfactor <= 1 && step == 0)
    throw std::invalid_argument("--stepbytes must be > 0 when --stepfactor is 1");
  for (std::size_t s = min_bytes; s <= max_bytes;) {
    plan.sizes.push_back(s);
    const std::size_t next =
        opt.stepfactor > 1 ? s * static_cast<std::size_t>(opt.stepfactor) : s + step;
    if (next <= s) break;
    s = next;
  }
  for (const std::string& name : split_list(opt.colls)) {
    const CollInfo* found = nullptr;
    for (const CollInfo& ci : kColls)
      if (name == ci.name) found = &ci;
    if (found == nullptr)
      throw std::invalid_argument("unknown collective '" + name +
                                  "' (use allreduce, broadcast, allgather)");
    if (std::find(plan.colls.begin(), plan.colls.end(), found->coll) == plan.colls.end())
      plan.colls.push_back(found->coll);
  }
  if (plan.colls.empty()) throw std::invalid_argument("--coll names no collective");
  return plan;
}

int rank_from_env() {
  for (const char* name : {"CHORUS_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"}) {
    if (const char* v = std::getenv(name)) return std::atoi(v);
  }
  return 0;
}

std::uint64_t run(Comm& comm, const Options& opt, const Plan& plan) {
  if (opt.root < 0 || opt.root >= comm.size())
    throw std::invalid_argument("--root " + std::to_string(opt.root) + " is not a rank");
  Runner runner(comm, opt, plan);
  const nlohmann::json report = runner.run();
  if (comm.rank() == 0 && !opt.json.empty()) {
    if (opt.json == "-") {
      std::cout << report.dump(2) << std::endl;
    } else {
      std::ofstream f(opt.json);
      f << report.dump(2) << '\n';
      if (!f) throw std::runtime_error("cannot write " + opt.json);
    }
  }
  return runner.total_wrong();
}

}  // namespace chorus_peer
