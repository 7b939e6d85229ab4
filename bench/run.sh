#!/usr/bin/env bash
# Benchmark nbdkit-ext4fs-filter against the raw file plugin, the stock
# ext2 filter, itself without journaling (ext4fs-nj) and the kernel's ext4
# (kernel: loop mount + file plugin, root only).  See bench/README.md.
#
#   bench/run.sh [WORKLOAD...]      (default: all workloads)
#
# Workloads: w1-1 w1-4 w2 w3 w4-over w4-fill w5 w6 w6-nbd w7-1 w7-2 w7-4 w7-8
#            w8 w9 w9-hole w10 mem-1t mem-10k mem-256 mem-256t4
# Environment:
#   SIZE=1G  REPEATS=3  WORKDIR=/tmp/ext4fs-bench  CONFIGS="raw ext2 ext4fs"
#     (also: ext4fs-nj = ext4fs with -D ext4fs.journal=0; kernel = the image
#     loop-mounted, `nbdkit file MNT/FILE`, write workloads only;
#     ext4fs-old = ext4fs with the build FILTER_OLD, for before/after runs,
#     with the nbdkit options FILTER_OLD_ARGS if set, e.g.
#     FILTER_OLD_ARGS="-D ext4fs.async_commit=0" with FILTER_OLD=FILTER)
#   W3_RUNTIME=10 (seconds)  W9_IOS=32768  W10_RUNTIME=10  QUICK=1 (smoke test only)
#   W5_SIZE=8G W5_DATA=64M  W6_RUNTIME=10 W6_DELAY=1ms  W8_RUNTIME=60
#   W8_REPEATS=1 W8_CONFIGS=ext4fs  MEM_FILES=10000 MEM_CONNS=256 MEM_REPEATS=1
#   FILTER=/work/main/filter/.libs/nbdkit-ext4fs-filter.so  KEEP=1 (keep workdir)

set -uo pipefail
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
FILTER=${FILTER:-$here/../filter/.libs/nbdkit-ext4fs-filter.so}
WORKDIR=${WORKDIR:-/tmp/ext4fs-bench}
if [ "${QUICK:-0}" = 1 ]; then
    SIZE=${SIZE:-256M}; REPEATS=${REPEATS:-1}
    W3_RUNTIME=${W3_RUNTIME:-3}; W9_IOS=${W9_IOS:-4096}; W10_RUNTIME=${W10_RUNTIME:-3}
    W5_SIZE=${W5_SIZE:-1G}; W5_DATA=${W5_DATA:-16M}; W6_RUNTIME=${W6_RUNTIME:-3}
    W8_RUNTIME=${W8_RUNTIME:-10}; MEM_FILES=${MEM_FILES:-1000}
fi
SIZE=${SIZE:-1G}
REPEATS=${REPEATS:-3}
W3_RUNTIME=${W3_RUNTIME:-10}
W9_IOS=${W9_IOS:-32768}
W10_RUNTIME=${W10_RUNTIME:-10}
W5_SIZE=${W5_SIZE:-8G}
W5_DATA=${W5_DATA:-64M}
W6_RUNTIME=${W6_RUNTIME:-10}
W6_DELAY=${W6_DELAY:-1ms}
W8_RUNTIME=${W8_RUNTIME:-60}
W8_REPEATS=${W8_REPEATS:-1}
W8_CONFIGS=${W8_CONFIGS:-ext4fs}
MEM_FILES=${MEM_FILES:-10000}
MEM_CONNS=${MEM_CONNS:-256}
MEM_REPEATS=${MEM_REPEATS:-1}
CONFIGS=${CONFIGS:-raw ext2 ext4fs}
ALL_WORKLOADS="w1-1 w1-4 w2 w3 w4-over w4-fill w5 w6 w6-nbd w7-1 w7-2 w7-4 w7-8 w8 w9 w9-hole w10 mem-1t mem-10k mem-256 mem-256t4"
WORKLOADS=${*:-$ALL_WORKLOADS}

for w in $WORKLOADS; do
    case " $ALL_WORKLOADS " in *" $w "*) ;; *) echo "unknown workload $w (known: $ALL_WORKLOADS)" >&2; exit 2;; esac
done
for c in $CONFIGS; do
    case $c in raw|ext2|ext4fs|ext4fs-nj|ext4fs-old|kernel) ;; *) echo "unknown config $c (known: raw ext2 ext4fs ext4fs-nj ext4fs-old kernel)" >&2; exit 2;; esac
done
KERNEL_NOTE=
if [[ " $CONFIGS " == *" kernel "* ]]; then
    if [ "$(id -u)" != 0 ]; then KERNEL_NOTE="not root"
    elif ! command -v losetup >/dev/null || ! losetup -f >/dev/null 2>&1; then KERNEL_NOTE="no free loop device"
    fi
    if [ -n "$KERNEL_NOTE" ]; then
        CONFIGS=$(for c in $CONFIGS; do [ "$c" = kernel ] || echo -n "$c "; done)
    fi
