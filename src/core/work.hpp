#pragma once

// The shared state behind a chorus::Work: what the communicator's worker and
// the negotiated tensor engine (src/engine) complete, and Work waits on.

#include <chorus/error.hpp>

#include <condition_variable>
#include <mutex>
#include <optional>

namespace chorus::detail {

struct WorkState {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::optional<Error> error;

  void finish(std::optional<Error> e) {
    {
      std::lock_guard<std::mutex> lock(mu);
      error = std::move(e);
      done = true;
    }
    cv.notify_all();
  }
};

}  // namespace chorus::detail
