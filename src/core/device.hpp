#pragma once

// The core's one door to CUDA (design.md: transports and algorithms never call
// CUDA). Built from src/cuda/ when Meson finds nvcc (-Dcuda=auto), else from
// src/core/device_none.cpp, which says "host" for every pointer.
//
//  - Memory kinds: is a pointer host or device memory (and on which GPU)?
//  - The device engine: runs one collective whose buffers are in device
//    memory, through CUDA IPC between ranks of one host (kernels read the
//    peers' buffers) or through pinned host staging over any transport.

#include <chorus/error.hpp>
#include <chorus/types.hpp>

#include "core/config.hpp"
#include "transport.hpp"

#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>

namespace chorus::device {

// True when this library was built with CUDA.
bool built();

// Why device buffers cannot be used here ("" when a GPU is usable): no CUDA in
// this build, no driver, no device. Probed once.
std::string unavailable_reason();

struct PtrInfo {
  bool device = false;  // device (or managed) memory
  int ordinal = -1;     // its GPU
};

// Classifies `p`. Host for null, for host memory, and always when no GPU is
// usable. Device ranges are cached per allocation (one driver query each).
PtrInfo query(const void* p);

// Waits for everything queued on `stream` (a cudaStream_t): a host-buffer
// call given a stream is ordered after the work before it. Error(Cuda) when
// no GPU is usable.
void synchronize(void* stream);

// Runs the host algorithm of `call` on host buffers (what the communicator
// would run for a host call with these arguments), within `deadline`. The
// staged path calls it on pinned copies of the device buffers: with the call
// itself, or (reductions combined on the GPU) with the alltoall, allgather or
// gather steps around the kernel, which every rank runs alike.
using HostRunner =
    std::function<void(const transport::CallDesc& call, const void* send, void* recv)>;

// Where an asynchronous call (an _async one: it runs later, on the
// communicator's worker) entered its stream: made in the caller's thread, an
// event recorded on the call's stream (the legacy default stream without
// one). The call's work waits for it instead of for the stream, so it is
// ordered after the work queued before the call and never behind work queued
// after it.
class Entry {
 public:
  virtual ~Entry() = default;
};

// One collective on device buffers.
struct Request {
  transport::CallDesc call;      // device == true
  const void* send = nullptr;    // null where this rank does not read it (non-root broadcast)
  void* recv = nullptr;          // null where this rank does not write it (non-root reduce)
  void* stream = nullptr;        // the caller's cudaStream_t; null: blocking call
  int ordinal = 0;               // the GPU the buffers are on
  const Entry* entry = nullptr;  // an asynchronous call: where it entered its stream
  transport::Deadline deadline;
  // An alltoallv (whose call count is 0: each message has its own) or an
  // allgatherv: the bytes its buffers hold. They always stage; the host
  // runner knows the counts.
  std::size_t send_bytes = 0, recv_bytes = 0;
};

struct EngineSetup {
  transport::Transport* transport = nullptr;
  int rank = 0;
  int size = 1;
  bool one_host = false;  // every rank runs on this host (CUDA IPC is possible)
  Settings settings;
};

class Engine {
 public:
  virtual ~Engine() = default;
  // Runs the collective (docs/cuda.md, Semantics). With a stream, work queued
  // on the stream after run() returns sees the result; without one the call
  // is ordered on the legacy default stream and the GPU has finished when it
  // returns. Throws Error(Cuda) for CUDA failures, and the transport's errors.
  virtual void run(const Request& r, const HostRunner& host) = 0;
  // Marks where an asynchronous call enters `stream` (null: the legacy default
  // stream), in the caller's thread; the call's Request carries it. The
  // buffers are on GPU `ordinal`. The caller's current device is kept.
  virtual std::shared_ptr<Entry> enter(void* stream, int ordinal) = 0;
  // An error the GPU reported after a call returned (a failed kernel on a
  // stream), or nothing. Checked before every call and by Communicator::error().
  virtual std::optional<Error> async_error() = 0;
};

// Throws Error(Cuda) when no GPU is usable.
std::unique_ptr<Engine> make_engine(const EngineSetup& setup);

}  // namespace chorus::device
