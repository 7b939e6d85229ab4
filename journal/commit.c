/* ext4fs: writing the log (see trans-int.h).
 *
 * Owns: the jbd2 log format as written (descriptor, revoke and commit
 * blocks, the journal superblock), commits, checkpoints, and the
 * ordered write-back without a log (jtx_write_home_locked).  Every
 * function here runs under the commit lock, with the handle lock
 * exclusive and the fs mutex held, but a commit's step 2
 * (commit_write: the log buffer, the device and atomics only) and step
 * 3 (commit_end_locked, and the checkpoint it may make: the fs mutex
 * only, with the commit still in flight for jtx_sync).
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nbdkit-filter.h>

#include "trans-int.h"

/*----------------------------------------------------------------------
 * The log.
 */

static uint64_t
jphys (struct ext4fs_jtx *jt, uint32_t jblk)
{
  return journal_map_block (jt->jr, jblk);
}

static uint32_t
log_next (const struct ext4fs_jtx *jt, uint32_t blk)
{
  blk++;
  return blk >= jt->jr->j.last ? jt->jr->j.first : blk;
}

/* Write n log blocks from buf starting at log block start (wrapping),
 * coalescing runs that are contiguous on the device.
 */
static int
write_log (struct ext4fs_jtx *jt, const uint8_t *buf, uint32_t start,
           uint32_t n, int *err)
{
  uint32_t i = 0, b = start;

  while (i < n) {
    uint64_t p = jphys (jt, b);
    uint32_t k = 1, nb = log_next (jt, b);

    while (i + k < n && nb != jt->jr->j.first && jphys (jt, nb) == p + k) {
      k++;
      nb = log_next (jt, nb);
    }
    if (ext4fs_dev_pwrite (jt->dev, buf + (size_t) i * jt->bs,
                           (uint64_t) k * jt->bs, p << jt->bits, 0,
                           err) == -1) {
      nbdkit_error ("journal: writing the log: %s", strerror (*err));
      return -1;
    }
    i += k;
    b = nb;
  }
  return 0;
}

int
jtx_write_jsb (struct ext4fs_jtx *jt, int *err)
{
  if (ext4fs_dev_pwrite (jt->dev, jt->jr->j.raw, JSB_SIZE,
                         jphys (jt, 0) << jt->bits, 0, err) == -1) {
    nbdkit_error ("journal: writing the journal superblock: %s",
                  strerror (*err));
    return -1;
  }
  return 0;
}

static void
header (uint8_t *p, uint32_t type, uint32_t tid)
{
  put_be32 (p, JBD2_MAGIC);
  put_be32 (p + 4, type);
  put_be32 (p + 8, tid);
}

uint64_t
jtx_now_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_REALTIME, &ts);
  return (uint64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Checkpoint: every block as of its last commit goes home, then the
 * log is empty.  Commit lock and fs mutex held, and the handle lock
 * exclusive or a commit's step 3 (still in flight: no plain flush
 * beside it).
 */
int
jtx_checkpoint_locked (struct ext4fs_jtx *jt, int *err)
{
  uint64_t t0 = jtx_now_ns ();
  size_t i;

  if (jt->log_start == 0)
    return 0;
  for (i = 0; i < jt->nbuckets; ++i) {
    struct jent *e;
    for (e = jt->buckets[i]; e; e = e->hnext) {
      if (!e->in_log)
        continue;
      jt->ckpt_blocks++;
      if (ext4fs_dev_pwrite (jt->dev, e->frozen ? e->frozen : e->data,
                             jt->bs, e->blk << jt->bits, 0, err) == -1) {
        nbdkit_error ("journal: checkpoint: writing block %" PRIu64 ": %s",
                      e->blk, strerror (*err));
        return -1;
      }
    }
  }
  /* Blocks freed since they were logged, the free not yet committed:
   * still in use as of the log being emptied.
   */
  for (i = 0; i < jt->ghosts.len; ++i) {
    const struct ghost *g = &jt->ghosts.ptr[i];
    if (ext4fs_dev_pwrite (jt->dev, g->data, jt->bs, g->blk << jt->bits, 0,
                           err) == -1) {
      nbdkit_error ("journal: checkpoint: writing freed block %" PRIu64
                    ": %s", g->blk, strerror (*err));
      return -1;
    }
  }
  /* Home for good before the log forgets them; the empty log durable
   * before its space is written again.
   */
  if (ext4fs_dev_flush (jt->dev, err) == -1) {
    nbdkit_error ("journal: checkpoint: flush: %s", strerror (*err));
    return -1;
  }
  jbd2_set_log (&jt->jr->j, jt->jr->j.raw, 0, jt->tid);
  if (jtx_write_jsb (jt, err) == -1 || ext4fs_dev_flush (jt->dev, err) == -1)
    return -1;
  for (i = 0; i < jt->nbuckets; ++i) {
    struct jent *e;
    for (e = jt->buckets[i]; e; e = e->hnext) {
      if (!e->in_log)
        continue;
      e->in_log = false;
      free (e->frozen);
      e->frozen = NULL;
      if (!e->running)
        jt->nclean++;
    }
  }
  jtx_ghosts_drop (jt);
  jt->log_start = 0;
  jt->used = 0;
  jt->head = jt->jr->j.first;
  jt->ncheckpoints++;
  jtx_cache_trim (jt);
  jt->ckpt_ns += jtx_now_ns () - t0;
  return 0;
}

