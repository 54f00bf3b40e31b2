// The device engine: memory kinds, CUDA IPC collectives between the ranks of
// one host, and pinned-host staging over any transport. docs/cuda.md tells
// the design; the comments here say why each step is where it is.

#include "core/device.hpp"

#include "core/log.hpp"
#include "cuda/kernels.hpp"

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>
#include <vector>

namespace chorus::device {

namespace {

using transport::CallDesc;
using transport::Coll;

[[noreturn]] void cuda_fail(cudaError_t e, const char* what) {
  std::ostringstream os;
  os << "CUDA error in " << what << ": " << cudaGetErrorString(e) << " (" << cudaGetErrorName(e)
     << ", " << static_cast<int>(e) << ")";
  throw Error(ErrorCode::Cuda, os.str());
}

#define CHORUS_CUDA(call)                        \
  do {                                           \
    const cudaError_t chorus_e_ = (call);        \
    if (chorus_e_ != cudaSuccess) cuda_fail(chorus_e_, #call); \
  } while (0)

// ---- runtime probe and memory kinds -----------------------------------------

struct Probe {
  std::string reason;  // "" when usable
  int devices = 0;
};

const Probe& probe() {
  static const Probe p = [] {
    Probe r;
    const cudaError_t e = cudaGetDeviceCount(&r.devices);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      std::ostringstream os;
      os << "no usable CUDA device: cudaGetDeviceCount failed with " << cudaGetErrorName(e)
         << " (" << static_cast<int>(e) << ": " << cudaGetErrorString(e) << ")";
      r.reason = os.str();
      r.devices = 0;
    } else if (r.devices == 0) {
      r.reason = "no usable CUDA device: the driver reports none";
    }
    return r;
  }();
  return p;
}

// A driver API function, looked up through the runtime (the library never
// links libcuda, which machines without a driver lack); null if missing.
template <typename Fn>
Fn driver_fn(const char* name) {
  void* f = nullptr;
  cudaDriverEntryPointQueryResult q{};
  if (cudaGetDriverEntryPointByVersion(name, &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess)
    return nullptr;
  return reinterpret_cast<Fn>(f);
}

using AddressRangeFn = CUresult (*)(CUdeviceptr*, std::size_t*, CUdeviceptr);
using PointerAttributeFn = CUresult (*)(void*, CUpointer_attribute, CUdeviceptr);

// A process-unique id of the allocation holding `p` (0 when unknown): tells a
// new allocation at a recycled address from the old one.
std::uint64_t buffer_id(const void* p) {
  static const auto fn = driver_fn<PointerAttributeFn>("cuPointerGetAttribute");
  unsigned long long id = 0;
  if (fn == nullptr ||
      fn(&id, CU_POINTER_ATTRIBUTE_BUFFER_ID, reinterpret_cast<CUdeviceptr>(p)) != CUDA_SUCCESS)
    return 0;
  return id;
}

// Allocation ranges known to be device memory: [base, base+size) -> ordinal.
struct Range {
  std::uintptr_t end;
  int ordinal;
};
std::mutex g_ranges_mu;
std::map<std::uintptr_t, Range> g_ranges;

// Allocation base and size of a device pointer (the range IPC handles cover).
std::pair<std::uintptr_t, std::size_t> allocation_of(const void* p) {
  static const auto fn = driver_fn<AddressRangeFn>("cuMemGetAddressRange");
  CUdeviceptr base = 0;
  std::size_t size = 0;
  if (fn != nullptr && fn(&base, &size, reinterpret_cast<CUdeviceptr>(p)) == CUDA_SUCCESS)
    return {static_cast<std::uintptr_t>(base), size};
  return {reinterpret_cast<std::uintptr_t>(p), 0};
}

}  // namespace

bool built() { return true; }

std::string unavailable_reason() { return probe().reason; }

PtrInfo query(const void* p) {
  if (p == nullptr || !probe().reason.empty()) return {};
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  {
    std::lock_guard<std::mutex> lock(g_ranges_mu);
    auto it = g_ranges.upper_bound(a);
    if (it != g_ranges.begin()) {
      --it;
      if (a < it->second.end) return {true, it->second.ordinal};
    }
  }
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return {};
  }
  // Managed memory is host-accessible: the host path reads it (after the
  // stream, if any, has been synchronized).
  if (attr.type != cudaMemoryTypeDevice) return {};
  const auto [base, size] = allocation_of(p);
  if (size > 0) {
    std::lock_guard<std::mutex> lock(g_ranges_mu);
    // A freed range may have been reused: drop what overlaps the new one.
    auto it = g_ranges.lower_bound(base);
    if (it != g_ranges.begin() && std::prev(it)->second.end > base) --it;
    while (it != g_ranges.end() && it->first < base + size) it = g_ranges.erase(it);
    g_ranges[base] = Range{base + size, attr.device};
  }
  return {true, attr.device};
}

void synchronize(void* stream) {
  if (!probe().reason.empty()) throw Error(ErrorCode::Cuda, probe().reason);
  CHORUS_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}

namespace {

// ---- the engine --------------------------------------------------------------

struct Pinned {
  void* p = nullptr;
  std::size_t bytes = 0;
  void ensure(std::size_t n) {
    if (n <= bytes) return;
    release();
    CHORUS_CUDA(cudaHostAlloc(&p, n, cudaHostAllocPortable));
    bytes = n;
  }
  void release() {
    if (p != nullptr) (void)cudaFreeHost(p);
    p = nullptr;
    bytes = 0;
  }
};

// What a rank tells the others once, at its first device call.
struct Hello {
  std::int32_t ordinal;
  std::int32_t pid;
  std::uint8_t uuid[16];
  std::uint8_t ipc_wanted;
  std::uint8_t gpu_reduce_wanted;  // CHORUS_CUDA_STAGED_REDUCE=gpu
  std::uint8_t pad[6];
};

// Per call on the IPC path: where this rank's buffers are.
struct BufferDesc {
  cudaIpcMemHandle_t send_handle;
  cudaIpcMemHandle_t recv_handle;
  std::uint64_t send_id;  // allocation ids (CU_POINTER_ATTRIBUTE_BUFFER_ID): never reused
  std::uint64_t recv_id;
  std::uint64_t send_offset;
  std::uint64_t recv_offset;
  std::uint8_t has_send;
  std::uint8_t has_recv;
  std::uint8_t pad[6];
};

struct Sizes {
  std::size_t send = 0, recv = 0;  // bytes this rank's buffers hold
};

// The calls with a count per rank or pair, whose sizes the request carries.
bool counted(Coll c) {
  return c == Coll::Alltoallv || c == Coll::Allgatherv || c == Coll::ReduceScatterv;
}

Sizes sizes_of(const CallDesc& c, int rank, int n) {
  const std::size_t b = static_cast<std::size_t>(c.count) * size_of(c.dtype);
  const std::size_t nb = b * static_cast<std::size_t>(n);
  const bool root = c.root == rank;
  switch (c.coll) {
    case Coll::Allreduce: return {b, b};
    case Coll::Broadcast: return {root ? b : 0, b};
    case Coll::Reduce: return {b, root ? b : 0};
    case Coll::Allgather: return {b, nb};
    case Coll::ReduceScatter: return {nb, b};
    case Coll::Gather: return {b, root ? nb : 0};
    case Coll::Scatter: return {root ? nb : 0, b};
    case Coll::Alltoall: return {nb, nb};
    default: return {b, b};  // SendRecv: whichever buffer is set
  }
}

// Makes `d` the calling thread's current device for a scope, then restores
// the caller's: a framework thread that called us keeps its own device.
class DeviceScope {
 public:
  explicit DeviceScope(int d) {
    if (cudaGetDevice(&prev_) != cudaSuccess) {
      (void)cudaGetLastError();
      prev_ = -1;
    }
    if (prev_ != d) CHORUS_CUDA(cudaSetDevice(d));
    else prev_ = -1;  // nothing to restore
  }
  ~DeviceScope() {
    if (prev_ >= 0) (void)cudaSetDevice(prev_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = -1;
};

struct CudaEntry final : Entry {
  cudaEvent_t event = nullptr;
  ~CudaEntry() override {
    // Safe while a stream still waits on it: the driver frees it after.
    if (event != nullptr) (void)cudaEventDestroy(event);
  }
};

class CudaEngine final : public Engine {
 public:
  explicit CudaEngine(const EngineSetup& s)
      : s_(s),
        ipc_wanted_(s.settings.cuda_ipc),
        gpu_reduce_wanted_(s.settings.cuda_staged_reduce == "gpu"),
        stage_bytes_(s.settings.cuda_stage_bytes),
        one_shot_bytes_(s.settings.cuda_one_shot_bytes),
        ipc_min_bytes_(s.settings.cuda_ipc_min_bytes) {}

  ~CudaEngine() override {
    if (ordinal_ < 0) return;
    (void)cudaSetDevice(ordinal_);
    // Quiesce our streams before freeing what they use; never throw here.
    for (cudaStream_t st : {internal_, d2h_, h2d_, async_})
      if (st != nullptr) (void)cudaStreamSynchronize(st);
    close_mappings(-1);
    if (phase_event_ != nullptr) (void)cudaEventDestroy(phase_event_);
    if (done_event_ != nullptr) (void)cudaEventDestroy(done_event_);
    for (cudaEvent_t e : stage_events_)
      if (e != nullptr) (void)cudaEventDestroy(e);
    for (auto& p : pinned_) p.release();
    gathered_.release();
    if (scratch_ != nullptr) (void)cudaFree(scratch_);
    for (cudaStream_t st : {internal_, d2h_, h2d_, async_})
      if (st != nullptr) (void)cudaStreamDestroy(st);
  }

  std::optional<Error> async_error() override {
    if (ordinal_ < 0) return std::nullopt;
    // Sticky errors (a faulted kernel) poison the context: every call reports them.
    // A faulted kernel is sticky: every later query on the context returns it.
    const cudaError_t e = cudaStreamQuery(internal_);
    if (e == cudaSuccess || e == cudaErrorNotReady) return std::nullopt;
    std::ostringstream os;
    os << "the GPU context of this process is unusable: " << cudaGetErrorName(e) << " ("
       << cudaGetErrorString(e) << "), a fault of a kernel that ran after an earlier call "
       << "returned (the application's or a device collective's)";
    return Error(ErrorCode::Cuda, os.str());
  }

  void run(const Request& r, const HostRunner& host) override {
    ensure_init(r.ordinal);
    DeviceScope on(ordinal_);
    // Send/recv involve two ranks only and always stage; the introduction is
    // an all-to-all, so the first collective makes it.
    const bool p2p = r.call.coll == Coll::SendRecv;
    if (!introduced_ && !p2p) introduce(r);
    // An alltoallv's, allgatherv's or reduce_scatterv's counts differ per
    // rank: it stages, whatever its size.
    const bool staged_only = p2p || counted(r.call.coll);
    // Without a stream the call is blocking and ordered like a cudaMemcpy: on
    // the legacy default stream, after the work queued there.
    const cudaStream_t user =
        r.stream != nullptr ? static_cast<cudaStream_t>(r.stream) : cudaStreamLegacy;
    // An asynchronous call runs on our own stream, after the point where it
    // entered the caller's: the caller may have queued more work there since,
    // which must not hold the call back (or be overtaken by it).
    cudaStream_t st = user;
    if (r.entry != nullptr) {
      CHORUS_CUDA(cudaStreamWaitEvent(async_, static_cast<const CudaEntry*>(r.entry)->event, 0));
      st = async_;
    }
    // CHORUS_CUDA_IPC_MIN_BYTES sends smaller calls through the staged path;
    // the call's size, not a rank's buffers, decides, so every rank agrees.
    const std::size_t call_bytes = static_cast<std::size_t>(r.call.count) * size_of(r.call.dtype);
    if (ipc_ && !staged_only && call_bytes >= ipc_min_bytes_)
      run_ipc(r, st);
    else run_staged(r, st, host);
    if (r.stream == nullptr) {
      CHORUS_CUDA(cudaStreamSynchronize(st));
    } else if (st != user) {
      // Work the caller queues on its stream from now on sees the result.
      CHORUS_CUDA(cudaEventRecord(done_event_, st));
      CHORUS_CUDA(cudaStreamWaitEvent(user, done_event_, 0));
    }
  }

  std::shared_ptr<Entry> enter(void* stream, int ordinal) override {
    ensure_init(ordinal);
    DeviceScope on(ordinal_);
    auto e = std::make_shared<CudaEntry>();
    CHORUS_CUDA(cudaEventCreateWithFlags(&e->event, cudaEventDisableTiming));
    CHORUS_CUDA(cudaEventRecord(
        e->event, stream != nullptr ? static_cast<cudaStream_t>(stream) : cudaStreamLegacy));
    return e;
  }

 private:
  // The first call (or entry) picks the GPU; the caller's thread or the
  // communicator's worker may make it.
  void ensure_init(int ordinal) {
    std::lock_guard<std::mutex> lock(init_mu_);
    if (ordinal_ < 0) {
      DeviceScope on(ordinal);
      init(ordinal);
    }
    if (ordinal != ordinal_)
      throw Error(ErrorCode::InvalidArgument,
                  "buffers on GPU " + std::to_string(ordinal) + ", but this communicator's " +
                      "earlier device calls used GPU " + std::to_string(ordinal_) +
                      ": one communicator drives one GPU per rank");
  }

  void init(int ordinal) {
    CHORUS_CUDA(cudaStreamCreateWithFlags(&internal_, cudaStreamNonBlocking));
    CHORUS_CUDA(cudaStreamCreateWithFlags(&d2h_, cudaStreamNonBlocking));
    CHORUS_CUDA(cudaStreamCreateWithFlags(&h2d_, cudaStreamNonBlocking));
    CHORUS_CUDA(cudaStreamCreateWithFlags(&async_, cudaStreamNonBlocking));
    for (auto& e : stage_events_) CHORUS_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    CHORUS_CUDA(cudaEventCreateWithFlags(&phase_event_, cudaEventDisableTiming));
    CHORUS_CUDA(cudaEventCreateWithFlags(&done_event_, cudaEventDisableTiming));
    ordinal_ = ordinal;  // last: a failed init is retried by the next call
  }

  // All-to-all of `bytes` per rank over the transport, checked as part of `call`.
  void exchange(const CallDesc& call, const void* mine, std::size_t bytes, void* all,
                transport::Deadline deadline) {
    auto* out = static_cast<char*>(all);
    if (out != nullptr) std::memcpy(out + bytes * static_cast<std::size_t>(s_.rank), mine, bytes);
    if (s_.size == 1) return;
    std::vector<transport::Request> reqs;
    reqs.reserve(2 * static_cast<std::size_t>(s_.size));
    std::vector<char> sink(out == nullptr ? bytes : 0);
    for (int p = 0; p < s_.size; ++p)
      if (p != s_.rank)
        reqs.push_back(s_.transport->irecv(
            p, call, out != nullptr ? out + bytes * static_cast<std::size_t>(p) : sink.data(), bytes,
            transport::Combine::copy()));
    for (int p = 0; p < s_.size; ++p)
      if (p != s_.rank) reqs.push_back(s_.transport->isend(p, call, mine, bytes));
    s_.transport->wait(reqs, deadline);
  }

  // First device call: learn the peers' GPUs; decide, the same on every
  // rank, whether CUDA IPC connects them all; open their events.
  void introduce(const Request& r) {
    Hello me{};
    me.ordinal = ordinal_;
    me.pid = static_cast<std::int32_t>(::getpid());
    cudaDeviceProp prop{};
    CHORUS_CUDA(cudaGetDeviceProperties(&prop, ordinal_));
    std::memcpy(me.uuid, &prop.uuid, 16);
    me.ipc_wanted = (ipc_wanted_ && s_.one_host) ? 1 : 0;
    me.gpu_reduce_wanted = gpu_reduce_wanted_ ? 1 : 0;
    std::vector<Hello> all(static_cast<std::size_t>(s_.size));
    exchange(r.call, &me, sizeof me, all.data(), r.deadline);

    // My verdict: every peer wants IPC, runs in another process, and its GPU is
    // mine or one mine can access.
    std::uint8_t ok = 1;
    int visible = 0;
    CHORUS_CUDA(cudaGetDeviceCount(&visible));
    for (int p = 0; p < s_.size && ok; ++p) {
      const Hello& h = all[static_cast<std::size_t>(p)];
      if (!h.ipc_wanted) ok = 0;
      if (p == s_.rank) continue;
      if (h.pid == me.pid) ok = 0;
      int local = -1;
      for (int d = 0; d < visible && local < 0; ++d) {
        cudaDeviceProp q{};
        if (cudaGetDeviceProperties(&q, d) == cudaSuccess && std::memcmp(&q.uuid, h.uuid, 16) == 0)
          local = d;
      }
      int can = 0;
      if (local < 0) ok = 0;
      else if (local != ordinal_ &&
               (cudaDeviceCanAccessPeer(&can, ordinal_, local) != cudaSuccess || !can))
        ok = 0;
    }
    std::vector<std::uint8_t> verdicts(static_cast<std::size_t>(s_.size));
    exchange(r.call, &ok, 1, verdicts.data(), r.deadline);
    ipc_ = std::all_of(verdicts.begin(), verdicts.end(), [](std::uint8_t v) { return v != 0; });
    same_gpu_ = std::all_of(all.begin(), all.end(),
                            [&](const Hello& h) { return std::memcmp(h.uuid, me.uuid, 16) == 0; });
    // Staged reductions combine on the GPU only if every rank asked for it
    // (the ranks must run the same steps) and one kernel takes every rank's
    // block (cuda::kMaxInputs).
    const auto wanting = std::count_if(all.begin(), all.end(),
                                       [](const Hello& h) { return h.gpu_reduce_wanted != 0; });
    gpu_reduce_ = wanting == s_.size && s_.size > 1 && s_.size <= cuda::kMaxInputs;
    if (wanting > 0 && wanting < s_.size && s_.rank == 0)
      CHORUS_WARN("CHORUS_CUDA_STAGED_REDUCE=gpu on " << wanting << " of " << s_.size
                  << " ranks only: staged reductions combine on the CPU");
    if (wanting == s_.size && !gpu_reduce_ && s_.rank == 0 && s_.size > 1)
      CHORUS_WARN("CHORUS_CUDA_STAGED_REDUCE=gpu: " << s_.size << " ranks are more inputs than one "
                  << "kernel takes (" << cuda::kMaxInputs
                  << "): staged reductions combine on the CPU");
    CHORUS_INFO("rank " << s_.rank << ": device collectives on GPU " << ordinal_ << " through "
                         << (ipc_ ? "CUDA IPC" : "pinned host staging over " +
                                                     s_.transport->name())
                         << (!ipc_ && gpu_reduce_ ? ", reductions combined on the GPU" : ""));
    introduced_ = true;
  }

  // ---- IPC path ----

  // Maps a peer's buffer, cached per (peer, allocation id, handle): opening
  // costs milliseconds. The exporter's allocation id tells a new allocation
  // from a freed one at the same address (their handles can be equal: seen
  // on an H100 as illegal-address faults through a stale mapping). Opening
  // memory that is already mapped fails: then this peer's mappings are
  // closed (no kernel of ours uses them between calls) and the open retried.
  char* open(int peer, std::uint64_t id, const cudaIpcMemHandle_t& h, std::uint64_t offset) {
    IpcKey key{};
    std::get<0>(key) = peer;
    std::get<1>(key) = id;
    std::memcpy(std::get<2>(key).data(), &h, sizeof h);
    auto it = opened_.find(key);
    if (it == opened_.end()) {
      void* p = nullptr;
      cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
      if (e == cudaErrorAlreadyMapped) {
        (void)cudaGetLastError();
        close_mappings(peer);
        e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
      }
      if (e != cudaSuccess) cuda_fail(e, "cudaIpcOpenMemHandle (mapping a peer's buffer)");
      it = opened_.emplace(key, p).first;
    }
    in_use_.insert(it->second);
    return static_cast<char*>(it->second) + offset;
  }

  // Before a call maps anything: forget the previous call's mappings in use,
  // and bound what a long job accumulates (never in the middle of a call,
  // whose kernels use what it mapped).
  void start_mapping() {
    in_use_.clear();
    if (opened_.size() >= 512) close_mappings(-1);
  }

  void close_mappings(int peer) {
    for (auto it = opened_.begin(); it != opened_.end();) {
      if ((peer < 0 || std::get<0>(it->first) == peer) && in_use_.count(it->second) == 0) {
        (void)cudaIpcCloseMemHandle(it->second);
        it = opened_.erase(it);
      } else {
        ++it;
      }
    }
  }

  // The IPC handle of the allocation holding `p`, made once per allocation.
  void describe_buffer(const void* p, std::size_t bytes, cudaIpcMemHandle_t& h, std::uint64_t& id,
                       std::uint64_t& off, std::uint8_t& has) {
    if (p == nullptr || bytes == 0) return;
    // Asked of the driver each call, not of query()'s range cache: a freed
    // and reallocated range must not yield a stale base.
    const std::uintptr_t base = allocation_of(p).first;
    id = buffer_id(p);
    auto it = handles_.find(base);
    if (it == handles_.end() || it->second.first != id || id == 0) {
      cudaIpcMemHandle_t mh{};
      CHORUS_CUDA(cudaIpcGetMemHandle(&mh, reinterpret_cast<void*>(base)));
      if (handles_.size() >= 1024) handles_.clear();
      it = handles_.insert_or_assign(base, std::make_pair(id, mh)).first;
    }
    h = it->second.second;
    off = reinterpret_cast<std::uintptr_t>(p) - base;
    has = 1;
  }

  // A phase boundary: this rank's work so far on `st` is finished (the host
  // waits for it), and so is every peer's (they say so over the transport).
  // The GPU never waits on another process: kernels of processes sharing a
  // GPU run time-sliced, and a stream blocked on another context's event
  // costs a time slice (measured: about 150 us per phase on an H100).
  void phase(const Request& r, cudaStream_t st, int which, const void* payload = nullptr,
             std::size_t bytes = 0, void* all = nullptr) {
    CHORUS_CUDA(cudaEventRecord(phase_event_, st));
    CHORUS_CUDA(cudaEventSynchronize(phase_event_));
    const std::uint8_t z = static_cast<std::uint8_t>(which);
    if (payload == nullptr) exchange(r.call, &z, 1, nullptr, r.deadline);
    else exchange(r.call, payload, bytes, all, r.deadline);
  }

  void copy(void* dst, const void* src, std::size_t bytes, cudaStream_t st) {
    if (bytes == 0 || dst == src) return;
    CHORUS_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st));
  }

