#!/usr/bin/env bash
# A 1 TiB sparse file with 4 MiB of data: block status covers holes of
# more than 4 GiB (nbdkit 1.32 aborts the server if one extent is longer
# than the request: regression test), a full copy reads only the data
# from the plugin below, the bytes are right, and the server's peak RSS
# stays under 64 MiB.
source "$srcdir/functions.sh"
cd "$tmpdir"
mkdir src
truncate -s 1T src/huge
head -c $((4*1024*1024)) /dev/urandom > data
dd if=data of=src/huge bs=1M seek=500000 conv=notrunc status=none
truncate -s 1G img
mke2fs -q -F -t ext4 -d src img

sock=$tmpdir/sock
start_nbdkit "$sock" --filter="$FILTER" --filter=stats file img \
    ext4file=/huge statsfile="$tmpdir/stats" statsappend=true
uri="nbd+unix:///?socket=$sock"

nbdinfo --map "$uri" > map
cat map
[ "$(wc -l < map)" = 3 ] || fail "expected 3 extents"
grep -q "^ *0 *524288000000 *3 *hole,zero" map || fail "bad leading hole"
grep -q "^ *524288000000 *4194304 *0 *data" map || fail "bad data extent"
grep -q "^ *524292194304 *575219433472 *3 *hole,zero" map || fail "bad trailing hole"

# The whole file to a local file: nbdcopy skips what block status
# calls zero, so the copy is fast and sparse; the data lands at the
# right offset.  (Reading 1 TiB of zeros byte by byte would take hours.)
nbdcopy "$uri" out
[ "$(stat -c %s out)" = $((1 << 40)) ] || fail "copy has the wrong size"
dd if=out of=out.data bs=1M skip=500000 count=4 status=none
cmp out.data data || fail "data in the copy differs"
[ "$(du -k out | cut -f1)" -lt $((64*1024)) ] || fail "copy is not sparse"
# Around the data: zeros.
dd if=out bs=1M skip=499999 count=1 status=none | cmp -s - <(head -c 1048576 /dev/zero) ||
    fail "not zero before the data"
dd if=out bs=1M skip=500004 count=1 status=none | cmp -s - <(head -c 1048576 /dev/zero) ||
    fail "not zero after the data"
rm -f out

rss=$(awk '/VmHWM/{print $2}' "/proc/$(cat "$sock.pid")/status")
echo "peak RSS $rss kB"
[ "$rss" -lt $((64*1024)) ] || fail "peak RSS $rss kB >= 64 MiB"
stop_nbdkit "$sock"

# Bytes read from the plugin below: about the data, not the holes.
cat stats
# "read: N ops, T s, X MiB, ..." (last session's line): at most a few MiB
# of metadata beyond the 4 MiB of data, twice over (map, copy).
read_mib=$(awk '/^read:/{for (i=1;i<=NF;i++) if ($i ~ /^(KiB|MiB|GiB|bytes),?$/) {
             v=$(i-1); u=$i; gsub(/,/,"",u);
             if (u=="KiB") v/=1024; else if (u=="GiB") v*=1024; else if (u=="bytes") v/=1048576;
             print int(v); exit } }' stats)
[ -n "$read_mib" ] || fail "no read statistics"
[ "$read_mib" -lt 32 ] || fail "read $read_mib MiB from the plugin for 4 MiB of data"
