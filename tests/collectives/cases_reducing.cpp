// The collective matrix's reducing cases, as each rank runs them: the
// result checked element by element against the closed form (matrix.hpp),
// send buffers checked unchanged, guards checked.

#include "matrix.hpp"

#include <chorus/communicator.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <vector>

namespace chorus_test {
namespace {

template <typename T>
WorkerReply run_allreduce(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  auto in = [&](std::uint64_t i) { return contribution(c, x.size, x.rank, i); };
  auto want = [&](std::uint64_t i) { return reduced(c, x.size, i); };
  Checker chk;
  Buffer recv(n * sizeof(T), recv_misalign(c));
  if (c.in_place) {
    fill<T>(recv.data(), n, in);
    x.comm.allreduce(recv.data(), recv.data(), n, c.dtype, c.op);
  } else {
    Buffer send(n * sizeof(T), c.misalign);
    fill<T>(send.data(), n, in);
    x.comm.allreduce(send.data(), recv.data(), n, c.dtype, c.op);
    chk.expect<T>("sendbuf (must not change)", send.data(), n, in);
    chk.guards("sendbuf", send);
  }
  chk.expect<T>("recvbuf", recv.data(), n, want);
  chk.guards("recvbuf", recv);
  return chk.reply();
}

template <typename T>
WorkerReply run_reduce_scatter(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const std::uint64_t total = n * static_cast<std::uint64_t>(x.size);
  const std::uint64_t first = static_cast<std::uint64_t>(x.rank) * n;
  auto in = [&](std::uint64_t j) { return contribution(c, x.size, x.rank, j); };
  auto want = [&](std::uint64_t i) { return reduced(c, x.size, first + i); };
  Checker chk;
  Buffer send(total * sizeof(T), c.misalign);
  fill<T>(send.data(), total, in);
  if (c.in_place) {
    unsigned char* my_block = send.data() + first * sizeof(T);
    x.comm.reduce_scatter(send.data(), my_block, n, c.dtype, c.op);
    chk.expect<T>("recvbuf (block of sendbuf)", my_block, n, want);
  } else {
    Buffer recv(n * sizeof(T), recv_misalign(c));
    x.comm.reduce_scatter(send.data(), recv.data(), n, c.dtype, c.op);
    chk.expect<T>("recvbuf", recv.data(), n, want);
    chk.guards("recvbuf", recv);
    chk.expect<T>("sendbuf (must not change)", send.data(), total, in);
  }
  chk.guards("sendbuf", send);
  return chk.reply();
}

// Reduce-scatter with a count per rank (share_count: some 0, some ranks'
// blocks longer than others): rank r's block of the closed-form reduction
// of the whole buffer, in place or not; odd seeds go through
// reduce_scatterv_async.
template <typename T>
WorkerReply run_reduce_scatterv(WorkerContext& x, const Case& c) {
  const auto n = static_cast<std::size_t>(x.size);
  std::vector<std::size_t> counts(n);
  std::uint64_t total = 0, first = 0;
  for (int p = 0; p < x.size; ++p) {
    if (p == x.rank) first = total;
    counts[static_cast<std::size_t>(p)] = share_count(c, p);
    total += counts[static_cast<std::size_t>(p)];
  }
  const std::uint64_t mine = counts[static_cast<std::size_t>(x.rank)];
  auto in = [&](std::uint64_t j) { return contribution(c, x.size, x.rank, j); };
  auto want = [&](std::uint64_t i) { return reduced(c, x.size, first + i); };
  auto call = [&](const void* s, void* r) {
    if ((c.seed & 1) != 0) {
      chorus::Work w = x.comm.reduce_scatterv_async(s, r, counts, c.dtype, c.op);
      std::fill(counts.begin(), counts.end(), std::size_t{0});  // the call's own copy counts
      w.wait();
    } else {
      x.comm.reduce_scatterv(s, r, counts, c.dtype, c.op);
    }
  };
  Checker chk;
  Buffer send(total * sizeof(T), c.misalign);
  fill<T>(send.data(), total, in);
  if (c.in_place) {
    unsigned char* my_block = send.data() + first * sizeof(T);
    call(send.data(), my_block);
    chk.expect<T>("recvbuf (block of sendbuf)", my_block, mine, want);
  } else {
    Buffer recv(mine * sizeof(T), recv_misalign(c));
    call(send.data(), recv.data());
    chk.expect<T>("recvbuf", recv.data(), mine, want);
    chk.guards("recvbuf", recv);
    chk.expect<T>("sendbuf (must not change)", send.data(), total, in);
  }
  chk.guards("sendbuf", send);
  return chk.reply();
}

template <typename T>
WorkerReply run_reduce(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const bool root = x.rank == c.root;
  auto in = [&](std::uint64_t i) { return contribution(c, x.size, x.rank, i); };
  auto want = [&](std::uint64_t i) { return reduced(c, x.size, i); };
  Checker chk;
  if (c.in_place) {
    Buffer buf(n * sizeof(T), c.misalign);
    fill<T>(buf.data(), n, in);
    x.comm.reduce(buf.data(), buf.data(), n, c.dtype, c.op, c.root);
    // Only the root's recvbuf receives the result; elsewhere it is the
    // (const) sendbuf and must be left alone.
    if (root) chk.expect<T>("recvbuf", buf.data(), n, want);
    else chk.expect<T>("non-root buffer (must not change)", buf.data(), n, in);
    chk.guards("buffer", buf);
  } else {
    Buffer send(n * sizeof(T), c.misalign);
    fill<T>(send.data(), n, in);
    std::optional<Buffer> recv;
    if (root) recv.emplace(n * sizeof(T), recv_misalign(c));
    // recvbuf may be null on the non-roots.
    x.comm.reduce(send.data(), root ? recv->data() : nullptr, n, c.dtype, c.op, c.root);
    chk.expect<T>("sendbuf (must not change)", send.data(), n, in);
    chk.guards("sendbuf", send);
    if (root) {
      chk.expect<T>("recvbuf", recv->data(), n, want);
      chk.guards("recvbuf", *recv);
    }
  }
  return chk.reply();
}

}  // namespace

WorkerReply run_reducing_case(WorkerContext& x, const Case& c) {
  return with_type(c.dtype, [&]<typename T>() -> WorkerReply {
    switch (c.coll) {
      case Coll::Allreduce: return run_allreduce<T>(x, c);
      case Coll::ReduceScatter: return run_reduce_scatter<T>(x, c);
      case Coll::ReduceScatterv:
        return run_reduce_scatterv<T>(x, c);
      case Coll::Reduce: return run_reduce<T>(x, c);
      default: throw std::logic_error("run_reducing_case: not one of this file's collectives");
    }
  });
}

}  // namespace chorus_test
