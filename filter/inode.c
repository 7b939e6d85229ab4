/* ext4fs: the shared inode table (iget/iput).
 *
 * Owns: the hash table of open inodes, their reference counts, the
 * one in-memory copy of each open inode, the cached block map and its
 * generation, and lazy mtime/ctime.
 *
 * Locks: itable_lock (the inode table lock; below the registry lock,
 * above every inode rwlock) protects the hash chains and reference
 * counts.  It is held while an inode is loaded (which takes fsi->lock
 * inside it) so that two openers of one inode share one object.
 * ip->map_lock serializes building the map of one inode; it is taken
 * with ip->lock held and takes fsi->lock inside.  See DESIGN.md.
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bmap.h"
#include "cleanup.h"
#include "fs.h"
#include "inode.h"

#define NBUCKETS 1024

static pthread_mutex_t itable_lock = PTHREAD_MUTEX_INITIALIZER;
/* Protected by itable_lock: */
static struct ext4fs_inode *buckets[NBUCKETS];

static struct ext4fs_inode **
bucket (ext2_ino_t ino)
{
  return &buckets[(ino * 2654435761u) % NBUCKETS];
}

/* Read inode ino from disk into a new object.  Caller holds
 * itable_lock.
 */
static struct ext4fs_inode *
inode_load (struct ext4fs_fs *fsi, ext2_ino_t ino, int *err)
{
  struct ext4fs_inode *ip;
  errcode_t e;

  if (ino < 1 || ino > fsi->fs->super->s_inodes_count) {
    nbdkit_error ("inode %u is out of range", ino);
    *err = EIO;
    return NULL;
  }
  ip = calloc (1, sizeof *ip);
  if (ip == NULL) {
    *err = errno;
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  ip->ino = ino;
  ip->fsi = fsi;
  ip->refcnt = 1;
  pthread_rwlock_init (&ip->lock, NULL);
  pthread_mutex_init (&ip->map_lock, NULL);
  pthread_mutex_init (&ip->fill_lock, NULL);
  pthread_cond_init (&ip->fill_cv, NULL);

  pthread_mutex_lock (&fsi->lock);
  e = ext2fs_read_inode_full (fsi->fs, ino, (struct ext2_inode *) &ip->raw,
                              sizeof ip->raw);
  if (e == 0 && (ip->raw.i_flags & EXT4_INLINE_DATA_FL)) {
    size_t sz = 0;

    e = ext2fs_inline_data_size (fsi->fs, ino, &sz);
    if (e == 0) {
      ip->inline_buf = calloc (1, sz < EXT4_MIN_INLINE_DATA_SIZE
                               ? EXT4_MIN_INLINE_DATA_SIZE : sz);
      if (ip->inline_buf == NULL)
        e = EXT2_ET_NO_MEMORY;
      else
        e = ext2fs_inline_data_get (fsi->fs, ino,
                                    (struct ext2_inode *) &ip->raw,
                                    ip->inline_buf, &sz);
      ip->inline_len = sz;
    }
  }
  pthread_mutex_unlock (&fsi->lock);
  if (e) {
    nbdkit_error ("reading inode %u: %s", ino, error_message (e));
    *err = ext4fs_errcode_to_errno (e);
    goto fail;
  }
  ip->size = EXT2_I_SIZE (&ip->raw);
  ip->extents = (ip->raw.i_flags & EXT4_EXTENTS_FL) != 0;
  ip->inline_data = (ip->raw.i_flags & EXT4_INLINE_DATA_FL) != 0;
  if (ip->inline_data && ip->inline_len > ip->size)
    ip->inline_len = ip->size;
  return ip;

 fail:
  free (ip->inline_buf);
  pthread_rwlock_destroy (&ip->lock);
  pthread_mutex_destroy (&ip->map_lock);
  pthread_mutex_destroy (&ip->fill_lock);
  pthread_cond_destroy (&ip->fill_cv);
  free (ip);
  return NULL;
}

struct ext4fs_inode *
inode_get (struct ext4fs_fs *fsi, ext2_ino_t ino, int *err)
{
  struct ext4fs_inode **b, *ip;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&itable_lock);

  b = bucket (ino);
  for (ip = *b; ip; ip = ip->hnext) {
    if (ip->ino == ino && ip->fsi == fsi) {
      ip->refcnt++;
      return ip;
    }
  }
  ip = inode_load (fsi, ino, err);
  if (ip == NULL)
    return NULL;
  ip->hnext = *b;
  *b = ip;
  return ip;
}

