/* ext4fs: block mapping.
 *
 * Owns: reading a file's block map (extent tree or indirect blocks)
 * into sorted runs, validating every physical block number against
 * the filesystem; the allocator front end (reserve, goal, contiguous
 * ranges); and the changes to a map: inserting written extents into
 * holes, converting unwritten extents, punching, mapping blocks of
 * indirect files.  Changes of extent trees (but for punches that
 * libext2fs makes in single steps) are our own, one atomic write each
 * ("Changing the extent tree" below).
 *
 * Locks: every function here that calls libext2fs is *_locked: the
 * caller holds fsi->lock.  Functions that change a map also require
 * ip->lock held exclusive; the caller updates or drops the cached map
 * once, after all changes of one request.
 *
 * libext2fs calls used, all under fsi->lock: ext2fs_extent_open2 /
 * get / free on a private copy of the inode (building the map) and
 * ext2fs_extent_open2 / goto / get / replace / delete / fix_parents /
 * free on ip->raw, the one inode copy (unmapping the last block);
 * ext2fs_punch (on ip->raw); io_channel_read_blk64 /
 * io_channel_write_blk64, ext2fs_extent_header_verify,
 * ext2fs_crc32c_le (extent block checksums, where the CPU has no
 * CRC32C instruction), ext2fs_new_block2,
 * ext2fs_block_alloc_stats2 (our extent tree changes);
 * ext2fs_block_iterate3 (read-only); ext2fs_bmap2 (BMAP_ALLOC|BMAP_SET
 * on ip->raw; it allocates indirect blocks and writes the inode, but
 * for indirect files never re-reads it); ext2fs_new_range,
 * ext2fs_block_alloc_stats_range, ext2fs_iblk_add_blocks /
 * sub_blocks, ext2fs_free_blocks_count, ext2fs_r_blocks_count.
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bmap.h"
#include "common/crc32c.h"
#include "cleanup.h"


/* Maps are partial (runmap.h): loaded one leaf of the extent tree, or
 * one block of pointers of an indirect file, at a time where requests
 * need them, and cut back to what the request at hand needs when they
 * hold more than MAP_BUDGET runs (24 bytes each), so a file with ten
 * million extents opens at once and its map stays within about 24 MiB
 * (and one request's runs).  -D ext4fs.max_runs=N lowers the budget
 * (tests).
 */
#define MAP_BUDGET (1024 * 1024)

size_t
bmap_map_budget (void)
{
  int d = ext4fs_debug_max_runs;

  return d > 0 && d < MAP_BUDGET ? (size_t) d : MAP_BUDGET;
}

#define XT_MAX_DEPTH 5          /* the kernel's EXT4_MAX_EXTENT_DEPTH */

struct builder {
  struct ext4fs_inode *ip;
  struct ext4fs_map *map;
  uint64_t next_lblk;           /* runs must not overlap */
  uint64_t nblocks;             /* blocks covering i_size */
  errcode_t error;
};

/* Is logical [lblk, lblk+len) -> physical [pblk, ...) a mapping the
 * filesystem can have, after the runs before it (ending at next_lblk)?
 */
static int
run_check (struct ext4fs_inode *ip, uint64_t lblk, uint64_t pblk,
           uint64_t len, uint64_t next_lblk)
{
  struct ext4fs_fs *fsi = ip->fsi;
  uint64_t pend;

  if (pblk < fsi->first_data_block ||
      __builtin_add_overflow (pblk, len, &pend) || pend > fsi->blocks_count ||
      lblk < next_lblk) {
    nbdkit_error ("inode %u: corrupt block map: logical block %" PRIu64
                  " -> physical %" PRIu64 " (+%" PRIu64 ") is outside the "
                  "filesystem (%" PRIu64 " blocks) or overlaps",
                  ip->ino, lblk, pblk, len, fsi->blocks_count);
    return -1;
  }
  if (fs_is_metadata (fsi, pblk, len)) {
    nbdkit_error ("inode %u: corrupt block map: logical block %" PRIu64
                  " -> physical %" PRIu64 " (+%" PRIu64 ") points at "
                  "filesystem metadata", ip->ino, lblk, pblk, len);
    return -1;
  }
  return 0;
}

static int
push_run (struct builder *b, uint64_t lblk, uint64_t pblk, uint64_t len,
          bool unwritten)
{
  struct ext4fs_run *last;

  if (len == 0)
    return 0;
  if (run_check (b->ip, lblk, pblk, len, b->next_lblk) == -1)
    return -1;
  b->next_lblk = lblk + len;

  last = runmap_last (b->map);
  if (last) {
    /* Merge written runs only: bmap_convert_locked needs each
     * unwritten run to be exactly one extent on disk.
     */
    if (!unwritten && !last->unwritten &&
        last->lblk + last->len == lblk && last->pblk + last->len == pblk &&
        last->len + len <= UINT32_MAX) {
      last->len += len;
      return 0;
    }
  }
  {
    const struct ext4fs_run r = {
      .lblk = lblk, .pblk = pblk, .len = len, .unwritten = unwritten,
    };
    struct runmap_pos end = { b->map->nchunks, 0 }, at;

    if (runmap_insert (b->map, end, &r, &at) == -1) {
      nbdkit_error ("malloc: %m");
      return -1;
    }
  }
  return 0;
}

static int
build_extents (struct builder *b)
{
  struct ext4fs_inode *ip = b->ip;
  ext2_filsys fs = ip->fsi->fs;
  struct ext2_inode_large copy = ip->raw; /* extent_open may write to it */
  ext2_extent_handle_t h;
  struct ext2fs_extent ex;
  errcode_t e;
  int r = 0;

  e = ext2fs_extent_open2 (fs, ip->ino, (struct ext2_inode *) &copy, &h);
  if (e) {
    nbdkit_error ("inode %u: extent tree: %s", ip->ino, error_message (e));
    return -1;
  }
  e = ext2fs_extent_get (h, EXT2_EXTENT_ROOT, &ex);
  while (e == 0) {
    if ((ex.e_flags & EXT2_EXTENT_FLAGS_LEAF) &&
        !(ex.e_flags & EXT2_EXTENT_FLAGS_SECOND_VISIT)) {
      if (push_run (b, ex.e_lblk, ex.e_pblk, ex.e_len,
                    (ex.e_flags & EXT2_EXTENT_FLAGS_UNINIT) != 0) == -1) {
        r = -1;
        break;
      }
    }
    e = ext2fs_extent_get (h, EXT2_EXTENT_NEXT, &ex);
  }
  if (r == 0 && e != EXT2_ET_EXTENT_NO_NEXT) {
    nbdkit_error ("inode %u: extent tree: %s", ip->ino, error_message (e));
    r = -1;
  }
  ext2fs_extent_free (h);
  return r;
}

static int
ind_callback (ext2_filsys fs, blk64_t *blocknr, e2_blkcnt_t blockcnt,
              blk64_t ref_blk, int ref_offset, void *priv)
{
  struct builder *b = priv;

  if (blockcnt < 0) {
    /* An indirect block, reported before it is read: libext2fs loses
     * its own error for a bad one and then counts blocks wrongly.
     */
    struct ext4fs_fs *fsi = b->ip->fsi;
    if (!fs_block_usable (fsi, *blocknr)) {
      nbdkit_error ("inode %u: corrupt indirect block number %llu",
                    b->ip->ino, (unsigned long long) *blocknr);
      b->error = EXT2_ET_BAD_IND_BLOCK;
      return BLOCK_ABORT;
    }
    return 0;
  }
  /* Blocks past the end of the file are never read: stop there (a
   * hostile indirect tree could otherwise cost a lot of time and
   * memory under the fs mutex).  Data blocks come in logical order.
   */
  if ((uint64_t) blockcnt >= b->nblocks)
    return BLOCK_ABORT;
  if (push_run (b, blockcnt, *blocknr, 1, false) == -1) {
    b->error = EXT2_ET_BAD_BLOCK_NUM;
    return BLOCK_ABORT;
  }
  return 0;
}

static int
build_indirect (struct builder *b)
{
  struct ext4fs_inode *ip = b->ip;
  errcode_t e;

  e = ext2fs_block_iterate3 (ip->fsi->fs, ip->ino, BLOCK_FLAG_READ_ONLY,
                             NULL, ind_callback, b);
  if (b->error)
    return -1;
  if (e) {
    nbdkit_error ("inode %u: indirect blocks: %s", ip->ino, error_message (e));
    return -1;
  }
  return 0;
}

static unsigned extent_depth (const struct ext4fs_inode *ip);

