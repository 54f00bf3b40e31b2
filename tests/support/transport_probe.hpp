#pragma once

// Lets a test binary skip, with the reason, when CHORUS_TRANSPORT names a
// transport this machine lacks: not in this build, or its library finds no
// provider or device. Exit code 77 is meson's "skipped".

#include <chorus/communicator.hpp>
#include <chorus/error.hpp>
#include <chorus/store.hpp>

#include "child_probe.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>

namespace chorus_test {

// Why `transport` cannot run here, or nothing: not in this build, or its
// library finds no provider/device (a one-rank communicator fails with
// ErrorCode::Transport). Probed in a child process: the parent must stay
// single-threaded for the rank pools' fork() (UCX starts a thread).
inline std::optional<std::string> transport_unavailable(const std::string& transport) {
  const auto names = chorus::transport_names();
  if (std::find(names.begin(), names.end(), transport) == names.end()) {
    std::string have;
    for (const auto& n : names) have += " " + n;
    return "this build has no '" + transport + "' transport (it has:" + have +
           "); scripts/install-deps installs libfabric-dev and libucx-dev";
  }
  auto why = probe_in_child([&] {
    std::string text;
    try {
      char dir[] = "/tmp/chorus-probe-XXXXXX";
      if (mkdtemp(dir) == nullptr) return text;
      {
        auto store = std::make_shared<chorus::FileStore>(dir);
        chorus::Config cfg;
        cfg.transport = transport;
        auto comm = chorus::Communicator::create(0, 1, store, cfg);
      }
      std::system((std::string("rm -rf ") + dir).c_str());
    } catch (const chorus::Error& e) {
      if (e.code() == chorus::ErrorCode::Transport) text = e.what();
    } catch (...) {
    }
    return text;
  });
  if (why && !why->empty()) return why;
  return std::nullopt;
}

// True (after printing why) when the suite should exit with 77.
inline bool skip_unavailable_transport() {
  const char* tr = std::getenv("CHORUS_TRANSPORT");
  if (tr == nullptr || *tr == '\0' || std::string(tr) == "auto") return false;
  auto why = transport_unavailable(tr);
  if (!why) return false;
  std::printf("SKIP: transport %s unavailable: %s\n", tr, why->c_str());
  std::fflush(stdout);
  return true;
}

}  // namespace chorus_test
