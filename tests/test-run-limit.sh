#!/usr/bin/env bash
# The cached block map of a file without extents (indirect blocks: the
# map is built whole) holds at most 4 Mi runs; here the test-only flag
# -D ext4fs.max_runs=40 lowers that.  (Extent files have partial maps,
# loaded and cut back by leaf, with no limit: test-frag-map.sh.)
#  1. Writes into holes that each add a run work up to the limit; the
#     one that could cross it fails with ENOSPC (EFBIG below) and a
#     message, before anything changed.  Then the file still reads,
#     overwrites and writes into unwritten extents that add no run
#     work, a zero without MAY_TRIM that would split an extent writes
#     zeros in place, a trim that would split one fails, a trim of
#     whole extents frees runs and makes room again.
#  2. A file more fragmented than the limit when opened: reads fail
#     with EIO, and its extent tree is walked once, not at every
#     request.
# Ends with a clean stop, e2fsck -fn and a byte comparison.  All of
# it without and with a journal.
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
import nbd, sys, os, errno
import e4test as t
sock, expf, outf = sys.argv[1:4]
bs = 4096
h = t.connect(sock, "/f")
m = t.Shadow(h, open(expf, "rb").read())
def check(what):
    m.check_all(what)
def write(o, n):
    m.pwrite(os.urandom(n), o)
def refused(what, fn):
    t.expect_errno(what + " (past the run limit)", fn, errno.ENOSPC,
                   after=lambda: check("after " + what),
                   errname="ENOSPC (EFBIG)")

# Each write in the middle of a hole adds one run, up to the limit.
runs = int(sys.argv[4])
for i in range(40 - runs):
    write((i * 8 + 5) * bs, bs)
check("at the limit")
refused("a write into a hole past the limit",
        lambda: h.pwrite(os.urandom(bs), ((40 - runs) * 8 + 5) * bs))
write(3, 100)                           # overwrites work
write(8 * bs + 100, 2 * bs)
# Zero without MAY_TRIM inside an extent would split it: zeros in place.
mid = int(sys.argv[5])
m.zero(bs, mid * bs, nbd.CMD_FLAG_NO_HOLE)
check("zero at the limit")
refused("a trim splitting an extent", lambda: h.trim(bs, mid * bs))
# Trimming whole extents takes runs away; then there is room again.
m.trim(4 * 8 * bs, 20 * 8 * bs)
check("after trimming four extents")
write(((41 - runs) * 8 + 5) * bs, bs)
h.flush()
check("end")
h.shutdown()

# A file more fragmented than the limit.
g = t.connect(sock, "/g")
for i in range(5):
    t.expect_errno("read of a file past the run limit",
                   lambda: g.pread(bs, i * bs), errno.EIO)
g.shutdown()
m.save(outf)
EOF

start_nbdkit "$tmpdir/sock" -D ext4fs.max_runs=40 --filter="$FILTER" \
    file img ext4file=exportname 2> srv.err
/usr/bin/python3 runs.py "$tmpdir/sock" expected out "$runs" "$mid" ||
    { tail -5 srv.err; fail "run limit checks"; }
stop_nbdkit "$tmpdir/sock"
grep -q "too fragmented: this write would take its block map past 40 runs" srv.err ||
    fail "no message for the refused write"
walks=$(grep -c "more than 40 fragments" srv.err || :)
[ "$walks" -eq 1 ] || fail "the tree of a too fragmented file was walked $walks times (expected once)"
grep -qE "marking the filesystem|aborting the journal" srv.err &&
    fail "marked with errors, or the journal aborted"
fsck_clean img
dump_cmp img /f out
}

flavour "-O ^has_journal,^extent,^64bit"
flavour "-O ^extent,^64bit"         # journaled
echo "the run limit refuses writes before crossing it"
