#pragma once

// Every tunable of a communicator, resolved once at creation from the Config
// passed by the caller, then the CHORUS_* environment, then the defaults.
// docs/tuning.md lists each variable; keep the two in step.

#include <chorus/communicator.hpp>

#include <chrono>
#include <cstddef>
#include <functional>
#include <string>

namespace chorus {

struct Settings {
  std::chrono::milliseconds timeout{std::chrono::seconds(300)};  // CHORUS_TIMEOUT (seconds)
  std::string transport = "auto";                                // CHORUS_TRANSPORT (auto: shm within a host, tcp between)
  std::string socket_ifname;                                     // CHORUS_SOCKET_IFNAME
  std::chrono::microseconds spin{100};                           // CHORUS_SPIN_US
  bool spin_from_env = false;  // CHORUS_SPIN_US was set (else adapted to oversubscription)
  std::size_t chunk_bytes = 512 << 10;                           // CHORUS_CHUNK_BYTES
  std::size_t socket_buffer_bytes = 0;                           // CHORUS_SOCKET_BUFFER (0 = OS default)
  std::string shm_large = "auto";                                // CHORUS_SHM_LARGE: auto|cma|copy
  std::size_t shm_mapped_min = 16 << 20;                         // CHORUS_SHM_MAPPED_MIN
  std::size_t shm_mapped_copy_min = 1 << 20;                     // CHORUS_SHM_MAPPED_COPY_MIN
  std::string shm_split = "on";                                  // CHORUS_SHM_SPLIT: on|off|sender
  std::size_t llc_bytes = 0;                                     // CHORUS_LLC_BYTES (0: the host's, from sysfs)
  std::string cpu_bind = "auto";                                 // CHORUS_CPU_BIND: auto|none|<cpu list>
  std::string algo;          // CHORUS_ALGO: "allreduce:ring,broadcast:binomial" (validated)
  std::string tuning_file;   // CHORUS_TUNING_FILE: alpha-beta model from chorus-bench --calibrate
  std::string fi_provider;   // CHORUS_FI_PROVIDER: libfabric provider (empty: the best offered)
  std::string fi_mr = "auto";  // CHORUS_FI_MR: auto|always (register memory only when the provider asks)
  std::string fi_rma = "auto";  // CHORUS_FI_RMA: auto|on|off (one-sided writes for large messages)
  // Device buffers (docs/cuda.md).
  bool cuda_ipc = true;                          // CHORUS_CUDA_IPC: 0 stages even within a host
  std::size_t cuda_stage_bytes = 4 << 20;        // CHORUS_CUDA_STAGE_BYTES: pinned staging chunk
  std::size_t cuda_one_shot_bytes = 256 << 10;   // CHORUS_CUDA_ONE_SHOT_BYTES
  std::size_t cuda_ipc_min_bytes = 0;            // CHORUS_CUDA_IPC_MIN_BYTES: smaller calls stage
  std::string cuda_staged_reduce = "cpu";        // CHORUS_CUDA_STAGED_REDUCE: cpu|gpu
};

using EnvLookup = std::function<const char*(const char*)>;

// Throws Error(InvalidArgument) naming the variable for malformed values.
Settings resolve_settings(const Config& config, const EnvLookup& getenv = nullptr);

// Parses "300", "2.5", "10s", "500ms" into milliseconds. Throws InvalidArgument naming `what`.
std::chrono::milliseconds parse_duration(const std::string& text, const char* what);
// Parses "65536", "64K", "1M", "1G" (binary units). Throws InvalidArgument naming `what`.
std::size_t parse_bytes(const std::string& text, const char* what);

}  // namespace chorus
