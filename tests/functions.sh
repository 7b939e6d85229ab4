# ext4fs test helpers.  Source this from each test-*.sh.
#
# Tests run with the just-built filter ($FILTER) and build their own
# images with mke2fs/debugfs in a private temporary directory.
#
# A new test: a script that sources this file, builds its image, starts
# the server (start_nbdkit, or nbdkit_srv --run), runs its clients and
# ends with stop_nbdkit, fsck_clean and dump_cmp.  Clients in Python
# import e4test (e4test.py here: connections, the barrier of
# release_clients, a shadow model of the file, patterned data, expected
# errors); its docstring has an example.

set -e
set -u

# nbdsh must find python3's nbd module: /usr/bin first.
export PATH=/usr/bin:/usr/sbin:/sbin:$PATH
: "${FILTER:?FILTER must point at nbdkit-ext4fs-filter.so}"

# The Python clients import the shared test module, e4test.py (its
# docstring says how to write a test), from the source directory.
PYTHONPATH=$(cd "$srcdir" && pwd)${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH

# test_filter NAME: the path of the check filter nbdkit-NAME-filter.so
# built in tests/ (make check builds them); fails if it is not built.
test_filter ()
{
    local so="$abs_builddir/.libs/nbdkit-$1-filter.so"
    [ -f "$so" ] || fail "$so is not built (make check builds it)"
    echo "$so"
}

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

# wait_gone PID [SECS]: wait until process PID (not necessarily our
# child) has disappeared, 30 s at most by default.  Returns 0 when it
# has; 1 if it is still running.  Under a sanitizer runtime, an nbdkit
# hung in glibc's exit handlers after our .cleanup has finished is
# killed (with a note) and 2 is returned: that hang, nothing else, is
# tolerated.
wait_gone ()
{
    local pid=$1 secs=${2:-30} i
    for ((i=0; i<secs*10; i++)); do
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
            return 2
        fi
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null || return 0
    # Under a sanitizer runtime, glibc can deadlock in the exit handlers
    # (a library destructor waiting for the locale lock) after our
    # .cleanup has finished: tolerate exactly that, nothing else.
    if [ -n "$EXT4FS_SERVER_ENV" ] && command -v gdb >/dev/null &&
       gdb -p "$pid" -batch -ex "thread apply all bt" 2>/dev/null |
           grep -qE "_dl_call_fini|_dl_fini|__run_exit_handlers"; then
        echo "note: nbdkit $pid hung in the C library's exit handlers under the sanitizer runtime; killed"
        kill -9 "$pid" 2>/dev/null || true
        return 2
    fi
    return 1
}

# stop_nbdkit SOCK [SECS]: SIGTERM the server of SOCK (its pid in
# SOCK.pid) and wait until it has exited (wait_gone); fails if it does
# not exit within SECS (30) seconds.
stop_nbdkit ()
{
    local pid st=0
    pid=$(cat "$1.pid")
    kill "$pid" 2>/dev/null || true
    wait_gone "$pid" "${2:-30}" || st=$?
    [ $st -ne 1 ] || fail "nbdkit $pid did not exit"
}

# The servers of the suites that record failures and go on (they
# define bad MSG: record a failure).
#
# srv_try_start NAME ARGS...: a background server on $tmpdir/NAME.sock,
# stderr in $tmpdir/NAME.err; its job is kept for srv_stop and it is
# killed at exit.  Returns 1 if the server exits before it serves (the
# caller decides).  srv_start NAME ARGS...: the same, but that fails
# the test (with the server's stderr).
declare -A srv_job
srv_try_start ()
{
    local name="$1"; shift
    local sock="$tmpdir/$name.sock" i
    rm -f "$sock" "$sock.pid"
    nbdkit_srv -U "$sock" -P "$sock.pid" -f "$@" 2> "$tmpdir/$name.err" &
    srv_job[$name]=$!
    cleanup_fn "[ -s $sock.pid ] && kill \$(cat $sock.pid) 2>/dev/null"
    for ((i=0; i<150; i++)); do
        [ -s "$sock.pid" ] && [ -S "$sock" ] && return 0
        kill -0 "${srv_job[$name]}" 2>/dev/null || break
        sleep 0.1
    done
    wait "${srv_job[$name]}" 2>/dev/null
    return 1
}
srv_start ()
{
    srv_try_start "$@" && return 0
    cat "$tmpdir/$1.err" >&2
    fail "$1: nbdkit did not start: ${*:2}"
}

# srv_alive NAME: the server has not exited (crashed).
srv_alive () { kill -0 "${srv_job[$1]}" 2>/dev/null; }

# check_err NAME ERRFILE: no crash, sanitizer report or assertion in the
# server's stderr (else bad).  A test may define its own after sourcing
# this file.
check_err ()
{
    if grep -q -E 'Sanitizer|runtime error:|Segmentation fault|Aborted|assertion' "$2"; then
        bad "$1: crash, sanitizer report or assertion in stderr: $(grep -m1 -E 'Sanitizer|runtime error:|Segmentation|Aborted|assertion' "$2")"
    fi
}

# srv_stop NAME: SIGTERM the server of srv_start; it must exit with
# status 0 within 15 s (else bad), and check_err must find nothing in
# $tmpdir/NAME.err.
srv_stop ()
{
    local name="$1" sock="$tmpdir/$1.sock" job="${srv_job[$1]}" pid rc=0 st=0
    if [ -s "$sock.pid" ]; then
        pid=$(cat "$sock.pid")
        kill "$pid" 2>/dev/null
        wait_gone "$pid" 15 || st=$?
        if [ $st = 1 ]; then
            bad "$name: nbdkit did not exit within 15 s of SIGTERM"
            kill -9 "$pid" 2>/dev/null
        fi
    fi
    wait "$job" || rc=$?
    rm -f "$sock.pid"
    [ "$rc" = 0 ] || [ $st = 2 ] || bad "$name: nbdkit exited with status $rc"
    check_err "$name" "$tmpdir/$name.err"
}

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

# recorder_filter: print the absolute path of the recorder filter
# (tests/recorder-filter.c): the built one, $EXT4FS_RECORDER, or one
# compiled into $tmpdir here.
recorder_filter ()
{
    local r=${EXT4FS_RECORDER:-${abs_builddir:-$PWD}/.libs/recorder-filter.so}
    if [ ! -f "$r" ]; then
        requires pkg-config --exists nbdkit
        r=$tmpdir/recorder-filter.so
        # shellcheck disable=SC2046
        cc -shared -fPIC -O1 -pthread $(pkg-config --cflags nbdkit) \
            "$srcdir/recorder-filter.c" -o "$r" ||
            fail "cannot build the recorder filter"
    fi
    case $r in /*) ;; *) r=$PWD/$r ;; esac
    echo "$r"
}

# needs_recovery IMG: the image's superblock has needs_recovery set.
needs_recovery () { dumpe2fs -h "$1" 2>/dev/null | grep -q needs_recovery; }

# replay_copy IMG: IMG.chk, the image to check after its server has
# stopped: a copy of IMG, replayed by e2fsck where IMG needs recovery
# (fails if the replay fails).
replay_copy ()
{
    cp --sparse=always "$1" "$1.chk"
    if needs_recovery "$1"; then
        e2fsck -E journal_only -y "$1.chk" > "$tmpdir/replay.out" 2>&1 ||
            { cat "$tmpdir/replay.out"; fail "the journal replay of $1 failed"; }
    fi
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
