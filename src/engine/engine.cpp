// The negotiated tensor engine (include/chorus/engine.hpp, docs/engine.md).
//
// Every rank runs the same cycle on a background thread, in lockstep with
// the others through collectives on the engine's own communicator:
//
//  1. header: one allgather of a fixed-size record per rank: the bytes of
//     the tensor descriptions it announces this cycle, its flags (shutdown
//     wanted; joined; on rank 0, stall abort), and one bit per
//     response-cache slot (set: this rank has that cached tensor waiting).
//  2. announcements: when some rank has any, one allgather of every rank's
//     descriptions (padded to the longest). Every rank adds them to the same
//     table, in the same order, so every rank reaches the same decisions
//     without a coordinator's reply.
//  3. ready: a cached name whose bit every rank set, a table name every rank
//     announced (with the same description, else an error for it). A rank
//     that has joined counts as having every name and stands in for those
//     it lacks; a rank shutting down fails the names it lacks.
//  4. execute in that order; consecutive-in-order allreduces of one dtype
//     and op share one collective through the fusion buffer.
//  5. bookkeeping: the table names executed enter the cache (the same slot
//     on every rank: the cache's updates are deterministic).
//  6. stalls: rank 0 warns of names waiting too long for some ranks, and
//     may decide to stop the engine; its flag reaches every rank next cycle.

#include <chorus/engine.hpp>

#include "core/config.hpp"
#include "core/device.hpp"
#include "core/log.hpp"
#include "core/work.hpp"
#include "engine/timeline.hpp"
#include "reduce/reduce.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <sstream>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace chorus {

namespace detail {

namespace {

using Clock = std::chrono::steady_clock;

enum class Kind : std::uint8_t {
  Allreduce = 1,
  Allgather = 2,
  Broadcast = 3,
  Allgatherv = 4,
  ReduceScatter = 5,  // count: the elements each rank receives
  Alltoall = 6,       // count: the elements this rank sends (its splits' sum)
  // Reduce-scatter of rows that need not divide by the ranks (Horovod's
  // reducescatter): count: every rank's input (rows x row); root: the
  // elements of one row. rows_of() splits them.
  ReduceScatterv = 7,
};
constexpr int kLastKind = 7;

// Kinds whose count is each rank's own (the others' counts must agree).
bool own_count(Kind k) { return k == Kind::Allgatherv || k == Kind::Alltoall; }

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Allreduce: return "allreduce";
    case Kind::Allgather: return "allgather";
    case Kind::Broadcast: return "broadcast";
    case Kind::Allgatherv:
      return "allgatherv";
    case Kind::ReduceScatter:
      return "reducescatter";
    case Kind::Alltoall:
      return "alltoall";
    case Kind::ReduceScatterv:
      return "reducescatter";
  }
  return "?";
}

// A ReduceScatterv's count for each rank, in elements: its rows split as
// evenly as possible, the first rows % n ranks one row more (Horovod's).
std::vector<std::size_t> rows_of(std::uint64_t count, std::int32_t row, int n) {
  const auto r = static_cast<std::size_t>(row);
  const std::size_t rows = static_cast<std::size_t>(count) / r;
  const auto un = static_cast<std::size_t>(n);
  std::vector<std::size_t> c(un);
  for (std::size_t p = 0; p < un; ++p) c[p] = (rows / un + (p < rows % un ? 1 : 0)) * r;
  return c;
}

// What every rank must agree on for one name.
struct Desc {
  Kind kind = Kind::Allreduce;
  DataType dtype = DataType::Float32;
  ReduceOp op = ReduceOp::Sum;
  std::uint64_t count = 0;
  std::int32_t root = -1;
  // CUDA device buffers: run alone, never through the (host) fusion buffer.
  // Part of what the ranks agree on, so that every rank groups alike.
  bool device = false;
  bool operator==(const Desc&) const = default;
};

// Whether two ranks' descriptions of one name agree: all of it, except an
// allgatherv's or alltoall's count, which is each rank's own.
bool agree(const Desc& a, const Desc& b) {
  if (a.kind == b.kind && own_count(a.kind)) {
    Desc c = b;
    c.count = a.count;
    return a == c;
  }
  return a == b;
}

std::string describe(const Desc& d) {
  std::ostringstream os;
  os << kind_name(d.kind) << " of " << d.count << " " << to_string(d.dtype);
  if (d.kind == Kind::Allreduce || d.kind == Kind::ReduceScatter || d.kind == Kind::ReduceScatterv)
    os << " (" << to_string(d.op) << ")";
  if (d.kind == Kind::ReduceScatter) os << " to each rank";
  if (d.kind == Kind::ReduceScatterv) os << " in rows of " << d.root;
  if (d.kind == Kind::Broadcast) os << " from rank " << d.root;
  if (d.kind == Kind::Allgatherv) os << " (this rank's share)";
  if (d.kind == Kind::Alltoall) os << " (this rank's, to all ranks)";
  if (d.device) os << " in CUDA device memory";
  return os.str();
}

std::string rank_list(const std::vector<int>& ranks) {
  std::ostringstream os;
  os << (ranks.size() == 1 ? "rank " : "ranks ");
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    if (i > 0) os << (i + 1 == ranks.size() ? " and " : ", ");
    if (i == 8 && ranks.size() > 10) {
      os << ranks.size() - 8 << " more";
      break;
    }
    os << ranks[i];
  }
  return os.str();
}

// A tensor submitted on this rank and not yet completed.
struct Request {
  std::string name;
  Desc desc;
  const void* send = nullptr;
  void* recv = nullptr;
  std::shared_ptr<WorkState> work;
  int slot = -1;  // announced by its cache bit
  Engine::Allocator
      alloc;  // allgatherv, alltoall: where the result goes, once the counts are known
  std::vector<std::size_t> splits;  // alltoall: the elements for each rank
};

// A name in the shared table (identical on every rank).
struct Entry {
  std::vector<std::optional<Desc>> by_rank;
  std::uint64_t order = 0;         // when it was first announced: (cycle, rank, position)
  Clock::time_point first_seen;    // this rank's clock
  std::int64_t first_us = 0;       // for the timeline
  int have = 0;
};

struct Slot {
  bool used = false;
  std::string name;
  Desc desc;
  std::uint64_t last_used = 0;
};

// One tensor of this cycle's ready list.
struct Ready {
  std::string name;
  Desc desc;
  bool cached = false;
  std::string error;  // the ranks disagreed
  std::int64_t negotiation_start_us = 0;
  std::vector<std::size_t> counts;  // allgatherv, alltoall: every rank's count
  // Joined ranks that never submitted it: they stand in with nothing (the
  // op's identity, no share). `contributors`: the ranks that did.
  std::vector<int> absent;
  int contributors = 0;
};

// The idle back-off (EngineImpl::run).
constexpr std::uint64_t kIdleCycles = 16;
constexpr std::chrono::milliseconds kIdleCap{50};

constexpr std::uint8_t kFlagShutdown = 1;
constexpr std::uint8_t kFlagStallAbort = 2;
constexpr std::uint8_t kFlagJoined = 4;  // join(): stand in for every name this rank lacks
const char* const kJoinRow = "(join)";   // the timeline's row for join rounds
constexpr std::size_t kHeaderFixed = 8;  // u32 blob bytes, u8 flags, 3 spare

void put(std::string& out, const void* p, std::size_t n) { out.append(static_cast<const char*>(p), n); }

}  // namespace

struct EngineImpl {
  Communicator comm;
  int rank = 0, size = 1;
  Clock::duration cycle;
  std::size_t fusion_bytes = 0;
  std::size_t cache_capacity = 0;
  std::chrono::milliseconds stall_warning{0}, stall_abort{0};
  Timeline timeline;
  Clock::time_point t0 = Clock::now();

  // Submissions, handed to the background thread.
  mutable std::mutex mu;
  std::condition_variable cv;
  std::condition_variable join_cv;  // join() waits on joins_done
  std::vector<Request> incoming;
  std::unordered_set<std::string> submitted_names;  // pending on this rank (incoming or in flight)
  bool shutdown_wanted = false;
  bool join_wanted = false;      // join() waits: the joined flag goes out every cycle
  bool flag_news = false;        // shutdown() or join() since the last header: no sleep
  std::uint64_t joins_done = 0;  // join() returns when this moves
  int last_joined = -1;          // what the last completed join() returns
  bool backing_off = false;    // the engine's thread sleeps longer than a cycle: idle
  Clock::time_point incoming_since;  // when `incoming` last became non-empty
  bool stopped = false;
  std::optional<Error> failure;  // why the engine stopped
  EngineStats stats;

  // Background thread only.
  std::thread thread;
  std::mutex join_mu;  // shutdown() from several threads joins once
  std::uint64_t cycle_no = 0;
  std::uint64_t idle_streak = 0;  // cycles in a row with nothing announced or waiting anywhere
  std::vector<bool> joined;       // ranks whose header has the joined flag this cycle
  int newest_joined = -1;                  // the last rank to join, as every rank sees it
  std::int64_t join_start_us = 0;          // timeline: when this round's first rank joined
  std::map<std::string, Request> pending;  // by name
  std::map<std::string, Entry> table;
  std::vector<Slot> cache;
  std::unordered_map<std::string, int> cache_index;
  std::vector<char> fusion;
  bool stall_abort_decided = false;                     // rank 0
  std::map<std::string, Clock::time_point> warned_at;   // rank 0
  std::optional<Clock::time_point> join_quiet_since;    // rank 0: some joined, nothing ran
  Clock::time_point join_warned_at;                     // rank 0
  std::vector<Clock::time_point> partial_since;         // rank 0: cached slots set on some ranks
  std::vector<std::int64_t> partial_since_us;
  // Cached names some ranks have set and others not, with the missing ranks
  // (every rank computes the same, each cycle).
  std::vector<std::tuple<std::size_t, std::string, std::vector<int>>> partial_now;
  std::vector<bool> busy;  // cache slots some rank has set this cycle: not to be evicted

