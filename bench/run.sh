#!/usr/bin/env bash
# Benchmark nbdkit-ext4fs-filter against the raw file plugin and the stock
# ext2 filter.  See bench/README.md.
#
#   bench/run.sh [WORKLOAD...]      (default: all workloads)
#
# Workloads: w1-1 w1-4 w2 w3 w4-over w4-fill w9
# Environment:
#   SIZE=1G  REPEATS=3  WORKDIR=/tmp/ext4fs-bench  CONFIGS="raw ext2 ext4fs"
#   W3_RUNTIME=10 (seconds)  W9_IOS=32768  QUICK=1 (smoke test only)
#   FILTER=/work/main/filter/.libs/nbdkit-ext4fs-filter.so  KEEP=1 (keep workdir)

set -uo pipefail
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
FILTER=${FILTER:-$here/../filter/.libs/nbdkit-ext4fs-filter.so}
WORKDIR=${WORKDIR:-/tmp/ext4fs-bench}
if [ "${QUICK:-0}" = 1 ]; then
    SIZE=${SIZE:-256M}; REPEATS=${REPEATS:-1}
    W3_RUNTIME=${W3_RUNTIME:-3}; W9_IOS=${W9_IOS:-4096}
fi
SIZE=${SIZE:-1G}
REPEATS=${REPEATS:-3}
W3_RUNTIME=${W3_RUNTIME:-10}
W9_IOS=${W9_IOS:-32768}
CONFIGS=${CONFIGS:-raw ext2 ext4fs}
ALL_WORKLOADS="w1-1 w1-4 w2 w3 w4-over w4-fill w9"
WORKLOADS=${*:-$ALL_WORKLOADS}

for w in $WORKLOADS; do
    case " $ALL_WORKLOADS " in *" $w "*) ;; *) echo "unknown workload $w (known: $ALL_WORKLOADS)" >&2; exit 2;; esac
done
[ -f "$FILTER" ] || { echo "filter $FILTER not found" >&2; exit 2; }
for t in nbdkit nbdcopy nbdinfo fio mke2fs debugfs e2fsck python3; do
    command -v $t >/dev/null || { echo "missing $t" >&2; exit 2; }
done

BYTES=$(numfmt --from=iec "$SIZE")
WD=$WORKDIR
SOCK=$WD/nbd.sock
URI="nbd+unix:///?socket=$SOCK"
RES=$WD/results.tsv
LOG=$WD/log
mkdir -p "$WD"
: > "$RES"; : > "$LOG"
# Snapshot the filter: it may be rebuilt while we run.
for i in 1 2 3; do
    cp "$FILTER" "$WD/filter.so" && nbdkit --dump-plugin --filter="$WD/filter.so" null >/dev/null 2>&1 && break
    sleep 5
done
FILTER_SHA=$(sha256sum "$WD/filter.so" | cut -c1-16)
FILTER_SRC=$FILTER
FILTER=$WD/filter.so

