#include <chorus/error.hpp>
#include <chorus/store.hpp>

#include "core/enforce.hpp"
#include "core/log.hpp"
#include "core/net.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <system_error>
#include <thread>

namespace chorus {
namespace {

using Clock = std::chrono::steady_clock;

// Longest encoded key used directly as a file name (NAME_MAX is 255).
constexpr std::size_t kMaxDirectName = 200;

// How a key maps to a file in the store's directory.
struct KeyFile {
  std::string name;
  // Long keys get a hashed name; their file then starts with the full key
  // (u32 length + bytes) so that a hash collision is detected, never silent.
  bool hashed = false;
};

std::uint64_t mix64(std::uint64_t x) {  // splitmix64's finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::string hash_hex(const std::string& key) {
  std::uint64_t h1 = 0xcbf29ce484222325ull;  // FNV-1a, two different bases
  std::uint64_t h2 = 0x84222325cbf29ce4ull;
  for (const unsigned char c : key) {
    h1 = (h1 ^ c) * 0x100000001b3ull;
    h2 = (h2 ^ c) * 0x100000001b3ull;
  }
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(mix64(h1)),
                static_cast<unsigned long long>(mix64(h2 ^ key.size())));
  return buf;
}

// Keys are arbitrary bytes; file names are not. Every byte outside
// [A-Za-z0-9_.-] is written as %XX, so the encoding is injective ('%' itself
// is escaped) and '/' never reaches the file system. Key files end in ".v"
// (direct) or ".h" (hashed); the lock file and temporary files do not, so
// they can never collide with a key.
KeyFile key_file(const std::string& key) {
  static const char* kHex = "0123456789ABCDEF";
  std::string enc;
  enc.reserve(key.size());
  for (const unsigned char c : key) {
    const bool safe = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                      c == '_' || c == '-' || c == '.';
    if (safe) {
      enc.push_back(static_cast<char>(c));
    } else {
      enc.push_back('%');
      enc.push_back(kHex[c >> 4]);
      enc.push_back(kHex[c & 15]);
    }
  }
  if (enc.size() <= kMaxDirectName) return {enc + ".v", false};
  // Keep a readable prefix for whoever lists the directory.
  return {enc.substr(0, 64) + "~" + hash_hex(key) + ".h", true};
}

std::vector<std::uint8_t> key_header(const std::string& key) {
  std::vector<std::uint8_t> h(4 + key.size());
  for (int i = 0; i < 4; ++i) h[i] = static_cast<std::uint8_t>(key.size() >> (8 * i));
  std::copy(key.begin(), key.end(), h.begin() + 4);
  return h;
}

Clock::time_point deadline_after(std::chrono::milliseconds timeout) {
  // Saturate: milliseconds::max() means "forever", not an overflow.
  constexpr auto kForever = std::chrono::hours(24 * 365 * 10);
  if (timeout.count() < 0) timeout = std::chrono::milliseconds(0);
  if (timeout > kForever) return Clock::now() + kForever;
  return Clock::now() + timeout;
}

std::string quote_keys(const std::vector<std::string>& keys) {
  std::string s;
  for (std::size_t i = 0; i < keys.size() && i < 8; ++i) s += (i ? ", '" : "'") + keys[i] + "'";
  if (keys.size() > 8) s += " and " + std::to_string(keys.size() - 8) + " more";
  return s;
}

}  // namespace

struct FileStore::Impl {
  std::filesystem::path dir;
  std::atomic<std::uint64_t> tmp_counter{0};

