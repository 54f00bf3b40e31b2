// The reference trainer's model: a character-level language model in the
// style of Bengio et al. (2003). It reads the previous `context` bytes of a
// text, looks each up in an embedding table, and predicts the next byte with
// one tanh hidden layer and a softmax:
//
//   x      = [E[c_1], ..., E[c_C]]            (C*D)
//   h      = tanh(x W1 + b1)                  (H)
//   logits = h W2 + b2                        (V)
//   loss   = -log softmax(logits)[next byte]
//
// Everything is written out by hand (forward, backward, Adam), in one flat
// parameter vector, so that a reader sees every number that crosses the wire.
// The parameters are laid out in the order backward produces their gradients
// (output layer first, embedding last): each layer's gradient is a contiguous
// span that can be averaged while backward goes on (trainer.cpp).
//
// T is float in the trainer; the tests check the gradients in double.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <vector>

namespace trainer {

struct Shape {
  std::size_t vocab = 0;     // V: distinct bytes of the text
  std::size_t context = 8;   // C: bytes read before the one predicted
  std::size_t embed = 16;    // D: embedding width
  std::size_t hidden = 256;  // H: hidden units
};

// One span of the flat parameter (and gradient) vector.
struct Span {
  const char* name;
  std::size_t offset;
  std::size_t size;
};

// A small deterministic generator (splitmix64): the same seed gives the same
// numbers on every rank and every build, which data parallelism relies on.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : s_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (s_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1).
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  // Uniform in [0, n).
  std::size_t below(std::size_t n) { return static_cast<std::size_t>(uniform() * static_cast<double>(n)); }

 private:
  std::uint64_t s_;
};

template <typename T>
class Model {
 public:
  explicit Model(const Shape& s) : s_(s) {
    if (s.vocab < 2 || s.context == 0 || s.embed == 0 || s.hidden == 0)
      throw std::invalid_argument("model shape: every dimension must be positive (vocab >= 2)");
    const std::size_t cd = s.context * s.embed;
    std::size_t at = 0;
    auto add = [&](const char* name, std::size_t n) {
      spans_.push_back(Span{name, at, n});
      at += n;
    };
    add("W2", s.hidden * s.vocab);
    add("b2", s.vocab);
    add("W1", cd * s.hidden);
    add("b1", s.hidden);
    add("E", s.vocab * s.embed);
    params_.assign(at, T(0));
  }

  const Shape& shape() const { return s_; }
  std::size_t size() const { return params_.size(); }
  T* params() { return params_.data(); }
  const T* params() const { return params_.data(); }
  const std::vector<Span>& spans() const { return spans_; }

  // Xavier-uniform hidden weights, a small output layer (so that the first
  // loss is close to log V: every byte equally likely), unit-scale embeddings.
  void init(std::uint64_t seed) {
    Rng rng(seed);
    auto fill = [&](const Span& sp, double scale) {
      for (std::size_t i = 0; i < sp.size; ++i)
        params_[sp.offset + i] = static_cast<T>((2 * rng.uniform() - 1) * scale);
    };
    const double cd = static_cast<double>(s_.context * s_.embed);
    const double h = static_cast<double>(s_.hidden);
    fill(spans_[0], 0.01);                          // W2
    fill(spans_[2], std::sqrt(6.0 / (cd + h)));     // W1
    fill(spans_[4], 1.0);                           // E
  }

