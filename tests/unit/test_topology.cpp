// Topology discovery and CPU binding plans (src/core/topology). The plans are
// checked on made-up machines with the expected CPU sets written out by hand;
// the discovered topology of this machine is checked for consistency with the
// affinity mask, and a Communicator is checked to bind as CHORUS_CPU_BIND says.

#include <chorus/communicator.hpp>
#include <chorus/store.hpp>

#include "core/topology.hpp"

#include <gtest/gtest.h>

#include <sched.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

using chorus::ErrorCode;
using chorus::topo::Plan;
using chorus::topo::Topology;
using chorus::topo::plan_binding;
using Sets = std::vector<std::vector<int>>;

// Builds a topology from cores given as PU lists, grouped by NUMA node.
Topology make_topology(const std::vector<Sets>& nodes) {
  Topology t;
  t.source = "test";
  for (std::size_t n = 0; n < nodes.size(); ++n) {
    chorus::topo::NumaNode node;
    node.os_index = static_cast<int>(n);
    for (const auto& pus : nodes[n]) {
      node.cores.push_back(static_cast<int>(t.cores.size()));
      t.cores.push_back({pus, static_cast<int>(n)});
      t.cpus.insert(t.cpus.end(), pus.begin(), pus.end());
    }
    t.numa_nodes.push_back(node);
  }
  std::sort(t.cpus.begin(), t.cpus.end());
  return t;
}

// 1 NUMA node, 2 cores, no SMT: CPUs 0 and 1.
Topology one_node_two_cores() { return make_topology({{{0}, {1}}}); }

// 2 NUMA nodes x 4 cores x SMT 2, numbered as Linux does on such machines:
// node 0 has cores {0,8} {1,9} {2,10} {3,11}, node 1 has {4,12} {5,13} {6,14} {7,15}.
Topology two_nodes_smt() {
  return make_topology({{{0, 8}, {1, 9}, {2, 10}, {3, 11}}, {{4, 12}, {5, 13}, {6, 14}, {7, 15}}});
}

// Runs f and returns the chorus::Error it throws (or fails the test).
chorus::Error error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const chorus::Error& e) {
    return e;
  }
  ADD_FAILURE() << "no chorus::Error thrown";
  return chorus::Error(ErrorCode::Internal, "none thrown");
}

void expect_invalid(const Topology& t, int local_size, const std::string& spec,
                    const std::string& message_part) {
  const chorus::Error e = error_of([&] { plan_binding(t, local_size, spec); });
  EXPECT_EQ(e.code(), ErrorCode::InvalidArgument) << spec << ": " << e.what();
  EXPECT_NE(e.message().find(message_part), std::string::npos)
      << "spec \"" << spec << "\": message \"" << e.message() << "\" lacks \"" << message_part << "\"";
}

std::vector<int> thread_affinity() {
  cpu_set_t set;
  CPU_ZERO(&set);
  EXPECT_EQ(sched_getaffinity(0, sizeof set, &set), 0);
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  return cpus;
}

// ---- plan_binding on made-up machines ----------------------------------------

TEST(PlanBinding, NoneNeverBinds) {
  const Plan p = plan_binding(two_nodes_smt(), 4, "none");
  EXPECT_FALSE(p.bound());
  EXPECT_TRUE(p.cpus.empty());
  EXPECT_FALSE(p.reason.empty());
}

TEST(PlanBinding, AutoOneNodeTwoCores) {
  const Topology t = one_node_two_cores();
  EXPECT_EQ(plan_binding(t, 2, "auto").cpus, (Sets{{0}, {1}}));
  EXPECT_EQ(plan_binding(t, 2, "").cpus, (Sets{{0}, {1}}));  // empty = auto
  EXPECT_EQ(plan_binding(t, 2, "core").cpus, (Sets{{0}, {1}}));
}