  void reduce(const std::vector<const char*>& in, std::size_t offset, void* out, std::size_t count,
              const CallDesc& c, cudaStream_t st) {
    cuda::Inputs ins{};
    for (std::size_t k = 0; k < in.size(); ++k) ins.p[k] = in[k] + offset;
    const cudaError_t e = cuda::reduce(ins, static_cast<int>(in.size()), out, count, c.dtype, c.op,
                                       s_.size, st);
    if (e != cudaSuccess) cuda_fail(e, "the reduction kernel launch");
  }

  void* scratch(std::size_t bytes) {
    if (bytes > scratch_bytes_) {
      if (scratch_ != nullptr) CHORUS_CUDA(cudaFree(scratch_));
      scratch_ = nullptr;
      CHORUS_CUDA(cudaMalloc(&scratch_, bytes));
      scratch_bytes_ = bytes;
    }
    return scratch_;
  }

  // Waits, without queueing anything on the GPU, until the work queued on
  // `st` before this call has run.
  static void wait_idle(cudaStream_t st, transport::Deadline deadline) {
    for (unsigned spins = 0;; ++spins) {
      const cudaError_t e = cudaStreamQuery(st);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) cuda_fail(e, "cudaStreamQuery (work queued before the call)");
      if ((spins & 255) == 255) {
        if (transport::Clock::now() > deadline)
          throw Error(ErrorCode::Timeout,
                      "the work queued on the stream before this device collective did not finish "
                      "within the call's timeout");
        std::this_thread::yield();
      }
    }
  }

