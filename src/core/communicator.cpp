// Communicator: validation, ordering, failure handling. The algorithms and
// the transport do the communication; this file decides what runs, when,
// and what happens after something fails.

#include <chorus/communicator.hpp>

#include "algorithms/algorithms.hpp"
#include "algorithms/selector.hpp"
#include "core/config.hpp"
#include "core/device.hpp"
#include "core/work.hpp"
#include "core/enforce.hpp"
#include "core/log.hpp"
#include "core/net.hpp"
#include "core/topology.hpp"
#include "transport.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <sstream>
#include <string_view>
#include <thread>

namespace chorus {

// ---- Work -------------------------------------------------------------------

Work::Work() = default;
Work::Work(std::shared_ptr<detail::WorkState> state) : state_(std::move(state)) {}

bool Work::completed() const {
  if (!state_) return true;
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->done;
}

bool Work::test() {
  if (!state_) return true;
  std::lock_guard<std::mutex> lock(state_->mu);
  if (state_->done && state_->error) throw *state_->error;
  return state_->done;
}

void Work::wait() {
  if (!state_) return;
  if (!completed()) state_->mark_waited();
  std::unique_lock<std::mutex> lock(state_->mu);
  state_->cv.wait(lock, [&] { return state_->done; });
  if (state_->error) throw *state_->error;
}

bool Work::wait(std::chrono::milliseconds timeout) {
  if (!state_) return true;
  if (!completed()) state_->mark_waited();
  std::unique_lock<std::mutex> lock(state_->mu);
  if (!state_->cv.wait_for(lock, timeout, [&] { return state_->done; })) return false;
  if (state_->error) throw *state_->error;
  return true;
}

// ---- CommImpl ---------------------------------------------------------------

namespace detail {

using transport::CallDesc;
using transport::Coll;

struct CommImpl {
  int rank = 0;
  int size = 1;
  // A communicator from split(): each rank's rank in the top-level
  // communicator (the one create() made), for error messages; empty at the top.
  std::vector<int> top_ranks;
  std::uint64_t comm_id = 0;
  std::string prefix;
  std::shared_ptr<Store> base_store;
  std::shared_ptr<Store> store;  // prefixed for this communicator
  Settings settings;
  std::string store_host;
  std::unique_ptr<transport::Transport> transport;
  std::vector<char> scratch;
  algo::Layout layout;
  std::size_t cache_share = algo::kUnknownCacheShare;  // algo::Context::cache_share
  std::optional<algo::Selector> selector;  // set once creation is complete
  // Runs the calls on CUDA buffers; made at the first one (src/cuda).
  std::unique_ptr<device::Engine> device;
  std::atomic<bool> has_device{false};  // `device` is set (read without the lock)

  // Sequence numbers, assigned at submission so that they follow call order.
  std::uint64_t coll_seq = 0;
  std::vector<std::uint64_t> send_seq, recv_seq;
  std::uint64_t split_count = 0;

  // Executor: tickets run strictly in submission order. A blocking call runs
  // inline in the caller's thread once its turn comes (no thread hand-off on
  // the latency path); async calls run on a worker thread started on demand.
  // An async send or recv is only *posted* in its turn: it completes later,
  // driven by the worker (or by any later call's progress), so a posted send
  // never holds back the receives queued behind it (a ring of send_async +
  // recv_async completes on every transport, with or without buffering).
  std::mutex mu;
  // Blocking callers wait on `cv` for their turn; the worker waits on
  // `worker_cv` for a runnable task, and is woken only when it has one: a
  // blocking call that woke it after every call (one condition variable for
  // both) cost a futex wake and a context switch per call.
  std::condition_variable cv;
  std::condition_variable worker_cv;
  std::uint64_t next_ticket = 0;
  std::uint64_t now_serving = 0;
  struct Task {
    std::uint64_t ticket;
    std::function<void()> fn;                    // runs to completion, or
    std::function<transport::Request()> post;  // posts a request that completes later
    transport::Deadline deadline{};
    std::shared_ptr<WorkState> state;
  };
  std::deque<Task> queue;
  std::thread worker;
  bool stopping = false;
  // Posted point-to-point requests (worker thread only).
  struct Inflight {
    transport::Request req;
    transport::Deadline deadline;
    std::shared_ptr<WorkState> state;
  };
  std::deque<Inflight> inflight;
  // One thread drives the transport at a time: a blocking call, or the worker.
  std::mutex transport_mu;

  std::optional<Error> error;  // sticky: set once the communicator is unusable
  std::atomic<bool> failed{false};  // `error` is set (read without the lock)
  std::atomic<bool> aborted{false};
  int turn_waiters = 0;  // blocking callers waiting on `cv` for their turn (mu)

  // Makes the communicator unusable with `e`, unless it already is (mu held).
  void set_error(const Error& e) {
    if (error) return;
    error = e;
    failed.store(true, std::memory_order_release);
  }

  ~CommImpl() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;
    }
    cv.notify_all();
    worker_cv.notify_all();
    if (worker.joinable()) worker.join();
    if (transport && static_cast<int>(log::level()) >= static_cast<int>(log::Level::Info))
      log_traffic();
  }

  // "traffic of chorus/c0 rank 1: shm sent 12582912 B (to 0: ...), received ...;
  // tcp sent ..." - per transport, per peer; what the hosts harness counts.
  void log_traffic() const {
    std::ostringstream os;
    os << "traffic of " << prefix << " rank " << rank << ":";
    for (const auto& t : transport->traffic()) {
      auto list = [&](const char* what, const std::vector<std::uint64_t>& v) {
        std::uint64_t total = 0;
        std::ostringstream per;
        for (std::size_t p = 0; p < v.size(); ++p)
          if (v[p] > 0) {
            total += v[p];
            per << (per.tellp() > 0 ? ", " : "") << p << ": " << v[p];
          }
        os << what << " " << total << " B";
        if (total > 0) os << " (to/from rank " << per.str() << ")";
      };
      os << " [" << t.transport;
      list(" sent", t.sent);
      list("; received", t.received);
      os << "]";
    }
    log::write(log::Level::Info, os.str());
  }

  bool front_runnable() const { return !queue.empty() && queue.front().ticket == now_serving; }

  // The next ticket's turn: wakes its blocking caller or the worker (mu held).
  void next_turn() {
    ++now_serving;
    if (turn_waiters > 0) cv.notify_all();
    if (front_runnable()) worker_cv.notify_one();
  }

  void worker_loop() {
    std::unique_lock<std::mutex> lock(mu);
    while (true) {
      if (inflight.empty())
        worker_cv.wait(lock, [&] { return front_runnable() || (stopping && queue.empty()); });
      if (front_runnable()) {
        Task task = std::move(queue.front());
        queue.pop_front();
        lock.unlock();
        run_task(task);
        lock.lock();
        next_turn();
        continue;
      }
      if (!inflight.empty() && stopping && queue.empty()) {
        // The communicator is being destroyed with sends or receives posted
        // that nobody waited for: they can never complete now.
        for (auto& f : inflight)
          if (!f.req->done)
            f.state->finish(Error(ErrorCode::Aborted,
                                  "the communicator was destroyed before this operation completed"));
          else
            f.state->finish(std::nullopt);
        inflight.clear();
        return;
      }
      if (!inflight.empty()) {
        lock.unlock();
        drive_inflight();
        lock.lock();
        continue;
      }
      if (stopping && queue.empty()) return;  // drained
    }
  }

  void run_task(Task& task) {
    std::lock_guard<std::mutex> t(transport_mu);
    std::optional<Error> err;
    try {
      if (task.post) {
        transport::Request r;
        run_guarded([&] { r = task.post(); });
        inflight.push_back(Inflight{std::move(r), task.deadline, task.state});
        sweep_inflight();
        return;
      }
      run_guarded(task.fn);
    } catch (const Error& e) {
      err = e;
    }
    task.state->finish(std::move(err));
    sweep_inflight();
  }

  // Finishes the posted requests that are done.
  void sweep_inflight() {
    for (auto it = inflight.begin(); it != inflight.end();) {
      if (it->req->done) {
        it->state->finish(std::nullopt);
        it = inflight.erase(it);
      } else {
        ++it;
      }
    }
  }

  // Progresses the posted requests for a short while (worker thread).
  void drive_inflight() {
    std::lock_guard<std::mutex> t(transport_mu);
    sweep_inflight();
    if (inflight.empty()) return;
    try {
      run_guarded([&] {
        const auto now = transport::Clock::now();
        for (auto& f : inflight)
          if (!f.req->done && now >= f.deadline)
            transport->wait({&f.req, 1}, f.deadline);  // throws Timeout, naming the culprit
        transport->progress();
        bool any = false;
        for (auto& f : inflight) any = any || f.req->done;
        if (!any) {
          transport->block_for(std::chrono::microseconds(50));
          transport->progress();
        }
      });
    } catch (const Error& e) {
      for (auto& f : inflight) f.state->finish(e);
      inflight.clear();
      return;
    }
    sweep_inflight();
  }

