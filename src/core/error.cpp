#include <chorus/error.hpp>

#include "core/enforce.hpp"

#include <cerrno>
#include <cstring>

namespace chorus {

std::string_view to_string(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::InvalidArgument: return "InvalidArgument";
    case ErrorCode::InvalidUsage: return "InvalidUsage";
    case ErrorCode::Timeout: return "Timeout";
    case ErrorCode::PeerFailure: return "PeerFailure";
    case ErrorCode::Transport: return "Transport";
    case ErrorCode::System: return "System";
    case ErrorCode::Aborted: return "Aborted";
    case ErrorCode::Cuda: return "Cuda";
    case ErrorCode::Internal: return "Internal";
  }
  return "Unknown";
}

Error::Error(ErrorCode code, const std::string& message, int peer)
    : std::runtime_error("chorus: " + std::string(to_string(code)) + ": " + message),
      code_(code),
      peer_(peer),
      message_(message) {}

void throw_errno(const std::string& what) {
  const int e = errno;
  throw Error(ErrorCode::System, what + ": " + std::strerror(e));
}

}  // namespace chorus
