// Tests of the rendezvous stores: one typed suite over TcpStore and FileStore,
// PrefixStore, and the TCP store server's defences against malformed frames.

#include <chorus/error.hpp>
#include <chorus/store.hpp>

#include "core/net.hpp"

#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace chorus {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// "Did not hang": generous, never a performance assertion.
constexpr auto kNoHang = 10s;

std::vector<std::uint8_t> bytes_of(const std::string& s) { return {s.begin(), s.end()}; }

// Runs `fn`, expecting chorus::Error with `code`; returns the error's message.
template <typename Fn>
std::string expect_error(ErrorCode code, Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    return e.message();
  }
  ADD_FAILURE() << "expected chorus::Error(" << to_string(code) << "), nothing was thrown";
  return {};
}

// ---------------------------------------------------------------------------
// Backends of the typed suite: each makes independent clients of one store.

class TcpBackend {
 public:
  TcpBackend() : server_(std::make_unique<TcpStoreServer>("127.0.0.1", 0)) {}
  std::shared_ptr<Store> make_client() {
    TcpStore::Options o;
    o.timeout = 20s;
    return std::make_shared<TcpStore>("127.0.0.1", server_->port(), o);
  }
  TcpStoreServer& server() { return *server_; }

 private:
  std::unique_ptr<TcpStoreServer> server_;
};

class FileBackend {
 public:
  FileBackend() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "chorus-store-test-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
  }
  ~FileBackend() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::shared_ptr<Store> make_client() {
    auto s = std::make_shared<FileStore>(dir_.string());
    s->set_timeout(20s);
    return s;
  }
  const std::filesystem::path& dir() const { return dir_; }

 private:
  std::filesystem::path dir_;
};

template <typename Backend>
class StoreTest : public ::testing::Test {
 protected:
  Backend backend_;
};

using Backends = ::testing::Types<TcpBackend, FileBackend>;
class BackendNames {
 public:
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, TcpBackend> ? "Tcp" : "File";
  }
};
TYPED_TEST_SUITE(StoreTest, Backends, BackendNames);

TYPED_TEST(StoreTest, SetThenGetReturnsTheValueFromAnotherClient) {
  auto a = this->backend_.make_client();
  auto b = this->backend_.make_client();
  const std::vector<std::uint8_t> binary = {0, 1, 2, 0xff, 0, 'x'};
  a->set("bin", binary);
  a->set("empty", {});
  a->set_string("text", "hello");
  EXPECT_EQ(b->get("bin"), binary);
  EXPECT_TRUE(b->get("empty").empty());
  EXPECT_EQ(b->get_string("text"), "hello");
}

TYPED_TEST(StoreTest, SetReplacesThePreviousValue) {
  auto a = this->backend_.make_client();
  a->set_string("k", "first");
  a->set_string("k", "second, longer");
  a->set_string("k", "3");
  EXPECT_EQ(this->backend_.make_client()->get_string("k"), "3");
}

TYPED_TEST(StoreTest, KeysWithSlashesAndOddBytesAreDistinct) {
  auto s = this->backend_.make_client();
  const std::vector<std::string> keys = {"a/b",  "a%2Fb", "a_b",          "../x", "with space",
                                         ".",    "..",    "lock",         "x.v",  std::string("nul\0byte", 8),
                                         "x.d",  "a/b/c", std::string(kMaxStoreKeyBytes, 'k'),
                                         std::string(kMaxStoreKeyBytes - 1, 'k') + "/"};
  for (std::size_t i = 0; i < keys.size(); ++i) s->set_string(keys[i], std::to_string(i));
  auto other = this->backend_.make_client();
  for (std::size_t i = 0; i < keys.size(); ++i)
    EXPECT_EQ(other->get_string(keys[i]), std::to_string(i)) << "key #" << i;
}

TYPED_TEST(StoreTest, LargeValueRoundTrips) {
  auto a = this->backend_.make_client();
  std::vector<std::uint8_t> big(16u << 20);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<std::uint8_t>(i * 2654435761u >> 24);
  a->set("big", big);
  EXPECT_EQ(this->backend_.make_client()->get("big"), big);
}

