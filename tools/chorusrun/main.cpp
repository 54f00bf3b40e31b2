// chorusrun: the local launcher. Hosts the rendezvous store in-process, starts
// N ranks of a program with the CHORUS_* environment, tags their output and
// tears the whole job down as soon as one rank fails.
//
// Exit status: 0 when every rank exits 0. Otherwise the status of the FIRST
// rank that failed: its exit code, or 128 + signal when a signal killed it.
// When chorusrun itself is interrupted (SIGINT/SIGTERM/SIGHUP) it exits with
// 128 + that signal. 127 when the program cannot be found; 1 for launcher
// errors (the store cannot start, fork fails).

#include <chorus/error.hpp>
#include <chorus/store.hpp>

#include "cli/cli.hpp"
#include "core/topology.hpp"
#include "transport.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;

// A line longer than this is emitted in pieces (each with its own tag and a
// newline), so that one rank printing without newlines cannot grow our memory
// without bound.
constexpr std::size_t kMaxLineBytes = 64 * 1024;
// Once every rank has exited, output still buffered in the pipes is drained;
// a pipe that stays silent this long is assumed to be held open by a leftover
// grandchild and is abandoned rather than waited for forever.
constexpr int kDrainIdleMs = 100;
// When one rank dies, its peers notice within milliseconds and exit with
// errors of their own, and their exits may even be reaped first (a dying
// process closes its sockets before it becomes a zombie). Failures within this
// window are collected before deciding which one to blame.
constexpr auto kSettle = std::chrono::milliseconds(200);
// A second SIGINT/SIGTERM escalates to SIGKILL, but only this long after the
// first: tools like timeout(1) deliver one signal twice (to the process and to
// its group), which must not count as the user asking again.
constexpr auto kRepeatSignal = std::chrono::milliseconds(500);

struct Options {
  int np = 0;
  std::string store_host = "127.0.0.1";
  int store_port = 0;
  std::string transport;
  std::vector<std::string> env;
  double timeout_s = 0;
  bool tag_output = true;
  double grace_s = 3.0;
  // auto | core | none | CPU list; empty: CHORUS_CPU_BIND, else auto.
  std::string bind_to;
  bool verbose = false;
  std::vector<std::string> command;
};

// One output stream (stdout or stderr) of one rank, read through a pipe.
struct Stream {
  int fd = -1;         // read end in the launcher; -1 once closed
  int target_fd = 1;   // where complete lines go (1 or 2)
  std::string partial; // bytes after the last newline
};

struct Rank {
  int rank = 0;
  pid_t pid = -1;
  bool running = false;
  int status = 0;  // waitpid status once !running
  Stream out;
  Stream err;
};

int g_signal_pipe[2] = {-1, -1};

void on_signal(int sig) {
  // Only async-signal-safe work here: hand the signal number to the main loop.
  const int saved = errno;
  const unsigned char b = static_cast<unsigned char>(sig);
  [[maybe_unused]] const ssize_t n = ::write(g_signal_pipe[1], &b, 1);
  errno = saved;
}

void write_all(int fd, const char* data, std::size_t len) {
  while (len > 0) {
    const ssize_t n = ::write(fd, data, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        pollfd p{fd, POLLOUT, 0};
        ::poll(&p, 1, 100);
        continue;
      }
      return;  // EPIPE and friends: the reader went away; nothing useful to do.
    }
    data += n;
    len -= static_cast<std::size_t>(n);
  }
}

void say(const std::string& msg) {
  const std::string line = "chorusrun: " + msg + "\n";
  write_all(2, line.data(), line.size());
}

std::string signal_name(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev ? std::string("SIG") + abbrev : "signal " + std::to_string(sig);
}

// "exited with code 3" / "was killed by signal 9 (SIGKILL)".
std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    std::string s = "was killed by signal " + std::to_string(sig) + " (" + signal_name(sig) + ")";
    if (WCOREDUMP(status)) s += ", core dumped";
    return s;
  }
  return "ended with status " + std::to_string(status);
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

bool failed(int status) { return !(WIFEXITED(status) && WEXITSTATUS(status) == 0); }

