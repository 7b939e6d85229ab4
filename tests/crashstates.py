#!/usr/bin/env python3
"""crashstates: rebuild and check the crash states of a recorded workload.

The recorder filter (recorder-filter.c), loaded BELOW ext4fs, logs every
write (with its data), zero, trim and flush that reaches the plugin, in
completion order, each with the tick at which it was issued and the tick
at which it completed.  From that log and a copy of the image taken
before the server started, this module builds images a crash could have
left, checks each one, and reports.

Durability rules (a volatile write cache that loses what it may):
  * a write, zero or trim is DURABLE once a successful flush that was
    issued after it completed has itself completed (W.end < F.start), or
    at once if it carries FUA;
  * a failed flush may have dropped every write that completed before it
    and was not durable yet: those are never made durable by a later
    flush (the disk said it lost them);
  * a failed write is never durable (it may or may not have landed);
  * anything else that completed may or may not be on the disk.
A crash state is (T, applied): the first T records of the log have
completed, and `applied` holds every durable one of them plus any subset
of the others; they are applied in log (completion) order on top of the
initial image.  Trims are applied as zeroes (what the file plugin does).

Kinds of states:
  final       all records (the image after a clean stop; with
              --final-image it must equal the real image byte for byte,
              which checks the recorder and this rebuild);
  flush       at each successful flush: all records before it completed
              (a crash right after the flush, with nothing lost).  With a
              model it is "flush-busy" instead when a client write, zero
              or trim may have been half done then: for a flush a client
              request caused (NBD flush, FUA write), when another data
              request overlapped that request in time; for a flush no
              request caused (ext4fs's .finalize or .cleanup), when a
              data request was in flight since the previous flush.  (A
              workload must not close a connection while others write:
              the flush of its .finalize is invisible to the model);
  flush-min   at each successful flush: only the durable records (the
              cache lost everything it could);
  fua-min     when the reply to a FUA write came (with a model; else
              after each FUA record): only the durable records;
  prefix      a random T, every completed record applied (a process
              crash: kill -9 of nbdkit, nothing lost below); --prefixes
              -1 checks every T;
  subset      a random T between two flushes and a random subset of the
              records that are not durable at T (power loss).
Duplicate states (same T, same records) are checked once, under the
first kind in this list.

Checks on each state:
  1. if the superblock has needs_recovery, a copy is replayed with
     `e2fsck -E journal_only -y` (which must not fail), and the copy is
     checked from then on;
  2. `e2fsck -fn` must exit 0 (else: inconsistent);
  3. with a model (see Model): every served file is dumped with debugfs;
     each byte must hold the value of the newest write the client was
     PROMISED before the crash point (acknowledged before a successful
     flush was sent, the flush acknowledged; or written with FUA and
     acknowledged), or the value of a later write, zero or trim the
     client had sent by then (else: a lost write, or wrong data where
     nothing was promised);
  4. no served file contains the marker (b"DELETED!" by default) that
     the test filled free space with before the workload (else: a
     stale-data exposure).
Bytes are compared in 512-byte pieces (ext4fs never writes part of
one), so "lost" and "wrong" count whole pieces; each report says what
the first bad bytes hold instead (zeros, the marker, another write's
data and for which offset, some file's initial data).  Problem kinds:
fsck, replay, dump (debugfs cannot read a file), lost, wrong, stale,
final.

Python API:

    import crashstates as cs
    log = cs.read_log("rec.log")                  # [Record]
    model = cs.Model.load("model.json", log)      # optional
    h = cs.Harness("init.img", log, workdir="st", model=model)
    states = h.generate(subsets=4, prefixes=1, seed=1, max_states=300)
    summary = h.run(states)           # prints failing states
    print(summary.line())             # "N states checked, M inconsistent, ..."
    bad = summary.bad(cs.parse_assert("final,flush"))

A custom content check is any callable check(state, files, harness)
returning a list of Problem; pass it as Harness(..., checks=[fn]); files
maps each served path to its dumped bytes (only with a model or
files=[...]).

Command line: crashstates.py --image INIT --log LOG [--model M.json]
[--final-image IMG] [--subsets N] [--prefixes N] [--seed S]
[--max-states N] [--kinds K,...] [--assert SPEC] [--report-limit N]
[--keep-failed DIR] [--only ID] [--json OUT] [--workdir DIR] [-v].
SPEC is "all", "none", or a comma list of KIND or KIND:PROBLEM+PROBLEM
(only those problems count), default "final,flush".  Exit status 1 if
an asserted problem was found, 2 on a usage or setup error.  A state's
id (kind:T=N:hash) is the same for the same log, seed and options:
rerun one with --only ID, and --keep-failed DIR saves failing images.

Model file (JSON), written by the workload driver:
  {"files": {"/path": size, ...},     served files to dump and check
   "marker": "DELETED!",              optional
   "blob": "model.data",              file holding written data
   "ops": [{"conn": 0, "kind": "write"|"zero"|"trim"|"flush",
            "file": "/path", "off": N, "len": N, "fua": bool,
            "ok": bool, "blob": OFFSET (writes),
            "t_send": ns, "t_ack": ns,       CLOCK_MONOTONIC: t_send
                                             just BEFORE sending, t_ack
                                             just AFTER the reply
            "pos_send": N, "pos_ack": N,     size of the recorder log
                                             at those moments
            "step": "text"}, ...]}
Ops to the same bytes must not be in flight at the same time (one
connection, or disjoint ranges).  The model applies NBD's multi-conn
rule: a flush on any connection covers writes acknowledged on every
connection before it was sent.
"""

