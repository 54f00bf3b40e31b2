// Every collective on CUDA device buffers, at 2, 3 and 4 ranks on one GPU
// (or on as many GPUs as there are): in place and not, with and without a
// stream, over the CUDA IPC path and (CHORUS_CUDA_IPC=0) the pinned-host
// staging path. Expected values are computed on the host from the closed
// form of every rank's input; outputs are poisoned before every call.
//
// Ranks are forked processes; the parent never touches CUDA (it could not
// fork working children afterwards), so even the "is there a GPU" probe runs
// in a child. Without a GPU every case skips, saying why.

#include <chorus/communicator.hpp>
#include <chorus/engine.hpp>
#include <chorus/store.hpp>

#include "child_probe.hpp"
#include "cuda_test_util.hpp"
#include "fork_ranks.hpp"

#include <gtest/gtest.h>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <sstream>
#include <thread>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

using chorus::CallOptions;
using chorus::Communicator;
using chorus::DataType;
using chorus::ReduceOp;
using namespace cuda_test;

namespace {

std::string gpu_reason() {
  static const std::string why = chorus_test::probe_in_child([] {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) return std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
    if (n == 0) return std::string("no CUDA device");
    return std::string();
  }).value_or("the GPU probe process crashed");
  return why;
}

// Rank r's input element i (values 1..3: sums, products and averages are
// exact in every dtype at up to 4 ranks).
double value(int rank, std::size_t i, int salt) {
  return static_cast<double>((static_cast<std::size_t>(rank) * 3 + i * 7 + static_cast<std::size_t>(salt)) % 3 + 1);
}

double combine(ReduceOp op, const std::vector<double>& v, DataType t) {
  double acc = v[0];
  for (std::size_t k = 1; k < v.size(); ++k) {
    switch (op) {
      case ReduceOp::Sum:
      case ReduceOp::Avg: acc += v[k]; break;
      case ReduceOp::Prod: acc *= v[k]; break;
      case ReduceOp::Min: acc = std::min(acc, v[k]); break;
      case ReduceOp::Max: acc = std::max(acc, v[k]); break;
    }
  }
  if (op == ReduceOp::Avg) {
    const double n = static_cast<double>(v.size());
    acc = chorus::is_floating_point(t) ? acc / n : std::trunc(acc / n);
  }
  return acc;
}

#define CK(x)                                                                              \
  do {                                                                                     \
    const cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                               \
      std::cerr << "rank " << rank << ": " << #x << ": " << cudaGetErrorString(e_) << "\n"; \
      std::_Exit(90);                                                                      \
    }                                                                                      \
  } while (0)

struct Case {
  std::string coll;
  DataType t;
  ReduceOp op;
  std::size_t count;
  bool in_place;
  bool stream;
};

std::string describe(const Case& c) {
  std::ostringstream os;
  os << c.coll << " " << chorus::to_string(c.t) << " " << chorus::to_string(c.op) << " count "
     << c.count << (c.in_place ? " in-place" : "") << (c.stream ? " stream" : " blocking");
  return os.str();
}

