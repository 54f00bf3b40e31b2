// mismatched_call: what happens when ranks disagree. Rank 1 passes a
// different count to allreduce than everyone else. NCCL or Gloo would
// return garbage or hang; Chorus fails on every rank with InvalidUsage,
// naming both calls. Run it with
//   chorusrun -n 4 -- mismatched_call
// Exits 0 when this rank saw InvalidUsage (the expected outcome), 1 otherwise.

#include <chorus/chorus.hpp>

#include <cstdio>
#include <vector>

int main() {
  chorus::Communicator comm = chorus::Communicator::from_env();
  const std::size_t count = comm.rank() == 1 ? 100 : 200;
  std::vector<float> data(count, 1.0f);
  try {
    comm.allreduce(data.data(), data.data(), count, chorus::DataType::Float32,
                   chorus::ReduceOp::Sum);
    std::printf("rank %d: allreduce returned normally: the mismatch was NOT detected\n", comm.rank());
    return 1;
  } catch (const chorus::Error& e) {
    std::printf("rank %d: %s\n", comm.rank(), e.what());
    return e.code() == chorus::ErrorCode::InvalidUsage ? 0 : 1;
  }
}