// Emits every complete line of `s` with the rank tag; at EOF (or when a line
// grows past kMaxLineBytes) the remainder too, terminated by a newline so that
// it cannot merge with another rank's output.
void emit_lines(Stream& s, int rank, bool eof) {
  // Built in steps: GCC 12 at -O3 warns falsely (-Wrestrict) on "[" + std::string.
  std::string tag = "[";
  tag += std::to_string(rank);
  tag += "] ";
  std::string out;
  std::size_t start = 0;
  for (;;) {
    const std::size_t nl = s.partial.find('\n', start);
    if (nl == std::string::npos) break;
    out += tag;
    out.append(s.partial, start, nl + 1 - start);
    start = nl + 1;
  }
  s.partial.erase(0, start);
  if (!s.partial.empty() && (eof || s.partial.size() >= kMaxLineBytes)) {
    out += tag;
    out += s.partial;
    out += '\n';
    s.partial.clear();
  }
  // One write per batch of whole lines: lines of different ranks never interleave.
  if (!out.empty()) write_all(s.target_fd, out.data(), out.size());
}

// Reads what is available on `s` (nonblocking); closes it at EOF.
// Returns true if any bytes were read.
bool pump(Stream& s, int rank) {
  if (s.fd < 0) return false;
  bool got = false;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(s.fd, buf, sizeof buf);
    if (n > 0) {
      got = true;
      s.partial.append(buf, static_cast<std::size_t>(n));
      emit_lines(s, rank, false);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return got;
    // EOF, or an error that makes the pipe useless: flush and close.
    emit_lines(s, rank, true);
    ::close(s.fd);
    s.fd = -1;
    return got;
  }
}

// execve() does no PATH search, and execvp() may allocate between fork and
// exec (unsafe in a process that has threads: the store server's). So the
// program is resolved here, before forking.
std::optional<std::string> resolve_program(const std::string& prog) {
  if (prog.find('/') != std::string::npos) return prog;
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/local/bin:/usr/bin:/bin";
  std::size_t start = 0;
  for (;;) {
    const std::size_t colon = dirs.find(':', start);
    std::string dir = dirs.substr(start, colon == std::string::npos ? std::string::npos : colon - start);
    if (dir.empty()) dir.push_back('.');  // not dir = ".": GCC 12's false -Wrestrict at -O3
    const std::string candidate = dir + "/" + prog;
    struct stat st{};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        ::access(candidate.c_str(), X_OK) == 0)
      return candidate;
    if (colon == std::string::npos) break;
    start = colon + 1;
  }
  return std::nullopt;
}

bool is_launcher_var(const std::string& entry) {
  static const char* const kOwned[] = {"CHORUS_RANK=",       "CHORUS_WORLD_SIZE=",
                                       "CHORUS_LOCAL_RANK=", "CHORUS_LOCAL_SIZE=",
                                       "CHORUS_STORE=",      "CHORUS_STORE_EXTERNAL="};
  for (const char* p : kOwned)
    if (entry.rfind(p, 0) == 0) return true;
  return false;
}

// Sets NAME=VALUE in `env`, replacing an existing NAME.
void set_env(std::vector<std::string>& env, const std::string& name, const std::string& value) {
  const std::string prefix = name + "=";
  std::erase_if(env, [&](const std::string& e) { return e.rfind(prefix, 0) == 0; });
  env.push_back(prefix + value);
}

// Shortest text that reads back as `s` (CHORUS_TIMEOUT takes plain seconds).
std::string format_seconds(double s) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, s);
  return std::string(buf, res.ptr);
}

class Launcher {
 public:
  explicit Launcher(Options opt) : opt_(std::move(opt)) {}

  int run();
  void remove_segments();

 private:
  bool spawn(Rank& r, const std::string& program, const std::vector<std::string>& base_env,
             const std::string& store_addr, const chorus::topo::CpuMask* bind);
  bool plan_binding(std::vector<std::string>& base_env);
  void reap();
  void signal_ranks(int sig);
  void start_stopping(int exit_code);
  void blame();
  bool any_running() const {
    return std::any_of(ranks_.begin(), ranks_.end(), [](const Rank& r) { return r.running; });
  }

