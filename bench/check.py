#!/usr/bin/python3
"""Helpers for bench/run.sh (W5, W6, W7, MEM): make sources, check bytes.

  check.py mksparse FILE SIZE NPIECES PIECE SEED
        sparse FILE of SIZE bytes with NPIECES random pieces of PIECE bytes
        spread over it (see pieces()); prints nothing
  check.py pieces URI SRC MAPJSON
        the server's bytes at every piece and at sampled hole ranges match
        SRC, and MAPJSON (nbdinfo --map --json, or "-") marks every piece
        as data and no more than 2x the piece bytes (+1 MiB) as data
  check.py sample URI SRC N SEED
        N reads at random offsets/lengths (up to 64 KiB), 32 in flight,
        plus the first and last 4 KiB, compared with SRC
  check.py mkfiles DIR N SEED
        N small files f00000.. (sizes 1..8 KiB, content from SEED)
  check.py files SOCK N SEED
        for each of the N files: connect (export name = file name),
        read all of it, compare, disconnect.  Prints "<files> <seconds>".
  check.py conns URI SRC N SEED
        N connections open at the same time; each has 4 reads of 4-64 KiB
        in flight, twice; all compared with SRC.  Prints "<N> <seconds>".
"""
import json
import os
import random
import select
import sys
import time

import nbd


def pieces(size, npieces, piece):
    """Offsets of the data pieces: spread evenly, not aligned to the
    spacing, and one piece ending exactly at the end of the file."""
    step = size // npieces
    offs = [i * step + (i % 7 + 1) * 1024 * 1024 for i in range(npieces - 1)]
    offs.append(size - piece)
    return offs


def mksparse(path, size, npieces, piece, seed):
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in pieces(size, npieces, piece):
            f.seek(off)
            f.write(rng.randbytes(piece))


def fail(msg):
    print("CHECK FAILED:", msg, file=sys.stderr)
    sys.exit(1)


def read_all(h, off, n, chunk=16 << 20):
    out = bytearray()
    while n > 0:
        k = min(chunk, n)
        out += h.pread(k, off)
        off += k
        n -= k
    return bytes(out)