  // Runs one operation; any failure during it makes the communicator unusable
  // and is told to the peers so that they fail fast too.
  template <typename F>
  void run_guarded(F&& fn) {
    if (failed.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> lock(mu);
      throw unusable(*error);
    }
    try {
      fn();
    } catch (const Error& e) {
      // The peers get it as it is (their own numbering); this rank's caller
      // also learns where the ranks named are in the top-level communicator.
      const Error mine = with_top_ranks(e);
      {
        std::lock_guard<std::mutex> lock(mu);
        set_error(mine);
      }
      CHORUS_INFO("rank " << rank << ": " << mine.what());  // the caller gets it thrown
      transport->broadcast_failure(e);
      throw mine;
    } catch (const std::bad_alloc&) {
      Error e(ErrorCode::System, "out of memory");
      std::lock_guard<std::mutex> lock(mu);
      set_error(e);
      throw e;
    }
  }

  // On a communicator from split(), the error's ranks (its numbering) also
  // by their ranks in the top-level communicator.
  Error with_top_ranks(const Error& e) const {
    if (top_ranks.empty()) return e;
    auto top = [&](int r) { return std::to_string(top_ranks[static_cast<std::size_t>(r)]); };
    std::string where = "this is a communicator from split(): ";
    if (size <= 16) {
      // All of them: the message may name any rank (a notice names two).
      std::string here, there;
      for (int r = 0; r < size; ++r) {
        here += (r ? ", " : "") + std::to_string(r);
        there += (r ? ", " : "") + top(r);
      }
      where += "its ranks " + here + " are ranks " + there +
               " of the top-level communicator; this rank is " + std::to_string(rank) + " here";
    } else if (e.peer() >= 0 && e.peer() < size && e.peer() != rank) {
      where += "rank " + std::to_string(e.peer()) + " here is rank " + top(e.peer()) +
               " of the top-level communicator, and this rank, " + std::to_string(rank) +
               " here, is rank " + top(rank) + " there";
    } else {
      where += "this rank, " + std::to_string(rank) + " here, is rank " + top(rank) +
               " of the top-level communicator";
    }
    return Error(e.code(), e.message() + " (" + where + ")", e.peer());
  }

  static Error unusable(const Error& e) {
    return Error(e.code(),
                 "this communicator failed earlier and cannot be used any more (create a new "
                 "one): " + e.message(),
                 e.peer());
  }

  // Submits an operation. Validation has already happened in the caller.
  // A template, so that a blocking call runs its closure without wrapping
  // it in a std::function (whose heap copy was 7% of an 8-byte allreduce).
  // A blocking collective passes `seq`, which gets its sequence number under
  // the same lock as its ticket (one lock round fewer on the latency path).
  template <typename F>
  Work submit(F&& fn, bool async, std::uint64_t* seq = nullptr) {
    std::unique_lock<std::mutex> lock(mu);
    if (error) throw unusable(*error);
    if (seq != nullptr) *seq = coll_seq++;
    const std::uint64_t ticket = next_ticket++;
    if (async) return enqueue(Task{ticket, std::function<void()>(std::forward<F>(fn)), nullptr, {}, nullptr});
    if (now_serving != ticket) {
      ++turn_waiters;
      cv.wait(lock, [&] { return now_serving == ticket; });
      --turn_waiters;
    }
    // Without a worker nothing else drives the transport: a worker started
    // while this call runs waits for a later turn before it touches it.
    const bool solo = !worker.joinable();
    lock.unlock();
    struct Advance {
      CommImpl* self;
      ~Advance() {
        std::lock_guard<std::mutex> l(self->mu);
        self->next_turn();
      }
    } advance{this};
    std::unique_lock<std::mutex> t(transport_mu, std::defer_lock);
    if (!solo) t.lock();
    run_guarded(fn);
    return Work();
  }

  // Submits an async point-to-point operation: `post` runs in its turn on the
  // worker and returns the request; the Work completes when it is done.
  Work submit_posted(std::function<transport::Request()> post, transport::Deadline deadline) {
    std::lock_guard<std::mutex> lock(mu);
    if (error) throw unusable(*error);
    return enqueue(Task{next_ticket++, nullptr, std::move(post), deadline, nullptr});
  }

  // Queues an async task for the worker (mu held).
  Work enqueue(Task task) {
    task.state = std::make_shared<WorkState>();
    Work w(task.state);
    queue.push_back(std::move(task));
    if (!worker.joinable()) worker = std::thread([this] { worker_loop(); });
    worker_cv.notify_one();
    return w;
  }

  transport::Deadline deadline(const CallOptions& o) const {
    const auto t = o.timeout.count() > 0 ? o.timeout : settings.timeout;
    // The coarse clock is a tick (1-10 ms) behind: precise for short timeouts.
    if (t < std::chrono::milliseconds(100)) return transport::Clock::now() + t;
    return transport::coarse_now() + t;
  }

  // The host algorithm for `call` on host buffers: what the device engine's
  // staged path runs on pinned copies (transport lock held). Send/recv go to `peer`.
  void run_host(const CallDesc& call, const void* s, void* r, const std::string& forced,
                transport::Deadline dl, int peer) {
    const std::size_t bytes = static_cast<std::size_t>(call.count) * size_of(call.dtype);
    if (call.coll == Coll::SendRecv) {
      auto req = s != nullptr ? transport->isend(peer, call, s, bytes)
                              : transport->irecv(peer, call, r, bytes, transport::Combine::copy());
      transport->wait({&req, 1}, dl);
      return;
    }
    const algo::Call shape{call.coll, static_cast<std::size_t>(call.count), call.dtype, call.op,
                           call.root};
    const algo::Algorithm& a = selector->choose(shape, forced);
    CallDesc d = call;
    d.algo = algo::Selector::wire_id(a);
    algo::Args args{s, r};
    args.count = static_cast<std::size_t>(call.count);
    args.dtype = call.dtype;
    args.op = call.op;
    args.root = call.root;
    algo::Context ctx = context(d, dl);
    a.run(ctx, args);
  }

  // An allgatherv with counts that differ, on host buffers: the ring, or
  // Bruck's rounds.
  void run_allgatherv(const CallDesc& call, const void* s, void* r,
                      std::span<const std::size_t> counts, bool bruck, transport::Deadline dl) {
    algo::Context ctx = context(call, dl);
    if (bruck)
      algo::bruck_allgatherv(ctx, s, r, counts, call.dtype);
    else
      algo::ring_allgatherv(ctx, s, r, counts, call.dtype);
  }

  // A reduce_scatterv with counts that differ, on host buffers: the ring,
  // or recursive halving.
  void run_reduce_scatterv(const CallDesc& call, const void* s, void* r,
                           std::span<const std::size_t> counts, bool halving,
                           transport::Deadline dl) {
    algo::Context ctx = context(call, dl);
    if (halving)
      algo::halving_reduce_scatterv(ctx, s, r, counts, call.dtype, call.op);
    else
      algo::ring_reduce_scatterv(ctx, s, r, counts, call.dtype, call.op);
  }

  // An alltoallv on host buffers (its only algorithm, pairwise exchange).
  void run_alltoallv(const CallDesc& call, const void* s, void* r,
                     std::span<const std::size_t> sendcounts,
                     std::span<const std::size_t> recvcounts, transport::Deadline dl) {
    algo::Context ctx = context(call, dl);
    algo::pairwise_alltoallv(ctx, s, sendcounts, r, recvcounts, call.dtype);
  }

  // Fails the call if the GPU reported an error after an earlier device call
  // returned; the communicator is unusable from then on.
  void check_device_error() {
    if (!has_device.load(std::memory_order_acquire)) return;
    std::lock_guard<std::mutex> lock(mu);
    if (!error)
      if (auto e = device->async_error()) set_error(*e);
    if (error) throw unusable(*error);
  }

  algo::Context context(const CallDesc& call, transport::Deadline dl) {
    algo::Context ctx{*transport, rank, size, call, dl, settings.chunk_bytes, scratch, &layout, nullptr};
    ctx.cache_share = cache_share;
    return ctx;
  }
  algo::Context context(const CallDesc& call, const CallOptions& o) { return context(call, deadline(o)); }
};

}  // namespace detail

// ---- validation helpers -----------------------------------------------------