static struct ext4fs_map *
build_locked (struct ext4fs_inode *ip, bool full, int *err)
{
  struct builder b = {
    .ip = ip,
    .nblocks = (ip->size + ip->fsi->blocksize - 1) >> ip->fsi->blockbits,
  };
  int r = 0;

  b.map = runmap_new ();
  if (b.map == NULL) {
    *err = errno;
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  if (ip->inline_data)
    r = 0;                      /* no blocks */
  else if (!full) {
    /* Partial: leaves (or blocks of pointers) are loaded when needed
     * (bmap_load_locked); an extent tree that is only its root is
     * loaded now (no I/O).
     */
    bool was_reset = false;

    b.map->partial = true;
    if (ip->extents && extent_depth (ip) == 0 &&
        bmap_load_locked (ip, b.map, 0, &was_reset, err) == -1) {
      runmap_free (b.map);
      return NULL;
    }
  }
  else if (ip->extents)
    r = build_extents (&b);
  else
    r = build_indirect (&b);
  if (r == -1) {
    runmap_free (b.map);
    *err = EIO;
    return NULL;
  }
  return b.map;
}

struct ext4fs_map *
bmap_build_locked (struct ext4fs_inode *ip, int *err)
{
  return build_locked (ip, false, err);
}

struct ext4fs_map *
bmap_build_full_locked (struct ext4fs_inode *ip, int *err)
{
  return build_locked (ip, true, err);
}

static bool
runs_mergeable (const struct ext4fs_run *a, const struct ext4fs_run *b)
{
  return !a->unwritten && !b->unwritten &&
    a->lblk + a->len == b->lblk && a->pblk + a->len == b->pblk &&
    (uint64_t) a->len + b->len <= UINT32_MAX;
}

int
bmap_map_set (struct ext4fs_map **mapp, uint64_t lblk, uint32_t len,
              uint64_t pblk)
{
  struct ext4fs_map *m = *mapp;
  uint64_t end = lblk + len;
  struct ext4fs_run pieces[3], *r;
  struct runmap_pos p, q, at, nw;
  size_t k = 0, np = 0, i;
  bool right = false;

  if (len == 0)
    return 0;
  /* The k runs overlapping [lblk, end), from p; what is left of the
   * first before lblk and of the last after end.
   */
  p = runmap_after (m, lblk);
  if (runmap_prev (m, p, &q) &&
      runmap_at (m, q)->lblk + runmap_at (m, q)->len > lblk)
    p = q;
  for (q = p; runmap_valid (m, q) && runmap_at (m, q)->lblk < end;
       q = runmap_next (m, q)) {
    r = runmap_at (m, q);
    if (k == 0 && r->lblk < lblk) {
      pieces[np] = *r;
      pieces[np++].len = lblk - r->lblk;
    }
    if (r->lblk + r->len > end) {
      uint64_t off = end - r->lblk;
      pieces[2] = (struct ext4fs_run) {
        .lblk = end, .pblk = r->pblk + off, .len = r->len - off,
        .unwritten = r->unwritten,
      };
      right = true;
    }
    k++;
  }
  if (right)
    pieces[np + 1] = pieces[2];
  pieces[np++] = (struct ext4fs_run) { .lblk = lblk, .pblk = pblk, .len = len };
  np += right;

  for (i = 0; i < k; ++i)
    p = runmap_remove (m, p);
  for (i = 0; i < np; ++i) {
    if (runmap_insert (m, p, &pieces[i], &at) == -1)
      return -1;
    p = (struct runmap_pos) { at.c, at.i + 1 };
  }

  /* Merge the new run with its neighbours, as bmap_build would.  (It
   * is found again: an insert after it may have split its chunk.)
   */
  if (!runmap_prev (m, runmap_after (m, lblk), &nw))
    abort ();
  r = runmap_at (m, nw);
  q = runmap_next (m, nw);
  if (runmap_valid (m, q) && runs_mergeable (r, runmap_at (m, q))) {
    r->len += runmap_at (m, q)->len;
    runmap_remove (m, q);
  }
  if (runmap_prev (m, nw, &q) && runs_mergeable (runmap_at (m, q), r)) {
    runmap_at (m, q)->len += r->len;
    runmap_remove (m, nw);
  }
  return 0;
}

const struct ext4fs_run *
bmap_lookup (const struct ext4fs_map *map, uint64_t lblk, uint64_t *hole_end)
{
  struct runmap_pos p = runmap_after (map, lblk), q;

  if (runmap_prev (map, p, &q)) {
    const struct ext4fs_run *r = runmap_at (map, q);
    if (lblk < r->lblk + r->len)
      return r;
  }
  *hole_end = runmap_valid (map, p) ? runmap_at (map, p)->lblk : UINT64_MAX;
  return NULL;
}

uint64_t
bmap_goal_locked (struct ext4fs_inode *ip, const struct ext4fs_map *map,
                  uint64_t lblk)
{
  struct ext4fs_fs *fsi = ip->fsi;
  ext2_filsys fs = fsi->fs;
  struct runmap_pos p = runmap_after (map, lblk), q;
  const struct ext4fs_run *r;

  /* Aim to put logical block L at physical block base + L, the place
   * a sequential writer would have given it: take the base from the
   * run before lblk, else from the run after it, else (no block yet)
   * from the first free block of the inode's group.  Writers filling
   * one file at several places at once (nbdcopy's threads, a VM) then
   * each extend their own contiguous range instead of taking turns
   * with the next free block, which interleaved their extents.
   */
  if (runmap_prev (map, p, &q)) {
    r = runmap_at (map, q);
    if (lblk - r->lblk < fsi->blocks_count - r->pblk)
      return r->pblk + (lblk - r->lblk);
  }
  /* No run before lblk (known to the map): the base of the file's
   * last allocation, which may not be in the map yet (fills that
   * overlap insert their extents after others allocate), so that
   * writers filling an empty file at once all keep one base.
   */
  else if (ip->alloc_base_set &&
           lblk < fsi->blocks_count - ip->alloc_base)
    return ip->alloc_base + lblk;
  else if (runmap_valid (map, p)) {
    r = runmap_at (map, p);
    if (r->pblk >= fsi->first_data_block &&
        r->lblk - lblk <= r->pblk - fsi->first_data_block)
      return r->pblk - (r->lblk - lblk);
  }
  else if (fs->block_map && fs->super->s_inodes_per_group > 0) {
    dgrp_t group = (ip->ino - 1) / fs->super->s_inodes_per_group;
    blk64_t start, first_free;

    if (group < fs->group_desc_count) {
      start = ext2fs_group_first_block2 (fs, group);
      if (ext2fs_find_first_zero_block_bitmap2 (fs->block_map, start,
                                                fsi->blocks_count - 1,
                                                &first_free) == 0 &&
          lblk < fsi->blocks_count - first_free)
        return first_free + lblk;
    }
  }
  return 0;                     /* let libext2fs choose */
}

/* Is there room in i_blocks for nblocks more blocks?  Without
 * huge_file it counts 512-byte sectors in 32 bits, and libext2fs only
 * finds out after the tree changed (ext2fs_bmap2 even ignores it).
 * Caller holds fsi->lock.
 */
static bool
iblk_fits (const struct ext4fs_inode *ip, uint64_t nblocks)
{
  ext2_filsys fs = ip->fsi->fs;
  uint64_t cur = ip->raw.i_blocks, limit = UINT32_MAX;
  uint64_t per = ip->fsi->blocksize / 512;

  if (ext2fs_has_feature_huge_file (fs->super)) {
    cur += (uint64_t) ip->raw.osd2.linux2.l_i_blocks_hi << 32;
    limit = (UINT64_C (1) << 48) - 1;
    if (ip->raw.i_flags & EXT4_HUGE_FILE_FL)
      per = 1;
  }
  return cur <= limit && nblocks <= (limit - cur) / per;
}

int
bmap_iblk_room_locked (struct ext4fs_inode *ip, uint64_t nblocks, int *err)
{
  if (iblk_fits (ip, nblocks))
    return 0;
  nbdkit_error ("inode %u: the file's block count (i_blocks) would "
                "overflow%s", ip->ino,
                ext2fs_has_feature_huge_file (ip->fsi->fs->super) ? ""
                : " (the filesystem has no huge_file feature)");
  *err = EFBIG;
  return -1;
}

/* The depth of ip's extent tree, from the root in the inode. */
static unsigned
extent_depth (const struct ext4fs_inode *ip)
{
  const struct ext3_extent_header *eh =
    (const struct ext3_extent_header *) ip->raw.i_block;
  unsigned d = ext2fs_le16_to_cpu (eh->eh_depth);

  if (ext2fs_le16_to_cpu (eh->eh_magic) != EXT3_EXT_MAGIC)
    return 0;
  return d < XT_MAX_DEPTH ? d : XT_MAX_DEPTH;
}

/* Indirect blocks (of any level) that map part of [a, b) in a tree
 * whose blocks of one level each map `per' logical blocks, starting
 * at logical block base.
 */
static uint64_t
spanned (uint64_t a, uint64_t b, uint64_t base, uint64_t per)
{
  return (b - 1 - base) / per - (a - base) / per + 1;
}

uint64_t
bmap_meta_need_locked (struct ext4fs_inode *ip, uint64_t lblk, uint64_t len)
{
  uint64_t apb = ip->fsi->blocksize / 4, need = 0, a = lblk, b = lblk + len;
  uint64_t ind = EXT2_NDIR_BLOCKS, dind = ind + apb, tind = dind + apb * apb;

  if (len == 0)
    return 0;
  if (ip->extents) {
    /* Each insert (one per EXT_INIT_MAX_LEN blocks) may split a node
     * on every level (two new blocks each) and grow the tree by one.
     * A hole holds no extent, so no leaf boundary lies inside it.
     */
    uint64_t k = (len + EXT_INIT_MAX_LEN - 1) / EXT_INIT_MAX_LEN, i;

    for (i = 0; i < k; ++i)
      need += 2 * (extent_depth (ip) + i) + 1;
    return need;
  }
  /* ext2fs_bmap2 allocates the indirect blocks on the way down that
   * are missing: at most every one that maps part of the range.
   */
  if (a < dind && b > ind)
    need += 1;
  if (a < tind && b > dind) {
    uint64_t x = a > dind ? a : dind, y = b < tind ? b : tind;
    need += 1 + spanned (x, y, dind, apb);
  }
  if (b > tind) {
    uint64_t x = a > tind ? a : tind;
    need += 1 + spanned (x, b, tind, apb * apb) + spanned (x, b, tind, apb);
  }
  return need;
}

uint64_t
bmap_map_limit (const struct ext4fs_inode *ip)
{
  uint64_t apb = ip->fsi->blocksize / 4;

  if (ip->extents)
    return (UINT64_C (1) << 32) - 1;
  return EXT2_NDIR_BLOCKS + apb + apb * apb + apb * apb * apb;
}

int64_t
bmap_alloc_locked (struct ext4fs_inode *ip, uint64_t lblk, uint64_t goal,
                   uint64_t len, uint64_t *pblk, uint64_t *reserved, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  ext2_filsys fs = fsi->fs;
  uint64_t free_blocks = ext2fs_free_blocks_count (fs->super);
  uint64_t keep = ext2fs_r_blocks_count (fs->super) + fsi->meta_reserved;
  uint64_t meta, limit = bmap_map_limit (ip);
  blk64_t start, n;
  errcode_t e;

  *reserved = 0;
  if (fsi->broken) {
    *err = EIO;
    nbdkit_error ("refusing to allocate: the filesystem was marked as "
                  "having errors");
    return -1;
  }
  /* Limits of the file, before anything is allocated (libext2fs finds
   * them only after changing the tree).
   */
  if (lblk >= limit) {
    nbdkit_error ("inode %u: logical block %" PRIu64 " is beyond what "
                  "this file can map (%s: %" PRIu64 " blocks)", ip->ino, lblk,
                  ip->extents ? "extents" : "indirect blocks", limit);
    *err = EFBIG;
    return -1;
  }
  if (len > limit - lblk)
    len = limit - lblk;
  /* Keep free the root reserve and the blocks promised to other
   * changes under way, and reserve what this one's mapping can need
   * (tree nodes, indirect blocks): ENOSPC now, not half way through.
   */
  meta = bmap_meta_need_locked (ip, lblk, len);
  if (free_blocks <= keep || free_blocks - keep <= meta) {
    nbdkit_error ("no space left on the filesystem (%" PRIu64 " free blocks, "
                  "%" PRIu64 " reserved, %" PRIu64 " needed for the file's "
                  "metadata)", free_blocks, keep, meta);
    *err = ENOSPC;
    return -1;
  }
  if (len > free_blocks - keep - meta)
    len = free_blocks - keep - meta;
  if (bmap_iblk_room_locked (ip, meta + 1, err) == -1)
    return -1;
  while (len > 1 && !iblk_fits (ip, len + meta))
    len /= 2;
  if (goal == 0)
    goal = fsi->first_data_block;
  e = ext2fs_new_range (fs, 0, goal, len, NULL, &start, &n);
  if (e) {
    nbdkit_error ("allocating %" PRIu64 " blocks: %s", len, error_message (e));
    *err = e == EXT2_ET_BLOCK_ALLOC_FAIL ? ENOSPC : ext4fs_errcode_to_errno (e);
    return -1;
  }
  if (n == 0 || n > len || start < fsi->first_data_block ||
      start + n > fsi->blocks_count) {
    nbdkit_error ("allocator returned an invalid range");
    *err = EIO;
    return -1;
  }
  if (fs_is_metadata (fsi, start, n)) {
    /* The block bitmap says metadata blocks are free: corrupt. */
    nbdkit_error ("the block bitmap marks filesystem metadata (blocks %llu+"
                  "%llu) as free: the filesystem is corrupt, run e2fsck",
                  (unsigned long long) start, (unsigned long long) n);
    fs_set_broken_locked (fsi, "corrupt block bitmap");
    *err = EIO;
    return -1;
  }
  ext2fs_block_alloc_stats_range (fs, start, n, +1);
  /* libext2fs 1.47.0 calls the range callback with the range already
   * consumed (num == 0), so record the dirty groups here.
   */
  fs_group_dirty_locked (fsi, start, n);
  *reserved = bmap_meta_need_locked (ip, lblk, n);
  fsi->meta_reserved += *reserved;
  *pblk = start;
  /* The base for the next goal without a run before it (below). */
  if (start >= lblk) {
    ip->alloc_base = start - lblk;
    ip->alloc_base_set = true;
  }
  return n;
}

uint64_t
bmap_available_locked (struct ext4fs_fs *fsi)
{
  uint64_t free_blocks = ext2fs_free_blocks_count (fsi->fs->super);
  uint64_t keep = ext2fs_r_blocks_count (fsi->fs->super) + fsi->meta_reserved;

  return free_blocks > keep ? free_blocks - keep : 0;
}

void
bmap_release_locked (struct ext4fs_fs *fsi, uint64_t reserved)
{
  fsi->meta_reserved -= reserved < fsi->meta_reserved
    ? reserved : fsi->meta_reserved;
}

void
bmap_free_locked (struct ext4fs_fs *fsi, uint64_t pblk, uint64_t len)
{
  if (len > 0) {
    ext2fs_block_alloc_stats_range (fsi->fs, pblk, len, -1);
    fs_group_dirty_locked (fsi, pblk, len);  /* see bmap_alloc_locked */
    fs_blocks_freed_locked (fsi, pblk, len);  /* (the callback has num 0) */
  }
}

static int
extent_error (struct ext4fs_inode *ip, const char *what, errcode_t e, int *err)
{
  nbdkit_error ("inode %u: %s: %s", ip->ino, what, error_message (e));
  *err = ext4fs_errcode_to_errno (e);
  return -1;
}

/* How one change to ip's block map through libext2fs ended.  before:
 * the I/O counts (ext4fs_io_counts) taken before it; e: what libext2fs
 * returned; reads: whether a failed read below counts (ext2fs_punch
 * ignores one and then works on a wrong position).  libext2fs does not
 * return every failure of its own writes, so the counts decide:
 * returns 0 (done, every write below succeeded), -1 (failed before
 * anything was written: nothing changed, on disk or in memory), or -2
 * (failed after something was written, or a write below failed
 * although libext2fs said it succeeded: the change may be half made;
 * the filesystem is marked broken).  *err is set after nbdkit_error
 * unless 0 is returned.
 */
static int
change_done_locked (struct ext4fs_inode *ip,
                    const struct ext4fs_io_counts *before, errcode_t e,
                    bool reads, const char *what, int *err)
{
  struct ext4fs_io_counts now;

  ext4fs_io_counts (&now);
  if (e == 0 && now.write_failures == before->write_failures &&
      (!reads || now.read_failures == before->read_failures))
    return 0;
  if (e)
    extent_error (ip, what, e, err);
  else {
    nbdkit_error ("inode %u: %s: an I/O error below was lost by libext2fs",
                  ip->ino, what);
    *err = EIO;
  }
  if (now.writes == before->writes)
    return -1;
  fs_set_broken_locked (ip->fsi, what);
  return -2;
}

/*----------------------------------------------------------------------
 * Changing the extent tree, one atomic step at a time.
 *
 * libext2fs's extent calls change a tree in several writes: converting
 * the middle of an extent is a replace and two inserts, and a node split
 * writes the new node, then the old one cut in half, and only then the
 * index that points to the new one.  A failure in between (a write
 * below, a split that finds no free block) left extents unmapped (a zero
 * without MAY_TRIM that hit ENOSPC left 896 KiB of other data without a
 * mapping), and inserting first instead leaves extents that overlap,
 * which e2fsck 1.47.0 does not repair without loss (after deleting a
 * colliding extent that was the last of its node it checks the one
 * before again, finds it colliding with itself, and deletes it too).
 *
 * So the changes ext4fs makes to extent trees are its own.  Each is one
 * edit of one leaf (replace some of its entries by others: insert an
 * extent merged with its neighbours, convert part of one, split one for
 * a punch), committed by exactly one write of an existing block: the
 * leaf if the new entries fit, else the first ancestor that does not
 * overflow, or the inode for the root.  Nodes split on the way go to new
 * blocks written before the commit, unreferenced: a failure before it
 * leaves the old tree (the new blocks are freed again), the commit
 * switches to the new one.  What follows it (an index start following
 * its child's first extent, the block count in the inode) e2fsck repairs
 * without loss if it fails.  The blocks the new nodes need are counted,
 * and found free, before anything is written.
 *
 * Reads and writes go through the io_manager (io_channel_*), as
 * libext2fs's own, so whatever it sees of the tree we see.
 */


/* A decoded entry: a leaf's extent, or an index's start and child. */
struct xent {
  uint64_t lblk, pblk;
  uint32_t len;                 /* leaves only */
  bool uninit;                  /* leaves only */
};

struct xnode {
  uint64_t blk;                 /* 0: the root, in ip->raw.i_block */
  unsigned depth;               /* eh_depth: 0 = leaf */
  unsigned n, max;
  unsigned pos;                 /* index nodes: the entry followed down */
  uint32_t generation;
  struct xent e[];              /* max entries */
};

struct xpath {
  unsigned levels;              /* node[0] = root ... node[levels-1] = leaf */
  struct xnode *node[XT_MAX_DEPTH + 1];
  uint64_t end;                 /* the leaf covers logical blocks < end */
};

static void
xt_path_free (struct xpath *p)
{
  unsigned i;

  for (i = 0; i < p->levels; ++i)
    free (p->node[i]);
  p->levels = 0;
}

/* The size of a node with room for max entries. */
static size_t
xt_node_size (unsigned max)
{
  return sizeof (struct xnode) + max * sizeof (struct xent);
}

static struct xnode *
xt_alloc (unsigned max)
{
  return calloc (1, xt_node_size (max));
}

/* A node whose entries past n are not set (nothing reads them): a
 * decoded leaf has room for eh_max entries, 340 with 4 KiB blocks,
 * and zeroing all of them for every node of every walk was a tenth
 * of the tree's CPU in random allocating writes.
 */
static struct xnode *
xt_alloc_uninit (unsigned max)
{
  struct xnode *nd = malloc (xt_node_size (max));

  if (nd != NULL)
    memset (nd, 0, sizeof *nd);
  return nd;
}

/* Decode a node (the root: the 60 bytes of i_block; else a block). */
static errcode_t
xt_decode (const void *buf, size_t size, uint64_t blk, struct xnode **ndp)
{
  const struct ext3_extent_header *eh = buf;
  struct xnode *nd;
  unsigned i;

  if (ext2fs_extent_header_verify ((void *) buf, size) ||
      ext2fs_le16_to_cpu (eh->eh_depth) > XT_MAX_DEPTH)
    return EXT2_ET_EXTENT_HEADER_BAD;
  nd = xt_alloc_uninit (ext2fs_le16_to_cpu (eh->eh_max));
  if (nd == NULL)
    return EXT2_ET_NO_MEMORY;
  nd->blk = blk;
  nd->depth = ext2fs_le16_to_cpu (eh->eh_depth);
  nd->n = ext2fs_le16_to_cpu (eh->eh_entries);
  nd->max = ext2fs_le16_to_cpu (eh->eh_max);
  nd->generation = ext2fs_le32_to_cpu (eh->eh_generation);
  for (i = 0; i < nd->n; ++i) {
    if (nd->depth == 0) {
      const struct ext3_extent *x = (const struct ext3_extent *) (eh + 1) + i;
      unsigned len = ext2fs_le16_to_cpu (x->ee_len);

      nd->e[i].lblk = ext2fs_le32_to_cpu (x->ee_block);
      nd->e[i].pblk = ext2fs_le32_to_cpu (x->ee_start) +
        ((uint64_t) ext2fs_le16_to_cpu (x->ee_start_hi) << 32);
      nd->e[i].uninit = len > EXT_INIT_MAX_LEN;
      nd->e[i].len = len > EXT_INIT_MAX_LEN ? len - EXT_INIT_MAX_LEN : len;
    }
    else {
      const struct ext3_extent_idx *x =
        (const struct ext3_extent_idx *) (eh + 1) + i;

      nd->e[i].lblk = ext2fs_le32_to_cpu (x->ei_block);
      nd->e[i].pblk = ext2fs_le32_to_cpu (x->ei_leaf) +
        ((uint64_t) ext2fs_le16_to_cpu (x->ei_leaf_hi) << 32);
    }
  }
  *ndp = nd;
  return 0;
}

static void
xt_encode (const struct xnode *nd, void *buf)
{
  struct ext3_extent_header *eh = buf;
  unsigned i;

  eh->eh_magic = ext2fs_cpu_to_le16 (EXT3_EXT_MAGIC);
  eh->eh_entries = ext2fs_cpu_to_le16 (nd->n);
  eh->eh_max = ext2fs_cpu_to_le16 (nd->max);
  eh->eh_depth = ext2fs_cpu_to_le16 (nd->depth);
  eh->eh_generation = ext2fs_cpu_to_le32 (nd->generation);
  for (i = 0; i < nd->n; ++i) {
    if (nd->depth == 0) {
      struct ext3_extent *x = (struct ext3_extent *) (eh + 1) + i;

      x->ee_block = ext2fs_cpu_to_le32 (nd->e[i].lblk);
      x->ee_len = ext2fs_cpu_to_le16 (nd->e[i].len +
                                      (nd->e[i].uninit ? EXT_INIT_MAX_LEN : 0));
      x->ee_start = ext2fs_cpu_to_le32 (nd->e[i].pblk & 0xffffffff);
      x->ee_start_hi = ext2fs_cpu_to_le16 (nd->e[i].pblk >> 32);
    }
    else {
      struct ext3_extent_idx *x = (struct ext3_extent_idx *) (eh + 1) + i;

      x->ei_block = ext2fs_cpu_to_le32 (nd->e[i].lblk);
      x->ei_leaf = ext2fs_cpu_to_le32 (nd->e[i].pblk & 0xffffffff);
      x->ei_leaf_hi = ext2fs_cpu_to_le16 (nd->e[i].pblk >> 32);
      x->ei_unused = 0;
    }
  }
}

/* The root of ip's tree.  An all-zero i_block is an empty root, as
 * ext2fs_extent_open2 would make it.
 */
static errcode_t
xt_root (struct ext4fs_inode *ip, struct xnode **ndp)
{
  static const char zero[sizeof ip->raw.i_block];

  if (memcmp (ip->raw.i_block, zero, sizeof zero) == 0) {
    *ndp = xt_alloc (4);
    if (*ndp == NULL)
      return EXT2_ET_NO_MEMORY;
    (*ndp)->max = 4;
    return 0;
  }
  return xt_decode (ip->raw.i_block, sizeof ip->raw.i_block, 0, ndp);
}

/* Extent block checksums: common/crc32c.h. */
static uint32_t
crc32c (uint32_t c, const void *buf, size_t n)
{
  return ext4fs_crc32c (c, buf, n);
}

/* The checksum of an extent block (a valid header: eh_max fits the
 * block), as ext2fs_extent_block_csum computes it: the filesystem's
 * seed, then the inode number and its generation (little-endian),
 * then the block up to its tail.  ip->raw is the inode's one copy
 * (fsi->lock held); i_generation never changes.
 */
static size_t
xt_tail_offset (const void *buf)
{
  const struct ext3_extent_header *eh = buf;

  return sizeof *eh +
    sizeof (struct ext3_extent) * ext2fs_le16_to_cpu (eh->eh_max);
}

static uint32_t
xt_csum (struct ext4fs_inode *ip, const void *buf)
{
  uint32_t ino = ext2fs_cpu_to_le32 (ip->ino);
  uint32_t gen = ext2fs_cpu_to_le32 (ip->raw.i_generation);
  uint32_t c;

  c = crc32c (ip->fsi->fs->csum_seed, &ino, sizeof ino);
  c = crc32c (c, &gen, sizeof gen);
  return crc32c (c, buf, xt_tail_offset (buf));
}

static struct ext3_extent_tail *
xt_tail (void *buf)
{
  return (struct ext3_extent_tail *) ((char *) buf + xt_tail_offset (buf));
}

/* Read-only sessions keep the index nodes they decoded, so that
 * loading a cold leaf of a deep tree reads the leaf alone, not every
 * node above it again (random reads over a file of 10 million
 * one-block extents, depth 3: three plugin reads per leaf were one).
 * Nothing changes the image under a read-only session (a replayed
 * journal is an overlay, fixed at open), so an entry never goes stale;
 * read-write sessions have the journal's cache instead, and their
 * trees change.  Direct-mapped by block number, at most
 * XT_ICACHE_SLOTS nodes (8 KiB each with 4 KiB blocks; fewer with
 * larger blocks: at most 4 MiB); an entry is
 * for one inode (a node's checksum covers its inode and generation:
 * one cross-linked into another tree is read and verified again for
 * that one).  Under fsi->lock, as every caller of xt_read.
 */
#define XT_ICACHE_SLOTS 512

struct xt_icache {
  struct {
    ext2_ino_t ino;
    uint32_t igen;
    struct xnode *nd;           /* NULL: empty */
  } slot[XT_ICACHE_SLOTS];
  unsigned long hits, misses;
};

/* The slot of block blk: of 512 with 4 KiB blocks or smaller, fewer
 * with larger blocks (at most 4 MiB of nodes), and -D
 * ext4fs.icache_slots=N fewer still.
 */
static size_t
icache_slot (const struct ext4fs_fs *fsi, uint64_t blk)
{
  unsigned n = XT_ICACHE_SLOTS;
  int d = ext4fs_debug_icache_slots;

  if (fsi->blocksize > 4096)
    n = XT_ICACHE_SLOTS / (fsi->blocksize / 4096);
  if (d > 0 && (unsigned) d < n)
    n = d;
  return blk % n;
}

/* A copy of the cached node blk of ip, or NULL. */
static struct xnode *
icache_get (struct ext4fs_inode *ip, uint64_t blk, unsigned depth)
{
  struct xt_icache *c = ip->fsi->icache;
  const struct xnode *nd;
  struct xnode *copy;
  size_t i = icache_slot (ip->fsi, blk);

  if (c == NULL)
    return NULL;
  nd = c->slot[i].nd;
  if (nd == NULL || nd->blk != blk || nd->depth != depth ||
      c->slot[i].ino != ip->ino || c->slot[i].igen != ip->raw.i_generation) {
    c->misses++;
    return NULL;
  }
  copy = xt_alloc_uninit (nd->max);
  if (copy == NULL)
    return NULL;
  memcpy (copy, nd, xt_node_size (nd->n));
  c->hits++;
  return copy;
}

static void
icache_put (struct ext4fs_inode *ip, const struct xnode *nd)
{
  struct ext4fs_fs *fsi = ip->fsi;
  struct xnode *copy;
  size_t i = icache_slot (fsi, nd->blk);

  if (fsi->icache == NULL &&
      (fsi->icache = calloc (1, sizeof *fsi->icache)) == NULL)
    return;                     /* no cache: read the nodes again */
  /* Only the entries in use (the copy out gets room for max). */
  copy = malloc (xt_node_size (nd->n));
  if (copy == NULL)
    return;
  memcpy (copy, nd, xt_node_size (nd->n));
  free (fsi->icache->slot[i].nd);
  fsi->icache->slot[i].nd = copy;
  fsi->icache->slot[i].ino = ip->ino;
  fsi->icache->slot[i].igen = ip->raw.i_generation;
}

void
bmap_icache_free (struct ext4fs_fs *fsi)
{
  struct xt_icache *c = fsi->icache;
  size_t i;

  if (c == NULL)
    return;
  nbdkit_debug ("ext4fs: extent index node cache: %lu hits, %lu misses",
                c->hits, c->misses);
  for (i = 0; i < XT_ICACHE_SLOTS; ++i)
    free (c->slot[i].nd);
  free (c);
  fsi->icache = NULL;
}

static errcode_t
xt_read (struct ext4fs_inode *ip, uint64_t blk, unsigned depth,
         struct xnode **ndp)
{
  struct ext4fs_fs *fsi = ip->fsi;
  bool cache = !fsi->rw && depth > 0;
  CLEANUP_FREE char *buf = NULL;
  errcode_t e;

  if (!fs_block_usable (fsi, blk))
    return EXT2_ET_EXTENT_HEADER_BAD;
  if (cache && (*ndp = icache_get (ip, blk, depth)) != NULL)
    return 0;
  buf = malloc (fsi->blocksize);
  if (buf == NULL)
    return EXT2_ET_NO_MEMORY;
  e = io_channel_read_blk64 (fsi->fs->io, blk, 1, buf);
  if (e)
    return e;
  /* The header first: the checksum covers what eh_max says. */
  if (ext2fs_extent_header_verify (buf, fsi->blocksize))
    return EXT2_ET_EXTENT_HEADER_BAD;
  if (ext2fs_has_feature_metadata_csum (fsi->fs->super) &&
      ext2fs_le32_to_cpu (xt_tail (buf)->et_checksum) != xt_csum (ip, buf))
    return EXT2_ET_EXTENT_CSUM_INVALID;
  e = xt_decode (buf, fsi->blocksize, blk, ndp);
  if (e == 0 && (*ndp)->depth != depth) {
    free (*ndp);
    e = EXT2_ET_EXTENT_HEADER_BAD;
  }
  if (e == 0 && cache)
    icache_put (ip, *ndp);
  return e;
}

/* Write a node other than the root into its block. */
static errcode_t
xt_write (struct ext4fs_inode *ip, const struct xnode *nd)
{
  struct ext4fs_fs *fsi = ip->fsi;
  CLEANUP_FREE char *buf = calloc (1, fsi->blocksize);

  if (buf == NULL)
    return EXT2_ET_NO_MEMORY;
  xt_encode (nd, buf);
  if (ext2fs_has_feature_metadata_csum (fsi->fs->super))
    xt_tail (buf)->et_checksum = ext2fs_cpu_to_le32 (xt_csum (ip, buf));
  return io_channel_write_blk64 (fsi->fs->io, nd->blk, 1, buf);
}

/* Walk from the root to the leaf that holds (or would hold) lblk,
 * taking at each index node the last entry that starts at or before
 * lblk, else the first, as ext2fs_extent_goto does.
 */
static errcode_t
xt_walk (struct ext4fs_inode *ip, uint64_t lblk, struct xpath *p)
{
  struct xnode *nd;
  errcode_t e;

  p->levels = 0;
  p->end = (UINT64_C (1) << 32) - 1;    /* libext2fs's last block + 1 */
  e = xt_root (ip, &nd);
  if (e)
    return e;
  p->node[p->levels++] = nd;
  while (nd->depth > 0) {
    unsigned i;

    if (nd->n == 0 || p->levels > XT_MAX_DEPTH) {
      xt_path_free (p);
      return EXT2_ET_EXTENT_HEADER_BAD;
    }
    for (i = 1; i < nd->n && nd->e[i].lblk <= lblk; ++i)
      ;
    nd->pos = i - 1;
    if (i < nd->n && nd->e[i].lblk < p->end)
      p->end = nd->e[i].lblk;
    e = xt_read (ip, nd->e[nd->pos].pblk, nd->depth - 1, &nd);
    if (e) {
      xt_path_free (p);
      return e;
    }
    p->node[p->levels++] = nd;
  }
  return 0;
}

/* Load into the partial map m the runs of the leaf of ip's tree that
 * holds (or would hold) lblk, where m does not cover them yet, and
 * cover the leaf's whole range: from the key of the entry followed at
 * the deepest index level where it is not the first (0 if none) to the
 * next entry's key at the deepest level that has one (all blocks if
 * none).  A valid tree has every extent of the leaf inside that range.
 * Parts of it m already covers are left alone (what m has there is
 * newer than any leaf loaded then, and agrees with the tree).  Caller
 * holds ip->lock exclusive and fsi->lock.
 */
static int
load_leaf (struct ext4fs_inode *ip, struct ext4fs_map *m,
           const struct xnode *leaf, uint64_t lo, uint64_t hi, bool *reset)
{
  uint64_t g = lo, gap, gend, next = lo;
  CLEANUP_FREE struct ext4fs_run *runs = NULL;
  unsigned i;

  for (i = 0; i < leaf->n; ++i) {
    const struct xent *x = &leaf->e[i];

    if (x->len == 0 || x->lblk < next || x->lblk + x->len > hi ||
        run_check (ip, x->lblk, x->pblk, x->len, next) == -1) {
      if (ip->extents)
        nbdkit_error ("inode %u: corrupt extent tree: leaf block %" PRIu64
                      ": extent at logical block %" PRIu64 " (+%u) is "
                      "empty, out of order or outside the leaf's range",
                      ip->ino, leaf->blk, x->lblk, (unsigned) x->len);
      else if (leaf->blk)
        nbdkit_error ("inode %u: corrupt indirect block %" PRIu64 ": it "
                      "maps logical block %" PRIu64 " to physical %" PRIu64,
                      ip->ino, leaf->blk, x->lblk, x->pblk);
      else
        nbdkit_error ("inode %u: corrupt direct block pointer: logical "
                      "block %" PRIu64 " to physical %" PRIu64,
                      ip->ino, x->lblk, x->pblk);
      return -1;
    }
    next = x->lblk + x->len;
  }
  if (leaf->n > 0 && (runs = malloc (leaf->n * sizeof *runs)) == NULL)
    goto nomem;
  while (g < hi) {
    size_t n = 0;

    if (runmap_covered (m, g, hi, &gap, &gend))
      break;
    g = gap;
    if (gend > hi)
      gend = hi;
    /* The gap [g, gend): the leaf's extents there, clipped to it,
     * inserted at once (a cold leaf of one-block extents is 340 runs
     * into the middle of a large map).
     */
    for (i = 0; i < leaf->n; ++i) {
      const struct xent *x = &leaf->e[i];
      uint64_t a = x->lblk > g ? x->lblk : g;
      uint64_t b = x->lblk + x->len < gend ? x->lblk + x->len : gend;
      struct ext4fs_run r;

      if (a >= b)
        continue;
      if (x->uninit && (a != x->lblk || b != x->lblk + x->len)) {
        /* Each unwritten run must be one whole extent
         * (bmap_convert_locked): start again with nothing covered.
         */
        *reset = true;
        return 0;
      }
      r = (struct ext4fs_run) {
        .lblk = a, .pblk = x->pblk + (a - x->lblk), .len = b - a,
        .unwritten = x->uninit,
      };
      if (n > 0 && runs_mergeable (&runs[n - 1], &r))
        runs[n - 1].len += r.len;
      else
        runs[n++] = r;
    }
    if ((n > 0 &&
         runmap_insert_many (m, runmap_after (m, runs[0].lblk), runs,
                             n) == -1) ||
        runmap_cover (m, g, gend) == -1) {
      /* Out of memory half way: take this gap's runs out again
       * (removing never allocates).  The gap had none before, and a
       * run outside what the map covers would be in the way of the
       * next load of it.
       */
      struct runmap_pos p = runmap_after (m, g), q;

      if (runmap_prev (m, p, &q) && runmap_at (m, q)->lblk >= g)
        p = q;
      while (runmap_valid (m, p) && runmap_at (m, p)->lblk < gend)
        p = runmap_remove (m, p);
      goto nomem;
    }
    g = gend;
  }
  return 0;

 nomem:
  nbdkit_error ("malloc: %m");
  return -1;
}

/* The partial map of a file of indirect blocks is loaded by the
 * region one block of pointers maps: the 12 direct blocks, or the
 * apb (blocksize / 4) blocks of one indirect block at the bottom of the
 * single, double or triple tree; a zero pointer higher up is a hole
 * over everything below it.  Found by walking down from i_block to
 * the pointer block that maps lblk (through the io channel, so that
 * the journal's running transaction is seen), each pointer block
 * checked as the whole-map builder checks it, and loaded with
 * load_leaf as a leaf of one-block extents, merged where contiguous.
 * Blocks at or past the end of the file are left out, as the builder
 * never reads them.  Caller holds ip->lock exclusive and fsi->lock.
 */
static int
load_indirect (struct ext4fs_inode *ip, struct ext4fs_map *m, uint64_t lblk,
               int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  const uint64_t apb = fsi->blocksize / 4;
  const uint64_t nblocks = (ip->size + fsi->blocksize - 1) >> fsi->blockbits;
  const uint32_t *ptrs = ip->raw.i_block; /* the pointers of the region */
  uint64_t lo, hi, span, blk = 0;
  CLEANUP_FREE uint32_t *buf = NULL;
  CLEANUP_FREE struct xnode *leaf = NULL;
  unsigned levels, slot, i;
  bool reset = false;

  if (lblk < EXT2_NDIR_BLOCKS) {
    lo = 0;
    hi = EXT2_NDIR_BLOCKS;
    levels = 0;
  }
  else {
    lo = EXT2_NDIR_BLOCKS;
    for (levels = 1, span = apb; ; ++levels, span *= apb) {
      if (levels > 3) {
        /* Past what indirect blocks can map: nothing there. */
        lo = bmap_map_limit (ip);
        hi = UINT64_MAX;
        levels = 0;
        ptrs = NULL;
        break;
      }
      if (lblk - lo < span) {
        slot = EXT2_IND_BLOCK + levels - 1;
        hi = lo + span;
        blk = ip->raw.i_block[slot]; /* in memory: host order */
        break;
      }
      lo += span;
    }
    /* Down the tree: at each level the pointer to the child whose
     * span holds lblk.
     */
    while (levels > 0) {
      if (blk == 0) {
        ptrs = NULL;              /* a hole over [lo, hi) */
        break;
      }
      if (!fs_block_usable (fsi, blk)) {
        nbdkit_error ("inode %u: corrupt indirect block number %" PRIu64,
                      ip->ino, blk);
        *err = EIO;
        return -1;
      }
      if (buf == NULL && (buf = malloc (fsi->blocksize)) == NULL) {
        nbdkit_error ("malloc: %m");
        *err = errno;
        return -1;
      }
      {
        errcode_t e = io_channel_read_blk64 (fsi->fs->io, blk, 1, buf);
        if (e) {
          nbdkit_error ("inode %u: indirect block %" PRIu64 ": %s",
                        ip->ino, blk, error_message (e));
          *err = EIO;
          return -1;
        }
      }
      ptrs = buf;
      if (levels == 1)
        break;
      span = (hi - lo) / apb;     /* of each child */
      i = (lblk - lo) / span;
      lo += i * span;
      hi = lo + span;
      blk = ext2fs_le32_to_cpu (buf[i]);
      --levels;
    }
  }

  leaf = xt_alloc (apb > EXT2_NDIR_BLOCKS ? apb : EXT2_NDIR_BLOCKS);
  if (leaf == NULL) {
    nbdkit_error ("calloc: %m");
    *err = errno;
    return -1;
  }
  leaf->blk = ptrs == buf ? blk : 0;
  if (ptrs) {
    uint64_t n = hi - lo;

    for (i = 0; i < n && lo + i < nblocks; ++i) {
      /* (i_block is in host order in memory, blocks on disk are
       * little-endian.)
       */
      uint64_t p = ptrs == buf ? ext2fs_le32_to_cpu (ptrs[i]) : ptrs[i];
      struct xent *x = leaf->n ? &leaf->e[leaf->n - 1] : NULL;

      if (p == 0)
        continue;
      if (x && x->lblk + x->len == lo + i && x->pblk + x->len == p)
        x->len++;
      else
        leaf->e[leaf->n++] = (struct xent) { .lblk = lo + i, .pblk = p,
                                             .len = 1 };
    }
  }
  if (load_leaf (ip, m, leaf, lo, hi, &reset) == -1) {
    *err = EIO;
    return -1;
  }
  assert (!reset);              /* no unwritten runs */
  return 0;
}

int
bmap_load_locked (struct ext4fs_inode *ip, struct ext4fs_map *m,
                  uint64_t lblk, bool *was_reset, int *err)
{
  if (!ip->extents)
    return load_indirect (ip, m, lblk, err);

  struct xpath p;
  uint64_t lo = 0, hi = UINT64_MAX;
  bool reset = false, sorted = true;
  unsigned l;
  errcode_t e;
  int r;

  e = xt_walk (ip, lblk, &p);
  if (e) {
    nbdkit_error ("inode %u: extent tree: %s", ip->ino, error_message (e));
    *err = EIO;
    return -1;
  }
  for (l = 0; l + 1 < p.levels; ++l) {
    const struct xnode *nd = p.node[l];
    unsigned i;

    /* Keys out of order would give leaves overlapping ranges. */
    for (i = 1; i < nd->n; ++i)
      if (nd->e[i].lblk <= nd->e[i - 1].lblk)
        sorted = false;
    if (nd->pos > 0 && nd->e[nd->pos].lblk > lo)
      lo = nd->e[nd->pos].lblk;
    if (nd->pos + 1 < nd->n && nd->e[nd->pos + 1].lblk < hi)
      hi = nd->e[nd->pos + 1].lblk;
  }
  if (!sorted || !(lo <= lblk && lblk < hi)) {
    nbdkit_error ("inode %u: corrupt extent tree: index entries out of "
                  "order near logical block %" PRIu64, ip->ino, lblk);
    xt_path_free (&p);
    *err = EIO;
    return -1;
  }
  r = load_leaf (ip, m, p.node[p.levels - 1], lo, hi, &reset);
  if (r == 0 && reset && *was_reset) {
    /* Twice in one request: only leaves with overlapping ranges do
     * that.
     */
    nbdkit_error ("inode %u: corrupt extent tree: leaves overlap near "
                  "logical block %" PRIu64, ip->ino, lblk);
    r = -1;
  }
  else if (r == 0 && reset) {
    *was_reset = true;
    if (runmap_keep (m, 0, 0) == -1) {
      nbdkit_error ("malloc: %m");
      r = -1;
    }
    else {
      reset = false;
      r = load_leaf (ip, m, p.node[p.levels - 1], lo, hi, &reset);
      if (r == 0 && reset)
        abort ();               /* nothing covered: nothing clips */
    }
  }
  xt_path_free (&p);
  if (r == -1)
    *err = EIO;
  return r;
}

/* The next run of m at or after position *p, clipped to [a, b) and
 * merged with the written runs that continue it, as one map or another
 * may have them split.  False at the end.
 */
static bool
norm_next (const struct ext4fs_map *m, struct runmap_pos *p, uint64_t a,
           uint64_t b, struct ext4fs_run *out)
{
  bool have = false;

  for (; runmap_valid (m, *p); *p = runmap_next (m, *p)) {
    struct ext4fs_run r = *runmap_at (m, *p);
    uint64_t x = r.lblk > a ? r.lblk : a;
    uint64_t y = r.lblk + r.len < b ? r.lblk + r.len : b;

    if (r.lblk >= b)
      break;
    if (x >= y)
      continue;
    r.pblk += x - r.lblk;
    r.lblk = x;
    r.len = y - x;
    if (!have) {
      *out = r;
      have = true;
    }
    else if (!out->unwritten && !r.unwritten &&
             out->lblk + out->len == r.lblk &&
             out->pblk + out->len == r.pblk)
      out->len += r.len;        /* (only compared: no overflow matters) */
    else
      break;
  }
  return have;
}

bool
bmap_map_check (const struct ext4fs_map *m, const struct ext4fs_map *disk)
{
  struct runmap_span all = { 0, UINT64_MAX };
  const struct runmap_span *sp = m->partial ? m->cov : &all;
  size_t ns = m->partial ? m->ncov : 1, i;

  for (i = 0; i < ns; ++i) {
    uint64_t a = sp[i].a, b = sp[i].b;
    struct runmap_pos p = runmap_after (m, a), q = runmap_after (disk, a);
    struct ext4fs_run x, y;
    bool hx, hy;

    runmap_prev (m, p, &p);
    runmap_prev (disk, q, &q);
    for (;;) {
      hx = norm_next (m, &p, a, b, &x);
      hy = norm_next (disk, &q, a, b, &y);
      if (hx != hy)
        return false;
      if (!hx)
        break;
      if (x.lblk != y.lblk || x.pblk != y.pblk || x.len != y.len ||
          x.unwritten != y.unwritten)
        return false;
    }
  }
  return true;
}

/* Blocks for new nodes that committing n entries at level l needs. */
static unsigned
xt_blocks_needed (const struct xpath *p, unsigned l, unsigned n)
{
  if (n <= p->node[l]->max)
    return 0;
  if (l == 0)
    return 1;                   /* the tree grows a level */
  return 2 + xt_blocks_needed (p, l - 1, p->node[l - 1]->n + 1);
}

struct xt_commit {
  uint64_t newblk[2 * (XT_MAX_DEPTH + 1)];
  unsigned nnew;                /* new nodes (allocated, maybe written) */
  uint64_t oldblk[XT_MAX_DEPTH + 1];
  unsigned nold;                /* nodes they replace: freed after */
  bool committed;               /* a node was written in place (or tried) */
  bool index_only;              /* since then: only index starts follow */
  bool root_changed;            /* ip->raw.i_block changed: write the inode */
};

static errcode_t
xt_new_node (struct ext4fs_inode *ip, struct xt_commit *c, uint64_t goal,
             unsigned depth, const struct xent *e, unsigned n,
             uint64_t *blkp)
{
  struct ext4fs_fs *fsi = ip->fsi;
  ext2_filsys fs = fsi->fs;
  CLEANUP_FREE struct xnode *nd = NULL;
  unsigned max = (fsi->blocksize - sizeof (struct ext3_extent_header)) /
    sizeof (struct ext3_extent);
  blk64_t b;
  errcode_t e2;

  e2 = ext2fs_new_block2 (fs, goal, NULL, &b);
  if (e2)
    return e2;
  if (!fs_block_usable (fsi, b))
    return EXT2_ET_BLOCK_ALLOC_FAIL;
  ext2fs_block_alloc_stats2 (fs, b, +1);
  c->newblk[c->nnew++] = b;
  nd = xt_alloc (max);
  if (nd == NULL)
    return EXT2_ET_NO_MEMORY;
  nd->blk = b;
  nd->depth = depth;
  nd->n = n;
  nd->max = max;
  memcpy (nd->e, e, n * sizeof e[0]);
  *blkp = b;
  return xt_write (ip, nd);
}

/* Make e[0..n) the entries of the node at level l of p: see above.
 * If they do not fit, the node is split into two new nodes that the
 * parent gets instead of it; if the root does not fit, its entries
 * move to a new node the root then points to.  After a write in
 * place, if the node's first block changed, the parent's index
 * follows (a separate write, after the commit).
 */
static errcode_t
xt_commit (struct ext4fs_inode *ip, struct xpath *p, unsigned l,
           const struct xent *e, unsigned n, struct xt_commit *c)
{
  struct xnode *nd = p->node[l], *parent = l > 0 ? p->node[l - 1] : NULL;
  uint64_t goal = nd->n > 0 ? nd->e[0].pblk : 0, b1, b2;
  CLEANUP_FREE struct xent *pe = NULL;
  unsigned half = n / 2, pos;
  errcode_t err;

  if (n <= nd->max) {
    if (e != nd->e)
      memmove (nd->e, e, n * sizeof e[0]);
    nd->n = n;
    if (l == 0) {
      xt_encode (nd, ip->raw.i_block);
      c->root_changed = true;
      return 0;
    }
    /* Failed or not, this write may have reached the disk. */
    c->committed = true;
    err = xt_write (ip, nd);
    if (err)
      return err;
    if (n == 0 || parent->e[parent->pos].lblk == e[0].lblk)
      return 0;
    /* The parent's index follows our first block. */
    pe = malloc (parent->n * sizeof pe[0]);
    if (pe == NULL)
      return EXT2_ET_NO_MEMORY;
    memcpy (pe, parent->e, parent->n * sizeof pe[0]);
    pe[parent->pos].lblk = e[0].lblk;
    c->index_only = true;
    return xt_commit (ip, p, l - 1, pe, parent->n, c);
  }
  if (l == 0) {
    /* The tree grows a level: the root's entries move to a new node. */
    if (nd->depth >= XT_MAX_DEPTH)
      return EXT2_ET_CANT_INSERT_EXTENT;
    err = xt_new_node (ip, c, goal, nd->depth, e, n, &b1);
    if (err)
      return err;
    nd->depth++;
    nd->n = 1;
    nd->e[0] = (struct xent) { .lblk = e[0].lblk, .pblk = b1 };
    xt_encode (nd, ip->raw.i_block);
    c->root_changed = true;
    return 0;
  }
  /* Split into two new nodes, which replace this one in the parent. */
  err = xt_new_node (ip, c, goal, nd->depth, e, half, &b1);
  if (err == 0)
    err = xt_new_node (ip, c, goal, nd->depth, e + half, n - half, &b2);
  if (err)
    return err;
  pe = malloc ((parent->n + 1) * sizeof pe[0]);
  if (pe == NULL)
    return EXT2_ET_NO_MEMORY;
  pos = parent->pos;
  memcpy (pe, parent->e, pos * sizeof pe[0]);
  pe[pos] = (struct xent) { .lblk = e[0].lblk, .pblk = b1 };
  pe[pos + 1] = (struct xent) { .lblk = e[half].lblk, .pblk = b2 };
  memcpy (&pe[pos + 2], &parent->e[pos + 1],
          (parent->n - pos - 1) * sizeof pe[0]);
  c->oldblk[c->nold++] = nd->blk;
  return xt_commit (ip, p, l - 1, pe, parent->n + 1, c);
}

/* In the leaf of p, replace entries [first, first+count) by
 * add[0..nadd) as one atomic change (see above), and change i_blocks
 * by data_delta (data blocks mapped or unmapped with it) and by the
 * nodes added or removed.  p is used up.  Returns 0 (done); -1
 * (nothing changed; ENOSPC: no blocks for new nodes); -2 (the commit
 * may or may not have reached the disk: the filesystem is marked
 * broken); 1 (the change is in the tree, but a write after the commit
 * failed: an index start (broken) or the inode (not clean, written
 * again later)); *err is set after nbdkit_error unless 0 is
 * returned.  Caller holds ip->lock exclusive and fsi->lock.
 */
static int
xt_replace_locked (struct ext4fs_inode *ip, struct xpath *p, unsigned first,
                   unsigned count, const struct xent *add, unsigned nadd,
                   int64_t data_delta, uint64_t own_reserve, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  ext2_filsys fs = fsi->fs;
  struct xnode *leaf = p->node[p->levels - 1];
  struct ext2_inode_large saved = ip->raw;
  struct xt_commit c = { .nnew = 0 };
  unsigned n = leaf->n - count + nadd, need, i;
  CLEANUP_FREE struct xent *e = NULL;
  struct xent *ents;
  uint64_t keep;
  int64_t delta;
  errcode_t e2;
  int r = 0;

  /* Blocks promised to other changes under way are not ours to take
   * (own_reserve: what our caller reserved, bmap_alloc_locked).
   */
  need = xt_blocks_needed (p, p->levels - 1, n);
  keep = fsi->meta_reserved > own_reserve ? fsi->meta_reserved - own_reserve : 0;
  if (need > 0 && need + keep > ext2fs_free_blocks_count (fs->super)) {
    xt_path_free (p);
    nbdkit_error ("inode %u: no space left for %u extent tree block(s)",
                  ip->ino, need);
    *err = ENOSPC;
    return -1;
  }
  if (bmap_iblk_room_locked (ip, need + (data_delta > 0 ? data_delta : 0),
                        err) == -1) {
    xt_path_free (p);
    return -1;
  }
  if (n <= leaf->max) {
    /* It fits: edit the decoded leaf in place (the path is ours, and
     * add is never in it), moving only the entries after the change.
     */
    memmove (&leaf->e[first + nadd], &leaf->e[first + count],
             (leaf->n - first - count) * sizeof leaf->e[0]);
    memcpy (&leaf->e[first], add, nadd * sizeof add[0]);
    ents = leaf->e;
  }
  else {
    e = malloc (n * sizeof *e);
    if (e == NULL) {
      xt_path_free (p);
      *err = ENOMEM;
      nbdkit_error ("malloc: %m");
      return -1;
    }
    memcpy (e, leaf->e, first * sizeof e[0]);
    memcpy (&e[first], add, nadd * sizeof e[0]);
    memcpy (&e[first + nadd], &leaf->e[first + count],
            (leaf->n - first - count) * sizeof e[0]);
    ents = e;
  }
  e2 = xt_commit (ip, p, p->levels - 1, ents, n, &c);
  xt_path_free (p);

  if (e2 && !c.committed) {
    /* Nothing references the new nodes: the old tree stands. */
    ip->raw = saved;
    for (i = 0; i < c.nnew; ++i)
      bmap_free_locked (fsi, c.newblk[i], 1);
    extent_error (ip, "changing the extent tree", e2, err);
    if (e2 == EXT2_ET_BLOCK_ALLOC_FAIL)
      *err = ENOSPC;
    else if (e2 == EXT2_ET_CANT_INSERT_EXTENT)
      *err = EFBIG;             /* the tree would be too deep */
    return -1;
  }

  delta = data_delta + (int64_t) c.nnew - (int64_t) c.nold;
  if (delta > 0)
    ext2fs_iblk_add_blocks (fs, (struct ext2_inode *) &ip->raw, delta);
  else if (delta < 0)
    ext2fs_iblk_sub_blocks (fs, (struct ext2_inode *) &ip->raw, -delta);
  if (!c.committed) {
    /* Only the root changed: writing the inode is the commit. */
    if (inode_write_locked (ip, err) == -1) {
      fs_set_broken_locked (fsi, "writing the root of an extent tree");
      return -2;
    }
  }
  else {
    if (e2 && !c.index_only) {
      /* The commit itself failed: it may or may not be on disk. */
      extent_error (ip, "changing the extent tree", e2, err);
      fs_set_broken_locked (fsi, "writing an extent tree node");
      return -2;
    }
    if (e2) {
      /* After the commit: an index start did not follow its child. */
      extent_error (ip, "updating an extent index", e2, err);
      fs_set_broken_locked (fsi, "updating an extent index");
      r = 1;
    }
    if (c.root_changed || delta != 0) {
      int err2;

      if (inode_write_locked (ip, r ? &err2 : err) == -1)
        r = 1;                  /* in memory it is right: not clean */
    }
  }
  for (i = 0; i < c.nold; ++i)
    bmap_free_locked (fsi, c.oldblk[i], 1);
  return r;
}

static bool
xt_mergeable (const struct xent *a, const struct xent *b)
{
  return !a->uninit && !b->uninit &&
    a->lblk + a->len == b->lblk && a->pblk + a->len == b->pblk &&
    (uint64_t) a->len + b->len <= EXT_INIT_MAX_LEN;
}

/* Insert a written extent of at most EXT_INIT_MAX_LEN blocks into a
 * hole of an extent-mapped file, merged with its neighbours in the
 * leaf when they are contiguous.  It may map fewer blocks than len
 * (up to where the leaf's range ends): *done says how many.  Returns
 * as xt_replace_locked; on -2 the blocks may be mapped.
 */
static int
extent_insert_one (struct ext4fs_inode *ip, uint64_t lblk, uint64_t pblk,
                   uint32_t len, uint64_t reserved, uint64_t *done, int *err)
{
  struct xpath p;
  struct xnode *leaf;
  struct xent x = { .lblk = lblk, .pblk = pblk, .len = len };
  uint64_t end;
  unsigned ins, first, count = 0;
  errcode_t e;

  *done = 0;
  if (lblk >= (UINT64_C (1) << 32) - 1 ||
      len > (UINT64_C (1) << 32) - 1 - lblk) {
    nbdkit_error ("inode %u: logical block %" PRIu64 " is beyond what "
                  "extents can map", ip->ino, lblk + len - 1);
    *err = EFBIG;
    return -1;
  }
  e = xt_walk (ip, lblk, &p);
  if (e)
    return extent_error (ip, "extent tree", e, err);
  leaf = p.node[p.levels - 1];
  for (ins = 0; ins < leaf->n && leaf->e[ins].lblk < lblk; ++ins)
    ;
  end = p.end;
  if (ins < leaf->n && leaf->e[ins].lblk < end)
    end = leaf->e[ins].lblk;
  if ((ins > 0 && leaf->e[ins - 1].lblk + leaf->e[ins - 1].len > lblk) ||
      end <= lblk) {
    xt_path_free (&p);
    nbdkit_error ("inode %u: logical block %" PRIu64 " is already mapped",
                  ip->ino, lblk);
    *err = EIO;
    return -1;
  }
  if (x.len > end - lblk)
    x.len = end - lblk;
  *done = x.len;
  first = ins;
  if (ins > 0 && xt_mergeable (&leaf->e[ins - 1], &x)) {
    first--;
    count++;
    x.lblk = leaf->e[first].lblk;
    x.pblk = leaf->e[first].pblk;
    x.len += leaf->e[first].len;
  }
  if (ins < leaf->n && xt_mergeable (&x, &leaf->e[ins])) {
    count++;
    x.len += leaf->e[ins].len;
  }
  return xt_replace_locked (ip, &p, first, count, &x, 1, *done, reserved,
                            err);
}

int
bmap_insert_locked (struct ext4fs_inode *ip, uint64_t lblk, uint64_t pblk,
                    uint64_t len, uint64_t reserved, uint64_t *mapped,
                    int *err)
{
  ext2_filsys fs = ip->fsi->fs;
  errcode_t e;
  uint64_t i;
  int r = 0;

  if (ip->extents) {
    /* Each piece is complete in the tree, i_blocks and the inode
     * included, before the next.
     */
    for (i = 0; i < len; ) {
      uint32_t n = len - i > EXT_INIT_MAX_LEN ? EXT_INIT_MAX_LEN : len - i;
      uint64_t done;

      r = extent_insert_one (ip, lblk + i, pblk + i, n, reserved, &done, err);
      if (r != -1)
        i += done;              /* mapped (-2: maybe): never free these */
      if (r != 0)
        break;
    }
    *mapped = i;
    bmap_free_locked (ip->fsi, pblk + i, len - i);
    return r == 0 ? 0 : -1;
  }

  for (i = 0; i < len; ++i) {
    blk64_t p = pblk + i;
    struct ext4fs_io_counts before;

    /* This allocates (and zeroes) indirect blocks as needed and
     * writes them, and the inode if it changed.
     */
    ext4fs_io_counts (&before);
    e = ext2fs_bmap2 (fs, ip->ino, (struct ext2_inode *) &ip->raw, NULL,
                      BMAP_ALLOC | BMAP_SET, lblk + i, NULL, &p);
    r = change_done_locked (ip, &before, e, false, "mapping a block", err);
    if (r == -2)
      i++;                      /* maybe mapped */
    if (r < 0)
      break;
  }
  /* Blocks [pblk, pblk+i) are (or may be) mapped: they stay
   * allocated and i_blocks counts them.  The rest is not referenced:
   * free it.
   */
  *mapped = i;
  bmap_free_locked (ip->fsi, pblk + i, len - i);
  if (i == 0)
    return -1;
  e = ext2fs_iblk_add_blocks (fs, (struct ext2_inode *) &ip->raw, i);
  if (e) {
    extent_error (ip, "block count", e, err);
    fs_set_broken_locked (ip->fsi, "inode block count");
    return -1;
  }
  if (r < 0) {
    int err2;
    inode_write_locked (ip, &err2);
    return -1;
  }
  return inode_write_locked (ip, err);
}

int
bmap_convert_locked (struct ext4fs_inode *ip, uint64_t lblk, uint64_t len,
                     bool to_unwritten, bool *converted, int *err)
{
  uint64_t end = lblk + len;

  *converted = false;
  /* One on-disk extent at a time (a written run of the map may span
   * several), each an atomic change of its own.
   */
  while (lblk < end) {
    struct xpath p;
    struct xnode *leaf;
    struct xent ex, pieces[3];
    unsigned npieces = 0, idx, first, count = 1;
    uint64_t ex_end, pend;
    errcode_t e;
    int r;

    e = xt_walk (ip, lblk, &p);
    if (e)
      return extent_error (ip, "extent tree", e, err);
    leaf = p.node[p.levels - 1];
    for (idx = 0; idx < leaf->n && leaf->e[idx].lblk + leaf->e[idx].len <= lblk;
         ++idx)
      ;
    if (idx == leaf->n || leaf->e[idx].lblk > lblk ||
        leaf->e[idx].uninit == to_unwritten) {
      xt_path_free (&p);
      nbdkit_error ("inode %u: block %" PRIu64 " is not in a %s extent",
                    ip->ino, lblk, to_unwritten ? "written" : "unwritten");
      *err = EIO;
      return -1;
    }
    ex = leaf->e[idx];
    ex_end = ex.lblk + ex.len;
    pend = end < ex_end ? end : ex_end;
    if (to_unwritten && pend - lblk > EXT_UNINIT_MAX_LEN)
      pend = lblk + EXT_UNINIT_MAX_LEN;

    first = idx;
    if (ex.lblk < lblk)
      pieces[npieces++] = (struct xent) {
        .lblk = ex.lblk, .pblk = ex.pblk, .len = lblk - ex.lblk,
        .uninit = ex.uninit,
      };
    pieces[npieces++] = (struct xent) {
      .lblk = lblk, .pblk = ex.pblk + (lblk - ex.lblk), .len = pend - lblk,
      .uninit = to_unwritten,
    };
    if (pend < ex_end)
      pieces[npieces++] = (struct xent) {
        .lblk = pend, .pblk = ex.pblk + (pend - ex.lblk), .len = ex_end - pend,
        .uninit = ex.uninit,
      };
    if (!to_unwritten) {
      /* The written piece joins written neighbours in this leaf, as
       * the kernel merges, so that sequential writes into unwritten
       * extents end as few extents.
       */
      struct xent *mid = &pieces[ex.lblk < lblk ? 1 : 0];

      if (mid == &pieces[0] && idx > 0 &&
          xt_mergeable (&leaf->e[idx - 1], mid)) {
        first--;
        count++;
        mid->len += leaf->e[idx - 1].len;
        mid->lblk = leaf->e[idx - 1].lblk;
        mid->pblk = leaf->e[idx - 1].pblk;
      }
      if (mid == &pieces[npieces - 1] && idx + 1 < leaf->n &&
          xt_mergeable (mid, &leaf->e[idx + 1])) {
        count++;
        mid->len += leaf->e[idx + 1].len;
      }
    }
    r = xt_replace_locked (ip, &p, first, count, pieces, npieces, 0, 0, err);
    if (r < 0)
      return -1;
    if (pend >= end)
      *converted = true;
    if (r > 0)
      return -1;
    lblk = pend;
  }
  return 0;
}

/* Punch logical [s, s+n), strictly inside one extent: it becomes two,
 * in one atomic change (ext2fs_punch inserts the right part first and
 * then cuts the extent: two writes, with overlapping extents between
 * them).  Returns 1 if [s, s+n) is not strictly inside one extent (the
 * caller punches with libext2fs), else 0 or -1.
 */
static int
punch_split_locked (struct ext4fs_inode *ip, uint64_t s, uint64_t n,
                    int *err)
{
  struct xpath p;
  struct xnode *leaf;
  struct xent ex, pieces[2];
  unsigned idx;
  errcode_t e;
  int r;

  e = xt_walk (ip, s, &p);
  if (e)
    return extent_error (ip, "extent tree", e, err);
  leaf = p.node[p.levels - 1];
  for (idx = 0; idx < leaf->n && leaf->e[idx].lblk + leaf->e[idx].len <= s;
       ++idx)
    ;
  if (idx == leaf->n || leaf->e[idx].lblk >= s ||
      leaf->e[idx].lblk + leaf->e[idx].len <= s + n) {
    xt_path_free (&p);
    return 1;
  }
  ex = leaf->e[idx];
  pieces[0] = (struct xent) {
    .lblk = ex.lblk, .pblk = ex.pblk, .len = s - ex.lblk, .uninit = ex.uninit,
  };
  pieces[1] = (struct xent) {
    .lblk = s + n, .pblk = ex.pblk + (s + n - ex.lblk),
    .len = ex.lblk + ex.len - (s + n), .uninit = ex.uninit,
  };
  r = xt_replace_locked (ip, &p, idx, 1, pieces, 2, -(int64_t) n, 0, err);
  if (r < 0)
    return -1;                  /* -2: the blocks may be mapped: keep them */
  bmap_free_locked (ip->fsi, ex.pblk + (s - ex.lblk), n);
  return r == 0 ? 0 : -1;
}

/* Unmap logical block lblk, mapped to the filesystem's last block
 * pblk and the last block of its extent (see bmap_punch_locked).
 */
static int
unmap_last_block_locked (struct ext4fs_inode *ip, uint64_t lblk,
                         uint64_t pblk, int *err)
{
  ext2_filsys fs = ip->fsi->fs;
  ext2_extent_handle_t h;
  struct ext2fs_extent ex;
  struct ext4fs_io_counts before;
  errcode_t e;

  ext4fs_io_counts (&before);
  e = ext2fs_extent_open2 (fs, ip->ino, (struct ext2_inode *) &ip->raw, &h);
  if (e)
    return change_done_locked (ip, &before, e, false, "extent open", err);
  e = ext2fs_extent_goto (h, lblk);
  if (e == 0)
    e = ext2fs_extent_get (h, EXT2_EXTENT_CURRENT, &ex);
  if (e == 0 && (ex.e_lblk + ex.e_len - 1 != lblk ||
                 ex.e_pblk + ex.e_len - 1 != pblk))
    e = EXT2_ET_EXTENT_NOT_FOUND;
  if (e == 0) {
    if (ex.e_len == 1) {
      e = ext2fs_extent_delete (h, 0);
      if (e == 0) {
        e = ext2fs_extent_fix_parents (h);
        if (e == EXT2_ET_NO_CURRENT_NODE)
          e = 0;
      }
    }
    else {
      ex.e_len--;
      e = ext2fs_extent_replace (h, 0, &ex);
    }
  }
  ext2fs_extent_free (h);
  if (change_done_locked (ip, &before, e, false, "unmapping the last block",
                          err) < 0)
    return -1;
  bmap_free_locked (ip->fsi, pblk, 1);
  ext2fs_iblk_sub_blocks (fs, (struct ext2_inode *) &ip->raw, 1);
  return inode_write_locked (ip, err);
}

/* libext2fs 1.47.0's punch overflows for ranges of 2^31 blocks or more
 * (fixed in 1.47.3): punch in bounded pieces.
 */
#define PUNCH_CHUNK (1u << 24)

int
bmap_punch_locked (struct ext4fs_inode *ip, const struct ext4fs_map *map,
                   uint64_t lblk, uint64_t len, int *err)
{
  struct ext4fs_fs *fsi = ip->fsi;
  ext2_filsys fs = fsi->fs;
  struct bmap_walk w;
  struct bmap_seg seg;
  errcode_t e;

  bmap_walk_blocks (&w, map, fsi->blockbits, lblk, lblk + len);
  w.max_blocks = PUNCH_CHUNK;
  while (bmap_walk_next (&w, &seg)) {
    const struct ext4fs_run *r = seg.run;
    uint64_t s = seg.lblk, n = seg.end - seg.lblk;

    if (r == NULL)
      continue;
    if (ip->extents) {
      /* Strictly inside one extent: split it ourselves (see
       * punch_split_locked).  Else every step of ext2fs_punch is one
       * write that leaves a valid tree: cutting an extent's head or
       * tail, deleting an extent, then an emptied node from its
       * parent.
       */
      int split = punch_split_locked (ip, s, n, err);
      uint64_t pend = r->pblk + (s - r->lblk) + n;
      bool last;

      if (split == -1)
        return -1;
      if (split == 0)
        continue;

      /* libext2fs 1.47.0 refuses to free a range that ends at the last
       * block of the filesystem (off by one, fixed in 1.47.4): punch
       * the rest, and unmap that block ourselves.
       */
      last = pend == fsi->blocks_count;

      if (n - last > 0) {
        struct ext4fs_io_counts before;

        /* It writes the inode at the end.  Read errors count: after a
         * failed ext2fs_extent_goto it goes on from a wrong place.
         */
        ext4fs_io_counts (&before);
        e = ext2fs_punch (fs, ip->ino, (struct ext2_inode *) &ip->raw, NULL,
                          s, s + n - last - 1);
        if (change_done_locked (ip, &before, e, true, "punching an extent",
                                err) < 0)
          return -1;
      }
      if (last && unmap_last_block_locked (ip, s + n - 1, pend - 1, err) == -1)
        return -1;
    }
    else {
      /* libext2fs 1.47.0's indirect punch removes blocks past the
       * range (fixed in 1.47.4): unmap block by block ourselves.
       * Indirect blocks that become empty stay allocated.
       */
      uint64_t i;

      for (i = 0; i < n; ++i) {
        blk64_t zero = 0;
        struct ext4fs_io_counts before;
        int rr;

        ext4fs_io_counts (&before);
        e = ext2fs_bmap2 (fs, ip->ino, (struct ext2_inode *) &ip->raw, NULL,
                          BMAP_SET, s + i, NULL, &zero);
        rr = change_done_locked (ip, &before, e, false, "unmapping a block",
                                 err);
        if (rr == -1 && i == 0)
          return -1;
        if (rr == -1)
          break;                /* blocks before it are unmapped */
        if (rr == -2)
          return -1;            /* broken: never free what may be mapped */
        bmap_free_locked (fsi, r->pblk + (s + i - r->lblk), 1);
        ext2fs_iblk_sub_blocks (fs, (struct ext2_inode *) &ip->raw, 1);
      }
      if (i < n) {
        int err2;
        inode_write_locked (ip, &err2);
        return -1;
      }
      if (inode_write_locked (ip, err) == -1)
        return -1;
    }
  }
  return 0;
}
