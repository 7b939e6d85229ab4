/* ext4fs: filesystem lifetime.
 *
 * Owns: the registry (the one struct ext4fs_fs of the process and its
 * user count), the shared background context under it, the startup
 * gate (features and state we refuse), the clean/unclean marking, and
 * metadata writeback (bitmaps, group descriptors, superblock) of only
 * what is dirty.
 *
 * Locks: reg_lock (the registry lock, outermost) protects the_fs and
 * fs_users; it is held while opening or closing an instance.
 * fsi->lock (the fs mutex) covers every libext2fs call on the
 * instance, see fs.h.  fs_sync takes the inode table lock (inside
 * inode_sync_times) and then fsi->lock.
 *
 * Lifetime: fs_startup (.after_fork) opens the filesystem read-only to
 * validate it, and keeps that instance.  The first connection that may
 * write (it is only then that we know -r was not given) replaces the
 * instance by a read-write one if no connection uses the read-only one
 * yet.  The instance then stays open until fs_shutdown (.cleanup):
 * reopening would cost a bitmap load and lose nothing but memory.
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/vector.h"
#include "bmap.h"
#include "cleanup.h"
#include "fs.h"
#include "inode.h"
#include "mmp.h"
#include "replay.h"
#include "trans.h"

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
/* Protected by reg_lock: */
static nbdkit_backend *the_backend;
static int serializes;           /* lanes need their locks */
static unsigned max_lanes = 1;    /* contexts into the plugin, at most */
static struct ext4fs_fs *the_fs;
static unsigned fs_users;
static bool rw_refused_plugin;  /* the plugin cannot write: stay RO */
/* Set once from .config (before any thread): */
static bool discard_freed = true;   /* ext4discard= */
static bool discard_free_at_open;   /* ext4discardfree= */

void
fs_set_discard (bool passthrough, bool free_at_open)
{
  discard_freed = passthrough;
  discard_free_at_open = free_at_open;
}

static int write_super_locked (struct ext4fs_fs *fsi, struct ext4fs_jtx *jt,
                               int *err);

/*----------------------------------------------------------------------
 * The metadata map.
 */

DEFINE_VECTOR_TYPE (meta_range_vector, struct ext4fs_meta_range);

struct meta_builder {
  meta_range_vector v;
  bool failed;
};

static void
meta_add (struct meta_builder *mb, uint64_t start, uint64_t len)
{
  struct ext4fs_meta_range r = {
    .start = start, .end = start + len < start ? UINT64_MAX : start + len,
  };

  if (len == 0 || mb->failed)
    return;
  if (meta_range_vector_append (&mb->v, r) == -1)
    mb->failed = true;
}

static int
meta_cmp (const void *a, const void *b)
{
  const struct ext4fs_meta_range *x = a, *y = b;
  return x->start < y->start ? -1 : x->start > y->start;
}

static int
journal_cb (ext2_filsys fs, blk64_t *blocknr, e2_blkcnt_t blockcnt,
            blk64_t ref_blk, int ref_offset, void *priv)
{
  meta_add (priv, *blocknr, 1);
  return 0;
}

/* Build fsi->meta.  Runs before the instance is published. */
static int
build_meta_map (struct ext4fs_fs *fsi)
{
  ext2_filsys fs = fsi->fs;
  struct meta_builder mb = { 0 };
  struct ext4fs_meta_range *v;
  dgrp_t g;
  size_t i, j;
  blk64_t old_desc_blocks;

  /* The old-style descriptor area, as libext2fs reserves it: under
   * meta_bg only the first s_first_meta_bg descriptor blocks are
   * there (the kernel's online resize makes such filesystems), the
   * rest are in their meta groups (new_desc).
   */
  if (ext2fs_has_feature_meta_bg (fs->super)) {
    old_desc_blocks = fs->super->s_first_meta_bg;
    if (old_desc_blocks > fs->desc_blocks)
      old_desc_blocks = fs->desc_blocks;
  }
  else
    old_desc_blocks = fs->desc_blocks + fs->super->s_reserved_gdt_blocks;

  for (g = 0; g < fs->group_desc_count; ++g) {
    blk64_t super_blk = 0, old_desc = 0, new_desc = 0;
    blk_t used = 0;

    ext2fs_super_and_bgd_loc2 (fs, g, &super_blk, &old_desc, &new_desc, &used);
    if (super_blk || g == 0)
      meta_add (&mb, super_blk, 1);
    if (old_desc)
      meta_add (&mb, old_desc, old_desc_blocks);
    if (new_desc)
      meta_add (&mb, new_desc, 1);
    meta_add (&mb, ext2fs_block_bitmap_loc (fs, g), 1);
    meta_add (&mb, ext2fs_inode_bitmap_loc (fs, g), 1);
    meta_add (&mb, ext2fs_inode_table_loc (fs, g), fs->inode_blocks_per_group);
  }
  if (ext2fs_has_feature_journal (fs->super) &&
      fs->super->s_journal_inum != 0 &&
      fs->super->s_journal_inum <= fs->super->s_inodes_count)
    /* Errors here are not fatal: a corrupt journal is not our data. */
    ext2fs_block_iterate3 (fs, fs->super->s_journal_inum,
                           BLOCK_FLAG_READ_ONLY, NULL, journal_cb, &mb);
  if (fs->super->s_feature_incompat & EXT4_FEATURE_INCOMPAT_MMP)
    meta_add (&mb, fs->super->s_mmp_block, 1);
  if (mb.failed) {
    meta_range_vector_reset (&mb.v);
    nbdkit_error ("out of memory building the metadata map");
    return -1;
  }
  v = mb.v.ptr;
  if (mb.v.len > 0) {
    qsort (v, mb.v.len, sizeof v[0], meta_cmp);
    for (i = 0, j = 1; j < mb.v.len; ++j) {
      if (v[j].start <= v[i].end) {
        if (v[j].end > v[i].end)
          v[i].end = v[j].end;
      }
      else
        v[++i] = v[j];
    }
    mb.v.len = i + 1;
  }
  fsi->meta = v;
  fsi->nmeta = mb.v.len;
  return 0;
}

bool
fs_is_metadata (const struct ext4fs_fs *fsi, uint64_t pblk, uint64_t len)
{
  size_t lo = 0, hi = fsi->nmeta;
  uint64_t end = pblk + len;

  /* First range whose end is past pblk. */
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (fsi->meta[mid].end <= pblk)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < fsi->nmeta && fsi->meta[lo].start < end;
}

bool
fs_block_usable (const struct ext4fs_fs *fsi, uint64_t blk)
{
  return blk >= fsi->first_data_block && blk < fsi->blocks_count &&
    !fs_is_metadata (fsi, blk, 1);
}

/* libext2fs calls these (under fsi->lock) for every block it
 * allocates or frees, ours and its own (extent tree and indirect
 * blocks): the groups to write back at the next sync.
 */
static void
alloc_stats_cb (ext2_filsys fs, blk64_t blk, int inuse)
{
  fs_group_dirty_locked (fs->priv_data, blk, 1);
  if (inuse < 0)
    fs_blocks_freed_locked (fs->priv_data, blk, 1);
}

static void
alloc_stats_range_cb (ext2_filsys fs, blk64_t blk, blk_t num, int inuse)
{
  /* In 1.47.0 this is called with num == 0 (the loop consumed it):
   * bmap.c records its own ranges.  Kept for fixed libext2fs.
   */
  fs_group_dirty_locked (fs->priv_data, blk, num);
}

/* Why writing is refused: to nbdkit_error, or (why != NULL, for the
 * warning at start-up) into why.
 */
