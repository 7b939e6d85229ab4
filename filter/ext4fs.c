/* ext4fs: an nbdkit filter that serves files inside an ext2/ext3/ext4
 * filesystem, to many clients at once, in parallel.
 *
 * This file holds only the nbdkit callbacks and the registration
 * table: each callback validates and dispatches.  Every callback is
 * decided explicitly: ext4fs never calls next() in .open (all I/O
 * goes through the shared contexts, see io-manager/), so any callback
 * left out would be sent to a NULL context and crash nbdkit, or, for
 * .extents, report the image's map instead of the file's.
 *
 * Per-connection state (struct handle) is immutable after .open.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>

#include <nbdkit-filter.h>

#include "exports.h"
#include "fs.h"
#include "inode.h"
#include "rw.h"

/* -D ext4fs.writeback=1: log each metadata writeback (fs.c). */
NBDKIT_DLL_PUBLIC int ext4fs_debug_writeback;
/* -D ext4fs.verify_map=1: check every in-memory map update against
 * the map built from disk; abort on a difference (inode.c, tests).
 */
NBDKIT_DLL_PUBLIC int ext4fs_debug_verify_map;
/* -D ext4fs.serial_fill=1: allocating writes hold the inode lock
 * through their data writes, as before fills overlapped (rw.c; for
 * benchmarks and tests).
 */
NBDKIT_DLL_PUBLIC int ext4fs_debug_serial_fill;
/* -D ext4fs.flush_ahead_mib=N: a commit flushes first when N MiB or
 * more were written since the last flush (0: never; default 8).
 */
NBDKIT_DLL_PUBLIC int ext4fs_debug_flush_ahead_mib = -1;
/* -D ext4fs.journal=0: metadata changes are not journaled (the old
 * "not clean" marking instead).
 */
NBDKIT_DLL_PUBLIC int ext4fs_debug_journal = 1;
/* -D ext4fs.journal_stats=1: commit and cache counters at close. */
NBDKIT_DLL_PUBLIC int ext4fs_debug_journal_stats;
/* -D ext4fs.checkpoint_first=1: every commit checkpoints the log
 * first, as one that would not fit does (tests).
 */
NBDKIT_DLL_PUBLIC int ext4fs_debug_checkpoint_first;
/* -D ext4fs.async_commit=0: a commit writes its log with every lock
 * held, as before requests could go on beside it (benchmarks).
 */
NBDKIT_DLL_PUBLIC int ext4fs_debug_async_commit = 1;
/* -D ext4fs.chain_commit=0: every commit block gets its own flush
 * (FUA), as before commit blocks were flushed with the next
 * transaction's log (benchmarks).
 */
NBDKIT_DLL_PUBLIC int ext4fs_debug_chain_commit = 1;
/* -D ext4fs.max_runs=N: a partial block map is cut back past N runs
 * instead of 1 Mi (bmap.c; tests).
 */
NBDKIT_DLL_PUBLIC int ext4fs_debug_max_runs;
/* -D ext4fs.icache_slots=N: the read-only extent index node cache has
 * N slots instead of 512 (bmap.c; tests: 1 evicts all the time).
 */
NBDKIT_DLL_PUBLIC int ext4fs_debug_icache_slots;
/* -D ext4fs.fail_meta_read=N, -D ext4fs.fail_meta_write=N,
 * -D ext4fs.count_meta=1: test faults in libext2fs's metadata I/O
 * (io.h: ext4fs_io_set_meta_faults).
 */
NBDKIT_DLL_PUBLIC int ext4fs_debug_fail_meta_read;
NBDKIT_DLL_PUBLIC int ext4fs_debug_fail_meta_write;
NBDKIT_DLL_PUBLIC int ext4fs_debug_count_meta;

static const char *ext4file;    /* absolute path, or NULL in exportname mode */
static bool exportname_mode;
static const char *ext4root;    /* exportname mode only */
static int final_thread_model = NBDKIT_THREAD_MODEL_PARALLEL;
static unsigned ext4contexts = 1;  /* contexts into the plugin, at most */
static bool ext4discard = true;    /* pass freed blocks down as trims */
static bool ext4discardfree;       /* discard all free space at open */

