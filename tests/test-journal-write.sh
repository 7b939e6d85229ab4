#!/usr/bin/env bash
# Journaled writes: a crash of nbdkit at any moment is repaired by an
# ordinary journal replay, with no acknowledged (flushed) write lost.
#
# Rounds of: 4 client processes write into two sparse files (holes
# filled, overwrites, unaligned writes, trims, zeroes) with flushes in
# between, each keeping a model of what it wrote and recording what
# was acknowledged by a completed flush; nbdkit is killed with SIGKILL
# at a random moment.  Then, for the killed image:
#  - it has needs_recovery (VALID_FS still set: no e2fsck forced);
#  - e2fsck -E journal_only on a copy, then e2fsck -fn: clean, and
#    every block flushed by a client holds what the client wrote (or
#    what it wrote after that flush);
#  - the kernel's replay (loop mount of a copy, root only) is clean;
#  - ext4fs reopens it read-write WITHOUT e2fsck (its own replay) and
#    the next round continues on it.
# At the end a clean stop leaves no needs_recovery, Journal start 0,
# e2fsck -p and -fn clean, and the contents of the last model.
# A break of the journal writer (no flush before the commit block, a
# commit with half a request, a freed block reused before its commit)
# shows up as an inconsistent or lost-data state here.
source "$srcdir/functions.sh"
requires nbdsh --version
requires /usr/bin/python3 -c 'import nbd'
requires debugfs -V
cd "$tmpdir"

SEED=${SEED:-$RANDOM}
ROUNDS=${ROUNDS:-6}
echo "SEED=$SEED ROUNDS=$ROUNDS"

mkdir src
truncate -s $((24 * 1024 * 1024)) src/a
truncate -s $((8 * 1024 * 1024)) src/b
head -c 300000 /dev/urandom > src/keep
truncate -s 96M img
mke2fs -q -F -t ext4 -b 4096 -J size=4 -d src img

cat > client.py <<'EOF'
import sys, random, json, hashlib
import nbd
import e4test as t

