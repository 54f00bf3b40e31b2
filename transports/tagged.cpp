// The transport over a tag-matching fabric library: see tagged.hpp.
//
// Tags: bits 63..48 the sender's rank, 47..20 the message number of the
// pair (mod 2^28: only messages in flight at once need distinct numbers),
// 19..0 the part: 0 for the header, 1..n for the payload's chunks. A
// receive asks for one exact tag, so nothing depends on the library's
// ordering guarantees.
//
// With one-sided writes (TagFabric::can_write(), libfabric's FI_RMA), a
// payload of kWriteMin bytes or more waits for the receiver's Ready (tag
// part kReadyPart, from the receiver, with the message's number): a copy
// receive exposes its destination there and the sender writes the payload
// into it, then sends part 1 empty to say it is done; a reduce receive,
// which folds chunks from staging buffers, asks for the chunks instead.

#include "tagged.hpp"

#include "core/log.hpp"
#include "reduce/reduce.hpp"

#include <poll.h>
#include <sched.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <optional>
#include <sstream>
#include <thread>

namespace chorus::transport {
namespace {

constexpr std::uint32_t kMagic = 0x46524843;  // "CHRF"
constexpr std::uint8_t kVersion = 1;
// Payloads up to this size travel packed behind the header.
constexpr std::size_t kEagerBytes = 8 << 10;
// Larger payloads travel in chunks of this size (a wire constant: both sides
// must cut the same way). Every element size divides it.
constexpr std::size_t kChunkBytes = 4 << 20;
constexpr std::uint32_t kMaxParts = (1u << 20) - 2;
constexpr std::uint32_t kReadyPart = (1u << 20) - 1;
// Payloads from this size wait for a Ready when the fabric can write.
constexpr std::size_t kWriteMin = 64 << 10;
// Chunks in flight per send or copy-receive, and staging buffers per reduce-receive.
constexpr std::size_t kCopyWindow = 8;
constexpr std::size_t kReduceWindow = 4;
constexpr int kMaxRanks = 1 << 16;
// While a wait polls: how often it reads the control sockets, and how often
// a rank that has a core to itself yields it anyway.
constexpr std::chrono::microseconds kControlEvery{100};
// How long a failure the control sockets report waits for the fabric to
// deliver what the failed peers sent before it (read_control).
constexpr std::chrono::milliseconds kNoticeDrain{100};
constexpr std::chrono::microseconds kYieldEvery{20};
// How long a rank with a core of its own keeps polling, after the last
// movement, while a payload chunk of its own is in flight. In a rendezvous
// the peer moves the bytes (UCX's cma reads them from our memory), so our
// side sees nothing move for the whole copy (about 0.3-0.5 ms per 4 MiB
// chunk here); a rank that went to sleep meanwhile makes the peer pay a
// wake-up system call per chunk on its copying thread (measured: 10% of it).
constexpr std::chrono::microseconds kTransferSpin{2000};

struct WireHeader {
  std::uint32_t magic;
  std::uint8_t version;
  std::uint8_t coll;
  std::uint8_t dtype;
  std::uint8_t op;
  std::int32_t root;
  std::uint32_t pad;
  std::uint64_t seq;
  std::uint64_t count;
  std::uint64_t comm_id;
  std::uint64_t payload;
};
static_assert(sizeof(WireHeader) == 48, "wire header must be 48 bytes");

// Receiver to sender: how to deliver a payload of kWriteMin bytes or more.
// It opens with the receive's call and size (a header with magic
// kReadyMagic), so that a sender whose call differs says so at once, as
// the receiver does on its header.
struct WireReady {
  WireHeader call;
  std::uint8_t write;  // 1: write into addr/key; 0: send the chunks
  std::uint8_t pad[7];
  std::uint64_t addr;
  std::uint64_t key;
};
static_assert(sizeof(WireReady) == 72, "ready message must be 72 bytes");
constexpr std::uint32_t kReadyMagic = 0x59445243;  // "CRDY"

std::uint64_t make_tag(int src, std::uint32_t msg, std::uint32_t part) {
  return (static_cast<std::uint64_t>(src) << 48) |
         (static_cast<std::uint64_t>(msg & 0x0fffffffu) << 20) | part;
}

std::uint32_t parts_of(std::size_t bytes) {
  return bytes <= kEagerBytes ? 0
                              : static_cast<std::uint32_t>((bytes + kChunkBytes - 1) / kChunkBytes);
}

// One chunk in flight.
struct Slot {
  FabricOp op;
  std::uint32_t part = 0;   // 0: free
  char* staging = nullptr;  // reduce receives: where the chunk lands
};

struct SendTask {
  Request req;
  CallDesc call;
  int peer = -1;
  std::uint32_t msg = 0;
  const char* buf = nullptr;
  std::size_t bytes = 0;
  std::vector<char> head;  // header (+ packed payload)
  FabricOp head_op;
  std::uint32_t parts = 0, next_part = 1, parts_done = 0;
  std::vector<Slot> slots;
  // Waiting for the receiver's Ready; then writing (and the closing part 1).
  bool await_ready = false, ready_checked = false, writes = false;
  WireReady ready{};
  FabricOp ready_op, fin_op;
};

struct RecvTask {
  Request req;
  CallDesc call;
  int peer = -1;
  std::uint32_t msg = 0;
  char* dst = nullptr;
  std::size_t bytes = 0;
  Combine combine;
  std::vector<char> head;  // sized for any header + packed payload
  FabricOp head_op;
  bool head_checked = false;
  std::string chunk_error;  // a chunk failed before the header was checked
  std::uint32_t parts = 0, next_part = 1, parts_done = 0;
  std::vector<Slot> slots;
  // Sends a Ready first; `writes`: the sender writes, then sends part 1 empty.
  bool send_ready = false, writes = false;
  WireReady ready{};
  FabricOp ready_op, fin_op;
};

}  // namespace

TagFabric::Region TagFabric::expose(void*, std::size_t) {
  throw Error(ErrorCode::Internal, "this fabric cannot take one-sided writes");
}

bool TagFabric::write(int, const void*, std::size_t, std::uint64_t, std::uint64_t, FabricOp&) {
  throw Error(ErrorCode::Internal, "this fabric cannot write one-sided");
}

namespace {

class TaggedTransport final : public Transport {
 public:
  TaggedTransport(const std::string& name, const TransportContext& ctx,
                  std::unique_ptr<TagFabric> fabric)
      : name_(name),
        ctx_(ctx),
        fabric_(std::move(fabric)),
        fs_(name_.c_str()),
        send_msg_(static_cast<std::size_t>(ctx.size), 0),
        recv_msg_(static_cast<std::size_t>(ctx.size), 0),
        touched_(static_cast<std::size_t>(ctx.size), false),
        known_(static_cast<std::size_t>(ctx.size), false),
        addresses_(static_cast<std::size_t>(ctx.size)) {
    if (ctx.size > kMaxRanks)
      throw Error(ErrorCode::InvalidArgument, name_ + " transport: at most " +
                                                  std::to_string(kMaxRanks) +
                                                  " ranks (the tag holds 16 bits of rank)");
    // Control traffic and liveness: a TCP transport of its own, under its own store prefix.
    TransportContext cc = ctx;
    cc.store = std::make_shared<PrefixStore>("ctl", ctx.store);
    control_ = create_transport("tcp", cc);
    ctx_.store->set(key(ctx.rank), fabric_->address());
    CHORUS_INFO(name_ << " transport: rank " << ctx.rank << " on " << fabric_->describe());
  }