  std::int64_t now_us() const {
    return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count();
  }

  void run() {
    try {
      // A cycle starts `cycle` after the last one ended: every rank leaves a
      // cycle's collectives at about the same time, so their sleeps end
      // together too. (Sleeping until fixed ticks instead kept each rank on
      // its own phase, and every cycle waited for the latest: a 2-rank
      // step of 64 small tensors took 1.96 ms against 1.38.) Tensors
      // submitted meanwhile are agreed on, and fused, together. A thread
      // that waits for a tensor this rank has not announced yet ends the
      // sleep (wake): what was submitted before the wait is what the caller
      // needs now. Each rank does so when its own caller waits, so in a
      // data-parallel step they meet without waiting out the rest of a
      // cycle. A tensor already announced does not: its cycle is under way,
      // or it waits for other ranks, whose own waits wake them.
      //
      // An idle engine backs off: after kIdleCycles cycles in which no rank
      // had anything to announce or waiting, the sleep doubles every
      // kIdleCycles cycles up to kIdleCap (never past 32 cycles, never
      // shorter than one). Every rank counts the same idle cycles from the
      // same headers, so their sleeps stay equal. A submission during a
      // longer sleep ends it at the next tick of the normal pace (start +
      // k cycles), so a rank's work waits no longer than before for its
      // own next cycle; the sleeping ranks have nothing to announce yet.
      while (true) {
        {
          std::unique_lock<std::mutex> lock(mu);
          const auto start = Clock::now();
          const auto sleep = idle_sleep();
          backing_off = sleep > cycle;
          while (true) {
            if (flag_news || unannounced_wait()) break;
            auto until = start + sleep;
            if (backing_off && !incoming.empty()) {
              // The tick the normal pace would have woken at next.
              const auto ticks = (std::max(incoming_since, start) - start) / cycle + 1;
              until = std::min(until, start + ticks * cycle);
            }
            if (Clock::now() >= until) break;
            cv.wait_until(lock, until);
          }
          backing_off = false;
        }
        if (!one_cycle()) break;
      }
    } catch (const Error& e) {
      stop(e);
    } catch (const std::exception& e) {
      stop(Error(ErrorCode::Internal, std::string("the engine's thread failed: ") + e.what()));
    }
  }

  // The sleep before the next cycle: `cycle`, longer when every rank has
  // been idle (see run()).
  Clock::duration idle_sleep() const {
    if (idle_streak < kIdleCycles) return cycle;
    const auto cap = std::min(
        cycle * 32, std::max(cycle, std::chrono::duration_cast<Clock::duration>(kIdleCap)));
    const auto steps = std::min<std::uint64_t>(idle_streak / kIdleCycles, 5);
    return std::min(cap, cycle * (std::int64_t{1} << steps));
  }

  // Work::wait on one of this engine's tensors: the sleep re-checks
  // unannounced_wait().
  void wake() {
    { std::lock_guard<std::mutex> lock(mu); }  // the sleeper is in wait_for or before its check
    cv.notify_all();
  }

  // Under mu: is a thread waiting for a tensor submitted since the last cycle?
  bool unannounced_wait() const {
    for (const auto& r : incoming)
      if (r.work->waited.load(std::memory_order_relaxed)) return true;
    return false;
  }

