/* ext4fs: block mapping.  Reading the map of a file (extent tree or
 * indirect blocks) into runs, and changing it: allocating into holes,
 * converting unwritten extents, punching.
 */
#ifndef EXT4FS_BMAP_H
#define EXT4FS_BMAP_H

#include "inode.h"

/* The map of ip, from ip->raw.  Caller holds fsi->lock.  Files with
 * blocks get a partial map (runmap.h) that covers nothing yet, or all
 * of an extent tree that is only its root; inline-data files an empty
 * whole map.  Returns NULL with *err set: EIO on corrupt metadata.
 * bmap_build_full_locked builds the whole map of any file, every
 * physical block checked against the filesystem, with libext2fs's
 * extent reader or block iterator (-D ext4fs.verify_map compares the
 * two), with no limit.
 */
extern struct ext4fs_map *bmap_build_locked (struct ext4fs_inode *ip, int *err);
extern struct ext4fs_map *bmap_build_full_locked (struct ext4fs_inode *ip,
                                                  int *err);

/* Load into m, a partial map of ip, the leaf of the extent tree that
 * holds (or would hold) lblk: afterwards m covers lblk and the rest of
 * that leaf's range.  Each extent is checked as bmap_build_locked
 * checks runs.  Returns -1 with *err = EIO on a corrupt tree or a read
 * error (m then covers no more than before, or a little more, still
 * right).  An unwritten extent is never clipped: if one would be, m
 * is emptied first and *was_reset set; a second time for the same
 * *was_reset (one request) is a corrupt tree.  Caller holds ip->lock
 * exclusive and fsi->lock.
 */
extern int bmap_load_locked (struct ext4fs_inode *ip, struct ext4fs_map *m,
                             uint64_t lblk, bool *was_reset, int *err);

/* Free the read-only index-node cache of fsi (at close; logs its hit
 * rate with -v).
 */
extern void bmap_icache_free (struct ext4fs_fs *fsi);

/* The runs past which a partial map is cut back to what one request
 * needs (1 Mi, or -D ext4fs.max_runs).
 */
extern size_t bmap_map_budget (void);

/* Does m map every block it covers as disk (a whole map) does?  Runs
 * are compared merged where contiguous.
 */
extern bool bmap_map_check (const struct ext4fs_map *m,
                            const struct ext4fs_map *disk);

/* Find the run containing lblk.  Returns it, or NULL for a hole and
 * then *hole_end is the first mapped block after lblk (UINT64_MAX if
 * none).
 */
extern const struct ext4fs_run *bmap_lookup (const struct ext4fs_map *map,
                                             uint64_t lblk, uint64_t *hole_end);

/* Walking a range through a map, one mapping at a time (the idea of
 * the kernel's iomap: map a range, act on one mapping, advance).  Start
 * with bmap_walk_bytes (a byte range of the file) or bmap_walk_blocks
 * (whole logical blocks), then each bmap_walk_next gives the next
 * segment in order, until it returns false: logical blocks [lblk, end),
 * all of one kind (a hole, or part of one run: written or unwritten,
 * at physical blocks bmap_seg_pblk ...), and the bytes [off, off+len)
 * of the range that fall in them.  Segments are never longer than
 * max_blocks if that is set (0: no limit).  Nothing is allocated; the
 * map must not change during the walk (the caller holds ip->lock).
 */
struct bmap_seg {
  uint64_t lblk, end;                   /* logical blocks [lblk, end) */
  const struct ext4fs_run *run;         /* NULL: a hole */
  uint64_t off, len;                    /* bytes [off, off+len) */
};

struct bmap_walk {
  const struct ext4fs_map *map;
  unsigned bits;                        /* log2 of the block size */
  uint64_t b, bend;                     /* blocks left: [b, bend) */
  uint64_t off, endoff;                 /* bytes of the range */
  uint64_t max_blocks;
};

static inline void
bmap_walk_bytes (struct bmap_walk *w, const struct ext4fs_map *map,
                 unsigned bits, uint64_t offset, uint64_t count)
{
  *w = (struct bmap_walk) {
    .map = map, .bits = bits, .off = offset, .endoff = offset + count,
    .b = offset >> bits,
    .bend = count ? ((offset + count - 1) >> bits) + 1 : offset >> bits,
  };
}

static inline void
bmap_walk_blocks (struct bmap_walk *w, const struct ext4fs_map *map,
                  unsigned bits, uint64_t b0, uint64_t b1)
{
  *w = (struct bmap_walk) {
    .map = map, .bits = bits, .b = b0, .bend = b1,
    .off = b0 << bits, .endoff = b1 << bits,
  };
}

static inline bool
bmap_walk_next (struct bmap_walk *w, struct bmap_seg *s)
{
  uint64_t hole_end, e, lo, hi;

  if (w->b >= w->bend)
    return false;
  s->lblk = w->b;
  s->run = bmap_lookup (w->map, w->b, &hole_end);
  e = s->run ? s->run->lblk + s->run->len : hole_end;
  if (e > w->bend)
    e = w->bend;
  if (w->max_blocks && e - s->lblk > w->max_blocks)
    e = s->lblk + w->max_blocks;
  s->end = e;
  lo = s->lblk << w->bits;
  hi = e << w->bits;
  s->off = lo > w->off ? lo : w->off;
  s->len = (hi < w->endoff ? hi : w->endoff) - s->off;
  w->b = e;
  return true;
}

/* Is the segment mapped and written (not a hole, not unwritten)? */
static inline bool
bmap_seg_written (const struct bmap_seg *s)
{
  return s->run && !s->run->unwritten;
}

