#!/usr/bin/env bash
# A commit with much file data written since the last flush flushes it
# first, with the handle lock only shared (DESIGN.md §15, "flush
# ahead"), so that allocating writes go on during the long flush.
# With a journal (ext4) and without (ext2, the write-back writer):
#  1. 12 MiB written into a hole, then an NBD flush: the server reports
#     at least one flush ahead of a commit; a clean stop leaves a clean
#     filesystem holding every byte.
#  2. The same, but the first plugin flush fails (the one ahead of the
#     commit): the NBD flush fails with EIO, the writer stops (the data
#     that flush lost may be what new metadata points at): later
#     writes fail with EIO, reads go on.  After the stop a repair of a
#     copy (the journal replay alone, ext4; e2fsck, ext2) gives a
#     consistent filesystem where each 1 MiB piece of the write reads
#     as all zeros or all the data (a timer commit may have made some
#     durable before), and every other byte is as before.
# The recorder filter below ext4fs fails the next flush when asked.
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
requires e2fsck -V

recorder=$(recorder_filter) || exit $?
cd "$tmpdir"
export SEED=$RANDOM
echo "SEED=$SEED"

cat > fa.py <<'EOF'
import errno, os, sys
import e4test as t

sock, failf, orig_path, out, case = sys.argv[1:6]
MIB = 1 << 20
orig = open(orig_path, "rb").read()
h = t.connect(sock, size=len(orig))
m = t.Shadow(h, orig)
rnd = t.client_rng()
for k in range(12):
    m.randwrite(rnd, 4 * MIB + k * MIB, MIB)
if case == "ok":
    h.flush()
    m.check_all("after the flush")
    m.save(out)
else:
    with open(failf, "w") as f:
        f.write("once\n")
    t.expect_errno("the flush whose first plugin flush fails", h.flush,
                   errno.EIO)
    if os.path.exists(failf):
        t.fail("no plugin flush was made")
    t.expect_errno("a write after the writer stopped",
                   lambda: h.pwrite(b"x" * 4096, 20 * MIB), errno.EIO)
    m.check_all("reads after the failed flush")
    # What a repair may show: each 1 MiB piece old or new.
    with open(out, "wb") as f:
        f.write(bytes(m.data))
h.shutdown()
EOF

cat > cmp.py <<'EOF'
import sys
got = open(sys.argv[1], "rb").read()
new = open(sys.argv[2], "rb").read()
old = open(sys.argv[3], "rb").read()
MIB = 1 << 20
if len(got) != len(old):
    sys.exit("size %d, expected %d" % (len(got), len(old)))
for off in range(0, len(old), MIB):
    g = got[off:off + MIB]
    if g != old[off:off + MIB] and g != new[off:off + MIB]:
        sys.exit("MiB %d is neither as before nor as written" % (off // MIB))
print("every piece old or new:",
      sum(got[o:o + MIB] == new[o:o + MIB] != old[o:o + MIB]
          for o in range(0, len(old), MIB)), "new")
EOF

for flavour in ext4 ext2; do
    case $flavour in
        ext4) mkfs=(-t ext4 -b 4096) ;;
        ext2) mkfs=(-t ext2 -b 4096) ;;
    esac
    for case in ok fail; do
        echo "=== $flavour $case"
        rm -rf src img out rep.img fail
        mkdir src
        truncate -s 24M src/f
        head -c $((2*1024*1024)) /dev/urandom | dd of=src/f conv=notrunc status=none
        truncate -s 64M img
        mke2fs -q -F "${mkfs[@]}" -d src img
        sock=$tmpdir/sock-$flavour-$case
        start_nbdkit "$sock" -v -D ext4fs.journal_stats=1 --filter="$FILTER" \
            --filter="$recorder" file img ext4file=/f \
            recordfile="$tmpdir/rec.log" recordfailflush="$tmpdir/fail" \
            2> srv.err
        python3 fa.py "$sock" "$tmpdir/fail" src/f out $case ||
            { tail -20 srv.err; fail "$flavour $case: client checks"; }
        stop_nbdkit "$sock"
        if grep -E 'Sanitizer|runtime error|assertion|Aborted' srv.err; then
            fail "$flavour $case: the server crashed"
        fi
        if [ $case = ok ]; then
            n=$(sed -n 's/.* \([0-9]*\) flushes ahead of commits.*/\1/p' srv.err)
            echo "flushes ahead of commits: ${n:-none reported}"
            [ "${n:-0}" -ge 1 ] || fail "$flavour: no flush ahead of the commit"
            fsck_clean img
            dump_cmp img /f out
            continue
        fi
        grep -q "a flush failed below while new metadata" srv.err ||
            { tail -20 srv.err; fail "$flavour: the writer did not say why it stopped"; }
        cp --sparse=always img rep.img
        if [ $flavour = ext4 ]; then
            needs_recovery rep.img ||
                fail "ext4: the journal was not left needing recovery"
            e2fsck -E journal_only -y rep.img > fsck1.out 2>&1 ||
                { cat fsck1.out; fail "ext4: the journal replay failed"; }
        else
            state=$(dumpe2fs -h rep.img 2>/dev/null | sed -n 's/^Filesystem state: *//p')
            [ "$state" != clean ] || fail "ext2: the filesystem was left marked clean"
            r=0; e2fsck -fy rep.img > fsck1.out 2>&1 || r=$?
            [ $r -le 1 ] || { cat fsck1.out; fail "ext2: e2fsck -fy of the copy (rc $r)"; }
        fi
        fsck_clean rep.img
        debugfs -R "dump /f rep.out" rep.img >/dev/null 2>&1
        python3 cmp.py rep.out out src/f || fail "$flavour: content after the repair"
    done
done
