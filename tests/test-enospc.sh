#!/usr/bin/env bash
# Full filesystems (mke2fs -m 0: no root reserve to hide in).
# libext2fs allocates blocks of its own while a file is mapped
# (indirect blocks, extent-tree nodes), beyond the data blocks:
#  1. indirect files, 1 KiB blocks: a 32 MiB write into a sparse file with room
#     for the data but not for the ~130 indirect blocks it needs fails
#     with ENOSPC before anything changed, and the filesystem is not
#     marked with errors: smaller writes into holes, overwrites and a
#     flush keep working;
#  2. ext4, a file whose root (in the inode) is full of extents, with
#     no free block left: a trim that splits an extent and a write into
#     a hole fail with ENOSPC and change nothing; zeroes (with and
#     without MAY_TRIM), which would split an extent too, write zeros
#     in place instead and succeed (with FAST_ZERO: ENOTSUP); every byte
#     outside is unchanged, the filesystem is not marked with errors,
#     later requests work;
#  3. the same on a journaled ext4 image: the write after the trim that
#     freed blocks finds them held until the trim's transaction commits
#     (counted as not free), fails with ENOSPC before changing anything,
#     and succeeds on its retry after the commit; the journal is never
#     aborted.
# Every part ends with a clean stop, e2fsck -fn and a byte comparison.
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
cd "$tmpdir"

free_blocks () { dumpe2fs -h "$1" 2>/dev/null | awk '/^Free blocks:/ { print $3 }'; }

# make_full IMG SIZE MKFS_ARGS... : an image holding src/ plus /fill,
# sized so that about $target blocks stay free.
make_full ()
{
    local img=$1 size=$2 free fillblocks i; shift 2
    rm -f "$img" src/fill
    truncate -s "$size" "$img"
    mke2fs -q -F "$@" -d src "$img"
    free=$(free_blocks "$img")
    # The fill file's own metadata: about 1/256 more with indirect
    # blocks of 1 KiB; a second try corrects the estimate.
    fillblocks=$(( (free - target) * 255 / 256 ))
    for i in 1 2 3; do
        head -c $(( fillblocks * bs )) /dev/zero | tr '\0' 'F' > src/fill
        rm -f "$img"
        truncate -s "$size" "$img"
        mke2fs -q -F "$@" -d src "$img"
        free=$(free_blocks "$img")
        [ "$free" -eq "$target" ] && return 0
        fillblocks=$(( fillblocks + free - target ))
    done
    [ "$free" -ge "$target" ] && [ "$free" -le $(( target + 8 )) ] ||
        fail "could not leave $target blocks free (got $free)"
}

cat > enospc.py <<'EOF'
import nbd, sys, os, errno
import e4test as t
sock, expf, outf, bs, part = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
exp = open(expf, "rb").read()
h = t.connect(sock, size=len(exp))
m = t.Shadow(h, exp)
def check(what):
    m.check_all(what)
def enospc(what, fn):
    t.expect_errno(what, fn, errno.ENOSPC, after=lambda: check("after " + what))
def write(o, n):
    m.pwrite(os.urandom(n), o)
if part == "ext2":
    enospc("32 MiB write into a hole", lambda: h.pwrite(os.urandom(32 << 20), 8 << 20))
    write(8 << 20, 1 << 20)         # a smaller allocating write works
    write(0, 3 * bs)                # overwrites work
    write(100 * bs + 7, 2000)
    h.flush()
else:
    seg = 16 * bs                   # 5 blocks of data at 0, seg, 2*seg, 3*seg
    enospc("trim splitting an extent", lambda: h.trim(2 * bs, seg + bs))
    enospc("write into a hole", lambda: h.pwrite(os.urandom(bs), 8 * bs))
    # Zeroes would split an extent too: zeros are written in place
    # instead (FAST_ZERO: refused, that is not fast).
    t.expect_errno("FAST_ZERO that cannot be fast",
                   lambda: h.zero(2 * bs, 2 * seg + 2 * bs, nbd.CMD_FLAG_FAST_ZERO),
                   (errno.ENOTSUP, errno.EOPNOTSUPP))
    check("after FAST_ZERO")
    m.zero(2 * bs, 2 * seg + 2 * bs)
    check("zero (MAY_TRIM)")
    m.zero(2 * bs, 3 * seg + 1 * bs, nbd.CMD_FLAG_NO_HOLE)
    check("zero without MAY_TRIM")
    # A trim of whole extents needs no new block: it works and frees.
    m.trim(seg, 0)
    check("trim of a whole extent")
    write(8 * bs, bs)               # now there is room again
    write(seg + 5, 100)
    h.flush()
