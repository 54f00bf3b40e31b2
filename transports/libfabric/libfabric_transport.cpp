// libfabric transport: an RDM endpoint with tagged messages (FI_EP_RDM,
// FI_TAGGED) under the tagged-fabric transport (../tagged.hpp).
//
// Provider: CHORUS_FI_PROVIDER, or the best that fi_getinfo offers for the
// job: "shm" when every rank is on this host, else the first other RDM
// provider (here tcp;ofi_rxm), on the interface whose address the
// communicator chose (CHORUS_SOCKET_IFNAME or the route to the store).
// Addresses go through the store (fi_getname -> store -> fi_av_insert);
// completions are read from one completion queue by the progress loop;
// memory is registered only when the provider's mr_mode asks for it
// (FI_MR_LOCAL), or when CHORUS_FI_MR=always, through a cache of
// registrations keyed by address range.
//
// One-sided writes (FI_RMA, CHORUS_FI_RMA): a large copy receive exposes its
// destination (a registration with FI_REMOTE_WRITE, cached the same way) and
// the sender fi_write()s the payload into it (../tagged.cpp). "auto" uses
// them where the provider places written data only when the target drives
// it (tcp;ofi_rxm), so a failed receiver, never driven again, is not written
// after its error; libfabric's shm writes straight into the target process
// (process_vm_writev), so there only "on" uses them.
//
// The shm provider keeps each endpoint's queues in a file in /dev/shm, named
// by default "<pid>:<domain>:<endpoint>", which a killed process leaves
// behind; a later process with the same pid (pids wrap at 32768 here) then
// failed fi_enable with EBUSY. The endpoint is named "chorus-<job>-fi..."
// instead (shm_name_prefix(), with a random part), so stale files never
// collide, and chorusrun removes a killed rank's with the job's other
// segments.
//
// The same provider guards each endpoint's queue with a spinlock in that
// file. A process killed while holding one (sending to a peer, or reading
// its own queue) leaves whoever takes it next spinning inside libfabric
// forever, where no check of ours runs: 3 of 15 kills in the middle of
// 64 MiB allreduces hung the survivor. ShmWatchdog sees it from outside.

#include "dynload.hpp"
#include "tagged.hpp"

#include "core/log.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <rdma/fi_tagged.h>
#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <thread>