  Options opt_;
  std::vector<Rank> ranks_;
  // Per rank: the CPUs it is bound to before exec (null: not bound).
  std::vector<std::unique_ptr<chorus::topo::CpuMask>> bind_masks_;
  bool stopping_ = false;    // a rank failed or we were signalled: tearing down
  std::vector<std::size_t> failures_;               // ranks that failed, not yet blamed
  std::optional<Clock::time_point> settle_until_;   // set while failures_ settles
  bool killed_ = false;      // SIGKILL already sent
  Clock::time_point kill_deadline_{};
  // After a rank fails, the others get a grace period to notice and report
  // the failure themselves (Chorus makes survivors fail fast, naming the
  // culprit); only then SIGTERM, and SIGKILL one grace period later.
  std::optional<Clock::time_point> term_deadline_;
  std::optional<Clock::time_point> signalled_at_;  // when we were first interrupted
  int exit_code_ = 0;
  std::string job_id_;  // CHORUS_JOB_ID of the ranks
};

// Plans the ranks' CPU binding with the library's own topology code
// (src/core/topology), from --bind-to or else CHORUS_CPU_BIND as the ranks
// would see it, and tells the ranks it has been decided (CHORUS_CPU_BIND=none),
// so that their communicators do not bind again. False for a bad spec.
bool Launcher::plan_binding(std::vector<std::string>& base_env) {
  std::string spec = opt_.bind_to;
  std::string source = "--bind-to";
  if (spec.empty()) {
    source = "CHORUS_CPU_BIND";
    for (const std::string& e : base_env)
      if (e.rfind("CHORUS_CPU_BIND=", 0) == 0) spec = e.substr(std::strlen("CHORUS_CPU_BIND="));
    if (spec.empty()) spec = "auto";
  }
  bind_masks_.clear();
  bind_masks_.resize(static_cast<std::size_t>(opt_.np));
  const chorus::topo::Topology topo = chorus::topo::discover();
  chorus::topo::Plan plan;
  try {
    plan = chorus::topo::plan_binding(topo, opt_.np, spec);
  } catch (const chorus::Error& e) {
    say(source + ": " + e.message());
    return false;
  }
  if (opt_.verbose) say("topology: " + chorus::topo::describe(topo));
  if (!plan.bound()) {
    // An explicit request that cannot be met deserves a word; auto does not.
    if (spec == "core" || opt_.verbose) say(source + " " + spec + ": " + plan.reason);
  } else {
    for (int i = 0; i < opt_.np; ++i) {
      const auto& cpus = plan.cpus[static_cast<std::size_t>(i)];
      bind_masks_[static_cast<std::size_t>(i)] = std::make_unique<chorus::topo::CpuMask>(cpus);
      if (opt_.verbose)
        say("rank " + std::to_string(i) + " bound to " + chorus::topo::describe_binding(topo, cpus));
    }
  }
  set_env(base_env, "CHORUS_CPU_BIND", "none");
  return true;
}

