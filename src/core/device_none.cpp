// The device layer of a build without CUDA: every pointer is host memory.
#include "core/device.hpp"

namespace chorus::device {

bool built() { return false; }

std::string unavailable_reason() {
  return "this build of Chorus has no CUDA support (configure with -Dcuda=enabled on a machine "
         "with the CUDA toolkit)";
}

PtrInfo query(const void*) { return {}; }

void synchronize(void*) { throw Error(ErrorCode::Cuda, unavailable_reason()); }

std::unique_ptr<Engine> make_engine(const EngineSetup&) {
  throw Error(ErrorCode::Cuda, unavailable_reason());
}

}  // namespace chorus::device
