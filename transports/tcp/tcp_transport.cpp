// TCP transport: one nonblocking socket per direction and peer, opened lazily
// by the sender, with every frame preceded by a 48-byte header that carries
// the CallDesc checked by the receiver.
//
// Why one socket per direction: whoever needs to send connects, so there is
// never a race over who connects first, and no connection is made to a peer
// an algorithm never talks to. Both sockets of a pair are read, because the
// reverse direction carries control frames (Goodbye, failure notices).
//
// Receives are matched in post order per peer. A data frame that arrives
// before its receive is posted is buffered ("unexpected") when it is small
// (eager); a large one is *parked*: its header is read, its payload stays in
// the kernel (TCP flow control holds the sender back) and is read straight
// into the destination once the receive is posted. So back-to-back calls, in
// which a neighbour's next call overtakes ours, cost no allocation and no
// extra copy. Failure notices travel on the reverse direction of a pair
// (which carries control frames only and is never parked), so parking never
// hides them.

#include "transport.hpp"

#include "core/enforce.hpp"
#include "core/log.hpp"
#include "core/net.hpp"
#include "reduce/reduce.hpp"

#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>

namespace chorus::transport::tcp {
namespace {

constexpr std::uint32_t kFrameMagic = 0x53524843;  // "CHRS" little-endian
constexpr std::uint8_t kWireVersion = 1;
constexpr std::uint64_t kHelloMagic = 0x3150544353524843ull;  // "CHRSTCP1"
constexpr std::size_t kStagingBytes = 256 << 10;
constexpr std::size_t kMaxNoticeBytes = 64 << 10;
// Data frames up to this size are buffered when they arrive unexpected;
// larger ones are parked in the kernel until their receive is posted.
constexpr std::uint64_t kEagerBytes = 64 << 10;
// A payload larger than this cannot be legitimate (the largest message of a
// collective is a whole user buffer); it marks a corrupt or hostile stream.
constexpr std::uint64_t kMaxPayloadBytes = 1ull << 40;

enum class FrameKind : std::uint8_t { Data = 1, Notice = 2, Goodbye = 3 };

struct FrameHeader {
  std::uint32_t magic;
  std::uint8_t version;
  std::uint8_t kind;
  std::uint8_t coll;
  std::uint8_t dtype;
  std::uint8_t op;
  std::uint8_t pad[3];
  std::int32_t root;  // Data: call root. Notice: the blamed rank.
  std::uint64_t seq;  // Notice: the ErrorCode.
  std::uint64_t count;
  std::uint64_t comm_id;
  std::uint64_t payload;
};
static_assert(sizeof(FrameHeader) == 48, "wire header must be 48 bytes");

struct Hello {
  std::uint64_t magic;
  std::uint64_t comm_id;
  std::int32_t rank;
  std::int32_t version;
};

struct SendOp {
  Request req;
  FrameHeader hdr;
  const char* buf = nullptr;
  std::size_t bytes = 0;
  std::size_t sent = 0;  // counts header + payload
};

struct RecvOp {
  Request req;
  CallDesc call;
  char* dst = nullptr;
  Combine combine;
};

struct Unexpected {
  FrameHeader hdr;
  std::vector<char> data;
};

// A connected socket and its read state machine.
struct Conn {
  net::Fd fd;
  int peer = -1;
  bool outgoing = false;
  bool closed = false;  // EOF seen (after a Goodbye) or socket dropped
  // read state
  FrameHeader hdr{};
  std::size_t hdr_got = 0;
  bool in_payload = false;
  std::uint64_t payload_got = 0;
  std::optional<RecvOp> target;  // the posted recv being filled
  std::vector<char> buffer;      // unexpected payload or notice text
  bool to_buffer = false;
  bool parked = false;           // a large data frame waits for its receive
  // reduce staging: bytes of an incomplete element carried to the next read
  std::vector<char> staging;
  std::size_t staged = 0;
  std::uint64_t reduced = 0;  // bytes of payload already combined into dst
  std::deque<SendOp> sendq;   // outgoing only
};

struct Peer {
  std::unique_ptr<Conn> out;  // we connected: data from us to the peer
  std::unique_ptr<Conn> in;   // peer connected: data from the peer to us
  std::deque<RecvOp> posted;
  std::deque<Unexpected> unexpected;
  bool said_goodbye = false;
  std::string addr;
};

struct PendingAccept {
  net::Fd fd;
  Hello hello{};
  std::size_t got = 0;
};

class TcpTransport final : public Transport {
 public:
  explicit TcpTransport(const TransportContext& ctx) : ctx_(ctx), peers_(ctx.size) {
    const std::string host = ctx.listen_host.empty() ? "127.0.0.1" : ctx.listen_host;
    std::uint16_t port = 0;
    listen_ = net::listen_tcp(host, 0, &port);
    net::set_nonblocking(listen_.get(), true);
    wake_ = net::Fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!wake_.valid()) throw_errno("eventfd");
    my_addr_ = host + ":" + std::to_string(port);
    ctx_.store->set_string("tcp/" + std::to_string(ctx.rank), my_addr_);
    CHORUS_INFO("tcp transport: rank " << ctx.rank << " listening on " << my_addr_);
  }