SRV_PID=
cleanup() {
    if [ -n "$SRV_PID" ]; then kill "$SRV_PID" 2>/dev/null; wait "$SRV_PID" 2>/dev/null; fi
    rm -f "$SOCK"
    [ "${KEEP:-0}" = 1 ] || rm -f "$WD"/filter.so "$WD"/img "$WD"/img.orig "$WD"/raw.bin "$WD"/rawt.bin \
        "$WD"/dump "$WD"/check.out "$WD"/wsrc "$WD"/src/data "$WD"/src/hole
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "$@" | tee -a "$LOG" >&2; }
now() { echo "$EPOCHREALTIME"; }
sub() { python3 -c "print('%.3f' % ($2 - $1))"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

# ---------------------------------------------------------------- setup
log "== setup: SIZE=$SIZE ($BYTES bytes) REPEATS=$REPEATS WORKDIR=$WD"
log "   workloads: $WORKLOADS   configs: $CONFIGS"
log "   filter: $FILTER_SRC (sha256 $FILTER_SHA..., $(date -r "$FILTER_SRC"))"
mkdir -p "$WD/src"
rm -f "$WD/src/"*
head -c "$BYTES" /dev/urandom > "$WD/src/data"
truncate -s "$BYTES" "$WD/src/hole"
head -c "$BYTES" /dev/urandom > "$WD/wsrc"
SHA_DATA=$(sha "$WD/src/data")
SHA_WSRC=$(sha "$WD/wsrc")
SHA_ZERO=$(sha "$WD/src/hole")
rm -f "$WD/img.orig"
truncate -s $(( BYTES * 2 + BYTES / 4 + 128*1024*1024 )) "$WD/img.orig"
mke2fs -q -F -t ext4 -d "$WD/src" "$WD/img.orig" || { log "mke2fs failed"; exit 1; }
cp "$WD/src/data" "$WD/raw.bin"
sync
W9_SEED=1234
if [[ " $WORKLOADS " == *" w9 "* ]]; then
    SHA_W9=$(python3 "$here/w9.py" expect "$WD/src/data" "$BYTES" "$W9_IOS" 2 "$W9_SEED")
fi

# ---------------------------------------------------------------- servers
# start_server CONFIG ro|rw data|hole
start_server() { _start_server "$@" || { log "   retrying server start"; sleep 1; _start_server "$@"; }; }
_start_server() {
    local cfg=$1 mode=$2 file=$3 ro=() path
    [ "$mode" = ro ] && ro=(-r)
    rm -f "$SOCK"
    case $cfg in
        raw)    if [ "$mode" = ro ]; then path=$WD/raw.bin; else path=$WD/rawt.bin; fi
                nbdkit -f "${ro[@]}" -U "$SOCK" file "$path" 2>>"$LOG" & ;;
        ext2)   if [ "$mode" = ro ]; then path=$WD/img.orig; else path=$WD/img; fi
                nbdkit -f "${ro[@]}" -U "$SOCK" --filter=noextents --filter=ext2 \
                    file "$path" ext2file=/$file 2>>"$LOG" & ;;
        ext4fs) if [ "$mode" = ro ]; then path=$WD/img.orig; else path=$WD/img; fi
                nbdkit -f "${ro[@]}" -U "$SOCK" --filter="$FILTER" \
                    file "$path" ext4file=/$file 2>>"$LOG" & ;;
    esac
    SRV_PID=$!
    local i
    for i in $(seq 200); do
        [ -S "$SOCK" ] && nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
        kill -0 "$SRV_PID" 2>/dev/null || break
        sleep 0.05
    done
    log "server $cfg failed to start"; SRV_PID=; return 1
}
# stop_server -> prints peak RSS in KiB
stop_server() {
    local hwm
    hwm=$(awk '/^VmHWM/{print $2}' /proc/"$SRV_PID"/status 2>/dev/null)
    kill "$SRV_PID" 2>/dev/null; wait "$SRV_PID" 2>/dev/null
    SRV_PID=
    rm -f "$SOCK"
    echo "${hwm:-0}"
}

# Reset the write target (outside timing) and push it to disk so the
# timed flush only pays for what the workload wrote.
reset_target() {
    local cfg=$1 file=$2
    if [ "$cfg" = raw ]; then
        rm -f "$WD/rawt.bin"
        if [ "$file" = data ]; then cp "$WD/src/data" "$WD/rawt.bin"
        else truncate -s "$BYTES" "$WD/rawt.bin"; fi
        sync "$WD/rawt.bin"
    else
        rm -f "$WD/img"
        cp --sparse=always "$WD/img.orig" "$WD/img"
        sync "$WD/img"
    fi
}

