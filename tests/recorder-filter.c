/* recorder: a test-only nbdkit filter that records every write,
 * zero, trim and flush that reaches the plugin, with the data, for
 * crashstates.py (crash states after power loss, like dm-log-writes).
 *
 *   nbdkit --filter=ext4fs --filter=/path/recorder-filter.so file IMG \
 *          ext4file=/f recordfile=/path/log [recordfailflush=/path/trigger]
 *
 * The first --filter is outermost, so this one sits BELOW ext4fs and
 * sees exactly what ext4fs sends to the plugin.  Every call is passed
 * through unchanged, and is appended to the log when the plugin call
 * RETURNS (success or failure), under one mutex, in completion order.
 * Each record carries two ticks of one process-wide counter: one taken
 * when the call was issued (before calling the plugin), one when it
 * completed (under the mutex, so completion ticks increase with the
 * record's position).  So a write W is covered by a flush F exactly
 * when W.end < F.start.  Nothing is fsync'ed: the log only has to
 * survive the test, not a crash.
 *
 * recordfailflush=PATH: while PATH exists, flushes are NOT passed to
 * the plugin and fail with EIO (recorded as failed flushes): a flush
 * error of the disk, for "a failed flush must not be forgotten" tests.
 * If PATH holds "once", only the next flush fails (PATH is removed).
 * recordflushwait=PATH: a flush first creates PATH.busy and waits while
 * PATH exists (then looks at recordfailflush): a slow flush with other requests in
 * flight.
 *
 * Log format (all integers little-endian):
 *   file header, 16 bytes: "NBDKREC\0", u32 version (1), u32 record
 *     header size (64);
 *   per record, 64 bytes, then `datalen` bytes of data:
 *     0 u32 magic 0x31434552 ("REC1")   4 u16 type (1 write, 2 zero,
 *     3 trim, 4 flush)   6 u16 reserved   8 u32 NBDKIT_FLAG_* flags
 *     12 u32 errno (0 = the call succeeded)   16 u64 sequence number
 *     (0, 1, ... in completion order)   24 u64 issue tick   32 u64
 *     completion tick   40 u64 offset   48 u32 count   52 u32 thread
 *     id   56 u64 datalen (count for a write, else 0).
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE    /* syscall, htole32 (also built without config.h) */
#endif

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-filter.h>

enum { REC_WRITE = 1, REC_ZERO = 2, REC_TRIM = 3, REC_FLUSH = 4 };
#define REC_MAGIC 0x31434552u
#define REC_HDR 64

static char *recordfile;
static char *failflushfile;
static char *flushwaitfile;
static int log_fd = -1;

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t ticks;          /* atomic */
/* Protected by log_lock: */
static uint64_t nrecords;
static bool log_broken;

static void
recorder_unload (void)
{
  if (log_fd >= 0)
    close (log_fd);
  free (recordfile);
  free (failflushfile);
  free (flushwaitfile);
}

static int
recorder_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                 const char *key, const char *value)
{
  if (strcmp (key, "recordfile") == 0) {
    free (recordfile);
    recordfile = nbdkit_absolute_path (value);
    return recordfile ? 0 : -1;
  }
  if (strcmp (key, "recordfailflush") == 0) {
    free (failflushfile);
    failflushfile = nbdkit_absolute_path (value);
    return failflushfile ? 0 : -1;
  }
  if (strcmp (key, "recordflushwait") == 0) {
    free (flushwaitfile);
    flushwaitfile = nbdkit_absolute_path (value);
    return flushwaitfile ? 0 : -1;
  }
  return next (nxdata, key, value);
}

static int
write_all (const struct iovec *iov0, int n)
{
  struct iovec iov[2];
  int i;

  memcpy (iov, iov0, n * sizeof *iov);
  i = 0;
  while (i < n) {
    ssize_t r = writev (log_fd, &iov[i], n - i);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    while (i < n && (size_t) r >= iov[i].iov_len) {
      r -= iov[i].iov_len;
      i++;
    }
    if (i < n) {
      iov[i].iov_base = (char *) iov[i].iov_base + r;
      iov[i].iov_len -= r;
    }
  }
  return 0;
}

static int
recorder_config_complete (nbdkit_next_config_complete *next,
                          nbdkit_backend *nxdata)
{
  unsigned char hdr[16];
  uint32_t v;
  struct iovec iov;

  if (recordfile == NULL) {
    nbdkit_error ("recorder: recordfile=PATH is required");
    return -1;
  }
  log_fd = open (recordfile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log_fd == -1) {
    nbdkit_error ("recorder: open: %s: %m", recordfile);
    return -1;
  }
  memcpy (hdr, "NBDKREC", 8);
  v = htole32 (1);
  memcpy (hdr + 8, &v, 4);
  v = htole32 (REC_HDR);
  memcpy (hdr + 12, &v, 4);
  iov.iov_base = hdr;
  iov.iov_len = sizeof hdr;
  if (write_all (&iov, 1) == -1) {
    nbdkit_error ("recorder: write: %s: %m", recordfile);
    return -1;
  }
  return next (nxdata);
}

