#pragma once

// A small harness for the fault tests: it forks one process per rank, gives
// each a fresh FileStore directory and a pipe to report through, and kills
// every child when the test ends, whether the test passed or not.
//
// Why processes and not threads: the faults under test (SIGKILL, SIGSTOP, a
// socket closed by the kernel) only happen to whole processes. Why fork before
// any thread: a child of a multithreaded parent may inherit a lock held by a
// thread that does not exist in the child. The parent therefore never creates
// a Communicator; it only forks, signals and reads reports.
//
// Timing: children stamp each report with CLOCK_MONOTONIC, which is one clock
// for every process of the machine, so the parent can subtract the time it
// sent a signal from the time a child saw the failure.

#include <chorus/communicator.hpp>
#include <chorus/error.hpp>
#include <chorus/store.hpp>

#include "shm_sweep.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace faults {

using Nanos = std::int64_t;

// CLOCK_MONOTONIC in nanoseconds: comparable across processes of one host.
inline Nanos now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<Nanos>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

inline double seconds_between(Nanos from, Nanos to) { return static_cast<double>(to - from) / 1e9; }

// The bound: survivors fail within this long. Only ever an upper bound.
inline constexpr std::chrono::seconds kHangBound{10};
// How long the parent waits for a report before calling it a hang; longer than
// kHangBound so that a slow failure shows as a failed bound, not as a missing report.
inline constexpr std::chrono::seconds kReportWait{15};
// Timeout of communicators in tests where a Timeout would hide a hang.
inline constexpr std::chrono::seconds kLongTimeout{30};

// What a child reports about one attempted call.
struct Result {
  std::string label;
  bool ok = false;
  int code = 0;  // a chorus::ErrorCode value; 0 when ok or not a chorus::Error
  int peer = -1;
  Nanos start_ns = 0;
  Nanos end_ns = 0;
  std::string message;  // Error::message(), or what() of another exception

  chorus::ErrorCode error_code() const { return static_cast<chorus::ErrorCode>(code); }
  double seconds() const { return seconds_between(start_ns, end_ns); }
  bool has(const std::string& text) const { return message.find(text) != std::string::npos; }
  // One line for assertion messages.
  std::string describe() const {
    std::ostringstream os;
    os << "[" << label << "] ";
    if (ok) os << "ok";
    else
      os << (code != 0 ? std::string(chorus::to_string(error_code())) : std::string("non-chorus error"))
         << " peer=" << peer << " msg=\"" << message << "\"";
    os << " after " << seconds() << " s";
    return os.str();
  }
};

namespace detail {

inline void write_fully(int fd, const void* data, std::size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;  // the parent is gone; nothing useful to do
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

inline std::string encode(const Result& r) {
  std::ostringstream os;
  os << r.label << '\n' << r.ok << '\n' << r.code << '\n' << r.peer << '\n' << r.start_ns << '\n'
     << r.end_ns << '\n' << r.message;
  return os.str();
}

inline Result decode(const std::string& s) {
  Result r;
  std::istringstream is(s);
  std::getline(is, r.label);
  std::string line;
  std::getline(is, line);
  r.ok = line == "1";
  std::getline(is, line);
  r.code = std::stoi(line);
  std::getline(is, line);
  r.peer = std::stoi(line);
  std::getline(is, line);
  r.start_ns = std::stoll(line);
  std::getline(is, line);
  r.end_ns = std::stoll(line);
  std::ostringstream rest;
  rest << is.rdbuf();
  r.message = rest.str();
  return r;
}

// Event kinds on the child -> parent pipe: a kind byte, a u32 length, the bytes.
constexpr char kStarted = 'S';
constexpr char kResult = 'R';
constexpr char kDone = 'D';

}  // namespace detail

// The child's side: what a rank's body uses to talk to the parent.
class RankContext {
 public:
  RankContext(int rank, int size, std::string store_dir, int to_parent, int from_parent)
      : rank_(rank), size_(size), store_dir_(std::move(store_dir)), to_parent_(to_parent),
        from_parent_(from_parent) {}

  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& store_dir() const { return store_dir_; }

