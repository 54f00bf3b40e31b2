#pragma once

// Shared pieces of chorus-bench: the description of a benchmarked collective,
// element encoding for every DataType (fp16/bf16 included, without reaching
// into the library's internals), and the input patterns whose expected results
// are exact in every type, so that verification compares for equality.

#include "bench_common.hpp"

#include <chorus/communicator.hpp>
#include <chorus/types.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace chorus::bench {

// "# Using ranks" and one line per rank (pid, host), like nccl-tests' device
// block: a slow link or rank is usually explained by where it runs. A
// collective call (an allgather on `comm`); every rank gets the text.
std::string rank_table(Communicator& comm, const CallOptions& options);

// Element counts of one call, as nccl-tests' getCollByteCount defines them.
// In-place runs use a single buffer: the send pointer is
// buf + send_inplace_offset * rank and the receive pointer
// buf + recv_inplace_offset * rank (in elements).
struct CollCounts {
  std::size_t send_count = 0;   // elements in the send buffer
  std::size_t recv_count = 0;   // elements in the receive buffer
  std::size_t param_count = 0;  // the `count` argument of the call (the table's count column)
  std::size_t send_inplace_offset = 0;
  std::size_t recv_inplace_offset = 0;
};

// What a checked iteration needs to know to produce inputs and expectations.
struct CheckContext {
  DataType dtype = DataType::Float32;
  ReduceOp op = ReduceOp::Sum;
  int rank = 0;
  int nranks = 1;
  int root = 0;
  std::size_t count = 0;  // CollCounts::param_count
};

// One benchmarked collective. Each lives in its own file (allreduce.cpp, ...).
struct Collective {
  const char* name;
  bool reduces;   // takes a ReduceOp (the redop column shows it; "none" otherwise)
  bool rooted;    // takes a root (the root column shows it; -1 otherwise)
  bool in_place;  // has an in-place form (alltoall does not: buffers must not overlap)
  CollCounts (*counts)(std::size_t count, int nranks);
  // busbw = algbw * bus_factor: the fraction of the data that crosses each
  // rank's link in an optimal algorithm, as nccl-tests' PERFORMANCE.md defines.
  double (*bus_factor)(int nranks);
  void (*run)(Communicator& comm, const void* send, void* recv, std::size_t count, DataType dtype,
              ReduceOp op, int root, const CallOptions& options);
  // Value of element `index` of this rank's send buffer in a checked iteration.
  double (*send_value)(const CheckContext& ctx, std::size_t index);
  // Expected value of element `index` of this rank's receive buffer afterwards.
  double (*expected)(const CheckContext& ctx, std::size_t index);
};

const Collective& allreduce_collective();
const Collective& broadcast_collective();
const Collective& allgather_collective();
const Collective& reduce_scatter_collective();
const Collective& alltoall_collective();
const Collective& alltoallv_collective();
const Collective& allgatherv_collective();
const Collective& reduce_scatterv_collective();

// The collective called `name`, or nullptr.
const Collective* find_collective(const std::string& name);
// Names of all collectives, comma-separated (for help and error messages).
std::string collective_names();

// --- element encoding -------------------------------------------------------

std::uint16_t float_to_half(float f) noexcept;      // round to nearest even
float half_to_float(std::uint16_t h) noexcept;
std::uint16_t float_to_bfloat16(float f) noexcept;  // round to nearest even
float bfloat16_to_float(std::uint16_t b) noexcept;

// Writes `v` (exactly representable in `t` by construction) as element i.
void store_element(void* buf, std::size_t i, DataType t, double v) noexcept;
// Reads element i as a double (exact for every type and value used here).
double load_element(const void* buf, std::size_t i, DataType t) noexcept;

// --- input patterns ---------------------------------------------------------
// Every pattern uses small integers, chosen per (op, dtype, world size) so that
// every partial result a reduction algorithm can form, in any order, is exact:
// sums stay <= 127 (int8), 255 (uint8), 256 (bfloat16), 2048 (half); products
// are powers of two <= 8; averages are sums divisible by the world size. The
// expectation is then a closed form, independent of the library's arithmetic.

// Element `index` of `rank`'s input to a reduction.
double reduce_input(ReduceOp op, DataType t, int rank, int nranks, std::size_t index) noexcept;
// The reduction of reduce_input(op, t, r, nranks, index) over all ranks r.
double reduce_expected(ReduceOp op, DataType t, int nranks, std::size_t index) noexcept;
// Element `index` of `rank`'s data for the non-reducing collectives (1..97).
double plain_value(int rank, std::size_t index) noexcept;

// The counts of the calls with a count per rank (allgatherv,
// reduce_scatterv) in their rows: the fixed-count call's block with every
// odd rank's one element short, so that the counts differ (equal ones would
// run as the fixed-count call, which has its own row).
inline std::size_t ragged_share(std::size_t block, int p) {
  return block - (p % 2 == 1 && block > 0 ? 1 : 0);
}
inline std::size_t ragged_total(std::size_t block, int nranks) {
  std::size_t total = 0;
  for (int p = 0; p < nranks; ++p) total += ragged_share(block, p);
  return total;
}
// Every rank's ragged_share(block, p), in rank order (the calls' counts; a
// buffer of the calling thread's, reused from call to call).
inline const std::vector<std::size_t>& ragged_counts(std::size_t block, int nranks) {
  static thread_local std::vector<std::size_t> counts;
  counts.resize(static_cast<std::size_t>(nranks));
  for (int p = 0; p < nranks; ++p) counts[static_cast<std::size_t>(p)] = ragged_share(block, p);
  return counts;
}

// Byte written over receive buffers before a checked call, so that a call that
// leaves its output untouched is caught. Decodes to a value no pattern yields.
inline constexpr unsigned char kPoisonByte = 0xA5;

// Fills [0, n) of `buf` with ctx's send pattern.
void fill_send(void* buf, std::size_t n, const Collective& coll, const CheckContext& ctx);
// Number of elements in [0, n) of `buf` that differ from coll.expected.
std::uint64_t count_wrong(const void* buf, std::size_t n, const Collective& coll,
                          const CheckContext& ctx);

}  // namespace chorus::bench
