#!/usr/bin/env bash
# Journaled writes: a freed metadata block that is still in the log is
# revoked, so that a replay never writes its old copy over whatever
# the block holds next.
#
#  1. /frag gets one written block in every two (1024 extents: a
#     depth-1 extent tree whose leaf blocks are logged); flush.
#  2. The whole of /frag is trimmed: its data and leaf blocks are
#     freed (and must be revoked); flush.
#  3. /big, on a filesystem with no room but what /frag freed, is
#     filled with a pattern, reusing /frag's old leaf blocks; flush.
#  4. kill -9 (no checkpoint happened: the log holds all three).
# After e2fsck's replay (and after ours), /big must hold its pattern
# and e2fsck -fn be clean.  Without the revokes, replay writes the old
# leaf blocks into /big.
source "$srcdir/functions.sh"
requires nbdsh --version
requires /usr/bin/python3 -c 'import nbd'
requires debugfs -V
cd "$tmpdir"

bs=4096
mkdir src
truncate -s $((8 * 1024 * 1024)) src/frag
truncate -s 64M img
mke2fs -q -F -t ext4 -b $bs -m 0 -J size=8 -d src img
free=$(dumpe2fs -h img 2>/dev/null | awk '/^Free blocks:/{print $3}')
# /big: what stays free after /frag's 1024 blocks, less a margin, plus
# all of what /frag frees: it cannot be filled without reusing them.
bigblocks=$(( free - 1024 - 80 + 1024 ))
truncate -s $((bigblocks * bs)) src/big
rm -f img; truncate -s 64M img
mke2fs -q -F -t ext4 -b $bs -m 0 -J size=8 -d src img
/usr/bin/python3 -c "
import e4test as t
open('pattern', 'wb').write(t.pattern(7, $bigblocks * $bs))"

sock=$tmpdir/sock
start_nbdkit "$sock" --filter="$FILTER" file img ext4file=exportname
/usr/bin/python3 - "$sock" <<'EOF'
import sys
import e4test as t
f = t.connect(sys.argv[1], "/frag")
for b in range(0, 2048, 2):
    f.pwrite(b"F" * 4096, b * 4096)
f.flush()
open("step1", "w").close()
EOF
# The leaf blocks of /frag's extent tree, as logged (read through -r
# would need another server: ask debugfs on a replayed copy).
cp img step1.img
e2fsck -E journal_only -y step1.img >/dev/null 2>&1 || :
debugfs -R "ex /frag" step1.img 2>/dev/null > ex.out
leaves=$(awk '$1 ~ /^0\// && NR > 1 {print $8}' ex.out | sort -u | grep -E '^[0-9]+$' || :)
[ -n "$leaves" ] || { cat ex.out; fail "test setup: /frag has no extent tree leaf blocks"; }
echo "leaf blocks of /frag: $(echo $leaves)"

/usr/bin/python3 - "$sock" <<'EOF'
import sys
import e4test as t
sock = sys.argv[1]
f = t.connect(sock, "/frag")
f.trim(2048 * 4096, 0)
f.flush()
b = t.connect(sock, "/big")
t.write_all(b, open("pattern", "rb").read())
b.flush()
EOF
kill -9 "$(cat "$sock.pid")"
sleep 0.3
dumpe2fs -h img > dumpe2fs.out 2>/dev/null
grep -q '^Journal start: *0$' dumpe2fs.out &&
    fail "test setup: the log was checkpointed before the kill"

for how in e2fsck ext4fs; do
    cp img "r-$how"
    if [ $how = e2fsck ]; then
        e2fsck -E journal_only -y "r-$how" > fsck.out 2>&1 ||
            { cat fsck.out; fail "e2fsck could not replay"; }
    else
        nbdkit_srv -U - --filter="$FILTER" file "r-$how" ext4file=/big \
            --run 'nbdinfo --size "$uri"' > /dev/null 2> srv.err ||
            { cat srv.err; fail "ext4fs could not replay"; }
    fi
    reused=0
    ino=$(debugfs -R "stat /big" "r-$how" 2>/dev/null | sed -n 's/^Inode: \([0-9]*\).*/\1/p')
    for l in $leaves; do
        owner=$(debugfs -R "icheck $l" "r-$how" 2>/dev/null | awk -v b="$l" '$1 == b {print $2}')
        [ "$owner" = "$ino" ] && reused=$((reused + 1))
    done
    echo "$how: $reused of /frag's old leaf blocks now belong to /big"
    [ $reused -gt 0 ] || fail "test setup: no freed leaf block was reused by /big"
    fsck_clean "r-$how"
    dump_cmp "r-$how" /big pattern
done
echo "ok"
