/* ext4fs: replaying the filesystem's journal at open.
 *
 * Owns: the journal inode's block map (journal block -> device block),
 * reading the log through the device, the checks on what a replay may
 * write (inside the device, never onto the journal itself), the read
 * overlay for a read-only session, and replay in place for a
 * read-write one.  fs.c decides when (DESIGN.md §14).
 *
 * Locks: none of our own.  Everything here runs at open, before the
 * filesystem instance is published, under the registry lock; the one
 * libext2fs call (ext2fs_block_iterate3, ext2fs_read_inode_full) is on
 * a handle no other thread can reach.  The only other thread that may
 * touch the device then is the MMP updater (read-write opens with
 * MMP), which reads and writes the MMP block only; the device's
 * overlay is safe against it (io.h).
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-filter.h>

#include "replay.h"

struct map_ctx {
  struct ext4fs_journal *jr;
  uint64_t want;                /* journal blocks to map */
  uint64_t fs_blocks;
  uint64_t first_data_block;
  int bad;                      /* 1 = outside the fs, 2 = out of order */
  uint64_t bad_blk;
};

static int
map_cb (ext2_filsys fs, blk64_t *blocknr, e2_blkcnt_t blockcnt,
        blk64_t ref_blk, int ref_offset, void *priv)
{
  struct map_ctx *m = priv;
  struct ext4fs_journal *jr = m->jr;
  struct jrun *last;

  if (blockcnt < 0)
    return 0;
  if ((uint64_t) blockcnt >= m->want)
    return BLOCK_ABORT;
  if (*blocknr < m->first_data_block || *blocknr >= m->fs_blocks) {
    m->bad = 1;
    m->bad_blk = *blocknr;
    return BLOCK_ABORT;
  }
  last = jr->runs.len ? &jr->runs.ptr[jr->runs.len - 1] : NULL;
  if (last && (uint64_t) blockcnt < (uint64_t) last->jblk + last->len) {
    m->bad = 2;
    return BLOCK_ABORT;
  }
  if (last && (uint64_t) blockcnt == (uint64_t) last->jblk + last->len &&
      *blocknr == last->pblk + last->len) {
    last->len++;
    return 0;
  }
  if (jrun_vector_append (&jr->runs, (struct jrun) {
        .jblk = blockcnt, .len = 1, .pblk = *blocknr }) == -1) {
    m->bad = 3;
    return BLOCK_ABORT;
  }
  return 0;
}

uint64_t
journal_map_block (const struct ext4fs_journal *jr, uint32_t jblk)
{
  size_t lo = 0, hi = jr->runs.len;

  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    const struct jrun *r = &jr->runs.ptr[mid];

    if (jblk < r->jblk)
      hi = mid;
    else if (jblk - r->jblk >= r->len)
      lo = mid + 1;
    else
      return r->pblk + (jblk - r->jblk);
  }
  return 0;
}

static int
jread (void *opaque, uint32_t jblk, void *buf)
{
  struct ext4fs_journal *jr = opaque;
  uint64_t p = journal_map_block (jr, jblk);
  int err;

  if (p == 0) {
    nbdkit_error ("journal: journal block %" PRIu32 " is not mapped by the "
                  "journal inode: the journal is corrupt", jblk);
    return -1;
  }
  if (ext4fs_dev_pread (jr->dev, buf, UINT64_C (1) << jr->blockbits,
                        p << jr->blockbits, &err) == -1) {
    nbdkit_error ("journal: reading journal block %" PRIu32 ": %s",
                  jblk, strerror (err));
    return -1;
  }
  return 0;
}

