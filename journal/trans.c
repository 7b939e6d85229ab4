/* ext4fs: writing the journal (see trans.h).
 *
 * Owns: the transaction cache (every metadata block libext2fs or the
 * writeback reads or writes while the journal is open: the running
 * transaction's blocks, committed blocks not yet checkpointed, and
 * clean copies), the running transaction (its blocks, its revokes,
 * the blocks it freed), the log's head and tail, commits, checkpoints
 * and the commit timer.
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
 * flushes again (write_home_locked).
 *
 * Locks (DESIGN.md §3 and §15): the handle lock (a writer-preferring
 * rwlock: shared by requests changing metadata, exclusive for a commit
 * or checkpoint) sits between the inode rwlock and the fs mutex; all
 * fields below are protected by the fs mutex, which a commit holds
 * throughout, so nothing changes the cache while it is written.  The
 * timer thread takes the same locks as any commit.  Reads and
 * overwrites of file data take neither lock.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nbdkit-filter.h>

#include "common/vector.h"
#include "trans.h"

#define COMMIT_INTERVAL 5               /* seconds, the kernel's default */
#define CLEAN_LIMIT 8192                /* clean cached blocks kept */
#define NOLOG_RUN_BYTES (32u << 20)     /* no journal: write back this much */

struct jent {
  uint64_t blk;
  uint8_t *data;                /* the newest contents */
  uint8_t *frozen;              /* the last committed contents, if data has
                                   changed since and they are in the log */
  bool running;                 /* changed in the running transaction */
  bool in_log;                  /* committed into the live log: home is stale
                                   until the next checkpoint */
  bool fresh;                   /* no journal: first written whole by
                                   libext2fs in the running transaction (a
                                   new tree or indirect block) */
  struct jent *hnext;
};

struct hold { uint64_t start, len; };

DEFINE_VECTOR_TYPE (jent_vector, struct jent *);
DEFINE_VECTOR_TYPE (blk_vector, uint64_t);
DEFINE_VECTOR_TYPE (hold_vector, struct hold);

struct ext4fs_jtx {
  struct ext4fs_journal *jr;    /* the journal map and superblock */
  struct ext4fs_dev *dev;
  ext2_filsys fs;
  pthread_mutex_t *fs_lock;
  jtx_prepare_fn prepare;
  jtx_unhold_fn unhold;
  void *opaque;
  unsigned bits;
  uint32_t bs;
  bool logged;                  /* false: no journal (jtx_open_nolog) */
  pthread_rwlock_t handle_lock;

  /* Protected by *fs_lock: */
  struct jent **buckets;
  size_t nbuckets, nent, nclean;
  jent_vector running;           /* the running transaction's blocks */
  blk_vector revokes;           /* its revoke records */
  hold_vector held;             /* blocks freed in it, reserved */
  uint32_t tid;                 /* the running transaction's */
  uint32_t head;                /* next log block */
  uint32_t log_start;           /* first block of the live log, 0 = empty */
  uint32_t used;                /* blocks in the live log */
  uint32_t capacity;            /* log area */
  uint32_t run_limit;           /* commit a running transaction this big */
  uint64_t last_commit_ns;
  bool begun;
  uint8_t *logbuf;
  size_t logcap;
  uint64_t ncommits, ncheckpoints, nlogged, nflush_only, hits, misses;

  bool needs_commit;            /* atomic */
  bool aborted;                 /* atomic */
  size_t running_size;          /* atomic copy of running.len, for handles */

  /* The commit timer. */
  pthread_t timer;
  bool timer_started;
  pthread_mutex_t tlock;
  pthread_cond_t tcond;
  bool tstop;                   /* Protected by tlock */
};

/* For messages. */
static const char *
what (const struct ext4fs_jtx *jt)
{
  return jt->logged ? "journal" : "metadata writeback";
}

static const char *
stopped (const struct ext4fs_jtx *jt)
{
  return jt->logged ? "the journal was aborted" :
    "metadata writeback was stopped after a failure";
}

/*----------------------------------------------------------------------
 * The cache.
 */

static size_t
hash (const struct ext4fs_jtx *jt, uint64_t blk)
{
  return (size_t) ((blk * UINT64_C (0x9E3779B97F4A7C15)) >> 20) &
    (jt->nbuckets - 1);
}

static struct jent *
lookup (struct ext4fs_jtx *jt, uint64_t blk)
{
  struct jent *e;

  for (e = jt->buckets[hash (jt, blk)]; e; e = e->hnext)
    if (e->blk == blk)
      return e;
  return NULL;
}

