/* ext4fs: replaying the filesystem's journal at open (see replay.c). */
#ifndef EXT4FS_REPLAY_H
#define EXT4FS_REPLAY_H

#include <stdbool.h>
#include <stdint.h>

#define NO_INLINE_FUNCS
#include <ext2fs/ext2fs.h>

#include "common/vector.h"
#include "io.h"
#include "jbd2.h"

struct jrun { uint32_t jblk, len; uint64_t pblk; };
DEFINE_VECTOR_TYPE (jrun_vector, struct jrun);

/* The journal of an opened filesystem and what replaying it means. */
struct ext4fs_journal {
  struct jbd2_journal j;
  struct jbd2_replay r;
  /* Journal block -> device block, as runs sorted by journal block. */
  jrun_vector runs;
  /* The same runs sorted by device block (to refuse replaying onto the
   * journal itself).
   */
  struct jrun *by_pblk;
  struct ext4fs_dev *dev;
  unsigned blockbits;
  bool fc_pending;              /* fast-commit blocks follow the log */
};

/* Read the internal journal of fs (opened on dev, as the image is)
 * and run the three passes.  Call only when the superblock has
 * needs_recovery and an internal journal.  Returns a journal (free it
 * with journal_free), or NULL after nbdkit_error.
 */
extern struct ext4fs_journal *journal_load (ext2_filsys fs,
                                            struct ext4fs_dev *dev);
extern void journal_free (struct ext4fs_journal *jr);

/* The device block of journal block jblk, or 0 if it is not mapped. */
extern uint64_t journal_map_block (const struct ext4fs_journal *jr,
                                   uint32_t jblk);

/* Give dev a read overlay with the replayed blocks (the image is not
 * changed).  Returns 0, or -1 after nbdkit_error.
 */
extern int journal_overlay (struct ext4fs_journal *jr);

/* Replay in place: write every block home, flush, empty the journal
 * (s_start = 0, s_sequence past every tid of the log), flush.  A crash
 * at any point leaves an image that replays again to the same result.
 * Returns 0, or -1 with *err set after nbdkit_error.
 */
extern int journal_replay_in_place (struct ext4fs_journal *jr, int *err);

#endif /* EXT4FS_REPLAY_H */
