#!/usr/bin/env bash
# Multi-mount protection (mke2fs -O mmp): read-only runs never touch
# the MMP block; a read-write server claims it (at least 11 s) and
# keeps it moving; a second read-write server is refused while the
# first holds it; a clean exit releases it; a claim left by kill -9 is
# detected as stale and taken over; a block held by e2fsck (FSCK
# sequence) is refused at once; what was read before the claim is read
# again after it.  (A step of the wall clock: test-mmp-clock.sh.)
source "$srcdir/functions.sh"
requires debugfs -R "help" /dev/null
cd "$tmpdir"

seq_of () { debugfs -R "dump_mmp" img 2>/dev/null | awk '/^sequence:/{print $2}'; }

mkdir src
head -c $((1024*1024)) /dev/urandom > src/f
cp src/f expected
truncate -s 64M img
mke2fs -q -F -t ext4 -O mmp,metadata_csum -d src img
[ "$(seq_of)" = ff4d4d50 ] || fail "fresh image's MMP block is not clean"

# Read-only: no MMP writes at all.
sha=$(sha256sum < img)
nbdkit_srv -r -U - --filter="$FILTER" file img ext4file=/f \
    --run 'nbdcopy "$uri" ro.out'
cmp ro.out src/f
[ "$(sha256sum < img)" = "$sha" ] || fail "read-only run changed the image"

# Server A claims the filesystem at its first writable connection.
sock=$tmpdir/a.sock
start_nbdkit "$sock" --filter="$FILTER" --filter=log \
    file img logfile="$tmpdir/a.log" ext4file=/f
start=$(date +%s)
nbdsh -u "nbd+unix:///?socket=$sock" -c 'h.pwrite(b"A" * 4096, 0); h.flush()'
took=$(( $(date +%s) - start ))
[ $took -ge 10 ] || fail "MMP claim took only $took s"
printf 'A%.0s' $(seq 4096) | dd of=expected conv=notrunc status=none
s1=$(seq_of)
[ "$s1" != ff4d4d50 ] || fail "MMP block still clean while held"
sleep 6
[ "$(seq_of)" != "$s1" ] || fail "MMP sequence does not move while held"
# Every MMP write is FUA (not a write and a flush of everything else
# written since the last flush), as seen by the log filter below.
mmpoff=$(printf '0x%x' $(( $(dumpe2fs -h img 2>/dev/null | awk '/^MMP block number:/{print $4}') *
                           $(dumpe2fs -h img 2>/dev/null | awk '/^Block size:/{print $3}') )))
grep -E " Write .*offset=$mmpoff " "$tmpdir/a.log" > mmp-writes || true
[ "$(wc -l < mmp-writes)" -ge 2 ] ||
    { cat "$tmpdir/a.log"; fail "the log shows fewer than 2 MMP writes (claim, update) at $mmpoff"; }
grep -q "fua=0" mmp-writes && { cat mmp-writes; fail "an MMP write without FUA"; }
# The superblock and the group descriptors are read again after the
# claim (its first MMP write): another node may have written them until
# its release, just before.
claimline=$(grep -nE " Write .*offset=$mmpoff " "$tmpdir/a.log" | head -n 1 | cut -d: -f1)
tail -n +"$claimline" "$tmpdir/a.log" | grep -qE " Read .*offset=0x400 " ||
    { cat "$tmpdir/a.log"; fail "the superblock was not read again after the MMP claim"; }

# Server B is refused while A holds it.
if nbdkit_srv -U - --filter="$FILTER" file img ext4file=/f \
       --run 'nbdsh -u "$uri" -c "h.pwrite(b\"B\" * 4096, 0)"' 2> b.err; then
    fail "a second read-write server was allowed while MMP is held"
fi
grep -q "MMP: the filesystem is in use" b.err || { cat b.err; fail "no MMP message"; }

# A clean exit releases it.
stop_nbdkit "$sock"
[ "$(seq_of)" = ff4d4d50 ] || fail "MMP not released at clean exit"
fsck_clean img
dump_cmp img /f expected

