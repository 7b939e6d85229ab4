#!/usr/bin/env bash
# meta_bg with s_first_meta_bg > 0 (what the kernel's online resize
# leaves when it runs out of reserved GDT blocks): only the first
# s_first_meta_bg descriptor blocks are in the old place after each
# backup superblock; the blocks after them are free for files.
# ext4fs's metadata map must not claim them (it did: every group
# descriptor block, so a file using the block after the old area was
# refused with EIO).  debugfs sets s_first_meta_bg = 1 on a meta_bg
# filesystem with 41 groups (2 descriptor blocks), e2fsck -fy makes
# the bitmaps agree, and debugfs writes a file that uses those blocks.
# Then: -r serves its bytes, a writer overwrites and fills holes in a
# sparse file, and e2fsck -fn is clean with the expected contents.
source "$srcdir/functions.sh"
requires debugfs -V
requires e2fsck -V
requires nbdcopy --version
requires python3 -c 'import nbd'
cd "$tmpdir"

truncate -s 40M img
mke2fs -q -F -t ext4 -b 1024 -g 1024 -N 2048 -O meta_bg,^resize_inode,^64bit img
debugfs -w -R "ssv first_meta_bg 1" img >/dev/null 2>&1
e2fsck -fy img >/dev/null 2>&1 || true
dumpe2fs -h img 2>/dev/null | grep -q '^First meta block group: *1$' ||
    fail "test setup: could not set s_first_meta_bg"
head -c 20M /dev/urandom > big
debugfs -w -R "write big big" img >/dev/null 2>&1
truncate -s 4M sparse
debugfs -w -R "write sparse sparse" img >/dev/null 2>&1
fsck_clean img
# The file must use a block ext4fs used to call metadata: the second
# descriptor block's place after group 3's backup superblock.
gd3=$(dumpe2fs img 2>/dev/null | awk '/^Group 3:/{g=1} g && /Backup superblock at/{sub(",","",$4); print $4 + 2; exit}')
[ -n "$gd3" ] || fail "test setup: group 3 has no backup superblock"
debugfs -R "icheck $gd3" img 2>/dev/null | awk 'NR==2{print $2}' | grep -q '^12$' ||
    fail "test setup: /big does not use block $gd3: $(debugfs -R "icheck $gd3" img 2>&1)"

nbdkit_srv -r -U - --filter="$FILTER" file img ext4file=/big \
    --run 'nbdcopy "$uri" out' || fail "-r: reading /big failed"
cmp out big || fail "-r: /big has the wrong bytes"

# Writing: overwrite all of /big, fill /sparse.
head -c 20M /dev/urandom > big2
head -c 4M /dev/urandom > sparse2
nbdkit_srv -U - --filter="$FILTER" file img ext4file=exportname \
    --run 'nbdcopy big2 "nbd+unix:///big?socket=$unixsocket" &&
           nbdcopy sparse2 "nbd+unix:///sparse?socket=$unixsocket"' ||
    fail "writing failed"
fsck_clean img
dump_cmp img /big big2
dump_cmp img /sparse sparse2
echo "meta_bg with s_first_meta_bg > 0: served, written, e2fsck clean"
