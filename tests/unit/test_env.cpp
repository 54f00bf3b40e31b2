// launch_info_from_env and resolve_settings against fake environments.

#include <chorus/communicator.hpp>

#include "core/config.hpp"

#include <gtest/gtest.h>

#include <map>
#include <string>

namespace {

using chorus::ErrorCode;

struct FakeEnv {
  std::map<std::string, std::string> vars;
  std::function<const char*(const char*)> fn() const {
    return [this](const char* name) -> const char* {
      auto it = vars.find(name);
      return it == vars.end() ? nullptr : it->second.c_str();
    };
  }
};

ErrorCode code_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const chorus::Error& e) {
    return e.code();
  }
  ADD_FAILURE() << "no chorus::Error thrown";
  return ErrorCode::Internal;
}

TEST(LaunchInfo, ChorusVariables) {
  FakeEnv env{{{"CHORUS_RANK", "3"}, {"CHORUS_WORLD_SIZE", "8"}, {"CHORUS_STORE", "10.1.2.3:4567"},
               {"CHORUS_LOCAL_RANK", "1"}, {"CHORUS_STORE_EXTERNAL", "1"}}};
  const auto info = chorus::launch_info_from_env(env.fn());
  EXPECT_EQ(info.rank, 3);
  EXPECT_EQ(info.size, 8);
  EXPECT_EQ(info.store_host, "10.1.2.3");
  EXPECT_EQ(info.store_port, 4567);
  EXPECT_EQ(info.local_rank, 1);
  EXPECT_TRUE(info.store_external);
  EXPECT_EQ(info.source, "chorus");
}

TEST(LaunchInfo, Torchrun) {
  FakeEnv env{{{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "node0"}, {"MASTER_PORT", "29500"},
               {"LOCAL_RANK", "1"}}};
  const auto info = chorus::launch_info_from_env(env.fn());
  EXPECT_EQ(info.source, "torchrun");
  EXPECT_EQ(info.rank, 1);
  EXPECT_EQ(info.size, 2);
  EXPECT_EQ(info.store_host, "node0");
  EXPECT_EQ(info.store_port, 29500);
  EXPECT_EQ(info.local_rank, 1);
  EXPECT_FALSE(info.store_external);
}

TEST(LaunchInfo, MpirunPmiSlurm) {
  FakeEnv ompi{{{"OMPI_COMM_WORLD_RANK", "5"}, {"OMPI_COMM_WORLD_SIZE", "6"},
                {"OMPI_COMM_WORLD_LOCAL_RANK", "2"}, {"CHORUS_STORE", "h:1"}}};
  auto info = chorus::launch_info_from_env(ompi.fn());
  EXPECT_EQ(info.source, "mpirun");
  EXPECT_EQ(info.rank, 5);
  EXPECT_EQ(info.size, 6);
  EXPECT_EQ(info.local_rank, 2);

  FakeEnv pmi{{{"PMI_RANK", "0"}, {"PMI_SIZE", "4"}}};
  info = chorus::launch_info_from_env(pmi.fn());
  EXPECT_EQ(info.source, "pmi");
  EXPECT_EQ(info.size, 4);
  EXPECT_TRUE(info.store_host.empty());

  FakeEnv slurm{{{"SLURM_PROCID", "7"}, {"SLURM_NTASKS", "16"}, {"SLURM_LOCALID", "3"},
                 {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "1234"}}};
  info = chorus::launch_info_from_env(slurm.fn());
  EXPECT_EQ(info.source, "slurm");
  EXPECT_EQ(info.rank, 7);
  EXPECT_EQ(info.local_rank, 3);
  EXPECT_EQ(info.store_port, 1234);
}

TEST(LaunchInfo, ChorusWinsOverOthers) {
  FakeEnv env{{{"CHORUS_RANK", "0"}, {"CHORUS_WORLD_SIZE", "2"}, {"RANK", "1"}, {"WORLD_SIZE", "9"}}};
  const auto info = chorus::launch_info_from_env(env.fn());
  EXPECT_EQ(info.source, "chorus");
  EXPECT_EQ(info.size, 2);
}

TEST(LaunchInfo, Errors) {
  EXPECT_EQ(code_of([] { chorus::launch_info_from_env(FakeEnv{}.fn()); }), ErrorCode::InvalidUsage);
  const std::map<std::string, std::string> bad[] = {
      {{"CHORUS_RANK", "1"}},                                       // size missing
      {{"CHORUS_RANK", "2"}, {"CHORUS_WORLD_SIZE", "2"}},           // rank >= size
      {{"CHORUS_RANK", "-1"}, {"CHORUS_WORLD_SIZE", "2"}},          // negative
      {{"CHORUS_RANK", "x"}, {"CHORUS_WORLD_SIZE", "2"}},           // not a number
      {{"CHORUS_RANK", "0"}, {"CHORUS_WORLD_SIZE", "0"}},           // empty world
      {{"CHORUS_RANK", "0"}, {"CHORUS_WORLD_SIZE", "2"}, {"CHORUS_STORE", "nohostport"}},
      {{"CHORUS_RANK", "0"}, {"CHORUS_WORLD_SIZE", "2"}, {"CHORUS_STORE", "h:70000"}},
      {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}},   // port missing
      {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "99999"}},
  };
  for (const auto& vars : bad) {
    FakeEnv env{vars};
    EXPECT_EQ(code_of([&] { chorus::launch_info_from_env(env.fn()); }), ErrorCode::InvalidArgument)
        << "vars: " << vars.begin()->first << "=" << vars.begin()->second;
  }
}

