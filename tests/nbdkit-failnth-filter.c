/* A test-only nbdkit filter: fail exactly the Nth write (or read)
 * that passes through it, counted from the moment the test arms it.
 *
 * nbdkit's error filter fails every request while its trigger file
 * exists, which tests "everything fails" but never a failure in the
 * middle of one request's metadata changes.  This one sits below
 * ext4fs and is driven by a control file (failnth-file=PATH) that
 * the test rewrites:
 *
 *   GEN N OPS
 *
 * GEN: any word; a new value re-arms the filter (its counters restart
 * at 0).  N: the Nth operation of a kind in OPS fails with EIO, once
 * (N = 0: count only).  A trailing "+" on N (e.g. "3+") fails the Nth
 * and every later one.  OPS: letters, w = pwrite/zero, t = trim (the
 * journal's discards of freed blocks, which are advisory), r = pread,
 * f = flush.  No file, or an empty one: disarmed, nothing counted.
 *
 * After each counted operation the filter writes to PATH.count how
 * many operations of the armed kinds it has seen since arming, and
 * appends one line per injected failure to PATH.log ("w 4096 3" =
 * op, offset, index), so a test can first run a request with N = 0
 * to learn how many writes it makes, then fail each one in turn.
 *
 * Holding: while PATH.hold exists and holds one of the letters w, f,
 * the first write (or flush) to arrive waits until the test removes
 * the file (the others pass meanwhile); the filter writes PATH.held
 * when it starts waiting.  So a test can stop a commit half way (its
 * flush, or its first log write) and run requests beside it.  An
 * operation that is to fail (above) is counted before it waits, and
 * fails after.
 *
 * failnth-flush-delay-us=N: every flush, and every write with FUA,
 * first sleeps N microseconds (a slow flush below, as over a network;
 * for benchmarks).
 *
 * Locks: one mutex around the control state (tests only: the cost
 * does not matter).
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <nbdkit-filter.h>

static char *ctl_path;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
/* Protected by lock: */
static char armed_gen[64];
static uint64_t seen;
static bool holding;
static unsigned flush_delay_us;

static int
failnth_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                const char *key, const char *value)
{
  if (strcmp (key, "failnth-file") == 0) {
    free (ctl_path);
    ctl_path = strdup (value);
    if (ctl_path == NULL) {
      nbdkit_error ("strdup: %m");
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "failnth-flush-delay-us") == 0) {
    if (nbdkit_parse_unsigned ("failnth-flush-delay-us", value,
                               &flush_delay_us) == -1)
      return -1;
    return 0;
  }
  return next (nxdata, key, value);
}

static void
flush_delay (void)
{
  if (flush_delay_us > 0)
    usleep (flush_delay_us);
}

static int
failnth_config_complete (nbdkit_next_config_complete *next,
                         nbdkit_backend *nxdata)
{
  if (ctl_path == NULL) {
    nbdkit_error ("failnth-file= is required");
    return -1;
  }
  return next (nxdata);
}

static void
failnth_unload (void)
{
  free (ctl_path);
}

static void
write_file (const char *suffix, const char *text, bool append)
{
  char path[4096];
  FILE *f;

  snprintf (path, sizeof path, "%s.%s", ctl_path, suffix);
  f = fopen (path, append ? "a" : "w");
  if (f == NULL)
    return;
  fputs (text, f);
  fclose (f);
}