  // Forward over `n` examples: contexts[i*C .. i*C+C) are the bytes before
  // example i. Leaves the activations, and the probabilities of the next
  // byte in probs() (n rows of V).
  void forward(const std::uint8_t* contexts, std::size_t n) {
    const std::size_t V = s_.vocab, C = s_.context, D = s_.embed, H = s_.hidden, CD = C * D;
    const T* W2 = params_.data() + spans_[0].offset;
    const T* b2 = params_.data() + spans_[1].offset;
    const T* W1 = params_.data() + spans_[2].offset;
    const T* b1 = params_.data() + spans_[3].offset;
    const T* E = params_.data() + spans_[4].offset;
    x_.resize(n * CD);
    h_.resize(n * H);
    p_.resize(n * V);
    // x: the embeddings of the context bytes, side by side.
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t c = 0; c < C; ++c) {
        const std::size_t b = contexts[i * C + c];
        if (b >= V) throw std::out_of_range("context byte outside the vocabulary");
        std::copy(E + b * D, E + b * D + D, x_.data() + i * CD + c * D);
      }
    for (std::size_t i = 0; i < n; ++i) {
      // h = tanh(x W1 + b1)
      T* hi = h_.data() + i * H;
      std::copy(b1, b1 + H, hi);
      const T* xi = x_.data() + i * CD;
      for (std::size_t k = 0; k < CD; ++k) {
        const T xk = xi[k];
        const T* w = W1 + k * H;
        for (std::size_t j = 0; j < H; ++j) hi[j] += xk * w[j];
      }
      for (std::size_t j = 0; j < H; ++j) hi[j] = std::tanh(hi[j]);
      // p = softmax(h W2 + b2)
      T* pi = p_.data() + i * V;
      std::copy(b2, b2 + V, pi);
      for (std::size_t j = 0; j < H; ++j) {
        const T hj = hi[j];
        const T* w = W2 + j * V;
        for (std::size_t v = 0; v < V; ++v) pi[v] += hj * w[v];
      }
      const T mx = *std::max_element(pi, pi + V);
      T sum = 0;
      for (std::size_t v = 0; v < V; ++v) sum += (pi[v] = std::exp(pi[v] - mx));
      for (std::size_t v = 0; v < V; ++v) pi[v] /= sum;
    }
  }
  const T* probs() const { return p_.data(); }

  // Forward and backward over `n` examples: contexts as in forward(), and
  // targets[i] the byte that follows. Adds d(sum of losses)/d(params) *
  // grad_scale to `grad` (size() elements) and returns the sum of the
  // losses. With grad_scale = 1/B for a global batch of B examples split over
  // the ranks, the sum over the ranks of their gradients is the gradient of
  // the batch's mean loss.
  double forward_backward(const std::uint8_t* contexts, const std::uint8_t* targets, std::size_t n,
                          T* grad, T grad_scale) {
    const std::size_t V = s_.vocab, C = s_.context, D = s_.embed, H = s_.hidden, CD = C * D;
    forward(contexts, n);
    const T* W2 = params_.data() + spans_[0].offset;
    const T* W1 = params_.data() + spans_[2].offset;
    T* gW2 = grad + spans_[0].offset;
    T* gb2 = grad + spans_[1].offset;
    T* gW1 = grad + spans_[2].offset;
    T* gb1 = grad + spans_[3].offset;
    T* gE = grad + spans_[4].offset;
    dh_.resize(n * H);
    dx_.resize(n * CD);
    // The loss; p becomes dlogits = (p - onehot(target)) * scale.
    double loss = 0;
    for (std::size_t i = 0; i < n; ++i) {
      T* pi = p_.data() + i * V;
      const std::size_t y = targets[i];
      if (y >= V) throw std::out_of_range("target byte outside the vocabulary");
      loss -= std::log(std::max(static_cast<double>(pi[y]), 1e-300));
      for (std::size_t v = 0; v < V; ++v) pi[v] *= grad_scale;
      pi[y] -= grad_scale;
    }
    // Output layer: gW2 += h^T dlogits, gb2 += sum dlogits, dh = dlogits W2^T.
    for (std::size_t i = 0; i < n; ++i) {
      const T* pi = p_.data() + i * V;
      const T* hi = h_.data() + i * H;
      T* dhi = dh_.data() + i * H;
      for (std::size_t v = 0; v < V; ++v) gb2[v] += pi[v];
      for (std::size_t j = 0; j < H; ++j) {
        T* g = gW2 + j * V;
        const T* w = W2 + j * V;
        const T hj = hi[j];
        T acc = 0;
        for (std::size_t v = 0; v < V; ++v) {
          g[v] += hj * pi[v];
          acc += pi[v] * w[v];
        }
        dhi[j] = acc * (1 - hj * hj);  // through tanh
      }
    }
    if (after_output_) after_output_();
    // Hidden layer: gW1 += x^T dpre, gb1 += sum dpre, dx = dpre W1^T.
    for (std::size_t i = 0; i < n; ++i) {
      const T* di = dh_.data() + i * H;
      const T* xi = x_.data() + i * CD;
      T* dxi = dx_.data() + i * CD;
      for (std::size_t j = 0; j < H; ++j) gb1[j] += di[j];
      for (std::size_t k = 0; k < CD; ++k) {
        T* g = gW1 + k * H;
        const T* w = W1 + k * H;
        const T xk = xi[k];
        T acc = 0;
        for (std::size_t j = 0; j < H; ++j) {
          g[j] += xk * di[j];
          acc += di[j] * w[j];
        }
        dxi[k] = acc;
      }
    }
    if (after_hidden_) after_hidden_();
    // Embedding: each context byte's row gets its slice of dx.
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t c = 0; c < C; ++c) {
        T* g = gE + static_cast<std::size_t>(contexts[i * C + c]) * D;
        const T* d = dx_.data() + i * CD + c * D;
        for (std::size_t e = 0; e < D; ++e) g[e] += d[e];
      }
    return loss;
  }

  // The sum of the losses of `n` examples, without gradients.
  double loss(const std::uint8_t* contexts, const std::uint8_t* targets, std::size_t n) {
    forward(contexts, n);
    double sum = 0;
    for (std::size_t i = 0; i < n; ++i)
      sum -= std::log(std::max(static_cast<double>(p_[i * s_.vocab + targets[i]]), 1e-300));
    return sum;
  }

  // Called when backward has finished the output layer's gradient (spans 0
  // and 1), then the hidden layer's (spans 2 and 3): the trainer starts
  // averaging them while backward goes on.
  template <typename F>
  void on_output_done(F f) { after_output_ = f; }
  template <typename F>
  void on_hidden_done(F f) { after_hidden_ = f; }

 private:
  Shape s_;
  std::vector<Span> spans_;
  std::vector<T> params_;
  std::vector<T> x_, h_, p_, dh_, dx_;  // activations of the last batch
  std::function<void()> after_output_, after_hidden_;
};

// Adam (Kingma & Ba), with bias correction, over the flat parameter vector.
template <typename T>
class Adam {
 public:
  Adam(std::size_t n, double lr, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8)
      : lr_(lr), b1_(beta1), b2_(beta2), eps_(eps), m_(n, 0.0), v_(n, 0.0) {}
  void step(T* params, const T* grad) {
    ++t_;
    const double c1 = 1 - std::pow(b1_, static_cast<double>(t_));
    const double c2 = 1 - std::pow(b2_, static_cast<double>(t_));
    for (std::size_t i = 0; i < m_.size(); ++i) {
      const double g = static_cast<double>(grad[i]);
      m_[i] = b1_ * m_[i] + (1 - b1_) * g;
      v_[i] = b2_ * v_[i] + (1 - b2_) * g * g;
      const double mh = m_[i] / c1, vh = v_[i] / c2;
      params[i] = static_cast<T>(static_cast<double>(params[i]) - lr_ * mh / (std::sqrt(vh) + eps_));
    }
  }
  void set_lr(double lr) { lr_ = lr; }

 private:
  double lr_, b1_, b2_, eps_;
  std::uint64_t t_ = 0;
  std::vector<double> m_, v_;
};

}  // namespace trainer