fi
[ -f "$FILTER" ] || { echo "filter $FILTER not found" >&2; exit 2; }
if [[ " $CONFIGS " == *" ext4fs-old "* ]]; then
    [ -f "${FILTER_OLD:-}" ] || { echo "ext4fs-old needs FILTER_OLD=/path/to/an older build of the filter" >&2; exit 2; }
fi
for t in nbdkit nbdcopy nbdinfo fio mke2fs debugfs e2fsck python3 timeout; do
    command -v $t >/dev/null || { echo "missing $t" >&2; exit 2; }
done

BYTES=$(numfmt --from=iec "$SIZE")
WD=$WORKDIR
SOCK=$WD/nbd.sock
SOCK2=$WD/nbd2.sock
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
if [ -n "${FILTER_OLD:-}" ]; then
    cp "$FILTER_OLD" "$WD/filter-old.so"
    FILTER_OLD_SRC=$FILTER_OLD
    FILTER_OLD=$WD/filter-old.so
fi

SRV_PID=
BACK_PID=
MOUNTED=
cleanup() {
    if [ -n "$SRV_PID" ]; then kill "$SRV_PID" 2>/dev/null; wait "$SRV_PID" 2>/dev/null; fi
    if [ -n "$BACK_PID" ]; then kill "$BACK_PID" 2>/dev/null; wait "$BACK_PID" 2>/dev/null; fi
    if [ -n "$MOUNTED" ]; then umount "$MOUNTED"; fi
    rmdir "$WD/mnt" 2>/dev/null
    rm -f "$SOCK" "$SOCK2"
    [ "${KEEP:-0}" = 1 ] || rm -rf "$WD"/filter.so "$WD"/img "$WD"/img.orig "$WD"/raw.bin "$WD"/rawt.bin \
        "$WD"/dump "$WD"/check.out "$WD"/wsrc "$WD"/src/data "$WD"/src/hole \
        "$WD"/img5 "$WD"/raw5.bin "$WD"/src5 "$WD"/img7 "$WD"/src7 "$WD"/img8 "$WD"/img8.orig \
        "$WD"/src8 "$WD"/raw8t "$WD"/dump8 "$WD"/img1t "$WD"/raw1t.bin "$WD"/src1t \
        "$WD"/img10k "$WD"/src10k
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
[ -n "$KERNEL_NOTE" ] && log "   NOTE: config kernel skipped: $KERNEL_NOTE (it needs root and a loop device)"
log "   filter: $FILTER_SRC (sha256 $FILTER_SHA..., $(date -r "$FILTER_SRC"))"
[ -n "${FILTER_OLD:-}" ] && log "   old filter (ext4fs-old): $FILTER_OLD_SRC (sha256 $(sha256sum "$FILTER_OLD" | cut -c1-16)...)"
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
if [[ " $WORKLOADS " == *" w9-hole "* ]]; then
    rm -f "$WD/zero.src"; truncate -s "$BYTES" "$WD/zero.src"
    SHA_W9H=$(python3 "$here/w9.py" expect "$WD/zero.src" "$BYTES" "$W9_IOS" 2 "$W9_SEED")
    rm -f "$WD/zero.src"
fi
want() { local w; for w in $WORKLOADS; do case $w in $1) return 0;; esac; done; return 1; }
if want w5; then   # W5: W5_SIZE sparse file, W5_DATA of data in 16 pieces
    W5_BYTES=$(numfmt --from=iec "$W5_SIZE"); W5_DBYTES=$(numfmt --from=iec "$W5_DATA")
    mkdir -p "$WD/src5"; rm -f "$WD/src5/"*
    python3 "$here/check.py" mksparse "$WD/src5/sparse" "$W5_BYTES" 16 $(( W5_DBYTES / 16 )) 5
    python3 "$here/check.py" mksparse "$WD/raw5.bin" "$W5_BYTES" 16 $(( W5_DBYTES / 16 )) 5
    SHA_W5=$(sha "$WD/src5/sparse")
    rm -f "$WD/img5"; truncate -s $(( W5_DBYTES * 2 + 64*1024*1024 )) "$WD/img5"
    mke2fs -q -F -t ext4 -d "$WD/src5" "$WD/img5" || { log "mke2fs (w5) failed"; exit 1; }
fi
declare -A SHA_W7
if want 'w7-*'; then   # W7: 8 files of SIZE/8 (the pieces of src/data); raw = dir= of them
    mkdir -p "$WD/src7"; rm -f "$WD/src7/"*
    split -b $(( BYTES / 8 )) -d -a 1 "$WD/src/data" "$WD/src7/f"
    for i in 0 1 2 3 4 5 6 7; do SHA_W7[$i]=$(sha "$WD/src7/f$i"); done
    rm -f "$WD/img7"; truncate -s $(( BYTES + BYTES / 4 + 128*1024*1024 )) "$WD/img7"
    mke2fs -q -F -t ext4 -d "$WD/src7" "$WD/img7" || { log "mke2fs (w7) failed"; exit 1; }
