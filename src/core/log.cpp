#include "core/log.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <unistd.h>

namespace chorus::log {
namespace {

Level parse_level() {
  const char* v = std::getenv("CHORUS_DEBUG");
  if (v == nullptr || *v == '\0') return Level::Warn;
  if (!std::strcmp(v, "off") || !std::strcmp(v, "none") || !std::strcmp(v, "0")) return Level::Off;
  if (!std::strcmp(v, "warn")) return Level::Warn;
  if (!std::strcmp(v, "info") || !std::strcmp(v, "1")) return Level::Info;
  if (!std::strcmp(v, "trace") || !std::strcmp(v, "2")) return Level::Trace;
  std::fprintf(stderr, "chorus WARN: CHORUS_DEBUG=%s not understood (off|warn|info|trace); using warn\n", v);
  return Level::Warn;
}

std::atomic<int> g_rank{-1};

}  // namespace

Level level() noexcept {
  static const Level l = parse_level();
  return l;
}

void set_rank(int rank) noexcept { g_rank.store(rank, std::memory_order_relaxed); }

void write(Level lvl, const std::string& message) {
  static const char* kNames[] = {"", "WARN", "INFO", "TRACE"};
  static std::mutex mu;
  const auto now = std::chrono::duration_cast<std::chrono::microseconds>(
                       std::chrono::steady_clock::now().time_since_epoch())
                       .count();
  char prefix[96];
  const int r = g_rank.load(std::memory_order_relaxed);
  if (r >= 0)
    std::snprintf(prefix, sizeof prefix, "chorus[%d] %s %lld.%06lld pid %d: ", r,
                  kNames[static_cast<int>(lvl)], static_cast<long long>(now / 1000000),
                  static_cast<long long>(now % 1000000), static_cast<int>(getpid()));
  else
    std::snprintf(prefix, sizeof prefix, "chorus %s pid %d: ", kNames[static_cast<int>(lvl)],
                  static_cast<int>(getpid()));
  std::lock_guard<std::mutex> lock(mu);
  std::fprintf(stderr, "%s%s\n", prefix, message.c_str());
}

}  // namespace chorus::log
