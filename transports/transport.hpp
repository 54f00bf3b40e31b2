#pragma once

// The transport interface: what every algorithm needs from the network.
//
// A Transport is one rank's endpoint within one communicator. It gives
// reliable, ordered delivery to each peer, with nonblocking requests that the
// caller drives through wait()/progress(). Messages between a pair are
// matched in post order (FIFO per peer), so an algorithm that posts its
// sends and receives in the same order on both sides needs no tags.
//
// Every message carries the CallDesc of the collective call it belongs to;
// the receiver compares it with its own call and fails with InvalidUsage,
// naming both calls, when ranks disagree (different collective, count, dtype,
// op, root or call number).

#include <chorus/error.hpp>
#include <chorus/store.hpp>
#include <chorus/types.hpp>

#include <chrono>
#include <ctime>
#include <cstdint>
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace chorus::transport {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;

// Clock::now() to within a clock tick (CLOCK_MONOTONIC_COARSE, the clock
// steady_clock reads, as of the last tick): enough for a deadline seconds
// away, and a read of one shared page instead of the time-stamp counter
// (about 27 ns a read on this VM, a tenth of a 1-rank allreduce).
inline Deadline coarse_now() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return Deadline(std::chrono::duration_cast<Clock::duration>(std::chrono::seconds(ts.tv_sec) +
                                                              std::chrono::nanoseconds(ts.tv_nsec)));
}

// Which call a message belongs to. Values are part of the wire format.
enum class Coll : std::uint8_t {
  None = 0,
  Allreduce = 1,
  Broadcast = 2,
  Allgather = 3,
  ReduceScatter = 4,
  Reduce = 5,
  Gather = 6,
  Scatter = 7,
  Alltoall = 8,
  Barrier = 9,
  SendRecv = 10,  // point-to-point: send() on one side, recv() on the other
  Split = 11,
  // Alltoall with per-pair counts: each message's count is the elements it
  // carries (the sender's sendcounts[receiver], the receiver's
  // recvcounts[sender]), so that a pair that disagrees fails as a mismatch.
  Alltoallv = 12,
  // Allgather with a count per rank: `count` is their sum and `root` a
  // 31-bit hash of the counts, so that ranks passing different counts (even
  // with the same sum) fail as a mismatch.
  Allgatherv = 13,
  // Reduce-scatter with a count per rank: `count` and `root` as for
  // Allgatherv (the counts' sum and hash).
  ReduceScatterv = 14,
};

const char* to_string(Coll c) noexcept;

// Describes one call on one rank; identical on every rank for collectives.
struct CallDesc {
  Coll coll = Coll::None;
  DataType dtype = DataType::UInt8;
  ReduceOp op = ReduceOp::Sum;
  std::int32_t root = -1;     // root rank, or -1
  std::uint64_t count = 0;    // the count argument of the call
  std::uint64_t seq = 0;      // collective call number (or per-pair number for send/recv)
  std::uint8_t algo = 0;      // algorithm id within the collective (0: none), 1..15
  bool device = false;        // run by the device engine on CUDA buffers (src/cuda)

  bool operator==(const CallDesc&) const = default;
};

// The wire's collective byte: the Coll in the low 4 bits, CallDesc::algo in
// the high 4, so that ranks running different algorithms for one call fail
// with InvalidUsage instead of exchanging data they misread.
inline std::uint8_t encode_coll(const CallDesc& d) {
  return static_cast<std::uint8_t>(static_cast<unsigned>(d.coll) | (static_cast<unsigned>(d.algo) << 4));
}
inline void decode_coll(std::uint8_t byte, CallDesc& d) {
  d.coll = static_cast<Coll>(byte & 0x0f);
  d.algo = static_cast<std::uint8_t>(byte >> 4);
}

// The wire's op byte: the ReduceOp in the low 7 bits, CallDesc::device in the
// high bit, so that a rank passing device memory and one passing host memory
// (whose message sequences differ) fail with InvalidUsage naming the cause.
inline std::uint8_t encode_op(const CallDesc& d) {
  return static_cast<std::uint8_t>(static_cast<unsigned>(d.op) | (d.device ? 0x80u : 0u));
}

// The call a peer's message header describes, from its wire fields.
inline CallDesc wire_call(std::uint8_t coll, std::uint8_t dtype, std::uint8_t op, std::int32_t root,
                          std::uint64_t count, std::uint64_t seq) {
  CallDesc d;
  decode_coll(coll, d);
  d.dtype = static_cast<DataType>(dtype);
  d.op = static_cast<ReduceOp>(op & 0x7f);
  d.device = (op & 0x80) != 0;
  d.root = root;
  d.count = count;
  d.seq = seq;
  return d;
}

