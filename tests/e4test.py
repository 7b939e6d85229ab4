"""e4test: the Python side of the ext4fs tests.

A test is a shell script (tests/test-*.sh) that sources functions.sh,
builds its images with mke2fs/debugfs, starts nbdkit and runs clients.
functions.sh puts this directory on PYTHONPATH and /usr/bin first on
PATH, so "python3" is the system interpreter that has libnbd's "nbd"
module, and a client (a heredoc or a file of its own) starts with

    import e4test as t

Writing a new test
------------------
Tell the story of what the users do; leave the mechanics here:

    h = t.connect(sock, "/f")               # or t.connect(uri)
    m = t.Shadow(h, open("src/f", "rb").read(), who="writer 1")
    t.barrier("writer.1")                   # ready.writer.1, wait for go
    m.pwrite(t.pattern(7, 4096), 8192)      # the export and the model
    m.check(8192, 4096, "read-back")        # exits at the first wrong byte
    t.expect_errno("write into a hole, filesystem full",
                   lambda: h.pwrite(b"x", hole), errno.ENOSPC,
                   after=lambda: m.check_all("unchanged"))
    m.save("out.f")                         # for dump_cmp in the script

Smaller pieces: read_all(h) (or read_all(h, into=hashlib.sha256())),
write_all(h, data, off, depth=8), extents(h, n, off) (one block status
request), Shadow.trim_blocks (a trim that punches whole blocks only),
expect_error (any error), errstr(e) for "REFUSED msg" style output.
A writer process from the shell: python3 -m e4test put SOCK OFF FILE.
After a repair: python3 -m e4test repaired DUMP BEFORE NEW O N.
One write in doubt (its flush failed, then a crash):
Shadow.save(OUT) with the old bytes, save_one_write(OUT, off, old, new),
then python3 -m e4test onewrite DUMP OUT WHAT after the replay.

The shell side releases the clients with release_clients N PID...
(functions.sh), stops the server with stop_nbdkit, checks the image
with fsck_clean and dump_cmp.  A client fails by exiting with a
message (sys.exit(str), i.e. t.fail); every check here does so at the
first difference and names the byte.
"""

import errno
import os
import pickle
import random
import re
import subprocess
import sys
import threading
import time

import nbd

__all__ = [
    "fail", "abort", "touch", "wait_for", "barrier",
    "connect", "errstr", "read_all", "write_all", "put", "extents", "client_rng", "pattern",
    "first_diff", "Shadow", "merge_owned",
    "is_errno", "expect_errno", "expect_error",
    "free_block_ranges", "free_blocks_of", "check_repaired",
    "save_one_write", "check_one_write",
]


# ---------------------------------------------------------------------
# Failing, and files used as signals between processes.

def fail(msg):
    """The client fails: exit with MSG (status 1, MSG on stderr)."""
    sys.exit(msg)


def abort(msg):
    """Fail, and create the file "abort" first so that the other clients
    waiting in wait_for() or barrier() stop waiting and fail too."""
    touch("abort")
    sys.exit(msg)