static int
check_home (void *opaque, uint64_t home)
{
  struct ext4fs_journal *jr = opaque;
  uint64_t dev_blocks = ext4fs_dev_size (jr->dev) >> jr->blockbits;
  size_t lo = 0, hi = jr->runs.len;

  if (home >= dev_blocks) {
    nbdkit_error ("journal: the log holds a copy of block %" PRIu64 ", "
                  "beyond the end of the device (%" PRIu64 " blocks): the "
                  "journal is corrupt", home, dev_blocks);
    return -1;
  }
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    const struct jrun *r = &jr->by_pblk[mid];

    if (home < r->pblk)
      hi = mid;
    else if (home - r->pblk >= r->len)
      lo = mid + 1;
    else {
      nbdkit_error ("journal: the log holds a copy of block %" PRIu64 ", "
                    "which is one of the journal's own blocks: the journal "
                    "is corrupt", home);
      return -1;
    }
  }
  return 0;
}

static int
by_pblk_cmp (const void *a, const void *b)
{
  const struct jrun *x = a, *y = b;
  return x->pblk < y->pblk ? -1 : x->pblk > y->pblk;
}

/* Does the fast-commit area start with a head for the transaction
 * after the log's last full commit?  Then the kernel and e2fsck would
 * replay fast commits on top, which we cannot do.  The area starts one
 * block after the log's end (jbd2 and e2fsck: j_fc_first = j_last + 1,
 * and block j_last is used by neither).
 */
static bool
fc_pending (struct ext4fs_journal *jr, uint8_t *buf)
{
  if (!(jr->j.incompat & JBD2_INCOMPAT_FAST_COMMIT))
    return false;
  if (jr->j.last + 1 >= jr->j.maxlen)
    return false;               /* no room for a fast commit */
  if (jread (jr, jr->j.last + 1, buf) == -1)
    return true;                /* unreadable: assume the worst */
  /* struct ext4_fc_tl { le16 tag, len; }, head = { le32 features, tid } */
  return (buf[0] | buf[1] << 8) == 9 &&
    (uint32_t) (buf[8] | buf[9] << 8 | buf[10] << 16 |
                (uint32_t) buf[11] << 24) == jr->r.end_tid;
}

