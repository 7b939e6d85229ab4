#!/usr/bin/env bash
# Freed space goes back to the storage below.
#  1. A sparse 256 MiB file in an image on the file plugin: fill it,
#     flush, trim 128 MiB through ext4fs, flush: the image's allocated
#     size drops by about 128 MiB; e2fsck -fn clean; the file reads
#     zeros in the trimmed range and is unchanged elsewhere; the other
#     file is unchanged.
#  2. The log filter below ext4fs: every Trim it passes down covers
#     only blocks that are free in the filesystem afterwards, and comes
#     after the Flush of the commit that freed them.
#  3. ext4discard=false: nothing is trimmed below.
#  4. -r: no Trim (nor Write) reaches the plugin.
#  5. ext4discardfree=true: the free space of a freshly written image
#     is trimmed at the first writable open.
source "$srcdir/functions.sh"
requires nbdsh --version
requires /usr/bin/python3 -c 'import nbd'
requires debugfs -V
requires nbdkit --filter=log null --dump-plugin
cd "$tmpdir"

bs=4096
mkdir src
truncate -s $((256 * 1024 * 1024)) src/big
head -c 500000 /dev/urandom > src/other
truncate -s 400M img
mke2fs -q -F -t ext4 -b $bs -d src img
cp img img.clean
/usr/bin/python3 -c "
import random
r = random.Random(3)
with open('pattern', 'wb') as f:
    for i in range(256): f.write(r.randbytes(1 << 20))"

alloc () { echo $(( $(stat -c %b "$1") * 512 / 1024 / 1024 )); }   # MiB

# 1 and 2.
rm -f log
nbdkit_srv -U - --filter="$FILTER" --filter=log file img ext4file=/big \
    logfile=log --run '/usr/bin/python3 -c "
import e4test as t
h = t.connect(\"$uri\")
pat = open(\"pattern\", \"rb\").read()
for off in range(0, len(pat), 1 << 22):
    h.pwrite(pat[off:off + (1 << 22)], off)
h.flush()
open(\"filled\", \"w\").write(\"\")
import os
os.system(\"stat -c %b img > filled\")
h.trim(128 << 20, 64 << 20)
h.flush()
"'
before=$(( $(cat filled) * 512 / 1024 / 1024 ))
after=$(alloc img)
echo "allocated: $before MiB after the fill, $after MiB after the trim"
[ $((before - after)) -ge 120 ] ||
    fail "the trim gave back only $((before - after)) MiB below (expected ~128)"
fsck_clean img
/usr/bin/python3 -c "
p = bytearray(open('pattern', 'rb').read())
p[64 << 20:192 << 20] = bytes(128 << 20)
open('expected', 'wb').write(p)"
dump_cmp img /big expected
dump_cmp img /other src/other

# Every Trim covers free blocks only, after a Flush.
/usr/bin/python3 - img <<'EOF' || fail "a Trim below was not safe"
import re, sys
import e4test as t
img = sys.argv[1]
bs = 4096
lines = open("log").read().splitlines()
trims, flushes_before = [], []
nflush = 0
for l in lines:
    if "...Flush id=" in l and "return=0" in l:
        nflush += 1             # a completed Flush
    m = re.search(r" Trim id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)", l)
    if m:
        trims.append((int(m.group(1), 16), int(m.group(2), 16), nflush))
if not trims:
    sys.exit("no Trim reached the plugin")
# The blocks in use now (after the session): no Trim may touch one.
free = t.free_blocks_of(img)
for off, cnt, nf in trims:
    if nf == 0:
        sys.exit("a Trim before any Flush")
    for blk in range(off // bs, (off + cnt) // bs):
        if blk not in free:
            sys.exit("Trim of block %d, which is in use" % blk)
print("%d Trims below, all of free blocks, each after a Flush" % len(trims))
EOF

# 3. ext4discard=false.
cp img.clean img2
rm -f log
nbdkit_srv -U - --filter="$FILTER" --filter=log file img2 ext4file=/big \
    logfile=log ext4discard=false --run '/usr/bin/python3 -c "
import e4test as t
h = t.connect(\"$uri\")
h.pwrite(b\"x\" * (8 << 20), 0); h.flush(); h.trim(8 << 20, 0); h.flush()
"'
grep -q " Trim " log && fail "ext4discard=false: a Trim reached the plugin"
fsck_clean img2

# 4. -r.
sha=$(sha256sum < img)
rm -f log
nbdkit_srv -U - -r --filter="$FILTER" --filter=log file img ext4file=/big \
    logfile=log --run 'nbdcopy "$uri" /dev/null'
grep -q -E " (Trim|Write|Zero) " log && fail "-r: a Trim, Write or Zero reached the plugin"
[ "$(sha256sum < img)" = "$sha" ] || fail "-r changed the image"

# 5. ext4discardfree=true: the free space is given back at open.
cp img.clean img3
# Garbage in 60 MiB of free blocks (the largest free range).
range=$(dumpe2fs img3 2>/dev/null | /usr/bin/python3 -c "
import sys
import e4test as t
best = (0, 0)
for a, b in t.free_block_ranges(sys.stdin.read()):
    if b - a > best[1] - best[0]:
        best = (a, b)
print(best[0], best[1] - best[0] + 1)")
set -- $range
[ "$2" -ge $((60 * 256)) ] || fail "test setup: no 60 MiB free range ($range)"
dd if=/dev/urandom of=img3 bs=$bs seek="$1" count=$((60 * 256)) conv=notrunc status=none
before=$(alloc img3)
nbdkit_srv -U - --filter="$FILTER" file img3 ext4file=/other \
    ext4discardfree=true --run 'nbdsh -u "$uri" -c "h.pwrite(b\"y\", 0)"'
after=$(alloc img3)
echo "ext4discardfree: $before MiB -> $after MiB"
[ $((before - after)) -ge 50 ] || fail "ext4discardfree gave back only $((before - after)) MiB"
fsck_clean img3
echo "ok"
