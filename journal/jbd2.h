/* ext4fs: the jbd2 journal's on-disk format and the log reader.
 *
 * Owns: the constants and layouts of the journal superblock and of
 * the log's control blocks (descriptor, commit, revoke), their
 * checksums, and the three replay passes (find the end, collect
 * revokes, choose the newest copy of every block), as the kernel's
 * fs/jbd2/recovery.c and e2fsck define them.  The result is a replay
 * plan: for every filesystem block the journal holds, the journal
 * block with its newest committed copy.  Nothing here writes, and
 * nothing here knows libext2fs or nbdkit beyond nbdkit_error: the
 * caller reads journal blocks through a callback (journal/replay.c
 * maps them through the journal inode; the fuzz target from memory).
 *
 * Locks: none.  Everything runs single-threaded at open, before the
 * filesystem instance is published (DESIGN.md §14).
 *
 * Every field of the on-disk format is big-endian.
 */
#ifndef EXT4FS_JBD2_H
#define EXT4FS_JBD2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define JBD2_MAGIC              0xC03B3998U

/* Block types in the 12-byte header of every control block. */
#define JBD2_DESCRIPTOR_BLOCK   1
#define JBD2_COMMIT_BLOCK       2
#define JBD2_SUPERBLOCK_V1      3
#define JBD2_SUPERBLOCK_V2      4
#define JBD2_REVOKE_BLOCK       5

/* Journal superblock offsets. */
#define JSB_BLOCKSIZE           0x0C
#define JSB_MAXLEN              0x10
#define JSB_FIRST               0x14
#define JSB_SEQUENCE            0x18
#define JSB_START               0x1C
#define JSB_ERRNO               0x20
#define JSB_COMPAT              0x24
#define JSB_INCOMPAT            0x28
#define JSB_RO_COMPAT           0x2C
#define JSB_UUID                0x30
#define JSB_NR_USERS            0x40
#define JSB_CHECKSUM_TYPE       0x50
#define JSB_NUM_FC_BLKS         0x54
#define JSB_CHECKSUM            0xFC
#define JSB_SIZE                1024

#define JBD2_COMPAT_CHECKSUM        0x1   /* checksum v1 (crc32_be in commit) */
#define JBD2_INCOMPAT_REVOKE        0x1
#define JBD2_INCOMPAT_64BIT         0x2
#define JBD2_INCOMPAT_ASYNC_COMMIT  0x4
#define JBD2_INCOMPAT_CSUM_V2       0x8
#define JBD2_INCOMPAT_CSUM_V3       0x10
#define JBD2_INCOMPAT_FAST_COMMIT   0x20
#define JBD2_KNOWN_INCOMPAT         0x3F
#define JBD2_KNOWN_RO_COMPAT        0x0

#define JBD2_CHKSUM_CRC32       1         /* commit h_chksum_type, v1 */
#define JBD2_CHKSUM_CRC32C      4         /* s_checksum_type, v2/v3 */
#define JBD2_MIN_JOURNAL_BLOCKS 1024
#define JBD2_DEFAULT_FC_BLOCKS  256

/* Tag flags (descriptor blocks). */
#define JBD2_FLAG_ESCAPE        1
#define JBD2_FLAG_SAME_UUID     2
#define JBD2_FLAG_DELETED       4
#define JBD2_FLAG_LAST_TAG      8

/* Commit block offsets. */
#define JCOMMIT_CHKSUM_TYPE     0x0C
#define JCOMMIT_CHKSUM_SIZE     0x0D
#define JCOMMIT_CHKSUM          0x10
#define JCOMMIT_SEC             0x30
#define JCOMMIT_NSEC            0x38

/* Revoke block: header, then be32 byte count (including this 16-byte
 * header), then 4- or 8-byte block numbers.
 */
#define JREVOKE_COUNT           0x0C
#define JREVOKE_HEADER          16

/* A loaded, validated journal superblock. */
struct jbd2_journal {
  uint32_t blocksize;
  uint32_t maxlen;              /* journal blocks */
  uint32_t first, last;         /* the circular log is [first, last) */
  uint32_t sequence, start;     /* first tid expected, first log block */
  int32_t error;                /* s_errno: non-zero = journal aborted */
  uint32_t compat, incompat, ro_compat;
  uint32_t nr_users;
  bool v2;                      /* superblock v2 (else v1: no features) */
  bool csum;                    /* checksum v2 or v3 */
  uint32_t csum_seed;           /* crc32c (~0, uuid) */
  unsigned tag_bytes;           /* 8, 10, 12, 14 or 16 */
  uint8_t raw[JSB_SIZE];        /* the superblock as read */
};

