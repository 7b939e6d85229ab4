# Helpers shared by the tests that make real kernel journals
# (test-journal-kernel.sh, test-journal-orphan.sh).  Source after
# functions.sh; it leaves the shell in $tmpdir.
#
# The recipe that leaves committed, not yet checkpointed transactions
# in a kernel journal: loop-mount with commit=60 (no timer commit in
# between), make the changes, fsync(2) every changed file and
# directory (each fsync commits the running transaction but, unlike
# sync(1) or syncfs(2), does not write the block device's dirty
# buffers home: those are the checkpoint, left to the flusher after
# dirty_expire_centisecs, 30 s), then copy the backing file while
# still mounted.  fsfreeze, sync(1) and sync -f would checkpoint (or
# at least write the metadata home), making the stale image equal to
# the replayed one.

cd "$tmpdir"
requires test "$(id -u)" = 0
requires losetup --version
requires mount --version
requires debugfs -R "help" /dev/null
requires dumpe2fs -V
requires /usr/bin/python3 -c "import nbd"

failures=()
bad () { echo "FAIL: $*" >&2; failures+=("$*"); }
finish ()
{
    if [ ${#failures[@]} -gt 0 ]; then
        echo "${#failures[@]} failure(s):" >&2
        printf '  %s\n' "${failures[@]}" >&2
        exit 1
    fi
}
T=30                            # seconds allowed for any one client
# errhead FILE [N]: its first N (2) lines, on one line.
errhead () { head -"${2:-2}" "$1" | tr '\n' ' '; }
sha_of () { sha256sum < "$1" | cut -d' ' -f1; }

# One loop device and mount point at a time; both are released at
# exit even on failure.  The device is detached only if it still
# backs our file (never someone else's device that took its number).
mnt=$tmpdir/mnt
mkdir -p "$mnt"
cur_dev=
cur_img=
loop_release ()
{
    if mountpoint -q "$mnt"; then
        umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
    fi
    if [ -n "$cur_dev" ] &&
       [ "$(losetup -n -O BACK-FILE "$cur_dev" 2>/dev/null | sed 's/ *$//')" = "$cur_img" ]; then
        losetup -d "$cur_dev" 2>/dev/null
    fi
    cur_dev=
    cur_img=
}
cleanup_fn loop_release

# loop_mount IMG OPTIONS: attach IMG to a free loop device and mount
# it at $mnt.  Returns non-zero (after releasing) on failure.
loop_mount ()
{
    local img opts="$2"
    img=$(readlink -f "$1")
    cur_dev=$(losetup -f --show "$img") || { cur_dev=; return 1; }
    cur_img=$img
    if ! mount -t ext4 -o "$opts" "$cur_dev" "$mnt"; then
        loop_release
        return 1
    fi
}
loop_umount ()
{
    umount "$mnt" || { bad "umount $mnt failed"; }
    loop_release
}

# Skip (77) where loop devices or mounting do not work here.
truncate -s 8M probe.img
mke2fs -q -F -t ext4 probe.img
if ! loop_mount probe.img rw 2>probe.err; then
    echo "$0: test skipped because loop devices or mount do not work here: $(cat probe.err)"
    exit 77
fi
loop_umount
rm -f probe.img probe.err

# fsync_tree DIR: fsync(2) every file and directory under DIR (files
# first, then directories bottom-up, DIR last).
fsync_tree ()
{
    /usr/bin/python3 - "$1" <<'EOF'
import os, sys
top = sys.argv[1]
dirs = []
for root, ds, fs in os.walk(top, topdown=False):
    for f in fs:
        p = os.path.join(root, f)
        if os.path.islink(p): continue
        fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)
    dirs.append(root)
for d in dirs:
    fd = os.open(d, os.O_RDONLY); os.fsync(fd); os.close(fd)
EOF
}

# copy_live IMG COPY: copy the backing file of a mounted filesystem
# (sparse, so that a 64 MiB image copies in a few ms).
copy_live () { cp --sparse=always "$1" "$2"; }

# probe SOCK EXPORT (a client asking for EXPORT): "REFUSED msg" or "OPEN ro=0|1".
cat > probe.py <<'EOF'
import sys, nbd
import e4test as t
try:
    h = t.connect(sys.argv[1], sys.argv[2])
except nbd.Error as e:
    print("REFUSED", t.errstr(e)); sys.exit(0)
print("OPEN ro=%d" % h.is_read_only())
h.shutdown()
EOF
probe () { timeout $T /usr/bin/python3 probe.py "$@" 2>&1 || echo "PYFAIL $?"; }

# jfield IMG FIELD: a field of dumpe2fs -h ("Journal start", ...).
jfield () { dumpe2fs -h "$1" 2>/dev/null | sed -n "s/^$2: *//p"; }
has_feature () { dumpe2fs -h "$1" 2>/dev/null | grep -q "^Filesystem features:.* $2\b"; }
# Committed transactions in the log, as debugfs's logdump walks it.
commits_in_log () { debugfs -c -R logdump "$1" 2>/dev/null | grep -c '(commit block)' || true; }

# log_wraps LOGDUMP: " (the log wraps)" when a later log block of
# logdump -a's walk has a lower block number than an earlier one.
log_wraps ()
{
    awk '/^Found expected sequence/ { b = $NF + 0; if (b < last) w = 1; last = b }
         END { if (w) printf " (the log wraps)" }' "$1"
}

# revoke_trap NAME MOUNTOPTS: for data=ordered, the log must hold
# revokes, and at least one revoked block must be in use in the oracle
# (oracle.img): a replay that ignored the revokes would damage it.
revoke_trap ()
{
    local blocks used
    blocks=$(awk '/Revoke FS block/ { print $4 }' logdump.out | sort -un)
    case "$2" in
        *data=journal*)
            [ -z "$blocks" ] || echo "  note: the log holds revokes in data=journal"
            return 0 ;;
    esac
    [ -n "$blocks" ] || { bad "$1: test setup: the log holds no revoke record"; return 0; }
    used=$(debugfs -R "icheck $(echo $blocks)" oracle.img 2>/dev/null |
               awk 'NR > 1 && $2 ~ /^[0-9]+$/' | wc -l)
    echo "  revokes: $(echo $blocks | wc -w) block(s) revoked, $used of them in use after replay"
    [ "$used" -ge 1 ] ||
        bad "$1: test setup: no revoked block is reused, so revokes are not tested"
}