TEST(PlanBinding, AutoLeavesASingleRankUnboundButCoreBindsIt) {
  const Topology t = one_node_two_cores();
  const Plan a = plan_binding(t, 1, "auto");
  EXPECT_FALSE(a.bound());
  EXPECT_NE(a.reason.find("single rank"), std::string::npos) << a.reason;
  EXPECT_EQ(plan_binding(t, 1, "core").cpus, (Sets{{0}}));
}

TEST(PlanBinding, AutoRoundRobinOverNumaNodesWithWholeCores) {
  const Topology t = two_nodes_smt();
  EXPECT_EQ(plan_binding(t, 2, "auto").cpus, (Sets{{0, 8}, {4, 12}}));
  EXPECT_EQ(plan_binding(t, 4, "auto").cpus, (Sets{{0, 8}, {4, 12}, {1, 9}, {5, 13}}));
  EXPECT_EQ(plan_binding(t, 5, "auto").cpus, (Sets{{0, 8}, {4, 12}, {1, 9}, {5, 13}, {2, 10}}));
  EXPECT_EQ(plan_binding(t, 8, "auto").cpus,
            (Sets{{0, 8}, {4, 12}, {1, 9}, {5, 13}, {2, 10}, {6, 14}, {3, 11}, {7, 15}}));
}

TEST(PlanBinding, AutoUnevenNodesSkipExhaustedOnes) {
  // Node 0: three cores (CPUs 0, 1, 2); node 1: one core (CPU 3).
  const Topology t = make_topology({{{0}, {1}, {2}}, {{3}}});
  EXPECT_EQ(plan_binding(t, 4, "auto").cpus, (Sets{{0}, {3}, {1}, {2}}));
  EXPECT_EQ(plan_binding(t, 3, "auto").cpus, (Sets{{0}, {3}, {1}}));
}

TEST(PlanBinding, MoreRanksThanCoresBindsNothing) {
  const Plan small = plan_binding(one_node_two_cores(), 3, "auto");
  EXPECT_FALSE(small.bound());
  EXPECT_TRUE(small.cpus.empty());
  EXPECT_NE(small.reason.find("3 ranks"), std::string::npos) << small.reason;
  EXPECT_NE(small.reason.find("2 cores"), std::string::npos) << small.reason;
  // 16 hardware threads but 8 cores: 9 ranks would put two on one core.
  const Plan smt = plan_binding(two_nodes_smt(), 9, "auto");
  EXPECT_FALSE(smt.bound());
  EXPECT_NE(smt.reason.find("8 cores"), std::string::npos) << smt.reason;
  EXPECT_FALSE(plan_binding(two_nodes_smt(), 9, "core").bound());
}

TEST(PlanBinding, ListOneCpuPerRankInOrder) {
  EXPECT_EQ(plan_binding(one_node_two_cores(), 2, "1,0").cpus, (Sets{{1}, {0}}));
  EXPECT_EQ(plan_binding(one_node_two_cores(), 2, " 0 , 1 ").cpus, (Sets{{0}, {1}}));
  const Topology t = two_nodes_smt();
  // A range stands for its CPUs one by one.
  EXPECT_EQ(plan_binding(t, 6, "0,2,4-7").cpus, (Sets{{0}, {2}, {4}, {5}, {6}, {7}}));
  // Entries past the local size are unused.
  EXPECT_EQ(plan_binding(t, 3, "0,2,4-7").cpus, (Sets{{0}, {2}, {4}}));
  EXPECT_EQ(plan_binding(t, 1, "12").cpus, (Sets{{12}}));
}

TEST(PlanBinding, ListOfSetsSeparatedBySemicolons) {
  const Topology t = two_nodes_smt();
  EXPECT_EQ(plan_binding(t, 2, "0,8;4,12").cpus, (Sets{{0, 8}, {4, 12}}));
  EXPECT_EQ(plan_binding(t, 2, "0-3;4-7").cpus, (Sets{{0, 1, 2, 3}, {4, 5, 6, 7}}));
  EXPECT_EQ(plan_binding(t, 3, "9,1;5;15").cpus, (Sets{{1, 9}, {5}, {15}}));
}