struct ext4fs_journal *
journal_load (ext2_filsys fs, struct ext4fs_dev *dev)
{
  struct ext2_super_block *sb = fs->super;
  struct ext4fs_journal *jr;
  struct ext2_inode inode;
  struct map_ctx m = { 0 };
  struct jbd2_io io;
  uint64_t jblocks;
  uint8_t *buf = NULL;
  errcode_t e;
  uint32_t i;

  jr = calloc (1, sizeof *jr);
  if (jr == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  jr->dev = dev;
  jr->blockbits = 10 + sb->s_log_block_size;

  if (sb->s_journal_inum == 0 || sb->s_journal_inum > sb->s_inodes_count) {
    nbdkit_error ("journal: the superblock names journal inode %" PRIu32
                  ", which does not exist", sb->s_journal_inum);
    goto err;
  }
  e = ext2fs_read_inode (fs, sb->s_journal_inum, &inode);
  if (e) {
    nbdkit_error ("journal: reading the journal inode %" PRIu32 ": %s",
                  sb->s_journal_inum, error_message (e));
    goto err;
  }
  if (!LINUX_S_ISREG (inode.i_mode) || inode.i_links_count == 0) {
    nbdkit_error ("journal: the journal inode %" PRIu32 " is not a regular "
                  "file in use: the journal is corrupt", sb->s_journal_inum);
    goto err;
  }
  jblocks = EXT2_I_SIZE (&inode) >> jr->blockbits;
  if (jblocks > ext2fs_blocks_count (sb))
    jblocks = ext2fs_blocks_count (sb);
  if (jblocks > UINT32_MAX)
    jblocks = UINT32_MAX;
  if (jblocks < JBD2_MIN_JOURNAL_BLOCKS) {
    nbdkit_error ("journal: the journal inode holds %" PRIu64 " blocks, "
                  "fewer than a journal needs: the journal is corrupt",
                  jblocks);
    goto err;
  }

  /* Map the journal: every block up to its size. */
  m.jr = jr;
  m.want = jblocks;
  m.fs_blocks = ext2fs_blocks_count (sb);
  m.first_data_block = sb->s_first_data_block;
  e = ext2fs_block_iterate3 (fs, sb->s_journal_inum,
                             BLOCK_FLAG_READ_ONLY | BLOCK_FLAG_DATA_ONLY,
                             NULL, map_cb, &m);
  if (e || m.bad) {
    if (m.bad == 1)
      nbdkit_error ("journal: the journal inode maps block %" PRIu64 ", "
                    "outside the filesystem: the journal is corrupt",
                    m.bad_blk);
    else if (m.bad == 2)
      nbdkit_error ("journal: the journal inode's block map is out of "
                    "order: the journal is corrupt");
    else if (m.bad == 3)
      nbdkit_error ("journal: out of memory mapping the journal");
    else
      nbdkit_error ("journal: reading the journal inode's block map: %s",
                    error_message (e));
    goto err;
  }

  buf = malloc (fs->blocksize);
  if (buf == NULL) {
    nbdkit_error ("malloc: %m");
    goto err;
  }
  if (jread (jr, 0, buf) == -1)
    goto err;
  if (jbd2_load (&jr->j, buf, fs->blocksize, jblocks) == -1)
    goto err;
  for (i = 0; i < jr->j.maxlen; ) {
    size_t lo = 0, hi = jr->runs.len;
    /* Every block of the journal must be mapped: find the run. */
    while (lo < hi) {
      size_t mid = lo + (hi - lo) / 2;
      if (jr->runs.ptr[mid].jblk + (uint64_t) jr->runs.ptr[mid].len <= i)
        lo = mid + 1;
      else
        hi = mid;
    }
    if (lo == jr->runs.len || jr->runs.ptr[lo].jblk > i) {
      nbdkit_error ("journal: journal block %" PRIu32 " is a hole in the "
                    "journal inode: the journal is corrupt", i);
      goto err;
    }
    i = jr->runs.ptr[lo].jblk + jr->runs.ptr[lo].len;
  }

  jr->by_pblk = malloc ((jr->runs.len ? jr->runs.len : 1)
                       * sizeof *jr->by_pblk);
  if (jr->by_pblk == NULL) {
    nbdkit_error ("malloc: %m");
    goto err;
  }
  memcpy (jr->by_pblk, jr->runs.ptr, jr->runs.len * sizeof *jr->by_pblk);
  qsort (jr->by_pblk, jr->runs.len, sizeof *jr->by_pblk, by_pblk_cmp);

  io.opaque = jr;
  io.read = jread;
  io.check_home = check_home;
  if (jbd2_scan (&jr->j, &io, &jr->r) == -1)
    goto err;
  jr->fc_pending = jr->j.start != 0 && fc_pending (jr, buf);
  free (buf);
  nbdkit_debug ("ext4fs: journal: %" PRIu32 " blocks in %zu run(s), "
                "log [%" PRIu32 ", %" PRIu32 ") from %" PRIu32 ", tids %"
                PRIu32 "..%" PRIu32 ", %" PRIu64 " copies, %" PRIu64
                " revoked, %zu blocks to replay%s%s",
                jr->j.maxlen, jr->runs.len, jr->j.first, jr->j.last,
                jr->j.start, jr->r.first_tid, jr->r.end_tid,
                jr->r.nlogged, jr->r.nrevoked, jr->r.nblocks,
                jr->r.failed_commit ? ", failed commit" : "",
                jr->fc_pending ? ", fast commits pending" : "");
  return jr;

 err:
  free (buf);
  journal_free (jr);
  return NULL;
}

void
journal_free (struct ext4fs_journal *jr)
{
  if (jr == NULL)
    return;
  jbd2_replay_free (&jr->r);
  jrun_vector_reset (&jr->runs);
  free (jr->by_pblk);
  free (jr);
}

int
journal_overlay (struct ext4fs_journal *jr)
{
  struct ext4fs_overlay_block *v;
  size_t i;

  if (jr->r.nblocks == 0)
    return 0;
  v = malloc (jr->r.nblocks * sizeof *v);
  if (v == NULL) {
    nbdkit_error ("journal: out of memory for the replay overlay");
    return -1;
  }
  for (i = 0; i < jr->r.nblocks; ++i) {
    v[i].home = jr->r.blocks[i].home;
    v[i].src = journal_map_block (jr, jr->r.blocks[i].jblk);
    v[i].escaped = jr->r.blocks[i].escaped;
  }
  return ext4fs_dev_set_overlay (jr->dev, jr->blockbits, v, jr->r.nblocks);
}

/* A superblock copy going home keeps needs_recovery set, so that a
 * crash before the journal is emptied replays again (the copy logged
 * may predate the flag).  sb points at the superblock inside buf.
 */
static void
keep_recovery_flag (uint8_t *sb)
{
  uint32_t incompat = sb[0x60] | sb[0x61] << 8 | sb[0x62] << 16 |
    (uint32_t) sb[0x63] << 24;
  uint32_t ro_compat = sb[0x64] | sb[0x65] << 8 | sb[0x66] << 16 |
    (uint32_t) sb[0x67] << 24;
  uint32_t c;

  if ((sb[0x38] | sb[0x39] << 8) != EXT2_SUPER_MAGIC ||
      (incompat & EXT3_FEATURE_INCOMPAT_RECOVER))
    return;
  sb[0x60] |= EXT3_FEATURE_INCOMPAT_RECOVER;
  if (ro_compat & EXT4_FEATURE_RO_COMPAT_METADATA_CSUM) {
    c = ext2fs_crc32c_le (~0U, sb, 0x3FC);
    sb[0x3FC] = c;
    sb[0x3FD] = c >> 8;
    sb[0x3FE] = c >> 16;
    sb[0x3FF] = c >> 24;
  }
}

int
journal_replay_in_place (struct ext4fs_journal *jr, int *err)
{
  uint64_t bs = UINT64_C (1) << jr->blockbits;
  uint64_t sb_blk = SUPERBLOCK_OFFSET >> jr->blockbits;
  uint8_t *buf;
  size_t i;

  buf = malloc (bs);
  if (buf == NULL) {
    *err = errno;
    nbdkit_error ("malloc: %m");
    return -1;
  }
  for (i = 0; i < jr->r.nblocks; ++i) {
    const struct jbd2_block *b = &jr->r.blocks[i];

    if (jread (jr, b->jblk, buf) == -1) {
      *err = EIO;
      goto fail;
    }
    if (b->escaped) {
      buf[0] = (JBD2_MAGIC >> 24) & 0xff;
      buf[1] = (JBD2_MAGIC >> 16) & 0xff;
      buf[2] = (JBD2_MAGIC >> 8) & 0xff;
      buf[3] = JBD2_MAGIC & 0xff;
    }
    if (b->home == sb_blk)
      keep_recovery_flag (buf + (SUPERBLOCK_OFFSET - (sb_blk << jr->blockbits)));
    if (ext4fs_dev_pwrite (jr->dev, buf, bs, b->home << jr->blockbits, 0,
                           err) == -1) {
      nbdkit_error ("journal: replay: writing block %" PRIu64 ": %s",
                    b->home, strerror (*err));
      goto fail;
    }
  }
  /* The blocks are home for good before the journal forgets them. */
  if (ext4fs_dev_flush (jr->dev, err) == -1) {
    nbdkit_error ("journal: replay: flush: %s", strerror (*err));
    goto fail;
  }
  memcpy (buf, jr->j.raw, JSB_SIZE);
  jbd2_reset_superblock (&jr->j, buf, jr->r.end_tid + 1);
  if (ext4fs_dev_pwrite (jr->dev, buf, JSB_SIZE,
                         journal_map_block (jr, 0) << jr->blockbits, 0, err) == -1 ||
      ext4fs_dev_flush (jr->dev, err) == -1) {
    nbdkit_error ("journal: replay: emptying the journal: %s",
                  strerror (*err));
    goto fail;
  }
  free (buf);
  return 0;

 fail:
  free (buf);
  return -1;
}
