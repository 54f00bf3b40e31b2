#pragma once

// Minimal leveled logging to stderr, controlled by CHORUS_DEBUG=warn|info|trace.
// The library keeps no logging dependency so that embedding it adds nothing
// to a framework's link line (see docs/architecture.md).

#include <sstream>
#include <string>

namespace chorus::log {

enum class Level : int { Off = 0, Warn = 1, Info = 2, Trace = 3 };

// Current level (parsed once from CHORUS_DEBUG; default Warn).
Level level() noexcept;
// Set the rank shown in the line prefix ("chorus[3] INFO ...").
void set_rank(int rank) noexcept;
void write(Level level, const std::string& message);

}  // namespace chorus::log

#define CHORUS_LOG(lvl, expr)                                                  \
  do {                                                                         \
    if (static_cast<int>(::chorus::log::level()) >=                            \
        static_cast<int>(::chorus::log::Level::lvl)) {                         \
      std::ostringstream chorus_log_os_;                                       \
      chorus_log_os_ << expr;                                                  \
      ::chorus::log::write(::chorus::log::Level::lvl, chorus_log_os_.str());   \
    }                                                                          \
  } while (0)

#define CHORUS_WARN(expr) CHORUS_LOG(Warn, expr)
#define CHORUS_INFO(expr) CHORUS_LOG(Info, expr)
#define CHORUS_TRACE(expr) CHORUS_LOG(Trace, expr)
