// allgatherv with every rank's count equal to the allgather's block: the
// same data as allgather, through the call that takes a count per rank
// (which always runs the ring), so the two rows side by side show what the
// counts cost against the selector's allgather.
#include "bench_util.hpp"

#include <vector>

namespace chorus::bench {
namespace {

CollCounts counts(std::size_t count, int nranks) {
  const std::size_t n = static_cast<std::size_t>(nranks);
  const std::size_t block = count / n;
  return {block, block * n, block, block, 0};
}

double bus_factor(int n) { return static_cast<double>(n - 1) / n; }

void run(Communicator& comm, const void* send, void* recv, std::size_t count, DataType dtype,
         ReduceOp /*op*/, int /*root*/, const CallOptions& options) {
  static thread_local std::vector<std::size_t> per_rank;
  per_rank.assign(static_cast<std::size_t>(comm.size()), count);
  comm.allgatherv(send, recv, per_rank, dtype, options);
}

double send_value(const CheckContext& c, std::size_t i) { return plain_value(c.rank, i); }

double expected(const CheckContext& c, std::size_t i) {
  return plain_value(static_cast<int>(i / c.count), i % c.count);
}

}  // namespace

const Collective& allgatherv_collective() {
  static const Collective coll{"allgatherv", false, false, true, counts, bus_factor,
                               run, send_value, expected};
  return coll;
}

}  // namespace chorus::bench