static void refuse (char *why, size_t n, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

static void
refuse (char *why, size_t n, const char *fmt, ...)
{
  va_list ap;
  char buf[1024];

  va_start (ap, fmt);
  vsnprintf (why ? why : buf, why ? n : sizeof buf, fmt, ap);
  va_end (ap);
  if (why == NULL)
    nbdkit_error ("%s", buf);
}

/* Refuse to write to filesystems whose features or state we cannot
 * keep consistent.  Read-only access works for all of them (but for a
 * journal that needs recovery we warn: the newest data may be in the
 * journal only).
 */
static int
check_features (ext2_filsys fs, bool rw, char *why, size_t n)
{
  struct ext2_super_block *sb = fs->super;
  static const struct { int kind; uint32_t mask; const char *name; } no_write[] = {
    { 0, EXT4_FEATURE_INCOMPAT_ENCRYPT, "encrypt" },
    { 0, EXT4_FEATURE_INCOMPAT_CASEFOLD, "casefold" },
    { 1, EXT4_FEATURE_RO_COMPAT_BIGALLOC, "bigalloc" },
    { 1, EXT4_FEATURE_RO_COMPAT_QUOTA, "quota" },
    { 1, EXT4_FEATURE_RO_COMPAT_VERITY, "verity" },
    { 1, EXT4_FEATURE_RO_COMPAT_SHARED_BLOCKS, "shared_blocks" },
    { 1, EXT4_FEATURE_RO_COMPAT_READONLY, "read-only" },
  };
  size_t i;

  if (sb->s_feature_incompat & EXT3_FEATURE_INCOMPAT_JOURNAL_DEV) {
    refuse (why, n, "the image is an external ext3/ext4 journal device, "
            "not a filesystem");
    return -1;
  }
  if (!rw)
    return 0;
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  /* The superblock, group descriptors and MMP block are written from
   * libext2fs's in-memory copies, which are in CPU order (libext2fs
   * swaps them only in its own flush, which ext4fs does not use).
   */
  refuse (why, n, "ext4fs cannot write ext2/3/4 metadata on a big-endian "
          "host (it would be written in the wrong byte order): serve it "
          "read-only with nbdkit -r");
  return -1;
#endif
  for (i = 0; i < sizeof no_write / sizeof no_write[0]; ++i) {
    uint32_t f = no_write[i].kind == 0 ? sb->s_feature_incompat
                                       : sb->s_feature_ro_compat;
    if (f & no_write[i].mask) {
      refuse (why, n, "the filesystem has the '%s' feature, which ext4fs "
              "cannot write safely: serve it read-only with nbdkit -r",
              no_write[i].name);
      return -1;
    }
  }
  return 0;
}

/* The filesystem's state: a journal that needs recovery, errors, or
 * not cleanly closed.  For writing, this runs after the MMP claim (if
 * any): another node holding the filesystem is the better diagnosis
 * than the state it leaves.
 */
static int check_clean (ext2_filsys fs, char *why, size_t n);

static int
check_state (ext2_filsys fs, bool rw, char *why, size_t n)
{
  struct ext2_super_block *sb = fs->super;

  /* journal_open replayed an internal journal and the read-write
   * open cleared the flag; what is left is a journal ext4fs cannot
   * read.
   */
  if (sb->s_feature_incompat & EXT3_FEATURE_INCOMPAT_RECOVER) {
    if (rw) {
      refuse (why, n, "the filesystem's journal needs recovery and %s: run "
              "'e2fsck -y -E journal_only IMAGE' (or mount and unmount "
              "it once) first, or serve it read-only with nbdkit -r",
              !ext2fs_has_feature_journal (sb) ?
              "the filesystem has no journal (needs_recovery without "
              "has_journal)" :
              "the journal is on an external device, which ext4fs "
              "cannot read");
      return -1;
    }
  }
  if (!rw)
    return 0;
  return check_clean (fs, why, n);
}

/* The clean state writing needs (after any journal replay). */
static int
check_clean (ext2_filsys fs, char *why, size_t n)
{
  struct ext2_super_block *sb = fs->super;

  if (sb->s_state & EXT2_ERROR_FS) {
    refuse (why, n, "the filesystem is marked as having errors: run "
            "'e2fsck -f IMAGE' before writing to it, or serve it "
            "read-only with nbdkit -r");
    return -1;
  }
  if (!(sb->s_state & EXT2_VALID_FS)) {
    /* Not cleanly unmounted or closed (or mid-e2fsck).  Without a
     * journal to replay, its bitmaps may not match its files: blocks
     * a file uses could be handed to another.  (ext4fs itself clears
     * this flag from the first write until a clean exit.)
     */
    refuse (why, n, "the filesystem was not cleanly unmounted or closed "
            "(its state is not clean), so its free-space bitmaps "
            "cannot be trusted for writing: run 'e2fsck -f IMAGE' "
            "first, or serve it read-only with nbdkit -r");
    return -1;
  }
  return 0;
}

/* What the image holds when it is not an ext filesystem, if it starts
 * like something nbdkit can unwrap: a hint for the error message (""
 * if nothing is recognised).  The usual mistake is a whole disk image
 * given where a filesystem image is wanted.
 */
static const char *
container_hint (struct ext4fs_fs *fsi)
{
  unsigned char b[4096 + 512];
  uint64_t size = ext4fs_dev_size (fsi->dev);
  size_t n = size < sizeof b ? (size_t) size : sizeof b;
  int err;

  memset (b, 0, sizeof b);     /* what a short image does not fill */
  if (n < 512 || ext4fs_dev_pread (fsi->dev, b, n, 0, &err) == -1)
    return "";
  if (memcmp (b + 512, "EFI PART", 8) == 0 ||
      (n >= 4096 + 8 && memcmp (b + 4096, "EFI PART", 8) == 0) ||
      (b[510] == 0x55 && b[511] == 0xaa))
    return "; it starts with a partition table (a whole disk image?): add "
      "--filter=partition after --filter=ext4fs and give partition=N";
  if (memcmp (b, "LUKS\xba\xbe", 6) == 0)
    return "; it is LUKS-encrypted: add --filter=luks after --filter=ext4fs "
      "and give passphrase=...";
  if (memcmp (b, "\xfd" "7zXZ\0", 6) == 0)
    return "; it is xz-compressed: add --filter=xz after --filter=ext4fs "
      "(read-only)";
  if (b[0] == 0x1f && b[1] == 0x8b)
    return "; it is gzip-compressed: add --filter=gzip after --filter=ext4fs "
      "(read-only)";
  if (memcmp (b, "QFI\xfb", 4) == 0)
    return "; it is a qcow2 image: serve it with qemu-nbd and use the nbd "
      "plugin below ext4fs";
  if (memcmp (b + 257, "ustar", 5) == 0)
    return "; it is a tar archive: add --filter=tar after --filter=ext4fs "
      "and give tar-entry=...";
  if (memcmp (b + 512, "LABELONE", 8) == 0)
    return "; it is an LVM physical volume, which ext4fs cannot unwrap";
  return "";
}

/* ext2fs_open2 on fsi->dev into fsi->fs.  Returns -1 after nbdkit_error. */
static int
open_handle (struct ext4fs_fs *fsi, bool rw)
{
  errcode_t e;
  int flags;

  flags = EXT2_FLAG_64BITS | EXT2_FLAG_THREADS | EXT2_FLAG_SKIP_MMP |
    EXT2_FLAG_JOURNAL_DEV_OK;   /* so that we can say what it is */
  if (rw)
    flags |= EXT2_FLAG_RW;
  e = ext2fs_open2 (ext4fs_dev_name (fsi->dev), NULL, flags, 0, 0,
                    ext4fs_io_manager, &fsi->fs);
  if (e) {
    if (e == EXT2_ET_BAD_MAGIC || e == EXT2_ET_SB_CSUM_INVALID ||
        e == EXT2_ET_CORRUPT_SUPERBLOCK)
      nbdkit_error ("the image does not contain a valid ext2/ext3/ext4 "
                    "filesystem: %s%s", error_message (e),
                    e == EXT2_ET_BAD_MAGIC ? container_hint (fsi) : "");
    else if (e == EXT2_ET_UNSUPP_FEATURE)
      nbdkit_error ("the filesystem has incompatible features that "
                    "libext2fs does not support: %s", error_message (e));
    else if (e == EXT2_ET_RO_UNSUPP_FEATURE)
      nbdkit_error ("the filesystem has features that libext2fs cannot "
                    "write: serve it read-only with nbdkit -r (%s)",
                    error_message (e));
    else
      nbdkit_error ("could not open the filesystem: %s", error_message (e));
    fsi->fs = NULL;
    return -1;
  }
  return 0;
}

/* Close fsi->fs without writing anything and open it again: after the
 * device's contents changed under libext2fs (an overlay, a replay).
 */
static int
reopen_handle (struct ext4fs_fs *fsi, bool rw)
{
  ext2fs_free (fsi->fs);
  fsi->fs = NULL;
  return open_handle (fsi, rw);
}

static void
note (struct ext4fs_fs *fsi, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* A note for the user about the state served read-only, printed at
 * start-up (fs_startup).
 */
static void
note (struct ext4fs_fs *fsi, const char *fmt, ...)
{
  size_t len = strlen (fsi->note);
  va_list ap;

  if (len > 0 && len < sizeof fsi->note - 2) {
    fsi->note[len++] = ';';
    fsi->note[len++] = ' ';
    fsi->note[len] = '\0';
  }
  va_start (ap, fmt);
  vsnprintf (fsi->note + len, sizeof fsi->note - len, fmt, ap);
  va_end (ap);
}

/* Orphan inodes: files deleted or truncated while still open when the
 * kernel went down.  Their blocks are still allocated; the kernel or
 * e2fsck finishes the deletion at the next mount or check.
 */
static bool
has_orphans (ext2_filsys fs)
{
  return fs->super->s_last_orphan != 0 ||
    ext2fs_has_feature_orphan_present (fs->super);
}

/* The journal, before anything else looks at the filesystem
 * (DESIGN.md §14).  fsi->fs is open on the image as it is.  If the
 * journal needs recovery, replay it into an overlay of the device and
 * reopen fsi->fs through it, so that every check after this one and
 * libext2fs see the replayed filesystem; *jrp is then the journal
 * (read-write opens write it home later, after the MMP claim and the
 * gate).  Returns -1 after nbdkit_error.
 */
static int
journal_open (struct ext4fs_fs *fsi, bool rw, struct ext4fs_journal **jrp)
{
  struct ext2_super_block *sb = fsi->fs->super;
  struct ext4fs_journal *jr;

  *jrp = NULL;
  if (!ext2fs_has_feature_journal_needs_recovery (sb))
    return 0;
  if (!ext2fs_has_feature_journal (sb) ||
      sb->s_feature_incompat & EXT3_FEATURE_INCOMPAT_JOURNAL_DEV)
    return 0;                   /* check_state says what this is */
  if (sb->s_journal_inum == 0) {
    fsi->journal_unreplayed = true;
    note (fsi, "the filesystem's external journal needs recovery and "
          "ext4fs cannot read an external journal: serving the filesystem "
          "without it (the most recent changes may be missing)");
    return 0;
  }
  jr = journal_load (fsi->fs, fsi->dev);
  if (jr == NULL) {
    nbdkit_error ("the filesystem's journal needs recovery but cannot be "
                  "replayed (see the previous message): run 'e2fsck -fy "
                  "IMAGE' to repair it");
    return -1;
  }
  if (jr->r.nblocks > 0) {
    if (journal_overlay (jr) == -1 || reopen_handle (fsi, rw) == -1) {
      journal_free (jr);
      return -1;
    }
  }
  fsi->replay_trans = jr->r.ntrans;
  fsi->replay_blocks = jr->r.nblocks;
  if (!rw) {
    if (jr->j.start != 0)
      note (fsi, "journal: replayed %" PRIu32 " transaction(s) (%zu "
            "block(s)) into memory; the image is not changed",
            jr->r.ntrans, jr->r.nblocks);
    if (jr->r.failed_commit)
      note (fsi, "warning: journal transaction %" PRIu32 " is corrupt "
            "(bad commit checksum): the transactions before it were "
            "replayed, as e2fsck would; e2fsck would also mark the "
            "filesystem as having errors", jr->r.failed_tid);
    if (jr->j.error)
      note (fsi, "warning: the journal was aborted (error %" PRIi32 "): "
            "the filesystem may have errors", jr->j.error);
    if (jr->fc_pending)
      note (fsi, "warning: the journal holds fast-commit blocks after "
            "transaction %" PRIu32 ", which ext4fs does not replay: the "
            "most recent changes may be missing", jr->r.end_tid - 1);
  }
  *jrp = jr;
  return 0;
}

/* Why a replayed journal must not be written in place and served
 * read-write: checked before anything is written.  Returns -1 after
 * nbdkit_error.
 */
static int
journal_check_rw (struct ext4fs_fs *fsi, struct ext4fs_journal *jr)
{
  if (jr->r.failed_commit) {
    nbdkit_error ("the filesystem's journal needs recovery, but transaction "
                  "%" PRIu32 " in it is corrupt (bad commit checksum): run "
                  "'e2fsck -fy IMAGE' before writing, or serve it read-only "
                  "with nbdkit -r", jr->r.failed_tid);
    return -1;
  }
  if (jr->j.error) {
    nbdkit_error ("the filesystem's journal was aborted (error %" PRIi32
                  "), so the filesystem may have errors: run 'e2fsck -fy "
                  "IMAGE' before writing, or serve it read-only with "
                  "nbdkit -r", jr->j.error);
    return -1;
  }
  if (jr->fc_pending) {
    nbdkit_error ("the filesystem's journal holds fast-commit blocks, which "
                  "ext4fs cannot replay: run 'e2fsck -y -E journal_only IMAGE' "
                  "(or mount and unmount it once) before writing, or serve "
                  "it read-only with nbdkit -r");
    return -1;
  }
  return 0;
}

/* After the journal was emptied: clear needs_recovery, as the kernel
 * and e2fsck do, with the superblock's free counts summed from the
 * group descriptors (the kernel does not keep them in the journal).
 */
static int
clear_recovery_flag (struct ext4fs_fs *fsi, int *err)
{
  ext2_filsys fs = fsi->fs;
  uint64_t free_blocks = 0, free_inodes = 0;
  dgrp_t g;

  for (g = 0; g < fs->group_desc_count; ++g) {
    free_blocks += ext2fs_bg_free_blocks_count (fs, g);
    free_inodes += ext2fs_bg_free_inodes_count (fs, g);
  }
  ext2fs_free_blocks_count_set (fs->super, free_blocks);
  if (free_inodes <= fs->super->s_inodes_count)
    fs->super->s_free_inodes_count = free_inodes;
  ext2fs_clear_feature_journal_needs_recovery (fs->super);
  if (write_super_locked (fsi, NULL, err) == -1 ||
      ext4fs_dev_flush (fsi->dev, err) == -1) {
    nbdkit_error ("journal: clearing needs_recovery: %s", strerror (*err));
    return -1;
  }
  return 0;
}

/* Journaled writes (DESIGN.md §15): the commit's preparation and the
 * end of a freed block's reservation.  fs mutex held.
 */
static int
journal_prepare (void *opaque, int *err)
{
  return fs_writeback_locked (opaque, err);
}

static void
journal_unhold (void *opaque, uint64_t blk, uint64_t n)
{
  struct ext4fs_fs *fsi = opaque;
  int err;

  /* The commit that freed them is durable and nothing can reuse them
   * yet (still marked in use): give them back below first.  Discard
   * is advisory: a failure only costs space.
   */
  if (fsi->discard &&
      ext4fs_dev_discard (fsi->dev, n << fsi->blockbits,
                          blk << fsi->blockbits, &err) == -1)
    nbdkit_debug ("ext4fs: discarding %" PRIu64 "+%" PRIu64 " failed: %s",
                  blk, n, strerror (err));
  ext2fs_unmark_block_bitmap_range2 (fsi->fs->block_map, blk, n);
}

/* ext4discardfree=true: every free block range, once, at a read-write
 * open (as e2fsck -E discard).  The instance is not published yet.
 */
static void
discard_free_space (struct ext4fs_fs *fsi)
{
  ext2_filsys fs = fsi->fs;
  blk64_t start = fs->super->s_first_data_block, end = fsi->blocks_count - 1;
  uint64_t total = 0;
  int err;

  while (start <= end) {
    blk64_t first, last;
    if (ext2fs_find_first_zero_block_bitmap2 (fs->block_map, start, end,
                                              &first) != 0)
      break;
    if (ext2fs_find_first_set_block_bitmap2 (fs->block_map, first, end,
                                             &last) != 0)
      last = end + 1;
    if (ext4fs_dev_discard (fsi->dev, (last - first) << fsi->blockbits,
                            first << fsi->blockbits, &err) == -1) {
      nbdkit_debug ("ext4fs: discarding free space failed: %s",
                    strerror (err));
      return;
    }
    total += last - first;
    start = last;
  }
  nbdkit_debug ("ext4fs: discarded %" PRIu64 " free blocks", total);
}

/* A read-write filesystem with an internal journal gets its metadata
 * changes journaled (-D ext4fs.journal=0 turns that off: the old
 * "not clean" marking).  The log is empty here (replayed, or clean).
 * Without one, the same writer writes metadata back without a log.
 */
static int
journal_writer_open (struct ext4fs_fs *fsi)
{
  struct ext2_super_block *sb = fsi->fs->super;
  struct ext4fs_journal *jr;

  if (!ext4fs_debug_journal || !ext2fs_has_feature_journal (sb) ||
      sb->s_journal_inum == 0) {
    /* No journal: metadata is still written back in order (data
     * first), at the same points a commit would be.
     */
    fsi->jt = jtx_open_nolog (fsi->dev, fsi->blockbits, fsi->fs, &fsi->lock,
                              journal_prepare, journal_unhold, fsi);
    if (fsi->jt && ext4fs_debug_flush_ahead_mib >= 0)
      jtx_set_flush_ahead (fsi->jt,
                           (uint64_t) ext4fs_debug_flush_ahead_mib << 20);
    return fsi->jt ? 0 : -1;
  }
  jr = journal_load (fsi->fs, fsi->dev);
  if (jr == NULL) {
    nbdkit_error ("the filesystem's journal cannot be used for writing "
                  "(see the previous message): run 'e2fsck -fy IMAGE', or "
                  "serve it read-only with nbdkit -r");
    return -1;
  }
  fsi->jt = jtx_open (jr, fsi->fs, &fsi->lock, journal_prepare,
                      journal_unhold, fsi);
  if (fsi->jt == NULL)
    return -1;
  if (ext4fs_debug_flush_ahead_mib >= 0)
    jtx_set_flush_ahead (fsi->jt, (uint64_t) ext4fs_debug_flush_ahead_mib << 20);
  jtx_set_checkpoint_first (fsi->jt, ext4fs_debug_checkpoint_first != 0);
  jtx_set_async_commit (fsi->jt, ext4fs_debug_async_commit != 0);
  jtx_set_chain_commit (fsi->jt, ext4fs_debug_chain_commit != 0);
  nbdkit_debug ("ext4fs: metadata changes are journaled");
  return 0;
}

/* At the read-only open of start-up: would a client that writes be
 * refused?  Then say why now, not only in the log at its connection
 * (where qemu shows just "Requested export not available").  The same
 * checks as the read-write open (features, state, orphans, a journal
 * it could not replay); a journal it can replay is not a reason.
 */
static void
rw_warning (struct ext4fs_fs *fsi, const struct ext4fs_journal *jr)
{
  char why[512];

  /* With the journal replayed (jr), needs_recovery is no reason. */
  if (check_features (fsi->fs, true, why, sizeof why) == -1 ||
      (jr ? check_clean (fsi->fs, why, sizeof why) :
       check_state (fsi->fs, true, why, sizeof why)) == -1)
    note (fsi, "warning: clients that write will be refused (%s)", why);
  else if (has_orphans (fsi->fs))
    note (fsi, "warning: clients that write will be refused (the "
          "filesystem has orphan inodes: run 'e2fsck -fy IMAGE' first)");
}

/* Claim MMP (mmp.c) before anything is written, replay included, and
 * before anything but the superblock and group descriptors is read;
 * then read those again.  Another node may have written the
 * filesystem until its clean release, just before the claim: nothing
 * read before then is used.  (The claim takes 11 s or more, under the
 * registry lock: it happens only when no connection uses the
 * filesystem, and the connections that arrive meanwhile need the
 * instance being opened.)
 */
static int
claim_mmp (struct ext4fs_fs *fsi)
{
  uint64_t blk = fsi->fs->super->s_mmp_block;

  /* Refuse what we refuse anyway before the wait, not after. */
  if (check_features (fsi->fs, true, NULL, 0) == -1)
    return -1;
  fsi->mmp = mmp_start (fsi);
  if (fsi->mmp == NULL || reopen_handle (fsi, true) == -1)
    return -1;
  if (!ext2fs_has_feature_mmp (fsi->fs->super) ||
      fsi->fs->super->s_mmp_block != blk ||
      fsi->blocksize != fsi->fs->blocksize) {
    nbdkit_error ("MMP: the filesystem's superblock changed while ext4fs "
                  "claimed it (another host or program changed the MMP "
                  "settings): refusing to open it read-write");
    return -1;
  }
  return 0;
}

struct ext4fs_fs *
fs_open_dev (struct ext4fs_dev *dev, bool rw)
{
  struct ext4fs_fs *fsi;
  struct ext4fs_journal *jr = NULL;
  errcode_t e;
  uint64_t need;
  int err;

  fsi = calloc (1, sizeof *fsi);
  if (fsi == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  pthread_mutex_init (&fsi->lock, NULL);
  fsi->dev = dev;

  if (open_handle (fsi, rw) == -1)
    goto err;
  fsi->rw = rw;
  fsi->blocksize = fsi->fs->blocksize;
  fsi->blockbits = 10 + fsi->fs->super->s_log_block_size;
  fsi->blocks_count = ext2fs_blocks_count (fsi->fs->super);
  fsi->first_data_block = fsi->fs->super->s_first_data_block;
  if (rw && ext2fs_has_feature_mmp (fsi->fs->super) &&
      claim_mmp (fsi) == -1)
    goto err;
  if (journal_open (fsi, rw, &jr) == -1)
    goto err;
  fsi->blocks_count = ext2fs_blocks_count (fsi->fs->super);
  fsi->first_data_block = fsi->fs->super->s_first_data_block;

  if (check_features (fsi->fs, rw, NULL, 0) == -1)
    goto err;
  /* Does the filesystem fit in the device? */
  if (__builtin_mul_overflow (fsi->blocks_count, (uint64_t) fsi->blocksize,
                              &need) ||
      need > ext4fs_dev_size (fsi->dev)) {
    nbdkit_error ("the filesystem needs %" PRIu64 " bytes but the device "
                  "is only %" PRIu64 " bytes (truncated image?)",
                  fsi->blocks_count * fsi->blocksize,
                  ext4fs_dev_size (fsi->dev));
    goto err;
  }
  if (!rw && check_state (fsi->fs, rw, NULL, 0) == -1)
    goto err;
  if (!rw)
    rw_warning (fsi, jr);
  if (!rw && has_orphans (fsi->fs))
    note (fsi, "note: the filesystem has orphan inodes (files deleted or "
          "truncated while still open when it went down): they are served "
          "as they are; e2fsck or the next mount would finish them");
  if (rw) {
    if (jr && journal_check_rw (fsi, jr) == -1)
      goto err;
    if (has_orphans (fsi->fs)) {
      nbdkit_error ("the filesystem has orphan inodes (files deleted or "
                    "truncated while still open when it went down), which "
                    "ext4fs does not finish: run 'e2fsck -fy IMAGE' (or "
                    "mount and unmount it once) before writing, or serve "
                    "it read-only with nbdkit -r");
      goto err;
    }
    if (jr && jr->r.nblocks > 0) {
      /* The overlay goes before the writes: it would hide them. */
      if (ext4fs_dev_set_overlay (fsi->dev, 0, NULL, 0) == -1 ||
          journal_replay_in_place (jr, &err) == -1 ||
          reopen_handle (fsi, rw) == -1) {
        nbdkit_error ("the journal could not be replayed into the image; "
                      "it still needs recovery (run 'e2fsck -fy IMAGE', or "
                      "try again)");
        goto err;
      }
    }
    else if (jr && jr->j.start != 0 &&
             journal_replay_in_place (jr, &err) == -1)
      goto err;     /* only revoked or empty transactions: still empty it */
    if (jr && ext2fs_has_feature_journal_needs_recovery (fsi->fs->super)) {
      if (clear_recovery_flag (fsi, &err) == -1)
        goto err;
      if (jr->j.start != 0)
        fprintf (stderr, "nbdkit: ext4fs: journal: replayed %" PRIu32
                 " transaction(s) (%zu block(s)) into the image\n",
                 jr->r.ntrans, jr->r.nblocks);
    }
    fsi->blocks_count = ext2fs_blocks_count (fsi->fs->super);
    e = ext2fs_read_bitmaps (fsi->fs);
    if (e) {
      nbdkit_error ("could not read the filesystem's bitmaps: %s",
                    error_message (e));
      goto err;
    }
    fsi->dirty_groups = calloc (fsi->fs->group_desc_count, 1);
    if (fsi->dirty_groups == NULL) {
      nbdkit_error ("calloc: %m");
      goto err;
    }
    if (check_state (fsi->fs, rw, NULL, 0) == -1)
      goto err;
    if (journal_writer_open (fsi) == -1)
      goto err;
    /* Discards come after the freeing is durable, before any reuse
     * (DESIGN.md §16): with the journal, or the ordered write-back
     * without one.
     */
    fsi->discard = discard_freed && fsi->jt && ext4fs_dev_can_discard (dev);
    if (discard_freed && !fsi->discard)
      nbdkit_debug ("ext4fs: freed blocks are not discarded below (the "
                    "plugin cannot trim)");
    if (discard_free_at_open) {
      if (ext4fs_dev_can_discard (dev))
        discard_free_space (fsi);
      else
        nbdkit_debug ("ext4fs: ext4discardfree: the plugin cannot trim");
    }
    fsi->fs->priv_data = fsi;
    ext2fs_set_block_alloc_stats_callback (fsi->fs, alloc_stats_cb, NULL);
    ext2fs_set_block_alloc_stats_range_callback (fsi->fs,
                                                 alloc_stats_range_cb, NULL);
  }
  fsi->orig_state = fsi->fs->super->s_state;
  if (build_meta_map (fsi) == -1)
    goto err;
  journal_free (jr);
  nbdkit_debug ("ext4fs: opened filesystem %s, %u byte blocks, "
                "%" PRIu64 " blocks",
                rw ? "read-write" : "read-only", fsi->blocksize,
                fsi->blocks_count);
  return fsi;

 err:
  journal_free (jr);
  jtx_free (fsi->jt);
  mmp_release (fsi->mmp);
  if (fsi->fs)
    ext2fs_free (fsi->fs);      /* nothing is dirty: write nothing */
  free (fsi->meta);
  free (fsi->dirty_groups);
  pthread_mutex_destroy (&fsi->lock);
  free (fsi);
  return NULL;
}

void
fs_close_dev (struct ext4fs_fs *fsi)
{
  int err;

  inode_forget_all (fsi);       /* kept on a broken filesystem */
  /* The MMP updater must not race the last metadata writes, and if
   * another node took the filesystem we write nothing more at all.
   */
  mmp_stop_thread (fsi->mmp);
  if (fsi->fs && mmp_lost (fsi->mmp)) {
    ext2fs_free (fsi->fs);
    fsi->fs = NULL;
  }
  if (fsi->fs && fsi->jt && !jtx_logged (fsi->jt)) {
    /* No journal: the last write-back, then the clean state below as
     * ever (with the hooks gone).  A failed write-back or an earlier
     * failed flush leave it marked with errors, never clean.
     */
    if (fsi->marked_unclean && !fsi->broken &&
        jtx_close (fsi->jt, &err) == -1) {
      nbdkit_error ("closing the filesystem: writing metadata back failed: "
                    "%s", strerror (err));
      fsi->broken = true;
    }
    if (jtx_aborted (fsi->jt))
      fsi->broken = true;
    if (ext4fs_debug_journal_stats)
      jtx_stats (fsi->jt);
    jtx_free (fsi->jt);
    fsi->jt = NULL;
  }
  if (fsi->fs && fsi->jt) {
    /* Journaled: commit, checkpoint, empty the log, and only then
     * clear needs_recovery.  After an abort (or MMP lost) nothing more
     * is written: the image needs recovery, and replay gives the last
     * committed state.
     */
    if (fsi->marked_unclean) {
      if (!fsi->broken && !mmp_lost (fsi->mmp) &&
          jtx_close (fsi->jt, &err) == 0) {
        pthread_mutex_lock (&fsi->lock);
        ext2fs_clear_feature_journal_needs_recovery (fsi->fs->super);
        if (write_super_locked (fsi, NULL, &err) == -1 ||
            ext4fs_dev_flush (fsi->dev, &err) == -1)
          nbdkit_error ("closing the filesystem: needs_recovery could not "
                        "be cleared: %s", strerror (err));
        pthread_mutex_unlock (&fsi->lock);
      }
      else
        nbdkit_error ("closing the filesystem: the journal was not closed "
                      "cleanly; the filesystem is left needing recovery "
                      "(its journal replays to the last committed state)");
    }
    if (ext4fs_debug_journal_stats)
      jtx_stats (fsi->jt);
    jtx_free (fsi->jt);
    fsi->jt = NULL;
    ext2fs_free (fsi->fs);
    fsi->fs = NULL;
  }
  if (fsi->fs && fsi->rw && fsi->broken) {
    /* Only the errors flag goes to disk (see fs_writeback_locked). */
    pthread_mutex_lock (&fsi->lock);
    fsi->fs->super->s_state |= EXT2_ERROR_FS;
    fsi->fs->super->s_state &= ~EXT2_VALID_FS;
    write_super_locked (fsi, NULL, &err);
    ext2fs_free (fsi->fs);
    fsi->fs = NULL;
    pthread_mutex_unlock (&fsi->lock);
  }
  if (fsi->fs) {
    pthread_mutex_lock (&fsi->lock);
    if (fsi->rw && fsi->marked_unclean) {
      /* Everything dirty first, made durable; only then the clean
       * flag.  (Not ext2fs_close2: it would rewrite every bitmap and
       * descriptor and all backups, for nothing.  Backup superblocks
       * and descriptors are left as they were, as the kernel does.)
       */
      int r = fs_writeback_locked (fsi, &err);

      if (r == 0)
        r = ext4fs_dev_flush (fsi->dev, &err);
      if (r == -1)
        nbdkit_error ("closing the filesystem: metadata could not be "
                      "written (%s); it stays marked not clean",
                      strerror (err));
      else if (fsi->meta_write_failed)
        nbdkit_error ("closing the filesystem: a metadata write failed "
                      "earlier in this session; it stays marked not clean "
                      "(run e2fsck -f)");
      else {
        fsi->fs->super->s_state = fsi->orig_state;
        if (write_super_locked (fsi, NULL, &err) == -1)
          nbdkit_error ("closing the filesystem: the clean flag could not "
                        "be written: %s", strerror (err));
      }
    }
    ext2fs_free (fsi->fs);
    fsi->fs = NULL;
    pthread_mutex_unlock (&fsi->lock);
  }
  mmp_release (fsi->mmp);      /* after the last metadata write */
  if (fsi->rw)
    ext4fs_dev_flush (fsi->dev, &err);
  bmap_icache_free (fsi);
  free (fsi->meta);
  free (fsi->dirty_groups);
  pthread_mutex_destroy (&fsi->lock);
  free (fsi);
}

/* Open more contexts into the plugin (DESIGN.md §8).  Several lanes
 * see the same bytes only if the plugin says can_multi_conn (a flush
 * on one context then persists the writes of all); a filesystem opened
 * read-only never writes, so any plugin will do then.  Failing to open
 * one is not an error: we go on with the lanes we have.  Caller holds
 * reg_lock; the device is not in use yet.
 */
static void
add_lanes (struct ext4fs_dev *dev, bool rw)
{
  nbdkit_next *first = ext4fs_dev_next (dev);
  unsigned want = max_lanes, i;

  if (want > 1 && rw && first->can_multi_conn (first) != 1) {
    nbdkit_debug ("ext4fs: the plugin does not support multi-conn: "
                  "one context for a writable filesystem");
    want = 1;
  }
  for (i = 1; i < want; ++i) {
    nbdkit_next *next = nbdkit_next_context_open (the_backend, !rw, "", 1);

    if (next == NULL)
      break;
    if (next->prepare (next) == -1) {
      nbdkit_next_context_close (next);
      break;
    }
    if (ext4fs_dev_add_lane (dev, next) == -1) {
      next->finalize (next);
      nbdkit_next_context_close (next);
      break;
    }
  }
  nbdkit_debug ("ext4fs: %u context(s) into the plugin (%s)",
                ext4fs_dev_nr_lanes (dev), rw ? "read-write" : "read-only");
}

/* Finalize and close every lane, lane 0 last. */
static void
close_lanes (struct ext4fs_dev *dev)
{
  unsigned i;

  for (i = ext4fs_dev_nr_lanes (dev); i > 0; --i) {
    nbdkit_next *next = ext4fs_dev_lane (dev, i - 1);
    next->finalize (next);
    nbdkit_next_context_close (next);
  }
}

/* Open the shared contexts and the filesystem.  Caller holds reg_lock. */
static struct ext4fs_fs *
fs_open (bool rw)
{
  struct ext4fs_fs *fsi;
  struct ext4fs_dev *dev;
  nbdkit_next *next;

  next = nbdkit_next_context_open (the_backend, !rw, "", 1);
  if (next == NULL && rw) {
    nbdkit_debug ("the plugin cannot be opened read-write; "
                  "serving read-only");
    rw = false;
    rw_refused_plugin = true;
    next = nbdkit_next_context_open (the_backend, 1, "", 1);
  }
  if (next == NULL) {
    nbdkit_error ("could not open the plugin underneath ext4fs");
    return NULL;
  }
  if (next->prepare (next) == -1)
    goto err1;
  dev = ext4fs_dev_new (next, serializes);
  if (dev == NULL)
    goto err2;
  if (rw && ext4fs_dev_can_write (dev) != 1) {
    nbdkit_debug ("the plugin is read-only; serving read-only");
    rw = false;
    rw_refused_plugin = true;
  }
  add_lanes (dev, rw);
  fsi = fs_open_dev (dev, rw);
  if (fsi == NULL)
    goto err3;
  return fsi;

 err3:
  close_lanes (dev);
  ext4fs_dev_free (dev);
  return NULL;

 err2:
  next->finalize (next);
 err1:
  nbdkit_next_context_close (next);
  return NULL;
}

/* Close an instance: write back, mark clean, close, release the
 * contexts.  Caller holds reg_lock and no one else uses fsi.
 */
static void
fs_close (struct ext4fs_fs *fsi)
{
  struct ext4fs_dev *dev = fsi->dev;

  fs_close_dev (fsi);
  close_lanes (dev);
  ext4fs_dev_free (dev);
}

int
fs_startup (nbdkit_backend *backend, int thread_model, unsigned lanes)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&reg_lock);

  the_backend = backend;
  /* Below PARALLEL each context takes one call at a time, so a lane is
   * locked around each call.  Below SERIALIZE_REQUESTS nbdkit would
   * not run two contexts of the plugin at once: one lane only.
   */
  serializes = thread_model < NBDKIT_THREAD_MODEL_PARALLEL;
  max_lanes = thread_model < NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS ? 1 : lanes;
  ext4fs_io_set_meta_faults (ext4fs_debug_fail_meta_read > 0 ?
                             ext4fs_debug_fail_meta_read : 0,
                             ext4fs_debug_fail_meta_write > 0 ?
                             ext4fs_debug_fail_meta_write : 0,
                             ext4fs_debug_count_meta != 0);
  the_fs = fs_open (false);
  if (the_fs == NULL)
    return -1;
  /* What a read-only connection will be served (a read-write open
   * says what it does itself).
   */
  if (the_fs->note[0])
    fprintf (stderr, "nbdkit: ext4fs: %s\n", the_fs->note);
  return 0;
}

void
fs_startup_note (char *buf, size_t len)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&reg_lock);

  snprintf (buf, len, "%s", the_fs ? the_fs->note : "");
}

