#!/usr/bin/env bash
# Limits of a file that libext2fs finds only after changing the tree
# are checked before anything is allocated: a write into a hole that
# would overflow i_blocks (no huge_file: 32 bits of 512-byte sectors),
# or that lies past what an indirect file can map (12 + b + b^2 + b^3
# blocks), fails with ENOSPC (EFBIG below, which NBD sends as ENOSPC)
# without a single write reaching the plugin (counted by
# tests/nbdkit-failnth-filter.c), and the filesystem is not marked with
# errors: overwrites and writes elsewhere keep working.  Each part ends
# with a clean stop, the test's own changes to the inode undone,
# e2fsck -fn and a byte comparison.
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
failnth=$(test_filter failnth)
cd "$tmpdir"

cat > limits.py <<'EOF'
import errno, os, sys
import e4test as t
sock, ctl, expf, outf, o, n = sys.argv[1:7]
o = int(o); n = int(n)
h = t.connect(sock)
m = t.Shadow(h, open(expf, "rb").read())   # the start of the file
m.pwrite(bytes(m[0:1024]), 0)              # the first change, unarmed
open(ctl, "w").write("g%d 0 w\n" % os.getpid())
t.expect_errno("the write past the file's limit",
               lambda: h.pwrite(os.urandom(n), o), errno.ENOSPC,
               errname="ENOSPC (EFBIG)")
writes = int(open(ctl + ".count").read()) if os.path.exists(ctl + ".count") else 0
os.unlink(ctl)
if writes:
    t.fail("%d write(s) reached the plugin before the limit was found" % writes)
if h.pread(n, o) != bytes(n):
    t.fail("the refused write left data")
m.check_all("after the refused write")
m.pwrite(os.urandom(3000), 100)            # an overwrite still works
m.check_all("after an overwrite")
h.flush()
h.shutdown()
m.save(outf)
EOF

# run NAME IMG OFFSET LEN: serve IMG's /f, run limits.py.
run ()
{
    local name=$1 img=$2 o=$3 n=$4
    rm -f ctl ctl.* sock out
    start_nbdkit "$tmpdir/sock" --filter="$FILTER" --filter="$failnth" \
        file "$img" ext4file=/f failnth-file="$tmpdir/ctl" 2> srv.err
    /usr/bin/python3 limits.py "$tmpdir/sock" "$tmpdir/ctl" expected out "$o" "$n" ||
        { tail -5 srv.err; fail "$name"; }
    stop_nbdkit "$tmpdir/sock"
    grep -qE "marking the filesystem|aborting the journal" srv.err &&
        { tail -5 srv.err; fail "$name: marked with errors or journal aborted"; }
    :
}

blockcount () { debugfs -R "stat /f" "$1" 2>/dev/null | sed -n 's/.*Blockcount: \([0-9]*\).*/\1/p'; }

# 1 and 2. i_blocks close to its 32-bit limit (set with debugfs, and
# put back before e2fsck), ext2 (indirect) and ext4 without huge_file,
# without and with a journal.
for flavour in "ext2 -b 1024" "ext4 -b 4096 -O ^huge_file,^has_journal" \
               "ext4 -b 4096 -O ^huge_file"; do
    echo "== i_blocks limit: $flavour"
    rm -rf src img
    mkdir src
    head -c 100000 /dev/urandom > src/f
    truncate -s 4M src/f
    truncate -s 32M img
    # shellcheck disable=SC2086
    mke2fs -q -F -t $flavour -d src img
    debugfs -R "dump /f $tmpdir/expected" img >/dev/null 2>&1
    orig=$(blockcount img)
    debugfs -w -R "sif /f blocks $(( 0xffffffff - 8 ))" img 2>/dev/null
    run "i_blocks limit ($flavour)" img $((2 * 1024 * 1024)) 65536
    debugfs -w -R "sif /f blocks $orig" img 2>/dev/null
    fsck_clean img
    dump_cmp img /f out
done

# 3. An indirect file (1 KiB blocks) with i_size past what it can map
# (12 + 256 + 256^2 + 256^3 blocks, 16 GiB and a bit): a write across
# that limit.
echo "== indirect file past its last mappable block"
rm -rf src img
mkdir src
head -c 100000 /dev/urandom > src/f
truncate -s 32M img
mke2fs -q -F -t ext2 -b 1024 -d src img
debugfs -R "dump /f $tmpdir/expected" img >/dev/null 2>&1
debugfs -w -R "sif /f size $((20 << 30))" img 2>/dev/null
run "indirect limit" img $(( (12 + 256 + 256*256 + 256*256*256 - 2) * 1024 )) 4096
debugfs -w -R "sif /f size 100000" img 2>/dev/null
fsck_clean img
dump_cmp img /f out
echo "limits refused before anything was allocated"
