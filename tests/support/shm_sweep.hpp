#pragma once

// What chorusrun does for a job whose ranks it killed, for the test
// harnesses that fork ranks themselves: a rank killed while it creates its
// communicator (before its peers have mapped its segment and it has
// unlinked the name) leaves its /dev/shm entries behind, and no survivor
// of that communicator is left to remove them. The names start with
// "chorus-p<pid>-" when CHORUS_JOB_ID is unset (transport::shm_name_prefix).
// The library's transport::remove_shm_files does the same sweep, but the
// shared library does not export it and these harnesses link only that.

#include <dirent.h>
#include <sys/mman.h>
#include <sys/types.h>

#include <string>

namespace chorus_test {

// Unlinks the /dev/shm entries of the killed rank process `pid`; returns how
// many.
inline int remove_shm_of_killed(pid_t pid) {
  const std::string prefix = "chorus-p" + std::to_string(pid) + "-";
  int removed = 0;
  DIR* d = ::opendir("/dev/shm");
  if (d == nullptr) return 0;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.rfind(prefix, 0) == 0 && ::shm_unlink(("/" + name).c_str()) == 0) ++removed;
  }
  ::closedir(d);
  return removed;
}

}  // namespace chorus_test