# verify_written CONFIG FILE EXPECTED_SHA -> returns 0 if good
verify_written() {
    local cfg=$1 file=$2 want=$3 got
    if [ "$cfg" = raw ]; then
        got=$(sha "$WD/rawt.bin")
    else
        if ! e2fsck -fn "$WD/img" >>"$LOG" 2>&1; then
            log "   e2fsck -fn reports errors after $cfg write to /$file"; return 1
        fi
        rm -f "$WD/dump"
        debugfs -R "dump /$file $WD/dump" "$WD/img" >>"$LOG" 2>&1
        got=$(sha "$WD/dump")
        # The other file must be untouched.
        local other=hole osha=$SHA_ZERO
        [ "$file" = hole ] && { other=data; osha=$SHA_DATA; }
        rm -f "$WD/dump"
        debugfs -R "dump /$other $WD/dump" "$WD/img" >>"$LOG" 2>&1
        if [ "$(sha "$WD/dump")" != "$osha" ]; then
            log "   $cfg write to /$file changed /$other"; return 1
        fi
        rm -f "$WD/dump"
    fi
    [ "$got" = "$want" ] || { log "   $cfg /$file checksum mismatch: got $got want $want"; return 1; }
}

declare -A READ_OK
# Once per config (outside timing): full copy to a file, compare with source.
verify_read() {
    local cfg=$1 ok=0
    start_server "$cfg" ro data || { READ_OK[$cfg]=0; return; }
    rm -f "$WD/check.out"
    nbdcopy "$URI" "$WD/check.out" >>"$LOG" 2>&1 || ok=1
    stop_server >/dev/null
    [ "$ok" = 0 ] && [ "$(sha "$WD/check.out")" = "$SHA_DATA" ] || ok=1
    rm -f "$WD/check.out"
    READ_OK[$cfg]=$([ $ok = 0 ] && echo 1 || echo 0)
    log "   read verification $cfg: $([ $ok = 0 ] && echo OK || echo MISMATCH)"
}

# record WORKLOAD CONFIG REP VALUE UNIT VALID RSS
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$RES"; }

# ---------------------------------------------------------------- workloads
run_one() {
    local w=$1 cfg=$2 rep=$3 t0 t1 rc=0 valid=1 val unit=s rss
    case $w in
    w1-1|w1-4|w2|w3)
        start_server "$cfg" ro data || { record "$w" "$cfg" "$rep" NA s 0 0; return; }
        case $w in
        w1-1) t0=$(now); nbdcopy --connections=1 "$URI" null: >>"$LOG" 2>&1 || rc=1; t1=$(now) ;;
        w1-4) t0=$(now); nbdcopy --connections=4 --threads=4 "$URI" null: >>"$LOG" 2>&1 || rc=1; t1=$(now) ;;
        w2)   local pids=() p
              t0=$(now)
              for p in 1 2 3 4; do nbdcopy --connections=1 "$URI" null: >>"$LOG" 2>&1 & pids+=($!); done
              for p in "${pids[@]}"; do wait "$p" || rc=1; done
              t1=$(now) ;;
        w3)   t0=$(now)
              fio --name=w3 --ioengine=nbd --uri="$URI" --rw=randread --bs=4k \
                  --iodepth=32 --numjobs=2 --time_based --runtime="$W3_RUNTIME" \
                  --norandommap --randrepeat=0 --output-format=json \
                  --output="$WD/fio.json" >>"$LOG" 2>&1 || rc=1
              t1=$(now)
              unit=IOPS
              # total ios / wall time of the whole fio run (jobs may be
              # serialized by the stock ext2 filter, so fio's per-job
              # runtime would overstate its IOPS)
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
        [ "$rc" = 0 ] && [ "${READ_OK[$cfg]}" = 1 ] || valid=0
        ;;
    w4-over|w4-fill)
        local file=data; [ $w = w4-fill ] && file=hole
        reset_target "$cfg" $file
        start_server "$cfg" rw $file || { record "$w" "$cfg" "$rep" NA s 0 0; return; }
        t0=$(now)
        nbdcopy --flush "$WD/wsrc" "$URI" >>"$LOG" 2>&1 || rc=1
        t1=$(now)
        rss=$(stop_server)
        val=$(sub "$t0" "$t1")
        [ "$rc" = 0 ] && verify_written "$cfg" $file "$SHA_WSRC" || valid=0
        ;;
    w9)
        reset_target "$cfg" data
        start_server "$cfg" rw data || { record "$w" "$cfg" "$rep" NA IOPS 0 0; return; }
        local out
        out=$(python3 "$here/w9.py" run "$URI" "$BYTES" "$W9_IOS" 2 "$W9_SEED" 2>>"$LOG") || rc=1
        rss=$(stop_server)
        unit=IOPS
        val=$(python3 -c 'import sys; n,t=sys.argv[1].split(); print("%.0f" % (int(n)/float(t)))' "$out" 2>/dev/null) || { val=NA; rc=1; }
        [ "$rc" = 0 ] && verify_written "$cfg" data "$SHA_W9" || valid=0
        ;;
    esac
    record "$w" "$cfg" "$rep" "$val" "$unit" "$valid" "$rss"
    log "   $w $cfg rep$rep: $val $unit $([ $valid = 1 ] && echo ok || echo INVALID) rss=${rss}KiB"
}

