/* ext4fs: writing the journal: transactions in ordered mode (trans.c). */
#ifndef EXT4FS_TRANS_H
#define EXT4FS_TRANS_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#define NO_INLINE_FUNCS
#include <ext2fs/ext2fs.h>

#include "io.h"
#include "replay.h"

struct ext4fs_jtx;

/* What the filesystem layer does for a commit, called with the fs
 * mutex held inside the commit: put its dirty bitmaps and group
 * descriptors into the running transaction (jtx_put_block).  Returns
 * 0, or -1 with *err set.
 */
typedef int (*jtx_prepare_fn) (void *opaque, int *err);
/* A commit ended the reservation of freed blocks [blk, blk+n): the
 * filesystem layer may unmark them in its allocator's bitmap (fs
 * mutex held).
 */
typedef void (*jtx_unhold_fn) (void *opaque, uint64_t blk, uint64_t n);

/* Take over the journal jr of a filesystem opened read-write whose
 * log is empty (replayed, or cleanly closed): jr is consumed.  fs_lock
 * is the fs mutex that covers every libext2fs call.  Installs the
 * metadata hooks on the device: from now on libext2fs's reads and
 * writes of metadata go through the transaction cache.  Writes
 * nothing.  Returns NULL after nbdkit_error.
 */
extern struct ext4fs_jtx *jtx_open (struct ext4fs_journal *jr,
                                    ext2_filsys fs, pthread_mutex_t *fs_lock,
                                    jtx_prepare_fn prepare,
                                    jtx_unhold_fn unhold, void *opaque);

/* The same cache, handles, held freed blocks, timer and entry points
 * for a read-write filesystem without a journal (ext2, ^has_journal,
 * or -D ext4fs.journal=0): a "commit" is a flush (the data linked by
 * the metadata durable first), the running transaction's blocks
 * written home, and a flush.  A crash half way through needs e2fsck
 * (the filesystem is marked not clean on disk), but no mapping points
 * at data that was not durable first.  Returns NULL after
 * nbdkit_error.
 */
extern struct ext4fs_jtx *jtx_open_nolog (struct ext4fs_dev *dev,
                                          unsigned blockbits,
                                          ext2_filsys fs,
                                          pthread_mutex_t *fs_lock,
                                          jtx_prepare_fn prepare,
                                          jtx_unhold_fn unhold, void *opaque);

/* Is there a log (jtx_open), or only write-back (jtx_open_nolog)? */
extern bool jtx_logged (const struct ext4fs_jtx *jt);

/* Before the first change of the session (caller holds the fs mutex):
 * the journal superblock gets the features the kernel would choose,
 * needs_recovery is set in the filesystem's superblock (sb_write
 * writes it home), and both are flushed.  Without a log, sb_write
 * puts the superblock (marked not clean) into the running transaction
 * with jtx_put_bytes, and it is written home and flushed.  Starts the
 * commit timer.
 */
extern int jtx_begin_locked (struct ext4fs_jtx *jt,
                             int (*sb_write) (void *opaque, int *err),
                             void *opaque, int *err);

/* A request that changes metadata holds a handle from before its first
 * change to after its last one: a commit never contains half a
 * request.  Taken after the inode's rwlock, before the fs mutex (lock
 * order: DESIGN.md §3).  jtx_handle_start may commit first if the
 * running transaction is full.  needs_commit: the request changed
 * what a flush must make durable (a mapping, freed blocks); times
 * alone do not.  data: the request may write file data that its
 * metadata will point at (not a handle for inode times): a failed
 * plain flush while such a handle is open stops the writer (jtx_sync).
 * Pass the same to both.
 */
extern int jtx_handle_start (struct ext4fs_jtx *jt, bool data, int *err);
extern void jtx_handle_stop (struct ext4fs_jtx *jt, bool data,
                             bool needs_commit);

/* Put a metadata block into the running transaction (caller holds the
 * fs mutex).  buf is blocksize bytes.
 */
extern int jtx_put_block (struct ext4fs_jtx *jt, uint64_t blk,
                          const void *buf, int *err);

/* The same for bytes inside blocks (the superblock). */
extern int jtx_put_bytes (struct ext4fs_jtx *jt, uint64_t offset,
                          const void *buf, uint64_t count, int *err);

