#!/usr/bin/env bash
# ext4fs demo: install what is missing, build, make a small ext4 image
# with a few files, serve one with nbdkit --filter=ext4fs, and show a
# client reading it (nbdinfo, a verified nbdcopy) and writing it.
set -euo pipefail
cd "$(dirname "$0")"
export PATH=/usr/bin:/usr/sbin:/sbin:$PATH

source ./scripts/deps.sh
install_missing_deps

echo "=== building"
[ -x configure ] || autoreconf -fi
[ -f Makefile ] || ./configure
make -j"$(nproc 2>/dev/null || echo 2)" >/dev/null
FILTER=$PWD/filter/.libs/nbdkit-ext4fs-filter.so

work=$(mktemp -d "${TMPDIR:-/tmp}/ext4fs-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

echo "=== making a 256 MiB ext4 image with a few files"
mkdir -p src/vm src/data
head -c $((32*1024*1024)) /dev/urandom > src/vm/disk.raw
echo "hello from inside an ext4 filesystem" > src/data/hello.txt
truncate -s 64M src/data/sparse.img
truncate -s 256M fs.img
mke2fs -q -F -t ext4 -d src fs.img
ls -l src/vm src/data

echo
echo "=== nbdinfo of /vm/disk.raw served from inside fs.img"
nbdkit -U - --filter="$FILTER" file fs.img ext4file=/vm/disk.raw \
    --run 'nbdinfo "$uri"'

echo
echo "=== nbdcopy --connections=4 of it, compared with the original"
nbdkit -U - --filter="$FILTER" file fs.img ext4file=/vm/disk.raw \
    --run 'nbdcopy --connections=4 --threads=4 "$uri" copy.raw'
cmp copy.raw src/vm/disk.raw && echo "OK: the copy is byte-for-byte identical"

echo
echo "=== writing 1 MiB into the holes of /data/sparse.img, then flush"
head -c $((1024*1024)) /dev/urandom > patch.bin
nbdkit -U - --filter="$FILTER" file fs.img ext4file=/data/sparse.img \
    --run 'nbdcopy --destination-is-zero patch.bin "$uri" 2>/dev/null ||
           nbdsh -u "$uri" -c "h.pwrite(open(\"patch.bin\",\"rb\").read(), 0); h.flush()"'
debugfs -R "dump /data/sparse.img $work/sparse.out" fs.img 2>/dev/null
cmp -n $((1024*1024)) sparse.out patch.bin && echo "OK: the data landed in the file"
e2fsck -fn fs.img >/dev/null && echo "OK: e2fsck -fn says the filesystem is clean"

echo
echo "=== nbdinfo --list in exportname mode (one server, many files)"
nbdkit -U - --filter="$FILTER" file fs.img ext4file=exportname \
    --run 'nbdinfo --list "$uri"' | grep -E '^export=|description'

echo
echo "=== nbdinfo --map of /data/sparse.img (holes are reported)"
nbdkit -U - -r --filter="$FILTER" file fs.img ext4file=/data/sparse.img \
    --run 'nbdinfo --map "$uri"'