ident, sock, export, seed, out = sys.argv[1:6]
ident = int(ident)
rnd = random.Random(int(seed) * 31 + ident)
h = t.connect(sock, export)
size = h.get_size()
bs = 4096
# Two clients per file; each owns every other 64 KiB chunk.
chunks = [k for k in range(size // 65536) if k % 2 == ident % 2]
model = {}            # block -> digest of what we wrote last
durable = {}          # block -> digest as of the last completed flush
since = {}            # block -> digests issued since (may or may not be there)
t.barrier("%d" % ident)

def dig(b): return hashlib.sha1(b).hexdigest()[:16]
ZERO = dig(bytes(bs))

def intend(blk, d):
    since.setdefault(str(blk), []).append(d)
    model[str(blk)] = d

try:
    while True:
        k = rnd.choice(chunks)
        base = k * 65536
        op = rnd.random()
        nb = rnd.randint(1, 16)
        off = base + rnd.randrange(0, 16 - nb + 1) * bs
        if op < 0.55:
            buf = rnd.randbytes(nb * bs)
            for i in range(nb):
                intend(off // bs + i, dig(buf[i*bs:(i+1)*bs]))
            h.pwrite(buf, off)
        elif op < 0.70:
            # Unaligned: part of one block.
            blk = off // bs
            cur = bytearray(h.pread(bs, blk * bs))
            o = rnd.randrange(bs - 100)
            n = rnd.randint(1, bs - o)
            piece = rnd.randbytes(n)
            cur[o:o+n] = piece
            intend(blk, dig(bytes(cur)))
            h.pwrite(piece, blk * bs + o)
        elif op < 0.80:
            for i in range(nb):
                intend(off // bs + i, ZERO)
            h.trim(nb * bs, off)
        elif op < 0.88:
            for i in range(nb):
                intend(off // bs + i, ZERO)
            h.zero(nb * bs, off,
                   nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0)
        else:
            h.flush()
            durable = dict(model)
            since = {}
except nbd.Error:
    pass                        # the server was killed
json.dump({"durable": durable, "since": since}, open(out, "w"))
EOF

# check.py IMG FILE=MODEL...: every block flushed by a client holds
# what it wrote then, or something it wrote after that flush.
cat > check.py <<'EOF'
import sys, json, hashlib, subprocess
img = sys.argv[1]
bs = 4096
def dig(b): return hashlib.sha1(b).hexdigest()[:16]
bad = checked = 0
for arg in sys.argv[2:]:
    name, m = arg.split("=")
    data = subprocess.run(["debugfs", "-R", "cat " + name, img],
                          capture_output=True).stdout
    d = json.load(open(m))
    for blk, want in d["durable"].items():
        ok = {want} | set(d["since"].get(blk, []))
        b = int(blk)
        got = dig(data[b*bs:(b+1)*bs].ljust(bs, b"\0"))
        checked += 1
        if got not in ok:
            bad += 1
            if bad < 5:
                print("%s block %d: got %s, want one of %s (%s)" %
                      (name, b, got, sorted(ok), m))
print("%d flushed blocks checked, %d wrong" % (checked, bad))
sys.exit(1 if bad else 0)
EOF

kernel_ok=
if [ "$(id -u)" = 0 ] && losetup -f >/dev/null 2>&1 && command -v mount >/dev/null; then
    kernel_ok=1
fi
mnt=$tmpdir/mnt
mkdir -p "$mnt"
cleanup_fn "umount -l $mnt 2>/dev/null"

sock=$tmpdir/sock
RANDOM=$SEED
for ((round = 1; round <= ROUNDS; round++)); do
    rm -f ready.* go "$sock" "$sock.pid"
    start_nbdkit "$sock" --filter="$FILTER" file img ext4file=exportname
    pids=()
    for i in 0 1 2 3; do
        exp=/a; [ "$i" -ge 2 ] && exp=/b
        /usr/bin/python3 client.py "$i" "$sock" "$exp" "$((SEED + round))" \
            "model.$round.$i" &
        pids+=($!)
    done
    for ((w = 0; w < 300; w++)); do
        [ "$(ls ready.* 2>/dev/null | wc -l)" = 4 ] && break
        sleep 0.05
    done
    touch go
    sleep "$(( (RANDOM % 20) + 5 ))e-1"     # 0.5 .. 2.4 s of writing
    kill -9 "$(cat "$sock.pid")"
    for p in "${pids[@]}"; do wait "$p" || :; done
    sleep 0.2

    dumpe2fs -h img > dumpe2fs.out 2>/dev/null
    grep -q '^Filesystem features:.*needs_recovery' dumpe2fs.out ||
        fail "round $round: the killed image does not need recovery"
    grep -q '^Filesystem state: *clean' dumpe2fs.out ||
        fail "round $round: VALID_FS was cleared: $(grep '^Filesystem state' dumpe2fs.out)"
    cp img replayed
    e2fsck -E journal_only -y replayed > fsck.out 2>&1 ||
        { cat fsck.out; fail "round $round: e2fsck could not replay the journal"; }
    e2fsck -fn replayed > fsck.out 2>&1 ||
        { cat fsck.out; fail "round $round: inconsistent after e2fsck's replay (SEED=$SEED)"; }
    # Models: clients 0, 1 write /a; 2, 3 write /b.
    /usr/bin/python3 check.py replayed /a=model.$round.0 /a=model.$round.1 \
        /b=model.$round.2 /b=model.$round.3 ||
        fail "round $round: flushed data lost after e2fsck's replay (SEED=$SEED)"
    if [ -n "$kernel_ok" ]; then
        cp img kernel
        if mount -o loop kernel "$mnt" 2>mount.err; then
            umount "$mnt"
            e2fsck -fn kernel > fsck.out 2>&1 ||
                { cat fsck.out; fail "round $round: inconsistent after the kernel's replay"; }
        else
            fail "round $round: the kernel refused our journal: $(cat mount.err)"
        fi
    fi
    echo "round $round: ok ($(grep -c . fsck.out) lines of e2fsck, clean)"
done

# Our own replay, and a clean stop.  (The log may be empty if the last
# kill came before any commit since the last checkpoint: then there is
# nothing to replay, only the flag to clear.)
logged=1
dumpe2fs -h img 2>/dev/null | grep -q '^Journal start: *0$' && logged=
nbdkit_srv -U - --filter="$FILTER" file img ext4file=/a \
    --run 'nbdcopy "$uri" a.out' 2> last.err ||
    { cat last.err; fail "read-write reopen of the killed image failed"; }
if [ -n "$logged" ]; then
    grep -q 'replayed .* into the image' last.err ||
        fail "the last reopen did not replay: $(cat last.err)"
fi
dumpe2fs -h img > dumpe2fs.out 2>/dev/null
grep -q '^Filesystem features:.*needs_recovery' dumpe2fs.out &&
    fail "needs_recovery set after a clean stop"
grep -q '^Journal start: *0$' dumpe2fs.out || fail "journal not empty after a clean stop"
fsck_clean img
cp img copy
e2fsck -p copy > fsck.out 2>&1 || { cat fsck.out; fail "e2fsck -p after a clean stop"; }
dump_cmp img /keep src/keep
/usr/bin/python3 check.py img /a=model.$ROUNDS.0 /a=model.$ROUNDS.1 \
    /b=model.$ROUNDS.2 /b=model.$ROUNDS.3 ||
    fail "flushed data lost after our own replay"
echo "ok"
