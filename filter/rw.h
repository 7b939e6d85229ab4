/* ext4fs: the I/O paths: position-independent read, write, zero, trim,
 * block status and cache of one open inode.
 */
#ifndef EXT4FS_RW_H
#define EXT4FS_RW_H

#include <stdint.h>
#include <nbdkit-filter.h>

#include "inode.h"

/* All take a range already checked against ip->size by nbdkit, and
 * return 0, or -1 with *err set to a positive errno after
 * nbdkit_error.
 */
extern int rw_pread (struct ext4fs_inode *ip, void *buf, uint32_t count,
                     uint64_t offset, int *err);
extern int rw_pwrite (struct ext4fs_inode *ip, const void *buf, uint32_t count,
                      uint64_t offset, uint32_t flags, int *err);
extern int rw_zero (struct ext4fs_inode *ip, uint32_t count, uint64_t offset,
                    uint32_t flags, int *err);
extern int rw_trim (struct ext4fs_inode *ip, uint32_t count, uint64_t offset,
                    uint32_t flags, int *err);
extern int rw_extents (struct ext4fs_inode *ip, uint32_t count, uint64_t offset,
                       uint32_t flags, struct nbdkit_extents *extents, int *err);
extern int rw_cache (struct ext4fs_inode *ip, uint32_t count, uint64_t offset,
                     int *err);

#endif /* EXT4FS_RW_H */