struct handle {
  struct ext4fs_fs *fsi;
  struct ext4fs_inode *ip;
  char *path;
  bool can_write;
  /* Written to since its last successful flush (atomic; set when a
   * write, zero or trim returns, so that one racing a flush sets it
   * after the flush cleared it): only then
   * does .finalize commit.  A finalize runs on a connection that is
   * closing, where a plugin or filter below may refuse I/O (the delay
   * filter's sleeps end); a commit there that writes other clients'
   * changes (a chained commit's staged commit block, say) would abort
   * the journal under them for nothing.  Their changes are committed
   * by their own flushes, the commit timer or the close of the
   * filesystem.
   */
  bool dirty;
};

/* On every write: a load first, so that the connection's threads do
 * not write the same cache line each time.
 */
static inline void
mark_dirty (struct handle *h)
{
  if (!__atomic_load_n (&h->dirty, __ATOMIC_RELAXED))
    __atomic_store_n (&h->dirty, true, __ATOMIC_RELEASE);
}

static void
ext4fs_load (void)
{
  /* So that error_message() names libext2fs errors. */
  initialize_ext2_error_table ();
}

static int
ext4fs_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
               const char *key, const char *value)
{
  /* ext2file= is the stock ext2 filter's name for it: a command line
   * moved over with only the filter name changed still works (else
   * the key would reach the plugin, which would not know it).
   */
  if (strcmp (key, "ext4file") == 0 || strcmp (key, "ext2file") == 0) {
    if (ext4file || exportname_mode) {
      nbdkit_error ("ext4file= (or ext2file=) must be given only once");
      return -1;
    }
    if (strcmp (value, "exportname") == 0)
      exportname_mode = true;
    else
      ext4file = value;
    return 0;
  }
  if (strcmp (key, "ext4root") == 0) {
    ext4root = value;
    return 0;
  }
  /* The nbd plugin's dynamic-export=true passes each client's export
   * name to the far server, which needs a client connection at open:
   * our contexts are opened outside any (in nbdkit 1.32.5 the plugin
   * then fails an assertion and nbdkit aborts).  Say so instead.
   */
  if (strcmp (key, "dynamic-export") == 0 &&
      nbdkit_parse_bool (value) == 1) {
    nbdkit_error ("dynamic-export=%s cannot be used under ext4fs: the "
                  "filter opens the plugin once for all clients, outside "
                  "any client connection; use export=NAME to choose the "
                  "far server's export", value);
    return -1;
  }
  if (strcmp (key, "ext4discard") == 0 || strcmp (key, "ext4discardfree") == 0) {
    int b = nbdkit_parse_bool (value);
    if (b == -1)
      return -1;
    if (key[11] == '\0')
      ext4discard = b;
    else
      ext4discardfree = b;
    return 0;
  }
  if (strcmp (key, "ext4contexts") == 0) {
    if (nbdkit_parse_unsigned ("ext4contexts", value, &ext4contexts) == -1)
      return -1;
    if (ext4contexts < 1 || ext4contexts > EXT4FS_DEV_MAX_LANES) {
      nbdkit_error ("ext4contexts=%s: must be between 1 and %d",
                    value, EXT4FS_DEV_MAX_LANES);
      return -1;
    }
    return 0;
  }
  return next (nxdata, key, value);
}

static int
ext4fs_config_complete (nbdkit_next_config_complete *next,
                        nbdkit_backend *nxdata)
{
  if (ext4file == NULL && !exportname_mode) {
    nbdkit_error ("ext4file parameter missing: give ext4file=/path/in/fs "
                  "(the file inside the filesystem to serve) or "
                  "ext4file=exportname");
    return -1;
  }
  if (ext4file && ext4file[0] != '/') {
    nbdkit_error ("ext4file=%s: the path must be absolute (start with '/'), "
                  "from the root of the filesystem", ext4file);
    return -1;
  }
  if (ext4root) {
    if (!exportname_mode) {
      nbdkit_error ("ext4root= only makes sense with ext4file=exportname");
      return -1;
    }
    if (ext4root[0] != '/') {
      nbdkit_error ("ext4root=%s: the path must be absolute", ext4root);
      return -1;
    }
  }
  return next (nxdata);
}

