#!/usr/bin/env bash
# Writes through the filter on several filesystem flavours: ext4 with
# 4K blocks, ext4 64bit+metadata_csum, ext4 with 1K blocks, ext3 and
# ext2 (indirect blocks).  For each: overwrite a fully allocated file
# with nbdcopy, unaligned writes into a sparse file (holes, data, and
# writes spanning both), a write past the end that must fail and change
# nothing, FUA writes, and qemu-img convert -n onto the export.  The
# expected content is kept by the test; e2fsck must stay clean.
source "$srcdir/functions.sh"
requires nbdsh --version
requires nbdcopy --version
requires qemu-img --version
requires debugfs -V
cd "$tmpdir"

# Unaligned file sizes on purpose.
full_size=$((3*1024*1024 + 5))
sparse_size=$((5*1024*1024 + 777))
qemu_size=$((4*1024*1024 + 512))

# nbdsh script for the sparse file.  Reads the original content from
# $EXPECTED (which it updates in place at the end) and checks every
# write by reading back through the server, then the whole file.
cat > sparse.py <<'EOF'
import os
import nbd
import e4test as t
exp_path = os.environ["EXPECTED"]
m = t.Shadow(h, open(exp_path, "rb").read())
size = h.get_size()
assert size == m.size, (size, m.size)
rnd = t.client_rng(scale=1)

def w(off, n, flags=0):
    m.randwrite(rnd, off, n, flags)
    m.check(off, n, "read-back at %d+%d" % (off, n))

# The classic unaligned pieces.
w(4093, 3)
w(1, 5000)
# Inside the first hole (the source has data only at 0..64K,
# 1M..1M+4K, 3M..3M+100K, and the last 3000 bytes).
w(200000, 1)
w(300001, 4096)
w(400000, 65536 + 17)
# A write spanning data and hole: data 1M..1M+4K, hole after.
w(1024*1024 + 4000, 10000)
# A write spanning hole then data: hole before 3M.
w(3*1024*1024 - 5000, 9000)
# A write spanning hole, data and hole.
w(64*1024 - 100, 200)
w(3*1024*1024 - 1, 100*1024 + 2)
# Deep into the file (double-indirect territory with 1K blocks).
w(2*1024*1024 + 12345, 70000)
# The last bytes.
w(size - 1, 1)
w(size - 4500, 4400)
# Many small scattered writes, some of them FUA.
for i in range(200):
    n = rnd.randint(1, 9000)
    off = rnd.randint(0, size - n)
    w(off, n, nbd.CMD_FLAG_FUA if i % 3 == 0 else 0)
# FUA writes of various shapes.
w(0, 4096, nbd.CMD_FLAG_FUA)
w(4097, 12287, nbd.CMD_FLAG_FUA)
w(4*1024*1024 + 3, 300000, nbd.CMD_FLAG_FUA)

# A write past the end fails and changes nothing.  Check both the
# client-side bounds check and the server's (strict mode off).
for strict_off in (False, True):
    if strict_off:
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
    for off, n in ((size - 10, 11), (size, 1), (size + 4096, 512),
                   (size - 1, 8192)):
        t.expect_error("write past end %d+%d" % (off, n),
                       lambda: h.pwrite(b"\xff" * n, off))
h.flush()

# Whole-file read back.
m.check_all("whole-file read-back", piece=1024 * 1024)
m.save(exp_path)
EOF

