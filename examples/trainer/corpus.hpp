// The reference trainer's data: bytes of text, as symbols of a small
// alphabet, split into a training part and a validation part.
//
// The default text is /usr/share/common-licenses: the licence texts every
// Debian system has (base-files is an essential package), about 250 KB of
// English. Every rank reads the same files (in a real job, a shared file
// system), so every rank has the same alphabet and the same examples.

#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace trainer {

struct Corpus {
  std::vector<std::string> files;       // what was read, in order
  std::vector<std::uint8_t> alphabet;   // symbol -> byte (the distinct bytes, ascending)
  std::vector<std::uint8_t> train;      // the first 90% of the text, as symbols
  std::vector<std::uint8_t> val;        // the last 10%
  std::size_t bytes = 0;
};

// Reads `paths` in order; a directory stands for its regular files (not its
// symbolic links, which there repeat other files), sorted by name.
inline Corpus load_corpus(const std::vector<std::string>& paths) {
  namespace fs = std::filesystem;
  Corpus c;
  std::string text;
  auto read = [&](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read " + p.string());
    text.append(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    c.files.push_back(p.string());
  };
  for (const std::string& path : paths) {
    const fs::path p(path);
    if (fs::is_directory(p)) {
      std::vector<fs::path> inside;
      for (const auto& e : fs::directory_iterator(p))
        if (e.is_regular_file() && !e.is_symlink()) inside.push_back(e.path());
      std::sort(inside.begin(), inside.end());
      for (const auto& f : inside) read(f);
    } else {
      read(p);
    }
  }
  if (text.size() < 1000)
    throw std::runtime_error("the text is too short to train on (" + std::to_string(text.size()) +
                             " bytes; at least 1000)");
  c.bytes = text.size();
  std::array<int, 256> symbol{};
  symbol.fill(-1);
  for (unsigned char ch : text) symbol[ch] = 0;
  for (int b = 0; b < 256; ++b)
    if (symbol[static_cast<std::size_t>(b)] == 0) {
      symbol[static_cast<std::size_t>(b)] = static_cast<int>(c.alphabet.size());
      c.alphabet.push_back(static_cast<std::uint8_t>(b));
    }
  const std::size_t n_val = text.size() / 10;
  const std::size_t n_train = text.size() - n_val;
  c.train.reserve(n_train);
  c.val.reserve(n_val);
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto s = static_cast<std::uint8_t>(symbol[static_cast<unsigned char>(text[i])]);
    (i < n_train ? c.train : c.val).push_back(s);
  }
  return c;
}

// The examples at positions `pos` of `seq`: the `context` symbols before
// each position, and the symbol at it (pos >= context).
inline void gather_examples(const std::vector<std::uint8_t>& seq, const std::size_t* pos,
                            std::size_t n, std::size_t context, std::vector<std::uint8_t>& ctx,
                            std::vector<std::uint8_t>& target) {
  ctx.resize(n * context);
  target.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    std::copy(seq.begin() + static_cast<std::ptrdiff_t>(pos[i] - context),
              seq.begin() + static_cast<std::ptrdiff_t>(pos[i]), ctx.begin() + static_cast<std::ptrdiff_t>(i * context));
    target[i] = seq[pos[i]];
  }
}

}  // namespace trainer