check("end")
h.shutdown()
m.save(outf)
EOF

# 1. 1 KiB blocks, indirect mapping (ext4 without extents: flex_bg
# leaves the free space contiguous): room for 32 MiB of data and 64
# blocks more, not for the indirect blocks.
echo "== indirect, 1 KiB blocks"
bs=1024
rm -rf src; mkdir src
head -c $((1 << 20)) /dev/urandom > src/f
truncate -s 48M src/f
target=$((32768 + 64))
make_full img 256M -t ext4 -O ^extents,^64bit,^has_journal -b 1024 -m 0
echo "free blocks: $(free_blocks img)"
debugfs -R "dump /f $tmpdir/expected" img >/dev/null 2>&1
start_nbdkit "$tmpdir/sock1" --filter="$FILTER" file img ext4file=/f 2> srv1.err
/usr/bin/python3 enospc.py "$tmpdir/sock1" expected out1 $bs ext2 ||
    { tail -5 srv1.err; fail "ext2: ENOSPC checks"; }
stop_nbdkit "$tmpdir/sock1"
grep -q "marking the filesystem" srv1.err && { tail -5 srv1.err; fail "ext2: marked with errors"; }
fsck_clean img
dump_cmp img /f out1

# 2. ext4, 4 KiB blocks, four extents (the root is full), no block free.
echo "== ext4, full root, no free block"
bs=4096
rm -rf src; mkdir src
/usr/bin/python3 -c '
import os
f = open("src/f", "wb"); f.truncate(64 * 4096)
for i in range(4):
    f.seek(i * 16 * 4096); f.write(os.urandom(5 * 4096))'
target=0
make_full img 32M -t ext4 -b 4096 -m 0 -O ^has_journal
echo "free blocks: $(free_blocks img)"
[ "$(debugfs -R "ex /f" img 2>/dev/null | grep -c '^ 0/ 0')" -eq 4 ] ||
    fail "ext4: /f should have four extents in its root"
debugfs -R "dump /f $tmpdir/expected" img >/dev/null 2>&1
start_nbdkit "$tmpdir/sock2" --filter="$FILTER" file img ext4file=/f 2> srv2.err
/usr/bin/python3 enospc.py "$tmpdir/sock2" expected out2 $bs ext4 ||
    { tail -5 srv2.err; fail "ext4: ENOSPC checks"; }
stop_nbdkit "$tmpdir/sock2"
grep -q "marking the filesystem" srv2.err && { tail -5 srv2.err; fail "ext4: marked with errors"; }
fsck_clean img
dump_cmp img /f out2

# 3. The same, journaled.
echo "== ext4, journaled, full root, no free block"
make_full img 32M -t ext4 -b 4096 -m 0
echo "free blocks: $(free_blocks img)"
[ "$(debugfs -R "ex /f" img 2>/dev/null | grep -c '^ 0/ 0')" -eq 4 ] ||
    fail "ext4: /f should have four extents in its root"
debugfs -R "dump /f $tmpdir/expected" img >/dev/null 2>&1
start_nbdkit "$tmpdir/sock3" --filter="$FILTER" file img ext4file=/f 2> srv3.err
/usr/bin/python3 enospc.py "$tmpdir/sock3" expected out3 $bs ext4 ||
    { tail -5 srv3.err; fail "journal: ENOSPC checks"; }
stop_nbdkit "$tmpdir/sock3"
grep -qE "marking the filesystem|aborting the journal" srv3.err &&
    { tail -5 srv3.err; fail "journal: marked with errors or aborted"; }
dumpe2fs -h img 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' &&
    fail "journal: left needing recovery"
fsck_clean img
dump_cmp img /f out3
echo "full filesystems: ENOSPC before any change, nothing marked broken"
