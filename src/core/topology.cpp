#include "core/topology.hpp"

#include "core/config.hpp"

#include "core/enforce.hpp"
#include "core/log.hpp"

#include <chorus/error.hpp>

#if CHORUS_HAVE_HWLOC
#include <hwloc.h>
#endif

#include <dirent.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

namespace chorus::topo {
namespace {

// Larger CPU numbers than this in a list are typos, not CPUs (Linux's
// NR_CPUS tops out at 8192); the cap also bounds what a range expands to.
constexpr int kMaxCpu = 1 << 16;

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\n");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\n");
  return s.substr(b, e - b + 1);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::size_t start = 0;
  for (;;) {
    const auto pos = s.find(sep, start);
    out.push_back(s.substr(start, pos == std::string::npos ? std::string::npos : pos - start));
    if (pos == std::string::npos) return out;
    start = pos + 1;
  }
}

int parse_cpu_number(const std::string& text, const std::string& what) {
  int v = -1;
  const char* b = text.data();
  const char* e = b + text.size();
  const auto res = std::from_chars(b, e, v);
  if (text.empty() || res.ec != std::errc() || res.ptr != e || v < 0)
    CHORUS_THROW(InvalidArgument, what << ": \"" << text << "\" is not a CPU number");
  if (v >= kMaxCpu) CHORUS_THROW(InvalidArgument, what << ": CPU " << v << " is out of range");
  return v;
}

// "0,2,4-7" -> {0, 2, 4, 5, 6, 7}, in the order written.
std::vector<int> parse_cpu_items(const std::string& text, const std::string& what) {
  std::vector<int> out;
  if (trim(text).empty()) CHORUS_THROW(InvalidArgument, what << ": empty CPU list");
  for (const std::string& raw : split(text, ',')) {
    const std::string item = trim(raw);
    if (item.empty()) CHORUS_THROW(InvalidArgument, what << ": empty entry in \"" << text << "\"");
    const auto dash = item.find('-');
    if (dash == std::string::npos) {
      out.push_back(parse_cpu_number(item, what));
      continue;
    }
    const int lo = parse_cpu_number(trim(item.substr(0, dash)), what);
    const int hi = parse_cpu_number(trim(item.substr(dash + 1)), what);
    if (hi < lo) CHORUS_THROW(InvalidArgument, what << ": range \"" << item << "\" runs backwards");
    for (int c = lo; c <= hi; ++c) out.push_back(c);
  }
  return out;
}

std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (in) std::getline(in, line);
  return trim(line);
}

// The calling thread's affinity mask, sorted.
std::vector<int> affinity_cpus() {
  std::vector<int> out;
  long conf = sysconf(_SC_NPROCESSORS_CONF);
  int n = static_cast<int>(std::max<long>(conf, 1));
  for (int attempt = 0; attempt < 8; ++attempt, n *= 2) {
    cpu_set_t* set = CPU_ALLOC(n);
    if (set == nullptr) break;
    const std::size_t bytes = CPU_ALLOC_SIZE(n);
    CPU_ZERO_S(bytes, set);
    if (::sched_getaffinity(0, bytes, set) == 0) {
      for (int c = 0; c < static_cast<int>(bytes * 8); ++c)
        if (CPU_ISSET_S(c, bytes, set)) out.push_back(c);
      CPU_FREE(set);
      return out;
    }
    const int err = errno;
    CPU_FREE(set);
    if (err != EINVAL) break;  // EINVAL: the kernel's mask is larger than ours
  }
  // Cannot read the mask: assume every online CPU.
  const long online = std::max<long>(sysconf(_SC_NPROCESSORS_ONLN), 1);
  for (int c = 0; c < online; ++c) out.push_back(c);
  return out;
}

