/* Unit test of the io_manager (io-manager/io.c) outside nbdkit.
 *
 * A fake nbdkit_next serves an image file from memory and aborts, as
 * nbdkit does, on any request outside the export.  Checks: libext2fs
 * opens the filesystem through ext4fs_io_manager; the channel
 * advertises CHANNEL_FLAGS_THREADS; reads past the end become
 * EXT2_ET_SHORT_READ without reaching the plugin; data-path calls are
 * bounds-checked; 4 threads reading at once get the right bytes; the
 * errcode <-> errno mapping; lanes (several contexts): a context of
 * another size is refused, reads from 4 threads spread over the lanes
 * and get the right bytes, a serializing device never enters one lane
 * from two threads at once, flushes go to lane 0.
 *
 * Usage: test-io-manager IMAGE
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NO_INLINE_FUNCS
#include <ext2fs/ext2fs.h>
#include <nbdkit-filter.h>

#include "io.h"

/* nbdkit's functions, which the server would provide. */
void
nbdkit_error (const char *fs, ...)
{
  va_list args;
  va_start (args, fs);
  fprintf (stderr, "error: ");
  vfprintf (stderr, fs, args);
  fprintf (stderr, "\n");
  va_end (args);
}

void
nbdkit_debug (const char *fs, ...)
{
}

static char *image;
static uint64_t image_size;
static unsigned long preads;

/* Lanes: the fake contexts are copies of 'fake', told apart by address. */
#define NLANES 3
static struct nbdkit_next_ops lane_ops[NLANES];
static unsigned long lane_calls[NLANES];   /* atomic */
static int lane_inflight[NLANES];          /* atomic */
static int lane_overlap;                   /* atomic: a lane entered twice */
static unsigned long lane_flushes[NLANES]; /* atomic */

static int
lane_index (nbdkit_next *n)
{
  int i;
  for (i = 0; i < NLANES; ++i)
    if ((void *) n == (void *) &lane_ops[i])
      return i;
  return -1;
}

static void
lane_enter (nbdkit_next *n)
{
  int i = lane_index (n);
  if (i < 0)
    return;
  __atomic_add_fetch (&lane_calls[i], 1, __ATOMIC_RELAXED);
  if (__atomic_add_fetch (&lane_inflight[i], 1, __ATOMIC_SEQ_CST) > 1)
    __atomic_store_n (&lane_overlap, 1, __ATOMIC_SEQ_CST);
}

static void
lane_leave (nbdkit_next *n)
{
  int i = lane_index (n);
  if (i >= 0)
    __atomic_sub_fetch (&lane_inflight[i], 1, __ATOMIC_SEQ_CST);
}
static int64_t fake_small_size (nbdkit_next *n) { return image_size - 512; }

static int64_t fake_get_size (nbdkit_next *n) { return image_size; }
static int fake_one (nbdkit_next *n) { return 1; }
static int fake_zero_ (nbdkit_next *n) { return 0; }

static int
fake_pread (nbdkit_next *n, void *buf, uint32_t count, uint64_t offset,
            uint32_t flags, int *err)
{
  /* nbdkit asserts this; so do we. */
  if (offset > image_size || count > image_size - offset) {
    fprintf (stderr, "FAIL: out-of-range pread reached the plugin\n");
    abort ();
  }
  __atomic_add_fetch (&preads, 1, __ATOMIC_RELAXED);
  lane_enter (n);
  memcpy (buf, image + offset, count);
  /* Give another thread the chance to enter the same lane. */
  if (lane_index (n) >= 0)
    sched_yield ();
  lane_leave (n);
  return 0;
}

static int
fake_pwrite (nbdkit_next *n, const void *buf, uint32_t count, uint64_t offset,
             uint32_t flags, int *err)
{
  if (offset > image_size || count > image_size - offset)
    abort ();
  memcpy (image + offset, buf, count);
  return 0;
}