// Runs one case on this rank; returns an error text or "".
std::string run_case(Communicator& comm, const Case& c, cudaStream_t stream, int salt) {
  const int rank = comm.rank(), n = comm.size();
  const std::size_t w = chorus::size_of(c.t), cnt = c.count, nn = static_cast<std::size_t>(n);
  const int root = (c.coll == "broadcast") ? n - 1 : (c.coll == "reduce" ? 1 % n : 0);
  // Sizes of this rank's send and recv buffers (elements).
  std::size_t sn = cnt, rn = cnt;
  if (c.coll == "allgather" || c.coll == "gather") rn = cnt * nn;
  if (c.coll == "reduce_scatter" || c.coll == "scatter") sn = cnt * nn;
  if (c.coll == "alltoall") sn = rn = cnt * nn;
  // alltoallv: rank i sends rank j pair(i, j) elements (0, half or all of cnt).
  auto pair = [&](std::size_t i, std::size_t j) { return cnt * ((i + 2 * j) % 3) / 2; };
  auto sent_before = [&](std::size_t i, std::size_t j) {  // where i's block for j starts
    std::size_t at = 0;
    for (std::size_t q = 0; q < j; ++q) at += pair(i, q);
    return at;
  };
  std::vector<std::size_t> vsend(nn), vrecv(nn);
  if (c.coll == "allgatherv") {  // rank p shares pair(p, 1) elements
    rn = 0;
    for (std::size_t j = 0; j < nn; ++j) {
      vrecv[j] = pair(j, 1);
      rn += vrecv[j];
    }
    sn = vrecv[static_cast<std::size_t>(rank)];
  }
  // reduce_scatterv: where this rank's block starts.
  std::size_t first = 0;
  if (c.coll == "reduce_scatterv") {  // rank p receives pair(p, 1) elements
    sn = 0;
    for (std::size_t j = 0; j < nn; ++j) {
      vrecv[j] = pair(j, 1);
      if (j == static_cast<std::size_t>(rank)) first = sn;
      sn += vrecv[j];
    }
    rn = vrecv[static_cast<std::size_t>(rank)];
  }
  if (c.coll == "alltoallv") {
    sn = rn = 0;
    for (std::size_t j = 0; j < nn; ++j) {
      vsend[j] = pair(static_cast<std::size_t>(rank), j);
      vrecv[j] = pair(j, static_cast<std::size_t>(rank));
      sn += vsend[j];
      rn += vrecv[j];
    }
  }
  std::vector<char> hs(sn * w), hr(rn * w);
  for (std::size_t i = 0; i < sn; ++i) store(c.t, hs.data(), i, value(rank, i, salt));
  char *ds = nullptr, *dr = nullptr;
  CK(cudaMalloc(reinterpret_cast<void**>(&ds), std::max<std::size_t>(sn, 1) * w));
  CK(cudaMalloc(reinterpret_cast<void**>(&dr), std::max<std::size_t>(rn, 1) * w));
  CallOptions o;
  o.stream = c.stream ? stream : nullptr;
  cudaStream_t st = c.stream ? stream : nullptr;
  // The input and the poison travel on the call's stream: the collective
  // must be ordered after them (and the copy back after it).
  CK(cudaMemsetAsync(dr, 0xff, rn * w, st));
  CK(cudaMemcpyAsync(ds, hs.data(), sn * w, cudaMemcpyHostToDevice, st));
  if (!c.stream) CK(cudaStreamSynchronize(nullptr));
  // In place: the output buffer doubles as the input.
  char* send = ds;
  char* recv = dr;
  if (c.in_place) {
    if (c.coll == "allreduce" || c.coll == "broadcast" || c.coll == "reduce") {
      recv = ds;
    } else if (c.coll == "allgather") {  // send = recv + rank*count
      CK(cudaMemcpyAsync(dr + static_cast<std::size_t>(rank) * cnt * w, ds, cnt * w,
                         cudaMemcpyDeviceToDevice, st));
      send = dr + static_cast<std::size_t>(rank) * cnt * w;
    } else if (c.coll == "reduce_scatter") {  // recv = send + rank*count
      recv = ds + static_cast<std::size_t>(rank) * cnt * w;
    } else if (c.coll == "reduce_scatterv") {  // recv = send + the blocks before
      recv = ds + first * w;
    }
  }
  try {
    if (c.coll == "allreduce") comm.allreduce(send, recv, cnt, c.t, c.op, o);
    else if (c.coll == "broadcast") comm.broadcast(send, recv, cnt, c.t, root, o);
    else if (c.coll == "reduce") comm.reduce(send, recv, cnt, c.t, c.op, root, o);
    else if (c.coll == "allgather") comm.allgather(send, recv, cnt, c.t, o);
    else if (c.coll == "reduce_scatter") comm.reduce_scatter(send, recv, cnt, c.t, c.op, o);
    else if (c.coll == "gather") comm.gather(send, recv, cnt, c.t, root, o);
    else if (c.coll == "scatter") comm.scatter(send, recv, cnt, c.t, root, o);
    else if (c.coll == "alltoall") comm.alltoall(send, recv, cnt, c.t, o);
    else if (c.coll == "alltoallv")
      comm.alltoallv(send, vsend, recv, vrecv, c.t, o);
    else if (c.coll == "allgatherv")
      comm.allgatherv(send, recv, vrecv, c.t, o);
    else if (c.coll == "reduce_scatterv")
      comm.reduce_scatterv(send, recv, vrecv, c.t, c.op, o);
    else if (c.coll == "sendrecv") {
      const int next = (rank + 1) % n, prev = (rank + n - 1) % n;
      if (rank % 2 == 0) {
        comm.send(send, cnt, c.t, next, o);
        comm.recv(recv, cnt, c.t, prev, o);
      } else {
        comm.recv(recv, cnt, c.t, prev, o);
        comm.send(send, cnt, c.t, next, o);
      }
    }
  } catch (const chorus::Error& e) {
    return std::string("threw ") + e.what();
  }
  const std::size_t out_n = (c.coll == "allgather" || c.coll == "gather" || c.coll == "alltoallv" ||
                             c.coll == "allgatherv" || c.coll == "reduce_scatterv")
                                ? rn
                                : cnt;
  CK(cudaMemcpyAsync(hr.data(), recv, out_n * w, cudaMemcpyDeviceToHost, st));
  CK(cudaStreamSynchronize(st));
  CK(cudaFree(ds));
  CK(cudaFree(dr));
  const bool has_result = !((c.coll == "reduce" || c.coll == "gather") && rank != root);
  if (!has_result) return "";
  std::vector<double> across(nn);
  std::size_t bad = 0;
  std::ostringstream err;
  for (std::size_t i = 0; i < out_n && bad < 3; ++i) {
    double want = 0;
    if (c.coll == "allreduce" || c.coll == "reduce" || c.coll == "reduce_scatter" ||
        c.coll == "reduce_scatterv") {
      const std::size_t j = c.coll == "reduce_scatter"    ? static_cast<std::size_t>(rank) * cnt + i
                            : c.coll == "reduce_scatterv" ? first + i
                                                          : i;
      for (int p = 0; p < n; ++p) across[static_cast<std::size_t>(p)] = value(p, j, salt);
      want = combine(c.op, across, c.t);
    } else if (c.coll == "broadcast") {
      want = value(root, i, salt);
    } else if (c.coll == "allgather" || c.coll == "gather") {
      want = value(static_cast<int>(i / cnt), i % cnt, salt);
    } else if (c.coll == "scatter") {
      want = value(root, static_cast<std::size_t>(rank) * cnt + i, salt);
    } else if (c.coll == "alltoall") {
      want = value(static_cast<int>(i / cnt), static_cast<std::size_t>(rank) * cnt + i % cnt, salt);
    } else if (c.coll == "allgatherv") {
      std::size_t from = 0, k = i;  // element k of rank `from`'s share
      while (k >= vrecv[from]) k -= vrecv[from++];
      want = value(static_cast<int>(from), k, salt);
    } else if (c.coll == "alltoallv") {
      std::size_t from = 0, k = i;  // element k of the block from rank `from`
      while (k >= vrecv[from]) k -= vrecv[from++];
      want = value(static_cast<int>(from), sent_before(from, static_cast<std::size_t>(rank)) + k,
                   salt);
    } else if (c.coll == "sendrecv") {
      want = value((rank + n - 1) % n, i, salt);
    }
    std::vector<char> ref(w);
    store(c.t, ref.data(), 0, want);
    const double got = load(c.t, hr.data(), i);
    const double wr = load(c.t, ref.data(), 0);
    const bool approx = c.op == ReduceOp::Avg && chorus::is_floating_point(c.t);
    const double tol = approx ? std::abs(wr) * (w <= 2 ? 1e-2 : 1e-6) : 0.0;
    if (!(std::abs(got - wr) <= tol)) {
      err << " element " << i << ": got " << got << " want " << wr << ";";
      ++bad;
    }
  }
  return err.str();
}

