// reduce_scatterv: the reduce_scatter's blocks with every odd rank's one
// element short, so that the counts differ (equal counts would make it a
// reduce_scatter, which has its own row). Out of place only: its in-place
// offsets are not a multiple of the rank.
#include "bench_util.hpp"

#include <cstring>

namespace chorus::bench {
namespace {

CollCounts counts(std::size_t count, int nranks) {
  const std::size_t n = static_cast<std::size_t>(nranks);
  const std::size_t block = count / n;
  const std::size_t total = ragged_total(block, nranks);
  return {total, block, block, 0, 0};
}

double bus_factor(int n) { return static_cast<double>(n - 1) / n; }

void run(Communicator& comm, const void* send, void* recv, std::size_t count, DataType dtype,
         ReduceOp op, int /*root*/, const CallOptions& options) {
  comm.reduce_scatterv(send, recv, ragged_counts(count, comm.size()), dtype, op, options);
}

double send_value(const CheckContext& c, std::size_t i) {
  return reduce_input(c.op, c.dtype, c.rank, c.nranks, i);
}

// Element i of this rank's block of the reduction; past a short block, the
// receive buffer's poison, which the call must leave alone.
double expected(const CheckContext& c, std::size_t i) {
  std::size_t first = 0;
  for (int p = 0; p < c.rank; ++p) first += ragged_share(c.count, p);
  if (i < ragged_share(c.count, c.rank)) return reduce_expected(c.op, c.dtype, c.nranks, first + i);
  unsigned char poison[8];
  std::memset(poison, kPoisonByte, sizeof poison);
  return load_element(poison, 0, c.dtype);
}

}  // namespace

const Collective& reduce_scatterv_collective() {
  static const Collective coll{"reduce_scatterv", true, false, false, counts, bus_factor,
                               run, send_value, expected};
  return coll;
}

}  // namespace chorus::bench
