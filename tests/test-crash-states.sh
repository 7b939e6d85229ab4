#!/usr/bin/env bash
# Crash states (like dm-log-writes / CrashMonkey).  The recorder filter
# sits BELOW ext4fs and logs every write (with data), zero, trim and
# flush that reaches the plugin, with its issue and completion order.
# crash-workload.py drives the server (allocating writes into sparse
# files, overwrites, unaligned writes, trims, zeroes, unwritten extents,
# several connections at once, flushes, FUA, a flush that fails below
# ext4fs) and writes a model of what each reply promised.
# crashstates.py then rebuilds the images a crash could have left
# (at every flush; random process-crash prefixes; random power-loss
# subsets of the writes not yet durable) and checks each one: journal
# replay if needed, e2fsck -fn, every promised byte of every file, and
# no byte of the "DELETED!" marker that filled the free space before
# the workload.  Images: ext4 4 KiB, and ext2 1 KiB without a journal.
#
# Kinds of state: the final one (it must also equal the real image,
# which checks the recorder), every flush with no other write, zero or
# trim in flight ("flush") and with some ("flush-busy"), process
# crashes ("prefix": nbdkit killed, nothing lost below), and power loss
# ("flush-min", "fua-min": only what was durable at a flush or FUA
# reply; "subset": random subsets of what was not durable).  On ext4
# (journaled) every kind is asserted; on ext2 (no journal: a crash
# needs e2fsck) all but the fsck problems of "prefix" and "subset".  EXT4FS_CRASH_STRICT=1
# asserts everything on ext2 too.  EXT4FS_CRASH_ASSERT=SPEC overrides what is
# asserted (crashstates.py --assert, e.g. final,flush,prefix:lost+stale).
#
# Reproduce: SEED=N (printed) fixes the requests and the states chosen;
# the interleaving of the concurrent step differs between runs, so KEEP=1
# keeps $tmpdir (log, initial image, model) for rerunning crashstates.py
# on the very same log (its command line is printed); CRASH_SUBSETS,
# CRASH_MAX_STATES bound the work; CRASH_ALL_PREFIXES=1 checks every
# process-crash prefix (about 40 s more per image).
source "$srcdir/functions.sh"
requires python3 -c 'import nbd'
requires debugfs -V
requires e2fsck -V
here=$(cd "$srcdir" && pwd)

recorder=$(recorder_filter) || exit $?

cd "$tmpdir"
[ -n "${KEEP:-}" ] && { trap - EXIT; echo "keeping $tmpdir"; }

export SEED=${SEED:-$RANDOM}
subsets=${CRASH_SUBSETS:-24}
max_states=${CRASH_MAX_STATES:-1000}
strict=${EXT4FS_CRASH_STRICT:-0}
# Journaled (ext4): everything.  Without a journal (ext2) a process
# crash or a power loss needs e2fsck, as documented; what is promised
# there is the state at a flush (also with other requests in flight),
# at a FUA reply, and after a failed flush, and in every other state
# everything but consistency.
# Power loss and process crashes without a journal may leave metadata
# half written (e2fsck repairs it), but the ordered write-back promises
# the rest: no lost or wrong bytes, no stale data, every file readable.
nolog=lost+stale+wrong+dump
assert_for ()
{
    if [ "$strict" = 1 ] || [ "$1" = ext4 ]; then
        echo all
    else
        echo final,flush,flush-busy,fua-min,flush-min,prefix:$nolog,subset:$nolog
    fi
}
prefixes=1
if [ -n "${CRASH_ALL_PREFIXES:-}" ]; then
    prefixes=-1
    max_states=${CRASH_MAX_STATES:-5000}
fi
echo "SEED=$SEED subsets=$subsets max_states=$max_states" \
     "EXT4FS_CRASH_STRICT=$strict"

status=0
for flavour in ext4 ext2-1k; do
    echo "=== $flavour"
    case $flavour in
        ext4)    mkfs=(-t ext4 -b 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0)
                 bs=4096; imgsize=32 ;;
        ext2-1k) mkfs=(-t ext2 -b 1024 -E nodiscard,lazy_itable_init=0)
                 bs=1024; imgsize=16 ;;
    esac
    d=$tmpdir/$flavour
    mkdir -p "$d/src"
    truncate -s 4M "$d/src/sparse"
    truncate -s 2M "$d/src/cc"
    head -c 1M /dev/urandom > "$d/src/data"
    [ $flavour = ext4 ] && truncate -s 2M "$d/src/prealloc"
    # Free space holds the marker: every block a file may be given
    # shows where stale data would leak.
    python3 -c "import sys; open(sys.argv[1], 'wb').write(b'DELETED!' * ($imgsize << 17))" \
        "$d/img"
    mke2fs -q -F "${mkfs[@]}" -d "$d/src" "$d/img"
    if [ $flavour = ext4 ]; then
        debugfs -w -R "fallocate /prealloc 0 $((2 * 1024 * 1024 / bs - 1))" \
            "$d/img" >/dev/null 2>&1
        debugfs -R "ex /prealloc" "$d/img" 2>/dev/null | grep -q Uninit ||
            fail "test setup: /prealloc has no unwritten extents"
    fi
    fsck_clean "$d/img"
    cp "$d/img" "$d/init.img"

    sock=$d/sock
    start_nbdkit "$sock" --filter="$FILTER" --filter="$recorder" \
        file "$d/img" ext4file=exportname \
        recordfile="$d/rec.log" recordfailflush="$d/failflush"
    python3 "$here/crash-workload.py" "$sock" "$d/rec.log" "$d/model.json" \
        $flavour $bs "$d/failflush" || fail "$flavour: workload failed"
    stop_nbdkit "$sock"
    fsck_clean "$d/img"

    t0=$(date +%s.%N)
    assert=${EXT4FS_CRASH_ASSERT:-$(assert_for $flavour)}
    echo "$flavour: asserted: $assert"
    r=0
    args=(--image "$d/init.img" --log "$d/rec.log" --model "$d/model.json"
          --final-image "$d/img" --workdir "$d/work" --subsets "$subsets"
          --prefixes $prefixes --seed "$SEED" --max-states "$max_states"
          --assert "$assert" --report-limit 3 --json "$d/results.json")
    echo "crashstates.py ${args[*]}"
    python3 "$here/crashstates.py" "${args[@]}" || r=$?
    echo "$flavour: crash states checked in $(echo "$(date +%s.%N) - $t0" | bc) s"
    case $r in
        0) ;;
        1) echo "FAIL: $flavour: crash states have asserted problems ($assert)" \
                "(SEED=$SEED; KEEP=1 to keep the log)"
           status=1 ;;
        *) fail "$flavour: crashstates.py failed (exit $r)" ;;
    esac
done
[ $status = 0 ] || exit 1
if [ "$strict" != 1 ]; then
    echo "note: findings in the ext2 states that are not asserted (process" \
         "crash, power loss) are expected without a journal: e2fsck repairs" \
         "them (EXT4FS_CRASH_STRICT=1 asserts them too)"
fi
echo "crash states: all asserted states pass"
