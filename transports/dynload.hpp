#pragma once

// Loading a fabric library at first use instead of linking it.
//
// Linking libfabric or UCX into libchorus would load them into every process
// that uses Chorus, whatever its transport, and both change the process as
// they load: Debian's libfabric pulls in libinfinipath, which installs a
// SIGABRT handler that calls exit(), and UCX installs handlers for SIGSEGV and
// friends (UCX_HANDLE_ERRORS). A process should get those only if it asked for
// the transport. So the transports are compiled against the headers and
// resolve the few exported functions they call here, when the first
// communicator uses them; the library stays loaded afterwards.

#include <chorus/error.hpp>

#include <dlfcn.h>

#include <initializer_list>
#include <string>

namespace chorus::transport {

class DynamicLibrary {
 public:
  // Opens the first of `names` that loads; throws Error(Transport) naming
  // `what` (how to install it) when none does.
  DynamicLibrary(std::initializer_list<const char*> names, const std::string& what) {
    std::string errors;
    for (const char* n : names) {
      handle_ = dlopen(n, RTLD_NOW | RTLD_LOCAL);
      if (handle_ != nullptr) return;
      const char* e = dlerror();
      errors += std::string(errors.empty() ? "" : "; ") + (e ? e : n);
    }
    throw Error(ErrorCode::Transport, what + " cannot be loaded (" + errors + ")");
  }

  // The function `name`, as a pointer of the type of `F` (pass the
  // declaration from the library's header: get(&fi_getinfo, "fi_getinfo")).
  template <class F>
  F* get(F* /*declared*/, const char* name) const {
    void* p = dlsym(handle_, name);
    if (p == nullptr)
      throw Error(ErrorCode::Transport,
                  std::string("symbol ") + name + " missing from the loaded library");
    return reinterpret_cast<F*>(p);
  }

 private:
  void* handle_ = nullptr;
};

}  // namespace chorus::transport
