#!/usr/bin/env bash
# Block status against the file's own layout, and sparse copies:
#  1. nbdinfo --map --json of sparse files and of preallocated files
#     (unwritten extents made with debugfs fallocate, some of them past
#     the end of the file) equals the layout from debugfs "ex": holes
#     are hole,zero, unwritten extents zero, written extents data, at
#     the right byte ranges, ascending, contiguous, ending at the file
#     size;
#  2. NBD_CMD_FLAG_REQ_ONE: block status returns exactly one extent,
#     of the right type, starting at the requested offset;
#  3. nbdcopy and qemu-img convert of a sparse file give the right
#     bytes and a sparse output file;
#  4. copying a 16 GiB sparse file holding 64 MiB of data reads about
#     the data from the plugin below us (stats filter below ours), and
#     the copy is correct.
source "$srcdir/functions.sh"
requires nbdcopy --version
requires nbdinfo --version
requires python3 -c 'import nbd'
requires debugfs -V
requires nbdkit --filter=stats null --dump-plugin
cd "$tmpdir"

# expected.py SIZE BS EXFILE: the expected extent list, as JSON
# [[offset, length, type], ...] (type 0 data, 2 unwritten, 3 hole),
# built from debugfs "ex" output, merged and clipped at SIZE.
cat > expected.py <<'EOF'
import sys, re, json
size, bs = int(sys.argv[1]), int(sys.argv[2])
nb = (size + bs - 1) // bs
state = [3] * nb
rx = re.compile(r"^\s*\d+/\s*\d+\s+\d+/\s*\d+\s+(\d+)\s*-\s*(\d+)\s+\d+\s*-\s*\d+\s+\d+\s*(Uninit)?\s*$")
for line in open(sys.argv[3]):
    m = rx.match(line)
    if m:
        for b in range(int(m.group(1)), min(int(m.group(2)) + 1, nb)):
            state[b] = 2 if m.group(3) else 0
ents = []
for b in range(nb):
    o = b * bs; n = min(bs, size - o)
    if ents and ents[-1][2] == state[b]:
        ents[-1][1] += n
    else:
        ents.append([o, n, state[b]])
json.dump(ents, sys.stdout)
EOF

# compare.py EXPECTED MAPJSON: nbdinfo's map, merged, equals EXPECTED.
cat > compare.py <<'EOF'
import sys, json
exp = json.load(open(sys.argv[1]))
m = json.load(open(sys.argv[2]))
off = 0
got = []
for e in m:
    o, n, t = e["offset"], e["length"], e["type"]
    assert o == off, "map not contiguous/ascending: extent at %d, expected %d" % (o, off)
    assert n > 0, "zero-length extent at %d" % o
    off += n
    if got and got[-1][2] == t:
        got[-1][1] += n
    else:
        got.append([o, n, t])
size = exp[-1][0] + exp[-1][1] if exp else 0
assert off == size, "map ends at %d, file size %d" % (off, size)
if got != exp:
    sys.exit("map differs:\n  expected %s\n  got      %s" % (exp, got))
EOF

# reqone.py URI EXPECTED: block status with and without REQ_ONE at
# random offsets agrees with EXPECTED.
cat > reqone.py <<'EOF'
import sys, json, random
import nbd
import e4test as t
exp = json.load(open(sys.argv[2]))
size = exp[-1][0] + exp[-1][1] if exp else 0
def type_at(x):
    for o, n, ty in exp:
        if o <= x < o + n:
            return ty, o + n
    raise AssertionError("offset %d not in the file" % x)
h = t.connect(sys.argv[1], size=size, contexts=[nbd.CONTEXT_BASE_ALLOCATION])
rnd = random.Random(size)
offs = [o for o, n, _ in exp] + [o + n - 1 for o, n, _ in exp]
offs += [rnd.randrange(size) for i in range(150)]
for o in offs:
    for flags in (nbd.CMD_FLAG_REQ_ONE, 0):
        c = rnd.choice([1, 511, 4096, 65536, 1 << 20, size - o])
        c = max(1, min(c, size - o))
        got = t.extents(h, c, o, flags)
        what = "block_status(%d, %d, flags %d)" % (c, o, flags)
        assert got, what + ": no extent"
        if flags:
            assert len(got) == 1, what + ": REQ_ONE gave %d extents %r" % (len(got), got)
            assert got[0][0] <= c, what + ": REQ_ONE extent longer than the request"
        p = o
        for n, ty in got:
            assert n > 0 and p + n <= size, what + ": bad extent %d+%d" % (p, n)
            et, end = type_at(p)
            assert ty & 3 == et, what + ": type %d at %d, expected %d" % (ty, p, et)
            assert p + n <= end, what + ": extent %d+%d runs past the %d-extent ending at %d" % (p, n, et, end)
            p += n