/* Tags that fit in one descriptor block. */
static size_t
tags_per_desc (const struct ext4fs_jtx *jt)
{
  const struct jbd2_journal *j = &jt->jr->j;
  size_t limit = jt->bs - (j->csum ? 4 : 0) - 12;

  return 1 + (limit - j->tag_bytes - 16) / j->tag_bytes;
}

static size_t
revokes_per_block (const struct ext4fs_jtx *jt)
{
  const struct jbd2_journal *j = &jt->jr->j;
  size_t rec = j->incompat & JBD2_INCOMPAT_64BIT ? 8 : 4;

  return (jt->bs - (j->csum ? 4 : 0) - JREVOKE_HEADER) / rec;
}

/* Fill descriptor block d for copies running[first .. first+n). */
static void
fill_descriptor (struct ext4fs_jtx *jt, uint8_t *d, size_t first, size_t n,
                 uint8_t *copies)
{
  const struct jbd2_journal *j = &jt->jr->j;
  size_t k, off = 12;

  memset (d, 0, jt->bs);
  header (d, JBD2_DESCRIPTOR_BLOCK, jt->tid);
  for (k = 0; k < n; ++k) {
    const struct jent *e = jt->running.ptr[first + k];
    uint8_t *c = copies + k * jt->bs;
    uint8_t *t = d + off;
    uint32_t flags = 0, csum = 0;

    memcpy (c, e->data, jt->bs);
    if (c[0] == 0xC0 && c[1] == 0x3B && c[2] == 0x39 && c[3] == 0x98) {
      memset (c, 0, 4);         /* escaped: replay puts the magic back */
      flags |= JBD2_FLAG_ESCAPE;
    }
    if (k > 0)
      flags |= JBD2_FLAG_SAME_UUID;
    if (k == n - 1)
      flags |= JBD2_FLAG_LAST_TAG;
    if (j->csum)
      csum = jbd2_tag_csum (j, jt->tid, c);
    put_be32 (t, (uint32_t) e->blk);
    if (j->incompat & JBD2_INCOMPAT_CSUM_V3) {
      put_be32 (t + 4, flags);
      put_be32 (t + 8, (uint32_t) (e->blk >> 32));
      put_be32 (t + 12, csum);
    }
    else {
      put_be16 (t + 4, (uint16_t) csum);
      put_be16 (t + 6, (uint16_t) flags);
      if (j->incompat & JBD2_INCOMPAT_64BIT)
        put_be32 (t + 8, (uint32_t) (e->blk >> 32));
    }
    off += j->tag_bytes;
    if (k == 0) {
      memcpy (d + off, j->raw + JSB_UUID, 16);
      off += 16;
    }
  }
  jbd2_set_tail_csum (j, d);
}

/* No journal (jtx_open_nolog): the running transaction goes straight
 * home, in the order ordered mode needs without a log, each step
 * durable before the next:
 *  1. a flush: the data of every completed write, before any metadata
 *     that may link it;
 *  2. the fresh blocks (tree and indirect blocks allocated in this
 *     transaction), before the blocks that point at them, so that no
 *     pointer ever leads to a block holding old bytes;
 *  3. every other block (inodes, old tree blocks, bitmaps,
 *     descriptors, the superblock).
 * A crash half way through leaves metadata half written: the
 * filesystem is marked not clean on disk (fs_begin_write) and needs
 * e2fsck then, but no mapping points at data or a tree block that was
 * not durable first, and freed blocks are reused only after the
 * freeing is durable.  A failed write leaves the blocks running: the
 * next commit writes them all again.  A failed flush aborts (file
 * data may be lost below).  Handle lock exclusive and fs mutex held.
 */
