#!/usr/bin/env bash
# Journals written by the Linux kernel, replayed by ext4fs.
#
# For each flavour (ext4 4 KiB data=ordered and data=journal; 1 KiB
# blocks; 32-bit journal tags without checksums, ordered and journal;
# journal checksum v1 on a filesystem without metadata_csum; ext3 with
# indirect blocks): mke2fs an image with some files, loop-mount it,
# change it in three rounds (new files and directories, overwrites,
# appends, a truncate, deletes, renames, unwritten extents, a sparse
# file; then metadata freed; then the filesystem filled), fsync after
# each, and copy the backing file while still mounted: the copy needs
# recovery and its log holds hundreds of committed transactions (see
# journal-kernel-lib.sh for why this recipe works).  Oracle: e2fsck
# -fy on a copy of the copy.
#
# Kernel facts these images show (dumpe2fs -h, logdump -a):
#  - In data=ordered the kernel revokes freed metadata blocks (here a
#    directory and an extent block), and the filler reuses them for
#    file data: a replay that ignored a revoke would put old metadata
#    into /filler.  The revoke blocks are in the log although the
#    on-disk journal superblock often lacks the REVOKE feature (the
#    kernel sets it in memory and writes the superblock later): replay
#    must not depend on that flag (neither the kernel nor e2fsck does).
#  - In data=journal the kernel never revokes (jbd2_journal_forget); the
#    filler's data goes through the 4 MiB log and usually wraps it.
#
#  (d) the trap: the un-replayed copy read with debugfs differs from
#      the oracle (so a filter that does not replay fails here);
#  (a) nbdkit -r serves every file as the oracle has it, refuses the
#      deleted and renamed paths, says it replayed as many transactions
#      as the log has commits, and leaves the image unchanged;
#  (b) a read-write server replays in place at the first writable
#      connection, serves and accepts a write, and after a clean stop
#      the image is clean (e2fsck -fn, e2fsck -p), has no
#      needs_recovery, Journal start 0, a sequence past the old log,
#      and the oracle's files (plus the write);
#  (c) the kernel mounts that image and reads the same files.
source "$srcdir/functions.sh"
source "$srcdir/journal-kernel-lib.sh"

# The files present before the mount.
mkdir -p src/olddir src/keepdir
head -c 100000 /dev/urandom > src/keep
head -c $((1024*1024)) /dev/urandom > src/over
head -c $((2*1024*1024)) /dev/urandom > src/trunc
head -c 500000 /dev/urandom > src/gone
head -c 300000 /dev/urandom > src/mv
head -c $((3*1024*1024)) /dev/urandom > src/olddir/big
for i in 1 2 3 4 5; do head -c $((i * 3000)) /dev/urandom > src/olddir/f$i; done
for i in $(seq 1 30); do echo "kept $i" > src/keepdir/k$i; done