fi
if want w8; then   # W8: 64 files of SIZE/64, data/holes mixed (w8.py mkfiles)
    W8_FSIZE=$(( BYTES / 64 / 4096 * 4096 ))
    mkdir -p "$WD/src8"; rm -f "$WD/src8/"*
    python3 "$here/w8.py" mkfiles "$WD/src8" 64 "$W8_FSIZE" 8
    rm -f "$WD/img8.orig"; truncate -s $(( BYTES * 2 + 128*1024*1024 )) "$WD/img8.orig"
    mke2fs -q -F -t ext4 -d "$WD/src8" "$WD/img8.orig" || { log "mke2fs (w8) failed"; exit 1; }
fi
if want mem-1t; then   # 1 TiB sparse file, 16 pieces of 1 MiB
    mkdir -p "$WD/src1t"; rm -f "$WD/src1t/"*
    python3 "$here/check.py" mksparse "$WD/src1t/big" $(( 1 << 40 )) 16 $(( 1 << 20 )) 11
    python3 "$here/check.py" mksparse "$WD/raw1t.bin" $(( 1 << 40 )) 16 $(( 1 << 20 )) 11
    rm -f "$WD/img1t"; truncate -s $(( 128*1024*1024 )) "$WD/img1t"
    mke2fs -q -F -t ext4 -d "$WD/src1t" "$WD/img1t" || { log "mke2fs (mem-1t) failed"; exit 1; }
fi
if want mem-10k; then   # MEM_FILES small files (1..8 KiB)
    rm -rf "$WD/src10k"; mkdir -p "$WD/src10k"
    python3 "$here/check.py" mkfiles "$WD/src10k" "$MEM_FILES" 10
    rm -f "$WD/img10k"; truncate -s $(( MEM_FILES * 16384 + 64*1024*1024 )) "$WD/img10k"
    mke2fs -q -F -t ext4 -N $(( MEM_FILES + 1024 )) -d "$WD/src10k" "$WD/img10k" \
        || { log "mke2fs (mem-10k) failed"; exit 1; }
fi
sync