import argparse
import bisect
import hashlib
import json
import mmap
import os
import random
import shutil
import struct
import subprocess
import sys
import time

REC_WRITE, REC_ZERO, REC_TRIM, REC_FLUSH = 1, 2, 3, 4
TYPE_NAMES = {1: "write", 2: "zero", 3: "trim", 4: "flush"}
FLAG_FUA = 1 << 1
REC_MAGIC = 0x31434552
INF = float("inf")
ALL_KINDS = ("final", "flush", "flush-busy", "flush-min", "fua-min", "prefix",
             "subset")


class Record:
    """One call that reached the plugin: .seq, .type, .flags, .err,
    .start, .end (ticks), .offset, .count, .tid, .data (memoryview or
    None), .pos_end (byte offset in the log just after the record)."""
    __slots__ = ("seq", "type", "flags", "err", "start", "end", "offset",
                 "count", "tid", "data", "pos_end", "durable_from")

    @property
    def fua(self):
        return bool(self.flags & FLAG_FUA)

    def is_data(self):
        return self.type != REC_FLUSH

    def __repr__(self):
        return "#%d %s%s %d+%d%s" % (
            self.seq, TYPE_NAMES.get(self.type, "?"),
            "(fua)" if self.fua else "", self.offset, self.count,
            " err=%d" % self.err if self.err else "")


def read_log(path):
    """Parse a recorder log into a list of Records (in completion order).
    A record cut short at the end (the writer was killed) is dropped."""
    f = open(path, "rb")
    size = os.fstat(f.fileno()).st_size
    buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if size else b""
    mv = memoryview(buf)
    if size < 16 or bytes(mv[:8]) != b"NBDKREC\0":
        raise ValueError("%s: not a recorder log" % path)
    version, hdr = struct.unpack_from("<II", buf, 8)
    if version != 1 or hdr != 64:
        raise ValueError("%s: unsupported log version %d" % (path, version))
    recs = []
    pos = 16
    while pos + 64 <= size:
        (magic, typ, _res, flags, err, seq, start, end, off, count, tid,
         dlen) = struct.unpack_from("<IHHIIQQQQIIQ", buf, pos)
        if magic != REC_MAGIC or seq != len(recs):
            raise ValueError("%s: bad record at byte %d" % (path, pos))
        if pos + 64 + dlen > size:
            break
        r = Record()
        r.seq, r.type, r.flags, r.err = seq, typ, flags, err
        r.start, r.end, r.offset, r.count, r.tid = start, end, off, count, tid
        r.data = mv[pos + 64:pos + 64 + dlen] if dlen else None
        pos += 64 + dlen
        r.pos_end = pos
        recs.append(r)
    compute_durability(recs)
    return recs


def compute_durability(recs):
    """Set r.durable_from on every data record: the smallest T (number of
    completed records) at which it is durable, INF if never."""
    flushes = [r for r in recs if r.type == REC_FLUSH]
    good = [f for f in flushes if f.err == 0]
    bad = [f for f in flushes if f.err != 0]
    for r in recs:
        r.durable_from = INF
        if not r.is_data() or r.err:
            continue
        if r.fua and r.type != REC_TRIM:
            r.durable_from = r.seq + 1
            continue
        f1 = next((f for f in good if f.start > r.end), None)
        if f1 is None:
            continue
        # A failed flush that completed after r and before f1 did: the
        # disk may have dropped r.
        if any(r.end < g.end < f1.end for g in bad):
            continue
        r.durable_from = f1.seq + 1


