/* ext4fs: the I/O paths.
 *
 * Owns: mapping a request's byte range to physical runs (one segment at
 * a time, with the walker in bmap.h) and doing the data I/O straight
 * through the shared contexts (no ext2_file_t, no shared position, no
 * single-block buffer); read-modify-write of
 * partial blocks; allocation into holes and conversion of unwritten
 * extents; zero, trim, block status and cache.
 *
 * Locks (order in DESIGN.md):
 * - Reads, and writes whose blocks are all mapped and written
 *   ("overwrites"), hold ip->lock shared: they run in parallel with
 *   each other, for one file and across files.  No fs lock is held
 *   during their data I/O.
 * - A partial-block write holds the stripe rwlock of its physical
 *   block exclusive around the read-modify-write, so two such writes
 *   to one block never lose each other's bytes; a whole-block write
 *   holds the stripes of its regions shared.
 * - Trim and zero that change the block map (punch, written ->
 *   unwritten) hold ip->lock exclusive, as allocation does.
 * - A write that touches a hole or an unwritten extent takes ip->lock
 *   exclusive (after dropping the shared lock, then mapping again),
 *   then a handle of the metadata writer (fs_handle_start: the
 *   journal's handle lock shared, for the whole request), and
 *   fsi->lock only around each libext2fs call (allocation, extent
 *   insert, conversion), never across data I/O.
 *
 * Crash safety of allocation: new blocks are marked in use in memory,
 * their full contents (data, and zeros where the write does not cover
 * them) are written, and only then are they linked into the file as
 * written extents.  A crash in between leaves at worst blocks marked
 * in use that no file references; no file ever references a block
 * holding stale data of a deleted file.  Unwritten extents are
 * converted only after their blocks' contents are written; remainders
 * of up to ZEROOUT_BYTES on either side are zeroed and converted too,
 * as the kernel does, so the extent tree does not fragment.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common/vector.h"
#include "bmap.h"
#include "cleanup.h"
#include "rw.h"

#define ZEROOUT_BYTES (32 * 1024)

/* Leaves of the extent tree a block status or cache request may load
 * (then it answers for less than it was asked).
 */
#define MAXLOAD_STATUS 16

/* Stripe locks, by 2 MiB region of the device.  A partial-block
 * read-modify-write holds its block's stripe exclusive; an in-place
 * write of whole blocks holds the stripes of its regions shared (taken
 * in ascending stripe order, each once).  So two partial writes to one
 * block never lose each other's bytes, and a partial write never undoes
 * a concurrent whole-block write of the same block, while whole-block
 * writes run in parallel.  Regions keep the number of locks one request
 * holds small (a 64 MiB request: at most 33; ThreadSanitizer allows 64
 * per thread).
 */
#define NSTRIPES 256
#define REGION_SHIFT 21
static pthread_rwlock_t stripes[NSTRIPES] = {
  [0 ... NSTRIPES - 1] = PTHREAD_RWLOCK_INITIALIZER
};

static unsigned
stripe_of (uint64_t byte_offset)
{
  return ((byte_offset >> REGION_SHIFT) * 0x9E3779B97F4A7C15ull) >> 56;
}

struct stripe_set {
  uint64_t bits[NSTRIPES / 64];
};

/* Lock, shared, the stripes of device bytes [offset, offset+len). */
static void
stripes_lock_shared (uint64_t offset, uint64_t len, struct stripe_set *set)
{
  uint64_t r, first = offset >> REGION_SHIFT;
  uint64_t last = (offset + len - 1) >> REGION_SHIFT;
  unsigned s;

  memset (set, 0, sizeof *set);
  for (r = first; r <= last && r - first < NSTRIPES; ++r) {
    s = stripe_of (r << REGION_SHIFT);
    set->bits[s / 64] |= UINT64_C (1) << (s % 64);
  }
  for (s = 0; s < NSTRIPES; ++s)
    if (set->bits[s / 64] & (UINT64_C (1) << (s % 64)))
      pthread_rwlock_rdlock (&stripes[s]);
}

static void
stripes_unlock (const struct stripe_set *set)
{
  unsigned s;

  for (s = 0; s < NSTRIPES; ++s)
    if (set->bits[s / 64] & (UINT64_C (1) << (s % 64)))
      pthread_rwlock_unlock (&stripes[s]);
}

static uint64_t
min64 (uint64_t a, uint64_t b)
{
  return a < b ? a : b;
}

/* The logical blocks [*b0, *b1) that bytes [offset, offset+count)
 * touch (empty if count is 0).
 */
static void
blocks_of (const struct ext4fs_fs *fsi, uint64_t offset, uint64_t count,
           uint64_t *b0, uint64_t *b1)
{
  *b0 = offset >> fsi->blockbits;
  *b1 = count ? ((offset + count - 1) >> fsi->blockbits) + 1 : *b0;
}

/* Take ip->lock for I/O through the map of blocks [b0, *b1) (maxload:
 * inode_map_range): shared, or exclusive for this request if the map
 * had to load part of the extent tree first (once per leaf; taking it
 * shared again could find the map cut back meanwhile).  Returns the
 * map with *held locked, or NULL with no lock held.
 */
