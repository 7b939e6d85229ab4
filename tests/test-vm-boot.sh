#!/usr/bin/env bash
# A virtual machine boots from a file inside the filesystem, through
# ext4fs, and writes to it; then it boots again from the image left by
# a crash, read-only (the journal replayed in memory) and read-write
# (replayed in place).
#
# The machine is qemu-system-x86_64 (KVM where it works, else
# emulation; EXT4FS_QEMU_ACCEL=tcg forces emulation) with the export
# as its virtio disk; its BIOS boots the
# boot sector vm-boot.S, which reads sectors through the BIOS, writes
# one sector that was a hole in the file (an allocating write) and
# prints what it saw on the serial port.
#  1. read-write: the sum of sectors 1..32 is the file's; sector 2048
#     reads as zeros before the write and as the written bytes after.
#     qemu is shut down (its disks flushed), then nbdkit is killed
#     (SIGKILL): the write is in the journal, needs_recovery is set.
#  2. read-only (-r) on the crashed image: the machine sees its write
#     (in-memory replay) and its new write is refused; the image does
#     not change by a byte.
#  3. read-write on the crashed image: replayed in place, the machine
#     sees its write and writes again; after a clean stop the image
#     needs no recovery, e2fsck -fn is clean and the file is exactly
#     the expected bytes (debugfs dump).
source "$srcdir/functions.sh"
requires qemu-system-x86_64 --version
requires as --version
requires ld --version
requires mke2fs -V
requires debugfs -V
boot_src=$(cd "$srcdir" && pwd)/vm-boot.S
cd "$tmpdir"

as --32 -o vm-boot.o "$boot_src" &&
    ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o vm-boot.bin vm-boot.o ||
    fail "cannot assemble vm-boot.S"
[ "$(stat -c %s vm-boot.bin)" = 512 ] || fail "vm-boot.bin is not 512 bytes"

mkdir src
cp vm-boot.bin src/vm.img
head -c 16384 /dev/urandom >> src/vm.img
truncate -s 4M src/vm.img
sum=$(python3 -c '
import struct, sys
d = open("src/vm.img", "rb").read()[512:512 + 16384]
print("%08x" % (sum(struct.unpack("<4096I", d)) & 0xffffffff))')
# The expected file after the machine's write: sector 2048 all 'V'.
cp src/vm.img expected
printf 'V%.0s' {1..512} | dd of=expected bs=512 seek=2048 conv=notrunc status=none
truncate -s 64M img
mke2fs -q -F -t ext4 -b 4096 -d src img

# boot NAME SOCK [readonly=on]: boot the machine from the export of
# SOCK until its last line (done, or an error), then shut it down as a
# user would (SIGTERM: qemu flushes and closes its disks).  The serial
# output is in NAME.serial.
boot ()
{
    local name=$1 sock=$2 ro=${3:+,$3} pid i
    rm -f "$name.serial"
    qemu-system-x86_64 -nodefaults -machine "pc,accel=${EXT4FS_QEMU_ACCEL:-kvm:tcg}" -m 32 \
        -display none -no-reboot -serial "file:$name.serial" \
        -drive "file=nbd+unix:///?socket=$sock,format=raw,if=none,id=d0,cache=none$ro" \
        -device virtio-blk-pci,drive=d0,bootindex=1 2> "$name.qemu" &
    pid=$!
    for ((i=0; i<1200; i++)); do
        grep -q -E 'done|failed|error' "$name.serial" 2>/dev/null && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
    done
    kill $pid 2>/dev/null
    wait $pid 2>/dev/null || :
    echo "--- $name: serial"; cat "$name.serial"
    grep -q 'ext4fs-vm: booted' "$name.serial" || {
        cat "$name.qemu"; fail "$name: the machine did not boot from the export"; }
    grep -q "ext4fs-vm: sum $sum" "$name.serial" ||
        fail "$name: the machine read other bytes than the file's (sum $sum expected)"
}
expect_line ()
{
    grep -q -x "ext4fs-vm: $2" "$1.serial" ||
        fail "$1: the machine did not print '$2'"
}

echo "=== 1. read-write boot, then nbdkit is killed"
start_nbdkit "$tmpdir/rw.sock" --filter="$FILTER" file img ext4file=/vm.img
boot rw "$tmpdir/rw.sock"
expect_line rw "before 00000000"
expect_line rw "after 00000200"
expect_line rw done
kill -9 "$(cat "$tmpdir/rw.sock.pid")"
wait_gone "$(cat "$tmpdir/rw.sock.pid")" || fail "nbdkit did not die"
needs_recovery img ||
    fail "after the kill the image does not need recovery (nothing journaled?)"

echo "=== 2. read-only boot of the crashed image"
sha_before=$(sha256sum < img)
start_nbdkit "$tmpdir/ro.sock" -r --filter="$FILTER" file img ext4file=/vm.img
boot ro "$tmpdir/ro.sock" readonly=on
expect_line ro "before 00000200"
expect_line ro "write failed"
stop_nbdkit "$tmpdir/ro.sock"
[ "$(sha256sum < img)" = "$sha_before" ] ||
    fail "the read-only session changed the image"

echo "=== 3. read-write boot of the crashed image"
start_nbdkit "$tmpdir/rw2.sock" --filter="$FILTER" file img ext4file=/vm.img
boot rw2 "$tmpdir/rw2.sock"
expect_line rw2 "before 00000200"
expect_line rw2 "after 00000200"
expect_line rw2 done
stop_nbdkit "$tmpdir/rw2.sock"
needs_recovery img &&
    fail "after a clean stop the image still needs recovery"
fsck_clean img
dump_cmp img /vm.img expected
echo "PASS"
