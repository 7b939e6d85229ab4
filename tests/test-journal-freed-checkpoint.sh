#!/usr/bin/env bash
# Journaled writes: a metadata block freed while its copy is in the
# live log, and a checkpoint before the free commits.  The block is
# still in use as of the last commit, so the checkpoint (which empties
# the log that held its contents) must write those contents home.
#
#  1. /frag gets one written block in every two (1024 extents: a
#     depth-1 extent tree whose leaf blocks are logged, never home);
#     flush.
#  2. The whole of /frag is trimmed (its leaf blocks are freed), and
#     the flush's commit checkpoints first (-D ext4fs.checkpoint_first,
#     as a commit that does not fit in the log does) and fails below at
#     its own flush, before the commit block (failnth filter): the
#     journal aborts, the image is left needing recovery, as a crash
#     there would leave it.
# After e2fsck's replay, and ext4fs's own, /frag must be as of step 1
# and e2fsck -fn clean.  Without the freed blocks' contents written
# home by the checkpoint, /frag's leaves are blocks of zeros.
source "$srcdir/functions.sh"
requires nbdsh --version
requires /usr/bin/python3 -c 'import nbd'
requires debugfs -V
failnth=$(test_filter failnth) || exit $?
cd "$tmpdir"

bs=4096
mkdir src
truncate -s $((8 * 1024 * 1024)) src/frag
truncate -s 64M img
mke2fs -q -F -t ext4 -b $bs -J size=8 -d src img
/usr/bin/python3 -c "
d = bytearray(8 << 20)
for b in range(0, 2048, 2):
    d[b * 4096:(b + 1) * 4096] = b'F' * 4096
open('expected', 'wb').write(d)"

sock=$tmpdir/sock
start_nbdkit "$sock" --filter="$FILTER" --filter="$failnth" file img \
    ext4file=exportname failnth-file="$tmpdir/ctl" \
    -D ext4fs.checkpoint_first=1 2> srv.err
/usr/bin/python3 - "$sock" <<'EOF2'
import sys
import e4test as t
f = t.connect(sys.argv[1], "/frag")
for b in range(0, 2048, 2):
    f.pwrite(b"F" * 4096, b * 4096)
f.flush()
EOF2
cp img step1.img
e2fsck -E journal_only -y step1.img >/dev/null 2>&1 || :
debugfs -R "ex /frag" step1.img 2>/dev/null > ex.out
grep -qE '^ *0/ *[12] ' ex.out || { head -5 ex.out; fail "test setup: /frag has no extent tree leaf blocks"; }
fsck_clean step1.img
dump_cmp step1.img /frag expected

# The commit's flushes: the checkpoint's two, then its own (the third).
echo "g1 3 f" > ctl
/usr/bin/python3 - "$sock" <<'EOF2'
import sys
import e4test as t
f = t.connect(sys.argv[1], "/frag")
f.trim(2048 * 4096, 0)
t.expect_error("the flush of the trim", f.flush)
EOF2
grep -q '^f ' ctl.log || fail "test setup: no flush was failed"
grep -q 'commit: flush' srv.err || { cat srv.err; fail "test setup: the commit's own flush did not fail"; }
stop_nbdkit "$sock"
dumpe2fs -h img 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' ||
    fail "test setup: the image does not need recovery"

for how in e2fsck ext4fs; do
    cp img "r-$how"
    if [ $how = e2fsck ]; then
        e2fsck -E journal_only -y "r-$how" > fsck.out 2>&1 ||
            { cat fsck.out; fail "e2fsck could not replay"; }
    else
        nbdkit_srv -U - --filter="$FILTER" file "r-$how" ext4file=/frag \
            --run 'nbdinfo --size "$uri"' > /dev/null 2> srv2.err ||
            { cat srv2.err; fail "ext4fs could not replay"; }
    fi
    fsck_clean "r-$how"
    dump_cmp "r-$how" /frag expected
done
echo "ok"
