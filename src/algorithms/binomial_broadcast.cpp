// Binomial-tree broadcast: ceil(log2 n) rounds, the number of ranks holding
// the data doubling each round. In ranks relative to the root (v = rank -
// root mod n), v's parent is v with its lowest set bit cleared and its
// children are v + 2^j for every 2^j below that bit (every 2^j < n for the
// root). The latency of a small message is ceil(log2 n) hops instead of the
// chain's n-1.
//
// The message goes in chunks of chunk_bytes and each chunk is forwarded as
// soon as it has arrived, so the levels of the tree overlap on a large
// message; children get each chunk largest subtree first, since theirs is
// the longest way still to go.

#include "algorithms/algorithms.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

namespace chorus::algo {
namespace {

using transport::Combine;
using transport::Request;

void binomial_broadcast(Context& c, const Args& a) {
  const std::size_t esize = size_of(a.dtype);
  const std::size_t bytes = a.count * esize;
  const int n = c.size, root = a.root;
  char* out = static_cast<char*>(a.recv);
  const bool is_root = c.rank == root;
  if (trivial_broadcast(c, a)) return;

  const int v = (c.rank - root + n) % n;
  auto real = [&](int rel) { return (rel + root) % n; };
  // span: the lowest set bit of v, or for the root the first power of two >= n.
  int span = 1;
  if (v == 0) {
    while (span < n) span <<= 1;
  } else {
    span = v & -v;
  }
  std::vector<int> children;  // largest subtree first
  for (int mask = span >> 1; mask >= 1; mask >>= 1)
    if (v + mask < n) children.push_back(real(v + mask));

  const std::size_t chunk = std::max<std::size_t>(esize, c.chunk_bytes / esize * esize);
  std::vector<Request> recvs, sends;
  if (v != 0) {
    const int parent = real(v - span);
    // A leaf forwards nothing: its copies are final.
    const Combine copy =
        children.empty() && streams(c, bytes) ? Combine::copy_streaming() : Combine::copy();
    for (std::size_t off = 0; off < bytes; off += chunk)
      recvs.push_back(c.t.irecv(parent, c.call, out + off, std::min(chunk, bytes - off), copy));
  }
  // The root sends from its send buffer (the data, in place or not); the
  // others forward from recv what they have received.
  const char* src = is_root ? static_cast<const char*>(a.send) : out;
  std::size_t k = 0;
  for (std::size_t off = 0; off < bytes; off += chunk, ++k) {
    if (v != 0) c.t.wait({&recvs[k], 1}, c.deadline);
    for (int child : children)
      sends.push_back(c.t.isend(child, c.call, src + off, std::min(chunk, bytes - off)));
  }
  c.t.wait(sends, c.deadline);
}

// ceil(log2 n) rounds of a whole-buffer message (chunking overlaps the
// levels, but the root still sends the buffer once per round, so the
// unpipelined figure is the honest one for large messages too):
//   ceil_log2(n) (alpha + B beta).
double binomial_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1) return 0;
  const Model::Link& L = m.flat(l);
  return ceil_log2(n) * (L.alpha_us + static_cast<double>(call.bytes()) * L.us_per_byte());
}

}  // namespace

const Algorithm kBinomialBroadcast = {
    "binomial", Coll::Broadcast,
    "binomial tree from the root, ceil(log2 n) rounds; small messages",
    no_constraint, binomial_cost, binomial_broadcast};

}  // namespace chorus::algo
