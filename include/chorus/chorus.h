/* chorus.h: the C ABI of libchorus (docs/c_api.md).
 *
 * Plain C99 over the C++ library: opaque handles, status codes, no exception
 * ever crosses it. Every function that can fail returns a chorus_status_t;
 * CHORUS_OK is 0, and every other value is the number of the C++ ErrorCode
 * (docs/errors.md). chorus_last_error() then says what happened, in the
 * calling thread. Semantics (buffers, in place, deadlines, failure of peers)
 * are those of the C++ API in <chorus/communicator.hpp>.
 */
#ifndef CHORUS_CHORUS_H
#define CHORUS_CHORUS_H

#include <stddef.h>
#include <stdint.h>

#if defined(CHORUS_BUILDING_LIBRARY)
#define CHORUS_C_API __attribute__((visibility("default")))
#else
#define CHORUS_C_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Status of a call: 0, or the C++ ErrorCode's number. Never renumbered. */
typedef enum chorus_status {
  CHORUS_OK = 0,
  CHORUS_INVALID_ARGUMENT = 1, /* a bad argument (null pointer, bad rank, unknown dtype, ...) */
  CHORUS_INVALID_USAGE = 2,    /* a correct call at the wrong time, or ranks calling different collectives */
  CHORUS_TIMEOUT = 3,          /* a deadline passed */
  CHORUS_PEER_FAILURE = 4,     /* a peer died or closed its connection */
  CHORUS_TRANSPORT = 5,        /* the transport failed */
  CHORUS_SYSTEM = 6,           /* an operating-system call failed (or memory ran out) */
  CHORUS_ABORTED = 7,          /* the communicator was aborted */
  CHORUS_CUDA = 8,             /* a CUDA call failed */
  CHORUS_INTERNAL = 9,         /* a bug in Chorus: please report it */
  /* Not statuses: they make every int a value of the type, so that the
   * library may be handed any int (C++ gives an enum only the values its
   * enumerators' bits can hold). */
  CHORUS_STATUS_INVALID = -1,
  CHORUS_STATUS_MAX_ENUM = 0x7fffffff
} chorus_status_t;

/* Element types: the values of chorus::DataType (and of the wire). */
typedef enum chorus_dtype {
  CHORUS_INT8 = 0,
  CHORUS_UINT8 = 1,
  CHORUS_INT32 = 2,
  CHORUS_UINT32 = 3,
  CHORUS_INT64 = 4,
  CHORUS_UINT64 = 5,
  CHORUS_FLOAT16 = 6,
  CHORUS_BFLOAT16 = 7,
  CHORUS_FLOAT32 = 8,
  CHORUS_FLOAT64 = 9,
  CHORUS_DTYPE_INVALID = -1, /* not types: every int is a value of the type */
  CHORUS_DTYPE_MAX_ENUM = 0x7fffffff
} chorus_dtype_t;

/* Reduction operations: the values of chorus::ReduceOp. */
typedef enum chorus_op {
  CHORUS_SUM = 0,
  CHORUS_PROD = 1,
  CHORUS_MIN = 2,
  CHORUS_MAX = 3,
  CHORUS_AVG = 4, /* sum divided by the world size (integer division for integer types) */
  CHORUS_OP_INVALID = -1, /* not ops: every int is a value of the type */
  CHORUS_OP_MAX_ENUM = 0x7fffffff
} chorus_op_t;

typedef struct chorus_store* chorus_store_t; /* a rendezvous store */
typedef struct chorus_comm* chorus_comm_t;   /* a communicator */
typedef struct chorus_work* chorus_work_t;   /* an asynchronous operation */
typedef struct chorus_engine* chorus_engine_t; /* a negotiated tensor engine */

/* Settings fixed at creation. Start from CHORUS_CONFIG_INIT: struct_size lets
 * later versions add fields without breaking programs built against this
 * one. Zero and NULL fields take their value from the environment
 * (docs/tuning.md), then from the default. */
typedef struct chorus_config {
  size_t struct_size;
  int64_t timeout_ms;        /* default deadline of every call (CHORUS_TIMEOUT) */
  const char* transport;     /* "auto", "shm", "tcp", ... (CHORUS_TRANSPORT) */
  const char* socket_ifname; /* network interface for tcp (CHORUS_SOCKET_IFNAME) */
} chorus_config_t;
#define CHORUS_CONFIG_INIT {sizeof(chorus_config_t), 0, NULL, NULL}

