// hello_allreduce: the smallest Chorus program. Run it with
//   chorusrun -n 4 -- hello_allreduce
// Every rank contributes rank+1; every element of the sum is then N(N+1)/2.

#include <chorus/chorus.hpp>

#include <cstdio>
#include <exception>
#include <vector>

int main() {
  try {
    chorus::Communicator comm = chorus::Communicator::from_env();
    const int rank = comm.rank();
    const int n = comm.size();

    std::vector<float> data(8, static_cast<float>(rank + 1));
    comm.allreduce(data.data(), data.data(), data.size(), chorus::DataType::Float32,
                   chorus::ReduceOp::Sum);

    // Small integers: the float sum is exact, so equality is the right test.
    const float expected = static_cast<float>(n * (n + 1) / 2);
    bool ok = true;
    for (float v : data) ok = ok && v == expected;
    std::printf("rank %d/%d: sum = %g (expected %g) %s\n", rank, n, static_cast<double>(data[0]),
                static_cast<double>(expected), ok ? "OK" : "WRONG");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hello_allreduce: %s\n", e.what());
    return 1;
  }
}