  // Reads up to `max` bytes of `path`; false if it does not exist (yet).
  static bool read_file(const std::filesystem::path& path, std::size_t max, std::vector<std::uint8_t>& out) {
    net::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) {
      if (errno == ENOENT) return false;
      throw_errno("FileStore: cannot open " + path.string());
    }
    out.clear();
    std::uint8_t buf[65536];
    while (out.size() < max) {
      const ssize_t r = ::read(fd.get(), buf, std::min(sizeof buf, max - out.size()));
      if (r == 0) break;
      if (r < 0) {
        if (errno == EINTR) continue;
        throw_errno("FileStore: cannot read " + path.string());
      }
      out.insert(out.end(), buf, buf + r);
    }
    return true;
  }

  // Strips and checks the key header of a hashed key's file.
  static void strip_header(const std::filesystem::path& path, const std::string& key,
                           std::vector<std::uint8_t>& data) {
    const auto h = key_header(key);
    if (data.size() < h.size() || !std::equal(h.begin(), h.end(), data.begin()))
      throw Error(ErrorCode::Internal, "FileStore: " + path.string() + " does not hold key '" +
                                           key.substr(0, 64) + "...' (a hash collision?); please report");
    data.erase(data.begin(), data.begin() + static_cast<std::ptrdiff_t>(h.size()));
  }

  bool exists(const std::string& key) const {
    const KeyFile f = key_file(key);
    if (!f.hashed) {
      struct stat st{};
      return ::stat((dir / f.name).c_str(), &st) == 0;
    }
    std::vector<std::uint8_t> head;
    if (!read_file(dir / f.name, 4 + key.size(), head)) return false;
    strip_header(dir / f.name, key, head);
    return true;
  }

  // Reads the whole value; returns false if the key does not exist (yet).
  bool try_read(const std::string& key, std::vector<std::uint8_t>& out) const {
    const KeyFile f = key_file(key);
    if (!read_file(dir / f.name, SIZE_MAX, out)) return false;
    if (f.hashed) strip_header(dir / f.name, key, out);
    return true;
  }

  // Writes a temporary file in the store's directory, then renames it over the
  // key's file: readers on any host see either nothing or the whole value.
  void write(const std::string& key, const std::vector<std::uint8_t>& value) {
    const KeyFile f = key_file(key);
    const std::filesystem::path target = dir / f.name;
    // Unique across threads (counter), processes (pid) and hosts sharing the
    // directory (hostname), so two writers never share a temporary file.
    char host[64] = {0};
    ::gethostname(host, sizeof host - 1);
    const std::filesystem::path tmp =
        dir / (".tmp." + std::string(host) + "." + std::to_string(::getpid()) + "." +
               std::to_string(tmp_counter.fetch_add(1, std::memory_order_relaxed)));
    {
      net::Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
      if (!fd.valid()) throw_errno("FileStore: cannot create " + tmp.string());
      const auto write_bytes = [&](const std::uint8_t* p, std::size_t n) {
        std::size_t done = 0;
        while (done < n) {
          const ssize_t r = ::write(fd.get(), p + done, n - done);
          if (r < 0) {
            if (errno == EINTR) continue;
            const int e = errno;
            ::unlink(tmp.c_str());
            errno = e;
            throw_errno("FileStore: cannot write " + tmp.string());
          }
          done += static_cast<std::size_t>(r);
        }
      };
      if (f.hashed) {
        const auto h = key_header(key);
        write_bytes(h.data(), h.size());
      }
      write_bytes(value.data(), value.size());
    }
    if (::rename(tmp.c_str(), target.c_str()) != 0) {
      const int e = errno;
      ::unlink(tmp.c_str());
      errno = e;
      throw_errno("FileStore: cannot rename " + tmp.string() + " to " + target.string());
    }
  }

  // Polls until `ready()` holds or the deadline passes. Starts at 1 ms so that
  // a key set a moment later is seen quickly, and backs off to 20 ms so that
  // many ranks waiting on a shared file system do not hammer it.
  template <typename Ready>
  bool poll_until(Clock::time_point deadline, Ready ready) const {
    auto sleep = std::chrono::milliseconds(1);
    while (true) {
      if (ready()) return true;
      const auto now = Clock::now();
      if (now >= deadline) return false;
      std::this_thread::sleep_for(std::min<Clock::duration>(sleep, deadline - now));
      sleep = std::min(sleep * 2, std::chrono::milliseconds(20));
    }
  }
};