int rank_main(int rank, int n, const std::string& dir) {
  auto store = std::make_shared<chorus::FileStore>(dir);
  chorus::Config cfg;
  cfg.timeout = std::chrono::seconds(120);
  Communicator comm = Communicator::create(rank, n, store, cfg);
  int ndev = 0;
  CK(cudaGetDeviceCount(&ndev));
  CK(cudaSetDevice(rank % ndev));
  cudaStream_t stream = nullptr;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::vector<Case> cases;
  const std::size_t counts[] = {1, 1000, 70000, (std::size_t{1} << 20) + 3};
  int k = 0;
  for (int ti = 0; ti < chorus::kNumDataTypes; ++ti) {
    const auto t = static_cast<DataType>(ti);
    for (int oi = 0; oi < chorus::kNumReduceOps; ++oi)
      for (std::size_t cnt : counts)
        for (bool ip : {false, true}) cases.push_back({"allreduce", t, static_cast<ReduceOp>(oi), cnt, ip, (k++ % 2) == 1});
  }
  for (DataType t : {DataType::Float32, DataType::Float16, DataType::Int8, DataType::Float64})
    for (std::size_t cnt : counts)
      for (bool ip : {false, true}) {
        const bool s = (k++ % 2) == 1;
        cases.push_back({"reduce_scatter", t, ReduceOp::Sum, cnt, ip, s});
        cases.push_back({"reduce_scatterv", t, ReduceOp::Min, cnt, ip, !s});
        cases.push_back({"reduce", t, ReduceOp::Max, cnt, ip, !s});
        cases.push_back({"broadcast", t, ReduceOp::Sum, cnt, ip, s});
        cases.push_back({"allgather", t, ReduceOp::Sum, cnt, ip, !s});
        if (!ip) {
          cases.push_back({"gather", t, ReduceOp::Sum, cnt, false, s});
          cases.push_back({"scatter", t, ReduceOp::Sum, cnt, false, !s});
          cases.push_back({"alltoall", t, ReduceOp::Sum, cnt, false, s});
          cases.push_back({"alltoallv", t, ReduceOp::Sum, cnt, false, !s});
          cases.push_back({"allgatherv", t, ReduceOp::Sum, cnt, false, s});
          cases.push_back({"sendrecv", t, ReduceOp::Sum, cnt, false, !s});
        }
      }
  int failures = 0;
  int salt = 0;
  for (const Case& c : cases) {
    const std::string err = run_case(comm, c, stream, salt++);
    if (!err.empty()) {
      std::cerr << "rank " << rank << " of " << n << ": " << describe(c) << ":" << err << "\n";
      if (++failures >= 10 || err.rfind("threw", 0) == 0) break;
    }
  }
  // A barrier on a stream, and no error left behind.
  try {
    CallOptions o;
    o.stream = stream;
    comm.barrier(o);
  } catch (const chorus::Error& e) {
    std::cerr << "rank " << rank << ": barrier with a stream threw " << e.what() << "\n";
    ++failures;
  }
  if (comm.error()) {
    std::cerr << "rank " << rank << ": error() reports " << comm.error()->what() << "\n";
    ++failures;
  }
  CK(cudaStreamDestroy(stream));
  return failures;
}

