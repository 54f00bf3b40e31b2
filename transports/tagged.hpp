#pragma once

// The transport over a tag-matching fabric library (libfabric, UCX).
//
// Both libraries give reliable tagged messages: a receive names the tag it
// wants, and the library matches, buffers what arrives early, and moves large
// messages by rendezvous straight into the posted buffer. What differs is only
// how a send, a receive and a completion are spelled; a TagFabric hides that,
// and everything Chorus adds on top lives here once:
//
//  - FIFO matching per pair without tags in the algorithms: the k-th send to a
//    peer carries message number k in its tag, and the k-th receive from it
//    asks for exactly that tag.
//  - The call-checking header (the CallDesc of the call, as on the other
//    transports): small payloads travel packed behind it in one message; a
//    large payload follows as 4 MiB chunks, each its own message, straight
//    from the send buffer and, for a copy, straight into the destination.
//  - Combine-on-receive: a reduce receive lands chunks in a few staging
//    buffers and folds each into the destination as it arrives, overlapping
//    the reduction with the transfer of the next chunks.
//  - Failure semantics: a TCP transport carries the control traffic
//    (goodbyes, failure notices, timeout reports) and, because a killed
//    process's sockets close, notices a dead peer that the fabric library
//    itself might wait for forever (libfabric's shm and tcp providers do).
//    Errors the library reports (UCX's endpoint error callback) count too.

#include "transport.hpp"

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace chorus::transport {

// One posted send or receive. The first member is scratch space that the
// library may use (libfabric's FI_CONTEXT mode needs a struct fi_context2 at
// the context pointer), so that the op's own address is the context.
struct FabricOp {
  void* library_space[8] = {};
  void* handle = nullptr;    // the library's request object, when it has one (UCX)
  bool posted = false;       // handed to the library, not completed yet
  bool done = false;         // completed (successfully or not)
  bool truncated = false;    // a receive got a larger message than its buffer
  std::string error;         // non-empty: completed with this error
  std::size_t received = 0;  // receive: bytes that arrived

  void reset() {
    handle = nullptr;
    posted = done = truncated = false;
    error.clear();
    received = 0;
  }
};

// What the transport needs from a tag-matching library.
class TagFabric {
 public:
  virtual ~TagFabric() = default;

  // For logs: the library and what it chose ("libfabric 1.17 tcp;ofi_rxm on lo").
  virtual std::string describe() const = 0;
  // This endpoint's address, published through the store.
  virtual std::vector<std::uint8_t> address() const = 0;
  // Makes `peer` reachable from its published address (bad input: Error).
  virtual void add_peer(int peer, const std::vector<std::uint8_t>& address) = 0;

  // Post a send to `peer` / a receive of exactly `tag` from anyone. `op`
  // must stay put until it is done. False: the library is out of resources
  // for now; post again after progress().
  virtual bool send(int peer, std::uint64_t tag, const void* buf, std::size_t len,
                    FabricOp& op) = 0;
  virtual bool recv(std::uint64_t tag, void* buf, std::size_t len, FabricOp& op) = 0;

  // Drives the library; marks completed ops done. Returns how many events
  // it saw (0: nothing moved).
  virtual unsigned progress() = 0;

  // Sleeping until something happens: a file descriptor that becomes
  // readable when the library has events (-1: none; the transport then naps
  // briefly instead), and arm(), which prepares it and says whether sleeping
  // on it is safe now (false: events are pending, progress() first).
  virtual int wait_fd() { return -1; }
  virtual bool arm() { return false; }

  // One-sided writes (libfabric's FI_RMA), where the library offers them
  // and they are enabled. A receiver exposes its destination and sends the
  // region to the sender, which writes the payload straight into it.
  struct Region {
    std::uint64_t addr = 0;  // what write() takes for the region's first byte
    std::uint64_t key = 0;
  };
  virtual bool can_write() const { return false; }
  // Makes [buf, buf+len) writable by the peers (registrations are cached).
  virtual Region expose(void* buf, std::size_t len);
  // A receive whose memory expose() gave out is complete: the registration
  // may be dropped from the cache from now on.
  virtual void exposed_done() {}
  // Posts a write of [buf, buf+len) into `peer`'s exposed memory at `addr`
  // (a Region's addr plus an offset) under `key`; done once the data is
  // placed there (or no later than a message sent after its completion).
  // False: out of resources for now, as for send().
  virtual bool write(int peer, const void* buf, std::size_t len, std::uint64_t addr,
                     std::uint64_t key, FabricOp& op);

  // Asks the library to complete a posted op early (it then completes with
  // an error, after some progress()). Best effort.
  virtual void cancel(FabricOp& op) = 0;

  // Shuts the endpoint down, bounded in time: with `flush`, after what was
  // sent has left; otherwise at once (after a failure). Ops still posted
  // are abandoned: the library no longer touches them afterwards.
  virtual void close(bool flush) = 0;

  // Peers the library reported unreachable since the last call, with why.
  std::map<int, std::string> take_peer_errors() { return std::exchange(peer_errors_, {}); }

 protected:
  void report_peer_error(int peer, const std::string& why) { peer_errors_.emplace(peer, why); }

 private:
  std::map<int, std::string> peer_errors_;
};

// The Transport over `fabric`, named `name` ("libfabric", "ucx"): publishes
// the fabric's address under "<name>/<rank>" in ctx.store at once.
std::unique_ptr<Transport> make_tagged_transport(const std::string& name,
                                                 const TransportContext& ctx,
                                                 std::unique_ptr<TagFabric> fabric);

}  // namespace chorus::transport
