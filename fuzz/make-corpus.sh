#!/usr/bin/env bash
# Make the seed corpus: small images of each layout the filter reads.
# Usage: fuzz/make-corpus.sh DIR
set -euo pipefail
export PATH=/usr/bin:/usr/sbin:/sbin:$PATH
dir=$1
mkdir -p "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src/d"
head -c 5000 /dev/urandom > "$work/src/f"
head -c 20000 /dev/urandom > "$work/src/d/f"
truncate -s 70000 "$work/src/sparse"
printf 'tiny' > "$work/src/tiny"
ln -s /d/f "$work/src/link"
ln -s loop2 "$work/src/loop1"
ln -s loop1 "$work/src/loop2"
n=0
mk () {
    n=$((n+1))
    rm -f "$work/img"
    truncate -s "$1" "$work/img"; shift
    mke2fs -q -F -d "$work/src" "$@" "$work/img" >/dev/null 2>&1 || return 0
    cp "$work/img" "$dir/seed-$n"
}
mk 256K -t ext4 -b 1024 -N 32
mk 256K -t ext4 -b 1024 -N 32 -O inline_data
mk 256K -t ext4 -b 1024 -N 32 -O 64bit,metadata_csum
mk 256K -t ext2 -b 1024 -N 32
mk 512K -t ext3 -b 1024 -N 32
mk 512K -t ext4 -b 4096 -N 32 -O ^has_journal
