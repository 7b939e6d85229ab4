/* ext4fs: writing the journal (see trans.h).
 *
 * Owns: opening and closing the writer, its handles, syncs and the
 * commit timer.  The transaction cache (every metadata block
 * libext2fs or the writeback reads or writes while the journal is
 * open, and the blocks freed in the running transaction) is cache.c's;
 * writing the log, commits and checkpoints are commit.c's; the state
 * all three share is in trans-int.h.
 *
 * Ordered mode, as the kernel's jbd2 does it:
 *  - file data goes straight to the device (rw.c); metadata goes into
 *    the cache, and so into the running transaction;
 *  - a commit waits until no request is half way through its metadata
 *    changes (the handle lock, exclusive), writes the descriptor
 *    blocks, the copies and the revoke blocks into the log (and the
 *    journal superblock if the log was empty), flushes (so the data of
 *    every completed write and the log are durable), then writes the
 *    commit block with FUA;
 *  - a checkpoint writes every block as of its last commit home (the
 *    frozen copy if the running transaction changed it since),
 *    flushes, empties the log in the journal superblock, flushes;
 *  - blocks freed in a transaction stay reserved until it commits, and
 *    freed blocks with a copy in the live log are revoked.
 *
 * Without a journal (jtx_open_nolog: ext2, ^has_journal) the same cache
 * and handles give the ordering without the atomicity: a "commit"
 * flushes (the data first), writes the running transaction home and
 * flushes again (jtx_write_home_locked).
 *
 * Locks (DESIGN.md §3 and §15): the commit lock (one commit or
 * checkpoint at a time) comes first; the handle lock (a
 * writer-preferring rwlock: shared by requests changing metadata,
 * exclusive for a commit's step 1, where the running transaction
 * becomes the committing one) sits between the inode rwlock and the
 * fs mutex; the cache and both transactions are protected by the fs
 * mutex.  A commit writes its log (step 2) with neither the handle lock
 * nor the fs mutex: requests go on in the next transaction; a flush
 * waits for the commit in flight (state_lock, state_cond).  The timer
 * thread commits as jtx_sync does.  Reads and overwrites of file data
 * take none of these locks.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nbdkit-filter.h>

#include "trans-int.h"

/* For messages. */
const char *
jtx_what (const struct ext4fs_jtx *jt)
{
  return jt->logged ? "journal" : "metadata writeback";
}

const char *
jtx_stopped (const struct ext4fs_jtx *jt)
{
  return jt->logged ? "the journal was aborted" :
    "metadata writeback was stopped after a failure";
}

/*----------------------------------------------------------------------
 * Entry points.
 */

static void *timer_thread (void *arg);

