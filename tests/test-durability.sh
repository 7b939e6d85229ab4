#!/usr/bin/env bash
# Durability and error paths:
#  1. writes into holes + flush, and FUA writes, then kill -9 of the
#     server (client still connected): the data is in the image (after
#     a journal replay on ext4) and e2fsck is clean;
#  2. SIGTERM while a client is connected and writing: e2fsck is
#     clean and every write that was replied is in the image;
#  3. ENOSPC: on a small filesystem, writing a large sparse file
#     beyond the free space fails with ENOSPC, earlier data stays
#     intact, writes over allocated blocks still work, e2fsck clean.
source "$srcdir/functions.sh"
requires nbdsh --version
requires python3 -c 'import nbd'
requires debugfs -V
cd "$tmpdir"

cat > client.py <<'EOF'
import sys, os, errno
import nbd
import e4test as t

mode, sock, exp_path = sys.argv[1:4]
exp = bytearray(open(exp_path, "rb").read())
size = len(exp)
rnd = t.client_rng(scale=1)
h = t.connect(sock, size=size)

def is_enospc(e):
    return t.is_errno(e, errno.ENOSPC)

def wait_for(name):
    t.wait_for(name, timeout=60, poll=0.01)

if mode == "kill9":
    # Flushed writes into holes (and over data).
    for off, n in ((0, 1), (4093, 3), (5000, 70000), (1024*1024 - 7, 20000),
                   (3*1024*1024 + 1, 1024*1024), (size - 5, 5)):
        buf = rnd.randbytes(n)
        h.pwrite(buf, off)
        exp[off:off+n] = buf
    h.flush()
    # FUA writes into holes, no flush after them.
    for off, n in ((6*1024*1024 + 3, 4096), (7*1024*1024 - 100, 300000),
                   (9*1024*1024, 1)):
        buf = rnd.randbytes(n)
        h.pwrite(buf, off, nbd.CMD_FLAG_FUA)
        exp[off:off+n] = buf
    open(exp_path, "wb").write(exp)
    # Stay connected while the server is killed.
    open("written", "w").close()
    wait_for("killed")

elif mode == "term":
    # Non-overlapping writes into holes, logged once replied.
    log = open("replied.log", "w")
    n = 0
    k = 0
    try:
        while True:
            off = k * 33333 + 17
            k += 1
            if off + 20000 > size:
                k = 0
                break
            buf = rnd.randbytes(20000)
            open("inflight", "w").write("%d %d\n" % (off, len(buf)))
            h.pwrite(buf, off)
            exp[off:off+len(buf)] = buf
            log.write("%d\n" % off); log.flush()
            n += 1
            if n == 20:
                open("progress", "w").close()
    except nbd.Error as e:
        print("client: write failed as expected after %d writes: %s" % (n, e))
    else:
        sys.exit("client: the server was never stopped")
    open(exp_path, "wb").write(exp)

