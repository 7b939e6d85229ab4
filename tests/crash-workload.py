#!/usr/bin/env python3
"""The workload of test-crash-states.sh, and the model crashstates.py
checks the crash states against.

crash-workload.py SOCK RECORDER_LOG MODEL_OUT FLAVOUR BS FAILFLUSH

Runs against an ext4fs server in exportname mode (ext4file=exportname)
whose plugin calls are recorded by recorder-filter.c into RECORDER_LOG.
Every client request is noted with CLOCK_MONOTONIC and the size of the
recorder log just before it is sent and just after its reply (see
crashstates.py, "Model file").  FAILFLUSH is the recorder's
recordfailflush= trigger file.  SEED (environment) fixes the requests;
the interleaving of concurrent connections varies from run to run.

Files in the image (made by the test): /sparse (sparse), /data (random
data), /cc (sparse, for the concurrent writers), /prealloc (ext4 only:
unwritten extents over the whole file).  Steps, each ending with a
flush while nothing else is in flight:
  alloc         allocating writes into /sparse, aligned and unaligned
  fua-over-new  a plain allocating write, then FUA overwrites of the
                blocks it allocated (no flush in between), a FUA write
                into a hole, a plain write
  overwrite     overwrites of /data, aligned, unaligned, crossing
                blocks, some FUA
  trim-zero     trims and zeroes (with and without MAY_TRIM) on /sparse
                and /data, then allocating writes where the trimmed
                blocks were, on /sparse and /cc (reuse before a flush)
  unwritten     (ext4) writes into the unwritten extents of /prealloc
  concurrent    4 connections writing at once (/cc halves, /data,
                /sparse), some FUA, a 5th connection flushing meanwhile
  failed-flush  allocating writes, a flush that fails below ext4fs,
                another flush, more writes (which may fail: ext4fs
                stops changing a filesystem after a failed flush)
"""

import json
import os
import random
import sys
import threading
import time

import nbd

sock, log, model_out, flavour, bs, failflush = sys.argv[1:7]
bs = int(bs)
seed = int(os.environ.get("SEED", "1"))
rnd = random.Random(seed)
KiB, MiB = 1024, 1024 * 1024

lock = threading.Lock()
ops = []
blob_path = model_out + ".data"
blob = open(blob_path, "wb")
blob_len = 0
shadow = {}
abort = threading.Event()


def logpos():
    return os.stat(log).st_size


class Conn:
    def __init__(self, ident, name):
        self.ident, self.name = ident, name
        self.h = nbd.NBD()
        self.h.set_export_name(name)
        self.h.connect_unix(sock)
        with lock:
            if name not in shadow:
                shadow[name] = None
        self.size = self.h.get_size()

    def op(self, kind, off=0, n=0, fua=False, step="", flags=0, data=None,
           may_fail=False):
        global blob_len
        if kind == "write" and data is None:
            data = rnd_bytes(n)
        f = flags | (nbd.CMD_FLAG_FUA if fua else 0)
        pos_send = logpos()
        t_send = time.monotonic_ns()
        ok = True
        try:
            if kind == "write":
                self.h.pwrite(data, off, f)
            elif kind == "zero":
                self.h.zero(n, off, f)
            elif kind == "trim":
                self.h.trim(n, off, f)
            elif kind == "flush":
                self.h.flush()
            else:
                raise ValueError(kind)
        except nbd.Error as e:
            if not may_fail:
                abort.set()
                raise SystemExit("conn %d %s: %s %d+%d failed: %s" %
                                 (self.ident, step, kind, off, n, e))
            ok = False
        t_ack = time.monotonic_ns()
        pos_ack = logpos()
        rec = {"conn": self.ident, "kind": kind, "off": off, "len": n,
               "fua": bool(fua), "ok": ok, "t_send": t_send, "t_ack": t_ack,
               "pos_send": pos_send, "pos_ack": pos_ack, "step": step}
        if kind != "flush":
            rec["file"] = self.name
        with lock:
            if kind == "write":
                rec["blob"] = blob_len
                blob.write(data)
                blob_len += len(data)
            ops.append(rec)
            sh = shadow[self.name]
            if ok and sh is not None:
                if kind == "write":
                    sh[off:off + n] = data
                elif kind == "zero":
                    sh[off:off + n] = bytes(n)
        if ok and kind == "trim":
            # Trim is advisory: learn what the server now serves.
            got = self.h.pread(n, off)
            with lock:
                shadow[self.name][off:off + n] = got
        return ok

    def load_shadow(self):
        with lock:
            if shadow[self.name] is None:
                shadow[self.name] = bytearray(self.h.pread(self.size, 0))

    def verify(self):
        got = self.h.pread(self.size, 0)
        if got != shadow[self.name]:
            i = next(i for i in range(self.size) if got[i] != shadow[self.name][i])
            raise SystemExit("%s: the live server serves byte %d = %d, "
                             "expected %d" % (self.name, i, got[i],
                                              shadow[self.name][i]))


def rnd_bytes(n):
    with lock:
        return rnd.randbytes(n)


