/* mkfrag: add to a freshly made ext4 image a regular file /frag whose
 * extent tree holds exactly N written extents of one block each, none
 * physically contiguous with the next (so none could merge): logical
 * block i lives at the i-th free block of the scan below, taken with
 * at least one block between it and the one before.  With an empty
 * filesystem that is logical i -> base + 2*i (skipping group metadata).
 *
 * The data blocks are marked in use but never written (the image stays
 * sparse; the file reads as whatever the image holds there, zeros for
 * a new sparse image).  The tree is built directly (not through the
 * libext2fs extent API, far too slow for millions of extents): full
 * leaves, index levels above them, root in i_block, checksums with
 * ext2fs_extent_block_csum_set (metadata_csum).  Tree blocks are
 * allocated first, near the start; data blocks after them.  Block
 * bitmap, group and superblock free counts, i_blocks and i_size are
 * set so that e2fsck -fn is clean.
 *
 *   cc -O2 -o mkfrag bench/mkfrag.c $(pkg-config --cflags --libs ext2fs com_err)
 *   mke2fs -q -F -t ext4 -b 4096 -O ^has_journal,extent -E lazy_itable_init=1 IMG BLOCKS
 *   mkfrag IMG N
 *
 * The image needs about 2N + N/340 blocks free (plus metadata).
 *
 * On a filesystem without the extent feature the file is mapped by
 * indirect blocks instead (ext2/ext3; N one-block runs the same way:
 * data blocks first, then the blocks of pointers, written depth first):
 *   mke2fs -q -F -t ext4 -b 4096 -O ^has_journal,^extent,^64bit IMG BLOCKS
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <stdbool.h>
#include <time.h>

#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>
#include <ext2fs/ext3_extents.h>
#include <et/com_err.h>

#define NAME "frag"
#define MAX_LEVELS 8

static ext2_filsys fs;
static uint32_t *gused;                 /* blocks taken, per group */
static blk64_t ntaken;
static blk64_t scan_next;               /* next block the scan looks at */

static void
die (errcode_t err, const char *what)
{
  com_err ("mkfrag", err, "%s", what);
  exit (1);
}

static void
take (blk64_t b)
{
  ext2fs_mark_block_bitmap2 (fs->block_map, b);
  gused[ext2fs_group_of_blk2 (fs, b)]++;
  ntaken++;
}

/* The next free block at or after scan_next, not not_adjacent_to + 1
 * (when not_adjacent_to is nonzero: the data block before). */
static blk64_t
next_free (blk64_t not_adjacent_to)
{
  blk64_t end = ext2fs_blocks_count (fs->super) - 1, b;
  errcode_t err;

  for (;;) {
    if (scan_next > end) {
      fprintf (stderr, "mkfrag: filesystem too small (out of free blocks "
               "after %llu)\n", (unsigned long long) ntaken);
      exit (1);
    }
    err = ext2fs_find_first_zero_block_bitmap2 (fs->block_map, scan_next,
                                                end, &b);
    if (err == ENOENT) {
      scan_next = end + 1;
      continue;
    }
    if (err)
      die (err, "find_first_zero_block_bitmap2");
    if (not_adjacent_to && b == not_adjacent_to + 1) {
      scan_next = b + 1;
      continue;
    }
    scan_next = b + 1;
    return b;
  }
}

static void
put_block (ext2_ino_t ino, blk64_t b, char *buf)
{
  errcode_t err;

  err = ext2fs_extent_block_csum_set (fs, ino,
                                      (struct ext3_extent_header *) buf);
  if (err)
    die (err, "extent_block_csum_set");
  err = io_channel_write_blk64 (fs->io, b, 1, buf);
  if (err)
    die (err, "write tree block");
}

/* Indirect files: the data blocks of logical 0..nd-1, and the block of
 * pointers at the given level (1: pointers to data) mapping logical
 * [lo, lo + apb^level), allocated and written with everything under it
 * (depth first).  Counts the blocks of pointers in nptr.
 */
static uint32_t *dblk;
static uint64_t nd, nptr;
static unsigned apb;