int
jtx_write_home_locked (struct ext4fs_jtx *jt, int *err)
{
  size_t i;
  int pass;

  /* Checked again here, under the locks: a commit that was waiting
   * for them may find the writer stopped meanwhile (a failed plain
   * flush, jtx_sync).
   */
  if (jtx_aborted (jt)) {
    nbdkit_error ("%s: write-back refused: %s", jtx_what (jt),
                  jtx_stopped (jt));
    *err = EIO;
    return -1;
  }
  for (pass = 0; pass < 3; ++pass) {
    bool wrote = pass == 0;

    for (i = 0; pass > 0 && i < jt->running.len; ++i) {
      const struct jent *e = jt->running.ptr[i];
      if (e->fresh != (pass == 1))
        continue;
      if (ext4fs_dev_pwrite (jt->dev, e->data, jt->bs, e->blk << jt->bits, 0,
                             err) == -1) {
        nbdkit_error ("metadata writeback: writing block %" PRIu64 ": %s",
                      e->blk, strerror (*err));
        return -1;
      }
      wrote = true;
    }
    if (wrote && ext4fs_dev_flush (jt->dev, err) == -1) {
      nbdkit_error ("metadata writeback: flush: %s", strerror (*err));
      jtx_abort_locked (jt, "a flush failed below");
      return -1;
    }
  }
  for (i = 0; i < jt->running.len; ++i) {
    jt->running.ptr[i]->running = false;
    jt->running.ptr[i]->fresh = false;
    jt->nclean++;
  }
  jt->nlogged += jt->running.len;
  jt->running.len = 0;
  __atomic_store_n (&jt->running_size, 0, __ATOMIC_RELAXED);
  jt->ncommits++;
  jtx_cache_trim (jt);
  return 0;
}

/* A commit with nothing to log, or without a journal, ended: the
 * blocks freed in the running transaction may be reused.
 */
static int
commit_released_locked (struct ext4fs_jtx *jt, int *err)
{
  size_t i;

  for (i = 0; i < jt->held.len; ++i)
    jt->unhold (jt->opaque, jt->held.ptr[i].start, jt->held.ptr[i].len);
  jt->held.len = 0;
  __atomic_store_n (&jt->needs_commit, false, __ATOMIC_RELAXED);
  if (jt->logged && jt->used > jt->capacity / 2 &&
      jtx_checkpoint_locked (jt, err) == -1) {
    jtx_abort_locked (jt, "checkpoint failed");
    return -1;
  }
  return 0;
}

/* Commit the running transaction, in three steps (DESIGN.md §15):
 *  1. commit_begin_locked (handle lock exclusive, fs mutex): the
 *     log blocks are built in jt->logbuf from the running transaction,
 *     which becomes the committing one; a new running transaction
 *     starts;
 *  2. commit_write (commit lock only, or every lock in the synchronous
 *     form): the log blocks, the journal superblock if the log was
 *     empty, a flush, the commit block with FUA;
 *  3. commit_end_locked (fs mutex): the committing transaction is in
 *     the log, or (a failed write before the commit block) goes back
 *     into the running one, to be written again by the next commit.
 * Between 1 and 3 requests change metadata again, in the running
 * transaction: a block of the committing one changed again keeps the
 * contents being logged (cfrozen) for the checkpoint.
 */
/* Returns 1: the committing transaction is built, write it; 0: done
 * (nothing to log, or no journal: written home already); -1: failed.
 * chained (jtx_commit_step: another transaction's commit block is not
 * yet durable): nothing is written or checkpointed here; 0 then means
 * not now (nothing to log, or the log would need a checkpoint first:
 * the next step without a staged commit does it).
 */
