// The reference trainer's model, optimizer and data (examples/trainer), each
// against an independent reference: finite differences for the gradients,
// closed forms for the first loss and Adam's first step, and the text itself
// for the corpus.

#include "corpus.hpp"
#include "model.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace {

using trainer::Model;
using trainer::Rng;
using trainer::Shape;

struct Batch {
  std::vector<std::uint8_t> ctx, tgt;
};

Batch random_batch(const Shape& s, std::size_t n, std::uint64_t seed) {
  Rng rng(seed);
  Batch b;
  for (std::size_t i = 0; i < n * s.context; ++i) b.ctx.push_back(static_cast<std::uint8_t>(rng.below(s.vocab)));
  for (std::size_t i = 0; i < n; ++i) b.tgt.push_back(static_cast<std::uint8_t>(rng.below(s.vocab)));
  return b;
}

// Every parameter's gradient equals the central difference of the loss, in
// double, on a model small enough to check them all. The output layer is
// scaled up from its near-zero start so that every layer's gradient matters.
TEST(TrainerModel, GradientsMatchFiniteDifferences) {
  const Shape s{5, 3, 2, 4};
  Model<double> m(s);
  m.init(7);
  Rng rng(11);
  for (std::size_t i = 0; i < m.spans()[0].size; ++i) m.params()[i] = 2 * rng.uniform() - 1;
  for (std::size_t i = 0; i < m.spans()[1].size; ++i) m.params()[m.spans()[1].offset + i] = rng.uniform() - 0.5;
  for (std::size_t i = 0; i < m.spans()[3].size; ++i) m.params()[m.spans()[3].offset + i] = rng.uniform() - 0.5;
  const std::size_t n = 6;
  const Batch b = random_batch(s, n, 3);
  std::vector<double> grad(m.size(), 0.0);
  const double scale = 1.0 / static_cast<double>(n);
  m.forward_backward(b.ctx.data(), b.tgt.data(), n, grad.data(), scale);
  const double eps = 1e-6;
  for (std::size_t i = 0; i < m.size(); ++i) {
    const double keep = m.params()[i];
    m.params()[i] = keep + eps;
    const double up = m.loss(b.ctx.data(), b.tgt.data(), n);
    m.params()[i] = keep - eps;
    const double down = m.loss(b.ctx.data(), b.tgt.data(), n);
    m.params()[i] = keep;
    const double numeric = (up - down) / (2 * eps) * scale;
    EXPECT_NEAR(grad[i], numeric, 1e-7 + 1e-5 * std::abs(numeric)) << "parameter " << i;
  }
}

// At initialisation the output layer is nearly zero: every byte is about
// equally likely, and the mean loss is about log V.
TEST(TrainerModel, FirstLossIsAboutLogV) {
  const Shape s{86, 8, 16, 64};
  Model<float> m(s);
  m.init(1);
  const std::size_t n = 500;
  const Batch b = random_batch(s, n, 5);
  const double mean = m.loss(b.ctx.data(), b.tgt.data(), n) / static_cast<double>(n);
  EXPECT_NEAR(mean, std::log(86.0), 0.05);
}