bool Launcher::spawn(Rank& r, const std::string& program, const std::vector<std::string>& base_env,
                     const std::string& store_addr, const chorus::topo::CpuMask* bind) {
  // Everything the child needs is built before fork(): between fork and exec
  // only async-signal-safe calls are allowed.
  std::vector<std::string> env = base_env;
  set_env(env, "CHORUS_RANK", std::to_string(r.rank));
  set_env(env, "CHORUS_WORLD_SIZE", std::to_string(opt_.np));
  set_env(env, "CHORUS_LOCAL_RANK", std::to_string(r.rank));
  set_env(env, "CHORUS_LOCAL_SIZE", std::to_string(opt_.np));
  set_env(env, "CHORUS_STORE", store_addr);
  // The launcher hosts the store: rank 0 must connect to it, not start its own.
  set_env(env, "CHORUS_STORE_EXTERNAL", "1");
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = opt_.command;
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  int out_pipe[2] = {-1, -1};
  int err_pipe[2] = {-1, -1};
  if (opt_.tag_output) {
    if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0) {
      say(std::string("pipe failed: ") + std::strerror(errno));
      return false;
    }
  }
  const pid_t parent = ::getpid();
  const std::string exec_error = "chorusrun: cannot execute '" + program + "': ";
  const pid_t pid = ::fork();
  if (pid < 0) {
    say(std::string("fork failed: ") + std::strerror(errno));
    return false;
  }
  if (pid == 0) {
    // Child. Default dispositions: the launcher ignores SIGPIPE, and an ignored
    // signal would stay ignored across exec.
    ::signal(SIGPIPE, SIG_DFL);
    ::signal(SIGINT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    ::signal(SIGHUP, SIG_DFL);
    ::signal(SIGCHLD, SIG_DFL);
    // Own process group: a signal to the rank reaches everything it started
    // (e.g. the program under `sh -c`), and a terminal Ctrl-C reaches only the
    // launcher, which forwards it exactly once.
    ::setpgid(0, 0);
    // If the launcher dies (even by SIGKILL), the rank is told to stop.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    // The mask was built before fork: applying it is one system call, and
    // before exec it covers every thread the program will start.
    if (bind != nullptr) (void)bind->apply();
    if (::getppid() != parent) ::_exit(1);  // the launcher died before prctl
    // A background process group reading the terminal would be stopped
    // (SIGTTIN), so no rank gets the launcher's stdin.
    const int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) {
      ::dup2(devnull, 0);
      if (devnull != 0) ::close(devnull);
    }
    if (out_pipe[1] >= 0) {
      ::dup2(out_pipe[1], 1);
      ::dup2(err_pipe[1], 2);
    }
    // Not inherited: the store's sockets and anything else the launcher holds.
    ::close_range(3, ~0U, 0);
    ::execve(program.c_str(), argv.data(), envp.data());
    const char* why = std::strerror(errno);
    [[maybe_unused]] ssize_t n = ::write(2, exec_error.data(), exec_error.size());
    n = ::write(2, why, std::strlen(why));
    n = ::write(2, "\n", 1);
    ::_exit(127);
  }
  // Parent. Also set the group here: whichever of parent and child runs first,
  // the group exists before the launcher may signal it.
  ::setpgid(pid, pid);
  r.pid = pid;
  r.running = true;
  if (opt_.tag_output) {
    ::close(out_pipe[1]);
    ::close(err_pipe[1]);
    r.out.fd = out_pipe[0];
    r.out.target_fd = 1;
    r.err.fd = err_pipe[0];
    r.err.target_fd = 2;
    ::fcntl(r.out.fd, F_SETFL, ::fcntl(r.out.fd, F_GETFL) | O_NONBLOCK);
    ::fcntl(r.err.fd, F_SETFL, ::fcntl(r.err.fd, F_GETFL) | O_NONBLOCK);
  }
  return true;
}

void Launcher::signal_ranks(int sig) {
  for (const Rank& r : ranks_) {
    // The whole process group of the rank; fall back to the pid in case the
    // program moved itself to another group.
    if (r.running && ::kill(-r.pid, sig) != 0) ::kill(r.pid, sig);
  }
}

void Launcher::start_stopping(int exit_code) {
  stopping_ = true;
  exit_code_ = exit_code;
  const auto grace = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(opt_.grace_s));
  term_deadline_ = Clock::now() + grace;
  kill_deadline_ = *term_deadline_ + grace;
}

void Launcher::reap() {
  for (;;) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    auto it = std::find_if(ranks_.begin(), ranks_.end(), [&](const Rank& r) { return r.pid == pid; });
    if (it == ranks_.end()) continue;
    it->running = false;
    it->status = status;
    if (opt_.verbose) say("rank " + std::to_string(it->rank) + " (pid " + std::to_string(pid) + ") " +
                          describe_status(status));
    if (!failed(status) || stopping_) continue;
    // Print the rank's last words before the verdict on it.
    pump(it->out, it->rank);
    pump(it->err, it->rank);
    failures_.push_back(static_cast<std::size_t>(it - ranks_.begin()));
    if (!settle_until_) settle_until_ = Clock::now() + kSettle;
  }
}

