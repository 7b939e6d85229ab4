/* ext4fs: exports.
 *
 * Owns: path resolution (our own walk, not ext2fs_namei, so that we
 * can follow symlinks with a bound and confine the result to
 * ext4root), validation of client export names, and the export list.
 *
 * Locks: fsi->lock around each libext2fs call (ext2fs_lookup,
 * ext2fs_read_inode, ext2fs_bmap2 without allocation,
 * io_channel_read_blk64, ext2fs_inline_data_get, ext2fs_dir_iterate2).
 * The walk itself holds no lock between components.  The root stack
 * is set once before any connection and is immutable after.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/vector.h"
#include "cleanup.h"
#include "exports.h"

#define MAX_SYMLINKS 40
#define MAX_PATH 4096
#define MAX_DEPTH 256           /* directory depth we walk */
#define MAX_EXPORTS 10000       /* nbdkit's limit on a list */

/* The directories from the filesystem root to ext4root, inclusive. */
static ext2_ino_t root_stack[MAX_DEPTH] = { EXT2_ROOT_INO };
static size_t root_depth = 1;
static char root_path[MAX_PATH + 1] = "/";

struct walk {
  ext2_ino_t stack[MAX_DEPTH];
  size_t depth;
};

static int
read_inode (struct ext4fs_fs *fsi, ext2_ino_t ino, struct ext2_inode_large *inode)
{
  errcode_t e;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fsi->lock);

  memset (inode, 0, sizeof *inode);
  e = ext2fs_read_inode_full (fsi->fs, ino, (struct ext2_inode *) inode,
                              sizeof *inode);
  return e ? -1 : 0;
}

/* Read the target of symlink ino into buf (NUL-terminated). */
static int
read_symlink (struct ext4fs_fs *fsi, ext2_ino_t ino,
              struct ext2_inode_large *inode, char *buf, size_t bufsize)
{
  uint64_t size = EXT2_I_SIZE (inode);
  errcode_t e = 0;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fsi->lock);

  if (size == 0 || size >= bufsize || size >= fsi->blocksize)
    return -1;
  if (inode->i_flags & EXT4_INLINE_DATA_FL) {
    size_t sz = 0;
    CLEANUP_FREE char *tmp = NULL;

    e = ext2fs_inline_data_size (fsi->fs, ino, &sz);
    if (e || sz > 65536)
      return -1;
    tmp = calloc (1, sz < EXT4_MIN_INLINE_DATA_SIZE ? EXT4_MIN_INLINE_DATA_SIZE : sz);
    if (tmp == NULL)
      return -1;
    e = ext2fs_inline_data_get (fsi->fs, ino, (struct ext2_inode *) inode, tmp, &sz);
    if (e || sz < size)
      return -1;
    memcpy (buf, tmp, size);
  }
  else if (ext2fs_is_fast_symlink ((struct ext2_inode *) inode)) {
    if (size > sizeof inode->i_block)
      return -1;
    memcpy (buf, inode->i_block, size);
  }
  else {
    blk64_t pblk = 0;
    CLEANUP_FREE char *blk = malloc (fsi->blocksize);

    if (blk == NULL)
      return -1;
    e = ext2fs_bmap2 (fsi->fs, ino, (struct ext2_inode *) inode, NULL, 0, 0,
                      NULL, &pblk);
    if (e || pblk < fsi->first_data_block || pblk >= fsi->blocks_count)
      return -1;
    e = io_channel_read_blk64 (fsi->fs->io, pblk, 1, blk);
    if (e)
      return -1;
    memcpy (buf, blk, size);
  }
  buf[size] = '\0';
  if (strlen (buf) != size)
    return -1;
  return 0;
}

/* Names in messages: a client's export name, and what the image gives
 * (file names, symlink targets), may hold anything but NUL.  Control
 * characters are shown as \xNN and backslashes doubled, so that a name
 * with a newline cannot forge a line of the log, nor an escape sequence
 * reach the terminal; bytes from 0x80 up (UTF-8) are kept.  At most
 * max bytes of out are used (max >= 8), a longer result ends "...".
 */
