/* ext4fs fuzz target (libFuzzer): a mutated filesystem image is opened
 * through the real io_manager and the filter's own code, read-only:
 * open and feature gate, export listing and path lookup (directories,
 * symlinks), block mapping (extent trees, indirect blocks, inline
 * data), reads and block status of every file found.
 *
 * The "plugin" is a fake nbdkit_next over the input that aborts, as
 * nbdkit does, on any request outside the image: the io_manager's
 * bounds checks must stop those first.
 *
 * Build: fuzz/build.sh (clang -fsanitize=fuzzer,address,undefined).
 * Run:   fuzz/run.sh [SECONDS]
 */

#include <config.h>

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NO_INLINE_FUNCS
#include <ext2fs/ext2fs.h>
#include <nbdkit-filter.h>

#include "exports.h"
#include "fs.h"
#include "inode.h"
#include "io.h"
#include "rw.h"

int ext4fs_debug_writeback;
int ext4fs_debug_verify_map;
int ext4fs_debug_serial_fill;
int ext4fs_debug_flush_ahead_mib = -1;
int ext4fs_debug_checkpoint_first;
int ext4fs_debug_async_commit = 1;
int ext4fs_debug_chain_commit = 1;
int ext4fs_debug_journal = 1;
int ext4fs_debug_journal_stats;
int ext4fs_debug_max_runs;
int ext4fs_debug_icache_slots;
int ext4fs_debug_fail_meta_read;
int ext4fs_debug_fail_meta_write;
int ext4fs_debug_count_meta;

/* --- nbdkit's functions, which the server would provide. --- */

void nbdkit_error (const char *fs, ...) { }
void nbdkit_debug (const char *fs, ...) { }

struct nbdkit_exports { int n; char names[64][256]; };
struct nbdkit_extents { int n; };

int
nbdkit_add_export (struct nbdkit_exports *e, const char *name,
                   const char *description)
{
  if (e->n < 64 && strlen (name) < 256)
    strcpy (e->names[e->n++], name);
  return 0;
}

int
nbdkit_add_extent (struct nbdkit_extents *e, uint64_t offset,
                   uint64_t length, uint32_t type)
{
  if (length == 0)
    abort ();                   /* the real one rejects this */
  e->n++;
  return 0;
}

nbdkit_next *
nbdkit_next_context_open (nbdkit_backend *b, int ro, const char *name, int s)
{
  return NULL;
}

void nbdkit_next_context_close (nbdkit_next *n) { }

/* --- the fake plugin --- */

static const uint8_t *image;
static size_t image_size;

static int64_t f_get_size (nbdkit_next *n) { return image_size; }
static int f_one (nbdkit_next *n) { return 1; }
static int f_zero (nbdkit_next *n) { return 0; }
static int f_ro (nbdkit_next *n) { return 0; }

static int
f_pread (nbdkit_next *n, void *buf, uint32_t count, uint64_t offset,
         uint32_t flags, int *err)
{
  if (offset > image_size || count > image_size - offset)
    abort ();                   /* nbdkit would assert */
  memcpy (buf, image + offset, count);
  return 0;
}

static int
f_block_size (nbdkit_next *n, uint32_t *a, uint32_t *b, uint32_t *c)
{
  *a = *b = *c = 0;
  return 0;
}

static struct nbdkit_next_ops fake = {
  .get_size = f_get_size, .block_size = f_block_size,
  .can_write = f_ro, .can_flush = f_zero, .is_rotational = f_zero,
  .can_trim = f_zero, .can_zero = f_zero, .can_fast_zero = f_zero,
  .can_extents = f_zero, .can_fua = f_zero, .can_multi_conn = f_one,
  .can_cache = f_zero, .pread = f_pread,
};

static void
exercise (struct ext4fs_fs *fsi, const char *path)
{
  struct ext4fs_inode *ip;
  struct nbdkit_extents ext = { 0 };
  ext2_ino_t ino;
  static char buf[1 << 20];
  uint64_t off;
  int err;

  if (export_resolve (fsi, path, 1, &ino, &err) == -1)
    return;
  ip = inode_get (fsi, ino, &err);
  if (ip == NULL)
    return;
  /* Reads and block status over the first 4 MiB and the last 64 KiB. */
  for (off = 0; off < ip->size && off < 4 << 20; off += sizeof buf) {
    uint64_t n = ip->size - off < sizeof buf ? ip->size - off : sizeof buf;
    if (rw_pread (ip, buf, n, off, &err) == -1)
      break;
  }
  if (ip->size > 65536)
    rw_pread (ip, buf, 65536, ip->size - 65536, &err);
  if (ip->size > 0) {
    uint64_t n = ip->size < (1u << 30) ? ip->size : (1u << 30);
    rw_extents (ip, n, 0, 0, &ext, &err);
    rw_extents (ip, 1, ip->size - 1, NBDKIT_FLAG_REQ_ONE, &ext, &err);
  }
  inode_put (ip);
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  static int init;
  struct ext4fs_dev *dev;
  struct ext4fs_fs *fsi;
  static struct nbdkit_exports exports;
  int i;

  if (!init) {
    initialize_ext2_error_table ();
    init = 1;
  }
  image = data;
  image_size = size;
  dev = ext4fs_dev_new ((nbdkit_next *) &fake, 0);
  if (dev == NULL)
    return 0;
  fsi = fs_open_dev (dev, false);
  if (fsi) {
    exports.n = 0;
    export_list (fsi, &exports);
    for (i = 0; i < exports.n; ++i)
      exercise (fsi, exports.names[i]);
    exercise (fsi, "/f");
    exercise (fsi, "/link");
    exercise (fsi, "d/f");
    exercise (fsi, "/lost+found");
    fs_close_dev (fsi);
  }
  ext4fs_dev_free (dev);
  return 0;
}
