#pragma once

// The engine's timeline: Chrome's trace event format (a JSON array, one
// event per line; chrome://tracing and https://ui.perfetto.dev open it).
// Each tensor name is a "process" row, as in Horovod's timeline; its
// negotiation, the ranks' arrivals, and the phases of its collective are
// events on that row. Written by rank 0's engine thread only. The closing
// bracket is optional in this format, so a job killed midway leaves a
// readable file; every cycle's events are flushed.

#include <cstdint>
#include <cstdio>
#include <string>
#include <unordered_map>

namespace chorus::detail {

class Timeline {
 public:
  Timeline() = default;
  Timeline(const Timeline&) = delete;
  Timeline& operator=(const Timeline&) = delete;
  ~Timeline();

  // Throws Error(System) naming the path when it cannot be written.
  void start(const std::string& path);
  bool open() const { return f_ != nullptr; }
  // A phase of `tensor` from `ts_us` lasting `dur_us`; `args` is the inside
  // of a JSON object ("" for none).
  void complete(const std::string& tensor, const std::string& phase, std::int64_t ts_us,
                std::int64_t dur_us, const std::string& args);
  // A moment on `tensor`'s row.
  void instant(const std::string& tensor, const std::string& what, std::int64_t ts_us);
  void flush();

  // `text` as a JSON string literal (quotes included).
  static std::string quote(const std::string& text);

 private:
  int row(const std::string& tensor);
  void event(const std::string& body);

  std::FILE* f_ = nullptr;
  std::unordered_map<std::string, int> rows_;
  bool first_ = true;
};

}  // namespace chorus::detail
