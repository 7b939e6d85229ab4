#!/usr/bin/env bash
# What ext4fs refuses to write, what it serves read-only, and what it
# does with hostile images.  (test-bad-input.sh covers bad parameters,
# bad paths, non-filesystems and the basic refusals; this test adds
# the remedies named in the messages, every refused feature, per-file
# flags, read-only sessions that must leave the image untouched, and
# corrupt metadata found after start-up.)
#
#  - an external journal needing recovery, errors: a writable client is
#    refused with the remedy; -r serves the right bytes; the image is
#    unchanged.  An empty log needing recovery is served.
#  - each refused feature that mke2fs (or debugfs) can make here.
#  - immutable, append-only, fs-verity and inline-data files are served
#    read-only with a message; encrypted files are refused.
#  - read-only sessions (-r, and a read-write server only read from)
#    with reads, block status, listing and flushes change nothing.
#  - truncated images, corrupt extent trees, indirect blocks,
#    directories and symlinks: a clean error (open refused or EIO),
#    never a crash or a hang, the server still serves a good file
#    afterwards, and a read-only server leaves the image unchanged.
#
# All cases run even if one fails; the failures are listed at the end.
source "$srcdir/functions.sh"
requires debugfs -R "help" /dev/null
requires /usr/bin/python3 -c "import nbd"
cd "$tmpdir"

failures=()
bad () { echo "FAIL: $*" >&2; failures+=("$*"); }
T=20                            # seconds allowed for any one client

# ---------------------------------------------------------------------
# Helpers.

# check_err NAME ERRFILE: no crash, sanitizer report or untranslated
# com_err code in the server's stderr (functions.sh's srv_stop calls it).
check_err ()
{
    if grep -q -E 'Sanitizer|runtime error:|Segmentation fault|Aborted|assertion' "$2"; then
        bad "$1: crash, sanitizer report or assertion in stderr: $(grep -m1 -E 'Sanitizer|runtime error:|Segmentation|Aborted|assertion' "$2")"
    fi
    if grep -q 'Unknown code' "$2"; then
        bad "$1: unclear message (untranslated error code): $(grep -m1 'Unknown code' "$2")"
    fi
}

# A libnbd client: probe SOCK EXPORT ACTION prints one line:
#   REFUSED msg        the open failed
#   OK sha ro=0|1      read everything (and block status) without error
#   EIO msg            a read or block status failed with EIO
#   ERR errno msg      some other error
#   WROTE / WERR errno msg     (ACTION write: one 4 KiB write + flush)
#   RO=0|1             (ACTION info)
# ACTION session also flushes and reads block status in pieces.
cat > probe.py <<'EOF'
import hashlib, sys, nbd
import e4test as t
sock, name, action = sys.argv[1:4]
if action == "list":
    # NBD_OPT_LIST: what a client is told before it opens anything.
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(sock)
    got = []
    h.opt_list(lambda n, d: got.append((n, d)) and 0)
    for n, d in got:
        print("EXPORT %s | %s" % (n, d))
    h.opt_abort()
    sys.exit(0)
try:
    h = t.connect(sock, name, contexts=[nbd.CONTEXT_BASE_ALLOCATION])
except nbd.Error as e:
    print("REFUSED", t.errstr(e)); sys.exit(0)
size = h.get_size()
ro = int(h.is_read_only())
if action == "info":
    print("RO=%d" % ro); sys.exit(0)
if action == "write":
    try:
        h.pwrite(b"X" * 4096, 0); h.flush(); print("WROTE")
    except nbd.Error as e:
        print("WERR", e.errno, t.errstr(e))
    sys.exit(0)
try:
    if size and h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        step = min(size, 1 << 30) if action != "session" else 1 << 20
        for off in range(0, size, step):
            h.block_status(min(step, size - off), off, lambda *a: 0)
    sha = t.read_all(h, into=hashlib.sha256())
    if action == "session":
        h.flush()
        h.pread(min(size, 4096), 0)
        if size > 12345: h.pread(1, 12344)
        h.flush()
    print("OK", sha.hexdigest(), "ro=%d" % ro)
