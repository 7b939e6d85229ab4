/* ext4fs: the libext2fs io_manager over one shared nbdkit context.
 *
 * A "device" (struct ext4fs_dev) wraps the shared background context
 * (nbdkit_next_context_open (..., shared=1)) that every connection of
 * the nbdkit process uses.  libext2fs reaches it through
 * ext4fs_io_manager, opened by the name ext4fs_dev_name() returns; the
 * filter's data path calls ext4fs_dev_pread/pwrite/... directly, with
 * byte offsets, bypassing libext2fs and its block size.
 *
 * Every call into the context is bounds-checked here against the size
 * the context reported when the device was created: nbdkit aborts the
 * whole process on an out-of-range request.
 *
 * Thread safety: every function here may be called from any thread at
 * any time between ext4fs_dev_new and ext4fs_dev_free.  If the device
 * was created with serialize != 0 (the final thread model is below
 * PARALLEL), the lock of one lane (innermost in the lock order of
 * DESIGN.md) is held around each call into that lane's context.
 */
#ifndef EXT4FS_IO_H
#define EXT4FS_IO_H

#include <stdbool.h>
#include <stdint.h>
#include <ext2fs/ext2fs.h>
#include <nbdkit-filter.h>

struct ext4fs_dev;

/* The io_manager.  Its channels advertise CHANNEL_FLAGS_THREADS. */
extern io_manager ext4fs_io_manager;

/* Wrap a prepared shared context.  Queries get_size and every can_*
 * once, here, while single-threaded (nbdkit caches these without
 * locking).  Returns NULL (after nbdkit_error) on failure.
 */
extern struct ext4fs_dev *ext4fs_dev_new (nbdkit_next *next, int serialize);
/* Forget the device.  Does not close its contexts. */
extern void ext4fs_dev_free (struct ext4fs_dev *dev);

/* More contexts ("lanes") onto the same bytes, added before the device
 * is used.  Only for a plugin whose can_multi_conn is true, or a
 * device that is never written: requests go down any lane, flushes
 * down lane 0 only.  Returns -1 (the context is not taken) if it is
 * full or the context does not look like lane 0.
 */
#define EXT4FS_DEV_MAX_LANES 16
extern int ext4fs_dev_add_lane (struct ext4fs_dev *dev, nbdkit_next *next);
extern unsigned ext4fs_dev_nr_lanes (const struct ext4fs_dev *dev);
/* Lane i's context (0 is the one given to ext4fs_dev_new), or NULL. */
extern nbdkit_next *ext4fs_dev_lane (const struct ext4fs_dev *dev, unsigned i);

/* The name to pass to ext2fs_open2 with ext4fs_io_manager. */
extern const char *ext4fs_dev_name (const struct ext4fs_dev *dev);

extern uint64_t ext4fs_dev_size (const struct ext4fs_dev *dev);
extern int ext4fs_dev_can_write (const struct ext4fs_dev *dev);
extern int ext4fs_dev_can_fua (const struct ext4fs_dev *dev);
extern int ext4fs_dev_can_cache (const struct ext4fs_dev *dev);
extern nbdkit_next *ext4fs_dev_next (const struct ext4fs_dev *dev);

/* A read overlay (a journal replayed into memory): reads of device
 * block `home` return device block `src` instead, with the jbd2 magic
 * number put back into its first 4 bytes if `escaped`.  Entries are
 * sorted by home, each home once.  ext4fs_dev_set_overlay takes v
 * (malloc'd; NULL with n = 0 removes the overlay).  It may be called
 * while other threads read: an overlay that is replaced stays
 * allocated until ext4fs_dev_free, so a read that still uses it is
 * safe.  Writes are refused (EROFS) while an overlay is set: the
 * overlay would hide them.
 */
struct ext4fs_overlay_block {
  uint64_t home, src;
  uint32_t escaped;
};
extern int ext4fs_dev_set_overlay (struct ext4fs_dev *dev, unsigned blockbits,
                                   struct ext4fs_overlay_block *v, size_t n);
extern size_t ext4fs_dev_overlay_blocks (const struct ext4fs_dev *dev);

/* Metadata hooks (the journal's transaction cache): when set, the
 * io_manager's reads, writes and zeroes (libext2fs's metadata I/O)
 * go to these instead of the device; the data path (ext4fs_dev_*)
 * is not affected.  Byte offsets.  Set and removed while libext2fs is
 * not in use by any other thread (under the fs mutex, or at open and
 * close).
 */
