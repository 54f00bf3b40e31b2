// Pipelined chain broadcast: the root sends its buffer chunk by chunk to the
// next rank, which forwards each chunk as soon as it has it.

#include "algorithms/algorithms.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace chorus::algo {
namespace {

void chain_broadcast(Context& c, const void* send, void* recv, std::size_t count, DataType dtype,
                     int root) {
  const std::size_t esize = size_of(dtype);
  const std::size_t bytes = count * esize;
  char* out = static_cast<char*>(recv);
  if (trivial_broadcast(c, {send, recv, count, dtype, ReduceOp::Sum, root})) return;
  // Position in the chain that starts at the root.
  const int n = c.size;
  const int pos = (c.rank - root + n) % n;
  const int prev = (c.rank - 1 + n) % n;
  const int next = (c.rank + 1) % n;
  const bool has_next = pos != n - 1;
  const std::size_t chunk = std::max<std::size_t>(esize, c.chunk_bytes / esize * esize);
  std::vector<transport::Request> recvs, sends;
  if (pos != 0) {
    // The end of the chain forwards nothing: its copies are final.
    const auto copy = !has_next && streams(c, bytes) ? transport::Combine::copy_streaming()
                                                     : transport::Combine::copy();
    for (std::size_t off = 0; off < bytes; off += chunk)
      recvs.push_back(c.t.irecv(prev, c.call, out + off, std::min(chunk, bytes - off), copy));
  }
  std::size_t k = 0;
  for (std::size_t off = 0; off < bytes; off += chunk, ++k) {
    // Forward each chunk as soon as it has arrived: the pipeline keeps every
    // link of the chain busy after the first chunk.
    if (pos != 0) c.t.wait({&recvs[k], 1}, c.deadline);
    if (has_next) sends.push_back(c.t.isend(next, c.call, out + off, std::min(chunk, bytes - off)));
  }
  c.t.wait(sends, c.deadline);
}

// k chunks flow through n-1 links: the last rank has the last chunk after
// n-2+k chunk times.
double chain_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1 || call.bytes() == 0) return 0;
  const Model::Link& L = m.flat(l);
  const double b = static_cast<double>(call.bytes());
  const double chunk = 512.0 * 1024;  // CHORUS_CHUNK_BYTES default
  const double k = std::max(1.0, std::ceil(b / chunk));
  return (n - 2 + k) * (L.alpha_us + b / k * L.us_per_byte());
}

}  // namespace

const Algorithm kChainBroadcast = {
    "chain", Coll::Broadcast, "pipelined chain root -> root+1 -> ...; bandwidth-optimal for large messages",
    no_constraint, chain_cost,
    [](Context& c, const Args& a) { chain_broadcast(c, a.send, a.recv, a.count, a.dtype, a.root); }};

}  // namespace chorus::algo
