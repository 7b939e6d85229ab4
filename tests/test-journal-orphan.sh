#!/usr/bin/env bash
# Orphan inodes left by a kernel "crash": a file held open and
# unlinked while the backing file of the mounted filesystem is copied.
# The copy needs recovery, and after replay its superblock lists an
# orphan (s_last_orphan, "First orphan inode") or, with the orphan_file
# feature, has orphan_present.  Three ways:
#   list-in-log: classic orphan list, fsync only: the orphan is in the
#       log only (the home superblock says nothing): whoever checks for
#       orphans must look at the replayed superblock;
#   list-at-home: the same after sync(1), which also writes the
#       superblock home (the log still holds committed transactions);
#   orphan-file: mke2fs -O orphan_file.
# For each: nbdkit -r replays, serves every file as e2fsck -fy has it,
# warns about the orphans (a warning or a note), and leaves the image
# unchanged; a read-write server refuses writable clients with a
# message naming e2fsck, stays up, and leaves the image unchanged (no
# replay written).
source "$srcdir/functions.sh"
source "$srcdir/journal-kernel-lib.sh"

mkdir -p src/d
head -c 300000 /dev/urandom > src/old
for i in 1 2 3; do echo "old $i" > src/d/f$i; done

case_ ()
{
    local name="$1" mkfs="$2" how="$3" sha r n
    echo "=== $name"
    rm -f live.img copy.img jr.img oracle.img
    truncate -s 64M live.img
    mke2fs -q -F -t ext4 $mkfs -E lazy_itable_init=0,lazy_journal_init=0 -d src live.img ||
        { echo "skipped $name: mke2fs $mkfs failed"; return 0; }
    loop_mount live.img "commit=60,noinit_itable" || fail "$name: mount failed"
    mkdir "$mnt/new"
    head -c 200000 /dev/urandom > "$mnt/new/a"
    echo "new b" > "$mnt/d/f2"
    head -c 100000 /dev/urandom > "$mnt/held"
    fsync_tree "$mnt"
    exec 3<> "$mnt/held"
    rm "$mnt/held" "$mnt/d/f1"
    head -c 50000 /dev/urandom > "$mnt/new/c"
    case $how in
        sync) sync ;;
        *) fsync_tree "$mnt" ;;
    esac
    copy_live live.img copy.img
    exec 3>&-
    loop_umount
    rm -f live.img

    has_feature copy.img needs_recovery || fail "$name: test setup: the copy does not need recovery"
    [ "$(jfield copy.img 'Journal start')" != 0 ] || fail "$name: test setup: Journal start is 0"
    local c
    c=$(commits_in_log copy.img)
    [ "$c" -ge 1 ] || fail "$name: test setup: no commit block in the log"
    # The orphan after a plain journal replay (debugfs jr: no orphan
    # processing, unlike e2fsck -E journal_only).
    cp --sparse=always copy.img jr.img
    debugfs -w -R jr jr.img >/dev/null 2>&1
    case $mkfs in
        *^orphan_file*)
            [ -n "$(jfield jr.img 'First orphan inode')" ] ||
                fail "$name: test setup: no 'First orphan inode' after replay"
            echo "  after replay: First orphan inode $(jfield jr.img 'First orphan inode')" ;;
        *)
            has_feature jr.img orphan_present ||
                fail "$name: test setup: no orphan_present after replay"
            echo "  after replay: orphan_present" ;;
    esac
    if [ "$how" = fsync ]; then
        case $mkfs in
            *^orphan_file*) [ -z "$(jfield copy.img 'First orphan inode')" ] ;;
            *) ! has_feature copy.img orphan_present ;;
        esac && echo "  the un-replayed superblock shows no orphan: it is in the log only"
    fi
    rm -f jr.img
    oracle copy.img oracle.list oracle.img
    tree_list copy.img stale.list
    # (sync(1) writes the metadata home: the stale image is current.)
    if [ "$how" = fsync ] && cmp -s stale.list oracle.list; then
        bad "$name: the un-replayed image reads the same as the oracle"
    fi

    # -r: replayed, every file right, a warning, image unchanged.
    sha=$(sha_of copy.img)
    srv_start ro -r --filter="$FILTER" file copy.img ext4file=exportname
    read_exports "$name -r" "$tmpdir/ro.sock" oracle.list ro.list 1
    cmp_lists "$name -r" oracle.list ro.list
    r=$(probe "$tmpdir/ro.sock" /d/f1)
    case "$r" in REFUSED*) ;; *) bad "$name: -r serves the deleted /d/f1: $r" ;; esac
    srv_stop ro
    n=$(replayed_count ro)
    [ "$n" = "$c" ] ||
        bad "$name: -r: stderr says replayed '${n}' transaction(s), the log has $c; stderr starts: $(errhead "$tmpdir/ro.err" 1)"
    grep -i -E 'warning|note' "$tmpdir/ro.err" | grep -q -i 'orphan' ||
        bad "$name: -r: no warning about the orphan inodes: $(errhead "$tmpdir/ro.err" 3)"
    [ "$(sha_of copy.img)" = "$sha" ] || bad "$name: -r changed the image"

    # Read-write: every writable client refused, naming e2fsck; the
    # server stays up; nothing written.
    srv_start rw --filter="$FILTER" file copy.img ext4file=exportname
    for e in /old /new/a; do
        r=$(probe "$tmpdir/rw.sock" $e)
        case "$r" in REFUSED*) ;; *) bad "$name: writable client on $e not refused: $r" ;; esac
        kill -0 "${srv_job[rw]}" 2>/dev/null || bad "$name: the server died refusing $e"
    done
    srv_stop rw
    grep -q 'e2fsck' "$tmpdir/rw.err" ||
        bad "$name: the refusal does not name e2fsck: $(errhead "$tmpdir/rw.err" 3)"
    grep -q -i 'orphan' "$tmpdir/rw.err" ||
        bad "$name: the refusal does not mention the orphan inodes: $(errhead "$tmpdir/rw.err" 3)"
    [ "$(sha_of copy.img)" = "$sha" ] || bad "$name: the refusing server changed the image"
    rm -f copy.img oracle.img
}

case_ list-in-log  "-O ^orphan_file" fsync
case_ list-at-home "-O ^orphan_file" sync
case_ orphan-file  "-O orphan_file"  fsync

finish
echo "orphan inodes: served read-only with a warning, writing refused"
