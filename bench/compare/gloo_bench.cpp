// gloo_bench: Gloo's allreduce (ring, float sum), broadcast and allgather over
// Gloo's TCP transport on 127.0.0.1, timed the way chorus-bench times Chorus
// and printed in the same nccl-tests table. Launch it with chorusrun:
//   chorusrun -n 2 -- gloo_bench -b 8 -e 4M -f 4
// Ranks meet through chorusrun's rendezvous store (CHORUS_STORE), which
// serves as Gloo's rendezvous::Store, so no temporary files are needed.
// bench/compare/compare runs it next to chorus-bench and Open MPI.

#include "peer_bench.hpp"

#include <chorus/communicator.hpp>
#include <chorus/store.hpp>

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/config.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <string>

namespace {

using chorus_peer::Coll;
using chorus_peer::Prepared;

// Gloo's rendezvous store on top of Chorus's TCP store (the one chorusrun
// hosts). Keys get a prefix so that they cannot meet anything else's.
class ChorusStore final : public gloo::rendezvous::Store {
 public:
  explicit ChorusStore(std::unique_ptr<chorus::Store> store) : store_(std::move(store)) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    store_->set(kPrefix + key, std::vector<std::uint8_t>(data.begin(), data.end()));
  }

  std::vector<char> get(const std::string& key) override {
    const std::vector<std::uint8_t> v = store_->get(kPrefix + key);
    return std::vector<char>(v.begin(), v.end());
  }

  void wait(const std::vector<std::string>& keys) override { wait(keys, kDefaultTimeout); }

  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override {
    std::vector<std::string> prefixed;
    prefixed.reserve(keys.size());
    for (const std::string& k : keys) prefixed.push_back(kPrefix + k);
    store_->wait(prefixed, timeout);
  }

 private:
  static inline const std::string kPrefix = "gloo_bench/";
  std::unique_ptr<chorus::Store> store_;
};

// Tags keep the bookkeeping calls apart from the measured ones.
constexpr std::uint32_t kTagBench = 1;
constexpr std::uint32_t kTagControl = 2;

using ReduceFn = void (*)(void*, const void*, const void*, size_t);

class GlooComm final : public chorus_peer::Comm {
 public:
  GlooComm(std::shared_ptr<gloo::Context> ctx, std::string algorithm)
      : ctx_(std::move(ctx)), algorithm_(std::move(algorithm)) {}

  int rank() const override { return ctx_->rank; }
  int size() const override { return ctx_->size; }
  std::string tool() const override { return "gloo_bench"; }
  std::string version() const override {
    return "Gloo " + std::to_string(GLOO_VERSION_MAJOR) + "." + std::to_string(GLOO_VERSION_MINOR) +
           "." + std::to_string(GLOO_VERSION_PATCH);
  }
  std::string transport() const override { return "tcp 127.0.0.1, allreduce " + algorithm_; }

  Prepared prepare(Coll coll, const float* send, float* recv, std::size_t count, int root,
                   bool in_place) override {
    Prepared p;
    p.result = recv;
    if (count == 0) {  // Gloo rejects empty buffers; nothing moves anyway
      p.call = [] {};
      return p;
    }
    float* in = const_cast<float*>(send);  // Gloo's setInput takes T*; it only reads
    // The options (and the unbound buffers they hold) are built once per
    // size and mode, and reused by every call.
    switch (coll) {
      case Coll::Allreduce: {
        auto opts = std::make_shared<gloo::AllreduceOptions>(ctx_);
        if (!in_place) opts->setInput(in, count);
        opts->setOutput(recv, count);
        opts->setAlgorithm(algorithm_ == "bcube" ? gloo::AllreduceOptions::Algorithm::BCUBE
                                                 : gloo::AllreduceOptions::Algorithm::RING);
        opts->setReduceFunction(static_cast<ReduceFn>(&gloo::sum<float>));
        opts->setTag(kTagBench);
        p.call = [opts] { gloo::allreduce(*opts); };
        break;
      }
      case Coll::Broadcast: {
        auto opts = std::make_shared<gloo::BroadcastOptions>(ctx_);
        if (!in_place && ctx_->rank == root) opts->setInput(in, count);
        opts->setOutput(recv, count);
        opts->setRoot(root);
        opts->setTag(kTagBench);
        p.call = [opts] { gloo::broadcast(*opts); };
        break;
      }
      case Coll::Allgather: {
        // In place: no input; this rank's block is already in the output.
        auto opts = std::make_shared<gloo::AllgatherOptions>(ctx_);
        if (!in_place) opts->setInput(in, count);
        opts->setOutput(recv, count * static_cast<std::size_t>(ctx_->size));
        opts->setTag(kTagBench);
        p.call = [opts] { gloo::allgather(*opts); };
        break;
      }
    }
    return p;
  }

