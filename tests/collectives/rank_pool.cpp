#include "rank_pool.hpp"
#include "shm_sweep.hpp"

#include <chorus/error.hpp>
#include <chorus/store.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <new>
#include <optional>
#include <sstream>
#include <thread>

#if defined(__SANITIZE_ADDRESS__)
#define CHORUS_TEST_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CHORUS_TEST_LSAN 1
#endif
#endif
#ifdef CHORUS_TEST_LSAN
#include <sanitizer/lsan_interface.h>
#endif

namespace chorus_test {
namespace {

using Clock = std::chrono::steady_clock;

// Fixed-size messages: both are below PIPE_BUF, so a write is never split and
// a reader never sees half a message from a live writer.
struct Command {
  enum Kind : std::uint32_t { Run = 1, Quit = 2 };
  std::uint32_t kind = Run;
  std::uint32_t size = 0;
  unsigned char payload[kMaxCaseBytes] = {};
};

struct Reply {
  std::int32_t status = 0;
  std::uint32_t size = 0;
  char text[kMaxReplyText] = {};
};

static_assert(sizeof(Command) <= PIPE_BUF && sizeof(Reply) <= PIPE_BUF,
              "pipe messages must be atomic");

// Parent-side descriptors of every live pool. A worker closes all of them
// right after fork: otherwise a worker of one pool would hold another pool's
// command pipe open, and that pool's workers would never see EOF when the
// parent dies.
std::vector<int>& parent_fds() {
  static std::vector<int> fds;
  return fds;
}

void forget_fd(int fd) {
  auto& fds = parent_fds();
  fds.erase(std::remove(fds.begin(), fds.end(), fd), fds.end());
}

bool write_full(int fd, const void* data, std::size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    size -= static_cast<std::size_t>(n);
  }
  return true;
}

// Returns the bytes read; fewer than `size` means EOF or an error.
std::size_t read_full(int fd, void* data, std::size_t size) {
  char* p = static_cast<char*>(data);
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = ::read(fd, p + done, size - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<std::size_t>(n);
  }
  return done;
}

void send_reply(int fd, const WorkerReply& r) {
  Reply msg;
  msg.status = static_cast<std::int32_t>(r.status);
  const std::size_t n = std::min(r.text.size(), kMaxReplyText - 1);
  std::memcpy(msg.text, r.text.data(), n);
  msg.size = static_cast<std::uint32_t>(n);
  if (!write_full(fd, &msg, sizeof msg)) _exit(3);  // the parent is gone
}

std::string describe_exit(int status) {
  std::ostringstream s;
  if (WIFSIGNALED(status)) {
    s << "killed by signal " << WTERMSIG(status) << " (" << strsignal(WTERMSIG(status)) << ")";
  } else if (WIFEXITED(status)) {
    s << "exited with status " << WEXITSTATUS(status);
    if (WEXITSTATUS(status) != 0) s << " (a sanitizer report, e.g. of leaks, may be on stderr)";
  } else {
    s << "status 0x" << std::hex << status;
  }
  return s.str();
}

[[noreturn]] void worker_main(int rank, int world, int cmd_fd, int reply_fd,
                              const std::string& store_dir, SharedArea* shared,
                              const CaseHandler& handler, pid_t parent) {
  // Die with the parent, whatever kills it (a timeout in the test runner).
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(1);
  for (int fd : parent_fds()) ::close(fd);
  // Cases allocate and free buffers of up to 64 MiB each; by default glibc
  // serves those with fresh mmaps, so every case pays page faults for every
  // byte. Keeping them in the heap makes the freed memory reusable.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);

  {
    chorus::Communicator comm;
    try {
      chorus::Config config;
      config.timeout = kRankTimeout;
      comm = chorus::Communicator::create(rank, world,
                                          std::make_shared<chorus::FileStore>(store_dir), config);
      if (comm.rank() != rank || comm.size() != world)
        throw std::runtime_error("created communicator has rank " + std::to_string(comm.rank()) +
                                 " of " + std::to_string(comm.size()));
    } catch (const std::exception& e) {
      send_reply(reply_fd, {WorkerReply::Status::Broken,
                            std::string("Communicator::create failed: ") + e.what()});
      _exit(2);
    }
    send_reply(reply_fd, {});  // ready

    WorkerContext ctx{comm, rank, world, *shared};
    while (true) {
      Command cmd;
      if (read_full(cmd_fd, &cmd, sizeof cmd) != sizeof cmd) break;  // parent gone
      if (cmd.kind == Command::Quit) break;
      WorkerReply reply;
      try {
        reply = handler(ctx, cmd.payload, cmd.size);
      } catch (const chorus::Error& e) {
        reply = {WorkerReply::Status::Broken, std::string("threw ") + e.what()};
      } catch (const std::exception& e) {
        reply = {WorkerReply::Status::Broken, std::string("threw std::exception: ") + e.what()};
      } catch (...) {
        reply = {WorkerReply::Status::Broken, "threw an unknown exception"};
      }
      send_reply(reply_fd, reply);
    }
  }  // the communicator is destroyed here, with every rank of the pool quitting together
#ifdef CHORUS_TEST_LSAN
  // _exit skips LeakSanitizer's atexit check; run it by hand so that the
  // library's leaks in the ranks are caught, not just the parent's.
  __lsan_do_leak_check();
#endif
  // _exit, not exit: the process is a copy of the gtest parent, whose static
  // destructors (including other pools) must not run here.
  _exit(0);
}

}  // namespace

