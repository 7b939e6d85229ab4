#!/usr/bin/env bash
# FUA and flush reach the plugin.  The log filter sits BELOW ext4fs
# (the first --filter is outermost), so its log shows exactly what
# ext4fs sends to the plugin:
#  1. a FUA write over already-written blocks (aligned and unaligned)
#     reaches the plugin as a Write of the block's physical location
#     with fua=1, or as that Write followed by a Flush, before the
#     reply (and with fua=1 when the plugin supports FUA, as the file
#     plugin does);
#  2. a FUA write into a hole is followed by a plugin Flush (after
#     every Write it caused) before the reply;
#  3. an NBD flush (after plain writes, and with nothing dirty) leads
#     to a plugin Flush before the reply;
#  4. a read-only (-r) server: reads, block status and flushes send
#     only reads and Flushes to the plugin (no Write at all), and the
#     image's sha256 is unchanged; the same for a read-write server
#     that is only read from.
# Then e2fsck and a byte comparison.
source "$srcdir/functions.sh"
requires nbdsh --version
requires python3 -c 'import nbd'
requires debugfs -V
requires sha256sum --version
cd "$tmpdir"

cat > fua.py <<'EOF'
import os, re, sys
import nbd
import e4test as t

mode, sock, log, orig_path, out = sys.argv[1:6]
bs = int(sys.argv[6])
phys = [int(x) for x in sys.argv[7:]]   # physical block of logical block i
orig = open(orig_path, "rb").read()
size = len(orig)
rnd = t.client_rng(scale=1)
h = t.connect(sock, size=size, contexts=[nbd.CONTEXT_BASE_ALLOCATION])
m = t.Shadow(h, orig, who=mode)

pos = 0
def new_lines():
    """Complete log lines written since the last call."""
    global pos
    with open(log, "rb") as f:
        f.seek(pos)
        data = f.read()
    end = data.rfind(b"\n") + 1
    pos += end
    return [l.decode() for l in data[:end].split(b"\n") if l]

wr_re = re.compile(r" Write id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+) fua=(\d)")
def parse(lines):
    """[(kind, off, count, fua)] in log order (calls, not returns), plus
    the number of failed returns."""
    ev = []
    bad = 0
    for l in lines:
        m = wr_re.search(l)
        if m:
            ev.append(("W", int(m.group(1), 16), int(m.group(2), 16),
                       int(m.group(3))))
        elif re.search(r" Flush id=\d+ \.\.\.$", l):
            ev.append(("F", 0, 0, 0))
        elif re.search(r" (Read|Extents|Cache|Zero|Trim) id=\d+ ", l) and \
                not "...." in l and not "return=" in l:
            ev.append((l.split()[3][0], 0, 0, 0))
        if "return=" in l and "return=0" not in l:
            bad += 1
    return ev, bad

def fail(msg, lines):
    """Fail with MSG, after the log LINES it is about."""
    sys.stderr.write("\n".join(lines) + "\n")
    t.fail("%s: %s" % (mode, msg))

def write(off, n, flags=0):
    m.randwrite(rnd, off, n, flags)

if mode == "rw":
    # What the plugin (as seen by the log filter) offers for FUA on
    # the read-write context ext4fs opened.
    conn = [l for l in new_lines() if " Connect " in l and " write=1 " in l]
    if not conn:
        t.fail("rw: no read-write Connect line in the log")
    plugin_fua = int(re.search(r" fua=(\d)", conn[-1]).group(1))

    # 1. FUA overwrites of written blocks: aligned (logical block 1),
    # unaligned inside one block (block 2), and spanning blocks 3..5.
    for off, n, blocks in ((bs, bs, [1]), (2 * bs + 100, 333, [2]),
                           (3 * bs + 7, 2 * bs, [3, 4, 5])):
        write(off, n, nbd.CMD_FLAG_FUA)
        lines = new_lines()
        ev, bad = parse(lines)
        if bad:
            fail("a plugin call failed", lines)
        for b in blocks:
            p = phys[b] * bs
            # The Write covering this physical block.
            idx = [i for i, e in enumerate(ev)
                   if e[0] == "W" and e[1] <= p and p + bs <= e[1] + e[2]]
            if not idx:
                fail("FUA overwrite of logical block %d: no Write of physical "
                     "block %d reached the plugin" % (b, phys[b]), lines)
            i = idx[-1]
            if ev[i][3] != 1 and not any(e[0] == "F" for e in ev[i+1:]):
                fail("FUA overwrite of logical block %d: Write without fua=1 "
                     "and no Flush after it" % b, lines)
            # The plugin supports FUA: it must be passed down.
            if plugin_fua > 0 and ev[i][3] != 1:
                fail("FUA overwrite of logical block %d: the plugin supports "
                     "FUA (fua=%d) but the Write has fua=0" %
                     (b, plugin_fua), lines)
        print("FUA overwrite %d+%d: %s" %
              (off, n, " ".join("%s%s" % (e[0], "(fua)" if e[3] else "")
                                for e in ev)))

    # 2. FUA writes into holes: aligned, unaligned, crossing the end of
    # the data into the hole.
    hole = int(os.environ["HOLE"])
    for off, n in ((hole, bs), (hole + 5 * bs + 17, 1000),
                   (int(os.environ["DATA_END"]) - 100, 2 * bs)):
        write(off, n, nbd.CMD_FLAG_FUA)
        lines = new_lines()
        ev, bad = parse(lines)
        if bad:
            fail("a plugin call failed", lines)
        ws = [i for i, e in enumerate(ev) if e[0] == "W"]
        fs = [i for i, e in enumerate(ev) if e[0] == "F"]
        if not ws:
            fail("FUA write into a hole at %d: no Write reached the plugin"
                 % off, lines)
        # Either a Flush after the last Write, or (a journal commit)
        # a Flush after every Write but the last, which has FUA (the
        # commit block).
        if not fs or (fs[-1] < ws[-1] and
                      not (ev[ws[-1]][3] and len(ws) >= 2 and
                           fs[-1] > ws[-2])):
            fail("FUA write into a hole at %d: no plugin Flush after the "
                 "last Write before the reply" % off, lines)
        print("FUA hole write %d+%d: %s" %
              (off, n, " ".join("%s%s" % (e[0], "(fua)" if e[3] else "")
                                for e in ev)))

    # 3. Plain writes (over data and into a hole), then an NBD flush.
    write(7 * bs + 3, 5000)
    write(int(os.environ["HOLE"]) + 20 * bs, 3 * bs)
    new_lines()
    h.flush()
    lines = new_lines()
    ev, bad = parse(lines)
    if bad or not any(e[0] == "F" for e in ev):
        fail("NBD flush after writes: no plugin Flush before the reply", lines)
    fs = [i for i, e in enumerate(ev) if e[0] == "F"]
    after = [e for e in ev[fs[-1]:] if e[0] == "W"]
    # Nothing after the last Flush, or only a commit block with FUA.
    if after and not (len(after) == 1 and after[0][3]):
        fail("NBD flush: a Write after the last plugin Flush", lines)
    # Nothing dirty: still a plugin flush.
    h.flush()
    lines = new_lines()
    ev, bad = parse(lines)
    if bad or not any(e[0] == "F" for e in ev):
        fail("NBD flush with nothing dirty: no plugin Flush", lines)

    m.check_all("content")
    h.shutdown()
    m.save(out)