void Launcher::blame() {
  settle_until_.reset();
  if (failures_.empty()) return;
  // A rank killed by a signal is the likely cause; ranks that exited with an
  // error in the same window were most likely reacting to it.
  std::size_t culprit = failures_.front();
  for (std::size_t i : failures_) {
    if (WIFSIGNALED(ranks_[i].status)) {
      culprit = i;
      break;
    }
  }
  const Rank& c = ranks_[culprit];
  say("rank " + std::to_string(c.rank) + " (pid " + std::to_string(c.pid) + ") " +
      describe_status(c.status) + (any_running() ? "; stopping the other ranks" : ""));
  for (std::size_t i : failures_) {
    if (i == culprit) continue;
    const Rank& r = ranks_[i];
    say("also: rank " + std::to_string(r.rank) + " (pid " + std::to_string(r.pid) + ") " +
        describe_status(r.status));
  }
  failures_.clear();
  start_stopping(exit_code_of(c.status));
}

int Launcher::run() {
  const auto program = resolve_program(opt_.command[0]);
  if (!program) {
    say("program '" + opt_.command[0] + "' not found in PATH");
    return 127;
  }

  std::unique_ptr<chorus::TcpStoreServer> store;
  try {
    store = std::make_unique<chorus::TcpStoreServer>(opt_.store_host,
                                                     static_cast<std::uint16_t>(opt_.store_port));
  } catch (const std::exception& e) {
    say(std::string("cannot start the store on ") + opt_.store_host + ": " + e.what());
    return 1;
  }
  // A wildcard listen address is not something to connect to.
  std::string connect_host = opt_.store_host;
  if (connect_host.empty() || connect_host == "0.0.0.0") connect_host = "127.0.0.1";
  const std::string store_addr = connect_host + ":" + std::to_string(store->port());
  if (opt_.verbose) say("store listening on " + store_addr);

  std::vector<std::string> base_env;
  for (char** e = environ; *e != nullptr; ++e)
    if (!is_launcher_var(*e)) base_env.emplace_back(*e);
  if (!opt_.transport.empty()) set_env(base_env, "CHORUS_TRANSPORT", opt_.transport);
  // The job id names the ranks' shared-memory segments, so that what a rank
  // killed during setup leaves in /dev/shm can be removed below.
  job_id_ = "j" + std::to_string(::getpid());
  set_env(base_env, "CHORUS_JOB_ID", job_id_);
  if (opt_.timeout_s > 0) set_env(base_env, "CHORUS_TIMEOUT", format_seconds(opt_.timeout_s));
  for (const std::string& x : opt_.env) {
    const std::size_t eq = x.find('=');
    if (eq == std::string::npos) {
      // `-x VAR` exports the launcher's own value, as mpirun does.
      const char* v = std::getenv(x.c_str());
      if (v == nullptr) {
        say("-x " + x + ": not set in the environment (use -x VAR=VALUE)");
        return 1;
      }
      set_env(base_env, x, v);
    } else {
      set_env(base_env, x.substr(0, eq), x.substr(eq + 1));
    }
  }
  if (!plan_binding(base_env)) return 1;

  if (::pipe2(g_signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    say(std::string("pipe failed: ") + std::strerror(errno));
    return 1;
  }
  struct sigaction sa{};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int sig : {SIGCHLD, SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  ranks_.resize(static_cast<std::size_t>(opt_.np));
  for (int i = 0; i < opt_.np; ++i) {
    ranks_[static_cast<std::size_t>(i)].rank = i;
    if (!spawn(ranks_[static_cast<std::size_t>(i)], *program, base_env, store_addr,
               bind_masks_[static_cast<std::size_t>(i)].get())) {
      start_stopping(1);
      break;
    }
    if (opt_.verbose)
      say("rank " + std::to_string(i) + ": pid " + std::to_string(ranks_[static_cast<std::size_t>(i)].pid));
  }

  for (;;) {
    if (settle_until_ && (Clock::now() >= *settle_until_ || !any_running())) blame();
    const bool running = any_running();
    std::vector<pollfd> fds;
    std::vector<Stream*> streams;
    fds.push_back({g_signal_pipe[0], POLLIN, 0});
    streams.push_back(nullptr);
    for (Rank& r : ranks_) {
      for (Stream* s : {&r.out, &r.err}) {
        if (s->fd >= 0) {
          fds.push_back({s->fd, POLLIN, 0});
          streams.push_back(s);
        }
      }
    }
    if (!running && fds.size() == 1) break;

    int timeout_ms = -1;
    if (!running) {
      timeout_ms = kDrainIdleMs;
    } else if (stopping_ && !killed_) {
      const auto next = term_deadline_ ? std::min(*term_deadline_, kill_deadline_) : kill_deadline_;
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(next - Clock::now());
      timeout_ms = static_cast<int>(std::max<std::int64_t>(0, left.count()) + 1);
    } else if (settle_until_) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*settle_until_ - Clock::now());
      timeout_ms = static_cast<int>(std::max<std::int64_t>(0, left.count()) + 1);
    }
    const int n = ::poll(fds.data(), fds.size(), timeout_ms);
    if (n < 0 && errno != EINTR) {
      say(std::string("poll failed: ") + std::strerror(errno));
      start_stopping(1);
      signal_ranks(SIGKILL);
      killed_ = true;
    }
    if (n == 0 && !running) break;  // drained: the rest is held open by strays

    if (n > 0 && (fds[0].revents & POLLIN)) {
      unsigned char sigs[64];
      ssize_t got;
      while ((got = ::read(g_signal_pipe[0], sigs, sizeof sigs)) > 0) {
        for (ssize_t i = 0; i < got; ++i) {
          const int sig = sigs[i];
          if (sig == SIGCHLD) continue;  // reaped below, every iteration
          if (!stopping_) {
            say("received " + signal_name(sig) + "; forwarding it to the ranks");
            // An interrupted job: failures it causes are not worth a verdict.
            failures_.clear();
            settle_until_.reset();
            stopping_ = true;
            signalled_at_ = Clock::now();
            exit_code_ = 128 + sig;
            kill_deadline_ = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                std::chrono::duration<double>(opt_.grace_s));
            signal_ranks(sig);
          } else if (!killed_ && running &&
                     (!signalled_at_ || Clock::now() - *signalled_at_ >= kRepeatSignal)) {
            // Asked twice (or asked while stopping after a failure): the user
            // does not want to wait for the grace period.
            say("received " + signal_name(sig) + " while stopping; killing the ranks now");
            signal_ranks(SIGKILL);
            killed_ = true;
          }
        }
      }
    }
    for (std::size_t i = 1; i < fds.size(); ++i) {
      if (fds[i].revents != 0) {
        Stream* s = streams[i];
        const Rank& owner = *std::find_if(ranks_.begin(), ranks_.end(), [&](const Rank& r) {
          return &r.out == s || &r.err == s;
        });
        pump(*s, owner.rank);
      }
    }
    reap();
    if (stopping_ && term_deadline_ && any_running() && Clock::now() >= *term_deadline_) {
      for (const Rank& r : ranks_)
        if (r.running)
          say("rank " + std::to_string(r.rank) + " (pid " + std::to_string(r.pid) +
              ") is still running " + format_seconds(opt_.grace_s) + " s later; sending SIGTERM");
      signal_ranks(SIGTERM);
      term_deadline_.reset();
    }
    if (stopping_ && !killed_ && any_running() && Clock::now() >= kill_deadline_) {
      for (const Rank& r : ranks_)
        if (r.running)
          say("rank " + std::to_string(r.rank) + " (pid " + std::to_string(r.pid) +
              ") did not exit within " + format_seconds(opt_.grace_s) + " s; sending SIGKILL");
      signal_ranks(SIGKILL);
      killed_ = true;
    }
  }
  blame();  // failures reaped in the last round
  // Flush any partial last lines of streams abandoned above.
  for (Rank& r : ranks_) {
    for (Stream* s : {&r.out, &r.err}) {
      if (s->fd >= 0) {
        emit_lines(*s, r.rank, true);
        ::close(s->fd);
        s->fd = -1;
      }
    }
  }
  store->stop();
  remove_segments();
  return exit_code_;
}

