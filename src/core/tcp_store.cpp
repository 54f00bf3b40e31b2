#include <chorus/error.hpp>
#include <chorus/store.hpp>

#include "core/enforce.hpp"
#include "core/log.hpp"
#include "core/net.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <thread>
#include <unordered_map>
#include <unordered_set>

// Wire protocol of the TCP store (all integers little-endian):
//
//   handshake, each direction, once:  "CHORUSST" u32 version
//   request:  u32 body_len | u8 command | fields...
//   reply:    u32 body_len | u8 status  | fields...
//   a "bytes" field is u32 length + that many bytes.
//
// The server answers a GET or WAIT only once its keys exist (or its timeout,
// carried in the request, passes), so clients never poll. See the table in
// docs/architecture.md.

namespace chorus {
namespace {

using Clock = std::chrono::steady_clock;

constexpr char kMagic[8] = {'C', 'H', 'O', 'R', 'U', 'S', 'S', 'T'};
constexpr std::uint32_t kProtocolVersion = 1;
constexpr std::size_t kHandshakeBytes = 12;
// The largest legal body is a SET of a maximal key and value; 64 bytes cover
// the command byte and the length fields. Anything longer is rejected from its
// 4-byte header, before a byte of it is buffered.
constexpr std::size_t kMaxFrameBytes = kMaxStoreValueBytes + kMaxStoreKeyBytes + 64;
// A connection may buffer at most one maximal frame (plus header) unparsed.
constexpr std::size_t kMaxBufferedInput = kMaxFrameBytes + 4;
// A TIMEOUT reply lists at most this many of the missing keys.
constexpr std::size_t kMaxListedKeys = 16;
// Extra time a client waits for the server's own TIMEOUT answer before it
// concludes that the server is stalled.
constexpr std::chrono::milliseconds kReplyGrace = std::chrono::seconds(5);
// A client holds at most this many idle connections for later calls.
constexpr std::size_t kMaxIdleConnections = 4;

enum class Cmd : std::uint8_t { Set = 1, Get = 2, Add = 3, Check = 4, Wait = 5 };
enum class Status : std::uint8_t { Ok = 0, Timeout = 1, Error = 2 };

const char* cmd_name(std::uint8_t c) {
  switch (static_cast<Cmd>(c)) {
    case Cmd::Set: return "SET";
    case Cmd::Get: return "GET";
    case Cmd::Add: return "ADD";
    case Cmd::Check: return "CHECK";
    case Cmd::Wait: return "WAIT";
  }
  return "?";
}

std::uint32_t load_u32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
         static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24;
}

void store_u32(std::uint8_t* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

std::vector<std::uint8_t> handshake_bytes() {
  std::vector<std::uint8_t> h(kMagic, kMagic + sizeof kMagic);
  h.resize(kHandshakeBytes);
  store_u32(h.data() + sizeof kMagic, kProtocolVersion);
  return h;
}

// "GET / HT" -> printable text for a log line, whatever the bytes are.
std::string preview(const std::uint8_t* p, std::size_t n) {
  std::string s;
  for (std::size_t i = 0; i < n && i < 16; ++i) {
    const unsigned char c = p[i];
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      s.push_back(static_cast<char>(c));
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      s += buf;
    }
  }
  return s;
}

std::string quote_keys(const std::vector<std::string>& keys, std::size_t total) {
  std::string s;
  for (std::size_t i = 0; i < keys.size(); ++i) s += (i ? ", '" : "'") + keys[i] + "'";
  if (total > keys.size()) s += " and " + std::to_string(total - keys.size()) + " more";
  return s;
}

std::uint64_t to_wire_ms(std::chrono::milliseconds t) {
  return t.count() < 0 ? 0 : static_cast<std::uint64_t>(t.count());
}

// Saturating: a timeout of milliseconds::max() means "forever", not overflow
// (converting it to the clock's nanoseconds would overflow).
constexpr std::chrono::milliseconds kForever = std::chrono::hours(24 * 365 * 10);

Clock::time_point deadline_after(std::chrono::milliseconds t,
                                 std::chrono::milliseconds extra = std::chrono::milliseconds(0)) {
  if (t.count() < 0) t = std::chrono::milliseconds(0);
  if (t >= kForever - extra) return Clock::now() + kForever;
  return Clock::now() + t + extra;
}

Clock::time_point deadline_after_ms(std::uint64_t ms) {
  const auto capped = std::min<std::uint64_t>(ms, static_cast<std::uint64_t>(kForever.count()));
  return deadline_after(std::chrono::milliseconds(static_cast<std::int64_t>(capped)));
}

class FrameWriter {
 public:
  explicit FrameWriter(std::uint8_t code) : buf_(4) { buf_.push_back(code); }
  void u8(std::uint8_t v) { buf_.push_back(v); }
  void u32(std::uint32_t v) {
    const std::size_t at = buf_.size();
    buf_.resize(at + 4);
    store_u32(buf_.data() + at, v);
  }
  void u64(std::uint64_t v) {
    u32(static_cast<std::uint32_t>(v));
    u32(static_cast<std::uint32_t>(v >> 32));
  }
  void bytes(const void* p, std::size_t n) {
    u32(static_cast<std::uint32_t>(n));
    const auto* b = static_cast<const std::uint8_t*>(p);
    buf_.insert(buf_.end(), b, b + n);
  }
  void str(const std::string& s) { bytes(s.data(), s.size()); }
  std::size_t body_size() const { return buf_.size() - 4; }
  std::vector<std::uint8_t> finish() && {
    store_u32(buf_.data(), static_cast<std::uint32_t>(body_size()));
    return std::move(buf_);
  }