// Forks `n` ranks running `body`; returns their exit codes (-1: killed).
std::vector<int> fork_ranks(int n, const std::function<int(int, int, const std::string&)>& body,
                            std::chrono::seconds limit) {
  return chorus_test::fork_ranks(n, body, limit, "chorus-cuda-test");
}

class CudaCollectives : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    if (const std::string why = gpu_reason(); !why.empty()) GTEST_SKIP() << "no GPU here: " << why;
  }
};

TEST_P(CudaCollectives, EveryCollectiveOnDeviceBuffers) {
  const int n = GetParam();
  const auto codes = fork_ranks(n, rank_main, std::chrono::seconds(600));
  for (int r = 0; r < n; ++r)
    EXPECT_EQ(codes[static_cast<std::size_t>(r)], 0) << "rank " << r << " of " << n
                                                     << " (-1: killed after the time limit)";
}

INSTANTIATE_TEST_SUITE_P(World, CudaCollectives, ::testing::Values(2, 3, 4));

// One rank passes host buffers, the others device buffers: every rank fails
// with an Error naming the mismatch (the message sequences differ), none hangs.
TEST(CudaMisuse, MixedHostAndDeviceRanksFailClearly) {
  if (const std::string why = gpu_reason(); !why.empty()) GTEST_SKIP() << "no GPU here: " << why;
  const auto codes = fork_ranks(3, [](int rank, int n, const std::string& dir) {
    auto store = std::make_shared<chorus::FileStore>(dir);
    chorus::Config cfg;
    cfg.timeout = std::chrono::seconds(20);
    Communicator comm = Communicator::create(rank, n, store, cfg);
    const std::size_t count = 4096;
    std::vector<float> host(count, 1.0f);
    float* dev = nullptr;
    CK(cudaMalloc(reinterpret_cast<void**>(&dev), count * 4));
    float* buf = rank == 0 ? host.data() : dev;
    try {
      comm.allreduce(buf, buf, count, DataType::Float32, ReduceOp::Sum);
    } catch (const chorus::Error& e) {
      const bool clear = e.code() == chorus::ErrorCode::InvalidUsage ||
                         e.code() == chorus::ErrorCode::PeerFailure;
      if (!clear) std::cerr << "rank " << rank << ": unexpected error: " << e.what() << "\n";
      return clear ? 0 : 2;
    }
    std::cerr << "rank " << rank << ": mixed host/device allreduce did not fail\n";
    return 1;
  }, std::chrono::seconds(120));
  for (int r = 0; r < 3; ++r) EXPECT_EQ(codes[static_cast<std::size_t>(r)], 0) << "rank " << r;
}

