#pragma once

// Device reduction kernels (kernels.cu): one templated kernel per (dtype, op),
// 16-byte vector loads, grid-stride loops. Host-callable; the only CUDA type
// here is the stream.

#include <chorus/types.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>

namespace chorus::cuda {

// Most inputs one launch reduces (ranks of one host on the IPC path).
inline constexpr int kMaxInputs = 16;

struct Inputs {
  const void* p[kMaxInputs];
};
struct Outputs {
  void* p[kMaxInputs];
};

// out[i] = in[0][i] op in[1][i] op ... op in[n-1][i], combined in that order
// (so every rank computing the same element gets the same bits). Float16 and
// BFloat16 accumulate in float and round once. Avg is the sum divided by
// `divisor` (integer division for integer types). `out` may equal an input.
// Returns the launch's error (cudaSuccess when count == 0).
cudaError_t reduce(const Inputs& in, int n, void* out, std::size_t count, DataType t, ReduceOp op,
                   int divisor, cudaStream_t stream);

// The same, writing the result to `nout` outputs (1..kMaxInputs): one pass
// over the inputs serves every rank of a GPU. An output may equal an input.
cudaError_t reduce_to(const Inputs& in, int n, const Outputs& out, int nout, std::size_t count,
                      DataType t, ReduceOp op, int divisor, cudaStream_t stream);

}  // namespace chorus::cuda
