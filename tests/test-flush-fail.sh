#!/usr/bin/env bash
# A failed plugin flush, with and without a journal (ext4, ext2 1 KiB):
#  A. with nothing to commit and no metadata change in flight (only
#     data written in place since the last flush), the NBD flush fails
#     with EIO and the session goes on: overwrites, allocating writes
#     and flushes work afterwards, and a clean stop leaves a clean
#     filesystem holding every byte;
#  B. with an allocating write completed while the flush was in flight
#     below (its data may be what the failed flush lost), the flush
#     fails and the writer stops before that write's mapping can be
#     committed: later writes and flushes fail with EIO, reads go on,
#     and after the stop a replay (ext4) or e2fsck (ext2) of a copy
#     gives a consistent filesystem with every byte as promised (the
#     in-flight write's range old or new, nothing else changed).
#  C. (ext4) a commit queued behind such a failed flush (a write into an
#     unwritten extent completed during it, then another connection's
#     flush waiting for the commit) finds the writer stopped: it fails,
#     and nothing it would have committed becomes durable.
# The recorder filter below ext4fs fails flushes while a trigger file
# exists (or once, if it says so), and holds a flush while another
# exists (recordflushwait=).
source "$srcdir/functions.sh"
requires nbdsh --version
requires python3 -c 'import nbd'
requires debugfs -V
requires e2fsck -V

recorder=$(recorder_filter) || exit $?
cd "$tmpdir"

cat > ff.py <<'EOF'
import errno, os, sys, threading, time
import nbd
import e4test as t

sock, failf, waitf, orig_path, out = sys.argv[1:6]
bs = int(sys.argv[6])
orig = open(orig_path, "rb").read()
size = len(orig)
rnd = t.client_rng(scale=1)
h = t.connect(sock, size=size)
m = t.Shadow(h, orig)
hole = 1024 * 1024

def eio(what, fn):
    t.expect_errno(what, fn, errno.EIO)

# A. Only data in place since the last flush.
m.randwrite(rnd, hole, 4 * bs)              # allocates
h.flush()
m.randwrite(rnd, 5 * bs, 2 * bs)            # in place
t.touch(failf)
eio("A: flush with only data in place", h.flush)
os.unlink(failf)
m.randwrite(rnd, 7 * bs + 3, bs)            # in place
m.randwrite(rnd, hole + 64 * bs, 3 * bs)    # allocates
h.flush()
m.check_all("A: after the failed flush")
h2 = t.connect(sock, size=size)
t.Shadow(h2, m.data).check_all("A: a new connection")

# B. An allocating write completes while the flush waits below.
t.touch(waitf)
t.touch(failf)
res = {}
def flush():
    try:
        h.flush()
        res["r"] = "succeeded"
    except nbd.Error as e:
        res["r"] = e
th = threading.Thread(target=flush)
th.start()
t.wait_for(waitf + ".busy", "the flush to reach the plugin")
boff, new = hole + 200 * bs, rnd.randbytes(2 * bs)
old = bytes(m[boff:boff + len(new)])
h2.pwrite(new, boff)                        # allocates, during the flush
m[boff:boff + len(new)] = new
os.unlink(waitf)
th.join()
os.unlink(failf)
if res["r"] == "succeeded":
    t.fail("B: the flush failed below but the NBD flush succeeded")
if not t.is_errno(res["r"], errno.EIO):
    t.fail("B: flush: expected EIO, got %s" % t.errstr(res["r"]))
eio("B: allocating write after", lambda: h.pwrite(b"x" * bs, hole + 300 * bs))
eio("B: write in place after", lambda: h.pwrite(b"y" * bs, 9 * bs))
eio("B: flush after", h.flush)
m.check_all("B: reads after the writer stopped")
h2.shutdown()
h.shutdown()
m.save(out)
t.save_one_write(out, boff, old, new)
EOF

cat > ffc.py <<'EOF'
import errno, os, sys, threading, time
import nbd
import e4test as t

sock, failf, waitf, orig_path, out = sys.argv[1:6]
bs, uoff = int(sys.argv[6]), int(sys.argv[7])
orig = open(orig_path, "rb").read()
size = len(orig)
rnd = t.client_rng(scale=1)
h = t.connect(sock, size=size)
h2 = t.connect(sock, size=size)
h3 = t.connect(sock, size=size)
m = t.Shadow(h, orig)
m.randwrite(rnd, 3 * bs, bs)                # the session's first write
h.flush()                                   # nothing pending after this

t.touch(waitf)
open(failf, "w").write("once")
res = {}
def flush(name, hh):
    try:
        hh.flush()
        res[name] = "succeeded"
    except nbd.Error as e:
        res[name] = e
f1 = threading.Thread(target=flush, args=("plain", h))
f1.start()
t.wait_for(waitf + ".busy", "the flush to reach the plugin")
new = rnd.randbytes(2 * bs)
old = bytes(m[uoff:uoff + len(new)])
h2.pwrite(new, uoff)                        # converts, during the flush
m[uoff:uoff + len(new)] = new
f2 = threading.Thread(target=flush, args=("queued", h3))
f2.start()                                  # a commit, waiting for it
time.sleep(0.5)
os.unlink(waitf)
f1.join()
f2.join()
for name in ("plain", "queued"):
    if res[name] == "succeeded":
        t.fail("C: the %s flush succeeded after a flush below failed with "
               "a conversion pending" % name)
    if not t.is_errno(res[name], errno.EIO):
        t.fail("C: %s flush: expected EIO, got %s" % (name, t.errstr(res[name])))
