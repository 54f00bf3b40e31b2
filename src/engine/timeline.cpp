#include "engine/timeline.hpp"

#include <chorus/error.hpp>

#include <cerrno>
#include <cstring>

namespace chorus::detail {

Timeline::~Timeline() {
  if (f_ != nullptr) {
    std::fputs("\n]\n", f_);
    std::fclose(f_);
  }
}

void Timeline::start(const std::string& path) {
  f_ = std::fopen(path.c_str(), "w");
  if (f_ == nullptr)
    throw Error(ErrorCode::System, "cannot write the engine timeline " + path + ": " +
                                       std::strerror(errno) + " (CHORUS_TIMELINE)");
  std::fputs("[\n", f_);
  std::fflush(f_);
}

std::string Timeline::quote(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

void Timeline::event(const std::string& body) {
  // A comma before every event but the first keeps the array valid as it grows.
  if (!first_) std::fputs(",\n", f_);
  first_ = false;
  std::fputs(body.c_str(), f_);
}

int Timeline::row(const std::string& tensor) {
  auto it = rows_.find(tensor);
  if (it != rows_.end()) return it->second;
  const int pid = static_cast<int>(rows_.size()) + 1;
  rows_.emplace(tensor, pid);
  event("{\"name\": \"process_name\", \"ph\": \"M\", \"pid\": " + std::to_string(pid) +
        ", \"args\": {\"name\": " + quote(tensor) + "}}");
  event("{\"name\": \"process_sort_index\", \"ph\": \"M\", \"pid\": " + std::to_string(pid) +
        ", \"args\": {\"sort_index\": " + std::to_string(pid) + "}}");
  return pid;
}

void Timeline::complete(const std::string& tensor, const std::string& phase, std::int64_t ts_us,
                        std::int64_t dur_us, const std::string& args) {
  if (f_ == nullptr) return;
  const int pid = row(tensor);
  event("{\"name\": " + quote(phase) + ", \"ph\": \"X\", \"pid\": " + std::to_string(pid) +
        ", \"tid\": 1, \"ts\": " + std::to_string(ts_us) + ", \"dur\": " +
        std::to_string(dur_us < 0 ? 0 : dur_us) + ", \"args\": {" + args + "}}");
}

void Timeline::instant(const std::string& tensor, const std::string& what, std::int64_t ts_us) {
  if (f_ == nullptr) return;
  const int pid = row(tensor);
  event("{\"name\": " + quote(what) + ", \"ph\": \"i\", \"s\": \"p\", \"pid\": " +
        std::to_string(pid) + ", \"tid\": 1, \"ts\": " + std::to_string(ts_us) + "}");
}

void Timeline::flush() {
  if (f_ != nullptr) std::fflush(f_);
}

}  // namespace chorus::detail
