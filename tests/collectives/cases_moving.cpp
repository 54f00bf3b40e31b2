// The collective matrix's data-moving cases, as each rank runs them: every
// block checked against the payload of the rank it came from (matrix.hpp),
// send buffers checked unchanged, guards checked.

#include "matrix.hpp"

#include <chorus/communicator.hpp>

#include <cstdint>
#include <optional>
#include <stdexcept>

namespace chorus_test {
namespace {

template <typename T>
WorkerReply run_broadcast(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const bool root = x.rank == c.root;
  auto src = [&](std::uint64_t i) { return payload(c, c.root, i); };
  Checker chk;
  Buffer recv(n * sizeof(T), recv_misalign(c));
  if (c.in_place) {
    if (root) fill<T>(recv.data(), n, src);
    x.comm.broadcast(recv.data(), recv.data(), n, c.dtype, c.root);
  } else {
    // sendbuf is read on the root only: the others pass null.
    std::optional<Buffer> send;
    if (root) {
      send.emplace(n * sizeof(T), c.misalign);
      fill<T>(send->data(), n, src);
    }
    x.comm.broadcast(root ? send->data() : nullptr, recv.data(), n, c.dtype, c.root);
    if (root) {
      chk.expect<T>("sendbuf (must not change)", send->data(), n, src);
      chk.guards("sendbuf", *send);
    }
  }
  chk.expect<T>("recvbuf", recv.data(), n, src);
  chk.guards("recvbuf", recv);
  return chk.reply();
}

template <typename T>
WorkerReply run_allgather(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const std::uint64_t total = n * static_cast<std::uint64_t>(x.size);
  auto mine = [&](std::uint64_t i) { return payload(c, x.rank, i); };
  auto want = [&](int b, std::uint64_t i) { return payload(c, b, i); };
  Checker chk;
  Buffer recv(total * sizeof(T), recv_misalign(c));
  unsigned char* my_block = recv.data() + static_cast<std::uint64_t>(x.rank) * n * sizeof(T);
  if (c.in_place) {
    fill<T>(my_block, n, mine);
    x.comm.allgather(my_block, recv.data(), n, c.dtype);
  } else {
    Buffer send(n * sizeof(T), c.misalign);
    fill<T>(send.data(), n, mine);
    x.comm.allgather(send.data(), recv.data(), n, c.dtype);
    chk.expect<T>("sendbuf (must not change)", send.data(), n, mine);
    chk.guards("sendbuf", send);
  }
  chk.expect_blocks<T>("recvbuf", recv.data(), x.size, n, want);
  chk.guards("recvbuf", recv);
  return chk.reply();
}

template <typename T>
WorkerReply run_gather(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const std::uint64_t total = n * static_cast<std::uint64_t>(x.size);
  const bool root = x.rank == c.root;
  auto mine = [&](std::uint64_t i) { return payload(c, x.rank, i); };
  auto want = [&](int b, std::uint64_t i) { return payload(c, b, i); };
  Checker chk;
  std::optional<Buffer> recv;
  if (root) recv.emplace(total * sizeof(T), recv_misalign(c));
  if (c.in_place && root) {
    unsigned char* my_block = recv->data() + static_cast<std::uint64_t>(x.rank) * n * sizeof(T);
    fill<T>(my_block, n, mine);
    x.comm.gather(my_block, recv->data(), n, c.dtype, c.root);
  } else {
    Buffer send(n * sizeof(T), c.misalign);
    fill<T>(send.data(), n, mine);
    // recvbuf is used on the root only: the others pass null.
    x.comm.gather(send.data(), root ? recv->data() : nullptr, n, c.dtype, c.root);
    chk.expect<T>("sendbuf (must not change)", send.data(), n, mine);
    chk.guards("sendbuf", send);
  }
  if (root) {
    chk.expect_blocks<T>("recvbuf", recv->data(), x.size, n, want);
    chk.guards("recvbuf", *recv);
  }
  return chk.reply();
}

template <typename T>
WorkerReply run_scatter(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const std::uint64_t total = n * static_cast<std::uint64_t>(x.size);
  const std::uint64_t first = static_cast<std::uint64_t>(x.rank) * n;
  const bool root = x.rank == c.root;
  auto src = [&](std::uint64_t k) { return payload(c, c.root, k); };
  auto want = [&](std::uint64_t i) { return payload(c, c.root, first + i); };
  Checker chk;
  std::optional<Buffer> send;
  if (root) {
    send.emplace(total * sizeof(T), c.misalign);
    fill<T>(send->data(), total, src);
  }
  if (c.in_place && root) {
    unsigned char* my_block = send->data() + first * sizeof(T);
    x.comm.scatter(send->data(), my_block, n, c.dtype, c.root);
    // The root's block is already in place; nothing in sendbuf may change.
    chk.expect<T>("sendbuf with the root's block in place", send->data(), total, src);
  } else {
    Buffer recv(n * sizeof(T), recv_misalign(c));
    // sendbuf is used on the root only: the others pass null.
    x.comm.scatter(root ? send->data() : nullptr, recv.data(), n, c.dtype, c.root);
    chk.expect<T>("recvbuf", recv.data(), n, want);
    chk.guards("recvbuf", recv);
    if (root) chk.expect<T>("sendbuf (must not change)", send->data(), total, src);
  }
  if (root) chk.guards("sendbuf", *send);
  return chk.reply();
}

template <typename T>
WorkerReply run_alltoall(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const std::uint64_t total = n * static_cast<std::uint64_t>(x.size);
  const std::uint64_t first = static_cast<std::uint64_t>(x.rank) * n;
  auto mine = [&](std::uint64_t k) { return payload(c, x.rank, k); };
  // Block b of my recvbuf is block `rank` of rank b's sendbuf.
  auto want = [&](int b, std::uint64_t i) { return payload(c, b, first + i); };
  Checker chk;
  Buffer send(total * sizeof(T), c.misalign);
  Buffer recv(total * sizeof(T), recv_misalign(c));
  fill<T>(send.data(), total, mine);
  x.comm.alltoall(send.data(), recv.data(), n, c.dtype);
  chk.expect_blocks<T>("recvbuf", recv.data(), x.size, n, want);
  chk.guards("recvbuf", recv);
  chk.expect<T>("sendbuf (must not change)", send.data(), total, mine);
  chk.guards("sendbuf", send);
  return chk.reply();
}

// Ring shift: rank r sends to r+1 and receives from r-1.
template <typename T>
WorkerReply run_sendrecv(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const int next = (x.rank + 1) % x.size;
  const int prev = (x.rank + x.size - 1) % x.size;
  auto mine = [&](std::uint64_t i) { return payload(c, x.rank, i); };
  auto want = [&](std::uint64_t i) { return payload(c, prev, i); };
  Checker chk;
  Buffer send(n * sizeof(T), c.misalign);
  Buffer recv(n * sizeof(T), recv_misalign(c));
  fill<T>(send.data(), n, mine);
  if (c.async) {
    // Posted send first: operations run in submission order, and a posted
    // receive ahead of the send would wait for a peer that waits in turn.
    chorus::Work s = x.comm.send_async(send.data(), n, c.dtype, next);
    chorus::Work r = x.comm.recv_async(recv.data(), n, c.dtype, prev);
    r.wait();  // reverse order on purpose
    s.wait();
    if (!s.completed() || !r.completed()) chk.fail("completed() is false after wait()");
  } else if (x.rank % 2 == 0) {
    // Even ranks send first, odd ranks receive first: no cycle of blocked
    // sends even without buffering in the transport.
    x.comm.send(send.data(), n, c.dtype, next);
    x.comm.recv(recv.data(), n, c.dtype, prev);
  } else {
    x.comm.recv(recv.data(), n, c.dtype, prev);
    x.comm.send(send.data(), n, c.dtype, next);
  }
  chk.expect<T>("recvbuf", recv.data(), n, want);
  chk.guards("recvbuf", recv);
  chk.expect<T>("sendbuf (must not change)", send.data(), n, mine);
  chk.guards("sendbuf", send);
  return chk.reply();
}

}  // namespace

WorkerReply run_moving_case(WorkerContext& x, const Case& c) {
  return with_type(c.dtype, [&]<typename T>() -> WorkerReply {
    switch (c.coll) {
      case Coll::Broadcast: return run_broadcast<T>(x, c);
      case Coll::Allgather: return run_allgather<T>(x, c);
      case Coll::Gather: return run_gather<T>(x, c);
      case Coll::Scatter: return run_scatter<T>(x, c);
      case Coll::Alltoall: return run_alltoall<T>(x, c);
      case Coll::SendRecv: return run_sendrecv<T>(x, c);
      default: throw std::logic_error("run_moving_case: not one of this file's collectives");
    }
  });
}

}  // namespace chorus_test
