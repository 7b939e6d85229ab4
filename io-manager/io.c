/* ext4fs: the libext2fs io_manager over one shared nbdkit context.
 *
 * Owns: the device table (name -> struct ext4fs_dev), the io_manager
 * vtable, the bounds checks in front of every call into the context,
 * and the errno <-> errcode_t mapping.
 *
 * A device has one or more contexts ("lanes") into the plugin.  All
 * lanes reach the same bytes; more than one is used only where that is
 * safe (the plugin says can_multi_conn, or nothing is ever written:
 * DESIGN.md §8), so any call may go down any lane.  Lane 0 also answers
 * the negotiation questions and takes flushes.  Several lanes let a
 * plugin that keeps a limited number of requests in flight per handle
 * (the nbd plugin: one connection, served by the far server's threads
 * for that connection) or that serializes requests per handle work on
 * several requests at once.
 *
 * Locks: dev_table_lock protects the device table only (taken in
 * ext4fs_dev_new/free and in the io_manager's open).  If a device
 * serializes (final thread model below PARALLEL), a lane's lock is
 * held around each single call into that lane's context; lane locks
 * are the innermost locks of DESIGN.md's lock order, one is held at a
 * time, and nothing is called with one held but the context.  Lanes
 * are added only before the device is used (single-threaded).
 *
 * Every io_manager callback is reentrant: a channel's only mutable
 * field after open is block_size, which libext2fs changes only while
 * it holds the filesystem lock (and never after open, because we
 * implement write_byte, so ext2fs_flush2 never calls set_blksize).
 * The channel is therefore opened with CHANNEL_FLAGS_THREADS.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NO_INLINE_FUNCS /* libext2fs's inline functions are broken */
#include <ext2fs/ext2fs.h>
#include <nbdkit-filter.h>

#include "io.h"

struct lane {
  nbdkit_next *next;
  pthread_mutex_t lock;         /* Protects: calls into next, if serialize */
};

struct ext4fs_dev {
  struct lane lanes[EXT4FS_DEV_MAX_LANES];
  unsigned nlanes;              /* fixed once the device is in use */
  unsigned id;                  /* index in dev_table */
  char name[32];                /* "ext4fs:<id>" */
  uint64_t size;                /* cached get_size */
  int can_write, can_flush, can_fua, can_zero, can_cache, can_trim;
  int serialize;
  uint32_t max_io;              /* largest single request to the plugin */
  struct overlay *overlay;      /* atomic pointer; NULL = none */
  struct overlay *retired;      /* replaced overlays, freed with the device */
  const struct ext4fs_meta_ops *meta;   /* NULL: metadata I/O to the device */
  void *meta_opaque;
  /* Atomic: bytes written or zeroed in all (counted as each write
   * completes), and that count as it was when the last successful
   * flush started (ext4fs_dev_unflushed).
   */
  uint64_t written, flushed;
};

/* An immutable read overlay (ext4fs_dev_set_overlay). */
struct overlay {
  unsigned bits;                /* log2 of the block size */
  size_t n;
  struct ext4fs_overlay_block *v;
  struct overlay *next_retired; /* Protected by overlay_lock */
};
static pthread_mutex_t overlay_lock = PTHREAD_MUTEX_INITIALIZER;

/* Which lane a thread prefers: 1 + a number handed out round-robin at
 * the thread's first call, 0 before that.  Threads stay on their lane,
 * so the threads of one connection spread over the lanes.  (720720 is
 * divisible by every lane count up to 16.)
 */
static __thread unsigned thread_lane;
static unsigned lane_counter;   /* atomic */

#define MAX_DEVS 64
static pthread_mutex_t dev_table_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ext4fs_dev *dev_table[MAX_DEVS]; /* Protected by dev_table_lock */

/* Ask the negotiation questions once, while single-threaded: nbdkit
 * caches the answers in the context without a lock.
 */
static int
warm_context (nbdkit_next *next)
{
  int r = 0;

  if (next->can_write (next) == -1 || next->can_flush (next) == -1 ||
      next->can_fua (next) == -1 || next->can_zero (next) == -1 ||
      next->can_trim (next) == -1 || next->can_cache (next) == -1)
    r = -1;
  (void) next->can_fast_zero (next);
  (void) next->can_extents (next);
  (void) next->can_multi_conn (next);
  (void) next->is_rotational (next);
  return r;
}

