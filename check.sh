#!/usr/bin/env bash
# ext4fs: install what is missing, build, run the whole test suite,
# then the ThreadSanitizer build (concurrency tests), the
# AddressSanitizer + UBSan build (whole suite), and the libFuzzer
# target for a bounded time.  Exits non-zero on any
# failure.  Sanitizer builds live outside the source tree, so
# filter/.libs/ always holds the normal build.
#
# Environment:
#   EXT4FS_SAN_DIR   where sanitizer builds go (default: a temp dir)
#   SKIP_SANITIZERS=1  only the normal build and make check
#   SKIP_FUZZ=1        no fuzzing; EXT4FS_FUZZ_SECONDS (180) bounds it
set -euo pipefail
cd "$(dirname "$0")"
export PATH=/usr/bin:/usr/sbin:/sbin:$PATH

# shellcheck source=scripts/deps.sh
source ./scripts/deps.sh
install_missing_deps

jobs=$(nproc 2>/dev/null || echo 2)

echo "=== build"
if [ ! -x configure ] || [ configure.ac -nt configure ]; then
    autoreconf -fi
fi
if [ ! -f Makefile ] || [ configure -nt config.status ]; then
    ./configure --enable-gcc-warnings
fi
make -j"$jobs"

echo "=== make check"
if ! make -j1 check; then
    cat tests/test-suite.log || true
    exit 1
fi

[ "${SKIP_SANITIZERS:-0}" = 1 ] && exit 0

sandir=${EXT4FS_SAN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/ext4fs-san.XXXXXX")}
mkdir -p "$sandir"

# build_sanitized NAME FLAGS: build the filter with FLAGS into
# $sandir/NAME/nbdkit-ext4fs-filter.so (a direct compile of the same
# sources; the autotools tree stays the normal build).
build_sanitized ()
{
    local name=$1; shift
    local out=$sandir/$name
    mkdir -p "$out"
    # shellcheck disable=SC2046
    gcc -shared -fPIC -g -O1 -fno-omit-frame-pointer "$@" \
        -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
        -I. -Iio-manager -Ijournal -pthread \
        $(pkg-config --cflags nbdkit ext2fs com_err) \
        filter/*.c journal/*.c io-manager/io.c \
        -Wl,--version-script=filter/ext4fs.syms \
        -o "$out/nbdkit-ext4fs-filter.so" \
        $(pkg-config --libs ext2fs com_err) -lpthread
}

# run_tests NAME RUNTIME OPTIONS_VAR OPTIONS TESTS...: run tests with the
# sanitized filter, the runtime preloaded into nbdkit only.
run_tests ()
{
    local name=$1 runtime=$2 optvar=$3 opts=$4; shift 4
    local out=$sandir/$name logs=$sandir/$name/logs
    local pass=0 fail=0 skip=0 t r
    rm -rf "$logs"; mkdir -p "$logs"
    for t in "$@"; do
        set +e
        ( cd tests &&
          EXT4FS_FILTER="$out/nbdkit-ext4fs-filter.so" \
          FILTER="$out/nbdkit-ext4fs-filter.so" \
          EXT4FS_SERVER_ENV="LD_PRELOAD=$runtime $optvar=$opts:log_path=$logs/report" \
          srcdir=. abs_builddir="$PWD" \
          bash "./$t" ) > "$logs/$t.log" 2>&1
        r=$?
        set -e
        case $r in
            0) pass=$((pass+1)); echo "PASS: $name $t" ;;
            77) skip=$((skip+1)); echo "SKIP: $name $t" ;;
            *) fail=$((fail+1)); echo "FAIL: $name $t"; tail -30 "$logs/$t.log" ;;
        esac
    done
    if compgen -G "$logs/report*" > /dev/null; then
        echo "$name: sanitizer reports:"
        cat "$logs"/report*
        fail=$((fail+1))
    fi
    echo "$name: $pass passed, $fail failed, $skip skipped"
    [ "$fail" = 0 ]
}

status=0
read -r -a conc_tests <<< "$(make -s -C tests print-concurrency-tests)"
read -r -a all_tests <<< "$(make -s -C tests print-tests)"

echo "=== ThreadSanitizer build ($sandir/tsan)"
build_sanitized tsan -fsanitize=thread
run_tests tsan "$(gcc -print-file-name=libtsan.so)" TSAN_OPTIONS \
    "halt_on_error=0:second_deadlock_stack=1" "${conc_tests[@]}" || status=1

echo "=== AddressSanitizer + UBSan build ($sandir/asan)"
build_sanitized asan -fsanitize=address,undefined -fno-sanitize-recover=undefined
run_tests asan "$(gcc -print-file-name=libasan.so)" ASAN_OPTIONS \
    "detect_leaks=0:abort_on_error=0" "${all_tests[@]}" || status=1

if [ "${SKIP_FUZZ:-0}" != 1 ]; then
    echo "=== fuzz target (libFuzzer), ${EXT4FS_FUZZ_SECONDS:-180} s"
    bash fuzz/run.sh "${EXT4FS_FUZZ_SECONDS:-180}" || status=1
fi

if [ -z "${EXT4FS_SAN_DIR:-}" ] && [ $status = 0 ]; then
    rm -rf "$sandir"
fi
exit $status