static int
grow_table (struct ext4fs_jtx *jt)
{
  size_t n = jt->nbuckets * 2, i;
  struct jent **nb = calloc (n, sizeof *nb);
  struct jent **old = jt->buckets;
  size_t oldn = jt->nbuckets;

  if (nb == NULL)
    return -1;
  jt->buckets = nb;
  jt->nbuckets = n;
  for (i = 0; i < oldn; ++i) {
    struct jent *e = old[i], *next;
    for (; e; e = next) {
      size_t h = hash (jt, e->blk);
      next = e->hnext;
      e->hnext = nb[h];
      nb[h] = e;
    }
  }
  free (old);
  return 0;
}

/* A new, clean entry for blk with contents data (copied). */
static struct jent *
insert (struct ext4fs_jtx *jt, uint64_t blk, const void *data)
{
  struct jent *e;
  size_t h;

  if (jt->nent >= jt->nbuckets && grow_table (jt) == -1)
    return NULL;
  e = calloc (1, sizeof *e);
  if (e == NULL)
    return NULL;
  e->data = malloc (jt->bs);
  if (e->data == NULL) {
    free (e);
    return NULL;
  }
  memcpy (e->data, data, jt->bs);
  e->blk = blk;
  h = hash (jt, blk);
  e->hnext = jt->buckets[h];
  jt->buckets[h] = e;
  jt->nent++;
  jt->nclean++;
  return e;
}

static bool
is_clean (const struct jent *e)
{
  return !e->running && !e->in_log;
}

static void
remove_entry (struct ext4fs_jtx *jt, struct jent *e)
{
  struct jent **pp;

  for (pp = &jt->buckets[hash (jt, e->blk)]; *pp; pp = &(*pp)->hnext) {
    if (*pp == e) {
      *pp = e->hnext;
      break;
    }
  }
  if (is_clean (e))
    jt->nclean--;
  jt->nent--;
  free (e->data);
  free (e->frozen);
  free (e);
}

/* Drop clean entries when there are too many (they are only a read
 * cache).
 */
static void
trim_clean (struct ext4fs_jtx *jt)
{
  size_t i;

  if (jt->nclean <= CLEAN_LIMIT)
    return;
  for (i = 0; i < jt->nbuckets; ++i) {
    struct jent **pp = &jt->buckets[i];
    while (*pp) {
      struct jent *e = *pp;
      if (is_clean (e)) {
        *pp = e->hnext;
        jt->nclean--;
        jt->nent--;
        free (e->data);
        free (e->frozen);
        free (e);
      }
      else
        pp = &e->hnext;
    }
  }
}

/* Make e part of the running transaction before its contents change. */
static int
make_running (struct ext4fs_jtx *jt, struct jent *e)
{
  if (e->running)
    return 0;
  if (jent_vector_reserve (&jt->running, 1) == -1)
    return -1;
  if (e->in_log && e->frozen == NULL) {
    /* Keep the committed contents for the checkpoint. */
    e->frozen = malloc (jt->bs);
    if (e->frozen == NULL)
      return -1;
    memcpy (e->frozen, e->data, jt->bs);
  }
  if (is_clean (e))
    jt->nclean--;
  e->running = true;
  jt->running.ptr[jt->running.len++] = e;
  __atomic_store_n (&jt->running_size, jt->running.len, __ATOMIC_RELAXED);
  return 0;
}

/*----------------------------------------------------------------------
 * The metadata hooks: libext2fs's reads and writes (fs mutex held).
 */

static int
cache_read (void *opaque, void *buf, uint64_t count, uint64_t offset, int *err)
{
  struct ext4fs_jtx *jt = opaque;
  uint8_t *p = buf;
  uint64_t end = offset + count;

  while (offset < end) {
    uint64_t blk = offset >> jt->bits, boff = offset & (jt->bs - 1);
    uint64_t n = jt->bs - boff < end - offset ? jt->bs - boff : end - offset;
    struct jent *e = lookup (jt, blk);

    if (e == NULL) {
      /* Read whole blocks from the device and keep them (clean). */
      uint8_t *tmp = malloc (jt->bs);
      if (tmp == NULL) {
        *err = ENOMEM;
        return -1;
      }
      if (ext4fs_dev_pread (jt->dev, tmp, jt->bs, blk << jt->bits, err) == -1) {
        free (tmp);
        return -1;
      }
      jt->misses++;
      /* Kept clean (no memory for it: the read still succeeded). */
      insert (jt, blk, tmp);
      memcpy (p, tmp + boff, n);
      free (tmp);
    }
    else {
      jt->hits++;
      memcpy (p, e->data + boff, n);
    }
    p += n;
    offset += n;
  }
  trim_clean (jt);
  return 0;
}

