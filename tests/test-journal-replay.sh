#!/usr/bin/env bash
# Journal replay: an image that needs recovery is served as e2fsck
# would leave it after replaying its journal.
#
# Inputs: journals written by debugfs's own journal commands (jo, jw,
# jc: with and without checksums, v1/v2/v3, revokes, a torn tail) and
# by jbd2craft.py (checksums none/v1/v2/v3, 32- and 64-bit tags,
# revokes, escaped blocks, a log that wraps around the end of the
# journal, tids that wrap around 2^32, torn tails, transactions of
# several descriptor blocks), on ext4 with 4 KiB and 1 KiB blocks
# (extents; 64bit or not) and ext3 with 1 KiB blocks (indirect blocks,
# also for the journal inode).  The transactions log what a kernel
# logs: file data (data=journal), the inode table block with a changed
# inode (new size, new file, deleted file), extent tree and indirect
# blocks (a punched hole), block and inode bitmaps, group descriptors,
# directory blocks and the superblock.  They are built by changing a
# copy of the image with debugfs (states S1, S2, S3, S4: see mkflavour
# in journal-functions.sh) and logging every block that changed.
#
# For each case the oracle is e2fsck -fy on a copy (which must report
# that it recovered the journal, then be clean and give exactly the
# intended state: a check of the inputs), then debugfs rdump.  Then:
#  (a) nbdkit -r serves every file of the oracle byte for byte, does not
#      serve files the journal deleted, says "ext4fs: journal: replayed
#      N transaction(s)", and leaves the image unchanged (byte for
#      byte);
#  (b) a read-write server (no -r) serves the same, takes a write of
#      one block, and after a clean stop the image passes e2fsck -fn
#      and (on a copy) the boot-time e2fsck -p, has no needs_recovery,
#      "Journal start: 0", the journal sequence e2fsck's replay leaves
#      (last committed tid + 2; later or equal when a block was
#      written), and holds the oracle's files plus the write.
#
# All cases run even if one fails; the failures are listed at the end.
source "$srcdir/functions.sh"
source "$srcdir/journal-functions.sh"       # (it enters $tmpdir)

# ---------------------------------------------------------------------
# Inputs.

# dfs_txn IMG JO-ARGS FROM TO [JW-ARGS]: one debugfs session that logs
# the blocks that differ between images FROM and TO in a transaction.
dfs_txn ()
{
    local img="$1" jo="$2" from="$3" to="$4" jw="${5:-}" list
    list=$("${CRAFT[@]}" "$from" --diff-to-file "$to" blocks.bin) ||
        fail "test setup: jbd2craft --diff-to-file $from $to"
    dfs_cmds "$img" "jo $jo" "jw $jw -b $list blocks.bin" "jc"
}
# dfs_cmds IMG CMD...: debugfs -w with these commands; any com_err
# message fails the setup.
dfs_cmds ()
{
    local img="$1"; shift
    printf '%s\n' "$@" | debugfs -w -f - "$img" > dfs.out 2>&1
    if grep -E -q 'while |Unknown|invalid|not open|Need a file' dfs.out; then
        cat dfs.out
        fail "test setup: debugfs on $img"
    fi
}

# ---------------------------------------------------------------------
# The checks.

# badf MSG: bad() for the first 3 files of a session; flush_badf NAME
# reports how many more failed.
nbadf=0
badf () { nbadf=$((nbadf + 1)); [ $nbadf -gt 3 ] || bad "$@"; }
flush_badf () { [ $nbadf -le 3 ] || bad "$1: ... and $((nbadf - 3)) more such failures"; nbadf=0; }

# tid_geq A B: tid A (0x...) is B or later, modulo 2^32.
tid_geq () { [ $(( ($1 - $2) & 0xffffffff )) -lt $((0x80000000)) ]; }

