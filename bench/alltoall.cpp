// alltoall: block j of rank i lands in block i of rank j.
#include "bench_util.hpp"

namespace chorus::bench {
namespace {

// nccl-tests: the size is the per-rank total, rounded down to n equal blocks.
CollCounts counts(std::size_t count, int nranks) {
  const std::size_t n = static_cast<std::size_t>(nranks);
  const std::size_t block = count / n;
  return {block * n, block * n, block, 0, 0};
}

// Each rank sends n-1 of its n blocks away.
double bus_factor(int n) { return static_cast<double>(n - 1) / n; }

void run(Communicator& comm, const void* send, void* recv, std::size_t count, DataType dtype,
         ReduceOp /*op*/, int /*root*/, const CallOptions& options) {
  comm.alltoall(send, recv, count, dtype, options);
}

// Element e of block j on rank i is plain_value(i, j*count + e): distinct per
// (source, destination), so a misrouted block is caught.
double send_value(const CheckContext& c, std::size_t i) { return plain_value(c.rank, i); }

double expected(const CheckContext& c, std::size_t i) {
  const int source = static_cast<int>(i / c.count);
  return plain_value(source, static_cast<std::size_t>(c.rank) * c.count + i % c.count);
}

}  // namespace

// No in-place form: the API requires non-overlapping buffers.
const Collective& alltoall_collective() {
  static const Collective coll{"alltoall", false, false, false, counts, bus_factor,
                               run, send_value, expected};
  return coll;
}

}  // namespace chorus::bench
