// Gather and scatter: the root talks to every rank directly. Simple and
// correct; the root's link carries n-1 blocks either way.
// Alltoall by pairwise exchange and the dissemination barrier live here too.

#include "algorithms/algorithms.hpp"

#include "reduce/reduce.hpp"

#include <cstring>

namespace chorus::algo {
namespace {

void linear_gather(Context& c, const void* send, void* recv, std::size_t count, DataType dtype,
                   int root) {
  const std::size_t bytes = count * size_of(dtype);
  if (bytes == 0) return;
  if (c.rank != root) {
    auto r = c.t.isend(root, c.call, send, bytes);
    c.t.wait({&r, 1}, c.deadline);
    return;
  }
  char* out = static_cast<char*>(recv);
  std::vector<transport::Request> reqs;
  for (int r = 0; r < c.size; ++r)
    if (r != root)
      reqs.push_back(c.t.irecv(r, c.call, out + static_cast<std::size_t>(r) * bytes, bytes,
                               transport::Combine::copy()));
  char* mine = out + static_cast<std::size_t>(root) * bytes;
  if (send != mine) reduce::move(mine, send, bytes);
  c.t.wait(reqs, c.deadline);
}

void linear_scatter(Context& c, const void* send, void* recv, std::size_t count, DataType dtype,
                    int root) {
  const std::size_t bytes = count * size_of(dtype);
  if (bytes == 0) return;
  if (c.rank != root) {
    auto r = c.t.irecv(root, c.call, recv, bytes, transport::Combine::copy());
    c.t.wait({&r, 1}, c.deadline);
    return;
  }
  const char* in = static_cast<const char*>(send);
  std::vector<transport::Request> reqs;
  for (int r = 0; r < c.size; ++r)
    if (r != root) reqs.push_back(c.t.isend(r, c.call, in + static_cast<std::size_t>(r) * bytes, bytes));
  const char* mine = in + static_cast<std::size_t>(root) * bytes;
  if (recv != mine) reduce::move(recv, mine, bytes);
  c.t.wait(reqs, c.deadline);
}

void pairwise_alltoall(Context& c, const void* send, void* recv, std::size_t count,
                       DataType dtype) {
  const std::size_t bytes = count * size_of(dtype);
  if (bytes == 0) return;
  const int n = c.size;
  const char* in = static_cast<const char*>(send);
  char* out = static_cast<char*>(recv);
  reduce::copy(out + static_cast<std::size_t>(c.rank) * bytes,
               in + static_cast<std::size_t>(c.rank) * bytes, bytes);
  std::vector<transport::Request> reqs;
  for (int s = 1; s < n; ++s) {
    const int from = (c.rank - s + n) % n;
    reqs.push_back(c.t.irecv(from, c.call, out + static_cast<std::size_t>(from) * bytes, bytes,
                             transport::Combine::copy()));
  }
  for (int s = 1; s < n; ++s) {
    const int to = (c.rank + s) % n;
    reqs.push_back(c.t.isend(to, c.call, in + static_cast<std::size_t>(to) * bytes, bytes));
  }
  c.t.wait(reqs, c.deadline);
}

}  // namespace

void pairwise_alltoallv(Context& c, const void* send, std::span<const std::size_t> sendcounts,
                        void* recv, std::span<const std::size_t> recvcounts, DataType dtype) {
  const int n = c.size;
  const std::size_t es = size_of(dtype);
  const auto un = static_cast<std::size_t>(n);
  std::vector<std::size_t> soff(un + 1, 0), roff(un + 1, 0);
  for (std::size_t j = 0; j < un; ++j) {
    soff[j + 1] = soff[j] + sendcounts[j] * es;
    roff[j + 1] = roff[j] + recvcounts[j] * es;
  }
  const char* in = static_cast<const char*>(send);
  char* out = static_cast<char*>(recv);
  const auto me = static_cast<std::size_t>(c.rank);
  if (sendcounts[me] > 0) reduce::copy(out + roff[me], in + soff[me], sendcounts[me] * es);
  std::vector<transport::Request> reqs;
  reqs.reserve(2 * un);
  transport::CallDesc d = c.call;
  for (int s = 1; s < n; ++s) {
    const auto from = static_cast<std::size_t>((c.rank - s + n) % n);
    d.count = recvcounts[from];
    reqs.push_back(c.t.irecv(static_cast<int>(from), d,
                             recvcounts[from] > 0 ? out + roff[from] : nullptr,
                             recvcounts[from] * es, transport::Combine::copy()));
  }
  for (int s = 1; s < n; ++s) {
    const auto to = static_cast<std::size_t>((c.rank + s) % n);
    d.count = sendcounts[to];
    reqs.push_back(c.t.isend(static_cast<int>(to), d, sendcounts[to] > 0 ? in + soff[to] : nullptr,
                             sendcounts[to] * es));
  }
  c.t.wait(reqs, c.deadline);
}

namespace {

void dissemination_barrier(Context& c) {
  const int n = c.size;
  for (int k = 1; k < n; k *= 2) {
    transport::Request reqs[2] = {
        c.t.irecv((c.rank - k + n) % n, c.call, nullptr, 0, transport::Combine::copy()),
        c.t.isend((c.rank + k) % n, c.call, nullptr, 0)};
    c.t.wait(reqs, c.deadline);
  }
}

// The root moves n-1 blocks through its own link, one message each.
double linear_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  if (n == 1) return 0;
  const Model::Link& L = m.flat(l);
  return L.alpha_us + (n - 1) * static_cast<double>(call.bytes()) * L.us_per_byte();
}

double alltoall_cost(const Layout& l, const Model& m, const Call& call) {
  const int n = l.size;
  const Model::Link& L = m.flat(l);
  return (n - 1) * (L.alpha_us + static_cast<double>(call.bytes()) * L.us_per_byte());
}

double barrier_cost(const Layout& l, const Model& m, const Call&) {
  return ceil_log2(l.size) * m.flat(l).alpha_us;
}

}  // namespace

const Algorithm kLinearGather = {
    "linear", Coll::Gather, "every rank sends its block straight to the root", no_constraint, linear_cost,
    [](Context& c, const Args& a) { linear_gather(c, a.send, a.recv, a.count, a.dtype, a.root); }};

const Algorithm kLinearScatter = {
    "linear", Coll::Scatter, "the root sends each rank its block", no_constraint, linear_cost,
    [](Context& c, const Args& a) { linear_scatter(c, a.send, a.recv, a.count, a.dtype, a.root); }};

const Algorithm kPairwiseAlltoall = {
    "pairwise", Coll::Alltoall, "step s sends to rank+s and receives from rank-s", no_constraint,
    alltoall_cost,
    [](Context& c, const Args& a) { pairwise_alltoall(c, a.send, a.recv, a.count, a.dtype); }};

const Algorithm kDisseminationBarrier = {
    "dissemination", Coll::Barrier, "ceil(log2 n) rounds of empty messages", no_constraint, barrier_cost,
    [](Context& c, const Args&) { dissemination_barrier(c); }};

}  // namespace chorus::algo
