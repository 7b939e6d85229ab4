#!/usr/bin/env bash
# Hostile and damaged journals (written by jbd2craft.py).
#
#  - A corrupt journal superblock (checksum, block size, length, first
#    block, start block, contradictory or unknown features, block type,
#    checksum type), tags that point outside the filesystem (also
#    through the high 32 bits) or at the journal's own blocks, a revoke
#    block with a huge byte count, a log that loops back onto itself, a
#    logged block that fails its tag checksum, descriptor and revoke
#    blocks that fail their checksums inside committed transactions:
#    nbdkit must refuse to start, with -r and without, with a message
#    that mentions the journal; no crash (no signal, no sanitizer
#    report), no hang, and not a byte of the image changed.
#    (e2fsck does not reject all of these: it writes tags past the end
#    of the filesystem, growing the image file, writes over the
#    journal's own blocks, accepts s_first = 0, and loops forever,
#    ignoring SIGTERM, on the looping log.)
#  - A commit block with a bad checksum: e2fsck replays the
#    transactions before it ("Journal transaction N was corrupt, replay
#    was aborted").  nbdkit -r serves exactly that, with a warning about
#    the journal; a read-write server refuses a writable client with a
#    message naming e2fsck; the image is unchanged.
#
# All cases run even if one fails; the failures are listed at the end.
source "$srcdir/functions.sh"
source "$srcdir/journal-functions.sh"       # (it enters $tmpdir)

mkflavour e4k -t ext4 -b 4096               # checksum v3, 64-bit tags
mkflavour e1k -t ext4 -b 1024 -O ^64bit     # (v2 crafted), 32-bit tags
mkflavour e3 -t ext3 -b 1024                # no checksums, indirect blocks

# refuse_start NAME IMG [-r]: nbdkit fails at start-up (exits non-zero,
# not by a signal, within 15 s, without ever listening on its socket)
# with "journal" in its message, no crash report, and IMG is unchanged.
refuse_start ()
{
    local name="$1" img="$2" ro="${3:-}" rc=0 i pid what
    what="$name (${ro:-rw})"
    snap "$img"
    rm -f rs.sock rs.sock.pid
    nbdkit_srv -U rs.sock -P rs.sock.pid -f $ro --filter="$FILTER" file "$img" \
        ext4file=/data 2> rs.err &
    pid=$!
    for ((i=0; i<150; i++)); do
        kill -0 $pid 2>/dev/null || break
        [ -s rs.sock.pid ] && [ -S rs.sock ] && break      # serving
        sleep 0.1
    done
    if kill -0 $pid 2>/dev/null; then
        if [ -S rs.sock ]; then
            bad "$what: nbdkit started serving"
        else
            bad "$what: nbdkit neither served nor exited within 15 s (a hang?)"
        fi
        [ -s rs.sock.pid ] && kill "$(cat rs.sock.pid)" 2>/dev/null || :
        for ((i=0; i<50; i++)); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
        if kill -0 $pid 2>/dev/null; then
            [ -s rs.sock.pid ] && kill -9 "$(cat rs.sock.pid)" 2>/dev/null || :
        fi
        wait $pid 2>/dev/null || :
    else
        wait $pid || rc=$?
        if [ "$rc" = 0 ]; then
            bad "$what: nbdkit exited with status 0"
        elif [ "$rc" -gt 128 ]; then
            bad "$what: nbdkit was killed by signal $((rc - 128))"
        fi
        grep -q -i journal rs.err ||
            bad "$what: the error does not mention the journal: $(head -c 300 rs.err)"
    fi
    check_err "$what" rs.err
    unchanged "$img" || bad "$what: the image changed"
}

# hostile NAME FL CRAFT-ARGS...: the image, crafted from base.FL, must
# be refused with -r and without.
hostile ()
{
    local name="$1" fl="$2"; shift 2
    echo "== hostile: $name"
    new_case "$name" "$fl"
    craft "$name" "$@"
    dumpe2fs -h case.$name 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' ||
        fail "test setup: $name: needs_recovery is not set"
    refuse_start "$name" case.$name -r
    refuse_start "$name" case.$name
}

# ---------------------------------------------------------------------
# The journal superblock.  Each is the good one-transaction journal of
# test-journal-replay.sh's e4k-one with one field damaged.
fl=e4k
hostile jsb-checksum $fl --hostile csum diff:S1.$fl
hostile jsb-blocksize $fl --hostile blocksize diff:S1.$fl
hostile jsb-maxlen-past-inode $fl --hostile maxlen diff:S1.$fl
hostile jsb-first-0 $fl --hostile first0 diff:S1.$fl
hostile jsb-first-past-maxlen $fl --hostile firstpast diff:S1.$fl
hostile jsb-start-past-maxlen $fl --hostile startpast diff:S1.$fl
hostile jsb-csum-v2-and-v3 $fl --hostile v2v3 diff:S1.$fl
hostile jsb-csum-v1-and-v3 $fl --hostile v1v3 diff:S1.$fl
hostile jsb-unknown-incompat $fl --hostile incompat diff:S1.$fl
hostile jsb-blocktype $fl --hostile blocktype diff:S1.$fl
hostile jsb-checksum-type $fl --hostile csumtype diff:S1.$fl
hostile jsb-start-past-maxlen-e3 e3 --hostile startpast diff:S1.e3
hostile jsb-first-0-e3 e3 --hostile first0 diff:S1.e3

