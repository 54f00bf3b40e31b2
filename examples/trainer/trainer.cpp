// The reference trainer: data-parallel training of a character-level language
// model (model.hpp) on a text (corpus.hpp), gradients averaged through Chorus.
//
//   chorusrun -n 4 -- trainer                 # the licence texts of this machine
//   chorusrun -n 2 -- trainer --steps 2000 --text book.txt
//
// Data parallelism, step by step (docs/trainer.md tells the why):
//  1. Every rank holds the whole model. Rank 0's initial parameters are
//     broadcast, so the replicas start equal.
//  2. Each step draws a global batch of B positions from a generator seeded
//     by the step number: every rank draws the same batch, and rank r takes
//     the r-th contiguous share.
//  3. Each rank runs forward and backward on its share, scaling its gradient
//     by 1/B. The sum over the ranks is then the gradient of the whole
//     batch's mean loss: what one process with the whole batch would get.
//  4. The sum is an allreduce. Backward finishes the output layer first, so
//     its gradient is averaged (allreduce_async) while the hidden layer's is
//     computed; then the hidden layer's while the embeddings' is; then the
//     embeddings'. This overlap is what PyTorch DDP's gradient buckets do.
//     With --engine the layers' gradients go to chorus::Engine as named
//     tensors instead (Horovod's model, docs/engine.md): it pairs them by
//     name across ranks and fuses the small ones into one allreduce.
//  5. Every rank applies the same Adam step to the same gradient: the
//     replicas stay equal. The trainer checks that at the end (a hash of the
//     parameters, allgathered) rather than trusting it.
//  6. With --uneven K (and --engine), rank r runs K*r steps fewer, as when
//     ranks hold shards of different sizes. Each rank scales its gradient
//     by 1/(its share) and the engine averages over the ranks still
//     training; a rank out of data calls Engine::join() and stands in for
//     the others' tensors until every rank has joined. join() returns the
//     rank that joined last, whose parameters are then broadcast: the
//     replicas are equal again (docs/trainer.md).
//  7. With --shard (ZeRO stage 1), each rank keeps Adam's state for its
//     own 1/n of the parameters only: the gradient is reduce-scattered
//     (reduce_scatterv: the parameters need not divide by the ranks), each
//     rank steps its shard, and the shards are allgathered (allgatherv)
//     into every replica. The arithmetic is the same as 5.'s, element by
//     element; Adam's memory per rank is 1/n of it.

#include "corpus.hpp"
#include "model.hpp"

#include <chorus/chorus.hpp>

#include "cli/cli.hpp"

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Options {
  int steps = 600;
  std::size_t batch = 256;
  double lr = 3e-3;
  trainer::Shape shape;
  std::uint64_t seed = 1;
  std::vector<std::string> text{"/usr/share/common-licenses"};
  int log_every = 50;
  int eval_every = 200;
  std::size_t eval_examples = 8192;
  std::size_t sample = 240;
  bool overlap = true;
  bool engine = false;
  int uneven = 0;
  bool shard = false;
  std::string timeline;
  std::string save;
};

// FNV-1a over the parameters' bytes: equal replicas hash equal.
std::uint64_t hash_of(const float* p, std::size_t n) {
  std::uint64_t h = 1469598103934665603ULL;
  const auto* b = reinterpret_cast<const unsigned char*>(p);
  for (std::size_t i = 0; i < n * sizeof(float); ++i) h = (h ^ b[i]) * 1099511628211ULL;
  return h;
}

