#pragma once

// chorus-bench --device cuda: buffers in GPU memory (bench/device_memory.cpp,
// built with CUDA; without it every call throws std::runtime_error).

#include <cstddef>
#include <string>

namespace chorus::bench::device {

// Empty when this rank can use a GPU, else why not.
std::string unavailable_reason();
// Binds this rank to GPU (rank % visible GPUs); returns the GPU's name.
std::string bind(int rank);
void* alloc(std::size_t bytes);
void free(void* p) noexcept;
void memset(void* p, int byte, std::size_t bytes);
void to_device(void* dst, const void* src, std::size_t bytes);
void to_host(void* dst, const void* src, std::size_t bytes);
// The benchmark's stream (an opaque cudaStream_t), created on first use.
void* stream();
void synchronize();

}  // namespace chorus::bench::device