except nbd.Error as e:
    if e.errno == "EIO":
        print("EIO", t.errstr(e))
    else:
        print("ERR", e.errno, t.errstr(e))
h.shutdown()
EOF
probe ()
{
    local rc=0
    timeout $T /usr/bin/python3 probe.py "$@" 2>&1 || rc=$?
    [ "$rc" = 124 ] && echo "HANG"
    [ "$rc" = 0 ] || [ "$rc" = 124 ] || echo "PYFAIL $rc"
}
sha_of () { sha256sum < "$1" | cut -d' ' -f1; }

# expect_ok NAME SRV EXPORT FILE [RO]: the export reads as FILE.
expect_ok ()
{
    local name="$1" srv="$2" exp="$3" file="$4" ro="${5:-}" r
    r=$(probe "$tmpdir/$srv.sock" "$exp" read)
    case "$r" in
        "OK $(sha_of "$file") ro="[01])
            if [ -n "$ro" ] && [ "${r##*ro=}" != "$ro" ]; then
                bad "$name: $exp: read-only is ${r##*ro=}, expected $ro"
            fi ;;
        *) bad "$name: $exp: expected its contents, got: $r" ;;
    esac
}

# expect_fail NAME SRV EXPORT: a clean error: refused at open, or EIO.
expect_fail ()
{
    local name="$1" srv="$2" exp="$3" r
    r=$(probe "$tmpdir/$srv.sock" "$exp" read)
    case "$r" in
        REFUSED*|EIO*) ;;
        *) bad "$name: $exp: expected open refused or EIO, got: $r" ;;
    esac
    srv_alive "$srv" || bad "$name: nbdkit died (crashed) serving $exp"
}

# grep_err NAME SRV PHRASE...: the server's stderr has every PHRASE.
grep_err ()
{
    local name="$1" srv="$2" p; shift 2
    for p in "$@"; do
        grep -q -F -- "$p" "$tmpdir/$srv.err" ||
            bad "$name: server stderr lacks '$p': $(cat "$tmpdir/$srv.err")"
    done
}

# ---------------------------------------------------------------------
# Source files.  /sparse has 13 extents, so a depth-1 extent tree.
mkdir -p src/d
echo hello > src/f
head -c $((3*1024*1024)) /dev/urandom > src/big
head -c 200000 /dev/urandom > src/good
for i in $(seq 1 20); do echo "file $i" > src/d/file$i; done
ln -s f src/ls
ln -s "$(printf 'x%.0s' $(seq 100))/f" src/lslow
/usr/bin/python3 -c "
import os
with open('src/sparse', 'wb') as f:
    for i in range(13):
        f.seek(i * 131072); f.write(os.urandom(8192))"
sparse_sha=$(sha_of src/sparse)

# mkimg NAME MKE2FS-ARGS...: a 16 MiB image of src/ (prints nothing).
mkimg ()
{
    local img="$1"; shift
    rm -f "$img"; truncate -s 16M "$img"
    mke2fs -q -F "$@" -d src "$img" > mkimg.out 2>&1
}