# check_case NAME FL STATE NTX [nowrite]: case.NAME replays to STATE
# (NTX committed transactions).  With "nowrite", the read-write session
# only reads, and the journal sequence must be exactly e2fsck's.
check_case ()
{
    local name="$1" fl="$2" state="$3" ntx="$4" mode="${5:-}"
    local img=case.$1 files gone f wfile=/data oseq seq r
    echo "== $name ($fl, $state, $ntx transaction(s))"

    # The input needs recovery, and e2fsck's replay gives STATE.
    dumpe2fs -h $img > dumpe2fs.out 2>&1 || :
    grep -q '^Filesystem features:.*needs_recovery' dumpe2fs.out ||
        { cat dumpe2fs.out; fail "test setup: $name: needs_recovery is not set"; }
    [ "$(jsb_field $img 'Journal start')" != 0 ] ||
        fail "test setup: $name: the journal is empty (Journal start: 0)"
    cp --sparse=always $img oracle.img
    r=0; e2fsck -fy oracle.img > oracle.log 2>&1 || r=$?
    { [ $r -le 1 ] && grep -q 'recovering journal' oracle.log; } ||
        { cat oracle.log; fail "test setup: $name: e2fsck -fy did not recover the journal (status $r)"; }
    fsck_clean oracle.img
    rdump_to odir oracle.img
    diff -r odir e.$state.$fl > /dev/null ||
        fail "test setup: $name: e2fsck's replay does not give state $state"
    oseq=$(jsb_field oracle.img 'Journal sequence')
    files=$(files_of odir)
    gone=$(LC_ALL=C comm -23 <(files_of e.base.$fl) <(echo "$files") | sed 's/^/!/')

    # (a) -r: the replayed files, nothing written.
    snap $img
    if srv_try_start r -r --filter="$FILTER" file $img ext4file=exportname; then
        reader r rdir - $files $gone > r.out
        srv_stop r
        for f in $files; do
            if ! grep -q -x -F "READ $f $(stat -c %s odir$f) ro=1" r.out; then
                badf "$name (-r): $f: $(grep -F " $f " r.out || grep -m1 CLIENT r.out)"
            elif ! cmp -s rdir$f odir$f; then
                badf "$name (-r): $f differs from e2fsck's replay"
            fi
        done
        for f in $gone; do
            grep -q -x -F "GONE-OK ${f#!}" r.out ||
                badf "$name (-r): ${f#!}, deleted by the journal, was served"
        done
        flush_badf "$name (-r)"
        grep -q -F "ext4fs: journal: replayed $ntx transaction(s)" r.err ||
            bad "$name (-r): stderr lacks 'ext4fs: journal: replayed $ntx transaction(s)': $(grep -i -m2 journal r.err)"
    else
        bad "$name (-r): nbdkit did not start: $(tail -2 r.err)"
    fi
    unchanged $img || bad "$name (-r): the image changed"

    # (b) read-write: replayed in place, served, one block written.
    [ "$mode" = nowrite ] && wfile=-
    if srv_try_start w --filter="$FILTER" file $img ext4file=exportname; then
        reader w wdir $wfile $files $gone > w.out
        srv_stop w
        for f in $files; do
            if ! grep -q -x -F "READ $f $(stat -c %s odir$f) ro=0" w.out; then
                badf "$name (rw): $f: $(grep -F " $f " w.out || grep -m1 CLIENT w.out)"
            elif ! cmp -s wdir$f odir$f; then
                badf "$name (rw): $f differs from e2fsck's replay"
            fi
        done
        for f in $gone; do
            grep -q -x -F "GONE-OK ${f#!}" w.out ||
                badf "$name (rw): ${f#!}, deleted by the journal, was served"
        done
        flush_badf "$name (rw)"
        [ "$wfile" = - ] || grep -q -x -F "WROTE $wfile" w.out ||
            bad "$name (rw): the write failed: $(grep -F " $wfile" w.out | tail -1)"
    else
        bad "$name (rw): nbdkit did not start: $(tail -2 w.err)"
    fi
    # After the session: replayed on disk, clean, the journal empty.
    if ! e2fsck -fn $img > fsck.out 2>&1; then
        bad "$name (rw): e2fsck -fn after the session: $(grep -v -E '^(Pass|e2fsck) ' fsck.out | head -3)"
    fi
    cp --sparse=always $img boot.img
    e2fsck -p boot.img > fsck.out 2>&1 ||
        bad "$name (rw): the boot-time e2fsck -p fails after the session: $(tail -2 fsck.out | tr '\n' ' ')"
    dumpe2fs -h $img 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' &&
        bad "$name (rw): needs_recovery still set after the session"
    r=$(jsb_field $img 'Journal start')
    [ "$r" = 0 ] || bad "$name (rw): Journal start is '$r' after the session, not 0"
    seq=$(jsb_field $img 'Journal sequence')
    if [ "$mode" = nowrite ]; then
        [ "$seq" = "$oseq" ] ||
            bad "$name (rw): journal sequence $seq after the session; e2fsck's replay leaves $oseq"
    elif [ -z "$seq" ] || ! tid_geq "$seq" "$oseq"; then
        bad "$name (rw): journal sequence '$seq' after the session is before e2fsck's $oseq"
    fi
    rm -rf exp; cp -r odir exp
    [ "$wfile" = - ] || dd if=wblock of=exp$wfile conv=notrunc status=none
    rdump_to after $img
    diff -r after exp > diff.out 2>&1 ||
        bad "$name (rw): files after the session differ from e2fsck's replay plus the write: $(head -3 diff.out | tr '\n' ' ')"
}