// Data parallelism's identity: the gradients of the shares of a batch, each
// scaled by 1/B, sum to the gradient of the whole batch. The layer hooks
// fire in backward's order, once each, and the output layer's gradient is
// final when its hook fires.
TEST(TrainerModel, SharesOfABatchSumToTheWholeBatchsGradient) {
  const Shape s{20, 4, 8, 32};
  Model<float> m(s);
  m.init(3);
  const std::size_t B = 30;
  const Batch b = random_batch(s, B, 9);
  std::vector<float> whole(m.size(), 0.0f);
  std::vector<int> order;
  std::vector<float> output_at_hook;
  const std::size_t out_end = m.spans()[1].offset + m.spans()[1].size;
  m.on_output_done([&] {
    order.push_back(1);
    output_at_hook.assign(whole.begin(), whole.begin() + static_cast<std::ptrdiff_t>(out_end));
  });
  m.on_hidden_done([&] { order.push_back(2); });
  m.forward_backward(b.ctx.data(), b.tgt.data(), B, whole.data(), 1.0f / B);
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
  for (std::size_t i = 0; i < out_end; ++i) ASSERT_EQ(output_at_hook[i], whole[i]) << i;
  m.on_output_done([] {});
  m.on_hidden_done([] {});
  std::vector<float> summed(m.size(), 0.0f);
  const std::size_t cuts[] = {0, 7, 19, 30};
  for (int k = 0; k < 3; ++k) {
    std::vector<float> part(m.size(), 0.0f);
    m.forward_backward(b.ctx.data() + cuts[k] * s.context, b.tgt.data() + cuts[k], cuts[k + 1] - cuts[k],
                       part.data(), 1.0f / B);
    for (std::size_t i = 0; i < m.size(); ++i) summed[i] += part[i];
  }
  double largest = 0;
  for (float g : whole) largest = std::max(largest, static_cast<double>(std::abs(g)));
  ASSERT_GT(largest, 1e-3);
  for (std::size_t i = 0; i < m.size(); ++i) EXPECT_NEAR(summed[i], whole[i], 1e-6 + 1e-4 * largest) << i;
}

// Adam's first step, bias-corrected, moves each parameter by lr * g/(|g| + eps):
// lr against the gradient's sign wherever the gradient is not tiny.
TEST(TrainerAdam, FirstStepIsLrAgainstTheGradientsSign) {
  std::vector<float> p{1.0f, -2.0f, 0.5f, 3.0f};
  const std::vector<float> g{0.25f, -4.0f, 1e-3f, 0.0f};
  trainer::Adam<float> adam(p.size(), 0.01);
  adam.step(p.data(), g.data());
  EXPECT_NEAR(p[0], 1.0 - 0.01, 1e-6);
  EXPECT_NEAR(p[1], -2.0 + 0.01, 1e-6);
  EXPECT_NEAR(p[2], 0.5 - 0.01 * 1e-3 / (1e-3 + 1e-8), 1e-6);
  EXPECT_EQ(p[3], 3.0f);
}

TEST(TrainerModel, RejectsBytesOutsideTheVocabulary) {
  const Shape s{4, 2, 2, 3};
  Model<float> m(s);
  m.init(1);
  std::vector<float> g(m.size());
  const std::uint8_t ctx[2] = {1, 4}, ok_ctx[2] = {1, 2}, tgt = 0, bad_tgt = 9;
  EXPECT_THROW(m.forward_backward(ctx, &tgt, 1, g.data(), 1.0f), std::out_of_range);
  EXPECT_THROW(m.forward_backward(ok_ctx, &bad_tgt, 1, g.data(), 1.0f), std::out_of_range);
  EXPECT_THROW(Model<float>(Shape{1, 2, 2, 3}), std::invalid_argument);
}

// The corpus: files of a directory in name order (its symbolic links left
// out), the distinct bytes as the alphabet, the last tenth for validation.
TEST(TrainerCorpus, ReadsSplitsAndEncodesTheText) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("chorus-corpus-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string a(600, 'a'), b = std::string(500, 'b') + "zy";
  std::ofstream(dir / "2-b") << b;
  std::ofstream(dir / "1-a") << a;
  fs::create_symlink(dir / "1-a", dir / "0-link");
  const trainer::Corpus c = trainer::load_corpus({dir.string()});
  const std::string text = a + b;
  EXPECT_EQ(c.files.size(), 2u);
  EXPECT_EQ(c.bytes, text.size());
  EXPECT_EQ(c.alphabet, (std::vector<std::uint8_t>{'a', 'b', 'y', 'z'}));
  EXPECT_EQ(c.val.size(), text.size() / 10);
  EXPECT_EQ(c.train.size() + c.val.size(), text.size());
  std::string back;
  for (auto s : c.train) back.push_back(static_cast<char>(c.alphabet[s]));
  for (auto s : c.val) back.push_back(static_cast<char>(c.alphabet[s]));
  EXPECT_EQ(back, text);
  // Too short a text is refused, naming its size.
  std::ofstream(dir / "short") << "tiny";
  try {
    trainer::load_corpus({(dir / "short").string()});
    ADD_FAILURE() << "a 4-byte text was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("4 bytes"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