  void barrier() override {
    gloo::BarrierOptions opts(ctx_);
    opts.setTag(kTagControl);
    gloo::barrier(opts);
  }

  double max_over_ranks(double v) override {
    gloo::AllreduceOptions opts(ctx_);
    opts.setOutput(&v, 1);
    opts.setReduceFunction(static_cast<ReduceFn>(&gloo::max<double>));
    opts.setTag(kTagControl);
    gloo::allreduce(opts);
    return v;
  }

  std::uint64_t sum_over_ranks(std::uint64_t v) override {
    gloo::AllreduceOptions opts(ctx_);
    opts.setOutput(&v, 1);
    opts.setReduceFunction(static_cast<ReduceFn>(&gloo::sum<std::uint64_t>));
    opts.setTag(kTagControl);
    gloo::allreduce(opts);
    return v;
  }

  std::vector<std::int64_t> allgather_i64(std::int64_t v) override {
    std::vector<std::int64_t> all(static_cast<std::size_t>(ctx_->size));
    gloo::AllgatherOptions opts(ctx_);
    opts.setInput(&v, 1);
    opts.setOutput(all.data(), all.size());
    opts.setTag(kTagControl);
    gloo::allgather(opts);
    return all;
  }

 private:
  std::shared_ptr<gloo::Context> ctx_;
  std::string algorithm_;
};

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const int env_rank = chorus_peer::rank_from_env();
  chorus_peer::Options opt;
  std::string algorithm = "ring";
  std::string host = "127.0.0.1";
  chorus::cli::Parser app{
      "gloo_bench: Gloo allreduce/broadcast/allgather (float32, TCP) in chorus-bench's table.\n"
      "Run every rank under chorusrun, e.g.: chorusrun -n 4 -- gloo_bench -b 8 -e 128M -f 2",
      "gloo_bench"};
  app.footer(
      "Timed as chorus-bench: warmup iterations, a barrier, timed iterations (the time\n"
      "shown is the slowest rank's average), then checked iterations compared exactly.\n"
      "Ranks and the rendezvous come from chorusrun's CHORUS_RANK, CHORUS_WORLD_SIZE\n"
      "and CHORUS_STORE. Exit status: 0 if every check passed, 1 if any element was\n"
      "wrong, 2 on error.");
  chorus_peer::add_options(app, opt);
  app.add("-A,--algorithm", algorithm, "Gloo allreduce algorithm: ring or bcube")
      .show_default()
      .one_of({"ring", "bcube"});
  app.add("--host", host, "Address Gloo's TCP device binds to").show_default();
  chorus_peer::Plan plan;
  try {
    if (const std::optional<int> status = app.parse(argc, argv, env_rank == 0))
      return *status == 0 ? 0 : 2;
    plan = chorus_peer::finish_options(app, opt);
  } catch (const std::exception& e) {
    if (env_rank == 0) std::fprintf(stderr, "gloo_bench: %s\n", e.what());
    return 2;
  }

  try {
    const chorus::LaunchInfo li = chorus::launch_info_from_env();
    if (li.store_host.empty() || li.store_port == 0)
      throw std::runtime_error("no rendezvous store in the environment (run under chorusrun)");
    // Rank 0 hosts the store itself unless the launcher does (chorusrun does).
    chorus::TcpStore::Options so;
    so.is_server = li.rank == 0 && !li.store_external;
    ChorusStore store(std::make_unique<chorus::TcpStore>(li.store_host, li.store_port, so));

    gloo::transport::tcp::attr attr;
    attr.hostname = host;
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto ctx = std::make_shared<gloo::rendezvous::Context>(li.rank, li.size);
    ctx->connectFullMesh(store, device);

    GlooComm comm(ctx, algorithm);
    const std::uint64_t wrong = chorus_peer::run(comm, opt, plan);
    return wrong > 0 ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gloo_bench: rank %d: %s\n", env_rank, e.what());
    return 2;
  }
}