  // Fails every pending tensor with `e` and refuses later submissions.
  void stop(const Error& e) {
    std::vector<Request> left;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!failure) failure = e;
      stopped = true;
      for (auto& r : incoming) left.push_back(std::move(r));
      incoming.clear();
      submitted_names.clear();
    }
    join_cv.notify_all();  // a join() waiting fails with the engine
    for (auto& [name, r] : pending) left.push_back(std::move(r));
    pending.clear();
    {
      std::lock_guard<std::mutex> lock(mu);
      stats.tensors += left.size();
    }
    for (auto& r : left) r.work->finish(e);
  }

  void describe_fresh(std::vector<Request*>& fresh, std::string& blob) {
    for (Request* r : fresh) {
      auto it = cache_index.find(r->name);
      if (it != cache_index.end() && cache[static_cast<std::size_t>(it->second)].desc == r->desc) {
        r->slot = it->second;
        continue;
      }
      const auto len = static_cast<std::uint16_t>(r->name.size());
      put(blob, &len, 2);
      blob += r->name;
      const std::uint8_t k = static_cast<std::uint8_t>(r->desc.kind);
      const std::uint8_t t = static_cast<std::uint8_t>(r->desc.dtype);
      const std::uint8_t o = static_cast<std::uint8_t>(r->desc.op);
      const std::uint8_t pad = r->desc.device ? 1 : 0;
      put(blob, &k, 1);
      put(blob, &t, 1);
      put(blob, &o, 1);
      put(blob, &pad, 1);
      put(blob, &r->desc.root, 4);
      put(blob, &r->desc.count, 8);
    }
  }

  // One cycle; false when the engine has stopped.
  bool one_cycle() {
    ++cycle_no;
    const std::int64_t cycle_start_us = timeline.open() ? now_us() : 0;
    // 1. This rank's new submissions.
    std::vector<Request*> fresh;
    bool want_stop = false, want_join = false;
    {
      std::lock_guard<std::mutex> lock(mu);
      ++stats.cycles;
      for (auto& r : incoming) {
        std::string name = r.name;
        auto [it, ok] = pending.emplace(name, std::move(r));
        if (!ok) throw Error(ErrorCode::Internal, "engine: tensor '" + name + "' pending twice");
        fresh.push_back(&it->second);
      }
      incoming.clear();
      want_stop = shutdown_wanted;
      want_join = join_wanted && !shutdown_wanted;
      flag_news = false;
    }
    std::string blob;
    describe_fresh(fresh, blob);

    const std::size_t bitmap_bytes = (cache_capacity + 7) / 8;
    const std::size_t hb = kHeaderFixed + bitmap_bytes;
    std::vector<std::uint8_t> mine(hb, 0), all(hb * static_cast<std::size_t>(size));
    const auto blob_bytes = static_cast<std::uint32_t>(blob.size());
    std::memcpy(mine.data(), &blob_bytes, 4);
    mine[4] = static_cast<std::uint8_t>((want_stop ? kFlagShutdown : 0) |
                                        (stall_abort_decided ? kFlagStallAbort : 0) |
                                        (want_join ? kFlagJoined : 0));
    for (const auto& [name, r] : pending)
      if (r.slot >= 0)
        mine[kHeaderFixed + static_cast<std::size_t>(r.slot) / 8] |=
            static_cast<std::uint8_t>(1u << (r.slot % 8));
    comm.allgather(mine.data(), all.data(), hb, DataType::UInt8);
    auto header = [&](int p) { return all.data() + hb * static_cast<std::size_t>(p); };
    auto bit = [&](int p, int slot) {
      return (header(p)[kHeaderFixed + static_cast<std::size_t>(slot) / 8] >> (slot % 8)) & 1;
    };
    std::uint32_t longest = 0;
    bool abort_stall = false;
    std::vector<int> quitting;  // ranks whose shutdown() has begun
    // Joined last cycle (empty at the first, all false after a round ended).
    const std::vector<bool> before =
        std::exchange(joined, std::vector<bool>(static_cast<std::size_t>(size), false));
    const bool round_starts = std::count(before.begin(), before.end(), true) == 0;
    int joined_count = 0;
    for (int p = 0; p < size; ++p) {
      std::uint32_t b = 0;
      std::memcpy(&b, header(p), 4);
      longest = std::max(longest, b);
      if ((header(p)[4] & kFlagShutdown) != 0) quitting.push_back(p);
      abort_stall = abort_stall || (header(p)[4] & kFlagStallAbort) != 0;
      if ((header(p)[4] & kFlagJoined) != 0) {
        joined[static_cast<std::size_t>(p)] = true;
        ++joined_count;
        if (!is_in(before, p)) {
          newest_joined = p;
          if (timeline.open()) {
            if (round_starts && joined_count == 1) join_start_us = now_us();
            timeline.instant(kJoinRow, "rank " + std::to_string(p) + " joined", now_us());
          }
        }
      }
    }
    const bool all_stop = static_cast<int>(quitting.size()) == size;
    const bool all_joined = joined_count == size;
    // Idle: nothing announced, no cache bit or flag set, nothing waiting
    // (the same on every rank).
    bool idle = longest == 0 && table.empty();
    for (std::size_t i = 0; i < all.size() && idle; ++i) idle = i % hb < 4 || all[i] == 0;
    idle_streak = idle ? idle_streak + 1 : 0;
    // Cache slots this cycle's announcements invalidate: ignore their bits.
    std::vector<bool> dropped(cache_capacity, false);

    // 2. Announcements.
    if (longest > 0) {
      {
        std::lock_guard<std::mutex> lock(mu);
        ++stats.negotiations;
      }
      blob.resize(longest, '\0');
      std::string every(static_cast<std::size_t>(longest) * static_cast<std::size_t>(size), '\0');
      comm.allgather(blob.data(), every.data(), longest, DataType::UInt8);
      for (int p = 0; p < size; ++p) {
        std::uint32_t b = 0;
        std::memcpy(&b, header(p), 4);
        const char* at = every.data() + static_cast<std::size_t>(longest) * static_cast<std::size_t>(p);
        std::size_t off = 0, index = 0;
        while (off < b) {
          auto need = [&](std::size_t n) {
            if (off + n > b)
              throw Error(ErrorCode::Transport, "engine: rank " + std::to_string(p) +
                                                    "'s tensor descriptions are truncated");
          };
          need(2);
          std::uint16_t len = 0;
          std::memcpy(&len, at + off, 2);
          off += 2;
          need(len + 16u);
          std::string name(at + off, len);
          off += len;
          Desc d;
          d.kind = static_cast<Kind>(static_cast<std::uint8_t>(at[off]));
          d.dtype = static_cast<DataType>(static_cast<std::uint8_t>(at[off + 1]));
          d.op = static_cast<ReduceOp>(static_cast<std::uint8_t>(at[off + 2]));
          d.device = at[off + 3] != 0;
          std::memcpy(&d.root, at + off + 4, 4);
          std::memcpy(&d.count, at + off + 8, 8);
          off += 16;
          if (name.empty() || static_cast<int>(d.kind) < 1 ||
              static_cast<int>(d.kind) > kLastKind || static_cast<int>(d.dtype) >= kNumDataTypes ||
              static_cast<int>(d.op) >= kNumReduceOps ||
              (d.kind == Kind::ReduceScatterv &&
               (d.root < 1 || d.count % static_cast<std::uint64_t>(d.root) != 0)))
            throw Error(ErrorCode::Transport, "engine: rank " + std::to_string(p) +
                                                  " announced a malformed tensor description");
          announce(p, name, d, (cycle_no << 24) | (static_cast<std::uint64_t>(p) << 12) | index++,
                   bit, dropped);
        }
      }
    }

    if (abort_stall) {
      stop(Error(ErrorCode::Timeout, stalled_message()));
      return false;
    }

    // 3. Ready: cached names every rank has set, in slot order; then table
    // names every rank has announced, in announcement order. A joined rank
    // counts as having every name (it stands in for those it lacks).
    std::vector<Ready> ready;
    partial_now.clear();
    busy.assign(cache_capacity, false);
    for (std::size_t s = 0; s < cache_capacity; ++s) {
      if (!cache[s].used || dropped[s]) continue;
      int have = 0;
      std::vector<int> missing, absent;
      for (int p = 0; p < size; ++p) {
        const bool set = bit(p, static_cast<int>(s)) != 0;
        have += set ? 1 : 0;
        if (!set) (is_joined(p) ? absent : missing).push_back(p);
      }
      busy[s] = have > 0;
      const bool partial = have > 0 && !missing.empty();
      if (partial) partial_now.emplace_back(s, cache[s].name, std::move(missing));
      if (have > 0 && !partial) {
        // Negotiated from when the first rank set the bit (this cycle if all did).
        Ready r{cache[s].name, cache[s].desc, true, {}, cycle_start_us};
        if (rank == 0 && !partial_since_us.empty() && partial_since_us[s] >= 0)
          r.negotiation_start_us = partial_since_us[s];
        stand_in(r, std::move(absent));
        ready.push_back(std::move(r));
        cache[s].last_used = cycle_no;
      }
      if (rank == 0 && !partial_since.empty()) {
        if (partial) {
          if (partial_since_us[s] < 0) {
            partial_since[s] = Clock::now();
            partial_since_us[s] = now_us();
          }
        } else {
          partial_since_us[s] = -1;
        }
      }
    }
    std::vector<std::pair<std::uint64_t, std::string>> done_names;
    for (auto& [name, e] : table)
      if (e.have == size || (joined_count > 0 && missing_from(e).empty()))
        done_names.emplace_back(e.order, name);
    std::sort(done_names.begin(), done_names.end());
    for (const auto& [order, name] : done_names) {
      Entry& e = table[name];
      // The lowest rank that announced it is the reference (0 unless it
      // joined without); joined ranks without it are absent.
      int first = -1;
      std::vector<int> differ, absent;
      for (int p = 0; p < size; ++p) {
        const auto& d = e.by_rank[static_cast<std::size_t>(p)];
        if (!d)
          absent.push_back(p);
        else if (first < 0)
          first = p;
        else if (!agree(*d, *e.by_rank[static_cast<std::size_t>(first)]))
          differ.push_back(p);
      }
      Ready r{name, *e.by_rank[static_cast<std::size_t>(first)], false, {}, e.first_us};
      if (!differ.empty()) {
        std::ostringstream os;
        os << "tensor '" << name << "' was submitted as " << describe(r.desc) << " on rank "
           << first << " but as " << describe(*e.by_rank[static_cast<std::size_t>(differ[0])])
           << " on rank " << differ[0];
        if (differ.size() > 1) os << " (and differently on " << rank_list(differ) << ")";
        os << "; every rank must submit a name with the same collective, count, dtype, op and root"
           << (own_count(r.desc.kind) ? " (an allgatherv's or alltoall's count may differ)" : "");
        r.error = os.str();
      } else if (own_count(r.desc.kind)) {
        for (int p = 0; p < size; ++p) {
          const auto& d = e.by_rank[static_cast<std::size_t>(p)];
          r.counts.push_back(d ? static_cast<std::size_t>(d->count) : 0);  // a joined rank: none
        }
      }
      stand_in(r, std::move(absent));
      if (timeline.open()) {
        timeline.complete(name, "NEGOTIATE_" + std::string(kind_name(r.desc.kind)), e.first_us,
                          now_us() - e.first_us, "");
      }
      ready.push_back(std::move(r));
      table.erase(name);
    }

    // A rank whose shutdown flag came in this header has announced all it
    // ever will: a name it lacks can never complete.
    if (!quitting.empty()) fail_unreachable(quitting);

    // 4.-5. Execute, then complete. When every rank is shutting down, what
    // every rank submitted still runs, and nothing else is left.
    if (!ready.empty()) execute(ready);
    // Every rank has joined: everything any rank submitted has run just
    // now (the others stood in), and every rank's join() returns the rank
    // that joined last.
    if (all_joined && !all_stop) {
      {
        std::lock_guard<std::mutex> lock(mu);
        join_wanted = false;
        ++joins_done;
        last_joined = newest_joined;
      }
      join_cv.notify_all();
      joined.assign(static_cast<std::size_t>(size), false);
      if (timeline.open())
        timeline.complete(kJoinRow, "JOIN", join_start_us, now_us() - join_start_us,
                          "\"last\": " + std::to_string(newest_joined));
    }
    if (all_stop) {
      stop(Error(ErrorCode::Aborted,
                 "the engine was shut down with this tensor waiting for "
                 "other ranks"));
      return false;
    }

    // 6. Stalls (rank 0 decides; every rank acts on its flag next cycle).
    if (rank == 0) {
      inspect_stalls();
      inspect_join(!ready.empty());
    }
    timeline.flush();
    return true;
  }

  static bool is_in(const std::vector<bool>& ranks, int p) {
    return !ranks.empty() && ranks[static_cast<std::size_t>(p)];
  }
  bool is_joined(int p) const { return is_in(joined, p); }

  // The ranks a table name still waits for: those that neither announced
  // it nor joined.
  std::vector<int> missing_from(const Entry& e) const {
    std::vector<int> out;
    for (int p = 0; p < size; ++p)
      if (!e.by_rank[static_cast<std::size_t>(p)] && !is_joined(p)) out.push_back(p);
    return out;
  }

  // Records which joined ranks stand in for `r` with nothing, and fails it
  // (on every rank alike) where nothing cannot stand in: an allgather's
  // share, a broadcast's root, a device buffer.
  void stand_in(Ready& r, std::vector<int> absent) {
    r.contributors = size - static_cast<int>(absent.size());
    r.absent = std::move(absent);
    if (r.absent.empty() || !r.error.empty()) return;
    const std::string who = rank_list(r.absent) + (r.absent.size() == 1 ? " has" : " have") +
                            " joined without submitting it";
    if (r.desc.kind == Kind::Allgather)
      r.error = "tensor '" + r.name + "': " + who +
                ", and an allgather needs every rank's share (an allgatherv takes none from a "
                "joined rank)";
    else if (r.desc.kind == Kind::Broadcast &&
             std::find(r.absent.begin(), r.absent.end(), r.desc.root) != r.absent.end())
      r.error = "tensor '" + r.name + "': its root, rank " + std::to_string(r.desc.root) +
                ", has joined without submitting it";
    else if (r.desc.device)
      r.error = "tensor '" + r.name + "' is in CUDA device memory and " + who +
                "; a joined rank stands in for host tensors only";
  }

  // Fails, on every rank that has it, each name that a rank in `quitting`
  // has neither announced nor set the cache bit of: that rank's shutdown()
  // refuses further submissions, so the name would wait forever (a rank
  // leaving its training loop early, or unwinding from an exception
  // through the Engine's destructor). Every rank sees the same table and
  // bits, so every rank drops the same names. What the quitting ranks did
  // submit still waits for the others.
  void fail_unreachable(const std::vector<int>& quitting) {
    std::vector<std::pair<std::string, std::vector<int>>> gone;  // name, quitting ranks lacking it
    auto lacking = [&](auto&& has) {
      std::vector<int> out;
      for (int q : quitting)
        if (!has(q)) out.push_back(q);
      return out;
    };
    for (auto it = table.begin(); it != table.end();) {
      auto l = lacking(
          [&](int q) { return it->second.by_rank[static_cast<std::size_t>(q)].has_value(); });
      if (l.empty()) {
        ++it;
        continue;
      }
      gone.emplace_back(it->first, std::move(l));
      it = table.erase(it);
    }
    for (const auto& [slot, name, missing] : partial_now) {
      auto l = lacking(
          [&](int q) { return std::find(missing.begin(), missing.end(), q) == missing.end(); });
      if (!l.empty()) gone.emplace_back(name, std::move(l));
    }
    std::vector<std::pair<Request, Error>> failed;
    for (const auto& [name, ranks] : gone) {
      auto it = pending.find(name);
      if (it == pending.end()) continue;  // not submitted here
      failed.emplace_back(std::move(it->second),
                          Error(ErrorCode::Aborted,
                                "engine: tensor '" + name + "' can never complete: " +
                                    rank_list(ranks) + (ranks.size() == 1 ? " has" : " have") +
                                    " shut down the engine without submitting it",
                                ranks[0]));
      pending.erase(it);
    }
    if (failed.empty()) return;
    {
      std::lock_guard<std::mutex> lock(mu);
      for (auto& [r, e] : failed) submitted_names.erase(r.name);
      stats.tensors += failed.size();
    }
    for (auto& [r, e] : failed) r.work->finish(e);
  }

  template <typename Bit>
  void announce(int p, const std::string& name, const Desc& d, std::uint64_t order, Bit bit,
                std::vector<bool>& dropped) {
    // A cached name announced anew (another description on that rank): the
    // ranks whose cache bit is set count as announcing the cached
    // description, and the slot is dropped, the same on every rank.
    auto c = cache_index.find(name);
    if (c != cache_index.end()) {
      const int s = c->second;
      const Desc old = cache[static_cast<std::size_t>(s)].desc;
      cache_index.erase(c);
      cache[static_cast<std::size_t>(s)].used = false;
      dropped[static_cast<std::size_t>(s)] = true;
      for (int q = 0; q < size; ++q)
        if (bit(q, s)) add(q, name, old, order);
      auto mine = pending.find(name);
      if (mine != pending.end() && mine->second.slot == s) mine->second.slot = -1;
    }
    add(p, name, d, order);
  }

  void add(int p, const std::string& name, const Desc& d, std::uint64_t order) {
    auto [it, fresh] = table.try_emplace(name);
    Entry& e = it->second;
    if (fresh) {
      e.by_rank.resize(static_cast<std::size_t>(size));
      e.order = order;
      e.first_seen = Clock::now();
      e.first_us = now_us();
    }
    auto& slot = e.by_rank[static_cast<std::size_t>(p)];
    if (slot) return;  // a rank's cached and fresh announcement of one name: keep the first
    slot = d;
    ++e.have;
    if (timeline.open()) timeline.instant(name, "rank " + std::to_string(p) + " ready", now_us());
  }

  void execute(std::vector<Ready>& ready) {
    std::vector<bool> taken(ready.size(), false);
    for (std::size_t i = 0; i < ready.size(); ++i) {
      if (taken[i]) continue;
      taken[i] = true;
      std::vector<std::size_t> group{i};
      const Ready& head = ready[i];
      // Bytes per rank: an allreduce's buffer, an allgather's share, a
      // reduce-scatter's block. A fused allgather's buffer holds every
      // rank's shares, a fused reduce-scatter's every rank's blocks.
      // Allgathervs and alltoalls are bounded by every rank's counts.
      const std::size_t es = size_of(head.desc.dtype);
      std::size_t bytes = head.desc.count * es;
      const bool per_rank = own_count(head.desc.kind);
      const bool rows = head.desc.kind == Kind::ReduceScatterv;
      const bool fusable = head.desc.kind == Kind::Allreduce || head.desc.kind == Kind::Allgather ||
                           head.desc.kind == Kind::Broadcast ||
                           head.desc.kind == Kind::ReduceScatter || per_rank || rows;
      const std::size_t ranks_in_buffer =
          head.desc.kind == Kind::Allgather || head.desc.kind == Kind::ReduceScatter
              ? static_cast<std::size_t>(size)
              : 1;
      std::vector<std::size_t> totals = head.counts;  // each rank's elements so far (per_rank)
      if (head.error.empty() && fusable && !head.desc.device && fusion_bytes > 0) {
        for (std::size_t j = i + 1; j < ready.size(); ++j) {
          const Ready& r = ready[j];
          if (taken[j] || !r.error.empty() || r.desc.kind != head.desc.kind || r.desc.device ||
              r.desc.dtype != head.desc.dtype || r.desc.op != head.desc.op ||
              (r.desc.root != head.desc.root && !rows))  // rows of any length fuse
            continue;
          if (per_rank) {
            std::vector<std::size_t> with = totals;
            for (std::size_t p = 0; p < with.size(); ++p) with[p] += r.counts[p];
            const std::size_t longest = *std::max_element(with.begin(), with.end());
            // An allgatherv's buffer holds every rank's shares; an
            // alltoall's what this rank sends and what it receives, at
            // most what every rank sends.
            const std::size_t all = std::accumulate(with.begin(), with.end(), std::size_t{0});
            const std::size_t held = head.desc.kind == Kind::Alltoall ? longest + all : all;
            if (held * es > fusion_bytes) continue;
            totals = std::move(with);
          } else {
            const std::size_t b = r.desc.count * es;
            if ((bytes + b) * ranks_in_buffer > fusion_bytes) continue;
            bytes += b;
          }
          taken[j] = true;
          group.push_back(j);
        }
      }
      if (per_rank && !totals.empty())  // no counts: a mismatch, which fails alone
        bytes = *std::max_element(totals.begin(), totals.end()) * es;
      run_group(ready, group, bytes);
    }
  }

  void run_group(std::vector<Ready>& ready, const std::vector<std::size_t>& group,
                 std::size_t bytes) {
    const Ready& head = ready[group[0]];
    std::vector<Request> reqs;
    // This rank joined without submitting some of them: it stands in with
    // the op's identity (allreduce, reduce-scatter), a buffer to receive
    // into (broadcast) or no share (allgatherv; an alltoall: nothing sent,
    // what it is sent dropped). A stand-in has no Work.
    std::vector<std::vector<char>> scratch;
    scratch.reserve(group.size());
    for (std::size_t k : group) {
      const Ready& r = ready[k];
      auto it = pending.find(r.name);
      if (it != pending.end()) {
        reqs.push_back(std::move(it->second));
        pending.erase(it);
        continue;
      }
      if (std::find(r.absent.begin(), r.absent.end(), rank) == r.absent.end())
        throw Error(ErrorCode::Internal, "engine: ready tensor '" + r.name +
                                             "' has no submission on rank " + std::to_string(rank));
      Request standin;
      standin.name = r.name;
      standin.desc = r.desc;
      standin.desc.count = own_count(r.desc.kind) ? 0 : r.desc.count;
      if (r.desc.kind == Kind::Alltoall) standin.splits.assign(static_cast<std::size_t>(size), 0);
      const bool scatter = r.desc.kind == Kind::ReduceScatter;
      const bool rows = r.desc.kind == Kind::ReduceScatterv;
      const std::size_t elements =
          standin.desc.count * (scatter ? static_cast<std::size_t>(size) : 1);
      auto& buf = scratch.emplace_back(elements * size_of(r.desc.dtype));
      if (r.desc.kind == Kind::Allreduce || scatter || rows)
        reduce::fill_identity(buf.data(), elements, r.desc.dtype, r.desc.op);
      standin.send = buf.data();
      // A reduce-scatter in place, as NCCL has it: its block of the send buffer.
      std::size_t before = scatter ? static_cast<std::size_t>(rank) * standin.desc.count : 0;
      if (rows) {
        const auto counts = rows_of(r.desc.count, r.desc.root, size);
        before = std::accumulate(counts.begin(), counts.begin() + rank, std::size_t{0});
      }
      standin.recv = buf.data() + before * size_of(r.desc.dtype);
      reqs.push_back(std::move(standin));
    }
    // `e` fails the group; without it, each tensor's own error (an
    // allgatherv's allocator) fails that tensor alone.
    std::vector<std::optional<Error>> local(reqs.size());
    auto complete = [&](const std::optional<Error>& e) {
      std::size_t own = 0;
      for (const auto& r : reqs) own += r.work ? 1 : 0;
      {
        // Before the Works complete: a waiter then sees its tensor counted.
        std::lock_guard<std::mutex> lock(mu);
        for (auto& r : reqs)
          if (r.work) submitted_names.erase(r.name);
        stats.tensors += own;
        if (!e) {
          ++stats.collectives;
          if (reqs.size() > 1) stats.fused += own;
          for (std::size_t k = 0; k < reqs.size(); ++k)
            stats.cache_hits += reqs[k].work && ready[group[k]].cached ? 1 : 0;
        }
      }
      for (std::size_t k = 0; k < reqs.size(); ++k)
        if (reqs[k].work) reqs[k].work->finish(e ? e : local[k]);
    };
    if (!head.error.empty()) {
      complete(Error(ErrorCode::InvalidUsage, head.error));
      return;
    }
    const Desc& d = head.desc;
    const std::int64_t start = now_us();
    std::int64_t in_us = 0, op_us = 0;
    // An average that joined ranks stood in for is the sum over the ranks
    // that submitted it, divided by their number (each tensor its own).
    bool rescale = false;
    for (std::size_t k : group)
      rescale = rescale || (d.op == ReduceOp::Avg && ready[k].contributors < size &&
                            (d.kind == Kind::Allreduce || d.kind == Kind::ReduceScatter ||
                             d.kind == Kind::ReduceScatterv));
    const ReduceOp op = rescale ? ReduceOp::Sum : d.op;
    // The elements tensor k receives.
    auto received = [&](std::size_t k) -> std::size_t {
      const Desc& dk = ready[group[k]].desc;
      if (dk.kind != Kind::ReduceScatterv) return dk.count;
      return rows_of(dk.count, dk.root, size)[static_cast<std::size_t>(rank)];
    };
    auto finish_avg = [&] {
      for (std::size_t k = 0; rescale && k < reqs.size(); ++k)
        reduce::finalize_avg(reqs[k].recv, received(k), d.dtype, ready[group[k]].contributors);
    };
    // A collective that fails (a dead peer, a timeout) stops the engine;
    // the tensors it carried fail with it first, or their waits would hang.
    try {
      if (d.kind == Kind::Allgatherv) {
        // One tensor gathers through a buffer of its own, several through the
        // fusion buffer (bounded by fusion_bytes, so it does not grow past it).
        std::vector<char> own_buffer;
        std::vector<const std::vector<std::size_t>*> counts;
        for (std::size_t k : group) counts.push_back(&ready[k].counts);
        gatherv(reqs, counts, d.dtype, reqs.size() == 1 ? own_buffer : fusion, local, in_us, op_us);
      } else if (d.kind == Kind::Alltoall) {
        alltoall(reqs, d.dtype, local, in_us, op_us);
      } else if (reqs.size() == 1) {
        Request& r = reqs[0];
        switch (d.kind) {
          case Kind::Allreduce:
            comm.allreduce(r.send, r.recv, d.count, d.dtype, op);
            finish_avg();
            break;
          case Kind::ReduceScatter:
            comm.reduce_scatter(r.send, r.recv, d.count, d.dtype, op);
            finish_avg();
            break;
          case Kind::ReduceScatterv:
            comm.reduce_scatterv(r.send, r.recv, rows_of(d.count, d.root, size), d.dtype, op);
            finish_avg();
            break;
          case Kind::Allgather:
            comm.allgather(r.send, r.recv, d.count, d.dtype);
            break;
          case Kind::Broadcast:
            comm.broadcast(r.send, r.recv, d.count, d.dtype, d.root);
            break;
          case Kind::Allgatherv:
          case Kind::Alltoall:
            break;  // above
        }
        op_us = now_us() - start;
      } else if (d.kind == Kind::Broadcast) {
        // The root packs, one broadcast, every rank unpacks (the root too,
        // where its receive buffers are not its send buffers).
        if (fusion.size() < bytes) fusion.resize(bytes);
        if (rank == d.root) pack(fusion.data(), reqs, ready, group, d.dtype);
        in_us = now_us() - start;
        comm.broadcast(fusion.data(), fusion.data(), bytes / size_of(d.dtype), d.dtype, d.root);
        op_us = now_us() - start - in_us;
        unpack(fusion.data(), reqs, ready, group, d.dtype, rank == d.root);
      } else if (d.kind == Kind::Allgather) {
        // This rank's shares packed at its place in the buffer, one allgather
        // in place, then every rank's share of each tensor to that tensor.
        const auto n = static_cast<std::size_t>(size);
        if (fusion.size() < bytes * n) fusion.resize(bytes * n);
        char* own = fusion.data() + bytes * static_cast<std::size_t>(rank);
        pack(own, reqs, ready, group, d.dtype);
        in_us = now_us() - start;
        comm.allgather(own, fusion.data(), bytes / size_of(d.dtype), d.dtype);
        op_us = now_us() - start - in_us;
        std::size_t at = 0;
        for (std::size_t k = 0; k < reqs.size(); ++k) {
          const std::size_t b = ready[group[k]].desc.count * size_of(d.dtype);
          for (std::size_t p = 0; p < n && b > 0; ++p)
            reduce::copy(static_cast<char*>(reqs[k].recv) + p * b, fusion.data() + p * bytes + at,
                         b);
          at += b;
        }
      } else if (d.kind == Kind::ReduceScatter) {
        // Rank p's block of every tensor side by side in block p of the
        // buffer; one reduce-scatter in place; this rank's block back out.
        const auto n = static_cast<std::size_t>(size);
        if (fusion.size() < bytes * n) fusion.resize(bytes * n);
        std::size_t at = 0;
        for (std::size_t k = 0; k < reqs.size(); ++k) {
          const std::size_t b = ready[group[k]].desc.count * size_of(d.dtype);
          for (std::size_t p = 0; p < n && b > 0; ++p)
            reduce::copy(fusion.data() + p * bytes + at,
                         static_cast<const char*>(reqs[k].send) + p * b, b);
          at += b;
        }
        in_us = now_us() - start;
        char* own = fusion.data() + bytes * static_cast<std::size_t>(rank);
        comm.reduce_scatter(fusion.data(), own, bytes / size_of(d.dtype), d.dtype, op);
        op_us = now_us() - start - in_us;
        unpack(own, reqs, ready, group, d.dtype, false);
        finish_avg();
      } else if (d.kind == Kind::ReduceScatterv) {
        // Rank p's rows of every tensor side by side in block p of the
        // buffer (blocks of any length, no padding); one reduce_scatterv in
        // place; this rank's rows back out.
        const auto n = static_cast<std::size_t>(size);
        const std::size_t es = size_of(d.dtype);
        std::vector<std::vector<std::size_t>> counts;
        std::vector<std::size_t> block(n, 0);
        for (std::size_t k : group) {
          counts.push_back(rows_of(ready[k].desc.count, ready[k].desc.root, size));
          for (std::size_t p = 0; p < n; ++p) block[p] += counts.back()[p];
        }
        if (fusion.size() < bytes) fusion.resize(bytes);
        std::size_t at = 0;  // elements: where block p, then tensor k's rows in it, start
        // own_at: where tensor k's rows of this rank land; from: where its rows p start in its
        // send.
        std::vector<std::size_t> own_at(reqs.size()), from(reqs.size(), 0);
        for (std::size_t p = 0; p < n; ++p) {
          for (std::size_t k = 0; k < reqs.size(); ++k) {
            if (p == static_cast<std::size_t>(rank)) own_at[k] = at;
            if (counts[k][p] > 0)
              reduce::copy(fusion.data() + at * es,
                           static_cast<const char*>(reqs[k].send) + from[k] * es,
                           counts[k][p] * es);
            at += counts[k][p];
            from[k] += counts[k][p];
          }
        }
        in_us = now_us() - start;
        char* own = fusion.data() + own_at.front() * es;
        comm.reduce_scatterv(fusion.data(), own, block, d.dtype, op);
        op_us = now_us() - start - in_us;
        for (std::size_t k = 0; k < reqs.size(); ++k) {
          const std::size_t c = counts[k][static_cast<std::size_t>(rank)];
          if (c > 0) reduce::copy(reqs[k].recv, fusion.data() + own_at[k] * es, c * es);
        }
        finish_avg();
      } else {
        if (fusion.size() < bytes) fusion.resize(bytes);
        pack(fusion.data(), reqs, ready, group, d.dtype);
        in_us = now_us() - start;
        comm.allreduce(fusion.data(), fusion.data(), bytes / size_of(d.dtype), d.dtype, op);
        op_us = now_us() - start - in_us;
        unpack(fusion.data(), reqs, ready, group, d.dtype, false);
        finish_avg();
      }
    } catch (const Error& e) {
      complete(e);
      throw;
    }
    const std::int64_t end = now_us();
    if (timeline.open()) {
      std::ostringstream args;
      args << "\"bytes\": " << bytes << ", \"tensors\": " << reqs.size();
      for (std::size_t k : group) {
        const std::string& name = ready[k].name;
        if (ready[k].cached)
          timeline.complete(name, "NEGOTIATE_" + std::string(kind_name(d.kind)) + " (cached)",
                            ready[k].negotiation_start_us, start - ready[k].negotiation_start_us, "");
        if (reqs.size() > 1) timeline.complete(name, "MEMCPY_IN_FUSION_BUFFER", start, in_us, "");
        std::string what = kind_name(d.kind);
        for (auto& ch : what) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
        timeline.complete(name, what, start + in_us, op_us, args.str());
        if (reqs.size() > 1)
          timeline.complete(name, "MEMCPY_OUT_FUSION_BUFFER", start + in_us + op_us,
                            end - start - in_us - op_us, "");
      }
    }
    // Names that went through the table enter the cache.
    // Allgatherv and alltoall names are not: their counts are news every time.
    for (std::size_t k : group)
      if (!ready[k].cached && !own_count(d.kind)) remember(ready[k].name, ready[k].desc);
    complete(std::nullopt);
  }

  // A fused group's send buffers, in order, copied to `dst`.
  static void pack(char* dst, const std::vector<Request>& reqs, const std::vector<Ready>& ready,
                   const std::vector<std::size_t>& group, DataType dtype) {
    std::size_t at = 0;
    for (std::size_t k = 0; k < reqs.size(); ++k) {
      const std::size_t b = ready[group[k]].desc.count * size_of(dtype);
      if (b > 0) reduce::copy(dst + at, reqs[k].send, b);
      at += b;
    }
  }

  // The reverse, into the receive buffers; `skip_in_place`: tensors whose
  // receive buffer is their send buffer already hold the result (a root's).
  static void unpack(const char* src, const std::vector<Request>& reqs,
                     const std::vector<Ready>& ready, const std::vector<std::size_t>& group,
                     DataType dtype, bool skip_in_place) {
    std::size_t at = 0;
    for (std::size_t k = 0; k < reqs.size(); ++k) {
      const std::size_t b = ready[group[k]].desc.count * size_of(dtype);
      if (b > 0 && !(skip_in_place && reqs[k].recv == reqs[k].send))
        reduce::copy(reqs[k].recv, src + at, b);
      at += b;
    }
  }

  // Allgatherv of `reqs` (one tensor, or several fused), one
  // Communicator::allgatherv. One tensor goes straight from its send
  // buffer to where its allocator says (the counts are known from the
  // negotiation). Several: this rank packs its shares of them in order at
  // its place in `buf`, blocks packed in rank order with no padding, one
  // allgatherv in place, then each tensor's allocator gets its pieces. An
  // allocator that fails fails its tensor on this rank only (`errs`): the
  // others have their result. `in_us`, `op_us`: the packing and the
  // allgatherv, for the timeline.
  void gatherv(std::vector<Request>& reqs,
               const std::vector<const std::vector<std::size_t>*>& counts, DataType dtype,
               std::vector<char>& buf, std::vector<std::optional<Error>>& errs, std::int64_t& in_us,
               std::int64_t& op_us) {
    const std::int64_t start = now_us();
    const std::size_t es = size_of(dtype);
    const auto n = static_cast<std::size_t>(size);
    const auto me = static_cast<std::size_t>(rank);
    std::vector<std::size_t> totals(n, 0);
    for (const auto* c : counts)
      for (std::size_t p = 0; p < n; ++p) totals[p] += (*c)[p];
    std::vector<std::size_t> first(n + 1, 0);  // where rank p's block starts (elements)
    for (std::size_t p = 0; p < n; ++p) first[p + 1] = first[p] + totals[p];
    if (reqs.size() == 1 && reqs[0].work) {
      void* out = nullptr;
      errs[0] = allocate(reqs[0], totals, &out);
      // Memory that overlaps the send buffer (other than at this rank's
      // place: in place) is gathered into `buf` first, then copied.
      const auto s0 = reinterpret_cast<std::uintptr_t>(reqs[0].send);
      const auto o0 = reinterpret_cast<std::uintptr_t>(out);
      const bool clash = !errs[0] && out != nullptr && totals[me] > 0 && s0 < o0 + first[n] * es &&
                         o0 < s0 + totals[me] * es && s0 != o0 + first[me] * es;
      char* dst = static_cast<char*>(out);
      if (errs[0] || clash) {
        if (buf.size() < first[n] * es) buf.resize(first[n] * es);
        dst = buf.data();
      }
      in_us = now_us() - start;
      comm.allgatherv(reqs[0].send, dst, totals, dtype);
      op_us = now_us() - start - in_us;
      if (clash) std::memmove(out, dst, first[n] * es);
      return;
    }
    if (buf.size() < first[n] * es) buf.resize(first[n] * es);
    char* own = buf.data() + first[me] * es;
    std::size_t at = 0;
    for (std::size_t k = 0; k < reqs.size(); ++k) {
      const std::size_t b = (*counts[k])[me] * es;
      if (b > 0) reduce::copy(own + at, reqs[k].send, b);
      at += b;
    }
    in_us = now_us() - start;
    comm.allgatherv(own, buf.data(), totals, dtype);
    op_us = now_us() - start - in_us;
    std::vector<std::size_t> offset(n, 0);  // elements into each rank's block
    for (std::size_t k = 0; k < reqs.size(); ++k) {
      const std::vector<std::size_t>& c = *counts[k];
      if (reqs[k].work)  // a stand-in for a joined rank keeps nothing
        errs[k] = deliver(reqs[k], c, dtype,
                          [&](std::size_t p) { return buf.data() + (first[p] + offset[p]) * es; });
      for (std::size_t p = 0; p < n; ++p) offset[p] += c[p];
    }
  }

  // Alltoall of `reqs` (one tensor, or several fused), in two steps: an
  // alltoall of the splits (T counts from each rank to each rank), then
  // one alltoallv of the data, this rank's blocks for rank j of every
  // tensor side by side. One tensor goes straight from its send buffer to
  // where its allocator says; several go through the fusion buffer. An
  // allocator that fails fails its tensor on this rank only (`errs`); what
  // it was sent is received and dropped, so the other ranks complete.
  void alltoall(std::vector<Request>& reqs, DataType dtype, std::vector<std::optional<Error>>& errs,
                std::int64_t& in_us, std::int64_t& op_us) {
    const std::int64_t start = now_us();
    const std::size_t es = size_of(dtype);
    const auto n = static_cast<std::size_t>(size);
    const std::size_t T = reqs.size();
    std::vector<std::uint64_t> out_splits(n * T), in_splits(n * T);
    for (std::size_t j = 0; j < n; ++j)
      for (std::size_t t = 0; t < T; ++t) out_splits[j * T + t] = reqs[t].splits[j];
    comm.alltoall(out_splits.data(), in_splits.data(), T, DataType::UInt64);
    // from[t][i]: elements of tensor t that rank i sends this rank.
    std::vector<std::vector<std::size_t>> from(T, std::vector<std::size_t>(n));
    std::vector<std::size_t> sendcounts(n, 0), recvcounts(n, 0);
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t t = 0; t < T; ++t) {
        from[t][i] = static_cast<std::size_t>(in_splits[i * T + t]);
        recvcounts[i] += from[t][i];
        sendcounts[i] += reqs[t].splits[i];
      }
    std::size_t send_total = 0, recv_total = 0;
    for (std::size_t j = 0; j < n; ++j) {
      send_total += sendcounts[j];
      recv_total += recvcounts[j];
    }
    std::vector<std::vector<char>> dropped(T);  // where a failed allocator's tensor lands
    auto allocate_for = [&](std::size_t t) -> char* {
      Request& r = reqs[t];
      std::size_t total = 0;
      for (std::size_t c : from[t]) total += c;
      if (r.work) {
        void* out = nullptr;
        errs[t] = allocate(r, from[t], &out);
        if (!errs[t]) return static_cast<char*>(out);
      }
      dropped[t].resize(total * es);
      return dropped[t].data();
    };
    if (T == 1) {
      char* out = allocate_for(0);
      in_us = now_us() - start;
      comm.alltoallv(reqs[0].send, sendcounts, out, recvcounts, dtype);
      op_us = now_us() - start - in_us;
      return;
    }
    // Pack: for each rank j, every tensor's block for j in tensor order.
    if (fusion.size() < (send_total + recv_total) * es)
      fusion.resize((send_total + recv_total) * es);
    char* packed = fusion.data();
    char* got = fusion.data() + send_total * es;
    std::vector<std::size_t> src_at(T, 0);  // elements into each tensor's send buffer
    std::size_t at = 0;
    for (std::size_t j = 0; j < n; ++j)
      for (std::size_t t = 0; t < T; ++t) {
        const std::size_t c = reqs[t].splits[j];
        if (c > 0)
          reduce::copy(packed + at * es, static_cast<const char*>(reqs[t].send) + src_at[t] * es,
                       c * es);
        src_at[t] += c;
        at += c;
      }
    in_us = now_us() - start;
    comm.alltoallv(packed, sendcounts, got, recvcounts, dtype);
    op_us = now_us() - start - in_us;
    // Unpack: rank i's block holds tensor 0's part, then tensor 1's, ...
    std::vector<char*> dst(T);
    for (std::size_t t = 0; t < T; ++t) dst[t] = allocate_for(t);
    at = 0;
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t t = 0; t < T; ++t) {
        const std::size_t c = from[t][i];
        if (c > 0) {
          reduce::copy(dst[t], got + at * es, c * es);
          dst[t] += c * es;
        }
        at += c;
      }
  }

  // Asks `r`'s allocator for room for `counts` (summed): `*out`, or the
  // error that fails `r` on this rank.
  std::optional<Error> allocate(Request& r, const std::vector<std::size_t>& counts, void** out) {
    std::size_t total = 0;
    for (std::size_t c : counts) total += c;
    const char* what = kind_name(r.desc.kind);
    *out = nullptr;
    try {
      *out = r.alloc(counts);
    } catch (const Error& e) {
      return e;
    } catch (const std::exception& e) {
      return Error(ErrorCode::InvalidArgument, "engine: tensor '" + r.name + "': the " + what +
                                                   " allocator threw: " + e.what());
    }
    if (*out == nullptr && total > 0)
      return Error(ErrorCode::InvalidArgument, "engine: tensor '" + r.name + "': the " + what +
                                                   " allocator returned no memory for " +
                                                   std::to_string(total) + " elements");
    return std::nullopt;
  }

  // Asks `r`'s allocator where its result goes and copies rank p's share
  // from share(p) there, in rank order.
  template <typename Share>
  std::optional<Error> deliver(Request& r, const std::vector<std::size_t>& counts, DataType dtype,
                               Share&& share) {
    const std::size_t es = size_of(dtype);
    void* out = nullptr;
    if (auto e = allocate(r, counts, &out)) return e;
    std::size_t at = 0;
    for (std::size_t p = 0; p < counts.size(); ++p) {
      if (counts[p] > 0) reduce::copy(static_cast<char*>(out) + at * es, share(p), counts[p] * es);
      at += counts[p];
    }
    return std::nullopt;
  }

  // Puts a name in the cache: a free slot, else the least recently used
  // (lowest slot on ties), the same choice on every rank.
  void remember(const std::string& name, const Desc& d) {
    if (cache_capacity == 0 || cache_index.count(name) != 0) return;
    std::size_t best = 0;
    bool found_free = false;
    for (std::size_t s = 0; s < cache_capacity; ++s)
      if (!cache[s].used) {
        best = s;
        found_free = true;
        break;
      }
    if (!found_free) {
      // A slot some rank has set this cycle must not change meaning: its
      // bit stands for the old name there. Every rank sees the same bits.
      bool any = false;
      for (std::size_t s = 0; s < cache_capacity; ++s) {
        if (busy[s]) continue;
        if (!any || cache[s].last_used < cache[best].last_used) best = s;
        any = true;
      }
      if (!any) return;
      cache_index.erase(cache[best].name);
    }
    cache[best] = Slot{true, name, d, cycle_no};
    cache_index[name] = static_cast<int>(best);
  }

  // The names waiting for some ranks, and which (every rank computes the same).
  std::vector<std::pair<std::string, std::vector<int>>> waiting_names() const {
    std::vector<std::pair<std::string, std::vector<int>>> out;
    for (const auto& [name, e] : table) out.emplace_back(name, missing_from(e));
    for (const auto& [slot, name, missing] : partial_now) out.emplace_back(name, missing);
    return out;
  }

  // Joined and not joined ranks, for the join stall's messages.
  std::pair<std::vector<int>, std::vector<int>> join_sides() const {
    std::pair<std::vector<int>, std::vector<int>> out;
    for (int p = 0; p < size; ++p) (is_joined(p) ? out.first : out.second).push_back(p);
    return out;
  }

  // Rank 0: some ranks have joined and the others have neither joined nor
  // had a tensor run for CHORUS_STALL_WARNING (a rank that never joins
  // would keep join() waiting forever). A tensor that runs restarts the
  // clock: the ranks still in are training.
  void inspect_join(bool progress) {
    const auto [in, out] = join_sides();
    if (in.empty() || out.empty()) {
      join_quiet_since.reset();
      return;
    }
    const auto now = Clock::now();
    if (!join_quiet_since || progress) join_quiet_since = now;
    const auto waited = now - *join_quiet_since;
    if (stall_abort.count() > 0 && waited >= stall_abort) stall_abort_decided = true;
    if (waited < stall_warning || now - join_warned_at < stall_warning) return;
    join_warned_at = now;
    CHORUS_WARN("engine: " << rank_list(in) << (in.size() == 1 ? " has" : " have")
                           << " joined, but " << rank_list(out)
                           << " neither joined nor had a tensor run for "
                           << std::chrono::duration_cast<std::chrono::seconds>(waited).count()
                           << " s: they may be stalled (CHORUS_STALL_WARNING)");
  }

  std::string stalled_message() const {
    std::ostringstream os;
    os << "the engine stopped: ";
    const auto waiting = waiting_names();
    const auto [in, out] = join_sides();
    if (waiting.empty() && !in.empty() && !out.empty()) {
      os << rank_list(in) << (in.size() == 1 ? " has" : " have") << " joined, but "
         << rank_list(out) << " neither joined nor had a tensor run within CHORUS_STALL_ABORT ("
         << stall_abort.count() << " ms)";
      return os.str();
    }
    if (waiting.empty()) {
      os << "a tensor waited for other ranks longer than CHORUS_STALL_ABORT ("
         << stall_abort.count() << " ms)";
      return os.str();
    }
    std::size_t shown = 0;
    for (const auto& [name, missing] : waiting) {
      if (shown++ == 3) {
        os << "; and " << waiting.size() - 3 << " more";
        break;
      }
      os << (shown > 1 ? "; " : "") << "tensor '" << name << "' was not submitted by "
         << rank_list(missing);
    }
    os << " within CHORUS_STALL_ABORT (" << stall_abort.count()
       << " ms) of another rank submitting it";
    return os.str();
  }

  void inspect_stalls() {
    const auto now = Clock::now();
    auto check = [&](const std::string& name, Clock::time_point since,
                     const std::vector<int>& missing) {
      const auto waited = now - since;
      if (stall_abort.count() > 0 && waited >= stall_abort) stall_abort_decided = true;
      if (waited < stall_warning) return;
      auto w = warned_at.find(name);
      if (w != warned_at.end() && now - w->second < stall_warning) return;
      warned_at[name] = now;
      std::vector<int> have;
      for (int p = 0; p < size; ++p)
        if (std::find(missing.begin(), missing.end(), p) == missing.end()) have.push_back(p);
      CHORUS_WARN("engine: tensor '"
                  << name << "' was submitted by " << rank_list(have) << " but not by "
                  << rank_list(missing) << " for "
                  << std::chrono::duration_cast<std::chrono::seconds>(waited).count()
                  << " s: they may be stalled, or submitting other names (CHORUS_STALL_WARNING)");
    };
    std::map<std::string, bool> still;
    for (const auto& [name, e] : table) {
      check(name, e.first_seen, missing_from(e));
      still[name] = true;
    }
    for (const auto& [slot, name, missing] : partial_now) {
      check(name, partial_since[slot], missing);
      still[name] = true;
    }
    for (auto it = warned_at.begin(); it != warned_at.end();)
      it = still.count(it->first) != 0 ? std::next(it) : warned_at.erase(it);
  }
};

}  // namespace detail