  ~TaggedTransport() override {
    release_fabric(!fs_.failed() && sends_.empty() && recvs_.empty());
    control_.reset();  // says goodbye to the peers (unless failed)
  }

  std::string name() const override { return name_; }
  Capabilities capabilities(int) const override { return {}; }

  Request isend(int peer, const CallDesc& call, const void* buf, std::size_t bytes) override {
    check_usable(peer);
    check_size(bytes);
    reach(peer);
    auto t = std::make_unique<SendTask>();
    t->req = new_request(peer, bytes, true);
    t->call = call;
    t->peer = peer;
    t->msg = send_msg_[static_cast<std::size_t>(peer)]++;
    t->buf = static_cast<const char*>(buf);
    t->bytes = bytes;
    t->parts = parts_of(bytes);
    const WireHeader h = make_header(kMagic, call, bytes);
    t->head.resize(sizeof h + (t->parts == 0 ? bytes : 0));
    std::memcpy(t->head.data(), &h, sizeof h);
    if (t->parts == 0 && bytes > 0) reduce::copy(t->head.data() + sizeof h, buf, bytes);
    t->slots.resize(std::min<std::size_t>(t->parts, kCopyWindow));
    t->await_ready = fabric_->can_write() && bytes >= kWriteMin;
    count_sent(peer, bytes);
    Request r = t->req;
    sends_.push_back(std::move(t));
    step(*sends_.back());  // small messages usually leave here
    if (sends_.back()->req->done) sends_.pop_back();
    return r;
  }