# ---------------------------------------------------------------------
# ext4, 4 KiB blocks, 64bit, metadata_csum: v3 (and v2) with 64-bit tags.
fl=e4k
mkflavour $fl -t ext4 -b 4096
x=${X[$fl]} y=${Y[$fl]} z=${Z[$fl]}

new_case e4k-one $fl; craft e4k-one diff:S1.$fl
check_case e4k-one $fl S1 1 nowrite

new_case e4k-chain $fl; craft e4k-chain diff:S1.$fl diff:S2.$fl diff:S3.$fl
check_case e4k-chain $fl S3 3

# Revokes: X logged then revoked by a later transaction, Y logged and
# revoked in one transaction (neither is replayed), Z revoked and then
# logged by a later transaction (replayed).
new_case e4k-revoke $fl
craft e4k-revoke "diff:S1.$fl,$x=fill.aa" "revoke:$x,$y=fill.bb,revoke:$y" \
    "revoke:$z" "$z=fill.cc"
check_case e4k-revoke $fl S1z 4

# A log that wraps: it starts 5 blocks before the end of the journal.
new_case e4k-wrap $fl; craft e4k-wrap --from-end 5 diff:S1.$fl diff:S2.$fl diff:S3.$fl
check_case e4k-wrap $fl S3 3

# A torn last transaction (no commit block) is ignored.
new_case e4k-torn $fl; craft e4k-torn diff:S1.$fl "diff:S2.$fl,torn"
check_case e4k-torn $fl S1 1

# tids 0xfffffffe, 0xffffffff, 0: the sequence after replay is 2.
new_case e4k-tidwrap $fl
craft e4k-tidwrap --sequence 0xfffffffe diff:S1.$fl diff:S2.$fl diff:S3.$fl
check_case e4k-tidwrap $fl S3 3 nowrite

new_case e4k-v2 $fl; craft e4k-v2 --csum v2 diff:S1.$fl diff:S2.$fl diff:S3.$fl
check_case e4k-v2 $fl S3 3

# debugfs: jo -c (checksum v3 on metadata_csum, 64bit tags), one
# transaction.
new_case e4k-dfs-one $fl
dfs_txn case.e4k-dfs-one -c base.$fl S1.$fl
check_case e4k-dfs-one $fl S1 1 nowrite

# debugfs: five sessions: S1, S2, S3, junk in X, then X revoked.
new_case e4k-dfs-multi $fl
dfs_txn case.e4k-dfs-multi -c base.$fl S1.$fl
dfs_txn case.e4k-dfs-multi "" S1.$fl S2.$fl
dfs_txn case.e4k-dfs-multi "" S2.$fl S3.$fl
dfs_cmds case.e4k-dfs-multi "jo" "jw -b $x fill.aa" "jc"
dfs_cmds case.e4k-dfs-multi "jo" "jw -r $x" "jc"
check_case e4k-dfs-multi $fl S3 5

# debugfs: jw -c writes a transaction without its commit block.
new_case e4k-dfs-torn $fl
dfs_txn case.e4k-dfs-torn -c base.$fl S1.$fl
dfs_txn case.e4k-dfs-torn "" S1.$fl S2.$fl -c
check_case e4k-dfs-torn $fl S1 1

