// chorus-micro: Google Benchmark micro-benchmarks of the CPU reduction kernels.
//
//   combine/<dtype>/<op>/<bytes>   reduce::combine(dst, src), every dtype, sum and max
//   memcpy/<bytes>                 std::memcpy(dst, src), the copy bandwidth
//   add_f32/<bytes>                for (i) a[i] += b[i] over float, compiled here:
//                                  what the compiler makes of the obvious loop
//   alias/<what>/<d>               64 KiB memcpy(dst, src), reduce::copy (what
//                                  the library copies with), copy_streaming
//                                  and float32 sum
//                                  combine3(dst, a, b), in cache, with dst d
//                                  bytes past the sources modulo 4 KiB: the
//                                  4K-aliasing stall of a destination a few
//                                  bytes past its source (docs/benchmarks.md)
//
// over 4 KiB .. 256 MiB buffers (x4 steps). Commands and results: docs/benchmarks.md.
//
// Throughput counts ONE operand: an iteration over B-byte buffers processed B
// bytes (SetBytesProcessed, which Google Benchmark prints as bytes_per_second in
// binary units), although combine and a += b read 2B and write B, and memcpy
// reads B and writes B. The GB/s counter is the same quantity in 1e9 bytes per
// second, the unit of chorus-bench's algbw, so the table reads directly.
//
// The reduce kernels are chosen once per process: run again with
// CHORUS_CPU_FEATURES=baseline to measure the portable (SSE2) copy; the
// context printed at the top shows the variable and the CPU's features.

#include "reduce/reduce.hpp"

#include <chorus/types.hpp>

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace {

using chorus::DataType;
using chorus::ReduceOp;
using Byte = unsigned char;

constexpr std::size_t kMinBytes = 4 << 10;
constexpr std::size_t kMaxBytes = std::size_t{256} << 20;

constexpr DataType kTypes[] = {
    DataType::Int8,   DataType::UInt8,   DataType::Int32,    DataType::UInt32,  DataType::Int64,
    DataType::UInt64, DataType::Float16, DataType::BFloat16, DataType::Float32, DataType::Float64,
};

// ---------------------------------------------------------------------------
// Buffers: one pair per size, shared by every benchmark of that size. The
// benchmarks are registered size by size, so each size is allocated once, and
// the pages are touched here, before any timing (a first touch costs ~10 us
// per 4 KiB page on the VMs we measure on: 0.65 s for a 256 MiB buffer).

struct FreeDeleter {
  void operator()(Byte* p) const noexcept { std::free(p); }
};
using Buffer = std::unique_ptr<Byte[], FreeDeleter>;

struct Buffers {
  std::size_t bytes = 0;
  Buffer dst;
  Buffer src;
};

Buffer allocate(std::size_t bytes) {
  constexpr std::size_t kAlign = 4096;
  auto* p = static_cast<Byte*>(std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign));
  if (p == nullptr) std::abort();
  std::memset(p, 0, bytes);  // first touch, outside the timed loop
  return Buffer(p);
}

Buffers& buffers(std::size_t bytes) {
  static Buffers b;
  if (b.bytes != bytes) {
    b = Buffers{};  // free the previous size first: 2 x 256 MiB is enough
    b.dst = allocate(bytes);
    b.src = allocate(bytes);
    b.bytes = bytes;
  }
  return b;
}

// Both operands = 1 in the element type. Sums of ones never reach a subnormal,
// an infinity or a NaN (floats stop growing where 1 is below half an ulp), so
// no assist or special case slows any iteration down.
template <class T>
void fill(Byte* p, std::size_t bytes, T value) {
  for (std::size_t i = 0; i < bytes / sizeof(T); ++i)
    std::memcpy(p + i * sizeof(T), &value, sizeof(T));
}

void fill_ones(Byte* p, std::size_t bytes, DataType dtype) {
  switch (dtype) {
    case DataType::Int8: return fill<std::int8_t>(p, bytes, 1);
    case DataType::UInt8: return fill<std::uint8_t>(p, bytes, 1);
    case DataType::Int32: return fill<std::int32_t>(p, bytes, 1);
    case DataType::UInt32: return fill<std::uint32_t>(p, bytes, 1);
    case DataType::Int64: return fill<std::int64_t>(p, bytes, 1);
    case DataType::UInt64: return fill<std::uint64_t>(p, bytes, 1);
    case DataType::Float16: return fill<std::uint16_t>(p, bytes, 0x3c00);   // 1.0
    case DataType::BFloat16: return fill<std::uint16_t>(p, bytes, 0x3f80);  // 1.0
    case DataType::Float32: return fill<float>(p, bytes, 1.0f);
    case DataType::Float64: return fill<double>(p, bytes, 1.0);
  }
}

// One operand's bytes per iteration (see the top of the file).
void set_throughput(benchmark::State& state, std::size_t bytes) {
  const auto processed = static_cast<double>(state.iterations()) * static_cast<double>(bytes);
  state.SetBytesProcessed(static_cast<std::int64_t>(processed));
  state.counters["GB/s"] = benchmark::Counter(processed / 1e9, benchmark::Counter::kIsRate);
}

