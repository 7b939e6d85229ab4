/* Unit test of the cached map's container (filter/runmap.c), outside
 * nbdkit: random inserts and removes at their sorted places, against
 * a flat reference array, with every invariant checked as it goes:
 * order, the count, no empty chunk, chunk sizes within bounds, the
 * index of first blocks, lookups of present and absent blocks, and
 * runmap_equal against a map built by appending.  Enough runs that
 * chunks fill, split, empty and disappear.  Then the coverage of
 * partial maps against a bitmap (spans, gaps) and runmap_keep; and
 * batches inserted at once (runmap_insert_many).
 *
 *   test-runmap [SEED [OPS]]
 */

#include <config.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runmap.h"

static uint64_t *ref;           /* sorted keys (lblk of each run) */
static size_t nref;

static void
die (const char *what, size_t op)
{
  fprintf (stderr, "test-runmap: op %zu: %s\n", op, what);
  exit (1);
}

static size_t
ref_find (uint64_t k)           /* index of the first key >= k */
{
  size_t lo = 0, hi = nref;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (ref[mid] < k)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

static void
check (const struct ext4fs_map *m, size_t op)
{
  struct runmap_pos p = { 0, 0 };
  size_t c, i = 0;

  if (m->n != nref)
    die ("count differs", op);
  for (c = 0; c < m->nchunks; ++c) {
    const struct ext4fs_map_chunk *k = m->chunk[c];
    if (k->n == 0 || k->n > k->cap || k->cap > RUNMAP_CHUNK)
      die ("chunk size out of bounds", op);
    if (m->first[c] != k->runs[0].lblk)
      die ("index of first blocks is stale", op);
  }
  for (; runmap_valid (m, p); p = runmap_next (m, p), ++i) {
    const struct ext4fs_run *r = runmap_at (m, p);
    if (i >= nref || r->lblk != ref[i] || r->pblk != ref[i] * 7 ||
        r->len != 1)
      die ("run differs from the reference", op);
  }
  if (i != nref)
    die ("walk ended early", op);
}

int
main (int argc, char *argv[])
{
  unsigned seed = argc > 1 ? (unsigned) atoi (argv[1]) : 1;
  size_t ops = argc > 2 ? (size_t) atol (argv[2]) : 200000, op;
  struct ext4fs_map *m = runmap_new (), *b;
  size_t empties = 0;
  const uint64_t space = 20000;   /* keys 0..2*space-1, even ones only */

  srand (seed);
  ref = calloc (2 * space, sizeof *ref);   /* even keys, and odd ones */
  if (m == NULL || ref == NULL)
    die ("out of memory", 0);
  for (op = 0; op < ops; ++op) {
    /* Grow (70% inserts), drain to nothing (removes of present
     * keys), grow, drain, grow: chunks fill, split, empty and go.
     */
    size_t phase = (op / (ops / 5 + 1)) % 2;
    int insert = phase == 0 ? (size_t) rand () % 100 < 70 : nref == 0;
    uint64_t key = ((uint64_t) rand () % space) * 2;

    if (phase == 1 && nref > 0)
      key = ref[(size_t) rand () % nref];
    size_t j = ref_find (key);
    struct runmap_pos p = runmap_after (m, key), q, at;
    bool present = j < nref && ref[j] == key;
    bool prev = runmap_prev (m, p, &q);

    /* Lookup: the run before runmap_after (key) is key if present. */
    if (present != (prev && runmap_at (m, q)->lblk == key))
      die ("lookup disagrees with the reference", op);
    if (runmap_valid (m, p) && runmap_at (m, p)->lblk <= key)
      die ("runmap_after returned a run not after the key", op);
    if (insert && !present) {
      struct ext4fs_run r = { .lblk = key, .pblk = key * 7, .len = 1 };
      if (runmap_insert (m, p, &r, &at) == -1)
        die ("out of memory", op);
      if (runmap_at (m, at)->lblk != key)
        die ("insert: *at is not the new run", op);
      memmove (&ref[j + 1], &ref[j], (nref - j) * sizeof *ref);
      ref[j] = key;
      nref++;
      /* Sometimes more right after it, each at the position after the
       * last (at.i + 1, maybe a chunk's end), as bmap_map_set does.
       */
      if (rand () % 4 == 0) {
        for (int c = 0; c < 4; ++c) {
          uint64_t k2 = ref[j] + 1;       /* odd: never present */
          struct ext4fs_run r2 = { .lblk = k2, .pblk = k2 * 7, .len = 1 };
          if (j + 1 < nref && ref[j + 1] <= k2)
            break;
          if (runmap_insert (m, (struct runmap_pos) { at.c, at.i + 1 }, &r2,
                             &at) == -1)
            die ("out of memory", op);
          if (runmap_at (m, at)->lblk != k2)
            die ("chained insert: *at is not the new run", op);
          memmove (&ref[j + 2], &ref[j + 1], (nref - j - 1) * sizeof *ref);
          ref[++j] = k2;
          nref++;
        }
      }
    }
    else if (!insert && present) {
      struct runmap_pos nx = runmap_remove (m, q);
      if (j + 1 < nref ? !runmap_valid (m, nx) ||
                         runmap_at (m, nx)->lblk != ref[j + 1]
                       : runmap_valid (m, nx))
        die ("remove: not followed by the next run", op);
      memmove (&ref[j], &ref[j + 1], (nref - j - 1) * sizeof *ref);
      nref--;
      if (nref == 0) {
        empties++;
        if (m->nchunks != 0)
          die ("an empty map keeps chunks", op);
      }
    }
    if (op % 997 == 0 || nref < 600)
      check (m, op);
  }
  check (m, ops);
  if (ops >= 50000 && empties == 0)
    die ("the map never drained to empty", ops);

  /* The same runs appended in order: an equal map; one run off: not. */
  b = runmap_new ();
  for (size_t i = 0; i < nref; ++i) {
    struct ext4fs_run r = { .lblk = ref[i], .pblk = ref[i] * 7, .len = 1 };
    struct runmap_pos end = { b->nchunks, 0 }, at;
    if (runmap_insert (b, end, &r, &at) == -1)
      die ("out of memory", ops);
  }
  if (!runmap_equal (m, b))
    die ("a map built by appending differs", ops);
  /* ... in full chunks (a new chunk, not a split, at the end). */
  if (b->nchunks != (nref + RUNMAP_CHUNK - 1) / RUNMAP_CHUNK)
    die ("a map built by appending is not in full chunks", ops);
  if (nref > 0) {
    runmap_last (b)->pblk++;
    if (runmap_equal (m, b))
      die ("runmap_equal missed a difference", ops);
  }
  /* Coverage: random spans added, against a bitmap; every query of
   * runmap_covered answered as the bitmap says, the spans sorted,
   * disjoint and never touching.
   */
  {
    enum { W = 2000 };
    static bool bit[W];
    struct ext4fs_map *c = runmap_new ();

    c->partial = true;
    for (size_t k = 0; k < 3000; ++k) {
      uint64_t a = (uint64_t) rand () % W, n = (uint64_t) rand () % 20;
      uint64_t x = (uint64_t) rand () % W, y = x + (uint64_t) rand () % 50;
      uint64_t gap = 0, gap_end = 0, g;
      bool want = true;

      if (k % 2 == 0) {
        if (a + n > W)
          n = W - a;
        if (runmap_cover (c, a, a + n) == -1)
          die ("out of memory", k);
        for (uint64_t i = a; i < a + n; ++i)
          bit[i] = true;
      }
      for (size_t i = 0; i < c->ncov; ++i)
        if (c->cov[i].a >= c->cov[i].b ||
            (i > 0 && c->cov[i - 1].b >= c->cov[i].a))
          die ("spans not sorted, disjoint and apart", k);
      if (y > W)
        y = W;
      for (g = x; g < y && bit[g]; ++g)
        ;
      want = g >= y;
      if (runmap_covered (c, x, y, &gap, &gap_end) != want)
        die ("runmap_covered disagrees with the bitmap", k);
      if (!want) {
        uint64_t e = g;
        while (e < W && !bit[e])
          ++e;
        if (gap != g || (e < W ? gap_end != e : gap_end != UINT64_MAX))
          die ("the gap runmap_covered gives is wrong", k);
      }
    }
    runmap_free (c);
  }
  /* runmap_keep: only the runs and coverage inside [lo, hi). */
  if (nref > 10) {
    /* (lo just after a run: the run before it must go.) */
    uint64_t lo = ref[nref / 3] + 1, hi = ref[2 * nref / 3] + 1;
    size_t want = 0;

    b->partial = true;
    if (runmap_cover (b, 0, UINT64_MAX) == -1 || runmap_keep (b, lo, hi) == -1)
      die ("out of memory", ops);
    for (size_t i = 0; i < nref; ++i)
      want += ref[i] >= lo && ref[i] < hi;
    if (b->n != want || b->ncov != 1 || b->cov[0].a != lo ||
        b->cov[0].b != hi || runmap_at (b, (struct runmap_pos) {0, 0})->lblk != ref[nref / 3 + 1] ||
        runmap_last (b)->lblk != hi - 1)
      die ("runmap_keep kept the wrong runs or coverage", ops);
    if (runmap_keep (b, 0, 0) == -1 || b->n != 0 || b->nchunks != 0 ||
        b->ncov != 0)
      die ("runmap_keep of nothing left something", ops);
  }
  /* runmap_uncover: random runs (lengths 1-40) and coverage, then
   * random ranges forgotten, against a per-block model (the physical
   * block, or none; covered or not).
   */
  {
    enum { W = 3000 };
    static int64_t phys[W];
    static bool cov[W];
    struct ext4fs_map *u = runmap_new ();
    uint64_t x = 0;

    u->partial = true;
    for (size_t i = 0; i < W; ++i)
      phys[i] = -1;
    while (x < W) {
      uint64_t len = 1 + (uint64_t) rand () % 40, gap = (uint64_t) rand () % 5;
      struct ext4fs_run r = { .lblk = x, .pblk = 100000 + (uint64_t) rand () % 100000,
                              .len = len, .unwritten = rand () % 3 == 0 };
      struct runmap_pos end = { u->nchunks, 0 }, at;

      if (x + len > W)
        break;
      if (runmap_insert (u, end, &r, &at) == -1)
        die ("out of memory", 0);
      for (uint64_t k = 0; k < len; ++k)
        phys[x + k] = (int64_t) (r.pblk + k);
      x += len + gap;
    }
    if (runmap_cover (u, 0, W) == -1)
      die ("out of memory", 0);
    for (size_t i = 0; i < W; ++i)
      cov[i] = true;
    for (size_t k = 0; k < 400; ++k) {
      uint64_t ua = (uint64_t) rand () % W, ub = ua + (uint64_t) rand () % 60;
      struct runmap_pos p;
      uint64_t prev_end = 0;
      size_t n = 0;
      static int64_t got[W];

      if (ub > W)
        ub = W;
      if (k % 50 == 49) {
        /* Now and then some coverage back, as a leaf load gives. */
        if (runmap_cover (u, ua, ub) == -1)
          die ("out of memory", k);
        for (uint64_t i = ua; i < ub; ++i)
          cov[i] = true;
        continue;
      }
      if (runmap_uncover (u, ua, ub) == -1)
        die ("out of memory", k);
      for (uint64_t i = ua; i < ub; ++i) {
        phys[i] = -1;
        cov[i] = false;
      }
      for (size_t i = 0; i < W; ++i)
        got[i] = -1;
      for (p = runmap_after (u, 0), runmap_prev (u, p, &p);
           runmap_valid (u, p); p = runmap_next (u, p)) {
        const struct ext4fs_run *r = runmap_at (u, p);

        if (r->len == 0 || r->lblk < prev_end || r->lblk + r->len > W)
          die ("runmap_uncover left runs empty, out of order or out of range", k);
        for (uint64_t i = 0; i < r->len; ++i)
          got[r->lblk + i] = (int64_t) (r->pblk + i);
        prev_end = r->lblk + r->len;
        n++;
      }
      if (n != u->n)
        die ("runmap_uncover: the run count is wrong", k);
      for (size_t i = 0; i < W; ++i)
        if (got[i] != phys[i])
          die ("runmap_uncover: a block maps wrong", k);
      for (size_t i = 0; i < u->ncov; ++i)
        if (u->cov[i].a >= u->cov[i].b ||
            (i > 0 && u->cov[i - 1].b >= u->cov[i].a))
          die ("runmap_uncover: spans not sorted, disjoint and apart", k);
      for (size_t i = 0; i < W; ++i) {
        uint64_t g, ge;
        if (runmap_covered (u, i, i + 1, &g, &ge) != cov[i])
          die ("runmap_uncover: coverage disagrees with the model", k);
      }
    }
    runmap_free (u);
  }
  printf ("test-runmap: seed %u, %zu operations, emptied %zu times, %zu "
          "runs left in %zu chunks\n", seed, ops, empties, m->n, m->nchunks);

  /* runmap_insert_many: batches of 1 to 99 consecutive keys into the
   * gaps of a map of keys 100 apart, in full chunks (some gaps filled
   * before, partly: the batches land at chunk starts, ends and
   * middles), and up to 700 past the last run, against the reference,
   * with every invariant checked; and a single insert before each
   * batch, so that chunks of a batch fill and split too.
   */
  {
    struct ext4fs_map *bm = runmap_new ();
    struct ext4fs_run *batch = malloc (1000 * sizeof *batch);
    const size_t ngaps = 300, gap = 100;  /* keys below 2 * space */

    if (bm == NULL || batch == NULL)
      die ("out of memory", 0);
    nref = 0;
    for (size_t g = 0; g < ngaps; ++g) {
      struct ext4fs_run r = { .lblk = g * gap, .pblk = g * gap * 7, .len = 1 };
      struct runmap_pos end = { bm->nchunks, 0 }, at;
      if (runmap_insert (bm, end, &r, &at) == -1)
        die ("out of memory", 0);
      ref[nref++] = r.lblk;
    }
    for (size_t it = 0; it < 400; ++it) {
      uint64_t g = (uint64_t) rand () % (ngaps + 1);
      uint64_t start = g * gap + 1 + (uint64_t) rand () % 20;
      size_t n = 1 + (size_t) rand () % (g == ngaps ? 700 : gap),
        j = ref_find (start), i;

      /* Only where no key is yet: up to the next key. */
      if (j < nref && ref[j] < start + n)
        n = ref[j] - start;
      if (n == 0 || start + n > 2 * space)
        continue;
      for (i = 0; i < n; ++i)
        batch[i] = (struct ext4fs_run) {
          .lblk = start + i, .pblk = (start + i) * 7, .len = 1 };
      if (runmap_insert_many (bm, runmap_after (bm, start), batch, n) == -1)
        die ("out of memory", it);
      memmove (&ref[j + n], &ref[j], (nref - j) * sizeof *ref);
      for (i = 0; i < n; ++i)
        ref[j + i] = start + i;
      nref += n;
      check (bm, it);
      /* A single insert just before the batch, if there is room. */
      if (start > 0 && (j == 0 || ref[j - 1] < start - 1)) {
        struct ext4fs_run r = { .lblk = start - 1, .pblk = (start - 1) * 7,
                                .len = 1 };
        struct runmap_pos at;
        if (runmap_insert (bm, runmap_after (bm, start - 1), &r, &at) == -1)
          die ("out of memory", it);
        memmove (&ref[j + 1], &ref[j], (nref - j) * sizeof *ref);
        ref[j] = start - 1;
        nref++;
        check (bm, it);
      }
    }
    /* The chunks keep little more room than they use (a split's head
     * is shrunk to its runs: without that, here, 1.37-1.51 times the
     * runs; with it 1.13-1.23).
     */
    {
      size_t room = 0;
      for (size_t c = 0; c < bm->nchunks; ++c)
        room += bm->chunk[c]->cap;
      if (room * 10 > bm->n * 13)
        die ("batches: the chunks keep room for far more runs than they hold",
             0);
    }
    printf ("test-runmap: batches: %zu runs in %zu chunks\n", bm->n,
            bm->nchunks);
    runmap_free (bm);
    free (batch);
  }
  runmap_free (b);
  runmap_free (m);
  free (ref);
  return 0;
}