elif mode in ("ro", "rw-readonly-session"):
    new_lines()
    for i in range(3):
        m.check_all("read", piece=1 << 20)
        for _ in range(20):
            n = rnd.randint(1, 100000)
            off = rnd.randint(0, size - n)
            m.check(off, n, "read %d+%d" % (off, n))
        exts = []
        h.block_status(size, 0,
                       lambda ctx, off, e, err: exts.append(list(e)) or 0)
        if not exts:
            t.fail("%s: no block status" % mode)
        new_lines()
        h.flush()
        lines = new_lines()
        ev, bad = parse(lines)
        if bad:
            fail("a plugin call failed", lines)
        if [e[0] for e in ev] != ["F"]:
            fail("flush on a read-only session: expected exactly one plugin "
                 "Flush, got %s" % [e[0] for e in ev], lines)
    if mode == "ro":
        if h.is_read_only() != 1:
            t.fail("ro: the export is not read-only")
    h.shutdown()
    lines = new_lines()
    whole = open(log).read().split("\n")
    if any(" Write id=" in l or " Zero id=" in l or " Trim id=" in l
           for l in whole):
        fail("a read-only session wrote to the plugin", whole)
EOF

export SEED=$RANDOM
echo "SEED=$SEED"

for flavour in ext4 ext2-1k; do
    echo "=== $flavour"
    case $flavour in
        ext4)    mkfs=(-t ext4 -b 4096); bs=4096 ;;
        ext2-1k) mkfs=(-t ext2 -b 1024); bs=1024 ;;
    esac
    rm -rf src img log* out
    mkdir src
    # /f: 4M+77; data in the first 256K, hole after.
    data_end=262144
    truncate -s $((4*1024*1024 + 77)) src/f
    head -c $data_end /dev/urandom | dd of=src/f conv=notrunc status=none
    truncate -s 64M img
    mke2fs -q -F "${mkfs[@]}" -d src img
    phys=()
    for b in 0 1 2 3 4 5 6 7; do
        p=$(debugfs -R "bmap /f $b" img 2>/dev/null)
        [ -n "$p" ] && [ "$p" -gt 0 ] || fail "test setup: bmap /f $b: '$p'"
        phys+=($p)
    done

    # 1-3: read-write server, log filter below ext4fs.
    sock=$tmpdir/sock-$flavour
    : > log
    start_nbdkit $sock --filter="$FILTER" --filter=log file img \
        ext4file=/f logfile=$tmpdir/log
    HOLE=$((1024*1024)) DATA_END=$data_end \
        python3 fua.py rw $sock log src/f out $bs "${phys[@]}" ||
        fail "FUA/flush checks failed"
    stop_nbdkit $sock
    fsck_clean img
    dump_cmp img /f out

    # 4. Read-only server: reads, block status, flushes; no writes.
    sum0=$(sha256sum < img)
    sock=$tmpdir/sock-$flavour-ro
    rm -f log; : > log
    start_nbdkit $sock -r --filter="$FILTER" --filter=log file img \
        ext4file=/f logfile=$tmpdir/log
    python3 fua.py ro $sock log out out 0 || fail "read-only session failed"
    stop_nbdkit $sock
    grep -q ' Flush id=' log || fail "read-only: no plugin flush in the log"
    [ "$(sha256sum < img)" = "$sum0" ] ||
        fail "read-only session changed the image"

    # A read-write server that is only read from leaves the image
    # byte-for-byte unchanged, too.
    sock=$tmpdir/sock-$flavour-rw0
    rm -f log; : > log
    start_nbdkit $sock --filter="$FILTER" --filter=log file img \
        ext4file=/f logfile=$tmpdir/log
    python3 fua.py rw-readonly-session $sock log out out 0 ||
        fail "read-write server, read-only session failed"
    stop_nbdkit $sock
    [ "$(sha256sum < img)" = "$sum0" ] ||
        fail "a read-write server that was only read from changed the image"
    fsck_clean img
    dump_cmp img /f out
done
echo "FUA and flush reach the plugin"