namespace chorus::transport::libfabric {
namespace {

constexpr std::size_t kMaxRegistrations = 256;

// The exported functions this file calls (everything else in libfabric's
// API is inline, through the objects' operation tables); see dynload.hpp.
struct Fi {
  decltype(&::fi_getinfo) getinfo;
  decltype(&::fi_freeinfo) freeinfo;
  decltype(&::fi_dupinfo) dupinfo;
  decltype(&::fi_fabric) fabric;
  decltype(&::fi_strerror) strerror;
  decltype(&::fi_version) version;
};

const Fi& fi() {
  static const Fi api = [] {
    // Debian's libfabric loads libinfinipath (for its psm provider), which
    // at load time installs a SIGABRT handler that calls exit() and writes
    // *.btr files into the working directory, and may pin the process to a
    // CPU; these variables (unless the user set them) keep it from both.
    setenv("IPATH_NO_BACKTRACE", "1", 0);
    setenv("IPATH_NO_CPUAFFINITY", "1", 0);
    static const DynamicLibrary lib({"libfabric.so.1", "libfabric.so"},
                                    "libfabric (Debian package libfabric1)");
    return Fi{lib.get(&::fi_getinfo, "fi_getinfo"),   lib.get(&::fi_freeinfo, "fi_freeinfo"),
              lib.get(&::fi_dupinfo, "fi_dupinfo"),   lib.get(&::fi_fabric, "fi_fabric"),
              lib.get(&::fi_strerror, "fi_strerror"), lib.get(&::fi_version, "fi_version")};
  }();
  return api;
}

[[noreturn]] void fail_call(const char* what, int rc) {
  throw Error(ErrorCode::Transport, std::string("libfabric: ") + what + " failed: " +
                                        fi().strerror(-rc) + " (" + std::to_string(rc) + ")");
}

std::string ipv4_of(const void* addr, std::size_t len) {
  if (addr == nullptr || len < sizeof(sockaddr_in)) return "";
  const auto* sa = static_cast<const sockaddr_in*>(addr);
  if (sa->sin_family != AF_INET) return "";
  char buf[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &sa->sin_addr, buf, sizeof buf);
  return buf;
}

// fi_getinfo's list, filtered for the job: see the file comment.
fi_info* choose(fi_info* list, const TransportContext& ctx, std::string* why) {
  const bool one_host = static_cast<int>(ctx.host_ranks.size()) == ctx.size;
  const std::string want = ctx.fi_provider;
  auto prov_of = [](const fi_info* i) {
    return std::string(i->fabric_attr->prov_name ? i->fabric_attr->prov_name : "");
  };
  // On one host shm wherever fi_getinfo lists it (libfabric 1.17 here lists
  // tcp;ofi_rxm first).
  if (want.empty() && one_host) {
    for (fi_info* i = list; i != nullptr; i = i->next) {
      if (prov_of(i) == "shm") {
        *why = "every rank is on this host";
        return i;
      }
    }
  }
  fi_info* first_fit = nullptr;
  for (fi_info* i = list; i != nullptr; i = i->next) {
    const std::string prov = prov_of(i);
    if (!want.empty() && prov != want) continue;
    if (want.empty() && prov == "shm") continue;  // cannot reach other hosts
    if (!want.empty() && prov == "shm") {
      *why = "CHORUS_FI_PROVIDER";
      return i;
    }
    // A network provider: the entry on the communicator's interface.
    if (ipv4_of(i->src_addr, i->src_addrlen) == ctx.listen_host) {
      *why = want.empty() ? "first network provider on " + ctx.listen_host : "CHORUS_FI_PROVIDER";
      return i;
    }
    if (first_fit == nullptr) first_fit = i;
  }
  if (first_fit) *why = want.empty() ? "first provider offered" : "CHORUS_FI_PROVIDER";
  return first_fit;
}

// Watches a shm endpoint for the hang in the file comment: the transport's
// thread inside one libfabric call for kStuckTicks x kTick while a peer's process
// has exited. That thread can never be released, so the process says which
// rank died and exits with status 2 (what a PeerFailure makes chorus-bench
// return), as PyTorch's NCCL watchdog tears a process down; a stopped (not
// dead) peer is waited for.
class ShmWatchdog {
 public:
  static constexpr std::chrono::milliseconds kTick{250};
  static constexpr int kStuckTicks = 8;  // 2 s inside one call

  // `own`: the start of this endpoint's /dev/shm file name.
  ShmWatchdog(int rank, std::string own)
      : rank_(rank), own_(std::move(own)), thread_([this] { run(); }) {}

  ~ShmWatchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
    for (const Peer& p : peers_) ::close(p.pidfd);
  }

  // `peer`'s process, to check once a call seems stuck (a pidfd: never
  // confused with a later process that got the same pid), and the start of
  // its endpoint's file name.
  void watch(int peer, pid_t pid, std::string file) {
    const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (fd < 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    peers_.push_back(Peer{peer, pid, fd, std::move(file)});
  }

  // Removes the endpoint files that dead peers left in /dev/shm (a failed
  // communicator's close: nobody else would, outside chorusrun).
  void remove_dead_files() {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Peer& p : peers_)
      if (dead(p)) remove_files(p.file);
  }

  // Brackets one libfabric call: the counter goes up on entry and on exit,
  // so it is odd inside a call (the transport is driven by one thread at a
  // time, so a plain load and store count).
  class Call {
   public:
    explicit Call(ShmWatchdog* w) : w_(w) { tick(); }
    ~Call() { tick(); }
    Call(const Call&) = delete;
    Call& operator=(const Call&) = delete;