  // Every rank on one GPU: rank 0 does the whole collective in its own
  // context, reading every rank's inputs and writing every rank's outputs
  // through IPC mappings. The others only wait for their stream (a host-side
  // query: nothing queued), report their buffers, and wait for "done". Kernels
  // of processes sharing a GPU are time-sliced; one context doing all the
  // work never waits for a switch (measured: 2 phases of kernels in each
  // process cost about 200 us per call on an H100).
  void run_leader(const Request& r, cudaStream_t st) {
    const CallDesc& c = r.call;
    const int n = s_.size;
    const int me = s_.rank;
    const auto nn = static_cast<std::size_t>(n);
    const std::size_t b = static_cast<std::size_t>(c.count) * size_of(c.dtype);
    const Sizes sz = sizes_of(c, me, n);
    wait_idle(st, r.deadline);
    BufferDesc mine{};
    describe_buffer(r.send, sz.send, mine.send_handle, mine.send_id, mine.send_offset, mine.has_send);
    describe_buffer(r.recv, sz.recv, mine.recv_handle, mine.recv_id, mine.recv_offset, mine.has_recv);
    std::uint8_t done = 0;
    if (me != 0) {
      transport::Request reqs[2] = {
          s_.transport->irecv(0, c, &done, 1, transport::Combine::copy()),
          s_.transport->isend(0, c, &mine, sizeof mine)};
      s_.transport->wait(reqs, r.deadline);
      return;
    }
    std::vector<BufferDesc> all(nn);
    all[0] = mine;
    {
      std::vector<transport::Request> reqs;
      for (int p = 1; p < n; ++p)
        reqs.push_back(s_.transport->irecv(p, c, &all[static_cast<std::size_t>(p)], sizeof(BufferDesc),
                                           transport::Combine::copy()));
      s_.transport->wait(reqs, r.deadline);
    }
    start_mapping();
    std::vector<const char*> send(nn, nullptr);
    std::vector<char*> recv(nn, nullptr);
    send[0] = static_cast<const char*>(r.send);
    recv[0] = static_cast<char*>(r.recv);
    for (int p = 1; p < n; ++p) {
      const BufferDesc& d = all[static_cast<std::size_t>(p)];
      if (d.has_send) send[static_cast<std::size_t>(p)] = open(p, d.send_id, d.send_handle, d.send_offset);
      if (d.has_recv) recv[static_cast<std::size_t>(p)] = open(p, d.recv_id, d.recv_handle, d.recv_offset);
    }
    const auto root = static_cast<std::size_t>(std::max(0, c.root));
    auto reduce_into = [&](std::size_t offset, const std::vector<char*>& outs, std::size_t count) {
      cuda::Inputs ins{};
      cuda::Outputs os{};
      for (std::size_t k = 0; k < nn; ++k) ins.p[k] = send[k] + offset;
      for (std::size_t k = 0; k < outs.size(); ++k) os.p[k] = outs[k];
      const cudaError_t e = cuda::reduce_to(ins, n, os, static_cast<int>(outs.size()), count, c.dtype,
                                            c.op, n, st);
      if (e != cudaSuccess) cuda_fail(e, "the reduction kernel launch");
    };
    const std::size_t cnt = static_cast<std::size_t>(c.count);
    switch (c.coll) {
      case Coll::Allreduce: reduce_into(0, recv, cnt); break;
      case Coll::Reduce: reduce_into(0, {recv[root]}, cnt); break;
      case Coll::ReduceScatter:
        for (std::size_t p = 0; p < nn; ++p) reduce_into(p * b, {recv[p]}, cnt);
        break;
      case Coll::Broadcast:
        for (std::size_t p = 0; p < nn; ++p) copy(recv[p], send[root], b, st);
        break;
      case Coll::Allgather:
        for (std::size_t p = 0; p < nn; ++p)
          for (std::size_t q = 0; q < nn; ++q) copy(recv[p] + q * b, send[q], b, st);
        break;
      case Coll::Gather:
        for (std::size_t q = 0; q < nn; ++q) copy(recv[root] + q * b, send[q], b, st);
        break;
      case Coll::Scatter:
        for (std::size_t p = 0; p < nn; ++p) copy(recv[p], send[root] + p * b, b, st);
        break;
      case Coll::Alltoall:
        for (std::size_t p = 0; p < nn; ++p)
          for (std::size_t q = 0; q < nn; ++q) copy(recv[p] + q * b, send[q] + p * b, b, st);
        break;
      default:
        throw Error(ErrorCode::Internal, "run_leader: unexpected collective " + transport::describe(c));
    }
    CHORUS_CUDA(cudaStreamSynchronize(st));
    std::vector<transport::Request> reqs;
    for (int p = 1; p < n; ++p) reqs.push_back(s_.transport->isend(p, c, &done, 1));
    s_.transport->wait(reqs, r.deadline);
  }

