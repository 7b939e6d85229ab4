/* Unit test of the io_manager (io-manager/io.c) outside nbdkit.
 *
 * A fake nbdkit_next serves an image file from memory and aborts, as
 * nbdkit does, on any request outside the export.  Checks: libext2fs
 * opens the filesystem through ext4fs_io_manager; the channel
 * advertises CHANNEL_FLAGS_THREADS; reads past the end become
 * EXT2_ET_SHORT_READ without reaching the plugin; data-path calls are
 * bounds-checked; 4 threads reading at once get the right bytes; the
 * errcode <-> errno mapping.
 *
 * Usage: test-io-manager IMAGE
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <pthread.h>
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
  memcpy (buf, image + offset, count);
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
  free (image);
  printf ("test-io-manager: all checks passed\n");
  return 0;
}
