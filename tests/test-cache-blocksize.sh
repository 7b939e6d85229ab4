#!/usr/bin/env bash
# .cache prefetches the file's mapped runs at their physical offsets
# (none for holes), through the plugin's cache; .block_size reports
# minimum 1, preferred = the filesystem block size, maximum 32 MiB, or
# less when the plugin below states a smaller maximum.
source "$srcdir/functions.sh"
requires nbdkit --filter=blocksize-policy null --dump-plugin
cd "$tmpdir"
mkdir src
head -c $((1024*1024)) /dev/urandom > src/f
truncate -s $((4*1024*1024)) src/f          # 1 MiB data, then a hole
truncate -s 64M img
mke2fs -q -F -t ext4 -b 4096 -d src img
pblk=$(debugfs -R "bmap /f 0" img 2>/dev/null)

nbdkit_srv -U - --filter="$FILTER" --filter=log file img ext4file=/f \
    logfile="$tmpdir/log" \
    --run 'nbdsh -u "$uri" -c "h.cache(65536, 0); h.cache(65536, 2*1024*1024)"'
cat log
# The data block's physical offset is cached...
grep -E "Cache .*offset=0x$(printf '%x' $((pblk * 4096)))\b" log ||
    fail "no cache request at the file's first physical block"
# ...and nothing is asked for the hole (only one Cache request).
[ "$(grep -cE 'Cache id=[0-9]+ offset' log)" = 1 ] || fail "cache of a hole reached the plugin"

# Block size: the file plugin states no constraint: 1 / 4096 / 32 MiB.
nbdkit_srv -U - --filter="$FILTER" file img ext4file=/f \
    --run 'nbdinfo --json "$uri"' > info.json
grep -q '"block_size_minimum": 1,' info.json || { cat info.json; fail "minimum"; }
grep -q '"block_size_preferred": 4096,' info.json || { cat info.json; fail "preferred"; }
grep -q '"block_size_maximum": 33554432' info.json || { cat info.json; fail "maximum"; }

# A plugin stack below that states a smaller maximum limits ours, and
# reads larger than it still work (split by the filter).
nbdkit_srv -U - --filter="$FILTER" --filter=blocksize-policy file img \
    ext4file=/f blocksize-preferred=4096 blocksize-maximum=65536 \
    blocksize-error-policy=error \
    --run 'nbdinfo --json "$uri" > info2.json; nbdcopy --request-size=1048576 "$uri" out'
grep -q '"block_size_maximum": 65536' info2.json || { cat info2.json; fail "plugin maximum not honoured"; }
cmp out src/f || fail "copy through a small-maximum plugin differs"