static void
escape_name (char *out, size_t max, const char *in, size_t len)
{
  static const char hex[] = "0123456789abcdef";
  size_t o = 0, i;

  for (i = 0; i < len && in[i] != '\0'; ++i) {
    unsigned char c = in[i];
    size_t need = c < 0x20 || c == 0x7f ? 4 : c == '\\' ? 2 : 1;

    if (o + need > max - 4) {
      memcpy (out + o, "...", 4);
      return;
    }
    if (need == 4) {
      out[o++] = '\\';
      out[o++] = 'x';
      out[o++] = hex[c >> 4];
      out[o++] = hex[c & 15];
    }
    else {
      if (need == 2)
        out[o++] = '\\';
      out[o++] = c;
    }
  }
  out[o] = '\0';
}

char *
export_display_name (const char *name)
{
  char *out = malloc (DISPLAY_MAX);

  if (out != NULL)
    escape_name (out, DISPLAY_MAX, name, strlen (name));
  return out;
}

/* A path component for a message: escaped into buf (at least
 * COMP_SHOWN bytes), which is returned.
 */
#define COMP_SHOWN (4 * EXT2_NAME_LEN + 8)
static const char *
show_comp (char *buf, const char *comp, size_t len)
{
  escape_name (buf, COMP_SHOWN, comp, len);
  return buf;
}

static const char *
mode_name (uint16_t mode)
{
  switch (mode & LINUX_S_IFMT) {
  case LINUX_S_IFDIR: return "a directory";
  case LINUX_S_IFLNK: return "a symbolic link";
  case LINUX_S_IFCHR: return "a character device";
  case LINUX_S_IFBLK: return "a block device";
  case LINUX_S_IFIFO: return "a FIFO";
  case LINUX_S_IFSOCK: return "a socket";
  case LINUX_S_IFREG: return "a regular file";
  default: return "not a regular file (unknown type)";
  }
}

/* The walk.  path is consumed component by component; a symlink's
 * target is prepended to what remains.
 */
static int
walk_path (struct ext4fs_fs *fsi, const char *path, const char *shown,
           struct walk *w, int confine, int *err)
{
  CLEANUP_FREE char *rest = NULL;
  int nlinks = 0;
  char *p, cb[COMP_SHOWN];

  rest = malloc (2 * MAX_PATH + 2);
  if (rest == NULL) {
    *err = errno;
    nbdkit_error ("malloc: %m");
    return -1;
  }
  if (strlen (path) > MAX_PATH) {
    nbdkit_error ("%s: path is too long", shown);
    *err = ENAMETOOLONG;
    return -1;
  }
  strcpy (rest, path);
  p = rest;

