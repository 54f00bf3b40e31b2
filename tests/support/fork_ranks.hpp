#pragma once

// Forks one process per rank for the tests whose ranks simply run to an exit
// code (tests/engine, tests/cuda). Ranks are processes, not threads: the
// library's transports pair processes, and a child forked by a parent that
// has no threads of its own inherits no held lock. The fault tests, which
// signal their ranks and read timed reports, have their own harness
// (tests/faults/fault_harness.hpp).

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <iostream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace chorus_test {

// Forks `n` ranks, each running body(rank, n, dir), where `dir` is a fresh
// directory they share (a FileStore's, say), removed afterwards. Returns
// each rank's exit code: body's return value (capped at 100; 99 when it
// threw), or -1 when the rank was killed by a signal or was still running
// at `limit` (it is then killed).
template <typename Body>
std::vector<int> fork_ranks(int n, Body body, std::chrono::seconds limit,
                            const char* dir_prefix = "chorus-test") {
  std::string tmpl = "/tmp/" + std::string(dir_prefix) + "-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) {
    std::perror("mkdtemp");
    return std::vector<int>(static_cast<std::size_t>(n), -1);
  }
  const std::string dir = tmpl;
  std::vector<pid_t> pids;
  for (int r = 0; r < n; ++r) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      int rc = 1;
      try {
        rc = body(r, n, dir);
      } catch (const std::exception& e) {
        std::cerr << "rank " << r << ": " << e.what() << "\n";
        rc = 99;
      }
      std::fflush(nullptr);
      std::_Exit(std::clamp(rc, 0, 100));
    }
    pids.push_back(pid);  // -1 (fork failed): that rank reports -1
  }
  std::vector<int> codes(static_cast<std::size_t>(n), -1);
  const auto deadline = std::chrono::steady_clock::now() + limit;
  int left = 0;
  for (pid_t p : pids) left += p > 0 ? 1 : 0;
  while (left > 0 && std::chrono::steady_clock::now() < deadline) {
    for (std::size_t r = 0; r < pids.size(); ++r) {
      int status = 0;
      if (pids[r] > 0 && ::waitpid(pids[r], &status, WNOHANG) == pids[r]) {
        codes[r] = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        pids[r] = 0;
        --left;
      }
    }
    if (left > 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  for (pid_t p : pids)
    if (p > 0) {
      ::kill(p, SIGKILL);
      ::waitpid(p, nullptr, 0);
    }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return codes;
}

}  // namespace chorus_test
