// The C ABI (include/chorus/chorus.h, docs/c_api.md): thin wrappers that turn
// every C++ exception into a status code and a thread-local message. Nothing
// here decides anything the C++ API does not: arguments it can check without
// C++ types (null handles, out-pointers, enum ranges) are checked here, the
// rest by the communicator.

#include <chorus/chorus.h>

#include <chorus/communicator.hpp>
#include <chorus/engine.hpp>
#include <chorus/memory.hpp>
#include <chorus/version.hpp>

#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <vector>

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

struct chorus_engine {
  chorus::Engine engine;
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

// `what` is the struct's type, `init` the macro its values start from.
void check_size(std::size_t size, const char* what, const char* init) {
  if (size < sizeof(std::size_t))
    throw chorus::Error(
        chorus::ErrorCode::InvalidArgument,
        std::string(what) + ".struct_size is " + std::to_string(size) + ": start from " + init);
}

chorus::Config config_of(const chorus_config_t* c) {
  chorus::Config cfg;
  if (c == nullptr) return cfg;
  check_size(c->struct_size, "chorus_config_t", "CHORUS_CONFIG_INIT");
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
  check_size(o->struct_size, "chorus_options_t", "CHORUS_OPTIONS_INIT");
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

// An engine field: -1 leaves it unset (the environment, then the default).
std::optional<std::int64_t> engine_field(std::int64_t v, const char* field) {
  if (v == -1) return std::nullopt;
  if (v < 0)
    throw chorus::Error(chorus::ErrorCode::InvalidArgument,
                        std::string("chorus_engine_config_t.") + field + " is " +
                            std::to_string(v) + " (-1: the environment's value, else the default)");
  return v;
}

chorus::EngineConfig engine_config_of(const chorus_engine_config_t* c) {
  using namespace std::chrono;
  chorus::EngineConfig cfg;
  if (c == nullptr) return cfg;
  check_size(c->struct_size, "chorus_engine_config_t", "CHORUS_ENGINE_CONFIG_INIT");
  if (CHORUS_HAS_FIELD(c, chorus_engine_config_t, cycle_us))
    if (auto v = engine_field(c->cycle_us, "cycle_us")) {
      if (*v == 0)
        throw chorus::Error(chorus::ErrorCode::InvalidArgument,
                            "chorus_engine_config_t.cycle_us is 0 (it must be positive)");
      cfg.cycle = microseconds(*v);
    }
  if (CHORUS_HAS_FIELD(c, chorus_engine_config_t, fusion_bytes))
    if (auto v = engine_field(c->fusion_bytes, "fusion_bytes"))
      cfg.fusion_bytes = static_cast<std::size_t>(*v);
  if (CHORUS_HAS_FIELD(c, chorus_engine_config_t, cache_capacity))
    if (auto v = engine_field(c->cache_capacity, "cache_capacity"))
      cfg.cache_capacity = static_cast<std::size_t>(*v);
  if (CHORUS_HAS_FIELD(c, chorus_engine_config_t, timeline) && c->timeline != nullptr)
    cfg.timeline = std::string(c->timeline);
  if (CHORUS_HAS_FIELD(c, chorus_engine_config_t, stall_warning_ms))
    if (auto v = engine_field(c->stall_warning_ms, "stall_warning_ms"))
      cfg.stall_warning = milliseconds(*v);
  if (CHORUS_HAS_FIELD(c, chorus_engine_config_t, stall_abort_ms))
    if (auto v = engine_field(c->stall_abort_ms, "stall_abort_ms"))
      cfg.stall_abort = milliseconds(*v);
  return cfg;
}

chorus::Engine& engine_of(chorus_engine_t e) {
  need(e, "the engine handle");
  return e->engine;
}

const char* name_of(const char* name) {
  need(name, "the tensor name");
  return name;
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

// The engine has only asynchronous submissions: a blocking call waits on one.
template <typename Submit>
chorus_status_t submit(chorus_work_t* work, Submit&& s) {
  return run(
      work, [&] { s().wait(); }, s);
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

namespace {
// A C array of one count per rank as a span (its pointer checked).
std::span<const std::size_t> per_rank(chorus_comm_t comm, const size_t* counts, const char* what) {
  need(counts, what);
  return std::span<const std::size_t>(counts, static_cast<std::size_t>(comm_of(comm).size()));
}
}  // namespace

chorus_status_t chorus_reduce_scatterv(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                       const size_t* recvcounts, chorus_dtype_t dtype,
                                       chorus_op_t op, const chorus_options_t* options,
                                       chorus_work_t* work) {
  auto counts = [&] { return per_rank(comm, recvcounts, "recvcounts"); };
  return run(
      work,
      [&] {
        comm_of(comm).reduce_scatterv(sendbuf, recvbuf, counts(), dtype_of(dtype), op_of(op),
                                      options_of(options));
      },
      [&] {
        return comm_of(comm).reduce_scatterv_async(sendbuf, recvbuf, counts(), dtype_of(dtype),
                                                   op_of(op), options_of(options));
      });
}

chorus_status_t chorus_allgatherv(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                  const size_t* recvcounts, chorus_dtype_t dtype,
                                  const chorus_options_t* options, chorus_work_t* work) {
  auto counts = [&] { return per_rank(comm, recvcounts, "recvcounts"); };
  return run(
      work,
      [&] {
        comm_of(comm).allgatherv(sendbuf, recvbuf, counts(), dtype_of(dtype), options_of(options));
      },
      [&] {
        return comm_of(comm).allgatherv_async(sendbuf, recvbuf, counts(), dtype_of(dtype),
                                              options_of(options));
      });
}

chorus_status_t chorus_alltoallv(chorus_comm_t comm, const void* sendbuf, const size_t* sendcounts,
                                 void* recvbuf, const size_t* recvcounts, chorus_dtype_t dtype,
                                 const chorus_options_t* options, chorus_work_t* work) {
  // size() counts each; the spans are read (and copied) before the call returns.
  auto sc = [&] { return per_rank(comm, sendcounts, "sendcounts"); };
  auto rc = [&] { return per_rank(comm, recvcounts, "recvcounts"); };
  return run(
      work,
      [&] {
        const auto s = sc(), r = rc();
        comm_of(comm).alltoallv(sendbuf, s, recvbuf, r, dtype_of(dtype), options_of(options));
      },
      [&] {
        const auto s = sc(), r = rc();
        return comm_of(comm).alltoallv_async(sendbuf, s, recvbuf, r, dtype_of(dtype),
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

chorus_status_t chorus_engine_start(chorus_comm_t comm, const chorus_engine_config_t* config,
                                    chorus_engine_t* out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    const chorus::EngineConfig cfg = engine_config_of(config);
    auto e = std::make_unique<chorus_engine>();
    e->engine = chorus::Engine::start(comm_of(comm), cfg);
    *out = e.release();
  });
}

chorus_status_t chorus_engine_allreduce(chorus_engine_t engine, const char* name,
                                        const void* sendbuf, void* recvbuf, size_t count,
                                        chorus_dtype_t dtype, chorus_op_t op, chorus_work_t* work) {
  return submit(work, [&] {
    return engine_of(engine).allreduce(name_of(name), sendbuf, recvbuf, count, dtype_of(dtype),
                                       op_of(op));
  });
}

chorus_status_t chorus_engine_reducescatter(chorus_engine_t engine, const char* name,
                                            const void* sendbuf, void* recvbuf, size_t count,
                                            chorus_dtype_t dtype, chorus_op_t op,
                                            chorus_work_t* work) {
  return submit(work, [&] {
    return engine_of(engine).reducescatter(name_of(name), sendbuf, recvbuf, count, dtype_of(dtype),
                                           op_of(op));
  });
}

chorus_status_t chorus_engine_reducescatter_rows(chorus_engine_t engine, const char* name,
                                                 const void* sendbuf, void* recvbuf, size_t rows,
                                                 size_t row_count, chorus_dtype_t dtype,
                                                 chorus_op_t op, chorus_work_t* work) {
  return submit(work, [&] {
    return engine_of(engine).reducescatter(name_of(name), sendbuf, recvbuf, rows, row_count,
                                           dtype_of(dtype), op_of(op));
  });
}

chorus_status_t chorus_engine_allgather(chorus_engine_t engine, const char* name,
                                        const void* sendbuf, void* recvbuf, size_t count,
                                        chorus_dtype_t dtype, chorus_work_t* work) {
  return submit(work, [&] {
    return engine_of(engine).allgather(name_of(name), sendbuf, recvbuf, count, dtype_of(dtype));
  });
}

chorus_status_t chorus_engine_broadcast(chorus_engine_t engine, const char* name,
                                        const void* sendbuf, void* recvbuf, size_t count,
                                        chorus_dtype_t dtype, int root, chorus_work_t* work) {
  return submit(work, [&] {
    return engine_of(engine).broadcast(name_of(name), sendbuf, recvbuf, count, dtype_of(dtype),
                                       root);
  });
}

chorus_status_t chorus_engine_allgatherv(chorus_engine_t engine, const char* name,
                                         const void* sendbuf, size_t count, chorus_dtype_t dtype,
                                         chorus_alloc_fn alloc, void* user, chorus_work_t* work) {
  return submit(work, [&] {
    need(reinterpret_cast<const void*>(alloc), "the allocator");
    return engine_of(engine).allgatherv(name_of(name), sendbuf, count, dtype_of(dtype),
                                        [alloc, user](const std::vector<std::size_t>& c) {
                                          return alloc(user, c.data(), static_cast<int>(c.size()));
                                        });
  });
}

chorus_status_t chorus_engine_alltoall(chorus_engine_t engine, const char* name,
                                       const void* sendbuf, const size_t* splits,
                                       chorus_dtype_t dtype, chorus_alloc_fn alloc, void* user,
                                       chorus_work_t* work) {
  return submit(work, [&] {
    need(splits, "splits");
    need(reinterpret_cast<const void*>(alloc), "the allocator");
    chorus::Engine& e = engine_of(engine);
    const auto n = static_cast<std::size_t>(e.communicator().size());
    return e.alltoall(name_of(name), sendbuf, std::vector<std::size_t>(splits, splits + n),
                      dtype_of(dtype), [alloc, user](const std::vector<std::size_t>& c) {
                        return alloc(user, c.data(), static_cast<int>(c.size()));
                      });
  });
}

chorus_status_t chorus_engine_stats(chorus_engine_t engine, chorus_engine_stats_t* out) {
  return guarded([&] {
    need(out, "out");
    check_size(out->struct_size, "chorus_engine_stats_t", "CHORUS_ENGINE_STATS_INIT");
    const chorus::EngineStats s = engine_of(engine).stats();
    // Only the fields the caller's struct holds are written.
    if (CHORUS_HAS_FIELD(out, chorus_engine_stats_t, cycles)) out->cycles = s.cycles;
    if (CHORUS_HAS_FIELD(out, chorus_engine_stats_t, negotiations))
      out->negotiations = s.negotiations;
    if (CHORUS_HAS_FIELD(out, chorus_engine_stats_t, tensors)) out->tensors = s.tensors;
    if (CHORUS_HAS_FIELD(out, chorus_engine_stats_t, collectives)) out->collectives = s.collectives;
    if (CHORUS_HAS_FIELD(out, chorus_engine_stats_t, fused)) out->fused = s.fused;
    if (CHORUS_HAS_FIELD(out, chorus_engine_stats_t, cache_hits)) out->cache_hits = s.cache_hits;
  });
}

chorus_status_t chorus_engine_join(chorus_engine_t engine, int* last_rank) {
  return guarded([&] {
    const int last = engine_of(engine).join();
    if (last_rank != nullptr) *last_rank = last;
  });
}

chorus_status_t chorus_engine_shutdown(chorus_engine_t engine) {
  return guarded([&] { engine_of(engine).shutdown(); });
}

void chorus_engine_free(chorus_engine_t engine) {
  (void)guarded([&] { delete engine; });
}

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
