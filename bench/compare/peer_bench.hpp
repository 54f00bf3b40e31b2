#pragma once

// Shared part of the peer benchmarks (gloo_bench, mpi_bench): the same
// command line, sizes, timing and nccl-tests table as chorus-bench, so that
// bench/compare/compare reads every program's rows the same way.
//
// Only float32 is measured (sum for allreduce): the peers are compared on
// what every one of them implements. A peer library plugs in through Comm.

#include "cli/cli.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace chorus_peer {

enum class Coll { Allreduce, Broadcast, Allgather };

struct Options {
  std::string minbytes = "8";
  std::string maxbytes = "32M";
  std::string stepbytes = "1M";
  int stepfactor = 2;
  int iters = 20;
  int warmup_iters = 5;
  int check = 1;
  std::string datatype = "float";
  std::string op = "sum";
  int root = 0;
  std::vector<std::string> colls{"allreduce"};
  std::string json;
};

// One call, set up for one (collective, size, mode) before it is timed.
struct Prepared {
  std::function<void()> call;
  // Where this rank's result is after call() (the receive buffer, except
  // when the library defines the root's output to be its input).
  const float* result = nullptr;
  bool supported = true;  // false: N/A columns (the library has no such form)
};

// What a peer library provides to the common driver.
class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string tool() const = 0;       // "gloo_bench", "mpi_bench"
  virtual std::string version() const = 0;    // the library's version
  virtual std::string transport() const = 0;  // e.g. "tcp", "pml ob1"
  // Builds the call: whatever the library sets up per buffer (options,
  // registrations) happens here, outside the timed loop.
  virtual Prepared prepare(Coll coll, const float* send, float* recv, std::size_t count, int root,
                           bool in_place) = 0;
  virtual void barrier() = 0;
  virtual double max_over_ranks(double v) = 0;
  virtual std::uint64_t sum_over_ranks(std::uint64_t v) = 0;
  virtual std::vector<std::int64_t> allgather_i64(std::int64_t v) = 0;
};

// Adds chorus-bench's options (-b -e -i -f -n -w -c -d -o -r --coll --json).
// Call finish_options() after parsing.
void add_options(chorus::cli::Parser& app, Options& opt);

// Checks the parsed options; throws std::invalid_argument with a message.
struct Plan {
  std::vector<std::size_t> sizes;
  std::vector<Coll> colls;
};
Plan finish_options(chorus::cli::Parser& app, Options& opt);

// Which rank this process is before the library is up (for error messages):
// CHORUS_RANK, OMPI_COMM_WORLD_RANK, PMI_RANK, else 0.
int rank_from_env();

// Runs every table and prints it on rank 0 (to stdout, or stderr with
// --json -); writes the JSON report. Returns the number of wrong elements.
std::uint64_t run(Comm& comm, const Options& opt, const Plan& plan);

}  // namespace chorus_peer