m.check_all("C: reads after the writer stopped")
for hh in (h, h2, h3):
    hh.shutdown()
m.save(out)
t.save_one_write(out, uoff, old, new)
EOF

export SEED=${SEED:-$RANDOM}
echo "SEED=$SEED"
for flavour in ext4 ext2-1k; do
    echo "=== $flavour"
    case $flavour in
        ext4)    mkfs=(-t ext4 -b 4096); bs=4096 ;;
        ext2-1k) mkfs=(-t ext2 -b 1024); bs=1024 ;;
    esac
    rm -rf src img out out.json fail wait wait.busy rep.img
    mkdir src
    truncate -s $((8*1024*1024)) src/f
    head -c $((1024*1024)) /dev/urandom | dd of=src/f conv=notrunc status=none
    truncate -s 64M img
    mke2fs -q -F "${mkfs[@]}" -d src img

    sock=$tmpdir/sock-$flavour
    start_nbdkit "$sock" --filter="$FILTER" --filter="$recorder" file img \
        ext4file=/f recordfile="$tmpdir/rec.log" \
        recordfailflush="$tmpdir/fail" recordflushwait="$tmpdir/wait" \
        2> srv.err
    python3 ff.py "$sock" "$tmpdir/fail" "$tmpdir/wait" src/f out $bs ||
        { tail -20 srv.err; fail "$flavour: failed-flush checks"; }
    grep -q "a flush failed below while new metadata" srv.err ||
        { tail -20 srv.err; fail "$flavour: the writer did not say why it stopped"; }
    stop_nbdkit "$sock"
    # The writer stopped: never marked clean.  A copy is repaired by
    # the replay alone (journal) or by e2fsck (none), then checked.
    cp --sparse=always img rep.img
    if [ $flavour = ext4 ]; then
        needs_recovery rep.img ||
            fail "ext4: the journal was not left needing recovery"
        r=0; e2fsck -fy rep.img > fsck1.out 2>&1 || r=$?
        [ $r -le 1 ] || { cat fsck1.out; fail "ext4: e2fsck -fy of the copy (rc $r)"; }
        grep -vE "^(Pass|$flavour|rep.img|Recovering|Journal|Clearing)" fsck1.out |
            grep -qiE "fix|inconsist|wrong|illegal" &&
            { cat fsck1.out; fail "ext4: the replay alone did not repair it"; }
    else
        state=$(dumpe2fs -h rep.img 2>/dev/null | sed -n 's/^Filesystem state: *//p')
        [ "$state" != clean ] || fail "ext2: the filesystem was left marked clean"
        echo "ext2: left marked '$state'"
        r=0; e2fsck -fy rep.img > fsck1.out 2>&1 || r=$?
        [ $r -le 1 ] || { cat fsck1.out; fail "ext2: e2fsck -fy of the copy (rc $r)"; }
    fi
    fsck_clean rep.img
    debugfs -R "dump /f rep.out" rep.img >/dev/null 2>&1
    python3 -m e4test onewrite rep.out out 'the in-flight write' ||
        fail "$flavour: content after the repair"

    [ $flavour = ext4 ] || continue
    echo "=== $flavour: a commit queued behind the failed flush"
    sock=$tmpdir/sock-$flavour-c
    rm -f img out out.json fail wait wait.busy rep.img
    truncate -s 64M img
    mke2fs -q -F "${mkfs[@]}" -d src img
    # Blocks 512-767 of /f (2-3 MiB, inside the hole): unwritten.
    debugfs -w -R "fallocate /f 512 767" img >/dev/null 2>&1
    debugfs -R "ex /f" img 2>/dev/null | grep -q Uninit ||
        fail "test setup: /f has no unwritten extent"
    start_nbdkit "$sock" --filter="$FILTER" --filter="$recorder" file img \
        ext4file=/f recordfile="$tmpdir/rec.log" \
        recordfailflush="$tmpdir/fail" recordflushwait="$tmpdir/wait" \
        2> srv.err
    python3 ffc.py "$sock" "$tmpdir/fail" "$tmpdir/wait" src/f out $bs \
        $((512 * bs + 3 * bs)) ||
        { tail -20 srv.err; fail "$flavour: queued-commit checks"; }
    stop_nbdkit "$sock"
    cp --sparse=always img rep.img
    needs_recovery rep.img ||
        fail "ext4 (C): the journal was not left needing recovery"
    r=0; e2fsck -fy rep.img > fsck1.out 2>&1 || r=$?
    [ $r -le 1 ] || { cat fsck1.out; fail "ext4 (C): e2fsck -fy of the copy (rc $r)"; }
    fsck_clean rep.img
    debugfs -R "dump /f rep.out" rep.img >/dev/null 2>&1
    python3 -m e4test onewrite rep.out out 'the in-flight write' ||
        fail "$flavour (C): content after the repair"
done
echo "a failed flush: the session goes on when only data in place was at stake; otherwise the writer stops first"
