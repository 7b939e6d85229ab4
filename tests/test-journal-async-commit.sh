#!/usr/bin/env bash
# Journaled writes: requests go on changing metadata while a commit is
# being written (DESIGN.md §15), and nothing of that is lost or made
# inconsistent, whether the commit succeeds or fails.
#
# Client A fills one block in every two of /frag (a tree of logged
# leaf blocks) and of the first MiB of /a2 (a leaf block nothing else
# changes) and flushes; the commit is held in the middle (failnth
# filter: its flush, or its first log write, waits).  Meanwhile client
# B trims all of /frag (freeing leaf blocks of the commit being
# written) and writes into holes of /other: both must complete while
# the commit is held.  Then:
#  ok:      the commit ends; B flushes; clean stop: /frag reads zeros,
#           /other B's data, /a2 A's;
#  crash:   the commit ends; B's flush commits after a checkpoint
#           (-D ext4fs.checkpoint_first=1) and fails below at its own
#           flush: the journal aborts, and the image replays to A's
#           commit: /frag and /a2 A's data, /other zeros (the freed leaves'
#           logged contents went home with the checkpoint);
#  logfail: the held log write fails: A's flush fails, its transaction
#           goes back into the running one; B's flush commits all of
#           it (/a2's leaf too); clean stop as in "ok".
# Each ends with e2fsck -fn (after a replay of a copy where one is
# pending) and the files compared byte for byte.  With
# -D ext4fs.async_commit=0, B waits for the commit and the test fails.
source "$srcdir/functions.sh"
requires nbdsh --version
requires /usr/bin/python3 -c 'import nbd'
requires debugfs -V
failnth=$(test_filter failnth) || exit $?
cd "$tmpdir"

bs=4096
mkdir src
truncate -s $((8 * 1024 * 1024)) src/frag
truncate -s $((4 * 1024 * 1024)) src/other
truncate -s $((4 * 1024 * 1024)) src/a2
truncate -s 64M img0
mke2fs -q -F -t ext4 -b $bs -J size=8 -d src img0
/usr/bin/python3 -c "
import e4test as t
d = bytearray(8 << 20)
for b in range(0, 2048, 2):
    d[b * 4096:(b + 1) * 4096] = b'F' * 4096
open('frag.A', 'wb').write(d)
open('a2.A', 'wb').write(bytes(d[:1 << 20]) + bytes(3 << 20))
open('frag.0', 'wb').write(bytes(8 << 20))
open('other.0', 'wb').write(bytes(4 << 20))
o = bytearray(4 << 20)
for k in range(8):
    o[k * 512 * 1024:k * 512 * 1024 + 65536] = t.pattern(k, 65536, b'o')
open('other.B', 'wb').write(o)"

run_mode ()
{
    local mode=$1 sock=$tmpdir/sock.$1
    cp img0 img.$mode
    rm -f ctl ctl.hold ctl.held ctl.log ctl.count
    start_nbdkit "$sock" -v --filter="$FILTER" --filter="$failnth" \
        file img.$mode ext4file=exportname failnth-file="$tmpdir/ctl" \
        -D ext4fs.journal_stats=1 -D ext4fs.checkpoint_first=1 \
        ${EXT4FS_ASYNC_TEST_ARGS:-} 2> srv.$mode.err
    /usr/bin/python3 - "$sock" "$mode" <<'EOF2' || fail "$mode: the clients failed"
import os, sys, threading, time
import nbd
import e4test as t
sock, mode = sys.argv[1], sys.argv[2]
a = t.connect(sock, "/frag")
for b in range(0, 2048, 2):
    a.pwrite(b"F" * 4096, b * 4096)
a2 = t.connect(sock, "/a2")
for b in range(0, 256, 2):
    a2.pwrite(b"F" * 4096, b * 4096)
# Hold the commit of A's flush: at its flush, or (logfail) at its
# first log write, which is then failed.
if mode == "logfail":
    open("ctl", "w").write("g0 1 w\n")
open("ctl.hold", "w").write("w\n" if mode == "logfail" else "f\n")
th, res = t.flush_in_thread(a)
t.wait_for("ctl.held", "the commit to be held", timeout=30)
# B beside the held commit.
done = {}
def run_b():
    b = t.connect(sock, "/frag")
    b.trim(2048 * 4096, 0)
    o = t.connect(sock, "/other")
    for k in range(8):
        o.pwrite(t.pattern(k, 65536, b"o"), k * 512 * 1024)
    done["b"] = (b, o)
tb = threading.Thread(target=run_b)
tb.start()
tb.join(20)
if tb.is_alive():
    os.unlink("ctl.hold")
    t.fail("%s: B's trim and writes waited for the commit being written" % mode)
if not th.is_alive():
    t.fail("%s: A's flush returned while its commit was held" % mode)
os.unlink("ctl.hold")
th.join(60)
b, o = done["b"]
if mode == "logfail":
    if not res["r"].startswith("error"):
        t.fail("logfail: A's flush succeeded with its log write failed")
    open("ctl", "w").write("g1 0 w\n")
else:
    if res["r"] != "ok":
        t.fail("%s: A's flush: %s" % (mode, res["r"]))
if mode == "crash":
    # B's commit: the checkpoint's two flushes, then its own.
    open("ctl", "w").write("g2 3 f\n")
    t.expect_error("crash: B's flush", o.flush)
else:
    o.flush()
print("%s: A's flush: %s" % (mode, res["r"]))
EOF2
    stop_nbdkit "$sock"
    grep -E "commits written outside the locks" srv.$mode.err | tail -1
    local beside
    beside=$(sed -n 's/.* \([0-9]*\) handles started beside them.*/\1/p' srv.$mode.err | tail -1)
    [ "${beside:-0}" -gt 0 ] || fail "$mode: no handle started beside a commit"
    if [ $mode = crash ]; then
        grep -q 'commit: flush' srv.$mode.err || fail "crash: test setup: B's commit did not fail at its flush"
        dumpe2fs -h img.$mode 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' ||
            fail "crash: test setup: the image does not need recovery"
        cp img.$mode r.$mode
        e2fsck -E journal_only -y r.$mode > fsck.out 2>&1 ||
            { cat fsck.out; fail "crash: e2fsck could not replay"; }
        fsck_clean r.$mode
        dump_cmp r.$mode /frag frag.A
        dump_cmp r.$mode /other other.0
        dump_cmp r.$mode /a2 a2.A
        # And ext4fs's own replay.
        cp img.$mode s.$mode
        nbdkit_srv -U - --filter="$FILTER" file s.$mode ext4file=/frag \
            --run 'nbdinfo --size "$uri"' > /dev/null 2> srv2.err ||
            { cat srv2.err; fail "crash: ext4fs could not replay"; }
        fsck_clean s.$mode
        dump_cmp s.$mode /frag frag.A
        dump_cmp s.$mode /other other.0
        dump_cmp s.$mode /a2 a2.A
    else
        dumpe2fs -h img.$mode 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' &&
            fail "$mode: the image still needs recovery after a clean stop"
        fsck_clean img.$mode
        dump_cmp img.$mode /frag frag.0
        dump_cmp img.$mode /other other.B
        dump_cmp img.$mode /a2 a2.A
    fi
    echo "$mode: ok"
}

for mode in ok crash logfail; do
    run_mode $mode
done
echo "ok"
