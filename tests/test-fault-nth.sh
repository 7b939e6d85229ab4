#!/usr/bin/env bash
# Failures in the MIDDLE of one request's metadata changes: for each
# request below, run it once to count the writes it makes to the
# plugin, then once more for every N = 1, 2, ... with exactly the Nth
# write failing (tests/nbdkit-failnth-filter.c, below ext4fs).  Every
# time:
#  1. a request whose write below failed fails (never a silent
#     success: libext2fs swallows some write errors);
#  2. right after it, the whole file can still be read (a failed
#     request does not poison the map of data it did not touch), also
#     from a new connection, every byte outside the request is
#     unchanged and every byte inside is the old or the new content;
#  3. after a clean stop, a filesystem marked clean passes e2fsck -fn
#     and holds exactly what the client read (a failed write-back
#     write is written again at the next one); one that is not marked
#     clean is repaired by e2fsck -fy and then still holds every byte
#     outside the request (no data outside the range lost its mapping);
#  4. the times of the file are written at the stop (unless the
#     filesystem was marked as having errors, or the journal aborted),
#     even when writing them at a flush failed.
# Requests: a flush with pending times, punch splitting an extent
# (trim, zero), zero without MAY_TRIM (written -> unwritten, split in
# three), writes into a hole
# and into the middle of an unwritten extent, all in a file whose
# extent leaves are full (1 KiB blocks), the same in a file whose root
# (in the inode) is full, and writes and trims of an
# indirect (ext2) file, some needing new indirect blocks, then the same
# on a journaled ext4 image.  Each request is followed by a flush (both
# armed): metadata goes into the writer's cache, with a journal and
# without one (the ordered write-back), so the writes that fail are
# data writes and, at the flush, log and commit writes (journal) or
# write-back writes (no journal).  A failed write-back write, log write
# or commit block write fails the flush and is written again later (a
# commit block at the next flush: tests/test-commit-retry.sh; here at
# the disconnect or the stop).  Should the journal abort instead (a
# failed write it cannot write again), the image needs recovery, and
# its replay alone (no e2fsck repair) must give a consistent filesystem
# with every byte outside the request unchanged.
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
failnth=$(test_filter failnth)
cd "$tmpdir"

cat > req.py <<'EOF'
import nbd, sys, os, errno
import e4test as t
sock, ctl, expf, kind, o, n, setup, k = sys.argv[1:9]
o = int(o); n = int(n); bs = 1024
flush = kind.endswith("+flush")
kind = kind.replace("+flush", "")
h = t.connect(sock)
exp = bytearray(open(expf, 'rb').read()); size = len(exp)
if h.pread(size, 0) != exp:
    t.fail("content differs before the request")
# Setup, unarmed: the first change of the process (VALID_FS cleared)
# and what the request needs.
h.pwrite(bytes(exp[0:bs]), 0)
if setup != "-":
    so, sn = map(int, setup.split("+"))
    h.zero(sn, so, nbd.CMD_FLAG_NO_HOLE)
    exp[so:so+sn] = bytes(sn)
if flush:
    h.flush()                   # the setup committed (journal)
old = bytes(exp[o:o+n])
new = os.urandom(n) if kind == "write" else bytes(n)
open(ctl, "w").write("g%d %s w\n" % (os.getpid(), k))
err = None
try:
    if kind == "flush":
        h.flush()
    elif kind == "trim":
        h.trim(n, o)
    elif kind == "zero":
        h.zero(n, o, nbd.CMD_FLAG_NO_HOLE)
    elif kind == "punch":
        h.zero(n, o)
    else:
        h.pwrite(new, o)
    if flush:
        h.flush()
except nbd.Error as e:
    err = e
os.unlink(ctl)
injected = os.path.exists(ctl + ".log")
writes = int(open(ctl + ".count").read()) if os.path.exists(ctl + ".count") else 0
print("N=%s: %d write(s), %s, %s" % (k, writes,
      "injected" if injected else "nothing injected",
      "failed: %s" % err if err else "succeeded"))
open("writes", "w").write("%d\n" % writes)
if injected and err is None:
    sys.exit("the Nth write failed below, but the request succeeded")
if not injected and err is not None:
    sys.exit("nothing was injected, but the request failed: %s" % err)
if err is not None and err.errnum != errno.EIO:
    sys.exit("expected EIO, got %s" % err)
try:
    got = h.pread(size, 0)
except nbd.Error as e:
    sys.exit("reading the file after the failed request: %s" % e)
if got[:o] != exp[:o] or got[o+n:] != exp[o+n:]:
    i = t.first_diff(got, exp) if got[:o] != exp[:o] else t.first_diff(got, exp, o + n)
    sys.exit("byte %d outside the request changed" % i)
for i in range(n):
    if got[o+i] != old[i] and got[o+i] != new[i]:
        sys.exit("byte %d inside the request is neither old nor new" % (o + i))
if not injected and got[o:o+n] != new:
    sys.exit("the request succeeded but did not take effect")
h.shutdown()
# The same from a new connection (when the file's last close drops its
# inode and map, it is loaded again; on a filesystem marked broken they
# are kept).
h = t.connect(sock)
try:
    got2 = h.pread(size, 0)
    if got2 != got:
        i = t.first_diff(got2, got)
        t.fail("a new connection reads other content (first at byte %d, "
               "request %d+%d)" % (i, o, n))
except nbd.Error as e:
    sys.exit("reading the file from a new connection: %s" % e)
h.shutdown()
open("last", "wb").write(got)
open("before", "wb").write(exp)
open("new", "wb").write(new)
EOF

