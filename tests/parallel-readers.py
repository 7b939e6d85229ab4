#!/usr/bin/python3
"""parallel-readers.py URI FILE [N [COUNT]]: N client processes (4)
each read COUNT (1500) random 4 KiB blocks of the export at URI at
once, and compare them with FILE (the export's expected bytes).  Exits
1 if any read fails or differs.  Many small requests from several
connections are what makes calls meet in the plugin below ext4fs
(nbdcopy's few large ones rarely do): used with the overlap filter."""
import multiprocessing
import random
import sys

import e4test as t


def reader(uri, path, seed, count, go):
    data = open(path, "rb").read()
    h = t.connect(uri)
    rnd = random.Random(seed)
    go.wait()
    for _ in range(count):
        off = rnd.randrange(0, len(data) // 4096) * 4096
        if h.pread(4096, off) != data[off:off + 4096]:
            raise SystemExit("reader %d: wrong bytes at %d" % (seed, off))
    h.shutdown()


def main():
    uri, path = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 1500
    go = multiprocessing.Event()
    ps = [multiprocessing.Process(target=reader, args=(uri, path, i, count, go))
          for i in range(n)]
    for p in ps:
        p.start()
    go.set()
    bad = 0
    for p in ps:
        p.join()
        if p.exitcode != 0:
            print("reader process exited with %s" % p.exitcode, file=sys.stderr)
            bad = 1
    sys.exit(bad)


if __name__ == "__main__":
    main()
