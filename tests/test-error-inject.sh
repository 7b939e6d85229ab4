#!/usr/bin/env bash
# Errors from the plugin underneath ext4fs reach the client as
# errors, nbdkit keeps serving, and no metadata is left half-written.
# nbdkit-error-filter sits BELOW ext4fs (the first --filter is the
# outermost) and is switched on and off by creating and removing its
# trigger files (error-*-file=), which is deterministic:
#  0. the first write of the process (which marks the filesystem not
#     clean) fails while writes fail, and works afterwards;
#  1. reads of data fail with EIO while reads fail, and succeed after;
#     an unaligned overwrite (read-modify-write) fails too;
#  2. writes (into holes, over data, aligned, unaligned, crossing from
#     data into a hole, FUA) fail with EIO while writes fail;
#     afterwards every byte outside the failed ranges is unchanged and
#     each byte inside is either the old or the new content, the
#     result is stable, and the same ranges can be written again;
#  3. a flush with metadata to write back fails while writes fail and
#     succeeds after;
#  4. the connection keeps working throughout, new connections work,
#     and after SIGTERM e2fsck -fn is clean and the file is exactly
#     what the client last read.
# (nbdkit 1.32's error filter has no flush-specific error: a flush
# fails through the write-back of metadata, which are pwrites.)
source "$srcdir/functions.sh"
requires nbdsh --version
requires python3 -c 'import nbd'
requires debugfs -V
requires nbdkit --filter=error null --dump-plugin
cd "$tmpdir"

cat > err.py <<'EOF'
import errno, os, sys
import nbd
import e4test as t

sock, orig_path, out, rerr, werr = sys.argv[1:6]
bs = int(sys.argv[6])
data_end = int(sys.argv[7])
orig = open(orig_path, "rb").read()
size = len(orig)
rnd = t.client_rng(scale=1)
h = t.connect(sock, size=size)
m = t.Shadow(h, orig)

on = t.touch                  # the error filter fails while its file exists
def off(f):
    if os.path.exists(f):
        os.unlink(f)

def expect_eio(what, fn):
    t.expect_errno(what, fn, errno.EIO)

def write_ok(o, n, flags=0):
    m.randwrite(rnd, o, n, flags)
    m.check(o, n, "read-back of %d+%d" % (o, n))

# Ranges of failed writes: (what, off, old, new).
failed = []
def write_fail(what, o, n, flags=0):
    buf = rnd.randbytes(n)
    old = bytes(m[o:o+n])
    expect_eio(what, lambda: h.pwrite(buf, o, flags))
    failed.append((what, o, old, buf))

def settle_failed():
    """With errors off: outside the failed ranges nothing changed;
    inside, each byte is the old or the new content.  Then take what
    is there as the expected content."""
    got = h.pread(size, 0)
    ok = bytearray(size)          # 1 where a failed write may have changed a byte
    for what, o, old, new in failed:
        for i in range(len(old)):
            g = got[o+i]
            if g != old[i] and g != new[i]:
                t.fail("%s: byte %d is %d, neither old %d nor new %d" %
                       (what, o + i, g, old[i], new[i]))
            ok[o+i] = 1
    for i in range(size):
        if not ok[i] and got[i] != m[i]:
            t.fail("byte %d outside the failed writes changed: %d, "
                   "expected %d" % (i, got[i], m[i]))
    landed = sum(1 for what, o, old, new in failed
                 if got[o:o+len(new)] == new and new != old)
    print("failed writes: %d, of which landed completely: %d" %
          (len(failed), landed))
    m[:] = got
    m.check_all("stable after failed writes (a second read)")
    failed.clear()

hole = 1024 * 1024            # the file is a hole from 1M to its end

# 0. The very first write of the process fails, then works.
on(werr)
write_fail("first write (over data)", 3 * bs, bs)
write_fail("first write (hole)", hole, bs)
off(werr)
settle_failed()
m.check_all("after the failed first writes")
write_ok(3 * bs, bs)
write_ok(hole, bs)
h.flush()

# 1. Reads.
on(rerr)
for o, n in ((0, 1), (0, bs), (bs + 5, 3 * bs), (data_end - 10, 20),
             (0, data_end), (3 * bs, bs), (hole, bs)):
    expect_eio("pread %d+%d" % (o, n), lambda: h.pread(n, o))
# Unaligned overwrite of data: read-modify-write fails at the read.
write_fail("unaligned overwrite during read errors", 5 * bs + 3, 100)
off(rerr)
settle_failed()
m.check_all("after read errors")

