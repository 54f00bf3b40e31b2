#pragma once

/// @file error.hpp
/// The single error type thrown by Chorus. See docs/errors.md for the policy.

#include <chorus/export.hpp>

#include <stdexcept>
#include <string>
#include <string_view>

namespace chorus {

/// Classifies an Error. Values are stable: the C ABI maps them to status codes.
enum class ErrorCode : int {
  InvalidArgument = 1,  ///< a bad argument to a call (null pointer, bad rank, unknown dtype, ...)
  InvalidUsage = 2,     ///< a correct call at the wrong time, or ranks calling different collectives
  Timeout = 3,          ///< a deadline passed (a peer stopped, or the job is too slow)
  PeerFailure = 4,      ///< a peer died or closed its connection
  Transport = 5,        ///< the transport failed (malformed message, connection refused, ...)
  System = 6,           ///< an operating-system call failed
  Aborted = 7,          ///< the communicator was aborted
  Cuda = 8,             ///< a CUDA call failed, or a device buffer where none is supported
  Internal = 9,         ///< a bug in Chorus: please report it
};

/// Name of a code ("InvalidArgument", "PeerFailure", ...).
CHORUS_API std::string_view to_string(ErrorCode code) noexcept;

/// The exception thrown by every Chorus call that fails.
///
/// what() reads "chorus: <Code>: <message>". The message says what happened and,
/// where there is one, what to do about it.
class CHORUS_API Error : public std::runtime_error {
 public:
  /// Builds an error with a code, a message and, where one is to blame, the peer rank.
  Error(ErrorCode code, const std::string& message, int peer = -1);

  /// The classification of the failure.
  ErrorCode code() const noexcept { return code_; }
  /// The rank that failed or misbehaved, or -1 when no single peer is to blame.
  int peer() const noexcept { return peer_; }
  /// The message without the "chorus: <Code>: " prefix.
  const std::string& message() const noexcept { return message_; }

 private:
  ErrorCode code_;
  int peer_;
  std::string message_;
};

}  // namespace chorus