# ---------------------------------------------------------------- servers
# start_server CONFIG ro|rw data|hole
start_server() {
    local img=$WD/img.orig raw=$WD/raw.bin
    [ "$2" = rw ] && { img=$WD/img; raw=$WD/rawt.bin; }
    serve "$1" "$2" "$img" "$raw" "/$3"
}
# serve CONFIG ro|rw IMAGE RAW INNER [plain|delay|nbd]
#   raw serves RAW (a file, or a directory: file plugin dir= mode, the
#   client picks the file by export name); ext2/ext4fs serve INNER
#   (/path or exportname) inside IMAGE: ext4fs-nj is ext4fs with
#   -D ext4fs.journal=0; kernel loop-mounts IMAGE on $WD/mnt (default
#   options: data=ordered; ro: -o ro) and serves MNT/INNER with the file
#   plugin (INNER must be a /path); stop_server unmounts it.
#   delay: --filter=delay (W6_DELAY per read/write) between the filter
#   and the file plugin.  nbd: a second nbdkit (file plugin + delay filter)
#   on $SOCK2, and the server under test uses the nbd plugin on it.
# SRV_OPTS: extra nbdkit options (e.g. --threads=4).  PROBE_URI: URI used
# to wait for the server (default $URI).
SRV_OPTS=()
PROBE_URI=
serve() { _serve "$@" || { log "   retrying server start"; sleep 1; _serve "$@"; }; }
_wait_sock() {  # PID SOCK URI
    local i
    for i in $(seq 200); do
        [ -S "$2" ] && nbdinfo --size "$3" >/dev/null 2>&1 && return 0
        kill -0 "$1" 2>/dev/null || break
        sleep 0.05
    done
    return 1
}
_serve() {
    local cfg=$1 mode=$2 img=$3 raw=$4 inner=$5 kind=${6:-plain} ro=() target
    local filters=() plugin=() params=() dparams=(delay-read=$W6_DELAY delay-write=$W6_DELAY)
    [ "$mode" = ro ] && ro=(-r)
    rm -f "$SOCK" "$SOCK2"
    if [ "$cfg" = raw ]; then target=$raw; else target=$img; fi
    if [ "$cfg" = kernel ]; then
        [ "$kind" = plain ] && [ "${inner:0:1}" = / ] || { log "kernel config: only plain /path serving"; return 1; }
        mkdir -p "$WD/mnt"
        mount -o loop$([ "$mode" = ro ] && echo ,ro) "$img" "$WD/mnt" >>"$LOG" 2>&1 \
            || { log "kernel config: mount -o loop $img failed"; return 1; }
        MOUNTED=$WD/mnt
        target=$WD/mnt$inner
    fi
    plugin=(file "$target")
    [ -d "$target" ] && plugin=(file dir="$target")
    case $kind in
    delay) filters=(--filter=delay); params=("${dparams[@]}") ;;
    nbd)   nbdkit -f "${ro[@]}" -U "$SOCK2" --filter=delay "${plugin[@]}" "${dparams[@]}" 2>>"$LOG" &
           BACK_PID=$!
           _wait_sock "$BACK_PID" "$SOCK2" "nbd+unix:///?socket=$SOCK2" || {
               log "backend server failed to start"; kill "$BACK_PID" 2>/dev/null
               wait "$BACK_PID" 2>/dev/null; BACK_PID=; return 1; }
           plugin=(nbd socket="$SOCK2") ;;
    esac
    case $cfg in
    ext2)   filters=(--filter=noextents --filter=ext2 "${filters[@]}"); params+=(ext2file="$inner") ;;
    ext4fs|ext4fs-nj) filters=(--filter="$FILTER" "${filters[@]}"); params+=(ext4file="$inner") ;;
    ext4fs-old) filters=(--filter="$FILTER_OLD" "${filters[@]}"); params+=(ext4file="$inner") ;;
    esac
    local dflags=()
    [ "$cfg" = ext4fs-nj ] && dflags=(-D ext4fs.journal=0)
    # shellcheck disable=SC2206  # words on purpose: "-D flag=value ..."
    [ "$cfg" = ext4fs-old ] && [ -n "${FILTER_OLD_ARGS:-}" ] && dflags=($FILTER_OLD_ARGS)
    nbdkit -f "${ro[@]}" "${dflags[@]}" "${SRV_OPTS[@]}" -U "$SOCK" "${filters[@]}" "${plugin[@]}" "${params[@]}" 2>>"$LOG" &
    SRV_PID=$!
    _wait_sock "$SRV_PID" "$SOCK" "${PROBE_URI:-$URI}" && return 0
    log "server $cfg failed to start"
    kill "$SRV_PID" 2>/dev/null; wait "$SRV_PID" 2>/dev/null; SRV_PID=
    if [ -n "$BACK_PID" ]; then kill "$BACK_PID" 2>/dev/null; wait "$BACK_PID" 2>/dev/null; BACK_PID=; fi
    kernel_umount
    return 1
}
# kernel_umount: unmount the kernel config's loop mount, if any (before
# any e2fsck/debugfs of the image).
kernel_umount() {
    [ -n "$MOUNTED" ] || return 0
    local i
    for i in 1 2 3 4 5; do
        umount "$MOUNTED" >>"$LOG" 2>&1 && { MOUNTED=; return 0; }
        sleep 1
    done
    log "   umount $MOUNTED failed"
    return 1
}
# stop_server -> sets SRV_HWM (peak RSS in KiB).  Must run in this shell,
# not in $(...): wait only works on our own children, and the image checks
# after a write run must not start before the server has closed the image
# (the filter's close commits and checkpoints its journal).
SRV_HWM=0
stop_server() {
    local hwm
    hwm=$(awk '/^VmHWM/{print $2}' /proc/"$SRV_PID"/status 2>/dev/null)
    kill "$SRV_PID" 2>/dev/null; wait "$SRV_PID" 2>/dev/null
    SRV_PID=
    if [ -n "$BACK_PID" ]; then kill "$BACK_PID" 2>/dev/null; wait "$BACK_PID" 2>/dev/null; BACK_PID=; fi
    rm -f "$SOCK" "$SOCK2"
    kernel_umount
    SRV_HWM=${hwm:-0}
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
    # Everything else too: the data the previous run left dirty in the
    # host's page cache (the raw plugin's writes, flushed or not) would
    # otherwise be written back during this run, a cost for whichever
    # config comes next.
    sync
}

# verify_consistent CONFIG -> 0 if the image passes e2fsck -fn and /data
# is untouched (after a write to /hole whose content is not known, w10)
verify_consistent() {
    local cfg=$1
    [ "$cfg" = raw ] && return 0
    [ -z "$MOUNTED" ] || { log "   $WD/img still mounted"; return 1; }
    if ! e2fsck -fn "$WD/img" >>"$LOG" 2>&1; then
        log "   e2fsck -fn reports errors after $cfg write to /hole"; return 1
    fi
    rm -f "$WD/dump"
    debugfs -R "dump /data $WD/dump" "$WD/img" >>"$LOG" 2>&1
    if [ "$(sha "$WD/dump")" != "$SHA_DATA" ]; then
        log "   $cfg write to /hole changed /data"; rm -f "$WD/dump"; return 1
    fi
    rm -f "$WD/dump"
}

