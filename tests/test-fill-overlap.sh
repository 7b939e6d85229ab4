#!/usr/bin/env bash
# Allocating writes to one file overlap (DESIGN.md §6, "filling a
# hole"): a write whose blocks are all a hole allocates them under the
# inode lock (shared where the map covers them: some must), writes its
# data without it, and inserts the extents under it exclusive.  With every plugin write slowed down (the delay filter
# below ext4fs), 6 client processes fill holes of one file:
#  - whole blocks that only one client writes (4 KiB and 12 KiB
#    requests, 4 at a time per client), so fills really overlap: the
#    server must report more than one fill at a time;
#  - pieces of shared blocks (each client owns 600 unaligned bytes in
#    each of 16 blocks), so a request often finds its block being
#    filled by another and must wait for it (without the wait the
#    block would be allocated twice and a client's bytes lost);
# every client reads back what it wrote, then flushes.  Then (after a
# journal replay on a copy, if one is pending) e2fsck -fn and a byte
# comparison of the file.  The same with -D ext4fs.serial_fill=1 (the
# old path: never more than one fill at a time, same content).  And
# fills into the holes between 1024 one-block extents, with the map
# limited to 64 runs and random reads in between: the partial map is
# cut back (and loaded again) between the two halves of fills, whose
# changes then lie outside it; the blocks with data must read
# unchanged throughout.
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
requires nbdkit --filter=delay null --dump-plugin
cd "$tmpdir"
bad () { fail "$@"; }
export SEED=$RANDOM
echo "SEED=$SEED"

cat > fill.py <<'EOF'
import sys
import e4test as t

ident, sock, orig_path, out, mode = (int(sys.argv[1]), sys.argv[2],
                                     sys.argv[3], sys.argv[4], sys.argv[5])
NCLIENTS, BS = 6, 4096
SHARED = 16 << 20               # the shared blocks start here
orig = open(orig_path, "rb").read()
size = len(orig)
rnd = t.client_rng(ident)

h = t.connect(sock, size=size)
t.barrier("fill.%d" % ident)
model = t.Shadow(h, orig, who="client %d" % ident)

if mode == "holes":
    # Whole blocks: units of 3 blocks in [0, 8 MiB); unit k is this
    # client's if k % NCLIENTS == ident.  Written as 1 request of 12 KiB
    # or 3 of 4 KiB.
    units = [k for k in range((8 << 20) // (3 * BS)) if k % NCLIENTS == ident]
    rnd.shuffle(units)
    units = units[:12]
    reqs = []
    for k in units:
        off = k * 3 * BS
        if rnd.random() < 0.5:
            reqs.append((off, 3 * BS))
        else:
            reqs += [(off + i * BS, BS) for i in range(3)]
    owned = [(k * 3 * BS, 3 * BS) for k in units]
else:
    # "frag": the odd blocks of a file whose even blocks hold data (one
    # extent each); block 2j+1 is this client's if j % NCLIENTS == ident.
    blocks = [2 * j + 1 for j in range(size // BS // 2) if j % NCLIENTS == ident]
    rnd.shuffle(blocks)
    blocks = blocks[:40]
    reqs = [(b * BS, BS) for b in blocks]
    owned = list(reqs)
rnd.shuffle(reqs)
# Up to 4 requests in flight; for "frag", a read of a random 64 KiB
# between them (the partial map loads other leaves and is cut back).
pending = []
for off, n in reqs:
    buf = rnd.randbytes(n)
    pending.append(h.aio_pwrite(buf, off))
    model[off:off + n] = buf
    if mode == "frag":
        # The even blocks are never written: they must read as before.
        r = rnd.randrange(0, size - 65536, 2 * BS)
        got = h.pread(65536, r)
        for i in range(0, 65536, 2 * BS):
            if got[i:i + BS] != orig[r + i:r + i + BS]:
                t.fail("client %d: block %d reads wrong" % (ident, (r + i) // BS))
    while h.aio_in_flight() >= 4:
        h.poll(-1)
    for c in list(pending):
        if h.aio_command_completed(c):   # raises on error
            pending.remove(c)
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in pending:
    h.aio_command_completed(c)

if mode == "holes":
    # Shared blocks: block b of 16, bytes [b*BS + 100 + ident*600, +600).
    subs = [(SHARED + b * BS + 100 + ident * 600, 600) for b in range(16)]
    rnd.shuffle(subs)
    for off, n in subs:
        model.randwrite(rnd, off, n)
    owned += subs

for off, n in owned:
    model.check(off, n, "read-back")
h.flush()
h.shutdown()
model.save_owned(out, owned)
EOF

rm -rf src
mkdir src
truncate -s 24M src/f src/g
# /h: 8 MiB, data in every even 4 KiB block (1024 extents).
python3 -c '
import os, random
r = random.Random(7)
with open("src/h", "wb") as f:
    f.truncate(8 << 20)
    for b in range(0, 2048, 2):
        f.seek(b * 4096)
        f.write(r.randbytes(4096))
'
truncate -s 128M img
mke2fs -q -F -t ext4 -b 4096 -d src img

for file in f g h; do
    extra=() mode=holes
    [ $file = g ] && extra=(-D ext4fs.serial_fill=1)
    # /h: a map of at most 64 runs (cut back all the time).
    [ $file = h ] && { extra=(-D ext4fs.max_runs=64); mode=frag; }
    sock=$tmpdir/srv-$file.sock
    rm -f out.* ready.* go
    srv_start srv-$file -v "${extra[@]}" --filter="$FILTER" --filter=delay \
        file img delay-write=10ms ext4file=/$file
    pids=()
    for ((i=0; i<6; i++)); do
        python3 fill.py $i "$sock" src/$file out.$i $mode &
        pids+=($!)
    done
    release_clients 6 "${pids[@]}"
    srv_stop srv-$file
    most=$(sed -n 's/.*up to \([0-9]*\) allocating writes filled holes at once.*/\1/p' srv-$file.err)
    echo "/$file: up to ${most:-1} fills at once"
    # Fills into holes the map covers allocate under the shared inode
    # lock (the first, which loads the map, and any after a cut-back
    # do not).
    shared=$(sed -n 's/.*: \([0-9]*\) of \([0-9]*\) fills allocated under the shared.*/\1/p' srv-$file.err)
    echo "/$file: ${shared:-0} fills allocated under the shared lock"
    [ $file = g ] || [ "${shared:-0}" -ge 1 ] ||
        fail "/$file: no fill allocated under the shared inode lock"
    case $file in
        f|h) [ "${most:-1}" -ge 2 ] ||
                 fail "/$file: allocating writes did not overlap" ;;
        g) [ -z "$most" ] || fail "/g: serial_fill, yet $most fills at once" ;;
    esac
    if [ $file = h ]; then
        grep -q "map cut from" srv-h.err || fail "/h: the map was never cut back"
    fi
    # The delay filter fails the writes of the last commit at shutdown
    # (its sleeps end when the server does): then the image needs
    # recovery, and the clients' flushes made everything durable.
    replay_copy img
    fsck_clean img.chk
    python3 -m e4test merge src/$file exp-$file out.*
    dump_cmp img.chk /$file exp-$file
    cp --sparse=always img.chk img
done
