#pragma once

/// @file engine.hpp
/// The negotiated tensor engine (Horovod's model; docs/engine.md).
///
/// Ranks submit named tensors in any order, from any thread, and get a Work
/// back at once. A background thread agrees with the other ranks, every
/// cycle, on which names every rank has submitted; it runs those in the same
/// order on every rank, packing small allreduces of one dtype and op (and
/// small allgathers of one dtype, broadcasts of one dtype and root,
/// reduce-scatters, allgathervs and alltoalls) into one collective (fusion). Names seen
/// before are agreed on by a bit each (the response cache). A name submitted with different
/// arguments on two ranks fails on every rank with Error(InvalidUsage) naming both; a name some
/// ranks never submit is reported, naming the missing ranks, instead of hanging. Rank 0 can write a
/// timeline (Chrome trace JSON) of every tensor's negotiation and execution.

#include <chorus/communicator.hpp>
#include <chorus/export.hpp>
#include <chorus/types.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace chorus {

namespace detail {
struct EngineImpl;
}

/// Engine settings. Fields left unset take the environment's value, then the
/// default (docs/tuning.md).
struct EngineConfig {
  /// Time between two negotiations (CHORUS_ENGINE_CYCLE_MS, default 1 ms).
  std::optional<std::chrono::microseconds> cycle;
  /// Most bytes one fused allreduce or broadcast carries (a fused allgather
  /// or allgatherv: all ranks' shares together; a fused alltoall: what the
  /// rank sending most sends, plus what all ranks send); 0 disables fusion
  /// (CHORUS_FUSION_BYTES, default 64 MiB).
  std::optional<std::size_t> fusion_bytes;
  /// Names the response cache holds; 0 disables it (CHORUS_ENGINE_CACHE,
  /// default 1024).
  std::optional<std::size_t> cache_capacity;
  /// Path of the timeline rank 0 writes (CHORUS_TIMELINE; empty: none).
  std::optional<std::string> timeline;
  /// How long a name may wait for the ranks that have not submitted it
  /// before rank 0 warns, naming them (CHORUS_STALL_WARNING, default 60 s).
  std::optional<std::chrono::milliseconds> stall_warning;
  /// How long before such a name fails on every rank with Error(Timeout)
  /// and the engine stops; 0: never (CHORUS_STALL_ABORT, default 0).
  std::optional<std::chrono::milliseconds> stall_abort;
};

/// What an engine has done so far (this rank's counts; every rank's agree).
struct EngineStats {
  std::uint64_t cycles = 0;        ///< negotiation rounds
  std::uint64_t negotiations = 0;  ///< rounds that exchanged tensor descriptions
  std::uint64_t tensors = 0;       ///< tensors completed (successfully or not)
  /// Collectives run for them (an alltoall group counts once, its splits'
  /// exchange included).
  std::uint64_t collectives = 0;
  std::uint64_t fused = 0;         ///< tensors that shared a collective with others
  std::uint64_t cache_hits = 0;    ///< tensors agreed on by their cache bit alone
};

/// A negotiated tensor engine over a communicator. A cheap, copyable handle;
/// the last copy shuts the engine down.
class CHORUS_API Engine {
 public:
  /// An empty handle; every call on it throws Error(InvalidUsage).
  Engine();
  /// Starts an engine on a communicator of its own, split from `comm` (so
  /// its traffic never mixes with the caller's calls on `comm`). Every rank
  /// of `comm` calls it, in the same order as their other calls on `comm`.
  static Engine start(const Communicator& comm, const EngineConfig& config = {});

  /// Allreduce of the tensor `name`: `count` elements of every rank's
  /// `sendbuf` reduced into every rank's `recvbuf` (in place when equal).
  /// The buffers are the engine's until the Work completes.
  Work allreduce(const std::string& name, const void* sendbuf, void* recvbuf, std::size_t count,
                 DataType dtype, ReduceOp op);
  /// Reduce-scatter of the tensor `name` (Horovod's reducescatter, the
  /// gradient step of a sharded optimizer): every rank's `sendbuf` holds
  /// size() blocks of `count` elements; block r, reduced over the ranks,
  /// goes to rank r's `recvbuf` (`count` elements). Small ones of one dtype
  /// and op are fused.
  Work reducescatter(const std::string& name, const void* sendbuf, void* recvbuf, std::size_t count,
                     DataType dtype, ReduceOp op);
  /// Reduce-scatter of the tensor `name` by rows, whose number need not
  /// divide by size() (Horovod's reducescatter of a tensor's first
  /// dimension): every rank's `sendbuf` holds `rows` rows of `row_count`
  /// elements; rank r receives its rows of the reduction, the rows split
  /// as evenly as possible with the first rows % size() ranks getting one
  /// more (rows / size() + (r < rows % size() ? 1 : 0) of them, after those
  /// of the ranks before it), in `recvbuf` (null where that is 0 rows; in
  /// place when it is this rank's rows of sendbuf). Rows that divide evenly
  /// make it the reducescatter above. Small ones of one dtype and op are
  /// fused, whatever their rows' lengths.
  Work reducescatter(const std::string& name, const void* sendbuf, void* recvbuf, std::size_t rows,
                     std::size_t row_count, DataType dtype, ReduceOp op);
  /// Allgather of the tensor `name`: every rank's `count` elements, in rank order.
  Work allgather(const std::string& name, const void* sendbuf, void* recvbuf, std::size_t count,
                 DataType dtype);
  /// Broadcast of the tensor `name` from `root`.
  Work broadcast(const std::string& name, const void* sendbuf, void* recvbuf, std::size_t count,
                 DataType dtype, int root);