   private:
    void tick() {
      if (w_ != nullptr)
        w_->edges_.store(w_->edges_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    }
    ShmWatchdog* w_;
  };

 private:
  struct Peer {
    int rank;
    pid_t pid;
    int pidfd;
    std::string file;
  };

  static bool dead(const Peer& p) {
    pollfd pf{p.pidfd, POLLIN, 0};
    return ::poll(&pf, 1, 0) == 1;
  }

  // Unlinks an endpoint's /dev/shm files: the provider appends
  // ":<domain>:<endpoint>" to `start`, which is unique to the endpoint.
  static void remove_files(const std::string& start) {
    if (!start.empty()) remove_shm_files(start);
  }

  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    std::uint64_t last = 0;
    int stuck = 0;
    while (!cv_.wait_for(lock, kTick, [&] { return stop_; })) {
      const std::uint64_t edges = edges_.load(std::memory_order_relaxed);
      stuck = (edges & 1) != 0 && edges == last ? stuck + 1 : 0;  // inside the same call
      last = edges;
      if (stuck < kStuckTicks) continue;
      for (const Peer& p : peers_)
        if (dead(p)) die(p);
    }
  }

  [[noreturn]] void die(const Peer& p) const {
    // Nothing will close the two endpoints: their files go now.
    remove_files(own_);
    for (const Peer& q : peers_)
      if (dead(q)) remove_files(q.file);
    std::fprintf(stderr,
                 "chorus: rank %d: PeerFailure: rank %d (pid %d) died while this rank was inside "
                 "libfabric's shm provider, which now waits forever on a lock the dead process "
                 "held in its shared queue (libfabric 1.17); the calling thread cannot be "
                 "released, so the process exits with status 2. Chorus's own shared-memory "
                 "transport (CHORUS_TRANSPORT=shm) fails such calls with PeerFailure instead.\n",
                 rank_, p.rank, static_cast<int>(p.pid));
    std::fflush(stderr);
    ::_exit(2);
  }

  const int rank_;
  const std::string own_;
  std::atomic<std::uint64_t> edges_{0};  // libfabric call entries and exits (Call)
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::vector<Peer> peers_;
  std::thread thread_;  // last: starts after the members it reads
};

// What a peer's shm address says: its pid and the start of its endpoint's
// file name ("chorus-<job>-fi-r<rank>-<pid>-<n>-<random>", from
// name_shm_endpoint); pid -1 if it is not such a name.
struct ShmName {
  pid_t pid = -1;
  std::string file;
};

ShmName parse_shm_name(const std::vector<std::uint8_t>& raw, int rank) {
  const std::string addr(raw.begin(), std::find(raw.begin(), raw.end(), std::uint8_t{0}));
  const std::size_t from = addr.find("chorus-");
  const std::string tag = "-fi-r" + std::to_string(rank) + "-";
  const std::size_t at = addr.find(tag);
  if (from == std::string::npos || at == std::string::npos || at < from) return {};
  const char* p = addr.c_str() + at + tag.size();
  char* end = nullptr;
  const long pid = std::strtol(p, &end, 10);
  if (end == p || *end != '-' || pid <= 0) return {};
  return {static_cast<pid_t>(pid), addr.substr(from, addr.find(':', from) - from)};
}

class LibfabricFabric final : public TagFabric {
 public:
  explicit LibfabricFabric(const TransportContext& ctx) {
    // With writes wanted, the providers that offer them; else (or if none
    // fits) the plain tagged ones.
    if (ctx.fi_rma != "off") open_info(ctx, true);
    if (info_ == nullptr) open_info(ctx, false);
    provider_ = info_->fabric_attr->prov_name ? info_->fabric_attr->prov_name : "?";
    const auto mr_mode = info_->domain_attr->mr_mode;
    register_ = (mr_mode & FI_MR_LOCAL) != 0 || ctx.fi_mr == "always";
    mr_endpoint_ = (mr_mode & FI_MR_ENDPOINT) != 0;
    prov_key_ = (mr_mode & FI_MR_PROV_KEY) != 0;
    virt_addr_ = (mr_mode & FI_MR_VIRT_ADDR) != 0;
    // Writes only where a failed receiver is safe from them (see the file
    // comment), unless asked for.
    writes_ = (info_->caps & FI_RMA) != 0 &&
              (ctx.fi_rma == "on" || (ctx.fi_rma == "auto" && provider_ != "shm"));
    how_ = "libfabric " + std::to_string(FI_MAJOR(fi().version())) + "." +
           std::to_string(FI_MINOR(fi().version())) + ", provider " + provider_ + ", domain " +
           (info_->domain_attr->name ? info_->domain_attr->name : "?") + " (" + why_ + ")" +
           (register_ ? ", registering memory" : "") +
           (writes_ ? ", one-sided writes for large messages" : "");
    open_endpoint(ctx);
    if (provider_ == "shm" && ctx.size > 1)
      watchdog_ = std::make_unique<ShmWatchdog>(ctx.rank, shm_name_);
  }

