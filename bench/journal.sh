#!/usr/bin/env bash
# The cost of the journal replay overlay for reads.  See bench/README.md
# ("Journal overlay").
#
#   bench/journal.sh                 (root: loop devices and mount)
#
# Builds, with the kernel, an image whose /data (SIZE random bytes) is
# known only through the journal: mke2fs, loop-mount (data=JMODE,
# commit=60), write /data, fsync, copy the backing file while still
# mounted (the copy needs recovery; its log holds /data's inode, extent
# tree and bitmaps, and with JMODE=journal most of its data blocks
# too).  Then compares, with nbdkit -r:
#   journal: the copy as is (ext4fs replays it into memory: the overlay
#            maps the logged blocks to their journal copies);
#   clean:   the same copy after e2fsck -fy (nothing to replay).
# Workloads (as in run.sh): w1-1 (nbdcopy --connections=1 URI null:),
# w1-4 (4 connections), w3 (fio randread 4k, qd32, 2 jobs, W3_RUNTIME s).
# Runs are interleaved (rep1: w x journal, w x clean, ...); the table
# gives medians, the ratio journal/clean and the server's peak RSS.
#
# Environment: SIZE=1G REPEATS=3 JMODE=journal|ordered (journal)
#   W3_RUNTIME=10 WORKDIR=/tmp/ext4fs-bench-journal  QUICK=1 (smoke:
#   128M, 1 repeat, 3 s)  FILTER=...  KEEP=1 (keep the images)
# Checks (outside the timing; a failure marks the config INVALID): the
# journal server's stderr says it replayed; a full nbdcopy of each config
# matches /data's source by sha256; every nbdcopy/fio exits 0.

set -uo pipefail
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
FILTER=${FILTER:-$here/../filter/.libs/nbdkit-ext4fs-filter.so}
WORKDIR=${WORKDIR:-/tmp/ext4fs-bench-journal}
if [ "${QUICK:-0}" = 1 ]; then
    SIZE=${SIZE:-128M}; REPEATS=${REPEATS:-1}; W3_RUNTIME=${W3_RUNTIME:-3}
fi
SIZE=${SIZE:-1G}
REPEATS=${REPEATS:-3}
W3_RUNTIME=${W3_RUNTIME:-10}
JMODE=${JMODE:-journal}
WORKLOADS=${*:-w1-1 w1-4 w3}

[ "$(id -u)" = 0 ] || { echo "bench/journal.sh needs root (loop devices, mount)" >&2; exit 2; }
[ -f "$FILTER" ] || { echo "filter $FILTER not found" >&2; exit 2; }
for t in nbdkit nbdcopy nbdinfo fio mke2fs e2fsck dumpe2fs losetup mount python3; do
    command -v $t >/dev/null || { echo "missing $t" >&2; exit 2; }
done
case $JMODE in journal|ordered) ;; *) echo "JMODE must be journal or ordered" >&2; exit 2 ;; esac
for w in $WORKLOADS; do
    case $w in w1-1|w1-4|w3) ;; *) echo "unknown workload $w (known: w1-1 w1-4 w3)" >&2; exit 2 ;; esac
done

BYTES=$(numfmt --from=iec "$SIZE")
WD=$WORKDIR
SOCK=$WD/nbd.sock
URI="nbd+unix:///?socket=$SOCK"
RES=$WD/results.tsv
LOG=$WD/log
MNT=$WD/mnt
mkdir -p "$WD" "$MNT"
: > "$RES"; : > "$LOG"
cp "$FILTER" "$WD/filter.so"
FILTER_SRC=$FILTER
FILTER=$WD/filter.so

SRV_PID=
DEV=
cleanup() {
    if [ -n "$SRV_PID" ]; then kill "$SRV_PID" 2>/dev/null; wait "$SRV_PID" 2>/dev/null; fi
    if mountpoint -q "$MNT"; then umount "$MNT" 2>/dev/null || umount -l "$MNT"; fi
    if [ -n "$DEV" ] &&
       [ "$(losetup -n -O BACK-FILE "$DEV" 2>/dev/null | sed 's/ *$//')" = "$WD/live.img" ]; then
        losetup -d "$DEV"
    fi
    rm -f "$SOCK"
    [ "${KEEP:-0}" = 1 ] || rm -f "$WD/filter.so" "$WD/live.img" "$WD/journal.img" \
        "$WD/clean.img" "$WD/data" "$WD/check.out" "$WD/fio.json"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "$@" | tee -a "$LOG" >&2; }