#define ext4fs_config_help \
  "ext4file=<PATH>        (required) Absolute path of the file to serve\n" \
  "                       inside the filesystem, or 'exportname' to take\n" \
  "                       the path from the client's export name.\n" \
  "ext2file=...           The same as ext4file= (the stock ext2 filter's\n" \
  "                       name for it).\n" \
  "ext4root=<DIR>         With ext4file=exportname, serve only files\n" \
  "                       under this directory.\n" \
  "ext4contexts=<N>       Open up to N contexts (connections) into the\n" \
  "                       plugin and spread requests over them (default 1).\n" \
  "ext4discard=false      Do not trim blocks freed inside the filesystem\n" \
  "                       in the plugin (default: trim them, once the\n" \
  "                       journal commit that freed them is durable).\n" \
  "ext4discardfree=true   Trim all free space in the plugin when the\n" \
  "                       filesystem is opened for writing (default false)."

/* Fully parallel: libext2fs calls are serialized by our fs mutex and
 * data I/O takes per-inode locks (DESIGN.md).
 */
static int
ext4fs_thread_model (void)
{
  return NBDKIT_THREAD_MODEL_PARALLEL;
}

static int
ext4fs_get_ready (int thread_model)
{
  /* A serializing plugin or filter underneath: our shared context is
   * called from many connections at once, so serialize the calls.
   */
  final_thread_model = thread_model;
  if (thread_model < NBDKIT_THREAD_MODEL_PARALLEL)
    nbdkit_debug ("ext4fs: final thread model %d is below parallel: "
                  "serializing calls into the plugin", thread_model);
  return 0;
}

/* Are we the server of "nbdkit --run CMD"?  Then our parent is nbdkit
 * too (the same executable), with --run on its command line, and runs
 * CMD while it waits for us.
 */
static bool
captive (void)
{
  char self[4096], parent[4096], path[64];
  ssize_t n1, n2;
  pid_t ppid = getppid ();
  FILE *fp;
  bool run = false;

  snprintf (path, sizeof path, "/proc/%d/exe", (int) ppid);
  n1 = readlink ("/proc/self/exe", self, sizeof self - 1);
  n2 = readlink (path, parent, sizeof parent - 1);
  if (n1 <= 0 || n1 != n2 || memcmp (self, parent, n1) != 0)
    return false;
  snprintf (path, sizeof path, "/proc/%d/cmdline", (int) ppid);
  fp = fopen (path, "r");
  if (fp == NULL)
    return false;
  for (;;) {
    char arg[8];
    size_t i = 0;
    int c;

    while ((c = getc (fp)) != EOF && c != '\0')
      if (i < sizeof arg - 1)
        arg[i++] = c;
    arg[i] = '\0';
    if (strcmp (arg, "--run") == 0 || strncmp (arg, "--run=", 6) == 0)
      run = true;
    if (c == EOF)
      break;
  }
  fclose (fp);
  return run;
}

/* nbdkit exits when .after_fork fails, but with --run its parent
 * holds the listening sockets open while CMD runs: CMD's connections
 * would wait in the backlog for ever (an image that is not a
 * filesystem hung "nbdkit --run 'nbdcopy ...'").  Shut the listening
 * sockets down (the parent shares them) so that they refuse at once.
 * Not outside --run: a socket that systemd passed us must survive.
 */
static void
refuse_captive_clients (void)
{
  int fd, n = 0;

  if (!captive ())
    return;
  for (fd = 0; fd < 1024; ++fd) {
    int v = 0;
    socklen_t len = sizeof v;

    if (getsockopt (fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &len) == 0 && v &&
        shutdown (fd, SHUT_RDWR) == 0)
      n++;
  }
  nbdkit_debug ("ext4fs: start-up failed under --run: %d listening "
                "socket(s) shut down", n);
}

