#include "algorithms/selector.hpp"

#include "core/log.hpp"

#include <chorus/error.hpp>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <iomanip>
#include <limits>
#include <sstream>

namespace chorus::algo {
namespace {

constexpr Coll kColls[] = {Coll::Allreduce, Coll::Broadcast, Coll::Allgather, Coll::ReduceScatter,
                           Coll::Reduce,    Coll::Gather,    Coll::Scatter,   Coll::Alltoall,
                           Coll::Barrier};

std::string names_of(Coll c) {
  std::string out;
  for (const Algorithm* a : all_algorithms())
    if (a->coll == c) out += (out.empty() ? "" : ", ") + std::string(a->name);
  return out;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return {};
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

std::string human_bytes(std::size_t b) {
  std::ostringstream os;
  if (b >= (1u << 20) && b % (1u << 20) == 0) os << (b >> 20) << " MiB";
  else if (b >= 1024 && b % 1024 == 0) os << (b >> 10) << " KiB";
  else os << b << " B";
  return os.str();
}

}  // namespace

const char* coll_key(Coll c) {
  switch (c) {
    case Coll::Allreduce: return "allreduce";
    case Coll::Broadcast: return "broadcast";
    case Coll::Allgather: return "allgather";
    case Coll::ReduceScatter: return "reduce_scatter";
    case Coll::Reduce: return "reduce";
    case Coll::Gather: return "gather";
    case Coll::Scatter: return "scatter";
    case Coll::Alltoall: return "alltoall";
    case Coll::Barrier: return "barrier";
    default: return "?";
  }
}

std::map<Coll, std::string> parse_algo_overrides(const std::string& text, const char* what) {
  std::map<Coll, std::string> out;
  std::istringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    item = trim(item);
    if (item.empty()) continue;
    const auto colon = item.find(':');
    if (colon == std::string::npos)
      throw Error(ErrorCode::InvalidArgument,
                  std::string(what) + ": '" + item +
                      "' is not collective:algorithm (e.g. allreduce:ring,broadcast:binomial)");
    const std::string coll = trim(item.substr(0, colon)), name = trim(item.substr(colon + 1));
    const Coll* c = std::find_if(std::begin(kColls), std::end(kColls),
                                 [&](Coll k) { return coll == coll_key(k); });
    if (c == std::end(kColls)) {
      std::string all;
      for (Coll k : kColls) all += (all.empty() ? "" : ", ") + std::string(coll_key(k));
      throw Error(ErrorCode::InvalidArgument,
                  std::string(what) + ": unknown collective '" + coll + "' (one of: " + all + ")");
    }
    if (!find_algorithm(*c, name))
      throw Error(ErrorCode::InvalidArgument, std::string(what) + ": unknown algorithm '" + name +
                                                  "' for " + coll + " (available: " +
                                                  names_of(*c) + ")");
    out[*c] = name;
  }
  return out;
}

std::string model_to_text(const Model& m) {
  std::ostringstream os;
  os << std::setprecision(6);
  os << "local.alpha_us = " << m.local.alpha_us << "\n"
     << "local.gbps = " << m.local.gbps << "\n"
     << "net.alpha_us = " << m.net.alpha_us << "\n"
     << "net.gbps = " << m.net.gbps << "\n"
     << "reduce_gbps = " << m.reduce_gbps << "\n";
  for (const auto& [name, f] : m.fits) {
    os << "fit." << name << " = " << f.lat << " " << f.bw;
    for (const auto& k : f.knots) os << " " << k.bytes << " " << k.scale;
    os << "\n";
  }
  return os.str();
}

Model model_from_text(const std::string& text, Model m, const std::string& what) {
  std::istringstream in(text);
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (const auto hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    line = trim(line);
    if (line.empty()) continue;
    const auto eq = line.find('=');
    const std::string where = what + ":" + std::to_string(lineno);
    if (eq == std::string::npos)
      throw Error(ErrorCode::InvalidArgument, where + ": expected 'key = value', got '" + line + "'");
    const std::string key = trim(line.substr(0, eq)), val = trim(line.substr(eq + 1));
    if (key.rfind("fit.", 0) == 0) {
      // fit.<collective>.<algorithm> = <latency scale> <bandwidth scale>
      const std::string name = key.substr(4);
      const auto dot = name.find('.');
      const Coll* c = std::find_if(std::begin(kColls), std::end(kColls), [&](Coll k) {
        return dot != std::string::npos && name.substr(0, dot) == coll_key(k);
      });
      if (c == std::end(kColls) || !find_algorithm(*c, name.substr(dot + 1)))
        throw Error(ErrorCode::InvalidArgument,
                    where + ": '" + key + "' names no algorithm (fit.<collective>.<algorithm>)");
      std::istringstream nums(val);
      Model::Fit f;
      std::string rest;
      std::vector<double> v;
      bool numeric = true;
      while (nums >> rest) {
        char* end = nullptr;
        v.push_back(std::strtod(rest.c_str(), &end));
        numeric = numeric && *end == '\0' && std::isfinite(v.back()) && v.back() > 0;
      }
      bool ascending = true;
      for (std::size_t i = 4; i < v.size(); i += 2) ascending = ascending && v[i] > v[i - 2];
      if (!numeric || v.size() < 2 || v.size() % 2 != 0 || !ascending)
        throw Error(ErrorCode::InvalidArgument,
                    where + ": '" + key +
                        "' needs positive numbers: latency scale, bandwidth scale[, then pairs of "
                        "size in bytes (ascending) and bandwidth scale up to it], got '" + val + "'");
      f.lat = v[0];
      f.bw = v[1];
      for (std::size_t i = 2; i < v.size(); i += 2) f.knots.push_back({v[i], v[i + 1]});
      m.fits[name] = f;
      continue;
    }
    char* end = nullptr;
    const double v = std::strtod(val.c_str(), &end);
    if (val.empty() || *end != '\0' || !std::isfinite(v) || v <= 0)
      throw Error(ErrorCode::InvalidArgument,
                  where + ": '" + key + "' needs a positive number, got '" + val + "'");
    if (key == "local.alpha_us") m.local.alpha_us = v;
    else if (key == "local.gbps") m.local.gbps = v;
    else if (key == "net.alpha_us") m.net.alpha_us = v;
    else if (key == "net.gbps") m.net.gbps = v;
    else if (key == "reduce_gbps") m.reduce_gbps = v;
    else
      throw Error(ErrorCode::InvalidArgument,
                  where + ": unknown key '" + key +
                      "' (local.alpha_us, local.gbps, net.alpha_us, net.gbps, reduce_gbps)");
  }
  m.source = what;
  return m;
}

double estimate(const Algorithm& a, const Layout& layout, const Model& model, const Call& call) {
  const double c = a.cost(layout, model, call);
  const auto fit = model.fits.find(std::string(coll_key(a.coll)) + "." + a.name);
  if (fit == model.fits.end() || call.count == 0) return c;
  const Model::Fit& f = fit->second;
  Call at = call;
  at.count = 1;
  const double c1 = a.cost(layout, model, at);
  double us = f.lat * c1, prev = c1;
  for (const auto& k : f.knots) {
    at.count = std::max<std::size_t>(1, static_cast<std::size_t>(k.bytes) / size_of(call.dtype));
    const double ck = std::max(prev, a.cost(layout, model, at));
    us += k.scale * std::max(0.0, std::min(c, ck) - prev);
    if (c <= ck) return us;
    prev = ck;
  }
  return us + f.bw * std::max(0.0, c - prev);
}

Selector::Selector(Layout layout, Model model, std::map<Coll, std::string> forced)
    : layout_(std::move(layout)), model_(std::move(model)), forced_(std::move(forced)) {}

std::vector<Selector::Estimate> Selector::estimates(const Call& call) const {
  std::vector<Estimate> out;
  for (const Algorithm* a : all_algorithms()) {
    if (a->coll != call.coll) continue;
    Estimate e;
    e.algo = a;
    e.excluded = a->constraint(layout_, call);
    if (e.excluded.empty()) e.us = estimate(*a, layout_, model_, call);
    out.push_back(std::move(e));
  }
  return out;
}

std::uint8_t Selector::wire_id(const Algorithm& a) {
  // Worked out once into one contiguous table: walking the descriptors
  // touched a cache line per algorithm on every call.
  struct Id {
    const Algorithm* algo;
    std::uint8_t id;
  };
  static const std::vector<Id> ids = [] {
    std::vector<Id> v;
    std::map<Coll, std::uint8_t> seen;  // algorithms of each collective so far
    for (const Algorithm* x : all_algorithms()) v.push_back({x, ++seen[x->coll]});
    return v;
  }();
  for (const Id& e : ids)
    if (e.algo == &a) return e.id;
  return 0;
}

std::size_t Selector::memo_index(const Call& c) noexcept {
  std::uint64_t h = static_cast<std::uint64_t>(c.count) * 0x9e3779b97f4a7c15ULL;
  h ^= (static_cast<std::uint64_t>(c.coll) << 8) ^ (static_cast<std::uint64_t>(c.dtype) << 16) ^
       (static_cast<std::uint64_t>(c.op) << 24) ^ (static_cast<std::uint64_t>(static_cast<std::uint32_t>(c.root + 1)) << 32);
  h *= 0xff51afd7ed558ccdULL;
  return static_cast<std::size_t>(h >> 40) & (kMemoSlots - 1);
}

std::uint64_t Selector::next_serial() {
  static std::atomic<std::uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

namespace {

bool same_shape(const Call& a, const Call& b) {
  return a.coll == b.coll && a.count == b.count && a.dtype == b.dtype && a.op == b.op && a.root == b.root;
}

// This thread's last unforced answer (see Selector::serial_): a loop of
// calls of one shape takes no lock.
struct LastPick {
  std::uint64_t selector = 0;
  Call call;
  const Algorithm* pick = nullptr;
};
thread_local LastPick t_last;

}  // namespace

const Algorithm& Selector::choose(const Call& call, const std::string& per_call) {
  const std::string* forced_name = &per_call;
  const char* why = "per-call option";
  if (per_call.empty() && !forced_.empty()) {
    if (auto it = forced_.find(call.coll); it != forced_.end()) {
      forced_name = &it->second;
      why = "CHORUS_ALGO";
    }
  }
  const std::string& forced = *forced_name;
  const bool info = static_cast<int>(log::level()) >= static_cast<int>(log::Level::Info);
  if (forced.empty() && !info) {
    if (t_last.selector == serial_ && same_shape(t_last.call, call)) return *t_last.pick;
    std::lock_guard<std::mutex> lock(mu_);
    const Memo& m = memo_[memo_index(call)];
    if (m.pick != nullptr && same_shape(m.call, call)) {
      t_last = LastPick{serial_, call, m.pick};
      return *m.pick;
    }
  }
  const Algorithm* pick = nullptr;
  std::vector<Estimate> est;
  if (!forced.empty()) {
    pick = find_algorithm(call.coll, forced);
    if (!pick)
      throw Error(ErrorCode::InvalidArgument, "unknown algorithm '" + forced + "' for " +
                                                  coll_key(call.coll) + " (available: " +
                                                  names_of(call.coll) + ")");
    const std::string no = pick->constraint(layout_, call);
    if (!no.empty())
      throw Error(ErrorCode::InvalidArgument, std::string(why) + " forces " + coll_key(call.coll) +
                                                  ":" + forced + ", which cannot run this call: " +
                                                  no);
  } else {
    est = estimates(call);
    double best = std::numeric_limits<double>::infinity();
    for (const auto& e : est)
      if (e.excluded.empty() && e.us < best) best = e.us, pick = e.algo;
    if (!pick)
      throw Error(ErrorCode::Internal,
                  std::string("no algorithm can run this ") + coll_key(call.coll) + " call");
    std::lock_guard<std::mutex> lock(mu_);
    memo_[memo_index(call)] = Memo{call, pick};
    t_last = LastPick{serial_, call, pick};
  }
  if (info) {
    const std::size_t bytes = call.bytes();
    const int bucket = bytes == 0 ? -1 : static_cast<int>(std::bit_width(bytes));
    bool first;
    {
      std::lock_guard<std::mutex> lock(mu_);
      first = logged_.emplace(static_cast<int>(call.coll), bucket, forced).second;
    }
    if (first) {
      if (est.empty()) est = estimates(call);
      std::ostringstream os;
      os << std::fixed << std::setprecision(1);
      os << "algorithm: " << coll_key(call.coll) << " " << human_bytes(bytes) << " on "
         << layout_.size << " ranks / " << layout_.hosts << " host(s): " << pick->name
         << (forced.empty() ? " (cheapest)" : std::string(" (forced by ") + why + ")")
         << "; estimates:";
      for (const auto& e : est) {
        os << " " << e.algo->name;
        if (e.excluded.empty()) os << " " << e.us << " us";
        else os << " n/a";
      }
      os << " [model: " << model_.source << "]";
      log::write(log::Level::Info, os.str());
    }
  }
  return *pick;
}

}  // namespace chorus::algo