static const struct ext4fs_map *
map_rdlock (struct ext4fs_inode *ip, uint64_t b0, uint64_t *b1,
            unsigned maxload, pthread_rwlock_t **held, int *err)
{
  const struct ext4fs_map *map;

  pthread_rwlock_rdlock (&ip->lock);
  map = inode_map_range (ip, b0, b1, maxload, false, err);
  if (map == NULL) {
    pthread_rwlock_unlock (&ip->lock);
    if (*err != 0)
      return NULL;
    pthread_rwlock_wrlock (&ip->lock);
    map = inode_map_range (ip, b0, b1, maxload, true, err);
    if (map == NULL) {
      pthread_rwlock_unlock (&ip->lock);
      return NULL;
    }
  }
  *held = &ip->lock;
  return map;
}

/* Read through a map.  Caller holds ip->lock (either mode). */
static int
read_mapped (struct ext4fs_inode *ip, const struct ext4fs_map *map,
             char *buf, uint64_t count, uint64_t offset, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  struct bmap_walk w;
  struct bmap_seg s;

  bmap_walk_bytes (&w, map, fsi->blockbits, offset, count);
  while (bmap_walk_next (&w, &s)) {
    char *p = buf + (s.off - offset);

    if (!bmap_seg_written (&s))
      memset (p, 0, s.len);
    else if (ext4fs_dev_pread (fsi->dev, p, s.len, bmap_seg_pos (&w, &s),
                               err) == -1)
      return -1;
  }
  return 0;
}

int
rw_pread (struct ext4fs_inode *ip, void *buf, uint32_t count,
          uint64_t offset, int *err)
{
  CLEANUP_RWUNLOCK pthread_rwlock_t *held = NULL;
  const struct ext4fs_map *map;
  uint64_t b0, b1;

  if (ip->inline_data) {
    /* Inline data is read once at open and never changes. */
    uint64_t avail = offset < ip->inline_len ? ip->inline_len - offset : 0;
    uint64_t n = min64 (avail, count);
    if (n)
      memcpy (buf, ip->inline_buf + offset, n);
    memset ((char *) buf + n, 0, count - n);
    return 0;
  }

  blocks_of (ip->fsi, offset, count, &b0, &b1);
  map = map_rdlock (ip, b0, &b1, 0, &held, err);
  if (map == NULL)
    return -1;
  return read_mapped (ip, map, buf, count, offset, err);
}

/* Is any block of [b0, b1) of the kind asked for? */
enum seg_kind { SEG_WRITTEN, SEG_NOT_WRITTEN, SEG_MAPPED };

static bool
any_seg (const struct ext4fs_map *map, unsigned bits, uint64_t b0,
         uint64_t b1, enum seg_kind kind)
{
  struct bmap_walk w;
  struct bmap_seg s;

  bmap_walk_blocks (&w, map, bits, b0, b1);
  while (bmap_walk_next (&w, &s)) {
    bool hit = kind == SEG_WRITTEN ? bmap_seg_written (&s)
      : kind == SEG_NOT_WRITTEN ? !bmap_seg_written (&s)
      : s.run != NULL;
    if (hit)
      return true;
  }
  return false;
}

/* Write part of one written block by read-modify-write. */
static int
rmw_block (struct ext4fs_inode *ip, uint64_t pblk, uint32_t boff,
           const char *data, uint32_t n, uint32_t flags, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  CLEANUP_FREE char *blk = malloc (fsi->blocksize);
  uint64_t pos = pblk << fsi->blockbits;

  if (blk == NULL) {
    *err = errno;
    nbdkit_error ("malloc: %m");
    return -1;
  }
  ACQUIRE_WRLOCK_FOR_CURRENT_SCOPE (&stripes[stripe_of (pos)]);
  if (ext4fs_dev_pread (fsi->dev, blk, fsi->blocksize, pos, err) == -1)
    return -1;
  memcpy (blk + boff, data, n);
  return ext4fs_dev_pwrite (fsi->dev, blk, fsi->blocksize, pos, flags, err);
}

/* Write [offset, offset+count) into blocks that are mapped and
 * written.  Caller holds ip->lock (either mode).
 */
static int
write_mapped (struct ext4fs_inode *ip, const struct ext4fs_map *map,
              const char *buf, uint64_t count, uint64_t offset,
              uint32_t flags, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  unsigned bits = fsi->blockbits;
  uint32_t bmask = fsi->blocksize - 1;
  struct bmap_walk w;
  struct bmap_seg s;

  bmap_walk_bytes (&w, map, bits, offset, count);
  while (bmap_walk_next (&w, &s)) {
    const char *p = buf + (s.off - offset);
    uint64_t pos, left = s.len, n;

    if (!bmap_seg_written (&s)) {
      nbdkit_error ("inode %u: internal error: write to unmapped block",
                    ip->ino);
      *err = EIO;
      return -1;
    }
    for (pos = bmap_seg_pos (&w, &s); left > 0; p += n, pos += n, left -= n) {
      if ((pos & bmask) || left < fsi->blocksize) {
        /* Partial block. */
        n = min64 (left, fsi->blocksize - (pos & bmask));
        if (rmw_block (ip, pos >> bits, pos & bmask, p, n, flags, err) == -1)
          return -1;
      }
      else {
        /* Whole blocks, up to the end of the run. */
        struct stripe_set set;
        int ret;

        n = left & ~(uint64_t) bmask;
        stripes_lock_shared (pos, n, &set);
        ret = ext4fs_dev_pwrite (fsi->dev, p, n, pos, flags, err);
        stripes_unlock (&set);
        if (ret == -1)
          return -1;
      }
    }
  }
  return 0;
}