  Request irecv(int peer, const CallDesc& call, void* dst, std::size_t bytes,
                Combine combine) override {
    check_usable(peer);
    check_size(bytes);
    reach(peer);
    auto t = std::make_unique<RecvTask>();
    t->req = new_request(peer, bytes, false);
    t->call = call;
    t->peer = peer;
    t->msg = recv_msg_[static_cast<std::size_t>(peer)]++;
    t->dst = static_cast<char*>(dst);
    t->bytes = bytes;
    t->combine = combine;
    t->parts = parts_of(bytes);
    t->head = take_head_buffer();
    const bool reduce = combine.kind == Combine::Kind::Reduce;
    t->send_ready = fabric_->can_write() && bytes >= kWriteMin;
    t->writes = t->send_ready && !reduce;
    if (!t->writes)
      t->slots.resize(std::min<std::size_t>(t->parts, reduce ? kReduceWindow : kCopyWindow));
    count_received(peer, bytes);
    Request r = t->req;
    recvs_.push_back(std::move(t));
    step(*recvs_.back());
    return r;
  }

  // Reads the control sockets (a dead peer, a failure notice) every
  // kControlEvery, not on every call: the worker thread drives posted
  // requests through here in a loop, and their accept4/recvfrom on every
  // turn were most of a receiving rank's system calls.
  void progress() override { progress(control_due(Clock::now())); }

  void wait(std::span<const Request> reqs, Deadline deadline) override {
    wait_keeping_late_failure(reqs, &fs_, [&] { wait_all(reqs, deadline); });
  }

  void wait_all(std::span<const Request> reqs, Deadline deadline) {
    auto spin_until = Clock::now() + ctx_.spin;
    auto last_moved = Clock::now();
    auto nap = std::chrono::microseconds(20);
    const bool can_sleep = fabric_->wait_fd() >= 0;
    std::size_t first_pending = 0;
    // The control sockets (a dead peer, a failure notice) are read every
    // kControlEvery, and a rank with a core of its own yields every
    // kYieldEvery while it polls: each is a system call or three (about a
    // microsecond each on these VMs), which every 64 and 16 rounds of a
    // ~0.1 us poll put on most small messages' latency.
    auto now = Clock::now();
    auto next_yield = now + kYieldEvery;
    for (;;) {
      const bool moved = progress(control_due(now));
      while (first_pending < reqs.size() && reqs[first_pending]->done) ++first_pending;
      if (first_pending == reqs.size()) return;
      fs_.throw_if_aborted();
      now = Clock::now();
      if (now >= deadline) resolve_timeout(reqs, deadline);
      // Keep polling while data moves: the libraries move bytes only when
      // driven (UCX's tcp transport, libfabric's rxm), so sleeping during
      // a transfer would stall it.
      if (moved) {
        spin_until = std::max(spin_until, now + ctx_.spin);
        last_moved = now;
        nap = std::chrono::microseconds(20);
      }
      if (now < spin_until || (now - last_moved < kTransferSpin && chunk_in_flight())) {
        if (ctx_.oversubscribed || now >= next_yield) {
          sched_yield();
          next_yield = now + kYieldEvery;
        }
        continue;
      }
      if (can_sleep) {
        // Until the library has an event; the control sockets (a dead
        // peer, a failure notice) are read after each wake-up.
        sleep(deadline);
        progress(true);
      } else if (now - last_moved < std::chrono::milliseconds(10)) {
        // No descriptor to sleep on (libfabric's shm provider): poll,
        // yielding the CPU between looks, as MPI libraries do on shared
        // memory; napping would add its length to every message's latency.
        sched_yield();
      } else {
        // A long wait (a slow peer): nap, a little longer each time.
        std::this_thread::sleep_for(nap);
        nap = std::min(nap * 2, std::chrono::microseconds(200));
        progress(true);
      }
    }
  }

  // Whether the control sockets are due for a read at `now` (then the next
  // read is kControlEvery later).
  bool control_due(Clock::time_point now) {
    if (now < next_control_) return false;
    next_control_ = now + kControlEvery;
    return true;
  }

  // A payload chunk of ours is posted and not complete (a rank that shares
  // its core does not count: it hands the CPU over instead).
  bool chunk_in_flight() const {
    if (ctx_.oversubscribed || ctx_.spin.count() == 0) return false;
    auto busy = [](const auto& t) { return t->next_part > 1 && t->parts_done < t->parts; };
    return std::any_of(sends_.begin(), sends_.end(), busy) ||
           std::any_of(recvs_.begin(), recvs_.end(), busy);
  }