static int
fake_flush (nbdkit_next *n, uint32_t flags, int *err)
{
  int i = lane_index (n);
  if (i >= 0)
    __atomic_add_fetch (&lane_flushes[i], 1, __ATOMIC_RELAXED);
  return 0;
}

static int
fake_block_size (nbdkit_next *n, uint32_t *a, uint32_t *b, uint32_t *c)
{
  *a = *b = *c = 0;
  return 0;
}

static struct nbdkit_next_ops fake = {
  .get_size = fake_get_size,
  .block_size = fake_block_size,
  .can_write = fake_one,
  .can_flush = fake_one,
  .is_rotational = fake_zero_,
  .can_trim = fake_zero_,
  .can_zero = fake_zero_,
  .can_fast_zero = fake_zero_,
  .can_extents = fake_zero_,
  .can_fua = fake_zero_,
  .can_multi_conn = fake_one,
  .can_cache = fake_zero_,
  .pread = fake_pread,
  .pwrite = fake_pwrite,
  .flush = fake_flush,
};

static struct ext4fs_dev *dev;

static void *
reader (void *arg)
{
  char *buf = malloc (65536);
  unsigned i;
  int err;

  for (i = 0; i < 2000; ++i) {
    uint64_t off = (((uint64_t) rand_r ((unsigned *) arg) << 12) ^ i * 4096)
      % (image_size - 65536);
    if (ext4fs_dev_pread (dev, buf, 65536, off, &err) == -1 ||
        memcmp (buf, image + off, 65536) != 0) {
      fprintf (stderr, "FAIL: threaded read at %llu\n", (unsigned long long) off);
      exit (1);
    }
  }
  free (buf);
  return NULL;
}

