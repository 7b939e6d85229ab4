#!/usr/bin/env bash
# A serializing layer underneath (--filter=noparallel below ours): the
# filter must serialize its calls into the shared context, and 4
# connections reading and writing at once still get the right bytes.
# The overlap filter (tests/nbdkit-overlap-filter.c) below both fails
# any call that overlaps another on one context, so the test fails if
# ext4fs's lane lock does not serialize its calls.
source "$srcdir/functions.sh"
requires python3 -c "import nbd"
overlap=$(test_filter overlap)
export here=$(cd "$srcdir" && pwd)
cd "$tmpdir"
mkdir src
head -c $((8*1024*1024)) /dev/urandom > src/f
truncate -s 128M img
mke2fs -q -F -t ext4 -d src img

nbdkit_srv -v -U - --filter="$FILTER" --filter=noparallel --filter="$overlap" \
    file img ext4file=/f serialize=requests overlap=requests \
    --run 'nbdcopy --connections=4 --threads=4 "$uri" out' 2> log
cmp out src/f || fail "copy differs"
grep "error: overlap:" log && fail "calls into the serialized context overlapped"

# Many small requests from 4 clients at once (nbdcopy's few large ones
# rarely meet in the plugin): each must see the right bytes, and no two
# calls may meet in the serialized context.
nbdkit_srv -U - --filter="$FILTER" --filter=noparallel --filter="$overlap" \
    file img ext4file=/f serialize=requests overlap=requests \
    --run '/usr/bin/python3 "$here/parallel-readers.py" "$uri" src/f' 2> log-readers ||
    { grep -m3 "error" log-readers; fail "concurrent readers through the serialized context failed"; }
grep "error: overlap:" log-readers && fail "reads into the serialized context overlapped"
grep -q "serializing calls into the plugin" log ||
    fail "the filter did not notice the serializing thread model"

# Concurrent writers through the serialized context.
sock=$tmpdir/sock
start_nbdkit "$sock" --filter="$FILTER" --filter=noparallel --filter="$overlap" \
    file img ext4file=/f serialize=requests overlap=requests
cp src/f expected
pids=()
for i in 0 1 2 3; do
    head -c $((512*1024)) /dev/urandom > part$i
    dd if=part$i of=expected bs=512K seek=$((i*2)) conv=notrunc status=none
    python3 -m e4test put "$sock" $((i*2*512*1024)) part$i &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || fail "writer $p failed"; done
stop_nbdkit "$sock"
fsck_clean img
dump_cmp img /f expected