// Builds the Topology from per-CPU facts: allowed CPUs, groups of CPUs forming
// a core (each group sorted, in hardware order), and each CPU's NUMA node.
Topology assemble(std::vector<int> cpus, const std::vector<std::vector<int>>& core_groups,
                  const std::map<int, int>& node_of_cpu, std::string source) {
  Topology t;
  std::sort(cpus.begin(), cpus.end());
  cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
  t.cpus = cpus;
  t.source = std::move(source);
  const std::set<int> allowed(cpus.begin(), cpus.end());
  std::set<int> placed;
  auto add_core = [&](const std::vector<int>& group) {
    Core c;
    for (int pu : group)
      if (allowed.count(pu) && !placed.count(pu)) c.pus.push_back(pu);
    if (c.pus.empty()) return;
    std::sort(c.pus.begin(), c.pus.end());
    for (int pu : c.pus) placed.insert(pu);
    t.cores.push_back(std::move(c));
  };
  for (const auto& g : core_groups) add_core(g);
  // CPUs no group covered (unreadable sysfs): one core each.
  for (int pu : cpus)
    if (!placed.count(pu)) add_core({pu});
  // Nodes in kernel order, cores in hardware order within each.
  std::map<int, std::vector<int>> by_node;
  for (std::size_t i = 0; i < t.cores.size(); ++i) {
    const auto it = node_of_cpu.find(t.cores[i].pus.front());
    by_node[it == node_of_cpu.end() ? 0 : it->second].push_back(static_cast<int>(i));
  }
  for (auto& [os, cores] : by_node) {
    NumaNode n;
    n.os_index = os;
    n.cores = cores;
    for (int ci : cores) t.cores[static_cast<std::size_t>(ci)].numa = static_cast<int>(t.numa_nodes.size());
    t.numa_nodes.push_back(std::move(n));
  }
  return t;
}

#if CHORUS_HAVE_HWLOC
bool discover_hwloc(Topology& out) {
  hwloc_topology_t topo;
  if (hwloc_topology_init(&topo) != 0) return false;
  // Only CPUs, cores and NUMA nodes matter here (PUs and NUMA nodes are
  // always kept): skipping caches, packages and I/O devices makes loading cheaper.
  hwloc_topology_set_all_types_filter(topo, HWLOC_TYPE_FILTER_KEEP_NONE);
  hwloc_topology_set_type_filter(topo, HWLOC_OBJ_CORE, HWLOC_TYPE_FILTER_KEEP_ALL);
  if (hwloc_topology_load(topo) != 0) {
    hwloc_topology_destroy(topo);
    return false;
  }
  std::vector<std::vector<int>> groups;
  std::map<int, int> node_of_cpu;
  const int ncores = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
  const hwloc_obj_type_t unit = ncores > 0 ? HWLOC_OBJ_CORE : HWLOC_OBJ_PU;
  const int nunits = hwloc_get_nbobjs_by_type(topo, unit);
  for (int i = 0; i < nunits; ++i) {
    hwloc_obj_t obj = hwloc_get_obj_by_type(topo, unit, static_cast<unsigned>(i));
    if (obj == nullptr || obj->cpuset == nullptr) continue;
    std::vector<int> pus;
    int node = 0;
    if (obj->nodeset != nullptr && !hwloc_bitmap_iszero(obj->nodeset))
      node = hwloc_bitmap_first(obj->nodeset);
    unsigned id = 0;
    hwloc_bitmap_foreach_begin(id, obj->cpuset) {
      pus.push_back(static_cast<int>(id));
      node_of_cpu[static_cast<int>(id)] = node;
    }
    hwloc_bitmap_foreach_end();
    groups.push_back(std::move(pus));
  }
  hwloc_topology_destroy(topo);
  if (groups.empty()) return false;
  out = assemble(affinity_cpus(), groups, node_of_cpu, "hwloc");
  return !out.cores.empty();
}
#endif

}  // namespace

std::vector<int> parse_cpu_list(const std::string& text, const std::string& what) {
  std::vector<int> cpus = parse_cpu_items(text, what);
  std::sort(cpus.begin(), cpus.end());
  const auto dup = std::adjacent_find(cpus.begin(), cpus.end());
  if (dup != cpus.end()) CHORUS_THROW(InvalidArgument, what << ": CPU " << *dup << " is named twice");
  return cpus;
}

