#include "transport.hpp"

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
  }
  return "unknown-collective";
}

std::string describe(const CallDesc& d) {
  std::ostringstream os;
  os << to_string(d.coll) << " #" << d.seq << " (count " << d.count;
  if (is_valid(d.dtype)) os << ", " << chorus::to_string(d.dtype);
  else os << ", dtype " << static_cast<int>(d.dtype);
  const bool reduces = d.coll == Coll::Allreduce || d.coll == Coll::ReduceScatter || d.coll == Coll::Reduce;
  if (reduces) os << ", " << (is_valid(d.op) ? std::string(chorus::to_string(d.op)) : "op ?");
  if (d.root >= 0) os << ", root " << d.root;
  os << ")";
  return os.str();
}

void check_same_call(const CallDesc& mine, int my_rank, const CallDesc& theirs, int peer) {
  if (mine == theirs) return;
  std::ostringstream os;
  os << "ranks disagree on the call: rank " << peer << " called " << describe(theirs) << " but rank "
     << my_rank << " called " << describe(mine)
     << ". Every rank must issue the same collectives, in the same order, with the same count, "
        "dtype, op and root.";
  throw Error(ErrorCode::InvalidUsage, os.str(), peer);
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
