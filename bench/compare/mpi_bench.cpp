// mpi_bench: MPI_Allreduce (float sum), MPI_Bcast and MPI_Allgather timed the
// way chorus-bench times Chorus, printing the same nccl-tests table. Launch it
// with mpirun; which PML/BTL carries the data is mpirun's business, e.g.
//   mpirun -np 2 --mca pml ob1 --mca btl vader,self mpi_bench -b 8 -e 4M -f 4
// bench/compare/compare runs it next to chorus-bench and Gloo.

#include "peer_bench.hpp"

#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

using chorus_peer::Coll;
using chorus_peer::Prepared;

int to_int(std::size_t count) {
  if (count > static_cast<std::size_t>(2147483647))
    throw std::invalid_argument("count exceeds MPI's int");
  return static_cast<int>(count);
}

class MpiComm final : public chorus_peer::Comm {
 public:
  MpiComm() {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string tool() const override { return "mpi_bench"; }

  std::string version() const override {
    char lib[MPI_MAX_LIBRARY_VERSION_STRING] = {};
    int len = 0;
    MPI_Get_library_version(lib, &len);
    std::string v(lib, static_cast<std::size_t>(len));
    const std::size_t cut = v.find_first_of(",\n");  // "Open MPI v4.1.4, package: ..."
    return cut == std::string::npos ? v : v.substr(0, cut);
  }

  std::string transport() const override {
    // What mpirun was told (OMPI_MCA_* reach every rank's environment).
    std::string t;
    for (const char* name : {"OMPI_MCA_pml", "OMPI_MCA_btl"}) {
      if (const char* v = std::getenv(name)) {
        if (!t.empty()) t += ", ";
        t += std::string(name + 9) + " " + v;  // drop "OMPI_MCA_"
      }
    }
    return t.empty() ? "default" : t;
  }

  Prepared prepare(Coll coll, const float* send, float* recv, std::size_t count, int root,
                   bool in_place) override {
    Prepared p;
    p.result = recv;
    const int n = to_int(count);
    switch (coll) {
      case Coll::Allreduce:
        p.call = [=] {
          MPI_Allreduce(in_place ? MPI_IN_PLACE : send, recv, n, MPI_FLOAT, MPI_SUM,
                        MPI_COMM_WORLD);
        };
        break;
      case Coll::Allgather:
        if (in_place) {
          // This rank's block is already at recv + rank * count.
          p.call = [=] {
            MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, recv, n, MPI_FLOAT, MPI_COMM_WORLD);
          };
        } else {
          p.call = [=] { MPI_Allgather(send, n, MPI_FLOAT, recv, n, MPI_FLOAT, MPI_COMM_WORLD); };
        }
        break;
      case Coll::Broadcast:
        // MPI_Bcast has one buffer. Out of place, the root sends from its send
        // buffer (which is then its result) and the others receive into their
        // receive buffers: no copy that MPI would not make.
        if (!in_place && rank_ == root) {
          float* buf = const_cast<float*>(send);
          p.result = send;
          p.call = [=] { MPI_Bcast(buf, n, MPI_FLOAT, root, MPI_COMM_WORLD); };
        } else {
          p.call = [=] { MPI_Bcast(recv, n, MPI_FLOAT, root, MPI_COMM_WORLD); };
        }
        break;
    }
    return p;
  }

  void barrier() override { MPI_Barrier(MPI_COMM_WORLD); }

  double max_over_ranks(double v) override {
    double out = 0;
    MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return out;
  }

  std::uint64_t sum_over_ranks(std::uint64_t v) override {
    std::uint64_t out = 0;
    MPI_Allreduce(&v, &out, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    return out;
  }

  std::vector<std::int64_t> allgather_i64(std::int64_t v) override {
    std::vector<std::int64_t> all(static_cast<std::size_t>(size_));
    MPI_Allgather(&v, 1, MPI_INT64_T, all.data(), 1, MPI_INT64_T, MPI_COMM_WORLD);
    return all;
  }

 private:
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const int env_rank = chorus_peer::rank_from_env();
  chorus_peer::Options opt;
  chorus::cli::Parser app{
      "mpi_bench: MPI_Allreduce/MPI_Bcast/MPI_Allgather (float32) in chorus-bench's table.\n"
      "Run under mpirun, e.g.: mpirun -np 4 mpi_bench -b 8 -e 128M -f 2 --coll allreduce",
      "mpi_bench"};
  app.footer(
      "Timed as chorus-bench: warmup iterations, a barrier, timed iterations (the time\n"
      "shown is the slowest rank's average), then checked iterations compared exactly.\n"
      "Broadcast out of place: the root sends from its send buffer (MPI_Bcast has a\n"
      "single buffer). Exit status: 0 if every check passed, 1 if any element was\n"
      "wrong, 2 on error.");
  chorus_peer::add_options(app, opt);
  chorus_peer::Plan plan;
  try {
    if (const std::optional<int> status = app.parse(argc, argv, env_rank == 0))
      return *status == 0 ? 0 : 2;
    plan = chorus_peer::finish_options(app, opt);
  } catch (const std::exception& e) {
    if (env_rank == 0) std::fprintf(stderr, "mpi_bench: %s\n", e.what());
    return 2;
  }

  MPI_Init(&argc, &argv);
  // A failing MPI call aborts the job (MPI_ERRORS_ARE_FATAL); an error of
  // ours aborts it too, rather than leaving the other ranks waiting.
  int status = 0;
  try {
    MpiComm comm;
    const std::uint64_t wrong = chorus_peer::run(comm, opt, plan);
    status = wrong > 0 ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mpi_bench: rank %d: %s\n", env_rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  MPI_Finalize();
  return status;
}
