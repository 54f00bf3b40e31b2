#include "core/config.hpp"

#include "algorithms/selector.hpp"

#include "core/enforce.hpp"

#include <cerrno>
#include <cmath>
#include <cstdlib>

namespace chorus {
namespace {

const char* lookup(const EnvLookup& getenv, const char* name) {
  const char* v = getenv ? getenv(name) : std::getenv(name);
  return (v != nullptr && *v != '\0') ? v : nullptr;
}

}  // namespace

std::chrono::milliseconds parse_duration(const std::string& text, const char* what) {
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  const std::string unit(end ? end : "");
  double ms = 0;
  if (unit.empty() || unit == "s") ms = v * 1000.0;
  else if (unit == "ms") ms = v;
  else if (unit == "m" || unit == "min") ms = v * 60000.0;
  else ms = -1;
  if (text.empty() || end == text.c_str() || errno != 0 || !std::isfinite(v) || ms <= 0 || ms > 1e12)
    throw Error(ErrorCode::InvalidArgument,
                std::string(what) + "='" + text +
                    "' is not a positive duration (seconds, e.g. 300, 2.5, 500ms, 10s)");
  return std::chrono::milliseconds(static_cast<long long>(std::ceil(ms)));
}

std::size_t parse_bytes(const std::string& text, const char* what) {
  errno = 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  std::string unit(end ? end : "");
  unsigned long long mult = 1;
  if (unit == "K" || unit == "k" || unit == "KiB") mult = 1ull << 10;
  else if (unit == "M" || unit == "m" || unit == "MiB") mult = 1ull << 20;
  else if (unit == "G" || unit == "g" || unit == "GiB") mult = 1ull << 30;
  else if (!unit.empty()) mult = 0;
  if (text.empty() || end == text.c_str() || text[0] == '-' || errno != 0 || mult == 0 ||
      v > (1ull << 50) / mult)
    throw Error(ErrorCode::InvalidArgument,
                std::string(what) + "='" + text + "' is not a byte count (e.g. 65536, 512K, 4M)");
  return static_cast<std::size_t>(v * mult);
}

// parse_bytes, then a lower bound.
std::size_t parse_bytes_min(const std::string& text, const char* what, std::size_t min) {
  const std::size_t b = parse_bytes(text, what);
  if (b < min)
    throw Error(ErrorCode::InvalidArgument,
                std::string(what) + " must be at least " + std::to_string(min));
  return b;
}

// A setting with two (or three) allowed words.
std::string one_of(const char* v, const char* what, const char* a, const char* b,
                   const char* c = nullptr) {
  const std::string s = v;
  if (s == a || s == b || (c != nullptr && s == c)) return s;
  const std::string q = "'";
  const std::string words =
      c ? q + a + "', '" + b + "' or '" + c + q : q + a + "' or '" + b + q;
  throw Error(ErrorCode::InvalidArgument, std::string(what) + "='" + s + "' must be " + words);
}

Settings resolve_settings(const Config& config, const EnvLookup& getenv) {
  Settings s;
  if (config.timeout.count() > 0) s.timeout = config.timeout;
  else if (const char* v = lookup(getenv, "CHORUS_TIMEOUT")) s.timeout = parse_duration(v, "CHORUS_TIMEOUT");

  if (!config.transport.empty()) s.transport = config.transport;
  else if (const char* v = lookup(getenv, "CHORUS_TRANSPORT")) s.transport = v;

  if (!config.socket_ifname.empty()) s.socket_ifname = config.socket_ifname;
  else if (const char* v = lookup(getenv, "CHORUS_SOCKET_IFNAME")) s.socket_ifname = v;

  if (const char* v = lookup(getenv, "CHORUS_SPIN_US")) {
    char* end = nullptr;
    errno = 0;
    const long us = std::strtol(v, &end, 10);
    if (*end != '\0' || errno != 0 || us < 0 || us > 10'000'000)
      throw Error(ErrorCode::InvalidArgument,
                  std::string("CHORUS_SPIN_US='") + v + "' must be microseconds in [0, 10000000]");
    s.spin = std::chrono::microseconds(us);
    s.spin_from_env = true;
  }
  if (const char* v = lookup(getenv, "CHORUS_CHUNK_BYTES"))
    s.chunk_bytes = parse_bytes_min(v, "CHORUS_CHUNK_BYTES", 64);
  if (const char* v = lookup(getenv, "CHORUS_SOCKET_BUFFER"))
    s.socket_buffer_bytes = parse_bytes(v, "CHORUS_SOCKET_BUFFER");
  if (const char* v = lookup(getenv, "CHORUS_CPU_BIND")) s.cpu_bind = v;
  if (const char* v = lookup(getenv, "CHORUS_SHM_LARGE"))
    s.shm_large = one_of(v, "CHORUS_SHM_LARGE", "auto", "cma", "copy");
  if (const char* v = lookup(getenv, "CHORUS_SHM_MAPPED_MIN"))
    s.shm_mapped_min = parse_bytes(v, "CHORUS_SHM_MAPPED_MIN");
  if (const char* v = lookup(getenv, "CHORUS_SHM_MAPPED_COPY_MIN"))
    s.shm_mapped_copy_min = parse_bytes(v, "CHORUS_SHM_MAPPED_COPY_MIN");
  if (const char* v = lookup(getenv, "CHORUS_LLC_BYTES"))
    s.llc_bytes = parse_bytes_min(v, "CHORUS_LLC_BYTES", 4096);
  if (const char* v = lookup(getenv, "CHORUS_SHM_SPLIT"))
    s.shm_split = one_of(v, "CHORUS_SHM_SPLIT", "on", "off", "sender");
  if (const char* v = lookup(getenv, "CHORUS_ALGO")) {
    algo::parse_algo_overrides(v, "CHORUS_ALGO");  // names checked now, not at the first call
    s.algo = v;
  }
  if (const char* v = lookup(getenv, "CHORUS_TUNING_FILE")) s.tuning_file = v;
  if (const char* v = lookup(getenv, "CHORUS_FI_PROVIDER")) s.fi_provider = v;
  if (const char* v = lookup(getenv, "CHORUS_FI_MR"))
    s.fi_mr = one_of(v, "CHORUS_FI_MR", "auto", "always");
  if (const char* v = lookup(getenv, "CHORUS_FI_RMA"))
    s.fi_rma = one_of(v, "CHORUS_FI_RMA", "auto", "on", "off");
  if (const char* v = lookup(getenv, "CHORUS_CUDA_IPC"))
    s.cuda_ipc = one_of(v, "CHORUS_CUDA_IPC", "0", "1") == "1";
  if (const char* v = lookup(getenv, "CHORUS_CUDA_STAGE_BYTES"))
    s.cuda_stage_bytes = parse_bytes_min(v, "CHORUS_CUDA_STAGE_BYTES", 4096);
  if (const char* v = lookup(getenv, "CHORUS_CUDA_ONE_SHOT_BYTES"))
    s.cuda_one_shot_bytes = parse_bytes(v, "CHORUS_CUDA_ONE_SHOT_BYTES");
  if (const char* v = lookup(getenv, "CHORUS_CUDA_IPC_MIN_BYTES"))
    s.cuda_ipc_min_bytes = parse_bytes(v, "CHORUS_CUDA_IPC_MIN_BYTES");
  if (const char* v = lookup(getenv, "CHORUS_CUDA_STAGED_REDUCE"))
    s.cuda_staged_reduce = one_of(v, "CHORUS_CUDA_STAGED_REDUCE", "cpu", "gpu");
  return s;
}

}  // namespace chorus
