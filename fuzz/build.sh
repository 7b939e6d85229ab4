#!/usr/bin/env bash
# Build the libFuzzer target with clang (Debian: clang, libclang-rt-dev).
# Usage: fuzz/build.sh OUTPUT
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-fuzz/fuzz-image}
[ -f config.h ] || { echo "run ./configure first" >&2; exit 1; }
# shellcheck disable=SC2046
clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -I. -Iio-manager -Ijournal -Ifilter -pthread $(pkg-config --cflags nbdkit ext2fs com_err) \
    fuzz/fuzz-image.c filter/fs.c filter/inode.c filter/bmap.c filter/rw.c \
    filter/exports.c filter/mmp.c journal/log.c journal/replay.c io-manager/io.c \
    -o "$out" $(pkg-config --libs ext2fs com_err) -lpthread
