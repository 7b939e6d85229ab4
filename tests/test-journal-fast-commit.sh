#!/usr/bin/env bash
# Filesystems with fast commits (mke2fs -O fast_commit), made by the
# kernel (loop mount):
#  1. Pending fast commits: a file written and fsync'd (each fsync a
#     fast commit) after the last full commit, the backing file copied
#     while mounted.  The journal's fast-commit area (it starts one
#     block after the log: jbd2's j_fc_first = j_last + 1) begins with
#     a head for the transaction after the last full one, which ext4fs
#     cannot replay.  -r: served, with a warning that the newest
#     changes may be missing, the image unchanged; read-write: every
#     writable client refused with a message naming e2fsck, the server
#     stays up, the image unchanged.  After e2fsck -y -E journal_only
#     (which replays fast commits), served read-write with the bytes
#     the kernel had, and written.
#  2. A stale fast-commit area (the filesystem unmounted cleanly after
#     fast commits): ext4fs writes into the file (holes and data, with
#     flushes) and is killed with SIGKILL; the kernel's replay (mount),
#     e2fsck's and ours (-r, in memory) all give the acknowledged
#     bytes, and e2fsck -fn is clean.
# Each ends with e2fsck -fn and a byte comparison.
source "$srcdir/functions.sh"
source "$srcdir/journal-kernel-lib.sh"

mkdir -p src
head -c 300000 /dev/urandom > src/old

# client.py SOCK EXPORT EXPECTED OUT [WRITES]: check the whole file
# against EXPECTED, then (WRITES > 0) that many 4 KiB writes at
# random blocks (into holes and over data) with a flush every 16, and
# save what the file must hold to OUT.
cat > client.py <<'EOF'
import sys, os, random
import e4test as t
sock, export, expf, outf = sys.argv[1:5]
n = int(sys.argv[5]) if len(sys.argv) > 5 else 0
h = t.connect(sock, export)
m = t.Shadow(h, open(expf, "rb").read())
m.check_all("before writing")
rnd = random.Random(17)
for i in range(n):
    m.pwrite(os.urandom(4096), rnd.randrange(len(m.data) // 4096) * 4096)
    if i % 16 == 15:
        h.flush()
h.flush()
m.check_all("after writing")
m.save(outf)
h.shutdown()
EOF

mkfs_fc ()
{
    rm -f "$1"
    truncate -s 64M "$1"
    mke2fs -q -F -t ext4 -b 4096 -O fast_commit \
        -E lazy_itable_init=0,lazy_journal_init=0 -d src "$1" ||
        fail "mke2fs -O fast_commit failed"
}
# Six 4 KiB writes into the sparse /disk, each fsync'd: fast commits.
fc_writes ()
{
    local i
    for i in 1 2 3 4 5 6; do
        head -c 4096 /dev/urandom |
            dd of="$mnt/disk" bs=4096 seek=$((i * 97)) conv=notrunc,fsync status=none
    done
}
fc_tags () { debugfs -c -R logdump "$1" 2>/dev/null | sed -n '/Fast Commit Area/,$p' | grep -c "tag $2" || true; }

echo "=== 1. pending fast commits"
mkfs_fc live.img
loop_mount live.img "commit=60,noinit_itable" || fail "mount failed"
truncate -s 16M "$mnt/disk"
sync                            # the file itself in a full commit, home
fc_writes
cp "$mnt/disk" kernel.disk
copy_live live.img copy.img
loop_umount
rm -f live.img
has_feature copy.img needs_recovery || fail "test setup: the copy does not need recovery"
n=$(fc_tags copy.img ADD_RANGE)
[ "$n" -ge 1 ] || fail "test setup: no fast commit (ADD_RANGE) in the copy's journal"
echo "  the copy's fast-commit area: $n ADD_RANGE tag(s)"
sha=$(sha_of copy.img)

# -r: served (as of the last full commit), a warning, image unchanged.
srv_start ro -r --filter="$FILTER" file copy.img ext4file=exportname
/usr/bin/python3 -c '
import sys, e4test as t
h = t.connect(sys.argv[1], "/disk")
open("ro.disk", "wb").write(h.pread(h.get_size(), 0))' "$tmpdir/ro.sock" ||
    bad "-r: /disk could not be read"
srv_stop ro
cmp -s ro.disk kernel.disk &&
    bad "test setup: -r served the kernel's bytes: no fast commit was pending"
grep -i 'warning' "$tmpdir/ro.err" | grep -q 'fast-commit' ||
    bad "-r: no warning about the fast commits: $(errhead "$tmpdir/ro.err" 3)"
[ "$(sha_of copy.img)" = "$sha" ] || bad "-r changed the image"

# Read-write: refused, naming e2fsck; the server stays up; nothing
# written.
srv_start rw --filter="$FILTER" file copy.img ext4file=exportname
for e in /disk /old; do
    r=$(probe "$tmpdir/rw.sock" $e)
    case "$r" in REFUSED*) ;; *) bad "writable client on $e not refused: $r" ;; esac
    srv_alive rw || bad "the server died refusing $e"