# ---------------------------------------------------------------------
# Filesystem gates.  gate NAME IMG PHRASE...: a read-write server
# refuses a writable client with every PHRASE on stderr, keeps
# running, and leaves the image unchanged; a -r server serves /big and
# /sparse right and leaves the image unchanged.
gate ()
{
    local name="$1" img="$2" sha; shift 2
    echo "== gate: $name"
    sha=$(sha_of "$img")
    srv_start gw --filter="$FILTER" file "$img" ext4file=exportname
    r=$(probe "$tmpdir/gw.sock" /big read)
    case "$r" in REFUSED*) ;; *) bad "$name: writable client not refused: $r" ;; esac
    srv_alive gw || bad "$name: server died after refusing"
    # A second attempt is refused the same way.
    r=$(probe "$tmpdir/gw.sock" /f write)
    case "$r" in REFUSED*) ;; *) bad "$name: second writable client not refused: $r" ;; esac
    # A writable client that lists the exports is shown them, each
    # with the reason (the protocol carries no text with a refusal).
    r=$(probe "$tmpdir/gw.sock" "" list)
    case "$r" in *"EXPORT /big | "*"clients that write will be refused"*) ;;
        *) bad "$name: the export list lacks /big with the refusal's reason: $r" ;; esac
    for p in "$@"; do
        case "$r" in *"$p"*) ;; *) bad "$name: the export list lacks '$p': $r" ;; esac
    done
    srv_stop gw
    grep_err "$name" gw "$@" "serve it read-only with nbdkit -r"
    # ... and says so at start-up, before any client, with the reason.
    w=$(grep -F "clients that write will be refused" "$tmpdir/gw.err")
    [ -n "$w" ] || bad "$name: no start-up warning that writers will be refused"
    for p in "$@"; do
        case "$w" in *"$p"*) ;; *) bad "$name: the start-up warning lacks '$p': $w" ;; esac
    done
    [ "$(sha_of "$img")" = "$sha" ] || bad "$name: refused server changed the image"

    srv_start gr -r --filter="$FILTER" file "$img" ext4file=exportname
    expect_ok "$name (-r)" gr /big src/big 1
    expect_ok "$name (-r)" gr /sparse src/sparse 1
    srv_stop gr
    [ "$(sha_of "$img")" = "$sha" ] || bad "$name: -r changed the image"
}

# A journal that needs recovery but whose log is empty (debugfs sets
# the flag; tune2fs cannot): nothing to replay.  -r serves it as it is
# and changes nothing; a writable client is served, and the flag is
# cleared, as the kernel and e2fsck do.  (Logs with transactions:
# test-journal-*.sh.)
echo "== needs_recovery, empty log"
mkimg rec -t ext4
debugfs -w -R "feature needs_recovery" rec >/dev/null 2>&1
dumpe2fs -h rec 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' ||
    fail "test setup: could not set needs_recovery"
sha=$(sha_of rec)
srv_start gr -r --filter="$FILTER" file rec ext4file=exportname
expect_ok "needs_recovery, empty log (-r)" gr /big src/big 1
srv_stop gr
[ "$(sha_of rec)" = "$sha" ] || bad "needs_recovery, empty log: -r changed the image"
srv_start gw --filter="$FILTER" file rec ext4file=exportname
expect_ok "needs_recovery, empty log" gw /big src/big 0
srv_stop gw
grep -q "clients that write will be refused" "$tmpdir/gw.err" &&
    bad "needs_recovery, empty log: warned that writers would be refused"
dumpe2fs -h rec 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' &&
    bad "needs_recovery, empty log: the flag was not cleared"
e2fsck -fn rec > fsck.out 2>&1 || bad "needs_recovery, empty log: e2fsck: $(cat fsck.out)"

# A journal on an external device that needs recovery: ext4fs cannot
# read it.  Writing is refused; -r serves the filesystem with a note.
mkimg extj -t ext4 -O ^has_journal
debugfs -w -R "feature has_journal needs_recovery" extj >/dev/null 2>&1
debugfs -w -R "ssv journal_dev 2049" extj >/dev/null 2>&1
debugfs -w -R "ssv journal_uuid random" extj >/dev/null 2>&1
dumpe2fs -h extj 2>/dev/null | grep -q '^Journal device:' ||
    fail "test setup: could not make an external-journal filesystem"
gate "external journal needs recovery" extj "journal needs recovery" \
    "external device" "e2fsck -y -E journal_only"
grep_err "external journal needs recovery (-r)" gr "external journal" \
    "the most recent changes may be missing"

# Marked with errors ("clean with errors"; test-bad-input.sh uses 2).
mkimg errs -t ext4
debugfs -w -R "ssv state 3" errs >/dev/null 2>&1
dumpe2fs -h errs 2>/dev/null | grep -q '^Filesystem state:.*with errors' ||
    fail "test setup: could not mark the filesystem with errors"