// A kernel that traps, as PTX for the driver to compile: a sticky fault on
// the context, raised by the application's own work after a collective
// returned.
constexpr char kTrapPtx[] = R"(.version 7.0
.target sm_52
.address_size 64
.visible .entry chorus_test_trap()
{
  trap;
}
)";

template <typename Fn>
Fn driver_fn(const char* name) {
  void* f = nullptr;
  cudaDriverEntryPointQueryResult q{};
  if (cudaGetDriverEntryPointByVersion(name, &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess)
    return nullptr;
  return reinterpret_cast<Fn>(f);
}

// A fault on the GPU after a device collective returned poisons the process's
// context: Communicator::error() reports it as Error(Cuda) naming the CUDA
// error, and the next call, on device or host buffers, throws it instead of
// running (NCCL's ncclCommGetAsyncError). Both ranks fault, each in its own
// process, so neither waits for the other.
TEST(CudaAsyncError, AFaultAfterACallIsReportedByErrorAndTheNextCall) {
  if (const std::string why = gpu_reason(); !why.empty()) GTEST_SKIP() << "no GPU here: " << why;
  const auto codes = fork_ranks(2, [](int rank, int n, const std::string& dir) {
    auto store = std::make_shared<chorus::FileStore>(dir);
    chorus::Config cfg;
    cfg.timeout = std::chrono::seconds(30);
    Communicator comm = Communicator::create(rank, n, store, cfg);
    const std::size_t count = 1024;
    float* dev = nullptr;
    CK(cudaMalloc(reinterpret_cast<void**>(&dev), count * 4));
    CK(cudaMemset(dev, 0, count * 4));
    cudaStream_t st = nullptr;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CallOptions o;
    o.stream = st;
    comm.allreduce(dev, dev, count, DataType::Float32, ReduceOp::Sum, o);
    CK(cudaStreamSynchronize(st));
    if (comm.error()) {
      std::cerr << "rank " << rank << ": error() before any fault: " << comm.error()->what()
                << "\n";
      return 2;
    }
    using LoadFn = CUresult (*)(CUmodule*, const void*);
    using GetFn = CUresult (*)(CUfunction*, CUmodule, const char*);
    using LaunchFn = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                  unsigned, unsigned, CUstream, void**, void**);
    const auto load = driver_fn<LoadFn>("cuModuleLoadData");
    const auto get = driver_fn<GetFn>("cuModuleGetFunction");
    const auto launch = driver_fn<LaunchFn>("cuLaunchKernel");
    CUmodule mod = nullptr;
    CUfunction trap = nullptr;
    if (load == nullptr || get == nullptr || launch == nullptr ||
        load(&mod, kTrapPtx) != CUDA_SUCCESS ||
        get(&trap, mod, "chorus_test_trap") != CUDA_SUCCESS ||
        launch(trap, 1, 1, 1, 1, 1, 1, 0, st, nullptr, nullptr) != CUDA_SUCCESS) {
      std::cerr << "rank " << rank << ": could not launch the trapping kernel\n";
      return 3;
    }
    const cudaError_t fault = cudaStreamSynchronize(st);
    if (fault == cudaSuccess) {
      std::cerr << "rank " << rank << ": the trapping kernel did not fault\n";
      return 4;
    }
    const std::string name = cudaGetErrorName(fault);
    const auto err = comm.error();
    if (!err || err->code() != chorus::ErrorCode::Cuda ||
        std::string(err->what()).find(name) == std::string::npos) {
      std::cerr << "rank " << rank << ": after " << name << ", error() reports "
                << (err ? err->what() : std::string("nothing")) << "\n";
      return 5;
    }
    std::vector<float> host(count, 1.0f);
    for (float* buf : {dev, host.data()}) {
      try {
        comm.allreduce(buf, buf, count, DataType::Float32, ReduceOp::Sum,
                       buf == dev ? o : CallOptions{});
        std::cerr << "rank " << rank << ": a call after the fault ran\n";
        return 6;
      } catch (const chorus::Error& e) {
        if (e.code() != chorus::ErrorCode::Cuda ||
            std::string(e.what()).find(name) == std::string::npos) {
          std::cerr << "rank " << rank << ": the call after the fault threw " << e.what() << "\n";
          return 7;
        }
      }
    }
    return 0;
  }, std::chrono::seconds(120));
  for (int r = 0; r < 2; ++r)
    EXPECT_EQ(codes[static_cast<std::size_t>(r)], 0)
        << "rank " << r << ": 2 error before the fault, 3 no trap kernel, 4 no fault, 5 error() "
        << "silent or unclear, 6 a later call ran, 7 it threw something else (-1: killed)";
}