h.shutdown()
EOF

# check_map IMG PATH: nbdinfo --map and block status of PATH match debugfs.
check_map ()
{
    local img="$1" path="$2" size bs
    size=$(debugfs -R "stat $path" "$img" 2>/dev/null | sed -n 's/.*Size: \([0-9]*\).*/\1/p' | head -1)
    bs=$(dumpe2fs -h "$img" 2>/dev/null | awk '/^Block size:/{print $3}')
    debugfs -R "ex $path" "$img" > ex.out 2>/dev/null
    python3 expected.py "$size" "$bs" ex.out > exp.json
    nbdkit_srv -U - -r --filter="$FILTER" file "$img" ext4file="$path" \
        --run 'nbdinfo --map --json "$uri" > map.json &&
               /usr/bin/python3 reqone.py "$uri" exp.json' ||
        fail "$img $path: block status queries failed"
    python3 compare.py exp.json map.json || { cat ex.out; fail "$img $path: map differs"; }
    echo "$img $path: $(cat exp.json | head -c 300)"
}

for bsz in 4096 1024; do
    echo "=== ext4 -b $bsz"
    rm -rf src img
    mkdir src
    # /s: sparse, data at unaligned places and up to the (unaligned) end.
    truncate -s $((5*1024*1024 + 333)) src/s
    for r in 0:8192 102400:204800 1048581:12288 $((5*1024*1024 + 333 - 10240)):10240; do
        IFS=: read o n <<< "$r"
        head -c $n /dev/urandom |
            dd of=src/s conv=notrunc oflag=seek_bytes seek=$o status=none
    done
    # /p: data at the start, then preallocated ranges, one past EOF.
    truncate -s $((3*1024*1024)) src/p
    head -c 65536 /dev/urandom | dd of=src/p conv=notrunc status=none
    : > src/e
    : > src/u
    truncate -s 128M img
    mke2fs -q -F -t ext4 -b $bsz -d src img
    k=$((4096 / bsz))           # blocks per 4K
    nb=$((3*1024*1024 / bsz))
    debugfs -w -R "fallocate /p $((25*k)) $((50*k - 1))" img >/dev/null 2>&1
    debugfs -w -R "fallocate /p $((75*k + 1)) $((78*k))" img >/dev/null 2>&1
    debugfs -w -R "fallocate /p $((nb - 10)) $((nb + 40))" img >/dev/null 2>&1
    debugfs -w -R "sif /p size $((3*1024*1024 - 5*bsz + 123))" img >/dev/null 2>&1
    # /e: everything preallocated, the allocation goes past EOF.
    debugfs -w -R "fallocate /e 0 $((20*k))" img >/dev/null 2>&1
    debugfs -w -R "sif /e size 50000" img >/dev/null 2>&1
    # /u: 1 MiB fully preallocated.
    debugfs -w -R "fallocate /u 0 $((1024*1024 / bsz - 1))" img >/dev/null 2>&1
    debugfs -w -R "sif /u size 1048576" img >/dev/null 2>&1
    fsck_clean img
    debugfs -R "ex /p" img 2>/dev/null | grep -q Uninit || fail "setup: /p has no unwritten extent"
    debugfs -R "ex /e" img 2>/dev/null | grep -q Uninit || fail "setup: /e has no unwritten extent"
    for f in /s /p /e /u; do check_map img $f; done

    # Sparse copies of /s.
    rm -f out.n out.q
    nbdkit_srv -U - -r --filter="$FILTER" file img ext4file=/s \
        --run 'nbdcopy "$uri" out.n &&
               qemu-img convert -f raw -O raw -S 4k "$uri" out.q' ||
        fail "copying /s failed"
    cmp out.n src/s || fail "nbdcopy of /s differs"
    # qemu rounds the size up to a multiple of 512 (zeros after EOF).
    ssize=$(stat -c %s src/s)
    [ $(stat -c %s out.q) -eq $(( (ssize + 511) / 512 * 512 )) ] ||
        fail "qemu-img convert of /s has the wrong size"
    cmp -n $ssize out.q src/s || fail "qemu-img convert of /s differs"
    [ "$(tail -c +$((ssize + 1)) out.q | tr -d '\0' | wc -c)" -eq 0 ] ||
        fail "qemu-img convert of /s: non-zero bytes after EOF"
    # /s has 8K + 200K + 12K + 10K of data (a few more blocks at the
    # unaligned edges); 5 MiB if the copy were not sparse.
    for o in out.n out.q; do
        alloc=$(( $(stat -c %b $o) * 512 ))
        echo "$o: $alloc bytes allocated"
        [ $alloc -le $((400*1024)) ] || fail "$o is not sparse ($alloc bytes allocated)"
    done