# The changes made under the kernel (in $mnt).
workload ()
{
    local m="$mnt"
    mkdir -p "$m/new/sub/deep" "$m/new/many"
    head -c 1500000 /dev/urandom > "$m/new/sub/deep/n1"
    echo "a small new file" > "$m/new/n2"
    for i in $(seq 0 59); do echo "many $i" > "$m/new/many/m$i"; done
    # Overwrite inside allocated blocks, and an append.
    head -c 65536 /dev/urandom | dd of="$m/over" bs=4096 seek=25 conv=notrunc status=none
    head -c 10000 /dev/urandom >> "$m/over"
    # Same-size rewrite of a small file, and a new extent in a big one.
    head -c 3000 /dev/urandom | dd of="$m/olddir/f1" conv=notrunc status=none
    head -c 8192 /dev/urandom |
        dd of="$m/olddir/big" bs=8192 oflag=seek_bytes seek=$((5*1024*1024)) conv=notrunc status=none
    truncate -s 123457 "$m/trunc"
    rm "$m/gone" "$m/olddir/f2"
    mv "$m/mv" "$m/new/sub/renamed"
    mv "$m/olddir/f3" "$m/olddir/f3.moved"
    # A sparse file, and unwritten extents partly written.
    truncate -s $((5*1024*1024)) "$m/new/sparse"
    head -c 4096 /dev/urandom | dd of="$m/new/sparse" bs=4096 seek=768 conv=notrunc status=none
    # (ext3 has no fallocate: a sparse file there.)
    fallocate -l $((1024*1024)) "$m/new/prealloc" 2>/dev/null ||
        truncate -s $((1024*1024)) "$m/new/prealloc"
    head -c 5000 /dev/urandom |
        dd of="$m/new/prealloc" bs=5000 oflag=seek_bytes seek=300000 conv=notrunc status=none
    # Metadata that the next round frees: a directory of several
    # blocks and a file with an extent tree block (or indirect block).
    mkdir "$m/victim"
    for i in $(seq 1 300); do
        echo $i > "$m/victim/an-entry-with-a-rather-long-name-number-$i"
    done
    for i in $(seq 0 2 40); do
        head -c 4096 /dev/urandom | dd of="$m/frag" bs=4096 seek=$i conv=notrunc status=none
    done
    head -c 200000 /dev/urandom > "$m/new/short-lived"
    fsync_tree "$m"
    # Second round: those freed (in data=ordered the kernel revokes the
    # freed metadata blocks; in data=journal it never revokes).
    rm -r "$m/victim" "$m/frag" "$m/new/short-lived"
    echo "appended" >> "$m/keepdir/k7"
    fsync_tree "$m"
    # Third round: fill the filesystem, so that the freed blocks are
    # reused for file data (written home directly in data=ordered: a
    # replay ignoring the revokes would put the old metadata over it;
    # in data=journal the 40+ MiB through the log make it wrap).
    head -c 250000 /dev/urandom > "$m/new/after"
    # (ext4 keeps 2% of the blocks for itself, even from root:
    # reserved_clusters 0 lets the filler take those too.)
    echo 0 > "/sys/fs/ext4/${cur_dev##*/}/reserved_clusters" 2>/dev/null || true
    head -c $((100*1024*1024)) /dev/urandom > "$m/filler" 2>/dev/null || true
    fsync_tree "$m"
}

# refused_all NAME FILE: every line of the client's output is a
# refusal: one failure naming the server's first error, 0 returned.
refused_all ()
{
    if [ -s "$2.raw" ] && ! grep -q -v '^REFUSED ' "$2.raw"; then
        bad "$1: every connection refused; server said: $(grep -m1 error "$tmpdir/$3.err")"
        return 0
    fi
    return 1
}