# verify_written CONFIG FILE EXPECTED_SHA -> returns 0 if good
verify_written() {
    local cfg=$1 file=$2 want=$3 got
    if [ "$cfg" = raw ]; then
        got=$(sha "$WD/rawt.bin")
    else
        [ -z "$MOUNTED" ] || { log "   $WD/img still mounted"; return 1; }
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
    stop_server
    [ "$ok" = 0 ] && [ "$(sha "$WD/check.out")" = "$SHA_DATA" ] || ok=1
    rm -f "$WD/check.out"
    READ_OK[$cfg]=$([ $ok = 0 ] && echo 1 || echo 0)
    log "   read verification $cfg: $([ $ok = 0 ] && echo OK || echo MISMATCH)"
}

# Once per config and workload group (outside timing) for W5, W6, W7.
#   w5: full nbdcopy to a file, sha256; and nbdinfo --map must mark the
#       data pieces (check.py pieces).
#   w6, w6-nbd: 500 random reads through the delayed server (check.py sample)
#       (the full-byte check of the same filter is the w1 one).
#   w7: every file, full nbdcopy, sha256.
verify_group() {
    local key=$1 cfg=$2 ok=0 i
    case $key in
    w5)  serve "$cfg" ro "$WD/img5" "$WD/raw5.bin" /sparse || ok=1
         if [ $ok = 0 ]; then
             rm -f "$WD/check.out"
             nbdcopy "$URI" "$WD/check.out" >>"$LOG" 2>&1 || ok=1
             nbdinfo --map --json "$URI" > "$WD/map.json" 2>>"$LOG" || ok=1
             # noextents (part of the stock config) reports all data: no map check
             python3 "$here/check.py" pieces "$URI" "$WD/src5/sparse" \
                 "$([ "$cfg" = ext2 ] && echo - || echo "$WD/map.json")" >>"$LOG" 2>&1 || ok=1
             stop_server
             [ "$(sha "$WD/check.out")" = "$SHA_W5" ] || ok=1
             rm -f "$WD/check.out"
         fi ;;
    w6|w6-nbd)
         local kind=delay; [ $key = w6-nbd ] && kind=nbd
         serve "$cfg" ro "$WD/img.orig" "$WD/raw.bin" /data $kind || ok=1
         if [ $ok = 0 ]; then
             python3 "$here/check.py" sample "$URI" "$WD/src/data" 500 6 >>"$LOG" 2>&1 || ok=1
             stop_server
         fi ;;
    w7)  PROBE_URI="nbd+unix:///f0?socket=$SOCK"
         serve "$cfg" ro "$WD/img7" "$WD/src7" exportname || ok=1
         PROBE_URI=
         if [ $ok = 0 ]; then
             for i in 0 1 2 3 4 5 6 7; do
                 rm -f "$WD/check.out"
                 nbdcopy "nbd+unix:///f$i?socket=$SOCK" "$WD/check.out" >>"$LOG" 2>&1 || ok=1
                 [ "$(sha "$WD/check.out")" = "${SHA_W7[$i]}" ] || ok=1
             done
             rm -f "$WD/check.out"
             stop_server
         fi ;;
    esac
    READ_OK[$key:$cfg]=$([ $ok = 0 ] && echo 1 || echo 0)
    log "   read verification $key $cfg: $([ $ok = 0 ] && echo OK || echo MISMATCH)"
}

# wl_configs WORKLOAD -> the configs (from CONFIGS) that run it
wl_configs() {
    local allowed c out=
    case $1 in
    w8)    allowed=$W8_CONFIGS ;;
    mem-*) allowed="raw ext4fs ext4fs-nj ext4fs-old" ;;   # the stock filter serializes connections / reads 1 TiB
    w4-over|w4-fill|w9|w9-hole|w10) allowed="raw ext2 ext4fs ext4fs-nj ext4fs-old kernel" ;;
    *)     allowed="raw ext2 ext4fs ext4fs-nj ext4fs-old" ;;
    esac
    for c in $CONFIGS; do case " $allowed " in *" $c "*) out+="$c ";; esac; done
    echo $out
}

# fio_iops KIND T0 T1 -> IOPS of $WD/fio.json (KIND read or write: total
# ios / wall time of the whole fio run, jobs may be serialized by the
# stock ext2 filter, so fio's per-job runtime would overstate it), or NA
fio_iops() {
    python3 -c '
import json,sys
j=json.load(open(sys.argv[1]))
ios=sum(x[sys.argv[4]]["total_ios"] for x in j["jobs"])
wall=float(sys.argv[3])-float(sys.argv[2])
err=sum(x["error"] for x in j["jobs"])
print("%.0f" % (ios/wall) if wall>0 and err==0 else "NA")' "$WD/fio.json" "$2" "$3" "$1" 2>>"$LOG"
}

