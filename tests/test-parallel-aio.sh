#!/usr/bin/env bash
# 64 requests in flight on one connection (test-parallel-aio.c),
# random unaligned reads and writes over holes and data, checked
# against a shadow copy; then e2fsck and a byte comparison.
source "$srcdir/functions.sh"
prog=${TEST_PARALLEL_AIO:-${abs_builddir:-.}/test-parallel-aio}
requires test -x "$prog"
requires debugfs -V
cd "$tmpdir"

export SEED=$RANDOM
echo "SEED=$SEED"

for flavour in ext4 ext4-1k-csum ext2-1k; do
    echo "=== $flavour"
    case $flavour in
        ext4)         mkfs=(-t ext4 -b 4096) ;;
        ext4-1k-csum) mkfs=(-t ext4 -b 1024 -O 64bit,metadata_csum) ;;
        ext2-1k)      mkfs=(-t ext2 -b 1024) ;;
    esac
    rm -rf src img out
    mkdir src
    # 32M+7, data at 0..1M and 16M..17M, holes elsewhere.
    truncate -s $((32*1024*1024 + 7)) src/f
    head -c $((1024*1024)) /dev/urandom | dd of=src/f conv=notrunc status=none
    head -c $((1024*1024)) /dev/urandom |
        dd of=src/f conv=notrunc oflag=seek_bytes seek=$((16*1024*1024)) status=none
    truncate -s 128M img
    mke2fs -q -F "${mkfs[@]}" -d src img

    sock=$tmpdir/sock-$flavour
    start_nbdkit $sock --filter="$FILTER" file img ext4file=/f
    "$prog" $sock src/f out || fail "$flavour: test-parallel-aio failed"
    stop_nbdkit $sock
    fsck_clean img
    dump_cmp img /f out
done