  for (;;) {
    char *comp, *slash;
    size_t len;
    ext2_ino_t dir = w->stack[w->depth - 1], ino = 0;
    struct ext2_inode_large inode;
    errcode_t e;

    while (*p == '/')
      p++;
    if (*p == '\0')
      break;
    comp = p;
    slash = strchr (p, '/');
    len = slash ? (size_t) (slash - p) : strlen (p);
    p = slash ? slash : p + len;

    if (len == 1 && comp[0] == '.')
      continue;
    if (len == 2 && comp[0] == '.' && comp[1] == '.') {
      if (w->depth > 1)
        w->depth--;
      continue;
    }
    if (len > EXT2_NAME_LEN) {
      nbdkit_error ("%s: a path component is longer than %d bytes",
                    shown, EXT2_NAME_LEN);
      *err = ENAMETOOLONG;
      return -1;
    }
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fsi->lock);
      e = ext2fs_lookup (fsi->fs, dir, comp, len, NULL, &ino);
    }
    if (e == EXT2_ET_FILE_NOT_FOUND || (e == 0 && ino == 0)) {
      nbdkit_error ("%s: no such file or directory in the filesystem "
                    "(component '%s')", shown, show_comp (cb, comp, len));
      *err = ENOENT;
      return -1;
    }
    if (e == EXT2_ET_NO_DIRECTORY) {
      nbdkit_error ("%s: a component before '%s' is not a directory",
                    shown, show_comp (cb, comp, len));
      *err = ENOTDIR;
      return -1;
    }
    if (e) {
      nbdkit_error ("%s: looking up '%s': %s", shown,
                    show_comp (cb, comp, len),
                    error_message (e));
      *err = ext4fs_errcode_to_errno (e);
      return -1;
    }
    if (ino < 1 || ino > fsi->fs->super->s_inodes_count ||
        read_inode (fsi, ino, &inode) == -1) {
      nbdkit_error ("%s: cannot read inode %u of '%s'", shown, ino,
                    show_comp (cb, comp, len));
      *err = EIO;
      return -1;
    }
    if (LINUX_S_ISLNK (inode.i_mode)) {
      CLEANUP_FREE char *target = malloc (MAX_PATH + 1);
      size_t tlen, rlen = strlen (p);

      if (target == NULL) {
        *err = errno;
        nbdkit_error ("malloc: %m");
        return -1;
      }
      if (++nlinks > MAX_SYMLINKS) {
        nbdkit_error ("%s: too many levels of symbolic links (more than %d)",
                      shown, MAX_SYMLINKS);
        *err = ELOOP;
        return -1;
      }
      if (read_symlink (fsi, ino, &inode, target, MAX_PATH + 1) == -1) {
        nbdkit_error ("%s: cannot read symbolic link '%s'", shown,
                      show_comp (cb, comp, len));
        *err = EIO;
        return -1;
      }
      tlen = strlen (target);
      if (tlen + rlen + 1 > 2 * MAX_PATH) {
        nbdkit_error ("%s: path is too long after following symbolic links",
                      shown);
        *err = ENAMETOOLONG;
        return -1;
      }
      /* rest := target + remaining (empty, or starting with '/': a
       * trailing slash stays one).
       */
      memmove (rest + tlen, p, rlen + 1);
      memcpy (rest, target, tlen);
      p = rest;
      if (target[0] == '/')
        w->depth = 1;           /* absolute: from the filesystem root */
      continue;
    }
    if (w->depth >= MAX_DEPTH) {
      nbdkit_error ("%s: directories nested too deeply", shown);
      *err = ELOOP;
      return -1;
    }
    w->stack[w->depth++] = ino;
    if (*p != '\0' && !LINUX_S_ISDIR (inode.i_mode)) {
      /* More components follow, or a trailing slash (which, as for
       * open(2), names a directory), but this is not a directory.
       */
      nbdkit_error ("%s: '%s' is not a directory", shown,
                    show_comp (cb, comp, len));
      *err = ENOTDIR;
      return -1;
    }
  }

  if (confine) {
    size_t i;
    bool inside = w->depth >= root_depth;
    for (i = 0; inside && i < root_depth; ++i)
      inside = w->stack[i] == root_stack[i];
    if (!inside) {
      nbdkit_error ("%s: resolves outside ext4root=%s (through a symbolic "
                    "link or '..'): refused", shown, root_path);
      *err = EACCES;
      return -1;
    }
  }
  return 0;
}

int
export_set_root (struct ext4fs_fs *fsi, const char *root)
{
  struct walk w = { .stack = { EXT2_ROOT_INO }, .depth = 1 };
  struct ext2_inode_large inode;
  CLEANUP_FREE char *shown = NULL;
  int err;

  if (root == NULL)
    return 0;
  shown = export_display_name (root);
  if (shown == NULL) {
    nbdkit_error ("malloc: %m");
    return -1;
  }
  if (walk_path (fsi, root, shown, &w, 0, &err) == -1)
    return -1;
  if (read_inode (fsi, w.stack[w.depth - 1], &inode) == -1 ||
      !LINUX_S_ISDIR (inode.i_mode)) {
    nbdkit_error ("ext4root=%s: not a directory", shown);
    return -1;
  }
  memcpy (root_stack, w.stack, w.depth * sizeof w.stack[0]);
  root_depth = w.depth;
  snprintf (root_path, sizeof root_path, "%s", shown);
  return 0;
}

