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

# nbdkit_srv ARGS...: run nbdkit with the server environment.  Under
# a sanitizer (EXT4FS_SERVER_ENV preloads its runtime) the command of
# --run must not inherit the runtime (the shell nbdkit starts would
# crash under ThreadSanitizer), so captive mode is emulated: the
# server runs in the background on a socket and the command runs here
# with $uri, $unixsocket and $nbd set as nbdkit would set them.
# A server with our filter also gets -D ext4fs.verify_map=1 (every
# in-memory map update is checked against the map on disk; nbdkit
# aborts on a difference) unless EXT4FS_NO_VERIFY_MAP is set.
nbdkit_srv ()
{
    local dflag=() a
    if [ -z "${EXT4FS_NO_VERIFY_MAP:-}" ]; then
        for a in "$@"; do
            [ "$a" = "--filter=$FILTER" ] && dflag=(-D ext4fs.verify_map=1)
        done
    fi
    if [ -z "$EXT4FS_SERVER_ENV" ]; then
        nbdkit "${dflag[@]}" "$@"
        return
    fi
    set -- "${dflag[@]}" "$@"
    local args=() cmd= prev=
    local sock
    sock=$(mktemp -u "$tmpdir/srv.XXXXXX")
    for a in "$@"; do
        if [ "$prev" = "--run" ]; then
            cmd=$a
        elif [ "$a" = "--run" ]; then
            :
        elif [ "$prev" = "-U" ] && [ "$a" = "-" ]; then
            args+=("$sock")
        else
            args+=("$a")
        fi
        prev=$a
    done
    if [ -z "$cmd" ]; then
        env $EXT4FS_SERVER_ENV nbdkit "${args[@]}"
        return
    fi
    env $EXT4FS_SERVER_ENV nbdkit -f -P "$sock.pid" "${args[@]}" &
    local spid=$! i r
    for ((i=0; i<300; i++)); do
        [ -S "$sock" ] && break
        kill -0 "$spid" 2>/dev/null || break
        sleep 0.1
    done
    if [ ! -S "$sock" ]; then
        r=0
        wait "$spid" || r=$?
        return $(( r ? r : 1 ))
    fi
    r=0
    uri="nbd+unix:///?socket=$sock" unixsocket=$sock nbd="nbd:unix:$sock" \
        sh -c "$cmd" || r=$?
    kill "$spid" 2>/dev/null || :
    wait "$spid" 2>/dev/null || :
    return $r
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
        # Under a sanitizer runtime, look every 3 s for the hang below
        # in the shared libraries' destructors (_dl_fini runs after
        # every atexit handler, ours and nbdkit's, has finished), so
        # that each stop does not cost 30 s.
        if [ -n "$EXT4FS_SERVER_ENV" ] && [ $i -gt 0 ] && [ $((i % 30)) = 0 ] &&
           command -v gdb >/dev/null &&
           gdb -p "$pid" -batch -ex "thread apply all bt" 2>/dev/null |
               grep -qE "_dl_call_fini|_dl_fini"; then
            echo "note: nbdkit $pid hung in the shared libraries' destructors under the sanitizer runtime; killed"
            kill -9 "$pid" 2>/dev/null || true
            return 0
        fi
        sleep 0.1
    done
    # Under a sanitizer runtime, glibc can deadlock in the exit handlers
    # (a library destructor waiting for the locale lock) after our
    # .cleanup has finished: tolerate exactly that, nothing else.
    if [ -n "$EXT4FS_SERVER_ENV" ] && command -v gdb >/dev/null &&
       gdb -p "$pid" -batch -ex "thread apply all bt" 2>/dev/null |
           grep -qE "_dl_call_fini|_dl_fini|__run_exit_handlers"; then
        echo "note: nbdkit $pid hung in the C library's exit handlers under the sanitizer runtime; killed"
        kill -9 "$pid" 2>/dev/null || true
        return 0
    fi
    fail "nbdkit $pid did not exit"
}

# fsck_clean IMG: e2fsck -fn must report no problem.
# release_clients N PID...: the barrier of the concurrency tests.  Wait
# until N client processes have each created a file ready.*, create
# the file "go" they wait for, so that they start together, then wait
# for every PID.  Fails if they do not all get ready or one fails.
release_clients ()
{
    local total=$1 i st=0; shift
    for ((i=0; i<600; i++)); do
        [ "$(ls ready.* 2>/dev/null | wc -l)" -eq "$total" ] && break
        sleep 0.1
    done
    [ "$(ls ready.* 2>/dev/null | wc -l)" -eq "$total" ] ||
        fail "clients did not connect"
    touch go
    for i in "$@"; do
        wait "$i" || st=1
    done
    [ $st -eq 0 ] || fail "a client failed"
}

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