def touch(path):
    """Create PATH atomically (written under a hidden name, renamed), so a
    process polling for it never sees it half made.  The hidden name does
    not match ready.* (release_clients counts those)."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, ".tmp." + base)
    open(tmp, "w").close()
    os.rename(tmp, path)


def wait_for(path, what=None, timeout=60, poll=0.002, on_timeout=fail):
    """Wait until PATH exists (a list or tuple: until all of them do).
    Fails if "abort" appears first ("another client failed") or after
    TIMEOUT seconds (via ON_TIMEOUT, e.g. abort to stop the others
    too).  WHAT names what is awaited in messages."""
    paths = [path] if isinstance(path, str) else list(path)
    what = what or " ".join(paths)
    t0 = time.time()
    while not all(os.path.exists(p) for p in paths):
        if "abort" not in paths and os.path.exists("abort"):
            fail("another client failed (waiting for %s)" % what)
        if time.time() - t0 > timeout:
            on_timeout("timeout waiting for %s" % what)
        time.sleep(poll)


def barrier(tag, timeout=60):
    """The clients' side of release_clients (functions.sh): say this
    client is connected (file ready.TAG), wait for the file "go"."""
    touch("ready." + tag)
    wait_for("go", "the barrier", timeout)


# ---------------------------------------------------------------------
# Connections and data.

def connect(target, name=None, size=None, contexts=()):
    """A connected libnbd handle.  TARGET is a URI (it has "://") or the
    path of a Unix socket; NAME the export name (default: the default
    export).  With SIZE, fails unless the export has that size.
    CONTEXTS: meta contexts to request (e.g. nbd.CONTEXT_BASE_ALLOCATION).
    A refused connection raises nbd.Error (catch it to test refusals)."""
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    if "://" in target:
        assert name is None, "the export name of a URI is in the URI"
        h.connect_uri(target)
    else:
        if name is not None:
            h.set_export_name(name)
        h.connect_unix(target)
    if size is not None and h.get_size() != size:
        fail("export %s: size %d, expected %d" %
             (name if name is not None else target, h.get_size(), size))
    return h


def errstr(e):
    """The message of nbd.Error E on one line (for "REFUSED msg" style
    output lines the shell scripts grep)."""
    return e.string.replace("\n", " ")


def flush_in_thread(h):
    """Start h.flush() on a thread of its own (for a flush held below,
    with requests beside it).  Returns (thread, res): once the thread
    is joined, res["r"] is "ok" or "error: MESSAGE"."""
    res = {}

    def run():
        try:
            h.flush()
            res["r"] = "ok"
        except nbd.Error as e:
            res["r"] = "error: " + errstr(e)
    th = threading.Thread(target=run)
    th.start()
    return th, res


def read_all(h, piece=1 << 20, into=None):
    """The whole export of handle H, read in requests of PIECE bytes.
    With INTO (an object with update(), e.g. hashlib.sha256()), each
    piece is fed to it instead and INTO is returned."""
    size = h.get_size()
    data = bytearray() if into is None else into
    for off in range(0, size, piece):
        buf = h.pread(min(piece, size - off), off)
        if into is None:
            data += buf
        else:
            into.update(buf)
    return data


def write_all(h, data, off=0, piece=1 << 20, depth=1):
    """Write DATA at OFF through handle H in requests of PIECE bytes,
    DEPTH of them in flight at once (asynchronous when DEPTH > 1).
    Fails unless every request completed."""
    if depth <= 1:
        for i in range(0, len(data), piece):
            h.pwrite(data[i:i + piece], off + i)
        return
    cmds = []
    for i in range(0, len(data), piece):
        cmds.append(h.aio_pwrite(data[i:i + piece], off + i))
        while h.aio_in_flight() >= depth:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cmds:
        if not h.aio_command_completed(c):
            fail("write_all: request %d at %d did not complete" % (c, off))


def put(target, off, path, piece=1 << 20, depth=1):
    """A writer: write the content of the file PATH at OFF of the export
    TARGET (see connect), flush, and read it back (fails if it differs).
    Also "python3 -m e4test put TARGET OFF PATH [PIECE DEPTH]"."""
    data = open(path, "rb").read()
    h = connect(target)
    write_all(h, data, off, piece, depth)
    h.flush()
    got = h.pread(len(data), off)
    if got != data:
        i = first_diff(got, data)
        fail("put %s at %d: byte %d reads back as %d, wrote %d" %
             (path, off, off + i, got[i], data[i]))
    h.shutdown()


def extents(h, count, off, flags=0, context=nbd.CONTEXT_BASE_ALLOCATION):
    """One block status request of COUNT bytes at OFF (FLAGS, e.g.
    nbd.CMD_FLAG_REQ_ONE): the [(length, flags)] extents of CONTEXT the
    server returned, from OFF on.  Fails if a reply for CONTEXT does not
    start at OFF.  H must have been connected with CONTEXT (connect's
    CONTEXTS, or nbdsh --base-allocation)."""
    got, starts = [], []

    def cb(ctx, offset, entries, err):
        if ctx == context:
            starts.append(offset)
            got.extend((entries[i], entries[i + 1])
                       for i in range(0, len(entries), 2))
        return 0
    h.block_status(count, off, cb, flags)
    if any(s != off for s in starts):
        fail("block_status(%d, %d): extents of %s start at %s" %
             (count, off, context, starts))
    return got


def client_rng(ident=0, scale=100):
    """The random generator of client IDENT: seeded from $SEED (the
    scripts print it, so a failure can be replayed with SEED=...)."""
    return random.Random(int(os.environ.get("SEED", "1")) * scale + ident)


def pattern(seed, n, zero_as=None):
    """N reproducible random bytes from SEED.  With ZERO_AS (one byte),
    every zero byte is replaced by it: data never mistaken for a hole."""
    data = random.Random(seed).randbytes(n)
    if zero_as is not None:
        data = data.replace(b"\0", zero_as)
    return data


# ---------------------------------------------------------------------
# The shadow model: the expected bytes of an export.

def first_diff(a, b, start=0):
    """The first index >= START where the sequences A and B differ, or
    None (a shorter one differs where it ends)."""
    n = min(len(a), len(b))
    for i in range(start, n):
        if a[i] != b[i]:
            return i
    return None if len(a) == len(b) else n


class Shadow:
    """What a client expects the export behind handle H to hold: a
    bytearray updated by every request made through it.

    WHO names the client in messages; ON_FAIL is called with the message
    at the first wrong byte (fail; abort to stop the other clients)."""

    def __init__(self, h, data, who="", on_fail=fail):
        self.h = h
        self.data = bytearray(data)
        self.who = who
        self.on_fail = on_fail

    @property
    def size(self):
        return len(self.data)

    def __getitem__(self, k):
        return self.data[k]

    def __setitem__(self, k, v):
        self.data[k] = v

    # Requests: made on the export, then recorded in the model (a
    # request that raises changes nothing in the model).
    def pwrite(self, buf, off, flags=0):
        self.h.pwrite(buf, off, flags)
        self.data[off:off + len(buf)] = buf

    def zero(self, n, off, flags=0):
        self.h.zero(n, off, flags)
        self.data[off:off + n] = bytes(n)

    def trim(self, n, off, flags=0):
        """A trim the test knows to read back as zeros afterwards."""
        self.h.trim(n, off, flags)
        self.data[off:off + n] = bytes(n)

    def trim_blocks(self, n, off, bs, flags=0):
        """A trim of a file with block size BS: only the whole blocks
        inside the range are punched and read back as zeros; the partial
        blocks at its edges keep their data."""
        self.h.trim(n, off, flags)
        b0, b1 = (off + bs - 1) // bs, (off + n) // bs
        if b0 < b1:
            self.data[b0 * bs:b1 * bs] = bytes((b1 - b0) * bs)

    def randwrite(self, rnd, off, n, flags=0):
        """Write N random bytes from the generator RND at OFF."""
        self.pwrite(rnd.randbytes(n), off, flags)

    # Checks.
    def _prefix(self, what):
        return "%s: %s" % (self.who, what) if self.who else what

    def compare(self, got, off, what):
        """GOT (read at OFF) must equal the model there."""
        exp = self.data[off:off + len(got)]
        if got != exp:
            i = first_diff(got, exp)
            if i >= len(got) or i >= len(exp):
                self.on_fail("%s: %d bytes at %d, expected %d" %
                             (self._prefix(what), len(got), off, len(exp)))
            self.on_fail("%s: byte %d is %d, expected %d" %
                         (self._prefix(what), off + i, got[i], exp[i]))

    def check(self, off, n, what="read-back"):
        """Read N bytes at OFF, compare them with the model."""
        self.compare(self.h.pread(n, off), off, what)

    def check_all(self, what="read", piece=None):
        """Read the whole export (in pieces of PIECE bytes), compare."""
        piece = piece or self.size or 1
        for off in range(0, self.size, piece):
            self.check(off, min(piece, self.size - off), what)

    def save(self, path):
        """Write the model to PATH (the expected content of the file)."""
        with open(path, "wb") as f:
            f.write(self.data)

    def save_owned(self, path, owned):
        """Pickle the model's bytes of the ranges OWNED [(off, n)] (the
        ranges only this client writes) for merge_owned."""
        with open(path, "wb") as f:
            pickle.dump([(off, bytes(self.data[off:off + n]))
                         for off, n in owned], f)


def merge_owned(orig_path, out_path, parts):
    """The expected file after several clients: ORIG_PATH with every
    client's owned ranges (files of save_owned, PARTS) laid over it."""
    exp = bytearray(open(orig_path, "rb").read())
    for p in parts:
        with open(p, "rb") as f:
            for off, data in pickle.load(f):
                exp[off:off + len(data)] = data
    with open(out_path, "wb") as f:
        f.write(exp)