struct ext4fs_fs *
fs_get (int readonly)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&reg_lock);

  if (the_fs && !readonly && !the_fs->rw && !rw_refused_plugin) {
    if (fs_users > 0) {
      /* Only possible when a filter above us makes some connections
       * read-only and others not.  Do not pull the filesystem from
       * under the connections using it.
       */
      nbdkit_debug ("ext4fs: filesystem is open read-only by another "
                    "connection; this connection is read-only too");
    }
    else {
      fs_close (the_fs);
      the_fs = NULL;
    }
  }
  if (the_fs == NULL) {
    the_fs = fs_open (!readonly);
    if (the_fs == NULL)
      return NULL;
  }
  fs_users++;
  return the_fs;
}

void
fs_put (struct ext4fs_fs *fsi)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&reg_lock);

  assert (fs_users > 0);
  fs_users--;
}

void
fs_shutdown (void)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&reg_lock);

  if (the_fs) {
    /* The last write-back or commit is fs_close_dev's. */
    if (the_fs->rw)
      inode_sync_times (the_fs);
    fs_close (the_fs);
    the_fs = NULL;
  }
}

/*----------------------------------------------------------------------
 * Writeback.
 */

/* The primary superblock from memory, with a fresh checksum and
 * s_wtime: into the running transaction of jt (journal or write-back),
 * or with jt NULL straight to the device.
 */
