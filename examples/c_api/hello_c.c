/* hello_c: hello_allreduce through the C ABI (include/chorus/chorus.h).
 * Run it with
 *   chorusrun -n 4 -- hello_c
 * Every rank contributes rank+1; every element of the sum is then N(N+1)/2. */

#include <chorus/chorus.h>

#include <stdio.h>

int main(void) {
  chorus_comm_t comm = NULL;
  if (chorus_comm_from_env(NULL, &comm) != CHORUS_OK) {
    fprintf(stderr, "hello_c: %s\n", chorus_last_error());
    return 1;
  }
  int rank = 0, n = 0;
  chorus_comm_rank(comm, &rank);
  chorus_comm_size(comm, &n);

  float data[8];
  for (int i = 0; i < 8; ++i) data[i] = (float)(rank + 1);
  const chorus_status_t st =
      chorus_allreduce(comm, data, data, 8, CHORUS_FLOAT32, CHORUS_SUM, NULL, NULL);
  if (st != CHORUS_OK) {
    /* The status is the C++ ErrorCode's number; the message says what to do. */
    fprintf(stderr, "hello_c: allreduce failed (%s): %s\n", chorus_status_string(st),
            chorus_last_error());
    chorus_comm_free(comm);
    return 1;
  }
  /* Small integers: the float sum is exact, so equality is the right test. */
  const float expected = (float)(n * (n + 1) / 2);
  int ok = 1;
  for (int i = 0; i < 8; ++i) ok = ok && data[i] == expected;
  printf("rank %d/%d: sum = %g (expected %g) %s\n", rank, n, (double)data[0], (double)expected,
         ok ? "OK" : "WRONG");
  chorus_comm_free(comm);
  return ok ? 0 : 1;
}