  void run_ipc(const Request& r, cudaStream_t st) {
    const CallDesc& c = r.call;
    if (same_gpu_ && s_.size <= cuda::kMaxInputs) {
      run_leader(r, st);
      return;
    }
    const int n = s_.size;
    const int me = s_.rank;
    if (n > cuda::kMaxInputs)
      throw Error(ErrorCode::InvalidUsage, "CUDA IPC collectives take at most " +
                                               std::to_string(cuda::kMaxInputs) +
                                               " ranks per host; set CHORUS_CUDA_IPC=0");
    const std::size_t e = size_of(c.dtype);
    const std::size_t cnt = static_cast<std::size_t>(c.count);
    const std::size_t b = cnt * e;
    const Sizes sz = sizes_of(c, me, n);

    // Phase 0: my inputs are ready and my outputs free (everything before this
    // call on `st` has run); the peers learn where my buffers are.
    BufferDesc mine{};
    describe_buffer(r.send, sz.send, mine.send_handle, mine.send_id, mine.send_offset, mine.has_send);
    describe_buffer(r.recv, sz.recv, mine.recv_handle, mine.recv_id, mine.recv_offset, mine.has_recv);
    std::vector<BufferDesc> all(static_cast<std::size_t>(n));
    phase(r, st, 0, &mine, sizeof mine, all.data());
    start_mapping();
    std::vector<const char*> send(static_cast<std::size_t>(n), nullptr);
    std::vector<char*> recv(static_cast<std::size_t>(n), nullptr);
    for (int p = 0; p < n; ++p) {
      const BufferDesc& d = all[static_cast<std::size_t>(p)];
      if (p == me) {
        send[static_cast<std::size_t>(p)] = static_cast<const char*>(r.send);
        recv[static_cast<std::size_t>(p)] = static_cast<char*>(r.recv);
        continue;
      }
      if (d.has_send) send[static_cast<std::size_t>(p)] = open(p, d.send_id, d.send_handle, d.send_offset);
      if (d.has_recv) recv[static_cast<std::size_t>(p)] = open(p, d.recv_id, d.recv_handle, d.recv_offset);
    }

    auto* out = static_cast<char*>(r.recv);
    const auto ms = static_cast<std::size_t>(me);
    bool peers_read_mine = true;  // until the closing phase
    switch (c.coll) {
      case Coll::Allreduce: {
        if (b <= one_shot_bytes_ || n == 1) {
          // One shot: read every input, write the sum. In place, the result
          // waits in scratch until no peer reads my input any more.
          const bool in_place = r.send == r.recv;
          void* dst = in_place ? scratch(b) : out;
          reduce(send, 0, dst, cnt, c, st);
          if (in_place) {
            phase(r, st, 1);
            copy(out, dst, b, st);  // after phase 1 nobody reads my input
            peers_read_mine = false;
          }
        } else {
          // Reduce-scatter then allgather: rank p reduces block p (16-byte
          // aligned blocks, so the kernel uses vector loads), then every rank
          // copies the others' reduced blocks out of their recvbufs.
          const std::size_t align = std::max<std::size_t>(1, 16 / e);
          std::size_t blk = (cnt + static_cast<std::size_t>(n) - 1) / static_cast<std::size_t>(n);
          blk = (blk + align - 1) / align * align;
          auto block = [&](std::size_t p) {
            const std::size_t lo = std::min(cnt, p * blk);
            return std::pair<std::size_t, std::size_t>{lo, std::min(cnt, lo + blk) - lo};
          };
          const auto [lo, len] = block(ms);
          reduce(send, lo * e, out + lo * e, len, c, st);
          phase(r, st, 1);
          for (int p = 0; p < n; ++p) {
            if (p == me) continue;
            const auto [plo, plen] = block(static_cast<std::size_t>(p));
            copy(out + plo * e, recv[static_cast<std::size_t>(p)] + plo * e, plen * e, st);
          }
        }
        break;
      }
      case Coll::Broadcast:
        copy(out, send[static_cast<std::size_t>(c.root)], b, st);
        break;
      case Coll::Reduce:
        if (me == c.root) reduce(send, 0, out, cnt, c, st);
        break;
      case Coll::Allgather:
        for (int p = 0; p < n; ++p) copy(out + static_cast<std::size_t>(p) * b, send[static_cast<std::size_t>(p)], b, st);
        break;
      case Coll::ReduceScatter:
        reduce(send, ms * b, out, cnt, c, st);
        break;
      case Coll::Gather:
        if (me == c.root)
          for (int p = 0; p < n; ++p)
            copy(out + static_cast<std::size_t>(p) * b, send[static_cast<std::size_t>(p)], b, st);
        break;
      case Coll::Scatter:
        copy(out, send[static_cast<std::size_t>(c.root)] + ms * b, b, st);
        break;
      case Coll::Alltoall:
        for (int p = 0; p < n; ++p)
          copy(out + static_cast<std::size_t>(p) * b, send[static_cast<std::size_t>(p)] + ms * b, b, st);
        break;
      default:
        throw Error(ErrorCode::Internal, "run_ipc: unexpected collective " + transport::describe(c));
    }
    // Done: no peer reads my buffers after this point, so later work on my
    // stream may overwrite them.
    if (peers_read_mine) phase(r, st, 2);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) cuda_fail(err, "a device collective");
  }