static int
write_super_locked (struct ext4fs_fs *fsi, struct ext4fs_jtx *jt, int *err)
{
  ext2_filsys fs = fsi->fs;
  int r;

  fs->super->s_wtime = time (NULL);
  ext2fs_superblock_csum_set (fs, fs->super);
  if (jt)
    r = jtx_put_bytes (jt, SUPERBLOCK_OFFSET, fs->super, SUPERBLOCK_SIZE, err);
  else
    r = ext4fs_dev_pwrite (fsi->dev, fs->super, SUPERBLOCK_SIZE,
                           SUPERBLOCK_OFFSET, 0, err);
  if (r == -1)
    return -1;
  /* ext2fs_close2 writes only the bytes that differ from orig_super:
   * keep it equal to what is (or will be) on disk.
   */
  if (fs->orig_super)
    memcpy (fs->orig_super, fs->super, SUPERBLOCK_SIZE);
  return 0;
}

static int
mark_not_clean (void *opaque, int *err)
{
  struct ext4fs_fs *fsi = opaque;

  fsi->fs->super->s_state &= ~EXT2_VALID_FS;
  return write_super_locked (fsi, fsi->jt, err);
}

static int
set_recovery_flag (void *opaque, int *err)
{
  struct ext4fs_fs *fsi = opaque;

  ext2fs_set_feature_journal_needs_recovery (fsi->fs->super);
  return write_super_locked (fsi, NULL, err);
}

