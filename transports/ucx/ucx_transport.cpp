// UCX transport: a UCP worker with tag send/receive (ucp_tag_send_nbx,
// ucp_tag_recv_nbx) under the tagged-fabric transport (../tagged.hpp).
//
// UCX reads its own environment (UCX_TLS, UCX_NET_DEVICES, UCX_RNDV_THRESH,
// ...) through ucp_config_read, so every UCX tunable works as it does for
// any UCX application. Worker addresses go through the store; endpoints are
// created on first use, with peer error handling, so that a peer whose
// connection breaks completes our requests with an error (and the error
// callback names it) instead of leaving them posted forever. Large messages
// go by UCX's rendezvous protocol, zero-copy where the transport allows
// (cma, tcp's zcopy), with UCX's own registration cache.

#include "dynload.hpp"
#include "tagged.hpp"

#include "core/log.hpp"

#include <ucp/api/ucp.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string_view>

namespace chorus::transport::ucx {
namespace {

// The exported functions this file calls, resolved when the first UCX
// communicator is made (dynload.hpp: linking UCX would install its signal
// handlers in every process that uses Chorus).
struct Ucx {
  decltype(&::ucp_cleanup) cleanup;
  decltype(&::ucp_config_modify) config_modify;
  decltype(&::ucp_config_read) config_read;
  decltype(&::ucp_config_release) config_release;
  decltype(&::ucp_ep_close_nbx) ep_close_nbx;
  decltype(&::ucp_ep_create) ep_create;
  decltype(&::ucp_get_version_string) get_version_string;
  decltype(&::ucp_init_version) init_version;
  decltype(&::ucp_request_cancel) request_cancel;
  decltype(&::ucp_request_check_status) request_check_status;
  decltype(&::ucp_request_free) request_free;
  decltype(&::ucp_tag_recv_nbx) tag_recv_nbx;
  decltype(&::ucp_tag_send_nbx) tag_send_nbx;
  decltype(&::ucp_worker_arm) worker_arm;
  decltype(&::ucp_worker_create) worker_create;
  decltype(&::ucp_worker_destroy) worker_destroy;
  decltype(&::ucp_worker_get_address) worker_get_address;
  decltype(&::ucp_worker_get_efd) worker_get_efd;
  decltype(&::ucp_worker_progress) worker_progress;
  decltype(&::ucp_worker_release_address) worker_release_address;
  decltype(&::ucs_status_string) status_string;
};

const Ucx& ucx() {
  static const Ucx api = [] {
    static const DynamicLibrary lib({"libucp.so.0", "libucp.so"}, "UCX (Debian package libucx0)");
    return Ucx{lib.get(&::ucp_cleanup, "ucp_cleanup"),
               lib.get(&::ucp_config_modify, "ucp_config_modify"),
               lib.get(&::ucp_config_read, "ucp_config_read"),
               lib.get(&::ucp_config_release, "ucp_config_release"),
               lib.get(&::ucp_ep_close_nbx, "ucp_ep_close_nbx"),
               lib.get(&::ucp_ep_create, "ucp_ep_create"),
               lib.get(&::ucp_get_version_string, "ucp_get_version_string"),
               lib.get(&::ucp_init_version, "ucp_init_version"),
               lib.get(&::ucp_request_cancel, "ucp_request_cancel"),
               lib.get(&::ucp_request_check_status, "ucp_request_check_status"),
               lib.get(&::ucp_request_free, "ucp_request_free"),
               lib.get(&::ucp_tag_recv_nbx, "ucp_tag_recv_nbx"),
               lib.get(&::ucp_tag_send_nbx, "ucp_tag_send_nbx"),
               lib.get(&::ucp_worker_arm, "ucp_worker_arm"),
               lib.get(&::ucp_worker_create, "ucp_worker_create"),
               lib.get(&::ucp_worker_destroy, "ucp_worker_destroy"),
               lib.get(&::ucp_worker_get_address, "ucp_worker_get_address"),
               lib.get(&::ucp_worker_get_efd, "ucp_worker_get_efd"),
               lib.get(&::ucp_worker_progress, "ucp_worker_progress"),
               lib.get(&::ucp_worker_release_address, "ucp_worker_release_address"),
               lib.get(&::ucs_status_string, "ucs_status_string")};
  }();
  return api;
}

[[noreturn]] void fail_status(const char* what, ucs_status_t s) {
  throw Error(ErrorCode::Transport,
              std::string("UCX: ") + what + " failed: " + ucx().status_string(s));
}

class UcxFabric;

// Whether UCX_TLS lets UCX pick cma: unset, "all", an exclusion list
// ("^..."), or a list naming cma or one of its aliases (sm, shm).
bool may_use_cma() {
  const char* tls = std::getenv("UCX_TLS");
  if (tls == nullptr || *tls == '\0' || *tls == '^') return true;
  for (std::string_view rest = tls;;) {
    const std::size_t comma = rest.find(',');
    const std::string_view t = rest.substr(0, comma);
    if (t == "all" || t == "cma" || t == "sm" || t == "shm") return true;
    if (comma == std::string_view::npos) return false;
    rest.remove_prefix(comma + 1);
  }
}

struct EpArg {
  UcxFabric* self = nullptr;
  int peer = -1;
};

class UcxFabric final : public TagFabric {
 public:
  explicit UcxFabric(const TransportContext& ctx)
      : eps_(static_cast<std::size_t>(ctx.size), nullptr),
        ep_failed_(static_cast<std::size_t>(ctx.size), false),
        args_(static_cast<std::size_t>(ctx.size)) {
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucx().config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) fail_status("ucp_config_read", s);
    // Rendezvous by put (the sender writes, then tells the receiver) where
    // UCX may pick cma, unless the user chose a scheme: with UCX 1.13's
    // default there, get (the receiver reads, then acknowledges), a large
    // send sometimes never completes although its receiver has everything
    // (posix,cma, 3 ranks, 512 KiB chunks: about one 36 MiB collective in
    // 15; none in 105 with put; docs/transports.md). Over tcp get showed no
    // hang and put costs ~10% of point-to-point bandwidth, so it stays.
    if (std::getenv("UCX_RNDV_SCHEME") == nullptr && may_use_cma()) {
      s = ucx().config_modify(config, "RNDV_SCHEME", "put_zcopy");
      if (s != UCS_OK)
        CHORUS_WARN("UCX: RNDV_SCHEME=put_zcopy not taken: " << ucx().status_string(s));
    }
    ucp_params_t p{};
    p.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
    p.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
    p.mt_workers_shared = 0;
    s = ucx().init_version(UCP_API_MAJOR, UCP_API_MINOR, &p, config, &context_);
    ucx().config_release(config);
    if (s != UCS_OK) fail_status("ucp_init", s);
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    s = ucx().worker_create(context_, &wp, &worker_);
    if (s != UCS_OK) fail_status("ucp_worker_create", s);
    ucp_address_t* addr = nullptr;
    std::size_t len = 0;
    s = ucx().worker_get_address(worker_, &addr, &len);
    if (s != UCS_OK) fail_status("ucp_worker_get_address", s);
    s = ucx().worker_get_efd(worker_, &efd_);
    if (s != UCS_OK) efd_ = -1;  // nap instead
    const auto* b = reinterpret_cast<const std::uint8_t*>(addr);
    address_.assign(b, b + len);
    ucx().worker_release_address(worker_, addr);
    for (std::size_t i = 0; i < args_.size(); ++i) args_[i] = EpArg{this, static_cast<int>(i)};
    // Peer error handling makes a broken connection complete our requests
    // with an error, but UCX 1.13's shared-memory transports (posix, sysv)
    // do not offer it, and asking for it then leaves no transport between
    // the ranks of one host. So: between hosts only; within one, a dead peer
    // is noticed by the control connection (tagged.hpp).
    peer_errors_ = static_cast<int>(ctx.host_ranks.size()) != ctx.size;
    const char* tls = std::getenv("UCX_TLS");
    const char* dev = std::getenv("UCX_NET_DEVICES");
    how_ = std::string("UCX ") + ucx().get_version_string() + ", UCX_TLS=" + (tls ? tls : "(all)") +
           ", UCX_NET_DEVICES=" + (dev ? dev : "(all)") +
           (peer_errors_ ? ", peer error handling" : "");
  }

