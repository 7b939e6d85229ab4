#!/usr/bin/env bash
# Build the fuzz targets, make their seed corpora, replay the
# regression inputs in tests/fuzz-regressions/ (images) and
# tests/fuzz-regressions/journal/ (journals), then fuzz for a bounded
# time: two thirds on whole images, one third on the journal reader.
# Usage: fuzz/run.sh [SECONDS]   (default 120)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-120}
work=$(mktemp -d "${TMPDIR:-/tmp}/ext4fs-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
bash fuzz/build.sh "$work/fuzz-image" image
bash fuzz/build.sh "$work/fuzz-journal" journal
bash fuzz/make-corpus.sh "$work/corpus"
bash fuzz/make-journal-corpus.sh "$work/jcorpus"
imgs=()
for f in tests/fuzz-regressions/*; do [ -f "$f" ] && imgs+=("$f"); done
if [ ${#imgs[@]} -gt 0 ]; then
    echo "replaying regression images"
    "$work/fuzz-image" "${imgs[@]}"
fi
if compgen -G "tests/fuzz-regressions/journal/*" >/dev/null; then
    echo "replaying regression journals"
    "$work/fuzz-journal" tests/fuzz-regressions/journal/*
fi
mkdir -p "$work/artifacts"

# fuzz NAME BINARY CORPUS SECONDS MAXLEN
fuzz ()
{
    echo "fuzzing $1 for $4 s"
    if ! "$2" -max_total_time="$4" -max_len="$5" \
           -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
           -artifact_prefix="$work/artifacts/$1-" "$3"; then
        echo "FUZZ FINDING ($1): inputs saved below; add them to tests/fuzz-regressions/" >&2
        mkdir -p fuzz-findings
        cp "$work"/artifacts/* fuzz-findings/ 2>/dev/null || true
        ls -l fuzz-findings >&2 || true
        return 1
    fi
}
status=0
fuzz image "$work/fuzz-image" "$work/corpus" $((secs * 2 / 3)) 524288 || status=1
fuzz journal "$work/fuzz-journal" "$work/jcorpus" $((secs - secs * 2 / 3)) 65536 || status=1
exit $status