# ---------------------------------------------------------------------
# The log.
blocks=$(dumpe2fs -h base.e4k 2>/dev/null | sed -n 's/^Block count: *//p')
hostile tag-past-the-end $fl "diff:S1.$fl,$((blocks + 10))=fill.aa"
hostile tag-high-32-bits $fl "diff:S1.$fl,$((1 << 32 | 5))=fill.aa"
hostile tag-journal-superblock $fl "diff:S1.$fl,j:0=fill.aa"
hostile tag-journal-log-block $fl "diff:S1.$fl,j:1=fill.aa"
hostile tag-journal-last-block $fl "diff:S1.$fl,j:1023=fill.aa"
hostile revoke-huge-count $fl diff:S1.$fl "revoke:${X[$fl]},hugerevoke"
hostile log-loops $fl loop
hostile bad-tag-checksum-v3 $fl "diff:S1.$fl,badtag" diff:S2.$fl
hostile bad-descriptor-checksum $fl "diff:S1.$fl,baddesc"
hostile bad-revoke-checksum $fl diff:S1.$fl "revoke:${X[$fl]},badrevoke"
hostile bad-tag-checksum-v2 e1k --csum v2 diff:S1.e1k "diff:S2.e1k,badtag"
blocks=$(dumpe2fs -h base.e1k 2>/dev/null | sed -n 's/^Block count: *//p')
hostile tag-past-the-end-e1k e1k "diff:S1.e1k,$blocks=fill.aa"
hostile tag-0xffffffff-e3 e3 "diff:S1.e3,0xffffffff=fill.aa"
hostile tag-journal-block-e3 e3 "diff:S1.e3,j:1000=fill.aa"
hostile revoke-huge-count-e3 e3 diff:S1.e3 "revoke:${X[e3]},hugerevoke"
hostile log-loops-e3 e3 loop
hostile log-loops-v2 e1k --csum v2 loop

# ---------------------------------------------------------------------
# A commit block with a bad checksum.  bad_commit NAME FL STATE NTX
# CRAFT-ARGS...: e2fsck replays the NTX transactions before it, giving
# STATE.
bad_commit ()
{
    local name="$1" fl="$2" state="$3" ntx="$4" img=case.$1 files gone f r; shift 4
    echo "== bad commit: $name"
    new_case "$name" "$fl"
    craft "$name" "$@"
    cp --sparse=always $img oracle.img
    e2fsck -fy oracle.img > oracle.log 2>&1 || :
    grep -q "Journal transaction $((ntx + 1)) was corrupt, replay was aborted" oracle.log ||
        { cat oracle.log; fail "test setup: $name: e2fsck did not find transaction $((ntx + 1)) corrupt"; }
    fsck_clean oracle.img
    rdump_to odir oracle.img
    diff -r odir e.$state.$fl > /dev/null ||
        fail "test setup: $name: e2fsck's replay does not give state $state"
    files=$(files_of odir)
    gone=$(LC_ALL=C comm -23 <(files_of e.base.$fl) <(echo "$files") | sed 's/^/!/')

    # -r: the replayed prefix, a message about the journal.
    snap $img
    if srv_try_start r -r --filter="$FILTER" file $img ext4file=exportname; then
        reader r rdir - $files $gone > r.out
        srv_stop r
        for f in $files; do
            if ! grep -q -x -F "READ $f $(stat -c %s odir$f) ro=1" r.out; then
                bad "$name (-r): $f: $(grep -F " $f " r.out || grep -m1 CLIENT r.out)"
            elif ! cmp -s rdir$f odir$f; then
                bad "$name (-r): $f differs from e2fsck's replay"
            fi
        done
        for f in $gone; do
            grep -q -x -F "GONE-OK ${f#!}" r.out ||
                bad "$name (-r): ${f#!}, deleted by the journal, was served"
        done
        grep -i journal r.err | grep -q -i warning ||
            bad "$name (-r): no warning about the journal: $(head -c 300 r.err)"
    else
        bad "$name (-r): nbdkit did not start: $(tail -2 r.err)"
    fi
    unchanged $img || bad "$name (-r): the image changed"

    # Read-write: a writable client is refused, naming e2fsck.
    if srv_try_start w --filter="$FILTER" file $img ext4file=exportname; then
        r=$(reader w wdir /data /data)
        case "$r" in
            REFUSED*) ;;
            *) bad "$name (rw): a writable client was not refused: $r" ;;
        esac
        srv_stop w
        grep -q e2fsck w.err ||
            bad "$name (rw): the refusal does not name e2fsck: $(grep -i -m2 journal w.err)"
    else
        bad "$name (rw): nbdkit did not start: $(tail -2 w.err)"
    fi
    unchanged $img || bad "$name (rw): the image changed"
}
bad_commit bad-commit-v3 e4k S1 1 diff:S1.e4k "diff:S2.e4k,badcommit" diff:S3.e4k
bad_commit bad-commit-first e4k base 0 "diff:S1.e4k,badcommit" diff:S2.e4k
bad_commit bad-commit-v2 e1k S2 2 --csum v2 diff:S1.e1k diff:S2.e1k "diff:S3.e1k,badcommit"
bad_commit bad-commit-v1 e3 S1 1 --csum v1 diff:S1.e3 "diff:S2.e3,badcommit"

report_failures
echo "all hostile journals handled"