TYPED_TEST(StoreTest, GetBlocksUntilALaterSetFromAnotherThread) {
  auto getter = this->backend_.make_client();
  auto setter = this->backend_.make_client();
  std::atomic<bool> returned{false};
  std::string got;
  std::thread t([&] {
    got = getter->get_string("late");
    returned = true;
  });
  std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(returned.load()) << "get() returned before the key was set";
  setter->set_string("late", "now");
  t.join();
  EXPECT_EQ(got, "now");
}

TYPED_TEST(StoreTest, OneClientSharedByThreadsDoesNotDeadlock) {
  // A thread blocked in get() must not keep another thread of the same
  // process from setting the key through the same store object.
  auto s = this->backend_.make_client();
  std::string got;
  std::thread t([&] { got = s->get_string("shared"); });
  std::this_thread::sleep_for(50ms);
  const auto start = Clock::now();
  s->set_string("shared", "ok");
  t.join();
  EXPECT_EQ(got, "ok");
  EXPECT_LT(Clock::now() - start, kNoHang);
}

TYPED_TEST(StoreTest, WaitTimesOutNamingTheKey) {
  auto s = this->backend_.make_client();
  s->set_string("present", "1");
  const auto start = Clock::now();
  const std::string msg =
      expect_error(ErrorCode::Timeout, [&] { s->wait({"present", "never-set-key"}, 100ms); });
  EXPECT_LT(Clock::now() - start, kNoHang);
  EXPECT_NE(msg.find("never-set-key"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("'present'"), std::string::npos) << "names a key that exists: " << msg;
}

TYPED_TEST(StoreTest, GetHonoursTheDefaultTimeout) {
  auto s = this->backend_.make_client();
  s->set_timeout(100ms);
  EXPECT_EQ(s->timeout(), 100ms);
  const auto start = Clock::now();
  const std::string msg = expect_error(ErrorCode::Timeout, [&] { s->get("missing-key"); });
  EXPECT_LT(Clock::now() - start, kNoHang);
  EXPECT_NE(msg.find("missing-key"), std::string::npos) << msg;
  // The store is still usable after a timeout.
  s->set_string("after", "fine");
  EXPECT_EQ(s->get_string("after"), "fine");
}

TYPED_TEST(StoreTest, WaitReturnsOnceEveryKeyIsSet) {
  auto waiter = this->backend_.make_client();
  auto setter = this->backend_.make_client();
  std::atomic<bool> done{false};
  std::thread t([&] {
    waiter->wait({"w1", "w2", "w1"}, 20s);
    done = true;
  });
  setter->set_string("w1", "x");
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(done.load()) << "wait() returned with w2 missing";
  setter->set_string("w2", "y");
  t.join();
  EXPECT_TRUE(done.load());
  waiter->wait({});  // nothing to wait for
}

TYPED_TEST(StoreTest, CheckNeverWaits) {
  auto s = this->backend_.make_client();
  EXPECT_FALSE(s->check({"c1"}));
  s->set_string("c1", "");
  EXPECT_TRUE(s->check({"c1"}));
  EXPECT_FALSE(s->check({"c1", "c2"}));
  s->add("c2", 0);
  EXPECT_TRUE(s->check({"c1", "c2"}));
  EXPECT_TRUE(s->check({}));
}

TYPED_TEST(StoreTest, AddStartsAtZeroAndReturnsTheNewValue) {
  auto s = this->backend_.make_client();
  EXPECT_EQ(s->add("n", 5), 5);
  EXPECT_EQ(s->add("n", -7), -2);
  EXPECT_EQ(s->add("n", 0), -2);
  EXPECT_EQ(s->get_string("n"), "-2");
  s->set_string("m", "40");
  EXPECT_EQ(s->add("m", 2), 42);
}

TYPED_TEST(StoreTest, AddOnANonIntegerValueFails) {
  auto s = this->backend_.make_client();
  s->set_string("word", "abc");
  const std::string msg = expect_error(ErrorCode::InvalidUsage, [&] { s->add("word", 1); });
  EXPECT_NE(msg.find("word"), std::string::npos) << msg;
  EXPECT_EQ(s->get_string("word"), "abc");
}

TYPED_TEST(StoreTest, ConcurrentAddIsAtomic) {
  constexpr int kThreads = 8;
  constexpr int kAdds = 1000;
  std::vector<std::shared_ptr<Store>> clients;
  for (int i = 0; i < kThreads; ++i) clients.push_back(this->backend_.make_client());
  std::vector<std::vector<std::int64_t>> seen(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i)
    threads.emplace_back([&, i] {
      for (int j = 0; j < kAdds; ++j) seen[i].push_back(clients[i]->add("counter", 1));
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(clients[0]->get_string("counter"), std::to_string(kThreads * kAdds));
  // Every intermediate value was returned exactly once.
  std::set<std::int64_t> all;
  for (const auto& v : seen) all.insert(v.begin(), v.end());
  EXPECT_EQ(all.size(), static_cast<std::size_t>(kThreads * kAdds));
  EXPECT_EQ(*all.begin(), 1);
  EXPECT_EQ(*all.rbegin(), kThreads * kAdds);
}

TYPED_TEST(StoreTest, LimitsAreEnforced) {
  auto s = this->backend_.make_client();
  const std::string too_long(kMaxStoreKeyBytes + 1, 'k');
  for (const std::string& bad : {std::string(), too_long}) {
    expect_error(ErrorCode::InvalidArgument, [&] { s->set_string(bad, "v"); });
    expect_error(ErrorCode::InvalidArgument, [&] { s->get(bad); });
    expect_error(ErrorCode::InvalidArgument, [&] { s->add(bad, 1); });
    expect_error(ErrorCode::InvalidArgument, [&] { s->check({"ok", bad}); });
    expect_error(ErrorCode::InvalidArgument, [&] { s->wait({bad}, 10ms); });
  }
  const std::vector<std::uint8_t> huge(kMaxStoreValueBytes + 1);
  const std::string msg = expect_error(ErrorCode::InvalidArgument, [&] { s->set("huge", huge); });
  EXPECT_NE(msg.find("huge"), std::string::npos) << msg;
  EXPECT_FALSE(s->check({"huge"}));
  // The limits themselves are legal.
  s->set(std::string(kMaxStoreKeyBytes, 'k'), {1});
  EXPECT_EQ(s->get(std::string(kMaxStoreKeyBytes, 'k')), std::vector<std::uint8_t>{1});
}

TYPED_TEST(StoreTest, PrefixStoreIsolatesNamespaces) {
  std::shared_ptr<Store> base = this->backend_.make_client();
  PrefixStore a("job-a", base);
  PrefixStore b("job-b", this->backend_.make_client());
  a.set_string("rank0", "A");
  EXPECT_FALSE(b.check({"rank0"}));
  b.set_string("rank0", "B");
  EXPECT_EQ(a.get_string("rank0"), "A");
  EXPECT_EQ(b.get_string("rank0"), "B");
  EXPECT_EQ(base->get_string("job-a/rank0"), "A");
  EXPECT_FALSE(base->check({"rank0"}));
  EXPECT_EQ(a.add("count", 3), 3);
  EXPECT_EQ(b.add("count", 1), 1);
  EXPECT_EQ(base->get_string("job-a/count"), "3");
  // Nested views compose.
  PrefixStore nested("sub", std::make_shared<PrefixStore>("job-a", base));
  nested.set_string("k", "v");
  EXPECT_EQ(base->get_string("job-a/sub/k"), "v");
  // The view's own timeout applies, and the message names the key.
  a.set_timeout(50ms);
  const std::string msg = expect_error(ErrorCode::Timeout, [&] { a.get("absent"); });
  EXPECT_NE(msg.find("job-a/absent"), std::string::npos) << msg;
  expect_error(ErrorCode::InvalidArgument, [&] { a.set_string("", "x"); });
  EXPECT_EQ(a.base(), base);
}

// ---------------------------------------------------------------------------
// FileStore specifics

TEST(FileStoreTest, CreatesTheDirectoryAndValuesOutliveTheObject) {
  FileBackend tmp;
  const std::string dir = (tmp.dir() / "nested" / "deeper").string();
  {
    FileStore s(dir);
    s.set_string("a/b", "persisted");
  }
  EXPECT_TRUE(std::filesystem::is_directory(dir));
  FileStore again(dir);
  EXPECT_EQ(again.get_string("a/b"), "persisted");
  // '/' in a key never becomes a directory: the store stays one flat directory.
  int files = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    EXPECT_TRUE(e.is_regular_file()) << e.path();
    ++files;
  }
  EXPECT_EQ(files, 1);
}

TEST(FileStoreTest, RejectsAPathThatIsAFile) {
  FileBackend tmp;
  const auto file = tmp.dir() / "plain-file";
  std::FILE* f = std::fopen(file.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fclose(f);
  expect_error(ErrorCode::System, [&] { FileStore s(file.string()); });
}

// ---------------------------------------------------------------------------
// TcpStore specifics

// Port with (very likely) nothing listening: bind an ephemeral port and close it.
std::uint16_t unused_port() {
  std::uint16_t port = 0;
  net::Fd fd = net::listen_tcp("127.0.0.1", 0, &port);
  return port;
}

TEST(TcpStoreTest, HostsItsOwnServerOnAnEphemeralPort) {
  TcpStore::Options o;
  o.is_server = true;
  o.timeout = 20s;
  TcpStore host("127.0.0.1", 0, o);
  ASSERT_NE(host.port(), 0);
  EXPECT_EQ(host.timeout(), 20s);
  host.set_string("hello", "world");
  o.is_server = false;
  TcpStore client("127.0.0.1", host.port(), o);
  EXPECT_EQ(client.get_string("hello"), "world");
  EXPECT_EQ(client.port(), host.port());
}

TEST(TcpStoreTest, ClientStartedBeforeTheServerConnectsWhenItComesUp) {
  const std::uint16_t port = unused_port();
  std::unique_ptr<TcpStoreServer> server;
  std::thread late([&] {
    std::this_thread::sleep_for(200ms);
    server = std::make_unique<TcpStoreServer>("127.0.0.1", port);
  });
  TcpStore::Options o;
  o.timeout = 20s;
  TcpStore client("127.0.0.1", port, o);  // retries until the server is up
  late.join();
  client.set_string("k", "v");
  EXPECT_EQ(client.get_string("k"), "v");
}

TEST(TcpStoreTest, ConnectingWithNoServerTimesOutNamingTheAddress) {
  const std::uint16_t port = unused_port();
  TcpStore::Options o;
  o.timeout = 300ms;
  const auto start = Clock::now();
  const std::string msg = expect_error(ErrorCode::Timeout, [&] { TcpStore s("127.0.0.1", port, o); });
  EXPECT_LT(Clock::now() - start, kNoHang);
  EXPECT_NE(msg.find("127.0.0.1:" + std::to_string(port)), std::string::npos) << msg;
}

TEST(TcpStoreTest, StoppedServerGivesAnErrorNotAHang) {
  TcpStoreServer server("127.0.0.1", 0);
  TcpStore::Options o;
  o.timeout = 60s;
  TcpStore idle_client("127.0.0.1", server.port(), o);
  TcpStore waiting_client("127.0.0.1", server.port(), o);
  idle_client.set_string("k", "v");
  std::atomic<bool> waiter_failed{false};
  std::string waiter_msg;
  std::thread waiter([&] {
    try {
      waiting_client.get("never");
    } catch (const Error& e) {
      waiter_failed = e.code() == ErrorCode::PeerFailure;
      waiter_msg = e.message();
    }
  });
  std::this_thread::sleep_for(100ms);
  const auto start = Clock::now();
  server.stop();
  server.stop();  // idempotent
  waiter.join();
  EXPECT_TRUE(waiter_failed.load()) << waiter_msg;
  const std::string addr = "127.0.0.1:" + std::to_string(server.port());
  EXPECT_NE(waiter_msg.find(addr), std::string::npos) << waiter_msg;
  const std::string msg = expect_error(ErrorCode::PeerFailure, [&] { idle_client.set_string("k", "w"); });
  EXPECT_NE(msg.find(addr), std::string::npos) << msg;
  // Later calls fail fast too, with the same diagnosis.
  expect_error(ErrorCode::PeerFailure, [&] { idle_client.get("k"); });
  EXPECT_LT(Clock::now() - start, kNoHang);
}

TEST(TcpStoreTest, ANonStoreServerIsReportedAsSuch) {
  std::uint16_t port = 0;
  net::Fd listener = net::listen_tcp("127.0.0.1", 0, &port);
  std::thread http([&] {
    net::Fd c(::accept(listener.get(), nullptr, nullptr));
    const char reply[] = "HTTP/1.1 400 Bad Request\r\n\r\n";
    ::send(c.get(), reply, sizeof reply - 1, MSG_NOSIGNAL);
    std::this_thread::sleep_for(200ms);
  });
  TcpStore::Options o;
  o.timeout = 5s;
  const std::string msg = expect_error(ErrorCode::Transport, [&] { TcpStore s("127.0.0.1", port, o); });
  http.join();
  EXPECT_NE(msg.find("not a chorus store"), std::string::npos) << msg;
}

// ---------------------------------------------------------------------------
// Server defences: raw sockets sending malformed input.

std::vector<std::uint8_t> le32(std::uint32_t v) {
  return {static_cast<std::uint8_t>(v), static_cast<std::uint8_t>(v >> 8), static_cast<std::uint8_t>(v >> 16),
          static_cast<std::uint8_t>(v >> 24)};
}

std::vector<std::uint8_t> cat(std::initializer_list<std::vector<std::uint8_t>> parts) {
  std::vector<std::uint8_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

std::vector<std::uint8_t> handshake(std::uint32_t version = 1) {
  return cat({bytes_of("CHORUSST"), le32(version)});
}

// Reads until the server closes the connection; false if it stays open.
bool closed_by_server(int fd) {
  const auto deadline = Clock::now() + kNoHang;
  char buf[4096];
  while (Clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    const ssize_t r = ::recv(fd, buf, sizeof buf, 0);
    if (r == 0 || (r < 0 && errno == ECONNRESET)) return true;
  }
  return false;
}

bool eventually(const std::function<bool()>& cond) {
  const auto deadline = Clock::now() + kNoHang;
  while (Clock::now() < deadline) {
    if (cond()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return cond();
}

struct Malformed {
  const char* name;
  std::vector<std::uint8_t> bytes;
  bool client_closes;  // send, then close without waiting for the server
};

class MalformedFrameTest : public ::testing::TestWithParam<Malformed> {};

TEST_P(MalformedFrameTest, ClosesThatConnectionOnlyAndKeepsServing) {
  TcpStoreServer server("127.0.0.1", 0);
  TcpStore::Options o;
  o.timeout = 20s;
  TcpStore good("127.0.0.1", server.port(), o);
  good.set_string("before", "1");

  net::Fd raw = net::connect_tcp("127.0.0.1", server.port(), 5s);
  const auto& bytes = GetParam().bytes;
  net::write_all(raw.get(), bytes.data(), bytes.size(), Clock::now() + kNoHang);
  if (GetParam().client_closes) {
    raw.reset();
  } else {
    EXPECT_TRUE(closed_by_server(raw.get())) << "the server kept the connection open";
  }
  EXPECT_TRUE(eventually([&] { return server.rejected_frames() == 1; }))
      << "rejected_frames() = " << server.rejected_frames();

  // Other clients are unaffected.
  good.set_string("after", "2");
  EXPECT_EQ(good.get_string("before"), "1");
  EXPECT_EQ(TcpStore("127.0.0.1", server.port(), o).get_string("after"), "2");
  EXPECT_EQ(server.rejected_frames(), 1u);
}

std::vector<Malformed> malformed_inputs() {
  const auto set_frame = [](std::vector<std::uint8_t> body) { return cat({handshake(), le32(body.size()), body}); };
  return {
      {"Garbage", {0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07}, false},
      {"HttpStranger", bytes_of("GET / HTTP/1.1\r\n\r\n"), false},
      {"WrongVersion", handshake(99), false},
      {"FourGiBLength", cat({handshake(), le32(0xffffffffu), {1}}), false},
      {"ZeroLength", cat({handshake(), le32(0)}), false},
      {"UnknownCommand", set_frame({0x7f, 0, 0, 0, 0}), false},
      {"InnerKeyLengthPastTheFrame", set_frame(cat({{1}, le32(1000), bytes_of("short")})), false},
      {"KeyOverTheLimit", set_frame(cat({{1}, le32(kMaxStoreKeyBytes + 1), std::vector<std::uint8_t>(kMaxStoreKeyBytes + 1, 'k'), le32(0)})), false},
      {"EmptyKey", set_frame(cat({{1}, le32(0), le32(0)})), false},
      {"TrailingBytes", set_frame(cat({{1}, le32(1), {'k'}, le32(1), {'v'}, {0}})), false},
      {"WaitKeyCountTooLarge", set_frame(cat({{5}, std::vector<std::uint8_t>(8, 0), le32(0x40000000u)})), false},
      {"TruncatedFrameThenClose", cat({handshake(), le32(100), bytes_of("0123456789")}), true},
      {"TruncatedHandshakeThenClose", bytes_of("CHORUS"), true},
  };
}

INSTANTIATE_TEST_SUITE_P(Server, MalformedFrameTest, ::testing::ValuesIn(malformed_inputs()),
                         [](const auto& p) { return std::string(p.param.name); });

TEST(TcpStoreServerTest, ASlowClientDoesNotStallOthers) {
  TcpStoreServer server("127.0.0.1", 0);
  // Sends half of a frame and then nothing: the server must not wait for it.
  net::Fd slow = net::connect_tcp("127.0.0.1", server.port(), 5s);
  const auto partial = cat({handshake(), le32(64), {1, 2, 3}});
  net::write_all(slow.get(), partial.data(), partial.size(), Clock::now() + kNoHang);
  // Connected, but never says anything at all.
  net::Fd silent = net::connect_tcp("127.0.0.1", server.port(), 5s);

  TcpStore::Options o;
  o.timeout = 20s;
  TcpStore a("127.0.0.1", server.port(), o);
  TcpStore b("127.0.0.1", server.port(), o);
  const auto start = Clock::now();
  a.set_string("k", "v");
  EXPECT_EQ(b.get_string("k"), "v");
  EXPECT_EQ(b.add("n", 2), 2);
  EXPECT_LT(Clock::now() - start, kNoHang);
  EXPECT_EQ(server.rejected_frames(), 0u);
}

TEST(TcpStoreServerTest, AClientThatLeavesWhileWaitingIsCleanedUp) {
  TcpStoreServer server("127.0.0.1", 0);
  TcpStore::Options o;
  o.timeout = 20s;
  {
    // A raw GET with a long timeout, then the client vanishes.
    net::Fd raw = net::connect_tcp("127.0.0.1", server.port(), 5s);
    const auto body = cat({{2}, le32(60000), le32(0), le32(4), bytes_of("gone")});
    const auto frame = cat({handshake(), le32(body.size()), body});
    net::write_all(raw.get(), frame.data(), frame.size(), Clock::now() + kNoHang);
    std::this_thread::sleep_for(50ms);
  }
  std::this_thread::sleep_for(50ms);
  TcpStore s("127.0.0.1", server.port(), o);
  s.set_string("gone", "x");  // would write to the departed client if it were still parked
  EXPECT_EQ(s.get_string("gone"), "x");
  EXPECT_EQ(server.rejected_frames(), 0u) << "a clean disconnect is not a malformed frame";
}

TEST(TcpStoreServerTest, ManyWaitersAreAllWokenBySets) {
  TcpStoreServer server("127.0.0.1", 0);
  TcpStore::Options o;
  o.timeout = 20s;
  constexpr int kWaiters = 16;
  std::atomic<int> woken{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kWaiters; ++i)
    threads.emplace_back([&, i] {
      TcpStore c("127.0.0.1", server.port(), o);
      c.wait({"go", "go-" + std::to_string(i % 2)});
      if (c.get_string("go") == "1") ++woken;
    });
  TcpStore setter("127.0.0.1", server.port(), o);
  setter.set_string("go-0", "");
  setter.set_string("go-1", "");
  setter.set_string("go", "1");
  for (auto& t : threads) t.join();
  EXPECT_EQ(woken.load(), kWaiters);
}

}  // namespace
}  // namespace chorus

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