done

# 4. 16 GiB sparse file, 64 MiB of data in 16 pieces of 4 MiB.
echo "=== 16 GiB sparse file"
rm -rf src img out.*
mkdir src
big=$((16*1024*1024*1024))
truncate -s $big src/big
pieces=()
for ((i=0; i<16; i++)); do
    o=$(( i * 1024*1024*1024 + (i * 12345 % 1000) * 4096 ))
    [ $i -eq 15 ] && o=$(( big - 4*1024*1024 ))     # up to EOF
    pieces+=($o)
    head -c $((4*1024*1024)) /dev/urandom |
        dd of=src/big conv=notrunc oflag=seek_bytes seek=$o bs=1M status=none
done
truncate -s 17G img
mke2fs -q -F -t ext4 -d src img
blocks=$(debugfs -R "stat /big" img 2>/dev/null | sed -n 's/.*Blockcount: \([0-9]*\).*/\1/p')
echo "/big: $blocks sectors allocated"
[ "$blocks" -ge $((64*2048)) ] && [ "$blocks" -lt $((66*2048)) ] ||
    fail "setup: mke2fs -d did not copy /big sparsely ($blocks sectors)"

start=$(date +%s)
nbdkit_srv -U - -r --filter="$FILTER" --filter=stats file img ext4file=/big \
    statsfile="$tmpdir/stats" statsappend=false \
    --run 'nbdcopy "$uri" out.big' || fail "nbdcopy of /big failed"
echo "nbdcopy of /big: $(( $(date +%s) - start )) s"
cat stats | grep -E '^(total|read|write|extents)' || :
# Bytes read from the plugin below us.
readbytes=$(awk '/^read:/ {
    v = $6; u = $7; sub(/,$/, "", u)
    m = (u == "KiB") ? 1024 : (u == "MiB") ? 1048576 : (u == "GiB") ? 1073741824 : (u == "TiB") ? 1099511627776 : 1
    printf "%d\n", v * m }' stats)
[ -n "$readbytes" ] || { cat stats; fail "no read line in the stats"; }
echo "read from below: $readbytes bytes"
[ "$readbytes" -ge $((64*1024*1024)) ] || fail "read less than the data ($readbytes)"
[ "$readbytes" -lt $((200*1024*1024)) ] ||
    fail "copying 64 MiB of data out of a 16 GiB sparse file read $readbytes bytes"

# The copy: its size, each data piece, no other data, and it is sparse.
[ "$(stat -c %s out.big)" -eq $big ] || fail "out.big has the wrong size"
alloc=$(( $(stat -c %b out.big) * 512 ))
echo "out.big: $alloc bytes allocated"
[ $alloc -lt $((80*1024*1024)) ] || fail "out.big is not sparse ($alloc bytes)"
python3 - "${pieces[@]}" <<'EOF' || fail "out.big differs from the source"
import os, sys
pieces = [(int(o), 4 << 20) for o in sys.argv[1:]]
src = open("src/big", "rb"); out = open("out.big", "rb")
for o, n in pieces:
    src.seek(o); out.seek(o)
    if src.read(n) != out.read(n):
        sys.exit("piece at %d differs" % o)
# Every data segment of the copy outside the pieces must be zero.
fd = out.fileno(); size = os.fstat(fd).st_size; p = 0
while p < size:
    try:
        d = os.lseek(fd, p, os.SEEK_DATA)
    except OSError:
        break
    e = os.lseek(fd, d, os.SEEK_HOLE)
    x = d
    while x < e:
        inside = [po + pn for po, pn in pieces if po <= x < po + pn]
        if inside:
            x = inside[0]; continue
        nxt = min([po for po, pn in pieces if po > x] + [e])
        q = x
        while q < nxt:
            m = min(nxt - q, 1 << 24)
            out.seek(q)
            if out.read(m) != bytes(m):
                sys.exit("non-zero bytes at %d..%d outside the data" % (q, q + m))
            q += m
        x = nxt
    p = e
EOF
echo OK