 private:
  // fi_getinfo with our hints (and FI_RMA if `rma`), then the job's choice
  // among the results into info_ (left null if nothing fits and `rma`).
  void open_info(const TransportContext& ctx, bool rma) {
    fi_info* hints = fi().dupinfo(nullptr);
    if (hints == nullptr) throw Error(ErrorCode::Transport, "libfabric: fi_allocinfo failed");
    hints->caps = FI_TAGGED | (rma ? FI_RMA | FI_WRITE | FI_REMOTE_WRITE : 0);
    hints->mode = FI_CONTEXT | FI_CONTEXT2;
    hints->ep_attr->type = FI_EP_RDM;
    hints->domain_attr->mr_mode =
        FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
    hints->domain_attr->threading = FI_THREAD_DOMAIN;
    if (!ctx.fi_provider.empty()) hints->fabric_attr->prov_name = strdup(ctx.fi_provider.c_str());
    fi_info* list = nullptr;
    const int rc = fi().getinfo(FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION), nullptr, nullptr, 0,
                                hints, &list);
    fi().freeinfo(hints);
    if (rma && (rc != 0 || list == nullptr)) return;
    if (rc != 0 || list == nullptr)
      throw Error(
          ErrorCode::Transport,
          std::string(
              "libfabric: no provider offers reliable tagged messages (FI_EP_RDM, FI_TAGGED)") +
              (ctx.fi_provider.empty()
                   ? ""
                   : " by the name CHORUS_FI_PROVIDER='" + ctx.fi_provider + "'") +
              ": " + fi().strerror(-rc) + "; `fi_info -t FI_EP_RDM` lists what this host has");
    fi_info* pick = choose(list, ctx, &why_);
    if (pick == nullptr && rma) {
      fi().freeinfo(list);
      return;
    }
    if (pick == nullptr) {
      fi().freeinfo(list);
      throw Error(ErrorCode::Transport,
                  "libfabric: no usable provider for this job (CHORUS_FI_PROVIDER='" +
                      ctx.fi_provider + "'); `fi_info -t FI_EP_RDM` lists what this host has");
    }
    info_ = fi().dupinfo(pick);
    fi().freeinfo(list);
  }

  // The shm provider's name for the endpoint (and its /dev/shm file): see
  // the file comment. FI_ADDR_STR, "fi_shm://<name>"; the provider appends
  // ":<domain>:<endpoint>".
  void name_shm_endpoint(int rank) {
    if (info_->addr_format != FI_ADDR_STR) return;
    static std::atomic<unsigned> serial{0};
    static const unsigned nonce = std::random_device{}();
    char tail[64];
    std::snprintf(tail, sizeof tail, "fi-r%d-%d-%u-%08x", rank, static_cast<int>(getpid()),
                  serial.fetch_add(1), nonce);
    shm_name_ = shm_name_prefix() + tail;
    const std::string addr = "fi_shm://" + shm_name_;
    char* copy = strdup(addr.c_str());
    if (copy == nullptr) throw Error(ErrorCode::Transport, "libfabric: out of memory");
    std::free(info_->src_addr);
    info_->src_addr = copy;
    info_->src_addrlen = addr.size() + 1;
  }