# ---------------------------------------------------------------------
# Expected errors (ENOSPC and others).

def is_errno(e, *codes):
    """nbd.Error E carries one of the errno values CODES."""
    return e.errnum in codes


def expect_errno(what, fn, codes, after=None, errname=None):
    """Call FN, which must fail with an nbd.Error whose errno is CODES
    (a number or a tuple); then call AFTER (e.g. a check that nothing
    changed).  Fails if FN succeeds or fails otherwise.  ERRNAME names
    the expected error in messages (default: the first code's name)."""
    if isinstance(codes, int):
        codes = (codes,)
    errname = errname or errno.errorcode.get(codes[0], str(codes[0]))
    try:
        fn()
    except nbd.Error as e:
        if not is_errno(e, *codes):
            fail("%s: expected %s, got %s" % (what, errname, e))
        if after is not None:
            after()
        return
    fail("%s: succeeded, expected %s" % (what, errname))


def expect_error(what, fn, after=None):
    """Call FN, which must fail with an nbd.Error (any errno: e.g. a
    request past the end, refused by libnbd or by the server); then
    call AFTER.  Fails if FN succeeds."""
    try:
        fn()
    except nbd.Error:
        if after is not None:
            after()
        return
    fail("%s: succeeded, expected an error" % what)


# ---------------------------------------------------------------------
# The image: free space as dumpe2fs reports it.

