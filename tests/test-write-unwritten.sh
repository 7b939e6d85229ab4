#!/usr/bin/env bash
# Writes into unwritten (uninit) extents.  The files are created empty
# by mke2fs -d, then given unwritten extents with debugfs's fallocate
# and their size set with debugfs's sif.  Small and large unaligned
# writes inside unwritten extents must read back correctly, untouched
# parts must still read as zeros, e2fsck must stay clean, written
# blocks must no longer be Uninit, and the extent count must stay small
# (no per-block fragmentation).
source "$srcdir/functions.sh"
requires nbdsh --version
requires nbdcopy --version
requires debugfs -V
cd "$tmpdir"

# extents IMG PATH: the leaf extents of PATH, "first last flags
# physical" a line.
extents ()
{
    debugfs -R "ex $2" "$1" 2>/dev/null | sed 's|/ *|/|g' | awk '
        NR == 1 { next }
        {
            split($1, lv, "/")
            if (lv[1] != lv[2]) next      # index node, not a leaf
            # "L1 - L2 P1 - P2 LEN [Uninit]", or "L P LEN [Uninit]"
            # for a single block.
            if ($4 == "-") { first = $3; last = $5; phys = $6 }
            else { first = $3; last = $3; phys = $4 }
            print first, last, ($0 ~ /Uninit/ ? "Uninit" : "-"), phys
        }'
}

# unmerged FILE: count pairs of leaf extents that are logically and
# physically contiguous with the same flags (they should be one).
unmerged ()
{
    awk 'NR > 1 && $1 == plast + 1 && $4 == pphys + (plast - pfirst) + 1 &&
                 $3 == pflags { n++ }
         { pfirst = $1; plast = $2; pflags = $3; pphys = $4 }
         END { print n + 0 }' "$1"
}

cat > unwritten.py <<'EOF'
import os
import e4test as t
exp_path = os.environ["EXPECTED"]
m = t.Shadow(h, open(exp_path, "rb").read())
size = h.get_size()
assert size == m.size, (size, m.size)
bs = int(os.environ["BS"])
rnd = t.client_rng(scale=1)
written = []

def w(off, n):
    m.randwrite(rnd, off, n)
    written.append((off, n))
    m.check(off, n, "read-back at %d+%d" % (off, n))
    # The neighbourhood (still unwritten around it) reads as expected.
    lo = max(0, off - 3*bs); hi = min(size, off + n + 3*bs)
    m.check(lo, hi - lo, "neighbourhood of %d+%d" % (off, n))

# Before any write: the original content (zeros where unwritten).
m.check(0, 65536, "before any write")
m.check(1024*1024, 65536, "before any write")
w(4093, 3)                      # straddles a block boundary with 4K
w(1, 5000)
w(100000, 1)                    # one byte in the middle of a block
w(100002, 1)                    # same block again, not adjacent
w(100001, 1)                    # and the byte between them
w(2*1024*1024 + 123, 1024*1024 + 3)   # large unaligned
w(3*1024*1024 + 126, 77)        # just after the large one (adjacent)
w(5*1024*1024 - 1, 2)           # across a 1M boundary
w(size - 7, 7)                  # the last bytes
w(size - 20000, 100)            # near the end
h.flush()

# Whole-file read back.
m.check_all("whole-file read-back", piece=1024 * 1024)
m.save(exp_path)
with open(exp_path + ".ranges", "w") as f:
    for off, n in written:
        f.write("%d %d\n" % (off, n))
EOF

# Unmerged neighbours are reported after all the other checks.
merge_fail=()