/* Write pending times of one inode.  Caller holds itable_lock. */
static int
sync_one_locked (struct ext4fs_inode *ip)
{
  int64_t t = __atomic_exchange_n (&ip->dirty_time, 0, __ATOMIC_ACQ_REL);
  int err, r;

  if (t == 0 && !__atomic_load_n (&ip->raw_dirty, __ATOMIC_ACQUIRE))
    return 0;
  /* A metadata change of its own (journaled: no commit needed). */
  if (fs_handle_start (ip->fsi, false, &err) == -1) {
    __atomic_store_n (&ip->dirty_time, t, __ATOMIC_RELEASE);
    return -1;
  }
  pthread_mutex_lock (&ip->fsi->lock);
  if (t) {
    ip->raw.i_mtime = ip->raw.i_ctime = (uint32_t) t;
    if (EXT2_INODE_SIZE (ip->fsi->fs->super) > EXT2_GOOD_OLD_INODE_SIZE &&
        ip->raw.i_extra_isize >= offsetof (struct ext2_inode_large, i_crtime) -
        EXT2_GOOD_OLD_INODE_SIZE) {
      /* Epoch bits above 32 bits, nanoseconds zero. */
      ip->raw.i_mtime_extra = ip->raw.i_ctime_extra =
        (uint32_t) ((t - (int32_t) t) >> 32) & EXT4_EPOCH_MASK;
    }
  }
  /* If this fails, ip->raw (with the times) is written again at the
   * next sync: raw_dirty.
   */
  r = inode_write_locked (ip, &err);
  pthread_mutex_unlock (&ip->fsi->lock);
  fs_handle_stop (ip->fsi, false, false);
  return r;
}

static void
inode_free (struct ext4fs_inode *ip)
{
  if (ip->max_fills > 1)
    nbdkit_debug ("ext4fs: inode %u: up to %u allocating writes filled "
                  "holes at once", ip->ino, ip->max_fills);
  if (ip->nfills_total > 0)
    nbdkit_debug ("ext4fs: inode %u: %lu of %lu fills allocated under the "
                  "shared inode lock", ip->ino, ip->nfills_shared,
                  ip->nfills_total);
  runmap_free (ip->map);
  free (ip->inline_buf);
  pthread_rwlock_destroy (&ip->lock);
  pthread_mutex_destroy (&ip->map_lock);
  pthread_mutex_destroy (&ip->fill_lock);
  pthread_cond_destroy (&ip->fill_cv);
  free (ip);
}

void
inode_put (struct ext4fs_inode *ip)
{
  struct ext4fs_inode **pp;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&itable_lock);

  assert (ip->refcnt > 0);
  if (--ip->refcnt > 0)
    return;
  sync_one_locked (ip);
  /* On a filesystem marked broken, keep the inode and its map until
   * the filesystem is closed (inode_forget_all): loading it again
   * would read a tree that a half-made change may have left other than
   * what this process served, or unreadable, and a client that
   * reconnects would read other bytes.
   */
  if (__atomic_load_n (&ip->fsi->broken, __ATOMIC_RELAXED))
    return;
  for (pp = bucket (ip->ino); *pp; pp = &(*pp)->hnext) {
    if (*pp == ip) {
      *pp = ip->hnext;
      break;
    }
  }
  inode_free (ip);
}

void
inode_forget_all (struct ext4fs_fs *fsi)
{
  struct ext4fs_inode **pp, *ip;
  size_t i;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&itable_lock);

  for (i = 0; i < NBUCKETS; ++i) {
    for (pp = &buckets[i]; (ip = *pp) != NULL; ) {
      if (ip->fsi == fsi && ip->refcnt == 0) {
        *pp = ip->hnext;
        inode_free (ip);
      }
      else
        pp = &ip->hnext;
    }
  }
}

/* -D ext4fs.verify_map=1: compare m with the whole map built from
 * disk by libext2fs's extent reader; abort on a difference (tests).
 * Not on a broken filesystem: a failed request may have left the tree
 * half changed on disk, and the map is what is known good.
 */
static void
verify_map (struct ext4fs_inode *ip, const struct ext4fs_map *m,
            const char *what)
{
  struct ext4fs_map *disk;
  int err;

  if (__atomic_load_n (&ip->fsi->broken, __ATOMIC_RELAXED))
    return;
  pthread_mutex_lock (&ip->fsi->lock);
  disk = bmap_build_full_locked (ip, &err);
  pthread_mutex_unlock (&ip->fsi->lock);
  /* (A map that cannot be read now, a read error below, proves
   * nothing.)
   */
  if (disk && !bmap_map_check (m, disk)) {
    nbdkit_error ("inode %u: the map %s (%zu runs, %zu spans) differs "
                  "from the map on disk (%zu runs)", ip->ino, what, m->n,
                  m->partial ? m->ncov : 1, disk->n);
    abort ();
  }
  runmap_free (disk);
}

