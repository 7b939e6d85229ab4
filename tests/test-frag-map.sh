#!/usr/bin/env bash
# Partial maps (runmap.h): a file of 3000 extents on a 1 KiB-block
# filesystem (a tree of depth 2, 36 leaves) served with the test-only
# -D ext4fs.max_runs=64, so the map holds a few leaves at a time:
# loaded where requests need them, cut back past 64 runs.
#  1. Three clients at once, each on its own interleaved chunks: reads,
#     writes into holes and over data, zeros (with and without
#     MAY_TRIM), trims, block status; each checks what it reads against
#     its model.
#  2. One client reads the whole file in random order (loads and cuts
#     all the time), then block status over the whole file.
# Every map change and load is checked against the tree on disk
# (verify_map, functions.sh).  The map must have been cut back (the
# server's debug output says so).  Ends with a clean stop, e2fsck -fn
# and a byte comparison; without and with a journal.  Then, read-only,
# both files (/g has more than one index node) read back through the
# index node cache with one slot.
# The same for files of indirect blocks (no extents: loaded by block of
# pointers), on /t: 70 MiB, sparse, data in the direct blocks and under
# the single, double and triple indirect blocks, with zero pointers at
# every level; then /f and /g read-only.
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
cd "$tmpdir"

mkdir src
# /f: 3000 extents of one block, one block of hole after each.
/usr/bin/python3 -c '
import os
f = open("src/f", "wb"); f.truncate(6000 * 1024)
for i in range(3000):
    f.seek(i * 2 * 1024); f.write(os.urandom(1024))
# /g: 9000 extents, over 84 leaves: more than one index node.
g = open("src/g", "wb"); g.truncate(18000 * 1024)
for i in range(9000):
    g.seek(i * 2 * 1024); g.write(os.urandom(1024))
# /t: with 1 KiB blocks, 12 direct blocks, 256 under the indirect
# block, 65536 under the double, the rest under the triple.  Runs of
# 1-5 blocks, in clusters with wide holes between them (whole blocks
# of pointers missing at every level).
t = open("src/t", "wb"); t.truncate(70 * 1024 * 1024)
b = 0
while b < 70 * 1024:
    n = (b * 7) % 5 + 1
    t.seek(b * 1024); t.write(os.urandom(n * 1024))
    b += n + (1 + b % 3 if b % 40 < 32 else 1500 + b % 700)'

cat > client.py <<'EOF'
import nbd, sys, os, random, pickle
import e4test as t
role, ident, sock, origf, out = sys.argv[1:6]
ident = int(ident)
orig = open(origf, "rb").read()
size = len(orig)
bs = 1024
rnd = random.Random(ident * 7919 + 1)
h = t.connect(sock, os.environ.get("EXPORT", "/f"),
              contexts=(nbd.CONTEXT_BASE_ALLOCATION,))

def status(n, off):
    # [(offset, length, flags)] of one block status request.
    ents, o = [], off
    for l, typ in t.extents(h, n, off):
        ents.append((o, l, typ))
        o += l
    return ents

def status_check(m, off, n):
    # Block status never calls data a hole; an extent list may end
    # early, but never starts anywhere else than at off.
    ents = status(n, off)
    if not ents or ents[0][0] != off:
        t.fail("block status at %d: %r" % (off, ents[:3]))
    for o, l, typ in ents:
        if typ & nbd.STATE_HOLE and any(m.data[o:o + l]):
            t.fail("block status: data at [%d, +%d) reported as a hole" % (o, l))

