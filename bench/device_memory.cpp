#include "device_memory.hpp"

#include <stdexcept>

#if CHORUS_BENCH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace chorus::bench::device {

#if CHORUS_BENCH_CUDA
namespace {
void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
cudaStream_t g_stream = nullptr;
}  // namespace

std::string unavailable_reason() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
  return n == 0 ? "no CUDA device" : "";
}

std::string bind(int rank) {
  int n = 0;
  ok(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
  const int d = rank % n;
  ok(cudaSetDevice(d), "cudaSetDevice");
  cudaDeviceProp p{};
  ok(cudaGetDeviceProperties(&p, d), "cudaGetDeviceProperties");
  return "GPU " + std::to_string(d) + " " + p.name;
}

void* alloc(std::size_t bytes) {
  void* p = nullptr;
  ok(cudaMalloc(&p, bytes > 0 ? bytes : 1), "cudaMalloc");
  return p;
}
void free(void* p) noexcept { (void)cudaFree(p); }
void memset(void* p, int byte, std::size_t bytes) { ok(cudaMemset(p, byte, bytes), "cudaMemset"); }
void to_device(void* dst, const void* src, std::size_t bytes) {
  ok(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
  // From pageable memory cudaMemcpy may return before the data has landed;
  // the collective runs on another stream (and is read by other processes).
  ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}
void to_host(void* dst, const void* src, std::size_t bytes) {
  ok(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
}
void* stream() {
  if (g_stream == nullptr) ok(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking), "cudaStreamCreate");
  return g_stream;
}
void synchronize() { ok(cudaStreamSynchronize(static_cast<cudaStream_t>(stream())), "cudaStreamSynchronize"); }

#else
namespace {
[[noreturn]] void none() { throw std::runtime_error("chorus-bench was built without CUDA"); }
}  // namespace
std::string unavailable_reason() { return "chorus-bench was built without CUDA"; }
std::string bind(int) { none(); }
void* alloc(std::size_t) { none(); }
void free(void*) noexcept {}
void memset(void*, int, std::size_t) { none(); }
void to_device(void*, const void*, std::size_t) { none(); }
void to_host(void*, const void*, std::size_t) { none(); }
void* stream() { none(); }
void synchronize() { none(); }
#endif

}  // namespace chorus::bench::device
