#!/usr/bin/env bash
# Unit test of the cached map's container (filter/runmap.c): random
# inserts and removes against a flat reference, every invariant
# checked (test-runmap.c).  Also built here with ASan and UBSan when
# the compiler can.
source "$srcdir/functions.sh"
prog=${abs_builddir:-.}/test-runmap
[ -x "$prog" ] || fail "$prog not built"
seed=${SEED:-$RANDOM}
"$prog" "$seed" 200000 || fail "test-runmap (seed $seed)"
top=$(cd "$srcdir/.." && pwd)
if cc -fsanitize=address,undefined -fno-sanitize-recover=undefined \
      -O1 -g -I"${abs_builddir:-.}/.." -I"$top" -I"$top/filter" \
      "$top/filter/runmap.c" "$srcdir/test-runmap.c" \
      -o "$tmpdir/test-runmap-san" 2> "$tmpdir/cc.err"; then
    ASAN_OPTIONS=detect_leaks=1 "$tmpdir/test-runmap-san" "$seed" 50000 ||
        fail "test-runmap under ASan+UBSan (seed $seed)"
else
    echo "no sanitizer build here: $(head -1 "$tmpdir/cc.err")"
fi