flavour ()
{
    local name="$1" mkfs="$2" opts="$3" n c seq_o seq_r sha r
    echo "=== $name: mke2fs $mkfs, mount -o $opts"
    # The copy must hold the first round's changes only in its log.
    # On a loaded machine a round can take longer than the flusher's
    # 30 s, and the kernel then checkpoints it before the copy: the
    # setup is tried again then, up to three times.
    local attempt
    for attempt in 1 2 3; do
    rm -f live.img copy.img rw.img oracle.img
    truncate -s 64M live.img
    mke2fs -q -F $mkfs -E lazy_itable_init=0,lazy_journal_init=0 -d src live.img ||
        fail "$name: mke2fs failed"
    loop_mount live.img "$opts,commit=60,noinit_itable" || fail "$name: mount failed"
    workload
    copy_live live.img copy.img
    loop_umount
    rm -f live.img

    # The copy needs recovery and its log holds committed transactions.
    has_feature copy.img needs_recovery || fail "$name: test setup: the copy does not need recovery"
    [ "$(jfield copy.img 'Journal start')" != 0 ] ||
        fail "$name: test setup: the copy's journal is empty (Journal start 0)"
    # KEEP_TMP=DIR keeps each copy there, for inspection.
    if [ -n "${KEEP_TMP:-}" ]; then cp --sparse=always copy.img "$KEEP_TMP/$name.img"; fi
    c=$(commits_in_log copy.img)
    [ "$c" -ge 1 ] || fail "$name: test setup: no commit block in the copy's log"
    debugfs -c -R "logdump -a" copy.img > logdump.out 2>/dev/null
    echo "  journal: features '$(jfield copy.img 'Journal features')', start $(jfield copy.img 'Journal start'), $c committed transaction(s)$(log_wraps logdump.out)"

    oracle copy.img oracle.list oracle.img
    seq_o=$(jfield oracle.img 'Journal sequence')
    tree_list copy.img stale.list
    # Paths that exist only in the stale image (deleted, renamed away).
    awk -F'  ' 'NR==FNR { o[$2]=1; next } !($2 in o)' oracle.list stale.list > only-stale.list
    # (With data=journal the filler's data wraps the log: the first
    # rounds are checkpointed, so the stale image already has them.)
    case "$opts" in
        *data=journal*) break ;;
        *) grep -q '  /gone$' only-stale.list && break
           echo "  (test setup: /gone is not in the stale image: the log was checkpointed before the copy; attempt $attempt of 3)" ;;
    esac
    done

    # (d) The stale image differs from the oracle.
    if cmp -s stale.list oracle.list; then
        bad "$name: (d) the un-replayed image reads the same as the oracle: this test cannot tell replay from no replay"
    else
        echo "  (d) un-replayed image: $(diff stale.list oracle.list | grep -c '^[<>]') line(s) of its file list differ from the oracle"
    fi
    case "$opts" in
        *data=journal*) ;;
        *) grep -q '  /gone$' only-stale.list ||
               bad "$name: test setup: /gone is not in the stale image (the log was checkpointed, three times)" ;;
    esac
    # Revoked blocks now in use in the oracle: a replay that ignored
    # the revokes would write stale metadata over them.
    revoke_trap "$name" "$opts"

    # (a) -r: the replayed state, the image untouched.
    sha=$(sha_of copy.img)
    srv_start ro -r --filter="$FILTER" file copy.img ext4file=exportname
    read_exports "$name (a) -r" "$tmpdir/ro.sock" oracle.list ro.list 1
    cmp_lists "$name (a) -r" oracle.list ro.list
    timeout $T /usr/bin/python3 "$tmpdir/exports.py" "$tmpdir/ro.sock" read only-stale.list > ro-stale.out 2>&1
    if grep -v '^REFUSED  ' ro-stale.out | grep -q .; then
        bad "$name: (a) -r serves paths deleted or renamed away: $(grep -v '^REFUSED  ' ro-stale.out | awk '{print $2}' | head -5 | tr '\n' ' ')"
    fi
    srv_stop ro
    n=$(replayed_count ro)
    [ "$n" = "$c" ] ||
        bad "$name: (a) -r: stderr says replayed '${n}' transaction(s), the log has $c commits; stderr starts: $(errhead "$tmpdir/ro.err" 1)"
    [ "$(sha_of copy.img)" = "$sha" ] || bad "$name: (a) -r changed the image"

    # (b) Read-write: replayed in place, written, stopped cleanly.
    cp --sparse=always copy.img rw.img
    head -c 4096 /dev/urandom > wdata
    srv_start rw --filter="$FILTER" file rw.img ext4file=exportname
    read_exports "$name (b) read-write" "$tmpdir/rw.sock" oracle.list rw.list 0
    if refused_all "$name: (b) read-write" rw.list rw; then
        srv_stop rw
        [ "$(sha_of rw.img)" = "$sha" ] || bad "$name: (b) the refused server changed the image"
        return 0
    fi
    cmp_lists "$name (b) read-write" oracle.list rw.list
    r=$(timeout $T /usr/bin/python3 "$tmpdir/exports.py" "$tmpdir/rw.sock" write /keep 8192 wdata 2>&1)
    [ "$r" = WROTE ] || bad "$name: (b) write to /keep: $r"
    srv_stop rw
    n=$(replayed_count rw)
    [ "$n" = "$c" ] ||
        bad "$name: (b) read-write: stderr says replayed '${n}' transaction(s), the log has $c commits; stderr starts: $(errhead "$tmpdir/rw.err" 1)"
    # Expected: the oracle with the write in /keep.
    debugfs -R "dump /keep keep.exp" oracle.img >/dev/null 2>&1
    dd if=wdata of=keep.exp bs=4096 seek=2 conv=notrunc status=none
    awk -v s="$(sha_of keep.exp)" -F'  ' '$2 == "/keep" { print s "  " $2; next } 1' \
        oracle.list > rw-expected.list
    if ! e2fsck -fn rw.img > rw.fsck 2>&1; then
        head -20 rw.fsck >&2
        bad "$name: (b) e2fsck -fn after the read-write session reports problems"
    fi
    cp --sparse=always rw.img rw-p.img
    e2fsck -p rw-p.img > rw-p.fsck 2>&1 ||
        bad "$name: (b) e2fsck -p (boot-time check) exits $?: $(errhead rw-p.fsck 3)"
    rm -f rw-p.img
    has_feature rw.img needs_recovery && bad "$name: (b) needs_recovery still set after a clean stop"
    [ "$(jfield rw.img 'Journal start')" = 0 ] ||
        bad "$name: (b) Journal start is $(jfield rw.img 'Journal start') after a clean stop, not 0"
    # The sequence moved past every tid of the old log (as e2fsck's).
    seq_r=$(jfield rw.img 'Journal sequence')
    if [ -n "$seq_r" ] && [ -n "$seq_o" ]; then
        [ $(( (seq_r - seq_o) & 0x80000000 )) = 0 ] ||
            bad "$name: (b) journal sequence $seq_r is behind e2fsck's $seq_o"
    else
        bad "$name: (b) no journal sequence in dumpe2fs -h"
    fi
    tree_list rw.img rw-image.list
    cmp_lists "$name (b) image after the read-write session" rw-expected.list rw-image.list

    # (c) The kernel accepts the image and reads the same files.
    if loop_mount rw.img rw,noinit_itable; then
        mnt_list mnt.list
        loop_umount
        cmp_lists "$name (c) kernel mount of the replayed image" rw-expected.list mnt.list
        e2fsck -fn rw.img > rw.fsck 2>&1 ||
            bad "$name: (c) e2fsck -fn after the kernel mount: $(errhead rw.fsck 5)"
    else
        bad "$name: (c) the kernel refuses to mount the image after our replay"
    fi
    rm -f copy.img rw.img oracle.img
}