// ---- settings ------------------------------------------------------------------

namespace {

// A variable set to the empty string is unset, as for the communicator's
// (src/core/config.cpp): `export CHORUS_FUSION_BYTES=` restores the default.
const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

std::size_t parse_count_or_off(const char* text, const char* what, bool bytes) {
  const std::string v(text);
  if (v == "off" || v == "0") return 0;
  if (bytes) return parse_bytes(v, what);
  std::size_t pos = 0;
  unsigned long long n = 0;
  try {
    n = std::stoull(v, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (pos != v.size() || v.empty() || v[0] == '-')
    throw Error(ErrorCode::InvalidArgument,
                std::string(what) + "=" + v + ": expected a count, or off");
  return static_cast<std::size_t>(n);
}

}  // namespace

// ---- Engine ----------------------------------------------------------------------

Engine::Engine() = default;

Engine Engine::start(const Communicator& comm, const EngineConfig& config) {
  if (!comm.valid()) throw Error(ErrorCode::InvalidUsage, "Engine::start: empty communicator");
  auto impl = std::shared_ptr<detail::EngineImpl>(new detail::EngineImpl(), [](detail::EngineImpl* p) {
    {
      std::lock_guard<std::mutex> lock(p->mu);
      p->shutdown_wanted = true;
      p->flag_news = true;
    }
    p->cv.notify_all();
    {
      std::lock_guard<std::mutex> lock(p->join_mu);
      if (p->thread.joinable()) p->thread.join();
    }
    delete p;
  });
  // Settings: the config, else the environment, else the defaults.
  using namespace std::chrono;
  if (config.cycle) {
    impl->cycle = *config.cycle;
  } else if (const char* v = env("CHORUS_ENGINE_CYCLE_MS")) {
    double ms = -1;
    try {
      std::size_t pos = 0;
      ms = std::stod(v, &pos);
      if (pos != std::string(v).size()) ms = -1;
    } catch (const std::exception&) {
      ms = -1;
    }
    if (!(ms > 0 && ms <= 10000))
      throw Error(ErrorCode::InvalidArgument,
                  std::string("CHORUS_ENGINE_CYCLE_MS=") + v + ": expected milliseconds in (0, 10000]");
    impl->cycle = duration_cast<detail::Clock::duration>(duration<double, std::milli>(ms));
  } else {
    impl->cycle = milliseconds(1);
  }
  if (impl->cycle <= detail::Clock::duration::zero())
    throw Error(ErrorCode::InvalidArgument, "EngineConfig::cycle must be positive");
  impl->fusion_bytes = config.fusion_bytes ? *config.fusion_bytes
                       : env("CHORUS_FUSION_BYTES")
                           ? parse_count_or_off(env("CHORUS_FUSION_BYTES"), "CHORUS_FUSION_BYTES", true)
                           : std::size_t{64} << 20;
  impl->cache_capacity = config.cache_capacity ? *config.cache_capacity
                         : env("CHORUS_ENGINE_CACHE")
                             ? parse_count_or_off(env("CHORUS_ENGINE_CACHE"), "CHORUS_ENGINE_CACHE", false)
                             : 1024;
  if (impl->cache_capacity > (1u << 20))
    throw Error(ErrorCode::InvalidArgument, "the engine's cache holds at most 1048576 names");
  impl->stall_warning = config.stall_warning ? *config.stall_warning
                        : env("CHORUS_STALL_WARNING")
                            ? parse_duration(env("CHORUS_STALL_WARNING"), "CHORUS_STALL_WARNING")
                            : seconds(60);
  impl->stall_abort = config.stall_abort ? *config.stall_abort
                      : env("CHORUS_STALL_ABORT")
                          ? parse_duration(env("CHORUS_STALL_ABORT"), "CHORUS_STALL_ABORT")
                          : milliseconds(0);
  const std::string timeline =
      config.timeline ? *config.timeline : (env("CHORUS_TIMELINE") ? env("CHORUS_TIMELINE") : "");

  // Its own communicator: the engine's collectives never meet the caller's.
  impl->comm = comm.split(0, comm.rank());
  impl->rank = impl->comm.rank();
  impl->size = impl->comm.size();
  impl->cache.resize(impl->cache_capacity);
  if (impl->rank == 0) {
    impl->partial_since.assign(impl->cache_capacity, detail::Clock::time_point{});
    impl->partial_since_us.assign(impl->cache_capacity, -1);
    if (!timeline.empty()) impl->timeline.start(timeline);
  }
  detail::EngineImpl* p = impl.get();
  impl->thread = std::thread([p] { p->run(); });
  Engine e;
  e.impl_ = std::move(impl);
  return e;
}

namespace {

detail::EngineImpl& need(const std::shared_ptr<detail::EngineImpl>& impl) {
  if (!impl) throw Error(ErrorCode::InvalidUsage, "call on an empty Engine handle (use Engine::start)");
  return *impl;
}

Work submit(const std::shared_ptr<detail::EngineImpl>& impl, const std::string& name,
            detail::Desc d, const void* s, void* r, Engine::Allocator alloc = {},
            std::vector<std::size_t> splits = {}) {
  detail::EngineImpl& e = need(impl);
  if (name.empty() || name.size() > 4096)
    throw Error(ErrorCode::InvalidArgument, "engine: a tensor name must have 1 to 4096 bytes");
  if (static_cast<int>(d.dtype) >= kNumDataTypes)
    throw Error(ErrorCode::InvalidArgument, "engine: tensor '" + name + "': unknown dtype " +
                                                std::to_string(static_cast<int>(d.dtype)));
  if (static_cast<int>(d.op) >= kNumReduceOps)
    throw Error(ErrorCode::InvalidArgument, "engine: tensor '" + name + "': unknown reduce op " +
                                                std::to_string(static_cast<int>(d.op)));
  // Allgatherv and alltoall: the result goes where the allocator says.
  const bool gatherv = detail::own_count(d.kind);
  const char* what = detail::kind_name(d.kind);
  if (gatherv && !alloc)
    throw Error(ErrorCode::InvalidArgument,
                "engine: tensor '" + name + "': " + what + " needs an allocator");
  if (d.kind == detail::Kind::Alltoall) {
    if (splits.size() != static_cast<std::size_t>(e.size))
      throw Error(ErrorCode::InvalidArgument,
                  "engine: tensor '" + name + "': alltoall has " + std::to_string(splits.size()) +
                      " splits; it needs one per rank (" + std::to_string(e.size) + ")");
    std::size_t total = 0;
    for (std::size_t c : splits)
      if (__builtin_add_overflow(total, c, &total) ||
          total > (std::size_t{1} << 48) / size_of(d.dtype))
        throw Error(ErrorCode::InvalidArgument,
                    "engine: tensor '" + name +
                        "': the splits' sum is too large (a wrapped negative split?)");
    d.count = total;
  }
  // A ReduceScatterv rank with no rows receives nothing: its recvbuf may be null.
  const bool receives =
      d.kind != detail::Kind::ReduceScatterv ||
      detail::rows_of(d.count, d.root, e.size)[static_cast<std::size_t>(e.rank)] > 0;
  if (d.count > 0 && ((r == nullptr && !gatherv && receives) ||
                      (s == nullptr && (d.kind != detail::Kind::Broadcast || d.root == e.rank))))
    throw Error(ErrorCode::InvalidArgument, "engine: tensor '" + name + "': null buffer with count " +
                                                std::to_string(d.count));
  if (d.kind == detail::Kind::Broadcast && (d.root < 0 || d.root >= e.size))
    throw Error(ErrorCode::InvalidArgument, "engine: tensor '" + name + "': root " +
                                                std::to_string(d.root) + " outside [0, " +
                                                std::to_string(e.size) + ")");
  // Device buffers go to the communicator as they are (it runs them on the
  // GPU); the fusion buffer is host memory, so they are never fused.
  d.device = device::query(s).device || device::query(r).device;
  if (gatherv && d.device)
    throw Error(ErrorCode::InvalidArgument,
                "engine: tensor '" + name + "': " + what +
                    " takes host memory only (the result "
                    "goes where the allocator says, after a host copy)");
  detail::Request req;
  req.name = name;
  req.desc = d;
  req.send = s;
  req.recv = r;
  req.work = std::make_shared<detail::WorkState>();
  // Weak: a Work may outlive the engine.
  req.work->on_wait = [weak = std::weak_ptr<detail::EngineImpl>(impl)] {
    if (auto engine = weak.lock()) engine->wake();
  };
  req.alloc = std::move(alloc);
  req.splits = std::move(splits);
  Work w(req.work);
  {
    std::lock_guard<std::mutex> lock(e.mu);
    if (e.shutdown_wanted) throw Error(ErrorCode::InvalidUsage, "engine: submission after shutdown()");
    if (e.join_wanted)
      throw Error(ErrorCode::InvalidUsage,
                  "engine: tensor '" + name +
                      "' submitted while join() waits: a joined rank submits nothing until "
                      "every rank has joined");
    if (e.stopped) throw *e.failure;
    if (e.submitted_names.count(name) != 0)
      throw Error(ErrorCode::InvalidUsage, "engine: tensor '" + name +
                                               "' was submitted again before its earlier submission "
                                               "completed; wait for it, or use another name");
    e.submitted_names.insert(name);
    if (e.incoming.empty()) e.incoming_since = detail::Clock::now();
    e.incoming.push_back(std::move(req));
    if (e.backing_off) e.cv.notify_all();  // the long sleep ends a cycle from now
  }
  return w;
}

}  // namespace

Work Engine::allreduce(const std::string& name, const void* s, void* r, std::size_t count,
                       DataType dtype, ReduceOp op) {
  detail::Desc d{detail::Kind::Allreduce, dtype, op, count, -1};
  return submit(impl_, name, d, s, r);
}

Work Engine::reducescatter(const std::string& name, const void* s, void* r, std::size_t count,
                           DataType dtype, ReduceOp op) {
  detail::Desc d{detail::Kind::ReduceScatter, dtype, op, count, -1};
  return submit(impl_, name, d, s, r);
}

Work Engine::reducescatter(const std::string& name, const void* s, void* r, std::size_t rows,
                           std::size_t row_count, DataType dtype, ReduceOp op) {
  auto& e = need(impl_);
  const auto n = static_cast<std::size_t>(e.size);
  if (static_cast<int>(dtype) >= kNumDataTypes)  // size_of below needs a valid one
    throw Error(ErrorCode::InvalidArgument, "engine: tensor '" + name + "': unknown dtype " +
                                                std::to_string(static_cast<int>(dtype)));
  if (row_count == 0 || row_count > static_cast<std::size_t>(INT32_MAX))
    throw Error(ErrorCode::InvalidArgument,
                "engine: tensor '" + name + "': a row of " + std::to_string(row_count) +
                    " elements (reducescatter by rows takes 1 to 2^31-1)");
  std::size_t total = 0;
  if (__builtin_mul_overflow(rows, row_count, &total) ||
      total > (std::size_t{1} << 48) / size_of(dtype))
    throw Error(ErrorCode::InvalidArgument,
                "engine: tensor '" + name + "': " + std::to_string(rows) + " rows of " +
                    std::to_string(row_count) + " elements is too large");
  // Rows that divide evenly: the plain reduce-scatter (fused with the others).
  if (rows % n == 0) return reducescatter(name, s, r, rows / n * row_count, dtype, op);
  detail::Desc d{detail::Kind::ReduceScatterv, dtype, op, total,
                 static_cast<std::int32_t>(row_count)};
  // In place is recvbuf at this rank's rows of sendbuf; other overlaps are
  // refused here (the engine's thread would fail on them).
  const auto counts = detail::rows_of(total, d.root, e.size);
  const std::size_t es = size_of(dtype), mine = counts[static_cast<std::size_t>(e.rank)];
  const std::size_t before =
      std::accumulate(counts.begin(), counts.begin() + e.rank, std::size_t{0});
  const auto sb = reinterpret_cast<std::uintptr_t>(s), rb = reinterpret_cast<std::uintptr_t>(r);
  if (s != nullptr && r != nullptr && mine > 0 && rb != sb + before * es && rb < sb + total * es &&
      sb < rb + mine * es)
    throw Error(ErrorCode::InvalidArgument,
                "engine: tensor '" + name +
                    "': recvbuf overlaps sendbuf; in place means recvbuf == sendbuf + the rows of "
                    "the ranks before this one");
  return submit(impl_, name, d, s, r);
}

Work Engine::allgather(const std::string& name, const void* s, void* r, std::size_t count,
                       DataType dtype) {
  detail::Desc d{detail::Kind::Allgather, dtype, ReduceOp::Sum, count, -1};
  return submit(impl_, name, d, s, r);
}

Work Engine::broadcast(const std::string& name, const void* s, void* r, std::size_t count,
                       DataType dtype, int root) {
  detail::Desc d{detail::Kind::Broadcast, dtype, ReduceOp::Sum, count, root};
  return submit(impl_, name, d, s, r);
}

Work Engine::allgatherv(const std::string& name, const void* s, std::size_t count, DataType dtype,
                        Allocator alloc) {
  detail::Desc d{detail::Kind::Allgatherv, dtype, ReduceOp::Sum, count, -1};
  return submit(impl_, name, d, s, nullptr, std::move(alloc));
}

Work Engine::alltoall(const std::string& name, const void* s, std::vector<std::size_t> splits,
                      DataType dtype, Allocator alloc) {
  detail::Desc d{detail::Kind::Alltoall, dtype, ReduceOp::Sum, 0, -1};
  return submit(impl_, name, d, s, nullptr, std::move(alloc), std::move(splits));
}

EngineStats Engine::stats() const {
  auto& e = need(impl_);
  std::lock_guard<std::mutex> lock(e.mu);
  return e.stats;
}

Communicator Engine::communicator() const { return need(impl_).comm; }

int Engine::join() {
  auto& e = need(impl_);
  std::unique_lock<std::mutex> lock(e.mu);
  if (e.shutdown_wanted) throw Error(ErrorCode::InvalidUsage, "engine: join() after shutdown()");
  if (e.stopped) throw *e.failure;
  if (e.join_wanted)
    throw Error(ErrorCode::InvalidUsage, "engine: join() while another join() waits on this rank");
  e.join_wanted = true;
  e.flag_news = true;
  const std::uint64_t round = e.joins_done;
  e.cv.notify_all();
  e.join_cv.wait(lock, [&] { return e.joins_done != round || e.stopped; });
  if (e.joins_done == round) throw *e.failure;
  return e.last_joined;
}

void Engine::shutdown() {
  auto& e = need(impl_);
  {
    std::lock_guard<std::mutex> lock(e.mu);
    e.shutdown_wanted = true;
    e.flag_news = true;
  }
  e.cv.notify_all();
  std::lock_guard<std::mutex> lock(e.join_mu);
  if (e.thread.joinable()) e.thread.join();
}

}  // namespace chorus