# fio_randread URI RUNTIME -> prints IOPS (total ios / wall time), or NA
fio_randread() {
    local t0 t1 rc=0
    t0=$(now)
    fio --name=rr --ioengine=nbd --uri="$1" --rw=randread --bs=4k \
        --iodepth=32 --numjobs=2 --time_based --runtime="$2" \
        --norandommap --randrepeat=0 --output-format=json \
        --output="$WD/fio.json" >>"$LOG" 2>&1 || rc=1
    t1=$(now)
    [ $rc = 0 ] || { echo NA; return; }
    fio_iops read "$t0" "$t1" || echo NA
}

# hwm_now -> current peak RSS (KiB) of the server under test
hwm_now() { awk '/^VmHWM/{print $2}' /proc/"$SRV_PID"/status 2>/dev/null || echo 0; }

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
              val=$(fio_iops read "$t0" "$t1") || rc=1
              [ "$val" = NA ] && rc=1 ;;
        esac
        stop_server; rss=$SRV_HWM
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
        stop_server; rss=$SRV_HWM
        val=$(sub "$t0" "$t1")
        [ "$rc" = 0 ] && verify_written "$cfg" $file "$SHA_WSRC" || valid=0
        ;;
    w5)
        serve "$cfg" ro "$WD/img5" "$WD/raw5.bin" /sparse || { record "$w" "$cfg" "$rep" NA s 0 0; return; }
        t0=$(now); nbdcopy "$URI" null: >>"$LOG" 2>&1 || rc=1; t1=$(now)
        stop_server; rss=$SRV_HWM
        val=$(sub "$t0" "$t1")
        [ "$rc" = 0 ] && [ "${READ_OK[w5:$cfg]}" = 1 ] || valid=0
        ;;
    w6|w6-nbd)
        local kind=delay; [ $w = w6-nbd ] && kind=nbd
        serve "$cfg" ro "$WD/img.orig" "$WD/raw.bin" /data $kind || { record "$w" "$cfg" "$rep" NA IOPS 0 0; return; }
        unit=IOPS
        val=$(fio_randread "$URI" "$W6_RUNTIME")
        stop_server; rss=$SRV_HWM
        [ "$val" != NA ] && [ "${READ_OK[$w:$cfg]}" = 1 ] || valid=0
        ;;
    w7-*)
        local n=${w#w7-} pids=() p
        PROBE_URI="nbd+unix:///f0?socket=$SOCK"
        serve "$cfg" ro "$WD/img7" "$WD/src7" exportname || { PROBE_URI=; record "$w" "$cfg" "$rep" NA s 0 0; return; }
        PROBE_URI=
        t0=$(now)
        for (( p = 0; p < n; p++ )); do
            nbdcopy --connections=1 "nbd+unix:///f$p?socket=$SOCK" null: >>"$LOG" 2>&1 & pids+=($!)
        done
        for p in "${pids[@]}"; do wait "$p" || rc=1; done
        t1=$(now)
        stop_server; rss=$SRV_HWM
        val=$(sub "$t0" "$t1")
        [ "$rc" = 0 ] && [ "${READ_OK[w7:$cfg]}" = 1 ] || valid=0
        ;;
    w8)
        local tgt out f got want
        if [ "$cfg" = raw ]; then
            rm -rf "$WD/raw8t"; mkdir -p "$WD/raw8t"
            cp --sparse=always "$WD/src8/"* "$WD/raw8t/"; sync "$WD/raw8t"/*
        else
            rm -f "$WD/img8"; cp --sparse=always "$WD/img8.orig" "$WD/img8"; sync "$WD/img8"
        fi
        PROBE_URI="nbd+unix:///f00?socket=$SOCK"
        serve "$cfg" rw "$WD/img8" "$WD/raw8t" exportname || { PROBE_URI=; record "$w" "$cfg" "$rep" NA ops/s 0 0; return; }
        PROBE_URI=
        out=$(timeout $(( ${W8_RUNTIME%.*} + 600 )) python3 "$here/w8.py" run "$SOCK" "$WD/src8" 64 16 \
              "$W8_RUNTIME" "$rep" 2 "$WD/w8.expect" 2>>"$LOG") || { rc=1; log "   w8 $cfg: client failed (see log)"; }
        stop_server; rss=$SRV_HWM
        unit=ops/s
        val=$(python3 -c 'import sys; n,t=sys.argv[1].split(); print("%.0f" % (int(n)/float(t)))' "$out" 2>/dev/null) || { val=NA; rc=1; }
        if [ "$rc" = 0 ]; then
            if [ "$cfg" = raw ]; then tgt=$WD/raw8t
            else
                tgt=$WD/dump8; rm -rf "$tgt"; mkdir -p "$tgt"
                e2fsck -fn "$WD/img8" >>"$LOG" 2>&1 || { log "   e2fsck -fn reports errors after w8 ($cfg)"; rc=1; }
                while read -r f want; do echo "dump /$f $tgt/$f"; done < "$WD/w8.expect" > "$WD/w8.cmds"
                debugfs -f "$WD/w8.cmds" "$WD/img8" >>"$LOG" 2>&1
            fi
            [ "$(wc -l < "$WD/w8.expect")" = 64 ] || { log "   w8: expected 64 files in w8.expect"; rc=1; }
            while read -r f want; do
                got=$(sha "$tgt/$f" 2>/dev/null)
                [ "$got" = "$want" ] || { log "   w8 $cfg /$f checksum mismatch: got $got want $want"; rc=1; }
            done < "$WD/w8.expect"
            rm -rf "$WD/dump8"
        fi
        [ "$rc" = 0 ] || valid=0
        ;;
    mem-1t)
        serve "$cfg" ro "$WD/img1t" "$WD/raw1t.bin" /big || { record "$w" "$cfg" "$rep" NA s 0 0; return; }
        t0=$(now)
        nbdinfo --map --json "$URI" > "$WD/map.json" 2>>"$LOG" || rc=1
        nbdcopy "$URI" null: >>"$LOG" 2>&1 || rc=1
        t1=$(now)
        rss=$(hwm_now)
        python3 "$here/check.py" pieces "$URI" "$WD/src1t/big" "$WD/map.json" >>"$LOG" 2>&1 || rc=1
        stop_server
        val=$(sub "$t0" "$t1")
        [ "$rc" = 0 ] || valid=0
        ;;
    mem-10k)
        local out
        PROBE_URI="nbd+unix:///f00000?socket=$SOCK"
        serve "$cfg" ro "$WD/img10k" "$WD/src10k" exportname || { PROBE_URI=; record "$w" "$cfg" "$rep" NA s 0 0; return; }
        PROBE_URI=
        out=$(python3 "$here/check.py" files "$SOCK" "$MEM_FILES" 10 2>>"$LOG") || rc=1
        stop_server; rss=$SRV_HWM
        val=$(echo "$out" | awk '{printf "%.3f", $2}')
        [ "$rc" = 0 ] && [ -n "$val" ] || { valid=0; val=${val:-NA}; }
        ;;
    mem-256|mem-256t4)
        local out
        [ $w = mem-256t4 ] && SRV_OPTS=(--threads=4)
        serve "$cfg" ro "$WD/img.orig" "$WD/raw.bin" /data || { SRV_OPTS=(); record "$w" "$cfg" "$rep" NA s 0 0; return; }
        SRV_OPTS=()
        out=$(python3 "$here/check.py" conns "$URI" "$WD/src/data" "$MEM_CONNS" "$rep" 2>>"$LOG") || rc=1
        stop_server; rss=$SRV_HWM
        val=$(echo "$out" | awk '{printf "%.3f", $2}')
        [ "$rc" = 0 ] && [ -n "$val" ] || { valid=0; val=${val:-NA}; }
        ;;
    w10)
        # fio random 4 KiB writes into the sparse file: nearly every one
        # allocates; fsync at the end (counted).
        reset_target "$cfg" hole
        start_server "$cfg" rw hole || { record "$w" "$cfg" "$rep" NA IOPS 0 0; return; }
        t0=$(now)
        fio --name=w10 --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k \
            --iodepth=32 --numjobs=2 --time_based --runtime="$W10_RUNTIME" \
            --norandommap --randrepeat=0 --end_fsync=1 --output-format=json \
            --output="$WD/fio.json" >>"$LOG" 2>&1 || rc=1
        t1=$(now)
        stop_server; rss=$SRV_HWM
        unit=IOPS
        val=$(fio_iops write "$t0" "$t1") || rc=1
        [ "$val" = NA ] && rc=1
        [ "$rc" = 0 ] && verify_consistent "$cfg" || valid=0
        ;;
    w9|w9-hole)
        local file=data sha=${SHA_W9:-}
        [ $w = w9-hole ] && { file=hole; sha=$SHA_W9H; }
        reset_target "$cfg" $file
        start_server "$cfg" rw $file || { record "$w" "$cfg" "$rep" NA IOPS 0 0; return; }
        local out
        out=$(python3 "$here/w9.py" run "$URI" "$BYTES" "$W9_IOS" 2 "$W9_SEED" 2>>"$LOG") || rc=1
        stop_server; rss=$SRV_HWM
        unit=IOPS
        val=$(python3 -c 'import sys; n,t=sys.argv[1].split(); print("%.0f" % (int(n)/float(t)))' "$out" 2>/dev/null) || { val=NA; rc=1; }
        [ "$rc" = 0 ] && verify_written "$cfg" $file "$sha" || valid=0
        ;;
    esac
    record "$w" "$cfg" "$rep" "$val" "$unit" "$valid" "$rss"
    log "   $w $cfg rep$rep: $val $unit $([ $valid = 1 ] && echo ok || echo INVALID) rss=${rss}KiB"
}

need_read=0
for w in $WORKLOADS; do case $w in w1*|w2|w3) need_read=1;; esac; done
if [ $need_read = 1 ]; then
    cat "$WD/raw.bin" "$WD/img.orig" > /dev/null   # warm the page cache
    for c in $(wl_configs w1-1); do verify_read "$c"; done
fi
for g in w5 w6 w6-nbd w7; do
    want "$([ $g = w7 ] && echo 'w7-*' || echo $g)" || continue
    for c in $(wl_configs "$g"); do verify_group "$g" "$c"; done
done

start=$(now)
for rep in $(seq "$REPEATS"); do
    log "== repeat $rep/$REPEATS"
    for w in $WORKLOADS; do
        [ $w = w8 ] && [ "$rep" -gt "$W8_REPEATS" ] && continue
        case $w in mem-*) [ "$rep" -gt "$MEM_REPEATS" ] && continue;; esac
        for c in $(wl_configs "$w"); do
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
        "w9": "rand 4k write, flush/16",
        "w9-hole": "w9 into a sparse file",
        "w10": "fio randwrite 4k sparse",
        "w5": "sparse file -> null:", "w6": "randread, delay filter",
        "w6-nbd": "randread, nbd+delay back", "w7-1": "1 file, 1 client",
        "w7-2": "2 files, 2 clients", "w7-4": "4 files, 4 clients",
        "w7-8": "8 files, 8 clients", "w8": "64 clients mixed r/w",
        "mem-1t": "1 TiB sparse map+copy", "mem-10k": "open/read/close files",
        "mem-256": "256 conns", "mem-256t4": "256 conns --threads=4"}
def med(r): return statistics.median(r["vals"]) if r["vals"] else None
print()
print("SIZE=%s REPEATS=%s  (time in s: lower is better; IOPS: higher is better)" % (size, reps))
print("%-8s %-24s %-9s %12s %9s %10s  %-7s %s" % ("workload", "description", "config", "median", "vs raw", "peakRSS", "status", "all runs"))
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
        mstr = "-" if m is None else ("%.3f s" % m if r["unit"] == "s" else "%.0f %s" % (m, r["unit"]))
        runs = " ".join(("%.3f" % v if r["unit"] == "s" else "%.0f" % v) for v in r["vals"])
        print("%-8s %-24s %-9s %12s %9s %8d K  %-7s %s" % (w, desc.get(w, ""), c, mstr, ratio,
              r["rss"], "ok" if r["valid"] else "INVALID", runs))
if any(w == "w4-fill" for w in order) and any(w == "w4-over" for w in order):
    print()
    for c in configs:
        o, f = rows.get(("w4-over", c)), rows.get(("w4-fill", c))
        if o and f and med(o) and med(f):
            print("hole fill / overwrite, %-9s %.2fx" % (c, med(f) / med(o)))
# ext4fs against the other configs, as a cost: ext4fs's time / the other's
# time (for IOPS and ops/s: the other's rate / ext4fs's rate), so > 1 means
# ext4fs is slower.
others = [c for c in ("ext4fs-old", "ext4fs-nj", "raw", "kernel", "ext2") if c in configs]
if "ext4fs" in configs and others:
    lines = []
    for w in order:
        e = rows.get((w, "ext4fs"))
        if not e or not med(e): continue
        parts = []
        for c in others:
            r = rows.get((w, c))
            if not r or not med(r): continue
            cost = med(e) / med(r) if e["unit"] == "s" else med(r) / med(e)
            parts.append("vs %-9s %5.2fx" % (c, cost))
        if parts: lines.append("  %-8s %s" % (w, "   ".join(parts)))
    if lines:
        print()
        print("ext4fs cost (time ratio of the medians, ext4fs / other; > 1 = ext4fs slower):")
        print("\n".join(lines))
w7 = [w for w in ("w7-1", "w7-2", "w7-4", "w7-8") if w in order]
if w7:
    # each client reads one file of SIZE/8
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    b = int(size[:-1]) * mult[size[-1].upper()] if size[-1].upper() in mult else int(size)
    print()
    print("w7 aggregate throughput (MiB/s, median time) and speedup over 1 client:")
    for c in configs:
        parts = []
        base = None
        for w in w7:
            r = rows.get((w, c))
            if not r or not med(r): continue
            n = int(w[3:])
            tput = n * (b / 8) / (1 << 20) / med(r)
            if w == "w7-1": base = tput
            parts.append("%d: %.0f%s" % (n, tput, " (%.2fx)" % (tput / base) if base else ""))
        if parts: print("  %-9s %s" % (c, "   ".join(parts)))
EOF