static int
commit_begin_locked (struct ext4fs_jtx *jt, struct commit *c, bool chained,
                     int *err)
{
  const struct jbd2_journal *j;
  size_t per_desc, per_rev, ndesc, nrev, need, pos, i;
  uint64_t t;
  uint8_t *p;
  jent_vector ev;
  blk_vector bv;
  hold_vector hv;
  ghost_vector gv;

  /* Checked again here, under the locks: a commit that was waiting
   * for them may find the writer stopped meanwhile (a failed plain
   * flush in jtx_sync, another commit's failure).  Nothing of a
   * stopped writer's running transaction may become durable.
   */
  if (jtx_aborted (jt)) {
    nbdkit_error ("%s: commit refused: %s", jtx_what (jt), jtx_stopped (jt));
    *err = EIO;
    return -1;
  }
  if (jt->prepare (jt->opaque, err) == -1) {
    jtx_abort_locked (jt, "metadata could not be prepared for a commit");
    return -1;
  }
  if (chained && jt->running.len == 0 && jt->revokes.len == 0)
    return 0;
  if (jt->running.len == 0 && jt->revokes.len == 0) {
    /* Nothing to log: a flush is all it takes. */
    if (ext4fs_dev_flush (jt->dev, err) == -1) {
      if (!jt->logged)
        jtx_abort_locked (jt, "commit failed");  /* data may be lost below: never clean */
      return -1;
    }
    return commit_released_locked (jt, err);
  }
  if (!jt->logged) {
    if (jtx_write_home_locked (jt, err) == -1)
      return -1;
    return commit_released_locked (jt, err);
  }
  j = &jt->jr->j;
  per_desc = tags_per_desc (jt);
  per_rev = revokes_per_block (jt);
  ndesc = (jt->running.len + per_desc - 1) / per_desc;
  nrev = (jt->revokes.len + per_rev - 1) / per_rev;
  need = ndesc + jt->running.len + nrev + 1;
  /* Chained, the log holds a transaction not yet durable: no
   * checkpoint may empty it now.
   */
  if (chained && (jt->used > jt->capacity / 2 || jt->checkpoint_first ||
                  jt->used + need + 1 >= jt->capacity))
    return 0;
  if (need + 1 >= jt->capacity) {
    nbdkit_error ("journal: a transaction of %zu blocks does not fit in the "
                  "journal (%" PRIu32 " blocks)", need, jt->capacity);
    *err = ENOSPC;
    jtx_abort_locked (jt, "transaction too large");
    return -1;
  }
  if ((jt->used + need + 1 >= jt->capacity || jt->checkpoint_first) &&
      jtx_checkpoint_locked (jt, err) == -1) {
    jtx_abort_locked (jt, "checkpoint failed");
    return -1;
  }
  if (jt->logcap < need * jt->bs) {
    free (jt->logbuf);
    jt->logbuf = malloc (need * jt->bs);
    if (jt->logbuf == NULL) {
      jt->logcap = 0;
      *err = ENOMEM;
      nbdkit_error ("journal: out of memory for the log");
      jtx_abort_locked (jt, "out of memory");
      return -1;
    }
    jt->logcap = need * jt->bs;
  }

  /* Descriptors, each followed by its copies. */
  p = jt->logbuf;
  for (pos = 0; pos < jt->running.len; pos += per_desc) {
    size_t n = jt->running.len - pos < per_desc ? jt->running.len - pos
                                                 : per_desc;
    fill_descriptor (jt, p, pos, n, p + jt->bs);
    p += (n + 1) * jt->bs;
  }
  /* Revoke blocks. */
  for (pos = 0; pos < jt->revokes.len; pos += per_rev) {
    size_t n = jt->revokes.len - pos < per_rev ? jt->revokes.len - pos
                                               : per_rev;
    size_t rec = j->incompat & JBD2_INCOMPAT_64BIT ? 8 : 4, off = JREVOKE_HEADER;

    memset (p, 0, jt->bs);
    header (p, JBD2_REVOKE_BLOCK, jt->tid);
    for (i = 0; i < n; ++i) {
      uint64_t b = jt->revokes.ptr[pos + i];
      if (rec == 8) {
        put_be32 (p + off, (uint32_t) (b >> 32));
        put_be32 (p + off + 4, (uint32_t) b);
      }
      else
        put_be32 (p + off, (uint32_t) b);
      off += rec;
    }
    put_be32 (p + JREVOKE_COUNT, off);
    jbd2_set_tail_csum (j, p);
    p += jt->bs;
  }
  /* The commit block. */
  t = jtx_now_ns ();
  if (t < jt->last_commit_ns)
    t = jt->last_commit_ns;
  jt->last_commit_ns = t;
  memset (p, 0, jt->bs);
  header (p, JBD2_COMMIT_BLOCK, jt->tid);
  put_be32 (p + JCOMMIT_SEC, (uint32_t) ((t / 1000000000) >> 32));
  put_be32 (p + JCOMMIT_SEC + 4, (uint32_t) (t / 1000000000));
  put_be32 (p + JCOMMIT_NSEC, (uint32_t) (t % 1000000000));
  jbd2_set_commit_csum (j, p);

  c->need = need;
  c->start = jt->head;
  c->cb = jt->head;
  for (i = 0; i + 1 < need; ++i)
    c->cb = log_next (jt, c->cb);
  c->was_empty = jt->log_start == 0;
  c->fatal = false;
  if (c->was_empty)
    /* Replay starts here: durable no later than the commit block. */
    jbd2_set_log (&jt->jr->j, jt->jr->j.raw, jt->head, jt->tid);

  /* The running transaction becomes the committing one (its vectors
   * are swapped, so that each keeps its allocation).
   */
  for (i = 0; i < jt->running.len; ++i) {
    struct jent *e = jt->running.ptr[i];
    e->running = false;
    e->committing = true;
  }
  ev = jt->committing; jt->committing = jt->running; jt->running = ev;
  bv = jt->crevokes; jt->crevokes = jt->revokes; jt->revokes = bv;
  hv = jt->cheld; jt->cheld = jt->held; jt->held = hv;
  gv = jt->cghosts; jt->cghosts = jt->ghosts; jt->ghosts = gv;
  jt->running.len = jt->revokes.len = jt->held.len = jt->ghosts.len = 0;
  __atomic_store_n (&jt->running_size, 0, __ATOMIC_RELAXED);
  jt->nlogged += jt->committing.len;  /* counted as built */
  jt->head = log_next (jt, c->cb);
  jt->used += need;
  /* What a flush must wait for moves from "pending" to "in flight",
   * in one step for jtx_sync.
   */
  pthread_mutex_lock (&jt->state_lock);
  c->tid = jt->ctid = jt->tid++;
  __atomic_store_n (&jt->inflight, true, __ATOMIC_SEQ_CST);
  __atomic_store_n (&jt->needs_commit, false, __ATOMIC_SEQ_CST);
  pthread_mutex_unlock (&jt->state_lock);
  return 1;
}

