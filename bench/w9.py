#!/usr/bin/python3
"""W9 helper: random 4 KiB writes, a flush after every 16 writes.

  w9.py run    URI   SIZE IOS JOBS SEED   -> prints "<writes> <seconds>"
  w9.py expect SRC   SIZE IOS JOBS SEED   -> prints sha256 of the expected file

JOBS client processes, each with its own NBD connection and its own
disjoint share of the file.  Each job repeats: issue 16 writes at distinct
random 4 KiB-aligned offsets (all in flight together), wait for them,
then flush.  Offsets and data come from random.Random(SEED + job), so the
final content is deterministic and "expect" can rebuild it from SRC.
"""
import hashlib
import multiprocessing as mp
import random
import sys
import time

BS = 4096
BATCH = 16


def plan(size, ios, jobs, seed, job):
    """Yield lists of (offset, data) batches for one job."""
    nb = size // BS
    lo = job * nb // jobs
    hi = (job + 1) * nb // jobs
    per_job = ios // jobs
    rng = random.Random(seed + job)
    done = 0
    while done < per_job:
        n = min(BATCH, per_job - done)
        blocks = rng.sample(range(lo, hi), n)
        yield [(b * BS, rng.randbytes(BS)) for b in blocks]
        done += n


def worker(uri, size, ios, jobs, seed, job, errq):
    import nbd
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        batches = list(plan(size, ios, jobs, seed, job))
        t0 = time.monotonic()
        tw = tf = 0.0
        for batch in batches:
            ta = time.monotonic()
            cookies = [h.aio_pwrite(data, off) for off, data in batch]
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for c in cookies:
                h.aio_command_completed(c)  # raises on error
            tb = time.monotonic()
            h.flush()
            tc = time.monotonic()
            tw += tb - ta
            tf += tc - tb
        t1 = time.monotonic()
        h.shutdown()
        # Where the time went (to the bench log): the batches of writes,
        # and the flushes after them.
        print("w9 job %d: %d batches, writes %.3f s, flushes %.3f s, "
              "total %.3f s" % (job, len(batches), tw, tf, t1 - t0),
              file=sys.stderr)
        errq.put((t0, t1))
    except Exception as e:  # noqa
        errq.put("job %d: %r" % (job, e))


def run(uri, size, ios, jobs, seed):
    # No start barrier: a server that serializes connections (stock ext2
    # filter) only accepts the second connection after the first ends.
    # Wall time = first job's first write .. last job's last flush.
    errq = mp.Queue()
    ps = [mp.Process(target=worker,
                     args=(uri, size, ios, jobs, seed, j, errq))
          for j in range(jobs)]
    for p in ps:
        p.start()
    got = [errq.get() for _ in ps]
    for p in ps:
        p.join()
    errs = [e for e in got if isinstance(e, str)]
    if not errs:
        t0 = min(g[0] for g in got)
        t1 = max(g[1] for g in got)
    if errs or any(p.exitcode for p in ps):
        print("ERROR", errs, file=sys.stderr)
        sys.exit(1)
    total = (ios // jobs) * jobs
    print(total, "%.6f" % (t1 - t0))


def expect(src, size, ios, jobs, seed):
    with open(src, "rb") as f:
        buf = bytearray(f.read())
    assert len(buf) == size, (len(buf), size)
    for job in range(jobs):
        for batch in plan(size, ios, jobs, seed, job):
            for off, data in batch:
                buf[off:off + BS] = data
    print(hashlib.sha256(buf).hexdigest())


if __name__ == "__main__":
    mode, target = sys.argv[1], sys.argv[2]
    size, ios, jobs, seed = (int(x) for x in sys.argv[3:7])
    if mode == "run":
        run(target, size, ios, jobs, seed)
    else:
        expect(target, size, ios, jobs, seed)