  std::shared_ptr<chorus::FileStore> store() const {
    return std::make_shared<chorus::FileStore>(store_dir_);
  }

  // Creates this rank's communicator on the group's FileStore, on the
  // transport CHORUS_TRANSPORT names unless `transport` is given.
  chorus::Communicator create(std::chrono::milliseconds timeout,
                              const std::string& transport = "") const {
    chorus::Config config;
    config.timeout = timeout;
    config.transport = transport;
    return chorus::Communicator::create(rank_, size_, store(), config);
  }

  // Tells the parent that this rank reached the phase it waits for.
  void started() { send(detail::kStarted, ""); }

  void report(const Result& r) { send(detail::kResult, detail::encode(r)); }

  // Runs `fn`, reports how it ended under `label`, and returns that report.
  // Only exceptions are caught: a crash or a hang is for the parent to see.
  template <typename Fn>
  Result attempt(const std::string& label, Fn&& fn) {
    Result r;
    r.label = label;
    r.start_ns = now_ns();
    try {
      fn();
      r.ok = true;
    } catch (const chorus::Error& e) {
      r.code = static_cast<int>(e.code());
      r.peer = e.peer();
      r.message = e.message();
    } catch (const std::exception& e) {
      r.message = std::string("std::exception: ") + e.what();
    }
    r.end_ns = now_ns();
    report(r);
    return r;
  }

  // Blocks until the parent says go; returns false if the parent went away.
  bool wait_go() {
    char c;
    while (true) {
      const ssize_t n = ::read(from_parent_, &c, 1);
      if (n == 1) return true;
      if (n < 0 && errno == EINTR) continue;
      return false;
    }
  }

  // Keeps this process (and its communicator) alive until the parent kills it
  // or closes the control pipe. Children that exit early would close their
  // sockets and turn every other failure into a PeerFailure, hiding what the
  // test looks for.
  void hold() {
    while (wait_go()) {
    }
  }

  void done() { send(detail::kDone, ""); }

 private:
  void send(char kind, const std::string& payload) {
    std::string frame(1, kind);
    const auto n = static_cast<std::uint32_t>(payload.size());
    frame.append(reinterpret_cast<const char*>(&n), sizeof n);
    frame += payload;
    detail::write_fully(to_parent_, frame.data(), frame.size());
  }

  int rank_;
  int size_;
  std::string store_dir_;
  int to_parent_;
  int from_parent_;
};

using Body = std::function<void(RankContext&)>;

// The parent's side: a group of forked ranks sharing one store directory.
class Group {
 public:
  // Forks `n` ranks; rank r runs bodies[r] (or bodies[0] for all when only one
  // is given). A body that returns makes the child exit with status 0; one
  // that throws makes it report the exception under "uncaught" and exit 3.
  Group(int n, std::vector<Body> bodies) : children_(static_cast<std::size_t>(n)) {
    char tmpl[] = "/tmp/chorus-faults-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) {
      std::perror("mkdtemp");
      std::abort();
    }
    dir_ = tmpl;
    // The parent writes to pipes of children that may have exited; that must
    // not kill the test. Children get SIGPIPE back (below): a library write to
    // a dead peer without MSG_NOSIGNAL would kill a real application, and the
    // tests must see that.
    ::signal(SIGPIPE, SIG_IGN);
    std::fflush(nullptr);  // buffered output must not be written twice
    const pid_t parent = ::getpid();
    for (int r = 0; r < n; ++r) {
      int up[2];
      int down[2];
      if (::pipe(up) != 0 || ::pipe(down) != 0) {
        std::perror("pipe");
        std::abort();
      }
      const pid_t pid = ::fork();
      if (pid < 0) {
        std::perror("fork");
        std::abort();
      }
      if (pid == 0) {
        ::signal(SIGPIPE, SIG_DFL);
        // If the test process dies (a crash, a meson timeout), take the ranks
        // with it, stopped ones included.
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (::getppid() != parent) ::_exit(4);
        ::close(up[0]);
        ::close(down[1]);
        // Pipes of the ranks forked before this one belong to the parent.
        for (const Child& c : children_) {
          if (c.from >= 0) ::close(c.from);
          if (c.to >= 0) ::close(c.to);
        }
        run_child(r, n, dir_, bodies.size() == 1 ? bodies[0] : bodies[static_cast<std::size_t>(r)],
                  up[1], down[0]);
      }
      ::close(up[1]);
      ::close(down[0]);
      Child& c = children_[static_cast<std::size_t>(r)];
      c.pid = pid;
      c.from = up[0];
      c.to = down[1];
    }
  }