/* The log blocks but the commit block, and the journal superblock if
 * the log was empty.
 */
static int
commit_write_log (struct ext4fs_jtx *jt, const struct commit *c, int *err)
{
  if (write_log (jt, jt->logbuf, c->start, c->need - 1, err) == -1)
    return -1;
  if (c->was_empty && jtx_write_jsb (jt, err) == -1)
    return -1;
  return 0;
}

/* Step 2: with the commit lock held (and maybe the others). */
static int
commit_write (struct ext4fs_jtx *jt, struct commit *c, int *err)
{
  /* Until the commit block is written, a failed write leaves the
   * committing transaction uncommitted wherever its blocks got to:
   * replay ignores it, and the next commit writes it again at the
   * same place (the request that asked fails, the session goes on).
   * A failed flush, or a failed commit block write (it may be on
   * disk), aborts the journal.
   */
  if (jtx_aborted (jt)) {
    nbdkit_error ("journal: commit refused: %s", jtx_stopped (jt));
    *err = EIO;
    c->fatal = true;
    return -1;
  }
  if (commit_write_log (jt, c, err) == -1)
    return -1;
  /* The data of every completed write, the log, the superblock: then
   * the commit block.
   */
  if (ext4fs_dev_flush (jt->dev, err) == -1) {
    /* Unlike a failed write, a failed flush may have lost file data
     * written before it (a volatile cache below): the metadata that
     * points at it must never be committed.  As the kernel does.
     */
    nbdkit_error ("journal: commit: flush: %s", strerror (*err));
    c->fatal = true;
    return -1;
  }
  if (jtx_aborted (jt)) {
    /* Stopped meanwhile by a request of the running transaction:
     * nothing more is written.
     */
    nbdkit_error ("journal: commit refused: %s", jtx_stopped (jt));
    *err = EIO;
    c->fatal = true;
    return -1;
  }
  if (ext4fs_dev_pwrite (jt->dev, jt->logbuf + (c->need - 1) * jt->bs,
                         jt->bs, jphys (jt, c->cb) << jt->bits,
                         NBDKIT_FLAG_FUA, err) == -1) {
    nbdkit_error ("journal: commit: writing the commit block: %s",
                  strerror (*err));
    c->fatal = true;
    return -1;
  }
  return 0;
}

/* Step 3, the bookkeeping of a commit whose commit block is written
 * (fs mutex held): its blocks are in the log.  The blocks freed in it
 * stay held (dheld) until commit_durable_locked: in jtx_commit_step
 * the commit block is written but durable only at the flush that
 * follows (no checkpoint may run before, commit_begin_locked).
 */
