// The selector and the algorithm descriptors (src/algorithms/): CHORUS_ALGO
// and tuning-file parsing, constraints, the alpha-beta costs against the
// formulas of docs/algorithms.md written out again here, and the choices the
// model implies at the extremes (tiny messages: few steps; huge messages:
// bandwidth-optimal; several hosts: hierarchical).

#include "algorithms/algorithms.hpp"
#include "algorithms/selector.hpp"

#include <chorus/communicator.hpp>
#include <chorus/error.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <string>
#include <vector>

namespace {

using chorus::DataType;
using chorus::Error;
using chorus::ErrorCode;
using chorus::ReduceOp;
using namespace chorus::algo;

Layout one_host(int n, bool shm = true) { return Layout::from_hosts(std::vector<int>(static_cast<std::size_t>(n), 7), shm); }

Layout hosts(std::vector<int> host_of) { return Layout::from_hosts(std::move(host_of), true); }

Model model(double local_alpha, double local_gbps, double net_alpha, double net_gbps, double red) {
  Model m;
  m.local = {local_alpha, local_gbps};
  m.net = {net_alpha, net_gbps};
  m.reduce_gbps = red;
  return m;
}

Call allreduce(std::size_t bytes) { return Call{Coll::Allreduce, bytes / 4, DataType::Float32, ReduceOp::Sum, -1}; }

TEST(Layout, HostsAreNumberedByLowestRankAndCounted) {
  const Layout l = hosts({5, 5, 9, 9, 5});
  EXPECT_EQ(l.hosts, 2);
  EXPECT_EQ(l.max_per_host, 3);
  EXPECT_EQ(l.host_of, (std::vector<int>{0, 0, 1, 1, 0}));
  EXPECT_EQ(l.host_ranks(0), (std::vector<int>{0, 1, 4}));
  EXPECT_FALSE(l.single_host());
  EXPECT_TRUE(one_host(4).single_host());
}

TEST(Registry, EveryCollectiveHasUniqueNamesAndWireIds) {
  std::set<std::pair<int, std::string>> names;
  std::set<std::pair<int, int>> ids;
  for (const Algorithm* a : all_algorithms()) {
    EXPECT_TRUE(names.emplace(static_cast<int>(a->coll), a->name).second) << a->name;
    const int id = Selector::wire_id(*a);
    EXPECT_GE(id, 1) << a->name;
    EXPECT_LE(id, 15) << a->name << ": the wire keeps 4 bits for it";
    EXPECT_TRUE(ids.emplace(static_cast<int>(a->coll), id).second) << a->name;
    EXPECT_EQ(find_algorithm(a->coll, a->name), a);
  }
  EXPECT_EQ(find_algorithm(Coll::Allreduce, "nonsense"), nullptr);
  EXPECT_EQ(find_algorithm(Coll::Broadcast, "rabenseifner"), nullptr);  // an allreduce algorithm
}

TEST(Overrides, ParsesCollectiveAlgorithmPairs) {
  const auto o = parse_algo_overrides(" allreduce:tree , broadcast:binomial,", "CHORUS_ALGO");
  ASSERT_EQ(o.size(), 2u);
  EXPECT_EQ(o.at(Coll::Allreduce), "tree");
  EXPECT_EQ(o.at(Coll::Broadcast), "binomial");
  EXPECT_TRUE(parse_algo_overrides("", "CHORUS_ALGO").empty());
  for (const char* bad : {"allreduce", "allreduce:", "gossip:ring", "allreduce:chain", "broadcast:ring"}) {
    try {
      parse_algo_overrides(bad, "CHORUS_ALGO");
      ADD_FAILURE() << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::InvalidArgument);
      EXPECT_NE(std::string(e.what()).find("CHORUS_ALGO"), std::string::npos) << e.what();
    }
  }
}