namespace {

using detail::CommImpl;
using transport::CallDesc;
using transport::Coll;

void check_dtype(DataType t) {
  if (!is_valid(t))
    throw Error(ErrorCode::InvalidArgument, "unknown DataType value " +
                                                std::to_string(static_cast<int>(t)) +
                                                " (use a chorus::DataType enumerator)");
}

void check_op(ReduceOp op) {
  if (!is_valid(op))
    throw Error(ErrorCode::InvalidArgument, "unknown ReduceOp value " +
                                                std::to_string(static_cast<int>(op)) +
                                                " (use a chorus::ReduceOp enumerator)");
}

void check_buffer(const void* p, std::size_t count, const char* what, const char* call) {
  if (p == nullptr && count > 0)
    throw Error(ErrorCode::InvalidArgument,
                std::string(call) + ": " + what + " is null but count is " + std::to_string(count));
}

void check_count(std::size_t count, std::size_t multiplier, DataType t, const char* call) {
  // count x element size x multiplier within 2^48 bytes, without dividing
  // (two 64-bit divisions were 3% of an 8-byte allreduce).
  std::size_t bytes = 0;
  if (__builtin_mul_overflow(count, size_of(t) * std::max<std::size_t>(multiplier, 1), &bytes) ||
      bytes > (std::size_t{1} << 48))
    throw Error(ErrorCode::InvalidArgument, std::string(call) + ": count " + std::to_string(count) +
                                                " is too large (wrapped negative value?)");
}

void check_root(int root, int size, const char* call) {
  if (root < 0 || root >= size)
    throw Error(ErrorCode::InvalidArgument, std::string(call) + ": root " + std::to_string(root) +
                                                " is not a rank of this communicator (size " +
                                                std::to_string(size) + ")");
}

bool overlaps(const void* a, std::size_t an, const void* b, std::size_t bn) {
  auto pa = reinterpret_cast<std::uintptr_t>(a);
  auto pb = reinterpret_cast<std::uintptr_t>(b);
  return an > 0 && bn > 0 && pa < pb + bn && pb < pa + an;
}

std::string host_identity() {
  // Hostname plus network namespace: ranks in different namespaces of one
  // machine (the multi-host test harness) count as different hosts.
  char name[256] = {};
  gethostname(name, sizeof name - 1);
  std::string id = name;
  char ns[128] = {};
  const ssize_t n = readlink("/proc/self/ns/net", ns, sizeof ns - 1);
  if (n > 0) id += "/" + std::string(ns, static_cast<std::size_t>(n));
  return id;
}

std::uint64_t hash64(const std::string& s) {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char ch : s) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return h;
}

// Each rank counts the communicators it creates on a store; the k-th lives
// under chorus/c<k>. When creation times out, unequal counts explain why:
// two processes claimed one rank (the second one's count ran ahead), or the
// ranks did not create the same communicators in the same order.
std::string diagnose_generations(Store& base, int rank, int size) {
  try {
    std::vector<std::int64_t> gen(static_cast<std::size_t>(size), 0);
    for (int r = 0; r < size; ++r) {
      const std::string key = "chorus/generation/" + std::to_string(r);
      if (base.check({key})) gen[static_cast<std::size_t>(r)] = std::stoll(base.get_string(key));
    }
    const auto mine = gen[static_cast<std::size_t>(rank)];
    std::string ahead;
    for (int r = 0; r < size; ++r)
      if (r != rank && gen[static_cast<std::size_t>(r)] != mine)
        ahead += " rank " + std::to_string(r) + ": " + std::to_string(gen[static_cast<std::size_t>(r)]) + ";";
    if (ahead.empty()) return "";
    return ". This rank (" + std::to_string(rank) + ") is creating communicator #" +
           std::to_string(mine) + " on this store, but the others have created:" + ahead +
           " either two processes claim the same rank (check the launcher's rank variables), "
           "or the ranks did not create the same communicators in the same order";
  } catch (...) {
    return "";
  }
}

// The selector's inputs, agreed by every rank (algorithms/selector.hpp):
// the layout from the host keys and transports every rank published, the
// model that rank 0 read (its CHORUS_TUNING_FILE or the built-in defaults),
// and CHORUS_ALGO, which must be the same everywhere.
void setup_selector(CommImpl& c, Store& st) {
  const int size = c.size;
  std::vector<int> host_of(static_cast<std::size_t>(size));
  std::vector<std::string> hosts;
  bool local_shm = true;
  for (int r = 0; r < size; ++r) {
    const std::string h = st.get_string("host/" + std::to_string(r));
    auto it = std::find(hosts.begin(), hosts.end(), h);
    host_of[static_cast<std::size_t>(r)] = static_cast<int>(it - hosts.begin());
    if (it == hosts.end()) hosts.push_back(h);
    // "shm", or a composite of shm and tcp: same-host peers use shared memory.
    if (st.get_string("ready/" + std::to_string(r)).find("shm") == std::string::npos) local_shm = false;
  }
  algo::Layout layout = algo::Layout::from_hosts(std::move(host_of), local_shm && size > 1);
  if (c.rank == 0) {
    algo::Model m = algo::Model::defaults_for(c.settings.transport, layout);
    if (!c.settings.tuning_file.empty()) {
      std::ifstream in(c.settings.tuning_file);
      if (!in)
        throw Error(ErrorCode::InvalidArgument, "CHORUS_TUNING_FILE='" + c.settings.tuning_file +
                                                    "' cannot be read: " + std::strerror(errno));
      std::stringstream text;
      text << in.rdbuf();
      m = algo::model_from_text(text.str(), m, c.settings.tuning_file);
    }
    st.set_string("algo/model", algo::model_to_text(m) + "#source " + m.source);
  }
  st.set_string("algo/forced/" + std::to_string(c.rank), c.settings.algo);
  std::vector<std::string> keys = {"algo/model"};
  for (int r = 0; r < size; ++r) keys.push_back("algo/forced/" + std::to_string(r));
  st.wait(keys, c.settings.timeout);
  for (int r = 0; r < size; ++r) {
    const std::string theirs = st.get_string("algo/forced/" + std::to_string(r));
    if (theirs != c.settings.algo)
      throw Error(ErrorCode::InvalidUsage,
                  "ranks disagree on CHORUS_ALGO: rank " + std::to_string(r) + " has '" + theirs +
                      "' but rank " + std::to_string(c.rank) + " has '" + c.settings.algo +
                      "' (every rank must force the same algorithms)",
                  r);
  }
  const std::string text = st.get_string("algo/model");
  algo::Model m = algo::model_from_text(text, algo::Model{}, "rank 0's model");
  if (auto at = text.find("#source "); at != std::string::npos) m.source = text.substr(at + 8);
  c.layout = layout;
  c.selector.emplace(std::move(layout), std::move(m),
                     algo::parse_algo_overrides(c.settings.algo, "CHORUS_ALGO"));
  CHORUS_INFO("algorithm selection: " << c.layout.hosts << " host(s), up to "
                                      << c.layout.max_per_host << " ranks per host, "
                                      << (c.layout.local_shm ? "shared memory" : "sockets")
                                      << " within a host; model from " << c.selector->model().source
                                      << (c.settings.algo.empty() ? "" : "; CHORUS_ALGO=" + c.settings.algo));
}

