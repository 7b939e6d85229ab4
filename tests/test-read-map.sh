#!/usr/bin/env bash
# Block status: nbdinfo --map (and NBD block status at random,
# unaligned offsets) on sparse files reports holes (hole,zero) exactly
# where the file has no blocks, unwritten extents as zero, data where
# the file has data, and nothing past the end of the file.  nbdcopy of
# the sparse files (which uses the map) gives the right bytes.
source "$srcdir/functions.sh"
requires nbdcopy --version
requires nbdinfo --version
requires nbdsh --version
requires python3 -c 'import nbd'
cd "$tmpdir"

# Checker, run inside nbdsh.  Environment:
#   SRC      the source file (expected bytes)
#   BS       filesystem block size
#   LAYOUT   debugfs output describing the file's blocks
#   KIND     "ex" (debugfs ex -l output), "stat" (debugfs stat BLOCKS:
#            for indirect-mapped files) or "inline" / "dense" (all data)
#   MAPJSON  output of nbdinfo --map --json
cat > checkmap.py <<'EOF'
import os, re, json, random
import e4test as t
src = open(os.environ["SRC"], "rb").read()
n = len(src)
bs = int(os.environ["BS"])
kind = os.environ["KIND"]
nblocks = (n + bs - 1) // bs
assert h.get_size() == n, "size %d != %d" % (h.get_size(), n)

# Expected state of every block of the file: H(ole), D(ata), U(nwritten).
exp = ["H"] * nblocks
layout = open(os.environ["LAYOUT"]).read()
if kind == "ex":
    rx = re.compile(r"^\s*\d+/\s*\d+\s+\d+/\s*\d+\s+(\d+)\s*-\s*(\d+)\s+\d+\s*-\s*\d+\s+\d+\s*(Uninit)?\s*$")
    nleaf = 0
    for line in layout.splitlines():
        m = rx.match(line)
        if not m:
            continue
        nleaf += 1
        for b in range(int(m.group(1)), int(m.group(2)) + 1):
            if b < nblocks:
                exp[b] = "U" if m.group(3) else "D"
    assert nleaf > 0 or n == 0 or "H" in exp, "could not parse debugfs ex output"
elif kind == "stat":
    blk = layout.split("BLOCKS:", 1)[1]
    for m in re.finditer(r"\((\d+)(?:-(\d+))?\):", blk):
        a = int(m.group(1)); b = int(m.group(2) or a)
        for x in range(a, b + 1):
            if x < nblocks:
                exp[x] = "D"
else:
    exp = ["D"] * nblocks

def ok(state, t):
    if state == "D":
        return t == 0
    if state == "H":
        return t == 3
    return t & 2 != 0          # unwritten: must read as zero

def check_extents(start, ents, what):
    """ents: list of (length, type) starting at byte start."""
    off = start
    for (ln, t) in ents:
        assert ln > 0, "%s: zero-length extent at %d" % (what, off)
        assert off + ln <= n, "%s: extent %d+%d goes past the file size %d" % (what, off, ln, n)
        if t & 2:
            assert src[off:off+ln] == bytes(ln), \
                "%s: extent %d+%d reported zero but the file has data there" % (what, off, ln)
        for b in range(off // bs, (off + ln - 1) // bs + 1):
            assert ok(exp[b], t), "%s: block %d (%s) reported as type %d (extent %d+%d)" \
                % (what, b, exp[b], t, off, ln)
        off += ln
    return off

# 1. nbdinfo --map --json: covers [0, size) exactly.
m = json.load(open(os.environ["MAPJSON"]))
off = 0
ents = []
for e in m:
    assert e["offset"] == off, "map not contiguous at %d: %r" % (off, e)
    ents.append((e["length"], e["type"]))
    off += e["length"]
end = check_extents(0, ents, "nbdinfo --map")
assert end == n, "map ends at %d, file size %d" % (end, n)

# 2. Block status at random (unaligned) offsets and lengths.
rnd = random.Random(os.environ["SRC"])
for i in range(200 if n else 0):
    o = rnd.randrange(0, n)
    c = rnd.randint(1, min(n - o, 1 << 24))
    got = t.extents(h, c, o)
    assert got, "no extents returned at %d+%d" % (o, c)
    check_extents(o, got, "block_status(%d, %d)" % (c, o))
EOF

# check_map IMG PATH SRCFILE KIND
check_map ()
{
    local img="$1" path="$2" src="$3" kind="$4"
    echo "checking map of $path in $img"
    case $kind in
        ex)   debugfs -R "ex -l $path" "$img" > layout 2>/dev/null ;;
        stat) debugfs -R "stat $path" "$img" > layout 2>/dev/null ;;
        *)    : > layout ;;
    esac
    rm -f map.json out out.pipe
    nbdkit_srv -U - -r --filter="$FILTER" file "$img" ext4file="$path" \
        --run 'nbdinfo --map --json "$uri" > map.json &&
               nbdsh --base-allocation -u "$uri" -c "exec(open(\"checkmap.py\").read())" &&
               nbdcopy "$uri" out &&
               nbdcopy "$uri" - > out.pipe' ||
        fail "$img:$path: map check failed"
    cmp out "$src" || fail "$img:$path: nbdcopy output differs from source"
    cmp out.pipe "$src" || fail "$img:$path: nbdcopy to a pipe differs from source"
    dump_cmp "$img" "$path" out
}
# put SIZE-BYTES OFFSET FILE: write random bytes at OFFSET.
put () { head -c "$1" /dev/urandom | dd of="$3" bs=1 seek="$2" conv=notrunc status=none; }