/* Per-call options; NULL means the defaults. Start from CHORUS_OPTIONS_INIT. */
typedef struct chorus_options {
  size_t struct_size;
  int64_t timeout_ms;    /* this call's deadline; 0: the communicator's */
  const char* algorithm; /* force an algorithm by name ("ring"); NULL: Chorus chooses */
  void* stream;          /* a cudaStream_t for calls on device buffers (docs/cuda.md) */
} chorus_options_t;
#define CHORUS_OPTIONS_INIT {sizeof(chorus_options_t), 0, NULL, NULL}

/* ---- errors and versions ---------------------------------------------------- */

/* What the last call of this thread that failed said ("" if none has):
 * "chorus: <Code>: <message>". Valid until this thread's next failing call. */
CHORUS_C_API const char* chorus_last_error(void);
/* The rank that last error blames, or -1. */
CHORUS_C_API int chorus_last_error_peer(void);
/* The name of a status ("OK", "InvalidArgument", "PeerFailure", ...). */
CHORUS_C_API const char* chorus_status_string(chorus_status_t status);
/* The library's version ("0.1.0"). */
CHORUS_C_API const char* chorus_version(void);
/* Size in bytes of one element of `dtype`, or 0 for an unknown type. */
CHORUS_C_API size_t chorus_dtype_size(chorus_dtype_t dtype);

/* ---- stores ------------------------------------------------------------------ */

/* A TCP store at host:port. With is_server, this process also hosts it (the
 * other ranks connect to it). timeout_ms bounds the connection and every
 * wait (0: 300 s). */
CHORUS_C_API chorus_status_t chorus_tcp_store_create(const char* host, uint16_t port,
                                                     int is_server, int64_t timeout_ms,
                                                     chorus_store_t* out);
/* A store in a directory every rank can reach (a shared filesystem). */
CHORUS_C_API chorus_status_t chorus_file_store_create(const char* path, chorus_store_t* out);
/* Frees a store handle (communicators made with it keep what they need). */
CHORUS_C_API void chorus_store_free(chorus_store_t store);

/* ---- communicators ----------------------------------------------------------- */

/* Joins a group of `size` ranks as `rank` through `store`; blocks until every
 * rank has joined. config may be NULL. */
CHORUS_C_API chorus_status_t chorus_comm_create(int rank, int size, chorus_store_t store,
                                                const chorus_config_t* config, chorus_comm_t* out);
/* Joins the group the environment describes (CHORUS_RANK/WORLD_SIZE/STORE,
 * or torchrun's, mpirun's, Slurm's variables; docs/tuning.md). */
CHORUS_C_API chorus_status_t chorus_comm_from_env(const chorus_config_t* config, chorus_comm_t* out);
/* Ranks with the same color form a new communicator, ordered by (key, rank).
 * A negative color gives *out = NULL. Collective over every rank of comm. */
CHORUS_C_API chorus_status_t chorus_comm_split(chorus_comm_t comm, int color, int key,
                                               chorus_comm_t* out);
/* Frees the handle; the other ranks are not told (see chorus_comm_abort). */
CHORUS_C_API void chorus_comm_free(chorus_comm_t comm);
CHORUS_C_API chorus_status_t chorus_comm_rank(chorus_comm_t comm, int* rank);
CHORUS_C_API chorus_status_t chorus_comm_size(chorus_comm_t comm, int* size);
/* The transport's name ("shm", "tcp", ...), or NULL for a null handle. Owned
 * by the handle. */
CHORUS_C_API const char* chorus_comm_transport(chorus_comm_t comm);
/* Any blocked call returns CHORUS_ABORTED, and every later call fails. */
CHORUS_C_API chorus_status_t chorus_comm_abort(chorus_comm_t comm);
/* CHORUS_OK while the communicator is usable; else the status of the error
 * that made it unusable, whose text chorus_last_error() then returns (like
 * ncclCommGetAsyncError). */
CHORUS_C_API chorus_status_t chorus_comm_error(chorus_comm_t comm);

/* ---- collectives ------------------------------------------------------------- *
 * With work == NULL a call blocks until it is done. Otherwise it is queued
 * and *work receives a handle to wait on and free; calls of one
 * communicator run in the order they were made. options may be NULL. Buffers
 * are as in the C++ API: sendbuf == recvbuf is in place (allgather: sendbuf
 * == recvbuf + rank * count elements; reduce_scatter: recvbuf == sendbuf +
 * rank * count elements); counts are in elements. */