  void block_for(std::chrono::microseconds max) override {
    // The worker thread's wait for posted requests: as in wait(), a rank
    // with a core of its own does not sleep through a peer's copy of a chunk.
    if (Clock::now() - last_moved_ < kTransferSpin && chunk_in_flight()) {
      sched_yield();
      return;
    }
    if (fabric_ && fabric_->wait_fd() >= 0)
      sleep(Clock::now() + max);
    else
      std::this_thread::sleep_for(std::min(max, std::chrono::microseconds(50)));
  }

  void abort(const std::string& why) noexcept override {
    fs_.request_abort(why);
    control_->abort(why);
  }

  void broadcast_failure(const Error& e) noexcept override { control_->broadcast_failure(e); }

  void group_ready() override {
    control_->group_ready();
    // Read every address now: the rank hosting the store may be gone by the
    // time a first message to some peer is sent.
    for (int r = 0; r < ctx_.size; ++r)
      if (r != ctx_.rank && ctx_.store->check({key(r)}))
        addresses_[static_cast<std::size_t>(r)] = ctx_.store->get(key(r));
  }


 private:
  std::string key(int r) const { return name_ + "/" + std::to_string(r); }

  WireHeader make_header(std::uint32_t magic, const CallDesc& call, std::size_t bytes) const {
    WireHeader h{};
    h.magic = magic;
    h.version = kVersion;
    h.coll = encode_coll(call);
    h.dtype = static_cast<std::uint8_t>(call.dtype);
    h.op = encode_op(call);
    h.root = call.root;
    h.seq = call.seq;
    h.count = call.count;
    h.comm_id = ctx_.comm_id;
    h.payload = bytes;
    return h;
  }

  static Request new_request(int peer, std::size_t bytes, bool is_send) {
    auto r = std::make_shared<RequestState>();
    r->peer = peer;
    r->is_send = is_send;
    r->bytes = bytes;
    return r;
  }

  // Closes the endpoint: after a clean run with a flush; otherwise
  // cancelling what is posted, and at once, without driving the library
  // again. The libraries place data only when driven (here: progress()), and
  // a failed transport is never driven again, so the receive buffers of a
  // failed call, which the caller may free once the error reaches it, are
  // not written after the throw.
  void release_fabric(bool clean) noexcept {
    if (!fabric_) return;
    if (!clean) {
      auto cancel = [&](auto& t) {
        cancel_all(t->head_op, t->slots);
        cancel_all(t->ready_op, {});
        cancel_all(t->fin_op, {});
      };
      for (auto& t : sends_) cancel(t);
      for (auto& t : recvs_) cancel(t);
    }
    try {
      fabric_->close(clean);
    } catch (...) {
    }
    fabric_.reset();
  }

  void check_usable(int peer) {
    fs_.throw_if_failed();
    fs_.throw_if_aborted();
    if (peer < 0 || peer >= ctx_.size || peer == ctx_.rank)
      throw Error(ErrorCode::Internal, name_ + " transport: bad peer " + std::to_string(peer));
  }

  void check_size(std::size_t bytes) {
    if (bytes > kChunkBytes * kMaxParts)
      throw Error(ErrorCode::InvalidArgument,
                  name_ + " transport: a message of " + std::to_string(bytes) +
                      " bytes is larger than the 4 TiB a message may carry");
  }

  // First contact with a peer: its fabric address, and a control connection
  // (one zero-byte message) so that each side's death closes a socket the
  // other one reads.
  void reach(int peer) {
    const auto p = static_cast<std::size_t>(peer);
    if (!known_[p]) {
      if (addresses_[p].empty()) addresses_[p] = ctx_.store->get(key(peer));
      try {
        fabric_->add_peer(peer, addresses_[p]);
      } catch (const Error& e) {
        // A peer that failed lets go of its endpoint at once; its failure
        // notice, on the way, is the better error.
        if (e.code() == ErrorCode::InvalidUsage) fs_.fail(e);
        fail_peer(peer, e.what());
      }
      known_[p] = true;
    }
    if (!touched_[p]) {
      touched_[p] = true;
      guarded([&] { control_->isend(peer, CallDesc{}, nullptr, 0); });
    }
  }

  template <class F>
  void guarded(F&& f) {
    try {
      f();
    } catch (const Error& e) {
      fs_.fail(e);
    }
  }

  std::vector<char> take_head_buffer() {
    if (heads_.empty()) return std::vector<char>(sizeof(WireHeader) + kEagerBytes);
    std::vector<char> b = std::move(heads_.back());
    heads_.pop_back();
    return b;
  }