const struct ext4fs_map *
inode_map (struct ext4fs_inode *ip, int *err)
{
  struct ext4fs_map *map;

  map = __atomic_load_n (&ip->map, __ATOMIC_ACQUIRE);
  if (map)
    return map;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&ip->map_lock);
  map = ip->map;
  if (map)
    return map;
  pthread_mutex_lock (&ip->fsi->lock);
  map = bmap_build_locked (ip, err);
  pthread_mutex_unlock (&ip->fsi->lock);
  if (map == NULL)
    return NULL;
  __atomic_store_n (&ip->map, map, __ATOMIC_RELEASE);
  return map;
}

const struct ext4fs_map *
inode_map_range (struct ext4fs_inode *ip, uint64_t b0, uint64_t *b1,
                 unsigned maxload, bool excl, int *err)
{
  const struct ext4fs_map *map = inode_map (ip, err);
  struct ext4fs_map *m;
  uint64_t gap, gap_end;
  unsigned loads = 0;
  bool was_reset = false;

  if (map == NULL)
    return NULL;
  if (!map->partial)
    return map;
  if (!excl || map->n <= bmap_map_budget ()) {
    if (runmap_covered (map, b0, *b1, &gap, &gap_end))
      return map;
    if (maxload && gap > b0) {
      *b1 = gap;                /* what is there now is enough */
      return map;
    }
    if (!excl) {
      *err = 0;                 /* the caller takes ip->lock exclusive */
      return NULL;
    }
  }
  /* ip->lock exclusive: nobody else is using the map. */
  m = ip->map;
  if (m->n > bmap_map_budget () && b0 < *b1) {
    /* Cut back to what this request needs: the runs of [b0, *b1), and
     * the runs that cross its ends, whole.
     */
    uint64_t lo = b0, hi = *b1, hole_end;
    const struct ext4fs_run *r;
    size_t before = m->n;

    r = bmap_lookup (m, b0, &hole_end);
    if (r)
      lo = r->lblk;
    r = bmap_lookup (m, *b1 - 1, &hole_end);
    if (r)
      hi = r->lblk + r->len;
    if (runmap_keep (m, lo, hi) == 0)
      nbdkit_debug ("ext4fs: inode %u: map cut from %zu to %zu runs",
                    ip->ino, before, m->n);
  }
  while (!runmap_covered (m, b0, *b1, &gap, &gap_end)) {
    int r;

    if (maxload && loads >= maxload && gap > b0) {
      *b1 = gap;
      break;
    }
    pthread_mutex_lock (&ip->fsi->lock);
    r = bmap_load_locked (ip, m, gap, &was_reset, err);
    pthread_mutex_unlock (&ip->fsi->lock);
    if (r == -1)
      return NULL;
    loads++;
  }
  if (loads && ext4fs_debug_verify_map)
    verify_map (ip, m, "loaded");
  return m;
}

void
inode_map_changed (struct ext4fs_inode *ip)
{
  struct ext4fs_map *old;

  /* We hold ip->lock exclusive: nobody else is using the map. */
  old = __atomic_exchange_n (&ip->map, NULL, __ATOMIC_ACQ_REL);
  runmap_free (old);
}

void
inode_map_forget (struct ext4fs_inode *ip, uint64_t b0, uint64_t b1)
{
  struct ext4fs_map *m = ip->map;   /* ip->lock exclusive: no reader */

  if (m == NULL)
    return;
  /* A partial map forgets only the range (loaded again from the tree
   * when a request needs it): the mapping outside did not change.
   */
  if (!m->partial || runmap_uncover (m, b0, b1) == -1) {
    inode_map_changed (ip);
    return;
  }
  if (ext4fs_debug_verify_map)
    verify_map (ip, m, "after a range was forgotten");
}

