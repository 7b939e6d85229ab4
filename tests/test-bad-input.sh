#!/usr/bin/env bash
# Bad parameters and bad images: nbdkit must refuse at start-up with a
# clear message (exit status 1, no crash) and leave the image
# byte-for-byte unchanged.  Corrupt metadata found later (while
# reading) must give an I/O error, not a crash.
#
# All cases run even if one fails; the failures are listed at the end.
source "$srcdir/functions.sh"
cd "$tmpdir"

failures=()
bad () { echo "FAIL: $*" >&2; failures+=("$*"); }

# check_status NAME RC ERRFILE: no crash, no sanitizer report, and no
# untranslated com_err code ("Unknown code ext2 NN") in the message.
check_status ()
{
    local name="$1" rc="$2" err="$3"
    if [ "$rc" -ge 128 ]; then
        bad "$name: nbdkit crashed (exit status $rc)"
    fi
    if grep -q -E 'Sanitizer|Segmentation fault|Aborted|assertion' "$err"; then
        bad "$name: crash or assertion in stderr"
    fi
    if grep -q 'Unknown code' "$err"; then
        bad "$name: unclear message (untranslated error code): $(grep 'Unknown code' "$err" | head -1)"
    fi
}

# refuse NAME IMG PHRASE ARGS...: nbdkit with a fixed ext4file must
# refuse to start (exit 1), print PHRASE, and not touch IMG.  (rc 0
# below means nbdkit started serving.)
refuse ()
{
    local name="$1" img="$2" phrase="$3"; shift 3
    local sha rc=0
    echo "== $name"
    sha=$(sha256sum < "$img")
    # Not "--run true": with --run, nbdkit's exit status is the run
    # command's whenever that command finishes before the server's
    # start-up (.after_fork) fails, so the refusal could be missed.
    # Run in the foreground instead and wait for nbdkit to exit; if it
    # is still serving after 15 s it accepted the bad input.
    rm -f bad.sock bad.pid
    nbdkit_srv -U bad.sock -P bad.pid -f --filter="$FILTER" file "$img" "$@" \
        > out.txt 2> err.txt &
    local pid=$! i
    for ((i=0; i<150; i++)); do
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 $pid 2>/dev/null; then
        [ -s bad.pid ] && kill "$(cat bad.pid)" 2>/dev/null
        kill $pid 2>/dev/null
        wait $pid || true
        rc=0
    else
        wait $pid || rc=$?
    fi
    cat err.txt
    check_status "$name" "$rc" err.txt
    [ "$rc" = 1 ] || bad "$name: expected exit status 1, got $rc"
    grep -q -F -- "$phrase" err.txt ||
        bad "$name: stderr lacks '$phrase'"
    [ "$(sha256sum < "$img")" = "$sha" ] || bad "$name: image was modified"
}

# A good image with assorted non-regular files.
mkdir -p src/d/sub
echo hello > src/f
echo x > src/d/sub/g
ln -s d src/ldir
ln -s /d/sub src/ldir2
ln -s loopb src/loopa
ln -s loopa src/loopb
ln -s nothere src/dangling
head -c $((3*1024*1024)) /dev/urandom > src/big
truncate -s 16M img
mke2fs -q -F -t ext4 -b 4096 -d src img
debugfs -w -R "mknod dev0 c 1 3" img >/dev/null 2>&1
debugfs -R "stat /dev0" img 2>/dev/null | grep -q 'character special' ||
    fail "test setup: could not make a device node"
fsck_clean img

# Bad parameters.
refuse "missing ext4file" img "ext4file parameter missing"
refuse "relative path" img "must be absolute" ext4file=foo
refuse "relative path d/sub/g" img "must be absolute" ext4file=d/sub/g
refuse "ext4file twice" img "only once" ext4file=/f ext4file=/big
refuse "ext2file and ext4file" img "only once" ext2file=/f ext4file=/big
refuse "ext4root without exportname" img "only makes sense" ext4file=/f ext4root=/d
refuse "relative ext4root" img "must be absolute" ext4file=exportname ext4root=d
refuse "ext4root not a directory" img "not a directory" ext4file=exportname ext4root=/f
refuse "ext4root does not exist" img "no such file or directory" ext4file=exportname ext4root=/nope

