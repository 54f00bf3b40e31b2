// launch_info_from_env: rank, world size and rendezvous address from the
// conventions of the launchers people already use.

#include <chorus/communicator.hpp>

#include "core/enforce.hpp"
#include "core/net.hpp"

#include <cerrno>
#include <cstdlib>

namespace chorus {
namespace {

struct Env {
  const std::function<const char*(const char*)>& fn;
  const char* get(const char* name) const {
    const char* v = fn ? fn(name) : std::getenv(name);
    return (v != nullptr && *v != '\0') ? v : nullptr;
  }
};

int parse_int(const char* name, const char* v, int lo) {
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || errno != 0 || x < lo || x > 1'000'000)
    throw Error(ErrorCode::InvalidArgument, std::string(name) + "='" + v +
                                                "' is not an integer >= " + std::to_string(lo));
  return static_cast<int>(x);
}

bool truthy(const char* v) {
  if (v == nullptr) return false;
  const std::string s(v);
  return s == "1" || s == "true" || s == "yes" || s == "on";
}

}  // namespace

LaunchInfo launch_info_from_env(const std::function<const char*(const char*)>& getenv) {
  const Env env{getenv};
  struct Convention {
    const char* source;
    const char* rank;
    const char* size;
  };
  static constexpr Convention kConventions[] = {
      {"chorus", "CHORUS_RANK", "CHORUS_WORLD_SIZE"},
      {"torchrun", "RANK", "WORLD_SIZE"},
      {"mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"},
      {"pmi", "PMI_RANK", "PMI_SIZE"},
      {"slurm", "SLURM_PROCID", "SLURM_NTASKS"},
  };
  LaunchInfo info;
  for (const auto& c : kConventions) {
    const char* r = env.get(c.rank);
    const char* s = env.get(c.size);
    if (r == nullptr && s == nullptr) continue;
    if (r == nullptr || s == nullptr)
      throw Error(ErrorCode::InvalidArgument,
                  std::string(r ? c.rank : c.size) + " is set but " + (r ? c.size : c.rank) +
                      " is not; set both (the " + c.source + " convention)");
    info.rank = parse_int(c.rank, r, 0);
    info.size = parse_int(c.size, s, 1);
    if (info.rank >= info.size)
      throw Error(ErrorCode::InvalidArgument, std::string(c.rank) + "=" + r + " is not below " +
                                                  c.size + "=" + s);
    info.source = c.source;
    break;
  }
  if (info.source.empty())
    throw Error(ErrorCode::InvalidUsage,
                "no launcher environment found: set CHORUS_RANK, CHORUS_WORLD_SIZE and "
                "CHORUS_STORE=host:port, or start the job with chorusrun, torchrun, mpirun or srun");

  if (const char* st = env.get("CHORUS_STORE")) {
    auto [host, port] = net::parse_host_port(st);
    info.store_host = host;
    info.store_port = port;
  } else if (const char* addr = env.get("MASTER_ADDR")) {
    const char* port = env.get("MASTER_PORT");
    if (port == nullptr)
      throw Error(ErrorCode::InvalidArgument, "MASTER_ADDR is set but MASTER_PORT is not");
    info.store_host = addr;
    info.store_port = static_cast<std::uint16_t>(parse_int("MASTER_PORT", port, 1));
    if (info.store_port == 0 || parse_int("MASTER_PORT", port, 1) > 65535)
      throw Error(ErrorCode::InvalidArgument, std::string("MASTER_PORT='") + port + "' is not a port");
  }
  info.store_external = truthy(env.get("CHORUS_STORE_EXTERNAL"));
  for (const char* name : {"CHORUS_LOCAL_RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                           "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
    if (const char* v = env.get(name)) {
      info.local_rank = parse_int(name, v, 0);
      break;
    }
  }
  return info;
}

}  // namespace chorus