  // ---- staged path ----

  // Whole buffers through pinned memory: for the collectives whose layout is
  // not elementwise, and send/recv.
  void run_staged(const Request& r, cudaStream_t st, const HostRunner& host) {
    const CallDesc& c = r.call;
    const Sizes sz =
        counted(c.coll) ? Sizes{r.send_bytes, r.recv_bytes} : sizes_of(c, s_.rank, s_.size);
    if (c.coll == Coll::ReduceScatter && combines_on_gpu(c)) {
      run_reduce_scatter_on_gpu(r, st, host);
      return;
    }
    const bool elementwise =
        c.coll == Coll::Allreduce || c.coll == Coll::Broadcast || c.coll == Coll::Reduce;
    if (elementwise && sz.recv + sz.send > 0 &&
        (std::max(sz.send, sz.recv) > stage_bytes_ || combines_on_gpu(c))) {
      run_pipelined(r, st, host);
      return;
    }
    // One pinned region covers both buffers when they overlap (in place).
    const auto s0 = reinterpret_cast<std::uintptr_t>(r.send);
    const auto r0 = reinterpret_cast<std::uintptr_t>(r.recv);
    const std::size_t sb = r.send != nullptr ? sz.send : 0;
    const std::size_t rb = r.recv != nullptr ? sz.recv : 0;
    const bool overlap = sb > 0 && rb > 0 && s0 < r0 + rb && r0 < s0 + sb;
    char* ps = nullptr;
    char* pr = nullptr;
    if (overlap) {
      const std::uintptr_t lo = std::min(s0, r0), hi = std::max(s0 + sb, r0 + rb);
      pinned_[0].ensure(hi - lo);
      ps = static_cast<char*>(pinned_[0].p) + (s0 - lo);
      pr = static_cast<char*>(pinned_[0].p) + (r0 - lo);
      CHORUS_CUDA(cudaMemcpyAsync(pinned_[0].p, reinterpret_cast<void*>(lo), hi - lo,
                                  cudaMemcpyDeviceToHost, st));
    } else {
      if (sb > 0) {
        pinned_[0].ensure(sb);
        ps = static_cast<char*>(pinned_[0].p);
        CHORUS_CUDA(cudaMemcpyAsync(ps, r.send, sb, cudaMemcpyDeviceToHost, st));
      }
      if (rb > 0) {
        pinned_[1].ensure(rb);
        pr = static_cast<char*>(pinned_[1].p);
      }
    }
    CHORUS_CUDA(cudaStreamSynchronize(st));
    host(c, ps, pr);
    if (rb > 0) {
      CHORUS_CUDA(cudaMemcpyAsync(r.recv, pr, rb, cudaMemcpyHostToDevice, st));
      CHORUS_CUDA(cudaStreamSynchronize(st));
    }
  }

