// chorus::mem_alloc / mem_free and the registry the shm transport consults.

#include "core/shared_memory.hpp"

#include <chorus/error.hpp>
#include <chorus/memory.hpp>

#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace {

chorus::ErrorCode code_of(void (*fn)()) {
  try {
    fn();
  } catch (const chorus::Error& e) {
    return e.code();
  }
  return chorus::ErrorCode::Internal;  // nothing thrown: the caller's EXPECT fails
}

TEST(MemAlloc, PageAlignedZeroedAndWritable) {
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const std::size_t bytes = 3 * page + 5;
  auto* p = static_cast<unsigned char*>(chorus::mem_alloc(bytes));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(p) % page, 0u);
  std::size_t nonzero = 0;
  for (std::size_t i = 0; i < bytes; ++i) nonzero += p[i] != 0;
  EXPECT_EQ(nonzero, 0u);
  std::memset(p, 0x5a, bytes);
  EXPECT_EQ(p[bytes - 1], 0x5a);
  chorus::mem_free(p);
}

TEST(MemAlloc, RegistryFindsWholeRangesOnly) {
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  auto* a = static_cast<char*>(chorus::mem_alloc(2 * page));
  auto* b = static_cast<char*>(chorus::mem_alloc(page));
  const auto ra = chorus::detail::find_shared(a + 100, page);
  ASSERT_TRUE(ra.has_value());
  EXPECT_EQ(ra->offset, 100u);
  EXPECT_EQ(ra->size, 2 * page);
  EXPECT_GE(ra->fd, 0);
  const auto rb = chorus::detail::find_shared(b, page);
  ASSERT_TRUE(rb.has_value());
  EXPECT_NE(ra->id, rb->id);
  EXPECT_FALSE(chorus::detail::find_shared(a + page, page + 1).has_value()) << "runs past the end";
  int local = 0;
  EXPECT_FALSE(chorus::detail::find_shared(&local, sizeof local).has_value());
  chorus::mem_free(a);
  EXPECT_FALSE(chorus::detail::find_shared(a, 1).has_value()) << "freed";
  chorus::mem_free(b);
  // Ids are never reused, so a peer's cached mapping cannot stand for a new region.
  auto* c = static_cast<char*>(chorus::mem_alloc(page));
  const auto rc = chorus::detail::find_shared(c, 1);
  ASSERT_TRUE(rc.has_value());
  EXPECT_GT(rc->id, rb->id);
  chorus::mem_free(c);
}

TEST(MemAlloc, BadArgumentsAreClearErrors) {
  EXPECT_EQ(code_of([] { chorus::mem_alloc(0); }), chorus::ErrorCode::InvalidArgument);
  EXPECT_EQ(code_of([] {
              static int x;
              chorus::mem_free(&x);
            }),
            chorus::ErrorCode::InvalidArgument);
  EXPECT_EQ(code_of([] {
              void* p = chorus::mem_alloc(1);
              chorus::mem_free(p);
              chorus::mem_free(p);  // twice
            }),
            chorus::ErrorCode::InvalidArgument);
  EXPECT_EQ(code_of([] { chorus::mem_alloc(std::size_t{1} << 62); }), chorus::ErrorCode::System);
  chorus::mem_free(nullptr);  // a no-op
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
