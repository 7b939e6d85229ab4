/* ext4fs: the cached block map of a file, as a container of runs.
 *
 * Runs are sorted by logical block, never overlap, and are kept in
 * chunks of at most RUNMAP_CHUNK runs, with an index of the chunks'
 * first logical blocks.  A lookup is two binary searches; a change
 * moves at most one chunk's runs (and, when a full chunk splits, the
 * index), so the cost of an allocating write does not grow with the
 * number of runs the file has (a flat array moved the whole tail of
 * the map at every insert).  Chunks start small and grow, so a map of
 * one run costs a few dozen bytes.
 *
 * No locks here: the caller holds the inode's lock (shared to read,
 * exclusive to change), as inode.h says.  No libext2fs calls.
 */
#ifndef EXT4FS_RUNMAP_H
#define EXT4FS_RUNMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* One mapped run of the file: logical blocks [lblk, lblk+len) live at
 * physical blocks [pblk, pblk+len).  Unwritten runs read as zeros.
 * Holes are the gaps between runs.
 */
struct ext4fs_run {
  uint64_t lblk;
  uint64_t pblk;
  uint32_t len;
  uint32_t unwritten;
};

#define RUNMAP_CHUNK 256

struct ext4fs_map_chunk {
  uint32_t n, cap;
  struct ext4fs_run runs[];
};

/* Logical blocks [a, b). */
struct runmap_span {
  uint64_t a, b;
};

struct ext4fs_map {
  size_t n;                     /* runs in all */
  /* Partial (extent files): the runs are known only inside the spans
   * of cov[] (sorted, disjoint, not touching); elsewhere the map knows
   * nothing, and the extent tree says.  Else the runs are the whole
   * map.
   */
  bool partial;
  size_t ncov, covcap;
  struct runmap_span *cov;
  size_t nchunks, cap;          /* chunks used; room in chunk[], first[] */
  struct ext4fs_map_chunk **chunk;  /* none empty */
  uint64_t *first;              /* first[c] = chunk[c]->runs[0].lblk */
};

/* A position: run i of chunk c.  The end is (nchunks, 0). */
struct runmap_pos {
  size_t c, i;
};

extern struct ext4fs_map *runmap_new (void);
extern void runmap_free (struct ext4fs_map *m);

static inline bool
runmap_valid (const struct ext4fs_map *m, struct runmap_pos p)
{
  return p.c < m->nchunks;
}

static inline struct ext4fs_run *
runmap_at (const struct ext4fs_map *m, struct runmap_pos p)
{
  return &m->chunk[p.c]->runs[p.i];
}

/* The position of the first run whose lblk > lblk (maybe the end). */
extern struct runmap_pos runmap_after (const struct ext4fs_map *m,
                                       uint64_t lblk);
/* The run before p: false if p is the first position. */
extern bool runmap_prev (const struct ext4fs_map *m, struct runmap_pos p,
                         struct runmap_pos *q);
extern struct runmap_pos runmap_next (const struct ext4fs_map *m,
                                      struct runmap_pos p);

/* Insert r before p (p may be the end); *at: where r is now.  The
 * caller keeps the order.  -1: out of memory (map unchanged).
 */
extern int runmap_insert (struct ext4fs_map *m, struct runmap_pos p,
                          const struct ext4fs_run *r, struct runmap_pos *at);

/* Insert the n runs r[0..n) (sorted, not overlapping, all after the
 * run before p and before the run at p) at p, as n runmap_insert
 * calls at successive positions would, but many runs go into new
 * chunks of their own (the chunk at p split there once), not one move
 * of the chunk's tail per run.  -1: out of memory (some may be in).
 */
extern int runmap_insert_many (struct ext4fs_map *m, struct runmap_pos p,
                               const struct ext4fs_run *r, size_t n);
/* Remove the run at p; returns the position of the run that followed
 * it (maybe the end).
 */
extern struct runmap_pos runmap_remove (struct ext4fs_map *m,
                                        struct runmap_pos p);

/* The last run, or NULL if the map is empty. */
extern struct ext4fs_run *runmap_last (const struct ext4fs_map *m);

extern bool runmap_equal (const struct ext4fs_map *a,
                          const struct ext4fs_map *b);

/* Coverage (partial maps; a map that is not partial covers
 * everything).  Is [a, b) covered?  If not, *gap is its first block
 * that is not, and *gap_end the end of that gap (the next span's
 * start, or UINT64_MAX).
 */
extern bool runmap_covered (const struct ext4fs_map *m, uint64_t a,
                            uint64_t b, uint64_t *gap, uint64_t *gap_end);
/* Add [a, b) to the coverage.  -1: out of memory (unchanged). */
extern int runmap_cover (struct ext4fs_map *m, uint64_t a, uint64_t b);
/* Keep only the runs and the coverage inside [a, b); no run may cross
 * a or b.  -1: out of memory (unchanged).
 */
extern int runmap_keep (struct ext4fs_map *m, uint64_t a, uint64_t b);
/* Forget [a, b) (partial maps): its runs go (a run crossing a or b
 * keeps its part outside), and so does its coverage.  -1: out of
 * memory, with m half changed (the caller drops it).
 */
extern int runmap_uncover (struct ext4fs_map *m, uint64_t a, uint64_t b);

#endif /* EXT4FS_RUNMAP_H */
