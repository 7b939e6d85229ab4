#!/usr/bin/env bash
# Read files of many sizes from an ext4 image through nbdcopy and
# compare with the source bytes and with debugfs's dump.
source "$srcdir/functions.sh"
cd "$tmpdir"

mkdir -p src/a/b/c
head -c 1 /dev/urandom > src/s1
head -c 4095 /dev/urandom > src/s4095
head -c 4096 /dev/urandom > src/s4096
head -c 4097 /dev/urandom > src/s4097
head -c $((1024*1024+3)) /dev/urandom > src/a/b/c/nested
: > src/empty
truncate -s 400M img
mke2fs -q -F -t ext4 -d src img
sha=$(sha256sum img)

for f in s1 s4095 s4096 s4097 a/b/c/nested; do
    rm -f out
    nbdkit_srv -U - -r --filter="$FILTER" file img ext4file=/$f \
        --run 'nbdcopy "$uri" out'
    cmp out src/$f || fail "/$f differs"
    dump_cmp img /$f out
done

# An empty file has size 0.
size=$(nbdkit_srv -U - -r --filter="$FILTER" file img ext4file=/empty \
         --run 'nbdinfo --size "$uri"')
[ "$size" = 0 ] || fail "empty file size $size"

# ext2file= (the stock ext2 filter's key) is another name for
# ext4file=, fixed path or exportname.
rm -f out
nbdkit_srv -U - -r --filter="$FILTER" file img ext2file=/a/b/c/nested \
    --run 'nbdcopy "$uri" out'
cmp out src/a/b/c/nested || fail "ext2file=/a/b/c/nested differs"
rm -f out
nbdkit_srv -U - -r --filter="$FILTER" file img ext2file=exportname \
    --run 'nbdcopy "nbd+unix:///s4097?socket=$unixsocket" out'
cmp out src/s4097 || fail "ext2file=exportname, /s4097 differs"

# A read-only run leaves the image byte-for-byte unchanged.
[ "$(sha256sum img)" = "$sha" ] || fail "image changed by read-only run"