int
export_resolve (struct ext4fs_fs *fsi, const char *path, int client,
                ext2_ino_t *ino, int *err)
{
  struct walk w;
  struct ext2_inode_large inode;
  CLEANUP_FREE char *shown = NULL;
  const char *p;

  if (path == NULL || *path == '\0') {
    nbdkit_error ("no file name: with ext4file=exportname the client must "
                  "give the path of a file in the filesystem as the export "
                  "name");
    *err = ENOENT;
    return -1;
  }
  shown = export_display_name (path);
  if (shown == NULL) {
    *err = errno;
    nbdkit_error ("malloc: %m");
    return -1;
  }
  if (client) {
    /* Refuse '.' and '..' components outright: clients name files. */
    for (p = path; *p; ) {
      size_t len;
      while (*p == '/')
        p++;
      len = strcspn (p, "/");
      if ((len == 1 && p[0] == '.') || (len == 2 && p[0] == '.' && p[1] == '.')) {
        nbdkit_error ("%s: export names may not contain '.' or '..' "
                      "components", shown);
        *err = EINVAL;
        return -1;
      }
      p += len;
    }
    memcpy (w.stack, root_stack, root_depth * sizeof root_stack[0]);
    w.depth = root_depth;
  }
  else {
    w.stack[0] = EXT2_ROOT_INO;
    w.depth = 1;
  }
  if (walk_path (fsi, path, shown, &w, client, err) == -1)
    return -1;
  *ino = w.stack[w.depth - 1];
  if (read_inode (fsi, *ino, &inode) == -1) {
    nbdkit_error ("%s: cannot read inode %u", shown, *ino);
    *err = EIO;
    return -1;
  }
  if (!LINUX_S_ISREG (inode.i_mode)) {
    nbdkit_error ("%s: is %s; only regular files can be served",
                  shown, mode_name (inode.i_mode));
    *err = LINUX_S_ISDIR (inode.i_mode) ? EISDIR : EINVAL;
    return -1;
  }
  if (*ino < EXT2_FIRST_INODE (fsi->fs->super)) {
    nbdkit_error ("%s: is reserved inode %u (journal, resize or other "
                  "filesystem-internal data), not a file: refused", shown,
                  *ino);
    *err = EACCES;
    return -1;
  }
  return 0;
}

/*----------------------------------------------------------------------
 * Listing.
 */

struct dirent_copy {
  ext2_ino_t ino;
  int type;
  char name[EXT2_NAME_LEN + 1];
};

DEFINE_VECTOR_TYPE (dirent_vector, struct dirent_copy);

/* A bound for corrupt directories: 2^19 entries (about 130 MiB of
 * copies).
 */
#define MAX_DIR_ENTRIES 524288

struct dir_list {
  dirent_vector v;
  int failed;
};

static int
list_cb (struct ext2_dir_entry *dirent, int offset, int blocksize,
         char *buf, void *priv)
{
  struct dir_list *l = priv;
  int len = ext2fs_dirent_name_len (dirent);
  struct dirent_copy *d;

  if ((len == 1 && dirent->name[0] == '.') ||
      (len == 2 && dirent->name[0] == '.' && dirent->name[1] == '.') ||
      dirent->inode == 0)
    return 0;
  if (l->v.len >= MAX_DIR_ENTRIES || dirent_vector_reserve (&l->v, 1) == -1) {
    l->failed = 1;
    return DIRENT_ABORT;
  }
  d = &l->v.ptr[l->v.len++];
  d->ino = dirent->inode;
  d->type = ext2fs_dirent_file_type (dirent);
  memcpy (d->name, dirent->name, len);
  d->name[len] = '\0';
  return 0;
}

