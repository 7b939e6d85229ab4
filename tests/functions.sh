# ext4fs test helpers.  Source this from each test-*.sh.
#
# Tests run with the just-built filter ($FILTER) and build their own
# images with mke2fs/debugfs in a private temporary directory.

set -e
set -u

# nbdsh must find python3's nbd module: /usr/bin first.
export PATH=/usr/bin:/usr/sbin:/sbin:$PATH
: "${FILTER:?FILTER must point at nbdkit-ext4fs-filter.so}"

# Extra wrapper for the server (e.g. LD_PRELOAD of a sanitizer runtime
# comes through $EXT4FS_SERVER_ENV, applied only to nbdkit).
EXT4FS_SERVER_ENV=${EXT4FS_SERVER_ENV:-}

_cleanup_fns=()
cleanup_fn () { _cleanup_fns+=("$*"); }
_run_cleanup ()
{
    local status=$?
    set +e
    for ((i=${#_cleanup_fns[@]}-1; i>=0; i--)); do eval "${_cleanup_fns[$i]}"; done
    exit $status
}
trap _run_cleanup EXIT INT TERM

# A private temporary directory, removed at exit.
tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/ext4fs-test.XXXXXX")
cleanup_fn rm -rf "$tmpdir"

requires ()
{
    if ! "$@" >/dev/null 2>&1; then
        echo "$0: test skipped because prerequisite is missing or not working: $*"
        exit 77
    fi
}

fail () { echo "FAIL: $*" >&2; exit 1; }

# nbdkit_srv ARGS...: run nbdkit with the server environment.  The
# command of --run (a client) must not inherit a sanitizer runtime.
nbdkit_srv ()
{
    local args=() prev= a
    for a in "$@"; do
        if [ "$prev" = "--run" ] && [ -n "$EXT4FS_SERVER_ENV" ]; then
            args+=("unset LD_PRELOAD TSAN_OPTIONS ASAN_OPTIONS UBSAN_OPTIONS; $a")
        else
            args+=("$a")
        fi
        prev=$a
    done
    env $EXT4FS_SERVER_ENV nbdkit "${args[@]}"
}

# start_nbdkit SOCK ARGS...: start a background server on a Unix
# socket and wait for it; it is killed at exit.
start_nbdkit ()
{
    local sock="$1"; shift
    local pidfile="$sock.pid"
    rm -f "$pidfile"
    nbdkit_srv -U "$sock" -P "$pidfile" -f "$@" &
    local i
    for ((i=0; i<300; i++)); do
        [ -s "$pidfile" ] && [ -S "$sock" ] && break
        sleep 0.1
    done
    [ -s "$pidfile" ] || fail "nbdkit did not start: $*"
    cleanup_fn "kill \$(cat $pidfile) 2>/dev/null; sleep 0.2"
}

# stop_nbdkit SOCK: SIGTERM and wait until it has exited.
stop_nbdkit ()
{
    local pidfile="$1.pid" pid i
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for ((i=0; i<300; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    fail "nbdkit $pid did not exit"
}

# fsck_clean IMG: e2fsck -fn must report no problem.
fsck_clean ()
{
    if ! e2fsck -fn "$1" > "$tmpdir/fsck.out" 2>&1; then
        cat "$tmpdir/fsck.out"
        fail "e2fsck -fn $1 reported problems"
    fi
}

# dump_cmp IMG PATH EXPECTED: the file inside the image equals EXPECTED.
dump_cmp ()
{
    rm -f "$tmpdir/dump.out"
    debugfs -R "dump $2 $tmpdir/dump.out" "$1" >/dev/null 2>&1
    cmp "$tmpdir/dump.out" "$3" || fail "$2 in $1 differs from $3"
}