// ---------------------------------------------------------------------------
// The benchmarks.

void bm_combine(benchmark::State& state, DataType dtype, ReduceOp op) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  Buffers& b = buffers(bytes);
  fill_ones(b.dst.get(), bytes, dtype);
  fill_ones(b.src.get(), bytes, dtype);
  const std::size_t count = bytes / chorus::size_of(dtype);
  for (auto _ : state) {
    chorus::reduce::combine(b.dst.get(), b.src.get(), count, dtype, op);
    benchmark::ClobberMemory();
  }
  set_throughput(state, bytes);
}

void bm_memcpy(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  Buffers& b = buffers(bytes);
  Byte* dst = b.dst.get();
  const Byte* src = b.src.get();
  for (auto _ : state) {
    benchmark::DoNotOptimize(dst);
    std::memcpy(dst, src, bytes);
    benchmark::ClobberMemory();
  }
  set_throughput(state, bytes);
}

// The reference the issue measures combine against: the obvious loop, left to
// the compiler with the project's flags (-O3, baseline x86-64, so SSE2; no
// __restrict, so it adds its own overlap check). noinline keeps it one
// function in a profile.
[[gnu::noinline]] void add_f32(float* a, const float* b, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) a[i] += b[i];
}

void bm_add_f32(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  Buffers& b = buffers(bytes);
  fill_ones(b.dst.get(), bytes, DataType::Float32);
  fill_ones(b.src.get(), bytes, DataType::Float32);
  auto* a = reinterpret_cast<float*>(b.dst.get());
  const auto* s = reinterpret_cast<const float*>(b.src.get());
  for (auto _ : state) {
    benchmark::DoNotOptimize(a);
    benchmark::DoNotOptimize(s);
    add_f32(a, s, bytes / sizeof(float));
    benchmark::ClobberMemory();
  }
  set_throughput(state, bytes);
}

// 64 KiB sources at the start of a page, the destination `d` bytes into one.
enum class Alias { Memcpy, Copy, Streaming, Combine3 };

void bm_alias(benchmark::State& state, Alias what) {
  constexpr std::size_t kBytes = 64 << 10;
  const auto d = static_cast<std::size_t>(state.range(0));
  static Buffer a = allocate(kBytes + 4096), b = allocate(kBytes + 4096),
                out = allocate(kBytes + 4096);
  fill_ones(a.get(), kBytes, DataType::Float32);
  fill_ones(b.get(), kBytes, DataType::Float32);
  Byte* dst = out.get() + d;
  for (auto _ : state) {
    benchmark::DoNotOptimize(dst);
    if (what == Alias::Memcpy)
      std::memcpy(dst, a.get(), kBytes);
    else if (what == Alias::Copy)
      chorus::reduce::copy(dst, a.get(), kBytes);
    else if (what == Alias::Streaming)
      chorus::reduce::copy_streaming(dst, a.get(), kBytes);
    else
      chorus::reduce::combine3(dst, a.get() + d, b.get(), kBytes / 4, DataType::Float32, ReduceOp::Sum);
    benchmark::ClobberMemory();
  }
  set_throughput(state, kBytes);
}

// For the context block at the top of the output: what the library's kernel
// choice depends on (CHORUS_DEBUG=info makes the library log the choice).
bool cpu_has_avx2_f16c() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __builtin_cpu_supports("avx2") && __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 &&
         (ecx & bit_F16C) != 0;
#else
  return false;
#endif
}

void register_all() {
  // Size-major, so that each size's buffers are allocated once (see buffers()).
  for (std::size_t bytes = kMinBytes; bytes <= kMaxBytes; bytes *= 4) {
    const auto arg = static_cast<std::int64_t>(bytes);
    for (DataType t : kTypes) {
      for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Max}) {
        const std::string name = "combine/" + std::string(chorus::to_string(t)) + "/" +
                                 std::string(chorus::to_string(op));
        benchmark::RegisterBenchmark(name.c_str(), bm_combine, t, op)->Arg(arg);
      }
    }
    benchmark::RegisterBenchmark("memcpy", bm_memcpy)->Arg(arg);
    benchmark::RegisterBenchmark("add_f32", bm_add_f32)->Arg(arg);
  }
  for (auto [what, name] :
       {std::pair{Alias::Memcpy, "alias/memcpy"}, std::pair{Alias::Copy, "alias/reduce_copy"},
        std::pair{Alias::Streaming, "alias/copy_streaming"},
        std::pair{Alias::Combine3, "alias/combine3_f32_sum"}})
    for (std::int64_t d : {0, 1, 4, 15, 16, 17, 64, 1024, 4092})
      benchmark::RegisterBenchmark(name, bm_alias, what)->Arg(d);
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const char* forced = std::getenv("CHORUS_CPU_FEATURES");
  benchmark::AddCustomContext("CHORUS_CPU_FEATURES", forced != nullptr ? forced : "(unset: auto)");
  benchmark::AddCustomContext("cpu avx2+f16c", cpu_has_avx2_f16c() ? "yes" : "no");
  benchmark::AddCustomContext("throughput", "bytes of one operand per iteration; GB/s = 1e9 B/s");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
