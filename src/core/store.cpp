#include <chorus/error.hpp>
#include <chorus/store.hpp>

#include "core/enforce.hpp"

#include <utility>

namespace chorus {

Store::~Store() = default;

void Store::set_string(const std::string& key, const std::string& value) {
  set(key, std::vector<std::uint8_t>(value.begin(), value.end()));
}

std::string Store::get_string(const std::string& key) {
  const std::vector<std::uint8_t> v = get(key);
  return std::string(v.begin(), v.end());
}

void Store::check_key(const std::string& key) {
  CHORUS_ENFORCE(!key.empty(), InvalidArgument, "store key must not be empty");
  CHORUS_ENFORCE(key.size() <= kMaxStoreKeyBytes, InvalidArgument,
                 "store key of " << key.size() << " bytes exceeds the limit of " << kMaxStoreKeyBytes
                                 << " bytes (key starts with '" << key.substr(0, 64) << "')");
}

// ---------------------------------------------------------------------------
// PrefixStore

PrefixStore::PrefixStore(std::string prefix, std::shared_ptr<Store> base)
    : prefix_(std::move(prefix)), base_(std::move(base)) {
  CHORUS_ENFORCE(base_ != nullptr, InvalidArgument, "PrefixStore '" << prefix_ << "': base store is null");
  // A view starts with the patience of the store it wraps; it can then be
  // changed independently (get() and wait() below pass our own timeout down).
  set_timeout(base_->timeout());
}

PrefixStore::~PrefixStore() = default;

namespace {

std::string join(const std::string& prefix, const std::string& key) { return prefix + "/" + key; }

}  // namespace

void PrefixStore::set(const std::string& key, const std::vector<std::uint8_t>& value) {
  check_key(key);
  base_->set(join(prefix_, key), value);
}

std::vector<std::uint8_t> PrefixStore::get(const std::string& key) {
  check_key(key);
  const std::string full = join(prefix_, key);
  // base_->get() would wait for the *base's* timeout(); wait with ours first so
  // that set_timeout() on the view means what it says. The key then exists.
  base_->wait({full}, timeout());
  return base_->get(full);
}

std::int64_t PrefixStore::add(const std::string& key, std::int64_t delta) {
  check_key(key);
  return base_->add(join(prefix_, key), delta);
}

void PrefixStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  std::vector<std::string> full;
  full.reserve(keys.size());
  for (const auto& k : keys) {
    check_key(k);
    full.push_back(join(prefix_, k));
  }
  base_->wait(full, timeout);
}

bool PrefixStore::check(const std::vector<std::string>& keys) {
  std::vector<std::string> full;
  full.reserve(keys.size());
  for (const auto& k : keys) {
    check_key(k);
    full.push_back(join(prefix_, k));
  }
  return base_->check(full);
}

}  // namespace chorus
