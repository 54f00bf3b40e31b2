// Which transport carries which peer's messages. CHORUS_TRANSPORT=auto (the
// default) gives shared memory to the ranks of this host that can use it and
// TCP to the rest; a named transport carries every peer.

#include "transport.hpp"

#include "core/log.hpp"

#include <algorithm>

namespace chorus::transport {
namespace {

// shm for the peers it reaches, tcp for the others. Waiting on both at once
// has no common wake-up (a futex and sockets), so after the spin phase the
// wait sleeps on each in turn for a short slice.
class Composite final : public Transport {
 public:
  Composite(std::unique_ptr<Transport> near, std::unique_ptr<Transport> far)
      : near_(std::move(near)), far_(std::move(far)) {}

  std::string name() const override { return near_->name() + "+" + far_->name(); }
  Capabilities capabilities(int peer) const override { return pick(peer).capabilities(peer); }
  bool reaches(int peer) const override { return near_->reaches(peer) || far_->reaches(peer); }

  Request isend(int peer, const CallDesc& call, const void* buf, std::size_t bytes) override {
    return pick(peer).isend(peer, call, buf, bytes);
  }
  Request isend_reduced(int peer, const CallDesc& call, const void* buf, std::size_t bytes) override {
    return pick(peer).isend_reduced(peer, call, buf, bytes);
  }
  Request irecv(int peer, const CallDesc& call, void* dst, std::size_t bytes, Combine c) override {
    return pick(peer).irecv(peer, call, dst, bytes, c);
  }

  void progress() override {
    near_->progress();
    far_->progress();
  }

  void group_ready() override {
    near_->group_ready();
    far_->group_ready();
  }

  std::vector<Traffic> traffic() const override {
    auto t = near_->traffic();
    for (auto& f : far_->traffic()) t.push_back(std::move(f));
    return t;
  }

  void wait(std::span<const Request> reqs, Deadline deadline) override {
    // The part that raised a failure keeps it for its next call.
    wait_keeping_late_failure(reqs, nullptr, [&] { wait_all(reqs, deadline); });
  }

  void wait_all(std::span<const Request> reqs, Deadline deadline) {
    const auto spin_until = Clock::now() + spin_;
    std::size_t first_pending = 0;
    for (bool near_turn = true;; near_turn = !near_turn) {
      progress();
      while (first_pending < reqs.size() && reqs[first_pending]->done) ++first_pending;
      if (first_pending == reqs.size()) return;
      const auto now = Clock::now();
      if (now >= deadline) {
        // Let the transport of the first pending request resolve and report
        // the timeout (it follows the wait chain among its peers).
        std::vector<Request> mine;
        Transport& t = pick(reqs[first_pending]->peer);
        for (std::size_t i = first_pending; i < reqs.size(); ++i)
          if (!reqs[i]->done && &pick(reqs[i]->peer) == &t) mine.push_back(reqs[i]);
        t.wait(mine, deadline);
        continue;
      }
      if (now < spin_until) continue;
      const auto slice = std::chrono::microseconds(100);
      (near_turn ? near_ : far_)->block_for(slice);
    }
  }

  void block_for(std::chrono::microseconds max) override {
    near_->block_for(max / 2);
    far_->block_for(max / 2);
  }

  void abort(const std::string& why) noexcept override {
    near_->abort(why);
    far_->abort(why);
  }

  void broadcast_failure(const Error& e) noexcept override {
    near_->broadcast_failure(e);
    far_->broadcast_failure(e);
  }

  void set_spin(std::chrono::microseconds s) { spin_ = s; }

 private:
  Transport& pick(int peer) const { return near_->reaches(peer) ? *near_ : *far_; }

  std::unique_ptr<Transport> near_;
  std::unique_ptr<Transport> far_;
  std::chrono::microseconds spin_{0};
};

}  // namespace

std::unique_ptr<Transport> create_transports(const std::string& name, const TransportContext& ctx) {
  if (name != "auto") return create_transport(name, ctx);
  // One rank: nothing to carry; tcp costs one listening socket.
  if (ctx.host_ranks.size() <= 1) return create_transport("tcp", ctx);
  TransportContext near_ctx = ctx;
  near_ctx.partial_ok = true;
  auto near = create_transport("shm", near_ctx);
  bool all = true, any = false;
  for (int r = 0; r < ctx.size; ++r) {
    if (r == ctx.rank) continue;
    const bool in = near->reaches(r);
    all = all && in;
    any = any || in;
  }
  if (all) return near;
  auto far = create_transport("tcp", ctx);
  if (!any) return far;
  auto c = std::make_unique<Composite>(std::move(near), std::move(far));
  c->set_spin(ctx.spin);
  return c;
}

}  // namespace chorus::transport
