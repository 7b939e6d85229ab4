/* A test-only nbdkit filter: fail any data call that overlaps another
 * where the plugin's thread model says that cannot happen.
 *
 * ext4fs calls the plugin below it from its own threads, which nbdkit
 * does not serialize: below SERIALIZE_REQUESTS ext4fs must itself take
 * one call at a time per context (its lane locks), and below
 * SERIALIZE_ALL_REQUESTS one at a time across all contexts.  The file
 * plugin under it would happily take overlapping calls, so without
 * this filter a broken lane lock goes unnoticed.  Sit it below ext4fs
 * and the serializing layer (--filter=ext4fs --filter=noparallel
 * --filter=THIS file ...) and say what must hold:
 *
 *   overlap=requests      no two calls at once on one context
 *   overlap=all-requests  no two calls at once at all
 *
 * An overlapping call fails with EIO and an error "overlap: ..." in
 * the log, so the test sees both a failed request and the reason.
 * Each call also sleeps 200 microseconds while it is counted, so that
 * calls that could overlap do.
 *
 * Locks: none; atomic counters (per handle and global).
 */

#include <config.h>

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nbdkit-filter.h>

static int mode;                /* 0 per context, 1 all */
static unsigned global_inflight;
static unsigned long overlaps;

struct handle { unsigned inflight; };

static int
overlap_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                const char *key, const char *value)
{
  if (strcmp (key, "overlap") == 0) {
    if (strcmp (value, "requests") == 0)
      mode = 0;
    else if (strcmp (value, "all-requests") == 0)
      mode = 1;
    else {
      nbdkit_error ("overlap: unknown mode '%s'", value);
      return -1;
    }
    return 0;
  }
  return next (nxdata, key, value);
}

static void *
overlap_open (nbdkit_next_open *next, nbdkit_context *nxdata,
              int readonly, const char *exportname, int is_tls)
{
  struct handle *h;

  if (next (nxdata, readonly, exportname) == -1)
    return NULL;
  h = calloc (1, sizeof *h);
  if (h == NULL)
    nbdkit_error ("calloc: %m");
  return h;
}

static void
overlap_close (void *handle)
{
  free (handle);
}

static void
overlap_unload (void)
{
  if (overlaps)
    nbdkit_debug ("overlap: %lu overlapping calls", overlaps);
}

/* Enter a call: -1 (err set) if it overlaps another that it must not. */
static int
enter (struct handle *h, const char *what, int *err)
{
  unsigned mine = __atomic_add_fetch (&h->inflight, 1, __ATOMIC_SEQ_CST);
  unsigned all = __atomic_add_fetch (&global_inflight, 1, __ATOMIC_SEQ_CST);
  struct timespec ts = { 0, 200000 };

  if (mine > 1 || (mode == 1 && all > 1)) {
    __atomic_add_fetch (&overlaps, 1, __ATOMIC_SEQ_CST);
    nbdkit_error ("overlap: %s while %u other call(s) were in the plugin "
                  "(%s)", what, mode == 1 ? all - 1 : mine - 1,
                  mode == 1 ? "all requests must be serialized" :
                  "requests on one context must be serialized");
    *err = EIO;
    return -1;
  }
  nanosleep (&ts, NULL);
  return 0;
}

static void
leave (struct handle *h)
{
  __atomic_sub_fetch (&h->inflight, 1, __ATOMIC_SEQ_CST);
  __atomic_sub_fetch (&global_inflight, 1, __ATOMIC_SEQ_CST);
}

#define CALL(what, call)                        \
  int r = -1;                                   \
  if (enter (handle, what, err) == 0)           \
    r = (call);                                 \
  leave (handle);                               \
  return r

static int
overlap_pread (nbdkit_next *next, void *handle, void *buf, uint32_t count,
               uint64_t offset, uint32_t flags, int *err)
{
  CALL ("pread", next->pread (next, buf, count, offset, flags, err));
}

static int
overlap_pwrite (nbdkit_next *next, void *handle, const void *buf,
                uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  CALL ("pwrite", next->pwrite (next, buf, count, offset, flags, err));
}

static int
overlap_zero (nbdkit_next *next, void *handle, uint32_t count,
              uint64_t offset, uint32_t flags, int *err)
{
  CALL ("zero", next->zero (next, count, offset, flags, err));
}

static int
overlap_trim (nbdkit_next *next, void *handle, uint32_t count,
              uint64_t offset, uint32_t flags, int *err)
{
  CALL ("trim", next->trim (next, count, offset, flags, err));
}

static int
overlap_flush (nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
  CALL ("flush", next->flush (next, flags, err));
}

static int
overlap_cache (nbdkit_next *next, void *handle, uint32_t count,
               uint64_t offset, uint32_t flags, int *err)
{
  CALL ("cache", next->cache (next, count, offset, flags, err));
}

static int
overlap_extents (nbdkit_next *next, void *handle, uint32_t count,
                 uint64_t offset, uint32_t flags, struct nbdkit_extents *e,
                 int *err)
{
  CALL ("extents", next->extents (next, count, offset, flags, e, err));
}

static struct nbdkit_filter filter = {
  .name              = "overlap",
  .longname          = "ext4fs test filter: fail overlapping calls",
  .config            = overlap_config,
  .open              = overlap_open,
  .close             = overlap_close,
  .unload            = overlap_unload,
  .pread             = overlap_pread,
  .pwrite            = overlap_pwrite,
  .zero              = overlap_zero,
  .trim              = overlap_trim,
  .flush             = overlap_flush,
  .cache             = overlap_cache,
  .extents           = overlap_extents,
};

NBDKIT_REGISTER_FILTER (filter)
