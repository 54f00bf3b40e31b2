/* The C ABI (include/chorus/chorus.h) from a C program: every collective,
 * blocking and asynchronous, split, memory, the tensor engine, and the errors (bad arguments,
 * a mismatched call) as status codes with their messages. Three ranks are
 * forked processes meeting through a file store; expected values are closed
 * forms of every rank's input. Exit status 0 when every check held. */

#include <chorus/chorus.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int g_rank = -1;
static int g_failures = 0;

#define CHECK(cond, ...)                                                                 \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      fprintf(stderr, "rank %d: %s:%d: %s: ", g_rank, __FILE__, __LINE__, #cond);        \
      fprintf(stderr, __VA_ARGS__);                                                      \
      fprintf(stderr, " (chorus_last_error: %s)\n", chorus_last_error());                 \
      ++g_failures;                                                                      \
    }                                                                                    \
  } while (0)

#define OK(call)                                                                    \
  do {                                                                              \
    const chorus_status_t st_ = (call);                                              \
    CHECK(st_ == CHORUS_OK, "%s returned %s", #call, chorus_status_string(st_));     \
  } while (0)

/* The call fails with `want`, and the message contains `needle`. */
#define FAILS(call, want, needle)                                                        \
  do {                                                                                   \
    const chorus_status_t st_ = (call);                                                   \
    CHECK(st_ == (want), "%s returned %s, not %s", #call, chorus_status_string(st_),      \
          chorus_status_string(want));                                                   \
    CHECK(strstr(chorus_last_error(), (needle)) != NULL, "%s: message lacks \"%s\"", #call, \
          (needle));                                                                     \
  } while (0)

static void checks_without_a_communicator(void) {
  int r = 0;
  chorus_store_t s = NULL;
  CHECK(strcmp(chorus_status_string(CHORUS_OK), "OK") == 0, "OK's name");
  CHECK(strcmp(chorus_status_string(CHORUS_PEER_FAILURE), "PeerFailure") == 0, "PeerFailure's name");
  CHECK(strcmp(chorus_status_string((chorus_status_t)77), "UnknownStatus") == 0, "77's name");
  CHECK(chorus_version()[0] >= '0' && chorus_version()[0] <= '9', "version %s", chorus_version());
  CHECK(chorus_dtype_size(CHORUS_INT8) == 1 && chorus_dtype_size(CHORUS_BFLOAT16) == 2 &&
            chorus_dtype_size(CHORUS_UINT32) == 4 && chorus_dtype_size(CHORUS_FLOAT64) == 8,
        "element sizes");
  CHECK(chorus_dtype_size((chorus_dtype_t)42) == 0, "an unknown dtype has size 0");
  FAILS(chorus_comm_rank(NULL, &r), CHORUS_INVALID_ARGUMENT, "communicator handle is NULL");
  FAILS(chorus_file_store_create(NULL, &s), CHORUS_INVALID_ARGUMENT, "path is NULL");
  CHECK(s == NULL, "no store on failure");
  CHECK(chorus_last_error_peer() == -1, "no peer to blame");
  FAILS(chorus_work_wait(NULL, -1, NULL), CHORUS_INVALID_ARGUMENT, "work handle is NULL");
}

static void collectives(chorus_comm_t comm, int rank, int n) {
  enum { C = 1000 };
  int32_t in32[C], out32[C];
  /* allreduce int32 sum: sum over ranks of rank*1000 + i. */
  for (int i = 0; i < C; ++i) in32[i] = rank * 1000 + i;
  OK(chorus_allreduce(comm, in32, out32, C, CHORUS_INT32, CHORUS_SUM, NULL, NULL));
  for (int i = 0; i < C; ++i) {
    const int32_t want = 1000 * n * (n - 1) / 2 + n * i;
    if (out32[i] != want) {
      CHECK(out32[i] == want, "allreduce sum element %d: %d, want %d", i, out32[i], want);
      break;
    }
  }
  /* allreduce float avg in place: (sum of rank) / n + i / 2, exact. */
  float f[C];
  for (int i = 0; i < C; ++i) f[i] = (float)rank + 0.5f * (float)i;
  OK(chorus_allreduce(comm, f, f, C, CHORUS_FLOAT32, CHORUS_AVG, NULL, NULL));
  for (int i = 0; i < C; ++i) {
    const float want = (float)(n - 1) / 2.0f + 0.5f * (float)i;
    const float diff = f[i] > want ? f[i] - want : want - f[i];
    if (diff > 1e-6f * want) { /* the division may round */
      CHECK(diff <= 1e-6f * want, "allreduce avg element %d: %g, want %g", i, (double)f[i],
            (double)want);
      break;
    }
  }
  /* broadcast double from rank 1. */
  double d[64];
  for (int i = 0; i < 64; ++i) d[i] = rank == 1 ? 0.25 * i : -1.0;
  OK(chorus_broadcast(comm, d, d, 64, CHORUS_FLOAT64, 1, NULL, NULL));
  for (int i = 0; i < 64; ++i) CHECK(d[i] == 0.25 * i, "broadcast element %d: %g", i, d[i]);
  /* allgather uint8: rank r's 5 elements are r*10 + i. */
  uint8_t mine[5], all[5 * 16];
  for (int i = 0; i < 5; ++i) mine[i] = (uint8_t)(rank * 10 + i);
  OK(chorus_allgather(comm, mine, all, 5, CHORUS_UINT8, NULL, NULL));
  for (int i = 0; i < 5 * n; ++i)
    CHECK(all[i] == (uint8_t)((i / 5) * 10 + i % 5), "allgather element %d: %d", i, all[i]);
  /* reduce_scatter int64 max: element j of rank r's input is r + j. */
  int64_t rs_in[3 * 16], rs_out[3];
  for (int j = 0; j < 3 * n; ++j) rs_in[j] = rank + j;
  OK(chorus_reduce_scatter(comm, rs_in, rs_out, 3, CHORUS_INT64, CHORUS_MAX, NULL, NULL));
  for (int i = 0; i < 3; ++i)
    CHECK(rs_out[i] == (int64_t)(n - 1 + rank * 3 + i), "reduce_scatter element %d: %lld", i,
          (long long)rs_out[i]);
  /* reduce prod to rank 2 (recvbuf NULL elsewhere): n! */
  int32_t p = rank + 1, prod = 0;
  OK(chorus_reduce(comm, &p, rank == 2 ? &prod : NULL, 1, CHORUS_INT32, CHORUS_PROD, 2, NULL, NULL));
  if (rank == 2) {
    int32_t want = 1;
    for (int k = 2; k <= n; ++k) want *= k;
    CHECK(prod == want, "reduce prod: %d, want %d", prod, want);
  }
  /* gather to 0, scatter from 0, alltoall. */
  int32_t g[16], one = 100 + rank;
  OK(chorus_gather(comm, &one, rank == 0 ? g : NULL, 1, CHORUS_INT32, 0, NULL, NULL));
  if (rank == 0)
    for (int k = 0; k < n; ++k) CHECK(g[k] == 100 + k, "gather element %d: %d", k, g[k]);
  int32_t sc_in[16], sc_out = -1;
  for (int k = 0; k < n; ++k) sc_in[k] = 200 + k;
  OK(chorus_scatter(comm, rank == 0 ? sc_in : NULL, &sc_out, 1, CHORUS_INT32, 0, NULL, NULL));
  CHECK(sc_out == 200 + rank, "scatter: %d", sc_out);
  int32_t a_in[16], a_out[16];
  for (int k = 0; k < n; ++k) a_in[k] = rank * 100 + k; /* block k goes to rank k */
  OK(chorus_alltoall(comm, a_in, a_out, 1, CHORUS_INT32, NULL, NULL));
  for (int k = 0; k < n; ++k)
    CHECK(a_out[k] == k * 100 + rank, "alltoall element %d: %d", k, a_out[k]);
  /* allgatherv in place: rank p shares p % 3 elements of value 100 p + k. */
  int32_t gv[64];
  size_t gv_counts[16];
  int gv_at = 0, gv_mine = 0;
  for (int p = 0; p < n; ++p) {
    gv_counts[p] = (size_t)(p % 3);
    if (p == rank) gv_mine = gv_at;
    gv_at += p % 3;
  }
  for (int k = 0; k < rank % 3; ++k) gv[gv_mine + k] = 100 * rank + k;
  OK(chorus_allgatherv(comm, gv + gv_mine, gv, gv_counts, CHORUS_INT32, NULL, NULL));
  gv_at = 0;
  for (int p = 0; p < n; ++p)
    for (int k = 0; k < p % 3; ++k, ++gv_at)
      CHECK(gv[gv_at] == 100 * p + k, "allgatherv element %d of rank %d: %d", k, p, gv[gv_at]);
  /* reduce_scatterv sum: rank p receives (p + 1) % 3 elements; element j of
   * every rank r's input is r + j, so element j of the sum is n(n-1)/2 + n j. */
  int64_t rv_in[64], rv_out[3];
  size_t rv_counts[16];
  int rv_total = 0, rv_first = 0;
  for (int p = 0; p < n; ++p) {
    rv_counts[p] = (size_t)((p + 1) % 3);
    if (p == rank) rv_first = rv_total;
    rv_total += (p + 1) % 3;
  }
  for (int j = 0; j < rv_total; ++j) rv_in[j] = rank + j;
  OK(chorus_reduce_scatterv(comm, rv_in, rv_out, rv_counts, CHORUS_INT64, CHORUS_SUM, NULL, NULL));
  for (int i = 0; i < (rank + 1) % 3; ++i)
    CHECK(rv_out[i] == (int64_t)(n * (n - 1) / 2 + n * (rv_first + i)),
          "reduce_scatterv element %d: %lld", i, (long long)rv_out[i]);
  /* alltoallv: rank i sends rank j (i + j) % 3 elements of value 1000 i + 10 j + k. */
  int32_t v_in[64], v_out[64];
  size_t v_send[16], v_recv[16];
  int at = 0;
  for (int j = 0; j < n; ++j) {
    v_send[j] = (size_t)((rank + j) % 3);
    v_recv[j] = (size_t)((j + rank) % 3);
    for (int k = 0; k < (rank + j) % 3; ++k) v_in[at++] = 1000 * rank + 10 * j + k;
  }
  chorus_work_t vw = NULL;
  OK(chorus_alltoallv(comm, v_in, v_send, v_out, v_recv, CHORUS_INT32, NULL, &vw));
  OK(chorus_work_wait(vw, 60000, NULL));
  chorus_work_free(vw);
  at = 0;
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < (i + rank) % 3; ++k, ++at)
      CHECK(v_out[at] == 1000 * i + 10 * rank + k, "alltoallv from rank %d element %d: %d", i, k,
            v_out[at]);
  OK(chorus_barrier(comm, NULL, NULL));
}

