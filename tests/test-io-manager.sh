#!/usr/bin/env bash
# Unit test of the io_manager through libext2fs, outside nbdkit.
source "$srcdir/functions.sh"
prog=${abs_builddir:-.}/test-io-manager
[ -x "$prog" ] || fail "$prog not built"
cd "$tmpdir"
mkdir src
echo hello > src/hello
head -c 3000000 /dev/urandom > src/big
truncate -s 64M img
mke2fs -q -F -t ext4 -O metadata_csum,64bit -d src img
"$prog" img
