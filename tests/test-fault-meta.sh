#!/usr/bin/env bash
# Failures INSIDE ext4fs's metadata path, in the middle of one
# request's changes: libext2fs's Nth metadata read or write fails
# (-D ext4fs.fail_meta_read=N / fail_meta_write=N, io.h), before it
# reaches the journal writer's cache, as a failure of the cache (out
# of memory) or of its read of a block it does not hold would.  Since
# metadata goes through the cache, a failure of the plugin below shows
# only at a flush (test-fault-nth.sh); this is what reaches the extent
# and indirect-block code in the middle of a change.
#
# For each request: one run with -D ext4fs.count_meta=1 learns the
# numbers of the metadata reads and writes the request and its flush
# make; then one run for each of them, failing it.  Every time:
#  1. the fault reached the client (the request or its flush failed
#     with EIO; never a silent success);
#  2. the whole file still reads, from the same and from a new
#     connection: every byte outside the request unchanged, every byte
#     inside old or new;
#  3. after a clean stop: marked clean => e2fsck -fn passes and the
#     file holds what the client read; journal needs recovery => its
#     replay alone gives a consistent filesystem; else (not clean)
#     e2fsck -fy repairs it, and every byte outside the request is
#     still there.
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
cd "$tmpdir"
# The map verification (-D ext4fs.verify_map) reads the tree itself:
# its reads would be counted and failed too.
export EXT4FS_NO_VERIFY_MAP=1

cat > req.py <<'EOF'
import nbd, sys, os, errno, re
import e4test as t
sock, log, expf, kind, o, n, setup, phase = sys.argv[1:9]
o = int(o); n = int(n); bs = 1024

def counts():
    # The last numbers logged (count_meta) so far.
    t = open(log).read()
    r = [int(x) for x in re.findall(r"metadata read #(\d+):", t)]
    w = [int(x) for x in re.findall(r"metadata write #(\d+):", t)]
    return (max(r) if r else 0, max(w) if w else 0)

def injected():
    return "test fault: metadata" in open(log).read()

h = t.connect(sock)
exp = bytearray(open(expf, 'rb').read()); size = len(exp)
if h.pread(size, 0) != exp:
    sys.exit("content differs before the request")
# Setup: the first change of the process, and what the request needs.
h.pwrite(bytes(exp[0:bs]), 0)
if setup != "-":
    so, sn = map(int, setup.split("+"))
    h.zero(sn, so, nbd.CMD_FLAG_NO_HOLE)
    exp[so:so+sn] = bytes(sn)
h.flush()
if phase == "count":
    before = counts()
elif injected():
    sys.exit("the fault came during the setup: the counts are not stable")
old = bytes(exp[o:o+n])
new = os.urandom(n) if kind == "write" else bytes(n)
err = None
try:
    if kind == "trim":
        h.trim(n, o)
    elif kind == "zero":
        h.zero(n, o, nbd.CMD_FLAG_NO_HOLE)
    elif kind == "punch":
        h.zero(n, o)
    else:
        h.pwrite(new, o)
    h.flush()
except nbd.Error as e:
    err = e
if phase == "count":
    after = counts()
    if err is not None:
        sys.exit("the request failed without a fault: %s" % err)
    # Reads and writes the request and its flush made: first, last.
    open("range", "w").write("%d %d %d %d\n" % (before[0] + 1, after[0],
                                                before[1] + 1, after[1]))
    print("    reads #%d-#%d, writes #%d-#%d" % (before[0] + 1, after[0],
                                                before[1] + 1, after[1]))
    sys.exit(0)
inj = injected()
print("    %s: %s, %s" % (phase, "injected" if inj else "nothing injected",
                         "failed: %s" % err if err else "succeeded"))
if inj and err is None:
    sys.exit("a metadata %s failed inside, but the request and its flush "
             "succeeded" % phase)
if not inj and err is not None:
    sys.exit("nothing was injected, but the request failed: %s" % err)
if err is not None and err.errnum != errno.EIO:
    sys.exit("expected EIO, got %s" % err)
def check(got, what):
    i = t.first_diff(got[:o], exp[:o])
    if i is None and (j := t.first_diff(got[o+n:], exp[o+n:])) is not None:
        i = o + n + j
    if i is not None:
        sys.exit("%s: byte %d outside the request changed" % (what, i))
    for i in range(n):
        if got[o+i] != old[i] and got[o+i] != new[i]:
            sys.exit("%s: byte %d inside the request is neither old nor new"
                     % (what, o + i))
try:
    got = h.pread(size, 0)
except nbd.Error as e:
    sys.exit("reading the file after the failed request: %s" % e)
check(got, "same connection")
h.shutdown()
h = t.connect(sock)
try:
    got2 = h.pread(size, 0)