  ~TcpTransport() override {
    // Tell peers we are leaving on purpose, so they do not take our EOF for a crash.
    if (!fs_.failed()) {
      // First take in what has arrived: closing a socket with unread bytes,
      // or a listening socket with connections not yet accepted, resets those
      // connections, and at the peer a reset overtakes our Goodbye (it
      // discards what the peer has not read yet), so the peer would take
      // this clean exit for a crash. Frames nobody receives are routine
      // here: the tagged transports open their control connections with one
      // (tagged.cpp, reach()).
      try {
        read_all_pending();
      } catch (...) {
        // a failure found now changes nothing but whether we say goodbye
      }
    }
    if (!fs_.failed()) {
      FrameHeader g = make_header(FrameKind::Goodbye);
      for (auto& p : peers_) {
        for (Conn* c : {p.out.get(), p.in.get()})
          if (c && c->fd.valid() && !c->closed) send_control(*c, g, nullptr, 0);
      }
    }
  }

  std::string name() const override { return "tcp"; }

  Capabilities capabilities(int) const override { return {}; }

  Request isend(int peer, const CallDesc& call, const void* buf, std::size_t bytes) override {
    check_usable(peer);
    Conn& c = out_conn(peer);
    auto req = std::make_shared<RequestState>();
    req->peer = peer;
    req->is_send = true;
    req->bytes = bytes;
    SendOp op;
    op.req = req;
    op.hdr = make_header(FrameKind::Data);
    op.hdr.coll = encode_coll(call);
    op.hdr.dtype = static_cast<std::uint8_t>(call.dtype);
    op.hdr.op = encode_op(call);
    op.hdr.root = call.root;
    op.hdr.seq = call.seq;
    op.hdr.count = call.count;
    op.hdr.payload = bytes;
    op.buf = static_cast<const char*>(buf);
    op.bytes = bytes;
    count_sent(peer, bytes);
    c.sendq.push_back(op);
    // Start writing right away: small messages usually complete here, which
    // saves a trip through the wait loop.
    if (c.sendq.size() == 1) write_some(c);
    return req;
  }

  Request irecv(int peer, const CallDesc& call, void* dst, std::size_t bytes, Combine combine) override {
    check_usable(peer);
    count_received(peer, bytes);
    auto req = std::make_shared<RequestState>();
    req->peer = peer;
    req->bytes = bytes;
    Peer& p = peers_[peer];
    p.posted.push_back(RecvOp{req, call, static_cast<char*>(dst), combine});
    match_unexpected(peer);
    if (p.in && p.in->parked && !p.posted.empty()) attach(*p.in);
    return req;
  }

  void progress() override { progress(true); }