// An asynchronous call on a stream enters the stream when it is made: it is
// ordered after the work queued there before the call, never behind the work
// queued after it, and work queued once its Work has completed sees the
// result. After the calls the test blocks the stream with a host function
// that waits for every Work: a call that waited for the stream itself (where
// it stood when the worker ran it) would never complete. Without a stream
// the calls enter the legacy default stream alike.
int async_rank(int rank, int n, const std::string& dir) {
  auto store = std::make_shared<chorus::FileStore>(dir);
  chorus::Config cfg;
  cfg.timeout = std::chrono::seconds(30);
  Communicator comm = Communicator::create(rank, n, store, cfg);
  int ndev = 0;
  CK(cudaGetDeviceCount(&ndev));
  CK(cudaSetDevice(rank % ndev));
  cudaStream_t st = nullptr;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  // Above and below the one-shot and staging sizes; the last call is in place.
  const std::size_t counts[] = {1000, (std::size_t{1} << 18) + 5, (std::size_t{1} << 21) + 3};
  constexpr int kCalls = 3;
  std::vector<float*> host(kCalls), out(kCalls);
  std::vector<float*> send(kCalls), recv(kCalls);
  for (int k = 0; k < kCalls; ++k) {
    const std::size_t cnt = counts[k];
    CK(cudaMallocHost(reinterpret_cast<void**>(&host[static_cast<std::size_t>(k)]), cnt * 4));
    CK(cudaMallocHost(reinterpret_cast<void**>(&out[static_cast<std::size_t>(k)]), cnt * 4));
    CK(cudaMalloc(reinterpret_cast<void**>(&send[static_cast<std::size_t>(k)]), cnt * 4));
    CK(cudaMalloc(reinterpret_cast<void**>(&recv[static_cast<std::size_t>(k)]), cnt * 4));
    for (std::size_t i = 0; i < cnt; ++i)
      host[static_cast<std::size_t>(k)][i] = static_cast<float>(value(rank, i, k));
  }
  recv[kCalls - 1] = send[kCalls - 1];
  auto check = [&](int k, const char* how) {
    const auto kk = static_cast<std::size_t>(k);
    for (std::size_t i = 0; i < counts[k]; ++i) {
      double want = 0;
      for (int p = 0; p < n; ++p) want += value(p, i, k);
      if (out[kk][i] != static_cast<float>(want)) {
        std::cerr << "rank " << rank << ": " << how << " call " << k << " element " << i
                  << ": got " << out[kk][i] << " want " << want << "\n";
        return false;
      }
    }
    return true;
  };
  // Once blocking, so that the gated calls below allocate nothing: growing
  // a staging or scratch buffer frees the old one, and cudaFree and
  // cudaFreeHost wait for the whole device, the blocked stream included
  // (docs/cuda.md, Semantics).
  {
    CallOptions o;
    o.stream = st;
    for (int k = 0; k < kCalls; ++k) {
      const auto kk = static_cast<std::size_t>(k);
      CK(cudaMemsetAsync(send[kk], 0, counts[k] * 4, st));
      comm.allreduce(send[kk], recv[kk], counts[k], DataType::Float32, ReduceOp::Sum, o);
    }
    CK(cudaStreamSynchronize(st));
  }
  struct Gate {
    std::atomic<bool> open{false};
  } gate;
  for (bool with_stream : {true, false}) {
    cudaStream_t s = with_stream ? st : nullptr;
    CallOptions o;
    o.stream = s;
    // Inputs and poisoned outputs, queued on the stream before the calls.
    for (int k = 0; k < kCalls; ++k) {
      const auto kk = static_cast<std::size_t>(k);
      CK(cudaMemsetAsync(recv[kk], 0xff, counts[k] * 4, s));
      CK(cudaMemcpyAsync(send[kk], host[kk], counts[k] * 4, cudaMemcpyHostToDevice, s));
    }
    std::vector<chorus::Work> works;
    try {
      for (int k = 0; k < kCalls; ++k) {
        const auto kk = static_cast<std::size_t>(k);
        works.push_back(
            comm.allreduce_async(send[kk], recv[kk], counts[k], DataType::Float32, ReduceOp::Sum, o));
      }
    } catch (const chorus::Error& e) {
      std::cerr << "rank " << rank << ": allreduce_async threw " << e.what() << "\n";
      return 2;
    }
    gate.open = false;
    CK(cudaLaunchHostFunc(
        s,
        [](void* g) {
          while (!static_cast<Gate*>(g)->open.load())
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        },
        &gate));
    for (auto& w : works) {
      try {
        if (!w.wait(std::chrono::seconds(20))) {
          std::cerr << "rank " << rank << (with_stream ? ": a call on a stream" : ": a call")
                    << " waited for the work queued after it\n";
          gate.open = true;
          return 3;
        }
      } catch (const chorus::Error& e) {
        std::cerr << "rank " << rank << ": an async call failed: " << e.what() << "\n";
        gate.open = true;
        return 4;
      }
    }
    gate.open = true;
    for (int k = 0; k < kCalls; ++k) {
      const auto kk = static_cast<std::size_t>(k);
      CK(cudaMemcpyAsync(out[kk], recv[kk], counts[k] * 4, cudaMemcpyDeviceToHost, s));
    }
    CK(cudaStreamSynchronize(s));
    for (int k = 0; k < kCalls; ++k)
      if (!check(k, with_stream ? "on a stream:" : "without a stream:")) return 5;
  }
  if (comm.error()) {
    std::cerr << "rank " << rank << ": error() reports " << comm.error()->what() << "\n";
    return 6;
  }
  for (int k = 0; k < kCalls; ++k) {
    const auto kk = static_cast<std::size_t>(k);
    CK(cudaFreeHost(host[kk]));
    CK(cudaFreeHost(out[kk]));
    CK(cudaFree(send[kk]));
    if (k + 1 < kCalls) CK(cudaFree(recv[kk]));
  }
  CK(cudaStreamDestroy(st));
  return 0;
}

