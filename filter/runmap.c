/* ext4fs: the cached block map as chunks of runs (runmap.h).
 *
 * Owns: the map's memory and its order.  What a run means, and when a
 * map may change, is bmap.c's and inode.c's.
 */

#include <config.h>

#include <assert.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "runmap.h"

struct ext4fs_map *
runmap_new (void)
{
  return calloc (1, sizeof (struct ext4fs_map));
}

/* Free what m holds, not m. */
static void
free_contents (struct ext4fs_map *m)
{
  size_t c;

  for (c = 0; c < m->nchunks; ++c)
    free (m->chunk[c]);
  free (m->chunk);
  free (m->first);
  free (m->cov);
}

void
runmap_free (struct ext4fs_map *m)
{
  if (m == NULL)
    return;
  free_contents (m);
  free (m);
}

struct runmap_pos
runmap_after (const struct ext4fs_map *m, uint64_t lblk)
{
  size_t lo = 0, hi = m->nchunks, c;
  const struct ext4fs_map_chunk *k;

  /* The last chunk whose first run starts at or before lblk. */
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (m->first[mid] <= lblk)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo == 0)
    return (struct runmap_pos) { 0, 0 };
  c = lo - 1;
  k = m->chunk[c];
  lo = 1;                       /* runs[0].lblk <= lblk */
  hi = k->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (k->runs[mid].lblk <= lblk)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo == k->n)
    return (struct runmap_pos) { c + 1, 0 };
  return (struct runmap_pos) { c, lo };
}

bool
runmap_prev (const struct ext4fs_map *m, struct runmap_pos p,
             struct runmap_pos *q)
{
  if (p.i > 0) {
    *q = (struct runmap_pos) { p.c, p.i - 1 };
    return true;
  }
  if (p.c == 0)
    return false;
  *q = (struct runmap_pos) { p.c - 1, m->chunk[p.c - 1]->n - 1 };
  return true;
}

struct runmap_pos
runmap_next (const struct ext4fs_map *m, struct runmap_pos p)
{
  if (p.i + 1 < m->chunk[p.c]->n)
    return (struct runmap_pos) { p.c, p.i + 1 };
  return (struct runmap_pos) { p.c + 1, 0 };
}

struct ext4fs_run *
runmap_last (const struct ext4fs_map *m)
{
  const struct ext4fs_map_chunk *k;

  if (m->nchunks == 0)
    return NULL;
  k = m->chunk[m->nchunks - 1];
  return (struct ext4fs_run *) &k->runs[k->n - 1];
}

/* Room for one more chunk in the index. */
static int
index_reserve (struct ext4fs_map *m)
{
  struct ext4fs_map_chunk **nc;
  uint64_t *nf;
  size_t ncap;

  if (m->nchunks < m->cap)
    return 0;
  ncap = m->cap ? m->cap * 2 : 1;
  nc = realloc (m->chunk, ncap * sizeof *nc);
  if (nc == NULL)
    return -1;
  m->chunk = nc;
  nf = realloc (m->first, ncap * sizeof *nf);
  if (nf == NULL)
    return -1;
  m->first = nf;
  m->cap = ncap;
  return 0;
}

static struct ext4fs_map_chunk *
chunk_new (uint32_t cap)
{
  struct ext4fs_map_chunk *k;

  k = malloc (sizeof *k + cap * sizeof k->runs[0]);
  if (k) {
    k->n = 0;
    k->cap = cap;
  }
  return k;
}

/* Put chunk k at index c. */
static void
index_put (struct ext4fs_map *m, size_t c, struct ext4fs_map_chunk *k)
{
  memmove (&m->chunk[c + 1], &m->chunk[c],
           (m->nchunks - c) * sizeof m->chunk[0]);
  memmove (&m->first[c + 1], &m->first[c],
           (m->nchunks - c) * sizeof m->first[0]);
  m->chunk[c] = k;
  m->first[c] = k->runs[0].lblk;
  m->nchunks++;
}

