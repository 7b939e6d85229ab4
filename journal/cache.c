/* ext4fs: the journal writer's transaction cache (see trans-int.h).
 *
 * Owns: every metadata block libext2fs or the write-back reads or
 * writes while the writer is open: the running transaction's blocks,
 * committed blocks not yet checkpointed, and clean copies (a bounded
 * read cache); the jtx_cache_hooks of the io_manager (libext2fs's metadata
 * reads and writes come here); the blocks freed in the running
 * transaction, held until it is durable.  All under the fs mutex.
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
  return jent_is_clean (e);
}

/* Unlink e, whose link is *pp, from its chain, count it out, free it. */
static void
unlink_entry (struct ext4fs_jtx *jt, struct jent **pp, struct jent *e)
{
  *pp = e->hnext;
  if (is_clean (e))
    jt->nclean--;
  jt->nent--;
  free (e->data);
  free (e->frozen);
  free (e->cfrozen);
  free (e);
}

static void
remove_entry (struct ext4fs_jtx *jt, struct jent *e)
{
  struct jent **pp;

  for (pp = &jt->buckets[hash (jt, e->blk)]; *pp; pp = &(*pp)->hnext) {
    if (*pp == e) {
      unlink_entry (jt, pp, e);
      return;
    }
  }
}

/* Drop clean entries when there are too many (they are only a read
 * cache).
 */
void
jtx_cache_trim (struct ext4fs_jtx *jt)
{
  size_t i;

  if (jt->nclean <= CLEAN_LIMIT)
    return;
  for (i = 0; i < jt->nbuckets; ++i) {
    struct jent **pp = &jt->buckets[i];
    while (*pp) {
      struct jent *e = *pp;
      if (is_clean (e))
        unlink_entry (jt, pp, e);
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
  if (e->committing) {
    /* Keep what the committing transaction logs: the checkpoint's,
     * once it is committed (commit_end_locked).
     */
    if (e->cfrozen == NULL) {
      e->cfrozen = malloc (jt->bs);
      if (e->cfrozen == NULL)
        return -1;
      memcpy (e->cfrozen, e->data, jt->bs);
    }
  }
  else if (e->in_log && e->frozen == NULL) {
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
 * The metadata jtx_cache_hooks: libext2fs's reads and writes (fs mutex held).
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
  jtx_cache_trim (jt);
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
    nbdkit_error ("%s: metadata write refused: %s", jtx_what (jt), jtx_stopped (jt));
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

const struct ext4fs_meta_ops jtx_cache_hooks = {
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
  r = jt->held.len > 0 || jt->cheld.len > 0 || jt->dheld.len > 0;
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
    if (e->in_log || e->committing) {
      /* Replay would write the old copy over whatever the block holds
       * next: revoke it.  Until the revoke commits, the block is in
       * use as of the last commit, with its logged contents: keep
       * them for a checkpoint that comes first (jtx_checkpoint_locked
       * writes them home).  A block of the committing transaction:
       * what it logs, and what the log held before, for a failure.
       */
      struct ghost g = { .blk = blk + i };
      uint8_t **from, **prev = NULL;

      if (e->committing) {
        from = e->cfrozen ? &e->cfrozen : &e->data;
        g.pending = true;
        if (e->in_log)
          prev = e->frozen ? &e->frozen : NULL;
        if (e->in_log && prev == NULL) {
          /* Cannot be: a logged block that changed has its copy. */
          jtx_abort_locked (jt, "a freed block's logged copy is missing");
          return;
        }
      }
      else
        from = e->frozen ? &e->frozen : &e->data;
      g.data = *from;
      g.prev = prev ? *prev : NULL;
      if (blk_vector_append (&jt->revokes, blk + i) == -1 ||
          ghost_vector_append (&jt->ghosts, g) == -1) {
        jtx_abort_locked (jt, "out of memory for a revoke record");
        return;
      }
      *from = NULL;
      if (prev)
        *prev = NULL;
    }
    if (e->committing) {
      size_t k;
      for (k = 0; k < jt->committing.len; ++k)
        if (jt->committing.ptr[k] == e) {
          jt->committing.ptr[k] = jt->committing.ptr[--jt->committing.len];
          break;
        }
      e->committing = false;
      if (!e->running && !e->in_log)
        jt->nclean++;           /* remove_entry counts it down */
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

/* The frees of the running transaction are durable (it committed), or
 * the ghosts are home (a checkpoint): forget them.
 */
void
jtx_ghosts_drop (struct ext4fs_jtx *jt)
{
  size_t i;

  for (i = 0; i < jt->ghosts.len; ++i) {
    free (jt->ghosts.ptr[i].data);
    free (jt->ghosts.ptr[i].prev);
  }
  jt->ghosts.len = 0;
}

/* The committing transaction is in the log, or not (it goes back into
 * the running one): the ghosts of its blocks freed meanwhile keep
 * what it logged, or what the log held before it (if anything).
 */
void
jtx_ghosts_settle (struct ext4fs_jtx *jt, bool committed)
{
  size_t i, n = 0;

  for (i = 0; i < jt->ghosts.len; ++i) {
    struct ghost g = jt->ghosts.ptr[i];
    if (g.pending) {
      g.pending = false;
      if (committed)
        free (g.prev);
      else {
        free (g.data);
        g.data = g.prev;
      }
      g.prev = NULL;
      if (g.data == NULL)
        continue;               /* nothing of it in the log */
    }
    jt->ghosts.ptr[n++] = g;
  }
  jt->ghosts.len = n;
}

bool
jtx_held_locked (struct ext4fs_jtx *jt, uint64_t blk)
{
  size_t i;

  for (i = 0; i < jt->held.len; ++i)
    if (blk >= jt->held.ptr[i].start &&
        blk - jt->held.ptr[i].start < jt->held.ptr[i].len)
      return true;
  for (i = 0; i < jt->cheld.len; ++i)
    if (blk >= jt->cheld.ptr[i].start &&
        blk - jt->cheld.ptr[i].start < jt->cheld.ptr[i].len)
      return true;
  for (i = 0; i < jt->dheld.len; ++i)
    if (blk >= jt->dheld.ptr[i].start &&
        blk - jt->dheld.ptr[i].start < jt->dheld.ptr[i].len)
      return true;
  return false;
}

void
jtx_for_held_locked (struct ext4fs_jtx *jt, uint64_t start, uint64_t end,
                     void (*fn) (void *opaque, uint64_t blk, uint64_t n),
                     void *opaque)
{
  size_t i;

  const hold_vector *v[3] = { &jt->held, &jt->cheld, &jt->dheld };
  size_t k;

  for (k = 0; k < 3; ++k)
    for (i = 0; i < v[k]->len; ++i) {
      uint64_t s = v[k]->ptr[i].start, e = s + v[k]->ptr[i].len;
      if (s < start)
        s = start;
      if (e > end)
        e = end;
      if (s < e)
        fn (opaque, s, e - s);
    }
}