TEST(TuningFile, RoundTripsAndRejectsNonsense) {
  const Model m = model(1.5, 9.25, 40, 1.1, 12);
  const Model back = model_from_text(model_to_text(m), Model{}, "t");
  EXPECT_DOUBLE_EQ(back.local.alpha_us, 1.5);
  EXPECT_DOUBLE_EQ(back.local.gbps, 9.25);
  EXPECT_DOUBLE_EQ(back.net.alpha_us, 40);
  EXPECT_DOUBLE_EQ(back.net.gbps, 1.1);
  EXPECT_DOUBLE_EQ(back.reduce_gbps, 12);
  // Keys absent from the file keep the base's values; comments are ignored.
  const Model partial = model_from_text("# calibrated\nlocal.alpha_us = 3 # us\n\n", m, "f.txt");
  EXPECT_DOUBLE_EQ(partial.local.alpha_us, 3);
  EXPECT_DOUBLE_EQ(partial.net.gbps, 1.1);
  EXPECT_EQ(partial.source, "f.txt");
  for (const char* bad : {"local.alpha_us = fast", "local.alpha_us = -1", "speed = 3", "local.gbps 3",
                          "net.gbps = 0", "reduce_gbps = nan"}) {
    try {
      model_from_text(bad, m, "f.txt");
      ADD_FAILURE() << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::InvalidArgument);
      EXPECT_NE(std::string(e.what()).find("f.txt:1"), std::string::npos) << e.what();
    }
  }
}

TEST(TuningFile, FitsScaleTheEstimatePiecewise) {
  const Model m = model_from_text(
      "local.alpha_us = 2\nlocal.gbps = 10\nreduce_gbps = 5\n"
      "fit.allreduce.ring = 0.5 2\nfit.allreduce.tree = 1.5 0.25 4096 3\n",
      Model{}, "t");
  ASSERT_EQ(m.fits.size(), 2u);
  const Layout l = one_host(4);
  const Model raw = model_from_text("", [&] { Model r = m; r.fits.clear(); return r; }(), "raw");
  auto cost = [&](const Algorithm& a, std::size_t bytes) { return a.cost(l, raw, allreduce(bytes)); };
  // ring: 0.5 x cost(1 element) + 2 x (cost(B) - cost(1 element)).
  const double r1 = cost(kRingAllreduce, 4), rb = cost(kRingAllreduce, 1 << 20);
  EXPECT_NEAR(estimate(kRingAllreduce, l, m, allreduce(1 << 20)), 0.5 * r1 + 2 * (rb - r1), 1e-9 * rb);
  // tree: 3 x the bandwidth part up to 4 KiB, 0.25 x beyond it.
  const double t1 = cost(kTreeAllreduce, 4), tm = cost(kTreeAllreduce, 4096), tb = cost(kTreeAllreduce, 1 << 20);
  EXPECT_NEAR(estimate(kTreeAllreduce, l, m, allreduce(1 << 20)),
              1.5 * t1 + 3 * (tm - t1) + 0.25 * (tb - tm), 1e-9 * tb);
  EXPECT_NEAR(estimate(kTreeAllreduce, l, m, allreduce(1024)),
              1.5 * t1 + 3 * (cost(kTreeAllreduce, 1024) - t1), 1e-9 * tm);
  // Two knots: 3 x up to 4 KiB, 0.5 x from there to 64 KiB, 0.25 x beyond.
  const Model m2 = model_from_text("fit.allreduce.tree = 1.5 0.25 4096 3 65536 0.5\n", raw, "t2");
  const double t64 = cost(kTreeAllreduce, 65536);
  EXPECT_NEAR(estimate(kTreeAllreduce, l, m2, allreduce(1 << 20)),
              1.5 * t1 + 3 * (tm - t1) + 0.5 * (t64 - tm) + 0.25 * (tb - t64), 1e-9 * tb);
  EXPECT_NEAR(estimate(kTreeAllreduce, l, m2, allreduce(16384)),
              1.5 * t1 + 3 * (tm - t1) + 0.5 * (cost(kTreeAllreduce, 16384) - tm), 1e-9 * t64);
  // Without a fit the estimate is the formula's.
  EXPECT_DOUBLE_EQ(estimate(kRabenseifnerAllreduce, l, m, allreduce(1 << 20)),
                   cost(kRabenseifnerAllreduce, 1 << 20));
  for (const char* bad : {"fit.allreduce.ring = 0.5", "fit.allreduce.ring = 0.5 2 3",
                          "fit.allreduce.ring = 0.5 -2", "fit.allreduce.quantum = 1 1",
                          "fit.allreduce.ring = 1 x", "fit.gossip.ring = 1 1",
                          "fit.allreduce.ring = 1 1 4096 2 4096 3",   // knots not ascending
                          "fit.allreduce.ring = 1 1 4096 2 1024 3"}) {
    EXPECT_THROW(model_from_text(bad, Model{}, "f"), Error) << bad;
  }
  // Round trip keeps the fits.
  const Model back = model_from_text(model_to_text(m), Model{}, "t");
  ASSERT_EQ(back.fits.at("allreduce.tree").knots.size(), 1u);
  EXPECT_DOUBLE_EQ(back.fits.at("allreduce.tree").knots[0].bytes, 4096);
  EXPECT_DOUBLE_EQ(back.fits.at("allreduce.tree").knots[0].scale, 3);
  const Model back2 = model_from_text(model_to_text(m2), Model{}, "t2");
  ASSERT_EQ(back2.fits.at("allreduce.tree").knots.size(), 2u);
  EXPECT_DOUBLE_EQ(back2.fits.at("allreduce.tree").knots[1].bytes, 65536);
  EXPECT_DOUBLE_EQ(back2.fits.at("allreduce.tree").knots[1].scale, 0.5);
  EXPECT_DOUBLE_EQ(back.fits.at("allreduce.ring").bw, 2);
}

