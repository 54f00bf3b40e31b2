#pragma once

// Invariant checks that throw chorus::Error with both values printed.

#include <chorus/error.hpp>

#include <sstream>
#include <string>

#define CHORUS_THROW(code, expr)                                                     \
  do {                                                                               \
    std::ostringstream chorus_throw_os_;                                             \
    chorus_throw_os_ << expr;                                                        \
    throw ::chorus::Error(::chorus::ErrorCode::code, chorus_throw_os_.str());        \
  } while (0)

#define CHORUS_ENFORCE(cond, code, expr) \
  do {                                   \
    if (!(cond)) CHORUS_THROW(code, expr); \
  } while (0)

// CHORUS_ENFORCE_EQ(a, b, InvalidArgument, "count") -> "count: expected a == b, got 3 vs 4"
#define CHORUS_ENFORCE_EQ(a, b, code, expr)                                          \
  do {                                                                               \
    const auto& chorus_a_ = (a);                                                     \
    const auto& chorus_b_ = (b);                                                     \
    if (!(chorus_a_ == chorus_b_))                                                   \
      CHORUS_THROW(code, expr << ": expected " #a " == " #b ", got " << chorus_a_   \
                              << " vs " << chorus_b_);                               \
  } while (0)

namespace chorus {
// Throws Error(System, what + ": " + strerror(errno)).
[[noreturn]] void throw_errno(const std::string& what);
}  // namespace chorus