/* Write (or zero, buf == NULL) into the running transaction.  fresh:
 * libext2fs's own write (not the writeback's bitmaps or descriptors).
 */
static int
cache_write (struct ext4fs_jtx *jt, const void *buf, uint64_t count,
             uint64_t offset, bool fresh, int *err)
{
  const uint8_t *p = buf;
  uint64_t end = offset + count;

  if (__atomic_load_n (&jt->aborted, __ATOMIC_RELAXED)) {
    nbdkit_error ("%s: metadata write refused: %s", what (jt), stopped (jt));
    *err = EIO;
    return -1;
  }
  while (offset < end) {
    uint64_t blk = offset >> jt->bits, boff = offset & (jt->bs - 1);
    uint64_t n = jt->bs - boff < end - offset ? jt->bs - boff : end - offset;
    struct jent *e = lookup (jt, blk);

    if (e == NULL) {
      uint8_t *tmp = calloc (1, jt->bs);
      if (tmp == NULL) {
        *err = ENOMEM;
        return -1;
      }
      if (n < jt->bs &&
          ext4fs_dev_pread (jt->dev, tmp, jt->bs, blk << jt->bits, err) == -1) {
        free (tmp);
        return -1;
      }
      e = insert (jt, blk, tmp);
      free (tmp);
      if (e == NULL) {
        nbdkit_error ("journal: out of memory for the transaction");
        *err = ENOMEM;
        return -1;
      }
      /* Not read first: a block libext2fs has just allocated. */
      e->fresh = fresh && n == jt->bs && !e->running;
    }
    if (make_running (jt, e) == -1) {
      nbdkit_error ("journal: out of memory for the transaction");
      *err = ENOMEM;
      return -1;
    }
    if (p) {
      memcpy (e->data + boff, p, n);
      p += n;
    }
    else
      memset (e->data + boff, 0, n);
    offset += n;
  }
  return 0;
}

static int
hook_write (void *opaque, const void *buf, uint64_t count, uint64_t offset,
            int *err)
{
  return cache_write (opaque, buf, count, offset, true, err);
}

static int
hook_zero (void *opaque, uint64_t count, uint64_t offset, int *err)
{
  return cache_write (opaque, NULL, count, offset, true, err);
}

static const struct ext4fs_meta_ops hooks = {
  .read = cache_read,
  .write = hook_write,
  .zero = hook_zero,
};

int
jtx_put_block (struct ext4fs_jtx *jt, uint64_t blk, const void *buf, int *err)
{
  return cache_write (jt, buf, jt->bs, blk << jt->bits, false, err);
}

bool
jtx_has_held (struct ext4fs_jtx *jt)
{
  bool r;

  pthread_mutex_lock (jt->fs_lock);
  r = jt->held.len > 0;
  pthread_mutex_unlock (jt->fs_lock);
  return r;
}

int
jtx_put_bytes (struct ext4fs_jtx *jt, uint64_t offset, const void *buf,
               uint64_t count, int *err)
{
  return cache_write (jt, buf, count, offset, false, err);
}

/*----------------------------------------------------------------------
 * Freed blocks.
 */

void
jtx_blocks_freed_locked (struct ext4fs_jtx *jt, uint64_t blk, uint64_t n)
{
  struct hold *last;
  uint64_t i;

  for (i = 0; i < n; ++i) {
    struct jent *e = lookup (jt, blk + i);

    if (e == NULL)
      continue;
    if (e->in_log) {
      /* Replay would write the old copy over whatever the block holds
       * next: revoke it.
       */
      if (blk_vector_append (&jt->revokes, blk + i) == -1) {
        jtx_abort_locked (jt, "out of memory for a revoke record");
        return;
      }
    }
    if (e->running) {
      size_t k;
      for (k = 0; k < jt->running.len; ++k)
        if (jt->running.ptr[k] == e) {
          jt->running.ptr[k] = jt->running.ptr[--jt->running.len];
          break;
        }
      __atomic_store_n (&jt->running_size, jt->running.len, __ATOMIC_RELAXED);
      e->running = false;
      if (!e->in_log)
        jt->nclean++;           /* remove_entry counts it down */
    }
    remove_entry (jt, e);
  }
  /* Reserved until the transaction commits. */
  last = jt->held.len ? &jt->held.ptr[jt->held.len - 1] : NULL;
  if (last && last->start + last->len == blk)
    last->len += n;
  else if (hold_vector_append (&jt->held, (struct hold) {
             .start = blk, .len = n }) == -1) {
    /* The blocks stay marked in use in memory: leaked until the next
     * open, never reused too early.
     */
    jtx_abort_locked (jt, "out of memory for freed blocks");
    return;
  }
  __atomic_store_n (&jt->needs_commit, true, __ATOMIC_RELAXED);
}