# kill -9 leaves a stale claim, which the next server detects (the
# sequence does not move) and takes over.
sock2=$tmpdir/c.sock
start_nbdkit "$sock2" --filter="$FILTER" file img ext4file=/f
# (A writable connection claims MMP; it only reads.  A kill -9 after
# writes is tested below.)
nbdsh -u "nbd+unix:///?socket=$sock2" -c 'assert not h.is_read_only(); h.pread(4096, 0)'
kill -9 "$(cat "$sock2.pid")"
sleep 0.5
[ "$(seq_of)" != ff4d4d50 ] || fail "kill -9 should leave the MMP block claimed"
nbdkit_srv -U - --filter="$FILTER" file img ext4file=/f \
    --run 'nbdsh -u "$uri" -c "h.pwrite(b\"D\" * 4096, 16384); h.flush()"'
printf 'D%.0s' $(seq 4096) | dd of=expected bs=1 seek=16384 conv=notrunc status=none
[ "$(seq_of)" = ff4d4d50 ] || fail "MMP not released after takeover"
fsck_clean img
dump_cmp img /f expected

# A kill -9 after writes leaves the filesystem needing recovery (its
# metadata changes are journaled): the next read-write server claims
# MMP (waiting out the stale claim), replays the journal before writing
# anything, and serves read-write; -r meanwhile serves the replayed
# state without writing.
sock3=$tmpdir/e.sock
start_nbdkit "$sock3" --filter="$FILTER" file img ext4file=/f
nbdsh -u "nbd+unix:///?socket=$sock3" -c 'h.pwrite(b"E" * 4096, 0); h.flush()'
printf 'E%.0s' $(seq 4096) | dd of=expected conv=notrunc status=none
kill -9 "$(cat "$sock3.pid")"
sleep 0.5
dumpe2fs -h img 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' ||
    fail "kill -9 after writes should leave the journal needing recovery"
sha=$(sha256sum < img)
nbdkit_srv -r -U - --filter="$FILTER" file img ext4file=/f \
    --run 'nbdcopy "$uri" after-kill.out'
cmp after-kill.out expected || fail "read-only after kill -9: wrong bytes"
[ "$(sha256sum < img)" = "$sha" ] || fail "read-only after kill -9 changed the image"
nbdkit_srv -U - --filter="$FILTER" file img ext4file=/f \
    --run 'nbdsh -u "$uri" -c "h.pwrite(b\"F\" * 4096, 8192); h.flush()"' 2> f.err ||
    { cat f.err; fail "read-write after kill -9 (journal replay) failed"; }
dumpe2fs -h img 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' &&
    fail "needs_recovery still set after a clean stop"
printf 'F%.0s' $(seq 4096) | dd of=expected bs=1 seek=8192 conv=notrunc status=none
[ "$(seq_of)" = ff4d4d50 ] || fail "MMP not released after the replayed session"
fsck_clean img
dump_cmp img /f expected

# e2fsck (or a libext2fs tool) holds it: refused at once.  (debugfs
# cannot leave the FSCK sequence behind, so patch the block directly,
# on an image without metadata_csum so that no checksum is needed.)
rm -f img2
truncate -s 64M img2
mke2fs -q -F -t ext4 -O mmp,^metadata_csum -d src img2
mmpblk=$(dumpe2fs -h img2 2>/dev/null | awk '/^MMP block number:/{print $4}')
bs=$(dumpe2fs -h img2 2>/dev/null | awk '/^Block size:/{print $3}')
/usr/bin/python3 -c "
import struct, sys
f = open('img2', 'r+b'); f.seek($mmpblk * $bs + 4)
f.write(struct.pack('<I', 0xE24D4D50)); f.close()"
sha=$(sha256sum < img2)
if nbdkit_srv -U - --filter="$FILTER" file img2 ext4file=/f \
       --run 'nbdsh -u "$uri" -c "h.pwrite(b\"E\" * 4096, 0)"' 2> e.err; then
    fail "read-write allowed while e2fsck holds MMP"
fi
grep -q "e2fsck or another libext2fs tool" e.err || { cat e.err; fail "no FSCK message"; }
[ "$(sha256sum < img2)" = "$sha" ] || fail "refused server changed the image"
