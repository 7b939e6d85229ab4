#!/usr/bin/env bash
# Build the fuzz target, make the seed corpus, replay the regression
# images in tests/fuzz-regressions/, then fuzz for a bounded time.
# Usage: fuzz/run.sh [SECONDS]   (default 120)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-120}
work=$(mktemp -d "${TMPDIR:-/tmp}/ext4fs-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
bash fuzz/build.sh "$work/fuzz-image"
bash fuzz/make-corpus.sh "$work/corpus"
if compgen -G "tests/fuzz-regressions/*" >/dev/null; then
    echo "replaying regression images"
    "$work/fuzz-image" tests/fuzz-regressions/*
fi
mkdir -p "$work/artifacts"
echo "fuzzing for $secs s"
if ! "$work/fuzz-image" -max_total_time="$secs" -max_len=524288 \
       -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
       -artifact_prefix="$work/artifacts/" "$work/corpus"; then
    echo "FUZZ FINDING: inputs saved below; add them to tests/fuzz-regressions/" >&2
    mkdir -p fuzz-findings
    cp "$work"/artifacts/* fuzz-findings/ 2>/dev/null || true
    ls -l fuzz-findings >&2 || true
    exit 1
fi
