#!/usr/bin/env bash
# Several files and several export names on one exportname-mode
# server (one filesystem, one inode object per file):
#  1. 4 clients at once on 4 different files: each reads its file
#     fully and verifies it, then writes random ranges (into holes and
#     over data, aligned and unaligned), reads each back, flushes and
#     reads the whole file back;
#  2. 4 clients on the SAME file through different export names
#     (/d/f, d/f, the symlink /link -> /d/f, //d//f): one writes, and
#     after each write's reply tells the readers, which must see the
#     new bytes at once (no flush in between); then the roles rotate
#     so each name is the writer once;
#  3. nbdcopy --connections=4 into one file, and back out.
# Clients connect first and then wait on a barrier file.  After the
# server stops: e2fsck and a byte comparison of every file.
source "$srcdir/functions.sh"
requires nbdsh --version
requires nbdcopy --version
requires python3 -c 'import nbd'
requires debugfs -V
cd "$tmpdir"

cat > mf.py <<'EOF'
import sys, os, pickle
import e4test as t

role, ident, sock, name, orig_path, out = sys.argv[1:7]
ident = int(ident)
orig = open(orig_path, "rb").read()
size = len(orig)
rnd = t.client_rng(ident)
bs = int(os.environ["BS"])

h = t.connect(sock, name)
if h.get_size() != size:
    t.fail("%s %d (%s): size %d, expected %d" %
           (role, ident, name, h.get_size(), size))
# A wrong byte or a timeout creates "abort", so that the others stop
# waiting.
shadow = t.Shadow(h, orig, who="%s %d (%s)" % (role, ident, name),
                  on_fail=t.abort)

def wait_for(path, what):
    t.wait_for(path, "%s %d: %s" % (role, ident, what), timeout=120,
               on_timeout=t.abort)

def check(off, n, what):
    shadow.check(off, n, what)

def check_all(what):
    shadow.check_all(what, piece=1 << 22)

t.barrier("%s.%d" % (role, ident), timeout=120)

if role == "file":
    holes = [int(x) for x in os.environ["HOLES_%d" % ident].split()]
    check_all("initial read")
    for it in range(int(os.environ["ITERS"])):
        kind = rnd.random()
        if kind < 0.35:                   # aligned, into a hole
            base = rnd.choice(holes)
            off = base + rnd.randint(0, 63) * bs
            n = rnd.randint(1, 8) * bs
        elif kind < 0.7:                  # unaligned, into a hole
            base = rnd.choice(holes)
            off = base + rnd.randint(0, 64 * bs)
            n = rnd.randint(1, 3 * bs)
        else:                             # anywhere, unaligned
            n = rnd.randint(1, 20000)
            off = rnd.randint(0, size - 1)
        n = min(n, size - off)
        shadow.randwrite(rnd, off, n)
        check(off, n, "read-back")
        if rnd.random() < 0.05:
            h.flush()
    h.flush()
    check_all("final read-back")
    shadow.save(out)

elif role == "same":
    # NW writers in turn (the writer of round r is client r); in each
    # round the writer does K writes; after each reply it publishes
    # the write as w.R.K, and every other client reads that range (and
    # a margin) at once, compares, and acknowledges with a.R.K.ID.
    nclients = int(os.environ["NCLIENTS"])
    rounds = nclients
    k_per_round = int(os.environ["ITERS"])
    hole = int(os.environ["HOLE"])
    for r in range(rounds):
        for k in range(k_per_round):
            tag = "%d.%d" % (r, k)
            if r == ident:
                c = rnd.random()
                if c < 0.4:
                    off = hole + rnd.randint(0, 255) * bs
                    n = rnd.randint(1, 4) * bs
                elif c < 0.7:
                    off = hole + rnd.randint(0, 256 * bs)
                    n = rnd.randint(1, 2 * bs)
                else:
                    n = rnd.randint(1, 10000)
                    off = rnd.randint(0, size - n)
                n = min(n, size - off)
                buf = rnd.randbytes(n)
                shadow.pwrite(buf, off)     # reply received here
                pickle.dump((off, buf), open("w.%s.tmp" % tag, "wb"))
                os.rename("w.%s.tmp" % tag, "w." + tag)
                for j in range(nclients):
                    if j != ident:
                        wait_for("a.%s.%d" % (tag, j), "ack %s from %d" % (tag, j))
            else:
                wait_for("w." + tag, "write " + tag)
                off, buf = pickle.load(open("w." + tag, "rb"))
                shadow[off:off+len(buf)] = buf
                a = max(0, off - 5000)
                b = min(size, off + len(buf) + 5000)
                check(a, b - a, "reading write %s (%d+%d) at once" %
                      (tag, off, len(buf)))
                t.touch("a.%s.%d" % (tag, ident))
        # Nobody writes in the next round before everyone has checked.
        check_all("after round %d" % r)
        t.touch("done.%d.%d" % (r, ident))
        for j in range(nclients):
            wait_for("done.%d.%d" % (r, j), "end of round %d from %d" % (r, j))
    if ident == 0:
        shadow.save(out)

h.shutdown()
EOF