struct ext4fs_meta_ops {
  int (*read) (void *opaque, void *buf, uint64_t count, uint64_t offset,
               int *err);
  int (*write) (void *opaque, const void *buf, uint64_t count,
                uint64_t offset, int *err);
  int (*zero) (void *opaque, uint64_t count, uint64_t offset, int *err);
};
extern void ext4fs_dev_set_meta_ops (struct ext4fs_dev *dev,
                                     const struct ext4fs_meta_ops *ops,
                                     void *opaque);

/* Data path.  Each returns 0 on success, or -1 with *err set to a
 * positive errno (EIO for a range outside the device, after
 * nbdkit_error).  count may be any size: requests are split at
 * EXT4FS_DEV_MAX_IO.  flags are NBDKIT_FLAG_*; FUA is passed down
 * only when the context supports it natively, else emulated with a
 * flush.
 */
#define EXT4FS_DEV_MAX_IO (32 * 1024 * 1024)
extern int ext4fs_dev_pread (struct ext4fs_dev *dev, void *buf, uint64_t count,
                             uint64_t offset, int *err);
extern int ext4fs_dev_pwrite (struct ext4fs_dev *dev, const void *buf,
                              uint64_t count, uint64_t offset, uint32_t flags,
                              int *err);
/* Write zeros (through the plugin's zero if it has one, else pwrite). */
extern int ext4fs_dev_zero (struct ext4fs_dev *dev, uint64_t count,
                            uint64_t offset, int *err);
/* Give freed space back below: the plugin's trim, or its zero with
 * MAY_TRIM if it has no trim; nothing if it has neither (see
 * ext4fs_dev_can_discard).  Only for blocks that are free and whose
 * freeing is durable.
 */
extern int ext4fs_dev_can_discard (const struct ext4fs_dev *dev);
extern int ext4fs_dev_discard (struct ext4fs_dev *dev, uint64_t count,
                               uint64_t offset, int *err);
extern int ext4fs_dev_cache (struct ext4fs_dev *dev, uint64_t count,
                             uint64_t offset, int *err);
extern int ext4fs_dev_flush (struct ext4fs_dev *dev, int *err);
/* About how many bytes were written or zeroed since the last
 * successful flush started (writes that completed during it count as
 * not flushed).
 */
extern uint64_t ext4fs_dev_unflushed (struct ext4fs_dev *dev);
/* The plugin's preferred block size limits, or 0/0/0. */
extern int ext4fs_dev_block_size (struct ext4fs_dev *dev, uint32_t *minimum,
                                  uint32_t *preferred, uint32_t *maximum);

/* Metadata I/O through ext4fs_io_manager (libext2fs's) in the
 * calling thread so far: writes made, and reads and writes that
 * failed.  libext2fs does not return every failure of its own writes;
 * a caller that holds the fs mutex around its libext2fs calls compares
 * the counts before and after them.
 */
struct ext4fs_io_counts {
  uint64_t writes, write_failures, read_failures;
};
extern void ext4fs_io_counts (struct ext4fs_io_counts *c);

/* Tests only (-D ext4fs.fail_meta_read=N, -D ext4fs.fail_meta_write=N,
 * -D ext4fs.count_meta=1): the Nth metadata read or write (zeroing
 * included) that libext2fs makes through ext4fs_io_manager, counted
 * from the start of the process, fails with EIO, once, before it
 * reaches the journal writer's cache or the device: as a failure of
 * the cache (out of memory) or of its read of a block it misses
 * would.  0: never.  log: each one is logged with its number
 * (nbdkit_debug), for a test to learn which to fail.  Set before any
 * thread runs.
 */
extern void ext4fs_io_set_meta_faults (unsigned read_nth, unsigned write_nth,
                                       bool log);

/* Error codes, both ways, in one place.
 *
 * ext4fs_errcode_to_errno: our io_manager passes errnos up unchanged
 * (< 256); known libext2fs codes map to the closest errno; anything
 * else (corruption, checksum failures, short reads) becomes EIO.
 */
extern int ext4fs_errcode_to_errno (errcode_t e);
extern errcode_t ext4fs_errno_to_errcode (int err);

#endif /* EXT4FS_IO_H */