int
runmap_insert (struct ext4fs_map *m, struct runmap_pos p,
               const struct ext4fs_run *r, struct runmap_pos *at)
{
  struct ext4fs_map_chunk *k;

  if (m->nchunks == 0) {
    if (index_reserve (m) == -1 || (k = chunk_new (4)) == NULL)
      return -1;
    k->runs[k->n++] = *r;
    index_put (m, 0, k);
    m->n++;
    *at = (struct runmap_pos) { 0, 0 };
    return 0;
  }
  /* At the end, or at the start of a chunk: the end of the chunk
   * before it if that has room (its first block stays the same).
   */
  if (p.c == m->nchunks ||
      (p.i == 0 && p.c > 0 && m->chunk[p.c - 1]->n < RUNMAP_CHUNK)) {
    p.c--;
    p.i = m->chunk[p.c]->n;
  }
  k = m->chunk[p.c];
  if (k->n == RUNMAP_CHUNK && p.c + 1 == m->nchunks && p.i == k->n) {
    /* Appending to a full last chunk (the builder, a file growing at
     * its end): a new chunk, not a split, so that a map built from the
     * tree is in full chunks.
     */
    if (index_reserve (m) == -1 || (k = chunk_new (16)) == NULL)
      return -1;
    k->runs[k->n++] = *r;
    index_put (m, m->nchunks, k);
    m->n++;
    *at = (struct runmap_pos) { m->nchunks - 1, 0 };
    return 0;
  }
  if (k->n == k->cap && k->cap < RUNMAP_CHUNK) {
    uint32_t ncap = k->cap * 2 > RUNMAP_CHUNK ? RUNMAP_CHUNK : k->cap * 2;
    k = realloc (k, sizeof *k + ncap * sizeof k->runs[0]);
    if (k == NULL)
      return -1;
    k->cap = ncap;
    m->chunk[p.c] = k;
  }
  if (k->n == RUNMAP_CHUNK) {
    /* Full: the upper half moves to a new chunk after it. */
    uint32_t half = RUNMAP_CHUNK / 2;
    struct ext4fs_map_chunk *nk;

    if (index_reserve (m) == -1 || (nk = chunk_new (RUNMAP_CHUNK)) == NULL)
      return -1;
    memcpy (nk->runs, &k->runs[half], (k->n - half) * sizeof k->runs[0]);
    nk->n = k->n - half;
    k->n = half;
    index_put (m, p.c + 1, nk);
    if (p.i > half) {
      p.c++;
      p.i -= half;
      k = nk;
    }
  }
  memmove (&k->runs[p.i + 1], &k->runs[p.i],
           (k->n - p.i) * sizeof k->runs[0]);
  k->runs[p.i] = *r;
  k->n++;
  if (p.i == 0)
    m->first[p.c] = r->lblk;
  m->n++;
  *at = p;
  return 0;
}

int
runmap_insert_many (struct ext4fs_map *m, struct runmap_pos p,
                    const struct ext4fs_run *r, size_t n)
{
  size_t c, done = 0;

  if (n < RUNMAP_CHUNK / 4) {
    /* A few: one at a time (no chunk of a few runs of its own). */
    struct runmap_pos at;

    for (done = 0; done < n; ++done) {
      if (runmap_insert (m, p, &r[done], &at) == -1)
        return -1;
      p = (struct runmap_pos) { at.c, at.i + 1 };
    }
    return 0;
  }
  if (p.c < m->nchunks && p.i > 0) {
    struct ext4fs_map_chunk *k = m->chunk[p.c];

    if (p.i < k->n) {
      /* Inside a chunk: its runs from p on move to a new chunk. */
      struct ext4fs_map_chunk *nk;

      if (index_reserve (m) == -1 || (nk = chunk_new (k->n - p.i)) == NULL)
        return -1;
      memcpy (nk->runs, &k->runs[p.i], (k->n - p.i) * sizeof k->runs[0]);
      nk->n = k->n - p.i;
      k->n = p.i;
      index_put (m, p.c + 1, nk);
      /* The head keeps only the room it uses (inserts grow it again):
       * else each batch could strand most of a chunk.
       */
      k = realloc (k, sizeof *k + k->n * sizeof k->runs[0]);
      if (k != NULL) {
        k->cap = k->n;
        m->chunk[p.c] = k;
      }
    }
    c = p.c + 1;
  }
  else
    c = p.c;                    /* before chunk c (or at the end) */
  while (done < n) {
    size_t cnt = n - done > RUNMAP_CHUNK ? RUNMAP_CHUNK : n - done;
    struct ext4fs_map_chunk *k;

    if (index_reserve (m) == -1 || (k = chunk_new (cnt)) == NULL)
      return -1;
    memcpy (k->runs, &r[done], cnt * sizeof r[0]);
    k->n = cnt;
    index_put (m, c++, k);
    m->n += cnt;
    done += cnt;
  }
  return 0;
}