/* Should this operation (kind op: 'w', 'r' or 'f') fail? */
static bool
should_fail (char op, uint64_t offset)
{
  char buf[256], gen[64], nstr[32], ops[16], text[64];
  FILE *f;
  uint64_t n;
  bool plus, fail;

  f = fopen (ctl_path, "r");
  if (f == NULL)
    return false;
  if (fgets (buf, sizeof buf, f) == NULL ||
      sscanf (buf, "%63s %31s %15s", gen, nstr, ops) != 3) {
    fclose (f);
    return false;
  }
  fclose (f);
  if (strchr (ops, op) == NULL)
    return false;
  plus = nstr[0] && nstr[strlen (nstr) - 1] == '+';
  n = strtoull (nstr, NULL, 10);

  pthread_mutex_lock (&lock);
  if (strcmp (gen, armed_gen) != 0) {
    snprintf (armed_gen, sizeof armed_gen, "%s", gen);
    seen = 0;
  }
  seen++;
  fail = n > 0 && (plus ? seen >= n : seen == n);
  snprintf (text, sizeof text, "%" PRIu64 "\n", seen);
  write_file ("count", text, false);
  if (fail) {
    snprintf (text, sizeof text, "%c %" PRIu64 " %" PRIu64 "\n",
              op, offset, seen);
    write_file ("log", text, true);
  }
  pthread_mutex_unlock (&lock);
  if (fail)
    nbdkit_debug ("failnth: failing %c #%" PRIu64 " at %" PRIu64,
                  op, n, offset);
  return fail;
}

/* Wait while PATH.hold exists and names op (the first such operation
 * only).
 */
static void
maybe_hold (char op)
{
  char path[4096], ops[16] = "";
  FILE *f;

  snprintf (path, sizeof path, "%s.hold", ctl_path);
  f = fopen (path, "r");
  if (f == NULL)
    return;
  if (fgets (ops, sizeof ops, f) == NULL)
    ops[0] = 0;
  fclose (f);
  if (strchr (ops, op) == NULL)
    return;
  pthread_mutex_lock (&lock);
  if (holding) {
    pthread_mutex_unlock (&lock);
    return;
  }
  holding = true;
  pthread_mutex_unlock (&lock);
  nbdkit_debug ("failnth: holding %c", op);
  write_file ("held", "1\n", false);
  while (access (path, F_OK) == 0)
    usleep (10000);
  pthread_mutex_lock (&lock);
  holding = false;
  pthread_mutex_unlock (&lock);
}

static int
failnth_pread (nbdkit_next *next, void *handle, void *buf, uint32_t count,
               uint64_t offset, uint32_t flags, int *err)
{
  if (should_fail ('r', offset)) {
    nbdkit_error ("failnth: injected read error");
    *err = EIO;
    return -1;
  }
  return next->pread (next, buf, count, offset, flags, err);
}

static int
failnth_pwrite (nbdkit_next *next, void *handle, const void *buf,
                uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  bool fail = should_fail ('w', offset);

  maybe_hold ('w');
  if (flags & NBDKIT_FLAG_FUA)
    flush_delay ();
  if (fail) {
    nbdkit_error ("failnth: injected write error");
    *err = EIO;
    return -1;
  }
  return next->pwrite (next, buf, count, offset, flags, err);
}

static int
failnth_zero (nbdkit_next *next, void *handle, uint32_t count,
              uint64_t offset, uint32_t flags, int *err)
{
  bool fail = should_fail ('w', offset);

  maybe_hold ('w');
  if (fail) {
    nbdkit_error ("failnth: injected zero error");
    *err = EIO;
    return -1;
  }
  return next->zero (next, count, offset, flags, err);
}

static int
failnth_trim (nbdkit_next *next, void *handle, uint32_t count,
              uint64_t offset, uint32_t flags, int *err)
{
  if (should_fail ('t', offset)) {
    nbdkit_error ("failnth: injected trim error");
    *err = EIO;
    return -1;
  }
  return next->trim (next, count, offset, flags, err);
}

static int
failnth_flush (nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
  bool fail = should_fail ('f', 0);

  maybe_hold ('f');
  flush_delay ();
  if (fail) {
    nbdkit_error ("failnth: injected flush error");
    *err = EIO;
    return -1;
  }
  return next->flush (next, flags, err);
}

static struct nbdkit_filter filter = {
  .name              = "failnth",
  .longname          = "ext4fs test filter: fail the Nth write",
  .unload            = failnth_unload,
  .config            = failnth_config,
  .config_complete   = failnth_config_complete,
  .config_help       = "failnth-file=PATH   control file (see the source)",
  .pread             = failnth_pread,
  .pwrite            = failnth_pwrite,
  .zero              = failnth_zero,
  .trim              = failnth_trim,
  .flush             = failnth_flush,
};

NBDKIT_REGISTER_FILTER (filter)