/* The physical block of s->lblk (s->run not NULL). */
static inline uint64_t
bmap_seg_pblk (const struct bmap_seg *s)
{
  return s->run->pblk + (s->lblk - s->run->lblk);
}

/* The physical byte of s->off (s->run not NULL). */
static inline uint64_t
bmap_seg_pos (const struct bmap_walk *w, const struct bmap_seg *s)
{
  return (bmap_seg_pblk (s) << w->bits) + (s->off - (s->lblk << w->bits));
}

/* Change a cached map in memory as a request changed the file: map
 * logical [lblk, lblk+len) to physical [pblk, pblk+len), written,
 * replacing what was there (a hole, or part of an unwritten run whose
 * blocks these are), splitting and merging runs as bmap_build_locked
 * would have built them from the new tree.  May realloc *mapp.  Returns
 * -1 (map unchanged or partly changed: discard it) if out of memory or
 * over the run limit (whole maps only).  Caller holds ip->lock exclusive.
 */
extern int bmap_map_set (struct ext4fs_map **mapp, uint64_t lblk,
                         uint32_t len, uint64_t pblk);

/* Allocate up to len contiguous free blocks near goal, for logical
 * blocks [lblk, ...) of ip (a hole).  Returns the number allocated
 * (>= 1) and the first in *pblk, or -1 with *err: ENOSPC when the
 * free blocks do not cover the root reserve, the blocks promised to
 * other changes, and what mapping even one block can need in tree or
 * indirect blocks; EFBIG past what the file can map or count in
 * i_blocks.  That metadata need, for the blocks allocated, is
 * promised to the caller (*reserved) until it calls
 * bmap_release_locked, after mapping them with bmap_insert_locked or
 * freeing them with bmap_free_locked.  The blocks are marked in use in
 * memory only.  Caller holds fsi->lock.
 */
extern int64_t bmap_alloc_locked (struct ext4fs_inode *ip, uint64_t lblk,
                                  uint64_t goal, uint64_t len, uint64_t *pblk,
                                  uint64_t *reserved, int *err);
extern void bmap_release_locked (struct ext4fs_fs *fsi, uint64_t reserved);
/* Free blocks an allocation may take: not the root reserve, not the
 * blocks promised to changes under way.  Caller holds fsi->lock.
 */
extern uint64_t bmap_available_locked (struct ext4fs_fs *fsi);
extern void bmap_free_locked (struct ext4fs_fs *fsi, uint64_t pblk, uint64_t len);

/* The first logical block ip cannot map (extents: libext2fs's limit,
 * as ext2fs_file_block_offset_too_big; indirect: 12 direct blocks and
 * three levels of indirect ones).  Immutable.
 */
extern uint64_t bmap_map_limit (const struct ext4fs_inode *ip);

/* Is there room in ip's i_blocks for nblocks more blocks?  Else -1
 * with *err = EFBIG, after nbdkit_error.  Caller holds fsi->lock.
 */
extern int bmap_iblk_room_locked (struct ext4fs_inode *ip, uint64_t nblocks,
                                  int *err);

/* The most blocks libext2fs or our extent-tree code may allocate (tree
 * nodes, indirect blocks) to map the hole [lblk, lblk+len) of ip.
 * Caller holds fsi->lock.
 */
extern uint64_t bmap_meta_need_locked (struct ext4fs_inode *ip, uint64_t lblk,
                                       uint64_t len);

/* Map logical [lblk, lblk+len) (a hole) to physical [pblk, pblk+len),
 * written.  Updates i_blocks and writes the inode.  On error, *mapped
 * says how many blocks from lblk the file's block map (ip->raw and
 * the tree, as libext2fs sees them) now has, or may have if the
 * filesystem was marked broken: they stay allocated; the rest were
 * freed.  (On success *mapped = len.)  A failed final inode write
 * leaves the blocks mapped in memory, the filesystem never marked
 * clean.  reserved: what bmap_alloc_locked promised for these blocks.
 * Caller holds ip->lock exclusive and fsi->lock.
 */
extern int bmap_insert_locked (struct ext4fs_inode *ip, uint64_t lblk,
                               uint64_t pblk, uint64_t len, uint64_t reserved,
                               uint64_t *mapped, int *err);

/* Mark logical [lblk, lblk+len), which lies inside one unwritten run,
 * as written (to_unwritten false, then merged with written
 * neighbours), or inside one written run as unwritten.  *converted:
 * the tree as libext2fs sees it has the whole change (true after
 * success, and after a failure of only the final inode write).
 * Caller holds ip->lock exclusive and fsi->lock.
 */
extern int bmap_convert_locked (struct ext4fs_inode *ip, uint64_t lblk,
                                uint64_t len, bool to_unwritten,
                                bool *converted, int *err);

/* Unmap and free the mapped blocks of logical [lblk, lblk+len), using
 * map (the current map) to skip holes.  Caller holds ip->lock
 * exclusive and fsi->lock, and calls inode_map_changed after.
 */
extern int bmap_punch_locked (struct ext4fs_inode *ip,
                              const struct ext4fs_map *map,
                              uint64_t lblk, uint64_t len, int *err);

/* A goal for allocating logical block lblk (0: no preference): where
 * it would be if the file were contiguous with its neighbours.  Caller
 * holds fsi->lock.
 */
extern uint64_t bmap_goal_locked (struct ext4fs_inode *ip,
                                  const struct ext4fs_map *map, uint64_t lblk);

#endif /* EXT4FS_BMAP_H */