struct ext4fs_dev *
ext4fs_dev_new (nbdkit_next *next, int serialize)
{
  struct ext4fs_dev *dev;
  int64_t size;
  unsigned i;

  size = next->get_size (next);
  if (size == -1)
    return NULL;
  if (warm_context (next) == -1)
    return NULL;
  dev = calloc (1, sizeof *dev);
  if (dev == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  dev->lanes[0].next = next;
  pthread_mutex_init (&dev->lanes[0].lock, NULL);
  dev->nlanes = 1;
  dev->size = size;
  dev->can_write = next->can_write (next);
  dev->can_flush = next->can_flush (next);
  dev->can_fua = next->can_fua (next);
  dev->can_zero = next->can_zero (next);
  dev->can_trim = next->can_trim (next);
  dev->can_cache = next->can_cache (next);
  dev->serialize = serialize;
  {
    uint32_t pmin = 0, ppref = 0, pmax = 0;
    dev->max_io = EXT4FS_DEV_MAX_IO;
    if (next->block_size (next, &pmin, &ppref, &pmax) == 0 &&
        pmax > 0 && pmax < dev->max_io)
      dev->max_io = pmax;
  }

  pthread_mutex_lock (&dev_table_lock);
  for (i = 0; i < MAX_DEVS; ++i)
    if (dev_table[i] == NULL)
      break;
  if (i == MAX_DEVS) {
    pthread_mutex_unlock (&dev_table_lock);
    nbdkit_error ("too many open devices");
    pthread_mutex_destroy (&dev->lanes[0].lock);
    free (dev);
    return NULL;
  }
  dev->id = i;
  snprintf (dev->name, sizeof dev->name, "ext4fs:%u", i);
  dev_table[i] = dev;
  pthread_mutex_unlock (&dev_table_lock);
  return dev;
}

int
ext4fs_dev_add_lane (struct ext4fs_dev *dev, nbdkit_next *next)
{
  struct lane *l;
  uint32_t pmin = 0, ppref = 0, pmax = 0;

  if (dev->nlanes >= EXT4FS_DEV_MAX_LANES)
    return -1;
  /* The lane must show the same device as lane 0. */
  if (next->get_size (next) != (int64_t) dev->size ||
      warm_context (next) == -1 ||
      next->can_write (next) != dev->can_write ||
      next->can_flush (next) != dev->can_flush ||
      next->can_fua (next) != dev->can_fua ||
      next->can_zero (next) != dev->can_zero ||
      next->can_trim (next) != dev->can_trim ||
      next->can_cache (next) != dev->can_cache) {
    nbdkit_debug ("%s: another context into the plugin differs from the "
                  "first; not using it", dev->name);
    return -1;
  }
  if (next->block_size (next, &pmin, &ppref, &pmax) == 0 &&
      pmax > 0 && pmax < dev->max_io)
    dev->max_io = pmax;
  l = &dev->lanes[dev->nlanes++];
  l->next = next;
  pthread_mutex_init (&l->lock, NULL);
  return 0;
}

unsigned
ext4fs_dev_nr_lanes (const struct ext4fs_dev *dev)
{
  return dev->nlanes;
}

nbdkit_next *
ext4fs_dev_lane (const struct ext4fs_dev *dev, unsigned i)
{
  return i < dev->nlanes ? dev->lanes[i].next : NULL;
}

void
ext4fs_dev_free (struct ext4fs_dev *dev)
{
  unsigned i;

  if (dev == NULL)
    return;
  pthread_mutex_lock (&dev_table_lock);
  dev_table[dev->id] = NULL;
  pthread_mutex_unlock (&dev_table_lock);
  for (i = 0; i < dev->nlanes; ++i)
    pthread_mutex_destroy (&dev->lanes[i].lock);
  ext4fs_dev_set_overlay (dev, 0, NULL, 0);
  while (dev->retired) {
    struct overlay *o = dev->retired;
    dev->retired = o->next_retired;
    free (o->v);
    free (o);
  }
  free (dev);
}

const char *
ext4fs_dev_name (const struct ext4fs_dev *dev)
{
  return dev->name;
}

uint64_t ext4fs_dev_size (const struct ext4fs_dev *dev) { return dev->size; }
int ext4fs_dev_can_write (const struct ext4fs_dev *dev) { return dev->can_write; }
int ext4fs_dev_can_fua (const struct ext4fs_dev *dev) { return dev->can_fua; }
int ext4fs_dev_can_cache (const struct ext4fs_dev *dev) { return dev->can_cache; }
nbdkit_next *ext4fs_dev_next (const struct ext4fs_dev *dev) { return dev->lanes[0].next; }

/* Is [offset, offset+count) inside the device?  Reports the error. */
static int
check_range (const struct ext4fs_dev *dev, const char *op,
             uint64_t count, uint64_t offset, int *err)
{
  uint64_t end;

  if (__builtin_add_overflow (offset, count, &end) || end > dev->size) {
    nbdkit_error ("%s: %s of %" PRIu64 " bytes at offset %" PRIu64
                  " is beyond the end of the device (%" PRIu64 " bytes): "
                  "the filesystem is corrupt or the image is truncated",
                  dev->name, op, count, offset, dev->size);
    *err = EIO;
    return -1;
  }
  return 0;
}

/* Take a lane for one call into the plugin; lane_put gives it back.
 * Without serialization a lane is just the thread's own.  With it, the
 * thread takes its own lane if free, else any free one, else waits for
 * its own.
 */
static struct lane *
lane_get (struct ext4fs_dev *dev)
{
  unsigned i, k, n = dev->nlanes;
  struct lane *l;

  if (n == 1)
    i = 0;
  else {
    if (thread_lane == 0)
      thread_lane = 1 + __atomic_fetch_add (&lane_counter, 1,
                                            __ATOMIC_RELAXED) % 720720;
    i = (thread_lane - 1) % n;
  }
  l = &dev->lanes[i];
  if (!dev->serialize)
    return l;
  for (k = 0; k < n && n > 1; ++k) {
    struct lane *t = &dev->lanes[(i + k) % n];
    if (pthread_mutex_trylock (&t->lock) == 0)
      return t;
  }
  pthread_mutex_lock (&l->lock);
  return l;
}

static void
lane_put (struct ext4fs_dev *dev, struct lane *l)
{
  if (dev->serialize)
    pthread_mutex_unlock (&l->lock);
}

/* Lane 0, for the calls that must go there (flush, block_size). */
static struct lane *
lane_get_first (struct ext4fs_dev *dev)
{
  struct lane *l = &dev->lanes[0];

  if (dev->serialize)
    pthread_mutex_lock (&l->lock);
  return l;
}

enum dev_op { OP_READ, OP_WRITE, OP_ZERO, OP_CACHE, OP_TRIM, OP_ZERO_TRIM };

/* Send one data call down the lanes, split into pieces of at most
 * max_io bytes.  rbuf is the read buffer, wbuf the write buffer (the
 * other is NULL).  The range has been checked.
 */
static int
split_call (struct ext4fs_dev *dev, enum dev_op op, char *rbuf,
            const char *wbuf, uint64_t count, uint64_t offset,
            uint32_t flags, int *err)
{
  while (count > 0) {
    uint32_t n = count > dev->max_io ? dev->max_io : count;
    struct lane *l = lane_get (dev);
    nbdkit_next *next = l->next;
    int r;

    switch (op) {
    case OP_READ:
      r = next->pread (next, rbuf, n, offset, 0, err);
      rbuf += n;
      break;
    case OP_WRITE:
      r = next->pwrite (next, wbuf, n, offset, flags, err);
      wbuf += n;
      break;
    case OP_ZERO:
      r = next->zero (next, n, offset, 0, err);
      break;
    case OP_TRIM:
      r = next->trim (next, n, offset, 0, err);
      break;
    case OP_ZERO_TRIM:
      r = next->zero (next, n, offset, NBDKIT_FLAG_MAY_TRIM, err);
      break;
    default:
      r = next->cache (next, n, offset, 0, err);
      break;
    }
    lane_put (dev, l);
    if (r == -1)
      return -1;
    offset += n;
    count -= n;
  }
  return 0;
}

int
ext4fs_dev_set_overlay (struct ext4fs_dev *dev, unsigned blockbits,
                        struct ext4fs_overlay_block *v, size_t n)
{
  struct overlay *o = NULL, *old;
  size_t i;

  for (i = 0; i < n; ++i) {
    if ((i > 0 && v[i].home <= v[i - 1].home) ||
        v[i].home > (dev->size >> blockbits) - 1 ||
        v[i].src > (dev->size >> blockbits) - 1) {
      nbdkit_error ("%s: overlay block %zu (%" PRIu64 " -> %" PRIu64 ") is "
                    "out of order or outside the device", dev->name, i,
                    v[i].home, v[i].src);
      free (v);
      return -1;
    }
  }
  if (n > 0) {
    o = calloc (1, sizeof *o);
    if (o == NULL) {
      nbdkit_error ("calloc: %m");
      free (v);
      return -1;
    }
    o->bits = blockbits;
    o->n = n;
    o->v = v;
  }
  else
    free (v);
  pthread_mutex_lock (&overlay_lock);
  old = __atomic_exchange_n (&dev->overlay, o, __ATOMIC_ACQ_REL);
  if (old) {
    old->next_retired = dev->retired;
    dev->retired = old;
  }
  pthread_mutex_unlock (&overlay_lock);
  return 0;
}

size_t
ext4fs_dev_overlay_blocks (const struct ext4fs_dev *dev)
{
  struct overlay *o = __atomic_load_n (&dev->overlay, __ATOMIC_ACQUIRE);

  return o ? o->n : 0;
}

/* The first overlay entry whose home block is >= blk. */
static size_t
overlay_find (const struct overlay *o, uint64_t blk)
{
  size_t lo = 0, hi = o->n;

  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (o->v[mid].home < blk)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

/* A read through the overlay: runs of home blocks straight from the
 * device, replayed blocks from their journal copies.
 */
static int
overlay_read (struct ext4fs_dev *dev, const struct overlay *o, char *buf,
              uint64_t count, uint64_t offset, int *err)
{
  static const unsigned char magic[4] = { 0xC0, 0x3B, 0x39, 0x98 };
  uint64_t bs = UINT64_C (1) << o->bits, end = offset + count;
  size_t i = overlay_find (o, offset >> o->bits);

  while (offset < end) {
    uint64_t hs, boff, n;

    if (i >= o->n || (o->v[i].home << o->bits) >= end)
      return split_call (dev, OP_READ, buf, NULL, end - offset, offset, 0,
                         err);
    hs = o->v[i].home << o->bits;
    if (hs > offset) {
      if (split_call (dev, OP_READ, buf, NULL, hs - offset, offset, 0,
                      err) == -1)
        return -1;
      buf += hs - offset;
      offset = hs;
    }
    boff = offset - hs;
    /* A run of replayed blocks whose copies are contiguous too (a
     * data=journal log) is one read.
     */
    {
      size_t j = i + 1, k;
      uint64_t run_end = hs + bs;
      while (j < o->n && run_end < end &&
             o->v[j].home == o->v[j - 1].home + 1 &&
             o->v[j].src == o->v[j - 1].src + 1) {
        run_end += bs;
        j++;
      }
      if (run_end > end)
        run_end = end;
      n = run_end - offset;
      if (split_call (dev, OP_READ, buf, NULL, n,
                      (o->v[i].src << o->bits) + boff, 0, err) == -1)
        return -1;
      for (k = i; k < j; ++k) {
        uint64_t bstart = (o->v[k].home << o->bits), b;
        if (!o->v[k].escaped)
          continue;
        for (b = 0; b < 4; ++b)
          if (bstart + b >= offset && bstart + b < offset + n)
            buf[bstart + b - offset] = magic[b];
      }
      i = j;
    }
    buf += n;
    offset += n;
  }
  return 0;
}

void
ext4fs_dev_set_meta_ops (struct ext4fs_dev *dev,
                         const struct ext4fs_meta_ops *ops, void *opaque)
{
  dev->meta_opaque = opaque;
  __atomic_store_n (&dev->meta, ops, __ATOMIC_RELEASE);
}

/* The metadata hooks, if set. */
static const struct ext4fs_meta_ops *
meta_ops (struct ext4fs_dev *dev)
{
  return __atomic_load_n (&dev->meta, __ATOMIC_ACQUIRE);
}

/* No writes under an overlay: it would hide them from every read. */
static bool
overlay_refuses (struct ext4fs_dev *dev, const char *op, int *err)
{
  if (__atomic_load_n (&dev->overlay, __ATOMIC_ACQUIRE) == NULL)
    return false;
  nbdkit_error ("%s: %s refused: the journal is replayed into memory only",
                dev->name, op);
  *err = EROFS;
  return true;
}

int
ext4fs_dev_pread (struct ext4fs_dev *dev, void *buf, uint64_t count,
                  uint64_t offset, int *err)
{
  struct overlay *o;

  if (check_range (dev, "read", count, offset, err) == -1)
    return -1;
  o = __atomic_load_n (&dev->overlay, __ATOMIC_ACQUIRE);
  if (o)
    return overlay_read (dev, o, buf, count, offset, err);
  return split_call (dev, OP_READ, buf, NULL, count, offset, 0, err);
}

int
ext4fs_dev_flush (struct ext4fs_dev *dev, int *err)
{
  struct lane *l;
  uint64_t w;
  int r;

  if (dev->can_flush != 1)
    return 0;
  /* One flush covers every lane: several lanes are used for writing
   * only over a plugin that says can_multi_conn, whose flush persists
   * the writes completed on all of its contexts.
   */
  w = __atomic_load_n (&dev->written, __ATOMIC_RELAXED);
  l = lane_get_first (dev);
  r = l->next->flush (l->next, 0, err);
  lane_put (dev, l);
  if (r == 0) {
    uint64_t f = __atomic_load_n (&dev->flushed, __ATOMIC_RELAXED);

    while (f < w &&
           !__atomic_compare_exchange_n (&dev->flushed, &f, w, true,
                                         __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      ;
  }
  return r;
}

uint64_t
ext4fs_dev_unflushed (struct ext4fs_dev *dev)
{
  uint64_t f = __atomic_load_n (&dev->flushed, __ATOMIC_RELAXED);

  return __atomic_load_n (&dev->written, __ATOMIC_RELAXED) - f;
}

int
ext4fs_dev_pwrite (struct ext4fs_dev *dev, const void *buf, uint64_t count,
                   uint64_t offset, uint32_t flags, int *err)
{
  uint32_t down = 0;

  if (dev->can_write != 1) {
    nbdkit_error ("%s: the device is read-only", dev->name);
    *err = EROFS;
    return -1;
  }
  if (check_range (dev, "write", count, offset, err) == -1)
    return -1;
  if (overlay_refuses (dev, "write", err))
    return -1;
  if ((flags & NBDKIT_FLAG_FUA) && dev->can_fua > NBDKIT_FUA_NONE)
    down = NBDKIT_FLAG_FUA;
  if (split_call (dev, OP_WRITE, NULL, buf, count, offset, down, err) == -1)
    return -1;
  __atomic_add_fetch (&dev->written, count, __ATOMIC_RELAXED);
  if ((flags & NBDKIT_FLAG_FUA) && !down)
    return ext4fs_dev_flush (dev, err);
  return 0;
}

int
ext4fs_dev_zero (struct ext4fs_dev *dev, uint64_t count, uint64_t offset,
                 int *err)
{
  static const char zeros[65536];

  if (check_range (dev, "zero", count, offset, err) == -1 ||
      overlay_refuses (dev, "zero", err))
    return -1;
  if (dev->can_zero > NBDKIT_ZERO_NONE) {
    if (split_call (dev, OP_ZERO, NULL, NULL, count, offset, 0, err) == -1)
      return -1;
    __atomic_add_fetch (&dev->written, count, __ATOMIC_RELAXED);
    return 0;
  }
  while (count > 0) {
    uint32_t n = count > sizeof zeros ? sizeof zeros : count;

    if (ext4fs_dev_pwrite (dev, zeros, n, offset, 0, err) == -1)
      return -1;
    offset += n;
    count -= n;
  }
  return 0;
}

int
ext4fs_dev_cache (struct ext4fs_dev *dev, uint64_t count, uint64_t offset,
                  int *err)
{
  if (check_range (dev, "cache", count, offset, err) == -1)
    return -1;
  if (dev->can_cache <= NBDKIT_CACHE_NONE)
    return 0;
  return split_call (dev, OP_CACHE, NULL, NULL, count, offset, 0, err);
}

int
ext4fs_dev_can_discard (const struct ext4fs_dev *dev)
{
  return dev->can_write == 1 &&
    (dev->can_trim == 1 || dev->can_zero > NBDKIT_ZERO_NONE);
}

int
ext4fs_dev_discard (struct ext4fs_dev *dev, uint64_t count, uint64_t offset,
                    int *err)
{
  if (check_range (dev, "discard", count, offset, err) == -1 ||
      overlay_refuses (dev, "discard", err))
    return -1;
  if (dev->can_write != 1)
    return 0;
  if (dev->can_trim == 1)
    return split_call (dev, OP_TRIM, NULL, NULL, count, offset, 0, err);
  if (dev->can_zero > NBDKIT_ZERO_NONE)
    return split_call (dev, OP_ZERO_TRIM, NULL, NULL, count, offset, 0, err);
  return 0;
}

int
ext4fs_dev_block_size (struct ext4fs_dev *dev, uint32_t *minimum,
                       uint32_t *preferred, uint32_t *maximum)
{
  struct lane *l = lane_get_first (dev);
  int r;

  r = l->next->block_size (l->next, minimum, preferred, maximum);
  lane_put (dev, l);
  return r;
}

/*----------------------------------------------------------------------
 * Error mapping.
 */

int
ext4fs_errcode_to_errno (errcode_t e)
{
  if (e > 0 && e < 256)         /* an errno our io_manager passed up */
    return (int) e;
  switch (e) {
  case 0:
    return 0;
  case EXT2_ET_RO_FILSYS:
  case EXT2_ET_FILE_RO:
  case EXT2_ET_RO_UNSUPP_FEATURE:
  case EXT2_ET_RO_BLOCK_ITERATE:
    return EROFS;
  case EXT2_ET_NO_MEMORY:
    return ENOMEM;
  case EXT2_ET_BLOCK_ALLOC_FAIL:
  case EXT2_ET_INODE_ALLOC_FAIL:
  case EXT2_ET_TOOSMALL:
  case EXT2_ET_DIR_NO_SPACE:
  case EXT2_ET_EA_NO_SPACE:
  case EXT2_ET_INLINE_DATA_NO_SPACE:
    return ENOSPC;
  case EXT2_ET_FILE_TOO_BIG:
  case EXT2_ET_EXTENT_NOT_SUPPORTED:
    return EFBIG;
  case EXT2_ET_FILE_NOT_FOUND:
    return ENOENT;
  case EXT2_ET_NO_DIRECTORY:
    return ENOTDIR;
  case EXT2_ET_UNIMPLEMENTED:
  case EXT2_ET_OP_NOT_SUPPORTED:
    return EOPNOTSUPP;
  case EXT2_ET_INVALID_ARGUMENT:
    return EINVAL;
  case EXT2_ET_UNSUPP_FEATURE:
    return ENOTSUP;
  default:
    /* Corruption, checksum errors, short reads and writes, and
     * anything we do not know: the client sees an I/O error.  (EUCLEAN
     * would reach NBD clients as EINVAL.)
     */
    return EIO;
  }
}

errcode_t
ext4fs_errno_to_errcode (int err)
{
  /* libext2fs treats small values as errnos (com_err does too). */
  return err > 0 && err < 256 ? (errcode_t) err : EXT2_ET_SHORT_READ;
}

/*----------------------------------------------------------------------
 * The io_manager.
 */

static struct ext4fs_dev *
chan_dev (io_channel channel)
{
  return channel->private_data;
}

static errcode_t
dev_open (const char *name, int flags, io_channel *channel)
{
  struct ext4fs_dev *dev = NULL;
  io_channel io = NULL;
  unsigned id;
  char c;
  errcode_t e;

  if (name == NULL || sscanf (name, "ext4fs:%u%c", &id, &c) != 1 ||
      id >= MAX_DEVS)
    return EXT2_ET_BAD_DEVICE_NAME;
  pthread_mutex_lock (&dev_table_lock);
  dev = dev_table[id];
  pthread_mutex_unlock (&dev_table_lock);
  if (dev == NULL)
    return EXT2_ET_BAD_DEVICE_NAME;
  if ((flags & IO_FLAG_RW) && dev->can_write != 1)
    return EROFS;

  e = ext2fs_get_memzero (sizeof *io, &io);
  if (e)
    return e;
  e = ext2fs_get_mem (strlen (name) + 1, &io->name);
  if (e) {
    ext2fs_free_mem (&io);
    return e;
  }
  strcpy (io->name, name);
  io->magic = EXT2_ET_MAGIC_IO_CHANNEL;
  io->manager = ext4fs_io_manager;
  io->block_size = 1024;
  io->refcount = 1;
  io->flags = CHANNEL_FLAGS_THREADS;
  io->private_data = dev;
  *channel = io;
  return 0;
}

static errcode_t
dev_close (io_channel channel)
{
  if (--channel->refcount > 0)
    return 0;
  ext2fs_free_mem (&channel->name);
  ext2fs_free_mem (&channel);
  return 0;
}

static errcode_t
dev_set_blksize (io_channel channel, int blksize)
{
  if (blksize <= 0)
    return EXT2_ET_INVALID_ARGUMENT;
  channel->block_size = blksize;
  return 0;
}

/* Turn a (block, count) pair as libext2fs passes it into bytes. */
static errcode_t
blk_range (io_channel channel, unsigned long long block, int count,
           uint64_t *offset, uint64_t *bytes)
{
  uint64_t bs = channel->block_size;

  *bytes = count < 0 ? (uint64_t) -(int64_t) count : (uint64_t) count * bs;
  if (__builtin_mul_overflow ((uint64_t) block, bs, offset))
    return EXT2_ET_LLSEEK_FAILED;
  return 0;
}

/* blk_range, and inside the device. */
static errcode_t
blk_extent (io_channel channel, unsigned long long block, int count,
            bool write, uint64_t *offset, uint64_t *bytes)
{
  struct ext4fs_dev *dev = chan_dev (channel);
  errcode_t e;

  e = blk_range (channel, block, count, offset, bytes);
  if (e)
    return e;
  if (*offset > dev->size || *bytes > dev->size - *offset) {
    nbdkit_error ("%s: filesystem metadata %s of %" PRIu64 " bytes at "
                  "block %llu is beyond the end of the device (%" PRIu64
                  " bytes): truncated image or corrupt filesystem",
                  dev->name, write ? "write" : "read", *bytes, block,
                  dev->size);
    return write ? EXT2_ET_SHORT_WRITE : EXT2_ET_SHORT_READ;
  }
  return 0;
}

/* The test faults (io.h).  Set once before any thread; the counters
 * are atomic.
 */
static unsigned fault_nth[2];           /* [0] reads, [1] writes */
static bool fault_log;
static uint64_t fault_seen[2];

void
ext4fs_io_set_meta_faults (unsigned read_nth, unsigned write_nth, bool log)
{
  fault_nth[0] = read_nth;
  fault_nth[1] = write_nth;
  fault_log = log;
}

static int
meta_fault (bool write, uint64_t bytes, uint64_t offset, int *err)
{
  const char *op = write ? "write" : "read";
  uint64_t k;

  if (fault_nth[write] == 0 && !fault_log)
    return 0;
  k = __atomic_add_fetch (&fault_seen[write], 1, __ATOMIC_RELAXED);
  if (fault_log)
    nbdkit_debug ("ext4fs: metadata %s #%" PRIu64 ": %" PRIu64 " bytes at %"
                  PRIu64, op, k, bytes, offset);
  if (k != fault_nth[write])
    return 0;
  nbdkit_error ("ext4fs: test fault: metadata %s #%" PRIu64 " (%" PRIu64
                " bytes at %" PRIu64 ") fails", op, k, bytes, offset);
  *err = EIO;
  return -1;
}

static errcode_t
dev_read_blk64 (io_channel channel, unsigned long long block, int count,
                void *buf)
{
  struct ext4fs_dev *dev = chan_dev (channel);
  uint64_t offset, bytes;
  errcode_t e;
  int err = 0;

  e = blk_extent (channel, block, count, false, &offset, &bytes);
  if (e)
    return e;
  if (meta_fault (false, bytes, offset, &err) == -1)
    return ext4fs_errno_to_errcode (err);
  if (meta_ops (dev)) {
    if (meta_ops (dev)->read (dev->meta_opaque, buf, bytes, offset, &err) == -1)
      return ext4fs_errno_to_errcode (err);
    return 0;
  }
  if (ext4fs_dev_pread (dev, buf, bytes, offset, &err) == -1)
    return ext4fs_errno_to_errcode (err);
  return 0;
}

/* A metadata write from libext2fs: into the metadata hooks (the
 * journal writer's cache) if set, else to the device.
 */
static errcode_t
meta_write (struct ext4fs_dev *dev, const void *buf, uint64_t bytes,
            uint64_t offset)
{
  int err = 0;

  if (meta_fault (true, bytes, offset, &err) == -1)
    return ext4fs_errno_to_errcode (err);
  if (meta_ops (dev)) {
    if (meta_ops (dev)->write (dev->meta_opaque, buf, bytes, offset,
                               &err) == -1)
      return ext4fs_errno_to_errcode (err);
    return 0;
  }
  if (ext4fs_dev_pwrite (dev, buf, bytes, offset, 0, &err) == -1)
    return ext4fs_errno_to_errcode (err);
  return 0;
}

static errcode_t
dev_write_blk64 (io_channel channel, unsigned long long block, int count,
                 const void *buf)
{
  uint64_t offset, bytes;
  errcode_t e;

  e = blk_extent (channel, block, count, true, &offset, &bytes);
  if (e)
    return e;
  return meta_write (chan_dev (channel), buf, bytes, offset);
}

static errcode_t
dev_write_byte (io_channel channel, unsigned long offset, int size,
                const void *buf)
{
  struct ext4fs_dev *dev = chan_dev (channel);
  int err = 0;

  if (size < 0)
    return EXT2_ET_INVALID_ARGUMENT;
  /* (ext4fs_dev_pwrite checks the range itself.) */
  if (meta_ops (dev) && check_range (dev, "write", size, offset, &err) == -1)
    return ext4fs_errno_to_errcode (err);
  return meta_write (dev, buf, size, offset);
}

static errcode_t
dev_flush (io_channel channel)
{
  int err = 0;

  if (ext4fs_dev_flush (chan_dev (channel), &err) == -1)
    return ext4fs_errno_to_errcode (err);
  return 0;
}

static errcode_t
dev_set_option (io_channel channel, const char *option, const char *arg)
{
  /* ext2fs_rw_bitmaps sets cache=off/on around its threads.  We have
   * no cache, so accept and ignore it.
   */
  if (strcmp (option, "cache") == 0)
    return 0;
  return EXT2_ET_INVALID_ARGUMENT;
}

static errcode_t
dev_zeroout (io_channel channel, unsigned long long block,
             unsigned long long count)
{
  struct ext4fs_dev *dev = chan_dev (channel);
  uint64_t offset, bytes, bs = channel->block_size;
  int err = 0;

  if (__builtin_mul_overflow ((uint64_t) block, bs, &offset) ||
      __builtin_mul_overflow ((uint64_t) count, bs, &bytes))
    return EXT2_ET_INVALID_ARGUMENT;
  if (meta_fault (true, bytes, offset, &err) == -1)
    return ext4fs_errno_to_errcode (err);
  if (meta_ops (dev)) {
    if (check_range (dev, "zero", bytes, offset, &err) == -1 ||
        meta_ops (dev)->zero (dev->meta_opaque, bytes, offset, &err) == -1)
      return ext4fs_errno_to_errcode (err);
    return 0;
  }
  if (ext4fs_dev_zero (dev, bytes, offset, &err) == -1)
    return ext4fs_errno_to_errcode (err);
  return 0;
}

/* Metadata I/O through the io_manager, counted per thread: writes,
 * and failed reads and writes.  libext2fs loses some of its own
 * errors: in 1.47.0 ext2fs_extent_replace and ext2fs_extent_fix_parents
 * ignore the result of writing the changed extent block, and
 * ext2fs_punch ignores a failed ext2fs_extent_goto.  Every libext2fs
 * call is made by one thread holding the fs mutex, so a caller that
 * compares the counts before and after its calls (ext4fs_io_counts)
 * learns of every failure below them, and whether they wrote at all.
 */
static __thread struct ext4fs_io_counts thread_counts;

void
ext4fs_io_counts (struct ext4fs_io_counts *c)
{
  *c = thread_counts;
}

static errcode_t
counted (errcode_t e, bool write)
{
  if (write)
    thread_counts.writes++;
  if (e && write)
    thread_counts.write_failures++;
  else if (e)
    thread_counts.read_failures++;
  return e;
}

static errcode_t
counted_read_blk64 (io_channel channel, unsigned long long block, int count,
                    void *buf)
{
  return counted (dev_read_blk64 (channel, block, count, buf), false);
}

static errcode_t
counted_read_blk (io_channel channel, unsigned long block, int count,
                  void *buf)
{
  return counted_read_blk64 (channel, block, count, buf);
}

static errcode_t
counted_write_blk64 (io_channel channel, unsigned long long block, int count,
                     const void *buf)
{
  return counted (dev_write_blk64 (channel, block, count, buf), true);
}

static errcode_t
counted_write_blk (io_channel channel, unsigned long block, int count,
                   const void *buf)
{
  return counted_write_blk64 (channel, block, count, buf);
}

static errcode_t
counted_write_byte (io_channel channel, unsigned long offset, int size,
                    const void *buf)
{
  return counted (dev_write_byte (channel, offset, size, buf), true);
}

static errcode_t
counted_flush (io_channel channel)
{
  return counted (dev_flush (channel), true);
}

static errcode_t
counted_zeroout (io_channel channel, unsigned long long block,
                 unsigned long long count)
{
  return counted (dev_zeroout (channel, block, count), true);
}

static struct struct_io_manager manager = {
  .magic = EXT2_ET_MAGIC_IO_MANAGER,
  .name = "ext4fs nbdkit I/O manager",
  .open = dev_open,
  .close = dev_close,
  .set_blksize = dev_set_blksize,
  .read_blk = counted_read_blk,
  .write_blk = counted_write_blk,
  .flush = counted_flush,
  .write_byte = counted_write_byte,
  .set_option = dev_set_option,
  .read_blk64 = counted_read_blk64,
  .write_blk64 = counted_write_blk64,
  /* .discard is left unset: libext2fs then reports UNIMPLEMENTED, and
   * nothing we call discards.
   */
  .zeroout = counted_zeroout,
};

io_manager ext4fs_io_manager = &manager;
