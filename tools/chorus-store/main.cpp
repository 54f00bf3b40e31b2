// chorus-store: a standalone TCP rendezvous store for Chorus jobs.
//
//   chorus-store [--host H] [--port P]
//
// Prints "chorus-store listening on H:P" once it accepts connections (scripts
// may wait for that line; with --port 0 it carries the port picked), then
// serves until SIGINT or SIGTERM.

#include <chorus/error.hpp>
#include <chorus/store.hpp>

#if defined(CHORUS_HAVE_CLI11)
#include "cli/cli.hpp"
#endif

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include <pthread.h>

namespace {

// torchrun's default MASTER_PORT, so that an existing MASTER_ADDR/MASTER_PORT
// setup works unchanged.
constexpr std::uint16_t kDefaultPort = 29500;

struct Args {
  std::string host = "0.0.0.0";
  std::uint16_t port = kDefaultPort;
};

#if defined(CHORUS_HAVE_CLI11)
int parse(int argc, char** argv, Args& args) {
  chorus::cli::Parser app{
      "Standalone rendezvous store for Chorus jobs (serves until SIGINT/SIGTERM)", "chorus-store"};
  app.add("--host", args.host, "Address to listen on (0.0.0.0: all interfaces)").show_default();
  app.add("--port", args.port, "TCP port; 0 picks a free one").show_default();
  if (const std::optional<int> status = app.parse(argc, argv)) return *status == 0 ? 0 : 2;
  return -1;
}
#else
constexpr const char* kUsage =
    "usage: chorus-store [--host H] [--port P]\n"
    "  --host H  address to listen on (default 0.0.0.0: all interfaces)\n"
    "  --port P  TCP port, 0 picks a free one (default 29500)\n";

int parse(int argc, char** argv, Args& args) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    }
    std::string value;
    std::string name = a;
    if (const auto eq = a.find('='); eq != std::string::npos) {
      name = a.substr(0, eq);
      value = a.substr(eq + 1);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      std::cerr << "chorus-store: " << a << " needs a value\n" << kUsage;
      return 2;
    }
    if (name == "--host") {
      args.host = value;
    } else if (name == "--port") {
      char* end = nullptr;
      const long p = std::strtol(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || p < 0 || p > 65535) {
        std::cerr << "chorus-store: bad port '" << value << "' (0..65535)\n";
        return 2;
      }
      args.port = static_cast<std::uint16_t>(p);
    } else {
      std::cerr << "chorus-store: unknown option '" << a << "'\n" << kUsage;
      return 2;
    }
  }
  return -1;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  Args args;
  if (const int rc = parse(argc, argv, args); rc >= 0) return rc;

  // Block the stop signals before the server thread starts, so that it
  // inherits the mask and sigwait() below is the only place they arrive.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  try {
    chorus::TcpStoreServer server(args.host, args.port);
    std::cout << "chorus-store listening on " << args.host << ":" << server.port() << std::endl;
    int sig = 0;
    while (sigwait(&stop_signals, &sig) != 0) {
    }
    std::cerr << "chorus-store: " << strsignal(sig) << ", stopping (" << server.rejected_frames()
              << " malformed frames rejected)" << std::endl;
    server.stop();
  } catch (const chorus::Error& e) {
    std::cerr << "chorus-store: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