/* Give physical blocks [pblk, pblk+nblk), which will hold logical
 * blocks [lblk, lblk+nblk), their full new contents: the part of the
 * request [offset, offset+count) that falls in them, zeros elsewhere.
 * The blocks are not yet readable by anyone (not mapped, or unwritten
 * with ip->lock held exclusive).
 */
static int
write_fresh (struct ext4fs_inode *ip, uint64_t pblk, uint64_t lblk,
             uint64_t nblk, const char *buf, uint64_t count, uint64_t offset,
             int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  unsigned bits = fsi->blockbits;
  uint64_t start = lblk << bits, end = (lblk + nblk) << bits;
  uint64_t wstart = offset > start ? offset : start;
  uint64_t wend = min64 (offset + count, end);
  CLEANUP_FREE char *edge = NULL;

  /* Zeros before the data (whole blocks and the head of the first). */
  if (wstart >= wend) {
    return ext4fs_dev_zero (fsi->dev, end - start, pblk << bits, err);
  }
  while (start < end) {
    uint64_t bend = start + fsi->blocksize;
    uint64_t pos = (pblk + ((start >> bits) - lblk)) << bits;

    if (bend <= wstart || start >= wend) {
      /* Blocks with no data: zero them, as a run. */
      uint64_t zend = bend <= wstart ? (wstart >> bits) << bits : end;
      if (ext4fs_dev_zero (fsi->dev, zend - start, pos, err) == -1)
        return -1;
      start = zend;
    }
    else if (start >= wstart && bend <= wend) {
      /* Blocks fully covered by data: write them as a run. */
      uint64_t dend = (wend >> bits) << bits;
      if (ext4fs_dev_pwrite (fsi->dev, buf + (start - offset), dend - start,
                             pos, 0, err) == -1)
        return -1;
      start = dend;
    }
    else {
      /* An edge block: zeros around part of the data. */
      uint64_t ds = wstart > start ? wstart : start;
      uint64_t de = min64 (wend, bend);
      if (edge == NULL && (edge = malloc (fsi->blocksize)) == NULL) {
        *err = errno;
        nbdkit_error ("malloc: %m");
        return -1;
      }
      memset (edge, 0, fsi->blocksize);
      memcpy (edge + (ds - start), buf + (ds - offset), de - ds);
      if (ext4fs_dev_pwrite (fsi->dev, edge, fsi->blocksize, pos, 0, err) == -1)
        return -1;
      start = bend;
    }
  }
  return 0;
}

/* The map changes one allocating request made, in order, to apply to
 * the cached map at the end (inode_map_update).  If one cannot be
 * recorded, the map is rebuilt from disk instead.
 */
DEFINE_VECTOR_TYPE (run_vector, struct ext4fs_run);

struct changes {
  run_vector runs;
  bool lost;
};

static void
note_change (struct changes *c, uint64_t lblk, uint64_t len, uint64_t pblk)
{
  if (c->lost)
    return;
  if (len > UINT32_MAX) {
    c->lost = true;
    return;
  }
  if (run_vector_append (&c->runs, (struct ext4fs_run) {
        .lblk = lblk, .pblk = pblk, .len = len }) == -1)
    c->lost = true;
}

/* Fill the hole [s, e) (logical blocks) with newly allocated blocks
 * holding the request's data.  Caller holds ip->lock exclusive.
 */
static int
fill_hole (struct ext4fs_inode *ip, const struct ext4fs_map *map,
           uint64_t s, uint64_t e, const char *buf, uint64_t count,
           uint64_t offset, struct changes *ch, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  uint64_t goal = 0;             /* after the first allocation: pblk + n > 0 */

  while (s < e) {
    uint64_t pblk, mapped, reserved;
    int64_t n;
    int r;

    pthread_mutex_lock (&fsi->lock);
    if (goal == 0)
      goal = bmap_goal_locked (ip, map, s);
    n = bmap_alloc_locked (ip, s, goal, e - s, &pblk, &reserved, err);
    pthread_mutex_unlock (&fsi->lock);
    if (n == -1)
      return -1;
    if (write_fresh (ip, pblk, s, n, buf, count, offset, err) == -1) {
      pthread_mutex_lock (&fsi->lock);
      bmap_free_locked (fsi, pblk, n);
      bmap_release_locked (fsi, reserved);
      pthread_mutex_unlock (&fsi->lock);
      return -1;
    }
    pthread_mutex_lock (&fsi->lock);
    r = bmap_insert_locked (ip, s, pblk, n, reserved, &mapped, err);
    bmap_release_locked (fsi, reserved);
    pthread_mutex_unlock (&fsi->lock);
    /* What the tree has (or, broken, may have) is in the map too: the
     * blocks hold the new data, and the map then agrees with the tree.
     */
    if (mapped > 0)
      note_change (ch, s, mapped, pblk);
    if (r == -1)
      return -1;
    s += n;
    goal = pblk + n;
  }
  return 0;
}

/* Write the request's data into the unwritten blocks [s, e) of run r
 * and convert them, with small remainders of r, to written.  Caller
 * holds ip->lock exclusive.
 */
