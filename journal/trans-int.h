/* ext4fs: the journal writer's private state, shared by its files:
 * trans.c (opening and closing, handles, syncs, the commit timer),
 * cache.c (the transaction cache and the hooks libext2fs's metadata
 * I/O goes through, the blocks held after freeing) and commit.c
 * (writing the log, commits, checkpoints, the write-back without a
 * log).  Locks: see trans.c; everything here is protected by the fs
 * mutex unless marked.
 */
#ifndef EXT4FS_TRANS_INT_H
#define EXT4FS_TRANS_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/vector.h"
#include "trans.h"

#define COMMIT_INTERVAL 5               /* seconds, the kernel's default */
#define CLEAN_LIMIT 8192                /* clean cached blocks kept */
/* A commit with at least this much file data written since the last
 * flush flushes it first, outside the locks (jtx_sync), at most
 * PREFLUSH_ROUNDS times (the default of jtx_set_flush_ahead).
 */
#define PREFLUSH_BYTES (8u << 20)
#define PREFLUSH_ROUNDS 2
#define NOLOG_RUN_BYTES (32u << 20)     /* no journal: write back this much */

struct jent {
  uint64_t blk;
  uint8_t *data;                /* the newest contents */
  uint8_t *frozen;              /* the last committed contents, if data has
                                   changed since and they are in the log */
  uint8_t *cfrozen;             /* the contents being logged by the
                                   committing transaction, if data has
                                   changed since */
  bool running;                 /* changed in the running transaction */
  bool committing;              /* in the committing transaction */
  bool in_log;                  /* committed into the live log: home is stale
                                   until the next checkpoint */
  bool fresh;                   /* no journal: first written whole by
                                   libext2fs in the running transaction (a
                                   new tree or indirect block) */
  struct jent *hnext;
};

/* Clean: home is current (a read cache only). */
static inline bool
jent_is_clean (const struct jent *e)
{
  return !e->running && !e->in_log && !e->committing;
}

struct hold { uint64_t start, len; };

/* A block freed in the running transaction while a copy of it is in
 * the live log: its committed contents.  The block is still in use as
 * of the last commit, so a checkpoint before the free commits must
 * still write them home (the log that held them is emptied then); the
 * commit of the free (with its revoke) drops them.
 */
struct ghost {
  uint64_t blk;
  uint8_t *data;
  /* Freed while in the committing transaction: data is what it logs,
   * prev what the log held before (NULL: nothing), for a commit that
   * fails (jtx_ghosts_settle).
   */
  bool pending;
  uint8_t *prev;
};

DEFINE_VECTOR_TYPE (jent_vector, struct jent *);
DEFINE_VECTOR_TYPE (blk_vector, uint64_t);
DEFINE_VECTOR_TYPE (hold_vector, struct hold);
DEFINE_VECTOR_TYPE (ghost_vector, struct ghost);