TEST(Settings, DefaultsAndEnvironment) {
  FakeEnv none;
  auto s = chorus::resolve_settings({}, none.fn());
  EXPECT_EQ(s.timeout, std::chrono::seconds(300));
  EXPECT_EQ(s.transport, "auto");
  EXPECT_EQ(s.spin, std::chrono::microseconds(100));
  EXPECT_EQ(s.cpu_bind, "auto");
  EXPECT_EQ(s.shm_large, "auto");
  EXPECT_EQ(s.shm_mapped_min, 16u << 20);
  EXPECT_EQ(s.shm_split, "on");
  EXPECT_EQ(s.fi_rma, "auto");
  EXPECT_EQ(s.llc_bytes, 0u);  // read from sysfs at creation
  EXPECT_EQ(s.cuda_staged_reduce, "cpu");

  FakeEnv rma{{{"CHORUS_FI_RMA", "off"}}};
  EXPECT_EQ(chorus::resolve_settings({}, rma.fn()).fi_rma, "off");
  FakeEnv gpu_reduce{{{"CHORUS_CUDA_STAGED_REDUCE", "gpu"}}};
  EXPECT_EQ(chorus::resolve_settings({}, gpu_reduce.fn()).cuda_staged_reduce, "gpu");

  FakeEnv env{{{"CHORUS_TIMEOUT", "2.5"}, {"CHORUS_TRANSPORT", "xyz"}, {"CHORUS_SPIN_US", "7"},
               {"CHORUS_CHUNK_BYTES", "64K"}, {"CHORUS_SOCKET_BUFFER", "4M"},
               {"CHORUS_SOCKET_IFNAME", "eth9"}, {"CHORUS_CPU_BIND", "0,1"},
               {"CHORUS_SHM_MAPPED_MIN", "3M"}, {"CHORUS_SHM_SPLIT", "sender"},
               {"CHORUS_LLC_BYTES", "16M"}}};
  s = chorus::resolve_settings({}, env.fn());
  EXPECT_EQ(s.timeout, std::chrono::milliseconds(2500));
  EXPECT_EQ(s.transport, "xyz");
  EXPECT_EQ(s.spin, std::chrono::microseconds(7));
  EXPECT_EQ(s.chunk_bytes, 64u * 1024u);
  EXPECT_EQ(s.socket_buffer_bytes, 4u << 20);
  EXPECT_EQ(s.socket_ifname, "eth9");
  EXPECT_EQ(s.cpu_bind, "0,1");
  EXPECT_EQ(s.shm_mapped_min, 3u << 20);
  EXPECT_EQ(s.shm_split, "sender");
  EXPECT_EQ(s.llc_bytes, 16u << 20);

  // The Config passed in code wins over the environment.
  chorus::Config cfg;
  cfg.timeout = std::chrono::milliseconds(1234);
  cfg.transport = "tcp";
  s = chorus::resolve_settings(cfg, env.fn());
  EXPECT_EQ(s.timeout, std::chrono::milliseconds(1234));
  EXPECT_EQ(s.transport, "tcp");
}

TEST(Settings, Malformed) {
  const std::map<std::string, std::string> bad[] = {
      {{"CHORUS_TIMEOUT", "soon"}}, {{"CHORUS_TIMEOUT", "-3"}},     {{"CHORUS_TIMEOUT", "0"}},
      {{"CHORUS_SPIN_US", "-1"}},   {{"CHORUS_SPIN_US", "12abc"}},  {{"CHORUS_CHUNK_BYTES", "8"}},
      {{"CHORUS_CHUNK_BYTES", "1T"}}, {{"CHORUS_SOCKET_BUFFER", "-5"}}, {{"CHORUS_SHM_LARGE", "xpmem"}},
      {{"CHORUS_SHM_MAPPED_MIN", "lots"}}, {{"CHORUS_SHM_SPLIT", "yes"}},
      {{"CHORUS_CUDA_STAGED_REDUCE", "device"}},
      {{"CHORUS_ALGO", "allreduce:nonsense"}}, {{"CHORUS_ALGO", "allreduce"}},
      {{"CHORUS_ALGO", "frobnicate:ring"}}, {{"CHORUS_FI_RMA", "yes"}}, {{"CHORUS_FI_MR", "never"}},
      {{"CHORUS_LLC_BYTES", "1K"}}, {{"CHORUS_LLC_BYTES", "large"}},
  };
  for (const auto& vars : bad) {
    FakeEnv env{vars};
    try {
      chorus::resolve_settings({}, env.fn());
      ADD_FAILURE() << vars.begin()->first << "=" << vars.begin()->second << " was accepted";
    } catch (const chorus::Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::InvalidArgument);
      // The message names the variable so the user knows what to fix.
      EXPECT_NE(std::string(e.what()).find(vars.begin()->first), std::string::npos) << e.what();
    }
  }
}

TEST(Settings, DurationsAndBytes) {
  EXPECT_EQ(chorus::parse_duration("10s", "X"), std::chrono::seconds(10));
  EXPECT_EQ(chorus::parse_duration("500ms", "X"), std::chrono::milliseconds(500));
  EXPECT_EQ(chorus::parse_duration("2m", "X"), std::chrono::minutes(2));
  EXPECT_EQ(chorus::parse_bytes("3", "X"), 3u);
  EXPECT_EQ(chorus::parse_bytes("2K", "X"), 2048u);
  EXPECT_EQ(chorus::parse_bytes("1G", "X"), 1u << 30);
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