void
inode_map_update (struct ext4fs_inode *ip, const struct ext4fs_run *changes,
                  size_t n)
{
  struct ext4fs_map *m = ip->map;   /* ip->lock exclusive: no reader */
  size_t i;

  if (m == NULL)
    return;                     /* nothing cached: built when needed */
  for (i = 0; i < n; ++i) {
    uint64_t a = changes[i].lblk, b = a + changes[i].len, gap, gap_end;

    /* A partial map knows only the runs inside its coverage: a change
     * outside it is in the tree, where a later load finds it.  (A
     * change made while the map was cut back, by a fill that wrote
     * its data without the inode lock.)  One that is half covered:
     * the map is dropped, and built again when needed.
     */
    if (!runmap_covered (m, a, b, &gap, &gap_end)) {
      if (gap == a && gap_end >= b)
        continue;
      __atomic_store_n (&ip->map, m, __ATOMIC_RELEASE);
      inode_map_changed (ip);   /* frees m */
      return;
    }
    if (bmap_map_set (&m, changes[i].lblk, changes[i].len,
                      changes[i].pblk) == -1) {
      __atomic_store_n (&ip->map, m, __ATOMIC_RELEASE);
      inode_map_changed (ip);   /* frees m */
      return;
    }
  }
  /* (Not on a broken filesystem: a failed request may have left the
   * tree half changed on disk, and the map is what is known good.)
   */
  if (ext4fs_debug_verify_map)
    verify_map (ip, m, "updated in memory");
  __atomic_store_n (&ip->map, m, __ATOMIC_RELEASE);
}

/* Holes being filled (struct ext4fs_inode, fills[]). */
static bool
fill_busy_locked (const struct ext4fs_inode *ip, uint64_t a, uint64_t b)
{
  unsigned i;

  for (i = 0; i < ip->nfills; ++i)
    if (ip->fills[i].a < b && a < ip->fills[i].b)
      return true;
  return false;
}

/* Is a block of [a, b) being filled?  Then -1.  Else, if want, register
 * [a, b) as being filled: 1, or 0 if there is no room (the caller then
 * fills under the inode lock instead); 0 if not want.  Caller holds
 * ip->lock, either mode (fill_lock orders two that hold it shared).
 */
int
inode_fill_try (struct ext4fs_inode *ip, uint64_t a, uint64_t b, bool want)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&ip->fill_lock);

  if (fill_busy_locked (ip, a, b))
    return -1;
  if (!want || ip->nfills == INODE_MAX_FILLS)
    return 0;
  ip->fills[ip->nfills++] = (struct runmap_span) { .a = a, .b = b };
  ip->nfills_total++;
  if (ip->nfills > ip->max_fills)
    ip->max_fills = ip->nfills;
  return 1;
}

/* Wait until no block of [a, b) is being filled.  Caller holds no
 * inode lock (the fills end under it).
 */
void
inode_fill_wait (struct ext4fs_inode *ip, uint64_t a, uint64_t b)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&ip->fill_lock);
  while (fill_busy_locked (ip, a, b))
    pthread_cond_wait (&ip->fill_cv, &ip->fill_lock);
}

/* [a, b), registered by inode_fill_try, is filled (or given up). */
void
inode_fill_end (struct ext4fs_inode *ip, uint64_t a, uint64_t b)
{
  unsigned i;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&ip->fill_lock);

  for (i = 0; i < ip->nfills; ++i) {
    if (ip->fills[i].a == a && ip->fills[i].b == b) {
      ip->fills[i] = ip->fills[--ip->nfills];
      pthread_cond_broadcast (&ip->fill_cv);
      return;
    }
  }
  assert (false);
}

int
inode_write_locked (struct ext4fs_inode *ip, int *err)
{
  errcode_t e;

  if (ip->fsi->broken) {
    /* Metadata may be half changed in memory: write no more of it. */
    nbdkit_error ("inode %u: not written: the filesystem was marked as "
                  "having errors", ip->ino);
    *err = EIO;
    return -1;
  }
  e = ext2fs_write_inode_full (ip->fsi->fs, ip->ino,
                               (struct ext2_inode *) &ip->raw,
                               sizeof ip->raw);
  if (e) {
    nbdkit_error ("writing inode %u: %s", ip->ino, error_message (e));
    *err = ext4fs_errcode_to_errno (e);
    __atomic_store_n (&ip->raw_dirty, true, __ATOMIC_RELEASE);
    fs_meta_write_failed_locked (ip->fsi, "writing an inode");
    return -1;
  }
  __atomic_store_n (&ip->raw_dirty, false, __ATOMIC_RELEASE);
  return 0;
}

void
inode_touch (struct ext4fs_inode *ip)
{
  int64_t now = time (NULL);

  if (__atomic_load_n (&ip->dirty_time, __ATOMIC_RELAXED) != now)
    __atomic_store_n (&ip->dirty_time, now, __ATOMIC_RELEASE);
}

int
inode_sync_times (struct ext4fs_fs *fsi)
{
  struct ext4fs_inode *ip;
  size_t i;
  int r = 0;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&itable_lock);

  for (i = 0; i < NBUCKETS; ++i)
    for (ip = buckets[i]; ip; ip = ip->hnext)
      if (ip->fsi == fsi && sync_one_locked (ip) == -1)
        r = -1;
  return r;
}
