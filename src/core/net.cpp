#include "core/net.hpp"

#include "core/enforce.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

namespace chorus::net {

void Fd::reset() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

namespace {

struct AddrInfo {
  addrinfo* ai = nullptr;
  ~AddrInfo() {
    if (ai) freeaddrinfo(ai);
  }
};

void resolve(const std::string& host, std::uint16_t port, bool passive, AddrInfo& out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  const std::string port_s = std::to_string(port);
  const char* h = (host.empty() || host == "*") ? nullptr : host.c_str();
  const int rc = getaddrinfo(h, port_s.c_str(), &hints, &out.ai);
  if (rc != 0)
    throw Error(ErrorCode::InvalidArgument,
                "cannot resolve '" + host + ":" + port_s + "': " + gai_strerror(rc));
}

using Clock = std::chrono::steady_clock;

int poll_ms_until(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  if (left <= 0) return 0;
  return left > 1000 ? 1000 : static_cast<int>(left) + 1;
}

}  // namespace

void set_nonblocking(int fd, bool on) {
  int flags = fcntl(fd, F_GETFL, 0);
  if (flags < 0) throw_errno("fcntl(F_GETFL)");
  flags = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (fcntl(fd, F_SETFL, flags) < 0) throw_errno("fcntl(F_SETFL)");
}

void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

void set_cloexec(int fd) { fcntl(fd, F_SETFD, FD_CLOEXEC); }

Fd listen_tcp(const std::string& host, std::uint16_t port, std::uint16_t* bound_port, int backlog) {
  AddrInfo ai;
  resolve(host == "0.0.0.0" ? std::string() : host, port, true, ai);
  int last_errno = 0;
  for (addrinfo* p = ai.ai; p != nullptr; p = p->ai_next) {
    Fd fd(::socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol));
    if (!fd.valid()) {
      last_errno = errno;
      continue;
    }
    int one = 1;
    setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd.get(), p->ai_addr, p->ai_addrlen) != 0 || ::listen(fd.get(), backlog) != 0) {
      last_errno = errno;
      continue;
    }
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    getsockname(fd.get(), reinterpret_cast<sockaddr*>(&ss), &len);
    const std::uint16_t bp = ss.ss_family == AF_INET6
                                 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                 : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    if (bound_port) *bound_port = bp;
    return fd;
  }
  errno = last_errno;
  throw_errno("cannot listen on " + (host.empty() ? std::string("*") : host) + ":" +
              std::to_string(port));
}

Fd connect_tcp(const std::string& host, std::uint16_t port, std::chrono::milliseconds timeout,
               bool retry) {
  const auto deadline = Clock::now() + timeout;
  std::string last_error = "no attempt";
  auto backoff = std::chrono::milliseconds(5);
  while (true) {
    AddrInfo ai;
    resolve(host, port, false, ai);
    for (addrinfo* p = ai.ai; p != nullptr; p = p->ai_next) {
      Fd fd(::socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol));
      if (!fd.valid()) continue;
      // Nonblocking connect so that the deadline bounds it, even on a black-holed address.
      set_nonblocking(fd.get(), true);
      int rc = ::connect(fd.get(), p->ai_addr, p->ai_addrlen);
      if (rc != 0 && errno == EINPROGRESS) {
        pollfd pfd{fd.get(), POLLOUT, 0};
        rc = ::poll(&pfd, 1, poll_ms_until(deadline));
        int err = 0;
        socklen_t len = sizeof err;
        if (rc == 1) getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
        else err = ETIMEDOUT;
        errno = err;
        rc = err == 0 ? 0 : -1;
      }
      if (rc == 0) {
        set_nonblocking(fd.get(), false);
        set_nodelay(fd.get());
        return fd;
      }
      last_error = std::strerror(errno);
      if (!retry && errno == ECONNREFUSED)
        throw Error(ErrorCode::PeerFailure, "connection to " + host + ":" + std::to_string(port) +
                                                " refused: the process listening there has exited");
    }
    if (!retry || Clock::now() >= deadline) break;
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::milliseconds(200));
  }
  throw Error(ErrorCode::Timeout, "could not connect to " + host + ":" + std::to_string(port) +
                                      " within " + std::to_string(timeout.count()) +
                                      " ms (last error: " + last_error +
                                      "); is the server running and the address right?");
}