# 2. Writes.
on(werr)
write_fail("hole, aligned", hole + 8 * bs, 2 * bs)
write_fail("hole, unaligned", hole + 20 * bs + 5, 3 * bs)
write_fail("hole, tiny", hole + 40 * bs + 1000, 7)
write_fail("hole, large", hole + 64 * bs, 300 * 1024)
write_fail("data, aligned", 8 * bs, 4 * bs)
write_fail("data, unaligned", 20 * bs + 77, bs + 500)
write_fail("data into hole", data_end - 3000, 2 * bs)
write_fail("hole, FUA", hole + 100 * bs + 9, bs, nbd.CMD_FLAG_FUA)
write_fail("data, FUA", 30 * bs, bs, nbd.CMD_FLAG_FUA)
# Reads still work while writes fail.
if h.pread(data_end, 0) is None:
    t.fail("read failed")
off(werr)
settle_failed()
m.check_all("after write errors")
# The same ranges can be written now.
for o, n in ((hole + 8 * bs, 2 * bs), (hole + 20 * bs + 5, 3 * bs),
             (hole + 40 * bs + 1000, 7), (hole + 64 * bs, 300 * 1024),
             (8 * bs, 4 * bs), (20 * bs + 77, bs + 500),
             (data_end - 3000, 2 * bs)):
    write_ok(o, n)
write_ok(hole + 100 * bs + 9, bs, nbd.CMD_FLAG_FUA)
write_ok(30 * bs, bs, nbd.CMD_FLAG_FUA)
m.check_all("after rewriting")

# 3. Flush: make metadata dirty (an allocating write), then flush
# with write errors on.
write_ok(hole + 500 * bs + 3, 5 * bs)
on(werr)
expect_eio("flush with metadata to write back", lambda: h.flush())
off(werr)
h.flush()
m.check_all("after the failed flush")
# Again, with a flush on another connection.
write_ok(hole + 600 * bs, 2 * bs)
h2 = t.connect(sock, size=size)
on(werr)
expect_eio("flush (other connection)", lambda: h2.flush())
expect_eio("flush (again)", lambda: h.flush())
off(werr)
h2.flush()
t.Shadow(h2, m.data).check_all("the second connection")
h2.shutdown()

# 4. Mixed: reads and writes fail together, then a last round.
on(rerr); on(werr)
expect_eio("pread (both)", lambda: h.pread(bs, 0))
write_fail("hole (both)", hole + 700 * bs, bs)
write_fail("data (both)", 40 * bs + 1, 10)
off(rerr); off(werr)
settle_failed()
write_ok(hole + 700 * bs + 100, 200)
h.flush()
m.check_all("final")
h.shutdown()

# A fresh connection sees the same.
m.h = t.connect(sock, size=size)
m.check_all("final (new connection)")
m.h.shutdown()
m.save(out)
EOF

export SEED=$RANDOM
echo "SEED=$SEED"

for flavour in ext4 ext2-1k ext3; do
    echo "=== $flavour"
    case $flavour in
        ext4)    mkfs=(-t ext4 -b 4096); bs=4096 ;;
        ext2-1k) mkfs=(-t ext2 -b 1024); bs=1024 ;;
        ext3)    mkfs=(-t ext3 -b 4096); bs=4096 ;;
    esac
    rm -rf src img out rerr werr srv.err
    mkdir src
    # /f: 8M+3; data in the first 512K+11, hole after.
    data_end=$((512*1024 + 11))
    truncate -s $((8*1024*1024 + 3)) src/f
    head -c $data_end /dev/urandom | dd of=src/f conv=notrunc status=none
    truncate -s 64M img
    mke2fs -q -F "${mkfs[@]}" -d src img

    sock=$tmpdir/sock-$flavour
    start_nbdkit $sock --filter="$FILTER" --filter=error file img \
        ext4file=/f error=EIO \
        error-pread-rate=100% error-pread-file=$tmpdir/rerr \
        error-pwrite-rate=100% error-pwrite-file=$tmpdir/werr \
        error-zero-rate=100% error-zero-file=$tmpdir/werr \
        error-trim-rate=100% error-trim-file=$tmpdir/werr \
        2> srv.err
    python3 err.py $sock src/f out $tmpdir/rerr $tmpdir/werr $bs $data_end ||
        { tail -20 srv.err; fail "error injection checks failed ($flavour)"; }
    kill -0 "$(cat $sock.pid)" || fail "nbdkit died"
    grep -q 'injecting EIO error' srv.err ||
        fail "the error filter injected nothing"
    grep -E 'Sanitizer|Segmentation|Aborted|marking the filesystem' srv.err &&
        fail "server crashed or marked the filesystem as broken"
    stop_nbdkit $sock
    fsck_clean img
    dump_cmp img /f out
done
echo "plugin errors reach the client, metadata stays consistent"