bool
jtx_held_locked (struct ext4fs_jtx *jt, uint64_t blk)
{
  size_t i;

  for (i = 0; i < jt->held.len; ++i)
    if (blk >= jt->held.ptr[i].start &&
        blk - jt->held.ptr[i].start < jt->held.ptr[i].len)
      return true;
  return false;
}

void
jtx_for_held_locked (struct ext4fs_jtx *jt, uint64_t start, uint64_t end,
                     void (*fn) (void *opaque, uint64_t blk, uint64_t n),
                     void *opaque)
{
  size_t i;

  for (i = 0; i < jt->held.len; ++i) {
    uint64_t s = jt->held.ptr[i].start, e = s + jt->held.ptr[i].len;
    if (s < start)
      s = start;
    if (e > end)
      e = end;
    if (s < e)
      fn (opaque, s, e - s);
  }
}

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

static int
write_jsb (struct ext4fs_jtx *jt, int *err)
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

static uint64_t
now_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_REALTIME, &ts);
  return (uint64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Checkpoint: every block as of its last commit goes home, then the
 * log is empty.  Handle lock exclusive and fs mutex held.
 */
static int
checkpoint_locked (struct ext4fs_jtx *jt, int *err)
{
  size_t i;

  if (jt->log_start == 0)
    return 0;
  for (i = 0; i < jt->nbuckets; ++i) {
    struct jent *e;
    for (e = jt->buckets[i]; e; e = e->hnext) {
      if (!e->in_log)
        continue;
      if (ext4fs_dev_pwrite (jt->dev, e->frozen ? e->frozen : e->data,
                             jt->bs, e->blk << jt->bits, 0, err) == -1) {
        nbdkit_error ("journal: checkpoint: writing block %" PRIu64 ": %s",
                      e->blk, strerror (*err));
        return -1;
      }
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
  if (write_jsb (jt, err) == -1 || ext4fs_dev_flush (jt->dev, err) == -1)
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
  jt->log_start = 0;
  jt->used = 0;
  jt->head = jt->jr->j.first;
  jt->ncheckpoints++;
  trim_clean (jt);
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
static int
write_home_locked (struct ext4fs_jtx *jt, int *err)
{
  size_t i;
  int pass;

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
  trim_clean (jt);
  return 0;
}

/* Commit the running transaction.  Handle lock exclusive and fs mutex
 * held.
 */
static int
commit_locked (struct ext4fs_jtx *jt, int *err)
{
  const struct jbd2_journal *j;
  size_t per_desc, per_rev, ndesc, nrev, need, pos, i;
  bool was_empty;
  uint64_t t;
  uint8_t *p;

  if (jt->prepare (jt->opaque, err) == -1) {
    jtx_abort_locked (jt, "metadata could not be prepared for a commit");
    return -1;
  }
  if (jt->running.len == 0 && jt->revokes.len == 0) {
    /* Nothing to log: a flush is all it takes. */
    if (ext4fs_dev_flush (jt->dev, err) == -1) {
      if (!jt->logged)
        goto fail;              /* data may be lost below: never clean */
      return -1;
    }
    goto done;
  }
  if (!jt->logged) {
    if (write_home_locked (jt, err) == -1)
      return -1;
    goto done;
  }
  j = &jt->jr->j;
  per_desc = tags_per_desc (jt);
  per_rev = revokes_per_block (jt);
  ndesc = (jt->running.len + per_desc - 1) / per_desc;
  nrev = (jt->revokes.len + per_rev - 1) / per_rev;
  need = ndesc + jt->running.len + nrev + 1;
  if (need + 1 >= jt->capacity) {
    nbdkit_error ("journal: a transaction of %zu blocks does not fit in the "
                  "journal (%" PRIu32 " blocks)", need, jt->capacity);
    *err = ENOSPC;
    jtx_abort_locked (jt, "transaction too large");
    return -1;
  }
  if (jt->used + need + 1 >= jt->capacity &&
      checkpoint_locked (jt, err) == -1) {
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
  t = now_ns ();
  if (t < jt->last_commit_ns)
    t = jt->last_commit_ns;
  jt->last_commit_ns = t;
  memset (p, 0, jt->bs);
  header (p, JBD2_COMMIT_BLOCK, jt->tid);
  put_be32 (p + JCOMMIT_SEC, (uint32_t) ((t / 1000000000) >> 32));
  put_be32 (p + JCOMMIT_SEC + 4, (uint32_t) (t / 1000000000));
  put_be32 (p + JCOMMIT_NSEC, (uint32_t) (t % 1000000000));
  jbd2_set_commit_csum (j, p);

  /* Until the commit block is written, a failed write leaves
   * transaction tid uncommitted wherever its blocks got to: replay
   * ignores it, and the next commit writes it again at the same place
   * (the request that asked fails, the session goes on).  A failed
   * flush, or a failed commit block write (it may be on disk), aborts
   * the journal.
   */
  was_empty = jt->log_start == 0;
  if (write_log (jt, jt->logbuf, jt->head, need - 1, err) == -1)
    return -1;
  if (was_empty) {
    /* Replay starts here: durable no later than the commit block. */
    jbd2_set_log (j, jt->jr->j.raw, jt->head, jt->tid);
    if (write_jsb (jt, err) == -1)
      return -1;
  }
  /* The data of every completed write, the log, the superblock: then
   * the commit block.
   */
  if (ext4fs_dev_flush (jt->dev, err) == -1) {
    /* Unlike a failed write, a failed flush may have lost file data
     * written before it (a volatile cache below): the metadata that
     * points at it must never be committed.  As the kernel does.
     */
    nbdkit_error ("journal: commit: flush: %s", strerror (*err));
    goto fail;
  }
  {
    uint32_t cb = jt->head;
    for (i = 0; i + 1 < need; ++i)
      cb = log_next (jt, cb);
    if (ext4fs_dev_pwrite (jt->dev, p, jt->bs, jphys (jt, cb) << jt->bits,
                           NBDKIT_FLAG_FUA, err) == -1) {
      nbdkit_error ("journal: commit: writing the commit block: %s",
                    strerror (*err));
      goto fail;
    }
    jt->head = log_next (jt, cb);
  }
  if (was_empty)
    jt->log_start = 1;          /* any non-zero: the log is live */
  jt->used += need;
  for (i = 0; i < jt->running.len; ++i) {
    struct jent *e = jt->running.ptr[i];
    e->running = false;
    e->in_log = true;
    free (e->frozen);           /* the log now holds data itself */
    e->frozen = NULL;
  }
  jt->nlogged += jt->running.len;
  jt->running.len = 0;
  __atomic_store_n (&jt->running_size, 0, __ATOMIC_RELAXED);
  jt->revokes.len = 0;
  jt->tid++;
  jt->ncommits++;

 done:
  /* Freed blocks may be reused now. */
  for (i = 0; i < jt->held.len; ++i)
    jt->unhold (jt->opaque, jt->held.ptr[i].start, jt->held.ptr[i].len);
  jt->held.len = 0;
  __atomic_store_n (&jt->needs_commit, false, __ATOMIC_RELAXED);
  if (jt->used > jt->capacity / 2 && checkpoint_locked (jt, err) == -1) {
    jtx_abort_locked (jt, "checkpoint failed");
    return -1;
  }
  return 0;

 fail:
  jtx_abort_locked (jt, "commit failed");
  return -1;
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
  ext4fs_dev_set_meta_ops (jt->dev, &hooks, jt);
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
  ext4fs_dev_set_meta_ops (jt->dev, &hooks, jt);
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
    if (sb_write (opaque, err) == -1 || write_home_locked (jt, err) == -1)
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
  if (write_jsb (jt, err) == -1)
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
jtx_handle_start (struct ext4fs_jtx *jt, int *err)
{
  int tries;

  for (tries = 0; ; ++tries) {
    if (jtx_aborted (jt)) {
      nbdkit_error ("%s: %s earlier in this session; refusing to change "
                    "the filesystem", what (jt), stopped (jt));
      *err = EIO;
      return -1;
    }
    pthread_rwlock_rdlock (&jt->handle_lock);
    if (__atomic_load_n (&jt->running_size, __ATOMIC_RELAXED) < jt->run_limit ||
        tries >= 3)
      return 0;
    /* The running transaction is full: commit it first. */
    pthread_rwlock_unlock (&jt->handle_lock);
    if (jtx_sync (jt, true, err) == -1)
      return -1;
  }
}

void
jtx_handle_stop (struct ext4fs_jtx *jt, bool needs_commit)
{
  if (needs_commit)
    __atomic_store_n (&jt->needs_commit, true, __ATOMIC_RELAXED);
  pthread_rwlock_unlock (&jt->handle_lock);
}

bool
jtx_pending (struct ext4fs_jtx *jt)
{
  return __atomic_load_n (&jt->needs_commit, __ATOMIC_RELAXED);
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

int
jtx_sync (struct ext4fs_jtx *jt, bool force, int *err)
{
  int r;

  if (jtx_aborted (jt)) {
    nbdkit_error ("%s: flush refused: %s", what (jt), stopped (jt));
    *err = EIO;
    return -1;
  }
  if (!force && !jtx_pending (jt)) {
    if (jt->logged)
      return ext4fs_dev_flush (jt->dev, err);
    /* No journal: a flush never completes in the middle of another
     * thread's write-back (the state at a completed flush is one a
     * write-back left whole), and a failed one stops the writer, as a
     * failed flush inside a write-back does.
     */
    pthread_rwlock_rdlock (&jt->handle_lock);
    r = ext4fs_dev_flush (jt->dev, err);
    pthread_rwlock_unlock (&jt->handle_lock);
    if (r == -1) {
      pthread_mutex_lock (jt->fs_lock);
      jtx_abort_locked (jt, "a flush failed below");
      pthread_mutex_unlock (jt->fs_lock);
    }
    return r;
  }
  pthread_rwlock_wrlock (&jt->handle_lock);
  pthread_mutex_lock (jt->fs_lock);
  if (!jt->begun)
    r = ext4fs_dev_flush (jt->dev, err);
  else
    r = commit_locked (jt, err);
  pthread_mutex_unlock (jt->fs_lock);
  pthread_rwlock_unlock (&jt->handle_lock);
  return r;
}

static void *
timer_thread (void *arg)
{
  struct ext4fs_jtx *jt = arg;
  struct timespec ts;

  pthread_mutex_lock (&jt->tlock);
  while (!jt->tstop) {
    clock_gettime (CLOCK_MONOTONIC, &ts);
    ts.tv_sec += COMMIT_INTERVAL;
    while (!jt->tstop &&
           pthread_cond_timedwait (&jt->tcond, &jt->tlock, &ts) == 0)
      ;
    if (jt->tstop)
      break;
    pthread_mutex_unlock (&jt->tlock);
    if (!jtx_aborted (jt) &&
        (__atomic_load_n (&jt->running_size, __ATOMIC_RELAXED) > 0 ||
         jtx_pending (jt))) {
      int err;
      jtx_sync (jt, true, &err);
    }
    pthread_mutex_lock (&jt->tlock);
  }
  pthread_mutex_unlock (&jt->tlock);
  return NULL;
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
  pthread_rwlock_wrlock (&jt->handle_lock);
  pthread_mutex_lock (jt->fs_lock);
  if (commit_locked (jt, err) == -1 || checkpoint_locked (jt, err) == -1)
    r = -1;
  pthread_mutex_unlock (jt->fs_lock);
  pthread_rwlock_unlock (&jt->handle_lock);
  return r;
}

void
jtx_stats (struct ext4fs_jtx *jt)
{
  nbdkit_debug ("ext4fs: journal: %" PRIu64 " commits, %" PRIu64 " blocks "
                "logged, %" PRIu64 " checkpoints, cache %" PRIu64 " hits %"
                PRIu64 " misses, next tid %" PRIu32,
                jt->ncommits, jt->nlogged, jt->ncheckpoints, jt->hits,
                jt->misses, jt->tid);
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
      free (e);
    }
  }
  free (jt->buckets);
  jent_vector_reset (&jt->running);
  blk_vector_reset (&jt->revokes);
  hold_vector_reset (&jt->held);
  free (jt->logbuf);
  pthread_rwlock_destroy (&jt->handle_lock);
  pthread_mutex_destroy (&jt->tlock);
  pthread_cond_destroy (&jt->tcond);
  journal_free (jt->jr);
  free (jt);
}
