// The collective matrix's special cases, as each rank runs them: barriers
// with staggered arrivals, asynchronous calls in flight together, waits
// with timeouts, communicator splits and long runs of tiny calls
// (test_collectives.cpp's special() lists them).

#include "matrix.hpp"

#include <chorus/communicator.hpp>
#include <chorus/error.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace chorus_test {
namespace {

using namespace std::chrono_literals;

// Each round, ranks arrive at different times (rank-dependent sleeps) and
// count themselves in shared memory before entering the barrier; whoever
// leaves must see every rank's arrival of that round.
WorkerReply run_barrier(WorkerContext& x, const Case& c) {
  Checker chk;
  constexpr int kRounds = 4;
  auto& arrived = x.shared.counter[0];
  for (int k = 0; k < kRounds; ++k) {
    std::this_thread::sleep_for(std::chrono::milliseconds(((x.rank + k) % x.size) * 3));
    arrived.fetch_add(1);
    if (c.async) {
      chorus::Work w = x.comm.barrier_async();
      if (!w.wait(std::chrono::milliseconds(std::chrono::seconds(60))))
        chk.fail("barrier_async did not complete within 60 s");
    } else {
      x.comm.barrier();
    }
    const std::int64_t seen = arrived.load();
    if (seen < static_cast<std::int64_t>(x.size) * (k + 1))
      chk.fail("round " + std::to_string(k) + ": barrier returned after only " + std::to_string(seen) +
               " of " + std::to_string(x.size * (k + 1)) + " arrivals");
  }
  return chk.reply();
}

// Several allreduce_async in flight on shared buffers, waited in reverse
// order: results prove that each ran after the earlier ones on the same
// buffer (e.g. sum-then-max differs from max-then-sum), and completed()
// proves that waiting for a later one implies the earlier ones are done.
WorkerReply run_async_order(WorkerContext& x, const Case& c) {
  Checker chk;
  const std::uint64_t n = c.count;
  const int size = x.size;
  // x(r, i) = s + (r + p) mod n, with s and p hashed per element: the sum is
  // n * s + n(n-1)/2 and the max s + n - 1, in closed form.
  auto element_of = [&](std::uint64_t i, std::uint64_t salt) {
    const std::uint64_t h = mix(c.seed + salt * 0x9E3779B97F4A7C15ull + i);
    return std::pair<std::int64_t, int>(static_cast<std::int64_t>(h % 5) + 1,
                                        static_cast<int>((h >> 8) % static_cast<std::uint64_t>(size)));
  };
  auto value = [&](std::pair<std::int64_t, int> e) { return e.first + (x.rank + e.second) % size; };
  auto sum_of = [&](std::pair<std::int64_t, int> e) { return size * e.first + size * (size - 1) / 2; };
  std::vector<std::int64_t> a(n), b(n), want_a(n), want_b(n);
  std::vector<float> f_send(n), f_recv(n, -1.0f), want_f(n);
  for (std::uint64_t i = 0; i < n; ++i) {
    const auto ea = element_of(i, 1), eb = element_of(i, 2), ef = element_of(i, 3);
    a[i] = value(ea);
    b[i] = value(eb);
    f_send[i] = static_cast<float>(value(ef));
    want_a[i] = size * sum_of(ea);              // a: sum, max, sum -> n * sum
    want_b[i] = size * (eb.first + size - 1);   // b: max, sum, min -> n * max
    want_f[i] = static_cast<float>(sum_of(ef));
  }
  const DataType i64 = DataType::Int64;
  std::vector<chorus::Work> w;
  w.push_back(x.comm.allreduce_async(a.data(), a.data(), n, i64, ReduceOp::Sum));
  w.push_back(x.comm.allreduce_async(b.data(), b.data(), n, i64, ReduceOp::Max));
  w.push_back(x.comm.allreduce_async(f_send.data(), f_recv.data(), n, DataType::Float32, ReduceOp::Sum));
  w.push_back(x.comm.allreduce_async(a.data(), a.data(), n, i64, ReduceOp::Max));
  w.push_back(x.comm.allreduce_async(b.data(), b.data(), n, i64, ReduceOp::Sum));
  w.push_back(x.comm.allreduce_async(b.data(), b.data(), n, i64, ReduceOp::Min));
  w.push_back(x.comm.allreduce_async(a.data(), a.data(), n, i64, ReduceOp::Sum));
  for (std::size_t k = w.size(); k-- > 0;) {
    if (!w[k].wait(std::chrono::milliseconds(std::chrono::seconds(60))))
      chk.fail("async op " + std::to_string(k) + ": wait(60 s) returned false");
    for (std::size_t e = 0; e < k; ++e)
      if (!w[e].completed())
        chk.fail("async op " + std::to_string(e) + " not completed although op " + std::to_string(k) +
                 ", submitted after it, is");
    if (!w[k].test()) chk.fail("async op " + std::to_string(k) + ": test() false after wait");
  }
  auto as_value = [](const auto& v) { return [&v](std::uint64_t i) { return static_cast<std::int64_t>(v[i]); }; };
  chk.expect<std::int64_t>("a (sum, max, sum)", reinterpret_cast<const unsigned char*>(a.data()), n, as_value(want_a));
  chk.expect<std::int64_t>("b (max, sum, min)", reinterpret_cast<const unsigned char*>(b.data()), n, as_value(want_b));
  chk.expect<float>("float sum", reinterpret_cast<const unsigned char*>(f_recv.data()), n, as_value(want_f));

  // A blocking call queues behind earlier async ones: when it returns, they
  // have all run.
  std::vector<chorus::Work> later;
  for (int k = 0; k < 3; ++k)
    later.push_back(x.comm.allreduce_async(a.data(), a.data(), n, i64, ReduceOp::Max));
  std::int32_t one = 1, total = 0;
  x.comm.allreduce(&one, &total, 1, DataType::Int32, ReduceOp::Sum);
  if (total != size) chk.fail("blocking allreduce after async ones: got " + std::to_string(total));
  for (std::size_t k = 0; k < later.size(); ++k) {
    if (!later[k].completed())
      chk.fail("async op " + std::to_string(k) + " submitted before a blocking call is not completed after it");
    later[k].wait();
  }
  chk.expect<std::int64_t>("a after more max", reinterpret_cast<const unsigned char*>(a.data()), n, as_value(want_a));
  return chk.reply();
}

// Every *_async entry point, all in flight together (one of each, in a
// fixed order on every rank) and waited in reverse order; then each result is
// checked as in the matrix.
template <typename T>
WorkerReply run_async_all(WorkerContext& x, const Case& c) {
  const std::uint64_t n = c.count;
  const std::uint64_t total = n * static_cast<std::uint64_t>(x.size);
  const std::uint64_t first = static_cast<std::uint64_t>(x.rank) * n;
  const std::size_t es = sizeof(T);
  const bool root = x.rank == c.root;
  const DataType t = c.dtype;
  auto sub = [&](ReduceOp op, std::uint64_t salt) {
    Case s = c;
    s.op = op;
    s.seed = mix(c.seed + salt);
    return s;
  };
  const Case ar = sub(ReduceOp::Sum, 1), bc = sub(ReduceOp::Sum, 2), ag = sub(ReduceOp::Sum, 3),
             rs = sub(ReduceOp::Max, 4), rd = sub(ReduceOp::Min, 5), ga = sub(ReduceOp::Sum, 6),
             sc = sub(ReduceOp::Sum, 7), aa = sub(ReduceOp::Sum, 8), pp = sub(ReduceOp::Sum, 9),
             gv = sub(ReduceOp::Sum, 10), av = sub(ReduceOp::Sum, 11), rv = sub(ReduceOp::Sum, 12);
  auto in_of = [&](const Case& k) { return [&x, &k](std::uint64_t j) { return contribution(k, x.size, x.rank, j); }; };
  auto mine_of = [&](const Case& k) { return [&x, &k](std::uint64_t j) { return payload(k, x.rank, j); }; };

  Buffer ar_send(n * es, 0), ar_recv(n * es, 0), bc_buf(n * es, 0), ag_send(n * es, 0),
      ag_recv(total * es, 0), rs_send(total * es, 0), rs_recv(n * es, 0), rd_send(n * es, 0),
      rd_recv(n * es, 0), ga_send(n * es, 0), ga_recv(total * es, 0), sc_send(total * es, 0),
      sc_recv(n * es, 0), aa_send(total * es, 0), aa_recv(total * es, 0), pp_send(n * es, 0),
      pp_recv(n * es, 0);
  fill<T>(ar_send.data(), n, in_of(ar));
  if (root) fill<T>(bc_buf.data(), n, [&](std::uint64_t i) { return payload(bc, c.root, i); });
  fill<T>(ag_send.data(), n, mine_of(ag));
  fill<T>(rs_send.data(), total, in_of(rs));
  fill<T>(rd_send.data(), n, in_of(rd));
  fill<T>(ga_send.data(), n, mine_of(ga));
  if (root) fill<T>(sc_send.data(), total, [&](std::uint64_t k) { return payload(sc, c.root, k); });
  fill<T>(aa_send.data(), total, mine_of(aa));
  fill<T>(pp_send.data(), n, mine_of(pp));
  // allgatherv: rank p shares (p + 1) * n / size elements (and receives as
  // many of the reduce_scatterv); alltoallv: rank i
  // sends rank j (i + j) % 3 * n / 2 elements, element k of them
  // payload(av, i, j * n + k).
  const auto un = static_cast<std::size_t>(x.size);
  auto share = [&](int p) {
    return static_cast<std::size_t>((p + 1) * n / static_cast<std::uint64_t>(x.size));
  };
  auto pair = [&](int i, int j) { return static_cast<std::size_t>((i + j) % 3 * n / 2); };
  std::vector<std::size_t> gv_counts(un), av_send(un), av_recv(un);
  std::size_t gv_total = 0, av_out = 0, av_in = 0, gv_first = 0;
  for (int p = 0; p < x.size; ++p) {
    if (p == x.rank) gv_first = gv_total;
    gv_counts[static_cast<std::size_t>(p)] = share(p);
    av_send[static_cast<std::size_t>(p)] = pair(x.rank, p);
    av_recv[static_cast<std::size_t>(p)] = pair(p, x.rank);
    gv_total += share(p);
    av_out += pair(x.rank, p);
    av_in += pair(p, x.rank);
  }
  Buffer gv_send(share(x.rank) * es, 0), gv_recv(gv_total * es, 0), av_sbuf(av_out * es, 0),
      av_rbuf(av_in * es, 0), rv_send(gv_total * es, 0), rv_recv(share(x.rank) * es, 0);
  fill<T>(gv_send.data(), share(x.rank), mine_of(gv));
  fill<T>(rv_send.data(), gv_total, in_of(rv));
  {
    std::size_t at = 0;
    for (int j = 0; j < x.size; ++j) {
      fill<T>(av_sbuf.data() + at * es, pair(x.rank, j), [&](std::uint64_t k) {
        return payload(av, x.rank, static_cast<std::uint64_t>(j) * n + k);
      });
      at += pair(x.rank, j);
    }
  }

  std::vector<std::pair<const char*, chorus::Work>> works;
  works.emplace_back("allreduce_async", x.comm.allreduce_async(ar_send.data(), ar_recv.data(), n, t, ReduceOp::Sum));
  works.emplace_back("broadcast_async", x.comm.broadcast_async(bc_buf.data(), bc_buf.data(), n, t, c.root));
  works.emplace_back("allgather_async", x.comm.allgather_async(ag_send.data(), ag_recv.data(), n, t));
  works.emplace_back("reduce_scatter_async", x.comm.reduce_scatter_async(rs_send.data(), rs_recv.data(), n, t, ReduceOp::Max));
  works.emplace_back("reduce_async", x.comm.reduce_async(rd_send.data(), rd_recv.data(), n, t, ReduceOp::Min, c.root));
  works.emplace_back("gather_async", x.comm.gather_async(ga_send.data(), ga_recv.data(), n, t, c.root));
  works.emplace_back("scatter_async", x.comm.scatter_async(sc_send.data(), sc_recv.data(), n, t, c.root));
  works.emplace_back("alltoall_async", x.comm.alltoall_async(aa_send.data(), aa_recv.data(), n, t));
  works.emplace_back("allgatherv_async",
                     x.comm.allgatherv_async(gv_send.data(), gv_recv.data(), gv_counts, t));
  works.emplace_back("alltoallv_async",
                     x.comm.alltoallv_async(av_sbuf.data(), av_send, av_rbuf.data(), av_recv, t));
  works.emplace_back(
      "reduce_scatterv_async",
      x.comm.reduce_scatterv_async(rv_send.data(), rv_recv.data(), gv_counts, t, ReduceOp::Sum));
  works.emplace_back("barrier_async", x.comm.barrier_async());
  const int next = (x.rank + 1) % x.size;
  const int prev = (x.rank + x.size - 1) % x.size;
  if (x.size > 1) {
    works.emplace_back("send_async", x.comm.send_async(pp_send.data(), n, t, next));
    works.emplace_back("recv_async", x.comm.recv_async(pp_recv.data(), n, t, prev));
  }
  Checker chk;
  for (std::size_t k = works.size(); k-- > 0;) {
    if (!works[k].second.wait(std::chrono::milliseconds(std::chrono::seconds(60))))
      chk.fail(std::string(works[k].first) + ": wait(60 s) returned false");
    for (std::size_t e = 0; e < k; ++e)
      if (!works[e].second.completed())
        chk.fail(std::string(works[e].first) + " is not completed although " + works[k].first +
                 ", submitted after it, is");
  }

  chk.expect<T>("allreduce recvbuf", ar_recv.data(), n, [&](std::uint64_t i) { return reduced(ar, x.size, i); });
  chk.expect<T>("broadcast buffer", bc_buf.data(), n, [&](std::uint64_t i) { return payload(bc, c.root, i); });
  chk.expect_blocks<T>("allgather recvbuf", ag_recv.data(), x.size, n,
                       [&](int b, std::uint64_t i) { return payload(ag, b, i); });
  chk.expect<T>("reduce_scatter recvbuf", rs_recv.data(), n,
                [&](std::uint64_t i) { return reduced(rs, x.size, first + i); });
  if (root) chk.expect<T>("reduce recvbuf", rd_recv.data(), n, [&](std::uint64_t i) { return reduced(rd, x.size, i); });
  if (root)
    chk.expect_blocks<T>("gather recvbuf", ga_recv.data(), x.size, n,
                         [&](int b, std::uint64_t i) { return payload(ga, b, i); });
  chk.expect<T>("scatter recvbuf", sc_recv.data(), n, [&](std::uint64_t i) { return payload(sc, c.root, first + i); });
  chk.expect_blocks<T>("alltoall recvbuf", aa_recv.data(), x.size, n,
                       [&](int b, std::uint64_t i) { return payload(aa, b, first + i); });
  {
    std::size_t at = 0;
    for (int p = 0; p < x.size; ++p) {
      chk.expect<T>("allgatherv_async block " + std::to_string(p), gv_recv.data() + at * es,
                    share(p), [&](std::uint64_t i) { return payload(gv, p, i); });
      at += share(p);
    }
    at = 0;
    for (int p = 0; p < x.size; ++p) {
      chk.expect<T>("alltoallv_async block " + std::to_string(p), av_rbuf.data() + at * es,
                    pair(p, x.rank), [&](std::uint64_t k) {
                      return payload(av, p, static_cast<std::uint64_t>(x.rank) * n + k);
                    });
      at += pair(p, x.rank);
    }
  }
  chk.expect<T>("reduce_scatterv_async recvbuf", rv_recv.data(), share(x.rank),
                [&](std::uint64_t i) { return reduced(rv, x.size, gv_first + i); });
  if (x.size > 1)
    chk.expect<T>("recv_async buffer", pp_recv.data(), n, [&](std::uint64_t i) { return payload(pp, prev, i); });
  for (const Buffer* b : {&ar_recv, &bc_buf, &ag_recv, &rs_recv, &rd_recv, &ga_recv, &sc_recv,
                          &aa_recv, &pp_recv, &gv_recv, &av_rbuf, &rv_recv})
    chk.guards("a receive buffer", *b);
  return chk.reply();
}

// Work::wait(timeout): false while a peer has not joined yet, true once done.
// Rank 0 submits only after every other rank has seen wait() time out (told
// through shared memory), so the false case does not depend on timing.
WorkerReply run_wait_timeout(WorkerContext& x, const Case& c) {
  Checker chk;
  auto& checked = x.shared.counter[1];
  std::int64_t mine = x.rank + 1, sum = 0;
  const std::int64_t want = static_cast<std::int64_t>(x.size) * (x.size + 1) / 2;
  chorus::Work w;
  if (x.rank != 0) {
    w = x.comm.allreduce_async(&mine, &sum, 1, DataType::Int64, ReduceOp::Sum);
    if (w.wait(10ms)) chk.fail("wait(10 ms) returned true before rank 0 had joined");
    if (w.completed() || w.test()) chk.fail("completed()/test() true before rank 0 had joined");
    checked.fetch_add(1);
  } else {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (checked.load() < x.size - 1 && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(1ms);
    w = x.comm.allreduce_async(&mine, &sum, 1, DataType::Int64, ReduceOp::Sum);
  }
  if (!w.wait(std::chrono::milliseconds(std::chrono::seconds(60))))
    chk.fail("wait(60 s) returned false");
  if (!w.completed()) chk.fail("completed() false after wait returned true");
  if (sum != want) chk.fail("sum " + std::to_string(sum) + ", expected " + std::to_string(want));
  (void)c;
  return chk.reply();
}

// split(color, key): even/odd ranks; the last rank (world >= 3) passes color
// -1. Variant 0: key = rank; 1: key = -rank (reverses the order); 2: all keys
// equal (ties keep the old order).
WorkerReply run_split(WorkerContext& x, const Case& c) {
  Checker chk;
  const int n = x.size;
  auto color_of = [&](int r) { return (n >= 3 && r == n - 1) ? -1 : r % 2; };
  auto key_of = [&](int r) { return c.variant == 0 ? r : c.variant == 1 ? -r : 7; };
  const int color = color_of(x.rank);
  chorus::Communicator sub = x.comm.split(color, key_of(x.rank));
  if (color < 0) {
    if (sub.valid()) chk.fail("split with color -1 returned a valid communicator");
    try {
      std::int32_t v = 0;
      sub.allreduce(&v, &v, 1, DataType::Int32, ReduceOp::Sum);
      chk.fail("allreduce on the invalid handle did not throw");
    } catch (const chorus::Error& e) {
      if (e.code() != chorus::ErrorCode::InvalidUsage)
        chk.fail(std::string("invalid handle threw the wrong code: ") + e.what());
    }
  } else {
    // Members in the new order: by key, then by old rank.
    std::vector<int> members;
    for (int r = 0; r < n; ++r)
      if (color_of(r) == color) members.push_back(r);
    std::stable_sort(members.begin(), members.end(),
                     [&](int p, int q) { return key_of(p) < key_of(q); });
    const int want_rank = static_cast<int>(std::find(members.begin(), members.end(), x.rank) - members.begin());
    if (!sub.valid()) chk.fail("split returned an invalid communicator for color " + std::to_string(color));
    if (sub.size() != static_cast<int>(members.size()) || sub.rank() != want_rank) {
      chk.fail("sub-communicator is rank " + std::to_string(sub.rank()) + " of " + std::to_string(sub.size()) +
               ", expected " + std::to_string(want_rank) + " of " + std::to_string(members.size()));
      return chk.reply();  // the calls below would mismatch
    }
    std::int64_t mine = x.rank + 1, sum = 0;
    sub.allreduce(&mine, &sum, 1, DataType::Int64, ReduceOp::Sum);
    std::int64_t want_sum = 0;
    for (int r : members) want_sum += r + 1;
    if (sum != want_sum) chk.fail("allreduce on the sub-communicator: " + std::to_string(sum) + ", expected " + std::to_string(want_sum));
    std::int32_t old_rank = x.rank;
    std::vector<std::int32_t> order(members.size(), -1);
    sub.allgather(&old_rank, order.data(), 1, DataType::Int32);
    chk.expect<std::int32_t>("allgather of old ranks on the sub-communicator",
                             reinterpret_cast<const unsigned char*>(order.data()), order.size(),
                             [&](std::uint64_t i) { return members[i]; });
    // A split of a split, reversing it.
    chorus::Communicator nested = sub.split(0, -sub.rank());
    if (!nested.valid() || nested.size() != sub.size() || nested.rank() != sub.size() - 1 - sub.rank()) {
      chk.fail("nested split: rank " + std::to_string(nested.rank()) + " of " + std::to_string(nested.size()));
    } else {
      std::int64_t nested_sum = 0;
      nested.allreduce(&mine, &nested_sum, 1, DataType::Int64, ReduceOp::Sum);
      if (nested_sum != want_sum) chk.fail("allreduce on the nested split: " + std::to_string(nested_sum));
    }
  }
  // The parent communicator is unaffected.
  std::int32_t one = 1, total = 0;
  x.comm.allreduce(&one, &total, 1, DataType::Int32, ReduceOp::Sum);
  if (total != n) chk.fail("allreduce on the parent after split: " + std::to_string(total));
  return chk.reply();
}

// Thousands of tiny calls: sequence numbers, buffer reuse and per-call
// bookkeeping over a long run.
WorkerReply run_many_small(WorkerContext& x, const Case& c) {
  Checker chk;
  const std::int64_t n = x.size;
  const std::int64_t rank_sum = n * (n - 1) / 2;
  int wrong = 0;
  for (std::uint64_t k = 0; k < c.count; ++k) {
    std::int32_t in = static_cast<std::int32_t>(x.rank + static_cast<std::int64_t>(k)), out = -1;
    if (k % 2 == 0) x.comm.allreduce(&in, &out, 1, DataType::Int32, ReduceOp::Sum);
    else x.comm.allreduce(&in, &in, 1, DataType::Int32, ReduceOp::Sum), out = in;
    const std::int64_t want = rank_sum + n * static_cast<std::int64_t>(k);
    if (out != want && wrong++ < 5)
      chk.fail("call " + std::to_string(k) + ": " + std::to_string(out) + ", expected " + std::to_string(want));
  }
  return chk.reply();
}

// Large messages between buffers that sit at other offsets within a page
// on every rank: rank r's buffers start 4r + 4 bytes into a page, so what a
// rank receives from the rank before it lands 4 bytes past where it was
// modulo 4 KiB, where memcpy and the kernel's copy crawl and the library
// copies another way (reduce::copy; shm reads such rendezvous messages
// through its staging buffer). A broadcast in place, an allreduce out of
// place, a ring of sends and an allgather, of c.count int32 each; every
// result checked.
WorkerReply run_page_offsets(WorkerContext& x, const Case& c) {
  Checker chk;
  const std::uint64_t n = c.count;
  const std::size_t bytes = n * sizeof(std::int32_t);
  const std::size_t at = 4 * static_cast<std::size_t>(x.rank) + 4;
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  auto page_buffer = [&](std::size_t size) {
    void* p = std::aligned_alloc(4096, (size + at + 4095) / 4096 * 4096);
    if (p == nullptr) throw std::bad_alloc();
    return std::unique_ptr<void, Free>(p);
  };
  auto in = [&](std::unique_ptr<void, Free>& b) {
    return static_cast<std::int32_t*>(b.get()) + at / 4;
  };
  auto bytes_of = [](const std::int32_t* p) { return reinterpret_cast<const unsigned char*>(p); };
  const auto N = static_cast<std::int64_t>(x.size);
  auto bb = page_buffer(bytes), as = page_buffer(bytes), ar = page_buffer(bytes),
       ps = page_buffer(bytes), pr = page_buffer(bytes), gs = page_buffer(bytes),
       gr = page_buffer(bytes * static_cast<std::size_t>(x.size));
  std::int32_t *b = in(bb), *s = in(as), *r = in(ar), *p_out = in(ps), *p_in = in(pr), *g = in(gs),
               *gathered = in(gr);
  for (std::uint64_t i = 0; i < n; ++i) {
    const auto k = static_cast<std::int32_t>(i % 1000);
    b[i] = x.rank == 0 ? k * 3 : -1;
    s[i] = x.rank + k;
    p_out[i] = x.rank * 7 + k;
    g[i] = x.rank * 1000 + k;
  }
  x.comm.broadcast(b, b, n, DataType::Int32, 0);
  chk.expect<std::int32_t>("broadcast", bytes_of(b), n,
                           [](std::uint64_t i) { return static_cast<std::int64_t>(i % 1000) * 3; });
  x.comm.allreduce(s, r, n, DataType::Int32, ReduceOp::Sum);
  chk.expect<std::int32_t>("allreduce", bytes_of(r), n, [&](std::uint64_t i) {
    return N * (N - 1) / 2 + N * static_cast<std::int64_t>(i % 1000);
  });
  if (x.size > 1) {
    const int next = (x.rank + 1) % x.size, prev = (x.rank + x.size - 1) % x.size;
    chorus::Work w = x.comm.send_async(p_out, n, DataType::Int32, next);
    x.comm.recv(p_in, n, DataType::Int32, prev);
    w.wait();
    chk.expect<std::int32_t>("recv", bytes_of(p_in), n, [&](std::uint64_t i) {
      return static_cast<std::int64_t>(prev) * 7 + static_cast<std::int64_t>(i % 1000);
    });
  }
  x.comm.allgather(g, gathered, n, DataType::Int32);
  chk.expect_blocks<std::int32_t>(
      "allgather", bytes_of(gathered), x.size, n, [](int q, std::uint64_t i) {
        return static_cast<std::int64_t>(q) * 1000 + static_cast<std::int64_t>(i % 1000);
      });
  return chk.reply();
}

}  // namespace

WorkerReply run_special_case(WorkerContext& x, const Case& c) {
  switch (c.coll) {
    case Coll::Barrier: return run_barrier(x, c);
    case Coll::AsyncOrder: return run_async_order(x, c);
    case Coll::AsyncAll:
      // Only the types special() gives these cases: each instance is a
      // large function, and ten of them were most of the matrix's build.
      switch (c.dtype) {
        case DataType::Float32: return run_async_all<float>(x, c);
        case DataType::Int32: return run_async_all<std::int32_t>(x, c);
        case DataType::BFloat16: return run_async_all<BFloat>(x, c);
        default: throw std::logic_error("async_all cases are float32, int32 or bfloat16");
      }
    case Coll::WaitTimeout: return run_wait_timeout(x, c);
    case Coll::Split: return run_split(x, c);
    case Coll::ManySmall: return run_many_small(x, c);
    case Coll::PageOffsets:
      return run_page_offsets(x, c);
    default: throw std::logic_error("run_special_case: not a special case");
  }
}

}  // namespace chorus_test