  ~UcxFabric() override { close(false); }

  std::string describe() const override { return how_; }
  std::vector<std::uint8_t> address() const override { return address_; }

  void add_peer(int peer, const std::vector<std::uint8_t>& a) override {
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(a.data());
    ep.err_mode = peer_errors_ ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    ep.err_handler.cb = &UcxFabric::on_ep_error;
    ep.err_handler.arg = &args_[static_cast<std::size_t>(peer)];
    ucp_ep_h h = nullptr;
    const ucs_status_t s = ucx().ep_create(worker_, &ep, &h);
    if (s != UCS_OK)
      throw Error(ErrorCode::Transport,
                  std::string("UCX: cannot create an endpoint to rank ") + std::to_string(peer) +
                      ": " + ucx().status_string(s) +
                      " (do both ranks share a transport in UCX_TLS?)",
                  peer);
    eps_[static_cast<std::size_t>(peer)] = h;
  }

  bool send(int peer, std::uint64_t tag, const void* buf, std::size_t len, FabricOp& op) override {
    if (ep_failed_[static_cast<std::size_t>(peer)]) {
      op.done = true;
      op.error = "the endpoint failed earlier";
      return true;
    }
    ucp_request_param_t rp{};
    rp.op_attr_mask =
        UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
    rp.cb.send = &UcxFabric::on_send;
    rp.user_data = &op;
    rp.datatype = ucp_dt_make_contig(1);
    ucs_status_ptr_t r =
        ucx().tag_send_nbx(eps_[static_cast<std::size_t>(peer)], buf, len, tag, &rp);
    if (r == nullptr) {
      op.done = true;
    } else if (UCS_PTR_IS_ERR(r)) {
      op.done = true;
      op.error = ucx().status_string(UCS_PTR_STATUS(r));
    } else {
      op.posted = true;
      op.handle = r;
    }
    return true;
  }