/* What both kinds share; NULL after nbdkit_error. */
static struct ext4fs_jtx *
jtx_new (struct ext4fs_dev *dev, unsigned bits, ext2_filsys fs,
         pthread_mutex_t *fs_lock, jtx_prepare_fn prepare,
         jtx_unhold_fn unhold, void *opaque)
{
  struct ext4fs_jtx *jt;
  pthread_rwlockattr_t attr;
  pthread_condattr_t ca;

  jt = calloc (1, sizeof *jt);
  if (jt == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  jt->dev = dev;
  jt->fs = fs;
  jt->fs_lock = fs_lock;
  jt->prepare = prepare;
  jt->unhold = unhold;
  jt->opaque = opaque;
  jt->bits = bits;
  jt->bs = 1u << jt->bits;
  jt->flush_ahead = PREFLUSH_BYTES;
  jt->nbuckets = 1024;
  jt->buckets = calloc (jt->nbuckets, sizeof *jt->buckets);
  if (jt->buckets == NULL) {
    nbdkit_error ("calloc: %m");
    free (jt);
    return NULL;
  }
  pthread_rwlockattr_init (&attr);
  /* A waiting commit stops new handles: no starvation. */
  pthread_rwlockattr_setkind_np (&attr,
                                 PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init (&jt->handle_lock, &attr);
  pthread_rwlockattr_destroy (&attr);
  pthread_mutex_init (&jt->commit_lock, NULL);
  pthread_mutex_init (&jt->state_lock, NULL);
  pthread_cond_init (&jt->state_cond, NULL);
  jt->async_commit = true;
  jt->chain_commit = true;
  pthread_mutex_init (&jt->tlock, NULL);
  pthread_condattr_init (&ca);
  pthread_condattr_setclock (&ca, CLOCK_MONOTONIC);
  pthread_cond_init (&jt->tcond, &ca);
  pthread_condattr_destroy (&ca);
  return jt;
}

struct ext4fs_jtx *
jtx_open (struct ext4fs_journal *jr, ext2_filsys fs, pthread_mutex_t *fs_lock,
          jtx_prepare_fn prepare, jtx_unhold_fn unhold, void *opaque)
{
  struct ext4fs_jtx *jt;

  if (jr->j.start != 0) {
    nbdkit_error ("journal: the log is not empty");
    journal_free (jr);
    return NULL;
  }
  jt = jtx_new (jr->dev, jr->blockbits, fs, fs_lock, prepare, unhold, opaque);
  if (jt == NULL) {
    journal_free (jr);
    return NULL;
  }
  jt->jr = jr;
  jt->logged = true;
  jt->capacity = jr->j.last - jr->j.first;
  jt->run_limit = jt->capacity / 4;
  jt->head = jr->j.first;
  /* With an empty log the kernel's next tid is s_sequence + 1. */
  jt->tid = jr->j.sequence + 1;
  jt->dtid = jt->tid - 1;
  jt->scb = malloc (jt->bs);
  if (jt->scb == NULL) {
    nbdkit_error ("malloc: %m");
    jtx_free (jt);
    return NULL;
  }
  ext4fs_dev_set_meta_ops (jt->dev, &jtx_cache_hooks, jt);
  return jt;
}

struct ext4fs_jtx *
jtx_open_nolog (struct ext4fs_dev *dev, unsigned blockbits, ext2_filsys fs,
                pthread_mutex_t *fs_lock, jtx_prepare_fn prepare,
                jtx_unhold_fn unhold, void *opaque)
{
  struct ext4fs_jtx *jt;

  jt = jtx_new (dev, blockbits, fs, fs_lock, prepare, unhold, opaque);
  if (jt == NULL)
    return NULL;
  jt->run_limit = NOLOG_RUN_BYTES >> blockbits;
  ext4fs_dev_set_meta_ops (jt->dev, &jtx_cache_hooks, jt);
  return jt;
}

bool
jtx_logged (const struct ext4fs_jtx *jt)
{
  return jt->logged;
}

int
jtx_begin_locked (struct ext4fs_jtx *jt,
                  int (*sb_write) (void *opaque, int *err), void *opaque,
                  int *err)
{
  struct jbd2_journal *j;
  struct ext2_super_block *sb = jt->fs->super;
  uint8_t *raw;
  uint32_t compat, incompat;
  struct jbd2_journal nj;

  if (jt->begun)
    return 0;
  if (jtx_aborted (jt)) {
    *err = EIO;
    return -1;
  }
  if (!jt->logged) {
    /* The "not clean" mark home and durable before anything changes. */
    if (sb_write (opaque, err) == -1 || jtx_write_home_locked (jt, err) == -1)
      return -1;
    goto begun;
  }
  j = &jt->jr->j;
  raw = j->raw;
  /* The features the kernel would choose for this filesystem: v3
   * checksums with metadata_csum, else none; 64-bit tags on a 64bit
   * filesystem; revoke; no async commit.  (The log is empty, so they
   * may change.)
   */
  put_be32 (raw + 4, JBD2_SUPERBLOCK_V2);
  compat = 0;
  incompat = (j->incompat & JBD2_INCOMPAT_FAST_COMMIT) | JBD2_INCOMPAT_REVOKE;
  if (ext2fs_has_feature_64bit (sb))
    incompat |= JBD2_INCOMPAT_64BIT;
  memset (&nj, 0, sizeof nj);
  if (ext2fs_has_feature_metadata_csum (sb)) {
    incompat |= JBD2_INCOMPAT_CSUM_V3;
    raw[JSB_CHECKSUM_TYPE] = JBD2_CHKSUM_CRC32C;
    nj.csum = true;             /* for jbd2_set_log's checksum */
  }
  else
    raw[JSB_CHECKSUM_TYPE] = 0;
  put_be32 (raw + JSB_COMPAT, compat);
  put_be32 (raw + JSB_INCOMPAT, incompat);
  put_be32 (raw + JSB_RO_COMPAT, 0);
  put_be32 (raw + JSB_ERRNO, 0);
  jbd2_set_log (&nj, raw, 0, j->sequence);
  if (jbd2_load (&nj, raw, jt->bs, j->maxlen) == -1) {
    *err = EIO;
    return -1;
  }
  *j = nj;
  if (jtx_write_jsb (jt, err) == -1)
    return -1;
  /* needs_recovery durable before the first log block. */
  if (sb_write (opaque, err) == -1)
    return -1;
  if (ext4fs_dev_flush (jt->dev, err) == -1)
    return -1;
 begun:
  jt->begun = true;
  if (pthread_create (&jt->timer, NULL, timer_thread, jt) == 0)
    jt->timer_started = true;
  else
    nbdkit_debug ("journal: no commit timer thread: %m");
  return 0;
}

int
jtx_handle_start (struct ext4fs_jtx *jt, bool data, int *err)
{
  int tries;

  for (tries = 0; ; ++tries) {
    if (jtx_aborted (jt)) {
      nbdkit_error ("%s: %s earlier in this session; refusing to change "
                    "the filesystem", jtx_what (jt), jtx_stopped (jt));
      *err = EIO;
      return -1;
    }
    pthread_rwlock_rdlock (&jt->handle_lock);
    if (__atomic_load_n (&jt->running_size, __ATOMIC_RELAXED) < jt->run_limit ||
        tries >= 3) {
      if (data)
        __atomic_add_fetch (&jt->handles, 1, __ATOMIC_SEQ_CST);
      if (__atomic_load_n (&jt->inflight, __ATOMIC_RELAXED))
        __atomic_add_fetch (&jt->nbeside, 1, __ATOMIC_RELAXED);
      return 0;
    }
    /* The running transaction is full: commit it first. */
    pthread_rwlock_unlock (&jt->handle_lock);
    if (jtx_sync (jt, true, err) == -1)
      return -1;
  }
}

void
jtx_handle_stop (struct ext4fs_jtx *jt, bool data, bool needs_commit)
{
  /* Pending before the handle is gone: a failed plain flush (jtx_sync)
   * sees one or the other.
   */
  if (needs_commit)
    __atomic_store_n (&jt->needs_commit, true, __ATOMIC_SEQ_CST);
  if (data)
    __atomic_sub_fetch (&jt->handles, 1, __ATOMIC_SEQ_CST);
  pthread_rwlock_unlock (&jt->handle_lock);
}

bool
jtx_pending (struct ext4fs_jtx *jt)
{
  bool r;

  /* Both under state_lock: a failing commit turns one into the other
   * in one step.
   */
  pthread_mutex_lock (&jt->state_lock);
  r = __atomic_load_n (&jt->needs_commit, __ATOMIC_SEQ_CST) ||
    __atomic_load_n (&jt->inflight, __ATOMIC_SEQ_CST) || jt->staged;
  pthread_mutex_unlock (&jt->state_lock);
  return r;
}

/* Wait until no commit is between its steps 1 and 3; returns whether
 * something is pending then (needs_commit: changes a flush must
 * commit).  A commit that fails sets needs_commit again as it ends.
 */
static bool
wait_inflight (struct ext4fs_jtx *jt)
{
  bool pending;

  pthread_mutex_lock (&jt->state_lock);
  while (__atomic_load_n (&jt->inflight, __ATOMIC_SEQ_CST) &&
         !__atomic_load_n (&jt->needs_commit, __ATOMIC_SEQ_CST))
    pthread_cond_wait (&jt->state_cond, &jt->state_lock);
  pending = __atomic_load_n (&jt->needs_commit, __ATOMIC_SEQ_CST);
  pthread_mutex_unlock (&jt->state_lock);
  return pending;
}

bool
jtx_aborted (struct ext4fs_jtx *jt)
{
  return __atomic_load_n (&jt->aborted, __ATOMIC_ACQUIRE);
}

void
jtx_abort_locked (struct ext4fs_jtx *jt, const char *why)
{
  if (__atomic_exchange_n (&jt->aborted, true, __ATOMIC_ACQ_REL))
    return;
  if (jt->logged)
    nbdkit_error ("journal: aborting the journal (%s): no more changes in "
                  "this session; the image is left needing recovery, which "
                  "the next open (ext4fs, e2fsck or the kernel) replays to "
                  "the last committed state", why);
  else
    nbdkit_error ("metadata writeback: stopping (%s): no more changes in "
                  "this session; the filesystem (no journal) is left marked "
                  "not clean, with errors: run e2fsck", why);
}

/* One plugin flush with the handle lock shared (jtx_sync). */
static int
plain_flush (struct ext4fs_jtx *jt, int *err)
{
  int r;

  /* With the handle lock shared, so that no commit or write-back runs
   * meanwhile (but a session's first write-back without a journal,
   * jtx_begin_locked: the superblock alone, flushed by itself): the
   * state at a completed flush is one they left whole, and a commit
   * queued behind a failed one finds the writer stopped
   * (jtx_commit_locked, jtx_write_home_locked check again), so none
   * makes durable metadata pointing at data the failure may have
   * lost below.
   * A failed flush may have lost file data written since the last
   * good one.  If that can only be data in place (no handle was
   * open and nothing is pending), the flush fails and the session
   * goes on, as with the plugin alone.  If a handle is open or has
   * made changes since, new metadata may point at data the failure
   * lost: the writer stops before that can be committed.
   * Handles are read before pending (jtx_handle_stop sets pending
   * before it counts the handle gone).
   */
  for (;;) {
    /* Never beside a commit's step 2 (one is in flight only while
     * the handle lock is free): the commit's flush and this one must
     * not split a failure between them.
     */
    pthread_rwlock_rdlock (&jt->handle_lock);
    if (!__atomic_load_n (&jt->inflight, __ATOMIC_SEQ_CST))
      break;
    pthread_rwlock_unlock (&jt->handle_lock);
    pthread_mutex_lock (&jt->state_lock);
    while (__atomic_load_n (&jt->inflight, __ATOMIC_SEQ_CST))
      pthread_cond_wait (&jt->state_cond, &jt->state_lock);
    pthread_mutex_unlock (&jt->state_lock);
  }
  r = ext4fs_dev_flush (jt->dev, err);
  if (r == -1 &&
      (__atomic_load_n (&jt->handles, __ATOMIC_SEQ_CST) > 0 ||
       __atomic_load_n (&jt->needs_commit, __ATOMIC_SEQ_CST))) {
    pthread_mutex_lock (jt->fs_lock);
    jtx_abort_locked (jt, "a flush failed below while new metadata "
                      "was not yet durable");
    pthread_mutex_unlock (jt->fs_lock);
  }
  pthread_rwlock_unlock (&jt->handle_lock);
  return r;
}

/* (int32_t) (a - b) >= 0, for tids. */
static bool
tid_ge (uint32_t a, uint32_t b)
{
  return (int32_t) (a - b) >= 0;
}

/* jtx_sync with chained commits (jtx_commit_step): the flush is done
 * when the transaction that held the changes of every request
 * completed before it is durable: the running one if it has any
 * (needs_commit), else the last one begun, staged or in flight.  Any
 * waiting flush may take the next step, for itself and the others.
 */
static int
sync_chained (struct ext4fs_jtx *jt, bool force, int *err)
{
  uint32_t target;
  uint64_t fseq;
  bool pending;
  int r, i;

  pthread_mutex_lock (&jt->state_lock);
  pending = __atomic_load_n (&jt->needs_commit, __ATOMIC_SEQ_CST) ||
    __atomic_load_n (&jt->inflight, __ATOMIC_SEQ_CST) || jt->staged;
  target = force || __atomic_load_n (&jt->needs_commit, __ATOMIC_SEQ_CST)
    ? jt->tid : jt->tid - 1;
  /* A step's flush that started before this one may not cover the
   * file data written before it.
   */
  fseq = jt->fstarted;
  pthread_mutex_unlock (&jt->state_lock);
  if (!force && !pending)
    return plain_flush (jt, err);  /* nothing to commit */

  pthread_mutex_lock (&jt->commit_lock);
  for (;;) {
    bool done, flushed;

    pthread_mutex_lock (&jt->state_lock);
    done = tid_ge (jt->dtid, target) ||
      (!__atomic_load_n (&jt->needs_commit, __ATOMIC_SEQ_CST) && !jt->staged);
    flushed = jt->fdone > fseq;
    pthread_mutex_unlock (&jt->state_lock);
    if (done && flushed)
      break;
    if (done) {
      /* Committed by a step whose flush came too early for this one's
       * file data: a flush of its own.  (With the commit lock: no step
       * beside it.)
       */
      r = plain_flush (jt, err);
      pthread_mutex_unlock (&jt->commit_lock);
      return r;
    }
    if (jtx_aborted (jt)) {
      pthread_mutex_unlock (&jt->commit_lock);
      nbdkit_error ("%s: flush refused: %s", jtx_what (jt),
                    jtx_stopped (jt));
      *err = EIO;
      return -1;
    }
    /* As in jtx_sync: much file data since the last flush goes first,
     * beside requests.  (Not with a commit staged: its step's flush is
     * due anyway.)
     */
    for (i = 0; !jt->staged && jt->flush_ahead > 0 && i < PREFLUSH_ROUNDS &&
           ext4fs_dev_unflushed (jt->dev) >= jt->flush_ahead; ++i) {
      if (plain_flush (jt, err) == -1) {
        pthread_mutex_unlock (&jt->commit_lock);
        return -1;
      }
      __atomic_add_fetch (&jt->npreflush, 1, __ATOMIC_RELAXED);
    }
    r = jtx_commit_step (jt, err);
    if (r == 1)
      continue;
    if (r == -2) {
      /* The next transaction's log failed: this flush fails if its
       * changes were in it.
       */
      pthread_mutex_lock (&jt->state_lock);
      done = tid_ge (jt->dtid, target) && jt->fdone > fseq;
      pthread_mutex_unlock (&jt->state_lock);
      r = done ? 0 : -1;
    }
    pthread_mutex_unlock (&jt->commit_lock);
    return r;
  }
  pthread_mutex_unlock (&jt->commit_lock);
  return 0;
}

int
jtx_sync (struct ext4fs_jtx *jt, bool force, int *err)
{
  int r, i;

  if (jtx_aborted (jt)) {
    nbdkit_error ("%s: flush refused: %s", jtx_what (jt), jtx_stopped (jt));
    *err = EIO;
    return -1;
  }
  if (jt->logged && jt->async_commit && jt->chain_commit)
    return sync_chained (jt, force, err);
  /* A commit in flight may hold this client's changes: wait for it
   * (if it fails, they are pending again).
   */
  if (!force && !wait_inflight (jt))
    return plain_flush (jt, err);  /* nothing to commit or write back */
  pthread_mutex_lock (&jt->commit_lock);
  /* Another commit may have taken this client's changes meanwhile. */
  if (!force && !__atomic_load_n (&jt->needs_commit, __ATOMIC_SEQ_CST)) {
    pthread_mutex_unlock (&jt->commit_lock);
    return plain_flush (jt, err);
  }
  /* Much file data written since the last flush (a commit after
   * seconds of writes): flush it first, with the handle lock shared,
   * so that writes that change metadata go on meanwhile; the flush in
   * the commit, which holds everything up, then has little left to
   * write.  (With the commit lock: no commit is in flight.)
   */
  for (i = 0; jt->flush_ahead > 0 && i < PREFLUSH_ROUNDS &&
         ext4fs_dev_unflushed (jt->dev) >= jt->flush_ahead; ++i) {
    if (plain_flush (jt, err) == -1) {
      pthread_mutex_unlock (&jt->commit_lock);
      return -1;
    }
    __atomic_add_fetch (&jt->npreflush, 1, __ATOMIC_RELAXED);
  }
  r = jtx_commit_unlocked (jt, err);
  pthread_mutex_unlock (&jt->commit_lock);
  return r;
}

static void *
timer_thread (void *arg)
{
  struct ext4fs_jtx *jt = arg;
  struct timespec ts;
  bool staged;

  pthread_mutex_lock (&jt->tlock);
  while (!jt->tstop) {
    clock_gettime (CLOCK_MONOTONIC, &ts);
    ts.tv_sec += COMMIT_INTERVAL;
    while (!jt->tstop && !jt->tkick &&
           pthread_cond_timedwait (&jt->tcond, &jt->tlock, &ts) == 0)
      ;
    if (jt->tstop)
      break;
    jt->tkick = false;
    pthread_mutex_unlock (&jt->tlock);
    /* A staged commit too: its commit block waits for the next step,
     * which may be long in coming once the clients are idle.
     */
    pthread_mutex_lock (&jt->state_lock);
    staged = jt->staged;
    pthread_mutex_unlock (&jt->state_lock);
    if (!jtx_aborted (jt) &&
        (__atomic_load_n (&jt->running_size, __ATOMIC_RELAXED) > 0 ||
         jtx_pending (jt) || staged)) {
      int err;
      jtx_sync (jt, true, &err);
    }
    pthread_mutex_lock (&jt->tlock);
  }
  pthread_mutex_unlock (&jt->tlock);
  return NULL;
}

bool
jtx_kick (struct ext4fs_jtx *jt)
{
  if (!jt->timer_started)
    return false;
  pthread_mutex_lock (&jt->tlock);
  jt->tkick = true;
  pthread_cond_signal (&jt->tcond);
  pthread_mutex_unlock (&jt->tlock);
  return true;
}

static void
stop_timer (struct ext4fs_jtx *jt)
{
  if (!jt->timer_started)
    return;
  pthread_mutex_lock (&jt->tlock);
  jt->tstop = true;
  pthread_cond_signal (&jt->tcond);
  pthread_mutex_unlock (&jt->tlock);
  pthread_join (jt->timer, NULL);
  jt->timer_started = false;
}

int
jtx_close (struct ext4fs_jtx *jt, int *err)
{
  int r = 0;

  stop_timer (jt);
  if (!jt->begun)
    return 0;
  if (jtx_aborted (jt)) {
    *err = EIO;
    return -1;
  }
  pthread_mutex_lock (&jt->commit_lock);
  /* A staged commit first (its commit block, and maybe the rest). */
  while (jt->staged && r == 0) {
    int s = jtx_commit_step (jt, err);
    if (s < 0)
      r = -1;
  }
  pthread_rwlock_wrlock (&jt->handle_lock);
  pthread_mutex_lock (jt->fs_lock);
  if (r == -1 ||
      jtx_commit_locked (jt, err) == -1 || jtx_checkpoint_locked (jt, err) == -1)
    r = -1;
  pthread_mutex_unlock (jt->fs_lock);
  pthread_rwlock_unlock (&jt->handle_lock);
  pthread_mutex_unlock (&jt->commit_lock);
  return r;
}

void
jtx_set_flush_ahead (struct ext4fs_jtx *jt, uint64_t bytes)
{
  jt->flush_ahead = bytes;
}

void
jtx_set_checkpoint_first (struct ext4fs_jtx *jt, bool on)
{
  jt->checkpoint_first = on;
}

void
jtx_set_async_commit (struct ext4fs_jtx *jt, bool on)
{
  jt->async_commit = on;
}

void
jtx_set_chain_commit (struct ext4fs_jtx *jt, bool on)
{
  jt->chain_commit = on;
}

void
jtx_stats (struct ext4fs_jtx *jt)
{
  nbdkit_debug ("ext4fs: journal: %" PRIu64 " commits, %" PRIu64 " blocks "
                "logged, %" PRIu64 " checkpoints (%" PRIu64 " blocks home, %" PRIu64
                " ms), commit steps waited %" PRIu64 " ms for handles and held "
                "them off %" PRIu64 " ms, cache %" PRIu64 " hits %"
                PRIu64 " misses, %" PRIu64 " flushes ahead of commits, "
                "%" PRIu64 " commits written outside the locks, %" PRIu64
                " handles started beside them, %" PRIu64 " commit blocks "
                "flushed with the next log, next tid %" PRIu32,
                jt->ncommits, jt->nlogged, jt->ncheckpoints, jt->ckpt_blocks,
                jt->ckpt_ns / 1000000, jt->step_wait_ns / 1000000,
                jt->step_hold_ns / 1000000, jt->hits,
                jt->misses, __atomic_load_n (&jt->npreflush, __ATOMIC_RELAXED),
                jt->nasync, __atomic_load_n (&jt->nbeside, __ATOMIC_RELAXED),
                jt->nchained, jt->tid);
}

void
jtx_free (struct ext4fs_jtx *jt)
{
  size_t i;

  if (jt == NULL)
    return;
  stop_timer (jt);
  ext4fs_dev_set_meta_ops (jt->dev, NULL, NULL);
  for (i = 0; i < jt->nbuckets; ++i) {
    struct jent *e = jt->buckets[i], *next;
    for (; e; e = next) {
      next = e->hnext;
      free (e->data);
      free (e->frozen);
      free (e->cfrozen);
      free (e);
    }
  }
  free (jt->buckets);
  jent_vector_reset (&jt->running);
  blk_vector_reset (&jt->revokes);
  hold_vector_reset (&jt->held);
  jtx_ghosts_drop (jt);
  ghost_vector_reset (&jt->ghosts);
  jent_vector_reset (&jt->committing);
  blk_vector_reset (&jt->crevokes);
  hold_vector_reset (&jt->cheld);
  hold_vector_reset (&jt->dheld);
  free (jt->scb);
  /* A commit staged at an abort keeps its ghosts. */
  for (i = 0; i < jt->cghosts.len; ++i) {
    free (jt->cghosts.ptr[i].data);
    free (jt->cghosts.ptr[i].prev);
  }
  ghost_vector_reset (&jt->cghosts);
  pthread_mutex_destroy (&jt->commit_lock);
  pthread_mutex_destroy (&jt->state_lock);
  pthread_cond_destroy (&jt->state_cond);
  free (jt->logbuf);
  pthread_rwlock_destroy (&jt->handle_lock);
  pthread_mutex_destroy (&jt->tlock);
  pthread_cond_destroy (&jt->tcond);
  journal_free (jt->jr);
  free (jt);
}