static int
ext4fs_after_fork (nbdkit_backend *backend)
{
  struct ext4fs_fs *fsi;
  int r = 0, err;
  ext2_ino_t ino;

  /* Validate now, read-only (we do not know about -r yet), so that a
   * bad image or a bad fixed ext4file= stops nbdkit with a message.
   */
  fs_set_discard (ext4discard, ext4discardfree);
  if (fs_startup (backend, final_thread_model, ext4contexts) == -1) {
    refuse_captive_clients ();
    return -1;
  }
  fsi = fs_get (1);
  if (fsi == NULL) {
    refuse_captive_clients ();
    return -1;
  }
  if (export_set_root (fsi, ext4root) == -1)
    r = -1;
  else if (ext4file && export_resolve (fsi, ext4file, 0, &ino, &err) == -1)
    r = -1;
  fs_put (fsi);
  if (r == -1)
    refuse_captive_clients ();
  return r;
}

static void
ext4fs_cleanup (nbdkit_backend *backend)
{
  fs_shutdown ();
}

static int
ext4fs_list_exports (nbdkit_next_list_exports *next, nbdkit_backend *nxdata,
                     int readonly, int is_tls,
                     struct nbdkit_exports *exports)
{
  struct ext4fs_fs *fsi;
  int r;

  if (!exportname_mode) {
    char note[sizeof fsi->note];

    fs_startup_note (note, sizeof note);
    if (note[0] && strlen (ext4file) + strlen (note) < 3000)
      return nbdkit_add_export (exports, "",
                                nbdkit_printf_intern ("%s; %s", ext4file,
                                                      note));
    return nbdkit_add_export (exports, "", ext4file);
  }
  /* A writable client lists what it cannot open, too: if the
   * filesystem cannot be opened read-write, the read-only instance
   * lists the exports, each with the reason in its description.
   */
  fsi = fs_get (readonly);
  if (fsi == NULL && !readonly)
    fsi = fs_get (1);
  if (fsi == NULL)
    return -1;
  r = export_list (fsi, exports);
  fs_put (fsi);
  return r;
}

static const char *
ext4fs_default_export (nbdkit_next_default_export *next,
                       nbdkit_backend *nxdata, int readonly, int is_tls)
{
  /* In exportname mode there is no default file: .open explains. */
  return "";
}

