#!/usr/bin/env bash
# Trim and zero on extent and indirect files, aligned and unaligned,
# with and without MAY_TRIM (NBD_CMD_FLAG_NO_HOLE) and FAST_ZERO.
# Punched blocks go back to the free count; zero without MAY_TRIM keeps
# blocks allocated (unwritten extents on ext4, zeros on ext2); block
# status reports the new holes; bytes outside each range never change.
source "$srcdir/functions.sh"
cd "$tmpdir"

for flavour in "ext4 -b 4096" "ext4 -b 1024 -O 64bit,metadata_csum" "ext2 -b 1024"; do
    echo "== $flavour"
    rm -rf src img expected
    mkdir src
    head -c $((3*1024*1024 + 777)) /dev/urandom > src/f
    cp src/f expected
    truncate -s 64M img
    # shellcheck disable=SC2086
    mke2fs -q -F -t $flavour -d src img
    free0=$(dumpe2fs -h img 2>/dev/null | awk '/^Free blocks:/{print $3}')
    bs=$(dumpe2fs -h img 2>/dev/null | awk '/^Block size:/{print $3}')
    ext=0; case "$flavour" in ext4*) ext=1 ;; esac

    nbdkit_srv -U - --filter="$FILTER" file img ext4file=/f --run "
      /usr/bin/python3 - \"\$uri\" <<'PY'
import errno, sys
import nbd
import e4test as t
bs = $bs; ext = $ext
h = t.connect(sys.argv[1])
m = t.Shadow(h, open('expected', 'rb').read())
size = m.size
check = m.check_all

# trim: whole blocks inside the range are punched (read as zeros),
# partial edge blocks keep their data.
for (o, n) in [(0, 8*bs), (5*bs + 100, 20*bs), (300000, 1), (size - 3*bs - 5, 3*bs + 5)]:
    m.trim_blocks(n, o, bs)
    check('trim %d+%d' % (o, n))

# zero with MAY_TRIM (the default): the whole range reads as zeros.
for (o, n) in [(100*bs + 3, 40*bs), (1000001, 5000), (2*1024*1024, 64*bs)]:
    m.zero(n, o)
    check('zero %d+%d' % (o, n))

# zero without MAY_TRIM.
for (o, n) in [(400*bs, 33*bs), (600*bs + 17, 70*bs)]:
    m.zero(n, o, nbd.CMD_FLAG_NO_HOLE)
    check('zero NO_HOLE %d+%d' % (o, n))

# FAST_ZERO over written blocks without MAY_TRIM: instant on extent
# files (unwritten extents), refused with ENOTSUP on indirect files,
# and then nothing has changed.
o, n = (size // 2) // bs * bs, 16*bs
fast = nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO
if ext:
    m.zero(n, o, fast)
else:
    t.expect_errno('FAST_ZERO on an indirect file',
                   lambda: h.zero(n, o, fast), (errno.ENOTSUP, errno.EOPNOTSUPP))
check('fast zero')
h.flush()
m.save('expected')
PY"
    fsck_clean img
    dump_cmp img /f expected
    free1=$(dumpe2fs -h img 2>/dev/null | awk '/^Free blocks:/{print $3}')
    [ "$free1" -gt "$free0" ] || fail "$flavour: free blocks did not go up ($free0 -> $free1)"

    # Block status: the trimmed head is a hole now.
    nbdkit_srv -U - -r --filter="$FILTER" file img ext4file=/f \
        --run 'nbdinfo --map "$uri"' > map
    head -1 map | grep -q "hole,zero" || { cat map; fail "$flavour: no hole at 0"; }
    if [ "$flavour" != "ext2 -b 1024" ]; then
        # NO_HOLE zero on extent files leaves unwritten extents.
        debugfs -R "ex /f" img 2>/dev/null | grep -q Uninit ||
            fail "$flavour: zero without MAY_TRIM left no unwritten extent"
    fi
done