static void asynchronous(chorus_comm_t comm, int rank, int n) {
  /* A ring: send to the next rank, receive from the previous (send first). */
  int32_t out = 7000 + rank, in = -1;
  chorus_work_t s = NULL, r = NULL;
  OK(chorus_send(comm, &out, 1, CHORUS_INT32, (rank + 1) % n, NULL, &s));
  OK(chorus_recv(comm, &in, 1, CHORUS_INT32, (rank + n - 1) % n, NULL, &r));
  CHECK(s != NULL && r != NULL, "async calls give handles");
  int done = 0;
  OK(chorus_work_wait(s, -1, &done));
  CHECK(done == 1, "send done");
  OK(chorus_work_wait(r, 60000, &done));
  CHECK(done == 1, "recv done");
  CHECK(in == 7000 + (rank + n - 1) % n, "ring recv: %d", in);
  chorus_work_free(s);
  chorus_work_free(r);
  /* An async allreduce polled with chorus_work_test, with options. */
  double x[256];
  for (int i = 0; i < 256; ++i) x[i] = rank + i;
  chorus_options_t o = CHORUS_OPTIONS_INIT;
  o.timeout_ms = 60000;
  o.algorithm = "ring";
  chorus_work_t w = NULL;
  OK(chorus_allreduce(comm, x, x, 256, CHORUS_FLOAT64, CHORUS_SUM, &o, &w));
  done = 0;
  for (int spins = 0; !done && spins < 60000; ++spins) {
    OK(chorus_work_test(w, &done));
    if (!done) usleep(1000);
  }
  CHECK(done == 1, "the async allreduce finished");
  for (int i = 0; i < 256; ++i)
    CHECK(x[i] == (double)(n * (n - 1) / 2 + n * i), "async allreduce element %d: %g", i, x[i]);
  chorus_work_free(w);
}