# Bad paths inside a good image.
refuse "nonexistent file" img "no such file or directory" ext4file=/nope
refuse "nonexistent nested" img "no such file or directory" ext4file=/d/nope/x
refuse "directory" img "only regular files" ext4file=/d
refuse "root directory" img "only regular files" ext4file=/
refuse "symlink to directory" img "only regular files" ext4file=/ldir
refuse "absolute symlink to directory" img "only regular files" ext4file=/ldir2
refuse "symlink loop" img "too many levels of symbolic links" ext4file=/loopa
refuse "dangling symlink" img "no such file or directory" ext4file=/dangling
refuse "device node" img "only regular files" ext4file=/dev0
refuse "file used as directory" img "is not a directory" ext4file=/f/x
refuse "component too long" img "longer than 255" ext4file=/$(printf 'a%.0s' $(seq 300))

# Not an ext filesystem.
truncate -s 16M zeros
refuse "zeros" zeros "does not contain a valid ext2/ext3/ext4" ext4file=/f
head -c $((4*1024*1024)) /dev/urandom > random
refuse "random bytes" random "does not contain a valid ext2/ext3/ext4" ext4file=/f
: > empty
refuse "empty image" empty "truncated" ext4file=/f
head -c 1500 img > tiny
refuse "image smaller than the superblock" tiny "truncated" ext4file=/f
# Not a filesystem, but something a filter of nbdkit unwraps: the
# message names it.
cp zeros mbr
printf '\125\252' | dd of=mbr bs=1 seek=510 conv=notrunc status=none
refuse "a partitioned disk" mbr "add --filter=partition" ext4file=/f
gzip -1 -c img > img.gz
refuse "gzip-compressed image" img.gz "add --filter=gzip" ext4file=/f
tar cf img.tar img
refuse "image in a tar archive" img.tar "add --filter=tar" ext4file=/f

# Under --run a refusal at start-up must fail the command's
# connections at once: nbdkit's parent, running the command, keeps the
# listening socket open, so they used to wait for ever (the server had
# exited).
# run_refused NAME IMG PHRASE ARGS...
run_refused ()
{
    local name="$1" img="$2" phrase="$3" rc=0
    shift 3
    echo "== $name"
    nbdkit_srv -U - -r --filter="$FILTER" file "$img" "$@" \
        --run 'nbdinfo --size "$uri"' > out.txt 2> err.txt &
    local pid=$! i
    for ((i=0; i<300; i++)); do
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 $pid 2>/dev/null; then
        bad "$name: the --run command hung"
        # nbdkit waits for its command, which waits for the server.
        pkill -9 -f 'nbdinfo --size nbd[+]unix' 2>/dev/null
        kill -9 $pid 2>/dev/null
    fi
    wait $pid || rc=$?
    cat err.txt
    [ "$rc" != 0 ] || bad "$name: expected a failure, got exit status 0"
    grep -q -F -- "$phrase" err.txt || bad "$name: stderr lacks '$phrase'"
}
run_refused "--run, not a filesystem" zeros "does not contain a valid" ext4file=/f
run_refused "--run, no such file" img "no such file or directory" ext4file=/nope
run_refused "--run, bad ext4root" img "not a directory" ext4file=exportname ext4root=/f

# Truncated images.
cp img trunc64k
truncate -s 64K trunc64k
refuse "truncated inside metadata" trunc64k "truncated" ext4file=/f
# Truncated inside /big's data: the size check refuses at start.
first=$(debugfs -R "ex /big" img 2>/dev/null |
            awk '$1 ~ /\// && $NF !~ /Uninit/ { print $8; exit }')
[ -n "$first" ] || fail "test setup: cannot find /big's first block"
cut=$(( (first + 100) * 4096 + 1000 ))
cp img truncdata
truncate -s $cut truncdata
refuse "truncated inside file data" truncdata \
    "filesystem needs $((16*1024*1024)) bytes but the device is only $cut bytes" \
    ext4file=/big

# Superblock checksum mismatch (metadata_csum).
truncate -s 16M csum
mke2fs -q -F -t ext4 -O metadata_csum -d src csum
# Flip a byte of the volume name (superblock offset 0x78) without
# fixing the checksum.
printf '\x5a' | dd of=csum bs=1 seek=$((1024 + 0x78)) conv=notrunc status=none
refuse "bad superblock checksum" csum "does not contain a valid ext2/ext3/ext4" ext4file=/f