struct runmap_pos
runmap_remove (struct ext4fs_map *m, struct runmap_pos p)
{
  struct ext4fs_map_chunk *k = m->chunk[p.c];

  memmove (&k->runs[p.i], &k->runs[p.i + 1],
           (k->n - p.i - 1) * sizeof k->runs[0]);
  k->n--;
  m->n--;
  if (k->n == 0) {
    free (k);
    memmove (&m->chunk[p.c], &m->chunk[p.c + 1],
             (m->nchunks - p.c - 1) * sizeof m->chunk[0]);
    memmove (&m->first[p.c], &m->first[p.c + 1],
             (m->nchunks - p.c - 1) * sizeof m->first[0]);
    m->nchunks--;
    return (struct runmap_pos) { p.c, 0 };
  }
  if (p.i == 0)
    m->first[p.c] = k->runs[0].lblk;
  if (p.i == k->n)
    return (struct runmap_pos) { p.c + 1, 0 };
  return p;
}

bool
runmap_equal (const struct ext4fs_map *a, const struct ext4fs_map *b)
{
  struct runmap_pos p = { 0, 0 }, q = { 0, 0 };

  if (a->n != b->n)
    return false;
  while (runmap_valid (a, p) && runmap_valid (b, q)) {
    const struct ext4fs_run *x = runmap_at (a, p), *y = runmap_at (b, q);
    if (x->lblk != y->lblk || x->pblk != y->pblk || x->len != y->len ||
        x->unwritten != y->unwritten)
      return false;
    p = runmap_next (a, p);
    q = runmap_next (b, q);
  }
  return true;
}

/* The index of the last span starting at or before x, or -1. */
static ptrdiff_t
span_at (const struct ext4fs_map *m, uint64_t x)
{
  size_t lo = 0, hi = m->ncov;

  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (m->cov[mid].a <= x)
      lo = mid + 1;
    else
      hi = mid;
  }
  return (ptrdiff_t) lo - 1;
}

bool
runmap_covered (const struct ext4fs_map *m, uint64_t a, uint64_t b,
                uint64_t *gap, uint64_t *gap_end)
{
  ptrdiff_t s;

  if (!m->partial || a >= b)
    return true;
  s = span_at (m, a);
  if (s >= 0 && m->cov[s].b > a) {
    /* Spans do not touch: what follows this one is a gap. */
    if (m->cov[s].b >= b)
      return true;
    *gap = m->cov[s].b;
    s++;
  }
  else {
    *gap = a;
    s++;
  }
  *gap_end = (size_t) s < m->ncov ? m->cov[s].a : UINT64_MAX;
  return false;
}

int
runmap_cover (struct ext4fs_map *m, uint64_t a, uint64_t b)
{
  size_t i, j;

  if (a >= b)
    return 0;
  /* Spans i .. j-1 overlap or touch [a, b): they become one. */
  for (i = 0; i < m->ncov && m->cov[i].b < a; ++i)
    ;
  for (j = i; j < m->ncov && m->cov[j].a <= b; ++j)
    ;
  if (i == j) {
    if (m->ncov == m->covcap) {
      size_t ncap = m->covcap ? m->covcap * 2 : 4;
      struct runmap_span *nc = realloc (m->cov, ncap * sizeof *nc);
      if (nc == NULL)
        return -1;
      m->cov = nc;
      m->covcap = ncap;
    }
    memmove (&m->cov[i + 1], &m->cov[i], (m->ncov - i) * sizeof m->cov[0]);
    m->cov[i] = (struct runmap_span) { a, b };
    m->ncov++;
    return 0;
  }
  if (m->cov[i].a < a)
    a = m->cov[i].a;
  if (m->cov[j - 1].b > b)
    b = m->cov[j - 1].b;
  m->cov[i] = (struct runmap_span) { a, b };
  memmove (&m->cov[i + 1], &m->cov[j], (m->ncov - j) * sizeof m->cov[0]);
  m->ncov -= j - i - 1;
  return 0;
}