static void memory(chorus_comm_t comm, int rank, int n) {
  const size_t count = 1u << 18; /* 1 MiB of float */
  float* buf = NULL;
  OK(chorus_mem_alloc(count * sizeof(float), (void**)&buf));
  if (buf == NULL) return;
  for (size_t i = 0; i < count; ++i) buf[i] = (float)(rank + 1);
  OK(chorus_allreduce(comm, buf, buf, count, CHORUS_FLOAT32, CHORUS_SUM, NULL, NULL));
  const float want = (float)(n * (n + 1) / 2);
  CHECK(buf[0] == want && buf[count - 1] == want, "mem_alloc allreduce: %g", (double)buf[0]);
  OK(chorus_mem_free(buf));
}

static void splitting(chorus_comm_t comm, int rank) {
  /* Ranks 0 and 1 form a communicator ordered by key -rank (so rank 1 is
   * its rank 0); rank 2 passes a negative color and gets none. */
  chorus_comm_t sub = NULL;
  OK(chorus_comm_split(comm, rank < 2 ? 0 : -1, -rank, &sub));
  if (rank == 2) {
    CHECK(sub == NULL, "a negative color gives no communicator");
    return;
  }
  int sr = -1, ss = -1;
  OK(chorus_comm_rank(sub, &sr));
  OK(chorus_comm_size(sub, &ss));
  CHECK(ss == 2 && sr == 1 - rank, "split: rank %d of %d", sr, ss);
  int32_t v = rank + 5, sum = 0;
  OK(chorus_allreduce(sub, &v, &sum, 1, CHORUS_INT32, CHORUS_SUM, NULL, NULL));
  CHECK(sum == 11, "allreduce on the split communicator: %d", sum);
  chorus_comm_free(sub);
}