  // Staged reductions combined by a kernel (CHORUS_CUDA_STAGED_REDUCE=gpu,
  // agreed by every rank at the introduction) instead of the CPU.
  bool combines_on_gpu(const CallDesc& c) const {
    return gpu_reduce_ &&
           (c.coll == Coll::Allreduce || c.coll == Coll::Reduce || c.coll == Coll::ReduceScatter);
  }

  // Copies n blocks of `b` bytes each, contiguous in pinned `blocks`, to
  // device scratch on `st`, each block at a 256-byte pitch so that the
  // kernel's 16-byte loads apply; `spare` bytes follow them, at `*spare_at`.
  // Returns the blocks' device addresses in rank order.
  std::vector<const char*> blocks_to_device(const void* blocks, std::size_t b, std::size_t spare,
                                            char** spare_at, cudaStream_t st) {
    const auto n = static_cast<std::size_t>(s_.size);
    const std::size_t pitch = (b + 255) / 256 * 256;
    char* d = static_cast<char*>(scratch(pitch * n + spare));
    CHORUS_CUDA(cudaMemcpy2DAsync(d, pitch, blocks, b, b, n, cudaMemcpyHostToDevice, st));
    std::vector<const char*> in(n);
    for (std::size_t j = 0; j < n; ++j) in[j] = d + j * pitch;
    if (spare_at != nullptr) *spare_at = d + pitch * n;
    return in;
  }