TEST(Costs, RingAllreduceMatchesTheFormula) {
  const Model m = model(2, 10, 30, 1, 5);
  for (int n : {2, 3, 8}) {
    for (std::size_t bytes : {std::size_t{8}, std::size_t{1} << 20}) {
      const double b = static_cast<double>(bytes), f = (n - 1.0) / n;
      // 2(n-1) alpha + 2 (n-1)/n B / bw + (n-1)/n B / reduce rate, in us (GB/s = 1e3 B/us).
      const double local = 2 * (n - 1) * 2.0 + 2 * f * b / 10e3 + f * b / 5e3;
      EXPECT_NEAR(kRingAllreduce.cost(one_host(n), m, allreduce(bytes)), local, 1e-9 * local);
      std::vector<int> two_hosts(static_cast<std::size_t>(n));
      for (int r = 0; r < n; ++r) two_hosts[static_cast<std::size_t>(r)] = r % 2;
      const double net = 2 * (n - 1) * 30.0 + 2 * f * b / 1e3 + f * b / 5e3;
      EXPECT_NEAR(kRingAllreduce.cost(hosts(two_hosts), m, allreduce(bytes)), net, 1e-9 * net);
    }
  }
}

TEST(Costs, EveryEligibleAlgorithmHasAFiniteCostGrowingWithSize) {
  const Model m = model(1, 9, 30, 1.2, 10);
  const Layout layouts[] = {one_host(1), one_host(2), one_host(5), one_host(8, false),
                            hosts({0, 0, 1, 1}), hosts({0, 1, 2, 0, 1, 2})};
  for (const Layout& l : layouts) {
    for (const Algorithm* a : all_algorithms()) {
      double prev = -1;
      for (std::size_t bytes = 8; bytes <= (std::size_t{1} << 28); bytes *= 8) {
        Call c{a->coll, bytes / 4, DataType::Float32, ReduceOp::Sum, 0};
        if (!a->constraint(l, c).empty()) continue;
        const double t = a->cost(l, m, c);
        EXPECT_TRUE(std::isfinite(t) && t >= 0) << a->name << " at " << bytes << " B: " << t;
        EXPECT_GE(t, prev) << a->name << " got cheaper with more bytes at " << bytes << " B";
        prev = t;
      }
    }
  }
}