/* Blocks [blk, blk+n) were freed in the running transaction (caller
 * holds the fs mutex): their cached copies are dropped, blocks logged
 * in the live log are revoked, and they stay reserved (caller keeps
 * them marked in use in the allocator's bitmap) until the transaction
 * commits.
 */
extern void jtx_blocks_freed_locked (struct ext4fs_jtx *jt, uint64_t blk,
                                     uint64_t n);

/* Are freed blocks waiting for a commit?  (Takes the fs mutex.)  An
 * allocation that failed with ENOSPC commits and tries again then.
 */
extern bool jtx_has_held (struct ext4fs_jtx *jt);

/* Is blk reserved until the running or committing transaction commits?
 * (caller holds the fs mutex; used when writing block bitmaps, which
 * show such blocks free).
 */
extern bool jtx_held_locked (struct ext4fs_jtx *jt, uint64_t blk);
/* Call fn for every held block range of [start, end) (fs mutex held). */
extern void jtx_for_held_locked (struct ext4fs_jtx *jt, uint64_t start,
                                 uint64_t end,
                                 void (*fn) (void *opaque, uint64_t blk,
                                             uint64_t n),
                                 void *opaque);

/* Commit (and checkpoint if the log is half full).  With force, commit
 * any change, times included; else only if something a flush must make
 * durable is pending, and otherwise just flush the plugin.  Takes the
 * handle lock exclusive and the fs mutex: call with neither held.
 */
extern int jtx_sync (struct ext4fs_jtx *jt, bool force, int *err);

/* Ask the commit timer thread for a commit now (as jtx_sync with
 * force, on its own thread) and return at once.  For a connection
 * that is closing: its thread may not be able to do I/O any more (a
 * filter below refuses it), and a failed commit would stop the
 * journal for every client.  False if there is no timer thread (the
 * caller then calls jtx_sync).
 */
extern bool jtx_kick (struct ext4fs_jtx *jt);

/* Is anything a flush must make durable waiting in the running
 * transaction?  (No lock: a hint for FUA.)
 */
extern bool jtx_pending (struct ext4fs_jtx *jt);

/* Has the journal been aborted (a failed commit or checkpoint, or
 * metadata left half changed)?  Then nothing more is written.
 */
extern bool jtx_aborted (struct ext4fs_jtx *jt);
extern void jtx_abort_locked (struct ext4fs_jtx *jt, const char *why);

/* Clean close: stop the timer, commit, checkpoint everything, empty
 * the journal (s_start = 0, s_sequence = the next tid), flush.  The
 * caller then clears needs_recovery.  Returns -1 (after nbdkit_error,
 * the image left needing recovery) on failure or after an abort.  The
 * caller holds nothing.  Without a log: the last write-back, after
 * which the caller writes the clean state home itself (jtx_free
 * first: the hooks are gone then).
 */
extern int jtx_close (struct ext4fs_jtx *jt, int *err);

/* Free everything (after jtx_close, or instead of it: then nothing is
 * written).  Removes the device's metadata hooks.
 */
extern void jtx_free (struct ext4fs_jtx *jt);

/* -D ext4fs.journal_stats=1: counters at close. */
extern void jtx_stats (struct ext4fs_jtx *jt);
/* A commit flushes first, with the handle lock shared, when at least
 * BYTES were written since the last flush (0: never; default 8 MiB).
 * Before the writer is used.
 */
extern void jtx_set_flush_ahead (struct ext4fs_jtx *jt, uint64_t bytes);

/* Tests: checkpoint before every commit (as a commit does that would
 * not fit in the log); set before the writer is used.
 */
extern void jtx_set_checkpoint_first (struct ext4fs_jtx *jt, bool on);

/* Write a commit's log with the handle lock and the fs mutex released,
 * so that requests go on changing metadata in the next transaction
 * (the default); off: with every lock held, as before (benchmarks).
 * Set before the writer is used.
 */
extern void jtx_set_async_commit (struct ext4fs_jtx *jt, bool on);

/* With async commits: a commit block is written in the same step as
 * the next transaction's log, and one flush makes both durable (the
 * default); off: each commit writes its own commit block with FUA.
 * Set before the writer is used.
 */
extern void jtx_set_chain_commit (struct ext4fs_jtx *jt, bool on);

#endif /* EXT4FS_TRANS_H */
