#!/usr/bin/env bash
# A crash in the middle of replaying the journal in place leaves an
# image that replays again to the same result.
#
# debugfs writes a log of several transactions (data blocks of /f and
# the inode-table block that holds /f's inode, with a changed mtime).
# The oracle is e2fsck's replay of a copy.  A read-write ext4fs over a
# delay filter (every write below ext4fs takes 20 ms) starts replaying
# when a client connects and is killed with SIGKILL half way: the image
# must then still need recovery, with its log intact, and:
#  - ext4fs -r serves the oracle's /f, image unchanged by that;
#  - e2fsck's replay of a copy gives the oracle's /f and is clean;
#  - a read-write ext4fs replays it to the oracle's /f, and after a
#    clean stop the image passes e2fsck -fn, no needs_recovery,
#    Journal start 0, and the kernel-compatible sequence moved on.
# With the replay's order broken (journal emptied before the blocks are
# home), the killed image no longer replays and this test fails.
source "$srcdir/functions.sh"
requires debugfs -V
requires nbdsh --version
requires /usr/bin/python3 -c 'import nbd'
requires nbdkit --filter=delay null --dump-plugin
cd "$tmpdir"
[ -n "${KEEP:-}" ] && trap - EXIT

bs=4096
mkdir src
head -c $((256 * bs)) /dev/urandom > src/f
head -c 5000 /dev/urandom > src/other
truncate -s 64M img
mke2fs -q -F -t ext4 -b $bs -d src img

# Blocks of /f, and the inode-table block of its inode.
first=$(debugfs -R "bmap /f 0" img 2>/dev/null)
[ "$(debugfs -R "bmap /f 255" img 2>/dev/null)" = $((first + 255)) ] ||
    fail "test setup: /f is not contiguous"
itb=$(debugfs -R "imap /f" img 2>/dev/null | sed -n 's/.*located at block \([0-9]*\),.*/\1/p')
[ -n "$itb" ] || fail "test setup: no inode table block for /f"

# Four transactions of 64 new data blocks each, then one that logs the
# inode-table block with a new mtime.
head -c $((64 * bs)) /dev/urandom > t1
head -c $((64 * bs)) /dev/urandom > t2
head -c $((64 * bs)) /dev/urandom > t3
head -c $((64 * bs)) /dev/urandom > t4
cp img stage
debugfs -w -R "sif /f mtime 20200101000000" stage >/dev/null 2>&1
dd if=stage of=itab bs=$bs skip="$itb" count=1 status=none
{
    echo "jo -c"
    echo "jw -b $first-$((first + 63)) t1"
    echo "jw -b $((first + 64))-$((first + 127)) t2"
    echo "jw -b $((first + 128))-$((first + 191)) t3"
    echo "jw -b $((first + 192))-$((first + 255)) t4"
    echo "jw -b $itb itab"
    echo "jc"
} > cmds
debugfs -w -f cmds img >/dev/null 2>&1
dumpe2fs -h img 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' ||
    fail "test setup: debugfs left no journal to recover"
cat t1 t2 t3 t4 > expected

cp img oracle
e2fsck -fy oracle > fsck.out 2>&1 || [ $? -le 1 ] || { cat fsck.out; fail "e2fsck replay of the oracle failed"; }
dump_cmp oracle /f expected
debugfs -R "stat /f" oracle 2>/dev/null | grep -q 'mtime:.*2020' ||
    fail "test setup: the oracle did not replay the inode-table block"

# Read-write ext4fs over a slow plugin: kill it in the middle.
cp img crashed
sha_before=$(sha256sum < crashed)
sock=$tmpdir/sock
nbdkit_srv -U "$sock" -P "$sock.pid" -f --filter="$FILTER" --filter=delay \
    file crashed ext4file=/f wdelay=20ms 2> srv.err &
job=$!
for ((i = 0; i < 100; i++)); do [ -S "$sock" ] && [ -s "$sock.pid" ] && break; sleep 0.1; done
[ -S "$sock" ] || fail "nbdkit did not start"
# The client's connection triggers the read-write open and the replay.
timeout 60 nbdsh -u "nbd+unix:///?socket=$sock" -c 'h.pread(512, 0)' \
    > client.out 2>&1 &
client=$!
sleep 2.5                    # 261 writes at 20 ms: about half way
kill -9 "$(cat "$sock.pid")"
wait "$job" 2>/dev/null || :
wait "$client" 2>/dev/null || :
[ "$(sha256sum < crashed)" != "$sha_before" ] ||
    fail "the replay had not started when nbdkit was killed (test too fast?)"
dumpe2fs -h crashed > dumpe2fs.out 2>/dev/null
grep -q '^Filesystem features:.*needs_recovery' dumpe2fs.out ||
    fail "the half-replayed image no longer needs recovery: $(cat srv.err)"
grep -q '^Journal start: *0$' dumpe2fs.out &&
    fail "the journal was emptied before the replay finished"

# -r replays it into memory to the oracle, and changes nothing.
sha=$(sha256sum < crashed)
nbdkit_srv -U - -r --filter="$FILTER" file crashed ext4file=/f \
    --run 'nbdcopy "$uri" ro.out' 2> ro.err ||
    { cat ro.err; fail "-r on the half-replayed image failed"; }
cmp ro.out expected || fail "-r on the half-replayed image serves the wrong /f"
grep -q 'journal: replayed 5 transaction' ro.err ||
    fail "-r did not say what it replayed: $(cat ro.err)"
[ "$(sha256sum < crashed)" = "$sha" ] || fail "-r changed the image"

# e2fsck replays the same journal to the same result.
cp crashed crashed.e2fsck
e2fsck -fy crashed.e2fsck > fsck.out 2>&1 || [ $? -le 1 ] || { cat fsck.out; fail "e2fsck replay failed"; }
dump_cmp crashed.e2fsck /f expected
fsck_clean crashed.e2fsck

# So does a read-write ext4fs, and it leaves a clean image.
nbdkit_srv -U - --filter="$FILTER" file crashed ext4file=/f \
    --run 'nbdcopy "$uri" rw.out' 2> rw.err ||
    { cat rw.err; fail "read-write ext4fs on the half-replayed image failed"; }
cmp rw.out expected || fail "read-write ext4fs serves the wrong /f"
grep -q 'journal: replayed 5 transaction.*into the image' rw.err ||
    fail "read-write ext4fs did not say it replayed: $(cat rw.err)"
fsck_clean crashed
dump_cmp crashed /f expected
dump_cmp crashed /other src/other
debugfs -R "stat /f" crashed 2>/dev/null | grep -q 'mtime:.*2020' ||
    fail "the replayed image lacks the logged inode-table block"
dumpe2fs -h crashed > dumpe2fs.out 2>/dev/null
grep -q '^Filesystem features:.*needs_recovery' dumpe2fs.out &&
    fail "needs_recovery still set after a read-write session"
grep -q '^Journal start: *0$' dumpe2fs.out || fail "the journal was not emptied"
# debugfs's transactions were tids 1..5: the next sequence is 7.
grep -q '^Journal sequence: *0x00000007$' dumpe2fs.out ||
    fail "journal sequence after replay: $(grep '^Journal sequence' dumpe2fs.out)"
cp crashed copy
e2fsck -p copy > fsck.out 2>&1 || { cat fsck.out; fail "e2fsck -p after the session"; }
echo "ok"
