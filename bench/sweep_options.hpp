// The nccl-tests options every Chorus benchmark shares (-b -e -i -f -n -w -c),
// for chorus-bench and the peer benches of bench/compare, so that one line
// of options times the same sizes the same way everywhere.
#pragma once

#include "cli/cli.hpp"

namespace chorus::bench {

// `Options` has the fields minbytes, maxbytes, stepbytes (strings with K/M/G
// suffixes), stepfactor, iters, warmup_iters and check (ints).
template <class Options>
void add_sweep_options(cli::Parser& app, Options& opt) {
  app.add("-b,--minbytes", opt.minbytes, "Smallest size in bytes (K/M/G suffixes)").show_default();
  app.add("-e,--maxbytes", opt.maxbytes, "Largest size in bytes (K/M/G suffixes)").show_default();
  app.add("-i,--stepbytes", opt.stepbytes,
          "Add this many bytes between sizes (used when the factor is 1)")
      .show_default();
  app.add("-f,--stepfactor", opt.stepfactor, "Multiply the size by this between sizes")
      .show_default()
      .positive();
  app.add("-n,--iters", opt.iters, "Timed iterations per size").show_default().positive();
  app.add("-w,--warmup_iters", opt.warmup_iters, "Untimed iterations before timing")
      .show_default()
      .non_negative();
  app.add("-c,--check", opt.check, "Checked iterations per size (0: no verification)")
      .show_default()
      .non_negative();
}

// nccl-tests semantics: -i matters only with a factor of 1. Giving -i alone
// asks for additive steps, so the default factor then yields to it.
template <class Options>
void settle_step(const cli::Parser& app, Options& opt) {
  if (app.get("--stepbytes").count() > 0 && app.get("--stepfactor").count() == 0)
    opt.stepfactor = 1;
}

}  // namespace chorus::bench