  // `full` also accepts new connections and reads the reverse direction of
  // outgoing sockets (control frames only). Neither is urgent, so the spin
  // loop does them one round in 32: the hot path is one recv per incoming
  // socket and one send per socket with queued data.
  void progress(bool full) {
    throw_if_failed();
    if (full) accept_pending();
    for (int r = 0; r < ctx_.size; ++r) {
      Peer& p = peers_[r];
      if (p.out) {
        if (!p.out->sendq.empty()) write_some(*p.out);
        if (full && !p.out->closed) read_some(*p.out);
      }
      if (p.in && !p.in->closed) read_some(*p.in);
    }
    settle_losses();
    settle_notice();
    throw_if_failed();
  }

  // A peer's failure notice fails this transport only after everything else
  // that has arrived was read: data sent before the failure completes its
  // receives first (Transport::wait), whichever socket was read first.
  void settle_notice() {
    if (!notice_ || fs_.failed()) return;
    read_all_pending();
    fail(*notice_);
  }

  void wait(std::span<const Request> reqs, Deadline deadline) override {
    wait_keeping_late_failure(reqs, &fs_, [&] { wait_all(reqs, deadline); });
  }

  void wait_all(std::span<const Request> reqs, Deadline deadline) {
    const auto spin_until = Clock::now() + ctx_.spin;
    std::size_t first_pending = 0;
    bool woke = false;
    for (unsigned iter = 0;; ++iter) {
      progress(woke || (iter & 31) == 31);
      woke = false;
      while (first_pending < reqs.size() && reqs[first_pending]->done) ++first_pending;
      if (first_pending == reqs.size()) return;
      fs_.throw_if_aborted();
      const auto now = Clock::now();
      if (now >= deadline || fs_.timeout_reported()) resolve_timeout(reqs);
      if (now < spin_until) {
        // Busy-poll briefly: on an idle core this saves the cost of a
        // sleep/wake-up; the yield keeps oversubscribed ranks moving.
        if (ctx_.oversubscribed || (iter & 15) == 15) sched_yield();
        continue;
      }
      block(deadline);
      woke = true;
    }
  }

  void abort(const std::string& why) noexcept override {
    fs_.request_abort(why);
    std::uint64_t one = 1;
    [[maybe_unused]] auto r = ::write(wake_.get(), &one, sizeof one);
  }

  void broadcast_failure(const Error& e) noexcept override {
    std::string text;
    try {
      text = e.message();
      if (text.size() > kMaxNoticeBytes) text.resize(kMaxNoticeBytes);
      FrameHeader h = make_header(FrameKind::Notice);
      h.root = e.peer();
      h.seq = static_cast<std::uint64_t>(e.code());
      h.payload = text.size();
      for (int r = 0; r < ctx_.size; ++r) {
        // The blamed rank is told too: after a call mismatch or a timeout it
        // is alive, and would otherwise wait for its own timeout.
        if (r == ctx_.rank) continue;
        Peer& p = peers_[r];
        // Prefer the socket the peer opened to us: what we write on it arrives
        // on the peer's outgoing socket, which carries control frames only
        // and is never parked behind data.
        Conn* c = (p.in && !p.in->closed) ? p.in.get() : p.out.get();
        if (c == nullptr) {
          // No socket to this peer yet: open one, briefly, just for the notice.
          try {
            c = &connect_out(r, std::chrono::seconds(1));
          } catch (...) {
            continue;
          }
        }
        if (c->closed || !c->fd.valid()) continue;
        // The send queue of this socket may hold half a frame; a notice must
        // not be spliced into it. Drop it then: the peer will notice otherwise.
        if (c->outgoing && !c->sendq.empty() && c->sendq.front().sent > 0) continue;
        send_control(*c, h, text.data(), text.size());
      }
    } catch (...) {
      // best effort by contract
    }
  }

 private:
  // ---- setup -----------------------------------------------------------

  FrameHeader make_header(FrameKind kind) const {
    FrameHeader h{};
    h.magic = kFrameMagic;
    h.version = kWireVersion;
    h.kind = static_cast<std::uint8_t>(kind);
    h.comm_id = ctx_.comm_id;
    return h;
  }

