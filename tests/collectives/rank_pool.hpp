#pragma once

// RankPool: N worker processes that each hold one rank of a Communicator and
// run test cases sent to them by the (gtest) parent process.
//
// Why processes and why a pool: ranks must be real processes (separate
// address spaces, real sockets, real failure modes), but creating N processes
// and a communicator per test case would make the matrix take minutes. So
// each world size forks its ranks once and runs thousands of cases through
// the same communicators; a case costs one pipe round trip plus the collective.
//
// Rules the parent must follow: fork() copies only the calling thread, so a
// pool can only be started while the parent has a single thread (gtest creates
// none; the parent must never create a Communicator itself). start() checks
// this and refuses otherwise.

#include <chorus/communicator.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <sys/types.h>

namespace chorus_test {

// Largest case descriptor and reply text that travel through the pipes. Both
// messages stay below PIPE_BUF (4096), so each write is atomic.
inline constexpr std::size_t kMaxCaseBytes = 512;
inline constexpr std::size_t kMaxReplyText = 2000;

// How long the parent waits for every rank of one case before it declares
// the pool hung, kills it and fails the case. Generous: ASan on 2 cores with
// 8 ranks is slow, and the workers' own communicator timeout (kRankTimeout)
// should fire first and give a better message.
inline constexpr std::chrono::seconds kCaseTimeout{120};
inline constexpr std::chrono::seconds kRankTimeout{60};
// Once one rank has failed, how long to wait for the others' reports (they
// usually fail fast too, with the peer's error) before killing the pool.
inline constexpr std::chrono::seconds kGraceAfterFailure{5};

// Memory shared by the parent and all workers of one pool (mapped before
// fork). Lets a case coordinate ranks outside the library, e.g. to check that
// a barrier really waited. The parent zeroes it before every case.
struct SharedArea {
  static constexpr int kCounters = 8;
  std::atomic<std::int64_t> counter[kCounters];
};
static_assert(std::atomic<std::int64_t>::is_always_lock_free,
              "counters shared between processes must be lock-free");

// What a worker sees while running one case.
struct WorkerContext {
  chorus::Communicator& comm;
  int rank;
  int size;
  SharedArea& shared;
};

// Outcome of one case on one rank.
struct WorkerReply {
  enum class Status : std::int32_t {
    Ok = 0,
    Failed = 1,  // wrong results; the communicator is still usable
    Broken = 2,  // an exception: the communicator may be unusable, restart the pool
  };
  Status status = Status::Ok;
  std::string text;  // why, when not Ok (truncated to kMaxReplyText)
};

// Runs one case in a worker: `bytes` is the descriptor the parent sent.
using CaseHandler = std::function<WorkerReply(WorkerContext&, const void* bytes, std::size_t size)>;

class RankPool {
 public:
  struct Outcome {
    bool ok = false;
    bool broken = false;  // the pool was killed; the next case needs a new one
    std::string message;  // every rank's complaint, one per line
  };

  // Forks `world` workers, each creating rank r of a communicator through a
  // FileStore in a fresh temporary directory. Returns null and sets `error`
  // on failure (including a parent that already has threads).
  static std::unique_ptr<RankPool> start(int world, CaseHandler handler, std::string* error);

  // Kills every worker (SIGKILL) and reaps it; removes the store directory.
  ~RankPool();
  RankPool(const RankPool&) = delete;
  RankPool& operator=(const RankPool&) = delete;

  int world() const noexcept { return static_cast<int>(workers_.size()); }
  bool alive() const noexcept { return alive_; }

  // Sends the case to every rank and collects their replies, bounded by
  // `timeout`. A crash, hang or exception kills the pool (alive() turns
  // false) and comes back as a failed Outcome naming the ranks.
  Outcome run_bytes(const void* bytes, std::size_t size,
                    std::chrono::milliseconds timeout = kCaseTimeout);

  template <typename Case>
  Outcome run(const Case& c, std::chrono::milliseconds timeout = kCaseTimeout) {
    static_assert(std::is_trivially_copyable_v<Case> && sizeof(Case) <= kMaxCaseBytes);
    return run_bytes(&c, sizeof c, timeout);
  }

  // Asks the workers to destroy their communicators and exit, waiting for
  // them (bounded); returns a description of any worker that did not exit
  // cleanly (e.g. a sanitizer's leak report), or "" when all did.
  std::string shutdown();

 private:
  struct Worker {
    pid_t pid = -1;
    int cmd_fd = -1;    // parent writes commands
    int reply_fd = -1;  // parent reads replies
  };

  RankPool() = default;
  void kill_all() noexcept;

  std::vector<Worker> workers_;
  SharedArea* shared_ = nullptr;
  std::string store_dir_;
  bool alive_ = false;
};

// One pool per world size, started on first use and kept until shutdown_all()
// (called from a gtest Environment's TearDown). A pool killed by a failed
// case is replaced by a fresh one on the next use.
class PoolRegistry {
 public:
  explicit PoolRegistry(CaseHandler handler) : handler_(std::move(handler)) {}
  // Null with `error` set when the pool cannot be started.
  RankPool* get(int world, std::string* error);
  // Shuts every pool down; returns what went wrong ("" when nothing).
  std::string shutdown_all();

 private:
  CaseHandler handler_;
  std::map<int, std::unique_ptr<RankPool>> pools_;
};

// Number of threads of this process (from /proc/self/task).
int thread_count();

// True when built with LeakSanitizer: then each worker checks for leaks as it
// shuts down, and RankPool::shutdown() reports a leaking rank (nonzero exit).
bool ranks_check_leaks() noexcept;

}  // namespace chorus_test