int
fs_begin_write (struct ext4fs_fs *fsi, int *err)
{
  /* Fast path, taken by every write after the first: no fs mutex (it
   * would serialize all writers on one lock).  The flags are only ever
   * set, under the mutex; reading a stale "not yet" just takes the
   * slow path.
   */
  if (__atomic_load_n (&fsi->marked_unclean, __ATOMIC_ACQUIRE) &&
      !__atomic_load_n (&fsi->broken, __ATOMIC_RELAXED) &&
      !mmp_lost (fsi->mmp) && !(fsi->jt && jtx_aborted (fsi->jt)))
    return 0;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fsi->lock);

  if (!fsi->rw) {
    *err = EROFS;
    return -1;
  }
  if (mmp_lost (fsi->mmp)) {
    nbdkit_error ("MMP: another host or program took the filesystem; "
                  "refusing to write to it");
    *err = EIO;
    return -1;
  }
  if (fsi->broken) {
    nbdkit_error ("the filesystem was marked as having errors earlier in "
                  "this session; refusing to change it further");
    *err = EIO;
    return -1;
  }
  if (jtx_aborted (fsi->jt)) {
    nbdkit_error ("%s earlier in this session; refusing to change the "
                  "filesystem further", jtx_logged (fsi->jt) ?
                  "the journal was aborted" :
                  "metadata writeback stopped after a failure");
    *err = EIO;
    return -1;
  }
  if (fsi->marked_unclean)
    return 0;
  /* Read-write: the instance has its writer (journal_writer_open). */
  if (jtx_logged (fsi->jt)) {
    /* Journaled: needs_recovery (with the journal's features) durable
     * before anything changes; VALID_FS stays set, as under a kernel.
     */
    if (jtx_begin_locked (fsi->jt, set_recovery_flag, fsi, err) == -1) {
      ext2fs_clear_feature_journal_needs_recovery (fsi->fs->super);
      return -1;
    }
    __atomic_store_n (&fsi->marked_unclean, true, __ATOMIC_RELEASE);
    return 0;
  }
  /* Write-back without a journal: VALID_FS cleared on disk (home and
   * flushed) before anything else changes, so that a crash from now on
   * makes e2fsck check the filesystem.
   */
  if (jtx_begin_locked (fsi->jt, mark_not_clean, fsi, err) == -1) {
    fsi->fs->super->s_state = fsi->orig_state;
    return -1;
  }
  __atomic_store_n (&fsi->marked_unclean, true, __ATOMIC_RELEASE);
  return 0;
}

