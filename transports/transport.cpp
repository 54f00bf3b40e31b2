#include "transport.hpp"

#include "core/log.hpp"
#include "reduce/reduce.hpp"

#include <dirent.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>

namespace chorus::transport {

const char* to_string(Coll c) noexcept {
  switch (c) {
    case Coll::None: return "none";
    case Coll::Allreduce: return "allreduce";
    case Coll::Broadcast: return "broadcast";
    case Coll::Allgather: return "allgather";
    case Coll::ReduceScatter: return "reduce_scatter";
    case Coll::Reduce: return "reduce";
    case Coll::Gather: return "gather";
    case Coll::Scatter: return "scatter";
    case Coll::Alltoall: return "alltoall";
    case Coll::Barrier: return "barrier";
    case Coll::SendRecv: return "send/recv";
    case Coll::Split: return "split";
    case Coll::Alltoallv:
      return "alltoallv";
    case Coll::Allgatherv:
      return "allgatherv";
    case Coll::ReduceScatterv:
      return "reduce_scatterv";
  }
  return "unknown-collective";
}

std::string describe(const CallDesc& d) {
  std::ostringstream os;
  os << to_string(d.coll) << " #" << d.seq << " (count " << d.count;
  if (is_valid(d.dtype)) os << ", " << chorus::to_string(d.dtype);
  else os << ", dtype " << static_cast<int>(d.dtype);
  const bool reduces = d.coll == Coll::Allreduce || d.coll == Coll::ReduceScatter ||
                       d.coll == Coll::Reduce || d.coll == Coll::ReduceScatterv;
  if (reduces) os << ", " << (is_valid(d.op) ? std::string(chorus::to_string(d.op)) : "op ?");
  if (d.coll == Coll::Allgatherv || d.coll == Coll::ReduceScatterv)
    os << ", counts #" << std::hex << d.root << std::dec;
  else if (d.root >= 0)
    os << ", root " << d.root;
  if (d.algo != 0) os << ", algorithm #" << static_cast<int>(d.algo);
  if (d.device) os << ", on device memory";
  os << ")";
  return os.str();
}

void check_same_call(const CallDesc& mine, int my_rank, const CallDesc& theirs, int peer) {
  if (mine == theirs) return;
  std::ostringstream os;
  CallDesc same_count = theirs;
  same_count.count = mine.count;
  if (mine.coll == Coll::Alltoallv && same_count == mine) {
    // The one call whose count differs from message to message: the pair's
    // counts are what disagree.
    os << "ranks disagree on the counts of " << to_string(mine.coll) << " #" << mine.seq
       << ": rank " << peer << " sends " << theirs.count << " elements to rank " << my_rank
       << " (its sendcounts[" << my_rank << "]) but rank " << my_rank << " expects " << mine.count
       << " from rank " << peer << " (its recvcounts[" << peer
       << "]). sendcounts[j] on rank i must equal recvcounts[i] on rank j";
    throw Error(ErrorCode::InvalidUsage, os.str(), peer);
  }
  same_count.root = mine.root;
  if ((mine.coll == Coll::Allgatherv || mine.coll == Coll::ReduceScatterv) && same_count == mine) {
    os << "ranks disagree on the counts of " << to_string(mine.coll) << " #" << mine.seq
       << ": rank " << peer << " passed recvcounts summing to " << theirs.count << " (counts #"
       << std::hex << theirs.root << std::dec << ") but rank " << my_rank
       << " passed recvcounts summing to " << mine.count << " (counts #" << std::hex << mine.root
       << std::dec << "). Every rank must pass the same recvcounts";
    throw Error(ErrorCode::InvalidUsage, os.str(), peer);
  }
  os << "ranks disagree on the call: rank " << peer << " called " << describe(theirs) << " but rank "
     << my_rank << " called " << describe(mine)
     << ". Every rank must issue the same collectives, in the same order, with the same count, "
        "dtype, op and root"
     << (mine.device != theirs.device
             ? " (one passed CUDA device buffers, the other host buffers: every rank of a "
               "collective must pass the same kind of memory)"
             : "")
     << (mine.algo != theirs.algo && mine.coll == theirs.coll && mine.device == theirs.device
             ? ", and pick the same algorithm (CHORUS_ALGO or CallOptions::algorithm differ "
               "between ranks)."
             : ".");
  throw Error(ErrorCode::InvalidUsage, os.str(), peer);
}

void combine_into(const Combine& cb, char* dst, std::size_t offset, const char* incoming,
                  std::size_t bytes) {
  if (bytes == 0) return;
  if (cb.kind == Combine::Kind::Copy) {
    // Pieces below 64 KiB are not worth the fence.
    if (cb.stream && bytes >= (std::size_t{64} << 10))
      reduce::copy_streaming(dst + offset, incoming, bytes);
    else
      reduce::copy(dst + offset, incoming, bytes);
    return;
  }
  const std::size_t n = bytes / size_of(cb.dtype);
  if (cb.src == nullptr) {
    reduce::combine(dst + offset, incoming, n, cb.dtype, cb.op);
    return;
  }
  const char* other = static_cast<const char*>(cb.src) + offset;
  if (cb.incoming_first) reduce::combine3(dst + offset, incoming, other, n, cb.dtype, cb.op);
  else reduce::combine3(dst + offset, other, incoming, n, cb.dtype, cb.op);
}

Error timeout_error(std::span<const Request> reqs) {
  std::ostringstream os;
  int blamed = -1;
  std::vector<int> waiting_recv;
  std::vector<int> waiting_send;
  for (const auto& r : reqs) {
    if (r->done) continue;
    auto& v = r->is_send ? waiting_send : waiting_recv;
    if (std::find(v.begin(), v.end(), r->peer) == v.end()) v.push_back(r->peer);
  }
  os << "deadline passed";
  if (!waiting_recv.empty()) {
    os << " waiting for data from rank";
    for (int p : waiting_recv) os << ' ' << p;
    blamed = waiting_recv.front();
  }
  if (!waiting_send.empty()) {
    os << (waiting_recv.empty() ? "" : " and") << " waiting to send to rank";
    for (int p : waiting_send) os << ' ' << p;
    if (blamed < 0) blamed = waiting_send.front();
  }
  os << "; that rank is stopped, stuck or much slower (raise CHORUS_TIMEOUT if it is only slow)";
  return Error(ErrorCode::Timeout, os.str(), blamed);
}

Error timeout_chain_error(const std::map<int, int>& waits_for, int my_rank, int size) {
  int culprit = waits_for.count(my_rank) ? my_rank : -1;
  if (culprit < 0 && !waits_for.empty()) culprit = waits_for.begin()->first;
  std::ostringstream chain;
  std::vector<int> seen;
  while (culprit >= 0 && waits_for.count(culprit) &&
         std::find(seen.begin(), seen.end(), culprit) == seen.end()) {
    seen.push_back(culprit);
    const int next = waits_for.at(culprit);
    chain << (seen.size() > 1 ? ", " : "") << "rank " << culprit << " waited for rank " << next;
    culprit = next;
  }
  std::ostringstream os;
  if (culprit < 0 || waits_for.count(culprit) == 0) {
    os << "rank " << culprit << " did not respond within the deadline (" << chain.str()
       << "); it is stopped, stuck or much slower. Raise CHORUS_TIMEOUT if it is only slow.";
    return Error(ErrorCode::Timeout, os.str(), culprit);
  }
  // The chain came back to a rank already in it: those ranks waited for one
  // another, each having given up on the next. What held them up is a rank
  // outside the cycle, one that reported nothing (a stopped rank cannot).
  std::vector<int> silent;
  for (int r = 0; r < size; ++r)
    if (waits_for.count(r) == 0) silent.push_back(r);
  os << "the ranks that timed out waited for one another in a cycle (" << chain.str() << ")";
  if (silent.empty()) {
    os << ", and every rank did: a deadlock, each waiting for the next (two ranks that both "
          "receive first, or calls made in different orders)";
    return Error(ErrorCode::Timeout, os.str(), -1);
  }
  os << "; ";
  for (std::size_t i = 0; i < silent.size(); ++i)
    os << (i == 0 ? "" : " and ") << "rank " << silent[i];
  os << (silent.size() == 1 ? " reported nothing: it is"
                            : " reported nothing: the one that takes part in this call is")
     << " stopped, stuck or much slower. Raise CHORUS_TIMEOUT if it is only slow.";
  return Error(ErrorCode::Timeout, os.str(), silent.size() == 1 ? silent.front() : -1);
}

void FailureState::fail(const Error& e) {
  if (!error_) {
    error_ = e;
    CHORUS_INFO(transport_ << ": transport failed: " << e.what());
  }
  throw *error_;
}

void FailureState::request_abort(const std::string& why) noexcept {
  {
    std::lock_guard<std::mutex> lock(abort_mu_);
    if (abort_why_.empty()) abort_why_ = why;
  }
  aborted_.store(true, std::memory_order_release);
}

void FailureState::throw_if_aborted() {
  if (!aborted()) return;
  std::string why;
  {
    std::lock_guard<std::mutex> lock(abort_mu_);
    why = abort_why_.empty() ? std::string("communicator aborted") : abort_why_;
  }
  fail(Error(ErrorCode::Aborted, why));
}

Error FailureState::own_timeout(std::span<const Request> reqs, int my_rank) {
  Error mine = timeout_error(reqs);
  if (mine.peer() >= 0) waits_for_[my_rank] = mine.peer();
  return mine;
}

std::chrono::milliseconds FailureState::grace(std::chrono::milliseconds timeout) {
  return std::clamp<std::chrono::milliseconds>(timeout / 10, std::chrono::milliseconds(100),
                                               std::chrono::milliseconds(1000));
}

Error notice_error(std::uint64_t code, int blamed, int from, const std::string& text) {
  auto use = static_cast<ErrorCode>(code);
  if (code < 1 || code > 9) use = ErrorCode::Internal;
  // An abort on another rank is a failure of this collective for us.
  if (use == ErrorCode::Aborted) use = ErrorCode::PeerFailure;
  return Error(use, "rank " + std::to_string(from) + " failed and reported: " + text,
               blamed >= 0 ? blamed : from);
}

std::string shm_name_prefix() {
  // Appended piece by piece: GCC 12 warns (-Wrestrict, falsely) on
  // "literal" + std::string here.
  std::string name = "chorus-";
  if (const char* j = std::getenv("CHORUS_JOB_ID"); j && *j) {
    const std::size_t limit = name.size() + 32;  // at most 32 characters of the id
    for (const char* p = j; *p && name.size() < limit; ++p)
      name += std::isalnum(static_cast<unsigned char>(*p)) ? *p : '_';
  } else {
    name += 'p';
    name += std::to_string(getpid());
  }
  name += '-';
  return name;
}

std::vector<std::string> remove_shm_files(const std::string& prefix) {
  std::vector<std::string> removed;
  DIR* d = ::opendir("/dev/shm");
  if (d == nullptr) return removed;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.rfind(prefix, 0) == 0 && ::shm_unlink(("/" + name).c_str()) == 0)
      removed.push_back(name);
  }
  ::closedir(d);
  return removed;
}

namespace {
std::map<std::string, TransportFactory>& registry() {
  static std::map<std::string, TransportFactory> r;
  return r;
}
std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
}  // namespace

bool register_transport(const std::string& name, TransportFactory factory) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry()[name] = std::move(factory);
  return true;
}

std::vector<std::string> transport_names() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  std::vector<std::string> names;
  for (const auto& [n, f] : registry()) names.push_back(n);
  return names;
}

std::unique_ptr<Transport> create_transport(const std::string& name, const TransportContext& ctx) {
  TransportFactory f;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto it = registry().find(name);
    if (it != registry().end()) f = it->second;
  }
  if (!f) {
    std::string known;
    for (const auto& n : transport_names()) known += (known.empty() ? "" : ", ") + n;
    throw Error(ErrorCode::InvalidArgument,
                "unknown transport '" + name + "' (CHORUS_TRANSPORT); this build has: " + known);
  }
  return f(ctx);
}

}  // namespace chorus::transport