  char* take_staging() {
    if (staging_free_.empty()) {
      staging_.push_back(std::make_unique<char[]>(kChunkBytes));
      return staging_.back().get();
    }
    char* b = staging_free_.back();
    staging_free_.pop_back();
    return b;
  }

  std::size_t chunk_length(std::size_t bytes, std::uint32_t part) const {
    const std::size_t off = static_cast<std::size_t>(part - 1) * kChunkBytes;
    return std::min(kChunkBytes, bytes - off);
  }

  // Sleeps until the fabric signals an event, at most 10 ms (then the
  // control sockets are read) and never past `until`.
  void sleep(Deadline until) {
    bool armed = false;
    guarded([&] { armed = fabric_->arm(); });
    if (!armed) return;
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
    pollfd p{fabric_->wait_fd(), POLLIN, 0};
    ::poll(&p, 1, static_cast<int>(std::clamp<long long>(left + 1, 0, 10)));
  }

  // ---- progress ----------------------------------------------------------

  // Returns whether anything moved. `control` also reads the control sockets.
  bool progress(bool control) {
    fs_.throw_if_failed();
    unsigned events = 0;
    guarded([&] { events = fabric_->progress(); });
    check_peer_errors();
    bool moved = events > 0;
    if (moved) last_moved_ = Clock::now();
    for (auto it = sends_.begin(); it != sends_.end();) {
      moved |= step(**it);
      if ((*it)->req->done)
        it = sends_.erase(it);
      else
        ++it;
    }
    for (auto it = recvs_.begin(); it != recvs_.end();) {
      moved |= step(**it);
      if ((*it)->req->done) {
        heads_.push_back(std::move((*it)->head));
        it = recvs_.erase(it);
      } else {
        ++it;
      }
    }
    // The control sockets last: a failure notice read there must not keep
    // this round from completing receives whose data had already arrived.
    if (control) read_control();
    settle_notice();
    return moved;
  }

  // Reads the control sockets. A failure they report (a peer's notice, a
  // death) is acted on once nothing is outstanding here, or kNoticeDrain
  // after it arrived: a fabric delivers what a peer sent before it failed
  // over several progress rounds, and those receives complete first
  // (Transport::wait; the TCP transport does the same within one round).
  void read_control() {
    if (notice_) return;  // the control transport has failed: it would throw it again
    try {
      control_->progress();
    } catch (const Error& e) {
      notice_ = e;
      notice_deadline_ = Clock::now() + kNoticeDrain;
    }
  }

  void settle_notice() {
    if (notice_ && ((sends_.empty() && recvs_.empty()) || Clock::now() >= notice_deadline_))
      fs_.fail(*notice_);
  }

  bool post_send(SendTask& t, FabricOp& op, std::uint32_t part, const void* buf, std::size_t len) {
    op.reset();
    bool ok = false;
    guarded([&] { ok = fabric_->send(t.peer, make_tag(ctx_.rank, t.msg, part), buf, len, op); });
    return ok;
  }

  bool post_write(SendTask& t, FabricOp& op, std::size_t off, std::size_t len) {
    op.reset();
    bool ok = false;
    guarded([&] {
      ok = fabric_->write(t.peer, t.buf + off, len, t.ready.addr + off, t.ready.key, op);
    });
    return ok;
  }

  bool post_recv(RecvTask& t, FabricOp& op, std::uint32_t part, void* buf, std::size_t len) {
    op.reset();
    bool ok = false;
    guarded([&] { ok = fabric_->recv(make_tag(t.peer, t.msg, part), buf, len, op); });
    return ok;
  }

  [[noreturn]] void op_failed(int peer, bool is_send, const FabricOp& op) {
    fail_peer(peer, name_ + ": " + (is_send ? "send to" : "receive from") + " rank " +
                        std::to_string(peer) + " failed: " + op.error);
  }

