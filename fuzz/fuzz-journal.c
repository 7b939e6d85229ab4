/* ext4fs fuzz target (libFuzzer) for the jbd2 log reader alone: the
 * input is a journal (its superblock first), read by jbd2_load and
 * jbd2_scan as replay at open would.  Blocks past the end of the input
 * read as zeros, so a small input can describe a journal of the
 * minimum length.  Every copy chosen for replay must come from inside
 * the journal and be sorted and unique: a wrong plan would be a wrong
 * byte served.
 *
 * Build: fuzz/build.sh OUTPUT journal.  Run: fuzz/run.sh [SECONDS].
 */

#include <config.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "jbd2.h"

void nbdkit_error (const char *fs, ...) { }
void nbdkit_debug (const char *fs, ...) { }

static const uint8_t *input;
static size_t input_size;
static uint32_t bs;

static int
f_read (void *opaque, uint32_t jblk, void *buf)
{
  uint64_t off = (uint64_t) jblk * bs;

  memset (buf, 0, bs);
  if (off < input_size)
    memcpy (buf, input + off, input_size - off < bs ? input_size - off : bs);
  return 0;
}

static int
f_check_home (void *opaque, uint64_t home)
{
  return home < (UINT64_C (1) << 40) ? 0 : -1;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct jbd2_journal j;
  struct jbd2_replay r;
  struct jbd2_io io = { .read = f_read, .check_home = f_check_home };
  size_t i;

  if (size < JSB_SIZE)
    return 0;
  input = data;
  input_size = size;
  /* The block size the superblock claims, if it is a plausible one. */
  bs = (uint32_t) data[12] << 24 | data[13] << 16 | data[14] << 8 | data[15];
  if (bs != 1024 && bs != 2048 && bs != 4096)
    return 0;
  if (jbd2_load (&j, data, bs, 1u << 16) == -1)
    return 0;
  if (jbd2_scan (&j, &io, &r) == -1)
    return 0;
  for (i = 0; i < r.nblocks; ++i) {
    if (r.blocks[i].jblk < j.first || r.blocks[i].jblk >= j.last)
      abort ();
    if (i > 0 && r.blocks[i].home <= r.blocks[i - 1].home)
      abort ();
  }
  if (jbd2_tid_gt (r.first_tid, r.end_tid))
    abort ();
  jbd2_replay_free (&r);
  return 0;
}