  void open_endpoint(const TransportContext& ctx) {
    int r = fi().fabric(info_->fabric_attr, &fabric_, nullptr);
    if (r) fail_call("fi_fabric", r);
    r = fi_domain(fabric_, info_, &domain_, nullptr);
    if (r) fail_call("fi_domain", r);
    fi_cq_attr cq{};
    cq.format = FI_CQ_FORMAT_TAGGED;
    // A completion queue with a file descriptor to sleep on, where the
    // provider offers one; otherwise the transport naps between polls.
    cq.wait_obj = FI_WAIT_FD;
    r = fi_cq_open(domain_, &cq, &cq_, nullptr);
    if (r == 0 && fi_control(&cq_->fid, FI_GETWAIT, &wait_fd_) != 0) wait_fd_ = -1;
    if (r != 0) {
      cq.wait_obj = FI_WAIT_NONE;
      r = fi_cq_open(domain_, &cq, &cq_, nullptr);
    }
    if (r) fail_call("fi_cq_open", r);
    how_ += wait_fd_ >= 0 ? ", sleeps on the completion queue's fd" : ", polls (no wait fd)";
    fi_av_attr av{};
    av.type =
        info_->domain_attr->av_type == FI_AV_UNSPEC ? FI_AV_TABLE : info_->domain_attr->av_type;
    r = fi_av_open(domain_, &av, &av_, nullptr);
    if (r) fail_call("fi_av_open", r);
    if (provider_ == "shm") name_shm_endpoint(ctx.rank);
    r = fi_endpoint(domain_, info_, &ep_, nullptr);
    if (r) fail_call("fi_endpoint", r);
    r = fi_ep_bind(ep_, &av_->fid, 0);
    if (r) fail_call("fi_ep_bind(av)", r);
    r = fi_ep_bind(ep_, &cq_->fid, FI_TRANSMIT | FI_RECV);
    if (r) fail_call("fi_ep_bind(cq)", r);
    r = fi_enable(ep_);
    if (r) fail_call("fi_enable", r);
    std::size_t len = 0;
    r = fi_getname(&ep_->fid, nullptr, &len);
    if (r != -FI_ETOOSMALL && r != 0) fail_call("fi_getname", r);
    address_.resize(len);
    r = fi_getname(&ep_->fid, address_.data(), &len);
    if (r) fail_call("fi_getname", r);
    address_.resize(len);
    peers_.assign(static_cast<std::size_t>(ctx.size), FI_ADDR_NOTAVAIL);
  }

 public:
  ~LibfabricFabric() override { close(false); }

  std::string describe() const override { return how_; }

  std::vector<std::uint8_t> address() const override {
    // The provider's name first: ranks that chose different providers would
    // otherwise insert addresses their provider cannot parse.
    const std::string mode = wire_mode();
    std::vector<std::uint8_t> out(mode.begin(), mode.end());
    out.push_back(0);
    out.insert(out.end(), address_.begin(), address_.end());
    return out;
  }

