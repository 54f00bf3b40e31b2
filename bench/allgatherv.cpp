// allgatherv: the allgather's blocks with every odd rank's one element
// short, so that the counts differ (equal counts would make it an
// allgather, which has its own row). Out of place only: its in-place
// offsets are not a multiple of the rank.
#include "bench_util.hpp"

namespace chorus::bench {
namespace {

CollCounts counts(std::size_t count, int nranks) {
  const std::size_t n = static_cast<std::size_t>(nranks);
  const std::size_t block = count / n;
  const std::size_t total = ragged_total(block, nranks);
  return {block, total, block, 0, 0};
}

double bus_factor(int n) { return static_cast<double>(n - 1) / n; }

void run(Communicator& comm, const void* send, void* recv, std::size_t count, DataType dtype,
         ReduceOp /*op*/, int /*root*/, const CallOptions& options) {
  comm.allgatherv(send, recv, ragged_counts(count, comm.size()), dtype, options);
}

double send_value(const CheckContext& c, std::size_t i) { return plain_value(c.rank, i); }

// Element i of the result: element k of rank p's share, p found by walking
// the shares (a few ranks).
double expected(const CheckContext& c, std::size_t i) {
  int p = 0;
  while (i >= ragged_share(c.count, p)) i -= ragged_share(c.count, p++);
  return plain_value(p, i);
}

}  // namespace

const Collective& allgatherv_collective() {
  static const Collective coll{"allgatherv", false, false, false, counts, bus_factor,
                               run, send_value, expected};
  return coll;
}

}  // namespace chorus::bench
