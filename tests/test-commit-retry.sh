#!/usr/bin/env bash
# A failed write of a commit block (chained commits, ext4 with a
# journal): the plugin fails exactly that write, once
# (tests/nbdkit-failnth-filter.c below ext4fs).  The commit's log and
# the data it points at are durable already, so the journal does not
# abort: the NBD flush fails with EIO, the commit stays staged, and the
# next flush writes its commit block again.  Then:
#  stop:  writes and flushes go on after the failed one, reads see
#         every write, and a clean stop leaves a clean filesystem
#         (no recovery needed) that passes e2fsck -fn and holds every
#         byte;
#  crash: nbdkit is killed right after the failed flush: a replay of a
#         copy gives a consistent filesystem, every byte as before the
#         failed flush but for the write it was to commit (old or new);
#  crash-after-retry: killed right after the flush that retried: the
#         replay holds every byte, that write's included (its flush
#         succeeded).
# The write that fails is found by counting: an allocating write and
# a flush make W writes below, the last of them the commit block of
# the flush's second step; the same again, with the Wth failing.
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
requires e2fsck -V
failnth=$(test_filter failnth)
cd "$tmpdir"

cat > cbr.py <<'EOF'
import errno, os, sys
import e4test as t

sock, ctl, orig_path, out, phase = sys.argv[1:6]
bs = 4096
orig = open(orig_path, "rb").read()
size = len(orig)
rnd = t.client_rng(scale=1)
h = t.connect(sock, size=size)
m = t.Shadow(h, orig)
hole = 1024 * 1024

def arm(spec):
    for suffix in (".count", ".log"):
        if os.path.exists(ctl + suffix):
            os.unlink(ctl + suffix)
    open(ctl, "w").write(spec + "\n")

m.randwrite(rnd, hole, bs)              # the session's first change
h.flush()

# Count: one allocating write and its flush (twice: the first may
# also write the journal superblock).
for i in range(2):
    arm("count%d 0 w" % i)
    m.randwrite(rnd, hole + (4 + 4 * i) * bs, bs)
    h.flush()
    w = int(open(ctl + ".count").read())
    os.unlink(ctl)
    print("an allocating write and a flush: %d writes below" % w)
if w < 3:
    t.fail("expected a data write, a log and a commit block, got %d writes" % w)

# The same, with the commit block's write failing.
arm("fail %d w" % w)
off, new = hole + 16 * bs, rnd.randbytes(bs)
old = bytes(m[off:off + bs])
m.pwrite(new, off)
t.expect_errno("the flush whose commit block failed", h.flush, errno.EIO)
os.unlink(ctl)
if not os.path.exists(ctl + ".log"):
    t.fail("nothing was injected")
m.check_all("reads after the failed commit block")
if phase == "crash":
    m.data[off:off + bs] = old
    m.save(out)
    t.save_one_write(out, off, old, new)
    # Still connected (a disconnect commits), until the server is dead.
    t.touch(out + ".ready")
    t.wait_for(out + ".killed", "the server to be killed")
    sys.exit(0)

h.flush()                               # writes the commit block again
if phase == "crash-after-retry":
    m.save(out)
    t.touch(out + ".ready")
    t.wait_for(out + ".killed", "the server to be killed")
    sys.exit(0)

# The session goes on: allocating writes, overwrites, flushes, and a
# new connection.
m.randwrite(rnd, hole + 32 * bs, 3 * bs)
m.randwrite(rnd, 5 * bs, bs)
h.flush()
m.check_all("after the retried commit")
h2 = t.connect(sock, size=size)
t.Shadow(h2, m.data).check_all("a new connection")
h2.shutdown()
h.shutdown()
m.save(out)
EOF

rm -rf src
mkdir src
truncate -s $((8*1024*1024)) src/f
head -c $((1024*1024)) /dev/urandom | dd of=src/f conv=notrunc status=none
truncate -s 64M base.img
mke2fs -q -F -t ext4 -b 4096 -d src base.img

for phase in stop crash crash-after-retry; do
    echo "=== $phase"
    rm -f img img.chk out out.* ctl ctl.* srv.err
    cp --sparse=always base.img img
    sock=$tmpdir/sock-$phase
    start_nbdkit "$sock" --filter="$FILTER" --filter="$failnth" file img \
        ext4file=/f failnth-file="$tmpdir/ctl" 2> srv.err
    if [ $phase = stop ]; then
        python3 cbr.py "$sock" "$tmpdir/ctl" src/f out "$phase" ||
            { tail -20 srv.err; fail "$phase: client checks"; }
    else
        # The server is killed while the client is still connected.
        python3 cbr.py "$sock" "$tmpdir/ctl" src/f out "$phase" &
        cpid=$!
        for ((i=0; i<600; i++)); do
            [ -e out.ready ] && break
            kill -0 $cpid 2>/dev/null || break
            sleep 0.1
        done
        [ -e out.ready ] || { tail -20 srv.err; fail "$phase: client checks"; }
        pid=$(cat "$sock.pid")
        kill -9 "$pid"
        wait_gone "$pid" || fail "$phase: nbdkit did not die"
        touch out.killed
        wait $cpid || fail "$phase: the client failed"
    fi
    grep -q "writing the commit block.*written again at the next flush" srv.err ||
        { tail -20 srv.err; fail "$phase: no failed commit block reported"; }
    grep -E 'Sanitizer|Segmentation|Aborted|journal was aborted' srv.err &&
        fail "$phase: crash or abort"
    case $phase in
        stop)
            stop_nbdkit "$sock"
            needs_recovery img &&
                fail "stop: the image still needs recovery"
            state=$(dumpe2fs -h img 2>/dev/null | sed -n 's/^Filesystem state: *//p')
            [ "$state" = clean ] || fail "stop: filesystem state '$state'"
            fsck_clean img
            dump_cmp img /f out
            ;;
        crash*)
            needs_recovery img ||
                fail "$phase: a killed writer left no recovery pending"
            replay_copy img
            fsck_clean img.chk
            rm -f dump.out
            debugfs -R "dump /f $tmpdir/dump.out" img.chk >/dev/null 2>&1
            if [ $phase = crash ]; then
                python3 -m e4test onewrite dump.out out \
                        'the write whose commit block failed' ||
                    fail "crash: content after the replay"
            else
                cmp dump.out out || fail "crash-after-retry: content after the replay"
            fi
            ;;
    esac
done
echo "a failed commit block was written again, nothing lost"