std::shared_ptr<CommImpl> make_comm(int rank, int size, std::shared_ptr<Store> base,
                                    const std::string& prefix, const Settings& settings,
                                    const std::string& store_host,
                                    std::vector<int> top_ranks = {}) {
  auto impl = std::make_shared<CommImpl>();
  impl->rank = rank;
  impl->size = size;
  impl->top_ranks = std::move(top_ranks);
  impl->prefix = prefix;
  impl->comm_id = hash64(prefix);
  impl->base_store = base;
  impl->store = std::make_shared<PrefixStore>(prefix, base);
  impl->settings = settings;
  impl->store_host = store_host;
  impl->send_seq.assign(static_cast<std::size_t>(size), 0);
  impl->recv_seq.assign(static_cast<std::size_t>(size), 0);
  Store& st = *impl->store;

  // Two processes claiming one rank is a launch error that would otherwise
  // show up as an obscure hang.
  const auto claims = st.add("claim/" + std::to_string(rank), 1);
  if (claims > 1)
    throw Error(ErrorCode::InvalidUsage, "two processes claim rank " + std::to_string(rank) +
                                             " of " + std::to_string(size) +
                                             " in the same job; check the launcher's rank variables");

  // Where do we listen? One host: loopback. Several: the interface asked for,
  // or the address the route to the store uses.
  st.set_string("transport/" + std::to_string(rank), settings.transport);
  st.set_string("host/" + std::to_string(rank), host_identity());
  std::vector<std::string> host_keys;
  for (int r = 0; r < size; ++r) host_keys.push_back("host/" + std::to_string(r));
  try {
    st.wait(host_keys, settings.timeout);
  } catch (const Error& e) {
    std::string missing;
    for (const auto& k : host_keys)
      if (!st.check({k})) missing += " " + k.substr(5);
    throw Error(ErrorCode::Timeout, "communicator creation: rank(s)" + missing +
                                        " did not join within the timeout (world size " +
                                        std::to_string(size) + ")" +
                                        diagnose_generations(*base, rank, size));
  }
  // Every rank must ask for the same transport: mixing "auto" and "tcp" would
  // leave one side waiting for a shared-memory segment that never comes.
  for (int r = 0; r < size; ++r) {
    const std::string theirs = st.get_string("transport/" + std::to_string(r));
    if (theirs != settings.transport)
      throw Error(ErrorCode::InvalidUsage,
                  "ranks disagree on the transport: rank " + std::to_string(r) + " uses '" + theirs +
                      "' but rank " + std::to_string(rank) + " uses '" + settings.transport +
                      "' (CHORUS_TRANSPORT or Config::transport must be the same on every rank)",
                  r);
  }
  const std::string me = host_identity();
  std::vector<int> host_ranks;  // this host's ranks, ascending
  for (int r = 0; r < size; ++r)
    if (st.get_string("host/" + std::to_string(r)) == me) host_ranks.push_back(r);
  int local_ranks = static_cast<int>(host_ranks.size());
  const bool single_host = local_ranks == size;
  // CPU binding (CHORUS_CPU_BIND, core/topology.hpp): local index = position among this host's ranks.
  topo::bind_local_rank(
      static_cast<int>(std::find(host_ranks.begin(), host_ranks.end(), rank) - host_ranks.begin()),
      local_ranks, settings.cpu_bind);
  // With more ranks than CPUs a rank that busy-polls steals time from the
  // one it waits for, and one that blocks at once pays a futex wake-up per
  // step; polling with a sched_yield() after every look hands the CPU
  // straight to a runnable peer (8-byte allreduce on 2 cores, 4 ranks: 111
  // us blocking at once, 27 us polling 200 us with a yield every 256 looks,
  // 18 us with a yield after each; 8 ranks: 115, 74 with yields).
  Settings eff = settings;
  // The host's CPUs, not this process's affinity mask: a launcher that pins
  // each rank to one CPU is the case where spinning pays most.
  const int ncpu = std::max(1, static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)));
  const bool oversubscribed = local_ranks > ncpu;
  if (!settings.spin_from_env && oversubscribed) eff.spin = std::chrono::microseconds(200);
  impl->settings = eff;
  // Copies that end a call whose buffers outgrow this rank's share of the
  // last-level cache bypass it (algo::streams).
  const std::size_t llc = settings.llc_bytes != 0 ? settings.llc_bytes : topo::last_level_cache_bytes();
  if (llc != 0) impl->cache_share = llc / static_cast<std::size_t>(local_ranks);

  transport::TransportContext tc;
  tc.rank = rank;
  tc.size = size;
  tc.comm_id = impl->comm_id;
  tc.store = impl->store;
  tc.spin = eff.spin;
  tc.oversubscribed = oversubscribed;
  tc.connect_timeout = settings.timeout;
  tc.socket_buffer_bytes = settings.socket_buffer_bytes;
  if (!settings.socket_ifname.empty()) tc.listen_host = net::interface_address(settings.socket_ifname);
  else if (single_host) tc.listen_host = "127.0.0.1";
  else if (!store_host.empty()) tc.listen_host = net::local_address_towards(store_host);
  else
    throw Error(ErrorCode::InvalidArgument,
                "ranks are on several hosts but no network interface is known: set "
                "CHORUS_SOCKET_IFNAME (e.g. eth0)");
  tc.host_ranks = host_ranks;
  tc.shm_large = settings.shm_large;
  tc.shm_mapped_min = settings.shm_mapped_min;
  tc.shm_mapped_copy_min = settings.shm_mapped_copy_min;
  tc.shm_split = settings.shm_split;
  tc.fi_provider = settings.fi_provider;
  tc.fi_mr = settings.fi_mr;
  tc.fi_rma = settings.fi_rma;
  impl->transport = transport::create_transports(settings.transport, tc);

  // Creation is complete on every rank only when the whole group exists.
  st.set_string("ready/" + std::to_string(rank), impl->transport->name());
  std::vector<std::string> ready_keys;
  for (int r = 0; r < size; ++r) ready_keys.push_back("ready/" + std::to_string(r));
  st.wait(ready_keys, settings.timeout);
  impl->transport->group_ready();
  setup_selector(*impl, st);
  CHORUS_INFO("communicator " << prefix << ": rank " << rank << "/" << size << ", transport "
                              << impl->transport->name() << " (" << settings.transport << ") on "
                              << tc.listen_host
                              << (single_host ? " (single host)" : " (multi-host)")
                              << ", chunk " << settings.chunk_bytes << " B, cache "
                              << (llc != 0 ? std::to_string(llc >> 10) + " KiB" : "unknown") << " ("
                              << (impl->cache_share >> 10) << " KiB a rank), spin "
                              << eff.spin.count() << " us (" << local_ranks << " ranks on "
                              << ncpu << " CPUs here), timeout " << settings.timeout.count()
                              << " ms");
  return impl;
}

}  // namespace

// ---- creation -----------------------------------------------------------------

Communicator::Communicator() = default;
Communicator::Communicator(std::shared_ptr<detail::CommImpl> impl) : impl_(std::move(impl)) {}

Communicator Communicator::create(int rank, int size, std::shared_ptr<Store> store,
                                  const Config& config) {
  if (size < 1) throw Error(ErrorCode::InvalidArgument, "world size " + std::to_string(size) + " must be >= 1");
  if (rank < 0 || rank >= size)
    throw Error(ErrorCode::InvalidArgument,
                "rank " + std::to_string(rank) + " is outside [0, " + std::to_string(size) + ")");
  if (!store) throw Error(ErrorCode::InvalidArgument, "store is null");
  const Settings settings = resolve_settings(config);
  log::set_rank(rank);
  // The k-th communicator this rank creates on this store uses namespace k, so
  // that several communicators (or test cases) can share one store.
  const auto gen = store->add("chorus/generation/" + std::to_string(rank), 1);
  return Communicator(make_comm(rank, size, store, "chorus/c" + std::to_string(gen), settings, ""));
}

Communicator Communicator::from_env(const Config& config) {
  const LaunchInfo info = launch_info_from_env();
  if (info.store_host.empty())
    throw Error(ErrorCode::InvalidUsage,
                "no rendezvous address: set CHORUS_STORE=host:port (or MASTER_ADDR and "
                "MASTER_PORT), or launch with chorusrun");
  const Settings settings = resolve_settings(config);
  log::set_rank(info.rank);
  TcpStore::Options opts;
  opts.is_server = info.rank == 0 && !info.store_external;
  opts.timeout = settings.timeout;
  auto store = std::make_shared<TcpStore>(info.store_host, info.store_port, opts);
  const auto gen = store->add("chorus/generation/" + std::to_string(info.rank), 1);
  return Communicator(make_comm(info.rank, info.size, store, "chorus/c" + std::to_string(gen),
                                settings, info.store_host));
}

bool Communicator::valid() const noexcept { return impl_ != nullptr; }

namespace {
CommImpl& need(const std::shared_ptr<CommImpl>& impl) {
  if (!impl)
    throw Error(ErrorCode::InvalidUsage,
                "this Communicator handle is empty (default-constructed, or from split() with a "
                "negative color)");
  return *impl;
}
}  // namespace

int Communicator::rank() const { return need(impl_).rank; }
int Communicator::size() const { return need(impl_).size; }
std::string Communicator::transport_name() const { return need(impl_).transport->name(); }

namespace {
std::optional<Coll> coll_from_name(const std::string& name) {
  for (Coll c : {Coll::Allreduce, Coll::Broadcast, Coll::Allgather, Coll::ReduceScatter, Coll::Reduce,
                 Coll::Gather, Coll::Scatter, Coll::Alltoall, Coll::Barrier})
    if (name == algo::coll_key(c)) return c;
  // The calls with counts per pair or rank run their fixed-count twin's
  // algorithms (pairwise; the ring or bruck; the ring or recursive
  // halving): asked with one count, they
  // answer as it would.
  if (name == "alltoallv") return Coll::Alltoall;
  if (name == "allgatherv") return Coll::Allgather;
  if (name == "reduce_scatterv") return Coll::ReduceScatter;
  return std::nullopt;
}

}  // namespace

std::vector<std::string> transport_names() { return transport::transport_names(); }

std::vector<std::string> algorithm_names(const std::string& collective) {
  std::vector<std::string> out;
  const auto coll = coll_from_name(collective);
  if (!coll) return out;
  for (const algo::Algorithm* a : algo::all_algorithms())
    if (a->coll == *coll) out.emplace_back(a->name);
  return out;
}

std::string Communicator::algorithm_for(const std::string& collective, std::size_t count,
                                        DataType dtype, ReduceOp op, int root) const {
  auto& c = need(impl_);
  const auto coll = coll_from_name(collective);
  if (!coll)
    throw Error(ErrorCode::InvalidArgument,
                "algorithm_for: unknown collective '" + collective + "'");
  const bool rooted = *coll == Coll::Broadcast || *coll == Coll::Reduce || *coll == Coll::Gather ||
                      *coll == Coll::Scatter;
  return c.selector->choose(algo::Call{*coll, count, dtype, op, rooted ? root : -1}).name;
}

