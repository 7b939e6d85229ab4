# Helpers of the journal replay tests (test-journal-*.sh).  Source it
# after functions.sh (its srv_try_start, srv_stop and check_err use
# bad, defined here), before leaving the directory of the test (srcdir
# may be relative); it leaves the shell in $tmpdir.
#
# Every case runs even if an earlier one failed: bad() records a
# failure, report_failures() lists them at the end and sets the exit
# status.  A failure of the test's own setup (the crafter, e2fsck's
# oracle) still uses fail().

requires debugfs -R "help" /dev/null
requires e2fsck -V
requires dumpe2fs -V
requires /usr/bin/python3 -c "import nbd"

CRAFT=(/usr/bin/python3 "$(cd "$srcdir" && pwd)/jbd2craft.py")
cd "$tmpdir"
T=20                            # seconds allowed for any one client

failures=()
bad () { echo "FAIL: $*" >&2; failures+=("$*"); }
report_failures ()
{
    if [ ${#failures[@]} -gt 0 ]; then
        echo "${#failures[@]} failure(s):" >&2
        printf '  %s\n' "${failures[@]}" >&2
        exit 1
    fi
}

# snap IMG / unchanged IMG: the image is byte for byte what it was at
# snap (a cmp against a copy: what an equal sha256 would show, faster).
snap () { cp --sparse=always "$1" "$1.snap"; }
unchanged () { cmp -s "$1" "$1.snap"; }

# rdump_to DIR IMG: every file of IMG, as debugfs reads it, under DIR.
rdump_to ()
{
    rm -rf "$1"; mkdir -p "$1"
    debugfs -R "rdump / $1" "$2" > /dev/null 2>&1 || fail "debugfs rdump of $2 failed"
}

# files_of DIR: the regular files under DIR as absolute paths in the
# filesystem, sorted.
files_of () { (cd "$1" && find . -type f | sed 's|^\.||' | LC_ALL=C sort); }

# jsb_field IMG NAME: a line of dumpe2fs -h ("Journal start" etc.).
jsb_field () { dumpe2fs -h "$1" 2>/dev/null | sed -n "s/^$2: *//p"; }

# A libnbd client.  reader.py SOCK OUTDIR WRITEFILE WBLOCK NAME...:
# for each NAME (an export name; "!NAME": the file must not exist)
# open it, read it whole into OUTDIR/NAME and print one line:
#   READ name size ro=0|1      read without error
#   REFUSED name msg           the open failed
#   GONE-OK name               (for !NAME) the open failed, as it should
#   GONE-SERVED name           (for !NAME) it was served
#   ERR name errno msg         a read failed
# If NAME is WRITEFILE, the content of WBLOCK is then written at offset
# 0, flushed and read back ("WROTE name" or "WERR name errno msg").
cat > reader.py <<'EOF'
import os, sys, nbd
import e4test as t
sock, outdir, wfile, wblock = sys.argv[1:5]
for name in sys.argv[5:]:
    gone = name.startswith("!")
    if gone:
        name = name[1:]
    try:
        h = t.connect(sock, name)
    except nbd.Error as e:
        print("GONE-OK", name) if gone else print("REFUSED", name, t.errstr(e))
        continue
    if gone:
        print("GONE-SERVED", name)
        h.shutdown()
        continue
    try:
        data = t.read_all(h)
    except nbd.Error as e:
        print("ERR", name, e.errno, t.errstr(e))
        continue
    p = os.path.join(outdir, name.lstrip("/"))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    print("READ", name, len(data), "ro=%d" % h.is_read_only())
    if name == wfile:
        buf = open(wblock, "rb").read()
        try:
            h.pwrite(buf, 0)
            h.flush()
            assert h.pread(len(buf), 0) == buf, "read-back mismatch"
            print("WROTE", name)
        except nbd.Error as e:
            print("WERR", name, e.errno, t.errstr(e))
    h.shutdown()
EOF
# reader SRV OUTDIR WRITEFILE NAME...: run reader.py against server SRV.
reader ()
{
    local srv="$1" out="$2" w="$3" rc=0; shift 3
    rm -rf "$out"; mkdir -p "$out"
    timeout $((T * 2)) /usr/bin/python3 reader.py "$tmpdir/$srv.sock" "$out" "$w" \
        "$tmpdir/wblock" "$@" 2>&1 || rc=$?
    [ "$rc" = 0 ] || echo "CLIENT-FAILED status $rc"
}
head -c 4096 /dev/urandom > wblock

# ---------------------------------------------------------------------
# The files and filesystem states of the journal tests.
#
# Source files.  /sparse has 13 extents (an extent tree block on ext4;
# indirect blocks on ext3); /big needs double indirect blocks at 1 KiB.
mkdir -p src/d
head -c 49152 /dev/urandom > src/data
echo hello > src/small
head -c 10000 /dev/urandom > src/grow
head -c 300000 /dev/urandom > src/big
for i in 1 2 3; do echo "file $i" > src/d/f$i; done
/usr/bin/python3 -c "
import os
with open('src/sparse', 'wb') as f:
    for i in range(13):
        f.seek(i * 131072); f.write(os.urandom(8192))"
head -c 20000 /dev/urandom > newfile
head -c 3000 /dev/urandom > inner
printf '\xc0\x3b\x39\x98' > magic            # the jbd2 magic, big-endian
head -c 8188 /dev/urandom >> magic
for v in aa bb cc; do
    /usr/bin/python3 -c "import sys; sys.stdout.buffer.write(bytes([0x$v]) * 4096)" > fill.$v
done

# mkflavour FL MKE2FS-ARGS...: base.FL and the states, each a complete,
# clean filesystem, and their files in e.STATE.FL/:
#   S1  base + a new file, a new directory with a file, /grow's size
#       raised to 100000 (allocation: bitmaps, inode table, directory
#       blocks, group descriptors, superblock)
#   S2  S1 + a hole punched into /sparse (extent tree or indirect
#       blocks, freed blocks) and /small deleted
#   S3  S2 + /data's first 4 blocks overwritten in place (file data;
#       the first starts with the jbd2 magic, so its copy is escaped)
#   S4  S3 + every block of /big overwritten (a large transaction)
#   S1z S1 + block 7 of /data filled with 0xCC (the revoke cases)
# Also X, Y, Z: the physical blocks 5, 6, 7 of /data.
declare -A BS X Y Z
mkflavour ()
{
    local fl="$1" bs b s; shift
    rm -f base.$fl; truncate -s 16M base.$fl
    mke2fs -q -F "$@" -d src base.$fl || fail "mke2fs $*"
    bs=$(dumpe2fs -h base.$fl 2>/dev/null | sed -n 's/^Block size: *//p')
    BS[$fl]=$bs
    cp base.$fl S1.$fl
    debugfs -w -f - S1.$fl > dfs.out 2>&1 <<EOF
write newfile newfile
mkdir newdir
write inner newdir/inner
sif /grow size 100000
EOF
    cp S1.$fl S2.$fl
    debugfs -w -f - S2.$fl > dfs.out 2>&1 <<EOF
punch /sparse $((262144 / bs)) $((393216 / bs + 8192 / bs - 1))
rm /small
EOF
    cp S2.$fl S3.$fl
    bmap_all base.$fl /data 8 > data.blocks
    for ((b=0; b<4; b++)); do
        dd if=magic of=S3.$fl bs=$bs skip=$b count=1 conv=notrunc status=none \
           seek="$(sed -n "$((b + 1))p" data.blocks)"
    done
    cp S3.$fl S4.$fl
    bmap_all base.$fl /big $(( (300000 + bs - 1) / bs )) > big.blocks
    /usr/bin/python3 - S4.$fl $bs big.blocks <<'EOF'
import os, sys
f = open(sys.argv[1], "r+b"); bs = int(sys.argv[2])
for line in open(sys.argv[3]):
    f.seek(int(line) * bs); f.write(os.urandom(bs))
EOF
    X[$fl]=$(sed -n 6p data.blocks)
    Y[$fl]=$(sed -n 7p data.blocks)
    Z[$fl]=$(sed -n 8p data.blocks)
    [ -n "${Z[$fl]}" ] && [ "$(wc -l < big.blocks)" = $(( (300000 + bs - 1) / bs )) ] ||
        fail "test setup: $fl: bmap"
    cp S1.$fl S1z.$fl
    dd if=fill.cc of=S1z.$fl bs=$bs count=1 seek=${Z[$fl]} conv=notrunc status=none
    for s in base S1 S2 S3 S4 S1z; do
        fsck_clean $s.$fl
        rdump_to e.$s.$fl $s.$fl
    done
    # The states differ as intended.
    [ -f e.S1.$fl/newdir/inner ] || fail "test setup: $fl: S1 lacks /newdir/inner"
    [ ! -f e.S2.$fl/small ] || fail "test setup: $fl: S2 has /small"
    ! cmp -s e.S2.$fl/sparse e.S1.$fl/sparse || fail "test setup: $fl: S2 did not punch /sparse"
    ! cmp -s e.S3.$fl/data e.S2.$fl/data || fail "test setup: $fl: S3 did not change /data"
    ! cmp -s e.S4.$fl/big e.S3.$fl/big || fail "test setup: $fl: S4 did not change /big"
}

# bmap_all IMG FILE N: the physical blocks of FILE's first N blocks.
bmap_all ()
{
    seq 0 $(($3 - 1)) | sed "s|^|bmap $2 |" | debugfs -f - "$1" 2>/dev/null | grep -E '^[0-9]+$'
}

# new_case NAME FL: the image case.NAME, a copy of base.FL.
new_case () { cp --sparse=always base.$2 case.$1; }

# craft NAME ARGS...: jbd2craft.py on case.NAME.
craft () { local n="$1"; shift; "${CRAFT[@]}" "case.$n" "$@" || fail "test setup: jbd2craft $*"; }