static int
fill_unwritten (struct ext4fs_inode *ip, const struct ext4fs_run *r,
                uint64_t s, uint64_t e, const char *buf, uint64_t count,
                uint64_t offset, struct changes *ch, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  uint64_t zblocks = ZEROOUT_BYTES >> fsi->blockbits;
  uint64_t cs = s, ce = e;
  bool converted;
  int ret;

  if (s - r->lblk <= zblocks)
    cs = r->lblk;
  if (r->lblk + r->len - e <= zblocks)
    ce = r->lblk + r->len;
  if (write_fresh (ip, r->pblk + (cs - r->lblk), cs, ce - cs,
                   buf, count, offset, err) == -1)
    return -1;
  pthread_mutex_lock (&fsi->lock);
  ret = bmap_convert_locked (ip, cs, ce - cs, false, &converted, err);
  pthread_mutex_unlock (&fsi->lock);
  if (converted)
    note_change (ch, cs, ce - cs, r->pblk + (cs - r->lblk));
  return ret;
}

/* Is there room for all the blocks the request [b, bend) will
 * allocate, data and metadata (tree nodes, indirect blocks), counted
 * for the worst case, on the filesystem and in the file's i_blocks?
 * If not, fail with ENOSPC or EFBIG before anything changes, rather
 * than half way (each allocation checks again: concurrent requests on
 * other files may take space meanwhile).
 */
static int
check_room (struct ext4fs_inode *ip, const struct ext4fs_map *map,
            uint64_t b, uint64_t bend, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  uint64_t data = 0, meta = 0, avail;
  struct bmap_walk w;
  struct bmap_seg s;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fsi->lock);
  bmap_walk_blocks (&w, map, fsi->blockbits, b, bend);
  while (bmap_walk_next (&w, &s)) {
    if (s.run == NULL && s.end > bmap_map_limit (ip)) {
      nbdkit_error ("inode %u: logical block %" PRIu64 " is beyond what "
                    "this file can map (%" PRIu64 " blocks)", ip->ino,
                    s.end - 1, bmap_map_limit (ip));
      *err = EFBIG;
      return -1;
    }
    if (s.run == NULL) {
      data += s.end - s.lblk;
      meta += bmap_meta_need_locked (ip, s.lblk, s.end - s.lblk);
    }
    else if (s.run->unwritten) {
      /* Split (as fill_unwritten will: small remainders are zeroed
       * and converted too).
       */
      uint64_t zb = ZEROOUT_BYTES >> fsi->blockbits;
      bool left = s.lblk - s.run->lblk > zb;
      bool right = s.run->lblk + s.run->len - s.end > zb;

      if (left || right)
        meta += bmap_meta_need_locked (ip, s.lblk, 1);
    }
  }
  if (data + meta == 0)
    return 0;
  if (bmap_iblk_room_locked (ip, data + meta, err) == -1)
    return -1;
  avail = bmap_available_locked (fsi);
  if (data + meta > avail) {
    nbdkit_error ("no space left on the filesystem: the write needs up to "
                  "%" PRIu64 " blocks (%" PRIu64 " of them for the file's "
                  "metadata), %" PRIu64 " are available", data + meta, meta,
                  avail);
    *err = ENOSPC;
    return -1;
  }
  return 0;
}

/* The general write: some blocks need allocation or conversion.
 * Caller holds ip->lock exclusive.
 */
static int
write_allocating (struct ext4fs_inode *ip, const struct ext4fs_map *map,
                  const char *buf, uint64_t count, uint64_t offset,
                  struct changes *ch, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  unsigned bits = fsi->blockbits;
  uint64_t b = offset >> bits;
  uint64_t bend = ((offset + count - 1) >> bits) + 1;
  struct bmap_walk w;
  struct bmap_seg s;

  if (ip->inline_data) {
    nbdkit_error ("inode %u: writing to inline-data files is not supported",
                  ip->ino);
    *err = EROFS;
    return -1;
  }
  if (check_room (ip, map, b, bend, err) == -1)
    return -1;
  bmap_walk_bytes (&w, map, bits, offset, count);
  while (bmap_walk_next (&w, &s)) {
    int r;

    if (s.run == NULL)
      r = fill_hole (ip, map, s.lblk, s.end, buf, count, offset, ch, err);
    else if (s.run->unwritten)
      r = fill_unwritten (ip, s.run, s.lblk, s.end, buf, count, offset,
                          ch, err);
    else
      r = write_mapped (ip, map, buf + (s.off - offset), s.len, s.off, 0,
                        err);
    if (r == -1)
      return -1;
  }
  return 0;
}

/* A piece of a hole being filled with the data of a request that
 * writes with no inode lock held: blocks [lblk, lblk+n) get the
 * newly allocated [pblk, pblk+n), with reserved blocks promised for
 * the tree.
 */
struct piece {
  uint64_t lblk, pblk, n, reserved;
};
DEFINE_VECTOR_TYPE (piece_vector, struct piece);

/* Allocate all of the hole [b0, b1) (caller holds ip->lock, either
 * mode: what this changes is under fsi->lock, and has registered the
 * fill).  On failure nothing stays allocated.
 */