elif mode == "enospc":
    off = 1024*1024
    ok = 0
    failed = None
    while off < size:
        buf = rnd.randbytes(256*1024 + 1)
        n = min(len(buf), size - off)
        try:
            h.pwrite(buf[:n], off)
        except nbd.Error as e:
            if not is_enospc(e):
                sys.exit("expected ENOSPC, got %r (errno %s)" % (e, e.errno))
            failed = (off, n, buf[:n])
            break
        exp[off:off+n] = buf[:n]
        ok += 1
        off += 300000
    if failed is None:
        sys.exit("never got ENOSPC")
    print("client: ENOSPC after %d writes of 256K" % ok)
    # A one-byte write into a hole far away also fails with ENOSPC.
    try:
        h.pwrite(b"x", size - 1)
    except nbd.Error as e:
        if not is_enospc(e):
            sys.exit("1-byte write: expected ENOSPC, got %r" % e)
    else:
        exp[size-1:size] = b"x"
        print("client: note: 1-byte write at the end succeeded")
    # Writes over allocated blocks still work.
    for off, n in ((3, 5000), (1024*1024 + 10, 100000)):
        buf = rnd.randbytes(n)
        h.pwrite(buf, off)
        exp[off:off+n] = buf
    h.flush()
    # Everything written before is intact (the failed range may hold
    # zeros or the new data, block by block: 1K granularity).
    off, n, buf = failed
    got = h.pread(size, 0)
    for i in range(0, size, 1024 * 1024):
        j = min(size, i + 1024 * 1024)
        a, b = max(i, off), min(j, off + n)
        if a < b:
            p = a
            while p < b:
                q = min(b, (p // 1024 + 1) * 1024)
                seg = got[p:q]
                if seg != bytes(q - p) and seg != buf[p-off:q-off]:
                    sys.exit("failed write range: bytes %d..%d are neither "
                             "zero nor the new data" % (p, q))
                p = q
            exp[a:b] = got[a:b]
        if got[i:j] != exp[i:j]:
            for x in range(i, j):
                if got[x] != exp[x]:
                    sys.exit("byte %d is %d, expected %d" % (x, got[x], exp[x]))
    open(exp_path, "wb").write(exp)
EOF

export SEED=$RANDOM
echo "SEED=$SEED"

# 1. flush/FUA then kill -9.
for flavour in ext4 ext2-1k; do
    echo "=== kill -9, $flavour"
    case $flavour in
        ext4)    mkfs=(-t ext4 -b 4096) ;;
        ext2-1k) mkfs=(-t ext2 -b 1024) ;;
    esac
    rm -rf src img written killed
    mkdir src
    truncate -s $((10*1024*1024 + 3)) src/f
    head -c 100000 /dev/urandom | dd of=src/f conv=notrunc status=none
    truncate -s 64M img
    mke2fs -q -F "${mkfs[@]}" -d src img
    cp src/f exp-f
    sock=$tmpdir/sock-kill-$flavour
    start_nbdkit $sock --filter="$FILTER" file img ext4file=/f
    python3 client.py kill9 $sock exp-f &
    cpid=$!
    for ((i=0; i<600; i++)); do [ -f written ] && break; sleep 0.1; done
    [ -f written ] || fail "client did not write"
    pid=$(cat $sock.pid)
    kill -9 $pid
    wait_gone $pid || fail "nbdkit $pid did not exit after kill -9"
    touch killed
    wait $cpid || fail "client failed"
    if [ $flavour = ext4 ]; then
        # Journaled: the flushed and FUA changes may be only in the
        # log; an ordinary replay brings them home (no full e2fsck).
        dumpe2fs -h img 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' ||
            fail "kill -9, ext4: the image does not need recovery"
        e2fsck -E journal_only -y img > fsck.out 2>&1 ||
            { cat fsck.out; fail "kill -9, ext4: journal replay failed"; }
    fi
    fsck_clean img
    dump_cmp img /f exp-f
done

# 2. SIGTERM while a client is connected and writing.
for flavour in ext4 ext2-1k; do
    echo "=== SIGTERM, $flavour"
    case $flavour in
        ext4)    mkfs=(-t ext4 -b 4096) ;;
        ext2-1k) mkfs=(-t ext2 -b 1024) ;;
    esac
    rm -rf src img progress replied.log inflight
    mkdir src
    truncate -s $((64*1024*1024)) src/f
    head -c 100000 /dev/urandom | dd of=src/f conv=notrunc status=none
    truncate -s 128M img
    mke2fs -q -F "${mkfs[@]}" -d src img
    cp src/f exp-f
    sock=$tmpdir/sock-term-$flavour
    start_nbdkit $sock --filter="$FILTER" file img ext4file=/f
    python3 client.py term $sock exp-f &
    cpid=$!
    for ((i=0; i<600; i++)); do [ -f progress ] && break; sleep 0.1; done
    [ -f progress ] || fail "client made no progress"
    stop_nbdkit $sock
    wait $cpid || fail "client failed"
    fsck_clean img
    # The write in flight when the server stopped may or may not have
    # landed: take its range from the image, check every other byte.
    rm -f dump.f
    debugfs -R "dump /f dump.f" img >/dev/null 2>&1
    read ioff ilen < inflight
    if ! grep -qx "$ioff" replied.log; then
        dd if=dump.f of=exp-f conv=notrunc bs=4096 skip=$ioff seek=$ioff \
           count=$ilen status=none iflag=skip_bytes,count_bytes oflag=seek_bytes
    fi
    echo "$(wc -l < replied.log) writes replied"
    dump_cmp img /f exp-f
done

# 3. ENOSPC on an 8 MiB filesystem with a 64 MiB sparse file.
for flavour in ext4 ext4-1k ext2-1k; do
    echo "=== ENOSPC, $flavour"
    case $flavour in
        ext4)    mkfs=(-t ext4 -b 4096) ;;
        ext4-1k) mkfs=(-t ext4 -b 1024) ;;
        ext2-1k) mkfs=(-t ext2 -b 1024) ;;
    esac
    rm -rf src img
    mkdir src
    truncate -s $((64*1024*1024)) src/big
    head -c 200000 /dev/urandom | dd of=src/big conv=notrunc status=none
    truncate -s 8M img
    mke2fs -q -F "${mkfs[@]}" -d src img
    cp src/big exp-big
    nbdkit_srv -U - --filter="$FILTER" file img ext4file=/big \
        --run 'python3 client.py enospc "$unixsocket" exp-big'
    fsck_clean img
    dump_cmp img /big exp-big
done
