/* ext4fs: the one filesystem instance of the process.
 *
 * Lock order (DESIGN.md §3): registry lock > inode table lock > inode
 * rwlock > map lock > handle lock (journal/trans.c) > block stripe lock
 * > fs->lock > lane lock (io-manager).
 */
#ifndef EXT4FS_FS_H
#define EXT4FS_FS_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#define NO_INLINE_FUNCS
#include <ext2fs/ext2fs.h>
#include <nbdkit-filter.h>

#include "io.h"

struct ext4fs_fs {
  ext2_filsys fs;             /* every libext2fs call holds ->lock */
  struct ext4fs_dev *dev;     /* thread-safe, no lock needed */
  bool rw;                    /* opened read-write (immutable) */
  unsigned blocksize;         /* immutable */
  unsigned blockbits;         /* log2 (blocksize), immutable */
  uint64_t blocks_count;      /* immutable (we never resize) */
  uint64_t first_data_block;  /* immutable */

  /* "The fs mutex".  Protects: every libext2fs call on ->fs and all
   * fields below.  Never held across file data I/O; never held while
   * waiting for an inode rwlock.
   */
  pthread_mutex_t lock;
  bool marked_unclean;        /* VALID_FS cleared on disk by us */
  uint16_t orig_state;        /* s_state at open */
  uint8_t *dirty_groups;      /* one byte per group: bitmap/desc dirty */
  bool super_dirty;           /* superblock (free counts) dirty */
  bool broken;                /* metadata may be inconsistent: no more allocation */
  bool meta_write_failed;     /* a metadata write failed: never marked clean */
  uint64_t meta_reserved;     /* blocks promised to the extent-tree or
                                 indirect blocks of changes under way
                                 (bmap_alloc_locked) */
  struct xt_icache *icache;   /* read-only: decoded extent index nodes
                                 (bmap.c); NULL until the first */

  struct ext4fs_mmp *mmp;     /* MMP claim, read-write with mmp only */
  struct ext4fs_jtx *jt;      /* metadata writer of a read-write
                                 instance (jtx_open, or jtx_open_nolog
                                 without a journal); NULL read-only;
                                 immutable until fs_close_dev */
  bool discard;               /* freed blocks are discarded below at
                                 their commit (immutable) */

  /* What the open found in the journal (immutable after open). */
  uint32_t replay_trans;      /* transactions replayed (overlay or home) */
  size_t replay_blocks;       /* blocks replayed */
  bool journal_unreplayed;    /* needs recovery, but not replayed */
  char note[1024];            /* for the user, printed at start-up
                                 (read-only open); may be empty */

  /* Block ranges holding filesystem metadata (superblocks, group
   * descriptors and reserved GDT blocks, bitmaps, inode tables, the
   * journal), sorted and merged; immutable after open.  No file's
   * block map may point into them (a corrupt one would otherwise let
   * a client overwrite the superblock).
   */
  struct ext4fs_meta_range { uint64_t start, end; } *meta;
  size_t nmeta;
};

/* -D ext4fs.writeback=1 (defined in ext4fs.c). */
extern int ext4fs_debug_writeback;
extern int ext4fs_debug_verify_map;
extern int ext4fs_debug_serial_fill;    /* fills under the inode lock */
extern int ext4fs_debug_flush_ahead_mib;  /* -1: the journal's default */
extern int ext4fs_debug_journal;        /* -D ext4fs.journal=0: not journaled */
extern int ext4fs_debug_journal_stats;
extern int ext4fs_debug_checkpoint_first;  /* tests: before every commit */
extern int ext4fs_debug_async_commit;   /* 0: commits hold every lock */
extern int ext4fs_debug_chain_commit;   /* 0: a flush per commit block */
extern int ext4fs_debug_max_runs;       /* tests: a lower map budget */
extern int ext4fs_debug_icache_slots;   /* tests: a smaller index cache */
extern int ext4fs_debug_fail_meta_read;  /* tests: io.h's meta faults */
extern int ext4fs_debug_fail_meta_write;
extern int ext4fs_debug_count_meta;

/* Open the filesystem on an existing device (no registry, no
 * context management): used by fs_open and by the fuzz target.
 * Returns NULL after nbdkit_error.  fs_close_dev writes back, marks
 * clean and closes, but leaves the device alone.
 */
extern struct ext4fs_fs *fs_open_dev (struct ext4fs_dev *dev, bool rw);
extern void fs_close_dev (struct ext4fs_fs *fsi);

/* Does [pblk, pblk+len) overlap filesystem metadata?  No lock needed. */
extern bool fs_is_metadata (const struct ext4fs_fs *fsi, uint64_t pblk,
                            uint64_t len);