void
fs_group_dirty_locked (struct ext4fs_fs *fsi, uint64_t blk, uint64_t count)
{
  ext2_filsys fs = fsi->fs;
  dgrp_t g, last;

  if (count == 0)
    return;
  g = ext2fs_group_of_blk2 (fs, blk);
  last = ext2fs_group_of_blk2 (fs, blk + count - 1);
  for (; g <= last; ++g)
    fsi->dirty_groups[g] = 1;
  fsi->super_dirty = true;
}

void
fs_set_broken_locked (struct ext4fs_fs *fsi, const char *why)
{
  nbdkit_error ("filesystem metadata may be inconsistent (%s): marking "
                "the filesystem as having errors; run e2fsck", why);
  __atomic_store_n (&fsi->broken, true, __ATOMIC_RELAXED);
  if (fsi->jt) {
    /* The running transaction is half changed: it is never committed,
     * and the last committed state (which replay gives) is consistent.
     * Without a journal nothing more goes home either, and the close
     * marks the filesystem with errors.
     */
    jtx_abort_locked (fsi->jt, why);
    if (jtx_logged (fsi->jt))
      return;
  }
  fsi->fs->super->s_state |= EXT2_ERROR_FS;
  fsi->super_dirty = true;
}

void
fs_blocks_freed_locked (struct ext4fs_fs *fsi, uint64_t blk, uint64_t n)
{
  if (fsi->jt == NULL || n == 0)
    return;
  /* Not reused before the transaction that freed them commits: kept
   * marked in use in memory (the counts say free, as the bitmap
   * blocks written into the transaction do).
   */
  jtx_blocks_freed_locked (fsi->jt, blk, n);
  ext2fs_mark_block_bitmap_range2 (fsi->fs->block_map, blk, n);
}