mtime () { debugfs -R "stat /f" "$1" 2>/dev/null | sed -n 's/^ *mtime: *\([^ ]*\).*/\1/p'; }

# Build /f: $2 segments of 4 KiB data followed by a 4 KiB hole (1 KiB
# blocks; 300: 300 extents, full leaves), then a hole to 4 MiB.
make_image ()
{
    rm -rf src base.img
    mkdir src
    /usr/bin/python3 -c '
import os, sys
f = open("src/f", "wb"); f.truncate(4 * 1024 * 1024)
for i in range(int(sys.argv[1])):
    f.seek(i * 8192); f.write(os.urandom(4096))' "$2"
    touch -d 2020-01-01 src/f
    truncate -s 32M base.img
    # shellcheck disable=SC2086
    mke2fs -q -F $1 -d src base.img
}

iterations=0
sweep ()
{
    local name=$1 kind=$2 o=$3 n=$4 setup=$5 k=0 writes=0 state
    echo "=== $name: $kind $o+$n"
    while :; do
        rm -f img ctl ctl.* last before new writes srv.err sock
        cp base.img img
        cp src/f exp
        start_nbdkit "$tmpdir/sock" --filter="$FILTER" --filter="$failnth" \
            file img ext4file=/f failnth-file="$tmpdir/ctl" 2> srv.err
        /usr/bin/python3 req.py "$tmpdir/sock" "$tmpdir/ctl" exp \
            "$kind" "$o" "$n" "$setup" "$k" ||
            { tail -5 srv.err; fail "$name, N=$k"; }
        stop_nbdkit "$tmpdir/sock"
        grep -E 'Sanitizer|Segmentation|Aborted' srv.err && fail "$name, N=$k: crash"
        state=$(dumpe2fs -h img 2>/dev/null | sed -n 's/^Filesystem state: *//p')
        if dumpe2fs -h img 2>/dev/null |
           grep -q '^Filesystem features:.*needs_recovery'; then
            # An aborted journal: replay only, then no problem at all.
            echo "    journal: needs recovery"
            state=aborted
            e2fsck -E journal_only -y img > fsck.out 2>&1 || :
            fsck_clean img
            rm -f dump.out
            debugfs -R "dump /f $tmpdir/dump.out" img >/dev/null 2>&1
            /usr/bin/python3 -m e4test repaired dump.out before new "$o" "$n" ||
                fail "$name, N=$k: data lost after replay"
        elif [ "$state" = clean ]; then
            fsck_clean img
            dump_cmp img /f last
        else
            echo "    state: $state"
            e2fsck -fy img > fsck.out 2>&1 || :
            e2fsck -fn img > fsck2.out 2>&1 ||
                { cat fsck.out fsck2.out; fail "$name, N=$k: not repaired"; }
            rm -f dump.out
            debugfs -R "dump /f $tmpdir/dump.out" img >/dev/null 2>&1
            /usr/bin/python3 -m e4test repaired dump.out before new "$o" "$n" ||
                { cat fsck.out; fail "$name, N=$k: data lost"; }
        fi
        # The times are written, unless the filesystem was marked
        # broken (then no metadata is written any more), or the journal
        # aborted (they were not committed: times alone need no commit).
        case $state in
            *errors*|aborted) ;;
            *) [ "$(mtime img)" != "$(mtime base.img)" ] ||
                   fail "$name, N=$k: the times of /f were not written" ;;
        esac
        iterations=$((iterations + 1))
        [ "$k" -eq 0 ] && writes=$(cat writes)
        k=$((k + 1))
        [ "$k" -gt "$writes" ] && break
    done
}

K=1024
make_image "-t ext4 -b 1024 -O ^has_journal -m 0" 300
sweep "flush with the times due" flush 0 0 -
sweep "trim splitting an extent" trim+flush $((800*K + K)) $((2*K)) -
sweep "punch (zero, MAY_TRIM) splitting an extent" punch+flush $((808*K + K)) $((2*K)) -
sweep "zero without MAY_TRIM inside an extent" zero+flush $((816*K + K)) $((2*K)) -
sweep "zero without MAY_TRIM across extents" zero+flush $((822*K + K)) $((12*K)) -
sweep "write into a hole between extents" write+flush $((805*K)) $((2*K)) -
sweep "write into an unwritten extent" write+flush $((1201*K)) $((2*K)) $((1200*K))+$((4*K))
sweep "write filling a hole (merging)" write+flush $((1604*K)) $((4*K)) -

# Four extents: the root in the inode is full.
make_image "-t ext4 -b 1024 -O ^has_journal -m 0" 4
sweep "root: zero without MAY_TRIM inside an extent" zero+flush $((8*K + K)) $((2*K)) -
sweep "root: write into a hole" write+flush $((13*K)) $((K)) -

make_image "-t ext2 -b 1024 -m 0" 300
sweep "ext2: write needing two new indirect blocks" write+flush $((3851*K)) $((3*K)) -
sweep "ext2: write into a hole inside the data" write+flush $((1605*K)) $((2*K)) -
sweep "ext2: trim" trim+flush $((800*K)) $((12*K)) -

make_image "-t ext4 -b 1024 -m 0" 300
sweep "journal: trim splitting an extent" trim+flush $((800*K + K)) $((2*K)) -
sweep "journal: zero without MAY_TRIM inside an extent" zero+flush $((816*K + K)) $((2*K)) -
sweep "journal: write into a hole between extents" write+flush $((805*K)) $((2*K)) -
sweep "journal: write into an unwritten extent" write+flush $((1201*K)) $((2*K)) $((1200*K))+$((4*K))

echo "$iterations runs, every failure reached the client, nothing outside was lost"