/* An allgatherv's allocator: room for up to 64 values. */
struct gathered {
  int64_t values[64];
  int nranks;
  size_t total;
};
static void* give_room(void* user, const size_t* counts, int nranks) {
  struct gathered* g = (struct gathered*)user;
  g->nranks = nranks;
  g->total = 0;
  for (int r = 0; r < nranks; ++r) g->total += counts[r];
  return g->total <= 64 ? g->values : NULL;
}

/* The tensor engine: names submitted in a different order on every rank,
 * twice (the second time through the response cache), a mismatch, and the
 * engine's bad arguments. */
static void engine(chorus_comm_t comm, int rank, int n) {
  chorus_engine_t e = (chorus_engine_t)&g_rank; /* must be reset to NULL on failure */
  chorus_engine_config_t bad = CHORUS_ENGINE_CONFIG_INIT;
  bad.cycle_us = -5;
  FAILS(chorus_engine_start(comm, &bad, &e), CHORUS_INVALID_ARGUMENT, "cycle_us is -5");
  CHECK(e == NULL, "no engine on failure");
  chorus_engine_config_t zero;
  memset(&zero, 0, sizeof zero);
  FAILS(chorus_engine_start(comm, &zero, &e), CHORUS_INVALID_ARGUMENT, "CHORUS_ENGINE_CONFIG_INIT");
  FAILS(chorus_engine_start(NULL, NULL, &e), CHORUS_INVALID_ARGUMENT,
        "communicator handle is NULL");

  chorus_engine_config_t cfg = CHORUS_ENGINE_CONFIG_INIT;
  cfg.cycle_us = 2000;
  cfg.cache_capacity = 16;
  cfg.stall_warning_ms = 600000; /* rank 0's lone tensor below must not be reported */
  OK(chorus_engine_start(comm, &cfg, &e));
  if (e == NULL) return;

  enum { K = 4, C = 100 };
  static const char* names[K] = {"layer.0", "layer.1", "layer.2", "layer.3"};
  for (int round = 0; round < 2; ++round) {
    float a[K][C + K];
    chorus_work_t w[K + 2];
    for (int k = 0; k < K; ++k)
      for (int i = 0; i < C + k; ++i) a[k][i] = (float)(rank + 1) * (float)(i + k + round);
    /* Rank r submits layer r, r+1, ...: every rank in another order. */
    for (int j = 0; j < K; ++j) {
      const int k = (j + rank) % K;
      OK(chorus_engine_allreduce(e, names[k], a[k], a[k], (size_t)(C + k), CHORUS_FLOAT32,
                                 CHORUS_SUM, &w[k]));
    }
    int32_t mine[2] = {rank * 10, rank * 10 + 1}, all[2 * 8];
    OK(chorus_engine_allgather(e, "gathered", mine, all, 2, CHORUS_INT32, &w[K]));
    int64_t b[3] = {0, 0, 0};
    if (rank == 1) b[0] = 5, b[1] = 6, b[2] = 7 + round;
    OK(chorus_engine_broadcast(e, "broadcast", b, b, 3, CHORUS_INT64, 1, &w[K + 1]));
    int32_t one = rank, total = -1; /* a blocking submission */
    OK(chorus_engine_allreduce(e, "blocking", &one, &total, 1, CHORUS_INT32, CHORUS_SUM, NULL));
    CHECK(total == n * (n - 1) / 2, "engine blocking allreduce: %d", total);
    for (int k = 0; k < K + 2; ++k) {
      int done = 0;
      OK(chorus_work_wait(w[k], 60000, &done));
      CHECK(done == 1, "engine tensor %d done", k);
      chorus_work_free(w[k]);
    }
    const float ranks_sum = (float)(n * (n + 1) / 2);
    for (int k = 0; k < K; ++k)
      for (int i = 0; i < C + k; ++i)
        CHECK(a[k][i] == ranks_sum * (float)(i + k + round), "engine %s[%d] = %g (round %d)",
              names[k], i, (double)a[k][i], round);
    for (int r = 0; r < n; ++r)
      CHECK(all[2 * r] == r * 10 && all[2 * r + 1] == r * 10 + 1, "engine allgather from rank %d",
            r);
    CHECK(b[0] == 5 && b[1] == 6 && b[2] == 7 + round, "engine broadcast: %lld %lld %lld",
          (long long)b[0], (long long)b[1], (long long)b[2]);
  }
  /* allgatherv: rank r shares r + 1 values; the allocator sees every count. */
  {
    int64_t share[8];
    for (int k = 0; k <= rank; ++k) share[k] = 10 * rank + k;
    struct gathered g = {{0}, 0, 0};
    OK(chorus_engine_allgatherv(e, "shares", share, (size_t)(rank + 1), CHORUS_INT64, give_room, &g,
                                NULL));
    CHECK(g.nranks == n, "allgatherv: the allocator saw %d ranks", g.nranks);
    size_t at = 0;
    for (int r = 0; r < n && g.nranks == n; ++r)
      for (int k = 0; k <= r; ++k, ++at)
        CHECK(g.values[at] == 10 * r + k, "allgatherv element %d of rank %d: %lld", k, r,
              (long long)g.values[at]);
    FAILS(chorus_engine_allgatherv(e, "shares", share, 1, CHORUS_INT64, NULL, NULL, NULL),
          CHORUS_INVALID_ARGUMENT, "allocator is NULL");
  }
  /* reducescatter: block p of rank q holds q + 10p + j; rank r gets the sum
   * over q of block r. */
  {
    int32_t blocks[2 * 8], got[2] = {-1, -1};
    for (int p = 0; p < n; ++p)
      for (int j = 0; j < 2; ++j) blocks[2 * p + j] = rank + 10 * p + j;
    OK(chorus_engine_reducescatter(e, "scattered", blocks, got, 2, CHORUS_INT32, CHORUS_SUM, NULL));
    for (int j = 0; j < 2; ++j)
      CHECK(got[j] == n * (n - 1) / 2 + n * (10 * rank + j), "reducescatter element %d: %d", j,
            (int)got[j]);
  }
  /* reducescatter by rows: n + 1 rows of 2 (rank 0 gets two rows, the
   * others one); element j of every rank q's input is q + j. */
  {
    int32_t in[2 * 9], got[4] = {-1, -1, -1, -1};
    for (int j = 0; j < 2 * (n + 1); ++j) in[j] = rank + j;
    OK(chorus_engine_reducescatter_rows(e, "rows", in, got, (size_t)(n + 1), 2, CHORUS_INT32,
                                        CHORUS_SUM, NULL));
    const int first = rank == 0 ? 0 : 2 * (rank + 1), mine = rank == 0 ? 4 : 2;
    for (int j = 0; j < mine; ++j)
      CHECK(got[j] == n * (n - 1) / 2 + n * (first + j), "reducescatter row element %d: %d", j,
            (int)got[j]);
  }
  /* alltoall: rank r sends rank q (r + q) % 2 + 1 values 100 r + 10 q + k. */
  {
    int64_t out[16];
    size_t splits[8];
    int at = 0;
    for (int q = 0; q < n; ++q) {
      splits[q] = (size_t)((rank + q) % 2 + 1);
      for (int k = 0; k < (rank + q) % 2 + 1; ++k) out[at++] = 100 * rank + 10 * q + k;
    }
    struct gathered g = {{0}, 0, 0};
    chorus_work_t w = NULL;
    OK(chorus_engine_alltoall(e, "routed", out, splits, CHORUS_INT64, give_room, &g, &w));
    OK(chorus_work_wait(w, 60000, NULL));
    chorus_work_free(w);
    CHECK(g.nranks == n, "alltoall: the allocator saw %d ranks", g.nranks);
    at = 0;
    for (int p = 0; p < n && g.nranks == n; ++p)
      for (int k = 0; k < (p + rank) % 2 + 1; ++k, ++at)
        CHECK(g.values[at] == 100 * p + 10 * rank + k, "alltoall element %d from rank %d: %lld", k,
              p, (long long)g.values[at]);
    FAILS(chorus_engine_alltoall(e, "routed", out, NULL, CHORUS_INT64, give_room, &g, NULL),
          CHORUS_INVALID_ARGUMENT, "splits is NULL");
  }
  chorus_engine_stats_t st = CHORUS_ENGINE_STATS_INIT;
  OK(chorus_engine_stats(e, &st));
  /* 7 tensors a round, the second round's all from the cache, the
   * allgatherv, the two reducescatters and the alltoall. */
  CHECK(st.tensors == 18, "engine stats: %llu tensors", (unsigned long long)st.tensors);
  CHECK(st.cache_hits >= 7, "engine stats: %llu cache hits", (unsigned long long)st.cache_hits);
  CHECK(st.collectives >= 1 && st.collectives <= st.tensors && st.cycles >= 2,
        "engine stats: %llu collectives in %llu cycles", (unsigned long long)st.collectives,
        (unsigned long long)st.cycles);
  chorus_engine_stats_t unsized;
  memset(&unsized, 0, sizeof unsized);
  FAILS(chorus_engine_stats(e, &unsized), CHORUS_INVALID_ARGUMENT, "CHORUS_ENGINE_STATS_INIT");

  /* Join: rank r has r + 1 batches. Batch s counts the ranks that still
   * have one (ranks s..n-1) and takes the lowest of them: the joined ranks
   * stand in with 0 for the sum and INT_MAX for the minimum. */
  for (int s = 0; s <= rank; ++s) {
    int one = 1, in = 0, me = rank, lowest = -1;
    chorus_work_t jw[2] = {NULL, NULL};
    OK(chorus_engine_allreduce(e, "in", &one, &in, 1, CHORUS_INT32, CHORUS_SUM, &jw[0]));
    OK(chorus_engine_allreduce(e, "lowest", &me, &lowest, 1, CHORUS_INT32, CHORUS_MIN, &jw[1]));
    for (int k = 0; k < 2; ++k) {
      OK(chorus_work_wait(jw[k], 60000, NULL));
      chorus_work_free(jw[k]);
    }
    CHECK(in == n - s, "join: batch %d counted %d ranks, expected %d", s, in, n - s);
    CHECK(lowest == s, "join: batch %d's lowest rank %d, expected %d", s, lowest, s);
  }
  int last = -1;
  OK(chorus_engine_join(e, &last));
  CHECK(last == n - 1, "join: the last rank to join was %d, expected %d", last, n - 1);
  FAILS(chorus_engine_join(NULL, NULL), CHORUS_INVALID_ARGUMENT, "engine handle is NULL");

  /* One name, two counts: every rank's submission fails, naming it. */
  float m[5] = {1, 1, 1, 1, 1};
  FAILS(chorus_engine_allreduce(e, "mismatched", m, m, rank == 2 ? 5 : 4, CHORUS_FLOAT32,
                                CHORUS_SUM, NULL),
        CHORUS_INVALID_USAGE, "mismatched");

  /* Bad submissions fail at once, on this rank only. */
  chorus_work_t w = (chorus_work_t)&g_rank;
  FAILS(chorus_engine_allreduce(e, NULL, m, m, 1, CHORUS_FLOAT32, CHORUS_SUM, &w),
        CHORUS_INVALID_ARGUMENT, "tensor name is NULL");
  CHECK(w == NULL, "no work handle for a submission that failed");
  FAILS(chorus_engine_allreduce(e, "x", m, m, 1, (chorus_dtype_t)42, CHORUS_SUM, NULL),
        CHORUS_INVALID_ARGUMENT, "unknown dtype 42");
  FAILS(chorus_engine_broadcast(e, "x", m, m, 1, CHORUS_FLOAT32, n, NULL), CHORUS_INVALID_ARGUMENT,
        "root");
  FAILS(chorus_engine_allreduce(NULL, "x", m, m, 1, CHORUS_FLOAT32, CHORUS_SUM, NULL),
        CHORUS_INVALID_ARGUMENT, "engine handle is NULL");

  /* A name only rank 0 submits waits; submitting it again before it is done
   * is refused, and shutting down fails it with CHORUS_ABORTED. */
  chorus_work_t lone = NULL;
  float l = 1;
  if (rank == 0) {
    OK(chorus_engine_allreduce(e, "lone", &l, &l, 1, CHORUS_FLOAT32, CHORUS_SUM, &lone));
    FAILS(chorus_engine_allreduce(e, "lone", &l, &l, 1, CHORUS_FLOAT32, CHORUS_SUM, NULL),
          CHORUS_INVALID_USAGE, "submitted again");
  }
  OK(chorus_engine_shutdown(e));
  OK(chorus_engine_shutdown(e)); /* idempotent */
  if (lone != NULL) {
    int done = 0;
    FAILS(chorus_work_wait(lone, 60000, &done), CHORUS_ABORTED, "");
    CHECK(done == 1, "the lone tensor finished (failed)");
    chorus_work_free(lone);
  }
  FAILS(chorus_engine_allreduce(e, "late", &l, &l, 1, CHORUS_FLOAT32, CHORUS_SUM, NULL),
        CHORUS_INVALID_USAGE, "after shutdown");
  chorus_engine_free(e);
  chorus_engine_free(NULL); /* a no-op, like free(NULL) */
  /* The communicator the engine was split from is still usable. */
  OK(chorus_barrier(comm, NULL, NULL));
}

