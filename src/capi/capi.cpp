// The C ABI (include/chorus/chorus.h, docs/c_api.md): thin wrappers that turn
// every C++ exception into a status code and a thread-local message. Nothing
// here decides anything the C++ API does not: arguments it can check without
// C++ types (null handles, out-pointers, enum ranges) are checked here, the
// rest by the communicator.

#include <chorus/chorus.h>

#include <chorus/communicator.hpp>
#include <chorus/memory.hpp>
#include <chorus/version.hpp>

#include <exception>
#include <memory>
#include <new>
#include <string>

struct chorus_store {
  std::shared_ptr<chorus::Store> store;
};

struct chorus_comm {
  chorus::Communicator comm;
  std::string transport;
};

struct chorus_work {
  chorus::Work work;
};

namespace {

thread_local std::string t_last_error;
thread_local int t_last_peer = -1;

chorus_status_t fail(const chorus::Error& e) {
  t_last_error = e.what();
  t_last_peer = e.peer();
  return static_cast<chorus_status_t>(static_cast<int>(e.code()));
}

// Runs `f`, mapping whatever it throws to a status (no exception crosses the
// C ABI).
template <typename F>
chorus_status_t guarded(F&& f) noexcept {
  try {
    f();
    return CHORUS_OK;
  } catch (const chorus::Error& e) {
    return fail(e);
  } catch (const std::bad_alloc&) {
    t_last_error = "chorus: System: out of memory";
    t_last_peer = -1;
    return CHORUS_SYSTEM;
  } catch (const std::exception& e) {
    t_last_error = std::string("chorus: Internal: unexpected exception: ") + e.what();
    t_last_peer = -1;
    return CHORUS_INTERNAL;
  } catch (...) {
    t_last_error = "chorus: Internal: unexpected exception of unknown type";
    t_last_peer = -1;
    return CHORUS_INTERNAL;
  }
}

void need(const void* p, const char* what) {
  if (p == nullptr)
    throw chorus::Error(chorus::ErrorCode::InvalidArgument, std::string(what) + " is NULL");
}

chorus::Communicator& comm_of(chorus_comm_t c) {
  need(c, "the communicator handle");
  return c->comm;
}

chorus::DataType dtype_of(chorus_dtype_t t) {
  const auto d = static_cast<chorus::DataType>(static_cast<int>(t));
  if (static_cast<int>(t) < 0 || !chorus::is_valid(d))
    throw chorus::Error(chorus::ErrorCode::InvalidArgument,
                        "unknown dtype " + std::to_string(static_cast<int>(t)) +
                            " (chorus_dtype_t: CHORUS_INT8 (0) .. CHORUS_FLOAT64 (9))");
  return d;
}

chorus::ReduceOp op_of(chorus_op_t o) {
  const auto r = static_cast<chorus::ReduceOp>(static_cast<int>(o));
  if (static_cast<int>(o) < 0 || !chorus::is_valid(r))
    throw chorus::Error(chorus::ErrorCode::InvalidArgument,
                        "unknown op " + std::to_string(static_cast<int>(o)) +
                            " (chorus_op_t: CHORUS_SUM (0) .. CHORUS_AVG (4))");
  return r;
}

// A field is read only if the caller's struct (struct_size) holds it.
#define CHORUS_HAS_FIELD(ptr, type, field) \
  ((ptr)->struct_size >= offsetof(type, field) + sizeof((ptr)->field))

void check_size(std::size_t size, const char* what) {
  if (size < sizeof(std::size_t))
    throw chorus::Error(chorus::ErrorCode::InvalidArgument,
                        std::string(what) + ".struct_size is " + std::to_string(size) +
                            ": start from " +
                            (std::string(what) == "chorus_config_t" ? "CHORUS_CONFIG_INIT"
                                                                    : "CHORUS_OPTIONS_INIT"));
}

chorus::Config config_of(const chorus_config_t* c) {
  chorus::Config cfg;
  if (c == nullptr) return cfg;
  check_size(c->struct_size, "chorus_config_t");
  if (CHORUS_HAS_FIELD(c, chorus_config_t, timeout_ms)) {
    if (c->timeout_ms < 0)
      throw chorus::Error(chorus::ErrorCode::InvalidArgument,
                          "chorus_config_t.timeout_ms is negative");
    cfg.timeout = std::chrono::milliseconds(c->timeout_ms);
  }
  if (CHORUS_HAS_FIELD(c, chorus_config_t, transport) && c->transport != nullptr)
    cfg.transport = c->transport;
  if (CHORUS_HAS_FIELD(c, chorus_config_t, socket_ifname) && c->socket_ifname != nullptr)
    cfg.socket_ifname = c->socket_ifname;
  return cfg;
}

chorus::CallOptions options_of(const chorus_options_t* o) {
  chorus::CallOptions opt;
  if (o == nullptr) return opt;
  check_size(o->struct_size, "chorus_options_t");
  if (CHORUS_HAS_FIELD(o, chorus_options_t, timeout_ms)) {
    if (o->timeout_ms < 0)
      throw chorus::Error(chorus::ErrorCode::InvalidArgument,
                          "chorus_options_t.timeout_ms is negative");
    opt.timeout = std::chrono::milliseconds(o->timeout_ms);
  }
  if (CHORUS_HAS_FIELD(o, chorus_options_t, algorithm) && o->algorithm != nullptr)
    opt.algorithm = o->algorithm;
  if (CHORUS_HAS_FIELD(o, chorus_options_t, stream)) opt.stream = o->stream;
  return opt;
}

// Runs a collective blocking (work == NULL) or queued (*work gets the handle).
template <typename Blocking, typename Async>
chorus_status_t run(chorus_work_t* work, Blocking&& blocking, Async&& async) {
  if (work != nullptr) *work = nullptr;
  return guarded([&] {
    if (work == nullptr) {
      blocking();
      return;
    }
    auto w = std::make_unique<chorus_work>();
    w->work = async();
    *work = w.release();
  });
}

}  // namespace