  void add_peer(int peer, const std::vector<std::uint8_t>& a) override {
    const auto nul = std::find(a.begin(), a.end(), std::uint8_t{0});
    const std::string theirs(a.begin(), nul);
    if (nul == a.end() || theirs != wire_mode())
      throw Error(ErrorCode::InvalidUsage,
                  "libfabric: rank " + std::to_string(peer) + " uses provider '" + theirs +
                      "' but this rank uses '" + wire_mode() +
                      "' ('+rma': one-sided writes); set the same CHORUS_FI_PROVIDER and "
                      "CHORUS_FI_RMA on every rank",
                  peer);
    std::vector<std::uint8_t> raw(nul + 1, a.end());
    fi_addr_t fa = FI_ADDR_NOTAVAIL;
    const int n = fi_av_insert(av_, raw.data(), 1, &fa, 0, nullptr);
    if (n != 1)
      throw Error(ErrorCode::Transport,
                  "libfabric: fi_av_insert of rank " + std::to_string(peer) +
                      "'s address failed (" + std::to_string(n) + ")",
                  peer);
    peers_[static_cast<std::size_t>(peer)] = fa;
    if (watchdog_)
      if (ShmName name = parse_shm_name(raw, peer); name.pid > 0)
        watchdog_->watch(peer, name.pid, std::move(name.file));
  }

  bool send(int peer, std::uint64_t tag, const void* buf, std::size_t len, FabricOp& op) override {
    void* desc = describe_memory(buf, len);
    ShmWatchdog::Call watched(watchdog_.get());
    const ssize_t r =
        fi_tsend(ep_, buf, len, desc, peers_[static_cast<std::size_t>(peer)], tag, &op);
    return posted(r, op, "fi_tsend");
  }

  bool recv(std::uint64_t tag, void* buf, std::size_t len, FabricOp& op) override {
    void* desc = describe_memory(buf, len);
    ShmWatchdog::Call watched(watchdog_.get());
    const ssize_t r = fi_trecv(ep_, buf, len, desc, FI_ADDR_UNSPEC, tag, 0, &op);
    return posted(r, op, "fi_trecv");
  }

  bool can_write() const override { return writes_; }

  // The provider's name and whether this rank writes: every rank must agree.
  std::string wire_mode() const { return provider_ + (writes_ ? "+rma" : ""); }

  Region expose(void* buf, std::size_t len) override {
    const auto p = reinterpret_cast<std::uintptr_t>(buf);
    // Emptied when full only while no sender may still write.
    const auto [lo, mr] = cached(exposed_, p, len, FI_REMOTE_WRITE, live_exposures_ == 0);
    ++live_exposures_;
    Region r;
    r.addr = virt_addr_ ? p : p - lo;
    r.key = fi_mr_key(mr);
    return r;
  }

  void exposed_done() override {
    if (live_exposures_ > 0) --live_exposures_;
  }

  bool write(int peer, const void* buf, std::size_t len, std::uint64_t addr, std::uint64_t key,
             FabricOp& op) override {
    void* desc = describe_memory(buf, len);
    ShmWatchdog::Call watched(watchdog_.get());
    const ssize_t r = fi_write(ep_, buf, len, desc, peers_[static_cast<std::size_t>(peer)], addr,
                               key, &op);
    return posted(r, op, "fi_write");
  }

  unsigned progress() override {
    ShmWatchdog::Call watched(watchdog_.get());
    unsigned events = 0;
    fi_cq_tagged_entry e[16];
    for (;;) {
      const ssize_t n = fi_cq_read(cq_, e, 16);
      if (n == -FI_EAGAIN) break;
      if (n == -FI_EAVAIL) {
        fi_cq_err_entry err{};
        if (fi_cq_readerr(cq_, &err, 0) != 1) break;
        auto* op = static_cast<FabricOp*>(err.op_context);
        if (op) {
          finish(*op);
          op->received = err.len;
          op->truncated = err.err == FI_ETRUNC;
          const char* prov = fi_cq_strerror(cq_, err.prov_errno, err.err_data, nullptr, 0);
          op->error = std::string(fi().strerror(err.err)) +
                      (prov && *prov ? std::string(" (") + prov + ")" : "");
        }
        ++events;
        continue;
      }
      if (n < 0) fail_call("fi_cq_read", static_cast<int>(n));
      for (ssize_t i = 0; i < n; ++i) {
        auto* op = static_cast<FabricOp*>(e[i].op_context);
        finish(*op);
        if (e[i].flags & FI_RECV) op->received = e[i].len;
      }
      events += static_cast<unsigned>(n);
      if (n < 16) break;
    }
    return events;
  }