def rnd_write(c, r, lo, hi, step, fua=False, may_fail=False):
    """A random write inside [lo, hi): aligned blocks, unaligned, or
    crossing blocks."""
    shape = r.randrange(3)
    if shape == 0:
        n = bs * r.randint(1, 8)
        off = lo + bs * r.randrange((hi - lo - n) // bs + 1)
    elif shape == 1:
        n = r.randint(1, bs - 1)
        off = r.randint(lo, hi - n)
    else:
        n = r.randint(bs + 1, 3 * bs)
        off = r.randint(lo, hi - n)
    c.op("write", off, n, fua, step, data=r.randbytes(n), may_fail=may_fail)


def main():
    sparse = Conn(0, "/sparse")
    data = Conn(1, "/data")
    cc = Conn(2, "/cc")
    pre = Conn(3, "/prealloc") if flavour == "ext4" else None
    for c in (sparse, data, cc, pre):
        if c:
            c.load_shadow()

    step = "alloc"
    for _ in range(16):
        rnd_write(sparse, rnd, 0, 1 * MiB, step)
    sparse.op("flush", step=step)

    step = "fua-over-new"
    x = 1 * MiB + 256 * KiB
    sparse.op("write", x, 8 * bs, step=step)
    sparse.op("write", x + bs, bs, True, step)
    sparse.op("write", x + 3 * bs + 10, 100, True, step)
    sparse.op("write", x + 16 * bs, 2 * bs, True, step)
    sparse.op("write", x + 16 * bs + 5, 7, True, step)
    sparse.op("write", x + 24 * bs, 3 * bs, step=step)
    sparse.op("flush", step=step)

    step = "overwrite"
    for i in range(24):
        rnd_write(data, rnd, 0, data.size, step, fua=(i % 6 == 5))
    data.op("flush", step=step)

    step = "trim-zero"
    sparse.op("trim", 0, 256 * KiB, step=step)
    sparse.op("trim", 300 * KiB + 123, 40 * KiB, step=step)
    sparse.op("zero", 400 * KiB, 64 * KiB, step=step,
              flags=0)                                    # MAY_TRIM
    data.op("zero", 64 * KiB + 7, 3 * bs, step=step,
            flags=nbd.CMD_FLAG_NO_HOLE)
    data.op("trim", 200 * KiB, 16 * KiB, step=step)
    for i in range(6):
        rnd_write(sparse, rnd, 0, 256 * KiB, step)
    for i in range(6):
        rnd_write(cc, rnd, 0, 512 * KiB, step)
    sparse.op("flush", step=step)

    if pre:
        step = "unwritten"
        pre.op("write", 0, bs, step=step)
        pre.op("write", 5 * bs + 100, 200, step=step)
        pre.op("write", 40 * bs, 16 * bs, step=step)
        pre.op("write", 100 * bs + 1, bs, True, step)
        for i in range(6):
            rnd_write(pre, rnd, 0, pre.size, step)
        pre.op("flush", step=step)

    step = "concurrent"
    regions = [("/cc", 0, cc.size // 2), ("/cc", cc.size // 2, cc.size),
               ("/data", data.size // 2, data.size),
               ("/sparse", 2 * MiB, 3 * MiB)]
    writers_done = threading.Event()
    errors = []

    def writer(i, name, lo, hi):
        try:
            c = Conn(10 + i, name)
            r = random.Random(seed * 100 + i)
            start.wait()
            for j in range(14):
                if abort.is_set():
                    return
                rnd_write(c, r, lo, hi, step, fua=(r.randrange(4) == 0))
                if r.randrange(7) == 0:
                    c.op("flush", step=step)
            # A closing connection makes ext4fs flush on its own (in
            # .finalize), which the model cannot see: close only once
            # every writer is done.
            writers_left.release()
            all_quiet.wait()
            c.h.shutdown()
        except BaseException as e:
            abort.set()
            errors.append(e)

    def flusher():
        try:
            c = Conn(20, "/data")
            start.wait()
            while not writers_done.is_set() and not abort.is_set():
                c.op("flush", step=step)
                time.sleep(random.Random().uniform(0.002, 0.01))
            all_quiet.wait()
            c.h.shutdown()
        except BaseException as e:
            abort.set()
            errors.append(e)

    start = threading.Event()
    all_quiet = threading.Event()
    writers_left = threading.Semaphore(0)
    ths = [threading.Thread(target=writer, args=(i,) + regions[i])
           for i in range(4)]
    fl = threading.Thread(target=flusher)
    for t in ths + [fl]:
        t.start()
    time.sleep(0.05)
    start.set()
    for t in ths:
        while not writers_left.acquire(timeout=0.1):
            if abort.is_set():
                break
    # Every write of the step has its reply: connections may close now
    # (only flushes are still in flight).
    writers_done.set()
    all_quiet.set()
    for t in ths + [fl]:
        t.join()
    if errors:
        raise SystemExit("concurrent step: %r" % errors[0])
    sparse.op("flush", step=step)

    step = "failed-flush"
    lo = 3 * MiB
    for _ in range(6):
        rnd_write(sparse, rnd, lo, lo + 512 * KiB, step)
    open(failflush, "w").close()
    failed = not sparse.op("flush", step=step, may_fail=True)
    os.unlink(failflush)
    # After a failed flush ext4fs stops changing the filesystem (the
    # journal aborts; without one, the filesystem is marked with
    # errors): later writes may fail with EIO; nothing may be lost.
    sparse.op("flush", step=step, may_fail=True)
    for _ in range(2):
        rnd_write(sparse, rnd, lo, lo + 512 * KiB, step, may_fail=True)
    sparse.op("flush", step=step, may_fail=True)
    print("failed-flush step: the flush below ext4fs failed, the NBD flush "
          "%s" % ("failed" if failed else "SUCCEEDED (the error was lost)"))

    for c in (sparse, data, cc, pre):
        if c:
            c.verify()
            c.h.shutdown()
    blob.close()
    json.dump({"files": {n: len(s) for n, s in shadow.items()},
               "marker": "DELETED!", "blob": os.path.basename(blob_path),
               "ops": ops, "seed": seed}, open(model_out, "w"))
    print("workload: %d requests, %d bytes written, log %d bytes" %
          (len(ops), blob_len, logpos()))


main()