extern "C" {

const char* chorus_last_error(void) { return t_last_error.c_str(); }

int chorus_last_error_peer(void) { return t_last_peer; }

const char* chorus_status_string(chorus_status_t status) {
  if (status == CHORUS_OK) return "OK";
  const int v = static_cast<int>(status);
  if (v < 1 || v > 9) return "UnknownStatus";
  // to_string returns views of string literals: NUL-terminated.
  return chorus::to_string(static_cast<chorus::ErrorCode>(v)).data();
}

const char* chorus_version(void) { return CHORUS_VERSION; }

size_t chorus_dtype_size(chorus_dtype_t dtype) {
  const auto d = static_cast<chorus::DataType>(static_cast<int>(dtype));
  if (static_cast<int>(dtype) < 0 || !chorus::is_valid(d)) return 0;
  return chorus::size_of(d);
}

chorus_status_t chorus_tcp_store_create(const char* host, uint16_t port, int is_server,
                                        int64_t timeout_ms, chorus_store_t* out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    need(host, "host");
    if (timeout_ms < 0)
      throw chorus::Error(chorus::ErrorCode::InvalidArgument, "timeout_ms is negative");
    chorus::TcpStore::Options o;
    o.is_server = is_server != 0;
    if (timeout_ms > 0) o.timeout = std::chrono::milliseconds(timeout_ms);
    auto s = std::make_unique<chorus_store>();
    s->store = std::make_shared<chorus::TcpStore>(host, port, o);
    *out = s.release();
  });
}

chorus_status_t chorus_file_store_create(const char* path, chorus_store_t* out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    need(path, "path");
    auto s = std::make_unique<chorus_store>();
    s->store = std::make_shared<chorus::FileStore>(path);
    *out = s.release();
  });
}

void chorus_store_free(chorus_store_t store) { delete store; }

chorus_status_t chorus_comm_create(int rank, int size, chorus_store_t store,
                                   const chorus_config_t* config, chorus_comm_t* out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    need(store, "the store handle");
    auto c = std::make_unique<chorus_comm>();
    c->comm = chorus::Communicator::create(rank, size, store->store, config_of(config));
    c->transport = c->comm.transport_name();
    *out = c.release();
  });
}

chorus_status_t chorus_comm_from_env(const chorus_config_t* config, chorus_comm_t* out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    auto c = std::make_unique<chorus_comm>();
    c->comm = chorus::Communicator::from_env(config_of(config));
    c->transport = c->comm.transport_name();
    *out = c.release();
  });
}