// The mean loss over the first `limit` validation examples, shared out over
// the ranks: each evaluates a contiguous part, one allreduce sums them.
double validation_loss(chorus::Communicator& comm, trainer::Model<float>& model,
                       const trainer::Corpus& corpus, std::size_t limit) {
  const std::size_t C = model.shape().context;
  const std::size_t total = std::min(limit, corpus.val.size() - C);
  const auto r = static_cast<std::size_t>(comm.rank()), n = static_cast<std::size_t>(comm.size());
  const std::size_t lo = total * r / n, hi = total * (r + 1) / n;
  std::vector<std::size_t> pos;
  for (std::size_t i = lo; i < hi; ++i) pos.push_back(C + i);
  std::vector<std::uint8_t> ctx, tgt;
  double sum[2] = {0, static_cast<double>(pos.size())};
  for (std::size_t at = 0; at < pos.size(); at += 1024) {
    const std::size_t m = std::min<std::size_t>(1024, pos.size() - at);
    trainer::gather_examples(corpus.val, pos.data() + at, m, C, ctx, tgt);
    sum[0] += model.loss(ctx.data(), tgt.data(), m);
  }
  comm.allreduce(sum, sum, 2, chorus::DataType::Float64, chorus::ReduceOp::Sum);
  return sum[0] / sum[1];
}

// `n` bytes drawn from the model, one at a time, after the first context of
// the validation text.
std::string sample_text(trainer::Model<float>& model, const trainer::Corpus& corpus, std::size_t n,
                        std::uint64_t seed) {
  const std::size_t C = model.shape().context, V = model.shape().vocab;
  std::vector<std::uint8_t> ctx(corpus.val.begin(), corpus.val.begin() + static_cast<std::ptrdiff_t>(C));
  std::string out;
  for (std::uint8_t s : ctx) out.push_back(static_cast<char>(corpus.alphabet[s]));
  trainer::Rng rng(seed);
  for (std::size_t i = 0; i < n; ++i) {
    model.forward(ctx.data(), 1);
    const float* p = model.probs();
    double u = rng.uniform(), acc = 0;
    std::size_t s = V - 1;
    for (std::size_t v = 0; v < V; ++v)
      if ((acc += static_cast<double>(p[v])) > u) {
        s = v;
        break;
      }
    out.push_back(static_cast<char>(corpus.alphabet[s]));
    ctx.erase(ctx.begin());
    ctx.push_back(static_cast<std::uint8_t>(s));
  }
  return out;
}