int
runmap_keep (struct ext4fs_map *m, uint64_t a, uint64_t b)
{
  struct ext4fs_map *k = runmap_new ();
  struct runmap_pos p, at;
  size_t i;

  if (k == NULL)
    return -1;
  k->partial = m->partial;
  /* The runs inside [a, b), in order, into a new map. */
  for (p = runmap_after (m, a), runmap_prev (m, p, &p);
       runmap_valid (m, p) && runmap_at (m, p)->lblk < b;
       p = runmap_next (m, p)) {
    const struct ext4fs_run *r = runmap_at (m, p);
    struct runmap_pos end = { k->nchunks, 0 };

    if (r->lblk < a)
      continue;
    if (runmap_insert (k, end, r, &at) == -1)
      goto nomem;
  }
  for (i = 0; i < m->ncov; ++i) {
    uint64_t x = m->cov[i].a > a ? m->cov[i].a : a;
    uint64_t y = m->cov[i].b < b ? m->cov[i].b : b;

    if (x < y && runmap_cover (k, x, y) == -1)
      goto nomem;
  }
  /* k's contents into m. */
  free_contents (m);
  *m = *k;
  free (k);
  return 0;

 nomem:
  runmap_free (k);
  return -1;
}

int
runmap_uncover (struct ext4fs_map *m, uint64_t a, uint64_t b)
{
  struct runmap_pos p, q, at;
  size_t i, j, n;

  assert (m->partial);
  if (a >= b)
    return 0;
  /* The runs: each one overlapping [a, b) is removed, and what it has
   * outside [a, b) put back.
   */
  p = runmap_after (m, a);
  if (runmap_prev (m, p, &q) &&
      runmap_at (m, q)->lblk + runmap_at (m, q)->len > a)
    p = q;
  while (runmap_valid (m, p) && runmap_at (m, p)->lblk < b) {
    struct ext4fs_run r = *runmap_at (m, p);

    p = runmap_remove (m, p);
    if (r.lblk < a) {
      struct ext4fs_run left = r;

      left.len = a - r.lblk;
      if (runmap_insert (m, p, &left, &at) == -1)
        return -1;
      p = runmap_next (m, at);
    }
    if (r.lblk + r.len > b) {
      struct ext4fs_run right = r;
      uint64_t off = b - r.lblk;

      right.lblk = b;
      right.pblk = r.pblk + off;
      right.len = r.len - off;
      if (runmap_insert (m, p, &right, &at) == -1)
        return -1;
      break;                    /* nothing after it starts below b */
    }
  }
  /* The coverage: spans i .. j-1 overlap [a, b); what they have
   * outside it stays (at most two pieces).
   */
  for (i = 0; i < m->ncov && m->cov[i].b <= a; ++i)
    ;
  for (j = i; j < m->ncov && m->cov[j].a < b; ++j)
    ;
  if (i == j)
    return 0;
  {
    struct runmap_span left = m->cov[i], right = m->cov[j - 1];
    struct runmap_span keep[2];

    n = 0;
    if (left.a < a)
      keep[n++] = (struct runmap_span) { .a = left.a, .b = a };
    if (right.b > b)
      keep[n++] = (struct runmap_span) { .a = b, .b = right.b };
    if (m->ncov - (j - i) + n > m->covcap) {
      struct runmap_span *nc = realloc (m->cov, (m->covcap + 1) * sizeof *nc);
      if (nc == NULL)
        return -1;
      m->cov = nc;
      m->covcap++;
    }
    memmove (&m->cov[i + n], &m->cov[j], (m->ncov - j) * sizeof m->cov[0]);
    memcpy (&m->cov[i], keep, n * sizeof keep[0]);
    m->ncov = m->ncov - (j - i) + n;
  }
  return 0;
}