static int
alloc_pieces (struct ext4fs_inode *ip, const struct ext4fs_map *map,
              uint64_t b0, uint64_t b1, piece_vector *pieces, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  uint64_t s = b0, goal;

  if (check_room (ip, map, b0, b1, err) == -1)
    return -1;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fsi->lock);
  goal = bmap_goal_locked (ip, map, b0);
  while (s < b1) {
    uint64_t pblk, reserved;
    int64_t n = bmap_alloc_locked (ip, s, goal, b1 - s, &pblk, &reserved,
                                   err);

    if (n >= 0 && piece_vector_append (pieces, (struct piece) {
          .lblk = s, .pblk = pblk, .n = n, .reserved = reserved }) == -1) {
      *err = errno;
      nbdkit_error ("realloc: %m");
      bmap_free_locked (fsi, pblk, n);
      bmap_release_locked (fsi, reserved);
      n = -1;
    }
    if (n == -1) {
      for (size_t i = 0; i < pieces->len; ++i) {
        bmap_free_locked (fsi, pieces->ptr[i].pblk, pieces->ptr[i].n);
        bmap_release_locked (fsi, pieces->ptr[i].reserved);
      }
      pieces->len = 0;
      return -1;
    }
    s += n;
    goal = pblk + n;
  }
  return 0;
}

/* Put the pieces in the tree, in order, or (ok false, or after the
 * first that fails) free them.  Caller holds ip->lock exclusive.
 */
static int
insert_pieces (struct ext4fs_inode *ip, const piece_vector *pieces, bool ok,
               struct changes *ch, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  size_t i;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fsi->lock);

  for (i = 0; i < pieces->len; ++i) {
    const struct piece *p = &pieces->ptr[i];
    uint64_t mapped;

    if (!ok) {
      bmap_free_locked (fsi, p->pblk, p->n);
      bmap_release_locked (fsi, p->reserved);
      continue;
    }
    ok = bmap_insert_locked (ip, p->lblk, p->pblk, p->n, p->reserved,
                             &mapped, err) == 0;
    bmap_release_locked (fsi, p->reserved);
    if (mapped > 0)
      note_change (ch, p->lblk, mapped, p->pblk);
  }
  return ok ? 0 : -1;
}

/* May the request [b0, b1) fill its blocks with no inode lock held
 * (write_alloc_handle)?  All of them must be a hole of an extent file
 * (a fill inserts extents; indirect files map their new blocks through
 * ext2fs_bmap2, block by block, under ip->lock exclusive: fill_hole),
 * and its map partial (every map of a file with blocks is).
 */
static bool
fill_wanted (const struct ext4fs_inode *ip, const struct ext4fs_map *map,
             uint64_t b0, uint64_t b1)
{
  return ip->extents && map->partial && !ext4fs_debug_serial_fill &&
    !any_seg (map, ip->fsi->blockbits, b0, b1, SEG_MAPPED);
}

/* The allocating write, with the handle held.  A request whose blocks
 * are all a hole of an extent file allocates them under the inode
 * lock, shared if the map covers them (the map changes only under the
 * lock exclusive, and the allocation itself under fsi->lock), writes
 * the data with no inode lock (allocating writes to different parts of
 * one file overlap there), then inserts the extents under it
 * exclusive; the blocks are registered as being filled meanwhile, so
 * no other request fills them too.  Anything else is done under the
 * inode lock exclusive from the map to the insert.
 */
static int
write_alloc_handle (struct ext4fs_inode *ip, const void *buf, uint32_t count,
                    uint64_t offset, uint64_t b0, uint64_t b1, int *err)
{
  const struct ext4fs_map *map;
  struct changes ch = { 0 };
  piece_vector pieces = { 0 };
  bool filling = false;
  uint64_t e = b1;
  int r;

  /* Shared first: allocating writes then take the lock exclusive only
   * once, for the insert, and reads go on beside their allocations.
   */
  pthread_rwlock_rdlock (&ip->lock);
  map = inode_map_range (ip, b0, &e, 0, false, err);
  if (map != NULL && fill_wanted (ip, map, b0, b1) &&
      inode_fill_try (ip, b0, b1, true) == 1) {
    filling = true;
    __atomic_add_fetch (&ip->nfills_shared, 1, __ATOMIC_RELAXED);
  }
  if (map == NULL && *err != 0) {
    pthread_rwlock_unlock (&ip->lock);
    return -1;
  }
  if (!filling) {
    pthread_rwlock_unlock (&ip->lock);
    pthread_rwlock_wrlock (&ip->lock);
    for (;;) {
      /* The map may have changed while we held no lock: inode_map_range
       * returns the current generation's map.
       */
      int f;

      e = b1;
      map = inode_map_range (ip, b0, &e, 0, true, err);
      if (map == NULL) {
        pthread_rwlock_unlock (&ip->lock);
        return -1;
      }
      f = inode_fill_try (ip, b0, b1, fill_wanted (ip, map, b0, b1));
      if (f >= 0) {
        filling = f == 1;
        break;
      }
      pthread_rwlock_unlock (&ip->lock);
      inode_fill_wait (ip, b0, b1);
      pthread_rwlock_wrlock (&ip->lock);
    }
  }
  if (filling) {
    /* Held shared or exclusive. */
    r = alloc_pieces (ip, map, b0, b1, &pieces, err);
    pthread_rwlock_unlock (&ip->lock);
    /* Blocks no tree has yet: only this request can reach them. */
    for (size_t i = 0; r == 0 && i < pieces.len; ++i)
      r = write_fresh (ip, pieces.ptr[i].pblk, pieces.ptr[i].lblk,
                       pieces.ptr[i].n, buf, count, offset, err);
    pthread_rwlock_wrlock (&ip->lock);
    /* After a failure, this frees the pieces (none if the allocation
     * failed).
     */
    if (insert_pieces (ip, &pieces, r == 0, &ch, err) == -1)
      r = -1;
    piece_vector_reset (&pieces);
  }
  else
    r = write_allocating (ip, map, buf, count, offset, &ch, err);
  /* Also after a failure: the changes noted are what the tree has
   * (fill_hole, fill_unwritten, insert_pieces).  Dropping the map
   * instead would build it again from a tree that a half-made change
   * (the filesystem then marked broken) may have left unreadable, and
   * every later read of the file would fail.
   */
  if (!ch.lost)
    inode_map_update (ip, ch.runs.ptr, ch.runs.len);
  else
    inode_map_changed (ip);
  run_vector_reset (&ch.runs);
  if (filling)
    inode_fill_end (ip, b0, b1);
  pthread_rwlock_unlock (&ip->lock);
  return r;
}