# ---------------------------------------------------------------------
# ext4, 1 KiB blocks, metadata_csum, not 64bit: 32-bit tags.
fl=e1k
mkflavour $fl -t ext4 -b 1024 -O ^64bit
x=${X[$fl]} y=${Y[$fl]} z=${Z[$fl]}

new_case e1k-v2-wrap $fl
craft e1k-v2-wrap --csum v2 --from-end 7 diff:S1.$fl diff:S2.$fl diff:S3.$fl
check_case e1k-v2-wrap $fl S3 3

new_case e1k-v3-revoke $fl
craft e1k-v3-revoke --csum v3 "diff:S1.$fl,$x=fill.aa" "revoke:$x,$y=fill.bb,revoke:$y" \
    "revoke:$z" "$z=fill.cc"
check_case e1k-v3-revoke $fl S1z 4

# One transaction of several descriptor blocks, also wrapping.
new_case e1k-v2-big $fl; craft e1k-v2-big --csum v2 --from-end 50 diff:S4.$fl
check_case e1k-v2-big $fl S4 1

# debugfs: jo -c -v 2 (checksum v2).
new_case e1k-dfs-v2 $fl
dfs_txn case.e1k-dfs-v2 "-c -v 2" base.$fl S1.$fl
dfs_txn case.e1k-dfs-v2 "" S1.$fl S2.$fl
dfs_cmds case.e1k-dfs-v2 "jo" "jw -b $x fill.aa" "jc"
dfs_cmds case.e1k-dfs-v2 "jo" "jw -r $x" "jc"
check_case e1k-dfs-v2 $fl S2 4

# ---------------------------------------------------------------------
# ext3, 1 KiB blocks: indirect blocks everywhere (the journal inode's
# last blocks are mapped through its double indirect block).
fl=e3
mkflavour $fl -t ext3 -b 1024
x=${X[$fl]} y=${Y[$fl]} z=${Z[$fl]}

new_case e3-wrap $fl; craft e3-wrap --from-end 9 diff:S1.$fl diff:S2.$fl diff:S3.$fl
check_case e3-wrap $fl S3 3

new_case e3-revoke-torn $fl
craft e3-revoke-torn "diff:S1.$fl,$x=fill.aa" "revoke:$x,$y=fill.bb,revoke:$y" \
    "revoke:$z" "$z=fill.cc" "diff:S2.$fl,torn"
check_case e3-revoke-torn $fl S1z 4

new_case e3-v1 $fl; craft e3-v1 --csum v1 diff:S1.$fl diff:S2.$fl diff:S3.$fl
check_case e3-v1 $fl S3 3

new_case e3-big $fl; craft e3-big diff:S4.$fl
check_case e3-big $fl S4 1

# debugfs: jo (no checksums), with a revoke.
new_case e3-dfs $fl
dfs_txn case.e3-dfs "" base.$fl S1.$fl
dfs_txn case.e3-dfs "" S1.$fl S2.$fl
dfs_cmds case.e3-dfs "jo" "jw -b $x fill.aa" "jc"
dfs_cmds case.e3-dfs "jo" "jw -r $x" "jc"
check_case e3-dfs $fl S2 4

# debugfs: jo -c without metadata_csum is checksum v1 (crc32 in the
# commit block).
new_case e3-dfs-v1 $fl
dfs_txn case.e3-dfs-v1 -c base.$fl S1.$fl
dfs_txn case.e3-dfs-v1 "" S1.$fl S2.$fl
check_case e3-dfs-v1 $fl S2 2

# ---------------------------------------------------------------------
# ext4, 4 KiB blocks, 64bit without metadata_csum: no checksums,
# 64-bit tags (and 32-bit tags on a 64bit filesystem).
fl=e4n
mkflavour $fl -t ext4 -b 4096 -O ^metadata_csum

new_case e4n-none $fl; craft e4n-none diff:S1.$fl diff:S2.$fl diff:S3.$fl
check_case e4n-none $fl S3 3

new_case e4n-tag32 $fl; craft e4n-tag32 --tag32 --from-end 3 diff:S1.$fl diff:S3.$fl
check_case e4n-tag32 $fl S3 2

report_failures
echo "all journal replay cases passed"