static void
commit_logged_locked (struct ext4fs_jtx *jt, const struct commit *c)
{
  size_t i;
  hold_vector hv;

  if (c->was_empty)
    jt->log_start = 1;          /* any non-zero: the log is live */
  for (i = 0; i < jt->committing.len; ++i) {
    struct jent *e = jt->committing.ptr[i];
    e->committing = false;
    e->in_log = true;
    /* The log now holds what was committed; changed since, the copy
     * kept at the change is it.
     */
    free (e->frozen);
    e->frozen = e->cfrozen;
    e->cfrozen = NULL;
  }
  jt->committing.len = 0;
  jt->crevokes.len = 0;
  /* Freed in it: in the log with their revokes. */
  for (i = 0; i < jt->cghosts.len; ++i)
    free (jt->cghosts.ptr[i].data);
  jt->cghosts.len = 0;
  jtx_ghosts_settle (jt, true);
  jt->ncommits++;
  if (jt->dheld.len == 0) {
    hv = jt->dheld; jt->dheld = jt->cheld; jt->cheld = hv;
  }
  else {
    for (i = 0; i < jt->cheld.len; ++i)
      if (hold_vector_append (&jt->dheld, jt->cheld.ptr[i]) == -1)
        /* Left marked in use: leaked until the next open. */
        jtx_abort_locked (jt, "out of memory for freed blocks");
  }
  jt->cheld.len = 0;
}

/* The commit is durable: the blocks freed in it may be reused. */
static void
commit_durable_locked (struct ext4fs_jtx *jt)
{
  size_t i;

  for (i = 0; i < jt->dheld.len; ++i)
    jt->unhold (jt->opaque, jt->dheld.ptr[i].start, jt->dheld.ptr[i].len);
  jt->dheld.len = 0;
}

/* A commit failed before its commit block (or c->fatal: the journal
 * aborts): back into the running transaction, at the same place in
 * the log, with the same tid; pending again.  Fs mutex held.
 */
static void
commit_failed_locked (struct ext4fs_jtx *jt, const struct commit *c)
{
  size_t i;

  if (c->fatal)
    jtx_abort_locked (jt, "commit failed");
  if (jent_vector_reserve (&jt->running, jt->committing.len) == -1)
    jtx_abort_locked (jt, "out of memory for a failed commit's blocks");
  for (i = 0; i < jt->committing.len; ++i) {
    struct jent *e = jt->committing.ptr[i];
    e->committing = false;
    free (e->cfrozen);
    e->cfrozen = NULL;
    if (!e->running) {
      if (jent_vector_append (&jt->running, e) == 0)
        e->running = true;
      else if (jent_is_clean (e))
        jt->nclean++;           /* dropped (the journal is aborted) */
    }
  }
  jt->committing.len = 0;
  for (i = 0; i < jt->crevokes.len; ++i)
    if (blk_vector_append (&jt->revokes, jt->crevokes.ptr[i]) == -1)
      jtx_abort_locked (jt, "out of memory for a revoke record");
  jt->crevokes.len = 0;
  for (i = 0; i < jt->cheld.len; ++i)
    if (hold_vector_append (&jt->held, jt->cheld.ptr[i]) == -1)
      jtx_abort_locked (jt, "out of memory for freed blocks");
  jt->cheld.len = 0;
  jtx_ghosts_settle (jt, false);
  for (i = 0; i < jt->cghosts.len; ++i)
    if (ghost_vector_append (&jt->ghosts, jt->cghosts.ptr[i]) == -1) {
      free (jt->cghosts.ptr[i].data);
      jtx_abort_locked (jt, "out of memory for freed blocks");
    }
  jt->cghosts.len = 0;
  __atomic_store_n (&jt->running_size, jt->running.len, __ATOMIC_RELAXED);
  jt->head = c->start;
  jt->used -= c->need;
  pthread_mutex_lock (&jt->state_lock);
  jt->tid = c->tid;
  __atomic_store_n (&jt->needs_commit, true, __ATOMIC_SEQ_CST);
  pthread_mutex_unlock (&jt->state_lock);
}

static void
set_inflight (struct ext4fs_jtx *jt, bool on)
{
  pthread_mutex_lock (&jt->state_lock);
  __atomic_store_n (&jt->inflight, on, __ATOMIC_SEQ_CST);
  if (!on)
    pthread_cond_broadcast (&jt->state_cond);
  pthread_mutex_unlock (&jt->state_lock);
}

/* Step 3 (fs mutex held): ok, or not (then c->fatal tells whether the
 * journal aborts).
 */
