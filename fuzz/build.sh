#!/usr/bin/env bash
# Build a libFuzzer target with clang (Debian: clang, libclang-rt-dev).
# Usage: fuzz/build.sh OUTPUT [image|journal]
#   image   (default) a whole filesystem image through the filter's code
#   journal the jbd2 log reader alone
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-fuzz/fuzz-image}
target=${2:-image}
[ -f config.h ] || { echo "run ./configure first" >&2; exit 1; }
flags=(-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -I. -Iio-manager -Ijournal -Ifilter -pthread)
case $target in
image)
    # shellcheck disable=SC2046
    clang "${flags[@]}" $(pkg-config --cflags nbdkit ext2fs com_err) \
        fuzz/fuzz-image.c filter/fs.c filter/inode.c filter/bmap.c filter/runmap.c filter/rw.c \
        filter/exports.c filter/mmp.c journal/log.c journal/replay.c journal/trans.c journal/cache.c journal/commit.c \
        io-manager/io.c \
        -o "$out" $(pkg-config --libs ext2fs com_err) -lpthread ;;
journal)
    # shellcheck disable=SC2046
    clang "${flags[@]}" $(pkg-config --cflags nbdkit ext2fs com_err) \
        fuzz/fuzz-journal.c journal/log.c \
        -o "$out" $(pkg-config --libs ext2fs com_err) ;;
*)
    echo "unknown target $target" >&2; exit 1 ;;
esac
