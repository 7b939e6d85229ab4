#!/usr/bin/env bash
# MMP and a step of the wall clock: the updater waits for its next
# update on CLOCK_MONOTONIC, so a backward step of the system clock by
# an hour does not delay the next update by an hour (during which
# another host, seeing the sequence stand still, would take the
# filesystem as free), and a forward step does not set off a burst of
# updates.  nbdkit runs under clockstep-shim.so (LD_PRELOAD), which
# steps CLOCK_REALTIME, time () and gettimeofday () of that process
# only and moves the deadlines of realtime waits as a real step does;
# a wall-clock updater fails this test (it waits an hour), the current
# one passes.  The MMP time written after each step shows that the
# step reached the server.  Then a clean stop releases the block and
# the file holds what was written.
source "$srcdir/functions.sh"
requires mke2fs -V
requires debugfs -R "help" /dev/null
shim=$abs_builddir/.libs/clockstep-shim.so
[ -f "$shim" ] || fail "$shim is not built (make check builds it)"
cd "$tmpdir"

now_ms () { echo $(( $(date +%s%N) / 1000000 )); }

# setstep SECONDS: step the server's wall clock (atomically: the shim
# reads the file at every call).
setstep () { printf '%s\n' "$1" > step.new && mv -f step.new step; }

mkdir src
head -c $((256*1024)) /dev/urandom > src/f
cp src/f expected
truncate -s 64M img
mke2fs -q -F -t ext4 -O mmp -E mmp_update_interval=5 -d src img
interval=$(dumpe2fs -h img 2>/dev/null | awk '/^MMP update interval:/{print $4}')
[ "$interval" = 5 ] || fail "MMP update interval is '$interval', not 5"
mmpoff=$(( $(dumpe2fs -h img 2>/dev/null | awk '/^MMP block number:/{print $4}') *
           $(dumpe2fs -h img 2>/dev/null | awk '/^Block size:/{print $3}') ))
seqmax=$((0xE24D4D4F))          # EXT4_MMP_SEQ_MAX: after it comes 1

# read_mmp: magic, seq (hex, as debugfs prints them) and mtime (the
# MMP block's mmp_time, a little-endian u64) straight from the image.
read_mmp ()
{
    local m s lo hi
    read -r m s lo hi < <(od -An -tx4 -j "$mmpoff" -N16 img)
    magic=$m seq=$s mtime=$(( 16#$hi * 4294967296 + 16#$lo ))
}
# updates A B: how many updates took the sequence from A to B (hex).
updates () { echo $(( (16#$2 - 16#$1 + seqmax) % seqmax )); }

# The shim goes after a sanitizer runtime that EXT4FS_SERVER_ENV
# preloads (that one must come first).
sock=$tmpdir/s.sock
if [ -n "$EXT4FS_SERVER_ENV" ]; then
    env=() found=
    for w in $EXT4FS_SERVER_ENV; do
        case $w in LD_PRELOAD=*) w=$w:$shim found=1 ;; esac
        env+=("$w")
    done
    [ -n "$found" ] || env+=("LD_PRELOAD=$shim")
    EXT4FS_SERVER_ENV="${env[*]} CLOCKSTEP_FILE=$tmpdir/step"
    start_nbdkit "$sock" --filter="$FILTER" file img ext4file=/f
else
    LD_PRELOAD=$shim CLOCKSTEP_FILE=$tmpdir/step \
        start_nbdkit "$sock" --filter="$FILTER" file img ext4file=/f
fi

# A writable connection claims the block (2 x interval + 1 s); the
# updater runs from then on.
nbdsh -u "nbd+unix:///?socket=$sock" -c 'h.pwrite(b"C" * 4096, 8192); h.flush()'
printf 'C%.0s' $(seq 4096) | dd of=expected bs=1 seek=8192 conv=notrunc status=none
read_mmp
[ "$magic" = 004d4d50 ] && [ "$seq" != ff4d4d50 ] ||
    fail "MMP block not claimed after a write (magic $magic, sequence $seq)"

# wait_update FROM LIMIT: poll until the sequence is no longer FROM;
# 1 if that takes more than LIMIT seconds.
wait_update ()
{
    local t0
    t0=$(now_ms)
    while read_mmp; [ "$seq" = "$1" ]; do
        [ $(( $(now_ms) - t0 )) -lt $(( $2 * 1000 )) ] || return 1
        sleep 0.5
    done
}

# Back by an hour.  The next update must still come within
# 2 x interval + 3 s (another host's wait is 2 x interval + 1 s).
setstep -3600
read_mmp
s0=$seq
limit=$(( 2 * interval + 3 ))
t0=$(now_ms)
wait_update "$s0" $limit ||
    fail "no MMP update within $limit s of a backward step of the wall clock by an hour (sequence stuck at $s0): the updater waits on the wall clock, and another host would take the filesystem as free"
echo "first update $(( $(now_ms) - t0 )) ms after the backward step"
# The shim works: the update was timed an hour early (one more update
# if the first read its time just before the step).
skew=$(( mtime - $(date +%s) ))
if [ "$skew" -gt -3500 ]; then
    wait_update "$seq" $limit || fail "no second MMP update after the backward step"
    skew=$(( mtime - $(date +%s) ))
fi
[ "$skew" -le -3500 ] && [ "$skew" -ge -3700 ] ||
    fail "mmp_time is $skew s from now after a step of -3600 s: the clock step shim did not reach nbdkit"

# Forward by two hours (an hour ahead of the real clock): updates go
# on at their pace, with no burst to catch up.
setstep 3600
read_mmp
s1=$seq
sleep 12
read_mmp
n=$(updates "$s1" "$seq")
echo "$n updates in the 12 s after the forward step"
[ "$magic" = 004d4d50 ] || fail "MMP magic $magic after the forward step"
[ "$n" -ge 2 ] || fail "only $n MMP updates in the 12 s after a forward step of the wall clock"
[ "$n" -le 4 ] || fail "$n MMP updates in the 12 s after a forward step of the wall clock: a burst"
skew=$(( mtime - $(date +%s) ))
[ "$skew" -ge 3500 ] && [ "$skew" -le 3700 ] ||
    fail "mmp_time is $skew s from now after a step to +3600 s"

stop_nbdkit "$sock"
read_mmp
[ "$magic" = 004d4d50 ] && [ "$seq" = ff4d4d50 ] ||
    fail "MMP not released at clean exit (magic $magic, sequence $seq)"
fsck_clean img
dump_cmp img /f expected