std::vector<std::pair<std::string, double>> Communicator::algorithm_estimates(
    const std::string& collective, std::size_t count, DataType dtype, ReduceOp op, int root,
    const std::string& tuning) const {
  auto& c = need(impl_);
  const auto coll = coll_from_name(collective);
  if (!coll)
    throw Error(ErrorCode::InvalidArgument,
                "algorithm_estimates: unknown collective '" + collective + "'");
  const bool rooted = *coll == Coll::Broadcast || *coll == Coll::Reduce || *coll == Coll::Gather ||
                      *coll == Coll::Scatter;
  algo::Model model = c.selector->model();
  if (!tuning.empty()) {
    model = algo::model_from_text(tuning, model, "tuning text");
    model.fits.clear();
    for (const auto& [k, f] : algo::model_from_text(tuning, algo::Model{}, "tuning text").fits)
      model.fits[k] = f;
  }
  const algo::Selector what_if(c.layout, model, {});
  std::vector<std::pair<std::string, double>> out;
  for (const auto& e : what_if.estimates(algo::Call{*coll, count, dtype, op, rooted ? root : -1}))
    out.emplace_back(e.algo->name,
                     e.excluded.empty() ? e.us : std::numeric_limits<double>::quiet_NaN());
  return out;
}

std::optional<Error> Communicator::error() const {
  if (impl_ && impl_->has_device.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (!impl_->error)
      if (auto e = impl_->device->async_error()) impl_->set_error(*e);
  }
  auto& c = need(impl_);
  std::lock_guard<std::mutex> lock(c.mu);
  return c.error;
}

void Communicator::abort() {
  auto& c = need(impl_);
  Error e(ErrorCode::Aborted, "communicator aborted by rank " + std::to_string(c.rank));
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.set_error(e);
  }
  c.aborted.store(true);
  c.transport->abort(e.message());
  c.cv.notify_all();
  c.worker_cv.notify_all();
}

// ---- collectives ----------------------------------------------------------------

namespace {

CallDesc make_call(CommImpl& /*c*/, Coll coll, DataType t, ReduceOp op, int root, std::size_t count) {
  CallDesc d;
  d.coll = coll;
  d.dtype = t;
  d.op = op;
  d.root = root;
  d.count = count;
  return d;
}

// Which of a call's buffers this rank uses; the others may be null or stale.
std::pair<bool, bool> used_buffers(const CallDesc& call, int rank) {
  const bool root = call.root == rank;
  switch (call.coll) {
    case Coll::Broadcast:
    case Coll::Scatter: return {root, true};
    case Coll::Reduce:
    case Coll::Gather: return {true, root};
    case Coll::Barrier: return {false, false};
    default: return {true, true};
  }
}

// The GPU holding this rank's buffers, or nothing for host memory. Both
// buffers must be of one kind (and on one GPU).
std::optional<int> device_of(const CallDesc& call, const void* s, const void* r, bool use_s,
                             bool use_r) {
  if (call.count == 0) return std::nullopt;  // nothing is read or written
  // Without a usable GPU every pointer is host memory (the query would say
  // so, at 3% of an 8-byte allreduce).
  static const bool gpus = device::built() && device::unavailable_reason().empty();
  if (!gpus) return std::nullopt;
  const device::PtrInfo ds = use_s ? device::query(s) : device::PtrInfo{};
  const device::PtrInfo dr = use_r ? device::query(r) : device::PtrInfo{};
  if (!ds.device && !dr.device) return std::nullopt;
  const std::string name(to_string(call.coll));
  if (use_s && use_r && s != nullptr && r != nullptr && ds.device != dr.device)
    throw Error(ErrorCode::InvalidArgument,
                name + ": sendbuf is " + (ds.device ? "CUDA device" : "host") + " memory but recvbuf is " +
                    (dr.device ? "CUDA device" : "host") + " memory; pass both in the same kind");
  if (ds.device && dr.device && ds.ordinal != dr.ordinal)
    throw Error(ErrorCode::InvalidArgument,
                name + ": sendbuf is on GPU " + std::to_string(ds.ordinal) + " but recvbuf on GPU " +
                    std::to_string(dr.ordinal) + "; pass buffers of one GPU");
  if (ds.device) return ds.ordinal;
  if (dr.device) return dr.ordinal;
  return std::nullopt;
}

void need_gpu(const CallOptions& o) {
  if (o.stream == nullptr) return;
  if (!device::built())
    throw Error(ErrorCode::Cuda, "a CUDA stream was given but this build has no CUDA support");
  if (const std::string why = device::unavailable_reason(); !why.empty())
    throw Error(ErrorCode::Cuda, "a CUDA stream was given but " + why);
}

// A call on device buffers: the device engine runs it in the call's turn.
// An asynchronous one marks, now, where it enters its stream: it runs later,
// on the worker, after the work queued there before the call.
// An alltoallv's, allgatherv's or reduce_scatterv's counts, kept for the
// call's run (an asynchronous one outlives the caller's spans). An
// allgatherv and a reduce_scatterv have recv only (every rank's count): an
// allgatherv's rank sends its own, a reduce_scatterv's sends their sum.
struct VCounts {
  std::vector<std::size_t> send, recv;
  // Not the ring but the other algorithm: an allgatherv's Bruck rounds, a
  // reduce_scatterv's recursive halving.
  bool second = false;
};

Work run_device(CommImpl& c, CallDesc call, const void* s, void* r, int ordinal, int peer,
                const CallOptions& o, bool async, std::shared_ptr<const VCounts> v = nullptr) {
  call.device = true;
  call.algo = 0;
  std::shared_ptr<device::Entry> entry;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (!c.device) {
      c.device = device::make_engine(device::EngineSetup{c.transport.get(), c.rank, c.size,
                                                         c.layout.single_host(), c.settings});
      c.has_device.store(true, std::memory_order_release);
    }
    // Before the sequence number: a call that fails here never happened.
    if (async) entry = c.device->enter(o.stream, ordinal);
    if (call.coll != Coll::SendRecv) call.seq = c.coll_seq++;
  }
  CHORUS_TRACE(transport::describe(call) << " on GPU " << ordinal);
  return c.submit(
      [&c, call, s, r, ordinal, peer, o, entry, v] {
        device::Request req;
        req.call = call;
        req.send = s;
        req.recv = r;
        req.stream = o.stream;
        req.ordinal = ordinal;
        req.entry = entry.get();
        req.deadline = c.deadline(o);
        const bool gatherv = call.coll == Coll::Allgatherv;
        const bool scatterv = call.coll == Coll::ReduceScatterv;
        if (v) {
          const std::size_t es = size_of(call.dtype);
          for (std::size_t k : v->send) req.send_bytes += k * es;
          for (std::size_t k : v->recv) req.recv_bytes += k * es;
          const std::size_t mine = v->recv[static_cast<std::size_t>(c.rank)] * es;
          if (gatherv) req.send_bytes = mine;
          if (scatterv) {  // sends every block, receives its own
            req.send_bytes = req.recv_bytes;
            req.recv_bytes = mine;
          }
        }
        c.device->run(req, [&](const CallDesc& part, const void* ps, void* pr) {
          if (v && gatherv) {
            c.run_allgatherv(part, ps, pr, v->recv, v->second, req.deadline);
            return;
          }
          if (v && scatterv) {
            c.run_reduce_scatterv(part, ps, pr, v->recv, v->second, req.deadline);
            return;
          }
          if (v) {
            c.run_alltoallv(part, ps, pr, v->send, v->recv, req.deadline);
            return;
          }
          // An algorithm forced for this call names one of its collective: the
          // engine's other steps (the alltoall of a reduction combined on the
          // GPU) take the selector's choice.
          c.run_host(part, ps, pr, part.coll == call.coll ? o.algorithm : std::string(),
                     req.deadline, peer);
        });
      },
      async);
}

// Chooses the algorithm (in the caller's thread, so that a forced algorithm
// that cannot run the call fails here), assigns the collective sequence
// number at submission time, and runs the algorithm in the call's turn.
// Calls on device buffers go to the device engine instead.
Work run_collective(CommImpl& c, CallDesc call, algo::Args args, const CallOptions& o, bool async) {
  c.check_device_error();
  const auto [use_s, use_r] = used_buffers(call, c.rank);
  if (const auto gpu = device_of(call, args.send, args.recv, use_s, use_r))
    return run_device(c, call, use_s ? args.send : nullptr, use_r ? args.recv : nullptr, *gpu, -1,
                      o, async);
  need_gpu(o);
  const algo::Call shape{call.coll, static_cast<std::size_t>(call.count), call.dtype, call.op, call.root};
  const algo::Algorithm& a = c.selector->choose(shape, o.algorithm);
  call.algo = algo::Selector::wire_id(a);
  args.count = static_cast<std::size_t>(call.count);
  args.dtype = call.dtype;
  args.op = call.op;
  args.root = call.root;
  const algo::Algorithm* algorithm = &a;
  auto run = [&c, algorithm](const CallDesc& d, const CallOptions& opt, const algo::Args& in) {
    CHORUS_TRACE(transport::describe(d) << " with " << algorithm->name);
    // Host buffers given with a stream: ordered after the work queued before.
    if (opt.stream != nullptr) device::synchronize(opt.stream);
    algo::Context ctx = c.context(d, opt);
    algorithm->run(ctx, in);
  };
  // Sequence numbers must follow submission order: taken under the lock
  // that hands out the turns.
  if (!async) return c.submit([&] { run(call, o, args); }, false, &call.seq);
  {
    std::lock_guard<std::mutex> lock(c.mu);
    call.seq = c.coll_seq++;
  }
  return c.submit([run, call, o, args] { run(call, o, args); }, true);
}

}  // namespace