/* Validate the journal superblock in sb (its first JSB_SIZE bytes),
 * for a filesystem of fs_blocksize bytes whose journal inode holds
 * journal_blocks blocks.  Returns 0, or -1 after nbdkit_error naming
 * what is wrong.
 */
extern int jbd2_load (struct jbd2_journal *j, const void *sb,
                      uint32_t fs_blocksize, uint64_t journal_blocks);

/* How the caller reads the journal and vets what it would replay. */
struct jbd2_io {
  void *opaque;
  /* Read journal block jblk (< maxlen) into buf (blocksize bytes).
   * Returns 0, or -1 after nbdkit_error.
   */
  int (*read) (void *opaque, uint32_t jblk, void *buf);
  /* May filesystem block home be replayed?  Returns 0, or -1 after
   * nbdkit_error (outside the device, one of the journal's own
   * blocks).
   */
  int (*check_home) (void *opaque, uint64_t home);
};

/* One block to replay: its newest committed copy is journal block
 * jblk, whose first 4 bytes are the magic number if escaped.
 */
struct jbd2_block {
  uint64_t home;
  uint32_t jblk;
  uint32_t escaped;
};

struct jbd2_replay {
  uint32_t first_tid, end_tid;  /* committed transactions: [first, end) */
  uint32_t ntrans;              /* end_tid - first_tid */
  bool failed_commit;           /* a commit block with a bad checksum ended
                                   the log (not async_commit) */
  uint32_t failed_tid;          /* ... in this transaction */
  uint64_t nlogged;             /* logged copies in committed transactions */
  uint64_t nrevoked;            /* of those, not replayed: revoked */
  struct jbd2_block *blocks;    /* sorted by home, each home once */
  size_t nblocks;
};

/* Run the three passes over the log of j.  Reads every logged block
 * that will be replayed once, to verify its checksum (v2/v3) where
 * there is one.  Returns 0 and fills r (free it with jbd2_replay_free),
 * or -1 after nbdkit_error: an unreadable block, a corrupt block inside
 * a committed transaction, a log that runs in a circle, a block that
 * check_home refuses.  A torn or stale tail ends the log quietly, as
 * it does for the kernel; a bad commit checksum ends it before that
 * transaction and sets r->failed_commit (e2fsck then marks the
 * filesystem with errors).
 */
extern int jbd2_scan (const struct jbd2_journal *j, const struct jbd2_io *io,
                      struct jbd2_replay *r);
extern void jbd2_replay_free (struct jbd2_replay *r);

/* The journal superblock after a replay: s_start = 0, s_sequence =
 * next_tid, s_errno = 0, fresh checksum.  buf holds JSB_SIZE bytes
 * (start from j->raw).
 */
extern void jbd2_reset_superblock (const struct jbd2_journal *j, uint8_t *buf,
                                   uint32_t next_tid);

/* For the writer (trans.c): the checksums of the blocks it writes,
 * as the reader verifies them.  buf is one journal block.
 */
extern void jbd2_set_tail_csum (const struct jbd2_journal *j, uint8_t *buf);
extern void jbd2_set_commit_csum (const struct jbd2_journal *j, uint8_t *buf);
extern uint32_t jbd2_tag_csum (const struct jbd2_journal *j, uint32_t tid,
                               const uint8_t *data);
/* Set s_start and s_sequence in buf (JSB_SIZE bytes) and its checksum. */
extern void jbd2_set_log (const struct jbd2_journal *j, uint8_t *buf,
                          uint32_t start, uint32_t sequence);
/* Recompute the superblock checksum of buf (if the journal has one). */
extern void jbd2_set_sb_csum (const struct jbd2_journal *j, uint8_t *buf);

/* tids are u32 and wrap: a is after b. */
static inline bool
jbd2_tid_gt (uint32_t a, uint32_t b)
{
  return (int32_t) (a - b) > 0;
}

static inline bool
jbd2_tid_geq (uint32_t a, uint32_t b)
{
  return (int32_t) (a - b) >= 0;
}

/* Big-endian fields (jbd2 is big-endian on disk). */
static inline uint32_t
be32 (const uint8_t *p)
{
  return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 |
    (uint32_t) p[2] << 8 | p[3];
}

static inline uint16_t
be16 (const uint8_t *p)
{
  return (uint16_t) (p[0] << 8 | p[1]);
}

static inline uint64_t
be64 (const uint8_t *p)
{
  return (uint64_t) be32 (p) << 32 | be32 (p + 4);
}

static inline void
put_be32 (uint8_t *p, uint32_t v)
{
  p[0] = v >> 24;
  p[1] = v >> 16;
  p[2] = v >> 8;
  p[3] = v;
}

static inline void
put_be16 (uint8_t *p, uint16_t v)
{
  p[0] = v >> 8;
  p[1] = v;
}

#endif /* EXT4FS_JBD2_H */