TEST(PlanBinding, ListErrors) {
  const Topology two = one_node_two_cores();
  const Topology big = two_nodes_smt();
  // Too short.
  expect_invalid(two, 2, "0", "the list has 1");
  expect_invalid(big, 3, "0,8;4,12", "the list has 2");
  // One CPU twice: across ranks, within a set, or through overlapping ranges.
  expect_invalid(two, 2, "0,0", "CPU 0 is named twice");
  expect_invalid(big, 3, "0-2,1", "CPU 1 is named twice");
  expect_invalid(big, 2, "0,1;1,2", "CPU 1 is named twice");
  expect_invalid(big, 1, "3,3;4", "CPU 3 is named twice");
  // Not usable by this process.
  expect_invalid(two, 2, "0,5", "CPU 5 is not available");
  expect_invalid(big, 1, "16", "CPU 16 is not available");
  // Malformed.
  expect_invalid(two, 2, "0,,1", "empty entry");
  expect_invalid(two, 1, "a", "expected auto, core, none or a CPU list");
  expect_invalid(two, 1, "Auto", "expected auto, core, none or a CPU list");
  expect_invalid(two, 1, "0x1", "expected auto, core, none or a CPU list");
  expect_invalid(two, 1, "1-", "is not a CPU number");
  expect_invalid(two, 1, "-1", "is not a CPU number");
  expect_invalid(two, 1, "1 0", "is not a CPU number");
  expect_invalid(two, 2, "1-0", "runs backwards");
  expect_invalid(two, 1, "0;", "empty CPU list");
  expect_invalid(two, 1, "99999999", "out of range");
  // A bad local size.
  expect_invalid(two, 0, "auto", "local size 0");
}

TEST(CpuList, ParseAndFormat) {
  EXPECT_EQ(chorus::topo::parse_cpu_list("0-3,8", "t"), (std::vector<int>{0, 1, 2, 3, 8}));
  EXPECT_EQ(chorus::topo::parse_cpu_list("9,2", "t"), (std::vector<int>{2, 9}));
  EXPECT_EQ(chorus::topo::format_cpu_list({0, 1, 2, 3, 8, 10, 11}), "0-3,8,10,11");
  EXPECT_EQ(chorus::topo::format_cpu_list({5, 0, 1}), "0,1,5");
  EXPECT_EQ(chorus::topo::format_cpu_list({}), "");
  EXPECT_EQ(error_of([] { chorus::topo::parse_cpu_list("1,1", "t"); }).code(),
            ErrorCode::InvalidArgument);
}

TEST(CpuList, DescribeBinding) {
  const Topology t = two_nodes_smt();
  EXPECT_EQ(chorus::topo::describe_binding(t, {4, 12}), "CPUs 4,12 (core 4, NUMA node 1)");
  EXPECT_EQ(chorus::topo::describe_binding(t, {1}), "CPU 1 (core 1, NUMA node 0)");
  EXPECT_EQ(chorus::topo::describe_binding(t, {0, 1, 2, 3, 4}),
            "CPUs 0-4 (cores 0-4, NUMA nodes 0,1)");
  EXPECT_EQ(chorus::topo::describe_binding(t, {}), "not bound");
  EXPECT_EQ(chorus::topo::describe(t), "2 NUMA nodes, 8 cores, 16 CPUs (0-15) [test]");
}

// ---- this machine --------------------------------------------------------------

