#!/usr/bin/env bash
# Nested filesystems: an ext4 image stored as a file inside another
# ext4 image, each level served by its own ext4fs (the inner nbdkit
# reads the outer one over NBD with the nbd plugin), both journaled.
#  1. Two client processes write in parallel into the inner file
#     (overwrites and hole fills), then flush; the bytes read back.
#  2. Both servers are killed (SIGKILL, inner first): both levels are
#     left needing recovery.
#  3. Read-only, both levels replayed in memory (-r twice): the inner
#     file reads as written, and the outer image is not changed.
#  4. Checked as a user would: the outer image replayed (e2fsck) on a
#     copy and clean; the inner image dumped from it, replayed on a
#     copy and clean; the inner file, dumped, equals what was written.
source "$srcdir/functions.sh"
requires nbdsh --version
requires nbdcopy --version
requires mke2fs -V
requires debugfs -V
requires nbdkit nbd --version
cd "$tmpdir"

mkdir in out
head -c 8M /dev/urandom > in/data
truncate -s 16M in/data             # the second half a hole
truncate -s 96M inner.img
mke2fs -q -F -t ext4 -b 4096 -d in inner.img
cp inner.img out/inner.img
truncate -s 256M outer.img
mke2fs -q -F -t ext4 -b 4096 -d out outer.img

cat > client.py <<'EOF2'
import random, sys
import e4test as t
job = int(sys.argv[2])
h = t.connect(sys.argv[1])
m = t.Shadow(h, open("in/data", "rb").read(), who="client %d" % job)
rng = random.Random(1000 + job)
# Job 0 owns the first half of each MiB, job 1 the second half.
owned = [((mib << 20) + job * (512 << 10), 512 << 10)
         for mib in range(m.size >> 20)]
for i in range(64):
    off, _ = rng.choice(owned)
    off += rng.randrange(0, 448 << 10)
    m.randwrite(rng, off, rng.choice([512, 4096, 5000, 65536]))
    if i % 16 == 15:
        h.flush()
h.flush()
for off, n in owned:
    m.check(off, n)
m.save_owned("part.%d" % job, owned)
h.shutdown()
EOF2

echo "=== 1. writes through both levels"
start_nbdkit "$tmpdir/outer.sock" --filter="$FILTER" file outer.img ext4file=/inner.img
start_nbdkit "$tmpdir/inner.sock" --filter="$FILTER" nbd socket="$tmpdir/outer.sock" ext4file=/data
inner="nbd+unix:///?socket=$tmpdir/inner.sock"
python3 client.py "$inner" 0 & p0=$!
python3 client.py "$inner" 1 & p1=$!
wait $p0 || fail "client 0 failed"
wait $p1 || fail "client 1 failed"
python3 -c 'import e4test as t; t.merge_owned("in/data", "expected", ["part.0", "part.1"])'
nbdcopy "$inner" got.1 || fail "nbdcopy of the inner file failed"
cmp got.1 expected || fail "the inner file reads other bytes than were written"

echo "=== 2. both servers killed"
for s in inner outer; do
    pid=$(cat "$tmpdir/$s.sock.pid")
    kill -9 "$pid"
    wait_gone "$pid" || fail "$s nbdkit did not die"
done
needs_recovery outer.img ||
    fail "the outer image does not need recovery after the kill"

echo "=== 3. read-only, both levels replayed in memory"
sha=$(sha256sum < outer.img)
start_nbdkit "$tmpdir/outer-ro.sock" -r --filter="$FILTER" file outer.img ext4file=/inner.img
start_nbdkit "$tmpdir/inner-ro.sock" -r --filter="$FILTER" nbd socket="$tmpdir/outer-ro.sock" ext4file=/data
nbdcopy "nbd+unix:///?socket=$tmpdir/inner-ro.sock" got.2 ||
    fail "nbdcopy of the inner file (read-only) failed"
stop_nbdkit "$tmpdir/inner-ro.sock"
stop_nbdkit "$tmpdir/outer-ro.sock"
cmp got.2 expected || fail "read-only after the crash: the inner file differs"
[ "$(sha256sum < outer.img)" = "$sha" ] || fail "the read-only sessions changed the image"

echo "=== 4. e2fsck at both levels"
replay_copy outer.img
fsck_clean outer.img.chk
debugfs -R "dump /inner.img inner.got" outer.img.chk >/dev/null 2>&1
needs_recovery inner.got ||
    fail "the inner image does not need recovery after the kill"
replay_copy inner.got
fsck_clean inner.got.chk
dump_cmp inner.got.chk /data expected
echo PASS