except nbd.Error as e:
    sys.exit("reading the file from a new connection: %s" % e)
if got2 != got:
    sys.exit("a new connection reads other content (first at byte %d)"
             % t.first_diff(got2, got))
h.shutdown()
open("last", "wb").write(got)
open("before", "wb").write(exp)
open("new", "wb").write(new)
EOF

# /f: $2 segments of 4 KiB data, each followed by a 4 KiB hole (1 KiB
# blocks; 300: full extent leaves), then a hole to 4 MiB.
make_image ()
{
    rm -rf src base.img
    mkdir src
    /usr/bin/python3 -c '
import os, sys
f = open("src/f", "wb"); f.truncate(4 * 1024 * 1024)
for i in range(int(sys.argv[1])):
    f.seek(i * 8192); f.write(os.urandom(4096))' "$2"
    truncate -s 32M base.img
    # shellcheck disable=SC2086
    mke2fs -q -F $1 -d src base.img
}

# run_one PHASE DFLAG...: a fresh server and image, the request once.
run_one ()
{
    local phase=$1; shift
    rm -f img last before new srv.err sock sock.pid
    cp base.img img
    cp src/f exp
    start_nbdkit "$tmpdir/sock" -v -D ext4fs.count_meta=1 "$@" \
        --filter="$FILTER" file img ext4file=/f 2> srv.err
    /usr/bin/python3 req.py "$tmpdir/sock" srv.err exp "$kind" "$o" "$n" \
        "$setup" "$phase" || { grep -E "error|fault" srv.err | tail -5;
                               fail "$name, $phase"; }
    stop_nbdkit "$tmpdir/sock"
    grep -E 'Sanitizer|Segmentation|Aborted' srv.err && fail "$name: crash"
    [ "$phase" = count ] && return 0
    local state
    state=$(dumpe2fs -h img 2>/dev/null | sed -n 's/^Filesystem state: *//p')
    if dumpe2fs -h img 2>/dev/null |
       grep -q '^Filesystem features:.*needs_recovery'; then
        # An aborted journal: its replay alone repairs it.
        e2fsck -E journal_only -y img > fsck.out 2>&1 || :
        fsck_clean img
        rm -f dump.out
        debugfs -R "dump /f $tmpdir/dump.out" img >/dev/null 2>&1
        /usr/bin/python3 -m e4test repaired dump.out before new "$o" "$n" ||
            fail "$name, $phase: data lost after replay"
    elif [ "$state" = clean ]; then
        fsck_clean img
        dump_cmp img /f last
    else
        e2fsck -fy img > fsck.out 2>&1 || :
        e2fsck -fn img > fsck2.out 2>&1 ||
            { cat fsck.out fsck2.out; fail "$name, $phase: not repaired"; }
        rm -f dump.out
        debugfs -R "dump /f $tmpdir/dump.out" img >/dev/null 2>&1
        /usr/bin/python3 -m e4test repaired dump.out before new "$o" "$n" ||
            { cat fsck.out; fail "$name, $phase: data lost"; }
    fi
    runs=$((runs + 1))
}

runs=0
sweep ()
{
    name=$1 kind=$2 o=$3 n=$4 setup=$5
    local r0 r1 w0 w1 k
    echo "=== $name: $kind $o+$n"
    run_one count
    read -r r0 r1 w0 w1 < range
    [ "$w1" -ge "$w0" ] || fail "$name: the request made no metadata write"
    for ((k = w0; k <= w1; k++)); do
        run_one "write#$k" -D ext4fs.fail_meta_write="$k"
    done
    for ((k = r0; k <= r1; k++)); do
        run_one "read#$k" -D ext4fs.fail_meta_read="$k"
    done
}

K=1024
make_image "-t ext4 -b 1024 -O ^has_journal -m 0" 300
sweep "trim splitting an extent" trim $((800*K + K)) $((2*K)) -
sweep "zero without MAY_TRIM inside an extent" zero $((816*K + K)) $((2*K)) -
sweep "write into a hole between extents" write $((805*K)) $((2*K)) -
sweep "write into an unwritten extent" write $((1201*K)) $((2*K)) $((1200*K))+$((4*K))

make_image "-t ext2 -b 1024 -m 0" 300
sweep "ext2: write needing two new indirect blocks" write $((3851*K)) $((3*K)) -
sweep "ext2: trim" trim $((800*K)) $((12*K)) -

make_image "-t ext4 -b 1024 -m 0" 300
sweep "journal: punch splitting an extent" punch $((808*K + K)) $((2*K)) -
sweep "journal: write into a hole between extents" write $((805*K)) $((2*K)) -

echo "$runs runs, every metadata fault reached the client, nothing outside was lost"
