// alltoallv with every pair's count equal to the alltoall's block: the same
// data as alltoall, through the call that takes a count per pair, so the
// two rows side by side show what the counts cost.
#include "bench_util.hpp"

#include <vector>

namespace chorus::bench {
namespace {

CollCounts counts(std::size_t count, int nranks) {
  const std::size_t n = static_cast<std::size_t>(nranks);
  const std::size_t block = count / n;
  return {block * n, block * n, block, 0, 0};
}

double bus_factor(int n) { return static_cast<double>(n - 1) / n; }

void run(Communicator& comm, const void* send, void* recv, std::size_t count, DataType dtype,
         ReduceOp /*op*/, int /*root*/, const CallOptions& options) {
  // Built once per size, outside the timed calls' allocations.
  static thread_local std::vector<std::size_t> per_pair;
  per_pair.assign(static_cast<std::size_t>(comm.size()), count);
  comm.alltoallv(send, per_pair, recv, per_pair, dtype, options);
}

// As alltoall: element e of block j on rank i is plain_value(i, j*count + e).
double send_value(const CheckContext& c, std::size_t i) { return plain_value(c.rank, i); }

double expected(const CheckContext& c, std::size_t i) {
  const int source = static_cast<int>(i / c.count);
  return plain_value(source, static_cast<std::size_t>(c.rank) * c.count + i % c.count);
}

}  // namespace

const Collective& alltoallv_collective() {
  static const Collective coll{"alltoallv", false, false, false, counts, bus_factor,
                               run, send_value, expected};
  return coll;
}

}  // namespace chorus::bench
