// Shared-memory transport for the ranks of one host.
//
// Each rank owns one POSIX shared-memory segment holding its *inbound*
// channels, one per same-host peer. A channel is a ring of 64-byte slots;
// every slot starts with an 8-byte flag (its ring position + 1) written last
// with release order, so the data of a slot and the flag that says it is
// there travel in one cache line (the idea of NCCL's LL protocol): an 8-byte
// message is one slot, one cache-line transfer, no system call.
//
//   small message (<= kSlotMaxBytes, 2 KiB; kEagerBytes, 16 KiB, to a peer
//     that takes Rendezvous messages): header slot + ceil(bytes / 56) data slots
//   large message the receiver copies (Rendezvous): one header slot
//     carrying the sender's buffer address; the receiver reads straight from
//     the sender's memory with process_vm_readv (CMA) into the destination,
//     the sender writing some of the pieces with process_vm_writev when the
//     message is split (below), then acknowledges. One copy, no FIFO. Used
//     where the receiver could read the sender at setup (CHORUS_SHM_LARGE=
//     auto, the default, or cma); otherwise, and for every message the
//     receiver reduces, large messages are pipelined through the bulk ring.
//   large message from chorus::mem_alloc memory (Mapped): one header slot
//     carrying the region's memfd number, id and offset; the receiver maps
//     the region once (pidfd_getfd) and copies or reduces straight from the
//     sender's buffer, then acknowledges. One copy, at memcpy speed.
//     When the receive is a plain copy into mem_alloc memory too (or for a
//     Rendezvous message, into any memory), the copy
//     is split: the receiver publishes where its buffer is, and both ranks
//     claim pieces from one counter and copy them, the sender writing into
//     the receiver's buffer while it would otherwise wait for the
//     acknowledgement (a 2-rank broadcast then copies on both cores;
//     CHORUS_SHM_SPLIT).
//
// Receives match in post order per peer, and a message stays in the ring
// until its receive is posted: the ring is the unexpected queue and its size
// is the flow control. Waiting spins for CHORUS_SPIN_US, then sleeps on a
// futex in the owner's segment ("doorbell"), which writers ring only when the
// owner says it sleeps. A rank watches its peers with pidfds, so a killed
// peer fails the survivors in milliseconds, and a peer that destroyed its
// communicator on purpose (state Goodbye) is told apart from a crash.
//
// Segments are unlinked as soon as every peer has mapped them (or given up),
// so nothing stays in /dev/shm even when a rank is killed later; chorusrun
// removes what a rank killed during setup left behind (names carry the job
// id, CHORUS_JOB_ID).

#include "transport.hpp"

#include "core/shared_memory.hpp"
#include "core/enforce.hpp"
#include "core/log.hpp"

#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <climits>
#include <cstring>
#include <deque>
#include <map>
#include <thread>
#include <tuple>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string_view>

namespace chorus::transport::shm {
namespace {

constexpr std::uint64_t kSegMagic = 0x314d485353524843ull;  // "CHRSSHM1"
constexpr std::uint32_t kVersion = 3;  // 3: bulk pieces at their source's page offset
constexpr std::size_t kSlotBytes = 64;
constexpr std::size_t kSlotData = 56;
constexpr std::size_t kSlots = 2048;             // per channel: 128 KiB
constexpr std::size_t kEagerBytes = 16 << 10;    // larger messages go by CMA
// Largest message sent through the slots when large messages take the bulk
// ring (the default): slots cost a 56-byte copy each, so from a few KiB the
// bulk ring's 128 KiB pieces win (allreduce on 2 ranks, 32 KiB: 10.9 us
// through slots, 4.9 us through the bulk ring; docs/benchmarks.md). With
// CHORUS_SHM_LARGE=cma the limit stays kEagerBytes (a CMA rendezvous costs a
// round trip).
constexpr std::size_t kSlotMaxBytes = 2 << 10;
constexpr std::size_t kInlineBytes = 24;         // fits in the header slot
constexpr std::size_t kStagingBytes = 128 << 10; // CMA reduce staging (cache-sized)
constexpr std::size_t kBulkBufs = 4;             // per channel: the bulk ring for reductions
constexpr std::size_t kBulkBytes = 128 << 10;    // one piece (a multiple of every element size)
// One buffer of the bulk ring: a piece and a page, so that the piece can sit
// at its source's offset within a page (push_bulk).
constexpr std::size_t kBulkStride = kBulkBytes + 4096;
constexpr std::uint64_t kBulkPosMask = (std::uint64_t{1} << 48) - 1;  // bulk_flag: piece number + 1
constexpr int kNoticesPerSender = 4;
constexpr std::size_t kNoticeText = 1000;
constexpr auto kSleepSlice = std::chrono::milliseconds(10);  // liveness check period while asleep
constexpr unsigned kQuickLooks = 32;  // wait(): rounds before the clock is read
// Messages of at least kMappedMinBytes, of calls of at least
// CHORUS_SHM_MAPPED_MIN (count x element size, 16 MiB by default), whose
// send buffer is mem_alloc memory go Mapped. Below that the data sits in
// the caches, where the copy ring's two pipelined copies beat one copy and
// the acknowledgement's round trip: 2-rank allreduce at 1-4 MiB measured
// ~10 GB/s mapped against 12-15 through the ring, allgather at 16 MiB (8
// MiB a rank) 7.8 against 9.2; allreduce at 16-32 MiB 14.5-16.2 against
// 9.4-11.8 (docs/benchmarks.md).
constexpr std::size_t kMappedMinBytes = 64 << 10;
constexpr std::size_t kMaxMappings = 64;  // peers' regions kept mapped (least recently used go)
// A split copy's pieces: an eighth of the message, rounded up to 64 KiB,
// at most 512 KiB (so 2-8 pieces below 4 MiB, 8+ above; each claim moves
// one cache line between the cores). Messages of one piece are not split.
constexpr std::size_t kSplitPieceMin = 64 << 10;
constexpr std::size_t kSplitPieceMax = 512 << 10;
// With CHORUS_SHM_SPLIT=sender the receiver leaves every piece to the
// sender, unless it has not finished them after this long (a sender that
// cannot map the receiver's buffer never starts): no hang either way.
constexpr auto kSenderOnlyPatience = std::chrono::milliseconds(200);
constexpr std::uint64_t kClaimMask = 0xffffffffu;
// ChannelCtl::maps bits, set by the receiver for its sender: it can map the
// sender's mem_alloc regions (Mapped messages), and it reads the sender's
// memory with process_vm_readv (large copies go Rendezvous).
constexpr std::uint32_t kMaps = 1, kReads = 2;
// split_id of a record whose buffer is not a mem_alloc region: split_offset
// is then its address in the receiver, which the sender writes with
// process_vm_writev (a Rendezvous message, CHORUS_SHM_LARGE=cma).
constexpr std::uint64_t kCmaSplit = ~std::uint64_t{0};

std::size_t split_piece(std::size_t bytes) {
  const std::size_t eighth = (bytes / 8 + kSplitPieceMin - 1) / kSplitPieceMin * kSplitPieceMin;
  return std::clamp(eighth, kSplitPieceMin, kSplitPieceMax);
}

// Claims the next piece of split message `m` (low 32 bits) out of `pieces`,
// starting from the claim word's value `c` as last read: the piece number,
// or nullopt once none is left or the word is another message's.
std::optional<std::uint64_t> claim_piece(std::atomic<std::uint64_t>& word, std::uint64_t c, std::uint64_t m,
                                         std::uint64_t pieces) {
  do {
    if ((c >> 32) != (m & kClaimMask) || (c & kClaimMask) >= pieces) return std::nullopt;
  } while (!word.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire));
  return c & kClaimMask;
}

// Mapped: a large message whose sender's buffer lies in chorus::mem_alloc
// memory; the header carries the region's memfd number, id and offset, and
// the receiver maps the region (pidfd_getfd, once per region) and copies or
// reduces straight from it, then acknowledges as for Rendezvous.
enum class Kind : std::uint8_t { Inline = 1, Rendezvous = 2, Bulk = 3, Mapped = 4 };
enum class State : std::uint32_t { Alive = 0, Goodbye = 1 };

struct alignas(64) SegHeader {
  std::uint64_t magic;
  std::uint64_t comm_id;
  std::uint64_t nonce;
  std::int64_t pid;
  std::int32_t rank;
  std::uint32_t version;
  std::uint32_t nlocal;
  std::uint32_t slots;
  alignas(64) std::atomic<std::uint32_t> doorbell;  // futex word
  alignas(64) std::atomic<std::uint32_t> sleeping;  // the owner sleeps on doorbell
  alignas(64) std::atomic<std::uint32_t> state;     // State
  std::atomic<std::uint32_t> notices;               // notices posted to the owner
};

struct Notice {
  std::int32_t code;
  std::int32_t blamed;
  std::uint32_t len;
  char text[kNoticeText];
};

struct alignas(64) NoticeBox {  // per sender, in the receiver's segment
  std::atomic<std::uint32_t> count;
  Notice n[kNoticesPerSender];
};

struct alignas(64) ChannelCtl {  // per sender, in the receiver's segment
  std::atomic<std::uint64_t> head;   // receiver: slots consumed
  alignas(64) std::atomic<std::uint64_t> acked;  // receiver: rendezvous and mapped messages completed
  std::atomic<std::uint32_t> maps;               // receiver: kMaps | kReads (what it can do to the sender)
  // A split copy (see the top of the file). The receiver writes the record
  // of message number m (its `acked` count then) and publishes it with
  // split_claim = m << 32 (low 32 bits of m); each rank claims piece k by
  // moving split_claim from (m, k) to (m, k + 1), copies it, and counts it in
  // split_done; the receiver acknowledges once split_done is the number of
  // pieces. The sender reads the record only while its message is
  // unacknowledged (it checks `acked` after reading), so a record being
  // rewritten for a later message is never used.
  alignas(64) std::atomic<std::uint64_t> split_claim;
  std::atomic<std::uint64_t> split_done;
  std::atomic<std::uint64_t> split_id;      // the receiver's region (MappedRef)
  std::atomic<std::uint64_t> split_offset;
  std::atomic<std::uint64_t> split_info;    // fd (low 32 bits) | piece bytes << 32 | stream << 63
  alignas(64) std::atomic<std::uint64_t> bulk_head;  // receiver: bulk pieces consumed
  alignas(64) std::atomic<std::uint64_t> bulk_flag[kBulkBufs];  // sender: piece number + 1
};

struct alignas(64) Slot {
  std::atomic<std::uint64_t> flag;  // ring position + 1 once written
  unsigned char data[kSlotData];
};
static_assert(sizeof(Slot) == kSlotBytes);

// The header slot's payload.
struct MsgHeader {
  std::uint8_t kind;
  std::uint8_t coll;
  std::uint8_t dtype;
  std::uint8_t op;
  std::int32_t root;
  std::uint64_t count;
  std::uint64_t seq;
  std::uint64_t bytes;
  unsigned char tail[kInlineBytes];  // Inline: data <= 24 B. Rendezvous: address. Mapped: MappedRef.
};
static_assert(sizeof(MsgHeader) == kSlotData);

// Where a Mapped message's data is: the sender's memfd (a descriptor number
// in the sender's process), the region's id there (never reused, so a cached
// mapping cannot stand for a later region), and the offset in the region.
struct MappedRef {
  std::uint64_t id;
  std::uint64_t offset;
  std::int32_t fd;
  std::uint32_t unused;
};
static_assert(sizeof(MappedRef) <= kInlineBytes);

std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

struct Layout {
  std::size_t notices = 0, ctl = 0, slots = 0, bulk = 0, total = 0;
  explicit Layout(std::size_t nlocal) {
    notices = align_up(sizeof(SegHeader), 4096);
    ctl = align_up(notices + nlocal * sizeof(NoticeBox), 4096);
    slots = align_up(ctl + nlocal * sizeof(ChannelCtl), 4096);
    bulk = align_up(slots + nlocal * kSlots * kSlotBytes, 4096);
    total = align_up(bulk + nlocal * kBulkBufs * kBulkStride, 4096);
  }
};

// A mapped segment (ours or a peer's).
struct Segment {
  void* base = nullptr;
  std::size_t bytes = 0;
  SegHeader* hdr() const { return static_cast<SegHeader*>(base); }
  NoticeBox* box(std::size_t i, const Layout& l) const {
    return reinterpret_cast<NoticeBox*>(static_cast<char*>(base) + l.notices) + i;
  }
  ChannelCtl* ctl(std::size_t i, const Layout& l) const {
    return reinterpret_cast<ChannelCtl*>(static_cast<char*>(base) + l.ctl) + i;
  }
  Slot* ring(std::size_t i, const Layout& l) const {
    return reinterpret_cast<Slot*>(static_cast<char*>(base) + l.slots) + i * kSlots;
  }
  char* bulk(std::size_t i, std::size_t k, const Layout& l) const {
    return static_cast<char*>(base) + l.bulk + (i * kBulkBufs + k) * kBulkStride;
  }
  void unmap() {
    if (base) munmap(base, bytes);
    base = nullptr;
  }
};

long futex(std::atomic<std::uint32_t>* word, int op, std::uint32_t val, const timespec* ts) {
  return syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), op, val, ts, nullptr, 0);
}

