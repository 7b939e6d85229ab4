#!/usr/bin/env bash
# Punching indirect-mapped (ext2/ext3, 1K blocks) files never loses a
# byte outside the range.  The file is sparse, 70 MiB, with data in
# the direct blocks, the single indirect range, many double indirect
# blocks and the triple indirect range (beyond 64 MiB + 268 KiB).
# Many trims / zeroes (with and without MAY_TRIM) / rewrites of random
# ranges (aligned, unaligned, crossing indirect-block boundaries); after
# each one the WHOLE file is compared with the model: bytes outside
# the range unchanged, whole blocks inside a trimmed range zero, the
# whole range zero after a zero.  Between rounds: e2fsck and a byte
# comparison through debugfs; at the end free blocks went up.
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
cd "$tmpdir"

cat > punch.py <<'EOF'
import random, sys
import nbd
import e4test as t
uri, model_path, rounds_seed, nops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
bs = 1024
exp = open(model_path, "rb").read()
size = len(exp)
rnd = random.Random(rounds_seed)
h = t.connect(uri, size=size)
m = t.Shadow(h, exp)

# Byte offsets where indirect blocks start mapping: single indirect at
# block 12, double at 12+256, each of its indirect blocks every 256
# blocks, triple at 12+256+65536, and its second-level blocks every
# 65536 blocks, third-level every 256.
P = bs // 4
bounds = [12 * bs, (12 + P) * bs]
bounds += [(12 + P + k * P) * bs for k in range(1, P)]
t0 = 12 + P + P * P
bounds += [(t0 + k * P) * bs for k in range(0, 64)]
bounds += [(t0 + k * P * P) * bs for k in range(0, 4)]
bounds = sorted(set(b for b in bounds if b < size))

def rand_range():
    r = rnd.random()
    if r < 0.5:                 # around an indirect-block boundary
        b = rnd.choice(bounds)
        o = b - rnd.randint(0, 4 * bs + 700)
        n = rnd.randint(1, 12 * bs)
        if rnd.random() < 0.3:
            n = rnd.randint(1, 600 * bs)    # crossing many
    elif r < 0.7:               # tiny, unaligned
        o = rnd.randrange(size); n = rnd.randint(1, 3 * bs)
    else:                       # anywhere, often long
        o = rnd.randrange(size); n = rnd.randint(1, 4 << 20)
    if rnd.random() < 0.4:      # block aligned
        o = o // bs * bs
        n = max(bs, (n + bs - 1) // bs * bs)
    o = max(0, min(o, size - 1))
    n = max(1, min(n, size - o))
    return o, n

for i in range(nops):
    o, n = rand_range()
    r = rnd.random()
    if r < 0.5:
        m.trim_blocks(n, o, bs); what = "trim"
    elif r < 0.65:
        m.zero(n, o); what = "zero"
    elif r < 0.75:
        m.zero(n, o, nbd.CMD_FLAG_NO_HOLE); what = "zero NO_HOLE"
    else:
        n = min(n, 256 * bs)
        m.randwrite(rnd, o, n); what = "write"
    m.check_all("op %d: %s %d+%d" % (i, what, o, n), piece=16 << 20)
# End with a few long trims so that blocks are certainly freed.
for (o, n) in [(0, 300 * bs + 5), (64 << 20, 2 << 20), (size - 50000, 50000)]:
    m.trim_blocks(n, o, bs)
    m.check_all("final trim %d+%d" % (o, n), piece=16 << 20)
h.flush()
h.shutdown()
m.save(model_path)
EOF

export SEED=${SEED:-$RANDOM}
echo "SEED=$SEED"

for fstype in ext2 ext3; do
    echo "=== $fstype -b 1024"
    rm -rf src img model
    mkdir src
    size=$((70*1024*1024 + 777))
    truncate -s $size src/f
    # Data: direct + single indirect + the start of double indirect;
    # scattered in the double indirect range; around the start of the
    # triple indirect range (64 MiB + 268 KiB); and up to EOF.
    for r in 0:$((400*1024)) $((1024*1024 - 3000)):$((600*1024)) \
             $((20*1024*1024 + 1)):$((300*1024)) \
             $((64*1024*1024)):$((2*1024*1024)) \
             $((67*1024*1024)):$((512*1024)) \
             $((size - 200*1024)):$((200*1024)); do
        IFS=: read o n <<< "$r"
        head -c $n /dev/urandom |
            dd of=src/f conv=notrunc oflag=seek_bytes seek=$o status=none
    done
    cp src/f model
    truncate -s 64M img
    mke2fs -q -F -t $fstype -b 1024 -d src img
    debugfs -R "stat /f" img 2>/dev/null | grep -q TIND ||
        fail "setup: /f does not use a triple indirect block"
    free0=$(dumpe2fs -h img 2>/dev/null | awk '/^Free blocks:/{print $3}')
    for round in 1 2 3; do
        nbdkit_srv -U - --filter="$FILTER" file img ext4file=/f \
            --run "/usr/bin/python3 punch.py \"\$uri\" model $((SEED * 10 + round)) 40" ||
            fail "$fstype round $round failed"
        fsck_clean img
        dump_cmp img /f model
    done
    free1=$(dumpe2fs -h img 2>/dev/null | awk '/^Free blocks:/{print $3}')
    echo "free blocks after the random rounds: $free0 -> $free1"
    # The random rounds also fill holes (and emptied indirect blocks
    # stay allocated), so whether they free blocks overall depends on
    # the seed.  A trim of every whole block must free the data blocks.
    nbdkit_srv -U - --filter="$FILTER" file img ext4file=/f \
        --run "nbdsh -u \"\$uri\" -c 'h.trim($((size / 1024 * 1024)), 0)'" ||
        fail "$fstype: trim of the whole file failed"
    /usr/bin/python3 -c '
import sys
p, n = sys.argv[1], int(sys.argv[2])
b = bytearray(open(p, "rb").read()); b[:n] = bytes(n); open(p, "wb").write(b)
' model $((size / 1024 * 1024))
    fsck_clean img
    dump_cmp img /f model
    free2=$(dumpe2fs -h img 2>/dev/null | awk '/^Free blocks:/{print $3}')
    echo "free blocks after trimming the whole file: $free1 -> $free2"
    [ "$free2" -gt "$free1" ] && [ "$free2" -gt "$free0" ] ||
        fail "$fstype: free blocks did not go up ($free0 -> $free1 -> $free2)"
done
echo OK
