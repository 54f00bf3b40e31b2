// chorus-cuda-micro: the device reduction kernels against the GPU's own copy
// bandwidth, measured in the same run (docs/benchmarks.md).
//
//   chorus-cuda-micro [MiB per buffer, default 256] [repeats, default 30]
//
// Bandwidth counts bytes read plus bytes written: a copy of B bytes moves 2B;
// a 2-input reduction of B-byte buffers moves 3B. Times are the median of
// CUDA-event-timed runs after warm-up, on random (never zero) data.
//
// Last, what telling host from device memory costs per pointer
// (chorus::device::query, which every collective calls on its buffers):
// a malloc'd host pointer (a driver query each time), a device pointer (a
// cached range), and cudaPointerGetAttributes itself.

#include "core/device.hpp"
#include "cuda/kernels.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace {

void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "chorus-cuda-micro: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(2);
  }
}

template <typename F>
double median_ms(F f, int repeats) {
  cudaEvent_t a, b;
  ok(cudaEventCreate(&a), "cudaEventCreate");
  ok(cudaEventCreate(&b), "cudaEventCreate");
  for (int i = 0; i < 3; ++i) f();
  ok(cudaDeviceSynchronize(), "warm-up");
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    ok(cudaEventRecord(a), "record");
    f();
    ok(cudaEventRecord(b), "record");
    ok(cudaEventSynchronize(b), "sync");
    float ms = 0;
    ok(cudaEventElapsedTime(&ms, a, b), "elapsed");
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  ok(cudaEventDestroy(a), "destroy");
  ok(cudaEventDestroy(b), "destroy");
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const std::size_t mib = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 256;
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 30;
  const std::size_t bytes = mib << 20;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    std::fprintf(stderr, "chorus-cuda-micro: no usable GPU\n");
    return 77;
  }
  cudaDeviceProp prop{};
  ok(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
  std::vector<void*> in(4);
  void* out = nullptr;
  for (auto& p : in) ok(cudaMalloc(&p, bytes), "cudaMalloc");
  ok(cudaMalloc(&out, bytes), "cudaMalloc");
  // Random bytes as floats could be NaN/Inf; fill with random small values per type instead.
  {
    std::mt19937 rng(12345);
    std::vector<float> f(bytes / 4);
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    for (auto& x : f) x = d(rng);
    for (auto& p : in) ok(cudaMemcpy(p, f.data(), bytes, cudaMemcpyHostToDevice), "fill");
  }
  const double copy_ms = median_ms([&] { ok(cudaMemcpyAsync(out, in[0], bytes, cudaMemcpyDeviceToDevice), "copy"); }, repeats);
  const double copy_gbs = 2.0 * static_cast<double>(bytes) / (copy_ms * 1e-3) / 1e9;
  std::printf("# chorus-cuda-micro: %s, %zu MiB per buffer, median of %d\n", prop.name, mib, repeats);
  std::printf("%-28s %12s %12s %10s\n", "kernel", "time(us)", "GB/s(r+w)", "%copy");
  std::printf("%-28s %12.1f %12.1f %10.1f\n", "device copy (cudaMemcpy)", copy_ms * 1e3, copy_gbs, 100.0);
  struct K {
    const char* name;
    chorus::DataType t;
    chorus::ReduceOp op;
    int n;
  };
  const K ks[] = {
      {"reduce float32 sum, 2 in", chorus::DataType::Float32, chorus::ReduceOp::Sum, 2},
      {"reduce bf16 sum, 2 in", chorus::DataType::BFloat16, chorus::ReduceOp::Sum, 2},
      {"reduce fp16 sum, 2 in", chorus::DataType::Float16, chorus::ReduceOp::Sum, 2},
      {"reduce float64 sum, 2 in", chorus::DataType::Float64, chorus::ReduceOp::Sum, 2},
      {"reduce int8 max, 2 in", chorus::DataType::Int8, chorus::ReduceOp::Max, 2},
      {"reduce float32 avg, 4 in", chorus::DataType::Float32, chorus::ReduceOp::Avg, 4},
  };
  for (const K& k : ks) {
    chorus::cuda::Inputs ins{};
    for (int i = 0; i < k.n; ++i) ins.p[i] = in[static_cast<std::size_t>(i)];
    const std::size_t count = bytes / chorus::size_of(k.t);
    const double ms = median_ms([&] {
      ok(chorus::cuda::reduce(ins, k.n, out, count, k.t, k.op, k.n, nullptr), "reduce");
    }, repeats);
    const double gbs = static_cast<double>(k.n + 1) * static_cast<double>(bytes) / (ms * 1e-3) / 1e9;
    std::printf("%-28s %12.1f %12.1f %10.1f\n", k.name, ms * 1e3, gbs, 100.0 * gbs / copy_gbs);
  }
  {
    std::vector<char> host(4096);
    constexpr int kCalls = 200000;
    auto ns_per_call = [&](auto f) {
      for (int i = 0; i < 1000; ++i) f();
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < kCalls; ++i) f();
      const std::chrono::duration<double, std::nano> d = std::chrono::steady_clock::now() - t0;
      return d.count() / kCalls;
    };
    volatile int sink = 0;
    const double q_host = ns_per_call([&] { sink = sink + chorus::device::query(host.data()).ordinal; });
    const double q_dev = ns_per_call([&] { sink = sink + chorus::device::query(out).ordinal; });
    const double attr = ns_per_call([&] {
      cudaPointerAttributes a{};
      (void)cudaPointerGetAttributes(&a, host.data());
      sink = sink + static_cast<int>(a.type);
    });
    std::printf("%-40s %10s\n", "memory-kind query", "ns/call");
    std::printf("%-40s %10.1f\n", "device::query, host pointer", q_host);
    std::printf("%-40s %10.1f\n", "device::query, device pointer (cached)", q_dev);
    std::printf("%-40s %10.1f\n", "cudaPointerGetAttributes, host pointer", attr);
  }
  for (auto& p : in) ok(cudaFree(p), "cudaFree");
  ok(cudaFree(out), "cudaFree");
  return 0;
}