  // Reduce-scatter combined on the GPU: block p of every rank's input goes to
  // rank p (a host alltoall of the staged input), and one kernel reduces the
  // n copies of this rank's block, in rank order, straight into recv.
  void run_reduce_scatter_on_gpu(const Request& r, cudaStream_t st, const HostRunner& host) {
    const CallDesc& c = r.call;
    const std::size_t b = static_cast<std::size_t>(c.count) * size_of(c.dtype);
    const std::size_t nb = b * static_cast<std::size_t>(s_.size);
    pinned_[0].ensure(nb);
    pinned_[1].ensure(nb);
    CHORUS_CUDA(cudaMemcpyAsync(pinned_[0].p, r.send, nb, cudaMemcpyDeviceToHost, st));
    CHORUS_CUDA(cudaStreamSynchronize(st));
    CallDesc swap = c;
    swap.coll = Coll::Alltoall;
    swap.root = -1;
    host(swap, pinned_[0].p, pinned_[1].p);
    // In place, recv lies inside send: the copy above has already read it.
    reduce(blocks_to_device(pinned_[1].p, b, 0, nullptr, st), 0, r.recv,
           static_cast<std::size_t>(c.count), c, st);
    CHORUS_CUDA(cudaStreamSynchronize(st));
  }

  // One chunk of a staged allreduce or reduce combined on the GPU. `buf`
  // (pinned, room for len + n - 1 elements) holds this rank's `part.count`
  // elements; padded to n equal blocks, they are swapped so that rank p holds
  // block p of every rank (a host alltoall), a kernel reduces those n copies
  // in rank order, and the reduced blocks come back together in `buf`
  // (allgather; for reduce, gather at the root only).
  void combine_chunk_on_gpu(const CallDesc& part, char* buf, bool want_result,
                            const HostRunner& host) {
    const auto n = static_cast<std::size_t>(s_.size);
    const std::size_t e = size_of(part.dtype);
    const std::size_t len = static_cast<std::size_t>(part.count);
    const std::size_t blk = (len + n - 1) / n;
    const std::size_t b = blk * e;
    // The padding is reduced like the rest and dropped: make it defined.
    if (blk * n > len) std::memset(buf + len * e, 0, (blk * n - len) * e);
    CallDesc swap = part;
    swap.coll = Coll::Alltoall;
    swap.count = blk;
    swap.root = -1;
    host(swap, buf, gathered_.p);
    char* out = nullptr;
    const auto in = blocks_to_device(gathered_.p, b, b, &out, internal_);
    reduce(in, 0, out, blk, part, internal_);
    char* mine = buf + static_cast<std::size_t>(s_.rank) * b;
    CHORUS_CUDA(cudaMemcpyAsync(mine, out, b, cudaMemcpyDeviceToHost, internal_));
    CHORUS_CUDA(cudaStreamSynchronize(internal_));
    CallDesc back = part;
    back.count = blk;
    if (part.coll == Coll::Allreduce) {
      back.coll = Coll::Allgather;  // in place: mine == buf + rank * b
      back.root = -1;
      host(back, mine, buf);
    } else {
      back.coll = Coll::Gather;
      host(back, mine, want_result ? buf : nullptr);
    }
  }

