#pragma once

// The registry behind chorus::mem_alloc: which address ranges are shared
// mappings (memfds) that another rank of the host can map, for the shm
// transport's single-copy path.

#include <cstddef>
#include <cstdint>
#include <optional>

namespace chorus::detail {

struct SharedRange {
  int fd = -1;             // this process's memfd of the region
  std::uint64_t id = 0;    // unique in this process, never reused
  std::size_t offset = 0;  // of the queried address within the region
  std::size_t size = 0;    // of the region
};

// The region that holds all of [p, p + bytes), if one does.
std::optional<SharedRange> find_shared(const void* p, std::size_t bytes);

}  // namespace chorus::detail