static void bad_arguments(chorus_comm_t comm) {
  float x[4] = {0, 0, 0, 0};
  chorus_work_t w = (chorus_work_t)&x; /* must be reset to NULL on failure */
  FAILS(chorus_allreduce(comm, x, x, 4, (chorus_dtype_t)42, CHORUS_SUM, NULL, NULL),
        CHORUS_INVALID_ARGUMENT, "unknown dtype 42");
  FAILS(chorus_allreduce(comm, x, x, 4, CHORUS_FLOAT32, (chorus_op_t)9, NULL, &w),
        CHORUS_INVALID_ARGUMENT, "unknown op 9");
  CHECK(w == NULL, "no work handle for a call that failed");
  FAILS(chorus_allreduce(comm, NULL, x, 4, CHORUS_FLOAT32, CHORUS_SUM, NULL, NULL),
        CHORUS_INVALID_ARGUMENT, "null");
  chorus_options_t zero;
  memset(&zero, 0, sizeof zero);
  FAILS(chorus_barrier(comm, &zero, NULL), CHORUS_INVALID_ARGUMENT, "CHORUS_OPTIONS_INIT");
  chorus_options_t o = CHORUS_OPTIONS_INIT;
  o.algorithm = "no_such_algorithm";
  FAILS(chorus_allreduce(comm, x, x, 4, CHORUS_FLOAT32, CHORUS_SUM, &o, NULL),
        CHORUS_INVALID_ARGUMENT, "no_such_algorithm");
  FAILS(chorus_comm_rank(comm, NULL), CHORUS_INVALID_ARGUMENT, "rank is NULL");
  FAILS(chorus_alltoallv(comm, x, NULL, x, NULL, CHORUS_FLOAT32, NULL, NULL),
        CHORUS_INVALID_ARGUMENT, "sendcounts is NULL");
  FAILS(chorus_allgatherv(comm, x, x, NULL, CHORUS_FLOAT32, NULL, NULL), CHORUS_INVALID_ARGUMENT,
        "recvcounts is NULL");
  FAILS(chorus_reduce_scatterv(comm, x, x, NULL, CHORUS_FLOAT32, CHORUS_SUM, NULL, NULL),
        CHORUS_INVALID_ARGUMENT, "recvcounts is NULL");
  /* Bad arguments leave the communicator usable. */
  OK(chorus_comm_error(comm));
  OK(chorus_barrier(comm, NULL, NULL));
}

