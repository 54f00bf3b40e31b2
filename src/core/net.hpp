#pragma once

// Small socket helpers shared by the TCP store and the TCP transport.

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>

namespace chorus::net {

// Owns a file descriptor; closes it on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  int release() noexcept { return std::exchange(fd_, -1); }
  void reset() noexcept;

 private:
  int fd_ = -1;
};

// Creates a TCP listening socket on host:port (port 0 = ephemeral; host "" or
// "0.0.0.0" = any). Returns the socket; *bound_port receives the actual port.
// Throws Error(System) with the address in the message.
Fd listen_tcp(const std::string& host, std::uint16_t port, std::uint16_t* bound_port,
              int backlog = 128);

// Connects to host:port, retrying refused/unreachable connections until
// `timeout` passes (the server may not be up yet) when `retry` is true.
// Returns a blocking socket with TCP_NODELAY. Throws Error(Timeout) naming the
// address; without retry, a refused connection throws Error(PeerFailure).
Fd connect_tcp(const std::string& host, std::uint16_t port, std::chrono::milliseconds timeout,
               bool retry = true);

void set_nonblocking(int fd, bool on);
void set_nodelay(int fd);
void set_cloexec(int fd);

// Blocking helpers over a blocking or nonblocking socket, bounded by `deadline`
// (poll()-based). Return false on orderly EOF before any byte of a read_all;
// throw Error(Timeout) when the deadline passes, Error(System) on errors.
bool read_all(int fd, void* buf, std::size_t n, std::chrono::steady_clock::time_point deadline);
void write_all(int fd, const void* buf, std::size_t n,
               std::chrono::steady_clock::time_point deadline);

// "host:port" -> (host, port). Accepts "[v6]:port". Throws Error(InvalidArgument).
std::pair<std::string, std::uint16_t> parse_host_port(const std::string& s);

// IPv4 address of interface `ifname` (e.g. "eth0", "lo"). Throws
// Error(InvalidArgument) listing the interfaces that exist.
std::string interface_address(const std::string& ifname);

// The local address this host would use to reach `peer_host` (connect a UDP
// socket and read getsockname; nothing is sent).
std::string local_address_towards(const std::string& peer_host);

// Peer address of a connected socket as "ip:port".
std::string peer_name(int fd);

}  // namespace chorus::net