// Removes the job's shared-memory segments. The ranks unlink theirs once
// every peer has mapped them, so only a rank that died in between leaves one.
void Launcher::remove_segments() {
  for (const std::string& name : chorus::transport::remove_shm_files("chorus-" + job_id_ + "-"))
    if (opt_.verbose) say("removed the stale shared-memory segment /dev/shm/" + name);
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  chorus::cli::Parser app{"chorusrun: start N local ranks of a Chorus program.", "chorusrun"};
  app.usage("Usage: chorusrun -n N [options] [--] program [args...]");
  app.footer(
      "Hosts a TCP rendezvous store in this process and starts N copies of the\n"
      "program with CHORUS_RANK, CHORUS_WORLD_SIZE, CHORUS_LOCAL_RANK,\n"
      "CHORUS_LOCAL_SIZE, CHORUS_STORE=host:port and CHORUS_STORE_EXTERNAL=1 set,\n"
      "so that Communicator::from_env() just works. Ranks get /dev/null as stdin.\n"
      "Each rank runs in its own process group and receives SIGTERM if chorusrun\n"
      "dies. SIGINT/SIGTERM/SIGHUP are forwarded to every rank (a second one\n"
      "sends SIGKILL). When a rank exits non-zero or is killed by a signal, the\n"
      "others get a grace period to report the failure and exit on their own,\n"
      "then SIGTERM, then SIGKILL after another grace period.\n\n"
      "Exit status: 0 if every rank exited 0; otherwise that of the first rank\n"
      "to fail (its exit code, or 128+N if killed by signal N); 128+N if chorusrun\n"
      "was interrupted by signal N; 127 if the program is not found; 1 for\n"
      "launcher errors.\n\n"
      "Example: chorusrun -n 4 -- chorus-bench -b 8 -e 128M -f 2");
  app.stop_at_first_positional();  // everything from the program name on belongs to the program
  app.add("-n,--np", opt.np, "Number of ranks to start").required().range(1, 4096);
  app.add("--store-host", opt.store_host,
          "Address the rendezvous store listens on (0.0.0.0: all interfaces)")
      .show_default();
  app.add("--store-port", opt.store_port, "Port of the rendezvous store (0: any free port)")
      .show_default()
      .range(0, 65535);
  app.add("--transport", opt.transport, "Transport for the ranks (sets CHORUS_TRANSPORT)");
  app.add("-x,--env", opt.env,
          "Extra environment for the ranks: VAR=VALUE, or VAR to pass the launcher's value "
          "(repeatable)")
      .one_value_per_use();
  app.add("--timeout", opt.timeout_s,
          "Default deadline of every Chorus call, in seconds (sets CHORUS_TIMEOUT)")
      .positive();
  app.flag("--tag-output,!--no-tag-output", opt.tag_output,
           "Prefix every line of rank r's stdout/stderr with \"[r] \" (default: on)");
  app.add("--grace", opt.grace_s,
          "Seconds the other ranks get after a failure before SIGTERM, and again before SIGKILL")
      .show_default()
      .non_negative();
  app.add("--bind-to", opt.bind_to,
          "Pin each rank to a core of its own, round-robin over NUMA nodes: auto (when "
          "2 <= ranks <= cores), core (also a single rank), none, or a CPU list, one entry "
          "per rank (0,2,4-7, or 0-3;4-7 for sets). Default: CHORUS_CPU_BIND, else auto. "
          "Never two ranks on one core. The ranks get CHORUS_CPU_BIND=none. Ranks that "
          "busy-poll (Chorus, MPI) lose tens of microseconds per call when the scheduler "
          "puts two on one CPU");
  app.flag("-v,--verbose", opt.verbose, "Report the store address, pids and every exit");

  // Split at the first "--" ourselves: what follows is the program and its
  // arguments verbatim, even when they look like chorusrun options.
  std::vector<std::string> before;
  bool have_sep = false;
  int i = 1;
  for (; i < argc && std::strcmp(argv[i], "--") != 0; ++i) before.emplace_back(argv[i]);
  if (i < argc) {
    have_sep = true;
    for (int j = i + 1; j < argc; ++j) opt.command.emplace_back(argv[j]);
  }
  if (const std::optional<int> status = app.parse(before)) return *status;
  std::vector<std::string> rest = app.remaining();
  if (have_sep && !rest.empty()) {
    say("unexpected arguments before '--': " + rest.front());
    return 1;
  }
  if (!have_sep) opt.command = rest;
  if (opt.command.empty()) {
    say("no program given (usage: chorusrun -n N [options] -- program [args...]; see --help)");
    return 1;
  }
  Launcher launcher(std::move(opt));
  return launcher.run();
}
