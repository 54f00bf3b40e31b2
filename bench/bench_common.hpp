#pragma once

// What every benchmark program here needs, chorus-bench and the peers of
// bench/compare alike (which do not link Chorus): touched buffers, sizes
// as nccl-tests writes them, the time column.

#include <cstddef>
#include <memory>
#include <string>

namespace chorus::bench {

// --- buffers ----------------------------------------------------------------

struct FreeDeleter {
  void operator()(void* p) const noexcept;
};
using Buffer = std::unique_ptr<unsigned char[], FreeDeleter>;
// Page-aligned buffer of `bytes`, every page written once: first-touch page
// faults would otherwise land inside the first timed iterations. With
// huge_pages (chorus-bench --huge-pages), buffers of 2 MiB and more are
// 2 MiB-aligned and advised MADV_HUGEPAGE (transparent huge pages, where
// the kernel's THP mode is "madvise" or "always").
Buffer allocate_touched(std::size_t bytes);
void set_huge_pages(bool on);
// Where allocate_touched() takes its memory from (and Buffer returns it):
// posix_memalign/free unless set (chorus-bench --registered: chorus::mem_alloc
// and chorus::mem_free). `alloc` must return page-aligned memory.
void set_allocator(void* (*alloc)(std::size_t), void (*release)(void*));

// --- sizes and table ----------------------------------------------------------

// Parses "8", "64K", "1M", "2G" (binary multiples, like nccl-tests; an
// optional trailing "B" or "iB" is accepted). Throws std::invalid_argument.
std::size_t parse_size(const std::string& text);

// The time column as nccl-tests prints it (fewer decimals for longer times).
std::string format_time_us(double us);

}  // namespace chorus::bench