 private:
  std::vector<std::uint8_t> buf_;
};

// Parses a frame body. Every read is bounds-checked against what is left of
// the body, so a lying inner length can never read past it or allocate more
// than the (already bounded) body holds.
class FrameReader {
 public:
  FrameReader(const std::uint8_t* p, std::size_t n) : p_(p), n_(n) {}

  bool u8(std::uint8_t& v) {
    if (!need(1, "a byte")) return false;
    v = *p_;
    skip(1);
    return true;
  }
  bool u32(std::uint32_t& v) {
    if (!need(4, "a 32-bit field")) return false;
    v = load_u32(p_);
    skip(4);
    return true;
  }
  bool u64(std::uint64_t& v) {
    if (!need(8, "a 64-bit field")) return false;
    v = static_cast<std::uint64_t>(load_u32(p_)) | static_cast<std::uint64_t>(load_u32(p_ + 4)) << 32;
    skip(8);
    return true;
  }
  // A length-prefixed field of min_len..max_len bytes named `what` in errors.
  template <typename Out>
  bool bytes(Out& out, std::size_t min_len, std::size_t max_len, const char* what) {
    std::uint32_t len = 0;
    if (!u32(len)) return false;
    if (len < min_len) return fail(std::string(what) + " is empty");
    if (len > max_len)
      return fail(std::string(what) + " length " + std::to_string(len) + " exceeds the limit of " +
                  std::to_string(max_len));
    if (len > n_)
      return fail(std::string(what) + " length " + std::to_string(len) + " exceeds the " +
                  std::to_string(n_) + " bytes left in the frame");
    out.assign(p_, p_ + len);
    skip(len);
    return true;
  }
  bool key(std::string& k) { return bytes(k, 1, kMaxStoreKeyBytes, "key"); }
  // A key count, checked against the bytes left (each key takes >= 5 bytes)
  // before anything is reserved for it.
  bool key_count(std::uint32_t& n) {
    if (!u32(n)) return false;
    if (n > n_ / 5)
      return fail("key count " + std::to_string(n) + " does not fit in the " + std::to_string(n_) +
                  " bytes left in the frame");
    return true;
  }
  bool finish() {
    if (n_ != 0) return fail(std::to_string(n_) + " unexpected bytes at the end of the frame");
    return true;
  }
  const std::string& error() const { return error_; }

 private:
  bool need(std::size_t k, const char* what) {
    if (n_ >= k) return true;
    return fail(std::string("frame ends where ") + what + " was expected");
  }
  bool fail(std::string why) {
    if (error_.empty()) error_ = std::move(why);
    return false;
  }
  void skip(std::size_t k) {
    p_ += k;
    n_ -= k;
  }

  const std::uint8_t* p_;
  std::size_t n_;
  std::string error_;
};

bool parse_int64(const std::vector<std::uint8_t>& v, std::int64_t& out) {
  const char* b = reinterpret_cast<const char*>(v.data());
  const auto [end, ec] = std::from_chars(b, b + v.size(), out);
  return !v.empty() && ec == std::errc() && end == b + v.size();
}

std::string format_address(const std::string& host, std::uint16_t port) {
  const std::string h = host.empty() ? std::string("*") : host;
  if (h.find(':') != std::string::npos) return "[" + h + "]:" + std::to_string(port);
  return h + ":" + std::to_string(port);
}

}  // namespace

// ===========================================================================
// Server

struct TcpStoreServer::Impl {
  // One client connection. Only the server thread touches it.
  struct Conn {
    std::uint64_t id = 0;
    net::Fd fd;
    std::string peer;
    bool handshaken = false;
    bool peer_closed = false;  // recv() returned 0 or failed: nothing more will arrive
    std::string close_reason;  // why recv() failed, if it did
    bool dead = false;         // to be closed at the end of this loop iteration
    bool queued = false;       // on the work list
    std::vector<std::uint8_t> in;
    std::vector<std::uint8_t> out;
    std::size_t out_pos = 0;
    // A parked GET or WAIT: answered when `missing` drops to 0 or at `deadline`.
    bool parked = false;
    Cmd parked_cmd = Cmd::Get;
    std::vector<std::string> parked_keys;  // distinct
    std::size_t missing = 0;
    Clock::time_point deadline;

    bool output_pending() const { return out_pos < out.size(); }
  };

  std::string address;
  std::uint16_t port = 0;
  net::Fd listen_fd;
  net::Fd wake_fd;
  std::atomic<std::uint64_t> rejected{0};
  std::atomic<bool> stopping{false};
  std::mutex stop_mu;
  std::thread thread;

  // State of the server thread.
  std::unordered_map<std::string, std::vector<std::uint8_t>> data;
  std::map<std::uint64_t, std::unique_ptr<Conn>> conns;
  std::unordered_map<std::string, std::vector<std::uint64_t>> waiters;  // key -> parked conns
  std::vector<std::uint64_t> work;  // conns with input to parse
  std::uint64_t next_id = 1;
  Clock::time_point accept_paused_until{};

