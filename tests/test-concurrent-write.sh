#!/usr/bin/env bash
# Concurrent clients on one server (separate connections, multi-conn):
#  1. 4 clients write disjoint, interleaved chunks of one file (holes
#     and data), each verifying by reading back;
#  2. 8 clients hammer the same few blocks (holes and data), each
#     writing only bytes it owns (3-byte cells interleaved between the
#     writers, and unaligned sub-ranges inside the same 4K blocks), so
#     the final content is deterministic and a lost update shows up;
#  3. writers fill holes while readers read the same range: readers
#     must only ever see zeros or the written data, and once they have
#     seen data at a byte they must never see a zero there again.
# All clients connect first and then wait on a barrier file so they
# really run at the same time.  Then e2fsck and a byte comparison.
source "$srcdir/functions.sh"
requires nbdsh --version
requires python3 -c 'import nbd'
requires debugfs -V
cd "$tmpdir"

cat > conc.py <<'EOF'
import sys, os
import e4test as t

role, ident, sock, orig_path, out = sys.argv[1:6]
ident = int(ident)
orig = open(orig_path, "rb").read()
size = len(orig)
rnd = t.client_rng(ident)

h = t.connect(sock, size=size)
t.barrier("%s.%d" % (role, ident))

model = t.Shadow(h, orig, who="%s %d" % (role, ident))
owned = []                      # [(off, len)] owned by this client

def write(off, n):
    model.randwrite(rnd, off, n)

