#!/usr/bin/env bash
# Files of indirect blocks (no extents) have partial maps too, loaded by
# block of pointers (until session 17 their whole map was built at
# first use, at most 4 Mi runs: past that, writes failed with EFBIG and
# a file already past it could not be read).  With the test-only
# -D ext4fs.max_runs=40 (the budget past which a map is cut back):
#  1. Writes into holes that each add a run go on past 40 runs, and
#     the map is cut back; the file reads, overwrites work, a zero
#     without MAY_TRIM inside an extent and a trim splitting one work,
#     trims of whole extents, and more writes into holes.
#  2. A file of 50 runs when opened reads whole, right.
# Ends with a clean stop, e2fsck -fn and a byte comparison of both
# files.  All of it without and with a journal.  (test-frag-map.sh
# covers the double and triple indirect trees with concurrent
# clients.)
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
cd "$tmpdir"

mkdir src
# /f: 30 extents (3 blocks of data every 8); /g: 50 extents.
/usr/bin/python3 -c '
import os
for name, n in (("f", 30), ("g", 50)):
    f = open("src/" + name, "wb"); f.truncate(64 * 8 * 4096)
    for i in range(n):
        f.seek(i * 8 * 4096); f.write(os.urandom(3 * 4096))'
# flavour MKE2FS_OPTIONS: the whole test on one image.
flavour ()
{
echo "== ext4 $1"
rm -f "$tmpdir/sock" "$tmpdir/sock.pid"
rm -f img
truncate -s 64M img
# shellcheck disable=SC2086
mke2fs -q -F -t ext4 -b 4096 $1 -d src img
cp src/f expected
# The runs of /f's map: its block ranges, those contiguous on disk
# merged.
# Also the middle block of a 3-block extent (between blocks 16 and
# 160) for the requests that would split one.
read -r runs mid < <(debugfs -R "stat /f" img 2>/dev/null | /usr/bin/python3 -c '
import re, sys
runs, end, mid = 0, None, 0
# BLOCKS: (0-2):11-13, (IND):17, (16):18, ...
for lb, le, pb in re.findall(r"\((\d+)(?:-(\d+))?\):(\d+)", sys.stdin.read()):
    lb, pb = int(lb), int(pb)
    n = int(le) - lb + 1 if le else 1
    if end != (lb, pb):
        runs += 1
    end = (lb + n, pb + n)
    if n >= 3 and 16 <= lb < 160 and lb % 8 == 0:
        mid = lb + 1
print(runs, mid)')
[ "$mid" -gt 0 ] || fail "/f has no 3-block extent"
[ "$runs" -ge 28 ] && [ "$runs" -le 36 ] || fail "/f has $runs runs, expected about 30"

cat > runs.py <<'EOF'
import nbd, sys, os
import e4test as t
sock, expf, outf, gf = sys.argv[1:5]
bs = 4096
h = t.connect(sock, "/f")
m = t.Shadow(h, open(expf, "rb").read())
def write(o, n):
    m.pwrite(os.urandom(n), o)

# Each write in the middle of a hole adds one run: past 40.
runs = int(sys.argv[5])
for i in range(50 - runs):
    write((i * 8 + 5) * bs, bs)
m.check_all("past 40 runs")
write(3, 100)                           # overwrites
write(8 * bs + 100, 2 * bs)
# A zero without MAY_TRIM inside an extent (zeros in place), a trim
# splitting one (unmapped block by block).
mid = int(sys.argv[6])
m.zero(bs, mid * bs, nbd.CMD_FLAG_NO_HOLE)
m.check_all("after a zero inside an extent")
m.trim(bs, (mid + 8) * bs)
m.check_all("after a trim splitting an extent")
m.trim(4 * 8 * bs, 20 * 8 * bs)
m.check_all("after trimming four extents")
for i in range(56, 63):
    write((i * 8 + 6) * bs, bs)
h.flush()
m.check_all("end")
h.shutdown()

# A file of 50 runs, from the start.
g = t.connect(sock, "/g")
gm = t.Shadow(g, open(gf, "rb").read())
gm.check_all("/g, 50 runs")
g.shutdown()
m.save(outf)
EOF
start_nbdkit "$tmpdir/sock" -v -D ext4fs.max_runs=40 --filter="$FILTER" \
    file img ext4file=exportname 2> srv.err
/usr/bin/python3 runs.py "$tmpdir/sock" expected out src/g "$runs" "$mid" ||
    { tail -5 srv.err; fail "writes past 40 runs"; }
stop_nbdkit "$tmpdir/sock"
grep -q "map cut from" srv.err || fail "the map was never cut back"
grep -qE "too fragmented|differs from the map on disk" srv.err &&
    fail "a run limit, or a map that differs from the disk"
grep -qE "marking the filesystem|aborting the journal" srv.err &&
    fail "marked with errors, or the journal aborted"
fsck_clean img
dump_cmp img /f out
dump_cmp img /g src/g
}

flavour "-O ^has_journal,^extent,^64bit"
flavour "-O ^extent,^64bit"         # journaled
echo "indirect files: partial maps, no run limit, every byte right"