now() { echo "$EPOCHREALTIME"; }
sub() { python3 -c "print('%.3f' % ($2 - $1))"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

# ---------------------------------------------------------------- setup
log "== setup: SIZE=$SIZE REPEATS=$REPEATS JMODE=$JMODE WORKDIR=$WD"
log "   filter: $FILTER_SRC ($(date -r "$FILTER_SRC"))"
head -c "$BYTES" /dev/urandom > "$WD/data"
SHA_DATA=$(sha "$WD/data")
# In data=journal the log must hold all of /data without checkpointing:
# 5/4 x SIZE + 64 MiB (written in fsynced pieces of 16 MiB, each
# transaction well under a quarter of the log); the filesystem is more
# than twice the journal (mke2fs's limit).
JMB=$(( BYTES * 5 / 4 / 1048576 + 64 ))
[ "$JMODE" = ordered ] && JMB=64
rm -f "$WD/live.img"
truncate -s $(( BYTES + 2 * JMB * 1048576 + 128*1048576 )) "$WD/live.img"
mke2fs -q -F -t ext4 -J size=$JMB -E lazy_itable_init=0,lazy_journal_init=0 "$WD/live.img" ||
    { log "mke2fs failed"; exit 1; }
DEV=$(losetup -f --show "$WD/live.img") || { log "losetup failed"; DEV=; exit 1; }
mount -o data=$JMODE,commit=60,noinit_itable "$DEV" "$MNT" || { log "mount failed"; exit 1; }
# In pieces of 16 MiB, each fsynced: one transaction each.
python3 - "$WD/data" "$MNT/data" <<'EOF'
import os, sys
src, dst = sys.argv[1:3]
step = 16 << 20
with open(src, "rb") as s:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)
    while True:
        b = s.read(step)
        if not b: break
        os.write(fd, b); os.fsync(fd)
    os.close(fd)
fd = os.open(os.path.dirname(dst), os.O_RDONLY); os.fsync(fd); os.close(fd)
EOF
cp --sparse=always "$WD/live.img" "$WD/journal.img"
umount "$MNT"; losetup -d "$DEV"; DEV=
rm -f "$WD/live.img"
commits=$(debugfs -c -R logdump "$WD/journal.img" 2>/dev/null | grep -c '(commit block)')
log "   journal image: Journal start $(dumpe2fs -h "$WD/journal.img" 2>/dev/null | sed -n 's/^Journal start: *//p'), $commits committed transaction(s)"
debugfs -c -R "logdump -a" "$WD/journal.img" 2>/dev/null |
    awk '/FS block [0-9]+ logged at/ { n++; b[$3] = 1 } END {
        for (k in b) u++; printf "   logged block copies: %d (%d distinct blocks)\n", n, u }' |
    tee -a "$LOG" >&2
cp --sparse=always "$WD/journal.img" "$WD/clean.img"
e2fsck -fy "$WD/clean.img" >>"$LOG" 2>&1
e2fsck -fn "$WD/clean.img" >>"$LOG" 2>&1 || { log "clean image not clean after e2fsck -fy"; exit 1; }
sync

# ---------------------------------------------------------------- servers
serve() {   # CONFIG
    local i img=$WD/$1.img
    rm -f "$SOCK"
    nbdkit -f -r -U "$SOCK" --filter="$FILTER" file "$img" ext4file=/data 2>"$WD/srv.err" &
    SRV_PID=$!
    for i in $(seq 600); do
        [ -S "$SOCK" ] && nbdinfo --size "$URI" >/dev/null 2>&1 && break
        kill -0 "$SRV_PID" 2>/dev/null || break
        sleep 0.05
    done
    cat "$WD/srv.err" >> "$LOG"
    [ -S "$SOCK" ] && kill -0 "$SRV_PID" 2>/dev/null && return 0
    log "server $1 failed to start: $(head -2 "$WD/srv.err")"
    SRV_PID=; return 1
}
stop_server() {   # -> peak RSS (KiB)
    local hwm
    hwm=$(awk '/^VmHWM/{print $2}' /proc/"$SRV_PID"/status 2>/dev/null)
    kill "$SRV_PID" 2>/dev/null; wait "$SRV_PID" 2>/dev/null; SRV_PID=
    cat "$WD/srv.err" >> "$LOG"
    rm -f "$SOCK"
    echo "${hwm:-0}"
}