// "allreduce #5 (count 1000, float, sum)".
std::string describe(const CallDesc& d);

// Throws Error(InvalidUsage) naming both calls if `theirs` (from peer) does not
// match `mine`.
void check_same_call(const CallDesc& mine, int my_rank, const CallDesc& theirs, int peer);

// How a received message lands in the destination buffer.
struct Combine {
  enum class Kind : std::uint8_t { Copy, Reduce };
  Kind kind = Kind::Copy;
  DataType dtype = DataType::UInt8;
  ReduceOp op = ReduceOp::Sum;
  // Reduce only: the other operand. dst = src (op) received when set, else
  // dst = dst (op) received. Lets an out-of-place collective skip copying its
  // send buffer into the destination first.
  const void* src = nullptr;
  // Reduce with src only: dst = received (op) src instead of src (op)
  // received. Algorithms in which every rank combines the same two operands
  // use it to put them in rank order, so that all ranks get identical bits
  // (min/max of -0 and +0, NaN payloads).
  bool incoming_first = false;
  // Copy only: the destination will not be read again soon (the last step
  // of a collective far larger than the caches), so large pieces are
  // written past the caches (reduce::copy_streaming), which saves reading
  // each destination line first. Transports that copy through their own
  // buffers honour it; the others ignore it.
  bool stream = false;

  static Combine copy() { return {}; }
  static Combine copy_streaming() {
    Combine c;
    c.stream = true;
    return c;
  }
  static Combine reduce(DataType t, ReduceOp o) { return {Kind::Reduce, t, o, nullptr, false}; }
  static Combine reduce_from(const void* other, DataType t, ReduceOp o, bool incoming_first = false) {
    return {Kind::Reduce, t, o, other, incoming_first};
  }
};

// State of one posted send or receive. Owned jointly by the caller and the
// transport; `done` flips once, inside progress(). A request the transport
// failed on (a mismatched or malformed message) is done and `failed`: it
// never completes, and the transport's error says why.
struct RequestState {
  int peer = -1;
  bool is_send = false;
  bool done = false;
  std::size_t bytes = 0;
  bool failed = false;
};
using Request = std::shared_ptr<RequestState>;

// Whether every request in `reqs` completed (done, and not failed).
inline bool all_done(std::span<const Request> reqs) {
  for (const Request& r : reqs)
    if (!r->done || r->failed) return false;
  return true;
}

// What an algorithm or selector may ask of a transport without naming it.
struct Capabilities {
  bool same_host = false;      // the peer shares this host
  bool one_sided = false;      // put/get are available
  bool device_memory = false;  // device pointers may be passed directly
  // How many bytes of a pipelined stream to this peer should be queued ahead
  // of a chunk that is forwarded as soon as it arrives (the ring's schedule,
  // algorithms/ring.cpp). Shared memory: its bulk ring, so that a forwarded
  // chunk leaves while it is still in cache. Sockets and fabrics: no limit,
  // a full queue keeps the link busy.
  std::size_t run_ahead = static_cast<std::size_t>(-1);
};

class Transport {
 public:
  virtual ~Transport() = default;

  virtual std::string name() const = 0;
  virtual Capabilities capabilities(int peer) const = 0;
  // Whether this transport carries messages to `peer` (a transport that
  // serves only part of a communicator, like shm for the ranks of one host,
  // says no for the others).
  virtual bool reaches(int peer) const { return peer >= 0; }

  // Posts a send of `bytes` from `buf` to `peer`. `buf` must stay valid and
  // unmodified until the request is done.
  virtual Request isend(int peer, const CallDesc& call, const void* buf, std::size_t bytes) = 0;
  // isend, for a message the receiver will reduce (not copy): lets a
  // transport choose a path that suits a reduction (shm pushes it through a
  // shared buffer the receiver reduces from). Results never depend on it.
  virtual Request isend_reduced(int peer, const CallDesc& call, const void* buf, std::size_t bytes) {
    return isend(peer, call, buf, bytes);
  }
  // Posts a receive of exactly `bytes` from `peer` into `dst`, combined as
  // `combine` says (copy, or reduce into what is already in dst).
  virtual Request irecv(int peer, const CallDesc& call, void* dst, std::size_t bytes,
                        Combine combine) = 0;

  // Drives communication until every request in `reqs` is done. Throws
  // Error(Timeout) when `deadline` passes (naming the peers still pending),
  // Error(PeerFailure) when a peer dies, Error(InvalidUsage) on a call
  // mismatch, Error(Aborted) after abort(). After a throw the transport is
  // failed: every later call throws the same error. A failure found while
  // waiting after every request completed (their data had arrived before a
  // peer's notice was read) does not fail this wait: the transport keeps
  // it, and its next call throws it. The last rank to leave a collective
  // must not fail it on the others' failure in the next one.
  virtual void wait(std::span<const Request> reqs, Deadline deadline) = 0;