CHORUS_C_API chorus_status_t chorus_allreduce(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                              size_t count, chorus_dtype_t dtype, chorus_op_t op,
                                              const chorus_options_t* options, chorus_work_t* work);
CHORUS_C_API chorus_status_t chorus_broadcast(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                              size_t count, chorus_dtype_t dtype, int root,
                                              const chorus_options_t* options, chorus_work_t* work);
CHORUS_C_API chorus_status_t chorus_allgather(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                              size_t count, chorus_dtype_t dtype,
                                              const chorus_options_t* options, chorus_work_t* work);
CHORUS_C_API chorus_status_t chorus_reduce_scatter(chorus_comm_t comm, const void* sendbuf,
                                                   void* recvbuf, size_t count, chorus_dtype_t dtype,
                                                   chorus_op_t op, const chorus_options_t* options,
                                                   chorus_work_t* work);
/* Reduce-scatter with a count per rank: recvcounts holds one count per rank
 * (chorus_comm_size of them, the same on every rank, copied before the call
 * returns); sendbuf holds their sum, blocks packed in rank order, and this
 * rank receives its block of the reduction (recvcounts[rank] elements). In
 * place when recvbuf == sendbuf + the counts of the ranks before this one. */
CHORUS_C_API chorus_status_t chorus_reduce_scatterv(chorus_comm_t comm, const void* sendbuf,
                                                    void* recvbuf, const size_t* recvcounts,
                                                    chorus_dtype_t dtype, chorus_op_t op,
                                                    const chorus_options_t* options,
                                                    chorus_work_t* work);
CHORUS_C_API chorus_status_t chorus_reduce(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                           size_t count, chorus_dtype_t dtype, chorus_op_t op,
                                           int root, const chorus_options_t* options,
                                           chorus_work_t* work);
CHORUS_C_API chorus_status_t chorus_gather(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                           size_t count, chorus_dtype_t dtype, int root,
                                           const chorus_options_t* options, chorus_work_t* work);
CHORUS_C_API chorus_status_t chorus_scatter(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                            size_t count, chorus_dtype_t dtype, int root,
                                            const chorus_options_t* options, chorus_work_t* work);
CHORUS_C_API chorus_status_t chorus_alltoall(chorus_comm_t comm, const void* sendbuf, void* recvbuf,
                                             size_t count, chorus_dtype_t dtype,
                                             const chorus_options_t* options, chorus_work_t* work);
/* Allgather with a count per rank: recvcounts holds one count per rank
 * (chorus_comm_size of them, the same on every rank, copied before the call
 * returns); rank p's recvcounts[p] elements land in recvbuf after those of
 * the ranks before it. In place when sendbuf == recvbuf + the counts of the
 * ranks before this one. */
CHORUS_C_API chorus_status_t chorus_allgatherv(chorus_comm_t comm, const void* sendbuf,
                                               void* recvbuf, const size_t* recvcounts,
                                               chorus_dtype_t dtype,
                                               const chorus_options_t* options,
                                               chorus_work_t* work);
/* Alltoall with per-pair counts: sendcounts and recvcounts hold one count
 * per rank (chorus_comm_size of them); this rank sends sendcounts[j]
 * elements to rank j and receives recvcounts[i] from rank i, blocks packed
 * in rank order. sendcounts[j] on rank i must equal recvcounts[i] on rank j
 * (else CHORUS_INVALID_USAGE, on the other ranks no later than their next
 * call). The counts are copied before the call returns; the buffers must
 * not overlap. */
CHORUS_C_API chorus_status_t chorus_alltoallv(chorus_comm_t comm, const void* sendbuf,
                                              const size_t* sendcounts, void* recvbuf,
                                              const size_t* recvcounts, chorus_dtype_t dtype,
                                              const chorus_options_t* options, chorus_work_t* work);
CHORUS_C_API chorus_status_t chorus_barrier(chorus_comm_t comm, const chorus_options_t* options,
                                            chorus_work_t* work);
CHORUS_C_API chorus_status_t chorus_send(chorus_comm_t comm, const void* buf, size_t count,
                                         chorus_dtype_t dtype, int peer,
                                         const chorus_options_t* options, chorus_work_t* work);
