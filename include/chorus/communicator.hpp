#pragma once

/// @file communicator.hpp
/// The Communicator: a group of ranks and the collectives among them.

#include <chorus/error.hpp>
#include <chorus/export.hpp>
#include <chorus/store.hpp>
#include <chorus/types.hpp>

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace chorus {

namespace detail {
struct CommImpl;
struct WorkState;
}  // namespace detail

/// Settings fixed when a communicator is created. Zero/empty fields take
/// their value from the environment (docs/tuning.md), then from the default.
struct Config {
  /// Default deadline of every call (CHORUS_TIMEOUT, default 300 s).
  std::chrono::milliseconds timeout{0};
  /// Transport name (CHORUS_TRANSPORT, default "tcp").
  std::string transport;
  /// Network interface for the TCP transport (CHORUS_SOCKET_IFNAME).
  std::string socket_ifname;
};

/// Per-call options.
struct CallOptions {
  /// Deadline of this call; zero means the communicator's default timeout.
  std::chrono::milliseconds timeout{0};
  /// Force an algorithm by name (e.g. "ring"); empty lets Chorus choose.
  std::string algorithm;
  /// Opaque CUDA stream (cudaStream_t). A call on device buffers is ordered
  /// after the work queued on it before the call, and work queued after the
  /// call sees the result; without a stream such a call is blocking and
  /// ordered on the legacy default stream. An _async call is ordered after
  /// the work queued before it too, and work queued once its Work completed
  /// sees the result. With host buffers the stream is synchronised first.
  /// Error(Cuda) where no GPU is usable (docs/cuda.md).
  void* stream = nullptr;
};

/// Where a process found its rank, world size and rendezvous address.
struct LaunchInfo {
  int rank = -1;             ///< this process's rank
  int size = -1;             ///< world size
  std::string store_host;    ///< rendezvous host (empty when unknown)
  std::uint16_t store_port = 0;  ///< rendezvous port (0 when unknown)
  bool store_external = false;   ///< true when a separate server hosts the store (CHORUS_STORE_EXTERNAL=1)
  int local_rank = -1;       ///< rank among the processes of this host, when the launcher says
  std::string source;        ///< which convention was used: "chorus", "torchrun", "mpirun", "pmi", "slurm"
};

/// Reads the launch information from an environment lookup function
/// (std::getenv by default). Tries, in order: CHORUS_RANK/CHORUS_WORLD_SIZE/
/// CHORUS_STORE (host:port); torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT;
/// Open MPI's OMPI_COMM_WORLD_RANK/_SIZE; PMI_RANK/PMI_SIZE; Slurm's
/// SLURM_PROCID/SLURM_NTASKS. The store address, when the launcher gives none,
/// comes from CHORUS_STORE or MASTER_ADDR/MASTER_PORT. Throws
/// Error(InvalidArgument) for malformed or inconsistent values and
/// Error(InvalidUsage) when no convention is present.
CHORUS_API LaunchInfo launch_info_from_env(
    const std::function<const char*(const char*)>& getenv = nullptr);

/// Names of the algorithms Chorus has for `collective` (as algorithm_for()
/// names collectives), in a fixed order; empty for an unknown collective.
/// Any of them may be forced with CallOptions::algorithm or CHORUS_ALGO.
CHORUS_API std::vector<std::string> algorithm_names(const std::string& collective);

/// Names of the transports this build has ("tcp", "shm", and "libfabric" and
/// "ucx" when built with them), sorted; any of them, or "auto", may be set as
/// Config::transport or CHORUS_TRANSPORT.
CHORUS_API std::vector<std::string> transport_names();

/// Handle to an asynchronous operation. Operations of one communicator run in
/// the order they were submitted.
class CHORUS_API Work {
 public:
  /// An empty handle; completed() is true.
  Work();
  /// True when the operation has finished (successfully or not); never blocks.
  bool completed() const;
  /// True when finished; rethrows the operation's Error if it failed.
  bool test();
  /// Blocks until the operation finishes; rethrows its Error if it failed.
  void wait();
  /// Waits at most `timeout`; returns false if the operation is still running.
  /// Rethrows the operation's Error if it failed.
  bool wait(std::chrono::milliseconds timeout);

  /// Internal: wraps an operation's shared state.
  explicit Work(std::shared_ptr<detail::WorkState> state);

 private:
  std::shared_ptr<detail::WorkState> state_;
};

/// A group of `size()` ranks that run collectives together.
///
/// A Communicator is a cheap, copyable handle to shared state. Calls on one
/// communicator must be issued in the same order on every rank; Chorus checks
/// this on the wire and throws Error(InvalidUsage) when ranks disagree.
/// Buffers: `sendbuf == recvbuf` means in-place. Counts are in elements.
/// After a failure (PeerFailure, Timeout, InvalidUsage from a mismatch,
/// Aborted) the communicator refuses every further call.
class CHORUS_API Communicator {
 public:
  /// An empty handle; every call on it throws Error(InvalidUsage).
  Communicator();

  /// Joins a group of `size` ranks as `rank`, rendezvousing through `store`.
  /// Blocks until all ranks have joined (or the timeout passes).
  static Communicator create(int rank, int size, std::shared_ptr<Store> store,
                             const Config& config = {});
  /// Joins the group described by the environment (launch_info_from_env());
  /// rank 0 hosts the TCP store unless CHORUS_STORE_EXTERNAL=1.
  static Communicator from_env(const Config& config = {});

  /// True for a handle made by create(), from_env() or split() with a color >= 0.
  bool valid() const noexcept;
  /// This process's rank in [0, size()).
  int rank() const;
  /// Number of ranks.
  int size() const;
  /// Name of the transport in use ("tcp").
  std::string transport_name() const;
  /// The algorithm this communicator would run for a call of `collective`
  /// ("allreduce", "broadcast", "allgather", "reduce_scatter", "reduce",
  /// "gather", "scatter", "alltoall", "alltoallv" (alltoall's pairwise
  /// exchange, `count` per pair), "allgatherv" (with `count` for every
  /// rank, an allgather), "reduce_scatterv" (likewise, a reduce_scatter),
  /// "barrier") with `count` elements of
  /// `dtype`: the one CHORUS_ALGO forces, else the cheapest under the
  /// selector's cost model (docs/algorithms.md). Every rank gets the same
  /// answer. Throws Error(InvalidArgument) for an unknown collective, or when
  /// the forced algorithm cannot run such a call.
  std::string algorithm_for(const std::string& collective, std::size_t count,
                            DataType dtype = DataType::Float32, ReduceOp op = ReduceOp::Sum,
                            int root = 0) const;
  /// Every algorithm of `collective` with the selector's estimate for such a
  /// call in microseconds (NaN where the algorithm cannot run it), in
  /// algorithm_names() order. `tuning`, when not empty, is tuning-file text
  /// (docs/algorithms.md) evaluated instead of the communicator's model, on
  /// this communicator's layout: what chorus-bench --calibrate fits against.
  std::vector<std::pair<std::string, double>> algorithm_estimates(
      const std::string& collective, std::size_t count, DataType dtype = DataType::Float32,
      ReduceOp op = ReduceOp::Sum, int root = 0, const std::string& tuning = {}) const;

  /// Elementwise reduction of every rank's `sendbuf` into every rank's `recvbuf`.
  void allreduce(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype,
                 ReduceOp op, const CallOptions& options = {});
  /// Copies `count` elements of root's `sendbuf` into every rank's `recvbuf`
  /// (sendbuf is read on the root only; it may equal recvbuf).
  void broadcast(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype, int root,
                 const CallOptions& options = {});
  /// Every rank contributes `count` elements; every `recvbuf` receives size()*count
  /// elements in rank order. In-place when sendbuf == recvbuf + rank*count.
  void allgather(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype,
                 const CallOptions& options = {});
  /// Allgather with a count per rank (MPI_Allgatherv, Gloo's allgatherv):
  /// block p of recvbuf (recvcounts[p] elements, blocks packed in rank
  /// order) is rank p's sendbuf, which holds recvcounts[rank()] elements.
  /// Every rank passes the same size() counts; ranks whose counts differ
  /// fail with Error(InvalidUsage) (the call carries their sum and a hash).
  /// In place when sendbuf == recvbuf + (the counts of the ranks before
  /// this one) elements. Equal counts make it an allgather; counts that
  /// differ run the allgather's algorithm for their mean (ring or bruck,
  /// the selector's pick or the forced one).
  void allgatherv(const void* sendbuf, void* recvbuf, std::span<const std::size_t> recvcounts,
                  DataType dtype, const CallOptions& options = {});
  /// Reduces size()*`count` elements across ranks; rank r receives block r
  /// (`count` elements). In-place (NCCL's convention) when
  /// recvbuf == sendbuf + rank*count*size_of(dtype).
  void reduce_scatter(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype,
                      ReduceOp op, const CallOptions& options = {});
  /// Reduce-scatter with a count per rank (MPI_Reduce_scatter, Horovod's
  /// uneven reducescatter): sendbuf holds the sum of the recvcounts
  /// elements, blocks packed in rank order; rank r receives block r of the
  /// reduction (recvcounts[r] elements; recvbuf may be null where that is
  /// 0). Every rank passes the same size() counts; ranks whose counts
  /// differ fail with Error(InvalidUsage) (the call carries their sum and a
  /// hash). In place when recvbuf == sendbuf + (the counts of the ranks
  /// before this one) elements. Equal counts make it a reduce_scatter;
  /// counts that differ run the reduce_scatter's algorithm for their mean
  /// (ring or recursive_halving, the selector's pick or the forced one).
  void reduce_scatterv(const void* sendbuf, void* recvbuf, std::span<const std::size_t> recvcounts,
                       DataType dtype, ReduceOp op, const CallOptions& options = {});
  /// Like allreduce, but only the root's `recvbuf` receives the result
  /// (recvbuf may be null on other ranks).
  void reduce(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype, ReduceOp op,
              int root, const CallOptions& options = {});
  /// Root receives size()*`count` elements, rank r's `count` at offset r*count
  /// (recvbuf is used on the root only).
  void gather(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype, int root,
              const CallOptions& options = {});
  /// Root sends block r of size()*`count` elements to rank r (sendbuf is used
  /// on the root only).
  void scatter(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype, int root,
               const CallOptions& options = {});
  /// Block j (`count` elements) of rank i's sendbuf lands in block i of rank j's
  /// recvbuf. sendbuf and recvbuf must not overlap.
  void alltoall(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype,
                const CallOptions& options = {});
  /// Alltoall with counts that differ per pair (MPI_Alltoallv, Gloo's
  /// alltoallv, torch's all_to_all_single with split sizes): this rank sends
  /// sendcounts[j] elements to rank j and receives recvcounts[i] elements
  /// from rank i. Blocks are packed in rank order: block j of sendbuf starts
  /// after blocks 0..j-1, and likewise in recvbuf. Each span holds size()
  /// counts, and sendcounts[j] on rank i must equal recvcounts[i] on rank j:
  /// a pair that disagrees fails with Error(InvalidUsage) naming both counts
  /// on the receiving rank, and on the others no later than their next call
  /// (every pair exchanges a message, empty or not).
  /// sendbuf and recvbuf must not overlap. Host or device memory, like
  /// every collective; device buffers always go through pinned host memory.
  void alltoallv(const void* sendbuf, std::span<const std::size_t> sendcounts, void* recvbuf,
                 std::span<const std::size_t> recvcounts, DataType dtype,
                 const CallOptions& options = {});
  /// Returns once every rank has entered the barrier.
  void barrier(const CallOptions& options = {});
  /// Sends `count` elements to rank `peer`, which must post a matching recv.
  void send(const void* buf, std::size_t count, DataType dtype, int peer,
            const CallOptions& options = {});
  /// Receives `count` elements from rank `peer`.
  void recv(void* buf, std::size_t count, DataType dtype, int peer,
            const CallOptions& options = {});

  /// Asynchronous allreduce; see allreduce(). Buffers must stay valid until the Work completes.
  Work allreduce_async(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype,
                       ReduceOp op, const CallOptions& options = {});
  /// Asynchronous broadcast; see broadcast().
  Work broadcast_async(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype,
                       int root, const CallOptions& options = {});
  /// Asynchronous allgather; see allgather().
  Work allgather_async(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype,
                       const CallOptions& options = {});
  /// Asynchronous reduce_scatter; see reduce_scatter().
  Work reduce_scatter_async(const void* sendbuf, void* recvbuf, std::size_t count,
                            DataType dtype, ReduceOp op, const CallOptions& options = {});
  /// Asynchronous reduce; see reduce().
  Work reduce_async(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype,
                    ReduceOp op, int root, const CallOptions& options = {});
  /// Asynchronous gather; see gather().
  Work gather_async(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype,
                    int root, const CallOptions& options = {});
  /// Asynchronous scatter; see scatter().
  Work scatter_async(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype,
                     int root, const CallOptions& options = {});
  /// Asynchronous alltoall; see alltoall().
  Work alltoall_async(const void* sendbuf, void* recvbuf, std::size_t count, DataType dtype,
                      const CallOptions& options = {});
  /// Asynchronous allgatherv; see allgatherv(). The counts are copied.
  Work allgatherv_async(const void* sendbuf, void* recvbuf, std::span<const std::size_t> recvcounts,
                        DataType dtype, const CallOptions& options = {});
  /// Asynchronous reduce_scatterv; see reduce_scatterv(). The counts are copied.
  Work reduce_scatterv_async(const void* sendbuf, void* recvbuf,
                             std::span<const std::size_t> recvcounts, DataType dtype, ReduceOp op,
                             const CallOptions& options = {});
  /// Asynchronous alltoallv; see alltoallv(). The counts are copied: only
  /// the buffers must stay valid until the Work completes.
  Work alltoallv_async(const void* sendbuf, std::span<const std::size_t> sendcounts, void* recvbuf,
                       std::span<const std::size_t> recvcounts, DataType dtype,
                       const CallOptions& options = {});
  /// Asynchronous barrier; see barrier().
  Work barrier_async(const CallOptions& options = {});
  /// Asynchronous send; see send(). Async calls run one at a time in call
  /// order, so in a ring exchange post send_async() before recv_async():
  /// recv-first on every rank waits for a send queued behind it (a Timeout).
  Work send_async(const void* buf, std::size_t count, DataType dtype, int peer,
                  const CallOptions& options = {});
  /// Asynchronous recv; see recv().
  Work recv_async(void* buf, std::size_t count, DataType dtype, int peer,
                  const CallOptions& options = {});

  /// Splits this communicator: ranks with the same `color` form a new
  /// communicator, ordered by (`key`, old rank). A negative color returns an
  /// empty handle (valid() is false). Collective over all ranks of this one.
  Communicator split(int color, int key) const;

  /// Aborts the communicator: any blocked call (in any thread) returns with
  /// Error(Aborted), and every later call fails. Thread-safe; idempotent.
  void abort();

  /// The error that made this communicator unusable, if any (like ncclCommGetAsyncError).
  std::optional<Error> error() const;

 private:
  explicit Communicator(std::shared_ptr<detail::CommImpl> impl);
  std::shared_ptr<detail::CommImpl> impl_;
};

}  // namespace chorus
