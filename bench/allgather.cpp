// allgather: every rank receives every rank's block, in rank order.
#include "bench_util.hpp"

namespace chorus::bench {
namespace {

// nccl-tests: the size is the gathered total, rounded down to n equal blocks.
CollCounts counts(std::size_t count, int nranks) {
  const std::size_t n = static_cast<std::size_t>(nranks);
  const std::size_t block = count / n;
  return {block, block * n, block, block, 0};
}

// Each rank receives the n-1 blocks it does not have.
double bus_factor(int n) { return static_cast<double>(n - 1) / n; }

void run(Communicator& comm, const void* send, void* recv, std::size_t count, DataType dtype,
         ReduceOp /*op*/, int /*root*/, const CallOptions& options) {
  comm.allgather(send, recv, count, dtype, options);
}

double send_value(const CheckContext& c, std::size_t i) { return plain_value(c.rank, i); }

double expected(const CheckContext& c, std::size_t i) {
  return plain_value(static_cast<int>(i / c.count), i % c.count);
}

}  // namespace

const Collective& allgather_collective() {
  static const Collective coll{"allgather", false, false, true, counts, bus_factor,
                               run, send_value, expected};
  return coll;
}

}  // namespace chorus::bench