int train(const Options& o) {
  chorus::Communicator comm = chorus::Communicator::from_env();
  const int rank = comm.rank(), world = comm.size();
  const bool lead = rank == 0;
  const trainer::Corpus corpus = trainer::load_corpus(o.text);
  trainer::Shape shape = o.shape;
  shape.vocab = corpus.alphabet.size();
  trainer::Model<float> model(shape);
  model.init(o.seed);
  const std::size_t P = model.size();
  const std::size_t C = shape.context;
  if (corpus.train.size() <= C + 1 || corpus.val.size() <= C + 1)
    throw std::runtime_error("the text is too short for a context of " + std::to_string(C));
  if (o.batch < static_cast<std::size_t>(world))
    throw std::runtime_error("--batch " + std::to_string(o.batch) + " is smaller than the " +
                             std::to_string(world) + " ranks");
  if (o.uneven > 0 && !o.engine)
    throw std::runtime_error("--uneven needs --engine: the ranks that run out of data join it");
  if (o.shard && o.engine)
    throw std::runtime_error("--shard reduce-scatters the gradient itself: leave out --engine");
  // This rank's steps: every rank's with --uneven 0.
  const int my_steps = std::max(0, o.steps - o.uneven * rank);

  // 1. Equal replicas: rank 0's parameters everywhere.
  comm.broadcast(model.params(), model.params(), P, chorus::DataType::Float32, 0);

  if (lead) {
    std::printf("chorus trainer: %d ranks over %s, character-level MLP language model\n", world,
                comm.transport_name().c_str());
    std::printf("  text: %zu files, %zu bytes (%zu train, %zu validation), %zu symbols\n",
                corpus.files.size(), corpus.bytes, corpus.train.size(), corpus.val.size(),
                shape.vocab);
    std::printf("  model: context %zu, embedding %zu, hidden %zu: %zu parameters\n", C, shape.embed,
                shape.hidden, P);
    const std::size_t least = o.batch / static_cast<std::size_t>(world);
    const std::size_t most = least + (o.batch % static_cast<std::size_t>(world) != 0 ? 1 : 0);
    std::printf(
        "  global batch %zu (%s%zu per rank), Adam lr %g, %d steps, gradients averaged %s\n",
        o.batch, least == most ? "" : (std::to_string(least) + " to ").c_str(), most, o.lr, o.steps,
        o.shard     ? "after backward, reduce-scattered to their shards (ZeRO-1)"
        : o.engine  ? "per layer during backward, as named tensors (chorus::Engine)"
        : o.overlap ? "per layer during backward (allreduce_async)"
                    : "after backward");
    if (o.shard) {
      const std::size_t w = static_cast<std::size_t>(world);
      const std::size_t widest = P / w + (P % w != 0 ? 1 : 0);
      const std::string sizes = widest == P / w
                                    ? std::to_string(widest)
                                    : std::to_string(P / w) + " or " + std::to_string(widest);
      std::printf(
          "  sharded: rank r steps parameters [first_r, first_r + %s), with %zu KiB of Adam "
          "state at most instead of %zu, then allgathers them\n",
          sizes.c_str(), widest * 16 / 1024, P * 16 / 1024);
    }
    if (o.uneven > 0)
      std::printf(
          "  uneven data: rank r runs %d*r steps fewer (rank %d: %d); a rank out of data "
          "joins the engine\n",
          o.uneven, world - 1, std::max(0, o.steps - o.uneven * (world - 1)));
  }
  const double first_val = validation_loss(comm, model, corpus, o.eval_examples);
  if (lead) {
    std::printf("\n%6s  %10s  %10s  %12s  %10s\n", "step", "train loss", "val loss", "examples/s",
                "comm wait");
    std::printf("%6d  %10s  %10.4f\n", 0, "", first_val);
  }

  // --shard: this rank's part of the parameters (P split as evenly as
  // possible, the first P % n ranks one more), and every rank's count.
  std::vector<std::size_t> shard_counts(static_cast<std::size_t>(world));
  std::size_t shard_first = 0;
  for (int q = 0; q < world; ++q) {
    const auto uq = static_cast<std::size_t>(q), uw = static_cast<std::size_t>(world);
    shard_counts[uq] = P / uw + (uq < P % uw ? 1 : 0);
    if (q < rank) shard_first += shard_counts[uq];
  }
  const std::size_t shard_size = shard_counts[static_cast<std::size_t>(rank)];
  trainer::Adam<float> adam(o.shard ? shard_size : P, o.lr);
  std::vector<float> grad(P);
  const auto& spans = model.spans();
  // The gradient's buckets, in the order backward completes them.
  const std::size_t out_end = spans[1].offset + spans[1].size;
  const std::size_t hid_end = spans[3].offset + spans[3].size;
  std::vector<chorus::Work> pending;
  // The engine takes each parameter's gradient as a tensor named after it;
  // it fuses them (one allreduce per step when they fit CHORUS_FUSION_BYTES).
  chorus::Engine engine;
  if (o.engine) {
    chorus::EngineConfig ec;
    if (!o.timeline.empty()) ec.timeline = o.timeline;
    engine = chorus::Engine::start(comm, ec);
  }
  // Uneven: each rank's gradient is the mean over its own share, and the
  // engine averages over the ranks that submitted it (the joined ones
  // stand in). Otherwise each rank scales by 1/B and the ranks' sum is the
  // batch's mean.
  const bool uneven = o.uneven > 0;
  const chorus::ReduceOp grad_op = uneven ? chorus::ReduceOp::Avg : chorus::ReduceOp::Sum;
  auto average = [&](std::size_t from, std::size_t to) {
    if (!o.engine) {
      pending.push_back(comm.allreduce_async(grad.data() + from, grad.data() + from, to - from,
                                             chorus::DataType::Float32, chorus::ReduceOp::Sum));
      return;
    }
    for (const auto& sp : spans)
      if (sp.offset >= from && sp.offset + sp.size <= to)
        pending.push_back(engine.allreduce(sp.name, grad.data() + sp.offset,
                                           grad.data() + sp.offset, sp.size,
                                           chorus::DataType::Float32, grad_op));
  };
  if ((o.overlap || o.engine) && !o.shard) {
    model.on_output_done([&] { average(0, out_end); });
    model.on_hidden_done([&] { average(out_end, hid_end); });
  }

  const auto r = static_cast<std::size_t>(rank), w = static_cast<std::size_t>(world);
  const std::size_t lo = o.batch * r / w, hi = o.batch * (r + 1) / w;
  std::vector<std::size_t> batch(o.batch);
  std::vector<std::uint8_t> ctx, tgt;
  double window_loss = 0, window_wait = 0;
  std::size_t window_examples = 0;
  auto window_start = Clock::now();
  const auto t0 = Clock::now();
  for (int step = 1; step <= my_steps; ++step) {
    // 2. The same global batch on every rank; this rank's share.
    trainer::Rng rng(o.seed * 0x100000001b3ULL + static_cast<std::uint64_t>(step));
    for (auto& p : batch) p = C + rng.below(corpus.train.size() - C);
    trainer::gather_examples(corpus.train, batch.data() + lo, hi - lo, C, ctx, tgt);
    // 3.-4. Gradients, averaged layer by layer as backward produces them.
    std::fill(grad.begin(), grad.end(), 0.0f);
    pending.clear();
    window_loss += model.forward_backward(ctx.data(), tgt.data(), hi - lo, grad.data(),
                                          1.0f / static_cast<float>(uneven ? hi - lo : o.batch));
    const auto waiting = Clock::now();
    if (o.shard) {
      // 7. This rank's shard of the summed gradient (in place), its Adam
      // step, then every rank's shard into every replica (in place).
      comm.reduce_scatterv(grad.data(), grad.data() + shard_first, shard_counts,
                           chorus::DataType::Float32, chorus::ReduceOp::Sum);
      window_wait += seconds_since(waiting);
      adam.step(model.params() + shard_first, grad.data() + shard_first);
      const auto gathering = Clock::now();
      comm.allgatherv(model.params() + shard_first, model.params(), shard_counts,
                      chorus::DataType::Float32);
      window_wait += seconds_since(gathering);
      window_examples += o.batch;
    } else {
      if (o.overlap || o.engine)
        average(hid_end, P);
      else
        average(0, P);
      for (auto& work : pending) work.wait();
      window_wait += seconds_since(waiting);
      window_examples += uneven ? hi - lo : o.batch;
      // 5. The same step on every rank.
      adam.step(model.params(), grad.data());
    }

    // Uneven: a line at every --log-every step only (the ranks still in are
    // there together), through the engine (the joined ranks stand in with
    // 0); the validation loss once at the end, when every rank is back.
    const bool log_now = step % o.log_every == 0 || (!uneven && step == o.steps);
    const bool eval_now = !uneven && (step % o.eval_every == 0 || step == o.steps);
    if (log_now || eval_now) {
      // The training loss of the steps since the last line: every rank's sum.
      double sum[2] = {window_loss, static_cast<double>(window_examples)};
      if (uneven)
        engine.allreduce("loss", sum, sum, 2, chorus::DataType::Float64, chorus::ReduceOp::Sum)
            .wait();
      else
        comm.allreduce(sum, sum, 1, chorus::DataType::Float64, chorus::ReduceOp::Sum);
      const double elapsed = seconds_since(window_start);
      const double val = eval_now ? validation_loss(comm, model, corpus, o.eval_examples) : -1;
      if (lead) {
        std::printf("%6d  %10.4f  ", step, sum[0] / sum[1]);
        if (val >= 0) std::printf("%10.4f", val);
        else std::printf("%10s", "");
        std::printf("  %12.0f  %9.1f%%\n", static_cast<double>(window_examples) / elapsed,
                    100.0 * window_wait / elapsed);
        std::fflush(stdout);
      }
      window_loss = window_wait = 0;
      window_examples = 0;
      window_start = Clock::now();
    }
  }
  const double total = seconds_since(t0);

  // 6. Uneven: out of data. Stand in until every rank is, then take the
  // parameters of the rank that trained longest.
  if (uneven) {
    const int last = engine.join();
    comm.broadcast(model.params(), model.params(), P, chorus::DataType::Float32, last);
    const double val = validation_loss(comm, model, corpus, o.eval_examples);
    if (lead)
      std::printf("\nrank %d joined last (%d steps); its parameters broadcast; val loss %.4f\n",
                  last, std::max(0, o.steps - o.uneven * last), val);
  }

  // The replicas must still be equal.
  std::vector<std::uint64_t> hashes(w);
  const std::uint64_t mine = hash_of(model.params(), P);
  comm.allgather(&mine, hashes.data(), 1, chorus::DataType::UInt64);
  for (std::size_t k = 0; k < w; ++k)
    if (hashes[k] != hashes[0]) {
      if (lead)
        std::fprintf(stderr, "trainer: the replicas diverged: rank %zu's parameters differ from rank "
                     "0's\n", k);
      return 2;
    }
  if (lead) {
    std::printf("\n%d steps in %.1f s; the %d replicas are equal (parameter hash %016" PRIx64 ")\n",
                o.steps, total, world, mine);
    if (o.engine) {
      const chorus::EngineStats st = engine.stats();
      std::printf("engine: %" PRIu64 " tensors in %" PRIu64 " allreduces (%" PRIu64
                  " fused), %" PRIu64 " agreed on by the cache alone, %" PRIu64
                  " cycles%s%s\n",
                  st.tensors, st.collectives, st.fused, st.cache_hits, st.cycles,
                  o.timeline.empty() ? "" : "; timeline in ", o.timeline.c_str());
    }
    if (o.sample > 0)
      std::printf("\nsample (the first %zu bytes are the validation text's):\n%s\n", C,
                  sample_text(model, corpus, o.sample, o.seed).c_str());
    if (!o.save.empty()) {
      std::ofstream out(o.save, std::ios::binary);
      out.write(reinterpret_cast<const char*>(model.params()),
                static_cast<std::streamsize>(P * sizeof(float)));
      if (!out) throw std::runtime_error("cannot write " + o.save);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  chorus::cli::Parser app{
      "Chorus reference trainer: a character-level language model trained data-parallel, "
      "gradients averaged through Chorus. Run it under chorusrun."};
  app.add("--steps", o.steps, "training steps").non_negative();
  app.add("--batch", o.batch, "global batch (examples per step, over all ranks)").positive();
  app.add("--lr", o.lr, "Adam learning rate").positive();
  app.add("--context", o.shape.context, "bytes of context").range(1, 64);
  app.add("--embed", o.shape.embed, "embedding width").range(1, 256);
  app.add("--hidden", o.shape.hidden, "hidden units").range(1, 4096);
  app.add("--seed", o.seed, "seed of the initial parameters and of the batches");
  app.add("--text", o.text, "text files or directories (default: /usr/share/common-licenses)");
  app.add("--log-every", o.log_every, "steps between lines").positive();
  app.add("--eval-every", o.eval_every, "steps between validation losses").positive();
  app.add("--eval-examples", o.eval_examples, "validation examples evaluated").positive();
  app.add("--sample", o.sample, "bytes of text to generate at the end (0: none)");
  bool no_overlap = false;
  app.flag("--no-overlap", no_overlap,
           "average the whole gradient after backward instead of layer by layer during it");
  app.flag("--engine", o.engine,
           "average the gradients as named tensors through chorus::Engine (docs/engine.md)");
  app.add("--uneven", o.uneven,
          "with --engine: rank r runs this many steps fewer per rank (uneven shards); the ranks "
          "out of data join the engine")
      .non_negative();
  app.flag("--shard", o.shard,
           "ZeRO stage 1: each rank keeps Adam's state for 1/n of the parameters; the gradient "
           "is reduce-scattered (reduce_scatterv) and the parameters allgathered (allgatherv)");
  app.add("--timeline", o.timeline,
          "with --engine: rank 0 writes the engine's timeline (Chrome trace) here");
  app.add("--save", o.save, "write the final parameters (raw float32) to this file");
  if (const std::optional<int> status = app.parse(argc, argv)) return *status;
  o.overlap = !no_overlap;
  try {
    return train(o);
  } catch (const chorus::Error& e) {
    std::fprintf(stderr, "trainer: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "trainer: %s\n", e.what());
    return 1;
  }
}