CHORUS_C_API chorus_status_t chorus_recv(chorus_comm_t comm, void* buf, size_t count,
                                         chorus_dtype_t dtype, int peer,
                                         const chorus_options_t* options, chorus_work_t* work);

/* ---- asynchronous operations ------------------------------------------------- */

/* Waits for the operation: timeout_ms < 0 waits until it is done. *done
 * (may be NULL) is 1 when it finished, 0 when the timeout passed first. The
 * status is the operation's own when it failed. */
CHORUS_C_API chorus_status_t chorus_work_wait(chorus_work_t work, int64_t timeout_ms, int* done);
/* Never blocks: *done is 1 when the operation has finished. */
CHORUS_C_API chorus_status_t chorus_work_test(chorus_work_t work, int* done);
/* Frees the handle; the operation itself still runs to its end. */
CHORUS_C_API void chorus_work_free(chorus_work_t work);

/* ---- the tensor engine (docs/engine.md) ------------------------------------- *
 * Named tensors submitted in any order, agreed on across ranks every cycle,
 * small allreduces fused; a name submitted differently on two ranks fails on
 * every rank, a name some ranks never submit is reported (chorus::Engine). */

/* Engine settings. Start from CHORUS_ENGINE_CONFIG_INIT: fields left at -1
 * (NULL for timeline) take the environment's value, then the default
 * (docs/tuning.md). */
typedef struct chorus_engine_config {
  size_t struct_size;
  int64_t cycle_us;         /* time between negotiations, > 0 (CHORUS_ENGINE_CYCLE_MS) */
  int64_t fusion_bytes;     /* most bytes of one fused collective; 0: none (CHORUS_FUSION_BYTES) */
  int64_t cache_capacity;   /* names the response cache holds; 0: none (CHORUS_ENGINE_CACHE) */
  const char* timeline;     /* rank 0 writes a Chrome trace here; "": none (CHORUS_TIMELINE) */
  int64_t stall_warning_ms; /* rank 0 warns of a name waiting this long (CHORUS_STALL_WARNING) */
  int64_t stall_abort_ms;   /* such a name then fails everywhere; 0: never (CHORUS_STALL_ABORT) */
} chorus_engine_config_t;
#define CHORUS_ENGINE_CONFIG_INIT {sizeof(chorus_engine_config_t), -1, -1, -1, NULL, -1, -1}

/* What an engine has done so far (chorus::EngineStats). */
typedef struct chorus_engine_stats {
  size_t struct_size;
  uint64_t cycles;       /* negotiation rounds */
  uint64_t negotiations; /* rounds that exchanged tensor descriptions */
  uint64_t tensors;      /* tensors completed (successfully or not) */
  uint64_t collectives;  /* collectives run for them */
  uint64_t fused;        /* tensors that shared a collective with others */
  uint64_t cache_hits;   /* tensors agreed on by their cache bit alone */
} chorus_engine_stats_t;
#define CHORUS_ENGINE_STATS_INIT {sizeof(chorus_engine_stats_t), 0, 0, 0, 0, 0, 0}

/* Starts an engine on a communicator of its own split from comm: collective
 * over every rank of comm, in the same order as their other calls on it.
 * config may be NULL. */
CHORUS_C_API chorus_status_t chorus_engine_start(chorus_comm_t comm,
                                                 const chorus_engine_config_t* config,
                                                 chorus_engine_t* out);
/* Submit the tensor `name` (1 to 4096 bytes). With work == NULL the call
 * waits for the tensor; otherwise *work receives a handle to wait on and
 * free. The buffers are the engine's until it completes. A name may be
 * submitted again once its earlier submission has completed. */
CHORUS_C_API chorus_status_t chorus_engine_allreduce(chorus_engine_t engine, const char* name,
                                                     const void* sendbuf, void* recvbuf,
                                                     size_t count, chorus_dtype_t dtype,
                                                     chorus_op_t op, chorus_work_t* work);
/* Reduce-scatter of the tensor `name`: sendbuf holds nranks blocks of
 * `count` elements; rank r's recvbuf gets block r reduced over the ranks. */
CHORUS_C_API chorus_status_t chorus_engine_reducescatter(chorus_engine_t engine, const char* name,
                                                         const void* sendbuf, void* recvbuf,
                                                         size_t count, chorus_dtype_t dtype,
                                                         chorus_op_t op, chorus_work_t* work);