  void run() noexcept;
  void loop();
  void accept_all();
  void on_readable(Conn& c);
  void flush(Conn& c);
  void consume(Conn& c);
  void handle_frame(Conn& c, const std::uint8_t* body, std::size_t n);
  void put(const std::string& key, std::vector<std::uint8_t> value);
  void park(Conn& c, Cmd cmd, std::vector<std::string> keys, std::size_t missing, std::uint64_t ms);
  void unpark(Conn& c);
  void answer_parked(Conn& c);
  void expire_parked();
  void drain_work() {
    for (std::size_t i = 0; i < work.size(); ++i) {
      Conn* c = find(work[i]);
      if (c == nullptr) continue;
      c->queued = false;
      if (!c->dead) consume(*c);
    }
    work.clear();
  }
  void reply(Conn& c, std::vector<std::uint8_t> frame);
  void reply_timeout(Conn& c, const std::vector<std::string>& keys);
  void reject(Conn& c, const std::string& why);
  void close(Conn& c, const char* why);
  void enqueue(Conn& c) {
    if (!c.queued && !c.dead) {
      c.queued = true;
      work.push_back(c.id);
    }
  }
  Conn* find(std::uint64_t id) {
    const auto it = conns.find(id);
    return it == conns.end() ? nullptr : it->second.get();
  }
};

TcpStoreServer::TcpStoreServer(const std::string& host, std::uint16_t port)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.listen_fd = net::listen_tcp(host, port, &s.port);
  net::set_nonblocking(s.listen_fd.get(), true);
  s.address = format_address(host, s.port);
  s.wake_fd = net::Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!s.wake_fd.valid()) throw_errno("store server " + s.address + ": eventfd");
  s.thread = std::thread([&s] { s.run(); });
  CHORUS_INFO("store server listening on " << s.address);
}

TcpStoreServer::~TcpStoreServer() { stop(); }

std::uint16_t TcpStoreServer::port() const noexcept { return impl_->port; }

std::uint64_t TcpStoreServer::rejected_frames() const noexcept {
  return impl_->rejected.load(std::memory_order_relaxed);
}

void TcpStoreServer::stop() {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.stop_mu);
  if (!s.thread.joinable()) return;
  s.stopping.store(true);
  const std::uint64_t one = 1;
  // eventfd writes of 8 bytes cannot be partial; the only failure is an
  // overflowing counter, which still leaves the fd readable.
  [[maybe_unused]] const ssize_t w = ::write(s.wake_fd.get(), &one, sizeof one);
  s.thread.join();
  // Refuse new connections from now on, so that clients fail fast.
  s.listen_fd.reset();
  CHORUS_INFO("store server " << s.address << " stopped");
}

void TcpStoreServer::Impl::run() noexcept {
  try {
    loop();
  } catch (const std::exception& e) {
    // Per-connection failures are handled below; reaching here is a bug or an
    // exhausted process. Stop serving (clients then fail with PeerFailure)
    // rather than terminate the host process.
    CHORUS_WARN("store server " << address << " stopped after an internal error: " << e.what());
  }
  conns.clear();  // closes every client connection
  waiters.clear();
}

void TcpStoreServer::Impl::loop() {
  std::vector<pollfd> pfds;
  std::vector<std::uint64_t> ids;
  while (!stopping.load()) {
    pfds.clear();
    ids.clear();
    const auto now = Clock::now();
    const bool accepting = now >= accept_paused_until;
    pfds.push_back({wake_fd.get(), POLLIN, 0});
    pfds.push_back({accepting ? listen_fd.get() : -1, POLLIN, 0});
    Clock::time_point wake_at = Clock::time_point::max();
    if (!accepting) wake_at = accept_paused_until;
    for (const auto& [id, cp] : conns) {
      const Conn& c = *cp;
      short events = 0;
      // Stop reading a connection that already buffers a full frame it cannot
      // have parsed yet (back-pressure), and one that sent EOF.
      if (!c.peer_closed && c.in.size() < kMaxBufferedInput) events |= POLLIN;
      if (c.output_pending()) events |= POLLOUT;
      pfds.push_back({c.fd.get(), events, 0});
      ids.push_back(id);
      if (c.parked) wake_at = std::min(wake_at, c.deadline);
    }
    int timeout_ms = -1;
    if (wake_at != Clock::time_point::max()) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(wake_at - now).count();
      timeout_ms = left <= 0 ? 0 : static_cast<int>(std::min<long long>(left + 1, INT_MAX));
    }
    const int rc = ::poll(pfds.data(), pfds.size(), timeout_ms);
    if (rc < 0) {
      if (errno == EINTR) continue;
      CHORUS_WARN("store server " << address << ": poll failed: " << std::strerror(errno));
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    if (pfds[0].revents != 0) {
      std::uint64_t v = 0;
      [[maybe_unused]] const ssize_t r = ::read(wake_fd.get(), &v, sizeof v);
    }
    if (stopping.load()) break;
    if (pfds[1].revents & POLLIN) accept_all();
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const short rev = pfds[i + 2].revents;
      if (rev == 0) continue;
      Conn* c = find(ids[i]);
      if (c == nullptr || c->dead) continue;
      if (rev & (POLLIN | POLLHUP | POLLERR)) on_readable(*c);
      if (!c->dead && (rev & POLLOUT)) {
        flush(*c);
        if (!c->dead && !c->output_pending()) enqueue(*c);
      }
    }
    // Parsing one connection's frames can wake parked requests of others,
    // which may then have buffered frames of their own: drain the work list,
    // before and after expiring timed-out requests (which wakes more).
    drain_work();
    expire_parked();
    drain_work();
    for (auto it = conns.begin(); it != conns.end();) {
      if (it->second->dead) it = conns.erase(it);  // closes the socket
      else ++it;
    }
  }
}

