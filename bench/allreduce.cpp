// allreduce: every rank ends with the reduction of all ranks' buffers.
#include "bench_util.hpp"

namespace chorus::bench {
namespace {

CollCounts counts(std::size_t count, int /*nranks*/) { return {count, count, count, 0, 0}; }

// Each rank sends and receives (n-1)/n of the data twice (reduce-scatter, then allgather).
double bus_factor(int n) { return 2.0 * (n - 1) / n; }

void run(Communicator& comm, const void* send, void* recv, std::size_t count, DataType dtype,
         ReduceOp op, int /*root*/, const CallOptions& options) {
  comm.allreduce(send, recv, count, dtype, op, options);
}

double send_value(const CheckContext& c, std::size_t i) {
  return reduce_input(c.op, c.dtype, c.rank, c.nranks, i);
}

double expected(const CheckContext& c, std::size_t i) {
  return reduce_expected(c.op, c.dtype, c.nranks, i);
}

}  // namespace

const Collective& allreduce_collective() {
  static const Collective coll{"allreduce", true, false, true, counts, bus_factor,
                               run, send_value, expected};
  return coll;
}

}  // namespace chorus::bench