gate "errors" errs "marked as having errors" "e2fsck -f"

# Features refused for writing.  mke2fs 1.47 makes these; a feature
# it refuses on this machine is skipped.
for f in "quota" "bigalloc -C 16384" "casefold" "encrypt" "verity"; do
    set -- $f
    if ! mkimg feat -t ext4 -O "$@"; then
        echo "skipped feature $1: mke2fs refuses it: $(cat mkimg.out)"
        continue
    fi
    dumpe2fs -h feat 2>/dev/null | grep -q "^Filesystem features:.* $1\b" ||
        { echo "skipped feature $1: not set by mke2fs"; continue; }
    gate "feature $1" feat "'$1' feature"
done
# mke2fs refuses to make these; debugfs sets them.
for f in shared_blocks read-only; do
    mkimg feat -t ext4
    debugfs -w -R "feature $f" feat >/dev/null 2>&1
    if ! dumpe2fs -h feat 2>/dev/null | grep -q "^Filesystem features:.* $f\b"; then
        echo "skipped feature $f: debugfs cannot set it"
        continue
    fi
    gate "feature $f" feat "'$f' feature"
done
# Orphan inodes (the orphan file's orphan_present, or the superblock's
# orphan list after a kernel crash): ext4fs does not finish them.
mkimg feat -t ext4
debugfs -w -R "feature orphan_present" feat >/dev/null 2>&1
dumpe2fs -h feat 2>/dev/null | grep -q "^Filesystem features:.* orphan_present\b" ||
    fail "test setup: debugfs cannot set orphan_present"
gate "orphan_present" feat "orphan inodes" "e2fsck -fy"
grep_err "orphan_present (-r)" gr "orphan inodes" "served as they are"
mkimg feat -t ext4
debugfs -w -R "ssv last_orphan 12" feat >/dev/null 2>&1
dumpe2fs -h feat 2>/dev/null | grep -q "^First orphan inode: *12" ||
    fail "test setup: debugfs cannot set last_orphan"
gate "orphan list" feat "orphan inodes" "e2fsck -fy"

# ---------------------------------------------------------------------
# Per-file flags, on a read-write server (extents flag 0x80000 kept).
echo "== per-file flags"
mkimg flags -t ext4
for x in imm app enc ver; do debugfs -w -R "write src/good $x" flags >/dev/null 2>&1; done
debugfs -w -R "sif /imm flags 0x80010" flags >/dev/null 2>&1   # immutable
debugfs -w -R "sif /app flags 0x80020" flags >/dev/null 2>&1   # append-only
debugfs -w -R "sif /enc flags 0x80800" flags >/dev/null 2>&1   # encrypted
debugfs -w -R "sif /ver flags 0x180000" flags >/dev/null 2>&1  # fs-verity
for x in imm:0x80010 app:0x80020 enc:0x80800 ver:0x180000; do
    debugfs -R "stat /${x%%:*}" flags 2>/dev/null | grep -q "Flags: ${x#*:}\$" ||
        fail "test setup: could not set flags on /${x%%:*}"
done
sha=$(sha_of flags)
srv_start fl --filter="$FILTER" file flags ext4file=exportname
for x in imm app ver; do
    expect_ok "flag $x" fl /$x src/good 1
    r=$(probe "$tmpdir/fl.sock" /$x write)
    case "$r" in
        "WERR EPERM"*|"WERR EROFS"*) ;;
        *) bad "flag $x: a write was not refused: $r" ;;
    esac
done
nbdinfo --json "nbd+unix:///imm?socket=$tmpdir/fl.sock" > info.json 2>&1 ||
    bad "nbdinfo --json /imm failed: $(cat info.json)"
grep -q '"is_read_only": true' info.json || bad "nbdinfo: /imm is not read-only"
grep_err "flags" fl "/imm: the file is immutable: serving it read-only" \
    "/app: the file is append-only: serving it read-only" \
    "/ver: the file has fs-verity: serving it read-only"