void expect_consistent(const Topology& t, const std::vector<int>& mask) {
  SCOPED_TRACE(chorus::topo::describe(t));
  EXPECT_FALSE(t.cores.empty());
  EXPECT_FALSE(t.numa_nodes.empty());
  EXPECT_EQ(t.cpus, mask);
  const std::set<int> allowed(mask.begin(), mask.end());
  // Every PU is in the mask and in exactly one core.
  std::map<int, int> owner;
  for (std::size_t i = 0; i < t.cores.size(); ++i) {
    EXPECT_FALSE(t.cores[i].pus.empty()) << "core " << i;
    for (int pu : t.cores[i].pus) {
      EXPECT_TRUE(allowed.count(pu)) << "core " << i << " has CPU " << pu << " outside the mask";
      EXPECT_TRUE(owner.emplace(pu, static_cast<int>(i)).second) << "CPU " << pu << " in two cores";
    }
  }
  EXPECT_EQ(owner.size(), mask.size()) << "some CPU of the mask is in no core";
  // Every core is in exactly one node, the one it names.
  std::vector<int> seen(t.cores.size(), 0);
  for (std::size_t n = 0; n < t.numa_nodes.size(); ++n) {
    EXPECT_FALSE(t.numa_nodes[n].cores.empty()) << "node " << n;
    for (int c : t.numa_nodes[n].cores) {
      ASSERT_GE(c, 0);
      ASSERT_LT(static_cast<std::size_t>(c), t.cores.size());
      ++seen[static_cast<std::size_t>(c)];
      EXPECT_EQ(t.cores[static_cast<std::size_t>(c)].numa, static_cast<int>(n));
    }
  }
  for (std::size_t i = 0; i < seen.size(); ++i) EXPECT_EQ(seen[i], 1) << "core " << i;
  // auto on all cores gives each rank a distinct, whole core.
  if (t.cores.size() >= 2) {
    const Plan p = plan_binding(t, static_cast<int>(t.cores.size()), "auto");
    ASSERT_TRUE(p.bound()) << p.reason;
    std::set<int> used;
    for (const auto& s : p.cpus)
      for (int c : s) EXPECT_TRUE(used.insert(c).second) << "CPU " << c << " given twice";
    EXPECT_EQ(used.size(), mask.size());
  }
}

TEST(Discover, ThisMachineIsConsistent) {
  const std::vector<int> mask = thread_affinity();
  ASSERT_FALSE(mask.empty());
  const Topology t = chorus::topo::discover();
  EXPECT_TRUE(t.source == "hwloc" || t.source == "sysfs") << t.source;
  expect_consistent(t, mask);
  std::printf("discovered: %s\n", chorus::topo::describe(t).c_str());
}

TEST(Discover, SysfsFallbackIsConsistent) {
  const std::vector<int> mask = thread_affinity();
  const Topology t = chorus::topo::discover_sysfs();
  EXPECT_EQ(t.source, "sysfs");
  expect_consistent(t, mask);
}

TEST(Discover, RespectsANarrowedAffinityMask) {
  const std::vector<int> mask = thread_affinity();
  if (mask.size() < 2) GTEST_SKIP() << "needs 2 usable CPUs";
  // In a thread of its own, so that the test process keeps its mask.
  std::thread([&] {
    chorus::topo::apply_binding({mask[1]});
    EXPECT_EQ(thread_affinity(), (std::vector<int>{mask[1]}));
    for (const Topology& t : {chorus::topo::discover(), chorus::topo::discover_sysfs()}) {
      EXPECT_EQ(t.cpus, (std::vector<int>{mask[1]})) << t.source;
      ASSERT_EQ(t.cores.size(), 1u) << t.source;
      EXPECT_EQ(t.cores[0].pus, (std::vector<int>{mask[1]})) << t.source;
    }
  }).join();
}

TEST(ApplyBinding, KernelRefusalIsASystemError) {
  std::thread([] {
    // No such CPU: the kernel refuses an empty effective mask.
    EXPECT_EQ(chorus::topo::CpuMask({60000}).apply(), EINVAL);
    EXPECT_EQ(error_of([] { chorus::topo::apply_binding({60000}); }).code(), ErrorCode::System);
  }).join();
}