int pidfd_open(pid_t pid) { return static_cast<int>(syscall(SYS_pidfd_open, pid, 0)); }

// A duplicate of descriptor `fd` of the process behind `pidfd` (Linux 5.6;
// the same ptrace permission as process_vm_readv), or -1 with errno.
int pidfd_getfd(int pidfd, int fd) {
#ifdef SYS_pidfd_getfd
  return static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, fd, 0));
#else
  (void)pidfd;
  (void)fd;
  errno = ENOSYS;
  return -1;
#endif
}

std::string self_ns(const char* which) {
  char buf[128] = {};
  const std::string path = std::string("/proc/self/ns/") + which;
  const ssize_t n = readlink(path.c_str(), buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string("?");
}

// Copies `n` bytes between `local` and `remote` in process `pid`, reading
// it (process_vm_readv) or writing it (process_vm_writev). Returns 0 or errno.
int cma_copy(pid_t pid, char* local, std::uint64_t remote, std::size_t n, bool write) {
  std::size_t done = 0;
  while (done < n) {
    iovec l{local + done, n - done};
    iovec r{reinterpret_cast<void*>(remote + done), n - done};
    const ssize_t moved = write ? process_vm_writev(pid, &l, 1, &r, 1, 0) : process_vm_readv(pid, &l, 1, &r, 1, 0);
    if (moved < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (moved == 0) return EFAULT;
    done += static_cast<std::size_t>(moved);
  }
  return 0;
}

int cma_read(pid_t pid, void* local, std::uint64_t remote, std::size_t n) {
  return cma_copy(pid, static_cast<char*>(local), remote, n, false);
}

// process_vm_writev only reads `local`.
int cma_write(pid_t pid, std::uint64_t remote, const void* local, std::size_t n) {
  return cma_copy(pid, const_cast<char*>(static_cast<const char*>(local)), remote, n, true);
}

struct SendOp {
  Request req;
  MsgHeader hdr;
  const char* buf = nullptr;
};

struct RecvOp {
  Request req;
  CallDesc call;
  char* dst = nullptr;
  Combine combine;
};

// A sent message that completes when the receiver acknowledges it.
struct Unacked {
  Request req;
  const char* buf = nullptr;  // the data, which a split copy reads
  bool mapped = false;        // Mapped (else Rendezvous)
};

// A Mapped or Rendezvous message being received by a split copy.
struct SplitRecv {
  RecvOp op;
  const char* src = nullptr;  // Mapped: the sender's buffer, mapped here
  std::uint64_t remote = 0;   // Rendezvous: its address in the sender (read by CMA)
  std::uint64_t region = 0;   // Mapped: its region id (its mapping is pinned meanwhile)
  std::size_t piece = 0;
  std::uint64_t pieces = 0;
  Clock::time_point started;
};

// Everything about one same-host peer.
struct Peer {
  int rank = -1;
  std::size_t local = 0;  // index among the host's ranks
  bool used = false;      // shm serves this pair
  Segment seg;            // the peer's segment (holds our outbound channel)
  pid_t pid = 0;
  int pidfd = -1;
  bool exited = false;
  bool cma_write = false;  // process_vm_writev into it works (split Rendezvous copies)
  // outbound: we write the peer's ring at our index
  std::uint64_t wpos = 0;         // next slot position to write
  std::uint64_t cached_head = 0;  // the peer's head, last read
  std::deque<SendOp> sendq;       // not yet written (ring full)
  std::deque<Unacked> rndv;       // written, waiting for the peer's ack, in order
  std::uint64_t rndv_sent = 0;
  std::optional<SendOp> bulk;     // a bulk message whose pieces are being pushed
  std::size_t bulk_off = 0;
  std::uint64_t bulk_wpos = 0;    // pieces written
  std::uint64_t cached_bulk_head = 0;
  // inbound: the peer writes our ring at its index
  std::uint64_t rpos = 0;
  std::deque<RecvOp> posted;
  std::optional<RecvOp> bulk_recv;  // a bulk message being reduced piece by piece
  std::optional<SplitRecv> split_recv;  // a Mapped message copied by both ranks
  std::size_t bulk_recv_off = 0;
  std::uint64_t bulk_rpos = 0;      // pieces consumed
  std::uint32_t notices_seen = 0;
  bool wake = false;  // rang later: flush_wakes()
};

class ShmTransport final : public Transport {
 public:
  explicit ShmTransport(const TransportContext& ctx) : ctx_(ctx), layout_(ctx.host_ranks.size()) {
    const auto& hr = ctx.host_ranks;
    const auto me = std::find(hr.begin(), hr.end(), ctx.rank);
    CHORUS_ENFORCE(me != hr.end(), Internal, "shm: this rank is not among its host's ranks");
    my_local_ = static_cast<std::size_t>(me - hr.begin());
    peer_of_.assign(static_cast<std::size_t>(ctx.size), -1);
    for (std::size_t i = 0; i < hr.size(); ++i) {
      if (hr[i] == ctx.rank) continue;
      peer_of_[static_cast<std::size_t>(hr[i])] = static_cast<int>(peers_.size());
      Peer p;
      p.rank = hr[i];
      p.local = i;
      peers_.push_back(std::move(p));
    }
    large_ = ctx.shm_large == "cma" ? Large::Cma : ctx.shm_large == "copy" ? Large::Copy : Large::Auto;
    split_ = ctx.shm_split == "off"      ? SplitMode::Off
             : ctx.shm_split == "sender" ? SplitMode::SenderOnly
                                         : SplitMode::On;
    staging_.resize(kStagingBytes + 4096);  // a page more: see staged_at()
    std::memset(staging_.data(), 0, staging_.size());  // touch it now, not on the hot path
    try {
      setup();
    } catch (...) {
      teardown();
      throw;
    }
  }

  ~ShmTransport() override {
    if (split_pieces_[0] + split_pieces_[1] > 0)
      CHORUS_INFO("shm: rank " << ctx_.rank << " copied " << split_pieces_[0]
                               << " pieces of split messages it received and " << split_pieces_[1]
                               << " of messages it sent");
    if (!fs_.failed() && own_.base) {
      own_.hdr()->state.store(static_cast<std::uint32_t>(State::Goodbye), std::memory_order_release);
      for (auto& p : peers_)
        if (p.used && p.seg.base) notify(p.seg);
    }
    teardown();
  }

  std::string name() const override { return "shm"; }

  Capabilities capabilities(int peer) const override {
    Capabilities c;
    c.same_host = reaches(peer);
    c.run_ahead = kBulkBufs * kBulkBytes;
    return c;
  }

  bool reaches(int peer) const override {
    const int i = peer >= 0 && peer < ctx_.size ? peer_of_[static_cast<std::size_t>(peer)] : -1;
    return i >= 0 && peers_[static_cast<std::size_t>(i)].used;
  }

  Request isend(int peer, const CallDesc& call, const void* buf, std::size_t bytes) override {
    if (Request r = try_mapped(peer, call, buf, bytes, ctx_.shm_mapped_copy_min)) return r;
    // Does the peer read our memory (CHORUS_SHM_LARGE=cma, or auto where it can)?
    const bool cma = large_ != Large::Copy &&
                     (usable(peer).seg.ctl(my_local_, layout_)->maps.load(std::memory_order_acquire) & kReads) != 0;
    if (bytes <= (cma ? kEagerBytes : kSlotMaxBytes)) return post_send(peer, call, buf, bytes, Kind::Inline);
    return post_send(peer, call, buf, bytes, cma ? Kind::Rendezvous : Kind::Bulk);
  }

  // A large message is pushed through the channel's bulk ring in 128 KiB
  // pieces (the sender copies in at memcpy speed on its core while the
  // receiver copies or reduces the previous piece out on its own) unless
  // CHORUS_SHM_LARGE=cma asks for a rendezvous read with process_vm_readv.
  // The ring stays in cache, so each byte costs DRAM traffic only at its
  // source and its destination; the kernel's CMA copy runs at ~8 GB/s here
  // against ~20 for memcpy (docs/benchmarks.md). A message the receiver
  // reduces always takes the ring: it is reduced straight from it.
  Request isend_reduced(int peer, const CallDesc& call, const void* buf, std::size_t bytes) override {
    if (Request r = try_mapped(peer, call, buf, bytes, ctx_.shm_mapped_min)) return r;
    return post_send(peer, call, buf, bytes, bytes <= kSlotMaxBytes ? Kind::Inline : Kind::Bulk);
  }

  // The bytes of the call's whole buffer, what the Mapped thresholds
  // compare: `count` is one rank's block for allgather, reduce-scatter,
  // gather, scatter and alltoall, whose buffer holds one per rank (as
  // nccl-tests sizes them). A 1 MiB allgather of 2 ranks (512 KiB a rank)
  // going Mapped measured 3.85 -> 20-28 GB/s busbw in place
  // (docs/benchmarks.md).
  std::uint64_t call_bytes(const CallDesc& call) const {
    const std::uint64_t b = call.count * size_of(call.dtype);
    switch (call.coll) {
      case Coll::Allgather:
      case Coll::ReduceScatter:
      case Coll::Gather:
      case Coll::Scatter:
      case Coll::Alltoall:
        return b * static_cast<std::uint64_t>(ctx_.size);
      default:
        return b;
    }
  }

  // A large message from mem_alloc memory, in a call of at least
  // `call_min` bytes (call_bytes), to a peer that can map it goes Mapped
  // (one copy, by the receiver, from our buffer); else nullptr.
  Request try_mapped(int peer, const CallDesc& call, const void* buf, std::size_t bytes, std::size_t call_min) {
    if (bytes < kMappedMinBytes || call_bytes(call) < call_min) return nullptr;
    Peer& p = usable(peer);
    if ((p.seg.ctl(my_local_, layout_)->maps.load(std::memory_order_acquire) & kMaps) == 0) return nullptr;
    const auto range = chorus::detail::find_shared(buf, bytes);
    if (!range) return nullptr;
    const MappedRef ref{range->id, range->offset, range->fd, 0};
    return post_send(peer, call, buf, bytes, Kind::Mapped, &ref);
  }

  Request post_send(int peer, const CallDesc& call, const void* buf, std::size_t bytes, Kind kind,
                    const MappedRef* ref = nullptr) {
    Peer& p = usable(peer);
    Request req = new_request(peer, true, bytes);
    SendOp op;
    op.hdr = MsgHeader{};
    op.hdr.kind = static_cast<std::uint8_t>(kind);
    op.hdr.coll = encode_coll(call);
    op.hdr.dtype = static_cast<std::uint8_t>(call.dtype);
    op.hdr.op = encode_op(call);
    op.hdr.root = call.root;
    op.hdr.count = call.count;
    op.hdr.seq = call.seq;
    op.hdr.bytes = bytes;
    if (ref) std::memcpy(op.hdr.tail, ref, sizeof *ref);
    op.buf = static_cast<const char*>(buf);
    count_sent(peer, bytes);
    // A small message with nothing queued ahead goes into the ring now, and
    // the request is handed back without another owner: a reference-count
    // change after the slot store is a locked instruction, which would wait
    // for that store to take the line from the peer's cache.
    op.req = std::move(req);
    if (kind == Kind::Inline && p.sendq.empty() && !p.bulk && write_one(p, op)) {
      wake_later(p);
      return std::move(op.req);
    }
    req = op.req;
    p.sendq.push_back(std::move(op));
    if (p.sendq.size() == 1) write_sends(p);
    return req;
  }

  Request irecv(int peer, const CallDesc& call, void* dst, std::size_t bytes, Combine combine) override {
    Peer& p = usable(peer);
    count_received(peer, bytes);
    Request req = new_request(peer, false, bytes);
    p.posted.push_back(RecvOp{req, call, static_cast<char*>(dst), combine});
    read_messages(p);
    return req;
  }

  void progress() override {
    progress_once();
    flush_wakes();
  }

  void wait(std::span<const Request> reqs, Deadline deadline) override {
    // wait_all rings the peers it owes a wake on a normal return; so must a
    // wait that kept a failure.
    if (!wait_keeping_late_failure(reqs, &fs_, [&] { wait_all(reqs, deadline); })) flush_wakes();
  }

  void wait_all(std::span<const Request> reqs, Deadline deadline) {
    Deadline spin_until{};  // read the clock only after kQuickLooks rounds
    std::size_t first_pending = 0;
    for (unsigned iter = 0;; ++iter) {
      progress_once();
      while (first_pending < reqs.size() && reqs[first_pending]->done) ++first_pending;
      if (first_pending == reqs.size()) {
        flush_wakes();
        return;
      }
      fs_.throw_if_aborted();
      // The first rounds only look: a clock read costs as much as a look.
      if (iter < kQuickLooks && !ctx_.oversubscribed) {
        if (iter == 15) flush_wakes();  // our stores have reached the peers: ring the sleepers
        cpu_relax();
        continue;
      }
      const auto now = Clock::now();
      if (spin_until == Deadline{}) spin_until = now + ctx_.spin;
      if (now >= deadline || fs_.timeout_reported()) resolve_timeout(reqs);
      if ((iter & 1023) == 1023) check_peers();
      if (now < spin_until) {
        cpu_relax();
        if (ctx_.oversubscribed || (iter & 255) == 255) {
          flush_wakes();
          sched_yield();
        }
        continue;
      }
      sleep_until(std::min(deadline, now + kSleepSlice));
    }
  }

  void block_for(std::chrono::microseconds max) override {
    if (own_.base) sleep_until(Clock::now() + max);
  }

  void abort(const std::string& why) noexcept override {
    fs_.request_abort(why);
    if (own_.base) {
      own_.hdr()->doorbell.fetch_add(1, std::memory_order_seq_cst);
      futex(&own_.hdr()->doorbell, FUTEX_WAKE, INT_MAX, nullptr);
    }
  }

  void broadcast_failure(const Error& e) noexcept override {
    try {
      const std::string text = e.message();
      for (auto& p : peers_) {
        if (!p.used || !p.seg.base || p.exited) continue;
        NoticeBox* box = p.seg.box(my_local_, layout_);
        const std::uint32_t k = box->count.load(std::memory_order_relaxed);
        if (k >= kNoticesPerSender) continue;
        Notice& n = box->n[k];
        n.code = static_cast<std::int32_t>(e.code());
        n.blamed = e.peer();
        n.len = static_cast<std::uint32_t>(std::min(text.size(), kNoticeText));
        std::memcpy(n.text, text.data(), n.len);
        box->count.store(k + 1, std::memory_order_release);
        p.seg.hdr()->notices.fetch_add(1, std::memory_order_release);
        notify(p.seg);
      }
    } catch (...) {
      // best effort by contract
    }
  }

 private:
  // ---- setup -----------------------------------------------------------

  void setup() {
    try {
      create_own_segment();
    } catch (const Error& e) {
      if (!ctx_.partial_ok) throw;
      // Tell the host's ranks that we are out of reach, so that they do not
      // wait for a segment that will never exist; tcp carries our messages.
      CHORUS_INFO("shm: no segment for rank " << ctx_.rank << ": " << e.message());
      ctx_.store->set_string("shm/" + std::to_string(ctx_.rank), "- " + e.message());
      ctx_.store->set_string("shm-ok/" + std::to_string(ctx_.rank),
                             std::string(ctx_.host_ranks.size(), '0'));
      return;
    }
    std::ostringstream me;
    me << name_ << ' ' << nonce_ << ' ' << getpid() << ' '
       << reinterpret_cast<std::uintptr_t>(&probe_) << ' ' << self_ns("pid") << ' '
       << self_ns("ipc") << ' ' << probe_fd_;
    ctx_.store->set_string("shm/" + std::to_string(ctx_.rank), me.str());

    // Map every host peer's segment and check that we can read its memory.
    std::string ok(ctx_.host_ranks.size(), '0');
    for (auto& p : peers_) {
      const std::string why = attach(p);
      if (why.empty()) ok[p.local] = '1';
      else {
        CHORUS_INFO("shm: rank " << p.rank << " is out of reach: " << why);
        reasons_ += " rank " + std::to_string(p.rank) + ": " + why + ";";
      }
    }
    ctx_.store->set_string("shm-ok/" + std::to_string(ctx_.rank), ok);
    // A pair uses shm only when both sides could map and read each other.
    for (auto& p : peers_) {
      const std::string theirs = fetch("shm-ok/" + std::to_string(p.rank), p.rank);
      p.used = ok[p.local] == '1' && theirs.size() == ok.size() && theirs[my_local_] == '1';
      if (!p.used && ok[p.local] == '1' && reasons_.find("rank " + std::to_string(p.rank)) == std::string::npos)
        reasons_ += " rank " + std::to_string(p.rank) + ": it cannot map or read this rank;";
      if (!p.used) release(p);
    }
    // Everyone has mapped our segment or given up: the name can go.
    shm_unlink(name_.c_str());
    created_ = false;
    bool all = true;
    for (const auto& p : peers_) all = all && p.used;
    if (!all && !ctx_.partial_ok)
      throw Error(ErrorCode::InvalidArgument,
                  "CHORUS_TRANSPORT=shm, but shared memory cannot reach every rank of this "
                  "communicator:" + reasons_ + " (use CHORUS_TRANSPORT=auto or tcp)");
    if (static_cast<int>(ctx_.host_ranks.size()) < ctx_.size && !ctx_.partial_ok)
      throw Error(ErrorCode::InvalidArgument,
                  "CHORUS_TRANSPORT=shm, but the ranks are on " +
                      std::string("several hosts; shm serves one host (use CHORUS_TRANSPORT=auto)"));
    CHORUS_INFO("shm transport: rank " << ctx_.rank << " segment " << name_ << " ("
                                       << own_.bytes / 1024 << " KiB), " << peers_.size()
                                       << " host peers, large copies "
                                       << (large_ == Large::Cma    ? "by CMA (process_vm_readv)"
                                           : large_ == Large::Copy ? "through the copy ring"
                                                                   : "by CMA where the peer can read us, else through the copy ring"));
  }

  std::string fetch(const std::string& key, int rank) {
    try {
      ctx_.store->wait({key}, ctx_.connect_timeout);
    } catch (const Error& e) {
      if (e.code() != ErrorCode::Timeout) throw;
      throw Error(ErrorCode::Timeout,
                  "shm setup: rank " + std::to_string(rank) + " did not publish " + key +
                      " within the timeout (did it die during communicator creation?)",
                  rank);
    }
    return ctx_.store->get_string(key);
  }

  void create_own_segment() {
    std::random_device rd;
    nonce_ = (static_cast<std::uint64_t>(rd()) << 32) ^ rd() ^ static_cast<std::uint64_t>(getpid());
    char idbuf[32];
    std::snprintf(idbuf, sizeof idbuf, "%016llx", static_cast<unsigned long long>(ctx_.comm_id));
    name_ = "/" + shm_name_prefix() + idbuf + "-r" + std::to_string(ctx_.rank);
    const int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) throw_errno("shm_open(" + name_ + ")");
    created_ = true;
    own_.bytes = layout_.total;
    // Reserve the pages now: on a full /dev/shm (containers often give it 64
    // MiB) ftruncate would succeed and the first touch would raise SIGBUS.
    if (const int err = posix_fallocate(fd, 0, static_cast<off_t>(own_.bytes)); err != 0) {
      close(fd);
      errno = err;
      throw_errno("reserving " + std::to_string(own_.bytes) + " bytes for the shared-memory segment " +
                  name_ + " (is /dev/shm full or too small?)");
    }
    own_.base = mmap(nullptr, own_.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (own_.base == MAP_FAILED) {
      own_.base = nullptr;
      throw_errno("mmap of " + name_);
    }
    // Touch every page now: a first touch costs ~10 us per page here.
    std::memset(own_.base, 0, own_.bytes);
    SegHeader* h = new (own_.base) SegHeader{};
    h->magic = kSegMagic;
    h->comm_id = ctx_.comm_id;
    h->nonce = nonce_;
    h->pid = getpid();
    h->rank = ctx_.rank;
    h->version = kVersion;
    h->nlocal = static_cast<std::uint32_t>(ctx_.host_ranks.size());
    h->slots = static_cast<std::uint32_t>(kSlots);
    probe_ = nonce_;
    probe_fd_ = memfd_create("chorus-probe", MFD_CLOEXEC);  // -1: peers will not map from us
  }

  // Maps peer p's segment; returns why it cannot be used, or "".
  std::string attach(Peer& p) {
    const std::string info = fetch("shm/" + std::to_string(p.rank), p.rank);
    if (info.rfind("- ", 0) == 0) return "it has no segment (" + info.substr(2) + ")";
    std::istringstream is(info);
    std::string name, pidns, ipcns;
    std::uint64_t nonce = 0, probe_addr = 0;
    long long pid = 0;
    int probe_fd = -1;
    is >> name >> nonce >> pid >> probe_addr >> pidns >> ipcns >> probe_fd;
    if (!is) return "malformed segment record";
    if (pidns != self_ns("pid")) return "another PID namespace";
    if (name.rfind("/chorus-", 0) != 0 || name.find('/', 1) != std::string::npos) return "bad segment name";
    const int fd = shm_open(name.c_str(), O_RDWR, 0);
    if (fd < 0) return "cannot open " + name + " (" + std::strerror(errno) + "): no shared /dev/shm";
    struct stat st {};
    if (fstat(fd, &st) != 0 || static_cast<std::size_t>(st.st_size) != layout_.total) {
      close(fd);
      return "segment size differs";
    }
    // Populated: the peer's pages exist (it touched them all), but each
    // first access from this process would take a minor fault, and the
    // rings cycle through their pages, so the first thousands of small
    // calls paid them (2 ranks, the first 20 iterations of each size:
    // 512 B allreduce 1.53 -> 1.28 us, 4 KiB alltoall 3.9 -> 3.0 us;
    // docs/benchmarks.md).
    void* base = mmap(nullptr, layout_.total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
    if (base == MAP_FAILED) return std::string("mmap: ") + std::strerror(errno);
    p.seg.base = base;
    p.seg.bytes = layout_.total;
    const SegHeader* h = p.seg.hdr();
    if (h->magic != kSegMagic || h->nonce != nonce || h->comm_id != ctx_.comm_id ||
        h->rank != p.rank || h->version != kVersion || h->nlocal != ctx_.host_ranks.size())
      return "segment " + name + " is not this communicator's (another /dev/shm?)";
    p.pid = static_cast<pid_t>(pid);
    std::uint64_t seen = 0;
    const int err = cma_read(p.pid, &seen, probe_addr, sizeof seen);
    if (err != 0 && large_ != Large::Cma) {
      CHORUS_INFO("shm: process_vm_readv on rank " << p.rank << " fails (" << std::strerror(err)
                                                    << "); its large messages come through the copy ring");
    } else if (err != 0)
      return std::string("cannot read its memory with process_vm_readv (") + std::strerror(err) +
             "; ptrace restrictions or seccomp? CHORUS_SHM_LARGE=auto or copy does without)";
    else if (seen != nonce) return "process_vm_readv read the wrong process";
    // Tell the peer: its large messages to us can go Rendezvous.
    if (err == 0 && large_ != Large::Copy) own_.ctl(p.local, layout_)->maps.fetch_or(kReads, std::memory_order_release);
    // A split Rendezvous copy writes pieces into the peer's buffer: try it
    // on the probe word (writing back the value it holds).
    if (err == 0 && large_ != Large::Copy && split_ != SplitMode::Off) {
      const int werr = cma_write(p.pid, probe_addr, &seen, sizeof seen);
      p.cma_write = werr == 0;
      if (werr != 0)
        CHORUS_INFO("shm: process_vm_writev on rank " << p.rank << " fails (" << std::strerror(werr)
                                                       << "); it copies the messages we send it alone");
    }
    p.pidfd = pidfd_open(p.pid);
    // Can we take the peer's mem_alloc regions (its memfds)? Say so in our
    // segment: the peer sends Mapped messages only after reading this.
    if (p.pidfd >= 0 && probe_fd >= 0) {
      const int dup = pidfd_getfd(p.pidfd, probe_fd);
      if (dup >= 0) {
        close(dup);
        own_.ctl(p.local, layout_)->maps.fetch_or(kMaps, std::memory_order_release);
      } else {
        CHORUS_INFO("shm: pidfd_getfd on rank " << p.rank << " fails (" << std::strerror(errno)
                                               << "); its mem_alloc buffers go through the copy ring");
      }
    }
    return "";
  }

  void release(Peer& p) {
    for (auto it = mappings_.begin(); it != mappings_.end();) {
      if (std::get<0>(it->first) == p.local) {
        munmap(it->second.base, it->second.size);
        it = mappings_.erase(it);
      } else {
        ++it;
      }
    }
    p.seg.unmap();
    if (p.pidfd >= 0) close(p.pidfd);
    p.pidfd = -1;
  }

  void teardown() noexcept {
    for (auto& p : peers_) release(p);
    if (created_) shm_unlink(name_.c_str());
    created_ = false;
    own_.unmap();
    if (probe_fd_ >= 0) close(probe_fd_);
    probe_fd_ = -1;
  }

  // ---- sending ---------------------------------------------------------

  static std::size_t slots_for(const MsgHeader& h) {
    if (static_cast<Kind>(h.kind) != Kind::Inline || h.bytes <= kInlineBytes) return 1;
    return 1 + (h.bytes + kSlotData - 1) / kSlotData;
  }

  // Writes queued sends into the peer's ring while they fit.
  bool write_sends(Peer& p) {
    bool did = false;
    while (!p.sendq.empty() || p.bulk) {
      if (p.bulk) {
        // Later messages wait until this one's pieces are all written.
        bool wrote = false;
        const bool finished = push_bulk(p, &wrote);
        did |= wrote;
        if (!finished) break;
        continue;
      }
      if (!write_one(p, p.sendq.front())) break;  // ring full: later
      p.sendq.pop_front();
      did = true;
    }
    if (did) wake_later(p);
    return did;
  }

  // Writes one message's slots into the peer's ring if they fit; false when
  // the ring is full. An inline message is then done; a rendezvous one waits
  // for its acknowledgement, a bulk one becomes p.bulk.
  bool write_one(Peer& p, SendOp& op) {
    Slot* ring = p.seg.ring(my_local_, layout_);
    const std::size_t n = slots_for(op.hdr);
    if (p.wpos + n - p.cached_head > kSlots) {
      p.cached_head = p.seg.ctl(my_local_, layout_)->head.load(std::memory_order_acquire);
      if (p.wpos + n - p.cached_head > kSlots) return false;
    }
    MsgHeader h = op.hdr;
    const bool mapped = static_cast<Kind>(h.kind) == Kind::Mapped;
    const bool rndv = static_cast<Kind>(h.kind) == Kind::Rendezvous || mapped;
    const bool bulk = static_cast<Kind>(h.kind) == Kind::Bulk;
    if (rndv || bulk) {
      if (rndv && !mapped) {
        const auto addr = reinterpret_cast<std::uint64_t>(op.buf);
        std::memcpy(h.tail, &addr, sizeof addr);
      }
    } else if (h.bytes <= kInlineBytes) {
      if (h.bytes > 0) std::memcpy(h.tail, op.buf, h.bytes);
    } else {
      // Data slots first; the header slot's flag, written last, publishes all.
      std::size_t off = 0;
      for (std::size_t k = 1; k < n; ++k) {
        Slot& s = ring[(p.wpos + k) % kSlots];
        const std::size_t m = std::min<std::size_t>(kSlotData, h.bytes - off);
        std::memcpy(s.data, op.buf + off, m);
        s.flag.store(p.wpos + k + 1, std::memory_order_relaxed);
        off += m;
      }
    }
    Slot& hs = ring[p.wpos % kSlots];
    std::memcpy(hs.data, &h, sizeof h);
    hs.flag.store(p.wpos + 1, std::memory_order_release);
    p.wpos += n;
    if (rndv) {
      ++p.rndv_sent;
      p.rndv.push_back(Unacked{op.req, op.buf, mapped});
    } else if (bulk) {
      p.bulk = op;
      p.bulk_off = 0;
    } else {
      op.req->done = true;
    }
    return true;
  }

  // Writes pieces of the current bulk message while the peer's bulk ring has
  // room. Returns true when the whole message is written (its request is
  // then done: the user buffer is free again).
  bool push_bulk(Peer& p, bool* wrote) {
    ChannelCtl* ctl = p.seg.ctl(my_local_, layout_);
    const SendOp& op = *p.bulk;
    const std::size_t bytes = op.hdr.bytes;
    while (p.bulk_off < bytes) {
      if (p.bulk_wpos - p.cached_bulk_head >= kBulkBufs) {
        p.cached_bulk_head = ctl->bulk_head.load(std::memory_order_acquire);
        if (p.bulk_wpos - p.cached_bulk_head >= kBulkBufs) break;
      }
      const std::size_t k = p.bulk_wpos % kBulkBufs;
      const std::size_t m = std::min(kBulkBytes, bytes - p.bulk_off);
      // The piece goes at the same offset within a page as its source, told
      // to the receiver in the flag's top 16 bits. A memcpy whose
      // destination lies 1-15 bytes past its source modulo 4 KiB runs 16x
      // slower here (glibc's rep movsb; see reduce::copy): a 4-rank ring
      // allreduce of 196604 floats, whose blocks start 4 bytes before a
      // page boundary, took 2.4x the time of 196608 (docs/benchmarks.md).
      const char* src = op.buf + p.bulk_off;
      const std::uint64_t at = reinterpret_cast<std::uintptr_t>(src) & 4095;
      std::memcpy(p.seg.bulk(my_local_, k, layout_) + at, src, m);
      ctl->bulk_flag[k].store((p.bulk_wpos + 1) | (at << 48), std::memory_order_release);
      ++p.bulk_wpos;
      p.bulk_off += m;
      *wrote = true;
      notify(p.seg);  // the receiver can reduce this piece while we write the next
    }
    if (p.bulk_off < bytes) return false;
    op.req->done = true;
    p.bulk.reset();
    return true;
  }

  // Reduces the pieces of the current bulk message that have arrived.
  bool pull_bulk(Peer& p) {
    ChannelCtl* ctl = own_.ctl(p.local, layout_);
    RecvOp& op = *p.bulk_recv;
    const std::size_t bytes = op.req->bytes;
    bool did = false;
    while (p.bulk_recv_off < bytes) {
      const std::size_t k = p.bulk_rpos % kBulkBufs;
      const std::uint64_t flag = ctl->bulk_flag[k].load(std::memory_order_acquire);
      if ((flag & kBulkPosMask) != p.bulk_rpos + 1) break;
      const std::size_t m = std::min(kBulkBytes, bytes - p.bulk_recv_off);
      combine_into(op.combine, op.dst, p.bulk_recv_off,
                   own_.bulk(p.local, k, layout_) + ((flag >> 48) & 4095), m);
      ++p.bulk_rpos;
      p.bulk_recv_off += m;
      ctl->bulk_head.store(p.bulk_rpos, std::memory_order_release);
      notify(p.seg);  // the sender may wait for room
      did = true;
    }
    if (p.bulk_recv_off == bytes) {
      op.req->done = true;
      p.bulk_recv.reset();
    }
    return did;
  }

  bool collect_acks(Peer& p) {
    if (p.rndv.empty()) return false;
    const std::uint64_t acked = p.seg.ctl(my_local_, layout_)->acked.load(std::memory_order_acquire);
    const std::uint64_t outstanding = p.rndv_sent - acked;
    bool did = false;
    while (p.rndv.size() > outstanding) {
      p.rndv.front().req->done = true;
      p.rndv.pop_front();
      did = true;
    }
    return did;
  }

  // The sender's half of a split copy: while the receiver copies the oldest
  // unacknowledged message (a Mapped or Rendezvous one) with us, claim one
  // piece and write it into the receiver's buffer (through our mapping of
  // its region, or with process_vm_writev). One piece per call, so that the
  // progress loop keeps serving the other peers in between.
  bool help_split(Peer& p) {
    if (p.rndv.empty() || split_ == SplitMode::Off) return false;
    ChannelCtl* ctl = p.seg.ctl(my_local_, layout_);
    const std::uint64_t index = p.rndv_sent - p.rndv.size();  // its message number
    std::uint64_t c = ctl->split_claim.load(std::memory_order_acquire);
    if ((c >> 32) != (index & kClaimMask)) return false;
    const std::uint64_t info = ctl->split_info.load(std::memory_order_relaxed);
    const std::uint64_t id = ctl->split_id.load(std::memory_order_relaxed);
    const std::uint64_t where = ctl->split_offset.load(std::memory_order_relaxed);
    // The receiver rewrites the record only after acknowledging this
    // message (with a release fence between): if it is still unacknowledged
    // now, what we read is this message's record.
    std::atomic_thread_fence(std::memory_order_acquire);
    if (ctl->acked.load(std::memory_order_relaxed) > index) return false;
    const Unacked& m = p.rndv.front();
    const std::size_t bytes = m.req->bytes;
    const std::size_t piece = (info >> 32) & 0x7fffffffu;
    const bool stream = (info >> 63) != 0;
    const bool cma = id == kCmaSplit;
    if (piece < kSplitPieceMin || cma == m.mapped) return false;  // not a record we wrote: leave it to the receiver
    if (cma && !p.cma_write) return false;
    const std::uint64_t pieces = (bytes + piece - 1) / piece;
    if ((c & kClaimMask) >= pieces) return false;
    char* dst = nullptr;
    if (!cma) {
      std::string why;
      dst = map_peer(p, MappedRef{id, where, static_cast<std::int32_t>(info & kClaimMask), 0}, bytes, true, &why);
      if (!dst) {
        if (!split_refused_logged_) {
          CHORUS_INFO("shm: cannot write into rank " << p.rank << "'s buffer (" << why
                                                     << "); it copies the split messages alone");
          split_refused_logged_ = true;
        }
        return false;
      }
    }
    const auto k = claim_piece(ctl->split_claim, c, index, pieces);
    if (!k) return false;
    const std::size_t off = static_cast<std::size_t>(*k) * piece;
    const std::size_t len = std::min(piece, bytes - off);
    if (!cma) {
      combine_into(stream ? Combine::copy_streaming() : Combine::copy(), dst, off, m.buf + off, len);
    } else if (const int err = cma_write(p.pid, where + off, m.buf + off, len); err != 0) {
      cma_failed(p, err, len, true);  // the piece is ours now: the receiver would wait for it
    }
    ctl->split_done.fetch_add(1, std::memory_order_release);
    ++split_pieces_[1];
    notify(p.seg);
    return true;
  }

  // ---- receiving -------------------------------------------------------

  bool read_messages(Peer& p) {
    bool did = false;
    Slot* ring = own_.ring(p.local, layout_);
    ChannelCtl* ctl = own_.ctl(p.local, layout_);
    while (!p.posted.empty() || p.bulk_recv || p.split_recv) {
      if (p.bulk_recv) {
        did |= pull_bulk(p);
        if (p.bulk_recv) break;  // the rest has not arrived yet
        continue;
      }
      if (p.split_recv) {
        did |= run_split(p);
        if (p.split_recv) break;  // the sender is still copying a piece
        continue;
      }
      Slot& hs = ring[p.rpos % kSlots];
      if (hs.flag.load(std::memory_order_acquire) != p.rpos + 1) break;
      MsgHeader h;
      std::memcpy(&h, hs.data, sizeof h);
      RecvOp op = std::move(p.posted.front());
      p.posted.pop_front();
      const auto kind = static_cast<Kind>(h.kind);
      if (kind != Kind::Inline && kind != Kind::Rendezvous && kind != Kind::Bulk && kind != Kind::Mapped) {
        op.req->done = op.req->failed = true;
        fail(Error(ErrorCode::Transport,
                   "malformed message from rank " + std::to_string(p.rank) + ": kind " +
                       std::to_string(h.kind) + "; the shared segment is corrupt",
                   p.rank));
      }
      check_message(op, h, p.rank);
      const std::size_t n = slots_for(h);
      if (kind == Kind::Bulk) {
        p.rpos += 1;
        ctl->head.store(p.rpos, std::memory_order_release);
        p.bulk_recv = std::move(op);
        p.bulk_recv_off = 0;
        notify(p.seg);
        did = true;
        continue;  // pull_bulk at the top of the loop
      }
      if (kind == Kind::Mapped) {
        MappedRef ref{};
        std::memcpy(&ref, h.tail, sizeof ref);
        p.rpos += 1;
        ctl->head.store(p.rpos, std::memory_order_release);
        const char* src = map_region(p, op, ref, h.bytes);
        if (start_split(p, op, src, 0, ref.id, h.bytes)) {
          notify(p.seg);  // the sender may sleep waiting for its ack: it can help now
          did = true;
          continue;  // run_split at the top of the loop
        }
        combine_into(op.combine, op.dst, 0, src, h.bytes);
        ctl->acked.fetch_add(1, std::memory_order_release);
      } else if (kind == Kind::Rendezvous) {
        std::uint64_t addr = 0;
        std::memcpy(&addr, h.tail, sizeof addr);
        // The header slot can be reused at once; the data stays in the sender's buffer.
        p.rpos += 1;
        ctl->head.store(p.rpos, std::memory_order_release);
        if (start_split(p, op, nullptr, addr, 0, h.bytes)) {
          notify(p.seg);
          did = true;
          continue;  // run_split at the top of the loop
        }
        pull(p, op, addr, h.bytes);
        ctl->acked.fetch_add(1, std::memory_order_release);
      } else if (h.bytes <= kInlineBytes) {
        combine_into(op.combine, op.dst, 0, reinterpret_cast<const char*>(h.tail), h.bytes);
        p.rpos += n;
        ctl->head.store(p.rpos, std::memory_order_release);
      } else {
        const bool copy = op.combine.kind == Combine::Kind::Copy;
        char* out = copy ? op.dst : staging_.data();
        std::size_t off = 0;
        for (std::size_t k = 1; k < n; ++k) {
          const Slot& s = ring[(p.rpos + k) % kSlots];
          const std::size_t m = std::min<std::size_t>(kSlotData, h.bytes - off);
          std::memcpy(out + off, s.data, m);
          off += m;
        }
        p.rpos += n;
        ctl->head.store(p.rpos, std::memory_order_release);
        if (!copy) combine_into(op.combine, op.dst, 0, staging_.data(), h.bytes);
      }
      op.req->done = true;
      wake_later(p);  // the sender may wait for ring space
      did = true;
    }
    return did;
  }

  // The address of a Mapped message's data in this process: the sender's
  // region, mapped read-only on first use and kept (least recently used
  // mappings go beyond kMaxMappings).
  const char* map_region(Peer& p, RecvOp& op, const MappedRef& ref, std::size_t bytes) {
    std::string why;
    ErrorCode code = ErrorCode::Transport;
    const char* at = map_peer(p, ref, bytes, false, &why, &code);
    if (!at) {
      op.req->done = op.req->failed = true;
      fail(Error(code, "mapping the buffer of rank " + std::to_string(p.rank) + ": " + why, p.rank));
    }
    return at;
  }

  // `bytes` at `ref` in peer p's mem_alloc memory, mapped here (read-only,
  // or writable for a split copy's sender) on first use and kept; nullptr
  // with the reason (and its error code) when it cannot be.
  char* map_peer(Peer& p, const MappedRef& ref, std::size_t bytes, bool writable, std::string* why,
                 ErrorCode* code = nullptr) {
    const auto key = std::make_tuple(p.local, ref.id, writable);
    auto it = mappings_.find(key);
    if (it == mappings_.end()) {
      const int fd = pidfd_getfd(p.pidfd, ref.fd);
      if (fd < 0) {
        if (errno == ESRCH && code) *code = ErrorCode::PeerFailure;
        *why = errno == ESRCH ? "it died" : std::string("pidfd_getfd: ") + std::strerror(errno);
        return nullptr;
      }
      // The number must still name a mem_alloc memfd (a sender that freed
      // its buffer during the call could have reused it for another file).
      char link[64] = {};
      const std::string self = "/proc/self/fd/" + std::to_string(fd);
      const ssize_t n = readlink(self.c_str(), link, sizeof link - 1);
      const bool ours = n > 0 && std::string_view(link, static_cast<std::size_t>(n)).starts_with("/memfd:chorus-mem");
      struct stat st {};
      const bool ok = ours && fstat(fd, &st) == 0 && st.st_size > 0;
      const int prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
      void* base = ok ? mmap(nullptr, static_cast<std::size_t>(st.st_size), prot, MAP_SHARED, fd, 0) : MAP_FAILED;
      const int err = errno;
      close(fd);
      if (!ok) {
        *why = "descriptor " + std::to_string(ref.fd) + " is not a mem_alloc region";
        return nullptr;
      }
      if (base == MAP_FAILED) {
        *why = std::string("mmap: ") + std::strerror(err);
        return nullptr;
      }
      drop_freed(p);
      if (mappings_.size() >= kMaxMappings) {
        auto lru = mappings_.end();
        for (auto m = mappings_.begin(); m != mappings_.end(); ++m)
          if (m->second.pins == 0 && (lru == mappings_.end() || m->second.used < lru->second.used)) lru = m;
        if (lru != mappings_.end()) {
          munmap(lru->second.base, lru->second.size);
          mappings_.erase(lru);
        }
      }
      it = mappings_.emplace(key, Mapping{base, static_cast<std::size_t>(st.st_size), 0, ref.fd, st.st_dev, st.st_ino}).first;
    }
    it->second.used = ++mapping_clock_;
    if (ref.offset > it->second.size || bytes > it->second.size - ref.offset) {
      *why = "malformed message: " + std::to_string(bytes) + " bytes at offset " + std::to_string(ref.offset) +
             " of a region of " + std::to_string(it->second.size);
      return nullptr;
    }
    return static_cast<char*>(it->second.base) + ref.offset;
  }

  // Unmaps peer p's regions that p has freed since they were mapped here
  // (their descriptor number no longer names the memfd that was mapped), so
  // that a job which frees buffers and allocates new ones does not keep the
  // old ones' memory alive through this process's mappings. Runs when a new
  // region of p is about to be cached: a few system calls per cached region,
  // next to an mmap of the new one.
  void drop_freed(Peer& p) {
    for (auto it = mappings_.begin(); it != mappings_.end();) {
      Mapping& m = it->second;
      if (std::get<0>(it->first) != p.local || m.pins > 0) {
        ++it;
        continue;
      }
      bool alive = false;
      const int fd = pidfd_getfd(p.pidfd, m.peer_fd);
      if (fd >= 0) {
        struct stat st {};
        alive = fstat(fd, &st) == 0 && st.st_dev == m.dev && st.st_ino == m.ino;
        close(fd);
      }
      if (alive) {
        ++it;
        continue;
      }
      munmap(m.base, m.size);
      it = mappings_.erase(it);
    }
  }

  // Starts a split copy of a Mapped message whose source is mapped at
  // `src` (region `region`), or of a Rendezvous message at `remote` in the
  // sender, when the receive is a plain copy the sender can write into: for
  // a Mapped message into mem_alloc memory (which it maps), for a
  // Rendezvous one anywhere (process_vm_writev). false: the caller copies
  // it alone.
  bool start_split(Peer& p, RecvOp& op, const char* src, std::uint64_t remote, std::uint64_t region,
                   std::size_t bytes) {
    if (split_ == SplitMode::Off || ctx_.oversubscribed || op.combine.kind != Combine::Kind::Copy) return false;
    // A Rendezvous copy at a slow distance goes through staging (pull).
    if (src == nullptr && slow_distance(reinterpret_cast<std::uint64_t>(op.dst), remote)) return false;
    const std::size_t piece = split_piece(bytes);
    if (bytes <= piece) return false;
    std::uint64_t id = kCmaSplit, offset = reinterpret_cast<std::uint64_t>(op.dst);
    std::uint32_t fd = 0;
    if (src != nullptr) {
      if ((p.seg.ctl(my_local_, layout_)->maps.load(std::memory_order_acquire) & kMaps) == 0) return false;
      const auto range = chorus::detail::find_shared(op.dst, bytes);
      if (!range) return false;
      id = range->id;
      offset = range->offset;
      fd = static_cast<std::uint32_t>(range->fd);
    }
    ChannelCtl* ctl = own_.ctl(p.local, layout_);
    const std::uint64_t m = ctl->acked.load(std::memory_order_relaxed);  // only we write it
    // Orders our earlier acknowledgements before the record's new contents
    // (the sender checks `acked` after reading them).
    std::atomic_thread_fence(std::memory_order_release);
    ctl->split_id.store(id, std::memory_order_relaxed);
    ctl->split_offset.store(offset, std::memory_order_relaxed);
    ctl->split_info.store(fd | (static_cast<std::uint64_t>(piece) << 32) |
                              (op.combine.stream ? std::uint64_t{1} << 63 : 0),
                          std::memory_order_relaxed);
    ctl->split_done.store(0, std::memory_order_relaxed);
    ctl->split_claim.store((m & kClaimMask) << 32, std::memory_order_release);
    p.split_recv = SplitRecv{std::move(op), src, remote, region, piece, (bytes + piece - 1) / piece, Clock::now()};
    if (src != nullptr) pin(p, region, +1);  // src stays mapped until the last piece is in
    return true;
  }

  void pin(Peer& p, std::uint64_t region, int by) {
    const auto it = mappings_.find(std::make_tuple(p.local, region, false));
    if (it != mappings_.end()) it->second.pins += by;
  }

  // The receiver's half of a split copy: claims and copies pieces until none
  // is left, then completes the receive once the sender's are in too.
  bool run_split(Peer& p) {
    ChannelCtl* ctl = own_.ctl(p.local, layout_);
    SplitRecv& s = *p.split_recv;
    const std::size_t bytes = s.op.req->bytes;
    bool did = false;
    if (split_ != SplitMode::SenderOnly || Clock::now() - s.started > kSenderOnlyPatience) {
      const std::uint64_t m = ctl->acked.load(std::memory_order_relaxed);  // this message's number
      while (const auto k = claim_piece(ctl->split_claim, ctl->split_claim.load(std::memory_order_relaxed), m,
                                        s.pieces)) {
        const std::size_t off = static_cast<std::size_t>(*k) * s.piece;
        const std::size_t len = std::min(s.piece, bytes - off);
        if (s.src != nullptr) combine_into(s.op.combine, s.op.dst, off, s.src + off, len);
        else cma_check(p, s.op, bytes, cma_read(p.pid, s.op.dst + off, s.remote + off, len));
        ctl->split_done.fetch_add(1, std::memory_order_relaxed);
        ++split_pieces_[0];
        did = true;
      }
    }
    // Acquire: the sender's pieces are in our buffer once counted.
    if (ctl->split_done.load(std::memory_order_acquire) < s.pieces) return did;
    ctl->acked.fetch_add(1, std::memory_order_release);
    s.op.req->done = true;
    if (s.src != nullptr) pin(p, s.region, -1);
    p.split_recv.reset();
    notify(p.seg);
    return true;
  }

  // Fails the communicator after reading (or writing) `bytes` of peer p's
  // memory failed with `err`: PeerFailure when p is gone.
  [[noreturn]] void cma_failed(const Peer& p, int err, std::size_t bytes, bool write) {
    // A peer killed mid-copy can fail the copy with EFAULT before it is
    // gone: the kernel tears its memory down before the process exits (seen
    // in CI: "process_vm_readv: Bad address" from a SIGKILLed rank). Give it
    // a moment to finish dying before blaming the transport.
    if (err != ESRCH && exits_soon(p, std::chrono::milliseconds(500))) err = ESRCH;
    if (err == ESRCH)
      fail(Error(ErrorCode::PeerFailure,
                 "rank " + std::to_string(p.rank) + " (pid " + std::to_string(p.pid) + ") died while this rank was " +
                     (write ? "writing its message into it" : "reading its message"),
                 p.rank));
    fail(Error(ErrorCode::Transport,
               (write ? "writing " : "reading ") + std::to_string(bytes) + (write ? " bytes into rank " : " bytes from rank ") +
                   std::to_string(p.rank) + (write ? "'s buffer" : "") + " failed (" +
                   (write ? "process_vm_writev: " : "process_vm_readv: ") + std::strerror(err) + ")",
               p.rank));
  }

  // True if peer p has exited, or does within `limit` (0: has exited).
  static bool exits_soon(const Peer& p, std::chrono::milliseconds limit) {
    if (p.pidfd >= 0) {
      pollfd f{p.pidfd, POLLIN, 0};
      return ::poll(&f, 1, static_cast<int>(limit.count())) > 0;
    }
    const auto end = std::chrono::steady_clock::now() + limit;
    for (;;) {
      if (::kill(p.pid, 0) != 0 && errno == ESRCH) return true;
      if (std::chrono::steady_clock::now() >= end) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  // Fails the receive `op` (of `bytes`) when reading the sender's memory
  // failed with `err`.
  void cma_check(const Peer& p, RecvOp& op, std::size_t bytes, int err) {
    if (err == 0) return;
    op.req->done = op.req->failed = true;
    cma_failed(p, err, bytes, false);
  }

  // Reads a rendezvous message from the sender's memory into the receive.
  // Whether a copy from `src` to `dst` has the destination 1 to 15 bytes
  // past the source modulo 4 KiB, where the kernel's copy (as glibc's
  // memcpy, reduce::copy) runs 16-30x slower: a 2-rank allreduce of 64 KiB
  // whose ranks' buffers sat 4 bytes apart modulo a page took 22 us
  // instead of 13 (docs/benchmarks.md).
  static bool slow_distance(std::uint64_t dst, std::uint64_t src) {
    const std::uint64_t ahead = (dst - src) & 4095;
    return ahead != 0 && ahead < 16;
  }

  // Where in staging_ a piece read from the peer's `addr` goes: at the same
  // offset within a page as its source, so that the kernel's copy runs at
  // full speed whatever the two buffers' offsets.
  char* staged_at(std::uint64_t addr) {
    const auto base = reinterpret_cast<std::uint64_t>(staging_.data());
    return staging_.data() + ((addr - base) & 4095);
  }

  void pull(Peer& p, RecvOp& op, std::uint64_t addr, std::size_t bytes) {
    auto check = [&](int err) { cma_check(p, op, bytes, err); };
    const bool copy = op.combine.kind == Combine::Kind::Copy;
    if (copy && (bytes < 4096 || !slow_distance(reinterpret_cast<std::uint64_t>(op.dst), addr))) {
      check(cma_read(p.pid, op.dst, addr, bytes));
      return;
    }
    // A reduction, or a copy at a slow distance: through staging_, each
    // piece read at its source's page offset, then combined or copied
    // (reduce::copy takes the slow distances another way).
    const std::size_t esize = copy ? 1 : size_of(op.combine.dtype);
    const std::size_t piece = kStagingBytes / esize * esize;
    for (std::size_t off = 0; off < bytes; off += piece) {
      const std::size_t m = std::min(piece, bytes - off);
      char* at = staged_at(addr + off);
      check(cma_read(p.pid, at, addr + off, m));
      combine_into(op.combine, op.dst, off, at, m);
    }
  }

  void check_message(RecvOp& op, const MsgHeader& h, int peer) {
    const CallDesc theirs = wire_call(h.coll, h.dtype, h.op, h.root, h.count, h.seq);
    try {
      check_same_call(op.call, ctx_.rank, theirs, peer);
      if (h.bytes != op.req->bytes)
        throw Error(ErrorCode::Internal,
                    "message of " + std::to_string(h.bytes) + " bytes from rank " +
                        std::to_string(peer) + " for a receive of " + std::to_string(op.req->bytes) +
                        " bytes in " + describe(op.call),
                    peer);
    } catch (const Error& e) {
      op.req->done = op.req->failed = true;  // never completes; the error says why
      fail(e);
    }
  }

  // ---- progress, waiting, failure ------------------------------------------

  bool progress_once() {
    throw_if_failed();
    if (!own_.base) return false;  // no segment: this transport reaches nobody
    bool did = false;
    for (auto& p : peers_) {
      if (!p.used) continue;
      if (!p.sendq.empty() || p.bulk) did |= write_sends(p);
      did |= collect_acks(p);
      did |= help_split(p);
      if (!p.posted.empty() || p.bulk_recv || p.split_recv) did |= read_messages(p);
    }
    read_notices();
    return did;
  }

  // Rings the owner of `seg` if it sleeps. The fence orders our writes
  // before the read of `sleeping` (the owner fences the other way round).
  static void notify(const Segment& seg) {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    ring_if_sleeping(seg);
  }

  static void ring_if_sleeping(const Segment& seg) {
    SegHeader* h = seg.hdr();
    if (h->sleeping.load(std::memory_order_relaxed) != 0) {
      h->doorbell.fetch_add(1, std::memory_order_seq_cst);
      futex(&h->doorbell, FUTEX_WAKE, INT_MAX, nullptr);
    }
  }

  // A request from the pool: one whose only owner is the pool is free
  // again (a malloc and a free per request were 5% of an 8-byte allreduce).
  // The cursor goes round in order, as requests are mostly released in the
  // order they were made; beyond kPoolMax outstanding ones, new ones are
  // allocated.
  Request new_request(int peer, bool is_send, std::size_t bytes) {
    for (std::size_t k = 0; k < pool_.size(); ++k) {
      Request& r = pool_[pool_next_];
      if (++pool_next_ == pool_.size()) pool_next_ = 0;
      if (r.use_count() == 1) {
        // Whoever dropped it last is done with it.
        std::atomic_thread_fence(std::memory_order_acquire);
        *r = RequestState{peer, is_send, false, bytes};
        return r;
      }
    }
    auto r = std::make_shared<RequestState>(RequestState{peer, is_send, false, bytes});
    if (pool_.size() < kPoolMax) pool_.push_back(r);
    return r;
  }

  // A small message's notify, owed until flush_wakes(). The fence right
  // after a slot store would stall this rank until the store has taken the
  // line from the peer, which polls it: a cross-core round trip on every
  // message, in series with waiting for the peer's own message (an 8-byte
  // allreduce of 2 ranks measured ~0.9 us with it, docs/benchmarks.md). A
  // peer that spins sees the slot anyway; one that sleeps is rung when this
  // rank waits a little (wait()), sleeps, finishes waiting or progresses,
  // and at worst wakes by itself after kSleepSlice.
  void wake_later(Peer& p) {
    p.wake = true;
    wakes_owed_ = true;
  }

  void flush_wakes() {
    if (!wakes_owed_) return;
    wakes_owed_ = false;
    std::atomic_thread_fence(std::memory_order_seq_cst);
    for (auto& p : peers_)
      if (p.wake) {
        p.wake = false;
        ring_if_sleeping(p.seg);
      }
  }

  static void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  void sleep_until(Deadline until) {
    SegHeader* h = own_.hdr();
    const std::uint32_t seen = h->doorbell.load(std::memory_order_acquire);
    h->sleeping.store(1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    // Anything that arrived before we said we sleep is seen here.
    const bool did = progress_once_noexcept();
    flush_wakes();
    if (!did && !fs_.aborted() && !fs_.failed()) {
      const auto left = until - Clock::now();
      if (left > Clock::duration::zero()) {
        const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
        timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
        futex(&h->doorbell, FUTEX_WAIT, seen, &ts);
      }
    }
    h->sleeping.store(0, std::memory_order_relaxed);
    check_peers();
    throw_if_failed();
  }

  bool progress_once_noexcept() {
    try {
      return progress_once();
    } catch (const Error&) {
      return true;  // error_ is set; the caller throws it
    }
  }

  void read_notices() {
    SegHeader* h = own_.hdr();
    const std::uint32_t total = h->notices.load(std::memory_order_acquire);
    if (total == notices_total_) return;
    notices_total_ = total;
    for (auto& p : peers_) {
      if (!p.used) continue;
      NoticeBox* box = own_.box(p.local, layout_);
      const std::uint32_t k = std::min<std::uint32_t>(box->count.load(std::memory_order_acquire),
                                                      kNoticesPerSender);
      while (p.notices_seen < k) {
        const Notice& n = box->n[p.notices_seen++];
        const std::string text(n.text, std::min<std::size_t>(n.len, kNoticeText));
        if (n.code == static_cast<std::int32_t>(ErrorCode::Timeout) && n.blamed >= 0 &&
            n.blamed < ctx_.size) {
          // An edge of the wait chain: see resolve_timeout.
          fs_.note_reported_wait(p.rank, n.blamed);
          continue;
        }
        fail(notice_error(static_cast<std::uint64_t>(n.code), n.blamed, p.rank, text));
      }
    }
  }

  // Has a peer exited? A goodbye (its communicator was destroyed) is an
  // error only if we still need it; a death without one always is.
  void check_peers() {
    if (fs_.failed()) return;
    for (auto& p : peers_) {
      if (!p.used || p.exited) continue;
      const bool gone = exits_soon(p, std::chrono::milliseconds(0));
      const bool goodbye = p.seg.hdr()->state.load(std::memory_order_acquire) ==
                           static_cast<std::uint32_t>(State::Goodbye);
      if (!gone && !goodbye) continue;
      // What it wrote before leaving is still in our ring: take it first.
      progress_once();
      read_notices();
      if (goodbye) {
        if (!p.posted.empty() || !p.sendq.empty() || !p.rndv.empty() || p.bulk || p.bulk_recv || p.split_recv)
          fail(Error(ErrorCode::InvalidUsage,
                     "rank " + std::to_string(p.rank) +
                         " destroyed its communicator while this rank still had messages for it",
                     p.rank));
        if (gone) p.exited = true;
        continue;
      }
      p.exited = true;
      fail(Error(ErrorCode::PeerFailure,
                 "rank " + std::to_string(p.rank) + " (pid " + std::to_string(p.pid) +
                     ", same host) died without a goodbye; the process crashed or was killed. "
                     "The communicator is unusable; restart the job.",
                 p.rank));
    }
  }

  // See the TCP transport: each waiting rank reports whom it waits for,
  // listens for the others' reports for a grace period, and blames the end
  // of the chain.
  [[noreturn]] void resolve_timeout(std::span<const Request> reqs) {
    broadcast_failure(fs_.own_timeout(reqs, ctx_.rank));
    const auto until = Clock::now() + FailureState::grace(ctx_.connect_timeout);
    while (Clock::now() < until) {
      progress_once();  // throws at once on any other failure
      check_peers();
      const auto left = until - Clock::now();
      if (left > Clock::duration::zero())
        sleep_until(Clock::now() + std::min<Clock::duration>(left, kSleepSlice));
    }
    fs_.fail_timeout_chain(ctx_.rank, ctx_.size);
  }

  Peer& usable(int peer) {
    throw_if_failed();
    fs_.throw_if_aborted();
    const int i = peer >= 0 && peer < ctx_.size ? peer_of_[static_cast<std::size_t>(peer)] : -1;
    if (i < 0 || !peers_[static_cast<std::size_t>(i)].used)
      throw Error(ErrorCode::Internal, "shm transport: rank " + std::to_string(peer) +
                                           " is not a shared-memory peer of rank " +
                                           std::to_string(ctx_.rank));
    return peers_[static_cast<std::size_t>(i)];
  }

  void throw_if_failed() const { fs_.throw_if_failed(); }
  [[noreturn]] void fail(const Error& e) { fs_.fail(e); }

  TransportContext ctx_;
  Layout layout_;
  std::size_t my_local_ = 0;
  std::vector<int> peer_of_;  // rank -> index in peers_, or -1
  std::vector<Peer> peers_;
  Segment own_;
  std::string name_;
  bool created_ = false;
  bool wakes_owed_ = false;  // some Peer::wake is set
  static constexpr std::size_t kPoolMax = 256;
  std::vector<Request> pool_;  // new_request()
  std::size_t pool_next_ = 0;
  std::uint64_t nonce_ = 0;
  volatile std::uint64_t probe_ = 0;  // peers read it with process_vm_readv to test CMA
  int probe_fd_ = -1;                 // peers duplicate it with pidfd_getfd to test that
  struct Mapping {
    void* base;
    std::size_t size;
    std::uint64_t used;  // mapping_clock_ at the last use
    int peer_fd;         // the memfd's descriptor number in the peer
    dev_t dev;           // and its identity, to tell when the peer freed it
    ino_t ino;
    int pins = 0;        // a split receive reads it across progress rounds
  };
  std::map<std::tuple<std::size_t, std::uint64_t, bool>, Mapping> mappings_;  // (peer local, region id, writable)
  std::uint64_t mapping_clock_ = 0;
  enum class SplitMode { Off, On, SenderOnly } split_ = SplitMode::On;
  enum class Large { Auto, Cma, Copy } large_ = Large::Auto;  // CHORUS_SHM_LARGE
  std::uint64_t split_pieces_[2] = {0, 0};  // pieces this rank copied: as receiver, as sender
  bool split_refused_logged_ = false;
  std::string reasons_;
  std::vector<char> staging_;
  std::uint32_t notices_total_ = 0;
  FailureState fs_{"shm"};
};

[[maybe_unused]] const bool kRegistered = register_transport("shm", [](const TransportContext& ctx) {
  return std::unique_ptr<Transport>(new ShmTransport(ctx));
});

}  // namespace
}  // namespace chorus::transport::shm