r=$(probe "$tmpdir/fl.sock" /enc read)
case "$r" in REFUSED*) ;; *) bad "flag enc: encrypted file was served: $r" ;; esac
grep_err "flags" fl "/enc: the file is encrypted"
# The flags are per file: a plain file on the same server is writable.
r=$(probe "$tmpdir/fl.sock" /good info)
[ "$r" = "RO=0" ] || bad "flags: /good should be writable, got: $r"
expect_ok "flags" fl /good src/good 0
srv_stop fl
[ "$(sha_of flags)" = "$sha" ] || bad "flags: a server that wrote nothing changed the image"

# Inline data (mke2fs -O inline_data stores small files in the inode).
echo "== inline data"
mkdir -p srci
echo "tiny inline file" > srci/small
rm -f inl; truncate -s 16M inl
if mke2fs -q -F -t ext4 -O inline_data -d srci inl > mkimg.out 2>&1 &&
   debugfs -R "stat /small" inl 2>/dev/null | grep -q 'Size of inline data'; then
    sha=$(sha_of inl)
    srv_start il --filter="$FILTER" file inl ext4file=exportname
    expect_ok "inline" il /small srci/small 1
    r=$(probe "$tmpdir/il.sock" /small write)
    case "$r" in "WERR EPERM"*|"WERR EROFS"*) ;; *) bad "inline: a write was not refused: $r" ;; esac
    srv_stop il
    grep_err "inline" il "/small: the file's data is inline"
    [ "$(sha_of inl)" = "$sha" ] || bad "inline: image changed"
else
    echo "skipped inline data: mke2fs cannot make it here"
fi

# ---------------------------------------------------------------------
# Read-only sessions change nothing.  ro_session NAME SRV: reads,
# block status in pieces, flushes, several exports, listing, --map.
ro_session ()
{
    local name="$1" srv="$2" uri="nbd+unix:///big?socket=$tmpdir/$2.sock" r e
    for e in /big /sparse /d/file7 /f /ls; do
        r=$(probe "$tmpdir/$srv.sock" $e session)
        case "$r" in OK*) ;; *) bad "$name: session on $e: $r" ;; esac
    done
    expect_ok "$name" "$srv" /sparse src/sparse
    nbdinfo --list --json "$uri" > list.json 2>&1 || bad "$name: nbdinfo --list failed: $(cat list.json)"
    for e in /big /sparse /d/file20 /good; do
        grep -q "\"export-name\": \"$e\"" list.json || bad "$name: --list lacks $e"
    done
    timeout $T nbdinfo --map "$uri" > map.txt 2>&1 || bad "$name: nbdinfo --map failed"
    timeout $T nbdinfo --map "nbd+unix:///sparse?socket=$tmpdir/$srv.sock" > map.txt 2>&1 ||
        bad "$name: nbdinfo --map /sparse failed"
    grep -q hole map.txt || bad "$name: /sparse shows no hole: $(cat map.txt)"
    timeout $T nbdcopy "$uri" copy.out || bad "$name: nbdcopy failed"
    cmp -s copy.out src/big || bad "$name: nbdcopy gave wrong bytes"
}
echo "== read-only sessions"
mkimg ses -t ext4
sha=$(sha_of ses)
srv_start s1 -r --filter="$FILTER" file ses ext4file=exportname
ro_session "-r session" s1
srv_stop s1
[ "$(sha_of ses)" = "$sha" ] || bad "-r session changed the image"
# A read-write server that is only read from: no mount count, no
# times, nothing written, even at disconnect and shutdown.
srv_start s2 --filter="$FILTER" file ses ext4file=exportname
ro_session "read-write server, reads only" s2
srv_stop s2
[ "$(sha_of ses)" = "$sha" ] ||
    bad "a read-write server that was only read from changed the image"