declare -A OK
for c in journal clean; do
    ok=1
    serve $c || ok=0
    if [ $ok = 1 ]; then
        rm -f "$WD/check.out"
        nbdcopy "$URI" "$WD/check.out" >>"$LOG" 2>&1 || ok=0
        stop_server >/dev/null
        [ "$(sha "$WD/check.out" 2>/dev/null)" = "$SHA_DATA" ] || ok=0
        rm -f "$WD/check.out"
        if [ $c = journal ] && ! grep -q 'ext4fs: journal: replayed' "$WD/srv.err"; then
            log "   journal: the server did not say it replayed the journal"; ok=0
        fi
        [ $c = clean ] && grep -q 'ext4fs: journal: replayed' "$WD/srv.err" &&
            { log "   clean: the server replayed a clean image"; ok=0; }
    fi
    OK[$c]=$ok
    log "   read verification $c: $([ $ok = 1 ] && echo OK || echo MISMATCH)"
done

record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$RES"; }
run_one() {
    local w=$1 c=$2 rep=$3 t0 t1 rc=0 val unit=s rss valid=1
    serve "$c" || { record "$w" "$c" "$rep" NA s 0 0; return; }
    case $w in
    w1-1) t0=$(now); nbdcopy --connections=1 "$URI" null: >>"$LOG" 2>&1 || rc=1; t1=$(now) ;;
    w1-4) t0=$(now); nbdcopy --connections=4 --threads=4 "$URI" null: >>"$LOG" 2>&1 || rc=1; t1=$(now) ;;
    w3)   t0=$(now)
          fio --name=w3 --ioengine=nbd --uri="$URI" --rw=randread --bs=4k \
              --iodepth=32 --numjobs=2 --time_based --runtime="$W3_RUNTIME" \
              --norandommap --randrepeat=0 --output-format=json \
              --output="$WD/fio.json" >>"$LOG" 2>&1 || rc=1
          t1=$(now); unit=IOPS
          val=$(python3 -c '
import json,sys
j=json.load(open(sys.argv[1]))
ios=sum(x["read"]["total_ios"] for x in j["jobs"])
wall=float(sys.argv[3])-float(sys.argv[2])
err=sum(x["error"] for x in j["jobs"])
print("%.0f" % (ios/wall) if wall>0 and err==0 else "NA")' "$WD/fio.json" "$t0" "$t1" 2>>"$LOG") || rc=1
          [ "$val" = NA ] && rc=1 ;;
    esac
    rss=$(stop_server)
    [ "$unit" = s ] && val=$(sub "$t0" "$t1")
    [ $rc = 0 ] && [ "${OK[$c]}" = 1 ] || valid=0
    record "$w" "$c" "$rep" "$val" "$unit" "$valid" "$rss"
    log "   $w $c rep$rep: $val $unit $([ $valid = 1 ] && echo ok || echo INVALID) rss=${rss}KiB"
}

cat "$WD/journal.img" "$WD/clean.img" > /dev/null   # warm the page cache
for rep in $(seq "$REPEATS"); do
    log "== repeat $rep/$REPEATS"
    for w in $WORKLOADS; do
        for c in journal clean; do run_one "$w" "$c" "$rep"; done
    done
done

python3 - "$RES" "$SIZE" "$REPEATS" "$JMODE" <<'EOF'
import sys, statistics
res, size, reps, jmode = sys.argv[1:5]
rows, order = {}, []
for line in open(res):
    w, c, rep, val, unit, valid, rss = line.rstrip("\n").split("\t")
    if w not in order: order.append(w)
    r = rows.setdefault((w, c), {"vals": [], "unit": unit, "valid": True, "rss": 0})
    if val == "NA": r["valid"] = False
    else: r["vals"].append(float(val))
    if valid != "1": r["valid"] = False
    r["rss"] = max(r["rss"], int(rss or 0))
med = lambda r: statistics.median(r["vals"]) if r["vals"] else None
print()
print("SIZE=%s REPEATS=%s JMODE=%s  (time in s: lower is better; IOPS: higher is better)" % (size, reps, jmode))
print("%-8s %-8s %12s %11s %10s  %-7s %s" % ("workload", "config", "median", "vs clean", "peakRSS", "status", "all runs"))
for w in order:
    base = rows.get((w, "clean"))
    bm = med(base) if base else None
    for c in ("journal", "clean"):
        r = rows.get((w, c))
        if not r: continue
        m = med(r)
        ratio = "%.2fx" % (m / bm) if m is not None and bm else "-"
        mstr = "-" if m is None else ("%.3f s" % m if r["unit"] == "s" else "%.0f %s" % (m, r["unit"]))
        runs = " ".join(("%.3f" % v if r["unit"] == "s" else "%.0f" % v) for v in r["vals"])
        print("%-8s %-8s %12s %11s %8d K  %-7s %s" % (w, c, mstr, ratio, r["rss"],
              "ok" if r["valid"] else "INVALID", runs))
EOF