#define recorder_config_help \
  "recordfile=<FILE>       (required) Log of writes/zeroes/trims/flushes.\n" \
  "recordfailflush=<FILE>  Flushes fail with EIO while FILE exists.\n" \
  "recordflushwait=<FILE>  A flush first waits while FILE exists."

static uint64_t
tick (void)
{
  return __atomic_add_fetch (&ticks, 1, __ATOMIC_SEQ_CST);
}

static void
put16 (unsigned char *p, uint16_t v) { v = htole16 (v); memcpy (p, &v, 2); }
static void
put32 (unsigned char *p, uint32_t v) { v = htole32 (v); memcpy (p, &v, 4); }
static void
put64 (unsigned char *p, uint64_t v) { v = htole64 (v); memcpy (p, &v, 8); }

/* Append one record.  Returns -1 (and sets *err) if the log cannot be
 * written: the test must not go on with a log that lost a call.
 */
static int
record (int type, uint32_t flags, int call_err, uint64_t start,
        uint64_t offset, uint32_t count, const void *data, int *err)
{
  unsigned char hdr[REC_HDR];
  struct iovec iov[2];
  uint32_t datalen = data ? count : 0;
  int r;

  memset (hdr, 0, sizeof hdr);
  put32 (hdr + 0, REC_MAGIC);
  put16 (hdr + 4, type);
  put32 (hdr + 8, flags);
  put32 (hdr + 12, call_err);
  put64 (hdr + 24, start);
  put64 (hdr + 40, offset);
  put32 (hdr + 48, count);
  put32 (hdr + 52, (uint32_t) syscall (SYS_gettid));
  put64 (hdr + 56, datalen);
  iov[0].iov_base = hdr;
  iov[0].iov_len = sizeof hdr;
  iov[1].iov_base = (void *) data;
  iov[1].iov_len = datalen;

  pthread_mutex_lock (&log_lock);
  if (log_broken)
    r = -1;
  else {
    put64 (hdr + 16, nrecords);
    put64 (hdr + 32, tick ());
    r = write_all (iov, datalen ? 2 : 1);
    if (r == -1) {
      nbdkit_error ("recorder: write: %s: %m", recordfile);
      log_broken = true;
    }
    else
      nrecords++;
  }
  pthread_mutex_unlock (&log_lock);
  if (r == -1)
    *err = EIO;
  return r;
}

static int
recorder_pwrite (nbdkit_next *next, void *handle,
                 const void *buf, uint32_t count, uint64_t offset,
                 uint32_t flags, int *err)
{
  uint64_t start = tick ();
  int r = next->pwrite (next, buf, count, offset, flags, err);

  if (record (REC_WRITE, flags, r == -1 ? *err : 0, start, offset, count,
              buf, err) == -1)
    return -1;
  return r;
}

static int
recorder_zero (nbdkit_next *next, void *handle,
               uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  uint64_t start = tick ();
  int r = next->zero (next, count, offset, flags, err);

  if (record (REC_ZERO, flags, r == -1 ? *err : 0, start, offset, count,
              NULL, err) == -1)
    return -1;
  return r;
}

static int
recorder_trim (nbdkit_next *next, void *handle,
               uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  uint64_t start = tick ();
  int r = next->trim (next, count, offset, flags, err);

  if (record (REC_TRIM, flags, r == -1 ? *err : 0, start, offset, count,
              NULL, err) == -1)
    return -1;
  return r;
}

static int
recorder_flush (nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
  uint64_t start = tick ();
  int r;

  /* A slow flush, to let other requests run while it is in flight. */
  if (flushwaitfile && access (flushwaitfile, F_OK) == 0) {
    /* Say so (PATH.busy), then wait. */
    size_t n = strlen (flushwaitfile) + 6;
    char *busy = malloc (n);
    if (busy) {
      int fd;
      snprintf (busy, n, "%s.busy", flushwaitfile);
      fd = open (busy, O_WRONLY | O_CREAT, 0644);
      if (fd >= 0)
        close (fd);
      free (busy);
    }
    while (access (flushwaitfile, F_OK) == 0)
      usleep (10000);
  }
  if (failflushfile && access (failflushfile, F_OK) == 0) {
    char word[4] = "";
    FILE *fp = fopen (failflushfile, "r");

    nbdkit_debug ("recorder: %s exists: flush fails with EIO",
                  failflushfile);
    /* A file saying "once": this flush fails, and the file goes. */
    if (fp) {
      if (fread (word, 1, sizeof word, fp) == sizeof word &&
          memcmp (word, "once", 4) == 0)
        unlink (failflushfile);
      fclose (fp);
    }
    *err = EIO;
    r = -1;
  }
  else
    r = next->flush (next, flags, err);

  if (record (REC_FLUSH, flags, r == -1 ? *err : 0, start, 0, 0,
              NULL, err) == -1)
    return -1;
  return r;
}

static struct nbdkit_filter filter = {
  .name              = "recorder",
  .longname          = "ext4fs test recorder filter",
  .unload            = recorder_unload,
  .config            = recorder_config,
  .config_complete   = recorder_config_complete,
  .config_help       = recorder_config_help,
  .pwrite            = recorder_pwrite,
  .zero              = recorder_zero,
  .trim              = recorder_trim,
  .flush             = recorder_flush,
};

NBDKIT_REGISTER_FILTER (filter)