# ---------------------------------------------------------------------
# Hostile images.  A base without metadata_csum, so that blocks can be
# corrupted with dd without first failing a checksum.
mkimg base -t ext4 -b 4096 -O ^metadata_csum
fsck_clean base
BS=4096
poke () {   # poke IMG OFFSET FORMAT VALUE...: struct.pack at OFFSET
    /usr/bin/python3 -c "
import struct, sys
f = open(sys.argv[1], 'r+b'); f.seek(int(sys.argv[2]))
f.write(struct.pack(sys.argv[3], *[int(v, 0) for v in sys.argv[4:]])); f.close()" "$@"
}

# refuse_start NAME IMG PHRASE: nbdkit -r refuses to start (status 1,
# within 15 s) with PHRASE, and does not touch IMG.  (Not with --run:
# a start-up refusal there leaves the client waiting on the socket.)
refuse_start ()
{
    local name="$1" img="$2" phrase="$3" sha rc=0 i pid
    echo "== $name"
    sha=$(sha_of "$img")
    rm -f rs.sock rs.pid
    nbdkit_srv -U rs.sock -P rs.pid -f -r --filter="$FILTER" file "$img" \
        ext4file=/good 2> rs.err &
    pid=$!
    for ((i=0; i<150; i++)); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    if kill -0 $pid 2>/dev/null; then
        [ -s rs.pid ] && kill "$(cat rs.pid)" 2>/dev/null
        wait $pid || true
        bad "$name: nbdkit started serving a truncated image"
    else
        wait $pid || rc=$?
        [ "$rc" = 1 ] || bad "$name: expected exit status 1, got $rc"
    fi
    check_err "$name" rs.err
    grep -q -F -- "$phrase" rs.err || bad "$name: stderr lacks '$phrase': $(cat rs.err)"
    [ "$(sha_of "$img")" = "$sha" ] || bad "$name: image changed"
}
# Truncations (test-bad-input.sh has 64 KiB and inside a file's data).
cp base tr; truncate -s $((BS + 512)) tr
refuse_start "truncated inside the group descriptors" tr "truncated image or corrupt filesystem"
itab=$(dumpe2fs base 2>/dev/null | awk '/Inode table at/ { split($4, a, "-"); print a[1]; exit }')
[ -n "$itab" ] || fail "test setup: no inode table in dumpe2fs"
cut=$(( (itab + 7) * BS + 17 ))
cp base tr; truncate -s $cut tr
refuse_start "truncated inside the inode table" tr \
    "the filesystem needs $((16*1024*1024)) bytes but the device is only $cut bytes"
cp base tr; truncate -s $((16*1024*1024 - 1)) tr
refuse_start "one byte short" tr \
    "the filesystem needs $((16*1024*1024)) bytes but the device is only $((16*1024*1024 - 1)) bytes"
rm -f tr

# hostile NAME IMG BADEXPORT...: a -r exportname server: each bad
# export gives a clean error, /good is still served right, the server
# is alive and exits cleanly, and the image is unchanged.
hostile ()
{
    local name="$1" img="$2" sha e; shift 2
    echo "== hostile: $name"
    sha=$(sha_of "$img")
    srv_start h -r --filter="$FILTER" file "$img" ext4file=exportname
    for e in "$@"; do expect_fail "$name" h "$e"; done
    # Twice: a cached failure must fail the same way.
    for e in "$@"; do expect_fail "$name (again)" h "$e"; done
    expect_ok "$name: good file afterwards" h /good src/good 1
    srv_alive h || bad "$name: nbdkit died"
    srv_stop h
    [ "$(sha_of "$img")" = "$sha" ] || bad "$name: -r changed the image"
}

# The inode's own extent tree root (i_block), via debugfs sif.
# i_block[0] = magic | entries << 16, [1] = max | depth << 16,
# index entry: [3] logical, [4] leaf block.
for c in "depth 0xffff:block[1] 0xffff0004" \
         "entries > max:block[0] 0x0009F30A" \
         "bad magic in index root:block[0] 0x0001ABCD" \
         "index past the end:block[4] 99999999" \
         "index to block 0:block[4] 0"; do
    cp base hx
    debugfs -w -R "sif /sparse ${c#*:}" hx >/dev/null 2>&1
    hostile "extent root: ${c%%:*}" hx /sparse
    grep_err "extent root: ${c%%:*}" h "inode "