def count_at(recs, pos):
    """Number of records entirely inside the first `pos` bytes of the log."""
    ends = getattr(count_at, "_cache", None)
    if ends is None or ends[0] is not recs:
        ends = (recs, [r.pos_end for r in recs])
        count_at._cache = ends
    return bisect.bisect_right(ends[1], pos)


class Problem:
    """kind: fsck | replay | lost | wrong | stale | dump | final."""
    def __init__(self, kind, text, **info):
        self.kind, self.text, self.info = kind, text, info

    def __repr__(self):
        return "%s: %s" % (self.kind, self.text)


class State:
    """A crash state: the first T records completed, `applied` (sorted
    seqs of data records) on the disk."""
    def __init__(self, kind, T, applied, label, step=""):
        self.kind, self.T, self.applied, self.label = kind, T, applied, label
        self.step = step
        self.ident = "%s:T=%d:%s" % (kind, T, hashlib.sha1(
            repr(applied).encode()).hexdigest()[:10])

    def __repr__(self):
        return "<%s %s>" % (self.ident, self.label)


class Result:
    def __init__(self, state, problems, seconds):
        self.state, self.problems, self.seconds = state, problems, seconds

    @property
    def ok(self):
        return not self.problems

    def kinds(self):
        return sorted(set(p.kind for p in self.problems))


class Model:
    """What the client was promised (see the module docstring)."""

    def __init__(self, spec, recs, base_dir="."):
        self.files = dict(spec["files"])
        self.marker = spec.get("marker", "DELETED!").encode()
        blob = spec.get("blob")
        self.blob = b""
        if blob:
            p = blob if os.path.isabs(blob) else os.path.join(base_dir, blob)
            self.blob = open(p, "rb").read()
        self.ops = sorted(spec["ops"], key=lambda o: o["t_send"])
        self.recs = recs
        for o in self.ops:
            o["c_send"] = count_at(recs, o["pos_send"])
            o["c_ack"] = count_at(recs, o["pos_ack"])
        flushes = [o for o in self.ops if o["kind"] == "flush" and o["ok"]]
        for o in self.ops:
            o["promised_from"] = INF
            if o["kind"] not in ("write", "zero") or not o["ok"]:
                continue
            if o.get("fua"):
                o["promised_from"] = o["c_ack"]
            for f in flushes:
                if f["t_send"] > o["t_ack"]:
                    o["promised_from"] = min(o["promised_from"], f["c_ack"])
        self._intervals = {}
        self._vcache = {}
        for path, size in self.files.items():
            cuts = {0, size}
            mine = [i for i, o in enumerate(self.ops)
                    if o.get("file") == path and o["kind"] != "flush"]
            for i in mine:
                o = self.ops[i]
                cuts.add(max(0, min(size, o["off"])))
                cuts.add(max(0, min(size, o["off"] + o["len"])))
            cuts = sorted(cuts)
            ivs = []
            for lo, hi in zip(cuts, cuts[1:]):
                touch = [i for i in mine if self.ops[i]["off"] < hi and
                         self.ops[i]["off"] + self.ops[i]["len"] > lo]
                ivs.append((lo, hi, touch))
            self._intervals[path] = ivs

    @classmethod
    def load(cls, path, recs):
        return cls(json.load(open(path)), recs, os.path.dirname(path) or ".")

    def step_at(self, T):
        """The workload step of the newest op sent before the crash point."""
        step = ""
        for o in self.ops:
            if o["c_send"] < T:
                step = o.get("step", step)
        return step

    def flush_busy(self, X, prev):
        """Whether a client write, zero or trim may have been half done
        when flush record X completed (prev: the previous successful
        flush record, or -1).  A flush caused by a client request (an NBD
        flush, a FUA write) is quiet if no other data request overlapped
        that request in time; a flush no request caused (ext4fs's
        .finalize or .cleanup) is quiet if no data request was in flight
        anywhere between the previous flush and this one."""
        data = [o for o in self.ops if o["kind"] != "flush"]
        causes = [o for o in self.ops if o["c_send"] <= X < o["c_ack"] and
                  (o["kind"] == "flush" or o.get("fua"))]
        if causes:
            return any(p is not o and p["t_send"] < o["t_ack"] and
                       p["t_ack"] > o["t_send"]
                       for o in causes for p in data)
        return any(o["c_send"] <= X and o["c_ack"] > prev for o in data)

    def _value(self, j, lo, hi, initial):
        key = (j, lo, id(initial))
        v = self._vcache.get(key)
        if v is None:
            if j is None:
                v = initial[lo:hi]
            else:
                o = self.ops[j]
                if o["kind"] == "write":
                    b = o["blob"] + lo - o["off"]
                    v = self.blob[b:b + hi - lo]
                else:
                    v = bytes(hi - lo)
            self._vcache[key] = v
        return v

    def check(self, state, files, harness):
        T = state.T
        problems = []
        for path, size in self.files.items():
            actual = files.get(path)
            if actual is None:
                continue
            initial = harness.initial_files[path]
            lost, wrong = {}, []
            for lo, hi, touch in self._intervals[path]:
                k = None
                for j in reversed(touch):
                    o = self.ops[j]
                    if o["kind"] != "trim" and o["promised_from"] <= T:
                        k = j
                        break
                later = touch[touch.index(k) + 1:] if k is not None else touch
                cands = [self._value(k, lo, hi, initial)]
                cands += [self._value(j, lo, hi, initial) for j in later
                          if self.ops[j]["c_send"] < T]
                bad = _mismatch(actual, lo, hi, cands)
                if not bad:
                    continue
                first, nbad = bad
                if k is None:
                    wrong.append((first, nbad))
                else:
                    e = lost.setdefault(k, [first, 0])
                    e[1] += nbad
            for k, (first, nbad) in sorted(lost.items()):
                o = self.ops[k]
                problems.append(Problem(
                    "lost", "%s: %d byte(s) of the %s%s %d+%d (step %r, "
                    "promised at T=%d) missing, first at %d, which holds %s" % (
                        path, nbad, o["kind"], " (FUA)" if o.get("fua") else "",
                        o["off"], o["len"], o.get("step", ""),
                        o["promised_from"], first,
                        self.whose(actual, first, harness)),
                    path=path, op=k, first=first))
            if wrong:
                problems.append(Problem(
                    "wrong", "%s: %d byte(s) in %d range(s) hold data never "
                    "written there, first at %d, which holds %s" % (
                        path, sum(n for _, n in wrong), len(wrong),
                        wrong[0][0], self.whose(actual, wrong[0][0], harness)),
                    path=path, first=wrong[0][0]))
        return problems

    def whose(self, actual, at, harness):
        """Where the bytes at actual[at:] come from, as far as can be told:
        zeros, the marker, some client write, some file's initial data."""
        snip = bytes(actual[at:at + 64])
        if not snip:
            return "nothing (the file is short)"
        if snip == bytes(len(snip)):
            return "zeros"
        if self.marker[:4] in snip or snip[:8] in self.marker * 2:
            return "the deleted-file marker"
        i = self.blob.find(snip)
        if i >= 0:
            for j, o in enumerate(self.ops):
                if o["kind"] == "write" and o["blob"] <= i < o["blob"] + o["len"]:
                    return "data of the write %s %d+%d (step %r) for its " \
                        "offset %d%s" % (
                        o["file"], o["off"], o["len"], o.get("step", ""),
                        o["off"] + i - o["blob"],
                        "" if o["c_send"] < harness.current_T else
                        " NOT YET SENT at this crash point")
        for p, d in harness.initial_files.items():
            i = d.find(snip)
            if i >= 0:
                return "initial data of %s at %d" % (p, i)
        return "unknown bytes (metadata?)"


