#include "core/shared_memory.hpp"

#include <chorus/error.hpp>
#include <chorus/memory.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace chorus {
namespace {

struct Region {
  std::size_t size;
  int fd;
  std::uint64_t id;
};

struct Registry {
  std::mutex mu;
  std::map<std::uintptr_t, Region> by_base;  // base address -> region
  std::uint64_t next_id = 1;
};

Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: frees may come from static destructors
  return *r;
}

Error sys_error(const std::string& what, int err) {
  return Error(ErrorCode::System, what + ": " + std::strerror(err));
}

}  // namespace

void* mem_alloc(std::size_t bytes) {
  if (bytes == 0) throw Error(ErrorCode::InvalidArgument, "mem_alloc: 0 bytes");
  const long page = sysconf(_SC_PAGESIZE);
  const std::size_t size = (bytes + static_cast<std::size_t>(page) - 1) / page * page;
  const int fd = memfd_create("chorus-mem", MFD_CLOEXEC);
  if (fd < 0) throw sys_error("mem_alloc: memfd_create", errno);
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    const int err = errno;
    close(fd);
    throw sys_error("mem_alloc: ftruncate to " + std::to_string(size) + " bytes", err);
  }
  // Populated now: a first touch later costs ~10 us a page on these VMs, and
  // a shortage of memory shows here rather than as a SIGBUS in a collective.
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    close(fd);
    throw sys_error("mem_alloc: mmap of " + std::to_string(size) + " bytes", err);
  }
  // A shared mapping would stay shared with a child after fork() (its
  // writes landing in our buffer); private memory would be copied on write.
  // Neither is what a framework forking data-loader workers expects, so the
  // child gets no mapping at all, as RDMA-registered memory is treated.
  madvise(p, size, MADV_DONTFORK);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.by_base[reinterpret_cast<std::uintptr_t>(p)] = Region{size, fd, r.next_id++};
  return p;
}

void mem_free(void* ptr) {
  if (ptr == nullptr) return;
  Registry& r = registry();
  Region region{};
  {
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.by_base.find(reinterpret_cast<std::uintptr_t>(ptr));
    if (it == r.by_base.end())
      throw Error(ErrorCode::InvalidArgument,
                  "mem_free: the pointer was not returned by mem_alloc (or was already freed)");
    region = it->second;
    r.by_base.erase(it);
  }
  munmap(ptr, region.size);
  close(region.fd);
}

namespace detail {

std::optional<SharedRange> find_shared(const void* p, std::size_t bytes) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.by_base.upper_bound(a);
  if (it == r.by_base.begin()) return std::nullopt;
  --it;
  const std::uintptr_t base = it->first;
  const Region& g = it->second;
  if (a - base > g.size || bytes > g.size - (a - base)) return std::nullopt;
  return SharedRange{g.fd, g.id, static_cast<std::size_t>(a - base), g.size};
}

}  // namespace detail
}  // namespace chorus