TEST(BindLocalRank, OnlyTheFirstDecisionOfAThreadCounts) {
  const std::vector<int> mask = thread_affinity();
  std::thread([&] {
    EXPECT_EQ(chorus::topo::bind_local_rank(0, 2, "none"), "not bound (none)");
    EXPECT_EQ(thread_affinity(), mask);
    const std::string spec = std::to_string(mask.back());
    EXPECT_EQ(chorus::topo::bind_local_rank(0, 1, spec).rfind("bound to CPU " + spec, 0), 0u);
    EXPECT_EQ(thread_affinity(), (std::vector<int>{mask.back()}));
    // A later communicator of this thread (a split) keeps the binding.
    EXPECT_NE(chorus::topo::bind_local_rank(0, 1, std::to_string(mask.front())).find("unchanged"),
              std::string::npos);
    EXPECT_EQ(thread_affinity(), (std::vector<int>{mask.back()}));
  }).join();
  std::thread([&] {
    // A malformed list is an error, and leaves the thread as it was.
    EXPECT_EQ(error_of([] { chorus::topo::bind_local_rank(0, 2, "0"); }).code(),
              ErrorCode::InvalidArgument);
    EXPECT_EQ(thread_affinity(), mask);
  }).join();
}

// ---- the last-level cache ---------------------------------------------------------

// Writes a fake /sys/devices/system/cpu tree: for each CPU, its caches as
// (level, type, size text, shared_cpu_list).
struct FakeCpuRoot {
  std::filesystem::path root;
  FakeCpuRoot() {
    char tmpl[] = "/tmp/chorus-llc-XXXXXX";
    root = mkdtemp(tmpl) != nullptr ? tmpl : "";
  }
  ~FakeCpuRoot() {
    std::error_code ec;
    if (!root.empty()) std::filesystem::remove_all(root, ec);
  }
  struct Cache {
    int level;
    std::string type, size, shared;
  };
  void cpu(int n, const std::vector<Cache>& caches) {
    for (std::size_t i = 0; i < caches.size(); ++i) {
      const auto dir = root / ("cpu" + std::to_string(n)) / "cache" / ("index" + std::to_string(i));
      std::filesystem::create_directories(dir);
      auto put = [&](const char* name, const std::string& text) {
        std::ofstream(dir / name) << text << "\n";
      };
      put("level", std::to_string(caches[i].level));
      put("type", caches[i].type);
      put("size", caches[i].size);
      if (!caches[i].shared.empty()) put("shared_cpu_list", caches[i].shared);
    }
  }
};

TEST(LastLevelCache, OneSharedL3IsCountedOnce) {
  FakeCpuRoot fake;
  ASSERT_FALSE(fake.root.empty());
  for (int c = 0; c < 2; ++c)
    fake.cpu(c, {{1, "Data", "32K", std::to_string(c)},
                 {1, "Instruction", "32K", std::to_string(c)},
                 {2, "Unified", "512K", std::to_string(c)},
                 {3, "Unified", "8192K", "0-1"}});
  EXPECT_EQ(chorus::topo::last_level_cache_bytes(fake.root.string()), std::size_t{8} << 20);
}

TEST(LastLevelCache, InstancesAddUpAndTheHighestLevelWins) {
  FakeCpuRoot fake;
  ASSERT_FALSE(fake.root.empty());
  // Two L3 slices of 16 MiB (CPUs 0-1 and 2-3); an L2 per CPU is not the last level.
  for (int c = 0; c < 4; ++c)
    fake.cpu(c, {{2, "Unified", "1024K", std::to_string(c)}, {3, "Unified", "16M", c < 2 ? "0-1" : "2-3"}});
  EXPECT_EQ(chorus::topo::last_level_cache_bytes(fake.root.string()), std::size_t{32} << 20);
}

TEST(LastLevelCache, UnknownIsZero) {
  FakeCpuRoot fake;
  ASSERT_FALSE(fake.root.empty());
  EXPECT_EQ(chorus::topo::last_level_cache_bytes(fake.root.string()), 0u);
  EXPECT_EQ(chorus::topo::last_level_cache_bytes((fake.root / "missing").string()), 0u);
  // Only instruction caches, or sizes that do not parse: unknown too.
  fake.cpu(0, {{1, "Instruction", "32K", "0"}, {2, "Unified", "big", "0"}});
  EXPECT_EQ(chorus::topo::last_level_cache_bytes(fake.root.string()), 0u);
}