def free_block_ranges(dumpe2fs_text):
    """The (first, last) block ranges of the "Free blocks:" lines of
    dumpe2fs's output (every group), in order."""
    ranges = []
    for m in re.finditer(r"Free blocks: ([0-9, -]+)", dumpe2fs_text):
        for part in m.group(1).split(","):
            part = part.strip()
            if part:
                a, _, b = part.partition("-")
                ranges.append((int(a), int(b or a)))
    return ranges


def free_blocks_of(img):
    """The set of free blocks of image IMG (dumpe2fs)."""
    out = subprocess.run(["dumpe2fs", img], capture_output=True,
                         text=True).stdout
    free = set()
    for a, b in free_block_ranges(out):
        free.update(range(a, b + 1))
    return free


def check_repaired(dump, before, new, o, n):
    """After a repair (e2fsck -fy, or a journal replay) of a request
    [O, O+N) that failed half way: the file's contents DUMP (a path)
    must hold every byte outside the request as in BEFORE (a path), and
    inside it the old byte, the request's (NEW, a path, N bytes) or
    zero (a repair may unmap what it cannot trust)."""
    got = open(dump, "rb").read()
    exp = open(before, "rb").read()
    new = open(new, "rb").read()
    if len(got) != len(exp):
        fail("size changed after repair")
    if got[:o] != exp[:o] or got[o+n:] != exp[o+n:]:
        i = first_diff(got, exp) if got[:o] != exp[:o] \
            else first_diff(got, exp, o + n)
        fail("byte %d outside the request lost after repair "
             "(was %d, now %d)" % (i, exp[i], got[i]))
    for i in range(o, o + n):
        if got[i] not in (exp[i], new[i-o], 0):
            fail("byte %d inside the request: unexpected after repair" % i)


def save_one_write(out, off, old, new):
    """Beside OUT (a Shadow.save holding OLD at OFF): one write whose
    fate is in doubt, for check_one_write."""
    import json
    with open(out + ".json", "w") as f:
        json.dump({"off": off, "old": old.hex(), "new": new.hex()}, f)


def check_one_write(dump, out, what):
    """The file's contents DUMP (a path) must be OUT's (a path) but for
    the range of the write saved by save_one_write, which holds its
    old or its new bytes, all of them."""
    import json
    got = open(dump, "rb").read()
    want = bytearray(open(out, "rb").read())
    with open(out + ".json") as f:
        j = json.load(f)
    o, old, new = j["off"], bytes.fromhex(j["old"]), bytes.fromhex(j["new"])
    piece = got[o:o + len(new)]
    if piece not in (old, new):
        fail("%s: its range is neither old nor new" % what)
    want[o:o + len(new)] = piece
    if len(got) != len(want) or got != want:
        fail("byte %s differs after the repair" % first_diff(got, want))
    print("after the repair: every byte as promised (%s: %s)" %
          (what, "landed" if piece == new and new != old else "not there"))


if __name__ == "__main__":
    # python3 -m e4test merge ORIG OUT PART...: merge_owned.
    # python3 -m e4test put TARGET OFF PATH [PIECE DEPTH]: put.
    # python3 -m e4test repaired DUMP BEFORE NEW O N: check_repaired.
    # python3 -m e4test onewrite DUMP OUT WHAT: check_one_write.
    if len(sys.argv) >= 4 and sys.argv[1] == "merge":
        merge_owned(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) in (5, 7) and sys.argv[1] == "put":
        put(sys.argv[2], int(sys.argv[3]), sys.argv[4],
            *[int(a) for a in sys.argv[5:]])
    elif len(sys.argv) == 7 and sys.argv[1] == "repaired":
        check_repaired(*sys.argv[2:5], int(sys.argv[5]), int(sys.argv[6]))
    elif len(sys.argv) == 5 and sys.argv[1] == "onewrite":
        check_one_write(*sys.argv[2:5])
    else:
        fail("usage: e4test.py merge ORIG OUT PART... | "
             "put TARGET OFF PATH [PIECE DEPTH] | "
             "repaired DUMP BEFORE NEW O N | onewrite DUMP OUT WHAT")
