/* ext4fs: the shared inode table (iget/iput).
 *
 * One struct ext4fs_inode per open inode number, whoever opened it,
 * reference-counted.  See DESIGN.md for the lock order.
 */
#ifndef EXT4FS_INODE_H
#define EXT4FS_INODE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "fs.h"

#include "runmap.h"

/* The cached block map (runmap.h): runs sorted by lblk, not
 * overlapping, written runs merged where contiguous (a partial map may
 * leave two apart where leaves were loaded at different times), each
 * unwritten run exactly one extent.  Partial for extent files: right
 * only inside the spans it covers (inode_map_range loads the rest).
 * Changed, loaded, cut back or freed only by a holder of the inode's
 * lock in exclusive mode (inode_map_range, inode_map_update,
 * inode_map_changed): the inode rwlock alone guards it, so a holder of
 * the lock in either mode sees a map that matches the tree where it
 * covers it.
 */

/* Allocating writes to one file in flight at once with their data
 * writes overlapping (more wait, or take the whole request under the
 * inode lock).
 */
#define INODE_MAX_FILLS 64

struct ext4fs_inode {
  ext2_ino_t ino;                   /* immutable */
  struct ext4fs_fs *fsi;            /* immutable */
  uint64_t size;                    /* i_size, immutable: NBD sizes are fixed */
  bool extents;                     /* EXT4_EXTENTS_FL, immutable */
  bool inline_data;                 /* EXT4_INLINE_DATA_FL, immutable */
  char *inline_buf;                 /* inline data contents, immutable */
  size_t inline_len;

  /* The inode table lock protects: */
  unsigned refcnt;
  struct ext4fs_inode *hnext;

  /* The inode rwlock.  Shared: I/O through the mapped blocks.
   * Exclusive: anything that changes the block map (allocation,
   * conversion of unwritten extents, punching).
   */
  pthread_rwlock_t lock;

  /* The one in-memory copy of the on-disk inode.  Changed only with
   * fsi->lock held; i_block and i_blocks only with ->lock exclusive as
   * well.  Read with fsi->lock held.
   */
  struct ext2_inode_large raw;

  /* Lazily built map, or NULL.  Published with release semantics
   * under map_lock; read with acquire by holders of ->lock.
   */
  pthread_mutex_t map_lock;
  struct ext4fs_map *map;

  /* pblk - lblk of the file's last allocation (bmap_alloc_locked),
   * a goal for allocations with no run before them in the map.
   * Under fsi->lock.
   */
  uint64_t alloc_base;
  bool alloc_base_set;

  /* Time of the last data change not yet written to the inode
   * (seconds), or 0.  Atomic.
   */
  int64_t dirty_time;

  /* Holes being filled by allocating writes that write their data
   * with no inode lock held (rw.c, DESIGN.md §6): the blocks are
   * allocated but not in the tree yet, so no other request may fill
   * them.  Logical blocks [a, b); under fill_lock, which is a leaf
   * (taken with or without ->lock); fill_cv is signalled when one
   * ends.
   */
  pthread_mutex_t fill_lock;
  pthread_cond_t fill_cv;
  unsigned nfills, max_fills;    /* max_fills: most at once, for -v */
  struct runmap_span fills[INODE_MAX_FILLS];
  /* For -v: fills registered, and (atomic) of them, those that
   * allocated under ->lock shared.
   */
  unsigned long nfills_total, nfills_shared;

  /* The last write of ->raw failed: the next sync writes it again
   * (the filesystem is never marked clean in this process anyway).
   * Atomic.
   */
  bool raw_dirty;
};

/* Find or load inode ino, taking a reference.  Returns NULL with *err
 * set (and nbdkit_error called).
 */
extern struct ext4fs_inode *inode_get (struct ext4fs_fs *fsi, ext2_ino_t ino,
                                       int *err);
extern void inode_put (struct ext4fs_inode *ip);

/* Free the inodes of fsi that no one uses but that were kept because
 * the filesystem was marked broken (inode_put).  Called when fsi is
 * closed.
 */
extern void inode_forget_all (struct ext4fs_fs *fsi);

/* The current block map.  Caller holds ip->lock (either mode).
 * Returns NULL with *err set on error (corrupt mapping metadata).
 */
extern const struct ext4fs_map *inode_map (struct ext4fs_inode *ip, int *err);

/* The current block map, covering at least blocks [b0, *b1) (partial
 * maps: runmap.h).  With ip->lock exclusive (excl), what is missing is
 * loaded from the extent tree, after cutting the map back to this
 * range if it holds more than bmap_map_budget () runs.  With it shared,
 * returns NULL with *err = 0 if something is missing: the caller takes
 * the lock exclusive and calls again.  maxload (0: no limit): callers
 * that can do with less (block status) get *b1 lowered to the end of
 * what is covered from b0, rather than more than maxload leaves
 * loaded.  Returns NULL with *err set on error.
 */
extern const struct ext4fs_map *inode_map_range (struct ext4fs_inode *ip,
                                                 uint64_t b0, uint64_t *b1,
                                                 unsigned maxload, bool excl,
                                                 int *err);

/* The block map changed: bump the generation and drop the cached map.
 * Caller holds ip->lock exclusive.
 */
extern void inode_map_changed (struct ext4fs_inode *ip);
extern void inode_map_forget (struct ext4fs_inode *ip, uint64_t b0,
                              uint64_t b1);

/* The block map changed by exactly these written runs (each mapped in
 * place of a hole or of part of an unwritten run, in this order): bump
 * the generation and update the cached map in memory instead of
 * dropping it, so the next request does not walk the whole extent
 * tree again.  Falls back to inode_map_changed if the update fails.
 * With -D ext4fs.verify_map=1 the result is compared with a map built
 * from disk and nbdkit aborts on a difference (tests).  Caller holds
 * ip->lock exclusive.
 */
extern void inode_map_update (struct ext4fs_inode *ip,
                              const struct ext4fs_run *changes, size_t n);

/* Holes being filled with no inode lock held (rw.c
 * write_alloc_handle; see inode.c).
 */
extern int inode_fill_try (struct ext4fs_inode *ip, uint64_t a, uint64_t b,
                           bool want);
extern void inode_fill_wait (struct ext4fs_inode *ip, uint64_t a, uint64_t b);
extern void inode_fill_end (struct ext4fs_inode *ip, uint64_t a, uint64_t b);

/* Write ip->raw to disk.  Caller holds fsi->lock.  If the write
 * fails, what is in memory stays the truth: the filesystem is never
 * marked clean in this process (fs_meta_write_failed_locked) and the
 * next sync writes the inode again.
 */
extern int inode_write_locked (struct ext4fs_inode *ip, int *err);

/* Note a data change, for mtime/ctime at the next sync. */
extern void inode_touch (struct ext4fs_inode *ip);

/* Write pending mtime/ctime of every open inode.  Takes the inode
 * table lock, then fsi->lock.  Returns -1 on error.
 */
extern int inode_sync_times (struct ext4fs_fs *fsi);

#endif /* EXT4FS_INODE_H */