int
rw_pwrite (struct ext4fs_inode *ip, const void *buf, uint32_t count,
           uint64_t offset, uint32_t flags, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  unsigned bits = fsi->blockbits;
  uint64_t b0 = offset >> bits, b1 = ((offset + count - 1) >> bits) + 1;
  const struct ext4fs_map *map;
  bool fast = false, fua_sync = false;
  int r = 0;

  if (count == 0)
    return 0;

  if (!ip->inline_data) {
    /* Fast path: every block is already written: overwrite in place. */
    CLEANUP_RWUNLOCK pthread_rwlock_t *held = NULL;
    uint64_t e = b1;

    map = map_rdlock (ip, b0, &e, 0, &held, err);
    if (map == NULL)
      return -1;
    if (!any_seg (map, bits, b0, b1, SEG_NOT_WRITTEN)) {
      /* The image changes only from here (a corrupt map above has
       * changed nothing, not even the clean flag).
       */
      if (fs_begin_write (fsi, err) == -1)
        return -1;
      /* FUA promises the data readable after a crash: if the mapping
       * of these blocks (an allocation since the last flush) is not
       * durable yet, only a full sync does that (below, without the
       * inode lock).
       */
      fua_sync = (flags & NBDKIT_FLAG_FUA) && fs_fua_needs_sync (fsi);
      r = write_mapped (ip, map, buf, count, offset,
                        fua_sync ? flags & ~NBDKIT_FLAG_FUA : flags, err);
      if (r == 0)
        inode_touch (ip);
      fast = true;
    }
  }
  if (fast) {
    if (r == 0 && fua_sync)
      r = fs_sync (fsi, err);
    return r;
  }

  for (int attempt = 0; ; ++attempt) {
    /* ENOSPC with blocks freed but not committed (journal): commit
     * them and write again (what was written is mapped by now, and is
     * written again in place).
     */
    if (attempt > 0 && !fs_enospc_retry (fsi))
      break;
    /* The handle before the inode lock (DESIGN.md §3): a fill holds
     * it while it takes the inode lock a second time.
     */
    if (fs_begin_write (fsi, err) == -1 ||
        fs_handle_start (fsi, true, err) == -1)
      return -1;
    r = write_alloc_handle (ip, buf, count, offset, b0, b1, err);
    fs_handle_stop (fsi, true, true);
    if (r == 0 || *err != ENOSPC || attempt > 0)
      break;
  }
  inode_touch (ip);
  if (r == 0 && (flags & NBDKIT_FLAG_FUA))
    r = fs_sync (fsi, err);
  return r;
}

/* Write zeros into the written blocks of [offset, offset+count), in
 * place; holes and unwritten extents already read as zeros.  With
 * FAST_ZERO, fail with ENOTSUP before changing anything if any block
 * would need zeros written (a partial edge block is allowed: it is one
 * small read-modify-write).
 */
static int
rw_zero_written (struct ext4fs_inode *ip, uint64_t count, uint64_t offset,
         uint32_t flags, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  unsigned bits = fsi->blockbits;
  const struct ext4fs_map *map;
  CLEANUP_FREE char *zeros = NULL;
  CLEANUP_RWUNLOCK pthread_rwlock_t *held = NULL;
  uint64_t b0, b1;
  struct bmap_walk w;
  struct bmap_seg s;

  if (count == 0)
    return 0;
  if (ip->inline_data) {
    *err = EROFS;
    nbdkit_error ("inode %u: inline-data files are read-only", ip->ino);
    return -1;
  }
  /* Holes and unwritten extents already read as zeros: only written
   * blocks need zeros written into them, in place (no allocation).
   */
  blocks_of (fsi, offset, count, &b0, &b1);
  map = map_rdlock (ip, b0, &b1, 0, &held, err);
  if (map == NULL)
    return -1;
  /* FAST_ZERO: zeroing written blocks means writing zeros, which is
   * not fast.  Fail before changing anything.
   */
  if ((flags & NBDKIT_FLAG_FAST_ZERO) &&
      any_seg (map, bits, offset >> bits, ((offset + count - 1) >> bits) + 1,
               SEG_WRITTEN)) {
    *err = ENOTSUP;
    return -1;
  }
  bmap_walk_bytes (&w, map, bits, offset, count);
  while (bmap_walk_next (&w, &s)) {
    uint64_t done, m;

    if (!bmap_seg_written (&s))
      continue;
    /* Only now does the image change. */
    if (fs_begin_write (fsi, err) == -1)
      return -1;
    if (zeros == NULL && (zeros = calloc (1, 1024 * 1024)) == NULL) {
      *err = errno;
      nbdkit_error ("calloc: %m");
      return -1;
    }
    for (done = 0; done < s.len; done += m) {
      m = min64 (s.len - done, 1024 * 1024);
      if (write_mapped (ip, map, zeros, m, s.off + done,
                        flags & NBDKIT_FLAG_FUA, err) == -1)
        return -1;
    }
    inode_touch (ip);
  }
  return 0;
}


