#pragma once

// The selector: for each call, estimate every eligible algorithm's time with
// the alpha-beta model and take the cheapest, unless CHORUS_ALGO or the call
// forces one. Its inputs (layout, model, overrides) are fixed when the
// communicator is created and identical on every rank (the communicator
// agrees on them through the store), so every rank picks the same algorithm
// for the same call; nothing is measured at call time.

#include "algorithms/algorithms.hpp"

#include <map>
#include <mutex>
#include <array>
#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace chorus::algo {

// CHORUS_ALGO: "allreduce:ring,broadcast:binomial". Throws InvalidArgument
// naming `what` (the variable) for unknown collectives or algorithms.
std::map<Coll, std::string> parse_algo_overrides(const std::string& text, const char* what);
// Collective names as CHORUS_ALGO spells them ("allreduce", "reduce_scatter", ...).
const char* coll_key(Coll c);

// Model <-> tuning file text ("key = value" lines, '#' comments):
//   local.alpha_us, local.gbps, net.alpha_us, net.gbps, reduce_gbps, and
//   fit.<collective>.<algorithm> = <latency scale> <bandwidth scale>.
std::string model_to_text(const Model& m);
// Fills the keys present in `text` over `base`. Throws InvalidArgument naming
// `what` (the file) for unknown keys or malformed values.
Model model_from_text(const std::string& text, Model base, const std::string& what);

// An algorithm's estimated time for a call: its cost under `model`,
// corrected by the model's fit for it when calibration measured one.
double estimate(const Algorithm& a, const Layout& layout, const Model& model, const Call& call);

class Selector {
 public:
  Selector() = default;
  Selector(Layout layout, Model model, std::map<Coll, std::string> forced);

  struct Estimate {
    const Algorithm* algo = nullptr;
    double us = 0;         // estimated time (valid when eligible)
    std::string excluded;  // why it cannot run this call (empty: eligible)
  };
  // Every algorithm of call.coll with its estimate or the reason it is excluded.
  std::vector<Estimate> estimates(const Call& call) const;
  // The algorithm to run: `per_call` (CallOptions::algorithm) if set, else
  // CHORUS_ALGO's entry for the collective, else the cheapest eligible one.
  // A forced algorithm that cannot run the call throws InvalidArgument with
  // the reason. Logs each distinct (collective, size bucket, forced) decision
  // once at CHORUS_DEBUG=info.
  const Algorithm& choose(const Call& call, const std::string& per_call = {});
  // 1 + the algorithm's position among its collective's algorithms: carried
  // in every message so that ranks running different algorithms for one call
  // fail with InvalidUsage instead of exchanging garbage.
  static std::uint8_t wire_id(const Algorithm& a);

  const Layout& layout() const { return layout_; }
  const Model& model() const { return model_; }

 private:
  Layout layout_;
  Model model_;
  std::map<Coll, std::string> forced_;
  std::mutex mu_;
  std::set<std::tuple<int, int, std::string>> logged_;  // (coll, log2 size bucket, forced name)
  // The cheapest algorithm per call shape already chosen (not forced): the
  // estimates of every algorithm were a quarter of an 8-byte allreduce's
  // CPU time. The inputs never change, so neither does the answer. A
  // direct-mapped table (a shape evicts the one at its index): a hash
  // map's modulo by a prime was a 64-bit division on every call.
  struct Memo {
    Call call;
    const Algorithm* pick = nullptr;
  };
  static constexpr std::size_t kMemoSlots = 512;  // a power of two
  static std::size_t memo_index(const Call& c) noexcept;
  std::array<Memo, kMemoSlots> memo_{};  // under mu_
  // Tells this selector from every other one of the process (never reused):
  // each thread keeps its last answer, keyed by it, and asks without a lock.
  static std::uint64_t next_serial();
  const std::uint64_t serial_ = next_serial();
};

}  // namespace chorus::algo
