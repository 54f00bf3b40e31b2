// Recursive-doubling allreduce for small messages on power-of-two groups:
// log2(n) rounds, in each of which partners (rank ^ mask) swap their partial
// results and combine them. One latency per round instead of the ring's
// 2(n-1) steps; each rank sends the whole buffer every round, so it only
// pays for small messages.

#include "algorithms/algorithms.hpp"

#include "core/enforce.hpp"
#include "reduce/reduce.hpp"

#include <cstring>

namespace chorus::algo {

bool recursive_doubling_fits(int size) { return size > 1 && (size & (size - 1)) == 0; }

void recursive_doubling_allreduce(Context& c, const void* send, void* recv, std::size_t count,
                                  DataType dtype, ReduceOp op) {
  const std::size_t bytes = count * size_of(dtype);
  const int n = c.size;
  if (n == 1 || bytes == 0) {
    if (send != recv && bytes > 0) std::memcpy(recv, send, bytes);
    if (op == ReduceOp::Avg) reduce::finalize_avg(recv, count, dtype, n);
    return;
  }
  if (!recursive_doubling_fits(n))
    throw Error(ErrorCode::InvalidArgument,
                "recursive_doubling needs a power-of-two world size, not " + std::to_string(n));
  int rounds = 0;
  for (int m = 1; m < n; m <<= 1) ++rounds;
  // A round reads the buffer it sends from and writes another one: rounds
  // alternate between two scratch halves and the last one writes recv.
  if (c.scratch.size() < 3 * bytes) c.scratch.resize(3 * bytes);
  char* tmp[2] = {c.scratch.data(), c.scratch.data() + bytes};
  const char* src = static_cast<const char*>(send);
  if (send == recv) {
    std::memcpy(c.scratch.data() + 2 * bytes, send, bytes);
    src = c.scratch.data() + 2 * bytes;
  }
  int round = 0;
  for (int mask = 1; mask < n; mask <<= 1, ++round) {
    const int partner = c.rank ^ mask;
    char* dst = round == rounds - 1 ? static_cast<char*>(recv) : tmp[round & 1];
    // Operands in rank order (lower group's partial first) on both sides, so
    // that partners compute bitwise identical results.
    const bool incoming_first = partner < c.rank;
    transport::Request reqs[2] = {
        c.t.irecv(partner, c.call, dst, bytes,
                  transport::Combine::reduce_from(src, dtype, op, incoming_first)),
        c.t.isend(partner, c.call, src, bytes)};
    c.t.wait(reqs, c.deadline);
    src = dst;
  }
  if (op == ReduceOp::Avg) reduce::finalize_avg(recv, count, dtype, n);
}

}  // namespace chorus::algo