static void *
ext4fs_open (nbdkit_next_open *next, nbdkit_context *nxdata,
             int readonly, const char *exportname, int is_tls)
{
  struct handle *h;
  const char *path = exportname_mode ? exportname : ext4file;
  ext2_ino_t ino;
  int err;
  uint32_t fl;

  /* We do not call next: all I/O goes through the shared contexts. */
  h = calloc (1, sizeof *h);
  if (h == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  /* For messages and the export description only: escaped. */
  h->path = export_display_name (path ? path : "");
  if (h->path == NULL) {
    nbdkit_error ("malloc: %m");
    goto err0;
  }
  h->fsi = fs_get (readonly);
  if (h->fsi == NULL)
    goto err0;
  if (export_resolve (h->fsi, path, exportname_mode, &ino, &err) == -1)
    goto err1;
  h->ip = inode_get (h->fsi, ino, &err);
  if (h->ip == NULL)
    goto err1;

  fl = h->ip->raw.i_flags;
  if (fl & EXT4_ENCRYPT_FL) {
    nbdkit_error ("%s: the file is encrypted; its contents cannot be served",
                  h->path);
    goto err2;
  }
  h->can_write = !readonly && h->fsi->rw;
  if (h->can_write) {
    const char *why = NULL;

    if (fl & EXT2_IMMUTABLE_FL)
      why = "the file is immutable";
    else if (fl & EXT2_APPEND_FL)
      why = "the file is append-only";
    else if (fl & EXT4_VERITY_FL)
      why = "the file has fs-verity";
    else if (fl & EXT4_INLINE_DATA_FL)
      why = "the file's data is inline in its inode, which ext4fs "
        "does not write";
    else if ((fl & EXT4_EXTENTS_FL) && h->ip->size > 0 &&
             ((h->ip->size - 1) >> h->fsi->blockbits) >= (UINT64_C (1) << 32))
      why = "the file's size is beyond what extents can map (corrupt "
        "inode?)";
    if (why) {
      nbdkit_debug ("ext4fs: %s: %s: serving it read-only", h->path, why);
      fprintf (stderr, "nbdkit: ext4fs: %s: %s: serving it read-only\n",
               h->path, why);
      h->can_write = false;
    }
  }
  return h;

 err2:
  inode_put (h->ip);
 err1:
  fs_put (h->fsi);
 err0:
  free (h->path);
  free (h);
  return NULL;
}

static int
ext4fs_prepare (nbdkit_next *next, void *handle, int readonly)
{
  return 0;
}

static int
ext4fs_finalize (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;
  int err;

  /* nbdkit skips .close at shutdown but always runs .finalize: commit
   * what this connection left dirty here, on the commit timer's
   * thread where there is a journal (this connection's thread may not
   * be able to do I/O any more: see dirty above).
   */
  if (h->can_write && __atomic_load_n (&h->dirty, __ATOMIC_SEQ_CST) &&
      fs_sync_soon (h->fsi, &err) == -1)
    return -1;
  return 0;
}

static void
ext4fs_close (void *handle)
{
  struct handle *h = handle;

  inode_put (h->ip);
  fs_put (h->fsi);
  free (h->path);
  free (h);
}

static int64_t
ext4fs_get_size (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;
  return h->ip->size;
}

static const char *
ext4fs_export_description (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;

  /* (NBD strings are at most 4096 bytes: a long path goes without
   * the note.)
   */
  bool with_note = h->fsi->note[0] &&
    strlen (h->path) + strlen (h->fsi->note) < 3000;

  return nbdkit_printf_intern ("%s: %" PRIu64 " bytes, inode %u, in an "
                               "ext2/3/4 filesystem%s%s", h->path,
                               h->ip->size, h->ip->ino,
                               with_note ? "; " : "",
                               with_note ? h->fsi->note : "");
}

static int
ext4fs_block_size (nbdkit_next *next, void *handle, uint32_t *minimum,
                   uint32_t *preferred, uint32_t *maximum)
{
  struct handle *h = handle;
  uint32_t pmin = 0, ppref = 0, pmax = 0;

  if (ext4fs_dev_block_size (h->fsi->dev, &pmin, &ppref, &pmax) == -1)
    return -1;
  *minimum = 1;
  *preferred = h->fsi->blocksize;
  *maximum = 32 * 1024 * 1024;
  /* A plugin that states a smaller maximum request limits ours (0/0/0
   * means no constraint).
   */
  if (pmax > 0 && pmax < *maximum)
    *maximum = pmax;
  /* preferred must be a power of two between 512 and maximum. */
  while (*preferred > *maximum && *preferred > 512)
    *preferred >>= 1;
  if (*maximum < *preferred)
    *maximum = *preferred;
  return 0;
}

static int
ext4fs_can_write (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;
  return h->can_write;
}

static int
ext4fs_can_flush (nbdkit_next *next, void *handle)
{
  return 1;
}

static int
ext4fs_is_rotational (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;
  nbdkit_next *bg = ext4fs_dev_next (h->fsi->dev);
  int r = bg->is_rotational (bg); /* cached at device creation */
  return r == -1 ? 0 : r;
}

static int
ext4fs_can_trim (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;
  return h->can_write;
}

static int
ext4fs_can_zero (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;
  return h->can_write ? NBDKIT_ZERO_NATIVE : NBDKIT_ZERO_NONE;
}

static int
ext4fs_can_fast_zero (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;
  return h->can_write;
}

static int
ext4fs_can_extents (nbdkit_next *next, void *handle)
{
  /* Always: from the file's own map, never the plugin's. */
  return 1;
}

static int
ext4fs_can_fua (nbdkit_next *next, void *handle)
{
  return NBDKIT_FUA_NATIVE;     /* handled in rw.c */
}

static int
ext4fs_can_multi_conn (nbdkit_next *next, void *handle)
{
  /* One filesystem, one inode object per file, one context: a flush on
   * any connection covers writes completed on every connection.
   */
  return 1;
}

static int
ext4fs_can_cache (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;
  return ext4fs_dev_can_cache (h->fsi->dev) == NBDKIT_CACHE_NATIVE
    ? NBDKIT_CACHE_NATIVE : NBDKIT_CACHE_EMULATE;
}

static int
ext4fs_pread (nbdkit_next *next, void *handle, void *buf, uint32_t count,
              uint64_t offset, uint32_t flags, int *err)
{
  struct handle *h = handle;
  return rw_pread (h->ip, buf, count, offset, err);
}

static int
ext4fs_pwrite (nbdkit_next *next, void *handle, const void *buf,
               uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  struct handle *h = handle;
  int r = rw_pwrite (h->ip, buf, count, offset, flags, err);

  mark_dirty (h);
  return r;
}

static int
ext4fs_flush (nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
  struct handle *h = handle;

  /* Cleared before the sync: a write that comes in meanwhile sets it
   * again.
   */
  __atomic_store_n (&h->dirty, false, __ATOMIC_SEQ_CST);
  if (fs_sync (h->fsi, err) == -1) {
    __atomic_store_n (&h->dirty, true, __ATOMIC_SEQ_CST);
    return -1;
  }
  return 0;
}

static int
ext4fs_trim (nbdkit_next *next, void *handle, uint32_t count,
             uint64_t offset, uint32_t flags, int *err)
{
  struct handle *h = handle;
  int r = rw_trim (h->ip, count, offset, flags, err);

  mark_dirty (h);
  return r;
}

static int
ext4fs_zero (nbdkit_next *next, void *handle, uint32_t count,
             uint64_t offset, uint32_t flags, int *err)
{
  struct handle *h = handle;
  int r = rw_zero (h->ip, count, offset, flags, err);

  mark_dirty (h);
  return r;
}

static int
ext4fs_extents (nbdkit_next *next, void *handle, uint32_t count,
                uint64_t offset, uint32_t flags,
                struct nbdkit_extents *extents, int *err)
{
  struct handle *h = handle;
  return rw_extents (h->ip, count, offset, flags, extents, err);
}

static int
ext4fs_cache (nbdkit_next *next, void *handle, uint32_t count,
              uint64_t offset, uint32_t flags, int *err)
{
  struct handle *h = handle;
  return rw_cache (h->ip, count, offset, err);
}

static struct nbdkit_filter filter = {
  .name               = "ext4fs",
  .longname           = "nbdkit ext2/ext3/ext4 parallel filter",
  .load               = ext4fs_load,
  .config             = ext4fs_config,
  .config_complete    = ext4fs_config_complete,
  .config_help        = ext4fs_config_help,
  .thread_model       = ext4fs_thread_model,
  .get_ready          = ext4fs_get_ready,
  .after_fork         = ext4fs_after_fork,
  .cleanup            = ext4fs_cleanup,
  .list_exports       = ext4fs_list_exports,
  .default_export     = ext4fs_default_export,
  .open               = ext4fs_open,
  .prepare            = ext4fs_prepare,
  .finalize           = ext4fs_finalize,
  .close              = ext4fs_close,
  .get_size           = ext4fs_get_size,
  .export_description = ext4fs_export_description,
  .block_size         = ext4fs_block_size,
  .can_write          = ext4fs_can_write,
  .can_flush          = ext4fs_can_flush,
  .is_rotational      = ext4fs_is_rotational,
  .can_trim           = ext4fs_can_trim,
  .can_zero           = ext4fs_can_zero,
  .can_fast_zero      = ext4fs_can_fast_zero,
  .can_extents        = ext4fs_can_extents,
  .can_fua            = ext4fs_can_fua,
  .can_multi_conn     = ext4fs_can_multi_conn,
  .can_cache          = ext4fs_can_cache,
  .pread              = ext4fs_pread,
  .pwrite             = ext4fs_pwrite,
  .flush              = ext4fs_flush,
  .trim               = ext4fs_trim,
  .zero               = ext4fs_zero,
  .extents            = ext4fs_extents,
  .cache              = ext4fs_cache,
};

NBDKIT_REGISTER_FILTER (filter)
