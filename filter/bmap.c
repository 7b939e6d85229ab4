/* ext4fs: block mapping.
 *
 * Owns: reading a file's block map (extent tree or indirect blocks)
 * into sorted runs, validating every physical block number against
 * the filesystem; the allocator front end (reserve, goal, contiguous
 * ranges); and the changes to a map: inserting written extents into
 * holes, converting unwritten extents, mapping blocks of indirect
 * files.
 *
 * Locks: every function here that calls libext2fs is *_locked: the
 * caller holds fsi->lock.  Functions that change a map also require
 * ip->lock held exclusive (and call inode_map_changed themselves? no:
 * the caller does, once, after all changes of one request).
 *
 * libext2fs calls used, all under fsi->lock: ext2fs_extent_open2 /
 * get / goto / replace / insert / fix_parents / free (on ip->raw, the
 * one inode copy, or a private copy when only reading),
 * ext2fs_block_iterate3 (read-only), ext2fs_bmap2 (BMAP_ALLOC|BMAP_SET
 * on ip->raw; it allocates indirect blocks and writes the inode, but
 * for indirect files never re-reads it), ext2fs_new_range,
 * ext2fs_block_alloc_stats_range, ext2fs_iblk_add_blocks.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bmap.h"
#include "cleanup.h"

/* Blocks kept free beyond the root reserve, for extent tree and
 * indirect blocks that libext2fs allocates on its own while we map.
 */
#define META_MARGIN 64

/* The cached map of one file holds at most this many runs (24 bytes
 * each, so 96 MiB): the documented bound on map memory per open file.
 * A file more fragmented than this (or a corrupt one) cannot be
 * opened.
 */
#define MAX_RUNS (4 * 1024 * 1024)

struct builder {
  struct ext4fs_inode *ip;
  struct ext4fs_map *map;
  uint64_t next_lblk;           /* runs must not overlap */
  uint64_t nblocks;             /* blocks covering i_size */
  errcode_t error;
};

/* Make room for need runs in *mapp, doubling.  Returns -1 (and leaves
 * *mapp as it was) beyond MAX_RUNS or out of memory.
 */
static int
map_reserve (struct ext4fs_map **mapp, size_t need)
{
  struct ext4fs_map *m = *mapp;
  size_t ncap;

  if (need <= m->cap)
    return 0;
  if (need > MAX_RUNS)
    return -1;
  ncap = m->cap ? m->cap * 2 : 16;
  if (ncap < need)
    ncap = need;
  if (ncap > MAX_RUNS)
    ncap = MAX_RUNS;
  m = realloc (m, sizeof *m + ncap * sizeof m->runs[0]);
  if (m == NULL)
    return -1;
  m->cap = ncap;
  *mapp = m;
  return 0;
}