  // The fabric says `peer` is out of reach. The control connection usually
  // explains why within moments, better (a failure notice from a peer that
  // failed and let go of its endpoint, or the death of its process, with its
  // address): listen to it briefly, then fail with `what`.
  [[noreturn]] void fail_peer(int peer, const std::string& what) {
    const auto until = Clock::now() + std::chrono::milliseconds(500);
    while (Clock::now() < until) {
      read_control();
      if (notice_) fs_.fail(*notice_);
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    fs_.fail(Error(
        ErrorCode::PeerFailure,
        what + "; the rank is unreachable (its process died, or its communicator failed)", peer));
  }

  bool step(SendTask& t) {
    bool moved = false;
    if (!t.head_op.posted && !t.head_op.done)
      moved |= post_send(t, t.head_op, 0, t.head.data(), t.head.size());
    if (t.head_op.done && !t.head_op.error.empty()) op_failed(t.peer, true, t.head_op);
    if (t.await_ready && !t.ready_checked) {
      if (!t.ready_op.posted && !t.ready_op.done) {
        t.ready_op.reset();
        guarded([&] {
          moved |= fabric_->recv(make_tag(t.peer, t.msg, kReadyPart), &t.ready, sizeof t.ready,
                                 t.ready_op);
        });
      }
      if (!t.ready_op.done) return moved;
      check_ready(t);
      moved = true;
    }
    // The payload: chunks as messages, or written into the receiver's
    // exposed destination; a window of them at a time.
    for (Slot& s : t.slots) {
      if (s.part != 0 && s.op.done) {
        if (!s.op.error.empty()) op_failed(t.peer, true, s.op);
        ++t.parts_done;
        s.part = 0;
        moved = true;
      }
      if (s.part == 0 && t.next_part <= t.parts) {
        const std::uint32_t part = t.next_part;
        const std::size_t off = static_cast<std::size_t>(part - 1) * kChunkBytes;
        const std::size_t len = chunk_length(t.bytes, part);
        if (!(t.writes ? post_write(t, s.op, off, len) : post_send(t, s.op, part, t.buf + off, len)))
          break;
        s.part = part;
        ++t.next_part;
        moved = true;
      }
    }
    if (!t.writes) {
      if (t.head_op.done && t.parts_done == t.parts) t.req->done = true;
      return moved;
    }
    // After the writes, part 1 empty: the receive is complete when it
    // arrives, since each write was done before it was sent.
    if (t.parts_done == t.parts && !t.fin_op.posted && !t.fin_op.done)
      moved |= post_send(t, t.fin_op, 1, nullptr, 0);
    if (t.fin_op.done && !t.fin_op.error.empty()) op_failed(t.peer, true, t.fin_op);
    if (t.head_op.done && t.fin_op.done) t.req->done = true;
    return moved;
  }

  [[noreturn]] void malformed_from(int peer, const std::string& why) {
    fs_.fail(Error(ErrorCode::Transport,
                   "malformed message from rank " + std::to_string(peer) + " (" + name_ + "): " +
                       why + "; the peer is not a Chorus peer of this build or the data is corrupt",
                   peer));
  }

  // A header from `peer` (a message's, magic kMagic, or a Ready's,
  // kReadyMagic) against this rank's own call and size: a call that differs
  // is InvalidUsage naming both.
  void check_call_header(const WireHeader& h, std::uint32_t magic, const CallDesc& mine, int peer,
                         std::size_t bytes) {
    if (h.magic != magic) malformed_from(peer, "bad magic");
    if (h.version != kVersion) malformed_from(peer, "wire version " + std::to_string(h.version));
    if (h.comm_id != ctx_.comm_id) malformed_from(peer, "message for another communicator");
    const CallDesc theirs = wire_call(h.coll, h.dtype, h.op, h.root, h.count, h.seq);
    guarded([&] { check_same_call(mine, ctx_.rank, theirs, peer); });
    if (h.payload != bytes)
      fs_.fail(Error(ErrorCode::Internal,
                     "rank " + std::to_string(peer) + " has " + std::to_string(h.payload) +
                         " bytes for this rank's " + std::to_string(bytes) + " in " +
                         describe(mine),
                     peer));
  }

  // The receiver's Ready: how it wants the payload.
  void check_ready(SendTask& t) {
    const FabricOp& op = t.ready_op;
    if (!op.error.empty() && !op.truncated) op_failed(t.peer, true, op);
    const WireReady& r = t.ready;
    if (op.truncated || op.received != sizeof r)
      malformed_from(t.peer, "a ready message of " + std::to_string(op.received) + " bytes");
    check_call_header(r.call, kReadyMagic, t.call, t.peer, t.bytes);
    if (r.write > 1)
      malformed_from(t.peer, "a ready message asking for delivery " + std::to_string(r.write));
    t.writes = r.write != 0;
    t.ready_checked = true;
  }

  // A receive that sends a Ready: exposes its destination (copies) or asks
  // for chunks (reductions) first.
  bool step_ready(RecvTask& t) {
    bool moved = false;
    if (!t.ready_op.posted && !t.ready_op.done) {
      if (t.ready.call.magic == 0) {
        t.ready.call = make_header(kReadyMagic, t.call, t.bytes);
        if (t.writes) {
          TagFabric::Region r;
          guarded([&] { r = fabric_->expose(t.dst, t.bytes); });
          t.ready.write = 1;
          t.ready.addr = r.addr;
          t.ready.key = r.key;
        }
      }
      t.ready_op.reset();
      guarded([&] {
        moved |= fabric_->send(t.peer, make_tag(ctx_.rank, t.msg, kReadyPart), &t.ready,
                               sizeof t.ready, t.ready_op);
      });
    }
    if (t.ready_op.done && !t.ready_op.error.empty()) op_failed(t.peer, false, t.ready_op);
    return moved;
  }

  bool step(RecvTask& t) {
    bool moved = false;
    if (!t.head_op.posted && !t.head_op.done)
      moved |= post_recv(t, t.head_op, 0, t.head.data(), t.head.size());
    if (t.send_ready) moved |= step_ready(t);
    if (t.head_op.done && !t.head_checked) {
      check_head(t);
      moved = true;
    }
    if (t.writes) {
      // The sender writes the payload, then sends part 1 empty.
      if (!t.fin_op.posted && !t.fin_op.done) moved |= post_recv(t, t.fin_op, 1, nullptr, 0);
      if (t.fin_op.done && !t.fin_op.error.empty() && !t.fin_op.truncated)
        op_failed(t.peer, false, t.fin_op);
      if (t.fin_op.done && (t.fin_op.truncated || t.fin_op.received != 0) && t.head_checked)
        fs_.fail(Error(ErrorCode::Transport,
                       name_ + ": message from rank " + std::to_string(t.peer) + " in " +
                           describe(t.call) + ": chunks arrived where writes were asked for",
                       t.peer));
      if (t.head_checked && t.fin_op.done && t.ready_op.done) {
        t.req->done = true;
        fabric_->exposed_done();
      }
      return moved;
    }
    const bool reduce = t.combine.kind == Combine::Kind::Reduce;
    for (Slot& s : t.slots) {
      if (s.part != 0 && s.op.done) {
        if (!s.op.error.empty() || s.op.received != chunk_length(t.bytes, s.part)) {
          if (s.op.truncated || s.op.error.empty()) {
            // Sizes disagree: the header (sent first) names the other call.
            t.chunk_error = "chunk " + std::to_string(s.part) + " of a " + std::to_string(t.bytes) +
                            "-byte message arrived with a different size";
            s.part = 0;
            continue;
          }
          op_failed(t.peer, false, s.op);
        }
        if (reduce) {
          const std::size_t off = static_cast<std::size_t>(s.part - 1) * kChunkBytes;
          combine_into(t.combine, t.dst, off, s.staging, s.op.received);
          staging_free_.push_back(s.staging);
          s.staging = nullptr;
        }
        ++t.parts_done;
        s.part = 0;
        moved = true;
      }
      if (s.part == 0 && t.next_part <= t.parts && t.chunk_error.empty()) {
        const std::uint32_t part = t.next_part;
        const std::size_t len = chunk_length(t.bytes, part);
        char* where = t.dst + static_cast<std::size_t>(part - 1) * kChunkBytes;
        if (reduce) {
          if (s.staging == nullptr) s.staging = take_staging();
          where = s.staging;
        }
        if (!post_recv(t, s.op, part, where, len)) break;
        s.part = part;
        ++t.next_part;
        moved = true;
      }
    }
    if (!t.chunk_error.empty() && t.head_checked)
      fs_.fail(Error(ErrorCode::Transport,
                     name_ + ": message from rank " + std::to_string(t.peer) + " in " +
                         describe(t.call) + ": " + t.chunk_error,
                     t.peer));
    if (t.head_checked && t.parts_done == t.parts) t.req->done = true;
    return moved;
  }

  void check_head(RecvTask& t) {
    const FabricOp& op = t.head_op;
    auto malformed = [&](const std::string& why) { malformed_from(t.peer, why); };
    if (!op.error.empty() && !op.truncated) op_failed(t.peer, false, op);
    if (op.truncated) malformed("a header larger than any header");
    if (op.received < sizeof(WireHeader))
      malformed("a header of " + std::to_string(op.received) + " bytes");
    WireHeader h;
    std::memcpy(&h, t.head.data(), sizeof h);
    check_call_header(h, kMagic, t.call, t.peer, t.bytes);
    if (t.parts == 0) {
      if (op.received != sizeof h + t.bytes) malformed("packed payload of the wrong length");
      combine_into(t.combine, t.dst, 0, t.head.data() + sizeof h, t.bytes);
    }
    t.head_checked = true;
  }

  void check_peer_errors() {
    for (auto& [peer, why] : fabric_->take_peer_errors()) {
      dead_[peer] = why;
    }
    if (dead_.empty()) return;
    // Only an error while something is outstanding with that peer: a peer
    // that closed its endpoint after a clean finish also looks lost.
    for (const auto& [peer, why] : dead_) {
      bool busy = false;
      for (const auto& t : sends_) busy |= t->peer == peer;
      for (const auto& t : recvs_) busy |= t->peer == peer;
      if (!busy) continue;
      fail_peer(peer, name_ + " reports rank " + std::to_string(peer) + " lost (" + why + ")");
    }
  }

  // The deadline passed: the control transport follows the wait chain among
  // the ranks (see the TCP transport) and throws the resulting Timeout.
  // The Timeout gets what this rank still has posted, which tells a peer
  // that never posted its side from a library that never completed ours.
  [[noreturn]] void resolve_timeout(std::span<const Request> reqs, Deadline deadline) {
    try {
      control_->wait(reqs, deadline);
    } catch (const Error& e) {
      if (e.code() == ErrorCode::Timeout)
        fs_.fail(Error(e.code(), e.message() + pending_summary(), e.peer()));
      fs_.fail(e);
    }
    fs_.fail(Error(ErrorCode::Internal, name_ + ": timeout resolution returned"));
  }

  // " Still posted here (ucx): a send of 524288 B to rank 0, 1 of 1 chunks
  // handed to ucx, 0 completed; ...". At most kListed tasks by name.
  std::string pending_summary() const {
    constexpr std::size_t kListed = 4;
    std::ostringstream os;
    std::size_t listed = 0;
    for (const auto& t : sends_) {
      if (listed++ == kListed) break;
      os << (listed == 1 ? "" : "; ") << "a send of " << t->bytes << " B to rank " << t->peer;
      if (t->await_ready && !t->ready_checked) os << ", waiting for its Ready";
      else if (t->parts > 0)
        os << ", " << (t->next_part - 1) << " of " << t->parts << " chunks handed to " << name_
           << ", " << t->parts_done << " completed";
      else os << (t->head_op.done ? ", sent" : ", not completed by " + name_);
    }
    for (const auto& t : recvs_) {
      if (listed++ == kListed) break;
      os << (listed == 1 ? "" : "; ") << "a receive of " << t->bytes << " B from rank " << t->peer
         << (t->head_checked ? ", header arrived" : ", header not arrived");
      if (t->parts > 0) os << ", " << t->parts_done << " of " << t->parts << " chunks arrived";
    }
    const std::size_t total = sends_.size() + recvs_.size();
    if (total == 0) return "";
    if (total > kListed) os << "; and " << (total - kListed) << " more";
    return " Still posted here (" + name_ + "): " + os.str() + ".";
  }

  void cancel_all(FabricOp& head, std::span<Slot> slots) noexcept {
    try {
      if (head.posted) fabric_->cancel(head);
      for (Slot& s : slots)
        if (s.op.posted) fabric_->cancel(s.op);
    } catch (...) {
    }
  }

  std::string name_;
  TransportContext ctx_;
  std::unique_ptr<TagFabric> fabric_;
  std::unique_ptr<Transport> control_;
  FailureState fs_;
  std::vector<std::uint32_t> send_msg_, recv_msg_;
  std::vector<bool> touched_, known_;
  std::vector<std::vector<std::uint8_t>> addresses_;
  std::list<std::unique_ptr<SendTask>> sends_;
  std::list<std::unique_ptr<RecvTask>> recvs_;
  std::vector<std::vector<char>> heads_;
  std::vector<std::unique_ptr<char[]>> staging_;
  std::vector<char*> staging_free_;
  std::map<int, std::string> dead_;
  Clock::time_point next_control_{};  // when the control sockets are next read (control_due)
  std::optional<Error> notice_;       // what the control sockets reported (read_control)
  Clock::time_point notice_deadline_{};
  Clock::time_point last_moved_{};    // the fabric's last completion (block_for)
};

}  // namespace

std::unique_ptr<Transport> make_tagged_transport(const std::string& name,
                                                 const TransportContext& ctx,
                                                 std::unique_ptr<TagFabric> fabric) {
  return std::make_unique<TaggedTransport>(name, ctx, std::move(fabric));
}

}  // namespace chorus::transport