FileStore::FileStore(const std::string& path) : impl_(std::make_unique<Impl>()) {
  CHORUS_ENFORCE(!path.empty(), InvalidArgument, "FileStore: the directory path must not be empty");
  impl_->dir = path;
  std::error_code ec;
  std::filesystem::create_directories(impl_->dir, ec);
  if (ec || !std::filesystem::is_directory(impl_->dir))
    throw Error(ErrorCode::System, "FileStore: cannot create or use directory '" + path +
                                       "': " + (ec ? ec.message() : std::string("not a directory")));
}

FileStore::~FileStore() = default;

void FileStore::set(const std::string& key, const std::vector<std::uint8_t>& value) {
  check_key(key);
  CHORUS_ENFORCE(value.size() <= kMaxStoreValueBytes, InvalidArgument,
                 "FileStore: value of " << value.size() << " bytes for key '" << key
                                        << "' exceeds the limit of " << kMaxStoreValueBytes << " bytes");
  impl_->write(key, value);
}

std::vector<std::uint8_t> FileStore::get(const std::string& key) {
  check_key(key);
  const auto t = timeout();
  std::vector<std::uint8_t> out;
  if (!impl_->poll_until(deadline_after(t), [&] { return impl_->try_read(key, out); }))
    CHORUS_THROW(Timeout, "FileStore " << impl_->dir.string() << ": timed out after " << t.count()
                                       << " ms waiting for key '" << key
                                       << "'; did every rank start, and do all use the same directory?");
  return out;
}

std::int64_t FileStore::add(const std::string& key, std::int64_t delta) {
  check_key(key);
  // flock() excludes other open file descriptions, so it serialises threads of
  // this process (each opens its own) as well as other processes. On NFS,
  // Linux maps flock() onto byte-range locks, which the server honours.
  const std::filesystem::path lock_path = impl_->dir / "lock";
  net::Fd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!lock.valid()) throw_errno("FileStore: cannot open " + lock_path.string());
  while (::flock(lock.get(), LOCK_EX) != 0) {
    if (errno != EINTR) throw_errno("FileStore: cannot lock " + lock_path.string());
  }
  std::int64_t current = 0;
  std::vector<std::uint8_t> old;
  if (impl_->try_read(key, old)) {
    const char* b = reinterpret_cast<const char*>(old.data());
    const auto [end, ec] = std::from_chars(b, b + old.size(), current);
    CHORUS_ENFORCE(ec == std::errc() && end == b + old.size() && !old.empty(), InvalidUsage,
                   "FileStore: add('" << key << "'): the key holds a value that is not a decimal integer");
  }
  std::int64_t next = 0;
  CHORUS_ENFORCE(!__builtin_add_overflow(current, delta, &next), InvalidArgument,
                 "FileStore: add('" << key << "', " << delta << ") overflows int64 (current " << current
                                    << ")");
  const std::string s = std::to_string(next);
  impl_->write(key, std::vector<std::uint8_t>(s.begin(), s.end()));
  return next;  // the lock is released when `lock` closes
}

void FileStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  for (const auto& k : keys) check_key(k);
  std::size_t first_missing = 0;  // keys never disappear, so skip those seen already
  const bool ok = impl_->poll_until(deadline_after(timeout), [&] {
    while (first_missing < keys.size() && impl_->exists(keys[first_missing])) ++first_missing;
    return first_missing == keys.size();
  });
  if (!ok) {
    std::vector<std::string> missing;
    for (std::size_t i = first_missing; i < keys.size(); ++i)
      if (!impl_->exists(keys[i])) missing.push_back(keys[i]);
    if (missing.empty()) return;  // the last key arrived just after the deadline
    CHORUS_THROW(Timeout, "FileStore " << impl_->dir.string() << ": timed out after " << timeout.count()
                                       << " ms waiting for " << (missing.size() == 1 ? "key " : "keys ")
                                       << quote_keys(missing)
                                       << "; did every rank start, and do all use the same directory?");
  }
}

bool FileStore::check(const std::vector<std::string>& keys) {
  for (const auto& k : keys) check_key(k);
  return std::all_of(keys.begin(), keys.end(), [&](const std::string& k) { return impl_->exists(k); });
}

}  // namespace chorus