chorus_status_t chorus_comm_split(chorus_comm_t comm, int color, int key, chorus_comm_t* out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    chorus::Communicator sub = comm_of(comm).split(color, key);
    if (!sub.valid()) return;
    auto c = std::make_unique<chorus_comm>();
    c->comm = std::move(sub);
    c->transport = c->comm.transport_name();
    *out = c.release();
  });
}

void chorus_comm_free(chorus_comm_t comm) {
  // The communicator's destructor does not throw; guard anyway.
  (void)guarded([&] { delete comm; });
}

chorus_status_t chorus_comm_rank(chorus_comm_t comm, int* rank) {
  return guarded([&] {
    need(rank, "rank");
    *rank = comm_of(comm).rank();
  });
}

chorus_status_t chorus_comm_size(chorus_comm_t comm, int* size) {
  return guarded([&] {
    need(size, "size");
    *size = comm_of(comm).size();
  });
}

const char* chorus_comm_transport(chorus_comm_t comm) {
  return comm == nullptr ? nullptr : comm->transport.c_str();
}

chorus_status_t chorus_comm_abort(chorus_comm_t comm) {
  return guarded([&] { comm_of(comm).abort(); });
}

chorus_status_t chorus_comm_error(chorus_comm_t comm) {
  chorus_status_t status = CHORUS_OK;
  const chorus_status_t checked = guarded([&] {
    if (auto e = comm_of(comm).error()) status = fail(*e);
  });
  return checked != CHORUS_OK ? checked : status;
}

chorus_status_t chorus_allreduce(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                 size_t count, chorus_dtype_t dtype, chorus_op_t op,
                                 const chorus_options_t* options, chorus_work_t* work) {
  return run(
      work,
      [&] {
        comm_of(comm).allreduce(sendbuf, recvbuf, count, dtype_of(dtype), op_of(op),
                                options_of(options));
      },
      [&] {
        return comm_of(comm).allreduce_async(sendbuf, recvbuf, count, dtype_of(dtype), op_of(op),
                                             options_of(options));
      });
}

chorus_status_t chorus_broadcast(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                 size_t count, chorus_dtype_t dtype, int root,
                                 const chorus_options_t* options, chorus_work_t* work) {
  return run(
      work,
      [&] {
        comm_of(comm).broadcast(sendbuf, recvbuf, count, dtype_of(dtype), root,
                                options_of(options));
      },
      [&] {
        return comm_of(comm).broadcast_async(sendbuf, recvbuf, count, dtype_of(dtype), root,
                                             options_of(options));
      });
}

chorus_status_t chorus_allgather(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                 size_t count, chorus_dtype_t dtype,
                                 const chorus_options_t* options, chorus_work_t* work) {
  return run(
      work,
      [&] { comm_of(comm).allgather(sendbuf, recvbuf, count, dtype_of(dtype), options_of(options)); },
      [&] {
        return comm_of(comm).allgather_async(sendbuf, recvbuf, count, dtype_of(dtype),
                                             options_of(options));
      });
}

chorus_status_t chorus_reduce_scatter(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                      size_t count, chorus_dtype_t dtype, chorus_op_t op,
                                      const chorus_options_t* options, chorus_work_t* work) {
  return run(
      work,
      [&] {
        comm_of(comm).reduce_scatter(sendbuf, recvbuf, count, dtype_of(dtype), op_of(op),
                                     options_of(options));
      },
      [&] {
        return comm_of(comm).reduce_scatter_async(sendbuf, recvbuf, count, dtype_of(dtype),
                                                  op_of(op), options_of(options));
      });
}

chorus_status_t chorus_reduce(chorus_comm_t comm, const void* sendbuf, void* recvbuf, size_t count,
                              chorus_dtype_t dtype, chorus_op_t op, int root,
                              const chorus_options_t* options, chorus_work_t* work) {
  return run(
      work,
      [&] {
        comm_of(comm).reduce(sendbuf, recvbuf, count, dtype_of(dtype), op_of(op), root,
                             options_of(options));
      },
      [&] {
        return comm_of(comm).reduce_async(sendbuf, recvbuf, count, dtype_of(dtype), op_of(op),
                                          root, options_of(options));
      });
}