done
srv_stop rw
grep -q "e2fsck -y -E journal_only" "$tmpdir/rw.err" ||
    bad "the refusal does not name e2fsck: $(errhead "$tmpdir/rw.err" 3)"
grep -q 'fast-commit' "$tmpdir/rw.err" ||
    bad "the refusal does not mention the fast commits: $(errhead "$tmpdir/rw.err" 3)"
[ "$(sha_of copy.img)" = "$sha" ] || bad "the refusing server changed the image"

# What the message says: e2fsck replays the fast commits; then the
# kernel's bytes, and writes.
e2fsck -y -E journal_only copy.img > replay.out 2>&1 ||
    { cat replay.out; fail "e2fsck -y -E journal_only failed"; }
start_nbdkit "$tmpdir/sock1" --filter="$FILTER" file copy.img ext4file=exportname \
    2> srv1.err
/usr/bin/python3 client.py "$tmpdir/sock1" /disk kernel.disk out1 64 ||
    { tail -5 srv1.err; bad "after e2fsck: /disk is not the kernel's, or writing failed"; }
stop_nbdkit "$tmpdir/sock1"
fsck_clean copy.img
dump_cmp copy.img /disk out1
rm -f copy.img

echo "=== 2. a stale fast-commit area; ext4fs writes and is killed"
mkfs_fc live.img
loop_mount live.img "noinit_itable" || fail "mount failed"
truncate -s 16M "$mnt/disk"
fc_writes
cp "$mnt/disk" kernel.disk
loop_umount
needs_recovery live.img && fail "test setup: needs recovery after umount"
n=$(fc_tags live.img HEAD)
[ "$n" -ge 1 ] || fail "test setup: no fast-commit head left in the journal"
start_nbdkit "$tmpdir/sock2" --filter="$FILTER" file live.img ext4file=exportname \
    2> srv2.err
/usr/bin/python3 client.py "$tmpdir/sock2" /disk kernel.disk out2 200 ||
    { tail -5 srv2.err; fail "writes"; }
kill -9 "$(cat "$tmpdir/sock2.pid")"
sleep 0.3
needs_recovery live.img || fail "test setup: nothing to replay after SIGKILL"
sha=$(sha_of live.img)

# Ours, in memory.
srv_start ro -r --filter="$FILTER" file live.img ext4file=exportname
/usr/bin/python3 client.py "$tmpdir/ro.sock" /disk out2 ro.out ||
    bad "-r after SIGKILL: /disk differs from what was acknowledged"
srv_stop ro
[ "$(sha_of live.img)" = "$sha" ] || bad "-r changed the image"
grep -q 'fast-commit' "$tmpdir/ro.err" &&
    bad "-r: a warning about fast commits where none is pending: $(errhead "$tmpdir/ro.err" 3)"

# e2fsck's.
cp --sparse=always live.img e.img
e2fsck -y -E journal_only e.img > replay.out 2>&1 ||
    { cat replay.out; fail "e2fsck -y -E journal_only failed"; }
fsck_clean e.img
dump_cmp e.img /disk out2

# The kernel's.
cp --sparse=always live.img k.img
if loop_mount k.img "noinit_itable"; then
    cmp -s "$mnt/disk" out2 || bad "the kernel's replay: /disk differs from what was acknowledged"
    loop_umount
    fsck_clean k.img
else
    bad "the kernel refuses to mount the image ext4fs wrote"
fi

finish
echo "fast commits: pending ones refused for writing, stale ones harmless"
