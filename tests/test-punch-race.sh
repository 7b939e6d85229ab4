#!/usr/bin/env bash
# Punch races block reuse.  One server (ext4file=exportname, with the
# delay filter below ours so that requests overlap) and two files on a
# nearly full filesystem: /a (data) and /b (all hole, the same size).
#  - connection 1 repeatedly trims, zeroes (MAY_TRIM) and rewrites a
#    range of /a;
#  - connections 2 and 3 read and write the same range of /a: every
#    byte they read must be the old content, zero or the new pattern
#    (the only bytes anyone ever writes there), never a foreign byte;
#  - connection 4 fills /b with its own pattern.  The filesystem has
#    less free space than /b needs, so /b can only be completed with
#    blocks freed from /a: if a block were freed while a write to /a
#    was still going to it, /a's bytes would land in /b.
# After the race connection 1 trims the whole range and writes a final
# pattern over part of it (deterministic final state), connection 4
# finishes /b; then e2fsck and a byte comparison of both files.
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
requires nbdkit --filter=delay null --dump-plugin
cd "$tmpdir"

RACE_SECS=${RACE_SECS:-12}

cat > race.py <<'EOF'
import sys, os, time, errno
import nbd
import e4test as t

role, ident, sock = sys.argv[1], int(sys.argv[2]), sys.argv[3]
R0, R1 = int(os.environ["R0"]), int(os.environ["R1"])   # race range of /a
bs = int(os.environ["BS"])
race_secs = float(os.environ["RACE_SECS"])
rnd = t.client_rng(ident, scale=10)

old = open("src/a", "rb").read()
size = len(old)
def pattern(seed, n):
    return t.pattern(seed, n, zero_as=b"\x5a")
new = pattern(1111, size)
bpat = pattern(2222, size)
final = pattern(3333, size)

h = t.connect(sock, "/b" if role == "bfill" else "/a", size=size)
t.barrier("%s.%d" % (role, ident))
start = time.time()
def racing():
    return time.time() - start < race_secs

def enospc(e):
    return t.is_errno(e, errno.ENOSPC)

