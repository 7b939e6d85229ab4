#!/usr/bin/env bash
# ext4fs changes extent trees itself (bmap.c, "one atomic step at a
# time"): inserts merged with their neighbours, conversions, punches
# that split an extent, node splits and the tree growing a level.
# Random single-block writes, zeroes without MAY_TRIM, trims and
# overwrites on 1 KiB blocks grow the tree of one file to depth 2 or
# more; every map update is checked against the tree on disk
# (-D ext4fs.verify_map=1, from functions.sh), every byte against a
# shadow copy, and at the end e2fsck -fn must find nothing (index
# starts, block counts, order of extents, checksums).
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
cd "$tmpdir"

cat > drive.py <<'EOF'
import random, sys
import nbd
import e4test as t
sock, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
bs = 1024
rnd = random.Random(seed)
h = t.connect(sock)
size = h.get_size()
nblk = size // bs
m = t.Shadow(h, bytes(size))
for step in range(6000):
    op = rnd.random()
    b = rnd.randrange(nblk)
    if op < 0.70:
        # every other block: many extents
        b -= b % 2
        m.randwrite(rnd, b * bs, bs)
    elif op < 0.85:
        n = rnd.randrange(1, 6)
        n = min(n, nblk - b)
        m.zero(n * bs, b * bs, nbd.CMD_FLAG_NO_HOLE)
    elif op < 0.95:
        n = min(rnd.randrange(1, 4), nblk - b)
        m.trim(n * bs, b * bs)
    else:
        # write across blocks: holes, unwritten and written at once
        n = min(rnd.randrange(2, 9), nblk - b)
        m.randwrite(rnd, b * bs, n * bs)
    if step % 1000 == 999:
        m.check_all("step %d" % step)
m.check_all("end")
h.flush()
h.shutdown()
m.save(out)
EOF

for flavour in "ext4 -b 1024 -O ^has_journal" "ext4 -b 1024 -O metadata_csum"; do
    echo "== $flavour"
    rm -rf src img expected sock
    mkdir src
    truncate -s 6M src/f
    truncate -s 64M img
    # shellcheck disable=SC2086
    mke2fs -q -F -t $flavour -d src img
    seed=$RANDOM
    echo "seed $seed"
    start_nbdkit "$tmpdir/sock" --filter="$FILTER" file img ext4file=/f
    /usr/bin/python3 drive.py "$tmpdir/sock" expected $seed ||
        fail "$flavour: seed $seed"
    stop_nbdkit "$tmpdir/sock"
    # debugfs prints "LEVEL/ DEPTH  ENTRY/ ENTRIES ..." per node entry.
    depth=$(debugfs -R "ex /f" img 2>/dev/null | awk 'NR == 2 { print $2 + 0 }')
    extents=$(debugfs -R "ex /f" img 2>/dev/null | awk -v d="$depth" '$1 == d "/" { n++ } END { print n + 0 }')
    echo "tree depth $depth, $extents extents"
    [ "$depth" -ge 2 ] || fail "$flavour: the tree did not grow to depth 2"
    fsck_clean img
    dump_cmp img /f expected
done
echo "extent trees stay consistent"
