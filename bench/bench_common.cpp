#include "bench_common.hpp"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>

#include <sys/mman.h>

namespace chorus::bench {

// --- buffers ----------------------------------------------------------------

namespace {
bool g_huge_pages = false;
void* (*g_alloc)(std::size_t) = nullptr;
void (*g_release)(void*) = nullptr;
}  // namespace

void FreeDeleter::operator()(void* p) const noexcept {
  if (g_release) g_release(p);
  else std::free(p);
}

void set_huge_pages(bool on) { g_huge_pages = on; }

void set_allocator(void* (*alloc)(std::size_t), void (*release)(void*)) {
  g_alloc = alloc;
  g_release = release;
}

Buffer allocate_touched(std::size_t bytes) {
  constexpr std::size_t kPage = 4096, kHuge = 2 << 20;
  const std::size_t align = g_huge_pages && bytes >= kHuge ? kHuge : kPage;
  const std::size_t rounded = std::max(align, (bytes + align - 1) / align * align);
  void* p = nullptr;
  if (g_alloc) {
    p = g_alloc(rounded);
    std::memset(p, 0, rounded);
    return Buffer(static_cast<unsigned char*>(p));
  }
  if (::posix_memalign(&p, align, rounded) != 0) throw std::bad_alloc();
  // Advice only: where THP is off the buffer keeps 4 KiB pages.
  if (align == kHuge) ::madvise(p, rounded, MADV_HUGEPAGE);
  std::memset(p, 0, rounded);
  return Buffer(static_cast<unsigned char*>(p));
}

// --- sizes and table ----------------------------------------------------------

std::size_t parse_size(const std::string& text) {
  std::size_t pos = 0;
  unsigned long long value = 0;
  try {
    if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) throw std::invalid_argument("");
    value = std::stoull(text, &pos, 10);
  } catch (const std::exception&) {
    throw std::invalid_argument("'" + text + "' is not a size (examples: 8, 64K, 1M, 2G)");
  }
  std::string suffix = text.substr(pos);
  for (char& c : suffix) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (suffix.size() >= 2 && suffix.substr(suffix.size() - 2) == "ib") suffix.resize(suffix.size() - 2);
  else if (suffix.size() >= 2 && suffix.back() == 'b') suffix.pop_back();
  int shift = 0;
  if (suffix.empty() || suffix == "b") shift = 0;
  else if (suffix == "k") shift = 10;
  else if (suffix == "m") shift = 20;
  else if (suffix == "g") shift = 30;
  else if (suffix == "t") shift = 40;
  else throw std::invalid_argument("'" + text + "': unknown size suffix (use K, M, G or T)");
  if (shift > 0 && value > (std::numeric_limits<std::size_t>::max() >> shift))
    throw std::invalid_argument("'" + text + "' is too large");
  return static_cast<std::size_t>(value) << shift;
}

std::string format_time_us(double us) {
  char buf[32];
  if (us >= 10000.0) std::snprintf(buf, sizeof buf, "%7.0f", us);
  else if (us >= 100.0) std::snprintf(buf, sizeof buf, "%7.1f", us);
  else std::snprintf(buf, sizeof buf, "%7.2f", us);
  return buf;
}

}  // namespace chorus::bench
