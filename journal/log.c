/* ext4fs: the jbd2 log reader (see jbd2.h).
 *
 * The passes follow the kernel's and e2fsck's rules (JOURNAL.md):
 *
 * 1. Scan from s_start expecting tid s_sequence.  A block that lacks
 *    the magic number or carries another tid ends the log.  Every
 *    descriptor's tags are noted with their tid and journal block;
 *    revoke blocks are noted; a commit block ends its transaction.
 *    A descriptor or revoke block with a bad checksum is tolerated
 *    only if the next commit's time shows a stale block (then the log
 *    ends there); otherwise it is an error.  A commit with a bad
 *    checksum ends the log before its transaction and is reported
 *    (failed_commit), unless its time shows a stale block.
 * 2. Revokes: a revoke record for block B in transaction R cancels
 *    every copy of B logged in a transaction T <= R.  Only committed
 *    transactions' revokes count.
 * 3. Replay: every copy in a committed transaction that is not
 *    revoked has its checksum verified (a bad one is an error, never
 *    a wrong byte); the newest copy of each block wins.
 *
 * Unlike the kernel we keep no revoke table: the tags are sorted by
 * block number and each revoke record marks the tags it cancels, so
 * memory is bounded by the number of logged blocks (at most the log's
 * length) whatever a hostile revoke block claims.  The scan refuses a
 * log longer than the log area: that can only be a loop.
 */

#include <config.h>

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define NO_INLINE_FUNCS
#include <ext2fs/ext2fs.h>
#include <nbdkit-filter.h>

#include "common/crc32c.h"
#include "common/vector.h"
#include "jbd2.h"

static uint32_t
crc32c (uint32_t seed, const void *buf, size_t len)
{
  return ext4fs_crc32c (seed, buf, len);
}

/* crc32c of a block with the 4 bytes at off taken as zero. */
static uint32_t
crc32c_hole (uint32_t seed, const uint8_t *buf, size_t len, size_t off)
{
  static const uint8_t zero[4];
  uint32_t c = crc32c (seed, buf, off);

  c = crc32c (c, zero, 4);
  return crc32c (c, buf + off + 4, len - off - 4);
}

