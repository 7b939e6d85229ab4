/* ext4fs: multi-mount protection through our own channel (see mmp.c). */
#ifndef EXT4FS_MMP_H
#define EXT4FS_MMP_H

#include <stdbool.h>

#include "fs.h"

struct ext4fs_mmp;

/* Claim the MMP block of fsi (opened read-write, with the mmp
 * feature): takes 2 x interval + 1 seconds at least (11 s or more),
 * twice if the block was not clean.  Starts the updater thread.
 * Returns NULL after nbdkit_error if the filesystem is in use.
 */
extern struct ext4fs_mmp *mmp_start (struct ext4fs_fs *fsi);

/* Has another node written the MMP block since we claimed it?  Then
 * nothing more may be written to the filesystem.
 */
extern bool mmp_lost (struct ext4fs_mmp *mmp);

/* Stop the updater thread (before the last metadata writes). */
extern void mmp_stop_thread (struct ext4fs_mmp *mmp);

/* Stop the thread if running, mark the block clean (unless lost), and
 * free.  NULL is allowed.
 */
extern void mmp_release (struct ext4fs_mmp *mmp);

#endif /* EXT4FS_MMP_H */