mkdir src
# Holes at start, middle and end; the size is not a block multiple.
truncate -s $((5*1024*1024 + 123)) src/sparse
put 100000 $((1024*1024 + 5)) src/sparse
put 8192 $((600*4096)) src/sparse
# Many small extents (forces an extent tree of depth > 0 on ext4),
# data at the very start and in the last, partial block.
truncate -s $((3*1024*1024 + 1001)) src/many
for i in $(seq 0 15); do put 3000 $((i * 192 * 1024)) src/many; done
put 500 $((3*1024*1024 + 500)) src/many
# For unwritten extents.
truncate -s 1M src/unwr
put 65536 0 src/unwr
put 65536 $((512*1024)) src/unwr
head -c 300000 /dev/urandom > src/dense
: > src/empty

truncate -s 64M img
mke2fs -q -F -t ext4 -d src img
debugfs -w -R "fallocate /unwr 20 100" img >/dev/null 2>&1
debugfs -R "ex /many" img 2>/dev/null | grep -q '^ *1/ *1' ||
    fail "test setup: /many has no depth-1 extent tree"
debugfs -R "ex /unwr" img 2>/dev/null | grep -q Uninit ||
    echo "note: no unwritten extent could be made; /unwr checked as a plain sparse file"
sha=$(sha256sum < img)

export SRC BS LAYOUT=$tmpdir/layout KIND MAPJSON=$tmpdir/map.json
run () { SRC=$3 KIND=$4 BS=$(dumpe2fs -h "$1" 2>/dev/null | sed -n 's/^Block size: *//p') check_map "$@"; }
run img /sparse src/sparse ex
run img /many src/many ex
run img /unwr src/unwr ex
run img /dense src/dense ex

# The empty file has an empty map.
out=$(nbdkit_srv -U - -r --filter="$FILTER" file img ext4file=/empty \
        --run 'nbdinfo --map "$uri"')
[ -z "$out" ] || fail "map of an empty file is not empty: $out"
[ "$(sha256sum < img)" = "$sha" ] || fail "image changed by read-only runs"

# Indirect-mapped files (ext2, 1 KiB blocks).
truncate -s 32M img2
mke2fs -q -F -t ext2 -b 1024 -d src img2
run img2 /sparse src/sparse stat
run img2 /many src/many stat

# 1 KiB-block ext4 and inline data.
truncate -s 32M img1k
mke2fs -q -F -t ext4 -b 1024 -d src img1k
run img1k /many src/many ex
mkdir srcin
head -c 50 /dev/urandom > srcin/tiny
truncate -s 8M imgin
mke2fs -q -F -t ext4 -O inline_data -d srcin imgin
# (debugfs pads inline dumps, so no dump_cmp here.)
dump_cmp () { :; }
run imgin /tiny srcin/tiny inline

echo "maps are correct"