static int
push_run (struct builder *b, uint64_t lblk, uint64_t pblk, uint64_t len,
          bool unwritten)
{
  struct ext4fs_fs *fsi = b->ip->fsi;
  struct ext4fs_run *last;
  uint64_t pend;

  if (len == 0)
    return 0;
  if (pblk < fsi->first_data_block ||
      __builtin_add_overflow (pblk, len, &pend) || pend > fsi->blocks_count ||
      lblk < b->next_lblk) {
    nbdkit_error ("inode %u: corrupt block map: logical block %" PRIu64
                  " -> physical %" PRIu64 " (+%" PRIu64 ") is outside the "
                  "filesystem (%" PRIu64 " blocks) or overlaps",
                  b->ip->ino, lblk, pblk, len, fsi->blocks_count);
    return -1;
  }
  b->next_lblk = lblk + len;
  if (fs_is_metadata (fsi, pblk, len)) {
    nbdkit_error ("inode %u: corrupt block map: logical block %" PRIu64
                  " -> physical %" PRIu64 " (+%" PRIu64 ") points at "
                  "filesystem metadata", b->ip->ino, lblk, pblk, len);
    return -1;
  }

  if (b->map->n > 0) {
    last = &b->map->runs[b->map->n - 1];
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
  if (b->map->n >= MAX_RUNS) {
    nbdkit_error ("inode %u: more than %d fragments: too fragmented "
                  "to map (or corrupt)", b->ip->ino, MAX_RUNS);
    return -1;
  }
  if (map_reserve (&b->map, b->map->n + 1) == -1) {
    nbdkit_error ("realloc: %m");
    return -1;
  }
  b->map->runs[b->map->n++] = (struct ext4fs_run) {
    .lblk = lblk, .pblk = pblk, .len = len, .unwritten = unwritten,
  };
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
    if (*blocknr < fsi->first_data_block || *blocknr >= fsi->blocks_count ||
        fs_is_metadata (fsi, *blocknr, 1)) {
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

struct ext4fs_map *
bmap_build_locked (struct ext4fs_inode *ip, int *err)
{
  struct builder b = {
    .ip = ip,
    .nblocks = (ip->size + ip->fsi->blocksize - 1) >> ip->fsi->blockbits,
  };
  int r = 0;

  b.map = calloc (1, sizeof *b.map);
  if (b.map == NULL) {
    *err = errno;
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  if (ip->inline_data)
    r = 0;                      /* no blocks */
  else if (ip->extents)
    r = build_extents (&b);
  else
    r = build_indirect (&b);
  if (r == -1) {
    free (b.map);
    *err = EIO;
    return NULL;
  }
  return b.map;
}

/* Index of the first run with run.lblk > lblk (binary search). */
static size_t
first_run_after (const struct ext4fs_map *map, uint64_t lblk)
{
  size_t lo = 0, hi = map->n;

  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (map->runs[mid].lblk <= lblk)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
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
  struct ext4fs_run pieces[3];
  size_t i, j, k, np = 0, nn;
  bool left = false;

  if (len == 0)
    return 0;
  /* Runs [i, j) overlap [lblk, end). */
  i = first_run_after (m, lblk);
  if (i > 0 && m->runs[i - 1].lblk + m->runs[i - 1].len > lblk)
    i--;
  for (j = i; j < m->n && m->runs[j].lblk < end; ++j)
    ;
  if (i < j && m->runs[i].lblk < lblk) {
    pieces[np] = m->runs[i];
    pieces[np++].len = lblk - m->runs[i].lblk;
    left = true;
  }
  pieces[np++] = (struct ext4fs_run) { .lblk = lblk, .pblk = pblk, .len = len };
  if (i < j && m->runs[j - 1].lblk + m->runs[j - 1].len > end) {
    const struct ext4fs_run *r = &m->runs[j - 1];
    uint64_t off = end - r->lblk;
    pieces[np++] = (struct ext4fs_run) {
      .lblk = end, .pblk = r->pblk + off, .len = r->len - off,
      .unwritten = r->unwritten,
    };
  }

  nn = m->n - (j - i) + np;
  if (map_reserve (mapp, nn) == -1)
    return -1;
  m = *mapp;
  memmove (&m->runs[i + np], &m->runs[j], (m->n - j) * sizeof m->runs[0]);
  memcpy (&m->runs[i], pieces, np * sizeof pieces[0]);
  m->n = nn;

  /* Merge the new run with its neighbours, as bmap_build would. */
  k = i + left;
  if (k + 1 < m->n && runs_mergeable (&m->runs[k], &m->runs[k + 1])) {
    m->runs[k].len += m->runs[k + 1].len;
    memmove (&m->runs[k + 1], &m->runs[k + 2],
             (m->n - k - 2) * sizeof m->runs[0]);
    m->n--;
  }
  if (k > 0 && runs_mergeable (&m->runs[k - 1], &m->runs[k])) {
    m->runs[k - 1].len += m->runs[k].len;
    memmove (&m->runs[k], &m->runs[k + 1],
             (m->n - k - 1) * sizeof m->runs[0]);
    m->n--;
  }
  return 0;
}

bool
bmap_map_equal (const struct ext4fs_map *a, const struct ext4fs_map *b)
{
  size_t i;

  if (a->n != b->n)
    return false;
  for (i = 0; i < a->n; ++i)
    if (a->runs[i].lblk != b->runs[i].lblk ||
        a->runs[i].pblk != b->runs[i].pblk ||
        a->runs[i].len != b->runs[i].len ||
        a->runs[i].unwritten != b->runs[i].unwritten)
      return false;
  return true;
}

const struct ext4fs_run *
bmap_lookup (const struct ext4fs_map *map, uint64_t lblk, uint64_t *hole_end)
{
  size_t lo = first_run_after (map, lblk);

  if (lo > 0) {
    const struct ext4fs_run *r = &map->runs[lo - 1];
    if (lblk < r->lblk + r->len)
      return r;
  }
  *hole_end = lo < map->n ? map->runs[lo].lblk : UINT64_MAX;
  return NULL;
}

uint64_t
bmap_goal_locked (struct ext4fs_inode *ip, const struct ext4fs_map *map,
                  uint64_t lblk)
{
  struct ext4fs_fs *fsi = ip->fsi;
  ext2_filsys fs = fsi->fs;
  size_t lo = first_run_after (map, lblk);
  const struct ext4fs_run *r;

  /* Aim to put logical block L at physical block base + L, the place
   * a sequential writer would have given it: take the base from the
   * run before lblk, else from the run after it, else (no block yet)
   * from the first free block of the inode's group.  Writers filling
   * one file at several places at once (nbdcopy's threads, a VM) then
   * each extend their own contiguous range instead of taking turns
   * with the next free block, which interleaved their extents.
   */
  if (lo > 0) {
    r = &map->runs[lo - 1];
    if (lblk - r->lblk < fsi->blocks_count - r->pblk)
      return r->pblk + (lblk - r->lblk);
  }
  else if (lo < map->n) {
    r = &map->runs[lo];
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

int64_t
bmap_alloc_locked (struct ext4fs_fs *fsi, uint64_t goal, uint64_t len,
                   uint64_t *pblk, int *err)
{
  ext2_filsys fs = fsi->fs;
  uint64_t free_blocks = ext2fs_free_blocks_count (fs->super);
  uint64_t reserved = ext2fs_r_blocks_count (fs->super) + META_MARGIN;
  blk64_t start, n;
  errcode_t e;

  if (fsi->broken) {
    *err = EIO;
    nbdkit_error ("refusing to allocate: the filesystem was marked as "
                  "having errors");
    return -1;
  }
  if (free_blocks <= reserved) {
    nbdkit_error ("no space left on the filesystem (%" PRIu64 " free blocks, "
                  "%" PRIu64 " reserved)", free_blocks, reserved);
    *err = ENOSPC;
    return -1;
  }
  if (len > free_blocks - reserved)
    len = free_blocks - reserved;
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
  *pblk = start;
  return n;
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

static bool
mergeable (const struct ext2fs_extent *a, const struct ext2fs_extent *b)
{
  return !(a->e_flags & EXT2_EXTENT_FLAGS_UNINIT) &&
    !(b->e_flags & EXT2_EXTENT_FLAGS_UNINIT) &&
    a->e_lblk + a->e_len == b->e_lblk && a->e_pblk + a->e_len == b->e_pblk &&
    (uint64_t) a->e_len + b->e_len <= EXT_INIT_MAX_LEN;
}

/* Merge the written extent containing lblk with its written,
 * logically and physically contiguous neighbours, as the kernel does,
 * so that sequential writes in any order end as few extents.  The
 * survivor is extended first and the neighbour deleted after: a
 * failure in between leaves an overlap that e2fsck reports, never a
 * lost mapping.
 */
static errcode_t
merge_at (struct ext4fs_inode *ip, ext2_extent_handle_t h, uint64_t lblk)
{
  struct ext2fs_extent cur, other;
  errcode_t e;
  int side;

  for (side = 0; side < 2; ++side) {
    /* Looking: merging is only an optimisation, so a failure here
     * (nothing changed yet) just stops merging.
     */
    if (ext2fs_extent_goto (h, lblk) ||
        ext2fs_extent_get (h, EXT2_EXTENT_CURRENT, &cur))
      return 0;
    e = ext2fs_extent_get (h, side == 0 ? EXT2_EXTENT_PREV_LEAF
                                        : EXT2_EXTENT_NEXT_LEAF, &other);
    if (e)
      continue;
    if (side == 0 ? !mergeable (&other, &cur) : !mergeable (&cur, &other))
      continue;
    if (side == 1 && ext2fs_extent_goto (h, lblk))
      return 0;
    /* Changing: from here a failure leaves the tree half changed (the
     * caller's change_done_locked sees the writes).
     */
    if (side == 0) {
      /* Extend the previous extent over cur, then delete cur. */
      other.e_len += cur.e_len;
      e = ext2fs_extent_replace (h, 0, &other);
      if (e)
        return e;
      lblk = other.e_lblk;
      e = ext2fs_extent_get (h, EXT2_EXTENT_NEXT_LEAF, &cur);
    }
    else {
      /* Extend cur over the next extent, then delete that. */
      cur.e_len += other.e_len;
      e = ext2fs_extent_replace (h, 0, &cur);
      if (e)
        return e;
      e = ext2fs_extent_get (h, EXT2_EXTENT_NEXT_LEAF, &other);
    }
    if (e)
      return e;
    e = ext2fs_extent_delete (h, 0);
    if (e)
      return e;
    e = ext2fs_extent_fix_parents (h);
    if (e && e != EXT2_ET_NO_CURRENT_NODE)
      return e;
  }
  return 0;
}

/* Insert one written extent of at most EXT_INIT_MAX_LEN blocks into a
 * hole of an extent-mapped file, merging with the extent before when
 * it is physically contiguous.  Returns 0, -1 (not mapped: nothing
 * changed) or -2 (the blocks may be mapped: never free them; the
 * filesystem was marked broken), see change_done_locked.
 */
static int
extent_insert_one (struct ext4fs_inode *ip, uint64_t lblk, uint64_t pblk,
                   uint32_t len, int *err)
{
  ext2_filsys fs = ip->fsi->fs;
  ext2_extent_handle_t h;
  struct ext2fs_extent ex, nex = {
    .e_lblk = lblk, .e_pblk = pblk, .e_len = len,
    .e_flags = EXT2_EXTENT_FLAGS_LEAF,
  };
  struct ext2_extent_info info;
  struct ext4fs_io_counts before;
  errcode_t e;

  if (lblk + len > (UINT64_C (1) << 32)) {
    nbdkit_error ("inode %u: logical block %" PRIu64 " is beyond what "
                  "extents can map", ip->ino, lblk + len - 1);
    *err = EFBIG;
    return -1;
  }
  ext4fs_io_counts (&before);
  e = ext2fs_extent_open2 (fs, ip->ino, (struct ext2_inode *) &ip->raw, &h);
  if (e)
    return change_done_locked (ip, &before, e, false, "extent open", err);
  e = ext2fs_extent_get_info (h, &info);
  if (e)
    goto out;
  if (info.max_depth == 0 && info.num_entries == 0) {
    e = ext2fs_extent_insert (h, 0, &nex);
    if (e == 0)
      e = merge_at (ip, h, lblk);
    goto out;
  }
  e = ext2fs_extent_goto (h, lblk);
  if (e == 0) {
    ext2fs_extent_free (h);
    nbdkit_error ("inode %u: logical block %" PRIu64 " is already mapped",
                  ip->ino, lblk);
    *err = EIO;
    return -1;
  }
  if (e != EXT2_ET_EXTENT_NOT_FOUND)
    goto out;
  e = ext2fs_extent_get (h, EXT2_EXTENT_CURRENT, &ex);
  if (e)
    goto out;
  if (!(ex.e_flags & EXT2_EXTENT_FLAGS_UNINIT) &&
      ex.e_lblk + ex.e_len == lblk && ex.e_pblk + ex.e_len == pblk &&
      (uint64_t) ex.e_len + len <= EXT_INIT_MAX_LEN) {
    ex.e_len += len;
    e = ext2fs_extent_replace (h, 0, &ex);
  }
  else if (lblk < ex.e_lblk)
    e = ext2fs_extent_insert (h, 0, &nex);
  else
    e = ext2fs_extent_insert (h, EXT2_EXTENT_INSERT_AFTER, &nex);
  if (e == 0)
    e = ext2fs_extent_fix_parents (h);
  if (e == 0)
    e = merge_at (ip, h, lblk);
 out:
  ext2fs_extent_free (h);
  return change_done_locked (ip, &before, e, false, "inserting an extent",
                             err);
}

int
bmap_insert_locked (struct ext4fs_inode *ip, uint64_t lblk, uint64_t pblk,
                    uint64_t len, uint64_t *mapped, int *err)
{
  ext2_filsys fs = ip->fsi->fs;
  errcode_t e;
  uint64_t i;
  int r = 0;

  if (ip->extents) {
    for (i = 0; i < len; ) {
      uint32_t n = len - i > EXT_INIT_MAX_LEN ? EXT_INIT_MAX_LEN : len - i;
      r = extent_insert_one (ip, lblk + i, pblk + i, n, err);
      if (r == -2)
        i += n;                 /* maybe mapped: never free these */
      if (r < 0)
        break;
      i += n;
    }
  }
  else {
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
        i++;                    /* maybe mapped */
      if (r < 0)
        break;
    }
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
  const uint32_t from = to_unwritten ? 0 : EXT2_EXTENT_FLAGS_UNINIT;
  const uint32_t to = to_unwritten ? EXT2_EXTENT_FLAGS_UNINIT : 0;
  ext2_filsys fs = ip->fsi->fs;
  ext2_extent_handle_t h;
  struct ext4fs_io_counts before;
  uint64_t end = lblk + len;
  errcode_t e;

  *converted = false;
  ext4fs_io_counts (&before);
  e = ext2fs_extent_open2 (fs, ip->ino, (struct ext2_inode *) &ip->raw, &h);
  if (e)
    return change_done_locked (ip, &before, e, false, "extent open", err);

  /* One on-disk extent at a time: a written run of the map may span
   * several.  Each one is a change of its own: a failure leaves the
   * extents before it converted, and the tree consistent, unless it
   * happens half way through one (change_done_locked).
   */
  while (lblk < end) {
    struct ext2fs_extent ex, pieces[3];
    int npieces = 0, i;
    uint64_t ex_end, pend;

    ext4fs_io_counts (&before);
    e = ext2fs_extent_goto (h, lblk);
    if (e == 0)
      e = ext2fs_extent_get (h, EXT2_EXTENT_CURRENT, &ex);
    if (e) {
      ext2fs_extent_free (h);
      change_done_locked (ip, &before, e, false, "converting an extent", err);
      return -1;                /* nothing written in this round */
    }
    ex_end = ex.e_lblk + ex.e_len;
    if ((ex.e_flags & EXT2_EXTENT_FLAGS_UNINIT) != from ||
        lblk < ex.e_lblk || lblk >= ex_end) {
      ext2fs_extent_free (h);
      nbdkit_error ("inode %u: block %" PRIu64 " is not in a %s extent",
                    ip->ino, lblk, to_unwritten ? "written" : "unwritten");
      *err = EIO;
      return -1;
    }
    pend = end < ex_end ? end : ex_end;
    if (to_unwritten && pend - lblk > EXT_UNINIT_MAX_LEN)
      pend = lblk + EXT_UNINIT_MAX_LEN;

    if (ex.e_lblk < lblk)
      pieces[npieces++] = (struct ext2fs_extent) {
        .e_lblk = ex.e_lblk, .e_pblk = ex.e_pblk, .e_len = lblk - ex.e_lblk,
        .e_flags = EXT2_EXTENT_FLAGS_LEAF | from,
      };
    pieces[npieces++] = (struct ext2fs_extent) {
      .e_lblk = lblk, .e_pblk = ex.e_pblk + (lblk - ex.e_lblk),
      .e_len = pend - lblk, .e_flags = EXT2_EXTENT_FLAGS_LEAF | to,
    };
    if (pend < ex_end)
      pieces[npieces++] = (struct ext2fs_extent) {
        .e_lblk = pend, .e_pblk = ex.e_pblk + (pend - ex.e_lblk),
        .e_len = ex_end - pend, .e_flags = EXT2_EXTENT_FLAGS_LEAF | from,
      };

    e = ext2fs_extent_replace (h, 0, &pieces[0]);
    for (i = 1; e == 0 && i < npieces; ++i)
      e = ext2fs_extent_insert (h, EXT2_EXTENT_INSERT_AFTER, &pieces[i]);
    if (e == 0)
      e = ext2fs_extent_fix_parents (h);
    if (e == 0 && !to_unwritten)
      e = merge_at (ip, h, lblk);
    if (change_done_locked (ip, &before, e, false, "converting an extent",
                            err) < 0) {
      ext2fs_extent_free (h);
      return -1;
    }
    lblk = pend;
  }
  ext2fs_extent_free (h);
  *converted = true;
  return inode_write_locked (ip, err);
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
  uint64_t end = lblk + len, b = lblk;
  errcode_t e;

  while (b < end) {
    uint64_t hole_end, s, n;
    const struct ext4fs_run *r = bmap_lookup (map, b, &hole_end);

    if (r == NULL) {
      b = hole_end;
      continue;
    }
    s = b;
    n = r->lblk + r->len - b;
    if (n > end - b)
      n = end - b;
    if (n > PUNCH_CHUNK)
      n = PUNCH_CHUNK;
    if (ip->extents) {
      uint64_t pend = r->pblk + (s - r->lblk) + n;

      /* libext2fs 1.47.0 refuses to free a range that ends at the last
       * block of the filesystem (off by one, fixed in 1.47.4): punch
       * the rest, and unmap that block ourselves.
       */
      bool last = pend == fsi->blocks_count;

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
    b = s + n;
  }
  return 0;
}