  /// Where an allgatherv's or alltoall's result goes: called with the count
  /// this rank gets from each rank, in rank order, it returns memory for
  /// their sum of elements (nullptr when the sum is 0). It runs on the
  /// engine's thread.
  using Allocator = std::function<void*(const std::vector<std::size_t>& counts)>;
  /// Allgather of the tensor `name` whose count may differ between ranks
  /// (Horovod's allgather of tensors whose first dimension differs): every
  /// rank's `count` elements of `sendbuf`, concatenated in rank order where
  /// `alloc` says, once every rank has submitted the name. Host memory
  /// only. An allocator that throws or returns nullptr for a nonzero sum
  /// fails this rank's tensor (InvalidArgument, or the chorus::Error it
  /// threw); the other ranks still get theirs. Each submission exchanges
  /// the counts (such names are never answered from the response cache).
  Work allgatherv(const std::string& name, const void* sendbuf, std::size_t count, DataType dtype,
                  Allocator alloc);

  /// Alltoall of the tensor `name` (Horovod's alltoall with splits: the
  /// token exchange of a mixture of experts): this rank sends splits[j]
  /// elements of `sendbuf` to rank j, blocks packed in rank order (size()
  /// splits, which may differ between ranks and between submissions). Once
  /// every rank has submitted the name, `alloc` is called with the counts
  /// this rank receives from each rank, in rank order, and the blocks land
  /// there in rank order. Host memory only. Alltoalls of one dtype are
  /// fused (one exchange of the splits, then one alltoallv); an allocator
  /// that fails fails this rank's tensor only. Never answered from the
  /// response cache (the splits are news each time).
  Work alltoall(const std::string& name, const void* sendbuf, std::vector<std::size_t> splits,
                DataType dtype, Allocator alloc);

  /// Horovod's join, for inputs of different lengths: this rank has no
  /// more data. Until every rank has joined, it stands in for every name
  /// the others submit and it does not: an allreduce gets the op's
  /// identity from it (0 for Sum, 1 for Prod, the largest value for Min,
  /// the lowest for Max), so the result is the reduction over the ranks
  /// that submitted it; an Avg divides by their number. A reduce-scatter
  /// likewise (the joined rank's block is computed and dropped). An allgatherv gets
  /// no share from it; an alltoall nothing (what it is sent is dropped). An allgather, a broadcast
  /// whose root joined, or a device tensor cannot be stood in for: it fails with
  /// Error(InvalidUsage) on every rank, naming the joined ranks. Blocks
  /// until every rank has joined; what this rank submitted before still
  /// completes. Returns the rank that joined last (the one that had the
  /// most data, to broadcast from). Submitting while join() waits throws
  /// Error(InvalidUsage); after it returns, the engine takes work again.
  int join();

  /// This rank's counts so far.
  EngineStats stats() const;
  /// The communicator the engine runs on (its own, split from the one given).
  Communicator communicator() const;
  /// Stops the engine once every rank has called shutdown() (collective):
  /// this rank submits nothing more, what every rank submitted still runs,
  /// and tensors still waiting then fail with Error(Aborted). Meanwhile, on
  /// the other ranks, a name this rank never submitted fails at once with
  /// Error(Aborted) naming this rank, instead of waiting forever: a rank
  /// that unwinds from an exception through ~Engine does not hang the rest.
  /// Idempotent.
  void shutdown();
  /// True for a handle made by start().
  bool valid() const noexcept { return impl_ != nullptr; }

 private:
  std::shared_ptr<detail::EngineImpl> impl_;
};

}  // namespace chorus