  // Allreduce, broadcast and reduce in chunks: the copy of chunk k+2 to the
  // host and of chunk k-1 back overlap the host collective on chunk k. Three
  // pinned slots; the copy engines work on their own streams. Reductions
  // combined on the GPU come here at every size (one chunk when small).
  void run_pipelined(const Request& r, cudaStream_t st, const HostRunner& host) {
    const CallDesc& c = r.call;
    const std::size_t e = size_of(c.dtype);
    const std::size_t total = static_cast<std::size_t>(c.count);
    const std::size_t per = std::max<std::size_t>(1, stage_bytes_ / e);
    const std::size_t chunks = (total + per - 1) / per;
    // The communicator passes null for the buffers a rank does not use.
    const bool reads = r.send != nullptr;
    const bool writes = r.recv != nullptr;
    const bool on_gpu = combines_on_gpu(c);
    // On the GPU, a chunk is padded to n equal blocks.
    const std::size_t slot_elems = on_gpu ? per + static_cast<std::size_t>(s_.size) : per;
    for (auto& p : pinned_) p.ensure(slot_elems * e);
    if (on_gpu) gathered_.ensure(slot_elems * e);
    // Ordered after the caller's prior work on `st`.
    CHORUS_CUDA(cudaEventRecord(stage_events_[6], st));
    CHORUS_CUDA(cudaStreamWaitEvent(d2h_, stage_events_[6], 0));
    CHORUS_CUDA(cudaStreamWaitEvent(h2d_, stage_events_[6], 0));
    bool h2d_used[3] = {false, false, false};
    auto len_of = [&](std::size_t k) { return std::min(per, total - k * per); };
    auto issue_d2h = [&](std::size_t k) {
      const std::size_t slot = k % 3;
      if (h2d_used[slot]) CHORUS_CUDA(cudaStreamWaitEvent(d2h_, stage_events_[3 + slot], 0));
      if (reads)
        CHORUS_CUDA(cudaMemcpyAsync(pinned_[slot].p, static_cast<const char*>(r.send) + k * per * e,
                                    len_of(k) * e, cudaMemcpyDeviceToHost, d2h_));
      CHORUS_CUDA(cudaEventRecord(stage_events_[slot], d2h_));
    };
    issue_d2h(0);
    if (chunks > 1) issue_d2h(1);
    for (std::size_t k = 0; k < chunks; ++k) {
      if (k + 2 < chunks) issue_d2h(k + 2);
      const std::size_t slot = k % 3;
      CHORUS_CUDA(cudaEventSynchronize(stage_events_[slot]));
      CallDesc part = c;
      part.count = len_of(k);
      char* buf = static_cast<char*>(pinned_[slot].p);
      if (on_gpu) combine_chunk_on_gpu(part, buf, writes, host);
      else host(part, reads ? buf : nullptr, writes ? buf : nullptr);
      if (writes) {
        CHORUS_CUDA(cudaMemcpyAsync(static_cast<char*>(r.recv) + k * per * e, buf, len_of(k) * e,
                                    cudaMemcpyHostToDevice, h2d_));
      }
      CHORUS_CUDA(cudaEventRecord(stage_events_[3 + slot], h2d_));
      h2d_used[slot] = true;
    }
    // Later work on the caller's stream sees the result.
    CHORUS_CUDA(cudaEventRecord(stage_events_[7], h2d_));
    CHORUS_CUDA(cudaStreamWaitEvent(st, stage_events_[7], 0));
    // The pinned slots are reused by the next call: let the copies finish.
    CHORUS_CUDA(cudaEventSynchronize(stage_events_[7]));
  }

  EngineSetup s_;
  const bool ipc_wanted_;
  const bool gpu_reduce_wanted_;
  const std::size_t stage_bytes_;
  const std::size_t one_shot_bytes_;
  const std::size_t ipc_min_bytes_;
  std::atomic<int> ordinal_{-1};  // set once (ensure_init); read by async_error() from any thread
  bool introduced_ = false;
  bool ipc_ = false;
  bool gpu_reduce_ = false;  // staged reductions combine on the GPU (every rank agreed)
  bool same_gpu_ = false;  // every rank's buffers on this GPU: run_leader
  std::mutex init_mu_;
  cudaStream_t internal_ = nullptr, d2h_ = nullptr, h2d_ = nullptr;
  cudaStream_t async_ = nullptr;  // asynchronous calls' work (after their entry event)
  cudaEvent_t phase_event_ = nullptr;
  cudaEvent_t done_event_ = nullptr;  // an asynchronous call's end, for the caller's stream
  cudaEvent_t stage_events_[8] = {};
  using IpcKey = std::tuple<int, std::uint64_t, std::array<char, sizeof(cudaIpcMemHandle_t)>>;
  std::map<IpcKey, void*> opened_;  // (peer, allocation id, handle) -> mapping
  std::set<void*> in_use_;          // mappings the current call uses
  std::map<std::uintptr_t, std::pair<std::uint64_t, cudaIpcMemHandle_t>> handles_;  // mine, by base
  Pinned pinned_[3];
  Pinned gathered_;  // a chunk's blocks from every rank, on their way to the GPU
  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
};

}  // namespace

std::unique_ptr<Engine> make_engine(const EngineSetup& setup) {
  if (!probe().reason.empty()) throw Error(ErrorCode::Cuda, probe().reason);
  return std::make_unique<CudaEngine>(setup);
}

}  // namespace chorus::device
