/* ext4fs: exports: from a path (fixed ext4file= or the client's export
 * name) to an inode, and the list of files for nbdinfo --list.
 */
#ifndef EXT4FS_EXPORTS_H
#define EXT4FS_EXPORTS_H

#include <nbdkit-filter.h>

#include "fs.h"

/* Resolve ext4root (if set) once.  Returns -1 after nbdkit_error. */
extern int export_set_root (struct ext4fs_fs *fsi, const char *root);

/* Resolve a path to the inode of a regular file.  client != 0: the
 * name came from a client (a missing leading '/' is allowed, '.' and
 * '..' components are refused, and the result must lie inside
 * ext4root).  Symlinks are followed, at most 40 of them.  Returns 0,
 * or -1 with *err set after an nbdkit_error that names the path.
 */
extern int export_resolve (struct ext4fs_fs *fsi, const char *path, int client,
                           ext2_ino_t *ino, int *err);

/* A copy of name fit for messages (malloc'd; NULL if out of memory):
 * control characters as \xNN, backslashes doubled, at most
 * DISPLAY_MAX - 1 bytes (a longer name ends "...").
 */
#define DISPLAY_MAX 512
extern char *export_display_name (const char *name);

/* Add every regular file under ext4root (or /) to exports, depth
 * first, stopping quietly at nbdkit's limit.
 */
extern int export_list (struct ext4fs_fs *fsi, struct nbdkit_exports *exports);

#endif /* EXT4FS_EXPORTS_H */