/* A commit between its steps (commit.c). */
struct commit {
  size_t need;                  /* log blocks, with the commit block */
  uint32_t start;               /* first log block */
  uint32_t cb;                  /* the commit block's */
  uint32_t tid;
  bool was_empty;
  bool fatal;                   /* a failure that aborts the journal */
};

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
  pthread_mutex_t commit_lock;  /* one commit or checkpoint at a time;
                                   taken before the handle lock */
  pthread_rwlock_t handle_lock;
  bool async_commit;            /* step 2 of a commit outside the locks */
  bool chain_commit;            /* a commit block shares the next log's
                                   flush (commit.c, jtx_commit_step) */

  /* Protected by *fs_lock: */
  struct jent **buckets;
  size_t nbuckets, nent, nclean;
  jent_vector running;           /* the running transaction's blocks */
  blk_vector revokes;           /* its revoke records */
  hold_vector held;             /* blocks freed in it, reserved */
  ghost_vector ghosts;          /* of those, the ones in the live log */
  /* The committing transaction, being written (commit.c), under the
   * commit lock; changed under the fs mutex only.
   */
  jent_vector committing;
  blk_vector crevokes;
  hold_vector cheld;
  ghost_vector cghosts;
  uint32_t ctid;
  /* Freed in a transaction whose commit block is written but not yet
   * flushed (jtx_commit_step): reserved until it is durable.
   */
  hold_vector dheld;
  uint32_t tid;                 /* the running transaction's; changed
                                   under state_lock too */
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
  uint64_t ckpt_blocks, ckpt_ns;   /* written home, time taken (stats) */
  uint64_t step_wait_ns, step_hold_ns; /* commit steps: handle lock (stats) */
  uint64_t npreflush;           /* atomic: flushes before a commit */
  uint64_t nasync;              /* commits written outside the locks */
  uint64_t nchained;            /* commit blocks flushed with the next log */
  uint64_t nbeside;             /* atomic: handles started while one was */
  uint64_t flush_ahead;         /* bytes (0: never); set before use */
  bool checkpoint_first;        /* tests: checkpoint before every commit */

  bool needs_commit;            /* atomic */
  unsigned handles;             /* atomic: handles open (data may be
                                 * written that the metadata they add
                                 * will point at) */
  bool aborted;                 /* atomic */
  size_t running_size;          /* atomic copy of running.len, for handles */

  /* A commit between its steps 1 and 3 (commit.c): what a flush waits
   * for.  Set, with needs_commit cleared, in one step under
   * state_lock; cleared (needs_commit set again if it failed) in one
   * step.  Read atomically elsewhere.
   */
  pthread_mutex_t state_lock;
  pthread_cond_t state_cond;
  bool inflight;
  /* Chained commits (jtx_commit_step): a commit whose log is durable,
   * its commit block not yet written (sc; the commit lock's, sc only
   * between steps), and the tid of the last durable commit.  Changed
   * under state_lock (and the commit lock).
   */
  bool staged;
  /* The staged commit is in the log's bookkeeping already: a step
   * that did that failed to write its commit block, and the next step
   * writes it again (jtx_commit_step).  The commit lock's, changed
   * under state_lock, as staged.
   */
  bool slogged;
  /* Flushes of steps: started (numbered), and the last one that
   * completed; a flush is done only after one started after it.
   */
  uint64_t fstarted, fdone;
  struct commit sc;
  uint8_t *scb;                 /* its commit block (a block) */
  uint32_t dtid;

  /* The commit timer. */
  pthread_t timer;
  bool timer_started;
  pthread_mutex_t tlock;
  pthread_cond_t tcond;
  bool tstop;                   /* Protected by tlock */
  bool tkick;                   /* Protected by tlock: commit now */
};

/* trans.c: for messages. */
extern const char *jtx_what (const struct ext4fs_jtx *jt);
extern const char *jtx_stopped (const struct ext4fs_jtx *jt);

/* cache.c */
extern const struct ext4fs_meta_ops jtx_cache_hooks;
extern void jtx_cache_trim (struct ext4fs_jtx *jt);
extern void jtx_ghosts_drop (struct ext4fs_jtx *jt);
extern void jtx_ghosts_settle (struct ext4fs_jtx *jt, bool committed);

/* commit.c.  Caller holds the handle lock exclusive and the fs mutex. */
extern uint64_t jtx_now_ns (void);
extern int jtx_commit_locked (struct ext4fs_jtx *jt, int *err);
/* Commit lock held, no other. */
extern int jtx_commit_unlocked (struct ext4fs_jtx *jt, int *err);
/* Commit lock held, no other: 1 progress, 0 nothing to do, -1 failed,
 * -2 the next transaction's log could not be written (it is pending
 * again; the staged one, if any, is durable).
 */
extern int jtx_commit_step (struct ext4fs_jtx *jt, int *err);
extern int jtx_checkpoint_locked (struct ext4fs_jtx *jt, int *err);
extern int jtx_write_home_locked (struct ext4fs_jtx *jt, int *err);
extern int jtx_write_jsb (struct ext4fs_jtx *jt, int *err);

#endif /* EXT4FS_TRANS_INT_H */