static void mismatch(chorus_comm_t comm, int rank) {
  /* Rank 0 allreduces while the others take a broadcast from it: each call
   * waits for data the other kind never sends, and every rank fails clearly. */
  int32_t v[8] = {0};
  const chorus_status_t st =
      rank == 0 ? chorus_allreduce(comm, v, v, 8, CHORUS_INT32, CHORUS_SUM, NULL, NULL)
                : chorus_broadcast(comm, v, v, 8, CHORUS_INT32, 0, NULL, NULL);
  CHECK(st == CHORUS_INVALID_USAGE || st == CHORUS_PEER_FAILURE,
        "a mismatched call returned %s", chorus_status_string(st));
  CHECK(chorus_last_error()[0] != '\0', "the mismatch has a message");
  /* The communicator is unusable from then on, and says why. */
  const chorus_status_t after = chorus_comm_error(comm);
  CHECK(after == st, "chorus_comm_error: %s, the call: %s", chorus_status_string(after),
        chorus_status_string(st));
  CHECK(chorus_barrier(comm, NULL, NULL) != CHORUS_OK, "a call after the failure succeeded");
  OK(chorus_comm_abort(comm));
}

static int rank_main(int rank, int n, const char* dir) {
  g_rank = rank;
  alarm(120); /* a hang ends this rank with SIGALRM, which the parent reports */
  checks_without_a_communicator();
  chorus_store_t store = NULL;
  OK(chorus_file_store_create(dir, &store));
  chorus_config_t cfg = CHORUS_CONFIG_INIT;
  cfg.timeout_ms = 60000;
  chorus_comm_t comm = NULL;
  OK(chorus_comm_create(rank, n, store, &cfg, &comm));
  chorus_store_free(store); /* the communicator keeps what it needs */
  if (comm == NULL) return 1;
  int r = -1, s = -1;
  OK(chorus_comm_rank(comm, &r));
  OK(chorus_comm_size(comm, &s));
  CHECK(r == rank && s == n, "rank %d of %d", r, s);
  CHECK(chorus_comm_transport(comm) != NULL && chorus_comm_transport(comm)[0] != '\0',
        "a transport name");
  collectives(comm, rank, n);
  asynchronous(comm, rank, n);
  memory(comm, rank, n);
  splitting(comm, rank);
  engine(comm, rank, n);
  bad_arguments(comm);
  mismatch(comm, rank);
  chorus_comm_free(comm);
  return g_failures == 0 ? 0 : 1;
}

int main(void) {
  const int n = 3;
  char dir[] = "/tmp/chorus-capi-XXXXXX";
  if (mkdtemp(dir) == NULL) {
    perror("mkdtemp");
    return 2;
  }
  pid_t pids[3];
  for (int r = 0; r < n; ++r) {
    pids[r] = fork();
    if (pids[r] == 0) {
      const int rc = rank_main(r, n, dir);
      fflush(NULL);
      _exit(rc);
    }
  }
  int failed = 0;
  for (int r = 0; r < n; ++r) {
    int status = 0;
    waitpid(pids[r], &status, 0);
    if (WIFSIGNALED(status)) {
      fprintf(stderr, "rank %d was killed by signal %d%s\n", r, WTERMSIG(status),
              WTERMSIG(status) == SIGALRM ? " (it hung for 120 s)" : "");
      failed = 1;
    } else if (WEXITSTATUS(status) != 0) {
      fprintf(stderr, "rank %d failed (exit %d)\n", r, WEXITSTATUS(status));
      failed = 1;
    }
  }
  char cmd[64];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
  if (!failed) printf("test_capi: 3 ranks, every check held\n");
  return failed;
}
