// reduce_scatter: the reduction of n blocks; rank r keeps block r.
#include "bench_util.hpp"

namespace chorus::bench {
namespace {

// nccl-tests: the size is the per-rank input, rounded down to n equal blocks.
CollCounts counts(std::size_t count, int nranks) {
  const std::size_t n = static_cast<std::size_t>(nranks);
  const std::size_t block = count / n;
  return {block * n, block, block, 0, block};
}

// Each rank sends the n-1 blocks it does not keep.
double bus_factor(int n) { return static_cast<double>(n - 1) / n; }

void run(Communicator& comm, const void* send, void* recv, std::size_t count, DataType dtype,
         ReduceOp op, int /*root*/, const CallOptions& options) {
  comm.reduce_scatter(send, recv, count, dtype, op, options);
}

double send_value(const CheckContext& c, std::size_t i) {
  return reduce_input(c.op, c.dtype, c.rank, c.nranks, i);
}

double expected(const CheckContext& c, std::size_t i) {
  return reduce_expected(c.op, c.dtype, c.nranks, static_cast<std::size_t>(c.rank) * c.count + i);
}

}  // namespace

const Collective& reduce_scatter_collective() {
  static const Collective coll{"reduce_scatter", true, false, true, counts, bus_factor,
                               run, send_value, expected};
  return coll;
}

}  // namespace chorus::bench