bool read_all(int fd, void* buf, std::size_t n, Clock::time_point deadline) {
  auto* p = static_cast<char*>(buf);
  std::size_t got = 0;
  while (got < n) {
    const ssize_t r = ::recv(fd, p + got, n - got, MSG_DONTWAIT);
    if (r > 0) {
      got += static_cast<std::size_t>(r);
      continue;
    }
    if (r == 0) {
      if (got == 0) return false;
      throw Error(ErrorCode::PeerFailure, "connection to " + peer_name(fd) +
                                              " closed in the middle of a message");
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) throw_errno("recv from " + peer_name(fd));
    if (Clock::now() >= deadline) throw Error(ErrorCode::Timeout, "timed out reading from " + peer_name(fd));
    pollfd pfd{fd, POLLIN, 0};
    ::poll(&pfd, 1, poll_ms_until(deadline));
  }
  return true;
}

void write_all(int fd, const void* buf, std::size_t n, Clock::time_point deadline) {
  const auto* p = static_cast<const char*>(buf);
  std::size_t sent = 0;
  while (sent < n) {
    const ssize_t r = ::send(fd, p + sent, n - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r >= 0) {
      sent += static_cast<std::size_t>(r);
      continue;
    }
    if (errno == EINTR) continue;
    if (errno == EPIPE || errno == ECONNRESET)
      throw Error(ErrorCode::PeerFailure, "connection to " + peer_name(fd) + " was closed by the peer");
    if (errno != EAGAIN && errno != EWOULDBLOCK) throw_errno("send to " + peer_name(fd));
    if (Clock::now() >= deadline) throw Error(ErrorCode::Timeout, "timed out writing to " + peer_name(fd));
    pollfd pfd{fd, POLLOUT, 0};
    ::poll(&pfd, 1, poll_ms_until(deadline));
  }
}

std::pair<std::string, std::uint16_t> parse_host_port(const std::string& s) {
  std::string host;
  std::string port_s;
  if (!s.empty() && s[0] == '[') {
    const auto close = s.find(']');
    if (close == std::string::npos || close + 1 >= s.size() || s[close + 1] != ':')
      throw Error(ErrorCode::InvalidArgument, "malformed address '" + s + "'; expected [v6addr]:port");
    host = s.substr(1, close - 1);
    port_s = s.substr(close + 2);
  } else {
    const auto colon = s.rfind(':');
    if (colon == std::string::npos || colon == 0)
      throw Error(ErrorCode::InvalidArgument, "malformed address '" + s + "'; expected host:port");
    host = s.substr(0, colon);
    port_s = s.substr(colon + 1);
  }
  char* end = nullptr;
  errno = 0;
  const long port = std::strtol(port_s.c_str(), &end, 10);
  if (port_s.empty() || *end != '\0' || errno != 0 || port < 1 || port > 65535)
    throw Error(ErrorCode::InvalidArgument, "bad port '" + port_s + "' in address '" + s + "' (1..65535)");
  return {host, static_cast<std::uint16_t>(port)};
}

std::string interface_address(const std::string& ifname) {
  ifaddrs* ifs = nullptr;
  if (getifaddrs(&ifs) != 0) throw_errno("getifaddrs");
  std::string found;
  std::string names;
  for (ifaddrs* p = ifs; p != nullptr; p = p->ifa_next) {
    if (p->ifa_addr == nullptr || p->ifa_addr->sa_family != AF_INET) continue;
    if (names.find(std::string(p->ifa_name) + " ") == std::string::npos)
      names += std::string(p->ifa_name) + " ";
    if (found.empty() && ifname == p->ifa_name) {
      char buf[INET_ADDRSTRLEN];
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(p->ifa_addr)->sin_addr, buf, sizeof buf);
      found = buf;
    }
  }
  freeifaddrs(ifs);
  if (found.empty())
    throw Error(ErrorCode::InvalidArgument, "CHORUS_SOCKET_IFNAME: no IPv4 interface named '" +
                                                ifname + "'; this host has: " + names);
  return found;
}

std::string local_address_towards(const std::string& peer_host) {
  AddrInfo ai;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  if (getaddrinfo(peer_host.c_str(), "9", &hints, &ai.ai) != 0 || ai.ai == nullptr) return "127.0.0.1";
  Fd fd(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!fd.valid() || ::connect(fd.get(), ai.ai->ai_addr, ai.ai->ai_addrlen) != 0) return "127.0.0.1";
  sockaddr_in sa{};
  socklen_t len = sizeof sa;
  if (getsockname(fd.get(), reinterpret_cast<sockaddr*>(&sa), &len) != 0) return "127.0.0.1";
  char buf[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &sa.sin_addr, buf, sizeof buf);
  return buf;
}

std::string peer_name(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "(unconnected)";
  char host[NI_MAXHOST];
  char serv[NI_MAXSERV];
  if (getnameinfo(reinterpret_cast<sockaddr*>(&ss), len, host, sizeof host, serv, sizeof serv,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return "(unknown)";
  return std::string(host) + ":" + serv;
}

}  // namespace chorus::net