TEST(CudaStreams, AsyncCallsEnterTheirStreamWhenMade) {
  if (const std::string why = gpu_reason(); !why.empty()) GTEST_SKIP() << "no GPU here: " << why;
  for (int n : {2, 3}) {
    const auto codes = fork_ranks(n, async_rank, std::chrono::seconds(180));
    for (int r = 0; r < n; ++r)
      EXPECT_EQ(codes[static_cast<std::size_t>(r)], 0)
          << "rank " << r << " of " << n << ": 2 a call threw, 3 a call waited for later work, "
          << "4 a call failed, 5 a wrong result, 6 error() set (-1: killed)";
  }
}

// The tensor engine with tensors in device memory: each runs as its own
// collective on the GPU path (the fusion buffer is host memory), host
// tensors beside them are still fused, and every value is the closed form.
TEST(CudaEngine, DeviceTensorsRunUnfusedAndRight) {
  if (const std::string why = gpu_reason(); !why.empty()) GTEST_SKIP() << "no GPU here: " << why;
  const auto codes = fork_ranks(2, [](int rank, int n, const std::string& dir) {
    auto store = std::make_shared<chorus::FileStore>(dir);
    chorus::Config cfg;
    cfg.timeout = std::chrono::seconds(60);
    Communicator comm = Communicator::create(rank, n, store, cfg);
    int ndev = 0;
    CK(cudaGetDeviceCount(&ndev));
    CK(cudaSetDevice(rank % ndev));
    chorus::EngineConfig ec;
    ec.cycle = std::chrono::milliseconds(20);
    chorus::Engine eng = chorus::Engine::start(comm, ec);
    const std::size_t count = 4096;
    std::vector<float*> dev(3);
    std::vector<std::vector<float>> host(2, std::vector<float>(count));
    std::vector<chorus::Work> works;
    for (std::size_t k = 0; k < dev.size(); ++k) {
      std::vector<float> v(count);
      for (std::size_t i = 0; i < count; ++i) v[i] = static_cast<float>(value(rank, i, static_cast<int>(k)));
      CK(cudaMalloc(reinterpret_cast<void**>(&dev[k]), count * 4));
      CK(cudaMemcpy(dev[k], v.data(), count * 4, cudaMemcpyHostToDevice));
      std::string name = "dev";  // in steps: GCC 12's -Wrestrict misfires on "a" + to_string()
      name += std::to_string(k);
      works.push_back(eng.allreduce(name, dev[k], dev[k], count,
                                    DataType::Float32, ReduceOp::Sum));
    }
    for (std::size_t k = 0; k < host.size(); ++k) {
      for (std::size_t i = 0; i < count; ++i)
        host[k][i] = static_cast<float>(value(rank, i, static_cast<int>(10 + k)));
      std::string name = "host";
      name += std::to_string(k);
      works.push_back(eng.allreduce(name, host[k].data(), host[k].data(),
                                    count, DataType::Float32, ReduceOp::Sum));
    }
    for (auto& w : works) w.wait();
    auto want = [&](std::size_t i, int salt) {
      double sum = 0;
      for (int p = 0; p < n; ++p) sum += value(p, i, salt);
      return static_cast<float>(sum);
    };
    for (std::size_t k = 0; k < dev.size(); ++k) {
      std::vector<float> v(count);
      CK(cudaMemcpy(v.data(), dev[k], count * 4, cudaMemcpyDeviceToHost));
      for (std::size_t i = 0; i < count; ++i)
        if (v[i] != want(i, static_cast<int>(k))) {
          std::cerr << "rank " << rank << ": device tensor " << k << " element " << i << ": " << v[i] << "\n";
          return 2;
        }
      CK(cudaFree(dev[k]));
    }
    for (std::size_t k = 0; k < host.size(); ++k)
      for (std::size_t i = 0; i < count; ++i)
        if (host[k][i] != want(i, static_cast<int>(10 + k))) return 3;
    const auto st = eng.stats();
    eng.shutdown();
    // Three device tensors alone, the two host tensors fused (when one cycle
    // took them all: at least the device ones never shared a collective).
    if (st.tensors != 5 || st.collectives < 4 || st.fused > 2) {
      std::cerr << "rank " << rank << ": tensors " << st.tensors << ", collectives "
                << st.collectives << ", fused " << st.fused << "\n";
      return 4;
    }
    return 0;
  }, std::chrono::seconds(120));
  for (int r = 0; r < 2; ++r)
    EXPECT_EQ(codes[static_cast<std::size_t>(r)], 0)
        << "rank " << r << ": 2 wrong device value, 3 wrong host value, 4 device tensors fused";
}