namespace {

Work op_allreduce(CommImpl& c, const void* s, void* r, std::size_t count, DataType t, ReduceOp op,
                  const CallOptions& o, bool async) {
  check_dtype(t);
  check_op(op);
  check_count(count, 1, t, "allreduce");
  check_buffer(s, count, "sendbuf", "allreduce");
  check_buffer(r, count, "recvbuf", "allreduce");
  const std::size_t bytes = count * size_of(t);
  if (s != r && overlaps(s, bytes, r, bytes))
    throw Error(ErrorCode::InvalidArgument, "allreduce: sendbuf and recvbuf overlap but are not equal");
  return run_collective(c, make_call(c, Coll::Allreduce, t, op, -1, count), {s, r}, o, async);
}

Work op_broadcast(CommImpl& c, const void* s, void* r, std::size_t count, DataType t, int root,
                  const CallOptions& o, bool async) {
  check_dtype(t);
  check_root(root, c.size, "broadcast");
  check_count(count, 1, t, "broadcast");
  if (c.rank == root) check_buffer(s, count, "sendbuf", "broadcast");
  check_buffer(r, count, "recvbuf", "broadcast");
  return run_collective(c, make_call(c, Coll::Broadcast, t, ReduceOp::Sum, root, count), {s, r}, o, async);
}

Work op_allgather(CommImpl& c, const void* s, void* r, std::size_t count, DataType t,
                  const CallOptions& o, bool async) {
  check_dtype(t);
  check_count(count, static_cast<std::size_t>(c.size), t, "allgather");
  check_buffer(s, count, "sendbuf", "allgather");
  check_buffer(r, count, "recvbuf", "allgather");
  const std::size_t bytes = count * size_of(t);
  const char* mine = static_cast<const char*>(r) + static_cast<std::size_t>(c.rank) * bytes;
  if (s != mine && overlaps(s, bytes, r, bytes * static_cast<std::size_t>(c.size)))
    throw Error(ErrorCode::InvalidArgument,
                "allgather: sendbuf overlaps recvbuf; in-place means sendbuf == recvbuf + rank*count");
  return run_collective(c, make_call(c, Coll::Allgather, t, ReduceOp::Sum, -1, count), {s, r}, o, async);
}

Work op_reduce_scatter(CommImpl& c, const void* s, void* r, std::size_t count, DataType t,
                       ReduceOp op, const CallOptions& o, bool async) {
  check_dtype(t);
  check_op(op);
  check_count(count, static_cast<std::size_t>(c.size), t, "reduce_scatter");
  check_buffer(s, count, "sendbuf", "reduce_scatter");
  check_buffer(r, count, "recvbuf", "reduce_scatter");
  const std::size_t bytes = count * size_of(t);
  const char* mine = static_cast<const char*>(s) + static_cast<std::size_t>(c.rank) * bytes;
  if (r != mine && overlaps(r, bytes, s, bytes * static_cast<std::size_t>(c.size)))
    throw Error(ErrorCode::InvalidArgument,
                "reduce_scatter: recvbuf overlaps sendbuf; in-place means recvbuf == sendbuf + rank*count");
  return run_collective(c, make_call(c, Coll::ReduceScatter, t, op, -1, count), {s, r}, o, async);
}

Work op_reduce(CommImpl& c, const void* s, void* r, std::size_t count, DataType t, ReduceOp op,
               int root, const CallOptions& o, bool async) {
  check_dtype(t);
  check_op(op);
  check_root(root, c.size, "reduce");
  check_count(count, 1, t, "reduce");
  check_buffer(s, count, "sendbuf", "reduce");
  if (c.rank == root) check_buffer(r, count, "recvbuf", "reduce");
  return run_collective(c, make_call(c, Coll::Reduce, t, op, root, count), {s, r}, o, async);
}

Work op_gather(CommImpl& c, const void* s, void* r, std::size_t count, DataType t, int root,
               const CallOptions& o, bool async) {
  check_dtype(t);
  check_root(root, c.size, "gather");
  check_count(count, static_cast<std::size_t>(c.size), t, "gather");
  check_buffer(s, count, "sendbuf", "gather");
  if (c.rank == root) check_buffer(r, count, "recvbuf", "gather");
  return run_collective(c, make_call(c, Coll::Gather, t, ReduceOp::Sum, root, count), {s, r}, o, async);
}

Work op_scatter(CommImpl& c, const void* s, void* r, std::size_t count, DataType t, int root,
                const CallOptions& o, bool async) {
  check_dtype(t);
  check_root(root, c.size, "scatter");
  check_count(count, static_cast<std::size_t>(c.size), t, "scatter");
  if (c.rank == root) check_buffer(s, count, "sendbuf", "scatter");
  check_buffer(r, count, "recvbuf", "scatter");
  return run_collective(c, make_call(c, Coll::Scatter, t, ReduceOp::Sum, root, count), {s, r}, o, async);
}

Work op_alltoall(CommImpl& c, const void* s, void* r, std::size_t count, DataType t,
                 const CallOptions& o, bool async) {
  check_dtype(t);
  check_count(count, static_cast<std::size_t>(c.size), t, "alltoall");
  check_buffer(s, count, "sendbuf", "alltoall");
  check_buffer(r, count, "recvbuf", "alltoall");
  const std::size_t total = count * size_of(t) * static_cast<std::size_t>(c.size);
  if (overlaps(s, total, r, total))
    throw Error(ErrorCode::InvalidArgument, "alltoall: sendbuf and recvbuf must not overlap");
  return run_collective(c, make_call(c, Coll::Alltoall, t, ReduceOp::Sum, -1, count), {s, r}, o, async);
}

// Runs an alltoallv, allgatherv or reduce_scatterv, whose counts `v` holds: on the device
// engine for device buffers (staged), else its one host algorithm in the
// call's turn.
Work run_counted(CommImpl& c, CallDesc call, const void* s, void* r,
                 std::shared_ptr<const VCounts> v, const CallOptions& o, bool async) {
  // A rank with nothing to move still says which kind of memory its
  // buffers are (the ranks' messages differ between the two): only null
  // buffers go unasked.
  CallDesc sized = call;
  sized.count = 1;
  if (const auto gpu = device_of(sized, s, r, s != nullptr, r != nullptr))
    return run_device(c, call, s, r, *gpu, -1, o, async, std::move(v));
  need_gpu(o);
  auto run = [&c, s, r, o, v](const CallDesc& d) {
    CHORUS_TRACE(transport::describe(d));
    if (o.stream != nullptr) device::synchronize(o.stream);
    if (d.coll == Coll::Allgatherv)
      c.run_allgatherv(d, s, r, v->recv, v->second, c.deadline(o));
    else if (d.coll == Coll::ReduceScatterv)
      c.run_reduce_scatterv(d, s, r, v->recv, v->second, c.deadline(o));
    else
      c.run_alltoallv(d, s, r, v->send, v->recv, c.deadline(o));
  };
  if (!async) return c.submit([&] { run(call); }, false, &call.seq);
  {
    std::lock_guard<std::mutex> lock(c.mu);
    call.seq = c.coll_seq++;
  }
  return c.submit([run, call] { run(call); }, true);
}

Work op_alltoallv(CommImpl& c, const void* s, std::span<const std::size_t> sendcounts, void* r,
                  std::span<const std::size_t> recvcounts, DataType t, const CallOptions& o,
                  bool async) {
  check_dtype(t);
  const auto n = static_cast<std::size_t>(c.size);
  if (sendcounts.size() != n || recvcounts.size() != n)
    throw Error(ErrorCode::InvalidArgument,
                "alltoallv: sendcounts has " + std::to_string(sendcounts.size()) +
                    " entries and recvcounts " + std::to_string(recvcounts.size()) +
                    "; each needs one per rank (" + std::to_string(n) + ")");
  const auto me = static_cast<std::size_t>(c.rank);
  if (sendcounts[me] != recvcounts[me])
    throw Error(ErrorCode::InvalidArgument,
                "alltoallv: sendcounts[" + std::to_string(me) + "] is " +
                    std::to_string(sendcounts[me]) + " but recvcounts[" + std::to_string(me) +
                    "] is " + std::to_string(recvcounts[me]) +
                    ": what this rank sends itself is what it receives from itself");
  // Totals within 2^48 bytes, entry by entry (a wrapped negative count is
  // named before the sum overflows).
  std::size_t send_total = 0, recv_total = 0;
  for (std::size_t j = 0; j < n; ++j) {
    check_count(sendcounts[j], 1, t, "alltoallv");
    check_count(recvcounts[j], 1, t, "alltoallv");
    send_total += sendcounts[j];
    recv_total += recvcounts[j];
  }
  check_count(send_total, 1, t, "alltoallv");
  check_count(recv_total, 1, t, "alltoallv");
  check_buffer(s, send_total, "sendbuf", "alltoallv");
  check_buffer(r, recv_total, "recvbuf", "alltoallv");
  const std::size_t es = size_of(t);
  if (overlaps(s, send_total * es, r, recv_total * es))
    throw Error(ErrorCode::InvalidArgument, "alltoallv: sendbuf and recvbuf must not overlap");
  if (!o.algorithm.empty() && o.algorithm != "pairwise")
    throw Error(ErrorCode::InvalidArgument,
                "alltoallv: no algorithm '" + o.algorithm + "'; its one algorithm is 'pairwise'");
  c.check_device_error();
  auto v = std::make_shared<VCounts>();
  v->send.assign(sendcounts.begin(), sendcounts.end());
  v->recv.assign(recvcounts.begin(), recvcounts.end());
  // Each message carries its own count; the call's is 0.
  return run_counted(c, make_call(c, Coll::Alltoallv, t, ReduceOp::Sum, -1, 0), s, r, std::move(v),
                     o, async);
}

// A 31-bit hash of an allgatherv's counts (FNV-1a over their values),
// carried in its description's root field: ranks whose counts differ fail
// as a mismatch even when the sums agree.
std::int32_t counts_hash(std::span<const std::size_t> counts) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (std::size_t k : counts)
    for (int b = 0; b < 8; ++b) {
      h ^= (static_cast<std::uint64_t>(k) >> (8 * b)) & 0xff;
      h *= 0x100000001b3ull;
    }
  return static_cast<std::int32_t>((h ^ (h >> 32)) & 0x7fffffff);
}