done

# The leaf block of /sparse, via dd.
leaf=$(debugfs -R "stat /sparse" base 2>/dev/null | sed -n 's/.*(ETB0):\([0-9]*\).*/\1/p')
[ -n "$leaf" ] || fail "test setup: /sparse has no extent tree block"
cp base hx; poke hx $((leaf * BS)) '<H' 0x1234
hostile "extent leaf: bad magic" hx /sparse
cp base hx; poke hx $((leaf * BS + 2)) '<H' 400
hostile "extent leaf: entries > max" hx /sparse
cp base hx; poke hx $((leaf * BS + 12)) '<IHHI' 0 40000 0 $((16*1024*1024/BS - 10))
hostile "extent leaf: extent runs past the end" hx /sparse
# A loop: the leaf becomes an index block pointing at itself, and the
# root claims a deep tree.
cp base hx
poke hx $((leaf * BS)) '<HHHHIIIHH' 0xF30A 1 340 1 0 0 "$leaf" 0 0
debugfs -w -R "sif /sparse block[1] 0xffff0004" hx >/dev/null 2>&1
hostile "extent tree loop" hx /sparse

# Garbage i_block in the inodes of 16 copies of /good: 60 pseudo-random
# bytes, or (odd ones) a valid header with random extents inside the
# filesystem (unsorted, overlapping, onto metadata); whatever they map
# to, no crash and no hang.
echo "== garbage i_block"
cp base hx
for i in $(seq 1 16); do debugfs -w -R "write src/good z$i" hx >/dev/null 2>&1; done
for i in $(seq 1 16); do
    loc=$(debugfs -R "imap /z$i" hx 2>/dev/null |
              awk '/located at block/ { gsub(",", "", $4); print $4, $6 }')
    set -- $loc
    [ $# = 2 ] || fail "test setup: imap /z$i"
    /usr/bin/python3 -c "
import random, struct, sys
r = random.Random($i)
b = bytearray(r.getrandbits(8) for _ in range(60))
if $i % 2:
    b[0:12] = struct.pack('<HHHHI', 0xF30A, r.randint(1, 4), 4, 0, 0)
    l = 0
    for k in range(4):
        if $i % 4 == 1:         # sorted, disjoint, short: often valid
            n = r.randint(1, 12); l += r.randint(0, 10)
        else:
            n = r.choice([r.randint(1, 12), r.randint(1, 40000)]); l = r.randint(0, 60)
        b[12+12*k:24+12*k] = struct.pack('<IHHI', l, n, 0, r.randint(0, 4080))
        l += n
f = open('hx', 'r+b'); f.seek($1 * $BS + $2 + 0x28); f.write(b); f.close()"
done
sha=$(sha_of hx)
srv_start h -r --filter="$FILTER" file hx ext4file=exportname
for i in $(seq 1 16); do
    r=$(probe "$tmpdir/h.sock" /z$i read)
    case "$r" in
        OK*|REFUSED*|EIO*) ;;
        *) bad "garbage i_block /z$i: $r" ;;
    esac
    echo "  /z$i: ${r:0:100}"
    srv_alive h || { bad "garbage i_block /z$i: nbdkit died"; break; }
done
srv_alive h && expect_ok "garbage i_block: good file afterwards" h /good src/good 1
srv_stop h
[ "$(sha_of hx)" = "$sha" ] || bad "garbage i_block: -r changed the image"

# An extent that maps the file onto the filesystem's own metadata
# (block 0: boot block, superblock, group descriptors).  e2fsck calls
# it an invalid extent; the kernel refuses it (block_validity).
cp base hx
debugfs -w -R "sif /big block[5] 0" hx >/dev/null 2>&1
hostile "extent onto the superblock" hx /big
# ... and a read-write server must not write client data over the
# superblock through it.
cp base hx
debugfs -w -R "sif /big block[5] 0" hx >/dev/null 2>&1
head -c $((2 * BS)) hx > meta.before
srv_start hw --filter="$FILTER" file hx ext4file=exportname
r=$(probe "$tmpdir/hw.sock" /big write)
case "$r" in REFUSED*|"WERR EIO"*) ;; *) bad "extent onto the superblock (read-write): write gave: $r" ;; esac
srv_stop hw
cmp -s meta.before <(head -c $((2 * BS)) hx) ||
    bad "extent onto the superblock (read-write): the superblock/group descriptors were overwritten with file data"

