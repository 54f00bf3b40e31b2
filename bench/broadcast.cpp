// broadcast: root's buffer is copied to every rank.
#include "bench_util.hpp"

namespace chorus::bench {
namespace {

CollCounts counts(std::size_t count, int /*nranks*/) { return {count, count, count, 0, 0}; }

// Every byte must leave the root once: nothing to scale.
double bus_factor(int /*n*/) { return 1.0; }

void run(Communicator& comm, const void* send, void* recv, std::size_t count, DataType dtype,
         ReduceOp /*op*/, int root, const CallOptions& options) {
  comm.broadcast(send, recv, count, dtype, root, options);
}

// Non-roots get their own values too: in place, a broadcast that never
// arrives then leaves data that differs from the root's.
double send_value(const CheckContext& c, std::size_t i) { return plain_value(c.rank, i); }

double expected(const CheckContext& c, std::size_t i) { return plain_value(c.root, i); }

}  // namespace

const Collective& broadcast_collective() {
  static const Collective coll{"broadcast", false, true, true, counts, bus_factor,
                               run, send_value, expected};
  return coll;
}

}  // namespace chorus::bench