int
jbd2_load (struct jbd2_journal *j, const void *sbbuf, uint32_t fs_blocksize,
           uint64_t journal_blocks)
{
  const uint8_t *p = sbbuf;
  uint32_t type, fc;

  memset (j, 0, sizeof *j);
  memcpy (j->raw, p, JSB_SIZE);
  if (be32 (p) != JBD2_MAGIC) {
    nbdkit_error ("journal: the journal superblock has no jbd2 magic "
                  "number: the journal is corrupt");
    return -1;
  }
  type = be32 (p + 4);
  if (type != JBD2_SUPERBLOCK_V1 && type != JBD2_SUPERBLOCK_V2) {
    nbdkit_error ("journal: the journal superblock has an unknown block "
                  "type %" PRIu32 ": the journal is corrupt", type);
    return -1;
  }
  j->v2 = type == JBD2_SUPERBLOCK_V2;
  j->blocksize = be32 (p + JSB_BLOCKSIZE);
  if (j->blocksize != fs_blocksize) {
    nbdkit_error ("journal: the journal's block size (%" PRIu32 ") is not "
                  "the filesystem's (%" PRIu32 "): the journal is corrupt",
                  j->blocksize, fs_blocksize);
    return -1;
  }
  j->maxlen = be32 (p + JSB_MAXLEN);
  if (j->maxlen > journal_blocks) {
    nbdkit_error ("journal: the journal superblock says the journal has "
                  "%" PRIu32 " blocks, but the journal inode holds only "
                  "%" PRIu64 ": the journal is corrupt",
                  j->maxlen, journal_blocks);
    return -1;
  }
  if (j->maxlen < JBD2_MIN_JOURNAL_BLOCKS) {
    nbdkit_error ("journal: the journal superblock says the journal has "
                  "%" PRIu32 " blocks, fewer than the minimum %d: the "
                  "journal is corrupt", j->maxlen, JBD2_MIN_JOURNAL_BLOCKS);
    return -1;
  }
  j->first = be32 (p + JSB_FIRST);
  if (j->first == 0 || j->first >= j->maxlen) {
    nbdkit_error ("journal: the journal's first log block (%" PRIu32 ") is "
                  "outside the journal (%" PRIu32 " blocks): the journal is "
                  "corrupt", j->first, j->maxlen);
    return -1;
  }
  j->sequence = be32 (p + JSB_SEQUENCE);
  j->start = be32 (p + JSB_START);
  j->error = (int32_t) be32 (p + JSB_ERRNO);
  j->last = j->maxlen;
  if (j->v2) {
    j->compat = be32 (p + JSB_COMPAT);
    j->incompat = be32 (p + JSB_INCOMPAT);
    j->ro_compat = be32 (p + JSB_RO_COMPAT);
    j->nr_users = be32 (p + JSB_NR_USERS);
    if (j->incompat & ~JBD2_KNOWN_INCOMPAT) {
      nbdkit_error ("journal: the journal has unknown incompatible features "
                    "(0x%" PRIx32 ")", j->incompat & ~JBD2_KNOWN_INCOMPAT);
      return -1;
    }
    if (j->ro_compat & ~JBD2_KNOWN_RO_COMPAT) {
      nbdkit_error ("journal: the journal has unknown read-only features "
                    "(0x%" PRIx32 ")", j->ro_compat & ~JBD2_KNOWN_RO_COMPAT);
      return -1;
    }
    if ((j->incompat & JBD2_INCOMPAT_CSUM_V2) &&
        (j->incompat & JBD2_INCOMPAT_CSUM_V3)) {
      nbdkit_error ("journal: the journal superblock has both checksum v2 "
                    "and v3: the journal is corrupt");
      return -1;
    }
    j->csum = (j->incompat & (JBD2_INCOMPAT_CSUM_V2 | JBD2_INCOMPAT_CSUM_V3))
      != 0;
    if (j->csum && (j->compat & JBD2_COMPAT_CHECKSUM)) {
      nbdkit_error ("journal: the journal superblock has both checksum v1 "
                    "and v%d: the journal is corrupt",
                    j->incompat & JBD2_INCOMPAT_CSUM_V3 ? 3 : 2);
      return -1;
    }
    if (j->csum) {
      uint32_t want = be32 (p + JSB_CHECKSUM);
      uint32_t got = crc32c_hole (~0U, p, JSB_SIZE, JSB_CHECKSUM);

      if (p[JSB_CHECKSUM_TYPE] != JBD2_CHKSUM_CRC32C) {
        nbdkit_error ("journal: the journal superblock has an unknown "
                      "checksum type %u", p[JSB_CHECKSUM_TYPE]);
        return -1;
      }
      if (want != got) {
        nbdkit_error ("journal: the journal superblock's checksum is wrong "
                      "(0x%08" PRIx32 ", expected 0x%08" PRIx32 "): the "
                      "journal is corrupt", want, got);
        return -1;
      }
      j->csum_seed = crc32c (~0U, p + JSB_UUID, 16);
    }
    if (j->incompat & JBD2_INCOMPAT_FAST_COMMIT) {
      fc = be32 (p + JSB_NUM_FC_BLKS);
      if (fc == 0)
        fc = JBD2_DEFAULT_FC_BLOCKS;
      if (j->maxlen - JBD2_MIN_JOURNAL_BLOCKS < fc) {
        nbdkit_error ("journal: the journal (%" PRIu32 " blocks) is too "
                      "short for its %" PRIu32 " fast-commit blocks",
                      j->maxlen, fc);
        return -1;
      }
      j->last = j->maxlen - fc;
    }
  }
  if (j->first >= j->last) {
    nbdkit_error ("journal: the journal's log area is empty: the journal "
                  "is corrupt");
    return -1;
  }
  if (j->start != 0 && (j->start < j->first || j->start >= j->last)) {
    nbdkit_error ("journal: the journal's log starts at block %" PRIu32
                  ", outside its log area [%" PRIu32 ", %" PRIu32 "): the "
                  "journal is corrupt", j->start, j->first, j->last);
    return -1;
  }
  if (j->incompat & JBD2_INCOMPAT_CSUM_V3)
    j->tag_bytes = 16;
  else {
    j->tag_bytes = 12;
    if (j->incompat & JBD2_INCOMPAT_CSUM_V2)
      j->tag_bytes += 2;
    if (!(j->incompat & JBD2_INCOMPAT_64BIT))
      j->tag_bytes -= 4;
  }
  return 0;
}