for flavour in ext4 ext4-csum ext4-1k ext3 ext2; do
    echo "=== $flavour"
    case $flavour in
        ext4)      mkfs=(-t ext4 -b 4096) ;;
        ext4-csum) mkfs=(-t ext4 -b 4096 -O 64bit,metadata_csum) ;;
        ext4-1k)   mkfs=(-t ext4 -b 1024) ;;
        ext3)      mkfs=(-t ext3 -b 4096) ;;
        ext2)      mkfs=(-t ext2 -b 1024) ;;
    esac

    rm -rf src img
    mkdir -p src/dir
    head -c $full_size /dev/urandom > src/dir/full
    # Sparse file: data at 0..64K, 1M..1M+4K, 3M..3M+100K, last 3000.
    truncate -s $sparse_size src/sparse
    head -c 65536 /dev/urandom |
        dd of=src/sparse conv=notrunc bs=1 seek=0 status=none
    head -c 4096 /dev/urandom |
        dd of=src/sparse conv=notrunc oflag=seek_bytes seek=$((1024*1024)) status=none
    head -c 102400 /dev/urandom |
        dd of=src/sparse conv=notrunc oflag=seek_bytes seek=$((3*1024*1024)) status=none
    head -c 3000 /dev/urandom |
        dd of=src/sparse conv=notrunc oflag=seek_bytes \
           seek=$((sparse_size - 3000)) status=none
    # For qemu-img: sparse, with data at 1M..1M+8K and 3M..3M+1M.
    truncate -s $qemu_size src/qemu
    head -c 8192 /dev/urandom |
        dd of=src/qemu conv=notrunc oflag=seek_bytes seek=$((1024*1024)) status=none
    head -c $((1024*1024)) /dev/urandom |
        dd of=src/qemu conv=notrunc oflag=seek_bytes seek=$((3*1024*1024)) status=none
    # An unrelated file that must never change.
    head -c 50000 /dev/urandom > src/other
    truncate -s 64M img
    mke2fs -q -F "${mkfs[@]}" -d src img
    fsck_clean img

    # The sparse file really has holes.
    blocks=$(debugfs -R "stat /sparse" img 2>/dev/null |
                 sed -n 's/.*Blockcount: \([0-9]*\).*/\1/p')
    [ -n "$blocks" ] && [ "$blocks" -lt $((2*1024*1024/512)) ] ||
        fail "$flavour: /sparse is not sparse (Blockcount $blocks)"

    # 1. Full overwrite of /dir/full from random data with nbdcopy.
    head -c $full_size /dev/urandom > new-full
    nbdkit_srv -U - --filter="$FILTER" file img ext4file=/dir/full \
        --run 'nbdcopy --flush new-full "$uri"'
    fsck_clean img
    dump_cmp img /dir/full new-full

    # 2. Unaligned writes, holes, FUA, past-the-end into /sparse.
    cp src/sparse exp-sparse
    export EXPECTED=exp-sparse SEED=$RANDOM
    nbdkit_srv -U - --filter="$FILTER" file img ext4file=/sparse \
        --run 'nbdsh -u "$uri" -c "exec(open(\"sparse.py\").read())"'
    fsck_clean img
    dump_cmp img /sparse exp-sparse

    # 3. qemu-img convert -n from a raw file onto /qemu (qemu's NBD
    # client needs a 512-byte multiple size): random data, a zero
    # region over data and holes, and an unchanged region.
    cp src/qemu conv.raw
    head -c $((2*1024*1024)) /dev/urandom |
        dd of=conv.raw conv=notrunc status=none
    dd if=/dev/zero of=conv.raw conv=notrunc oflag=seek_bytes \
       seek=$((2*1024*1024 + 512)) bs=1M count=1 status=none
    head -c 1000 /dev/urandom |
        dd of=conv.raw conv=notrunc oflag=seek_bytes \
           seek=$((qemu_size - 1000)) status=none
    nbdkit_srv -U - --filter="$FILTER" file img ext4file=/qemu \
        --run 'qemu-img convert -n -f raw -O raw conv.raw "$uri"'
    fsck_clean img
    dump_cmp img /qemu conv.raw
    # And a second time, all random, so every hole gets filled.
    head -c $qemu_size /dev/urandom > conv2.raw
    nbdkit_srv -U - --filter="$FILTER" file img ext4file=/qemu \
        --run 'qemu-img convert -n -f raw -O raw conv2.raw "$uri"'
    fsck_clean img
    dump_cmp img /qemu conv2.raw

    # Nothing else changed.
    dump_cmp img /other src/other
done