# tree_list IMG OUT: "sha256  /path" of every regular file of IMG
# (debugfs rdump, no e2fsck), sorted by path.
tree_list ()
{
    local d="$tmpdir/rdump.$$"
    rm -rf "$d"; mkdir "$d"
    debugfs -c -R "rdump / $d" "$1" >/dev/null 2>&1
    (cd "$d" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) |
        sed 's|  \./|  /|' > "$2"
    rm -rf "$d"
}
# mnt_list OUT: the same for the mounted filesystem at $mnt.
mnt_list ()
{
    (cd "$mnt" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) |
        sed 's|  \./|  /|' > "$1"
}

# oracle IMG OUT [REPLAYED]: what e2fsck -fy makes of a copy of IMG:
# its file list in OUT, the repaired image kept as REPLAYED.
oracle ()
{
    local o=${3:-$tmpdir/oracle.img} rc=0
    cp --sparse=always "$1" "$o"
    e2fsck -fy "$o" > "$tmpdir/oracle.fsck" 2>&1 || rc=$?
    [ $rc -le 1 ] || { cat "$tmpdir/oracle.fsck"; fail "test setup: e2fsck -fy of $1 exited $rc"; }
    e2fsck -fn "$o" > "$tmpdir/oracle.fsck2" 2>&1 ||
        { cat "$tmpdir/oracle.fsck2"; fail "test setup: $1 is not clean after e2fsck -fy"; }
    tree_list "$o" "$2"
}

# The libnbd client.  exports.py SOCK read LIST: for each "sha  /path"
# line of LIST (only the path is used), connect with that export name,
# read it all and print "sha  /path ro=0|1", or "REFUSED  /path msg".
# exports.py SOCK write PATH OFFSET DATAFILE: write DATAFILE's bytes
# at OFFSET, flush, print "WROTE" (or "WERR errno msg", "REFUSED msg").
cat > exports.py <<'EOF'
import hashlib, sys, nbd
import e4test as t
sock, action = sys.argv[1:3]
if action == "read":
    for line in open(sys.argv[3]):
        path = line.rstrip("\n").split("  ", 1)[1]
        try:
            h = t.connect(sock, path)
        except nbd.Error as e:
            print("REFUSED  %s %s" % (path, t.errstr(e)))
            continue
        try:
            s = t.read_all(h, into=hashlib.sha256())
            print("%s  %s ro=%d" % (s.hexdigest(), path, h.is_read_only()))
        except nbd.Error as e:
            print("ERR  %s %s %s" % (path, e.errno, t.errstr(e)))
        h.shutdown()
elif action == "write":
    path, off, data = sys.argv[3], int(sys.argv[4]), open(sys.argv[5], "rb").read()
    try:
        h = t.connect(sock, path)
    except nbd.Error as e:
        print("REFUSED", t.errstr(e)); sys.exit(0)
    try:
        h.pwrite(data, off); h.flush(); print("WROTE")
    except nbd.Error as e:
        print("WERR", e.errno, t.errstr(e))
    h.shutdown()
EOF
# read_exports NAME SOCK LIST OUT RO: read every file of LIST through
# the server; OUT gets "sha  /path" lines.  Refusals, errors and a
# wrong read-only flag are failures.
read_exports ()
{
    local name="$1" sock="$2" list="$3" out="$4" ro="$5" rc=0
    timeout $T /usr/bin/python3 "$tmpdir/exports.py" "$sock" read "$list" > "$out.raw" 2>&1 || rc=$?
    [ $rc = 0 ] || bad "$name: client exited $rc: $(tail -3 "$out.raw")"
    grep -E '^(REFUSED|ERR) ' "$out.raw" | head -5 | while read -r l; do
        echo "FAIL: $name: $l" >&2
    done
    grep -q -E '^(REFUSED|ERR) ' "$out.raw" &&
        bad "$name: $(grep -c -E '^(REFUSED|ERR) ' "$out.raw") file(s) refused or failed"
    grep -q -v -E "^(REFUSED|ERR) |ro=$ro\$" "$out.raw" &&
        bad "$name: some files not served with ro=$ro"
    grep -E " ro=[01]\$" "$out.raw" | sed 's/ ro=[01]$//' > "$out"
}
# cmp_lists NAME EXPECTED GOT: the two file lists are equal.
cmp_lists ()
{
    if ! diff -u "$2" "$3" > "$tmpdir/lists.diff"; then
        head -20 "$tmpdir/lists.diff" >&2
        bad "$1: files differ from the oracle ($(grep -c '^[-+][0-9a-f]' "$tmpdir/lists.diff") line(s))"
    fi
}

# replayed_count NAME: N from "ext4fs: journal: replayed N transaction(s)".
replayed_count ()
{
    sed -n 's/.*ext4fs: journal: replayed \([0-9]*\) transaction.*/\1/p' "$tmpdir/$1.err" | head -1
}
