#pragma once

// Runs a probe in a forked child and returns what it reports. Test parents
// must not start threads (UCX) or initialise CUDA before they fork their
// ranks, so whatever needs either is asked in a child.

#include <sys/wait.h>
#include <unistd.h>

#include <optional>
#include <string>

namespace chorus_test {

// The text `probe` returned in the child (empty: nothing to report), or
// nothing when the child could not be run or did not exit normally.
template <typename F>
std::optional<std::string> probe_in_child(F probe) {
  int fds[2];
  if (pipe(fds) != 0) return std::nullopt;
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    const std::string text = probe();
    if (!text.empty()) [[maybe_unused]] auto w = write(fds[1], text.data(), text.size());
    _exit(0);
  }
  close(fds[1]);
  std::string out;
  char buf[512];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) out.append(buf, static_cast<std::size_t>(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return std::nullopt;
  return out;
}

}  // namespace chorus_test