# Journal superblock features the kernel sets, and tag sizes:
# 64bit+metadata_csum: 64BIT|CSUM_V3, 16-byte tags; ^64bit,^csum: none,
# 8-byte tags, 4-byte revoke entries; journal_checksum without
# metadata_csum: COMPAT_CHECKSUM (v1), crc32 in the commit block.
# The data=ordered flavours get a 16 MiB journal, so that the kernel
# does not checkpoint: the log keeps every round.
J="-J size=16"
flavour ext4-4k-ordered    "-t ext4 -b 4096 $J"                          data=ordered
flavour ext4-4k-journal    "-t ext4 -b 4096"                             data=journal
flavour ext4-1k-ordered    "-t ext4 -b 1024 $J"                          data=ordered
flavour ext4-32bit-ordered "-t ext4 -b 4096 -O ^64bit,^metadata_csum $J" data=ordered
flavour ext4-32bit-journal "-t ext4 -b 1024 -O ^64bit,^metadata_csum"    data=journal
flavour ext4-jcsum-v1      "-t ext4 -b 4096 -O ^metadata_csum $J"        data=ordered,journal_checksum
flavour ext3-indirect      "-t ext3 -b 4096 $J"                          data=ordered

finish
echo "every kernel journal replayed as e2fsck does"