TEST(Constraints, OneShotAndHierarchicalSayWhyNot) {
  const Call tiny = allreduce(64);
  EXPECT_EQ(kOneShotAllreduce.constraint(one_host(4), tiny), "");
  EXPECT_NE(kOneShotAllreduce.constraint(one_host(4, false), tiny), "");  // sockets
  EXPECT_NE(kOneShotAllreduce.constraint(hosts({0, 0, 1, 1}), tiny), "");
  EXPECT_NE(kOneShotAllreduce.constraint(one_host(4), allreduce(1 << 20)).find("64"), std::string::npos);
  EXPECT_NE(kHierarchicalAllreduce.constraint(one_host(4), tiny), "");
  EXPECT_NE(kHierarchicalAllreduce.constraint(hosts({0, 1, 2}), tiny), "");        // one rank per host
  EXPECT_NE(kHierarchicalAllreduce.constraint(hosts({0, 0, 1}), tiny), "");        // unequal hosts
  EXPECT_EQ(kHierarchicalAllreduce.constraint(hosts({0, 0, 1, 1}), tiny), "");
  EXPECT_EQ(kHierarchicalAllreduce.constraint(hosts({0, 1, 0, 1}), tiny), "");    // interleaved ranks
}

TEST(Selector, ForcedAlgorithmOutsideItsConstraintsIsAnError) {
  Selector s(one_host(4, false), Model::defaults_for("tcp", one_host(4, false)), {});
  try {
    s.choose(allreduce(64), "one_shot");
    ADD_FAILURE() << "one_shot over sockets was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find("shared memory"), std::string::npos) << e.what();
  }
  EXPECT_THROW(s.choose(allreduce(64), "bogus"), Error);
  Selector forced(one_host(4), Model{}, {{Coll::Allreduce, "tree"}});
  EXPECT_STREQ(forced.choose(allreduce(64)).name, "tree");
  EXPECT_STREQ(forced.choose(allreduce(64), "ring").name, "ring");  // the call beats the variable
}

TEST(Selector, TinyMessagesTakeFewStepsHugeOnesTakeABandwidthOptimalAlgorithm) {
  // Expensive steps, fast links: at 8 B the 2(n-1) ring steps dominate.
  const Layout l = one_host(8, false);
  Selector s(l, model(20, 10, 20, 10, 10), {});
  const std::string tiny = s.choose(allreduce(8)).name;
  EXPECT_NE(tiny, "ring");
  EXPECT_NE(tiny, "one_shot");  // sockets
  // At 256 MiB per-byte terms dominate: ring or Rabenseifner move 2(n-1)/n B.
  const std::string huge = s.choose(allreduce(std::size_t{1} << 28)).name;
  EXPECT_TRUE(huge == "ring" || huge == "rabenseifner") << huge;
  // The choice is the minimum of the published estimates.
  for (std::size_t bytes = 8; bytes <= (std::size_t{1} << 28); bytes *= 4) {
    const auto est = s.estimates(allreduce(bytes));
    double best = 1e300;
    for (const auto& e : est)
      if (e.excluded.empty()) best = std::min(best, e.us);
    const Algorithm& pick = s.choose(allreduce(bytes));
    EXPECT_DOUBLE_EQ(pick.cost(l, s.model(), allreduce(bytes)), best) << bytes;
  }
}

TEST(Selector, SeveralHostsWithSharedHostsPickHierarchicalForLargeMessages) {
  const Layout l = hosts({0, 0, 1, 1});
  Selector s(l, Model::defaults_for("auto", l), {});
  EXPECT_STREQ(s.choose(allreduce(16 << 20)).name, "hierarchical");
}

