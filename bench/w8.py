#!/usr/bin/python3
"""W8 helper: load test, many clients on many files, mixed reads/writes.

  w8.py mkfiles DIR NFILES FSIZE SEED
        files f00..: kind = i % 4: 0 random data, 1 all hole,
        2 first half data / second half hole, 3 sparse with data pieces
  w8.py run SOCK DIR NFILES INFLIGHT RUNTIME SEED PROCS OUT
        one client (connection, export name fNN) per file, INFLIGHT
        requests in flight each, for RUNTIME seconds, spread over PROCS
        processes (each runs a select() loop over its connections).
        Mix: 50% read (verified against a shadow copy at completion),
        40% write, 5% write-zeroes, 5% flush; lengths 512 B .. 64 KiB,
        512-aligned (70% 4 KiB-aligned).  No two requests in flight on a
        client overlap, so the shadow is exact.  At the end each client
        reads its whole file back and compares; OUT gets "name sha256" of
        every shadow.  Prints "<ops> <seconds>".  Exit 1 on any error,
        mismatch, or 60 s without progress.
"""
import hashlib
import multiprocessing as mp
import os
import random
import select
import sys
import time

import nbd

SECTOR = 512


def name(i):
    return "f%02d" % i


def mkfiles(d, nfiles, fsize, seed):
    for i in range(nfiles):
        rng = random.Random(seed * 7919 + i)
        p = os.path.join(d, name(i))
        with open(p, "wb") as f:
            f.truncate(fsize)
            k = i % 4
            if k == 0:
                f.write(rng.randbytes(fsize))
            elif k == 2:
                f.write(rng.randbytes(fsize // 2))
            elif k == 3:
                for j in range(8):
                    f.seek(j * fsize // 8 + 4096 * j)
                    f.write(rng.randbytes(min(65536 + 512, fsize // 16)))


class Client:
    def __init__(self, sock, d, i, inflight, seed):
        self.name = name(i)
        with open(os.path.join(d, self.name), "rb") as f:
            self.shadow = bytearray(f.read())
        self.size = len(self.shadow)
        self.rng = random.Random(seed * 104729 + i)
        self.h = nbd.NBD()
        self.h.set_export_name(self.name)
        self.h.connect_unix(sock)
        if self.h.get_size() != self.size:
            raise RuntimeError("%s: size %d != %d" %
                               (self.name, self.h.get_size(), self.size))
        self.inflight = inflight
        self.pending = []   # (cookie, kind, off, n, buf)
        self.ops = 0

    def overlaps(self, off, n):
        for _, _, o, m, _ in self.pending:
            if off < o + m and o < off + n:
                return True
        return False

    def issue(self, stopping):
        while len(self.pending) < self.inflight and not stopping:
            r = self.rng.random()
            if r < 0.05:
                c = self.h.aio_flush()
                self.pending.append((c, "F", 0, 0, None))
                continue
            if self.rng.random() < 0.7:
                n = self.rng.randint(1, 16) * 4096
                off = self.rng.randrange(0, self.size - n + 1) // 4096 * 4096
            else:
                n = self.rng.randint(1, 128) * SECTOR
                off = self.rng.randrange(0, self.size - n + 1) // SECTOR * SECTOR
            if self.overlaps(off, n):
                continue
            if r < 0.55:
                buf = nbd.Buffer(n)
                c = self.h.aio_pread(buf, off)
                self.pending.append((c, "R", off, n, buf))
            elif r < 0.95:
                data = self.rng.randbytes(n)
                self.shadow[off:off + n] = data
                c = self.h.aio_pwrite(data, off)
                self.pending.append((c, "W", off, n, data))
            else:
                self.shadow[off:off + n] = bytes(n)
                c = self.h.aio_zero(n, off)
                self.pending.append((c, "Z", off, n, None))

    def reap(self):
        still = []
        done = 0
        for p in self.pending:
            c, kind, off, n, buf = p
            if self.h.aio_command_completed(c):   # raises on error
                done += 1
                if kind == "R" and buf.to_bytearray() != self.shadow[off:off + n]:
                    raise RuntimeError("%s: read at %d (+%d) differs from shadow"
                                       % (self.name, off, n))
            else:
                still.append(p)
        self.pending = still
        self.ops += done
        return done

    def final_check(self):
        self.h.flush()
        off = 0
        while off < self.size:
            n = min(4 << 20, self.size - off)
            if self.h.pread(n, off) != self.shadow[off:off + n]:
                raise RuntimeError("%s: final read-back at %d differs"
                                   % (self.name, off))
            off += n
        self.h.shutdown()
        return hashlib.sha256(self.shadow).hexdigest()


def worker(sock, d, idx, inflight, runtime, seed, q):
    try:
        cl = [Client(sock, d, i, inflight, seed) for i in idx]
        byfd = {}
        t0 = time.monotonic()
        tend = t0 + runtime
        last = t0
        while True:
            now = time.monotonic()
            stopping = now >= tend
            for c in cl:
                c.issue(stopping)
            if stopping and all(not c.pending for c in cl):
                break
            r, w = [], []
            byfd = {}
            for c in cl:
                fd = c.h.aio_get_fd()
                byfd[fd] = c
                dr = c.h.aio_get_direction()
                if dr & nbd.AIO_DIRECTION_READ:
                    r.append(fd)
                if dr & nbd.AIO_DIRECTION_WRITE:
                    w.append(fd)
            rr, ww, _ = select.select(r, w, [], 5)
            for fd in rr:
                byfd[fd].h.aio_notify_read()
            for fd in ww:
                if byfd[fd].h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
                    byfd[fd].h.aio_notify_write()
            got = sum(c.reap() for c in cl)
            now = time.monotonic()
            if got:
                last = now
            elif now - last > 60:
                raise RuntimeError("no request completed for 60 s "
                                   "(%d in flight): deadlock?" %
                                   sum(len(c.pending) for c in cl))
        t1 = time.monotonic()
        shas = [(c.name, c.final_check()) for c in cl]
        q.put((sum(c.ops for c in cl), t0, t1, shas))
    except Exception as e:  # noqa
        q.put("ERROR worker %d: %r" % (idx[0] if idx else -1, e))


def run(sock, d, nfiles, inflight, runtime, seed, procs, out):
    q = mp.Queue()
    ps = []
    for p in range(procs):
        idx = list(range(p, nfiles, procs))
        ps.append(mp.Process(target=worker,
                             args=(sock, d, idx, inflight, runtime, seed, q)))
    for p in ps:
        p.start()
    got = [q.get() for _ in range(procs)]
    for p in ps:
        p.join()
    errs = [g for g in got if isinstance(g, str) and g.startswith("ERROR")]
    res = [g for g in got if isinstance(g, tuple)]
    if errs or len(res) != procs or any(p.exitcode for p in ps):
        print("\n".join(errs) or "worker failed", file=sys.stderr)
        sys.exit(1)
    ops = sum(r[0] for r in res)
    t0 = min(r[1] for r in res)
    t1 = max(r[2] for r in res)
    with open(out, "w") as f:
        for r in res:
            for n, s in r[3]:
                f.write("%s %s\n" % (n, s))
    print(ops, "%.6f" % (t1 - t0))


if __name__ == "__main__":
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "mkfiles":
        mkfiles(a[0], int(a[1]), int(a[2]), int(a[3]))
    elif cmd == "run":
        run(a[0], a[1], int(a[2]), int(a[3]), float(a[4]), int(a[5]),
            int(a[6]), a[7])
    else:
        sys.exit("unknown command " + cmd)