// An allgatherv's or reduce_scatterv's counts, checked: one per rank,
// each and their sum within 2^48 bytes. `total`: their sum; `before`: the
// counts of the ranks before this one; `mine`: this rank's.
struct PerRank {
  std::size_t total = 0, before = 0, mine = 0;
};
PerRank check_per_rank(const CommImpl& c, std::span<const std::size_t> counts, DataType t,
                       const char* call) {
  const auto n = static_cast<std::size_t>(c.size);
  if (counts.size() != n)
    throw Error(ErrorCode::InvalidArgument,
                std::string(call) + ": recvcounts has " + std::to_string(counts.size()) +
                    " entries; it needs one per rank (" + std::to_string(n) + ")");
  PerRank k;
  for (std::size_t j = 0; j < n; ++j) {
    check_count(counts[j], 1, t, call);
    if (j == static_cast<std::size_t>(c.rank)) k.before = k.total;
    k.total += counts[j];
  }
  check_count(k.total, 1, t, call);
  k.mine = counts[static_cast<std::size_t>(c.rank)];
  return k;
}

// Runs an allgatherv or reduce_scatterv (`coll`) whose counts are checked.
// Equal counts (every rank sees the same ones, so every rank decides
// alike) make it its fixed-count twin (`twin`), with the selector's
// algorithm. Counts that differ run the twin's algorithm for their mean, as
// CHORUS_ALGO or CallOptions::algorithm force or the selector picks: the
// ring, or `second` (bruck, recursive_halving), all of which take blocks of
// any size. The description carries the counts' sum and hash.
Work run_per_rank(CommImpl& c, Coll coll, Coll twin, const char* second, const void* s, void* r,
                  std::span<const std::size_t> counts, std::size_t total, DataType t, ReduceOp op,
                  const CallOptions& o, bool async) {
  if (std::all_of(counts.begin(), counts.end(), [&](std::size_t k) { return k == counts[0]; }))
    return run_collective(c, make_call(c, twin, t, op, -1, counts[0]), {s, r}, o, async);
  const auto n = static_cast<std::size_t>(c.size);
  const algo::Algorithm& a = c.selector->choose(
      algo::Call{twin, std::max<std::size_t>(1, total / n), t, op, -1}, o.algorithm);
  c.check_device_error();
  auto v = std::make_shared<VCounts>();
  v->recv.assign(counts.begin(), counts.end());
  v->second = std::string_view(a.name) == second;
  CallDesc call = make_call(c, coll, t, op, counts_hash(counts), total);
  call.algo = algo::Selector::wire_id(a);
  return run_counted(c, call, s, r, std::move(v), o, async);
}

Work op_allgatherv(CommImpl& c, const void* s, void* r, std::span<const std::size_t> counts,
                   DataType t, const CallOptions& o, bool async) {
  check_dtype(t);
  const PerRank k = check_per_rank(c, counts, t, "allgatherv");
  check_buffer(s, k.mine, "sendbuf", "allgatherv");
  check_buffer(r, k.total, "recvbuf", "allgatherv");
  const std::size_t es = size_of(t);
  const char* place = static_cast<const char*>(r) + k.before * es;
  if (s != place && overlaps(s, k.mine * es, r, k.total * es))
    throw Error(ErrorCode::InvalidArgument,
                "allgatherv: sendbuf overlaps recvbuf; in place means sendbuf == recvbuf + the "
                "counts of the ranks before this one");
  // (Bruck's log2 n rounds beat the ring's n-1 at small sizes.)
  return run_per_rank(c, Coll::Allgatherv, Coll::Allgather, "bruck", s, r, counts, k.total, t,
                      ReduceOp::Sum, o, async);
}

Work op_reduce_scatterv(CommImpl& c, const void* s, void* r, std::span<const std::size_t> counts,
                        DataType t, ReduceOp op, const CallOptions& o, bool async) {
  check_dtype(t);
  check_op(op);
  const PerRank k = check_per_rank(c, counts, t, "reduce_scatterv");
  check_buffer(s, k.total, "sendbuf", "reduce_scatterv");
  check_buffer(r, k.mine, "recvbuf", "reduce_scatterv");
  const std::size_t es = size_of(t);
  const char* place = static_cast<const char*>(s) + k.before * es;
  if (r != place && overlaps(r, k.mine * es, s, k.total * es))
    throw Error(ErrorCode::InvalidArgument,
                "reduce_scatterv: recvbuf overlaps sendbuf; in place means recvbuf == sendbuf + "
                "the counts of the ranks before this one");
  return run_per_rank(c, Coll::ReduceScatterv, Coll::ReduceScatter, "recursive_halving", s, r,
                      counts, k.total, t, op, o, async);
}

Work op_barrier(CommImpl& c, const CallOptions& o, bool async) {
  return run_collective(c, make_call(c, Coll::Barrier, DataType::UInt8, ReduceOp::Sum, -1, 0), {}, o, async);
}

void check_peer(CommImpl& c, int peer, const char* call) {
  if (peer < 0 || peer >= c.size)
    throw Error(ErrorCode::InvalidArgument, std::string(call) + ": peer " + std::to_string(peer) +
                                                " is not a rank of this communicator (size " +
                                                std::to_string(c.size) + ")");
  if (peer == c.rank)
    throw Error(ErrorCode::InvalidArgument,
                std::string(call) + ": peer is this rank; copy the buffer instead");
}

Work op_send(CommImpl& c, const void* buf, std::size_t count, DataType t, int peer,
             const CallOptions& o, bool async) {
  check_dtype(t);
  check_peer(c, peer, "send");
  check_count(count, 1, t, "send");
  check_buffer(buf, count, "buf", "send");
  c.check_device_error();
  CallDesc call = make_call(c, Coll::SendRecv, t, ReduceOp::Sum, -1, count);
  {
    // Point-to-point calls are numbered per pair, not with the collectives:
    // ranks not taking part must not fall out of step.
    std::lock_guard<std::mutex> lock(c.mu);
    call.seq = c.send_seq[static_cast<std::size_t>(peer)]++;
  }
  if (const auto gpu = device_of(call, buf, nullptr, true, false))
    return run_device(c, call, buf, nullptr, *gpu, peer, o, async);
  need_gpu(o);
  // Posted without waiting, unless a stream must be synchronised first.
  if (async && o.stream == nullptr)
    return c.submit_posted(
        [&c, call, buf, count, t, peer] { return c.transport->isend(peer, call, buf, count * size_of(t)); },
        c.deadline(o));
  return c.submit([&c, call, o, buf, count, t, peer] {
    if (o.stream != nullptr) device::synchronize(o.stream);
    algo::Context ctx = c.context(call, o);
    auto r = ctx.t.isend(peer, call, buf, count * size_of(t));
    ctx.t.wait({&r, 1}, ctx.deadline);
  }, async);
}