  // Makes whatever progress is possible without blocking.
  virtual void progress() = 0;

  // Sleeps until something may have arrived, or at most `max`. Lets a
  // composite transport wait on several at once; returns early at will.
  virtual void block_for(std::chrono::microseconds max) = 0;

  // Thread-safe: makes any blocked wait() throw Error(Aborted) promptly.
  virtual void abort(const std::string& why) noexcept = 0;

  // Best effort, bounded: tells every peer that this rank failed with `e`, so
  // that ranks not directly connected to the culprit fail fast instead of
  // waiting for their timeout.
  virtual void broadcast_failure(const Error& e) noexcept = 0;

  // Called once every rank of the group has created its transports (all
  // have published what peers need): the last moment the store is known to
  // be up. A transport reads here whatever it would otherwise fetch lazily
  // later, when the rank hosting the store may already have exited.
  virtual void group_ready() {}

  // Payload bytes this endpoint posted to and from each peer (by global
  // rank): the byte counters that CHORUS_DEBUG=info prints when a
  // communicator is destroyed. A composite reports each part separately.
  struct Traffic {
    std::string transport;
    std::vector<std::uint64_t> sent, received;  // indexed by peer rank
  };
  virtual std::vector<Traffic> traffic() const {
    Traffic t = traffic_;
    t.transport = name();
    return {t};
  }

 protected:
  void count_sent(int peer, std::size_t bytes) { bump(traffic_.sent, peer, bytes); }
  void count_received(int peer, std::size_t bytes) { bump(traffic_.received, peer, bytes); }

 private:
  static void bump(std::vector<std::uint64_t>& v, int peer, std::size_t bytes) {
    if (peer < 0) return;
    if (v.size() <= static_cast<std::size_t>(peer)) v.resize(static_cast<std::size_t>(peer) + 1, 0);
    v[static_cast<std::size_t>(peer)] += bytes;
  }
  Traffic traffic_;
};

// ---- Shared by the transports -------------------------------------------

// Lands `bytes` of received data (whole elements) at byte `offset` of the
// receive: copies, or reduces with dst (or with combine.src at the same
// offset) as `combine` says.
void combine_into(const Combine& combine, char* dst, std::size_t offset, const char* incoming,
                  std::size_t bytes);

// The Timeout error of a wait that passed its deadline with `reqs` pending,
// blaming the first peer it still waits for.
Error timeout_error(std::span<const Request> reqs);

// Follows the wait chain (rank -> rank it timed out waiting for) from this
// rank to the rank that reported nothing: the stopped or stuck one. When the
// chain closes on itself (ranks that gave up on one another), the ranks of
// the `size` that reported nothing are named instead, and blamed if there
// is one.
Error timeout_chain_error(const std::map<int, int>& waits_for, int my_rank, int size);

// The error a rank takes from a failure notice that `from` sent, reporting
// `code` and blaming `blamed` (or -1).
Error notice_error(std::uint64_t code, int blamed, int from, const std::string& text);

// The failure bookkeeping of one transport endpoint: the sticky error, the
// abort request (from any thread) and the wait-chain edges that timeout
// reports carry (see resolve_timeout in the transports).
class FailureState {
 public:
  explicit FailureState(const char* transport) : transport_(transport) {}

  bool failed() const { return error_.has_value(); }
  void throw_if_failed() const {
    if (error_) throw *error_;
  }
  // Records `e` unless an error is recorded already, then throws the first.
  [[noreturn]] void fail(const Error& e);

  // Thread-safe. The first reason wins.
  void request_abort(const std::string& why) noexcept;
  bool aborted() const noexcept { return aborted_.load(std::memory_order_acquire); }
  // fail(Aborted) once abort() was requested.
  void throw_if_aborted();

  // "rank `waiter` timed out waiting for rank `blamed`", reported by a peer.
  void note_reported_wait(int waiter, int blamed) {
    waits_for_[waiter] = blamed;
    timeout_reported_ = true;
  }
  bool timeout_reported() const { return timeout_reported_; }
  // This rank's own timeout: records its edge and returns the error to tell the peers.
  Error own_timeout(std::span<const Request> reqs, int my_rank);
  // After the grace period: fails with the end of the wait chain.
  [[noreturn]] void fail_timeout_chain(int my_rank, int size) {
    fail(timeout_chain_error(waits_for_, my_rank, size));
  }
  // How long to listen for the other ranks' reports: a tenth of the timeout, 0.1 to 1 s.
  static std::chrono::milliseconds grace(std::chrono::milliseconds timeout);