# An external journal device is not a filesystem.
truncate -s 8M jdev
mke2fs -q -F -O journal_dev -b 4096 jdev
refuse "external journal device" jdev "journal device" ext4file=/f

# Refusals that depend on the connection being writable happen when a
# writable client connects; the server must report them and -r must
# still serve the file.
# connect_refused NAME IMG PHRASE
connect_refused ()
{
    local name="$1" img="$2" phrase="$3" sha rc=0
    echo "== $name"
    sha=$(sha256sum < "$img")
    nbdkit_srv -U - --filter="$FILTER" file "$img" ext4file=/f \
        --run 'nbdinfo --size "$uri"' > out.txt 2> err.txt || rc=$?
    cat err.txt
    check_status "$name" "$rc" err.txt
    [ "$rc" != 0 ] || bad "$name: a writable connection was accepted"
    grep -q -F -- "$phrase" err.txt || bad "$name: stderr lacks '$phrase'"
    [ "$(sha256sum < "$img")" = "$sha" ] || bad "$name: image was modified"
    rc=0
    nbdkit_srv -U - -r --filter="$FILTER" file "$img" ext4file=/f \
        --run 'nbdcopy "$uri" -' > out.txt 2> err.txt || rc=$?
    check_status "$name (-r)" "$rc" err.txt
    [ "$rc" = 0 ] || bad "$name: read-only serving failed: $(cat err.txt)"
    cmp -s out.txt src/f || bad "$name: read-only serving gave wrong bytes"
    [ "$(sha256sum < "$img")" = "$sha" ] || bad "$name: image was modified by -r"
}
cp img errors
debugfs -w -R "ssv state 2" errors >/dev/null 2>&1
connect_refused "filesystem marked with errors" errors "marked as having errors"
cp img recover
debugfs -w -R "feature has_journal needs_recovery" recover >/dev/null 2>&1
debugfs -w -R "ssv journal_dev 2049" recover >/dev/null 2>&1
debugfs -w -R "ssv journal_inum 0" recover >/dev/null 2>&1
connect_refused "external journal needs recovery" recover "needs recovery"

# Corrupt block maps found while reading: an I/O error with a message,
# never a crash, wrong data, or a hang.
# corrupt_read NAME IMG PHRASE
corrupt_read ()
{
    local name="$1" img="$2" phrase="$3" sha rc=0
    echo "== $name"
    sha=$(sha256sum < "$img")
    rm -f out.bin
    nbdkit_srv -U - -r --filter="$FILTER" file "$img" ext4file=/big \
        --run 'nbdcopy "$uri" out.bin' > out.txt 2> err.txt || rc=$?
    cat err.txt
    check_status "$name" "$rc" err.txt
    [ "$rc" = 1 ] || bad "$name: expected the copy to fail (status 1), got $rc"
    grep -q -F -- "$phrase" err.txt || bad "$name: stderr lacks '$phrase'"
    [ "$(sha256sum < "$img")" = "$sha" ] || bad "$name: image was modified"
}
cp img badmagic
debugfs -w -R "sif /big block[0] 0" badmagic >/dev/null 2>&1
corrupt_read "bad extent header magic" badmagic "extent"
cp img badphys
debugfs -w -R "sif /big block[5] 99999999" badphys >/dev/null 2>&1
corrupt_read "extent outside the filesystem" badphys "outside the filesystem"
# A file of indirect blocks whose single-indirect pointer (i_block[12])
# names the group descriptors, then a block past the end.
truncate -s 16M indimg
mke2fs -q -F -t ext4 -b 4096 -O ^extent,^64bit -d src indimg
cp indimg badind
debugfs -w -R "sif /big block[IND] 1" badind >/dev/null 2>&1
corrupt_read "indirect block in the metadata" badind "corrupt indirect block number 1"
cp indimg badind2
debugfs -w -R "sif /big block[IND] 99999999" badind2 >/dev/null 2>&1
corrupt_read "indirect block outside the filesystem" badind2 \
    "corrupt indirect block number 99999999"

# The good images were never touched and are still clean.
fsck_clean img
fsck_clean indimg

if [ ${#failures[@]} -gt 0 ]; then
    echo "${#failures[@]} failure(s):" >&2
    printf '  %s\n' "${failures[@]}" >&2
    exit 1
fi
echo "all bad inputs refused cleanly"