def rand_range(maxlen):
    n = rnd.randint(1, maxlen)
    if rnd.random() < 0.5:          # block aligned
        n = max(bs, n // bs * bs)
        o = rnd.randrange(R0, R1 - n + 1, bs)
    else:
        o = rnd.randint(R0, R1 - n)
    return o, n

def check_a(o, got, what):
    for i in range(0, len(got), 512):
        g = got[i:i+512]
        a, b = o + i, o + i + len(g)
        if g == old[a:b] or g == new[a:b] or g == bytes(len(g)):
            continue
        for j in range(len(g)):
            x = g[j]; k = a + j
            if x != old[k] and x != new[k] and x != 0:
                t.fail("%s %d: /a byte %d is 0x%02x (old 0x%02x, new 0x%02x, "
                       "/b pattern 0x%02x): %s" %
                       (role, ident, k, x, old[k], new[k], bpat[k], what))

stats = {"ops": 0, "enospc": 0}
if role == "puncher":
    while racing():
        o, n = rand_range(256 * 1024)
        r = rnd.random()
        try:
            if r < 0.35:
                h.trim(n, o)
            elif r < 0.55:
                h.zero(n, o)
            elif r < 0.9:
                h.pwrite(new[o:o+n], o)
            else:
                h.flush()
        except nbd.Error as e:
            if not enospc(e):
                raise
            stats["enospc"] += 1
        stats["ops"] += 1
    # Deterministic end: once the readers/writers have stopped, punch
    # the whole range, then (once /b is done) write the final pattern
    # over its first quarter.
    t.wait_for(["rwdone.1", "rwdone.2"], "puncher: the rw clients to stop",
               timeout=60, poll=0.01)
    h.trim(R1 - R0, R0)
    h.flush()
    got = h.pread(R1 - R0, R0)
    if got != bytes(R1 - R0):
        bad = [R0 + i for i in range(0, R1 - R0, bs)
               if got[i:i+bs] != bytes(bs)]
        k = bad[0] - R0
        what = ("old" if got[k:k+bs] == old[bad[0]:bad[0]+bs] else
                "new" if got[k:k+bs] == new[bad[0]:bad[0]+bs] else "other")
        t.fail("puncher: race range not zero after the final trim: "
               "%d blocks, first at %d (%s)" % (len(bad), bad[0], what))
    open("trimmed", "w").close()
    t.wait_for("bdone", "puncher: /b to finish", timeout=120, poll=0.05)
    q = (R1 - R0) // 4
    h.pwrite(final[R0:R0+q], R0)
    h.flush()
    got = h.pread(size, 0)
    exp = old[:R0] + final[R0:R0+q] + bytes(R1 - R0 - q) + old[R1:]
    if got != exp:
        t.fail("puncher: final /a content differs")
    open("exp-a", "wb").write(exp)

elif role == "rw":
    while racing():
        o, n = rand_range(128 * 1024)
        if rnd.random() < 0.6:
            check_a(o, h.pread(n, o), "read %d+%d" % (o, n))
        else:
            src = new if rnd.random() < 0.5 else old
            try:
                h.pwrite(src[o:o+n], o)
            except nbd.Error as e:
                if not enospc(e):
                    raise
                stats["enospc"] += 1
        stats["ops"] += 1
    open("rwdone.%d" % ident, "w").close()
    check_a(R0, h.pread(R1 - R0, R0), "last read")

elif role == "bfill":
    # Fill /b in random-sized pieces in random order, retrying on
    # ENOSPC (space comes back whenever /a is punched).  Re-read each
    # piece once it is written.
    pieces = []
    p = 0
    while p < size:
        n = min(size - p, rnd.randint(1, 96 * 1024))
        pieces.append((p, n)); p += n
    rnd.shuffle(pieces)
    deadline = time.time() + race_secs + 60
    while pieces:
        o, n = pieces.pop()
        try:
            h.pwrite(bpat[o:o+n], o)
        except nbd.Error as e:
            if not enospc(e):
                raise
            stats["enospc"] += 1
            if time.time() > deadline:
                t.fail("bfill: could not complete /b")
            pieces.insert(0, (o, n))
            time.sleep(0.002)
            continue
        got = h.pread(n, o)
        if got != bpat[o:o+n]:
            t.fail("bfill: /b %d+%d differs right after writing it" % (o, n))
        stats["ops"] += 1
    h.flush()
    got = h.pread(size, 0)
    if got != bpat:
        i = next(i for i in range(size) if got[i] != bpat[i])
        t.fail("bfill: /b differs at byte %d (0x%02x, expected 0x%02x; "
               "/a old 0x%02x new 0x%02x)" % (i, got[i], bpat[i], old[i], new[i]))
    open("exp-b", "wb").write(bpat)
    open("bdone", "w").close()

print("%s %d: %r" % (role, ident, stats))
h.shutdown()
EOF

export SEED=${SEED:-$RANDOM}
echo "SEED=$SEED"

run_clients ()
{
    local sock="$1" pids=() i total=0 spec role n
    rm -f go ready.* rwdone.* trimmed bdone exp-a exp-b
    for spec in puncher:1 rw:2 bfill:1; do
        IFS=: read role n <<< "$spec"
        for ((i=0; i<n; i++)); do
            python3 race.py $role $total "$sock" &
            pids+=($!)
            total=$((total+1))
        done
    done
    release_clients $total "${pids[@]}"
}

for flavour in ${FLAVOURS:-ext4 ext2-1k}; do
    echo "=== $flavour"
    # 1K-block indirect files do one request per block below us: a
    # shorter delay keeps the number of racing operations up.
    case $flavour in
        ext4)    mkfs=(-t ext4 -b 4096 -m 0); bs=4096; delay=5ms ;;
        ext2-1k) mkfs=(-t ext2 -b 1024 -m 0); bs=1024; delay=1ms ;;
    esac
    # /a: 3 MiB of data, race range [512K, 2.5M); /b: 3 MiB of hole.
    asize=$((3*1024*1024))
    export R0=$((512*1024)) R1=$((2560*1024)) BS=$bs RACE_SECS
    rm -rf src img
    mkdir src
    head -c $asize /dev/urandom > src/a
    truncate -s $asize src/b
    # A filler file leaves free space for only part of /b (2 of its 3
    # MiB, counting indirect blocks), so /b needs blocks freed from /a.
    filler=$((8*1024*1024))
    for pass in 1 2 3; do
        truncate -s 24M img
        head -c $filler /dev/zero | tr '\0' 'f' > src/filler
        mke2fs -q -F "${mkfs[@]}" -d src img
        free=$(dumpe2fs -h img 2>/dev/null | awk '/^Free blocks:/{print $3}')
        target=$(( (2*1024*1024) / bs ))
        filler=$(( filler + (free - target) * bs ))
    done
    free=$(dumpe2fs -h img 2>/dev/null | awk '/^Free blocks:/{print $3}')
    echo "free: $((free * bs / 1024)) KiB"
    # The free space must not hold /b and must hold /b once the race
    # range of /a is punched (plus room for the final pattern).
    [ $((free * bs)) -lt $asize ] || fail "setup: too much free space"
    [ $((free * bs + R1 - R0)) -gt $((asize + (R1 - R0) / 4 + 200*1024)) ] ||
        fail "setup: too little free space"
    fsck_clean img

    sock=$tmpdir/sock-$flavour
    start_nbdkit "$sock" --filter="$FILTER" --filter=delay file img \
        ext4file=exportname delay-read=$delay delay-write=$delay
    run_clients "$sock"
    stop_nbdkit "$sock"
    [ -f exp-a ] && [ -f exp-b ] || fail "clients left no result"
    # The delay filter refuses I/O while nbdkit shuts down, so the last
    # checkpoint may not happen: then the image needs recovery, and an
    # ordinary replay must give the final state.
    if dumpe2fs -h img 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery'; then
        echo "note: the image needs recovery after the shutdown; replaying"
        e2fsck -E journal_only -y img > fsck.out 2>&1 ||
            { cat fsck.out; fail "journal replay failed"; }
    fi
    fsck_clean img
    dump_cmp img /a exp-a
    dump_cmp img /b exp-b
    rm -f src/filler
done
echo "OK"