  bool recv(std::uint64_t tag, void* buf, std::size_t len, FabricOp& op) override {
    // No immediate completion: UCX 1.13 leaves recv_info unset when a
    // receive completes inside the call, and the length is what we check.
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                      UCP_OP_ATTR_FIELD_DATATYPE | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    rp.cb.recv = &UcxFabric::on_recv;
    rp.user_data = &op;
    rp.datatype = ucp_dt_make_contig(1);
    ucs_status_ptr_t r = ucx().tag_recv_nbx(worker_, buf, len, tag, ~std::uint64_t{0}, &rp);
    if (r == nullptr) {
      op.done = true;
      op.error = "UCX completed a receive without reporting its length";
    } else if (UCS_PTR_IS_ERR(r)) {
      op.done = true;
      set_error(op, UCS_PTR_STATUS(r));
    } else {
      op.posted = true;
      op.handle = r;
    }
    return true;
  }

  unsigned progress() override {
    unsigned events = 0;
    for (int i = 0; i < 4; ++i) {
      const unsigned n = ucx().worker_progress(worker_);
      events += n;
      if (n == 0) break;
    }
    return events;
  }

  int wait_fd() override { return efd_; }
  bool arm() override { return ucx().worker_arm(worker_) == UCS_OK; }

  void cancel(FabricOp& op) override {
    if (op.posted && op.handle) ucx().request_cancel(worker_, op.handle);
  }

  void close(bool flush) override {
    if (worker_ == nullptr) return;
    // Close each endpoint: with a flush after a clean run (what was sent has
    // left), by force otherwise, and then without progressing the worker:
    // after a failure, progress could still land rendezvous data in receive
    // buffers the caller has freed (tagged.cpp).
    std::vector<void*> closing;
    for (std::size_t i = 0; i < eps_.size(); ++i) {
      if (eps_[i] == nullptr) continue;
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = (flush && !ep_failed_[i]) ? 0 : UCP_EP_CLOSE_FLAG_FORCE;
      ucs_status_ptr_t r = ucx().ep_close_nbx(eps_[i], &p);
      if (r != nullptr && UCS_PTR_IS_PTR(r)) closing.push_back(r);
      eps_[i] = nullptr;
    }
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    for (void* r : closing) {
      while (flush && ucx().request_check_status(r) == UCS_INPROGRESS &&
             std::chrono::steady_clock::now() < until)
        ucx().worker_progress(worker_);
      ucx().request_free(r);
    }
    ucx().worker_destroy(worker_);
    worker_ = nullptr;
    ucx().cleanup(context_);
    context_ = nullptr;
  }

 private:
  static void set_error(FabricOp& op, ucs_status_t s) {
    op.error = ucx().status_string(s);
    op.truncated = s == UCS_ERR_MESSAGE_TRUNCATED;
  }

  static void on_send(void* request, ucs_status_t status, void* user_data) {
    auto* op = static_cast<FabricOp*>(user_data);
    op->posted = false;
    op->done = true;
    op->handle = nullptr;
    if (status != UCS_OK) set_error(*op, status);
    ucx().request_free(request);
  }

  static void on_recv(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                      void* user_data) {
    auto* op = static_cast<FabricOp*>(user_data);
    op->posted = false;
    op->done = true;
    op->handle = nullptr;
    if (status == UCS_OK && info) op->received = info->length;
    if (status != UCS_OK) set_error(*op, status);
    ucx().request_free(request);
  }

  static void on_ep_error(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* a = static_cast<EpArg*>(arg);
    a->self->ep_failed_[static_cast<std::size_t>(a->peer)] = true;
    a->self->report_peer_error(a->peer,
                               std::string("endpoint error: ") + ucx().status_string(status));
  }

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::vector<std::uint8_t> address_;
  std::vector<ucp_ep_h> eps_;
  std::vector<bool> ep_failed_;
  std::vector<EpArg> args_;
  bool peer_errors_ = false;
  int efd_ = -1;
  std::string how_;
};

[[maybe_unused]] const bool kRegistered =
    register_transport("ucx", [](const TransportContext& ctx) {
      return make_tagged_transport("ucx", ctx, std::make_unique<UcxFabric>(ctx));
    });

}  // namespace
}  // namespace chorus::transport::ucx