/* Only after fs_begin_write succeeded (or, for times, after a write
 * did): the instance is read-write, so it has its writer.
 */
int
fs_handle_start (struct ext4fs_fs *fsi, bool data, int *err)
{
  assert (fsi->jt != NULL);
  return jtx_handle_start (fsi->jt, data, err);
}

void
fs_handle_stop (struct ext4fs_fs *fsi, bool data, bool needs_commit)
{
  jtx_handle_stop (fsi->jt, data, needs_commit);
}

bool
fs_enospc_retry (struct ext4fs_fs *fsi)
{
  int err;

  if (fsi->jt == NULL || !jtx_has_held (fsi->jt))
    return false;
  /* Blocks freed but not yet committed are not free space yet: commit
   * them, then the allocation may try again.
   */
  return jtx_sync (fsi->jt, true, &err) == 0;
}

bool
fs_fua_needs_sync (struct ext4fs_fs *fsi)
{
  assert (fsi->jt != NULL);     /* after fs_begin_write */
  return jtx_pending (fsi->jt);
}

struct held_clear {
  char *buf;
  uint64_t first;               /* the group's first block */
};

/* Clear the bits of held blocks [blk, blk+n) (inside the group). */
static void
held_clear_cb (void *opaque, uint64_t blk, uint64_t n)
{
  struct held_clear *hc = opaque;
  uint64_t i;

  for (i = 0; i < n; ++i)
    ext2fs_clear_bit ((unsigned) (blk + i - hc->first), hc->buf);
}