/* Reduce-scatter of the tensor `name` by rows (Horovod's reducescatter):
 * sendbuf holds `rows` rows of `row_count` elements; rank r's recvbuf gets
 * its rows of the reduction, rows / nranks of them plus one for the first
 * rows % nranks ranks. */
CHORUS_C_API chorus_status_t chorus_engine_reducescatter_rows(
    chorus_engine_t engine, const char* name, const void* sendbuf, void* recvbuf, size_t rows,
    size_t row_count, chorus_dtype_t dtype, chorus_op_t op, chorus_work_t* work);
CHORUS_C_API chorus_status_t chorus_engine_allgather(chorus_engine_t engine, const char* name,
                                                     const void* sendbuf, void* recvbuf,
                                                     size_t count, chorus_dtype_t dtype,
                                                     chorus_work_t* work);
CHORUS_C_API chorus_status_t chorus_engine_broadcast(chorus_engine_t engine, const char* name,
                                                     const void* sendbuf, void* recvbuf,
                                                     size_t count, chorus_dtype_t dtype, int root,
                                                     chorus_work_t* work);
/* Where an allgatherv's or alltoall's result goes: called on the engine's
 * thread with the count this rank gets from each rank (nranks of them, in
 * rank order), it returns memory for their sum of elements. NULL for a
 * nonzero sum fails this rank's tensor. */
typedef void* (*chorus_alloc_fn)(void* user, const size_t* counts, int nranks);
/* Allgather of a tensor whose count differs between ranks: every rank's
 * `count` elements, concatenated in rank order where alloc(user, ...) says.
 * Host memory only; each submission exchanges the counts. */
CHORUS_C_API chorus_status_t chorus_engine_allgatherv(chorus_engine_t engine, const char* name,
                                                      const void* sendbuf, size_t count,
                                                      chorus_dtype_t dtype, chorus_alloc_fn alloc,
                                                      void* user, chorus_work_t* work);
/* Alltoall with splits (Engine::alltoall, Horovod's): this rank sends
 * splits[j] elements of sendbuf to rank j (one split per rank, blocks packed
 * in rank order); what every rank sends this one lands, in rank order, where
 * alloc(user, ...) says. Host memory only; small ones of one dtype are
 * fused. The splits are copied before the call returns. */
CHORUS_C_API chorus_status_t chorus_engine_alltoall(chorus_engine_t engine, const char* name,
                                                    const void* sendbuf, const size_t* splits,
                                                    chorus_dtype_t dtype, chorus_alloc_fn alloc,
                                                    void* user, chorus_work_t* work);
/* This rank's counts so far; start *out from CHORUS_ENGINE_STATS_INIT. */
CHORUS_C_API chorus_status_t chorus_engine_stats(chorus_engine_t engine,
                                                 chorus_engine_stats_t* out);
/* Horovod's join (Engine::join): this rank has no more data; until every
 * rank has joined it stands in for the names it lacks (an allreduce gets
 * the op's identity from it, an average divides by the ranks that
 * submitted, an allgatherv gets no share; an allgather, a broadcast whose
 * root joined or a device tensor fails with CHORUS_INVALID_USAGE). Blocks
 * until every rank has joined; *last_rank (may be NULL) is the rank that
 * joined last. */
CHORUS_C_API chorus_status_t chorus_engine_join(chorus_engine_t engine, int* last_rank);
/* Stops the engine once every rank has called it (collective): what every
 * rank submitted still runs, tensors still waiting then fail with
 * CHORUS_ABORTED. Meanwhile, on the other ranks, a name this rank never
 * submitted fails at once with CHORUS_ABORTED naming it. Idempotent. */
CHORUS_C_API chorus_status_t chorus_engine_shutdown(chorus_engine_t engine);
/* Frees the handle. An engine not shut down is shut down here, which waits
 * for the other ranks to do the same. */
CHORUS_C_API void chorus_engine_free(chorus_engine_t engine);

/* ---- memory ------------------------------------------------------------------ */

/* Host memory that ranks of one host can read from one another directly
 * (one copy for large messages; chorus::mem_alloc). */
CHORUS_C_API chorus_status_t chorus_mem_alloc(size_t bytes, void** out);
CHORUS_C_API chorus_status_t chorus_mem_free(void* ptr);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* CHORUS_CHORUS_H */