/* Bounds for a walk over a hostile image: directories visited in all
 * (a directory hard-linked into itself would otherwise make the walk
 * exponential), and the ancestors of the current directory.
 */
#define MAX_DIRS_VISITED 100000

struct list_state {
  size_t count;                 /* exports added */
  size_t dirs;                  /* directories visited */
  ext2_ino_t ancestors[MAX_DEPTH];
};

static int
list_dir (struct ext4fs_fs *fsi, ext2_ino_t dir, char *path, size_t plen,
          int depth, struct nbdkit_exports *exports, struct list_state *st)
{
  struct dir_list l = { 0 };
  errcode_t e;
  size_t i;
  int d;

  if (depth >= MAX_DEPTH || st->dirs >= MAX_DIRS_VISITED)
    return 0;
  for (d = 0; d < depth; ++d)
    if (st->ancestors[d] == dir) {
      nbdkit_debug ("ext4fs: directory inode %u contains itself "
                    "(corrupt filesystem): not listed again", dir);
      return 0;
    }
  st->ancestors[depth] = dir;
  st->dirs++;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fsi->lock);
    e = ext2fs_dir_iterate (fsi->fs, dir, 0, NULL, list_cb, &l);
  }
  if (e || l.failed) {
    nbdkit_debug ("ext4fs: listing directory inode %u: %s", dir,
                  e ? error_message (e) : "too many entries");
    dirent_vector_reset (&l.v);
    return 0;                   /* skip it, keep listing */
  }
  for (i = 0; i < l.v.len && st->count < MAX_EXPORTS; ++i) {
    const struct dirent_copy *c = &l.v.ptr[i];
    struct ext2_inode_large inode;
    size_t nlen = strlen (c->name);

    if (plen + 1 + nlen > MAX_PATH)
      continue;                 /* names over 4096 bytes are skipped */
    if (c->ino < 1 || c->ino > fsi->fs->super->s_inodes_count ||
        read_inode (fsi, c->ino, &inode) == -1)
      continue;
    path[plen] = '/';
    memcpy (path + plen + 1, c->name, nlen + 1);
    if (LINUX_S_ISREG (inode.i_mode) &&
        c->ino >= EXT2_FIRST_INODE (fsi->fs->super)) {
      char desc[128 + sizeof fsi->note];

      /* The note (a read-write open refused, and why) goes with every
       * export: a client listing them is shown the remedy.
       */
      snprintf (desc, sizeof desc, "%" PRIu64 " bytes, inode %u%s%s",
                (uint64_t) EXT2_I_SIZE (&inode), c->ino,
                fsi->note[0] ? "; " : "", fsi->note);
      if (nbdkit_add_export (exports, path, desc) == -1) {
        dirent_vector_reset (&l.v);
        return -1;
      }
      st->count++;
    }
    else if (LINUX_S_ISDIR (inode.i_mode)) {
      if (list_dir (fsi, c->ino, path, plen + 1 + nlen, depth + 1,
                    exports, st) == -1) {
        dirent_vector_reset (&l.v);
        return -1;
      }
    }
    path[plen] = '\0';
  }
  dirent_vector_reset (&l.v);
  return 0;
}

int
export_list (struct ext4fs_fs *fsi, struct nbdkit_exports *exports)
{
  CLEANUP_FREE char *path = malloc (MAX_PATH + EXT2_NAME_LEN + 2);
  CLEANUP_FREE struct list_state *st = calloc (1, sizeof *st);
  size_t plen;

  if (path == NULL || st == NULL) {
    nbdkit_error ("malloc: %m");
    return -1;
  }
  /* Names are listed as clients must give them: relative to ext4root
   * (which is where client names are looked up), with a leading '/'.
   */
  plen = 0;
  path[0] = '\0';
  return list_dir (fsi, root_stack[root_depth - 1], path, plen, 0,
                   exports, st);
}