// choose() remembers its picks per call shape: a remembered pick must be
// what the estimates give, for every shape field (count, dtype, op, root),
// also past the bound where the memory is cleared; and forcing still wins
// over it and is still checked.
TEST(Selector, RememberedChoicesAreTheCheapestAndForcingStillWins) {
  const Layout l = one_host(8);
  Selector s(l, model(2, 10, 20, 10, 3), {});
  auto cheapest = [&](const Call& c) {
    const Algorithm* best = nullptr;
    double us = 1e300;
    for (const auto& e : s.estimates(c))
      if (e.excluded.empty() && e.us < us) us = e.us, best = e.algo;
    return best;
  };
  std::size_t shapes = 0;
  for (int round = 0; round < 2; ++round)  // the second round answers from memory
    for (Coll coll : {Coll::Allreduce, Coll::Broadcast, Coll::Allgather, Coll::ReduceScatter})
      for (DataType t : {DataType::Int8, DataType::Float64})
        for (int root : {0, 5})
          for (std::size_t count = 1; count <= (std::size_t{1} << 27); count *= 2) {
            const Call c{coll, count, t, ReduceOp::Sum, coll == Coll::Broadcast ? root : -1};
            EXPECT_EQ(&s.choose(c), cheapest(c)) << coll_key(coll) << " " << count << " round " << round;
            shapes += round == 0 ? 1 : 0;
          }
  ASSERT_GT(shapes, 100u);
  // More distinct shapes than its table holds (512): still the cheapest each time.
  for (std::size_t count = 1; count <= 5000; ++count) {
    const Call c{Coll::Allreduce, count * 3, DataType::Float32, ReduceOp::Max, -1};
    if (&s.choose(c) != cheapest(c)) ADD_FAILURE() << "allreduce of " << count * 3 << " floats";
  }
  const Call c = allreduce(64);
  s.choose(c);
  EXPECT_STREQ(s.choose(c, "ring").name, "ring");
  EXPECT_THROW(s.choose(c, "bogus"), Error);
  Selector tcp(one_host(4, false), Model::defaults_for("tcp", one_host(4, false)), {});
  tcp.choose(c);
  EXPECT_THROW(tcp.choose(c, "one_shot"), Error);  // over sockets, remembered shape or not
}

TEST(Selector, SameInputsSameChoicesEverywhere) {
  // Two ranks' selectors built from the agreed inputs: identical picks.
  const Layout l = one_host(5);
  const Model m = model(1.3, 7, 30, 1, 9);
  Selector a(l, m, {}), b(l, m, {});
  for (const Algorithm* alg : all_algorithms())
    for (std::size_t bytes = 0; bytes <= (std::size_t{1} << 26); bytes = bytes ? bytes * 2 : 1) {
      const Call c{alg->coll, bytes, DataType::UInt8, ReduceOp::Max, 1};
      EXPECT_EQ(&a.choose(c), &b.choose(c));
    }
}

// The public names: the calls with a count per rank or pair answer with
// their fixed-count twin's algorithms, which are the ones that run them.
TEST(Selector, PublicAlgorithmNames) {
  using Names = std::vector<std::string>;
  EXPECT_EQ(chorus::algorithm_names("reduce_scatter"), (Names{"ring", "recursive_halving"}));
  EXPECT_EQ(chorus::algorithm_names("reduce_scatterv"), (Names{"ring", "recursive_halving"}));
  EXPECT_EQ(chorus::algorithm_names("allgatherv"), (Names{"ring", "bruck"}));
  EXPECT_EQ(chorus::algorithm_names("alltoallv"), (Names{"pairwise"}));
  EXPECT_TRUE(chorus::algorithm_names("reduce_scatter_v").empty());
  EXPECT_TRUE(chorus::algorithm_names("").empty());
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
