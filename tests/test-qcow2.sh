#!/usr/bin/env bash
# A qcow2 file inside the filesystem, served through ext4fs and opened
# by qemu's qcow2 driver over NBD (qemu-io, qemu-img), as a VM's disk
# kept in an ext4 image is.  The qcow2 is preallocated (metadata): its
# clusters are holes in the ext4 file, so qcow2 writes allocate there.
#  1. read-write: qemu-io writes patterns (unaligned, across clusters,
#     a zero write), reads them back; qemu-img check over NBD is clean.
#  2. after a clean stop: e2fsck -fn is clean; the dumped file passes
#     qemu-img check and qemu-img compare (guest-visible content)
#     against a qcow2 given the same writes locally.
#  3. read-only (-r): qemu-img convert of the qcow2 over NBD to raw
#     equals the expected raw content, and the image is not changed.
source "$srcdir/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires mke2fs -V
requires debugfs -V
cd "$tmpdir"

mkdir src
qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=65536 src/disk.qcow2 64M
cp src/disk.qcow2 expected.qcow2
truncate -s 256M img
mke2fs -q -F -t ext4 -b 4096 -d src img

writes=(
    -c 'write -P 0xa1 0 4k'
    -c 'write -P 0xb2 1000 70000'
    -c 'write -P 0xc3 10M 1M'
    -c 'write -P 0xd4 33554431 3'
    -c 'write -z 10M 64k'
    -c 'write -P 0xe5 63M 1M'
    -c flush
)
reads=(
    -c 'read -P 0xa1 0 1000'
    -c 'read -P 0xb2 1000 70000'
    -c 'read -P 0 71000 100000'
    -c 'read -P 0 10M 64k'
    -c 'read -P 0xc3 10551296 960k'
    -c 'read -P 0xd4 33554431 3'
    -c 'read -P 0xe5 63M 1M'
)
qemu-io -f qcow2 expected.qcow2 "${writes[@]}" > local.out ||
    fail "qemu-io on a local qcow2 failed"

echo "=== 1. read-write"
start_nbdkit "$tmpdir/rw.sock" --filter="$FILTER" file img ext4file=/disk.qcow2
uri="nbd+unix:///?socket=$tmpdir/rw.sock"
qemu-io -f qcow2 "$uri" "${writes[@]}" > rw.out 2>&1 ||
    { cat rw.out; fail "qemu-io writes over ext4fs failed"; }
grep -q -i -E 'fail|error' rw.out && { cat rw.out; fail "qemu-io reported an error"; }
qemu-io -f qcow2 "$uri" "${reads[@]}" > rd.out 2>&1 ||
    { cat rd.out; fail "qemu-io reads over ext4fs failed"; }
grep -q -i -E 'pattern|fail|error' rd.out && { cat rd.out; fail "read-back differs"; }
qemu-img check -f qcow2 "$uri" > check.out 2>&1 ||
    { cat check.out; fail "qemu-img check over ext4fs found problems"; }
stop_nbdkit "$tmpdir/rw.sock"

echo "=== 2. the image"
fsck_clean img
debugfs -R "dump /disk.qcow2 got.qcow2" img >/dev/null 2>&1
qemu-img check -q -f qcow2 got.qcow2 || fail "qemu-img check of the dumped qcow2 failed"
qemu-img compare -q -f qcow2 -F qcow2 expected.qcow2 got.qcow2 ||
    fail "the dumped qcow2 differs (guest content) from the expected one"
qemu-io -r -f qcow2 got.qcow2 "${reads[@]}" > rd2.out 2>&1
grep -q -i -E 'pattern|fail|error' rd2.out && { cat rd2.out; fail "dumped qcow2: read-back differs"; }

echo "=== 3. read-only"
sha=$(sha256sum < img)
start_nbdkit "$tmpdir/ro.sock" -r --filter="$FILTER" file img ext4file=/disk.qcow2
qemu-img convert -f qcow2 -O raw "nbd+unix:///?socket=$tmpdir/ro.sock" got.raw ||
    fail "qemu-img convert over a read-only ext4fs failed"
stop_nbdkit "$tmpdir/ro.sock"
qemu-img convert -f qcow2 -O raw expected.qcow2 expected.raw
cmp got.raw expected.raw || fail "the converted raw content differs"
[ "$(sha256sum < img)" = "$sha" ] || fail "the read-only session changed the image"
echo PASS