int
main (int argc, char *argv[])
{
  FILE *fp;
  ext2_filsys fs;
  errcode_t e;
  ext2_ino_t ino;
  char buf[4096];
  unsigned long before;
  int err = 0, i;
  pthread_t th[4];
  unsigned seeds[4] = { 1, 2, 3, 4 };

  if (argc != 2) {
    fprintf (stderr, "usage: %s IMAGE\n", argv[0]);
    exit (2);
  }
  fp = fopen (argv[1], "rb");
  assert (fp);
  fseek (fp, 0, SEEK_END);
  image_size = ftell (fp);
  fseek (fp, 0, SEEK_SET);
  image = malloc (image_size);
  assert (image);
  assert (fread (image, 1, image_size, fp) == image_size);
  fclose (fp);
  initialize_ext2_error_table ();

  dev = ext4fs_dev_new ((nbdkit_next *) &fake, 0);
  assert (dev);
  assert (ext4fs_dev_size (dev) == image_size);

  /* libext2fs through our manager. */
  e = ext2fs_open2 (ext4fs_dev_name (dev), NULL,
                    EXT2_FLAG_64BITS | EXT2_FLAG_THREADS, 0, 0,
                    ext4fs_io_manager, &fs);
  if (e) {
    fprintf (stderr, "FAIL: ext2fs_open2: %s\n", error_message (e));
    exit (1);
  }
  if (!(fs->io->flags & CHANNEL_FLAGS_THREADS)) {
    fprintf (stderr, "FAIL: channel does not advertise CHANNEL_FLAGS_THREADS\n");
    exit (1);
  }
  e = ext2fs_namei (fs, EXT2_ROOT_INO, EXT2_ROOT_INO, "/hello", &ino);
  if (e) {
    fprintf (stderr, "FAIL: namei /hello: %s\n", error_message (e));
    exit (1);
  }
  /* The bitmap loader runs threads through the channel. */
  e = ext2fs_read_bitmaps (fs);
  if (e) {
    fprintf (stderr, "FAIL: read_bitmaps: %s\n", error_message (e));
    exit (1);
  }

  /* A read past the end never reaches the plugin. */
  before = preads;
  e = io_channel_read_blk64 (fs->io, ext2fs_blocks_count (fs->super) + 10,
                             1, buf);
  if (e != EXT2_ET_SHORT_READ || preads != before) {
    fprintf (stderr, "FAIL: read past the end: %s\n", error_message (e));
    exit (1);
  }
  /* Nor an overflowing block number. */
  e = io_channel_read_blk64 (fs->io, ~0ULL / 2, 1, buf);
  if (e == 0 || preads != before) {
    fprintf (stderr, "FAIL: overflowing block number was read\n");
    exit (1);
  }
  /* The data path too. */
  if (ext4fs_dev_pread (dev, buf, 4096, image_size - 100, &err) != -1 ||
      err != EIO) {
    fprintf (stderr, "FAIL: data path read past the end\n");
    exit (1);
  }
  ext2fs_close_free (&fs);

  /* Threads. */
  for (i = 0; i < 4; ++i)
    pthread_create (&th[i], NULL, reader, &seeds[i]);
  for (i = 0; i < 4; ++i)
    pthread_join (th[i], NULL);

  /* Error mapping. */
  assert (ext4fs_errcode_to_errno (EIO) == EIO);
  assert (ext4fs_errcode_to_errno (ENOSPC) == ENOSPC);
  assert (ext4fs_errcode_to_errno (EXT2_ET_BLOCK_ALLOC_FAIL) == ENOSPC);
  assert (ext4fs_errcode_to_errno (EXT2_ET_RO_FILSYS) == EROFS);
  assert (ext4fs_errcode_to_errno (EXT2_ET_NO_MEMORY) == ENOMEM);
  assert (ext4fs_errcode_to_errno (EXT2_ET_DIR_CORRUPTED) == EIO);
  assert (ext4fs_errcode_to_errno (EXT2_ET_EXTENT_CSUM_INVALID) == EIO);
  assert (ext4fs_errcode_to_errno (EXT2_ET_SHORT_READ) == EIO);
  assert (ext4fs_errno_to_errcode (EIO) == EIO);

  ext4fs_dev_free (dev);

  /* Lanes, on a serializing device. */
  for (i = 0; i < NLANES; ++i)
    lane_ops[i] = fake;
  dev = ext4fs_dev_new ((nbdkit_next *) &lane_ops[0], 1);
  assert (dev);
  {
    struct nbdkit_next_ops other = fake;
    other.get_size = fake_small_size;
    if (ext4fs_dev_add_lane (dev, (nbdkit_next *) &other) != -1) {
      fprintf (stderr, "FAIL: a context of another size became a lane\n");
      exit (1);
    }
  }
  for (i = 1; i < NLANES; ++i)
    assert (ext4fs_dev_add_lane (dev, (nbdkit_next *) &lane_ops[i]) == 0);
  assert (ext4fs_dev_nr_lanes (dev) == NLANES);
  assert (ext4fs_dev_lane (dev, 1) == (nbdkit_next *) &lane_ops[1]);
  assert (ext4fs_dev_lane (dev, NLANES) == NULL);
  for (i = 0; i < 4; ++i)
    pthread_create (&th[i], NULL, reader, &seeds[i]);
  for (i = 0; i < 4; ++i)
    pthread_join (th[i], NULL);
  {
    int used = 0;
    for (i = 0; i < NLANES; ++i)
      used += lane_calls[i] > 0;
    if (used < 2) {
      fprintf (stderr, "FAIL: 4 threads used %d lane(s) of %d\n", used, NLANES);
      exit (1);
    }
  }
  if (lane_overlap) {
    fprintf (stderr, "FAIL: a serializing device entered a lane twice\n");
    exit (1);
  }
  if (ext4fs_dev_flush (dev, &err) == -1 || lane_flushes[0] != 1 ||
      lane_flushes[1] != 0 || lane_flushes[2] != 0) {
    fprintf (stderr, "FAIL: flush did not go to lane 0 only\n");
    exit (1);
  }
  ext4fs_dev_free (dev);

  free (image);
  printf ("test-io-manager: all checks passed\n");
  return 0;
}
