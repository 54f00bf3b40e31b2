// alltoallv with every pair's count equal to the alltoall's block: the same
// data, sizes, bus factor and checks as alltoall (its descriptor, reused),
// through the call that takes a count per pair, so the two rows side by
// side show what the counts cost.
#include "bench_util.hpp"

#include <vector>

namespace chorus::bench {
namespace {

void run(Communicator& comm, const void* send, void* recv, std::size_t count, DataType dtype,
         ReduceOp /*op*/, int /*root*/, const CallOptions& options) {
  static thread_local std::vector<std::size_t> per_pair;
  per_pair.assign(static_cast<std::size_t>(comm.size()), count);
  comm.alltoallv(send, per_pair, recv, per_pair, dtype, options);
}

}  // namespace

const Collective& alltoallv_collective() {
  static const Collective coll = [] {
    Collective c = alltoall_collective();
    c.name = "alltoallv";
    c.run = run;
    return c;
  }();
  return coll;
}

}  // namespace chorus::bench