void
jbd2_reset_superblock (const struct jbd2_journal *j, uint8_t *buf,
                       uint32_t next_tid)
{
  put_be32 (buf + JSB_ERRNO, 0);
  jbd2_set_log (j, buf, 0, next_tid);
}

void
jbd2_set_sb_csum (const struct jbd2_journal *j, uint8_t *buf)
{
  if (j->csum)
    put_be32 (buf + JSB_CHECKSUM,
              crc32c_hole (~0U, buf, JSB_SIZE, JSB_CHECKSUM));
}

void
jbd2_set_log (const struct jbd2_journal *j, uint8_t *buf, uint32_t start,
              uint32_t sequence)
{
  put_be32 (buf + JSB_START, start);
  put_be32 (buf + JSB_SEQUENCE, sequence);
  jbd2_set_sb_csum (j, buf);
}

void
jbd2_set_tail_csum (const struct jbd2_journal *j, uint8_t *buf)
{
  uint32_t bs = j->blocksize;

  if (j->csum)
    put_be32 (buf + bs - 4, crc32c_hole (j->csum_seed, buf, bs, bs - 4));
}

void
jbd2_set_commit_csum (const struct jbd2_journal *j, uint8_t *buf)
{
  if (j->csum)
    put_be32 (buf + JCOMMIT_CHKSUM,
              crc32c_hole (j->csum_seed, buf, j->blocksize, JCOMMIT_CHKSUM));
}

uint32_t
jbd2_tag_csum (const struct jbd2_journal *j, uint32_t tid, const uint8_t *data)
{
  uint8_t seq[4];
  uint32_t c;

  put_be32 (seq, tid);
  c = crc32c (j->csum_seed, seq, 4);
  return crc32c (c, data, j->blocksize);
}

/*----------------------------------------------------------------------
 * The passes.
 */

/* One logged copy, in log order. */
struct tag {
  uint64_t home;
  uint32_t jblk;
  uint32_t tid;
  uint32_t csum;                /* from the tag (v2: low 16 bits) */
  uint16_t flags;
  uint8_t revoked;
};

/* A revoke block, by position. */
struct revoke {
  uint32_t jblk;
  uint32_t tid;
};

DEFINE_VECTOR_TYPE (tag_vector, struct tag);
DEFINE_VECTOR_TYPE (revoke_vector, struct revoke);

struct scan {
  const struct jbd2_journal *j;
  const struct jbd2_io *io;
  tag_vector tags;
  revoke_vector revs;
  uint32_t *by_home;            /* indices of tags sorted by (home, index) */
};

static int
read_block (struct scan *s, uint32_t jblk, uint8_t *buf)
{
  return s->io->read (s->io->opaque, jblk, buf);
}

static uint32_t
wrap (const struct jbd2_journal *j, uint32_t blk)
{
  return blk >= j->last ? blk - (j->last - j->first) : blk;
}

/* The tail checksum of a descriptor or revoke block. */
static bool
tail_ok (const struct jbd2_journal *j, const uint8_t *buf)
{
  uint32_t bs = j->blocksize;

  if (!j->csum)
    return true;
  return be32 (buf + bs - 4) == crc32c_hole (j->csum_seed, buf, bs, bs - 4);
}