def _mismatch(actual, lo, hi, cands):
    """None if every 512-byte piece (at file offsets that are multiples of
    512) of actual[lo:hi] equals the same piece of some candidate, else
    (first bad byte, number of bytes in bad pieces).  A piece never spans
    two plugin writes: ext4fs writes whole blocks or runs of them, and
    interval bounds are op bounds."""
    a = actual[lo:hi]
    if len(a) == hi - lo and any(a == c for c in cands):
        return None
    first, nbad = None, 0
    for big in range(lo - lo % 4096, hi, 4096):
        s, e = max(lo, big) - lo, min(hi, big + 4096) - lo
        ab = a[s:e]
        if len(ab) == e - s and any(ab == c[s:e] for c in cands):
            continue
        clo, end = max(lo, big), min(hi, big + 4096)
        while clo < end:
            nxt = min(end, clo - clo % 512 + 512)
            cs_, ce = clo - lo, nxt - lo
            clo = nxt
            ac = a[cs_:ce]
            if len(ac) == ce - cs_ and any(ac == c[cs_:ce] for c in cands):
                continue
            nbad += ce - cs_
            if first is None:
                c0 = cands[0][cs_:ce]
                i = next((i for i in range(min(len(ac), len(c0)))
                          if ac[i] != c0[i]), 0)
                first = lo + cs_ + i
    return (first, nbad) if nbad else None


def _run(cmd, timeout=60):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout)


