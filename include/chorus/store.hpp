#pragma once

/// @file store.hpp
/// Rendezvous key-value stores used to bootstrap communicators.

#include <chorus/export.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace chorus {

/// Hard limit on a key's length in bytes; longer keys are rejected.
inline constexpr std::size_t kMaxStoreKeyBytes = 4096;
/// Hard limit on a value's length in bytes; larger values are rejected.
inline constexpr std::size_t kMaxStoreValueBytes = 64u << 20;

/// A key-value store shared by all ranks of a job, used only to exchange
/// addresses and small metadata at communicator creation.
///
/// All methods are thread-safe. Methods that wait do so for at most
/// timeout() and then throw Error(Timeout) naming the keys they waited for.
class CHORUS_API Store {
 public:
  /// Destroys the store handle.
  virtual ~Store();

  /// Stores `value` under `key`, replacing any previous value.
  virtual void set(const std::string& key, const std::vector<std::uint8_t>& value) = 0;
  /// Returns the value of `key`, waiting up to timeout() for it to be set.
  virtual std::vector<std::uint8_t> get(const std::string& key) = 0;
  /// Atomically adds `delta` to the integer stored at `key` (absent = 0) and returns the new value.
  virtual std::int64_t add(const std::string& key, std::int64_t delta) = 0;
  /// Waits until every key in `keys` is set, or throws Error(Timeout) after `timeout`.
  virtual void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) = 0;
  /// True if every key in `keys` is set now; never waits.
  virtual bool check(const std::vector<std::string>& keys) = 0;

  /// Waits until every key in `keys` is set, for at most timeout().
  void wait(const std::vector<std::string>& keys) { wait(keys, timeout()); }
  /// Convenience: stores a string value.
  void set_string(const std::string& key, const std::string& value);
  /// Convenience: gets a value as a string.
  std::string get_string(const std::string& key);

  /// Default timeout of get() and wait(); 300 s unless set.
  std::chrono::milliseconds timeout() const noexcept {
    return std::chrono::milliseconds(timeout_ms_.load(std::memory_order_relaxed));
  }
  /// Changes the default timeout; safe while other threads use the store.
  void set_timeout(std::chrono::milliseconds t) noexcept {
    timeout_ms_.store(t.count(), std::memory_order_relaxed);
  }

 protected:
  /// Throws Error(InvalidArgument) if `key` is empty or longer than kMaxStoreKeyBytes.
  static void check_key(const std::string& key);

 private:
  std::atomic<std::int64_t> timeout_ms_{300'000};
};

/// A standalone TCP store server: what `chorus-store` and `chorusrun` run, and
/// what a TcpStore with is_server = true hosts in a background thread.
///
/// Frames are length-prefixed and bounded by kMaxStoreKeyBytes and
/// kMaxStoreValueBytes; a malformed or oversized frame closes that one
/// connection with a logged reason, and never affects other clients.
class CHORUS_API TcpStoreServer {
 public:
  /// Listens on `host`:`port` (port 0 picks a free port; see port()). Throws Error(System) if it cannot bind.
  TcpStoreServer(const std::string& host, std::uint16_t port);
  /// Stops the server and closes every connection.
  ~TcpStoreServer();
  TcpStoreServer(const TcpStoreServer&) = delete;
  TcpStoreServer& operator=(const TcpStoreServer&) = delete;

  /// The port the server listens on.
  std::uint16_t port() const noexcept;
  /// Number of frames rejected as malformed since start (for tests and logs).
  std::uint64_t rejected_frames() const noexcept;
  /// Stops serving; idempotent.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Client of a TCP store, optionally hosting the server itself.
class CHORUS_API TcpStore : public Store {
 public:
  /// Options of a TcpStore.
  struct Options {
    /// Host the server in this process (rank 0 by default), listening on `port`.
    bool is_server = false;
    /// How long to keep retrying the connection to the server, and the default timeout().
    std::chrono::milliseconds timeout{std::chrono::seconds(300)};
  };

  /// Connects to `host`:`port`, starting the server first when options.is_server.
  TcpStore(const std::string& host, std::uint16_t port, const Options& options);
  /// Connects to `host`:`port` as a client with default options.
  TcpStore(const std::string& host, std::uint16_t port);
  /// Closes the connections (and stops the hosted server, if any).
  ~TcpStore() override;

  /// The server's port (useful when is_server and port 0 was given).
  std::uint16_t port() const noexcept;

  /// See Store::set.
  void set(const std::string& key, const std::vector<std::uint8_t>& value) override;
  /// See Store::get.
  std::vector<std::uint8_t> get(const std::string& key) override;
  /// See Store::add.
  std::int64_t add(const std::string& key, std::int64_t delta) override;
  /// See Store::wait.
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;
  /// See Store::check.
  bool check(const std::vector<std::string>& keys) override;
  using Store::wait;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// A store in a directory shared by all ranks (a local path, or a shared file
/// system). Each key is a file written atomically (write + rename).
class CHORUS_API FileStore : public Store {
 public:
  /// Uses (and creates if needed) the directory `path`.
  explicit FileStore(const std::string& path);
  /// Leaves the directory and its files in place.
  ~FileStore() override;

  /// See Store::set.
  void set(const std::string& key, const std::vector<std::uint8_t>& value) override;
  /// See Store::get.
  std::vector<std::uint8_t> get(const std::string& key) override;
  /// See Store::add.
  std::int64_t add(const std::string& key, std::int64_t delta) override;
  /// See Store::wait.
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;
  /// See Store::check.
  bool check(const std::vector<std::string>& keys) override;
  using Store::wait;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// A view of another store in which every key is prefixed with `prefix` + "/".
class CHORUS_API PrefixStore : public Store {
 public:
  /// Wraps `base`; keys become prefix + "/" + key.
  PrefixStore(std::string prefix, std::shared_ptr<Store> base);
  /// Does not affect the wrapped store.
  ~PrefixStore() override;

  /// See Store::set.
  void set(const std::string& key, const std::vector<std::uint8_t>& value) override;
  /// See Store::get.
  std::vector<std::uint8_t> get(const std::string& key) override;
  /// See Store::add.
  std::int64_t add(const std::string& key, std::int64_t delta) override;
  /// See Store::wait.
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;
  /// See Store::check.
  bool check(const std::vector<std::string>& keys) override;
  using Store::wait;

  /// The wrapped store.
  const std::shared_ptr<Store>& base() const noexcept { return base_; }

 private:
  std::string prefix_;
  std::shared_ptr<Store> base_;
};

}  // namespace chorus