static blk64_t
ind_block (unsigned level, uint64_t lo)
{
  uint32_t *p = calloc (apb, sizeof *p);
  uint64_t span = 1, j;
  unsigned l;
  blk64_t b;
  errcode_t err;

  if (p == NULL)
    abort ();
  for (l = 1; l < level; l++)
    span *= apb;
  b = next_free (0);
  take (b);
  nptr++;
  for (j = 0; j < apb && lo + j * span < nd; j++)
    p[j] = ext2fs_cpu_to_le32 (level == 1 ? dblk[lo + j]
                               : (uint32_t) ind_block (level - 1,
                                                       lo + j * span));
  err = io_channel_write_blk64 (fs->io, b, 1, p);
  if (err)
    die (err, "write indirect block");
  free (p);
  return b;
}

static void
init_header (char *buf, size_t size, unsigned max, unsigned depth)
{
  struct ext3_extent_header *eh = (struct ext3_extent_header *) buf;

  memset (buf, 0, size);
  eh->eh_magic = ext2fs_cpu_to_le16 (EXT3_EXT_MAGIC);
  eh->eh_entries = 0;
  eh->eh_max = ext2fs_cpu_to_le16 (max);
  eh->eh_depth = ext2fs_cpu_to_le16 (depth);
}

int
main (int argc, char **argv)
{
  errcode_t err;
  ext2_ino_t ino, tmp;
  struct ext2_inode inode;
  unsigned bs, per, root_max = (sizeof inode.i_block - 12) / 12;
  uint64_t n, nodes[MAX_LEVELS], tblocks = 0;
  unsigned depth = 0, l;
  blk64_t *tree[MAX_LEVELS];            /* block numbers, per level */
  uint32_t *first[MAX_LEVELS];          /* first logical block, per node */
  char *buf;
  dgrp_t g;
  time_t now = time (NULL);

  if (argc != 3) {
    fprintf (stderr, "usage: mkfrag IMAGE N\n");
    exit (2);
  }
  n = strtoull (argv[2], NULL, 10);
  if (n < 1 || n > UINT32_MAX) {
    fprintf (stderr, "mkfrag: N out of range\n");
    exit (2);
  }

  add_error_table (&et_ext2_error_table);
  err = ext2fs_open (argv[1], EXT2_FLAG_RW | EXT2_FLAG_64BITS, 0, 0,
                     unix_io_manager, &fs);
  if (err)
    die (err, argv[1]);
  if (ext2fs_has_feature_bigalloc (fs->super) ||
      (!ext2fs_has_feature_extents (fs->super) &&
       ext2fs_blocks_count (fs->super) > UINT32_MAX)) {
    fprintf (stderr, "mkfrag: no bigalloc, and indirect blocks need a "
             "32-bit filesystem\n");
    exit (1);
  }
  if (ext2fs_namei (fs, EXT2_ROOT_INO, EXT2_ROOT_INO, NAME, &tmp) == 0) {
    fprintf (stderr, "mkfrag: /" NAME " exists already\n");
    exit (1);
  }
  /* A bit array, not the default rbtree: every other block in use
   * would make 10 M tree nodes. */
  fs->default_bitmap_type = EXT2FS_BMAP64_BITARRAY;
  err = ext2fs_read_bitmaps (fs);
  if (err)
    die (err, "read_bitmaps");

  bs = fs->blocksize;
  per = (bs - 12) / 12;

  /* Shape of the tree: nodes[l] blocks at level l (0 = leaves) until
   * the root in i_block can hold the level above. */
  if (n > root_max) {
    uint64_t above = n;
    do {
      if (depth == MAX_LEVELS)
        abort ();
      nodes[depth] = (above + per - 1) / per;
      tblocks += nodes[depth];
      above = nodes[depth];
      depth++;
    } while (above > root_max);
  }
  if (depth > 5) {
    fprintf (stderr, "mkfrag: the tree would be %u deep (ext4 allows 5)\n",
             depth);
    exit (1);
  }

  gused = calloc (fs->group_desc_count, sizeof *gused);
  buf = malloc (bs);
  if (!gused || !buf)
    abort ();

  err = ext2fs_new_inode (fs, EXT2_ROOT_INO, LINUX_S_IFREG | 0644, 0, &ino);
  if (err)
    die (err, "new_inode");
  if (!ext2fs_has_feature_extents (fs->super)) {
    /* Indirect blocks: data first, then the tree of pointers. */
    uint64_t i, lo = EXT2_NDIR_BLOCKS, span;
    blk64_t prev = 0;
    unsigned level;

    apb = bs / 4;
    nd = n;
    if (n > EXT2_NDIR_BLOCKS + apb + (uint64_t) apb * apb +
        (uint64_t) apb * apb * apb) {
      fprintf (stderr, "mkfrag: N is more than indirect blocks can map\n");
      exit (1);
    }
    dblk = malloc (n * sizeof *dblk);
    if (dblk == NULL)
      abort ();
    scan_next = fs->super->s_first_data_block;
    for (i = 0; i < n; i++) {
      dblk[i] = next_free (prev);
      take (dblk[i]);
      prev = dblk[i];
    }
    memset (&inode, 0, sizeof inode);
    for (i = 0; i < n && i < EXT2_NDIR_BLOCKS; i++)
      inode.i_block[i] = dblk[i];
    for (level = 1, span = apb; level <= 3 && lo < n;
         level++, lo += span, span *= apb)
      inode.i_block[EXT2_IND_BLOCK + level - 1] = ind_block (level, lo);
    inode.i_mode = LINUX_S_IFREG | 0644;
    inode.i_links_count = 1;
    inode.i_atime = inode.i_ctime = inode.i_mtime = now;
    err = ext2fs_inode_size_set (fs, &inode, (uint64_t) n * bs);
    if (err)
      die (err, "inode_size_set");
    err = ext2fs_iblk_set (fs, &inode, n + nptr);
    if (err)
      die (err, "iblk_set");
    err = ext2fs_write_new_inode (fs, ino, &inode);
    if (err)
      die (err, "write_new_inode");
    ext2fs_inode_alloc_stats2 (fs, ino, +1, 0);
    tblocks = nptr;
    depth = 0;
    goto counts;
  }
  /* The extent block checksums cover the inode number and generation:
   * write the inode first (its tree comes at the end). */
  memset (&inode, 0, sizeof inode);
  inode.i_mode = LINUX_S_IFREG | 0644;
  inode.i_links_count = 1;
  inode.i_atime = inode.i_ctime = inode.i_mtime = now;
  inode.i_flags = EXT4_EXTENTS_FL;
  inode.i_generation = 0x66726167;      /* "frag" */
  init_header ((char *) inode.i_block, sizeof inode.i_block, root_max, depth);
  err = ext2fs_write_new_inode (fs, ino, &inode);
  if (err)
    die (err, "write_new_inode");
  ext2fs_inode_alloc_stats2 (fs, ino, +1, 0);

  /* Tree blocks first, near the start of the filesystem. */
  scan_next = fs->super->s_first_data_block;
  for (l = 0; l < depth; l++) {
    uint64_t j;
    tree[l] = malloc (nodes[l] * sizeof (blk64_t));
    first[l] = malloc (nodes[l] * sizeof (uint32_t));
    if (!tree[l] || !first[l])
      abort ();
    for (j = 0; j < nodes[l]; j++) {
      tree[l][j] = next_free (0);
      take (tree[l][j]);
    }
  }

  /* Data blocks and leaves (or the root, for depth 0). */
  {
    blk64_t prev = 0, b;
    uint64_t i, leaf = 0;
    struct ext3_extent_header *eh;
    struct ext3_extent *ex;
    char *lb = depth ? buf : (char *) inode.i_block;

    if (depth)
      init_header (buf, bs, per, 0);
    eh = (struct ext3_extent_header *) lb;
    for (i = 0; i < n; i++) {
      unsigned k = ext2fs_le16_to_cpu (eh->eh_entries);

      b = next_free (prev);
      take (b);
      prev = b;
      if (depth && k == 0)
        first[0][leaf] = i;
      ex = EXT_FIRST_EXTENT (eh) + k;
      ex->ee_block = ext2fs_cpu_to_le32 (i);
      ex->ee_len = ext2fs_cpu_to_le16 (1);
      ex->ee_start = ext2fs_cpu_to_le32 (b & 0xffffffff);
      ex->ee_start_hi = ext2fs_cpu_to_le16 (b >> 32);
      eh->eh_entries = ext2fs_cpu_to_le16 (k + 1);
      if (depth && (k + 1 == per || i + 1 == n)) {
        put_block (ino, tree[0][leaf++], buf);
        init_header (buf, bs, per, 0);
      }
    }
    if (depth && leaf != nodes[0])
      abort ();
  }

  /* Index levels; the last one goes in i_block. */
  for (l = 1; l <= depth; l++) {
    uint64_t j, node = 0, cnt = nodes[l - 1];
    bool in_root = l == depth;
    char *ib = in_root ? (char *) inode.i_block : buf;
    struct ext3_extent_header *eh = (struct ext3_extent_header *) ib;

    if (!in_root)
      init_header (buf, bs, per, l);
    for (j = 0; j < cnt; j++) {
      unsigned k = ext2fs_le16_to_cpu (eh->eh_entries);
      struct ext3_extent_idx *ix = EXT_FIRST_INDEX (eh) + k;

      if (!in_root && k == 0)
        first[l][node] = first[l - 1][j];
      ix->ei_block = ext2fs_cpu_to_le32 (first[l - 1][j]);
      ix->ei_leaf = ext2fs_cpu_to_le32 (tree[l - 1][j] & 0xffffffff);
      ix->ei_leaf_hi = ext2fs_cpu_to_le16 (tree[l - 1][j] >> 32);
      ix->ei_unused = 0;
      eh->eh_entries = ext2fs_cpu_to_le16 (k + 1);
      if (!in_root && (k + 1 == per || j + 1 == cnt)) {
        put_block (ino, tree[l][node++], buf);
        init_header (buf, bs, per, l);
      }
    }
  }

  /* The inode, with its root. */
  {
    struct ext2_inode root = inode;

    err = ext2fs_read_inode (fs, ino, &inode);
    if (err)
      die (err, "read_inode");
    memcpy (inode.i_block, root.i_block, sizeof inode.i_block);
    err = ext2fs_inode_size_set (fs, &inode, (uint64_t) n * bs);
    if (err)
      die (err, "inode_size_set");
    err = ext2fs_iblk_set (fs, &inode, n + tblocks);
    if (err)
      die (err, "iblk_set");
    err = ext2fs_write_inode (fs, ino, &inode);
    if (err)
      die (err, "write_inode");
  }

  /* Free counts. */
 counts:
  for (g = 0; g < fs->group_desc_count; g++) {
    if (!gused[g])
      continue;
    ext2fs_bg_free_blocks_count_set (fs, g,
                                     ext2fs_bg_free_blocks_count (fs, g) -
                                     gused[g]);
    ext2fs_bg_flags_clear (fs, g, EXT2_BG_BLOCK_UNINIT);
    ext2fs_group_desc_csum_set (fs, g);
  }
  ext2fs_free_blocks_count_set (fs->super,
                                ext2fs_free_blocks_count (fs->super) - ntaken);
  ext2fs_mark_super_dirty (fs);
  ext2fs_mark_bb_dirty (fs);

  err = ext2fs_link (fs, EXT2_ROOT_INO, NAME, ino, EXT2_FT_REG_FILE);
  if (err == EXT2_ET_DIR_NO_SPACE) {
    err = ext2fs_expand_dir (fs, EXT2_ROOT_INO);
    if (err)
      die (err, "expand_dir");
    err = ext2fs_link (fs, EXT2_ROOT_INO, NAME, ino, EXT2_FT_REG_FILE);
  }
  if (err)
    die (err, "link");

  err = ext2fs_close_free (&fs);
  if (err)
    die (err, "close");
  printf ("mkfrag: /" NAME " inode %u: %llu %s, depth %u, %llu tree "
          "blocks, data up to block %llu\n", ino, (unsigned long long) n,
          dblk ? "one-block runs (indirect blocks)" : "extents",
          depth, (unsigned long long) tblocks,
          (unsigned long long) scan_next - 1);
  return 0;
}