  int wait_fd() override { return wait_fd_; }
  bool arm() override {
    ShmWatchdog::Call watched(watchdog_.get());
    fid* f = &cq_->fid;
    return fi_trywait(fabric_, &f, 1) == FI_SUCCESS;
  }

  void cancel(FabricOp& op) override {
    ShmWatchdog::Call watched(watchdog_.get());
    if (ep_) fi_cancel(&ep_->fid, &op);
  }

  void close(bool flush) override {
    // Sends complete once the provider no longer needs their buffers and will
    // deliver them (FI_TRANSMIT_COMPLETE), so there is nothing to flush.
    if (register_ && info_)
      CHORUS_INFO("libfabric: " << registrations_ << " memory registrations made (cache of up to "
                                << kMaxRegistrations << ")");
    // Remote access ends first (where the provider enforces keys, a NIC).
    for (auto& [start, m] : exposed_) fi_close(&m.mr->fid);
    exposed_.clear();
    if (!flush && ep_ && provider_.find("ofi_rxm") != std::string::npos) {
      // Closing an rxm endpoint drains each connection's completions, and
      // libfabric's rxm (1.17 here; the same class of bug is open upstream)
      // can dereference a null context there when a connection broke because
      // its peer died: a segfault in fi_close. A failed communicator's
      // endpoint is therefore kept open, undriven, until the process exits
      // (docs/transports.md). It is never progressed again, so it writes
      // into no buffer; the cost is its sockets and memory.
      CHORUS_INFO("libfabric: the endpoint of a failed communicator stays open until exit ("
                  << provider_ << " cannot be closed safely after a peer's death)");
      Retired r{info_, fabric_, domain_, cq_, av_, ep_, {}};
      for (auto& [start, m] : mrs_) r.mrs.push_back(m.mr);
      retire(std::move(r));
    } else {
      ShmWatchdog::Call watched(watchdog_.get());
      for (auto& [start, m] : mrs_) fi_close(&m.mr->fid);
      if (ep_) fi_close(&ep_->fid);
      if (av_) fi_close(&av_->fid);
      if (cq_) fi_close(&cq_->fid);
      if (domain_) fi_close(&domain_->fid);
      if (fabric_) fi_close(&fabric_->fid);
      if (info_) fi().freeinfo(info_);
    }
    mrs_.clear();
    ep_ = nullptr;
    av_ = nullptr;
    cq_ = nullptr;
    domain_ = nullptr;
    fabric_ = nullptr;
    info_ = nullptr;
    if (watchdog_ && !flush) watchdog_->remove_dead_files();
    watchdog_.reset();
  }

 private:
  // What a failed rxm endpoint leaves open, held for the process's lifetime
  // (reachable, so LeakSanitizer does not report it).
  struct Retired {
    fi_info* info;
    fid_fabric* fabric;
    fid_domain* domain;
    fid_cq* cq;
    fid_av* av;
    fid_ep* ep;
    std::vector<fid_mr*> mrs;
  };
  static void retire(Retired r) {
    static std::mutex mu;
    static auto* kept = new std::vector<Retired>;
    std::lock_guard<std::mutex> lock(mu);
    kept->push_back(std::move(r));
  }

  bool posted(ssize_t r, FabricOp& op, const char* what) {
    if (r == -FI_EAGAIN) return false;
    if (r != 0) fail_call(what, static_cast<int>(r));
    op.posted = true;
    ++inflight_;
    return true;
  }

  void finish(FabricOp& op) {
    op.posted = false;
    op.done = true;
    if (inflight_ > 0) --inflight_;
  }

  struct Registration {
    std::uintptr_t end = 0;
    fid_mr* mr = nullptr;
  };