def check_pieces(uri, src, mapjson):
    size = os.path.getsize(src)
    fd = os.open(src, os.O_RDONLY)
    # Find the pieces from the source itself (SEEK_DATA/SEEK_HOLE).
    data = []
    off = 0
    while True:
        try:
            s = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break
        e = os.lseek(fd, s, os.SEEK_HOLE)
        data.append((s, e))
        off = e
    h = nbd.NBD()
    h.connect_uri(uri)
    if h.get_size() != size:
        fail("size %d != %d" % (h.get_size(), size))
    for s, e in data:
        if read_all(h, s, e - s) != os.pread(fd, e - s, s):
            fail("data at %d..%d differs" % (s, e))
    # Sampled holes: 64 KiB in the middle of each gap, and around each piece.
    gaps = []
    prev = 0
    for s, e in data + [(size, size)]:
        if s > prev:
            gaps.append((prev, s))
        prev = e
    for s, e in gaps:
        for o in (s, (s + e) // 2, e - 65536):
            o = max(s, min(o, e - 65536))
            n = min(65536, e - o)
            if n > 0 and h.pread(n, o) != bytes(n):
                fail("hole at %d (+%d) not zero" % (o, n))
    h.shutdown()
    if mapjson != "-":
        ext = json.load(open(mapjson))
        dat = [(x["offset"], x["offset"] + x["length"]) for x in ext
               if not (x["type"] & 1)]
        total = sum(e - s for s, e in dat)
        want = sum(e - s for s, e in data)
        for s, e in data:
            # every byte of [s,e) covered by data extents
            cur = s
            for ds, de in dat:
                if ds <= cur < de:
                    cur = de
            if cur < e:
                fail("map: data %d..%d not reported as data (stops at %d)"
                     % (s, e, cur))
        if total > 2 * want + (1 << 20):
            fail("map: %d bytes reported as data, only %d are" % (total, want))
        end = max((x["offset"] + x["length"] for x in ext), default=0)
        if end != size:
            fail("map covers %d of %d bytes" % (end, size))


def poll_all(handles):
    """One round of select() over the handles' sockets."""
    r, w = [], []
    fds = {}
    for h in handles:
        d = h.aio_get_direction()
        fd = h.aio_get_fd()
        fds[fd] = h
        if d & nbd.AIO_DIRECTION_READ:
            r.append(fd)
        if d & nbd.AIO_DIRECTION_WRITE:
            w.append(fd)
    rr, ww, _ = select.select(r, w, [], 30)
    if not rr and not ww:
        return False
    for fd in rr:
        fds[fd].aio_notify_read()
    for fd in ww:
        if fds[fd].aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
            fds[fd].aio_notify_write()
    return True


def run_reads(pending, srcfd):
    """pending: list of (h, buf, off, n, cookie).  Wait for all, compare."""
    left = list(pending)
    deadline = time.monotonic() + 120
    while left:
        hs = list({id(p[0]): p[0] for p in left}.values())
        if not poll_all(hs) and time.monotonic() > deadline:
            fail("no progress for 120 s (%d reads pending)" % len(left))
        still = []
        for p in left:
            h, buf, off, n, c = p
            if h.aio_command_completed(c):
                if buf.to_bytearray() != os.pread(srcfd, n, off):
                    fail("read at %d (+%d) differs" % (off, n))
            else:
                still.append(p)
        if len(still) < len(left):
            deadline = time.monotonic() + 120
        left = still


def sample(uri, src, n, seed):
    size = os.path.getsize(src)
    fd = os.open(src, os.O_RDONLY)
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    if h.get_size() != size:
        fail("size %d != %d" % (h.get_size(), size))
    reqs = [(0, min(4096, size)), (max(0, size - 4096), min(4096, size))]
    for _ in range(n):
        ln = rng.randint(1, 65536)
        reqs.append((rng.randrange(0, size - ln + 1), ln))
    for i in range(0, len(reqs), 32):
        pend = []
        for off, ln in reqs[i:i + 32]:
            buf = nbd.Buffer(ln)
            pend.append((h, buf, off, ln, h.aio_pread(buf, off)))
        run_reads(pend, fd)
    h.shutdown()


def small_file(i, seed):
    rng = random.Random(seed * 1000003 + i)
    return rng.randbytes(rng.randint(1, 8192))


def mkfiles(d, n, seed):
    for i in range(n):
        with open(os.path.join(d, "f%05d" % i), "wb") as f:
            f.write(small_file(i, seed))


def files(sock, n, seed):
    t0 = time.monotonic()
    for i in range(n):
        want = small_file(i, seed)
        h = nbd.NBD()
        h.set_export_name("f%05d" % i)
        h.connect_unix(sock)
        if h.get_size() != len(want):
            fail("f%05d: size %d != %d" % (i, h.get_size(), len(want)))
        if h.pread(len(want), 0) != want:
            fail("f%05d differs" % i)
        h.shutdown()
        del h
    print(n, "%.6f" % (time.monotonic() - t0))


def conns(uri, src, n, seed):
    size = os.path.getsize(src)
    fd = os.open(src, os.O_RDONLY)
    rng = random.Random(seed)
    t0 = time.monotonic()
    hs = []
    for _ in range(n):
        h = nbd.NBD()
        h.connect_uri(uri)
        hs.append(h)
    for rnd in range(2):
        pend = []
        for h in hs:
            for _ in range(4):
                ln = rng.randint(4096, 65536)
                off = rng.randrange(0, size - ln + 1)
                buf = nbd.Buffer(ln)
                pend.append((h, buf, off, ln, h.aio_pread(buf, off)))
        run_reads(pend, fd)
    for h in hs:
        h.shutdown()
    print(n, "%.6f" % (time.monotonic() - t0))


if __name__ == "__main__":
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "mksparse":
        mksparse(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]))
    elif cmd == "pieces":
        check_pieces(a[0], a[1], a[2])
    elif cmd == "sample":
        sample(a[0], a[1], int(a[2]), int(a[3]))
    elif cmd == "mkfiles":
        mkfiles(a[0], int(a[1]), int(a[2]))
    elif cmd == "files":
        files(a[0], int(a[1]), int(a[2]))
    elif cmd == "conns":
        conns(a[0], a[1], int(a[2]), int(a[3]))
    else:
        sys.exit("unknown command " + cmd)
