#pragma once

// Collective algorithms over the transport interface. Each function runs one
// call on one rank; every rank runs the same function with the same
// arguments (checked on the wire through `call`).

#include "transport.hpp"

#include <chorus/types.hpp>

#include <cstddef>
#include <vector>

namespace chorus::algo {

struct Context {
  transport::Transport& t;
  int rank;
  int size;
  transport::CallDesc call;
  transport::Deadline deadline;
  std::size_t chunk_bytes;       // pipeline granularity
  std::vector<char>& scratch;    // per-communicator, reused across calls
};

// Allreduce as ring reduce-scatter + ring allgather, chunked and pipelined:
// the send of chunk k in step s starts as soon as chunk k of step s-1 has
// been reduced, so sending and reducing overlap.
void ring_allreduce(Context& c, const void* send, void* recv, std::size_t count, DataType dtype,
                    ReduceOp op);
// Recursive doubling (power-of-two sizes): log2(n) rounds of pairwise swaps.
// Best for small messages; throws InvalidArgument for other sizes.
void recursive_doubling_allreduce(Context& c, const void* send, void* recv, std::size_t count,
                                  DataType dtype, ReduceOp op);
bool recursive_doubling_fits(int size);
// Largest message (bytes) for which allreduce picks recursive doubling when
// the world size allows it. The cost-model selector (issue 4) replaces this.
inline constexpr std::size_t kRecursiveDoublingMaxBytes = 16 << 10;

// Ring reduce-scatter: rank r ends with block r (count elements) of the sum.
void ring_reduce_scatter(Context& c, const void* send, void* recv, std::size_t count,
                         DataType dtype, ReduceOp op);
// Ring allgather: block r of every recv comes from rank r.
void ring_allgather(Context& c, const void* send, void* recv, std::size_t count, DataType dtype);
// Reduce to root: ring reduce-scatter, then every rank sends its block to root.
void ring_reduce(Context& c, const void* send, void* recv, std::size_t count, DataType dtype,
                 ReduceOp op, int root);
// Pipelined chain broadcast: root -> root+1 -> ... in chunks.
void chain_broadcast(Context& c, const void* send, void* recv, std::size_t count, DataType dtype,
                     int root);
void linear_gather(Context& c, const void* send, void* recv, std::size_t count, DataType dtype,
                   int root);
void linear_scatter(Context& c, const void* send, void* recv, std::size_t count, DataType dtype,
                    int root);
// Pairwise exchange: step s sends to rank+s and receives from rank-s.
void pairwise_alltoall(Context& c, const void* send, void* recv, std::size_t count,
                       DataType dtype);
// Dissemination barrier: ceil(log2 n) rounds of empty messages.
void dissemination_barrier(Context& c);

}  // namespace chorus::algo