def fsck_problems(out):
    """The interesting lines of e2fsck's output."""
    lines = []
    for l in out.decode(errors="replace").splitlines():
        if not l.strip() or l.startswith(("Pass ", "e2fsck 1.", "Warning: skipping")):
            continue
        lines.append(l.strip())
    return lines


def needs_recovery(path):
    with open(path, "rb") as f:
        f.seek(1024 + 0x60)
        incompat = struct.unpack("<I", f.read(4))[0]
    return bool(incompat & 0x4)


class Harness:
    """Builds crash states of `log` (a list of Records) over the initial
    image and checks them, in `workdir`."""

    def __init__(self, image, recs, workdir, model=None, files=None,
                 marker=None, checks=(), final_image=None, verbose=False):
        self.image, self.recs, self.workdir = image, recs, workdir
        self.model, self.checks = model, list(checks)
        self.final_image, self.verbose = final_image, verbose
        self.files = dict(model.files) if model else dict.fromkeys(files or [])
        self.marker = marker or (model.marker if model else b"DELETED!")
        os.makedirs(workdir, exist_ok=True)
        self.state_path = os.path.join(workdir, "state.img")
        self.replay_path = os.path.join(workdir, "replayed.img")
        self.base = bytearray(open(image, "rb").read())
        self.base_c = 0
        with open(self.state_path, "wb") as f:
            f.write(self.base)
        init = self.state_path
        if needs_recovery(init):
            shutil.copyfile(init, self.replay_path)
            _run(["e2fsck", "-E", "journal_only", "-y", self.replay_path])
            init = self.replay_path
        self.initial_files = self.dump(init)
        for p, d in self.initial_files.items():
            if d is None:
                raise ValueError("cannot dump %s from the initial image" % p)
            if self.marker in d:
                raise ValueError("%s already holds the marker in the "
                                 "initial image" % p)
        self.data = [r for r in recs if r.is_data()]

    # --- state generation ---------------------------------------------
    def c_of(self, T):
        """Every data record before this index is durable at T."""
        for r in self.data:
            if r.seq >= T:
                return T
            if r.durable_from > T:
                return r.seq
        return T

    def _step(self, T):
        return self.model.step_at(T) if self.model else ""

    def generate(self, subsets=4, prefixes=1, seed=1, max_states=None,
                 kinds=ALL_KINDS):
        """The list of states to check (duplicates removed)."""
        rnd = random.Random(seed)
        recs, n = self.recs, len(self.recs)
        flushes = [r for r in recs if r.type == REC_FLUSH and r.err == 0]
        out, seen = [], set()

        def add(kind, T, applied, label):
            key = (T, tuple(applied))
            if key in seen or kind not in kinds:
                return
            seen.add(key)
            out.append(State(kind, T, tuple(applied), label, self._step(T)))

        add("final", n, [r.seq for r in self.data], "all %d records" % n)
        bounds = [-1] + [f.seq for f in flushes] + [n]
        for i, f in enumerate(flushes):
            T = f.seq + 1
            kind = "flush"
            if self.model and self.model.flush_busy(
                    f.seq, flushes[i - 1].seq if i else -1):
                kind = "flush-busy"
            add(kind, T, [r.seq for r in self.data if r.seq < T],
                "flush #%d (record %d), all before it" % (i + 1, f.seq))
            add("flush-min", T, [r.seq for r in self.data
                                 if r.seq < T and r.durable_from <= T],
                "flush #%d (record %d), only the durable records" %
                (i + 1, f.seq))
        if self.model:
            fua_T = sorted(set(o["c_ack"] for o in self.model.ops
                               if o.get("fua") and o["ok"] and
                               o["kind"] in ("write", "zero")))
        else:
            fua_T = [r.seq + 1 for r in self.data if r.fua and not r.err]
        for T in fua_T:
            T = min(T, n)
            add("fua-min", T, [r.seq for r in self.data
                               if r.seq < T and r.durable_from <= T],
                "FUA request acknowledged by T=%d, only the durable records"
                % T)
        rnd_states = []
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i] + 1, bounds[i + 1]   # records lo..hi-1
            if hi <= lo:
                continue
            for j in range(prefixes if prefixes >= 0 else hi - lo):
                T = rnd.randint(lo + 1, hi) if prefixes >= 0 else lo + 1 + j
                rnd_states.append(("prefix", T, None,
                                   "interval %d, prefix of %d records" % (i, T)))
            for j in range(subsets):
                T = hi if j == 0 else rnd.randint(lo + 1, hi)
                p = rnd.choice((0.1, 0.3, 0.5, 0.7, 0.9))
                sub_seed = rnd.getrandbits(32)
                rnd_states.append(("subset", T, (p, sub_seed),
                                   "interval %d, T=%d, p=%.1f, subseed=%d" %
                                   (i, T, p, sub_seed)))
        if max_states is not None:
            room = max(0, max_states - len(out))
            if len(rnd_states) > room:
                keep = sorted(rnd.sample(range(len(rnd_states)), room))
                rnd_states = [rnd_states[k] for k in keep]
        for kind, T, par, label in rnd_states:
            if par is None:
                applied = [r.seq for r in self.data if r.seq < T]
            else:
                p, sub_seed = par
                r2 = random.Random(sub_seed)
                applied = [r.seq for r in self.data if r.seq < T and
                           (r.durable_from <= T or r2.random() < p)]
            add(kind, T, applied, label)
        return out

    # --- building a state on disk ---------------------------------------
    def _put(self, fd, r, into=None):
        end = r.offset + r.count
        if end > len(self.base):
            raise ValueError("record %r beyond the image (%d bytes)" %
                             (r, len(self.base)))
        data = r.data if r.type == REC_WRITE else bytes(r.count)
        if r.type == REC_WRITE and len(data) != r.count:
            raise ValueError("record %r: %d bytes of data" % (r, len(data)))
        os.pwrite(fd, data, r.offset)
        if into is not None:
            into[r.offset:end] = data

    def _advance(self, fd, c):
        """Apply every data record with seq < c to the base image."""
        for r in self.data:
            if r.seq < self.base_c:
                continue
            if r.seq >= c:
                break
            self._put(fd, r, self.base)
        self.base_c = max(self.base_c, c)

    def _checkpoint_of(self, state):
        """Every data record before the returned seq is in state.applied."""
        applied = set(state.applied)
        for r in self.data:
            if r.seq >= state.T:
                return state.T
            if r.seq not in applied:
                return r.seq
        return state.T

    def dump(self, path):
        """{served path: bytes or None} read with debugfs from the image."""
        if not self.files:
            return {}
        cmds, outs = [], []
        for i, p in enumerate(self.files):
            out = os.path.join(self.workdir, "dump.%d" % i)
            if os.path.exists(out):
                os.unlink(out)
            cmds.append("dump %s %s" % (p, out))
            outs.append(out)
        cmdfile = os.path.join(self.workdir, "dump.cmds")
        with open(cmdfile, "w") as f:
            f.write("\n".join(cmds) + "\n")
        _run(["debugfs", "-c", "-f", cmdfile, path])
        res = {}
        for p, out in zip(self.files, outs):
            try:
                res[p] = open(out, "rb").read()
            except OSError:
                res[p] = None
        return res

    # --- checking ---------------------------------------------------------
    def check_image(self, path, state=None):
        """Run every check on an image file; returns [Problem]."""
        problems = []
        if needs_recovery(path):
            shutil.copyfile(path, self.replay_path)
            path = self.replay_path
            r = _run(["e2fsck", "-E", "journal_only", "-y", path])
            if r.returncode >= 4 or needs_recovery(path):
                problems.append(Problem(
                    "replay", "e2fsck -E journal_only exit %d: %s" %
                    (r.returncode, "; ".join(fsck_problems(r.stdout)[:6]))))
        # e2fsck and debugfs only read the image: run them side by side.
        fsck = subprocess.Popen(["e2fsck", "-fn", path], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            files = self.dump(path) if self.files else {}
            fsck_out = fsck.communicate(timeout=60)[0]
        finally:
            if fsck.poll() is None:
                fsck.kill()
                fsck.wait()
        if fsck.returncode != 0:
            lines = fsck_problems(fsck_out)
            problems.append(Problem(
                "fsck", "e2fsck -fn exit %d: %s" % (
                    fsck.returncode, "; ".join(lines[:8]) +
                    (" (+%d lines)" % (len(lines) - 8) if len(lines) > 8 else "")),
                lines=lines))
        if self.files:
            for p, d in sorted(files.items()):
                if d is None:
                    problems.append(Problem("dump", "debugfs cannot dump %s" % p))
                    continue
                size = self.files.get(p)
                if size is not None and len(d) != size:
                    problems.append(Problem(
                        "dump", "%s: %d bytes, expected %d" % (p, len(d), size)))
                at = d.find(self.marker)
                if at >= 0:
                    blocks = len(set(i // 1024 for i in _finditer(d, self.marker)))
                    problems.append(Problem(
                        "stale", "%s: deleted-file marker %r visible at byte "
                        "%d (%d KiB holding it)" % (p, self.marker, at, blocks),
                        path=p, first=at))
            if self.model and state is not None:
                self.current_T = state.T
                problems += self.model.check(state, files, self)
            for fn in self.checks:
                problems += fn(state, files, self) or []
        return problems

    def check_state(self, state, keep_dir=None):
        t0 = time.monotonic()
        c = self._checkpoint_of(state)
        fd = os.open(self.state_path, os.O_RDWR)
        try:
            if c < self.base_c:
                raise ValueError("states must be checked in checkpoint order")
            self._advance(fd, c)
            applied = set(state.applied)
            top = [r for r in self.data if r.seq >= c and r.seq in applied]
            for r in top:
                self._put(fd, r)
            problems = self.check_image(self.state_path, state)
            if state.kind == "final" and self.final_image:
                if not _same_file(self.state_path, self.final_image):
                    problems.append(Problem(
                        "final", "the log replayed over the initial image "
                        "differs from the real final image (recorder bug?)"))
            if problems and keep_dir:
                os.makedirs(keep_dir, exist_ok=True)
                shutil.copyfile(self.state_path, os.path.join(
                    keep_dir, state.ident.replace(":", "_") + ".img"))
            for r in top:
                os.pwrite(fd, self.base[r.offset:r.offset + r.count], r.offset)
        finally:
            os.close(fd)
        return Result(state, problems, time.monotonic() - t0)

    def run(self, states, keep_dir=None, out=sys.stdout, only=None,
            limit=None, full_kinds=ALL_KINDS):
        """Check the states; print every failing state of full_kinds, and
        at most `limit` failing states of each other kind."""
        states = sorted(states, key=lambda s: (self._checkpoint_of(s), s.T))
        results = []
        shown = {}
        for s in states:
            if only and s.ident != only:
                continue
            res = self.check_state(s, keep_dir)
            results.append(res)
            if not res.ok and s.kind not in full_kinds and limit is not None:
                shown[s.kind] = shown.get(s.kind, 0) + 1
                if shown[s.kind] > limit:
                    continue
            if out and (self.verbose or not res.ok):
                out.write("%s %s [%s] step=%r: %s\n" % (
                    "ok  " if res.ok else "BAD ", s.ident, s.label, s.step,
                    "; ".join(map(repr, res.problems)) or "clean"))
                out.flush()
        return Summary(results)


def _finditer(data, pat):
    i = data.find(pat)
    while i >= 0:
        yield i
        i = data.find(pat, i + len(pat))


def _same_file(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


class Summary:
    def __init__(self, results):
        self.results = results

    def bad(self, spec=None):
        """Failing results that `spec` asserts (see parse_assert; None:
        every kind, every problem)."""
        if spec is None:
            spec = dict.fromkeys(ALL_KINDS)
        return [r for r in self.results if not r.ok and r.state.kind in spec
                and (spec[r.state.kind] is None or
                     set(r.kinds()) & spec[r.state.kind])]

    def line(self):
        res = self.results
        incons = sum(1 for r in res if any(p.kind in ("fsck", "replay", "dump")
                                            for p in r.problems))
        lost = sum(1 for r in res for p in r.problems if p.kind == "lost")
        stale = sum(1 for r in res if any(p.kind == "stale" for p in r.problems))
        wrong = sum(1 for r in res if any(p.kind == "wrong" for p in r.problems))
        return ("%d states checked, %d inconsistent, %d lost writes, "
                "%d stale-data exposures, %d with wrong data" %
                (len(res), incons, lost, stale, wrong))

    def table(self):
        """Per kind: checked, and how many states have each problem kind."""
        rows = []
        for kind in ALL_KINDS:
            rs = [r for r in self.results if r.state.kind == kind]
            if not rs:
                continue
            cnt = {}
            for r in rs:
                for k in r.kinds():
                    cnt[k] = cnt.get(k, 0) + 1
            rows.append("  %-10s %4d states, %4d bad%s" % (
                kind, len(rs), sum(1 for r in rs if not r.ok),
                "".join(" %s=%d" % kv for kv in sorted(cnt.items()))))
        return "\n".join(rows)

    def findings(self):
        """Problems grouped by (state kind, problem kind, workload step):
        [(kind, problem, step, count, example Result, example Problem)]."""
        groups = {}
        for r in self.results:
            for p in r.problems:
                key = (r.state.kind, p.kind, r.state.step)
                g = groups.setdefault(key, [0, r, p])
                g[0] += 1
        return [k + tuple(v) for k, v in sorted(groups.items())]

    def to_json(self):
        return [{"id": r.state.ident, "kind": r.state.kind, "T": r.state.T,
                 "label": r.state.label, "step": r.state.step,
                 "seconds": round(r.seconds, 4),
                 "problems": [{"kind": p.kind, "text": p.text}
                              for p in r.problems]} for r in self.results]


def parse_assert(text):
    """"final,flush,prefix:lost+stale" -> {kind: None (every problem) or a
    set of problem kinds}; "all" asserts everything, "none" nothing."""
    if text == "all":
        return dict.fromkeys(ALL_KINDS)
    spec = {}
    for item in filter(None, text.split(",")):
        if item == "none":
            continue
        kind, _, probs = item.partition(":")
        if kind not in ALL_KINDS:
            raise ValueError("unknown kind of state %r" % kind)
        spec[kind] = set(probs.split("+")) if probs else None
    return spec


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Check the crash states of a recorder log (see the "
        "module docstring for the rules).")
    ap.add_argument("--image", required=True, help="the image before the run")
    ap.add_argument("--log", required=True, help="the recorder log")
    ap.add_argument("--model", help="model JSON of the client's operations")
    ap.add_argument("--file", action="append", default=[],
                    help="a served path to scan for the marker (no model)")
    ap.add_argument("--marker", help="deleted-file marker (default DELETED!)")
    ap.add_argument("--final-image", help="the real image after the run")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--subsets", type=int, default=4,
                    help="random power-loss subsets per flush interval")
    ap.add_argument("--prefixes", type=int, default=1,
                    help="random process-crash prefixes per interval "
                    "(-1: every prefix)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-states", type=int, default=None)
    ap.add_argument("--kinds", default="all",
                    help="kinds of states to generate (comma list)")
    ap.add_argument("--assert", dest="assert_kinds", default="final,flush",
                    help="what fails the run: comma list of KIND or "
                    "KIND:PROBLEM+PROBLEM (problems: fsck replay lost wrong "
                    "stale dump final), 'all' or 'none'")
    ap.add_argument("--report-limit", type=int, default=None,
                    help="print at most N failing states of each kind "
                    "that is not asserted")
    ap.add_argument("--keep-failed", help="copy failing state images here")
    ap.add_argument("--only", help="check only the state with this id")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)

    t0 = time.monotonic()
    try:
        recs = read_log(a.log)
        model = Model.load(a.model, recs) if a.model else None
        workdir = a.workdir or os.path.join(
            os.path.dirname(os.path.abspath(a.log)), "crashstates.work")
        h = Harness(a.image, recs, workdir, model=model, files=a.file,
                    marker=a.marker.encode() if a.marker else None,
                    final_image=a.final_image, verbose=a.verbose)
    except (OSError, ValueError) as e:
        print("crashstates: %s" % e, file=sys.stderr)
        return 2
    kinds = ALL_KINDS if a.kinds == "all" else tuple(a.kinds.split(","))
    try:
        aspec = parse_assert(a.assert_kinds)
    except ValueError as e:
        print("crashstates: --assert: %s" % e, file=sys.stderr)
        return 2
    states = h.generate(subsets=a.subsets, prefixes=a.prefixes, seed=a.seed,
                        max_states=a.max_states, kinds=kinds)
    nflush = sum(1 for r in recs if r.type == REC_FLUSH)
    nbadflush = sum(1 for r in recs if r.type == REC_FLUSH and r.err)
    print("log: %d records (%d data, %d flushes, %d failed); %d states, "
          "seed %d" % (len(recs), len(h.data), nflush, nbadflush, len(states),
                       a.seed))
    summary = h.run(states, keep_dir=a.keep_failed, only=a.only,
                    limit=a.report_limit, full_kinds=tuple(aspec))
    print("per kind of state:")
    print(summary.table())
    fnd = summary.findings()
    if fnd:
        print("findings (state kind / problem / workload step: how many "
              "states; one example):")
    for kind, prob, step, n, res, p in fnd:
        print("  %-10s %-6s step=%-14s %4d  e.g. %s [%s]: %s" % (
            kind, prob, step or "-", n, res.state.ident, res.state.label,
            p.text[:300]))
    print(summary.line() + " (%.1f s)" % (time.monotonic() - t0))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary.to_json(), f, indent=1)
    bad = summary.bad(aspec)
    if bad:
        print("FAILED: %d state(s) have asserted problems (--assert %s):" %
              (len(bad), a.assert_kinds))
        for r in bad[:20]:
            print("  %s [%s] step=%r: %s" % (
                r.state.ident, r.state.label, r.state.step,
                "; ".join(map(repr, r.problems))[:600]))
        if len(bad) > 20:
            print("  ... and %d more%s" % (len(bad) - 20, " (all in %s)" %
                                           a.json if a.json else ""))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
