#include "algorithms/algorithms.hpp"

#include <algorithm>
#include <cstring>

namespace chorus::algo {

void chain_broadcast(Context& c, const void* send, void* recv, std::size_t count, DataType dtype,
                     int root) {
  const std::size_t esize = size_of(dtype);
  const std::size_t bytes = count * esize;
  char* out = static_cast<char*>(recv);
  if (c.rank == root && send != recv && bytes > 0) std::memcpy(out, send, bytes);
  if (c.size == 1 || bytes == 0) return;
  // Position in the chain that starts at the root.
  const int n = c.size;
  const int pos = (c.rank - root + n) % n;
  const int prev = (c.rank - 1 + n) % n;
  const int next = (c.rank + 1) % n;
  const bool has_next = pos != n - 1;
  const std::size_t chunk = std::max<std::size_t>(esize, c.chunk_bytes / esize * esize);
  std::vector<transport::Request> recvs, sends;
  if (pos != 0) {
    for (std::size_t off = 0; off < bytes; off += chunk)
      recvs.push_back(c.t.irecv(prev, c.call, out + off, std::min(chunk, bytes - off),
                                transport::Combine::copy()));
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

}  // namespace chorus::algo