for flavour in ext4 ext4-1k-csum; do
    echo "=== $flavour"
    case $flavour in
        ext4)         mkfs=(-t ext4 -b 4096); bs=4096 ;;
        ext4-1k-csum) mkfs=(-t ext4 -b 1024 -O 64bit,metadata_csum); bs=1024 ;;
    esac
    size=$((8*1024*1024 + 100))        # unaligned on purpose
    last=$(( (size + bs - 1) / bs - 1 ))

    rm -rf src img
    mkdir src
    : > src/f
    : > src/h
    head -c 300000 /dev/urandom > src/g
    truncate -s 64M img
    mke2fs -q -F "${mkfs[@]}" -d src img

    # /f: entirely unwritten.  /h: entirely unwritten, overwritten with
    # nbdcopy below.  /g: real data, then a hole, then unwritten
    # extents in the hole (two separate ranges) and a hole at the end.
    debugfs -w -R "fallocate /f 0 $last" img 2>/dev/null
    debugfs -w -R "sif /f size $size" img 2>/dev/null
    debugfs -w -R "fallocate /h 0 $last" img 2>/dev/null
    debugfs -w -R "sif /h size $size" img 2>/dev/null
    gsize=$size
    debugfs -w -R "fallocate /g $((1024*1024/bs)) $((2*1024*1024/bs - 1))" img 2>/dev/null
    debugfs -w -R "fallocate /g $((3*1024*1024/bs + 1)) $((3*1024*1024/bs + 5))" img 2>/dev/null
    debugfs -w -R "sif /g size $gsize" img 2>/dev/null
    fsck_clean img
    for f in /f /g /h; do
        extents img $f | grep -q Uninit || {
            debugfs -R "ex $f" img
            fail "$flavour: $f has no unwritten extent to test"
        }
    done

    # /f: small and large unaligned writes inside unwritten extents.
    head -c $size /dev/zero > exp-f
    export EXPECTED=exp-f BS=$bs SEED=$RANDOM
    nbdkit_srv -U - --filter="$FILTER" file img ext4file=/f \
        --run 'nbdsh -u "$uri" -c "exec(open(\"unwritten.py\").read())"'
    fsck_clean img
    dump_cmp img /f exp-f

    # Every block that holds written bytes is no longer Uninit; some
    # unwritten extent remains; the extent count stays small.
    extents img /f > ex-f
    cat ex-f
    while read off n; do
        b0=$((off / bs)); b1=$(( (off + n - 1) / bs ))
        awk -v b0=$b0 -v b1=$b1 '
            $3 == "Uninit" && $1 <= b1 && $2 >= b0 { bad = 1 }
            END { exit bad }' ex-f ||
            fail "$flavour: blocks $b0..$b1 written but still Uninit"
    done < exp-f.ranges
    grep -q Uninit ex-f || fail "$flavour: every unwritten extent of /f was converted"
    nwrites=$(wc -l < exp-f.ranges)
    nex=$(wc -l < ex-f)
    # Each write can split one extent into at most three.
    [ "$nex" -le $((2*nwrites + 1)) ] ||
        fail "$flavour: /f has $nex extents after $nwrites writes (fragmentation)"
    um=$(unmerged ex-f)
    [ "$um" -eq 0 ] ||
        merge_fail+=("$flavour: /f has $nex extents, $um adjacent pairs not merged")

    # /g: data, hole, unwritten: the same script.
    cp src/g exp-g
    truncate -s $gsize exp-g
    export EXPECTED=exp-g
    nbdkit_srv -U - --filter="$FILTER" file img ext4file=/g \
        --run 'nbdsh -u "$uri" -c "exec(open(\"unwritten.py\").read())"'
    fsck_clean img
    dump_cmp img /g exp-g

    # /h: a full overwrite (nbdcopy, large parallel requests) of an
    # unwritten file must leave a handful of extents, not thousands.
    head -c $size /dev/urandom > exp-h
    nbdkit_srv -U - --filter="$FILTER" file img ext4file=/h \
        --run 'nbdcopy --flush exp-h "$uri"'
    fsck_clean img
    dump_cmp img /h exp-h
    extents img /h > ex-h
    cat ex-h
    ! grep -q Uninit ex-h || fail "$flavour: /h fully written but still has Uninit extents"
    nex=$(wc -l < ex-h)
    [ "$nex" -le $(( (last + 1) / 32 )) ] ||
        fail "$flavour: /h has $nex extents for $((last + 1)) blocks after a full overwrite (per-block fragmentation)"
    um=$(unmerged ex-h)
    [ "$um" -eq 0 ] ||
        merge_fail+=("$flavour: /h has $nex extents after a full overwrite, $um adjacent pairs not merged")
done

# Converting an unwritten extent next to an initialized one (logically
# and physically contiguous) merges them, as the kernel does;
# otherwise every write request leaves its own extent behind.
if [ ${#merge_fail[@]} -gt 0 ]; then
    printf '%s\n' "${merge_fail[@]}" >&2
    fail "adjacent extents left unmerged"
fi