  Group(int n, Body body) : Group(n, std::vector<Body>{std::move(body)}) {}

  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  ~Group() {
    for (std::size_t r = 0; r < children_.size(); ++r) {
      Child& c = children_[r];
      if (c.pid > 0 && !c.reaped) {
        ::kill(c.pid, SIGCONT);  // a stopped child must not keep its sockets half-alive
        ::kill(c.pid, SIGKILL);
        ::waitpid(c.pid, nullptr, 0);
        chorus_test::remove_shm_of_killed(c.pid);
      }
      if (c.from >= 0) ::close(c.from);
      if (c.to >= 0) ::close(c.to);
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  int size() const { return static_cast<int>(children_.size()); }
  const std::string& store_dir() const { return dir_; }
  pid_t pid(int rank) const { return children_[static_cast<std::size_t>(rank)].pid; }

  // Waits until every rank has called started(); false when one did not in time.
  bool wait_started(std::chrono::milliseconds timeout, std::string* why = nullptr) {
    const Nanos deadline = now_ns() + std::chrono::nanoseconds(timeout).count();
    for (int r = 0; r < size(); ++r) {
      Child& c = children_[static_cast<std::size_t>(r)];
      while (!c.started) {
        if (!pump(r, deadline)) {
          if (why) *why = "rank " + std::to_string(r) + " did not start: " + status(r);
          return false;
        }
      }
    }
    return true;
  }

  // The report `label` of `rank`, waiting for it until `deadline_ns`.
  std::optional<Result> result(int rank, const std::string& label, Nanos deadline_ns) {
    Child& c = children_[static_cast<std::size_t>(rank)];
    while (true) {
      for (const Result& r : c.results)
        if (r.label == label) return r;
      if (!pump(rank, deadline_ns)) return std::nullopt;
    }
  }

  std::optional<Result> result(int rank, const std::string& label, std::chrono::milliseconds wait) {
    return result(rank, label, now_ns() + std::chrono::nanoseconds(wait).count());
  }

  // Every report of `rank` received so far, after waiting for done() (or EOF).
  std::vector<Result> all_results(int rank, std::chrono::milliseconds wait) {
    Child& c = children_[static_cast<std::size_t>(rank)];
    const Nanos deadline = now_ns() + std::chrono::nanoseconds(wait).count();
    while (!c.done && pump(rank, deadline)) {
    }
    return c.results;
  }

  // Lets a child waiting in wait_go() continue.
  void go(int rank) {
    const char c = 'g';
    detail::write_fully(children_[static_cast<std::size_t>(rank)].to, &c, 1);
  }

  void go_all() {
    for (int r = 0; r < size(); ++r) go(r);
  }

  // Sends a signal; returns the CLOCK_MONOTONIC time it was sent.
  Nanos signal(int rank, int sig) {
    const Nanos t = now_ns();
    ::kill(pid(rank), sig);
    return t;
  }

  // Waits for a child to exit; returns its wait status, or nullopt on timeout.
  std::optional<int> wait_exit(int rank, std::chrono::milliseconds timeout) {
    Child& c = children_[static_cast<std::size_t>(rank)];
    if (c.reaped) return c.status;
    const Nanos deadline = now_ns() + std::chrono::nanoseconds(timeout).count();
    while (true) {
      int st = 0;
      const pid_t p = ::waitpid(c.pid, &st, WNOHANG);
      if (p == c.pid) {
        c.reaped = true;
        c.status = st;
        return st;
      }
      if (now_ns() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  // How a child ended, for assertion messages ("running", "exit 0", "signal 9").
  std::string status(int rank) {
    Child& c = children_[static_cast<std::size_t>(rank)];
    if (!c.reaped) {
      int st = 0;
      if (::waitpid(c.pid, &st, WNOHANG) == c.pid) {
        c.reaped = true;
        c.status = st;
      }
    }
    if (!c.reaped) return "still running";
    if (WIFEXITED(c.status)) {
      std::string s = "exited with status " + std::to_string(WEXITSTATUS(c.status));
      pump(rank, now_ns());  // the body's last words, if it threw
      for (const Result& r : c.results)
        if (r.label == "uncaught") s += " after throwing " + r.describe();
      return s;
    }
    if (WIFSIGNALED(c.status))
      return std::string("killed by signal ") + std::to_string(WTERMSIG(c.status)) + " (" +
             ::strsignal(WTERMSIG(c.status)) + ")";
    return "unknown status";
  }

 private:
  struct Child {
    pid_t pid = -1;
    int from = -1;  // child -> parent events
    int to = -1;    // parent -> child go bytes
    bool started = false;
    bool done = false;
    bool eof = false;
    bool reaped = false;
    int status = 0;
    std::string buf;
    std::vector<Result> results;
  };

  [[noreturn]] static void run_child(int rank, int size, const std::string& dir, const Body& body,
                                     int up, int down) {
    RankContext ctx(rank, size, dir, up, down);
    int status = 0;
    try {
      body(ctx);
      ctx.done();
    } catch (const chorus::Error& e) {
      Result r;
      r.label = "uncaught";
      r.code = static_cast<int>(e.code());
      r.peer = e.peer();
      r.message = e.message();
      r.start_ns = r.end_ns = now_ns();
      ctx.report(r);
      status = 3;
    } catch (const std::exception& e) {
      Result r;
      r.label = "uncaught";
      r.message = std::string("std::exception: ") + e.what();
      r.start_ns = r.end_ns = now_ns();
      ctx.report(r);
      status = 3;
    }
    // _exit: the child must not run the parent's atexit handlers or gtest's
    // teardown. Destructors of the body's objects have run already.
    ::_exit(status);
  }

  // Reads what is available from `rank`'s pipe, waiting until `deadline_ns`
  // for at least one event. Returns false on timeout or EOF with nothing new.
  bool pump(int rank, Nanos deadline_ns) {
    Child& c = children_[static_cast<std::size_t>(rank)];
    if (parse(c)) return true;
    if (c.eof) return false;
    while (true) {
      // Past the deadline, still take what is already in the pipe: a report
      // sent in time must not be lost because another rank used up the wait.
      const Nanos left = deadline_ns - now_ns();
      pollfd pfd{c.from, POLLIN, 0};
      const int ms = left <= 0 ? 0 : static_cast<int>(std::min<Nanos>(left / 1'000'000 + 1, 1000));
      const int pr = ::poll(&pfd, 1, ms);
      if (pr < 0 && errno != EINTR) return false;
      if (pr == 0 && left <= 0) return false;
      if (pr <= 0) continue;
      char tmp[4096];
      const ssize_t n = ::read(c.from, tmp, sizeof tmp);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        c.eof = true;
        return parse(c);
      }
      c.buf.append(tmp, static_cast<std::size_t>(n));
      if (parse(c)) return true;
    }
  }

  // Moves complete events from the buffer into the child's state.
  static bool parse(Child& c) {
    bool any = false;
    while (c.buf.size() >= 5) {
      std::uint32_t n;
      std::memcpy(&n, c.buf.data() + 1, sizeof n);
      if (c.buf.size() < 5 + n) break;
      const char kind = c.buf[0];
      const std::string payload = c.buf.substr(5, n);
      c.buf.erase(0, 5 + n);
      if (kind == detail::kStarted) c.started = true;
      else if (kind == detail::kDone) c.done = true;
      else if (kind == detail::kResult) c.results.push_back(detail::decode(payload));
      any = true;
    }
    return any;
  }

  std::string dir_;
  std::vector<Child> children_;
};

}  // namespace faults