/* Could blk hold a tree or indirect block: inside the filesystem's
 * data area and not its fixed metadata?  No lock needed.
 */
extern bool fs_block_usable (const struct ext4fs_fs *fsi, uint64_t blk);

/* Called once from .after_fork: open read-only, check the filesystem
 * and the fixed ext4file (if any).  Returns -1 after nbdkit_error, and
 * nbdkit exits.
 */
extern int fs_startup (nbdkit_backend *backend, int thread_model,
                       unsigned lanes);

/* Get (and reference) the instance, opening it if needed.  A read-write
 * request gets a read-write instance if the plugin and the filesystem
 * allow writing, else a read-only one with a message; a read-write
 * request that the filesystem's state forbids (journal needs recovery,
 * errors, unsupported features) fails rather than silently becoming
 * read-only.  Returns NULL after nbdkit_error.
 */
extern struct ext4fs_fs *fs_get (int readonly);
/* The note of the instance open now (for the user: the state served
 * read-only, why writers are refused), "" if none, copied into buf.
 * Export descriptions carry it, so a client that lists the exports
 * or opens one read-only is shown it.
 */
extern void fs_startup_note (char *buf, size_t len);
extern void fs_put (struct ext4fs_fs *fsi);

/* .cleanup: write everything back, mark clean, close. */
extern void fs_shutdown (void);

/* Before the first change to the image in this process: clear VALID_FS
 * on disk (and flush), so that a crash makes e2fsck check it.  Cheap
 * after the first call.  Returns -1 with *err set.
 */
extern int fs_begin_write (struct ext4fs_fs *fsi, int *err);

/* Record a block group whose bitmap / descriptor changed.  Caller holds
 * fsi->lock.
 */
extern void fs_group_dirty_locked (struct ext4fs_fs *fsi, uint64_t blk, uint64_t count);

/* Write back dirty metadata (inode times, bitmaps, group descriptors,
 * superblock) and flush the plugin: after this returns 0, every write
 * completed before the call is durable.  Takes inode table lock, then
 * fsi->lock.
 */
extern int fs_sync (struct ext4fs_fs *fsi, int *err);

/* For a closing connection (.finalize): with a journal, hand the commit
 * to the commit timer thread and return at once (no I/O on this
 * connection's thread); else fs_sync.
 */
extern int fs_sync_soon (struct ext4fs_fs *fsi, int *err);

/* Like fs_sync but without the plugin flush (caller holds fsi->lock). */
extern int fs_writeback_locked (struct ext4fs_fs *fsi, int *err);

/* Mark the filesystem as having errors (metadata could not be kept
 * consistent): no more allocation in this process.  Caller holds
 * fsi->lock.
 */
extern void fs_set_broken_locked (struct ext4fs_fs *fsi, const char *why);

/* ext4discard=, ext4discardfree= (from .config; before fs_startup). */
extern void fs_set_discard (bool passthrough, bool free_at_open);

/* Blocks [blk, blk+n) were freed (caller holds fsi->lock): with a
 * journal they stay reserved until the freeing transaction commits.
 */
extern void fs_blocks_freed_locked (struct ext4fs_fs *fsi, uint64_t blk,
                                    uint64_t n);

/* A request that changes metadata holds a handle across all its
 * changes (the writer's handle lock shared, journal or not): taken
 * after the inode rwlock, before fsi->lock, and only on a read-write
 * instance (after fs_begin_write).  needs_commit: the change must be
 * durable at the next flush (not just times).  data: the request may
 * write file data that its metadata will point at (jtx_handle_start).
 */
extern int fs_handle_start (struct ext4fs_fs *fsi, bool data, int *err);
extern void fs_handle_stop (struct ext4fs_fs *fsi, bool data,
                            bool needs_commit);

/* After ENOSPC: if freed blocks are waiting for a commit, commit
 * them and return true (try again).  Call with no lock held.
 */
extern bool fs_enospc_retry (struct ext4fs_fs *fsi);

/* Must a FUA write become a full fs_sync, because metadata that maps
 * blocks is not durable yet?  (No lock: a hint read once.)
 */
extern bool fs_fua_needs_sync (struct ext4fs_fs *fsi);

/* A metadata write failed, but what is in memory is consistent (an
 * inode write: the next one writes the same inode again).  Without a
 * journal (no writer, or the ordered write-back): go on, but never mark
 * the filesystem clean in this process, since what is on disk may not
 * match.  With one (the write went into the running transaction, which
 * may then hold the rest of the request's change without it): abort
 * the journal, as fs_set_broken_locked.  Caller holds fsi->lock.
 */
extern void fs_meta_write_failed_locked (struct ext4fs_fs *fsi,
                                         const char *what);

#endif /* EXT4FS_FS_H */