// Without a GPU (this build has CUDA but the machine none), a stream in the
// call options is a clear Error(Cuda), and host collectives still work.
TEST(CudaMisuse, StreamWithoutGpuIsACudaError) {
  if (gpu_reason().empty()) GTEST_SKIP() << "a GPU is usable here";
  const auto codes = fork_ranks(1, [](int rank, int n, const std::string& dir) {
    auto store = std::make_shared<chorus::FileStore>(dir);
    Communicator comm = Communicator::create(rank, n, store);
    float x = 2.0f, y = 0.0f;
    comm.allreduce(&x, &y, 1, DataType::Float32, ReduceOp::Sum);
    if (y != 2.0f) return 3;
    CallOptions o;
    o.stream = reinterpret_cast<void*>(0x10);
    try {
      comm.allreduce(&x, &y, 1, DataType::Float32, ReduceOp::Sum, o);
    } catch (const chorus::Error& e) {
      if (e.code() != chorus::ErrorCode::Cuda) return 4;
      if (std::string(e.what()).find("CUDA") == std::string::npos) return 5;
      return 0;
    }
    return 6;
  }, std::chrono::seconds(60));
  EXPECT_EQ(codes[0], 0) << "exit codes: 3 wrong host result, 4 wrong error code, 5 unclear "
                            "message, 6 no error";
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