# Indirect blocks (ext3, 1 KiB blocks: /big uses IND, DIND).
mkimg base3 -t ext3 -b 1024
fsck_clean base3
ind=$(debugfs -R "stat /big" base3 2>/dev/null | sed -n 's/.*(IND):\([0-9]*\).*/\1/p' | head -1)
[ -n "$ind" ] || fail "test setup: /big has no indirect block"
cp base3 hx; debugfs -w -R "sif /big block[IND] 99999999" hx >/dev/null 2>&1
hostile "indirect block past the end" hx /big
cp base3 hx; debugfs -w -R "sif /big block[DIND] 99999999" hx >/dev/null 2>&1
hostile "double indirect block past the end" hx /big
cp base3 hx; poke hx $((ind * 1024 + 40)) '<I' 0x7ffffff0
hostile "indirect entry past the end" hx /big
cp base3 hx; poke hx $((ind * 1024 + 44)) '<I' 0xffffffff
hostile "indirect entry 0xffffffff" hx /big

# Directory entries: bad rec_len in /d, and an entry whose inode
# number is out of range.
dblk=$(debugfs -R "bmap /d 0" base 2>/dev/null)
for v in 0 13 5000; do
    cp base hx; poke hx $((dblk * BS + 4)) '<H' $v   # rec_len of "."
    hostile "directory rec_len $v" hx /d/file5 /d/file20
    grep_err "directory rec_len $v" h "directory corrupted"
    # Listing skips what it cannot read; no crash, no hang.
    srv_start h -r --filter="$FILTER" file hx ext4file=exportname
    timeout $T nbdinfo --list --json "nbd+unix:///?socket=$tmpdir/h.sock" > list.json 2>&1 ||
        bad "directory rec_len $v: nbdinfo --list failed: $(cat list.json)"
    grep -q '"export-name": "/good"' list.json || bad "directory rec_len $v: --list lacks /good"
    srv_alive h || bad "directory rec_len $v: nbdkit died listing"
    srv_stop h
done
cp base hx
/usr/bin/python3 - hx "$dblk" "$BS" <<'EOF'
import struct, sys
img, blk, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
f = open(img, 'r+b'); f.seek(blk * bs); b = f.read(bs); off = 0
while off < bs:
    ino, rl, nl, ft = struct.unpack_from('<IHBB', b, off)
    if b[off+8:off+8+nl] in (b'file3', b'file4'):
        f.seek(blk * bs + off)
        f.write(struct.pack('<I', 999999 if b[off+8:off+8+nl] == b'file3' else 0xffffffff))
    off += rl
f.close()
EOF
hostile "directory entry with a bad inode number" hx /d/file3 /d/file4
grep_err "directory entry with a bad inode number" h "cannot read inode 999999"

# Symbolic links with huge sizes (fast and slow).
cp base hx
debugfs -w -R "sif /ls size 100000" hx >/dev/null 2>&1
debugfs -w -R "sif /lslow size 4294967295" hx >/dev/null 2>&1
hostile "symlinks with huge sizes" hx /ls /lslow
grep_err "symlinks with huge sizes" h "symbolic link"
cp base hx
debugfs -w -R "sif /ls size 0xffffffffffffffff" hx >/dev/null 2>&1
hostile "symlink with size 2^64-1" hx /ls

# The base images were never touched.
fsck_clean base
fsck_clean base3

if [ ${#failures[@]} -gt 0 ]; then
    echo "${#failures[@]} failure(s):" >&2
    printf '  %s\n' "${failures[@]}" >&2
    exit 1
fi
echo "all gates and hostile images handled cleanly"