static bool
commit_ok (const struct jbd2_journal *j, const uint8_t *buf)
{
  if (!j->csum)
    return true;
  return be32 (buf + JCOMMIT_CHKSUM) ==
    crc32c_hole (j->csum_seed, buf, j->blocksize, JCOMMIT_CHKSUM);
}

/* Where the tags (or revoke records) of a block must end. */
static size_t
tag_limit (const struct jbd2_journal *j)
{
  return j->blocksize - (j->csum ? 4 : 0);
}

/* Pass 1.  On return *end_tid is the first tid not committed. */
static int
pass_scan (struct scan *s, struct jbd2_replay *r, uint8_t *buf, uint8_t *dbuf)
{
  const struct jbd2_journal *j = s->j;
  uint32_t blk = j->start, tid = j->sequence;
  uint64_t used = 0, loglen = j->last - j->first;
  uint64_t last_commit_time = 0;
  bool need_check_commit_time = false;
  uint32_t crc1 = ~0U;           /* checksum v1: over the transaction */
  bool v1 = (j->compat & JBD2_COMPAT_CHECKSUM) != 0;
  size_t limit = tag_limit (j);

  r->first_tid = tid;
  for (;;) {
    uint32_t type, here = blk;

    if (used++ >= loglen) {
    loop:
      nbdkit_error ("journal: the log from block %" PRIu32 " is longer than "
                    "the journal's log area (%" PRIu64 " blocks), so it runs "
                    "in a circle: the journal is corrupt", j->start, loglen);
      return -1;
    }
    if (read_block (s, blk, buf) == -1)
      return -1;
    blk = wrap (j, blk + 1);
    if (be32 (buf) != JBD2_MAGIC || be32 (buf + 8) != tid)
      break;
    type = be32 (buf + 4);

    if (type == JBD2_DESCRIPTOR_BLOCK) {
      size_t off = 12;
      bool sum = v1 && !need_check_commit_time;

      if (!tail_ok (j, buf))
        need_check_commit_time = true;
      if (sum)
        crc1 = ext2fs_crc32_be (crc1, buf, j->blocksize);
      while (off + j->tag_bytes <= limit) {
        const uint8_t *t = buf + off;
        uint16_t flags = be16 (t + 6);
        struct tag *tg;

        if (used++ >= loglen)
          goto loop;
        if (tag_vector_reserve (&s->tags, 1) == -1) {
          nbdkit_error ("journal: out of memory reading the log");
          return -1;
        }
        tg = &s->tags.ptr[s->tags.len++];
        tg->home = be32 (t);
        if (j->incompat & JBD2_INCOMPAT_64BIT)
          tg->home |= (uint64_t) be32 (t + 8) << 32;
        tg->jblk = blk;
        tg->tid = tid;
        tg->flags = flags;
        tg->revoked = 0;
        if (j->incompat & JBD2_INCOMPAT_CSUM_V3)
          tg->csum = be32 (t + 12);
        else
          tg->csum = be16 (t + 4);
        if (sum) {
          if (read_block (s, blk, dbuf) == -1)
            return -1;
          crc1 = ext2fs_crc32_be (crc1, dbuf, j->blocksize);
        }
        blk = wrap (j, blk + 1);
        off += j->tag_bytes;
        if (!(flags & JBD2_FLAG_SAME_UUID))
          off += 16;
        if (flags & JBD2_FLAG_LAST_TAG)
          break;
      }
      continue;
    }

    if (type == JBD2_COMMIT_BLOCK) {
      uint64_t commit_time = be64 (buf + JCOMMIT_SEC);
      bool bad = false;

      if (need_check_commit_time) {
        if (commit_time >= last_commit_time) {
          nbdkit_error ("journal: transaction %" PRIu32 " has a descriptor "
                        "or revoke block with a bad checksum: the journal "
                        "is corrupt", tid);
          return -1;
        }
        break;                  /* a stale block: the log ends here */
      }
      if (v1) {
        uint32_t found = be32 (buf + JCOMMIT_CHKSUM);
        uint8_t ctype = buf[JCOMMIT_CHKSUM_TYPE];
        uint8_t csize = buf[JCOMMIT_CHKSUM_SIZE];

        if (!((crc1 == found && ctype == JBD2_CHKSUM_CRC32 && csize == 4) ||
              (ctype == 0 && csize == 0 && found == 0)))
          bad = true;
        crc1 = ~0U;
      }
      if (!commit_ok (j, buf))
        bad = true;
      if (bad) {
        if (commit_time < last_commit_time)
          break;                /* stale */
        if (!(j->incompat & JBD2_INCOMPAT_ASYNC_COMMIT)) {
          r->failed_commit = true;
          r->failed_tid = tid;
        }
        break;
      }
      last_commit_time = commit_time;
      tid++;
      continue;
    }

    if (type == JBD2_REVOKE_BLOCK) {
      if (!tail_ok (j, buf))
        need_check_commit_time = true;
      if (revoke_vector_append (&s->revs, (struct revoke) {
            .jblk = here, .tid = tid }) == -1) {
        nbdkit_error ("journal: out of memory reading the log");
        return -1;
      }
      continue;
    }
    break;                      /* an unknown block type ends the log */
  }
  r->end_tid = tid;
  r->ntrans = tid - r->first_tid;
  return 0;
}