 private:
  const char* transport_;
  std::optional<Error> error_;
  std::atomic<bool> aborted_{false};
  std::mutex abort_mu_;
  std::string abort_why_;
  std::map<int, int> waits_for_;  // rank -> rank it timed out waiting for
  bool timeout_reported_ = false;
};

// Transport::wait's rule for a failure found once every request is done:
// runs `wait_all()`; an error it throws after every request in `reqs`
// completed does not fail this wait, provided the transport keeps it for its
// next call (`fs` has recorded it; nullptr: a composite whose parts do).
// Returns false when it kept one.
template <typename WaitAll>
bool wait_keeping_late_failure(std::span<const Request> reqs, const FailureState* fs,
                               WaitAll&& wait_all) {
  try {
    wait_all();
    return true;
  } catch (const Error&) {
    if ((fs != nullptr && !fs->failed()) || !all_done(reqs)) throw;
    return false;
  }
}

// Everything a transport factory needs.
struct TransportContext {
  int rank = 0;
  int size = 1;
  std::uint64_t comm_id = 0;
  std::shared_ptr<Store> store;  // already prefixed for this communicator
  std::string listen_host = "127.0.0.1";  // address to listen on (chosen by the communicator)
  std::chrono::microseconds spin{100};  // busy-poll time before blocking
  // More ranks than CPUs on this host: poll with a sched_yield() after every
  // look, so that the rank being waited for gets the CPU at once.
  bool oversubscribed = false;
  std::chrono::milliseconds connect_timeout{std::chrono::seconds(300)};
  std::size_t socket_buffer_bytes = 0;  // 0: leave the system default
  // The ranks on this rank's host (this one included), ascending. A
  // transport for same-host peers (shm) serves only these.
  std::vector<int> host_ranks;
  // shm: serve the host peers it can and report the others through
  // reaches() (auto mode), instead of failing when one is out of reach.
  bool partial_ok = false;
  // shm: how large copy-received messages move (CHORUS_SHM_LARGE): "cma"
  // with process_vm_readv (one copy, by the kernel, split with the sender's
  // process_vm_writev), "copy" through a shared ring (two pipelined
  // copies), "auto" by CMA to every peer that can read this rank's memory
  // and through the ring to the others.
  std::string shm_large = "auto";
  // shm: calls of at least this many bytes (count x element size) move the
  // large messages of chorus::mem_alloc buffers Mapped (the receiver reads
  // the sender's buffer; CHORUS_SHM_MAPPED_MIN).
  std::size_t shm_mapped_min = std::size_t{16} << 20;
  // The same for messages the receiver copies (CHORUS_SHM_MAPPED_COPY_MIN):
  // those it can split with the sender (shm_split).
  std::size_t shm_mapped_copy_min = std::size_t{1} << 20;
  // shm: a Mapped message received by a copy into mem_alloc memory is
  // copied by both ranks, each claiming pieces, the sender writing into the
  // receiver's buffer: "on"; "off"; "sender" (tests) leaves every piece to
  // the sender (CHORUS_SHM_SPLIT).
  std::string shm_split = "on";
  // libfabric: the provider to use (CHORUS_FI_PROVIDER; empty: the best
  // offered), and whether to register memory even when the provider does not
  // ask for it ("always", CHORUS_FI_MR) rather than only when it does ("auto").
  std::string fi_provider;
  std::string fi_mr = "auto";
  // Large messages by one-sided writes (FI_RMA) where the provider offers
  // them: "auto" (where a failed receiver's memory is safe from late
  // writes), "on", "off" (CHORUS_FI_RMA, docs/transports.md).
  std::string fi_rma = "auto";
};

using TransportFactory = std::function<std::unique_ptr<Transport>(const TransportContext&)>;

// Registry: each transport folder registers its factory at static
// initialisation (see TCP's registration); the communicator finds it by name.
bool register_transport(const std::string& name, TransportFactory factory);
std::unique_ptr<Transport> create_transport(const std::string& name, const TransportContext& ctx);
std::vector<std::string> transport_names();

// The start of every name a transport gives to something in /dev/shm:
// "chorus-<job>-", the job being CHORUS_JOB_ID (letters and digits, at most
// 32; chorusrun sets it) or "p<pid>". chorusrun removes what a killed rank
// left under its job's prefix, and the test script fails on any "chorus-"
// name the suites leave behind.
std::string shm_name_prefix();

// Unlinks every /dev/shm entry whose name starts with `prefix`; returns the
// names removed.
std::vector<std::string> remove_shm_files(const std::string& prefix);

// The transport(s) of one communicator: `name` from the registry, or "auto":
// shm for the peers on this host that it reaches, tcp for the others.
std::unique_ptr<Transport> create_transports(const std::string& name, const TransportContext& ctx);

}  // namespace chorus::transport