/* Change the block map of whole blocks [b0, b1): punch them (free the
 * blocks), or on extent files turn written extents into unwritten
 * ones (blocks stay allocated, read as zeros).  Takes ip->lock
 * exclusive: no request is doing I/O through the old map, and none
 * ever will (the generation changes), so a freed block is never read
 * or written through this file again.  Returns 1 if the map changed
 * (and the inode's times are due), 0 if there was nothing to change,
 * -1 on error, and 2, with nothing done, if there is something to
 * change but the caller holds no handle (handle false).
 */
static int
remap_range_handle (struct ext4fs_inode *ip, uint64_t b0, uint64_t b1,
                    bool punch, bool handle, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  const struct ext4fs_map *map;
  bool broken;
  int r = 0;
  uint64_t e = b1;
  ACQUIRE_WRLOCK_FOR_CURRENT_SCOPE (&ip->lock);

  map = inode_map_range (ip, b0, &e, 0, true, err);
  if (map == NULL)
    return -1;
  if (!any_seg (map, fsi->blockbits, b0, b1, SEG_MAPPED))
    return 0;                   /* nothing to change */
  if (!handle)
    return 2;                   /* a change to make: with the handle */
  pthread_mutex_lock (&fsi->lock);
  if (punch)
    r = bmap_punch_locked (ip, map, b0, b1 - b0, err);
  else {
    struct bmap_walk w;
    struct bmap_seg s;
    bool converted;

    bmap_walk_blocks (&w, map, fsi->blockbits, b0, b1);
    while (r == 0 && bmap_walk_next (&w, &s))
      if (bmap_seg_written (&s))
        r = bmap_convert_locked (ip, s.lblk, s.end - s.lblk, true,
                                 &converted, err);
  }
  broken = fsi->broken;
  pthread_mutex_unlock (&fsi->lock);
  /* The range is loaded again from the tree at the next use (the
   * mapping outside it did not change; a map that is not partial is
   * built again whole), unless a change was left half made: that
   * tree may be unreadable, and the old map still serves every block
   * the request did not touch (blocks it freed are not given to
   * anyone: a broken filesystem allocates nothing).
   */
  if (r == 0 || !broken)
    inode_map_forget (ip, b0, b1);
  if (r == 0)
    inode_touch (ip);
  return r == 0 ? 1 : -1;
}

static int
remap_range (struct ext4fs_inode *ip, uint64_t b0, uint64_t b1, bool punch,
             int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  int r = remap_range_handle (ip, b0, b1, punch, false, err);

  if (r != 2)
    return r;
  /* Something to change: the handle comes before the inode lock
   * (DESIGN.md §3), so look again with it held.
   */
  if (fs_begin_write (fsi, err) == -1 ||
      fs_handle_start (fsi, true, err) == -1)
    return -1;
  r = remap_range_handle (ip, b0, b1, punch, true, err);
  fs_handle_stop (fsi, true, true);
  return r;
}

/* The whole blocks [*b0, *b1) inside [offset, offset+count) (empty:
 * *b0 >= *b1).
 */
static void
whole_blocks (struct ext4fs_fs *fsi, uint64_t offset, uint64_t count,
              uint64_t *b0, uint64_t *b1)
{
  *b0 = (offset + fsi->blocksize - 1) >> fsi->blockbits;
  *b1 = (offset + count) >> fsi->blockbits;
}

/* Zero the parts of [offset, offset+count) outside whole blocks
 * [b0, b1) that are written (partial edge blocks), in place.
 */
static int
zero_edges (struct ext4fs_inode *ip, uint64_t count, uint64_t offset,
            uint64_t b0, uint64_t b1, uint32_t flags, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  unsigned bits = fsi->blockbits;
  uint64_t end = offset + count;
  struct { uint64_t off, len; } part[2];
  int nparts = 0, i;

  if (b0 >= b1) {
    part[nparts].off = offset;
    part[nparts++].len = count;
  }
  else {
    if (offset < b0 << bits) {
      part[nparts].off = offset;
      part[nparts++].len = (b0 << bits) - offset;
    }
    if (end > b1 << bits) {
      part[nparts].off = b1 << bits;
      part[nparts++].len = end - (b1 << bits);
    }
  }
  for (i = 0; i < nparts; ++i) {
    if (rw_zero_written (ip, part[i].len, part[i].off, flags, err) == -1)
      return -1;
  }
  return 0;
}

