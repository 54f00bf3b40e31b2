#pragma once

// The host's CPUs as this process may use them (cores, their hardware threads,
// NUMA nodes), and where each local rank should run (CHORUS_CPU_BIND,
// chorusrun --bind-to). Discovered with hwloc when Chorus is built with it
// (-Dhwloc=auto), otherwise from sched_getaffinity and /sys.
//
// plan_binding() is pure: the Communicator and chorusrun make the same plan
// from the same topology, and the unit tests check it on made-up machines.

#include <sys/types.h>

#include <cstddef>
#include <string>
#include <vector>

namespace chorus::topo {

struct Core {
  std::vector<int> pus;  // logical CPUs (OS numbers) of this core that the process may use, sorted
  int numa = 0;          // index into Topology::numa_nodes
};

struct NumaNode {
  int os_index = 0;        // the kernel's node number
  std::vector<int> cores;  // indices into Topology::cores, in order
};

struct Topology {
  std::vector<int> cpus;             // every usable logical CPU (the affinity mask), sorted
  std::vector<Core> cores;           // cores with at least one usable CPU, in hardware order
  std::vector<NumaNode> numa_nodes;  // nodes with at least one usable core
  std::string source;                // "hwloc" or "sysfs"
};

// The topology seen by the calling thread: hwloc when built with it (falling
// back to sysfs if hwloc fails), sysfs otherwise. Never throws; at worst every
// usable CPU is its own core on one NUMA node.
Topology discover();
// Without hwloc: sched_getaffinity, /sys/devices/system/cpu/cpu*/topology and
// /sys/devices/system/node/node*/cpulist.
Topology discover_sysfs();
// "2 NUMA nodes, 8 cores, 16 CPUs (0-15) [hwloc]".
std::string describe(const Topology& t);

// Where each local rank runs. cpus[i] is rank i's CPU set; empty = not bound.
struct Plan {
  std::vector<std::vector<int>> cpus;
  std::string reason;  // when nothing is bound: why (empty when bound)
  bool bound() const { return !cpus.empty() && !cpus.front().empty(); }
};

// spec:
//   "none"  no binding.
//   "auto"  when 2 <= local_size <= cores: rank i gets a core of its own (all of
//           its usable hardware threads), cores taken round-robin over NUMA
//           nodes (node0 core0, node1 core0, node0 core1, ...). One local rank
//           is left unbound (it has the host to itself, and threads it starts
//           later would inherit a single core), and more ranks than cores is
//           left unbound: never two ranks on one core.
//   "core"  as auto, but a single local rank is bound too (chorusrun --bind-to core).
//   list    "0,2,4-7": one CPU per local rank, in local-rank order (a range
//           stands for its CPUs one by one: ranks 2..5 get 4, 5, 6, 7 here), or
//           "0-3;4-7": ';'-separated CPU sets, one per local rank. Entries past
//           local_size are unused.
// "" means auto. Throws Error(InvalidArgument) for an unknown or malformed
// spec, local_size < 1, a list with fewer entries than local ranks, a CPU the
// process may not use, or a CPU named twice.
Plan plan_binding(const Topology& t, int local_size, const std::string& spec);

// Parses a Linux cpulist ("0-3,8,10-11") into sorted, distinct CPU numbers.
// Throws Error(InvalidArgument) naming `what` when malformed or a CPU repeats.
std::vector<int> parse_cpu_list(const std::string& text, const std::string& what);
// The inverse: {0,1,2,3,8} -> "0-3,8".
std::string format_cpu_list(const std::vector<int>& cpus);
// "CPUs 0,8 (core 0, NUMA node 0)"; "not bound" for an empty set.
std::string describe_binding(const Topology& t, const std::vector<int>& cpus);

// The host's last-level cache in bytes: the size of the highest-level data
// or unified cache times the number of its instances (distinct
// shared_cpu_list values), read from <cpu_root>/cpu*/cache/index*/. 0 when
// the kernel does not say. (glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) reads
// CPUID, which a hypervisor may fill with the physical host's figure: 64
// MiB on a VM whose kernel reports 8.)
std::size_t last_level_cache_bytes(const std::string& cpu_root = "/sys/devices/system/cpu");

// An affinity mask built ahead of time, so that applying it is a single
// system call: safe between fork() and exec().
class CpuMask {
 public:
  explicit CpuMask(const std::vector<int>& cpus);
  ~CpuMask();
  CpuMask(const CpuMask&) = delete;
  CpuMask& operator=(const CpuMask&) = delete;
  // sched_setaffinity(tid, ...): 0 = the calling thread. Returns 0 or an errno
  // value. Async-signal-safe.
  int apply(pid_t tid = 0) const noexcept;

 private:
  void* set_ = nullptr;  // cpu_set_t from CPU_ALLOC
  std::size_t bytes_ = 0;
};

// Binds the calling thread (and so the threads it starts later) to `cpus`.
// Throws Error(System) when the kernel refuses.
void apply_binding(const std::vector<int>& cpus);

// What a communicator does at creation: plans with the topology this thread
// sees and binds the calling thread to the CPUs of local rank `local_rank`.
// Only the first communicator a thread creates binds it (split() and later
// communicators keep that binding: re-planning for a subgroup would put two
// ranks on one core). "none" does nothing. A failure to bind under auto is a
// warning; under an explicit list it throws. Logs the outcome at
// CHORUS_DEBUG=info. Returns a description of it.
std::string bind_local_rank(int local_rank, int local_size, const std::string& spec);

}  // namespace chorus::topo