Work op_recv(CommImpl& c, void* buf, std::size_t count, DataType t, int peer,
             const CallOptions& o, bool async) {
  check_dtype(t);
  check_peer(c, peer, "recv");
  check_count(count, 1, t, "recv");
  check_buffer(buf, count, "buf", "recv");
  c.check_device_error();
  CallDesc call = make_call(c, Coll::SendRecv, t, ReduceOp::Sum, -1, count);
  {
    std::lock_guard<std::mutex> lock(c.mu);
    call.seq = c.recv_seq[static_cast<std::size_t>(peer)]++;
  }
  if (const auto gpu = device_of(call, nullptr, buf, false, true))
    return run_device(c, call, nullptr, buf, *gpu, peer, o, async);
  need_gpu(o);
  if (async && o.stream == nullptr)
    return c.submit_posted(
        [&c, call, buf, count, t, peer] {
          return c.transport->irecv(peer, call, buf, count * size_of(t), transport::Combine::copy());
        },
        c.deadline(o));
  return c.submit([&c, call, o, buf, count, t, peer] {
    if (o.stream != nullptr) device::synchronize(o.stream);
    algo::Context ctx = c.context(call, o);
    auto r = ctx.t.irecv(peer, call, buf, count * size_of(t), transport::Combine::copy());
    ctx.t.wait({&r, 1}, ctx.deadline);
  }, async);
}

}  // namespace

void Communicator::allreduce(const void* s, void* r, std::size_t n, DataType t, ReduceOp op,
                             const CallOptions& o) {
  op_allreduce(need(impl_), s, r, n, t, op, o, false);
}
Work Communicator::allreduce_async(const void* s, void* r, std::size_t n, DataType t, ReduceOp op,
                                   const CallOptions& o) {
  return op_allreduce(need(impl_), s, r, n, t, op, o, true);
}
void Communicator::broadcast(const void* s, void* r, std::size_t n, DataType t, int root,
                             const CallOptions& o) {
  op_broadcast(need(impl_), s, r, n, t, root, o, false);
}
Work Communicator::broadcast_async(const void* s, void* r, std::size_t n, DataType t, int root,
                                   const CallOptions& o) {
  return op_broadcast(need(impl_), s, r, n, t, root, o, true);
}
void Communicator::allgather(const void* s, void* r, std::size_t n, DataType t, const CallOptions& o) {
  op_allgather(need(impl_), s, r, n, t, o, false);
}
Work Communicator::allgather_async(const void* s, void* r, std::size_t n, DataType t,
                                   const CallOptions& o) {
  return op_allgather(need(impl_), s, r, n, t, o, true);
}
void Communicator::reduce_scatter(const void* s, void* r, std::size_t n, DataType t, ReduceOp op,
                                  const CallOptions& o) {
  op_reduce_scatter(need(impl_), s, r, n, t, op, o, false);
}
Work Communicator::reduce_scatter_async(const void* s, void* r, std::size_t n, DataType t,
                                        ReduceOp op, const CallOptions& o) {
  return op_reduce_scatter(need(impl_), s, r, n, t, op, o, true);
}
void Communicator::reduce(const void* s, void* r, std::size_t n, DataType t, ReduceOp op, int root,
                          const CallOptions& o) {
  op_reduce(need(impl_), s, r, n, t, op, root, o, false);
}
Work Communicator::reduce_async(const void* s, void* r, std::size_t n, DataType t, ReduceOp op,
                                int root, const CallOptions& o) {
  return op_reduce(need(impl_), s, r, n, t, op, root, o, true);
}
void Communicator::gather(const void* s, void* r, std::size_t n, DataType t, int root,
                          const CallOptions& o) {
  op_gather(need(impl_), s, r, n, t, root, o, false);
}
Work Communicator::gather_async(const void* s, void* r, std::size_t n, DataType t, int root,
                                const CallOptions& o) {
  return op_gather(need(impl_), s, r, n, t, root, o, true);
}
void Communicator::scatter(const void* s, void* r, std::size_t n, DataType t, int root,
                           const CallOptions& o) {
  op_scatter(need(impl_), s, r, n, t, root, o, false);
}
Work Communicator::scatter_async(const void* s, void* r, std::size_t n, DataType t, int root,
                                 const CallOptions& o) {
  return op_scatter(need(impl_), s, r, n, t, root, o, true);
}
void Communicator::alltoall(const void* s, void* r, std::size_t n, DataType t, const CallOptions& o) {
  op_alltoall(need(impl_), s, r, n, t, o, false);
}
Work Communicator::alltoall_async(const void* s, void* r, std::size_t n, DataType t,
                                  const CallOptions& o) {
  return op_alltoall(need(impl_), s, r, n, t, o, true);
}
void Communicator::allgatherv(const void* s, void* r, std::span<const std::size_t> recvcounts,
                              DataType t, const CallOptions& o) {
  op_allgatherv(need(impl_), s, r, recvcounts, t, o, false);
}
void Communicator::reduce_scatterv(const void* s, void* r, std::span<const std::size_t> recvcounts,
                                   DataType t, ReduceOp op, const CallOptions& o) {
  op_reduce_scatterv(need(impl_), s, r, recvcounts, t, op, o, false);
}
Work Communicator::reduce_scatterv_async(const void* s, void* r,
                                         std::span<const std::size_t> recvcounts, DataType t,
                                         ReduceOp op, const CallOptions& o) {
  return op_reduce_scatterv(need(impl_), s, r, recvcounts, t, op, o, true);
}
Work Communicator::allgatherv_async(const void* s, void* r, std::span<const std::size_t> recvcounts,
                                    DataType t, const CallOptions& o) {
  return op_allgatherv(need(impl_), s, r, recvcounts, t, o, true);
}
void Communicator::alltoallv(const void* s, std::span<const std::size_t> sendcounts, void* r,
                             std::span<const std::size_t> recvcounts, DataType t,
                             const CallOptions& o) {
  op_alltoallv(need(impl_), s, sendcounts, r, recvcounts, t, o, false);
}
Work Communicator::alltoallv_async(const void* s, std::span<const std::size_t> sendcounts, void* r,
                                   std::span<const std::size_t> recvcounts, DataType t,
                                   const CallOptions& o) {
  return op_alltoallv(need(impl_), s, sendcounts, r, recvcounts, t, o, true);
}
void Communicator::barrier(const CallOptions& o) { op_barrier(need(impl_), o, false); }
Work Communicator::barrier_async(const CallOptions& o) { return op_barrier(need(impl_), o, true); }
void Communicator::send(const void* b, std::size_t n, DataType t, int peer, const CallOptions& o) {
  op_send(need(impl_), b, n, t, peer, o, false);
}
Work Communicator::send_async(const void* b, std::size_t n, DataType t, int peer,
                              const CallOptions& o) {
  return op_send(need(impl_), b, n, t, peer, o, true);
}
void Communicator::recv(void* b, std::size_t n, DataType t, int peer, const CallOptions& o) {
  op_recv(need(impl_), b, n, t, peer, o, false);
}
Work Communicator::recv_async(void* b, std::size_t n, DataType t, int peer, const CallOptions& o) {
  return op_recv(need(impl_), b, n, t, peer, o, true);
}

// ---- split ------------------------------------------------------------------------

Communicator Communicator::split(int color, int key) const {
  CommImpl& c = need(impl_);
  // Everyone learns everyone's (color, key) through an allgather on this
  // communicator, so a rank that skips split() shows up as a call mismatch.
  std::vector<std::int64_t> mine = {color, key};
  std::vector<std::int64_t> all(2 * static_cast<std::size_t>(c.size));
  const_cast<Communicator*>(this)->allgather(mine.data(), all.data(), 2, DataType::Int64);
  std::uint64_t split_no;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    split_no = c.split_count++;
  }
  if (color < 0) return Communicator();
  struct Member {
    std::int64_t key;
    int rank;
  };
  std::vector<Member> members;
  for (int r = 0; r < c.size; ++r)
    if (all[2 * static_cast<std::size_t>(r)] == color)
      members.push_back({all[2 * static_cast<std::size_t>(r) + 1], r});
  std::stable_sort(members.begin(), members.end(), [](const Member& a, const Member& b) {
    return a.key != b.key ? a.key < b.key : a.rank < b.rank;
  });
  int new_rank = -1;
  std::vector<int> tops;
  for (std::size_t i = 0; i < members.size(); ++i) {
    if (members[i].rank == c.rank) new_rank = static_cast<int>(i);
    const auto r = static_cast<std::size_t>(members[i].rank);
    tops.push_back(c.top_ranks.empty() ? members[i].rank : c.top_ranks[r]);
  }
  const std::string prefix =
      c.prefix + "/s" + std::to_string(split_no) + "c" + std::to_string(color);
  return Communicator(make_comm(new_rank, static_cast<int>(members.size()), c.base_store, prefix,
                                c.settings, c.store_host, std::move(tops)));
}

}  // namespace chorus