int
rw_zero (struct ext4fs_inode *ip, uint32_t count, uint64_t offset,
         uint32_t flags, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  unsigned bits = fsi->blockbits;
  uint64_t b0, b1;
  bool may_trim = (flags & NBDKIT_FLAG_MAY_TRIM) != 0;
  int r;

  if (count == 0)
    return 0;
  if (ip->inline_data) {
    *err = EROFS;
    nbdkit_error ("inode %u: inline-data files are read-only", ip->ino);
    return -1;
  }
  whole_blocks (fsi, offset, count, &b0, &b1);
  /* Whole blocks: punched (MAY_TRIM), or made unwritten (extent
   * files), both instant; indirect files without MAY_TRIM get zeros
   * written, which is not fast.
   */
  if (!may_trim && !ip->extents)
    return rw_zero_written (ip, count, offset, flags, err);
  if (zero_edges (ip, count, offset, b0, b1,
                  flags & ~(NBDKIT_FLAG_FUA | NBDKIT_FLAG_FAST_ZERO),
                  err) == -1)
    return -1;
  if (b0 < b1 && remap_range (ip, b0, b1, may_trim, err) == -1) {
    /* Refused before changing the rest (no free block to split an
     * extent, the file's limits): zeros written in place need no
     * metadata.  Blocks already punched or made unwritten are
     * skipped.  (FAST_ZERO: ENOTSUP then, that is not fast.)
     */
    if ((*err != ENOSPC && *err != EFBIG) ||
        __atomic_load_n (&fsi->broken, __ATOMIC_RELAXED))
      return -1;
    nbdkit_debug ("ext4fs: inode %u: zero: no room to change the extent "
                  "tree; writing zeros instead", ip->ino);
    if (rw_zero_written (ip, (b1 - b0) << bits, b0 << bits,
                         flags & ~NBDKIT_FLAG_FUA, err) == -1)
      return -1;
  }
  r = 0;
  if (flags & NBDKIT_FLAG_FUA)
    r = fs_sync (fsi, err);
  return r;
}

int
rw_trim (struct ext4fs_inode *ip, uint32_t count, uint64_t offset,
         uint32_t flags, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  uint64_t b0, b1;

  whole_blocks (fsi, offset, count, &b0, &b1);
  /* Trim is advisory: partial blocks at the edges stay; inline data
   * is left alone.
   */
  if (!ip->inline_data && b0 < b1 &&
      remap_range (ip, b0, b1, true, err) == -1)
    return -1;
  if (flags & NBDKIT_FLAG_FUA)
    return fs_sync (fsi, err);
  return 0;
}

int
rw_extents (struct ext4fs_inode *ip, uint32_t count, uint64_t offset,
            uint32_t flags, struct nbdkit_extents *extents, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  CLEANUP_RWUNLOCK pthread_rwlock_t *held = NULL;
  const struct ext4fs_map *map;
  uint64_t b0, b1;
  struct bmap_walk w;
  struct bmap_seg s;

  if (ip->inline_data)
    return nbdkit_add_extent (extents, offset, count, 0) == -1 ? (*err = errno, -1) : 0;

  /* A partial map loads no more than a few leaves: the reply may end
   * early (then the client asks again from there).
   */
  blocks_of (fsi, offset, count, &b0, &b1);
  map = map_rdlock (ip, b0, &b1, MAXLOAD_STATUS, &held, err);
  if (map == NULL)
    return -1;
  bmap_walk_bytes (&w, map, fsi->blockbits, offset,
                   min64 (count, (b1 << fsi->blockbits) - offset));
  while (bmap_walk_next (&w, &s)) {
    uint32_t type = s.run == NULL ? NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO
      : s.run->unwritten ? NBDKIT_EXTENT_ZERO : 0;
    /* Never past the end of the file (a segment is never past the end
     * of the request: nbdkit 1.32 asserts, aborting the server, when
     * one extent is longer than the request, a hole of more than
     * 4 GiB for example).
     */
    uint64_t n = min64 (s.len, s.off < ip->size ? ip->size - s.off : 0);

    if (n == 0)
      break;
    if (nbdkit_add_extent (extents, s.off, n, type) == -1) {
      *err = errno;
      return -1;
    }
    if (flags & NBDKIT_FLAG_REQ_ONE)
      break;
  }
  return 0;
}

int
rw_cache (struct ext4fs_inode *ip, uint32_t count, uint64_t offset, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  CLEANUP_RWUNLOCK pthread_rwlock_t *held = NULL;
  uint64_t b0, b1;
  const struct ext4fs_map *map;
  struct bmap_walk w;
  struct bmap_seg s;

  if (ip->inline_data)
    return 0;
  /* Advisory: what a few leaves of a partial map cover. */
  blocks_of (fsi, offset, count, &b0, &b1);
  map = map_rdlock (ip, b0, &b1, MAXLOAD_STATUS, &held, err);
  if (map == NULL)
    return -1;
  bmap_walk_bytes (&w, map, fsi->blockbits, offset,
                   min64 (count, (b1 << fsi->blockbits) - offset));
  while (bmap_walk_next (&w, &s))
    if (bmap_seg_written (&s) &&
        ext4fs_dev_cache (fsi->dev, s.len, bmap_seg_pos (&w, &s), err) == -1)
      return -1;
  return 0;
}