# run_clients SOCK SPEC...: SPEC is ROLE:ID:NAME:ORIG:OUT.  Start them
# all, wait until all are connected, release them, wait for them.
run_clients ()
{
    local sock="$1"; shift
    local pids=() spec role id name orig out i
    rm -f go abort ready.* w.* a.* done.*
    for spec in "$@"; do
        IFS=: read role id name orig out <<< "$spec"
        python3 mf.py $role $id "$sock" "$name" "$orig" "$out" &
        pids+=($!)
    done
    local total=${#pids[@]}
    release_clients $total "${pids[@]}"
}

export SEED=$RANDOM
echo "SEED=$SEED"

for flavour in ext4 ext2-1k; do
    echo "=== $flavour"
    case $flavour in
        ext4)    mkfs=(-t ext4 -b 4096); bs=4096 ;;
        ext2-1k) mkfs=(-t ext2 -b 1024); bs=1024 ;;
    esac
    export BS=$bs
    rm -rf src img out.* exp.* copy.*
    mkdir -p src/dir/sub src/d
    # Four files with data and holes, in different directories.
    # f0: 3M+5, data 0..512K, holes after (at 1M and 2M).
    truncate -s $((3*1024*1024 + 5)) src/f0
    head -c $((512*1024)) /dev/urandom | dd of=src/f0 conv=notrunc status=none
    # f1: 2M, all hole except 64K at 1M.
    truncate -s $((2*1024*1024)) src/dir/f1
    head -c 65536 /dev/urandom |
        dd of=src/dir/f1 conv=notrunc oflag=seek_bytes seek=$((1024*1024)) status=none
    # f2: 1.5M+999 all data.
    head -c $((1536*1024 + 999)) /dev/urandom > src/dir/sub/f2
    # f3: 4M+1, data at the end only.
    truncate -s $((4*1024*1024 + 1)) src/f3
    head -c 100000 /dev/urandom |
        dd of=src/f3 conv=notrunc oflag=seek_bytes seek=$((4*1024*1024 + 1 - 100000)) status=none
    # d/f: 2M, data 0..256K, hole after; /link -> /d/f.
    truncate -s $((2*1024*1024)) src/d/f
    head -c $((256*1024)) /dev/urandom | dd of=src/d/f conv=notrunc status=none
    ln -s /d/f src/link
    # big: 24M, all hole (nbdcopy target).
    truncate -s $((24*1024*1024)) src/big
    truncate -s 160M img
    mke2fs -q -F "${mkfs[@]}" -d src img
    fsck_clean img

    sock=$tmpdir/sock-$flavour
    start_nbdkit $sock --filter="$FILTER" file img ext4file=exportname \
        2> srv.err

    # 1. Four clients on four files.  The names: with and without a
    # leading '/'.
    HOLES_0="$((1024*1024)) $((2*1024*1024))" \
    HOLES_1="0 $((1536*1024))" \
    HOLES_2="0 $((1024*1024))" \
    HOLES_3="0 $((2*1024*1024))" \
    ITERS=300 run_clients $sock \
        file:0:/f0:src/f0:out.f0 \
        file:1:dir/f1:src/dir/f1:out.f1 \
        file:2:/dir/sub/f2:src/dir/sub/f2:out.f2 \
        file:3:f3:src/f3:out.f3

    # 2. Four clients on /d/f through four names.
    NCLIENTS=4 ITERS=40 HOLE=$((512*1024)) run_clients $sock \
        same:0:/d/f:src/d/f:out.df \
        same:1:d/f:src/d/f:out.unused \
        same:2:/link:src/d/f:out.unused \
        same:3://d//f:src/d/f:out.unused

    # 3. nbdcopy --connections=4 into /big: random data with zero
    # runs (sparse source), then back out.
    truncate -s $((24*1024*1024)) copy.src
    for o in 0 3 4 5 9 10 17 23; do
        head -c $((1024*1024)) /dev/urandom |
            dd of=copy.src conv=notrunc bs=1M seek=$o status=none
    done
    head -c 12345 /dev/urandom |
        dd of=copy.src conv=notrunc oflag=seek_bytes seek=$((14*1024*1024 + 7)) status=none
    nbdcopy --connections=4 copy.src "nbd+unix:///big?socket=$sock" ||
        fail "nbdcopy into /big failed"
    nbdcopy --connections=4 "nbd+unix:///big?socket=$sock" copy.back ||
        fail "nbdcopy out of /big failed"
    cmp copy.src copy.back || fail "/big read back differs from its source"

    # The other files are untouched by all that.
    python3 - $sock <<'EOF' || fail "files changed after the nbdcopy"
import sys
import e4test as t
for name, path in (("/f0", "out.f0"), ("/dir/f1", "out.f1"),
                   ("dir/sub/f2", "out.f2"), ("/f3", "out.f3"),
                   ("/link", "out.df")):
    exp = open(path, "rb").read()
    h = t.connect(sys.argv[1], name, size=len(exp))
    t.Shadow(h, exp, who=name).check_all("after the nbdcopy")
    h.shutdown()
EOF

    kill -0 "$(cat $sock.pid)" || fail "nbdkit died"
    stop_nbdkit $sock
    grep -E 'Sanitizer|Segmentation|Aborted|error' srv.err &&
        fail "the server reported errors"
    fsck_clean img
    dump_cmp img /f0 out.f0
    dump_cmp img /dir/f1 out.f1
    dump_cmp img /dir/sub/f2 out.f2
    dump_cmp img /f3 out.f3
    dump_cmp img /d/f out.df
    dump_cmp img /big copy.src
done
echo "several files and names on one server work"
