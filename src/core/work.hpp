#pragma once

// The shared state behind a chorus::Work: what the communicator's worker and
// the negotiated tensor engine (src/engine) complete, and Work waits on.

#include <chorus/error.hpp>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>

namespace chorus::detail {

struct WorkState {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::optional<Error> error;
  // Set when a thread starts to wait for this work before it is done; then
  // on_wait (if set) is called: the engine then negotiates a tensor it has
  // not announced yet at once, instead of at the end of its cycle. on_wait
  // is set before the Work is handed out, never changed after.
  std::atomic<bool> waited{false};
  std::function<void()> on_wait;

  void mark_waited() {
    waited.store(true, std::memory_order_relaxed);
    if (on_wait) on_wait();
  }

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