if role == "disjoint":
    # Chunks of 65537 bytes, owner = chunk index % NCLIENTS.
    nclients = int(os.environ["NCLIENTS"])
    chunk = 65537
    chunks = [k for k in range((size + chunk - 1) // chunk)
              if k % nclients == ident]
    for k in chunks:
        owned.append((k * chunk, min(chunk, size - k * chunk)))
    rnd.shuffle(owned)
    for off, n in owned:
        p = off
        while p < off + n:
            m = min(rnd.randint(1, 20000), off + n - p)
            write(p, m)
            model.check(p, m, "read-back")
            p += m
    for off, n in owned:
        model.check(off, n, "final read-back")

elif role == "hammer":
    # Region A (3-byte cells, cell c owned by c % 8) at each base in
    # CELL_BASES, 32K long; region B (in each 4K block, writer i owns
    # [b*4096 + 100 + i*500, +500), crossing blocks) at each base in
    # SUB_BASES, 32K long.
    nw = 8
    cell_bases = [int(x) for x in os.environ["CELL_BASES"].split()]
    sub_bases = [int(x) for x in os.environ["SUB_BASES"].split()]
    cells = []
    for base in cell_bases:
        for c in range(ident, 32768 // 3, nw):
            cells.append((base + 3 * c, 3))
    subs = []
    for base in sub_bases:
        for b in range(8):
            subs.append((base + b * 4096 + 100 + ident * 500, 500))
    owned = cells + subs
    for it in range(int(os.environ["ITERS"])):
        if rnd.random() < 0.6:
            off, n = rnd.choice(cells)
            write(off, n)
        else:
            off, n = rnd.choice(subs)
            a = rnd.randint(0, n - 1)
            m = rnd.randint(1, n - a)
            write(off + a, m)
            off, n = off + a, m
        model.check(off, n, "read-back")
    for off, n in owned:
        model.check(off, n, "final read-back")

elif role in ("holewriter", "holereader"):
    # The pattern: seeded random bytes, never zero.
    pat = t.pattern(4242, size, zero_as=b"\1")
    if role == "holewriter":
        nwriters = int(os.environ["NWRITERS"])
        chunk = 7777
        for k in range(ident, (size + chunk - 1) // chunk, nwriters):
            owned.append((k * chunk, min(chunk, size - k * chunk)))
        rnd.shuffle(owned)
        for off, n in owned:
            p = off
            while p < off + n:
                m = min(rnd.randint(1, 5000), off + n - p)
                model.pwrite(pat[p:p+m], p)
                p += m
        for off, n in owned:
            model.check(off, n, "final read-back")
    else:
        seen = bytearray(size)
        zeros = bytes(65536)
        reads = 0
        while True:
            # The writers are done when they have all left a result.
            done = all(os.path.exists("out.holewriter.%d" % i)
                       for i in range(int(os.environ["NWRITERS"])))
            n = rnd.randint(1, 65536)
            off = rnd.randint(0, size - n)
            got = h.pread(n, off)
            reads += 1
            if got == pat[off:off+n]:
                seen[off:off+n] = b"\1" * n
            elif got == zeros[:n] and seen[off:off+n] == zeros[:n]:
                pass
            else:
                for s0 in range(0, n, 256):
                    s1 = min(n, s0 + 256)
                    a, b = off + s0, off + s1
                    if got[s0:s1] == pat[a:b]:
                        seen[a:b] = b"\1" * (b - a)
                        continue
                    if got[s0:s1] == zeros[:b-a] and seen[a:b] == zeros[:b-a]:
                        continue
                    for i in range(s0, s1):
                        g = got[i]
                        if g == pat[off+i]:
                            seen[off+i] = 1
                        elif g == 0 and not seen[off+i]:
                            pass
                        else:
                            t.fail("reader %d: byte %d is %d (pattern %d, "
                                   "seen data before: %d)" %
                                   (ident, off + i, g, pat[off+i], seen[off+i]))
            if done:
                break
        # After the writers: everything is written.
        got = h.pread(size, 0)
        if got != pat:
            t.fail("reader %d: final content differs" % ident)
        print("reader %d: %d reads" % (ident, reads))

h.flush()
h.shutdown()
# The final content of the bytes this client owns (for merge).
model.save_owned(out, owned)
EOF

# run_clients SOCK ROLE:N[:ORIG] ...: start the clients, wait for them
# all to connect, release them together, wait for them all.
run_clients ()
{
    local sock="$1"; shift
    local pids=() spec role n i
    rm -f go ready.*
    local total=0
    for spec in "$@"; do
        IFS=: read role n orig <<< "$spec"
        for ((i=0; i<n; i++)); do
            python3 conc.py $role $i "$sock" "$orig" out.$role.$i &
            pids+=($!)
            total=$((total+1))
        done
    done
    release_clients $total "${pids[@]}"
}

export SEED=$RANDOM
echo "SEED=$SEED"

for flavour in ext4 ext2-1k; do
    echo "=== $flavour"
    case $flavour in
        ext4)    mkfs=(-t ext4 -b 4096) ;;
        ext2-1k) mkfs=(-t ext2 -b 1024) ;;
    esac
    rm -rf src img out.* exp-*
    mkdir src
    # /p: 16M+123, data in the first 1M and at 8M..9M, holes elsewhere.
    truncate -s $((16*1024*1024 + 123)) src/p
    head -c $((1024*1024)) /dev/urandom | dd of=src/p conv=notrunc status=none
    head -c $((1024*1024)) /dev/urandom |
        dd of=src/p conv=notrunc oflag=seek_bytes seek=$((8*1024*1024)) status=none
    # /s: 1M, data in 64K..128K, holes elsewhere.
    truncate -s $((1024*1024)) src/s
    head -c 65536 /dev/urandom |
        dd of=src/s conv=notrunc oflag=seek_bytes seek=65536 status=none
    # /r: 8M+5, all hole.
    truncate -s $((8*1024*1024 + 5)) src/r
    truncate -s 128M img
    mke2fs -q -F "${mkfs[@]}" -d src img

    # 1. 4 clients, disjoint interleaved chunks.
    sock=$tmpdir/sock-$flavour-p
    start_nbdkit $sock --filter="$FILTER" file img ext4file=/p
    NCLIENTS=4 run_clients $sock disjoint:4:src/p
    stop_nbdkit $sock
    fsck_clean img
    python3 -m e4test merge src/p exp-p out.disjoint.*
    dump_cmp img /p exp-p

    # 2. 8 writers hammering the same blocks: region A in holes (0 and
    # 512K) and in data (64K); region B in data (96K) and holes (256K).
    sock=$tmpdir/sock-$flavour-s
    start_nbdkit $sock --filter="$FILTER" file img ext4file=/s
    CELL_BASES="0 524288 65536" SUB_BASES="98304 262144" ITERS=1500 \
        run_clients $sock hammer:8:src/s
    stop_nbdkit $sock
    fsck_clean img
    python3 -m e4test merge src/s exp-s out.hammer.*
    dump_cmp img /s exp-s

    # 3. Hole writers racing readers.
    sock=$tmpdir/sock-$flavour-r
    start_nbdkit $sock --filter="$FILTER" file img ext4file=/r
    NWRITERS=2 run_clients $sock holewriter:2:src/r holereader:4:src/r
    stop_nbdkit $sock
    fsck_clean img
    python3 -m e4test merge src/r exp-r out.holewriter.*
    dump_cmp img /r exp-r
done