static int
commit_end_locked (struct ext4fs_jtx *jt, struct commit *c, bool ok, int *err)
{
  int r = 0;

  if (!ok) {
    commit_failed_locked (jt, c);
    set_inflight (jt, false);
    return -1;
  }
  commit_logged_locked (jt, c);
  commit_durable_locked (jt);
  pthread_mutex_lock (&jt->state_lock);
  jt->dtid = c->tid;
  pthread_mutex_unlock (&jt->state_lock);
  /* Still in flight for the checkpoint: no plain flush may run beside
   * its flushes (a failure split between them could let it empty the
   * log with its home writes lost).
   */
  if (jt->used > jt->capacity / 2 && !jtx_aborted (jt) &&
      jtx_checkpoint_locked (jt, err) == -1) {
    jtx_abort_locked (jt, "checkpoint failed");
    r = -1;
  }
  set_inflight (jt, false);
  jtx_cache_trim (jt);
  return r;
}

/* The whole commit, every lock held throughout (close, and
 * -D ext4fs.async_commit=0).  Handle lock exclusive and fs mutex held.
 */
int
jtx_commit_locked (struct ext4fs_jtx *jt, int *err)
{
  struct commit c;
  int r = commit_begin_locked (jt, &c, false, err);

  if (r <= 0)
    return r;
  r = commit_write (jt, &c, err);
  return commit_end_locked (jt, &c, r == 0, err);
}

/* The commit of jtx_sync: step 2 with the handle lock and the fs mutex
 * released, so that requests change metadata meanwhile, in the next
 * transaction.  Called with the commit lock held, no other.
 */
int
jtx_commit_unlocked (struct ext4fs_jtx *jt, int *err)
{
  struct commit c;
  int r;

  pthread_rwlock_wrlock (&jt->handle_lock);
  pthread_mutex_lock (jt->fs_lock);
  if (!jt->begun)
    r = ext4fs_dev_flush (jt->dev, err);
  else if (!jt->async_commit)
    r = jtx_commit_locked (jt, err);
  else {
    r = commit_begin_locked (jt, &c, false, err);
    if (r == 1) {
      pthread_mutex_unlock (jt->fs_lock);
      pthread_rwlock_unlock (&jt->handle_lock);
      __atomic_add_fetch (&jt->nasync, 1, __ATOMIC_RELAXED);
      r = commit_write (jt, &c, err);
      pthread_mutex_lock (jt->fs_lock);
      r = commit_end_locked (jt, &c, r == 0, err);
      pthread_mutex_unlock (jt->fs_lock);
      return r;
    }
  }
  pthread_mutex_unlock (jt->fs_lock);
  pthread_rwlock_unlock (&jt->handle_lock);
  return r;
}

/* Chained commits (the default, DESIGN.md §15): one step of jtx_sync,
 * with the commit lock held and no other.  A commit takes two steps,
 * each ending in one flush, and a step does the second half of one
 * commit with the first half of the next:
 *  1. under the handle lock exclusive and the fs mutex: the staged
 *     commit S (its log durable) goes into the log's bookkeeping
 *     (its freed blocks still held, dheld), and the running
 *     transaction, if it has anything to log and fits without a
 *     checkpoint, becomes the committing one, T (step 1 above);
 *  2. with the commit lock only: S's commit block, T's log blocks,
 *     then one flush: S is durable, and T's log and the data its
 *     metadata points at;
 *  3. under the fs mutex: S's freed blocks are released, T is staged
 *     for the next step to write its commit block.
 * T's commit block can only be written after that flush, so no
 * replay ever sees a commit block whose log or data may be missing,
 * and S's is durable before any waiter of S returns.  With flushes
 * back to back (several clients), a commit costs one flush, not two.
 * Nothing checkpoints while a commit is staged (the log holds it): a
 * step that would need one does S alone, and the checkpoint follows
 * S (or comes in the next step's commit_begin_locked).
 */