bool ranks_check_leaks() noexcept {
#ifdef CHORUS_TEST_LSAN
  // Built with LeakSanitizer, but it can be switched off at run time.
  const char* opts = std::getenv("ASAN_OPTIONS");
  return opts == nullptr || std::strstr(opts, "detect_leaks=0") == nullptr;
#else
  return false;
#endif
}

int thread_count() {
  int n = 0;
  if (DIR* d = opendir("/proc/self/task")) {
    while (dirent* e = readdir(d))
      if (e->d_name[0] != '.') ++n;
    closedir(d);
  }
  return n;
}

std::unique_ptr<RankPool> RankPool::start(int world, CaseHandler handler, std::string* error) {
  // fork() in a multithreaded process copies only this thread; any lock held
  // by another thread (malloc's, the library's) would stay locked forever in
  // the child.
  if (const int threads = thread_count(); threads != 1) {
    *error = "cannot fork ranks: the test process has " + std::to_string(threads) +
             " threads (the parent must stay single-threaded)";
    return nullptr;
  }
  // A write to a dead worker's pipe must fail with EPIPE, not kill the runner.
  signal(SIGPIPE, SIG_IGN);

  std::unique_ptr<RankPool> pool(new RankPool());
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") +
                      "/chorus-coll-n" + std::to_string(world) + "-XXXXXX";
  if (mkdtemp(templ.data()) == nullptr) {
    *error = "mkdtemp failed: " + std::string(std::strerror(errno));
    return nullptr;
  }
  pool->store_dir_ = templ;
  void* mem = mmap(nullptr, sizeof(SharedArea), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                   -1, 0);
  if (mem == MAP_FAILED) {
    *error = "mmap failed: " + std::string(std::strerror(errno));
    return nullptr;
  }
  pool->shared_ = new (mem) SharedArea{};
  pool->alive_ = true;

  std::fflush(nullptr);  // or the children would flush the parent's buffered output again
  const pid_t parent = getpid();
  for (int r = 0; r < world; ++r) {
    int cmd[2], rep[2];
    if (pipe2(cmd, O_CLOEXEC) != 0 || pipe2(rep, O_CLOEXEC) != 0) {
      *error = "pipe failed: " + std::string(std::strerror(errno));
      return nullptr;  // the destructor kills the workers started so far
    }
    const pid_t pid = fork();
    if (pid < 0) {
      *error = "fork failed: " + std::string(std::strerror(errno));
      for (int fd : {cmd[0], cmd[1], rep[0], rep[1]}) ::close(fd);
      return nullptr;
    }
    if (pid == 0) {
      ::close(cmd[1]);
      ::close(rep[0]);
      worker_main(r, world, cmd[0], rep[1], pool->store_dir_, pool->shared_, handler, parent);
    }
    ::close(cmd[0]);
    ::close(rep[1]);
    pool->workers_.push_back(Worker{pid, cmd[1], rep[0]});
    parent_fds().push_back(cmd[1]);
    parent_fds().push_back(rep[0]);
  }

  // Collect the "ready" replies: creation needs every rank, so one that
  // fails or hangs fails the pool.
  Outcome ready = pool->run_bytes(nullptr, 0);
  if (!ready.ok) {
    *error = "starting " + std::to_string(world) + " ranks failed:\n" + ready.message;
    return nullptr;
  }
  return pool;
}

RankPool::~RankPool() {
  kill_all();
  if (shared_ != nullptr) munmap(shared_, sizeof(SharedArea));
  if (!store_dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(store_dir_, ec);
  }
}

void RankPool::kill_all() noexcept {
  for (Worker& w : workers_) {
    if (w.pid > 0) {
      ::kill(w.pid, SIGKILL);
      ::waitpid(w.pid, nullptr, 0);
      remove_shm_of_killed(w.pid);
      w.pid = -1;
    }
    for (int* fd : {&w.cmd_fd, &w.reply_fd}) {
      if (*fd >= 0) {
        forget_fd(*fd);
        ::close(*fd);
        *fd = -1;
      }
    }
  }
  alive_ = false;
}