if role == "mixed":
    t.barrier("mixed.%d" % ident)
    m = t.Shadow(h, orig, who="client %d" % ident)
    chunk = 64 * 1024
    mine = [k for k in range(size // chunk) if k % 3 == ident]
    for it in range(400):
        k = rnd.choice(mine)
        o = k * chunk + rnd.randrange(chunk - 1)
        n = rnd.randint(1, min(chunk - (o - k * chunk), 20000))
        op = rnd.random()
        if op < 0.35:
            m.check(o, n)
        elif op < 0.7:
            m.randwrite(rnd, o, n)
        elif op < 0.8:
            m.zero(n, o)
        elif op < 0.87:
            m.zero(n, o, nbd.CMD_FLAG_NO_HOLE)
        elif op < 0.95:
            m.trim_blocks(n, o, bs)
        else:
            status_check(m, o, n)
        if it % 50 == 0:
            h.flush()
    for k in mine:
        m.check(k * chunk, chunk, "final read-back")
    h.flush()
    m.save_owned(out, [(k * chunk, chunk) for k in mine])
else:
    m = t.Shadow(h, orig)
    blocks = list(range(0, size, 4096))
    rnd.shuffle(blocks)
    for o in blocks:
        m.check(o, min(4096, size - o), "random read")
    o = 0
    while o < size:
        ents = status(min(size - o, 1 << 30), o)
        if not ents or ents[0][0] != o:
            t.fail("block status at %d: %r" % (o, ents[:3]))
        for eo, l, typ in ents:
            if typ & nbd.STATE_HOLE and any(m.data[eo:eo + l]):
                t.fail("block status: data at [%d, +%d) as a hole" % (eo, l))
        o = ents[-1][0] + ents[-1][1]
h.shutdown()
EOF

flavour ()
{
    echo "== ext4 $1"
    rm -f img ready.* go srv.err
    truncate -s 64M img
    # shellcheck disable=SC2086
    mke2fs -q -F -t ext4 -b 1024 $1 -d src img
    local file=${3:-f}
    if [ "$file" = f ]; then
        depth=$(debugfs -R "ex /f" img 2>/dev/null | awk 'NR == 2 { print $2 }')
        [ "${depth%/}" -ge 2 ] || fail "/f has a tree of depth ${depth%/}, expected 2"
    else
        debugfs -R "stat /$file" img 2>/dev/null | grep -q "(TIND)" ||
            fail "/$file has no triple indirect block"
    fi
    local sock=$tmpdir/sock$2
    start_nbdkit "$sock" -v -D ext4fs.max_runs=64 --filter="$FILTER" \
        file img ext4file=exportname 2> srv.err
    local pids=() i
    for i in 0 1 2; do
        EXPORT=/$file /usr/bin/python3 client.py mixed $i "$sock" src/$file part.$i &
        pids+=($!)
    done
    release_clients 3 "${pids[@]}"
    /usr/bin/python3 -c '
import e4test as t
import sys
t.merge_owned(sys.argv[1], "expected", ["part.0", "part.1", "part.2"])' src/$file
    EXPORT=/$file /usr/bin/python3 client.py reader 9 "$sock" expected - ||
        { tail -5 srv.err; fail "whole-file reads"; }
    stop_nbdkit "$sock"
    grep -q "differs from the map on disk" srv.err && fail "map differs"
    grep -q "map cut from" srv.err || fail "the map was never cut back"
    grep -qE "marking the filesystem|aborting the journal" srv.err &&
        fail "marked with errors, or the journal aborted"
    fsck_clean img
    dump_cmp img /$file expected
    if [ "$file" != f ]; then
        # Indirect files: no index node cache; the other two files,
        # unchanged, read-only.
        sock=$sock.ro
        start_nbdkit "$sock" -r -v -D ext4fs.max_runs=64 \
            --filter="$FILTER" file img ext4file=exportname 2> srv-ro.err
        local x
        for x in f g; do
            EXPORT=/$x /usr/bin/python3 client.py reader 9 "$sock" src/$x - ||
                { tail -5 srv-ro.err; fail "read-only reads of /$x"; }
        done
        stop_nbdkit "$sock"
        grep -q "map cut from" srv-ro.err || fail "the map was never cut back (read-only)"
        return
    fi
    # Read-only: leaves load with the index nodes above them from the
    # cache, here of one slot, so /g's index nodes evict each other
    # and /f's (a node served for the wrong block, depth or inode
    # would map blocks wrong, or fail the walk).  Every byte of both
    # files must read right, and the cache must have served some.
    local leaves
    leaves=$(debugfs -R "ex /g" img 2>/dev/null | awk '$1 == "1/" && $2 == "2"' | wc -l)
    [ "$leaves" -gt 84 ] || fail "/g's tree has $leaves leaves: one index node"
    sock=$sock.ro
    start_nbdkit "$sock" -r -v -D ext4fs.max_runs=64 -D ext4fs.icache_slots=1 \
        --filter="$FILTER" file img ext4file=exportname 2> srv-ro.err
    /usr/bin/python3 client.py reader 9 "$sock" expected - ||
        { tail -5 srv-ro.err; fail "read-only reads of /f"; }
    EXPORT=/g /usr/bin/python3 client.py reader 9 "$sock" src/g - ||
        { tail -5 srv-ro.err; fail "read-only reads of /g"; }
    stop_nbdkit "$sock"
    local hits
    hits=$(sed -n 's/.*extent index node cache: \([0-9]*\) hits.*/\1/p' srv-ro.err)
    echo "read-only: ${hits:-0} index nodes served from the cache"
    [ "${hits:-0}" -gt 0 ] || fail "the index node cache served nothing"
}

flavour "-O ^has_journal" 1
flavour "" 2            # journaled
flavour "-O ^extent,^64bit,^has_journal" 3 t
flavour "-O ^extent,^64bit" 4 t       # journaled
echo "partial maps: loaded and cut back by leaf or block of pointers, every byte right"