int
jtx_commit_step (struct ext4fs_jtx *jt, int *err)
{
  struct commit s = { 0 }, t = { 0 };
  bool have_s, fatal = false, t_failed = false, s_failed = false;
  int rt, r = 1, ferr = 0, terr = 0;
  uint64_t fseq = 0, t0 = jtx_now_ns (), t1;

  pthread_rwlock_wrlock (&jt->handle_lock);
  pthread_mutex_lock (jt->fs_lock);
  t1 = jtx_now_ns ();
  jt->step_wait_ns += t1 - t0;
  if (jtx_aborted (jt)) {
    pthread_mutex_unlock (jt->fs_lock);
    pthread_rwlock_unlock (&jt->handle_lock);
    nbdkit_error ("%s: commit refused: %s", jtx_what (jt), jtx_stopped (jt));
    *err = EIO;
    return -1;
  }
  /* In flight from here: no plain flush beside the device writes. */
  set_inflight (jt, true);
  have_s = jt->staged;
  if (have_s) {
    s = jt->sc;
    if (!jt->slogged)
      commit_logged_locked (jt, &s);
  }
  rt = commit_begin_locked (jt, &t, have_s, err);
  jt->step_hold_ns += jtx_now_ns () - t1;
  pthread_mutex_unlock (jt->fs_lock);
  pthread_rwlock_unlock (&jt->handle_lock);

  if (rt == -1 || (rt == 0 && !have_s)) {
    /* Failed (T pending again, or the journal aborted), or done with
     * nothing to stage (a plain flush, or no journal).
     */
    if (have_s) {
      /* Only an abort fails a chained begin: S is never written. */
      pthread_mutex_lock (jt->fs_lock);
      jtx_abort_locked (jt, "commit failed");
      pthread_mutex_unlock (jt->fs_lock);
    }
    set_inflight (jt, false);
    return rt;
  }

  /* Step 2. */
  if (rt == 1)
    __atomic_add_fetch (&jt->nasync, 1, __ATOMIC_RELAXED);
  if (have_s) {
    if (jtx_aborted (jt)) {
      /* Stopped meanwhile (a request of the running transaction). */
      nbdkit_error ("journal: commit refused: %s", jtx_stopped (jt));
      ferr = EIO;
      fatal = true;
    }
    else if (ext4fs_dev_pwrite (jt->dev, jt->scb,
                                jt->bs, jphys (jt, s.cb) << jt->bits, 0,
                                &ferr) == -1) {
      /* S stays staged, and the next step writes its commit block
       * again.  It may be on disk already: S's log and the data it
       * points at are durable (the last step's flush), so a replay
       * may take S or not; nothing after S is written before it.
       */
      nbdkit_error ("journal: commit: writing the commit block: %s "
                    "(written again at the next flush)", strerror (ferr));
      s_failed = true;
    }
  }
  if (rt == 1 && !fatal && !s_failed &&
      commit_write_log (jt, &t, &terr) == -1)
    t_failed = true;
  if (!fatal && !s_failed && (have_s || !t_failed)) {
    pthread_mutex_lock (&jt->state_lock);
    fseq = ++jt->fstarted;
    pthread_mutex_unlock (&jt->state_lock);
  }
  if (fseq > 0 && ext4fs_dev_flush (jt->dev, &ferr) == -1) {
    /* File data written before it may be lost below: neither commit
     * may ever be durable (S's commit block may be: the journal
     * aborts, replay decides).
     */
    nbdkit_error ("journal: commit: flush: %s", strerror (ferr));
    fatal = true;
  }

  /* Step 3. */
  pthread_mutex_lock (jt->fs_lock);
  if (rt == 1 && (fatal || t_failed || s_failed)) {
    t.fatal = fatal;
    commit_failed_locked (jt, &t);
  }
  /* S_FAILED: S is still staged, written again next (never FATAL:
   * nothing is flushed after a failed commit block).
   */
  if (have_s && fatal)
    jtx_abort_locked (jt, "commit failed");
  else if (have_s && !s_failed) {
    commit_durable_locked (jt);
    if (rt == 1 && !t_failed)
      jt->nchained++;
  }
  pthread_mutex_lock (&jt->state_lock);
  if (have_s && !fatal && !s_failed)
    jt->dtid = s.tid;
  if (fseq > 0 && !fatal)
    jt->fdone = fseq;
  if (s_failed)
    jt->slogged = true;         /* jt->sc and jt->scb are still S's */
  else {
    jt->slogged = false;
    jt->staged = rt == 1 && !fatal && !t_failed;
    if (jt->staged) {
      jt->sc = t;
      /* The next begin builds its log in logbuf. */
      memcpy (jt->scb, jt->logbuf + (t.need - 1) * jt->bs, jt->bs);
    }
  }
  pthread_mutex_unlock (&jt->state_lock);
  if (!fatal && !jt->staged && jt->used > jt->capacity / 2 &&
      !jtx_aborted (jt) && jtx_checkpoint_locked (jt, err) == -1) {
    jtx_abort_locked (jt, "checkpoint failed");
    r = -1;
  }
  set_inflight (jt, false);
  jtx_cache_trim (jt);
  pthread_mutex_unlock (jt->fs_lock);
  if (fatal || s_failed) {
    *err = ferr;
    return -1;
  }
  if (t_failed) {
    *err = terr;
    return -2;
  }
  return r;
}