chorus_status_t chorus_gather(chorus_comm_t comm, const void* sendbuf, void* recvbuf, size_t count,
                              chorus_dtype_t dtype, int root, const chorus_options_t* options,
                              chorus_work_t* work) {
  return run(
      work,
      [&] {
        comm_of(comm).gather(sendbuf, recvbuf, count, dtype_of(dtype), root, options_of(options));
      },
      [&] {
        return comm_of(comm).gather_async(sendbuf, recvbuf, count, dtype_of(dtype), root,
                                          options_of(options));
      });
}

chorus_status_t chorus_scatter(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                               size_t count, chorus_dtype_t dtype, int root,
                               const chorus_options_t* options, chorus_work_t* work) {
  return run(
      work,
      [&] {
        comm_of(comm).scatter(sendbuf, recvbuf, count, dtype_of(dtype), root, options_of(options));
      },
      [&] {
        return comm_of(comm).scatter_async(sendbuf, recvbuf, count, dtype_of(dtype), root,
                                           options_of(options));
      });
}

chorus_status_t chorus_alltoall(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                size_t count, chorus_dtype_t dtype,
                                const chorus_options_t* options, chorus_work_t* work) {
  return run(
      work,
      [&] { comm_of(comm).alltoall(sendbuf, recvbuf, count, dtype_of(dtype), options_of(options)); },
      [&] {
        return comm_of(comm).alltoall_async(sendbuf, recvbuf, count, dtype_of(dtype),
                                            options_of(options));
      });
}

chorus_status_t chorus_barrier(chorus_comm_t comm, const chorus_options_t* options,
                               chorus_work_t* work) {
  return run(
      work, [&] { comm_of(comm).barrier(options_of(options)); },
      [&] { return comm_of(comm).barrier_async(options_of(options)); });
}

chorus_status_t chorus_send(chorus_comm_t comm, const void* buf, size_t count,
                            chorus_dtype_t dtype, int peer, const chorus_options_t* options,
                            chorus_work_t* work) {
  return run(
      work, [&] { comm_of(comm).send(buf, count, dtype_of(dtype), peer, options_of(options)); },
      [&] {
        return comm_of(comm).send_async(buf, count, dtype_of(dtype), peer, options_of(options));
      });
}

chorus_status_t chorus_recv(chorus_comm_t comm, void* buf, size_t count, chorus_dtype_t dtype,
                            int peer, const chorus_options_t* options, chorus_work_t* work) {
  return run(
      work, [&] { comm_of(comm).recv(buf, count, dtype_of(dtype), peer, options_of(options)); },
      [&] {
        return comm_of(comm).recv_async(buf, count, dtype_of(dtype), peer, options_of(options));
      });
}

// A failed operation has finished too: *done says so beside its status.
chorus_status_t chorus_work_wait(chorus_work_t work, int64_t timeout_ms, int* done) {
  if (done != nullptr) *done = 0;
  const chorus_status_t status = guarded([&] {
    need(work, "the work handle");
    if (timeout_ms < 0) work->work.wait();
    else if (!work->work.wait(std::chrono::milliseconds(timeout_ms))) return;
    if (done != nullptr) *done = 1;
  });
  if (status != CHORUS_OK && work != nullptr && done != nullptr && work->work.completed()) *done = 1;
  return status;
}

chorus_status_t chorus_work_test(chorus_work_t work, int* done) {
  if (done != nullptr) *done = 0;
  const chorus_status_t status = guarded([&] {
    need(work, "the work handle");
    need(done, "done");
    *done = work->work.test() ? 1 : 0;
  });
  if (status != CHORUS_OK && work != nullptr && done != nullptr && work->work.completed()) *done = 1;
  return status;
}

void chorus_work_free(chorus_work_t work) { delete work; }

chorus_status_t chorus_mem_alloc(size_t bytes, void** out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    *out = chorus::mem_alloc(bytes);
  });
}

chorus_status_t chorus_mem_free(void* ptr) {
  return guarded([&] { chorus::mem_free(ptr); });
}

}  // extern "C"