// With bytes == nullptr, sends nothing and only collects one reply per rank
// (the "ready" message after start).
RankPool::Outcome RankPool::run_bytes(const void* bytes, std::size_t size,
                                      std::chrono::milliseconds timeout) {
  Outcome out;
  if (!alive_) {
    out.broken = true;
    out.message = "the pool was killed by an earlier failure";
    return out;
  }
  const std::size_t n = workers_.size();
  if (bytes != nullptr) {
    for (std::size_t i = 0; i < SharedArea::kCounters; ++i) shared_->counter[i].store(0);
    Command cmd;
    cmd.kind = Command::Run;
    cmd.size = static_cast<std::uint32_t>(size);
    std::memcpy(cmd.payload, bytes, size);
    // A failed write means the worker died; its reply pipe reports EOF below.
    for (const Worker& w : workers_) (void)write_full(w.cmd_fd, &cmd, sizeof cmd);
  }

  std::vector<std::optional<Reply>> replies(n);
  std::vector<std::string> deaths(n);
  std::size_t pending = n;
  const auto start = Clock::now();
  auto deadline = start + timeout;
  bool failure_seen = false;
  while (pending > 0) {
    const auto now = Clock::now();
    if (now >= deadline) break;
    std::vector<pollfd> fds;
    std::vector<std::size_t> who;
    for (std::size_t i = 0; i < n; ++i) {
      if (!replies[i] && deaths[i].empty()) {
        fds.push_back({workers_[i].reply_fd, POLLIN, 0});
        who.push_back(i);
      }
    }
    const auto wait_ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now);
    const int rc = ::poll(fds.data(), fds.size(), static_cast<int>(wait_ms.count()) + 1);
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) {
      out.message = "poll failed: " + std::string(std::strerror(errno));
      break;
    }
    for (std::size_t k = 0; k < fds.size(); ++k) {
      if (fds[k].revents == 0) continue;
      const std::size_t i = who[k];
      Reply msg;
      if (read_full(workers_[i].reply_fd, &msg, sizeof msg) == sizeof msg) {
        replies[i] = msg;
        if (msg.status != static_cast<std::int32_t>(WorkerReply::Status::Ok) &&
            msg.status != static_cast<std::int32_t>(WorkerReply::Status::Failed))
          failure_seen = true;
      } else {
        // EOF: the worker is gone (nothing else holds its reply pipe open).
        int status = 0;
        ::waitpid(workers_[i].pid, &status, 0);
        workers_[i].pid = -1;
        deaths[i] = describe_exit(status);
        failure_seen = true;
      }
      --pending;
    }
    if (failure_seen) deadline = std::min(deadline, Clock::now() + kGraceAfterFailure);
  }

  std::ostringstream msg;
  bool broken = false, failed = false;
  const auto waited = std::chrono::duration_cast<std::chrono::seconds>(Clock::now() - start);
  for (std::size_t i = 0; i < n; ++i) {
    if (!deaths[i].empty()) {
      msg << "rank " << i << ": worker process " << deaths[i] << "\n";
      broken = true;
    } else if (!replies[i]) {
      msg << "rank " << i << ": no reply after " << waited.count()
          << " s (hung, or waiting for a rank that failed)\n";
      broken = true;
    } else if (replies[i]->status != 0) {
      msg << "rank " << i << ": "
          << std::string(replies[i]->text, std::min<std::size_t>(replies[i]->size, kMaxReplyText))
          << "\n";
      failed = true;
      if (replies[i]->status != static_cast<std::int32_t>(WorkerReply::Status::Failed)) broken = true;
    }
  }
  out.message += msg.str();
  out.broken = broken;
  out.ok = !broken && !failed && out.message.empty();
  if (broken) {
    out.message += "(the ranks of this world size were killed; the next case starts new ones)\n";
    kill_all();
  }
  return out;
}

std::string RankPool::shutdown() {
  if (!alive_) return {};
  Command quit;
  quit.kind = Command::Quit;
  for (const Worker& w : workers_) (void)write_full(w.cmd_fd, &quit, sizeof quit);
  // Workers destroy their communicators together, so give them time, but
  // never hang the test runner on a worker that does not exit.
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  std::ostringstream problems;
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    Worker& w = workers_[i];
    int status = 0;
    pid_t got = 0;
    while ((got = ::waitpid(w.pid, &status, WNOHANG)) == 0 && Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (got == w.pid) {
      w.pid = -1;
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        problems << "world size " << workers_.size() << ", rank " << i << ": worker "
                 << describe_exit(status) << " at shutdown\n";
    } else {
      problems << "world size " << workers_.size() << ", rank " << i
               << ": worker did not exit within 30 s of shutdown (destroying the "
                  "communicator hung?)\n";
    }
  }
  kill_all();
  return problems.str();
}

RankPool* PoolRegistry::get(int world, std::string* error) {
  auto it = pools_.find(world);
  if (it != pools_.end() && it->second->alive()) return it->second.get();
  if (it != pools_.end()) pools_.erase(it);
  auto pool = RankPool::start(world, handler_, error);
  if (!pool) return nullptr;
  return pools_.emplace(world, std::move(pool)).first->second.get();
}

std::string PoolRegistry::shutdown_all() {
  std::string problems;
  for (auto& [world, pool] : pools_) problems += pool->shutdown();
  pools_.clear();
  return problems;
}

}  // namespace chorus_test
