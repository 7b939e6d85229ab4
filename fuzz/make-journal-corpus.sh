#!/usr/bin/env bash
# Seed corpus for the journal target: the head of real journals that
# debugfs wrote (no checksums, v2, v3; revokes; a torn tail), 1 KiB
# blocks, cut after the log.
# Usage: fuzz/make-journal-corpus.sh DIR
set -euo pipefail
export PATH=/usr/bin:/usr/sbin:/sbin:$PATH
dir=$1
mkdir -p "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
head -c 3072 /dev/urandom > "$work/data"
n=0
mk () {
    n=$((n+1))
    rm -f "$work/img"
    truncate -s 4M "$work/img"
    mke2fs -q -F -t ext4 -b 1024 -O "$1" "$work/img" >/dev/null 2>&1 || return 0
    printf '%s\n' "$2" | sed 's/;/\n/g' |
        debugfs -w -f - "$work/img" >/dev/null 2>&1 || return 0
    debugfs -R "dump <8> $work/j" "$work/img" >/dev/null 2>&1 || return 0
    head -c 16384 "$work/j" > "$dir/journal-$n"
}
mk ^metadata_csum,^64bit "jo;jw -b 300,301,302 $work/data;jc"
mk metadata_csum,64bit "jo -c;jw -b 300,301,302 $work/data;jw -r 301;jc"
mk metadata_csum "jo -c -v 2;jw -b 300-302 $work/data;jc"
mk metadata_csum,64bit "jo -c;jw -b 300 $work/data;jw -b 301 -c $work/data;jc"