  // The registration covering [buf, buf+len), made (whole pages) on a miss.
  // Entries are keyed by address: memory freed and reallocated at the same
  // address keeps its old entry, which the software providers here ignore
  // but an RDMA NIC would not (docs/transports.md).
  void* describe_memory(const void* buf, std::size_t len) {
    if (!register_ || len == 0) return nullptr;
    const auto p = reinterpret_cast<std::uintptr_t>(buf);
    // Emptied when full only while nothing in flight can use an entry.
    const std::uint64_t access = FI_SEND | FI_RECV | (writes_ ? FI_WRITE : 0);
    return fi_mr_desc(cached(mrs_, p, len, access, inflight_ == 0).second);
  }

  using Cache = std::map<std::uintptr_t, Registration>;

  // The registration in `cache` covering [p, p+len) and its first byte; on
  // a miss, one of the whole pages made now (the cache first emptied when
  // it is full and `may_empty`).
  std::pair<std::uintptr_t, fid_mr*> cached(Cache& cache, std::uintptr_t p, std::size_t len,
                                            std::uint64_t access, bool may_empty) {
    auto it = cache.upper_bound(p);
    if (it != cache.begin()) {
      --it;
      if (it->first <= p && p + len <= it->second.end) return {it->first, it->second.mr};
    }
    if (cache.size() >= kMaxRegistrations && may_empty) {
      for (auto& [start, m] : cache) fi_close(&m.mr->fid);
      cache.clear();
    }
    const std::uintptr_t lo = p / page_size() * page_size();
    const std::uintptr_t hi = (p + len + page_size() - 1) / page_size() * page_size();
    fid_mr* mr = register_range(lo, hi, access);
    cache[lo] = Registration{hi, mr};
    return {lo, mr};
  }

  static std::uintptr_t page_size() {
    static const auto page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
    return page;
  }

  fid_mr* register_range(std::uintptr_t lo, std::uintptr_t hi, std::uint64_t access) {
    fid_mr* mr = nullptr;
    const int r = fi_mr_reg(domain_, reinterpret_cast<void*>(lo), hi - lo, access, 0,
                            prov_key_ ? 0 : next_key_++, 0, &mr, nullptr);
    if (r) fail_call("fi_mr_reg", r);
    if (mr_endpoint_) {
      int b = fi_mr_bind(mr, &ep_->fid, 0);
      if (b == 0) b = fi_mr_enable(mr);
      if (b) {
        fi_close(&mr->fid);
        fail_call("fi_mr_bind/enable", b);
      }
    }
    ++registrations_;
    return mr;
  }

  fi_info* info_ = nullptr;
  fid_fabric* fabric_ = nullptr;
  fid_domain* domain_ = nullptr;
  fid_cq* cq_ = nullptr;
  fid_av* av_ = nullptr;
  fid_ep* ep_ = nullptr;
  std::string provider_, how_;
  std::vector<std::uint8_t> address_;
  std::vector<fi_addr_t> peers_;
  bool register_ = false, mr_endpoint_ = false, prov_key_ = false, virt_addr_ = false;
  bool writes_ = false;
  std::string why_;
  Cache mrs_;
  Cache exposed_;  // FI_REMOTE_WRITE registrations
  std::size_t live_exposures_ = 0;
  std::uint64_t next_key_ = 1;
  std::size_t inflight_ = 0;
  std::size_t registrations_ = 0;
  int wait_fd_ = -1;
  std::string shm_name_;  // shm provider: this endpoint's name (name_shm_endpoint)
  std::unique_ptr<ShmWatchdog> watchdog_;  // shm provider only: see ShmWatchdog
};

[[maybe_unused]] const bool kRegistered =
    register_transport("libfabric", [](const TransportContext& ctx) {
      return make_tagged_transport("libfabric", ctx, std::make_unique<LibfabricFabric>(ctx));
    });

}  // namespace
}  // namespace chorus::transport::libfabric
