// The collective matrix's data-moving cases, as each rank runs them: every
// block checked against the payload of the rank it came from (matrix.hpp),
// send buffers checked unchanged, guards checked.

#include "matrix.hpp"

#include <chorus/communicator.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

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

// How many elements rank i sends rank j in an alltoallv case: a hash of the
// pair in [0, count], and 0 for every pair with (7i + j) % 5 == 0 (rank 0
// to itself among them), so that empty blocks occur at every count.
std::uint64_t pair_count(const Case& c, int i, int j) {
  if (c.count == 0 || (7 * i + j) % 5 == 0) return 0;
  const std::uint64_t h = mix(c.seed ^ (static_cast<std::uint64_t>(i) * 0x9E3779B97F4A7C15ull) ^
                              (static_cast<std::uint64_t>(j + 1) * 0xBF58476D1CE4E5B9ull));
  return h % (c.count + 1);
}

// Element k of the block rank i sends rank j: identifies both ranks and k.
std::uint64_t pair_index(int j, std::uint64_t k) {
  return (static_cast<std::uint64_t>(j) << 40) + k;
}

// Alltoallv: blocks of per-pair counts, packed in rank order. Odd seeds go
// through alltoallv_async.
template <typename T>
WorkerReply run_alltoallv(WorkerContext& x, const Case& c) {
  const auto n = static_cast<std::size_t>(x.size);
  std::vector<std::size_t> sendcounts(n), recvcounts(n);
  std::uint64_t send_total = 0, recv_total = 0;
  for (int j = 0; j < x.size; ++j) {
    sendcounts[static_cast<std::size_t>(j)] = pair_count(c, x.rank, j);
    recvcounts[static_cast<std::size_t>(j)] = pair_count(c, j, x.rank);
    send_total += sendcounts[static_cast<std::size_t>(j)];
    recv_total += recvcounts[static_cast<std::size_t>(j)];
  }
  Checker chk;
  Buffer send(send_total * sizeof(T), c.misalign);
  Buffer recv(recv_total * sizeof(T), recv_misalign(c));
  std::uint64_t at = 0;
  for (int j = 0; j < x.size; ++j) {
    const std::uint64_t m = sendcounts[static_cast<std::size_t>(j)];
    fill<T>(send.data() + at * sizeof(T), m,
            [&](std::uint64_t k) { return payload(c, x.rank, pair_index(j, k)); });
    at += m;
  }
  if ((c.seed & 1) != 0) {
    chorus::Work w =
        x.comm.alltoallv_async(send.data(), sendcounts, recv.data(), recvcounts, c.dtype);
    // The counts are the call's: changing them now must not matter.
    std::fill(sendcounts.begin(), sendcounts.end(), std::size_t{0});
    std::fill(recvcounts.begin(), recvcounts.end(), std::size_t{0});
    w.wait();
  } else {
    x.comm.alltoallv(send.data(), sendcounts, recv.data(), recvcounts, c.dtype);
  }
  at = 0;
  for (int i = 0; i < x.size; ++i) {
    const std::uint64_t m = pair_count(c, i, x.rank);
    chk.expect<T>("recvbuf block " + std::to_string(i), recv.data() + at * sizeof(T), m,
                  [&](std::uint64_t k) { return payload(c, i, pair_index(x.rank, k)); });
    at += m;
  }
  chk.guards("recvbuf", recv);
  at = 0;
  for (int j = 0; j < x.size; ++j) {
    const std::uint64_t m = pair_count(c, x.rank, j);
    chk.expect<T>("sendbuf block " + std::to_string(j) + " (must not change)",
                  send.data() + at * sizeof(T), m,
                  [&](std::uint64_t k) { return payload(c, x.rank, pair_index(j, k)); });
    at += m;
  }
  chk.guards("sendbuf", send);
  return chk.reply();
}

// Allgatherv: every rank's share in rank order, in place or not; odd seeds
// go through allgatherv_async.
template <typename T>
WorkerReply run_allgatherv(WorkerContext& x, const Case& c) {
  const auto n = static_cast<std::size_t>(x.size);
  std::vector<std::size_t> counts(n);
  std::uint64_t total = 0, before = 0;
  for (int p = 0; p < x.size; ++p) {
    if (p == x.rank) before = total;
    counts[static_cast<std::size_t>(p)] = share_count(c, p);
    total += counts[static_cast<std::size_t>(p)];
  }
  const std::uint64_t mine = counts[static_cast<std::size_t>(x.rank)];
  auto own = [&](std::uint64_t i) { return payload(c, x.rank, i); };
  Checker chk;
  Buffer recv(total * sizeof(T), recv_misalign(c));
  std::optional<Buffer> send;
  const unsigned char* src = recv.data() + before * sizeof(T);
  if (c.in_place) {
    fill<T>(recv.data() + before * sizeof(T), mine, own);
  } else {
    send.emplace(mine * sizeof(T), c.misalign);
    fill<T>(send->data(), mine, own);
    src = send->data();
  }
  if ((c.seed & 1) != 0) {
    chorus::Work w = x.comm.allgatherv_async(src, recv.data(), counts, c.dtype);
    std::fill(counts.begin(), counts.end(), std::size_t{0});  // the call's own copy counts
    w.wait();
  } else {
    x.comm.allgatherv(src, recv.data(), counts, c.dtype);
  }
  std::uint64_t at = 0;
  for (int p = 0; p < x.size; ++p) {
    const std::uint64_t m = share_count(c, p);
    chk.expect<T>("recvbuf block " + std::to_string(p), recv.data() + at * sizeof(T), m,
                  [&](std::uint64_t i) { return payload(c, p, i); });
    at += m;
  }
  chk.guards("recvbuf", recv);
  if (send) {
    chk.expect<T>("sendbuf (must not change)", send->data(), mine, own);
    chk.guards("sendbuf", *send);
  }
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
      case Coll::Alltoallv:
        return run_alltoallv<T>(x, c);
      case Coll::Allgatherv:
        return run_allgatherv<T>(x, c);
      case Coll::SendRecv: return run_sendrecv<T>(x, c);
      default: throw std::logic_error("run_moving_case: not one of this file's collectives");
    }
  });
}

}  // namespace chorus_test