TEST(LastLevelCache, ThisMachineReportsOneOrSaysUnknown) {
  // Whatever the kernel says: either nothing, or at least one cache line.
  const std::size_t llc = chorus::topo::last_level_cache_bytes();
  if (llc == 0) GTEST_SKIP() << "the kernel reports no cache sizes here";
  EXPECT_GE(llc, 64u);
}

// ---- a Communicator binds at creation -------------------------------------------

// Forks `n` ranks that each create a Communicator on a FileStore with
// CHORUS_CPU_BIND=spec and report their affinity mask afterwards (as a cpulist
// through a pipe). Returns one mask per rank ("error: ..." on failure).
std::vector<std::string> masks_after_create(int n, const std::string& spec) {
  char tmpl[] = "/tmp/chorus-topo-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return {"error: mkdtemp"};
  const std::string dir = tmpl;
  std::vector<std::string> out;
  std::vector<std::pair<pid_t, int>> children;
  std::fflush(nullptr);
  for (int r = 0; r < n; ++r) {
    int fds[2];
    if (pipe(fds) != 0) return {"error: pipe"};
    const pid_t pid = fork();
    if (pid == 0) {
      close(fds[0]);
      std::string report;
      try {
        setenv("CHORUS_CPU_BIND", spec.c_str(), 1);
        chorus::Config cfg;
        cfg.timeout = std::chrono::seconds(60);
        auto comm = chorus::Communicator::create(r, n, std::make_shared<chorus::FileStore>(dir), cfg);
        report = chorus::topo::format_cpu_list(thread_affinity());
        comm.barrier();
      } catch (const std::exception& e) {
        report = std::string("error: ") + e.what();
      }
      [[maybe_unused]] const ssize_t w = write(fds[1], report.data(), report.size());
      close(fds[1]);
      _exit(0);
    }
    close(fds[1]);
    children.emplace_back(pid, fds[0]);
  }
  for (auto [pid, fd] : children) {
    std::string report;
    char buf[4096];
    ssize_t got;
    while ((got = read(fd, buf, sizeof buf)) > 0) report.append(buf, static_cast<std::size_t>(got));
    close(fd);
    waitpid(pid, nullptr, 0);
    out.push_back(report);
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return out;
}

TEST(CommunicatorBinding, ExplicitListBindsTheRank) {
  const std::vector<int> mask = thread_affinity();
  const std::string last = std::to_string(mask.back());
  EXPECT_EQ(masks_after_create(1, last), (std::vector<std::string>{last}));
  // none leaves the mask alone; auto leaves a single rank alone.
  const std::string all = chorus::topo::format_cpu_list(mask);
  EXPECT_EQ(masks_after_create(1, "none"), (std::vector<std::string>{all}));
  EXPECT_EQ(masks_after_create(1, "auto"), (std::vector<std::string>{all}));
}

TEST(CommunicatorBinding, AutoGivesEachLocalRankItsOwnCore) {
  const Topology t = chorus::topo::discover();
  if (t.cores.size() < 2) GTEST_SKIP() << "needs 2 usable cores: " << chorus::topo::describe(t);
  const auto masks = masks_after_create(2, "auto");
  ASSERT_EQ(masks.size(), 2u);
  // Round-robin over NUMA nodes: the first core of the first two nodes, or
  // the first two cores of the only node.
  const std::vector<int>& first = t.cores[static_cast<std::size_t>(t.numa_nodes[0].cores[0])].pus;
  const std::vector<int>& second =
      t.numa_nodes.size() > 1 ? t.cores[static_cast<std::size_t>(t.numa_nodes[1].cores[0])].pus
                              : t.cores[static_cast<std::size_t>(t.numa_nodes[0].cores[1])].pus;
  EXPECT_EQ(masks[0], chorus::topo::format_cpu_list(first));
  EXPECT_EQ(masks[1], chorus::topo::format_cpu_list(second));
  EXPECT_NE(masks[0], masks[1]);
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