std::string format_cpu_list(const std::vector<int>& cpus) {
  std::vector<int> s = cpus;
  std::sort(s.begin(), s.end());
  s.erase(std::unique(s.begin(), s.end()), s.end());
  std::string out;
  for (std::size_t i = 0; i < s.size();) {
    std::size_t j = i;
    while (j + 1 < s.size() && s[j + 1] == s[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += std::to_string(s[i]);
    if (j > i) {
      out += j == i + 1 ? ',' : '-';
      out += std::to_string(s[j]);
    }
    i = j + 1;
  }
  return out;
}

Topology discover_sysfs() {
  const std::vector<int> cpus = affinity_cpus();
  // Cores: the siblings of each CPU, as the kernel lists them.
  std::vector<std::vector<int>> groups;
  std::set<int> seen;
  for (int c : cpus) {
    if (seen.count(c)) continue;
    const std::string dir = "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/";
    std::string siblings = read_line(dir + "core_cpus_list");
    if (siblings.empty()) siblings = read_line(dir + "thread_siblings_list");
    std::vector<int> group;
    try {
      if (!siblings.empty()) group = parse_cpu_list(siblings, "sysfs");
    } catch (const Error&) {
      group.clear();
    }
    if (std::find(group.begin(), group.end(), c) == group.end()) group = {c};
    for (int g : group) seen.insert(g);
    groups.push_back(std::move(group));
  }
  std::sort(groups.begin(), groups.end());
  // NUMA nodes: /sys/devices/system/node/node<k>/cpulist.
  std::map<int, int> node_of_cpu;
  if (DIR* d = ::opendir("/sys/devices/system/node")) {
    while (dirent* e = ::readdir(d)) {
      if (std::strncmp(e->d_name, "node", 4) != 0) continue;
      char* end = nullptr;
      const long k = std::strtol(e->d_name + 4, &end, 10);
      if (end == e->d_name + 4 || *end != '\0' || k < 0) continue;
      const std::string list =
          read_line("/sys/devices/system/node/" + std::string(e->d_name) + "/cpulist");
      if (list.empty()) continue;  // a memory-only node
      try {
        for (int c : parse_cpu_list(list, "sysfs")) node_of_cpu[c] = static_cast<int>(k);
      } catch (const Error&) {
      }
    }
    ::closedir(d);
  }
  return assemble(cpus, groups, node_of_cpu, "sysfs");
}

std::size_t last_level_cache_bytes(const std::string& cpu_root) {
  int top = 0;                               // highest level seen
  std::map<std::string, std::size_t> found;  // shared_cpu_list -> size, at that level
  DIR* d = ::opendir(cpu_root.c_str());
  if (d == nullptr) return 0;
  while (dirent* e = ::readdir(d)) {
    if (std::strncmp(e->d_name, "cpu", 3) != 0) continue;
    const char* digits = e->d_name + 3;
    if (*digits == '\0' || std::strspn(digits, "0123456789") != std::strlen(digits)) continue;
    for (int i = 0; i < 16; ++i) {
      const std::string dir = cpu_root + "/" + e->d_name + "/cache/index" + std::to_string(i) + "/";
      const std::string level_text = read_line(dir + "level");
      if (level_text.empty()) break;
      const std::string type = read_line(dir + "type");
      if (type != "Unified" && type != "Data") continue;
      const int level = std::atoi(level_text.c_str());
      std::size_t bytes = 0;  // "8192K"
      try {
        bytes = parse_bytes(read_line(dir + "size"), "sysfs cache size");
      } catch (const Error&) {
      }
      if (bytes == 0 || level < top) continue;
      if (level > top) {
        top = level;
        found.clear();
      }
      std::string shared = read_line(dir + "shared_cpu_list");
      if (shared.empty()) shared = e->d_name;  // unknown sharing: one instance per CPU
      found[shared] = bytes;
    }
  }
  ::closedir(d);
  std::size_t total = 0;
  for (const auto& [cpus, bytes] : found) total += bytes;
  return total;
}

Topology discover() {
#if CHORUS_HAVE_HWLOC
  Topology t;
  if (discover_hwloc(t)) return t;
  CHORUS_INFO("hwloc topology discovery failed; reading /sys instead");
#endif
  return discover_sysfs();
}

std::string describe(const Topology& t) {
  std::ostringstream os;
  os << t.numa_nodes.size() << " NUMA node" << (t.numa_nodes.size() == 1 ? "" : "s") << ", "
     << t.cores.size() << " core" << (t.cores.size() == 1 ? "" : "s") << ", " << t.cpus.size()
     << " CPU" << (t.cpus.size() == 1 ? "" : "s") << " (" << format_cpu_list(t.cpus) << ") ["
     << t.source << "]";
  return os.str();
}

Plan plan_binding(const Topology& t, int local_size, const std::string& spec_in) {
  const std::string spec = trim(spec_in);
  CHORUS_ENFORCE(local_size >= 1, InvalidArgument,
                 "CPU binding: local size " << local_size << " must be >= 1");
  Plan plan;
  const auto n = static_cast<std::size_t>(local_size);
  if (spec == "none") {
    plan.reason = "binding disabled (none)";
    return plan;
  }
  if (spec.empty() || spec == "auto" || spec == "core") {
    if (spec != "core" && local_size == 1) {
      plan.reason = "a single rank on this host: left unbound (use a CPU list or 'core' to pin it)";
      return plan;
    }
    if (n > t.cores.size()) {
      std::ostringstream os;
      os << local_size << " ranks on this host but only " << t.cores.size() << " core"
         << (t.cores.size() == 1 ? "" : "s") << " (" << t.cpus.size() << " CPU"
         << (t.cpus.size() == 1 ? "" : "s") << ") usable: not binding, never two ranks on one core";
      plan.reason = os.str();
      return plan;
    }
    // Round-robin over NUMA nodes: node0 core0, node1 core0, node0 core1, ...
    std::vector<std::size_t> next(t.numa_nodes.size(), 0);
    while (plan.cpus.size() < n) {
      bool took = false;
      for (std::size_t k = 0; k < t.numa_nodes.size() && plan.cpus.size() < n; ++k) {
        const auto& cores = t.numa_nodes[k].cores;
        if (next[k] >= cores.size()) continue;
        plan.cpus.push_back(t.cores[static_cast<std::size_t>(cores[next[k]++])].pus);
        took = true;
      }
      // Cores missing from every node (a malformed Topology) cannot loop forever.
      CHORUS_ENFORCE(took, Internal, "CPU binding: the NUMA nodes list fewer cores than the topology has");
    }
    return plan;
  }
  if (spec.find_first_not_of("0123456789,;- \t") != std::string::npos)
    CHORUS_THROW(InvalidArgument, "CPU binding \"" << spec
                                                   << "\": expected auto, core, none or a CPU list "
                                                      "such as 0,2,4-7 or 0-3;4-7");
  const std::string what = "CPU binding \"" + spec + "\"";
  std::vector<std::vector<int>> entries;
  if (spec.find(';') != std::string::npos) {
    for (const std::string& group : split(spec, ';')) entries.push_back(parse_cpu_list(group, what));
  } else {
    for (int c : parse_cpu_items(spec, what)) entries.push_back({c});
  }
  if (entries.size() < n)
    CHORUS_THROW(InvalidArgument, what << ": " << local_size << " ranks on this host need "
                                       << local_size << " entries, the list has " << entries.size());
  // The whole list must name each CPU once, even in entries this job does not
  // use; only the entries it uses must be CPUs this process may run on.
  std::set<int> named;
  for (const auto& entry : entries)
    for (int c : entry)
      if (!named.insert(c).second)
        CHORUS_THROW(InvalidArgument, what << ": CPU " << c
                                           << " is named twice (never two ranks on one CPU)");
  const std::set<int> allowed(t.cpus.begin(), t.cpus.end());
  for (std::size_t i = 0; i < n; ++i) {
    for (int c : entries[i])
      if (!allowed.count(c))
        CHORUS_THROW(InvalidArgument, what << ": CPU " << c << " is not available to this process"
                                           << " (usable: " << format_cpu_list(t.cpus) << ")");
    plan.cpus.push_back(entries[i]);
  }
  return plan;
}

std::string describe_binding(const Topology& t, const std::vector<int>& cpus) {
  if (cpus.empty()) return "not bound";
  std::vector<int> cores;
  std::set<int> nodes;
  for (std::size_t i = 0; i < t.cores.size(); ++i) {
    const auto& pus = t.cores[i].pus;
    if (std::any_of(pus.begin(), pus.end(),
                    [&](int p) { return std::find(cpus.begin(), cpus.end(), p) != cpus.end(); })) {
      cores.push_back(static_cast<int>(i));
      const auto numa = static_cast<std::size_t>(t.cores[i].numa);
      if (numa < t.numa_nodes.size()) nodes.insert(t.numa_nodes[numa].os_index);
    }
  }
  std::ostringstream os;
  os << (cpus.size() == 1 ? "CPU " : "CPUs ") << format_cpu_list(cpus);
  if (!cores.empty()) {
    os << " (core" << (cores.size() == 1 ? " " : "s ") << format_cpu_list(cores) << ", NUMA node"
       << (nodes.size() == 1 ? " " : "s ") << format_cpu_list({nodes.begin(), nodes.end()}) << ")";
  }
  return os.str();
}

CpuMask::CpuMask(const std::vector<int>& cpus) {
  int top = 0;
  for (int c : cpus) top = std::max(top, c + 1);
  cpu_set_t* set = CPU_ALLOC(std::max(top, 1));
  if (set == nullptr) throw std::bad_alloc();
  bytes_ = CPU_ALLOC_SIZE(std::max(top, 1));
  CPU_ZERO_S(bytes_, set);
  for (int c : cpus) CPU_SET_S(static_cast<std::size_t>(c), bytes_, set);
  set_ = set;
}

CpuMask::~CpuMask() { CPU_FREE(static_cast<cpu_set_t*>(set_)); }

int CpuMask::apply(pid_t tid) const noexcept {
  return ::sched_setaffinity(tid, bytes_, static_cast<cpu_set_t*>(set_)) == 0 ? 0 : errno;
}

void apply_binding(const std::vector<int>& cpus) {
  CHORUS_ENFORCE(!cpus.empty(), InvalidArgument, "CPU binding: empty CPU set");
  const int err = CpuMask(cpus).apply();
  if (err != 0)
    CHORUS_THROW(System, "sched_setaffinity to CPUs " << format_cpu_list(cpus)
                                                      << " failed: " << std::strerror(err));
}

std::string bind_local_rank(int local_rank, int local_size, const std::string& spec) {
  if (trim(spec) == "none") {
    CHORUS_INFO("CPU binding: none (CHORUS_CPU_BIND=none)");
    return "not bound (none)";
  }
  // Only the first communicator of a thread binds it: see the header.
  thread_local bool decided = false;
  if (decided) return "unchanged (decided by this thread's first communicator)";
  const std::string s = trim(spec);
  if ((s.empty() || s == "auto") && local_size == 1) {
    // The plan is known without looking at the machine (discovery costs
    // tens of milliseconds with hwloc).
    decided = true;
    CHORUS_INFO("CPU binding: not bound: the only rank on this host");
    return "not bound: the only rank on this host";
  }
  const Topology t = discover();
  const Plan plan = plan_binding(t, local_size, spec);  // throws for a bad list
  decided = true;
  if (!plan.bound()) {
    CHORUS_INFO("CPU binding: local rank " << local_rank << " of " << local_size
                                           << " not bound: " << plan.reason << "; " << describe(t));
    return "not bound: " + plan.reason;
  }
  CHORUS_ENFORCE(local_rank >= 0 && local_rank < local_size, Internal,
                 "CPU binding: local rank " << local_rank << " outside [0, " << local_size << ")");
  const std::vector<int>& mine = plan.cpus[static_cast<std::size_t>(local_rank)];
  const std::string what = describe_binding(t, mine);
  const bool is_list = !(s.empty() || s == "auto" || s == "core");
  try {
    apply_binding(mine);
  } catch (const Error& e) {
    if (is_list) throw;
    CHORUS_WARN("CPU binding: could not bind local rank " << local_rank << " to " << what << ": "
                                                         << e.message() << "; running unbound");
    return "not bound: " + e.message();
  }
  CHORUS_INFO("CPU binding: local rank " << local_rank << " of " << local_size << " bound to "
                                         << what << "; " << describe(t));
  return "bound to " + what;
}

}  // namespace chorus::topo