static bool
committed (const struct jbd2_replay *r, uint32_t tid)
{
  return jbd2_tid_geq (tid, r->first_tid) && jbd2_tid_gt (r->end_tid, tid);
}

static int
by_home_cmp (const void *a, const void *b, void *tagsv)
{
  const struct tag *tags = tagsv;
  uint32_t x = *(const uint32_t *) a, y = *(const uint32_t *) b;
  uint64_t hx = tags[x].home, hy = tags[y].home;

  if (hx != hy)
    return hx < hy ? -1 : 1;
  return x < y ? -1 : x > y;
}

/* First index in by_home whose tag's home is >= home. */
static size_t
lower_bound (const struct scan *s, uint64_t home)
{
  size_t lo = 0, hi = s->tags.len;

  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (s->tags.ptr[s->by_home[mid]].home < home)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

/* Pass 2: every committed revoke record cancels older-or-same copies. */
static int
pass_revoke (struct scan *s, const struct jbd2_replay *r, uint8_t *buf)
{
  const struct jbd2_journal *j = s->j;
  unsigned rec = j->incompat & JBD2_INCOMPAT_64BIT ? 8 : 4;
  size_t i;

  for (i = 0; i < s->revs.len; ++i) {
    uint32_t rtid = s->revs.ptr[i].tid, count, off;

    if (!committed (r, rtid))
      continue;
    if (read_block (s, s->revs.ptr[i].jblk, buf) == -1)
      return -1;
    count = be32 (buf + JREVOKE_COUNT);
    if (count > tag_limit (j)) {
      nbdkit_error ("journal: a revoke block of transaction %" PRIu32
                    " claims %" PRIu32 " bytes of records, more than a "
                    "block holds: the journal is corrupt", rtid, count);
      return -1;
    }
    for (off = JREVOKE_HEADER; off + rec <= count; off += rec) {
      uint64_t home = rec == 8 ? be64 (buf + off) : be32 (buf + off);
      size_t k;

      for (k = lower_bound (s, home);
           k < s->tags.len && s->tags.ptr[s->by_home[k]].home == home; ++k) {
        struct tag *t = &s->tags.ptr[s->by_home[k]];
        if (jbd2_tid_geq (rtid, t->tid))
          t->revoked = 1;
      }
    }
  }
  return 0;
}

static bool
tag_csum_ok (const struct jbd2_journal *j, const struct tag *t,
             const uint8_t *data)
{
  uint32_t c;

  if (!j->csum)
    return true;
  c = jbd2_tag_csum (j, t->tid, data);
  if (j->incompat & JBD2_INCOMPAT_CSUM_V3)
    return c == t->csum;
  return (c & 0xFFFF) == t->csum;
}

/* Pass 3: verify and choose. */
static int
pass_replay (struct scan *s, struct jbd2_replay *r, uint8_t *buf)
{
  const struct jbd2_journal *j = s->j;
  size_t i, n = 0;

  for (i = 0; i < s->tags.len; ++i) {
    struct tag *t = &s->tags.ptr[i];

    if (!committed (r, t->tid))
      continue;
    r->nlogged++;
    if (t->revoked) {
      r->nrevoked++;
      continue;
    }
    if (s->io->check_home (s->io->opaque, t->home) == -1)
      return -1;
    if (j->csum) {
      if (read_block (s, t->jblk, buf) == -1)
        return -1;
      if (!tag_csum_ok (j, t, buf)) {
        nbdkit_error ("journal: the copy of block %" PRIu64 " in "
                      "transaction %" PRIu32 " (journal block %" PRIu32 ") "
                      "has a bad checksum: the journal is corrupt",
                      t->home, t->tid, t->jblk);
        return -1;
      }
    }
    n++;
  }

  /* The newest copy of each block: the last in log order. */
  r->blocks = calloc (n ? n : 1, sizeof *r->blocks);
  if (r->blocks == NULL) {
    nbdkit_error ("journal: out of memory");
    return -1;
  }
  for (i = 0; i < s->tags.len; ++i) {
    const struct tag *t = &s->tags.ptr[s->by_home[i]];
    struct jbd2_block *b;

    if (!committed (r, t->tid) || t->revoked)
      continue;
    if (r->nblocks > 0 && r->blocks[r->nblocks - 1].home == t->home)
      b = &r->blocks[r->nblocks - 1];   /* by_home is in log order */
    else
      b = &r->blocks[r->nblocks++];
    b->home = t->home;
    b->jblk = t->jblk;
    b->escaped = (t->flags & JBD2_FLAG_ESCAPE) != 0;
  }
  return 0;
}

int
jbd2_scan (const struct jbd2_journal *j, const struct jbd2_io *io,
           struct jbd2_replay *r)
{
  struct scan s = { .j = j, .io = io };
  uint8_t *buf = NULL, *dbuf = NULL;
  size_t i;
  int ret = -1;

  memset (r, 0, sizeof *r);
  if (j->start == 0) {
    r->first_tid = r->end_tid = j->sequence;
    return 0;
  }
  buf = malloc (j->blocksize);
  dbuf = malloc (j->blocksize);
  if (buf == NULL || dbuf == NULL) {
    nbdkit_error ("journal: out of memory");
    goto out;
  }
  if (pass_scan (&s, r, buf, dbuf) == -1)
    goto out;
  s.by_home = malloc ((s.tags.len ? s.tags.len : 1) * sizeof *s.by_home);
  if (s.by_home == NULL) {
    nbdkit_error ("journal: out of memory");
    goto out;
  }
  for (i = 0; i < s.tags.len; ++i)
    s.by_home[i] = i;
  qsort_r (s.by_home, s.tags.len, sizeof *s.by_home, by_home_cmp, s.tags.ptr);
  if (pass_revoke (&s, r, buf) == -1 ||
      pass_replay (&s, r, buf) == -1)
    goto out;
  ret = 0;

 out:
  if (ret == -1)
    jbd2_replay_free (r);
  tag_vector_reset (&s.tags);
  revoke_vector_reset (&s.revs);
  free (s.by_home);
  free (buf);
  free (dbuf);
  return ret;
}

void
jbd2_replay_free (struct jbd2_replay *r)
{
  free (r->blocks);
  r->blocks = NULL;
  r->nblocks = 0;
}