  void tune_socket(int fd) {
    net::set_nodelay(fd);
    if (ctx_.socket_buffer_bytes > 0) {
      int b = static_cast<int>(ctx_.socket_buffer_bytes);
      setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &b, sizeof b);
      setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &b, sizeof b);
    }
  }

  Conn& out_conn(int peer) {
    Peer& p = peers_[peer];
    if (p.out) return *p.out;
    return connect_out(peer, ctx_.connect_timeout);
  }

  // Connections are made lazily, but the addresses are read now: a first
  // send after rank 0 (the usual store host) has finished and exited must
  // not need the store.
  void group_ready() override {
    for (int r = 0; r < ctx_.size; ++r) {
      if (r == ctx_.rank) continue;
      Peer& p = peers_[r];
      const std::string key = "tcp/" + std::to_string(r);
      if (p.addr.empty() && ctx_.store->check({key})) p.addr = ctx_.store->get_string(key);
    }
  }

  Conn& connect_out(int peer, std::chrono::milliseconds timeout) {
    Peer& p = peers_[peer];
    if (p.addr.empty()) p.addr = ctx_.store->get_string("tcp/" + std::to_string(peer));
    auto [host, port] = net::parse_host_port(p.addr);
    // The peer listened before it published this address, so a refusal
    // means it has gone: no retrying. Pending notices may say why; they win.
    net::Fd fd;
    try {
      fd = net::connect_tcp(host, port, timeout, /*retry=*/false);
    } catch (const Error& e) {
      if (e.code() != ErrorCode::PeerFailure) throw;
      progress(true);
      fail(Error(ErrorCode::PeerFailure,
                 "rank " + std::to_string(peer) + " (" + p.addr +
                     ") refused a connection: it has exited or crashed",
                 peer));
    }
    tune_socket(fd.get());
    Hello h{kHelloMagic, ctx_.comm_id, ctx_.rank, kWireVersion};
    net::write_all(fd.get(), &h, sizeof h, Clock::now() + timeout);
    net::set_nonblocking(fd.get(), true);
    auto c = std::make_unique<Conn>();
    c->fd = std::move(fd);
    c->peer = peer;
    c->outgoing = true;
    p.out = std::move(c);
    CHORUS_TRACE("tcp: connected to rank " << peer << " at " << p.addr);
    return *p.out;
  }

  void accept_pending() {
    while (true) {
      int fd = ::accept4(listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) break;
      pending_.push_back(PendingAccept{net::Fd(fd), {}, 0});
    }
    for (std::size_t i = 0; i < pending_.size();) {
      PendingAccept& pa = pending_[i];
      const ssize_t r = ::recv(pa.fd.get(), reinterpret_cast<char*>(&pa.hello) + pa.got,
                               sizeof(Hello) - pa.got, 0);
      if (r > 0) pa.got += static_cast<std::size_t>(r);
      const bool eof = r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
      if (pa.got == sizeof(Hello)) {
        adopt(std::move(pa));
        pending_.erase(pending_.begin() + static_cast<long>(i));
      } else if (eof || (pa.got >= 8 && pa.hello.magic != kHelloMagic)) {
        CHORUS_WARN("tcp: dropped a connection from " << net::peer_name(pa.fd.get())
                                                       << ": not a Chorus peer (bad hello)");
        pending_.erase(pending_.begin() + static_cast<long>(i));
      } else {
        ++i;
      }
    }
  }

  void adopt(PendingAccept&& pa) {
    const Hello& h = pa.hello;
    const std::string from = net::peer_name(pa.fd.get());
    if (h.magic != kHelloMagic || h.version != kWireVersion) {
      CHORUS_WARN("tcp: dropped connection from " << from << ": bad hello magic/version");
      return;
    }
    if (h.comm_id != ctx_.comm_id) {
      CHORUS_WARN("tcp: dropped connection from " << from << ": it belongs to another communicator");
      return;
    }
    if (h.rank < 0 || h.rank >= ctx_.size || h.rank == ctx_.rank) {
      CHORUS_WARN("tcp: dropped connection from " << from << ": claims invalid rank " << h.rank);
      return;
    }
    Peer& p = peers_[h.rank];
    if (p.in && !p.in->closed) {
      CHORUS_WARN("tcp: dropped a second connection from rank " << h.rank << " (" << from << ")");
      return;
    }
    tune_socket(pa.fd.get());
    auto c = std::make_unique<Conn>();
    c->fd = std::move(pa.fd);
    c->peer = h.rank;
    c->outgoing = false;
    p.in = std::move(c);
    CHORUS_TRACE("tcp: accepted rank " << h.rank << " from " << from);
  }

  // ---- sending ---------------------------------------------------------

  void write_some(Conn& c) {
    while (!c.sendq.empty()) {
      SendOp& op = c.sendq.front();
      iovec iov[2];
      int n = 0;
      if (op.sent < sizeof(FrameHeader)) {
        iov[n++] = {reinterpret_cast<char*>(&op.hdr) + op.sent, sizeof(FrameHeader) - op.sent};
        if (op.bytes > 0) iov[n++] = {const_cast<char*>(op.buf), op.bytes};
      } else {
        const std::size_t off = op.sent - sizeof(FrameHeader);
        iov[n++] = {const_cast<char*>(op.buf) + off, op.bytes - off};
      }
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<std::size_t>(n);
      const ssize_t w = ::sendmsg(c.fd.get(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (w < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == EINTR) continue;
        lost_peer(c, std::strerror(errno));
        return;
      }
      op.sent += static_cast<std::size_t>(w);
      if (op.sent == sizeof(FrameHeader) + op.bytes) {
        op.req->done = true;
        c.sendq.pop_front();
      } else {
        return;  // socket buffer full
      }
    }
  }

  // Small control frames go out blocking (bounded), bypassing the queue.
  void send_control(Conn& c, const FrameHeader& h, const void* payload, std::size_t n) noexcept {
    try {
      const auto deadline = Clock::now() + std::chrono::seconds(1);
      net::write_all(c.fd.get(), &h, sizeof h, deadline);
      if (n > 0) net::write_all(c.fd.get(), payload, n, deadline);
    } catch (...) {
    }
  }

  // ---- receiving -------------------------------------------------------

  void read_some(Conn& c) {
    while (!c.closed && !c.parked) {
      if (!c.in_payload) {
        const ssize_t r = ::recv(c.fd.get(), reinterpret_cast<char*>(&c.hdr) + c.hdr_got,
                                 sizeof(FrameHeader) - c.hdr_got, MSG_DONTWAIT);
        if (!handle_read_result(c, r, c.hdr_got == 0)) return;
        c.hdr_got += static_cast<std::size_t>(r);
        if (c.hdr_got < sizeof(FrameHeader)) continue;
        begin_frame(c);
        if (failed()) return;
        continue;
      }
      // payload
      const std::uint64_t left = c.hdr.payload - c.payload_got;
      if (left == 0) {
        finish_frame(c);
        continue;
      }
      ssize_t r;
      if (c.to_buffer) {
        r = ::recv(c.fd.get(), c.buffer.data() + c.payload_got, left, MSG_DONTWAIT);
        if (!handle_read_result(c, r, false)) return;
        c.payload_got += static_cast<std::uint64_t>(r);
      } else if (c.target->combine.kind == Combine::Kind::Copy) {
        r = ::recv(c.fd.get(), c.target->dst + c.payload_got, left, MSG_DONTWAIT);
        if (!handle_read_result(c, r, false)) return;
        c.payload_got += static_cast<std::uint64_t>(r);
      } else {
        // Reduce: land bytes in a staging chunk and combine whole elements
        // straight into the destination; a partial element waits for the
        // next read.
        if (c.staging.empty()) c.staging.resize(kStagingBytes);
        const std::size_t room = c.staging.size() - c.staged;
        const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(left, room));
        r = ::recv(c.fd.get(), c.staging.data() + c.staged, want, MSG_DONTWAIT);
        if (!handle_read_result(c, r, false)) return;
        c.staged += static_cast<std::size_t>(r);
        c.payload_got += static_cast<std::uint64_t>(r);
        const std::size_t esize = size_of(c.target->combine.dtype);
        const std::size_t whole = c.staged / esize * esize;
        if (whole > 0) {
          combine_into(c.target->combine, c.target->dst, c.reduced, c.staging.data(), whole);
          c.reduced += whole;
          std::memmove(c.staging.data(), c.staging.data() + whole, c.staged - whole);
          c.staged -= whole;
        }
      }
      if (c.payload_got == c.hdr.payload) finish_frame(c);
    }
  }

  // Returns true if `r` bytes were read; false if the caller should stop
  // reading this socket now (EAGAIN, EOF, error: handled here).
  bool handle_read_result(Conn& c, ssize_t r, bool at_boundary) {
    if (r > 0) return true;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return false;
    const std::string why = r == 0 ? "connection closed" : std::strerror(errno);
    Peer& p = peers_[c.peer];
    if (r == 0 && at_boundary && p.said_goodbye) {
      c.closed = true;
      return false;
    }
    lost_peer(c, why);
    return false;
  }

  // A peer's socket closed or broke. Its death is only declared at the end
  // of the progress pass (settle_losses), after every socket has been read:
  // a notice from another rank, already received, usually says why (a call
  // mismatch that made that peer exit), and is the better error; and the
  // peer's Goodbye may still be unread on its other socket.
  void lost_peer(Conn& c, const std::string& why) {
    c.closed = true;
    if (peers_[c.peer].said_goodbye) {
      left_on_purpose(c.peer);
      return;
    }
    losses_.push_back({c.peer, why});
  }

  // A peer that said goodbye and closed: only an error if we still need it.
  void left_on_purpose(int peer) {
    const Peer& p = peers_[peer];
    if (!p.posted.empty() || (p.out && !p.out->sendq.empty()))
      fail(Error(ErrorCode::InvalidUsage,
                 "rank " + std::to_string(peer) +
                     " destroyed its communicator while this rank still had messages for it",
                 peer));
  }

  // Accepts waiting connections and reads what has arrived on every open
  // socket that is not parked.
  void read_all_pending() {
    accept_pending();
    for (auto& p : peers_)
      for (Conn* c : {p.out.get(), p.in.get()})
        if (c != nullptr && !c->closed && !c->parked) read_some(*c);
  }

  void settle_losses() {
    if (losses_.empty() || fs_.failed()) return;
    read_all_pending();
    if (notice_) fail(*notice_);  // what the peer said before it went
    std::vector<std::pair<int, std::string>> losses;
    losses.swap(losses_);
    for (const auto& [peer, why] : losses)
      if (peers_[peer].said_goodbye) left_on_purpose(peer);
    for (const auto& [peer, why] : losses) {
      if (peers_[peer].said_goodbye) continue;
      Peer& p = peers_[peer];
      if (p.addr.empty()) {
        try {  // only for the message: which host to look at
          const std::string key = "tcp/" + std::to_string(peer);
          if (ctx_.store->check({key})) p.addr = ctx_.store->get_string(key);
        } catch (...) {
        }
      }
      fail(Error(ErrorCode::PeerFailure,
                 "rank " + std::to_string(peer) + " (" + p.addr + ") failed: " + why +
                     " without a goodbye; the process died or was killed. The "
                     "communicator is unusable; restart the job.",
                 peer));
    }
  }

  void begin_frame(Conn& c) {
    const FrameHeader& h = c.hdr;
    auto malformed = [&](const std::string& why) {
      fail(Error(ErrorCode::Transport,
                 "malformed message from rank " + std::to_string(c.peer) + ": " + why +
                     "; the stream is corrupt or the peer is not a Chorus peer",
                 c.peer));
    };
    if (h.magic != kFrameMagic) return malformed("bad magic");
    if (h.version != kWireVersion) return malformed("wire version " + std::to_string(h.version));
    if (h.comm_id != ctx_.comm_id) return malformed("message for another communicator");
    const auto kind = static_cast<FrameKind>(h.kind);
    c.in_payload = true;
    c.payload_got = 0;
    c.reduced = 0;
    c.staged = 0;
    c.to_buffer = false;
    c.target.reset();
    if (kind == FrameKind::Goodbye) {
      if (h.payload != 0) return malformed("goodbye with payload");
      return;
    }
    if (kind == FrameKind::Notice) {
      if (h.payload > kMaxNoticeBytes) return malformed("oversized notice");
      c.buffer.assign(h.payload, 0);
      c.to_buffer = true;
      return;
    }
    if (kind != FrameKind::Data) return malformed("unknown frame kind " + std::to_string(h.kind));
    if (c.outgoing) return malformed("data on the reverse direction of a connection");
    if (h.payload > kMaxPayloadBytes) return malformed("payload of " + std::to_string(h.payload) + " bytes");
    Peer& p = peers_[c.peer];
    if (!p.posted.empty()) {
      RecvOp op = std::move(p.posted.front());
      p.posted.pop_front();
      try {
        check_frame(op, h, c.peer);
      } catch (const Error& e) {
        op.req->done = op.req->failed = true;  // never completes; the error says why
        fail(e);
        return;
      }
      c.target = std::move(op);
    } else if (h.payload <= kEagerBytes) {
      c.buffer.assign(h.payload, 0);
      c.to_buffer = true;
    } else {
      c.parked = true;
    }
  }

  // A receive has been posted for the frame parked on `c`: check it and
  // read the payload straight into its destination from now on.
  void attach(Conn& c) {
    Peer& p = peers_[c.peer];
    RecvOp op = std::move(p.posted.front());
    p.posted.pop_front();
    c.parked = false;
    try {
      check_frame(op, c.hdr, c.peer);
    } catch (const Error& e) {
      op.req->done = op.req->failed = true;
      fail(e);
    }
    c.target = std::move(op);
  }

  void check_frame(const RecvOp& op, const FrameHeader& h, int peer) {
    const CallDesc theirs = wire_call(h.coll, h.dtype, h.op, h.root, h.count, h.seq);
    check_same_call(op.call, ctx_.rank, theirs, peer);
    if (h.payload != op.req->bytes)
      throw Error(ErrorCode::Internal,
                  "message of " + std::to_string(h.payload) + " bytes from rank " +
                      std::to_string(peer) + " for a receive of " + std::to_string(op.req->bytes) +
                      " bytes in " + describe(op.call),
                  peer);
  }

  void finish_frame(Conn& c) {
    const auto kind = static_cast<FrameKind>(c.hdr.kind);
    Peer& p = peers_[c.peer];
    c.in_payload = false;
    c.hdr_got = 0;
    if (kind == FrameKind::Goodbye) {
      p.said_goodbye = true;
    } else if (kind == FrameKind::Notice) {
      on_notice(c);
    } else if (c.target) {
      c.target->req->done = true;
      c.target.reset();
    } else {
      p.unexpected.push_back(Unexpected{c.hdr, std::move(c.buffer)});
      c.buffer = {};
      match_unexpected(c.peer);
    }
    c.to_buffer = false;
  }

  void on_notice(Conn& c) {
    const int blamed = c.hdr.root;
    std::string text(c.buffer.begin(), c.buffer.end());
    c.buffer = {};
    if (c.hdr.seq == static_cast<std::uint64_t>(ErrorCode::Timeout) && blamed >= 0 && blamed < ctx_.size) {
      // "rank c.peer waited for rank blamed": an edge of the wait chain. The
      // waiting call resolves the chain (resolve_timeout) instead of taking
      // the first report at its word.
      fs_.note_reported_wait(c.peer, blamed);
      return;
    }
    if (!notice_) notice_ = notice_error(c.hdr.seq, blamed, c.peer, text);
  }

  void match_unexpected(int peer) {
    Peer& p = peers_[peer];
    while (!p.posted.empty() && !p.unexpected.empty()) {
      RecvOp op = std::move(p.posted.front());
      p.posted.pop_front();
      Unexpected u = std::move(p.unexpected.front());
      p.unexpected.pop_front();
      try {
        check_frame(op, u.hdr, peer);
      } catch (const Error& e) {
        op.req->done = op.req->failed = true;
        fail(e);
        return;
      }
      combine_into(op.combine, op.dst, 0, u.data.data(), u.data.size());
      op.req->done = true;
    }
  }

  // ---- waiting and failure -----------------------------------------------

 public:
  void block_for(std::chrono::microseconds max) override {
    block(Clock::now() + max, /*at_least_1ms=*/false);
  }

 private:
  void block(Deadline deadline, bool at_least_1ms = true) {
    fds_.clear();
    fds_.push_back({wake_.get(), POLLIN, 0});
    fds_.push_back({listen_.get(), POLLIN, 0});
    for (const auto& pa : pending_) fds_.push_back({pa.fd.get(), POLLIN, 0});
    for (auto& p : peers_) {
      for (Conn* c : {p.out.get(), p.in.get()}) {
        // A parked socket stays readable until its receive is posted: leave
        // it out, or poll() would return at once forever.
        if (c == nullptr || c->closed || c->parked) continue;
        short ev = POLLIN;
        if (!c->sendq.empty()) ev |= POLLOUT;
        fds_.push_back({c->fd.get(), ev, 0});
      }
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    int ms = static_cast<int>(std::clamp<long long>(left + (at_least_1ms ? 1 : 0), 0, 200));
    ::poll(fds_.data(), fds_.size(), ms);
    if (fds_[0].revents & POLLIN) {
      std::uint64_t v;
      [[maybe_unused]] auto r = ::read(wake_.get(), &v, sizeof v);
    }
  }

  bool failed() const { return fs_.failed(); }
  void throw_if_failed() const { fs_.throw_if_failed(); }
  [[noreturn]] void fail(const Error& e) { fs_.fail(e); }

  // A deadline passed here, or another rank reported one. Every rank that
  // times out waits for a neighbour, which may itself be waiting: the first
  // report would blame an innocent rank. So each waiting rank tells everyone
  // whom it waits for, listens for the others' reports for a short grace
  // period, and follows the chain to the rank that reported nothing: the one
  // that is stopped or stuck.
  [[noreturn]] void resolve_timeout(std::span<const Request> reqs) {
    broadcast_failure(fs_.own_timeout(reqs, ctx_.rank));
    const auto until = Clock::now() + FailureState::grace(ctx_.connect_timeout);
    while (Clock::now() < until) {
      progress(true);  // throws at once on any other failure (a death, a mismatch)
      block(until);
    }
    fs_.fail_timeout_chain(ctx_.rank, ctx_.size);
  }

  void check_usable(int peer) {
    throw_if_failed();
    fs_.throw_if_aborted();
    if (peer < 0 || peer >= ctx_.size || peer == ctx_.rank)
      throw Error(ErrorCode::Internal, "transport: bad peer " + std::to_string(peer));
  }

  TransportContext ctx_;
  std::vector<Peer> peers_;
  std::vector<PendingAccept> pending_;
  net::Fd listen_;
  net::Fd wake_;
  std::string my_addr_;
  FailureState fs_{"tcp"};
  std::vector<pollfd> fds_;
  // Peers whose socket broke (and why), declared dead in settle_losses().
  std::vector<std::pair<int, std::string>> losses_;
  std::optional<Error> notice_;  // the first failure notice, until settle_notice
};

[[maybe_unused]] const bool kRegistered = register_transport("tcp", [](const TransportContext& ctx) {
  return std::unique_ptr<Transport>(new TcpTransport(ctx));
});

}  // namespace
}  // namespace chorus::transport::tcp