need_read=0
for w in $WORKLOADS; do case $w in w1*|w2|w3) need_read=1;; esac; done
if [ $need_read = 1 ]; then
    cat "$WD/raw.bin" "$WD/img.orig" > /dev/null   # warm the page cache
    for c in $CONFIGS; do verify_read "$c"; done
fi

start=$(now)
for rep in $(seq "$REPEATS"); do
    log "== repeat $rep/$REPEATS"
    for w in $WORKLOADS; do
        for c in $CONFIGS; do
            run_one "$w" "$c" "$rep"
        done
    done
done
log "== total benchmark time: $(sub "$start" "$(now)") s"

# ---------------------------------------------------------------- report
python3 - "$RES" "$SIZE" "$REPEATS" "$CONFIGS" <<'EOF'
import sys, statistics
res, size, reps, configs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()
rows = {}
order = []
for line in open(res):
    w, c, rep, val, unit, valid, rss = line.rstrip("\n").split("\t")
    if w not in order: order.append(w)
    r = rows.setdefault((w, c), {"vals": [], "unit": unit, "valid": True, "rss": 0})
    if val == "NA": r["valid"] = False
    else: r["vals"].append(float(val))
    if valid != "1": r["valid"] = False
    r["rss"] = max(r["rss"], int(rss or 0))
desc = {"w1-1": "seq read nbdcopy 1 conn", "w1-4": "seq read nbdcopy 4 conn",
        "w2": "4 concurrent nbdcopy", "w3": "fio randread 4k qd32 x2",
        "w4-over": "overwrite + flush", "w4-fill": "fill sparse + flush",
        "w9": "rand 4k write, flush/16"}
def med(r): return statistics.median(r["vals"]) if r["vals"] else None
print()
print("SIZE=%s REPEATS=%s  (time in s: lower is better; IOPS: higher is better)" % (size, reps))
print("%-8s %-24s %-7s %12s %9s %10s  %-7s %s" % ("workload", "description", "config", "median", "vs raw", "peakRSS", "status", "all runs"))
for w in order:
    base = rows.get((w, "raw"))
    bm = med(base) if base else None
    for c in configs:
        r = rows.get((w, c))
        if not r: continue
        m = med(r)
        if m is None: ratio = "-"
        elif bm: ratio = "%.2fx" % (m / bm)
        else: ratio = "-"
        mstr = "-" if m is None else ("%.3f s" % m if r["unit"] == "s" else "%.0f IOPS" % m)
        runs = " ".join(("%.3f" % v if r["unit"] == "s" else "%.0f" % v) for v in r["vals"])
        print("%-8s %-24s %-7s %12s %9s %8d K  %-7s %s" % (w, desc.get(w, ""), c, mstr, ratio,
              r["rss"], "ok" if r["valid"] else "INVALID", runs))
if any(w == "w4-fill" for w in order) and any(w == "w4-over" for w in order):
    print()
    for c in configs:
        o, f = rows.get(("w4-over", c)), rows.get(("w4-fill", c))
        if o and f and med(o) and med(f):
            print("hole fill / overwrite, %-7s %.2fx" % (c, med(f) / med(o)))
EOF
