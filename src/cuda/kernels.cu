// Device reduction kernels. Each thread moves 16 bytes per input per step
// (uint4 loads, coalesced across the warp) when every pointer is 16-byte
// aligned; otherwise, and for the tail, one element per step. Grid-stride
// loops, so any count fits a bounded grid.

#include "cuda/kernels.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

namespace chorus::cuda {
namespace {

// Accumulator type and conversions per element type.
template <typename T> struct Acc { using type = T; };
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type load_acc(T v) { return v; }
template <> __device__ __forceinline__ float load_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float load_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T store_acc(typename Acc<T>::type v) { return v; }
template <> __device__ __forceinline__ __half store_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct OpSum { template <typename A> __device__ static A apply(A a, A b) { return a + b; } };
struct OpProd { template <typename A> __device__ static A apply(A a, A b) { return a * b; } };
struct OpMin { template <typename A> __device__ static A apply(A a, A b) { return b < a ? b : a; } };
struct OpMax { template <typename A> __device__ static A apply(A a, A b) { return a < b ? b : a; } };

template <typename T, typename Op>
__device__ __forceinline__ T combine_one(const Inputs& in, int n, std::size_t i, int divisor) {
  using A = typename Acc<T>::type;
  A acc = load_acc(static_cast<const T*>(in.p[0])[i]);
#pragma unroll
  for (int k = 1; k < kMaxInputs; ++k) {  // constant indices keep `in` out of local memory
    if (k >= n) break;
    acc = Op::apply(acc, load_acc(static_cast<const T*>(in.p[k])[i]));
  }
  if (divisor > 1) acc = acc / static_cast<A>(divisor);
  return store_acc<T>(acc);
}

// 256 threads with a register cap to match: launches never fail for lack of
// registers, even under compute-sanitizer's instrumentation.
constexpr int kThreads = 256;

template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads) reduce_vec(Inputs in, int n, Outputs out, int nout,
                                                       std::size_t nvec, int divisor) {
  using A = typename Acc<T>::type;
  constexpr int V = 16 / sizeof(T);
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t v = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec;
       v += stride) {
    uint4 raw[kMaxInputs];
#pragma unroll
    for (int k = 0; k < kMaxInputs; ++k)
      if (k < n) raw[k] = __ldg(static_cast<const uint4*>(in.p[k]) + v);
    A acc[V];
    const T* first = reinterpret_cast<const T*>(&raw[0]);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = load_acc(first[j]);
#pragma unroll
    for (int k = 1; k < kMaxInputs; ++k) {
      if (k >= n) break;
      const T* e = reinterpret_cast<const T*>(&raw[k]);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = Op::apply(acc[j], load_acc(e[j]));
    }
    uint4 res;
    T* r = reinterpret_cast<T*>(&res);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (divisor > 1) acc[j] = acc[j] / static_cast<A>(divisor);
      r[j] = store_acc<T>(acc[j]);
    }
#pragma unroll
    for (int k = 0; k < kMaxInputs; ++k) {
      if (k >= nout) break;
      static_cast<uint4*>(out.p[k])[v] = res;
    }
  }
}

template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads) reduce_scalar(Inputs in, int n, Outputs out, int nout,
                                                          std::size_t begin, std::size_t count,
                                                          int divisor) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = begin + static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += stride) {
    const T v = combine_one<T, Op>(in, n, i, divisor);
#pragma unroll
    for (int k = 0; k < kMaxInputs; ++k) {
      if (k >= nout) break;
      static_cast<T*>(out.p[k])[i] = v;
    }
  }
}


unsigned grid_for(std::size_t items) {
  // Enough blocks to fill an H100 several times over; the loops stride past it.
  const std::size_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<std::size_t>(blocks, 1, 132 * 16));
}

template <typename T, typename Op>
cudaError_t launch(const Inputs& in, int n, const Outputs& out, int nout, std::size_t count,
                   int divisor, cudaStream_t s) {
  constexpr std::size_t V = 16 / sizeof(T);
  std::uintptr_t bits = 0;
  for (int k = 0; k < nout; ++k) bits |= reinterpret_cast<std::uintptr_t>(out.p[k]);
  for (int k = 0; k < n; ++k) bits |= reinterpret_cast<std::uintptr_t>(in.p[k]);
  std::size_t done = 0;
  if ((bits & 15) == 0 && count >= V) {
    const std::size_t nvec = count / V;
    reduce_vec<T, Op><<<grid_for(nvec), kThreads, 0, s>>>(in, n, out, nout, nvec, divisor);
    done = nvec * V;
  }
  if (done < count)
    reduce_scalar<T, Op><<<grid_for(count - done), kThreads, 0, s>>>(in, n, out, nout, done, count,
                                                                     divisor);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_op(const Inputs& in, int n, const Outputs& out, int nout, std::size_t count,
                      ReduceOp op, int divisor, cudaStream_t s) {
  switch (op) {
    case ReduceOp::Sum: return launch<T, OpSum>(in, n, out, nout, count, 1, s);
    case ReduceOp::Avg: return launch<T, OpSum>(in, n, out, nout, count, divisor, s);
    case ReduceOp::Prod: return launch<T, OpProd>(in, n, out, nout, count, 1, s);
    case ReduceOp::Min: return launch<T, OpMin>(in, n, out, nout, count, 1, s);
    case ReduceOp::Max: return launch<T, OpMax>(in, n, out, nout, count, 1, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t reduce(const Inputs& in, int n, void* out, std::size_t count, DataType t, ReduceOp op,
                   int divisor, cudaStream_t s) {
  Outputs o{};
  o.p[0] = out;
  return reduce_to(in, n, o, 1, count, t, op, divisor, s);
}

cudaError_t reduce_to(const Inputs& in, int n, const Outputs& out, int nout, std::size_t count,
                      DataType t, ReduceOp op, int divisor, cudaStream_t s) {
  if (count == 0) return cudaSuccess;
  if (n < 1 || n > kMaxInputs || nout < 1 || nout > kMaxInputs) return cudaErrorInvalidValue;
  switch (t) {
    case DataType::Int8: return launch_op<std::int8_t>(in, n, out, nout, count, op, divisor, s);
    case DataType::UInt8: return launch_op<std::uint8_t>(in, n, out, nout, count, op, divisor, s);
    case DataType::Int32: return launch_op<std::int32_t>(in, n, out, nout, count, op, divisor, s);
    case DataType::UInt32: return launch_op<std::uint32_t>(in, n, out, nout, count, op, divisor, s);
    case DataType::Int64: return launch_op<long long>(in, n, out, nout, count, op, divisor, s);
    case DataType::UInt64: return launch_op<unsigned long long>(in, n, out, nout, count, op, divisor, s);
    case DataType::Float16: return launch_op<__half>(in, n, out, nout, count, op, divisor, s);
    case DataType::BFloat16: return launch_op<__nv_bfloat16>(in, n, out, nout, count, op, divisor, s);
    case DataType::Float32: return launch_op<float>(in, n, out, nout, count, op, divisor, s);
    case DataType::Float64: return launch_op<double>(in, n, out, nout, count, op, divisor, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace chorus::cuda