void TcpStoreServer::Impl::accept_all() {
  // Bounded per iteration so that a connection storm cannot starve the
  // clients already connected.
  for (int n = 0; n < 64; ++n) {
    const int fd = ::accept4(listen_fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      // Out of file descriptors or memory: the pending connection stays in the
      // backlog, so pause accepting briefly instead of spinning on it.
      CHORUS_WARN("store server " << address << ": accept failed: " << std::strerror(errno)
                                  << "; pausing new connections for 100 ms");
      accept_paused_until = Clock::now() + std::chrono::milliseconds(100);
      return;
    }
    auto c = std::make_unique<Conn>();
    const std::uint64_t id = next_id++;
    c->id = id;
    c->fd = net::Fd(fd);
    net::set_nodelay(fd);
    c->peer = net::peer_name(fd);
    CHORUS_TRACE("store server " << address << ": connection from " << c->peer);
    Conn& ref = *c;
    conns.emplace(id, std::move(c));
    reply(ref, handshake_bytes());
  }
}

void TcpStoreServer::Impl::on_readable(Conn& c) {
  // At most 1 MiB per connection per iteration, for fairness between clients.
  std::size_t budget = 1u << 20;
  while (budget > 0 && !c.peer_closed && c.in.size() < kMaxBufferedInput) {
    const std::size_t want = std::min({std::size_t{64} << 10, budget, kMaxBufferedInput - c.in.size()});
    const std::size_t old = c.in.size();
    c.in.resize(old + want);
    const ssize_t r = ::recv(c.fd.get(), c.in.data() + old, want, MSG_DONTWAIT);
    c.in.resize(old + (r > 0 ? static_cast<std::size_t>(r) : 0));
    if (r > 0) {
      budget -= static_cast<std::size_t>(r);
      continue;
    }
    if (r == 0) {
      c.peer_closed = true;
      break;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    // A reset (e.g. the client closed with our handshake still unread) ends
    // the stream like EOF does: complete frames already buffered are still
    // served, and a partial one is reported as truncated by consume().
    c.peer_closed = true;
    c.close_reason = std::strerror(errno);
    break;
  }
  enqueue(c);
}

void TcpStoreServer::Impl::flush(Conn& c) {
  while (c.output_pending()) {
    const ssize_t r =
        ::send(c.fd.get(), c.out.data() + c.out_pos, c.out.size() - c.out_pos, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r > 0) {
      c.out_pos += static_cast<std::size_t>(r);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    close(c, r < 0 ? std::strerror(errno) : "send returned 0");
    return;
  }
  // Do not keep a 64 MiB buffer around for a connection after one large GET.
  if (c.out.capacity() > (1u << 20)) std::vector<std::uint8_t>().swap(c.out);
  c.out.clear();
  c.out_pos = 0;
}

void TcpStoreServer::Impl::consume(Conn& c) {
  if (!c.handshaken) {
    const std::size_t n = std::min(c.in.size(), sizeof kMagic);
    // Compared byte by byte as they arrive, so that a stranger (an HTTP client,
    // a port scanner, a confused rank) is dropped on its first wrong byte.
    if (n > 0 && std::memcmp(c.in.data(), kMagic, n) != 0) {
      reject(c, "not a chorus store client: it sent \"" + preview(c.in.data(), c.in.size()) +
                    "\" instead of the \"CHORUSST\" handshake (an HTTP client or a port scanner?)");
      return;
    }
    if (c.in.size() >= kHandshakeBytes) {
      const std::uint32_t version = load_u32(c.in.data() + sizeof kMagic);
      if (version != kProtocolVersion) {
        reject(c, "client speaks store protocol version " + std::to_string(version) +
                      ", this server speaks " + std::to_string(kProtocolVersion) +
                      " (are all ranks running the same chorus version?)");
        return;
      }
      c.in.erase(c.in.begin(), c.in.begin() + kHandshakeBytes);
      c.handshaken = true;
    }
  }
  // One request at a time per connection: a parked request or an unsent reply
  // holds back the next frame, which bounds what a client can make us buffer.
  while (c.handshaken && !c.dead && !c.parked && !c.output_pending() && c.in.size() >= 4) {
    const std::uint32_t len = load_u32(c.in.data());
    if (len == 0 || len > kMaxFrameBytes) {
      reject(c, "frame length " + std::to_string(len) + " is outside 1.." + std::to_string(kMaxFrameBytes));
      return;
    }
    if (c.in.size() - 4 < len) break;
    try {
      handle_frame(c, c.in.data() + 4, len);
    } catch (const std::bad_alloc&) {
      reject(c, "out of memory while handling a frame of " + std::to_string(len) + " bytes");
      return;
    }
    if (c.dead) return;
    c.in.erase(c.in.begin(), c.in.begin() + 4 + len);
    if (c.in.empty() && c.in.capacity() > (1u << 20)) std::vector<std::uint8_t>().swap(c.in);
  }
  if (c.dead) return;
  if (c.parked && c.in.size() >= kMaxBufferedInput) {
    reject(c, "sent more than a maximal frame while waiting for a reply");
    return;
  }
  if (c.peer_closed) {
    if (c.parked) {
      close(c, "client left while waiting");
    } else if (c.output_pending()) {
      // A client that only shut down its sending side still gets its answer;
      // flush() closes the connection if it is gone.
    } else if (!c.in.empty()) {
      reject(c, "connection closed" + (c.close_reason.empty() ? "" : " (" + c.close_reason + ")") +
                    " in the middle of a " + (c.handshaken ? "frame" : "handshake") + " (" +
                    std::to_string(c.in.size()) + " bytes received)");
    } else {
      close(c, c.close_reason.empty() ? nullptr : c.close_reason.c_str());
    }
  }
}

void TcpStoreServer::Impl::handle_frame(Conn& c, const std::uint8_t* body, std::size_t n) {
  FrameReader r(body, n);
  std::uint8_t code = 0;
  r.u8(code);
  const auto bad = [&] {
    reject(c, std::string("malformed ") + cmd_name(code) + " frame: " + r.error());
  };
  switch (static_cast<Cmd>(code)) {
    case Cmd::Set: {
      std::string key;
      std::vector<std::uint8_t> value;
      if (!r.key(key) || !r.bytes(value, 0, kMaxStoreValueBytes, "value") || !r.finish()) return bad();
      put(key, std::move(value));
      reply(c, FrameWriter(static_cast<std::uint8_t>(Status::Ok)).finish());
      return;
    }
    case Cmd::Get: {
      std::uint64_t ms = 0;
      std::string key;
      if (!r.u64(ms) || !r.key(key) || !r.finish()) return bad();
      const auto it = data.find(key);
      if (it != data.end()) {
        FrameWriter w(static_cast<std::uint8_t>(Status::Ok));
        w.bytes(it->second.data(), it->second.size());
        reply(c, std::move(w).finish());
      } else if (ms == 0) {
        reply_timeout(c, {key});
      } else {
        park(c, Cmd::Get, {key}, 1, ms);
      }
      return;
    }
    case Cmd::Add: {
      std::string key;
      std::uint64_t delta_bits = 0;
      if (!r.key(key) || !r.u64(delta_bits) || !r.finish()) return bad();
      const auto delta = static_cast<std::int64_t>(delta_bits);
      std::int64_t current = 0;
      const auto it = data.find(key);
      std::string error;
      if (it != data.end() && !parse_int64(it->second, current))
        error = "add('" + key + "'): the key holds a value that is not a decimal integer";
      std::int64_t next = 0;
      if (error.empty() && __builtin_add_overflow(current, delta, &next))
        error = "add('" + key + "', " + std::to_string(delta) + ") overflows int64 (current " +
                std::to_string(current) + ")";
      if (!error.empty()) {
        FrameWriter w(static_cast<std::uint8_t>(Status::Error));
        w.str(error);
        reply(c, std::move(w).finish());
        return;
      }
      const std::string s = std::to_string(next);
      put(key, std::vector<std::uint8_t>(s.begin(), s.end()));
      FrameWriter w(static_cast<std::uint8_t>(Status::Ok));
      w.u64(static_cast<std::uint64_t>(next));
      reply(c, std::move(w).finish());
      return;
    }
    case Cmd::Check: {
      std::uint32_t count = 0;
      if (!r.key_count(count)) return bad();
      bool all = true;
      std::string key;
      for (std::uint32_t i = 0; i < count; ++i) {
        if (!r.key(key)) return bad();
        all = all && data.count(key) != 0;
      }
      if (!r.finish()) return bad();
      FrameWriter w(static_cast<std::uint8_t>(Status::Ok));
      w.u8(all ? 1 : 0);
      reply(c, std::move(w).finish());
      return;
    }
    case Cmd::Wait: {
      std::uint64_t ms = 0;
      std::uint32_t count = 0;
      if (!r.u64(ms) || !r.key_count(count)) return bad();
      std::vector<std::string> keys;
      std::unordered_set<std::string> seen;
      std::size_t missing = 0;
      std::string key;
      for (std::uint32_t i = 0; i < count; ++i) {
        if (!r.key(key)) return bad();
        if (!seen.insert(key).second) continue;
        if (data.count(key) == 0) ++missing;
        keys.push_back(key);
      }
      if (!r.finish()) return bad();
      if (missing == 0) {
        reply(c, FrameWriter(static_cast<std::uint8_t>(Status::Ok)).finish());
      } else if (ms == 0) {
        reply_timeout(c, keys);
      } else {
        park(c, Cmd::Wait, std::move(keys), missing, ms);
      }
      return;
    }
  }
  reject(c, "unknown command " + std::to_string(code));
}

void TcpStoreServer::Impl::put(const std::string& key, std::vector<std::uint8_t> value) {
  const bool inserted = data.insert_or_assign(key, std::move(value)).second;
  // Keys are never deleted, so only the first set of a key can wake anyone.
  if (!inserted) return;
  const auto w = waiters.find(key);
  if (w == waiters.end()) return;
  const std::vector<std::uint64_t> ids = std::move(w->second);
  waiters.erase(w);
  for (const std::uint64_t id : ids) {
    Conn* c = find(id);
    if (c == nullptr || c->dead || !c->parked) continue;
    if (--c->missing == 0) answer_parked(*c);
  }
}

void TcpStoreServer::Impl::park(Conn& c, Cmd cmd, std::vector<std::string> keys, std::size_t missing,
                                std::uint64_t ms) {
  c.parked = true;
  c.parked_cmd = cmd;
  c.missing = missing;
  c.deadline = deadline_after_ms(ms);
  for (const auto& k : keys)
    if (data.count(k) == 0) waiters[k].push_back(c.id);
  c.parked_keys = std::move(keys);
}

void TcpStoreServer::Impl::unpark(Conn& c) {
  if (!c.parked) return;
  for (const auto& k : c.parked_keys) {
    const auto w = waiters.find(k);
    if (w == waiters.end()) continue;
    auto& v = w->second;
    v.erase(std::remove(v.begin(), v.end(), c.id), v.end());
    if (v.empty()) waiters.erase(w);
  }
  c.parked = false;
  c.parked_keys.clear();
  c.missing = 0;
}

void TcpStoreServer::Impl::answer_parked(Conn& c) {
  if (c.parked_cmd == Cmd::Get) {
    const auto& v = data.at(c.parked_keys.front());
    FrameWriter w(static_cast<std::uint8_t>(Status::Ok));
    w.bytes(v.data(), v.size());
    unpark(c);
    reply(c, std::move(w).finish());
  } else {
    unpark(c);
    reply(c, FrameWriter(static_cast<std::uint8_t>(Status::Ok)).finish());
  }
  enqueue(c);  // it may have buffered its next frame
}

void TcpStoreServer::Impl::expire_parked() {
  const auto now = Clock::now();
  for (auto& [id, cp] : conns) {
    Conn& c = *cp;
    if (c.dead || !c.parked || c.deadline > now) continue;
    const std::vector<std::string> keys = c.parked_keys;
    unpark(c);
    reply_timeout(c, keys);
    enqueue(c);
  }
}

void TcpStoreServer::Impl::reply_timeout(Conn& c, const std::vector<std::string>& keys) {
  std::vector<const std::string*> missing;
  for (const auto& k : keys)
    if (data.count(k) == 0) missing.push_back(&k);
  FrameWriter w(static_cast<std::uint8_t>(Status::Timeout));
  w.u32(static_cast<std::uint32_t>(missing.size()));
  const std::size_t listed = std::min(missing.size(), kMaxListedKeys);
  w.u32(static_cast<std::uint32_t>(listed));
  for (std::size_t i = 0; i < listed; ++i) w.str(*missing[i]);
  reply(c, std::move(w).finish());
}

void TcpStoreServer::Impl::reply(Conn& c, std::vector<std::uint8_t> frame) {
  if (c.dead) return;
  if (c.out.empty()) c.out = std::move(frame);
  else c.out.insert(c.out.end(), frame.begin(), frame.end());
  flush(c);
}

void TcpStoreServer::Impl::reject(Conn& c, const std::string& why) {
  if (c.dead) return;
  rejected.fetch_add(1, std::memory_order_relaxed);
  CHORUS_WARN("store server " << address << ": closing the connection from " << c.peer << ": " << why);
  close(c, nullptr);
}

void TcpStoreServer::Impl::close(Conn& c, const char* why) {
  if (c.dead) return;
  if (why != nullptr) CHORUS_TRACE("store server " << address << ": connection from " << c.peer << " closed: " << why);
  unpark(c);
  c.dead = true;  // the socket itself is closed at the end of the loop iteration
  c.in.clear();
  c.out.clear();
  c.out_pos = 0;
}

// ===========================================================================
// Client

namespace {

struct Reply {
  Status status = Status::Ok;
  std::vector<std::uint8_t> body;  // after the status byte
};

}  // namespace

struct TcpStore::Impl {
  std::string host;
  std::uint16_t port = 0;
  std::string address;
  std::chrono::milliseconds connect_timeout{};
  // Declared before the connections so that they close before the server stops.
  std::unique_ptr<TcpStoreServer> server;

  // Connections are pooled rather than one shared under a lock: a thread
  // blocked in get() must not stop another thread of the same process from
  // set()ting the very key it waits for (that would deadlock until timeout).
  // A single-threaded user only ever holds one connection.
  std::mutex mu;
  std::vector<net::Fd> idle;
  std::string lost;  // set once the server is known to be gone: fail fast

  net::Fd connect(std::chrono::milliseconds timeout);
  net::Fd acquire();
  void release(net::Fd fd);
  Reply call(std::vector<std::uint8_t> frame, Clock::time_point deadline, const std::string& what);
  [[noreturn]] void throw_unexpected(const std::string& what, const Reply& r);
};

net::Fd TcpStore::Impl::connect(std::chrono::milliseconds timeout) {
  net::Fd fd = net::connect_tcp(host, port, timeout);
  // The TCP connection is up, so the handshake should be immediate; still
  // bound it, in case the port belongs to something that never answers.
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  const auto hello = handshake_bytes();
  std::uint8_t theirs[kHandshakeBytes];
  try {
    net::write_all(fd.get(), hello.data(), hello.size(), deadline);
    if (!net::read_all(fd.get(), theirs, sizeof theirs, deadline))
      throw Error(ErrorCode::Transport, "it closed the connection during the handshake");
  } catch (const Error& e) {
    throw Error(ErrorCode::Transport, "store at " + address + ": handshake failed (" + e.message() +
                                          "); is that address a chorus store?");
  }
  if (std::memcmp(theirs, kMagic, sizeof kMagic) != 0)
    throw Error(ErrorCode::Transport, "the server at " + address + " is not a chorus store (it sent \"" +
                                          preview(theirs, sizeof theirs) + "\"); check the store address");
  const std::uint32_t version = load_u32(theirs + sizeof kMagic);
  if (version != kProtocolVersion)
    throw Error(ErrorCode::Transport, "the store at " + address + " speaks protocol version " +
                                          std::to_string(version) + ", this client speaks " +
                                          std::to_string(kProtocolVersion) +
                                          "; run the same chorus version everywhere");
  return fd;
}

net::Fd TcpStore::Impl::acquire() {
  {
    std::lock_guard<std::mutex> lock(mu);
    if (!lost.empty()) throw Error(ErrorCode::PeerFailure, lost);
    if (!idle.empty()) {
      net::Fd fd = std::move(idle.back());
      idle.pop_back();
      return fd;
    }
  }
  // Another thread holds the connection(s): open one more. The server has been
  // reached before, so a failure now means it went away; do not retry as long
  // as for the first connection.
  try {
    return connect(std::min(connect_timeout, std::chrono::milliseconds(10000)));
  } catch (const Error& e) {
    if (e.code() != ErrorCode::Timeout) throw;
    throw Error(ErrorCode::PeerFailure, "the store at " + address +
                                            " no longer accepts connections; has its server (rank 0 or "
                                            "chorus-store) exited? (" + e.message() + ")");
  }
}

void TcpStore::Impl::release(net::Fd fd) {
  std::lock_guard<std::mutex> lock(mu);
  if (idle.size() < kMaxIdleConnections) idle.push_back(std::move(fd));
}

Reply TcpStore::Impl::call(std::vector<std::uint8_t> frame, Clock::time_point deadline,
                           const std::string& what) {
  if (frame.size() - 4 > kMaxFrameBytes)
    CHORUS_THROW(InvalidArgument, "store at " << address << ": " << what << ": the request of "
                                              << frame.size() << " bytes exceeds the frame limit of "
                                              << kMaxFrameBytes << " bytes (too many keys?)");
  net::Fd fd = acquire();
  Reply reply;
  try {
    net::write_all(fd.get(), frame.data(), frame.size(), deadline);
    std::uint8_t hdr[4];
    if (!net::read_all(fd.get(), hdr, sizeof hdr, deadline))
      throw Error(ErrorCode::PeerFailure, "the server closed the connection");
    const std::uint32_t len = load_u32(hdr);
    if (len == 0 || len > kMaxFrameBytes)
      throw Error(ErrorCode::Transport, "store at " + address + ": " + what + ": reply length " +
                                            std::to_string(len) + " is out of bounds; is it a chorus store?");
    std::vector<std::uint8_t> body(len);
    if (!net::read_all(fd.get(), body.data(), body.size(), deadline))
      throw Error(ErrorCode::PeerFailure, "the server closed the connection");
    reply.status = static_cast<Status>(body[0]);
    reply.body.assign(body.begin() + 1, body.end());
  } catch (const Error& e) {
    // `fd` is dropped: after a partial exchange it is out of step with the server.
    if (e.code() == ErrorCode::Timeout)
      throw Error(ErrorCode::Timeout, "store at " + address + " did not answer " + what + " in time (" +
                                          e.message() + "); is the server overloaded or stopped?");
    if (e.code() == ErrorCode::Transport) throw;
    std::string msg = "lost the connection to the store at " + address + " during " + what + " (" +
                      e.message() + "); its server (rank 0 or chorus-store) has probably exited";
    {
      std::lock_guard<std::mutex> lock(mu);
      lost = msg;
      idle.clear();  // they point at the same dead server
    }
    throw Error(ErrorCode::PeerFailure, msg);
  }
  release(std::move(fd));
  return reply;
}

void TcpStore::Impl::throw_unexpected(const std::string& what, const Reply& r) {
  if (r.status == Status::Error) {
    FrameReader rd(r.body.data(), r.body.size());
    std::string msg;
    rd.bytes(msg, 0, kMaxFrameBytes, "message");
    throw Error(ErrorCode::InvalidUsage, "store at " + address + ": " + msg);
  }
  throw Error(ErrorCode::Transport, "store at " + address + ": " + what + ": unexpected reply (status " +
                                        std::to_string(static_cast<int>(r.status)) + ", " +
                                        std::to_string(r.body.size()) + " bytes)");
}

namespace {

// Builds the Error(Timeout) for a TIMEOUT reply, naming the keys still missing.
[[noreturn]] void throw_timeout(const Reply& r, const std::string& address, std::chrono::milliseconds t) {
  FrameReader rd(r.body.data(), r.body.size());
  std::uint32_t total = 0;
  std::uint32_t listed = 0;
  std::vector<std::string> keys;
  if (rd.u32(total) && rd.u32(listed)) {
    std::string k;
    for (std::uint32_t i = 0; i < listed && i < kMaxListedKeys && rd.key(k); ++i) keys.push_back(k);
  }
  throw Error(ErrorCode::Timeout,
              "timed out after " + std::to_string(t.count()) + " ms waiting for " +
                  (total == 1 ? "key " : "keys ") + quote_keys(keys, total) + " in the store at " + address +
                  "; did every rank start, and do all use the same store address?");
}

}  // namespace

TcpStore::TcpStore(const std::string& host, std::uint16_t port, const Options& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.host = host;
  s.port = port;
  s.connect_timeout = options.timeout;
  if (options.is_server) {
    s.server = std::make_unique<TcpStoreServer>(host, port);
    s.port = s.server->port();
  }
  s.address = format_address(host, s.port);
  set_timeout(options.timeout);
  s.idle.push_back(s.connect(options.timeout));
}

TcpStore::TcpStore(const std::string& host, std::uint16_t port) : TcpStore(host, port, Options{}) {}

TcpStore::~TcpStore() = default;

std::uint16_t TcpStore::port() const noexcept { return impl_->port; }

void TcpStore::set(const std::string& key, const std::vector<std::uint8_t>& value) {
  check_key(key);
  CHORUS_ENFORCE(value.size() <= kMaxStoreValueBytes, InvalidArgument,
                 "store value of " << value.size() << " bytes for key '" << key << "' exceeds the limit of "
                                   << kMaxStoreValueBytes << " bytes");
  FrameWriter w(static_cast<std::uint8_t>(Cmd::Set));
  w.str(key);
  w.bytes(value.data(), value.size());
  const Reply r = impl_->call(std::move(w).finish(), deadline_after(timeout()), "set('" + key + "')");
  if (r.status != Status::Ok || !r.body.empty()) impl_->throw_unexpected("set", r);
}

std::vector<std::uint8_t> TcpStore::get(const std::string& key) {
  check_key(key);
  const auto t = timeout();
  FrameWriter w(static_cast<std::uint8_t>(Cmd::Get));
  w.u64(to_wire_ms(t));
  w.str(key);
  // The server answers TIMEOUT itself at `t`; the grace only matters when the
  // server is stalled, and keeps the connection in step otherwise.
  const Reply r = impl_->call(std::move(w).finish(), deadline_after(t, kReplyGrace), "get('" + key + "')");
  if (r.status == Status::Timeout) throw_timeout(r, impl_->address, t);
  if (r.status == Status::Ok) {
    FrameReader rd(r.body.data(), r.body.size());
    std::vector<std::uint8_t> value;
    if (rd.bytes(value, 0, kMaxStoreValueBytes, "value") && rd.finish()) return value;
  }
  impl_->throw_unexpected("get", r);
}

std::int64_t TcpStore::add(const std::string& key, std::int64_t delta) {
  check_key(key);
  FrameWriter w(static_cast<std::uint8_t>(Cmd::Add));
  w.str(key);
  w.u64(static_cast<std::uint64_t>(delta));
  const Reply r = impl_->call(std::move(w).finish(), deadline_after(timeout()), "add('" + key + "')");
  if (r.status == Status::Ok) {
    FrameReader rd(r.body.data(), r.body.size());
    std::uint64_t v = 0;
    if (rd.u64(v) && rd.finish()) return static_cast<std::int64_t>(v);
  }
  impl_->throw_unexpected("add", r);
}

void TcpStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  for (const auto& k : keys) check_key(k);
  if (keys.empty()) return;
  FrameWriter w(static_cast<std::uint8_t>(Cmd::Wait));
  w.u64(to_wire_ms(timeout));
  w.u32(static_cast<std::uint32_t>(keys.size()));
  for (const auto& k : keys) w.str(k);
  const Reply r = impl_->call(std::move(w).finish(), deadline_after(timeout, kReplyGrace),
                              "wait(" + quote_keys({keys.front()}, keys.size()) + ")");
  if (r.status == Status::Timeout) throw_timeout(r, impl_->address, timeout);
  if (r.status != Status::Ok || !r.body.empty()) impl_->throw_unexpected("wait", r);
}

bool TcpStore::check(const std::vector<std::string>& keys) {
  for (const auto& k : keys) check_key(k);
  if (keys.empty()) return true;
  FrameWriter w(static_cast<std::uint8_t>(Cmd::Check));
  w.u32(static_cast<std::uint32_t>(keys.size()));
  for (const auto& k : keys) w.str(k);
  const Reply r = impl_->call(std::move(w).finish(), deadline_after(timeout()),
                              "check(" + quote_keys({keys.front()}, keys.size()) + ")");
  if (r.status == Status::Ok && r.body.size() == 1) return r.body[0] != 0;
  impl_->throw_unexpected("check", r);
}

}  // namespace chorus