void
fs_meta_write_failed_locked (struct ext4fs_fs *fsi, const char *what)
{
  if (fsi->jt && jtx_logged (fsi->jt)) {
    /* Into the running transaction: the blocks the request changed
     * before this write are in it, this one is not.  Never commit it.
     * (Without a journal the write-back is ordered, not atomic: the
     * inode is written again at the next sync, and the filesystem is
     * not marked clean below.)
     */
    fs_set_broken_locked (fsi, what);
    return;
  }
  if (!fsi->meta_write_failed)
    nbdkit_error ("%s failed: the filesystem will not be marked clean "
                  "when this session ends", what);
  fsi->meta_write_failed = true;
}

/* Write group g's block bitmap, as libext2fs's write_bitmaps would. */
static int
write_block_bitmap_locked (struct ext4fs_fs *fsi, dgrp_t g, char *buf,
                           int *err)
{
  ext2_filsys fs = fsi->fs;
  unsigned nbytes = EXT2_CLUSTERS_PER_GROUP (fs->super) / 8;
  blk64_t start = EXT2FS_B2C (fs, fs->super->s_first_data_block) +
    (blk64_t) g * (nbytes << 3);
  blk64_t loc;
  errcode_t e;
  unsigned j, nbits;

  if (ext2fs_has_group_desc_csum (fs) &&
      ext2fs_bg_flags_test (fs, g, EXT2_BG_BLOCK_UNINIT))
    return 0;
  memset (buf, 0xff, fsi->blocksize);
  e = ext2fs_get_block_bitmap_range2 (fs->block_map, start, nbytes << 3, buf);
  if (e)
    goto fail;
  if (g == fs->group_desc_count - 1) {
    /* Padding bits past the end of the filesystem are set. */
    nbits = EXT2FS_NUM_B2C (fs, ((ext2fs_blocks_count (fs->super) -
                                  (uint64_t) fs->super->s_first_data_block) %
                                 (uint64_t) EXT2_BLOCKS_PER_GROUP (fs->super)));
    if (nbits)
      for (j = nbits; j < fsi->blocksize * 8; j++)
        ext2fs_set_bit (j, buf);
  }
  if (fsi->jt) {
    /* Blocks freed in the running transaction are free as of it. */
    struct held_clear hc = { .buf = buf, .first = start };
    jtx_for_held_locked (fsi->jt, start, start + (nbytes << 3),
                         held_clear_cb, &hc);
  }
  e = ext2fs_block_bitmap_csum_set (fs, g, buf, nbytes);
  if (e)
    goto fail;
  ext2fs_group_desc_csum_set (fs, g);
  loc = ext2fs_block_bitmap_loc (fs, g);
  if (loc == 0 || loc >= fsi->blocks_count) {
    nbdkit_error ("group %u: block bitmap location %llu is invalid",
                  g, (unsigned long long) loc);
    *err = EIO;
    return -1;
  }
  if (fsi->jt)
    return jtx_put_block (fsi->jt, loc, buf, err);
  return ext4fs_dev_pwrite (fsi->dev, buf, fsi->blocksize,
                            loc << fsi->blockbits, 0, err);
 fail:
  nbdkit_error ("group %u: block bitmap: %s", g, error_message (e));
  *err = ext4fs_errcode_to_errno (e);
  return -1;
}

int
fs_writeback_locked (struct ext4fs_fs *fsi, int *err)
{
  ext2_filsys fs = fsi->fs;
  unsigned per_block = EXT2_DESC_PER_BLOCK (fs->super);
  CLEANUP_FREE char *buf = NULL;
  dgrp_t g;
  int64_t last_desc_blk = -1;

  if (!fsi->rw || !fsi->super_dirty)
    return 0;
  if (fsi->broken && fsi->jt) {
    *err = EIO;
    return -1;
  }
  if (fsi->broken) {
    /* Bitmaps and descriptors may not match the files any more: write
     * only the superblock, which carries the errors flag, and leave
     * the rest to e2fsck.
     */
    if (write_super_locked (fsi, NULL, err) == -1)
      return -1;
    fsi->super_dirty = false;
    return 0;
  }
  if (mmp_lost (fsi->mmp)) {
    nbdkit_error ("MMP: another host or program took the filesystem; "
                  "not writing metadata");
    *err = EIO;
    return -1;
  }
  buf = malloc (fsi->blocksize);
  if (buf == NULL) {
    *err = errno;
    nbdkit_error ("malloc: %m");
    return -1;
  }
  /* Bitmaps first: their checksums live in the group descriptors. */
  for (g = 0; g < fs->group_desc_count; ++g) {
    if (!fsi->dirty_groups[g])
      continue;
    if (ext4fs_debug_writeback)
      nbdkit_debug ("ext4fs: writeback: block bitmap of group %u", g);
    if (write_block_bitmap_locked (fsi, g, buf, err) == -1)
      return -1;
  }
  /* Then the primary group descriptor blocks holding dirty groups. */
  for (g = 0; g < fs->group_desc_count; ++g) {
    int64_t d = g / per_block;
    blk64_t loc;

    if (!fsi->dirty_groups[g] || d == last_desc_blk)
      continue;
    last_desc_blk = d;
    loc = ext2fs_descriptor_block_loc2 (fs, fs->super->s_first_data_block, d);
    if (loc == 0 || loc >= fsi->blocks_count) {
      nbdkit_error ("group descriptor block %" PRIi64 " has an invalid "
                    "location", d);
      *err = EIO;
      return -1;
    }
    if (fsi->jt) {
      if (jtx_put_block (fsi->jt, loc,
                         (char *) fs->group_desc + d * fsi->blocksize,
                         err) == -1)
        return -1;
    }
    else if (ext4fs_dev_pwrite (fsi->dev,
                                (char *) fs->group_desc + d * fsi->blocksize,
                                fsi->blocksize, loc << fsi->blockbits, 0,
                                err) == -1)
      return -1;
  }
  /* Then the superblock (free counts): journaled too, so that the
   * replayed state has the right totals (with needs_recovery set).
   */
  if (write_super_locked (fsi, fsi->jt, err) == -1)
    return -1;
  memset (fsi->dirty_groups, 0, fs->group_desc_count);
  fsi->super_dirty = false;
  return 0;
}

int
fs_sync (struct ext4fs_fs *fsi, int *err)
{
  if (fsi->rw) {
    /* Every read-write instance has its writer (jtx_open, or
     * jtx_open_nolog without a journal).  Times go into the running
     * transaction but need no commit of their own (as fdatasync); a
     * mapping change or a free does.
     */
    if (inode_sync_times (fsi) == -1) {
      *err = EIO;
      return -1;
    }
    return jtx_sync (fsi->jt, false, err);
  }
  return ext4fs_dev_flush (fsi->dev, err);
}

int
fs_sync_soon (struct ext4fs_fs *fsi, int *err)
{
  if (fsi->rw && fsi->jt && jtx_logged (fsi->jt)) {
    if (inode_sync_times (fsi) == -1) {
      *err = EIO;
      return -1;
    }
    if (jtx_kick (fsi->jt))
      return 0;
    return jtx_sync (fsi->jt, false, err);   /* no timer thread */
  }
  return fs_sync (fsi, err);
}
