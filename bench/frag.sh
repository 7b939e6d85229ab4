#!/bin/bash -
# bench/frag.sh: serving a very fragmented file.  Images (cached in
# $FRAG_DIR) hold /frag, a file of N extents of one block each, none
# physically contiguous (bench/mkfrag.c), data never written (sparse,
# reads as zeros).  For each image, R repetitions of each contestant:
#
#   open   from starting nbdkit until the first 4 KiB pread at offset 0
#          returns (poll-connecting to the socket); also that pread alone
#   far    one 4 KiB pread at a random offset in the last tenth of the file
#   rand   NREADS (1000) random 4 KiB preads over the whole file: s, IOPS
#   RSS    nbdkit's VmHWM just before it is stopped
#
# Contestants (CONTESTANTS, default "ext4fs ext4fs2 ext2"; ext4fs2 only
# when FILTER2 is set):
#   ext4fs   nbdkit -r --filter=FILTER file IMG ext4file=/frag
#   ext4fs2  the same with FILTER2, labelled FILTER2_NAME
#   ext2     nbdkit -r --filter=ext2 file IMG ext2file=/frag (stock)
# A contestant that cannot serve the file is recorded as "fails" with
# the server's error line.  Every server start is bounded by TIMEOUT
# (300 s), and so are the reads after it.
#
#   bench/frag.sh                               # 1M and 10M extents, R=3
#   FRAG_SIZES="1000000" R=5 bench/frag.sh
#   FILTER2=/tmp/new.so FILTER2_NAME=new bench/frag.sh
#   FRAG_KIND=indirect bench/frag.sh            # the same, ext3-style
#
# FRAG_KIND=indirect makes the images without the extent feature, so
# that /frag is mapped by indirect blocks (N one-block runs, none
# contiguous: frag-ind-N.img).
#
# Variables: FRAG_SIZES ("1000000 10000000"), R (3), FRAG_DIR
# (/var/tmp/frag), FILTER (filter/.libs/nbdkit-ext4fs-filter.so; copied
# at the start, so a rebuild does not change a running bench), FILTER2,
# FILTER2_NAME (ext4fs-2), CONTESTANTS, NREADS (1000), TIMEOUT (300),
# SEED (1), RO (1: servers run with -r, so the cached images never
# change; RO=0 serves them read-write), FSCK (1: e2fsck -fn each new
# image), PYTHON (/usr/bin/python3, needs the nbd module).
# Log (servers' stderr, image builds): $FRAG_DIR/log; raw results:
# $FRAG_DIR/results.tsv (one line per run).

set -u
here=$(cd "$(dirname "$0")" && pwd)
FRAG_DIR=${FRAG_DIR:-/var/tmp/frag}
FRAG_SIZES=${FRAG_SIZES:-"1000000 10000000"}
FRAG_KIND=${FRAG_KIND:-extents}
R=${R:-3}
FILTER=${FILTER:-$here/../filter/.libs/nbdkit-ext4fs-filter.so}
FILTER2=${FILTER2:-}
FILTER2_NAME=${FILTER2_NAME:-ext4fs-2}
CONTESTANTS=${CONTESTANTS:-"ext4fs ext4fs2 ext2"}
NREADS=${NREADS:-1000}
TIMEOUT=${TIMEOUT:-300}
SEED=${SEED:-1}
RO=${RO:-1}
FSCK=${FSCK:-1}
PYTHON=${PYTHON:-/usr/bin/python3}

mkdir -p "$FRAG_DIR" || exit 2
WD=$FRAG_DIR
LOG=$WD/log
RES=$WD/results.tsv
log() { echo "$*" | tee -a "$LOG" >&2; }

for t in nbdkit mke2fs e2fsck cc pkg-config timeout "$PYTHON"; do
  command -v "$t" >/dev/null || { echo "frag.sh: $t not found" >&2; exit 2; }
done
"$PYTHON" -c 'import nbd' 2>/dev/null ||
  { echo "frag.sh: $PYTHON has no nbd module (set PYTHON)" >&2; exit 2; }
[ -f "$FILTER" ] || { echo "frag.sh: filter $FILTER not found" >&2; exit 2; }
[ -z "$FILTER2" ] || [ -f "$FILTER2" ] ||
  { echo "frag.sh: FILTER2 $FILTER2 not found" >&2; exit 2; }

: >"$LOG"
log "== frag.sh $(date -u '+%F %T UTC'), $(nproc) CPUs, sizes: $FRAG_SIZES, R=$R"

# Private copies of the filters.
cp "$FILTER" "$WD/ext4fs-1.so" || exit 2
log "   ext4fs:  $FILTER (sha256 $(sha256sum "$WD/ext4fs-1.so" | cut -c1-16)..., $(date -u -r "$FILTER" '+%F %T'))"
if [ -n "$FILTER2" ]; then
  cp "$FILTER2" "$WD/ext4fs-2.so" || exit 2
  log "   $FILTER2_NAME: $FILTER2 (sha256 $(sha256sum "$WD/ext4fs-2.so" | cut -c1-16)...)"
fi
if git -C "$here/.." rev-parse --short HEAD >/dev/null 2>&1; then
  log "   git: $(git -C "$here/.." rev-parse --short HEAD)$(git -C "$here/.." diff --quiet HEAD -- filter 2>/dev/null || echo ' (filter/ has uncommitted changes)')"
fi

# mkfrag
MKFRAG=$WD/mkfrag
if [ ! -x "$MKFRAG" ] || [ "$here/mkfrag.c" -nt "$MKFRAG" ]; then
  cc -O2 -Wall -o "$MKFRAG" "$here/mkfrag.c" \
     $(pkg-config --cflags --libs ext2fs com_err) || exit 2
fi

now() { date +%s.%N; }
elapsed() { "$PYTHON" -c "print('%.2f' % ($2 - $1))"; }

# Images: 2N blocks for the data (one used, one skipped), N/340 for the
# tree, N/64 + 64 Ki for metadata and slack.  One inode per 4 MiB, no
# resize inode, inode tables not zeroed: the image stays sparse.
case $FRAG_KIND in
  extents)  imgname() { echo "$WD/frag-$1.img"; }; mkfs_o=^has_journal,extent,^resize_inode ;;
  indirect) imgname() { echo "$WD/frag-ind-$1.img"; }; mkfs_o=^has_journal,^extent,^64bit,^resize_inode ;;
  *) echo "frag.sh: FRAG_KIND is extents or indirect" >&2; exit 2 ;;
esac
for n in $FRAG_SIZES; do
  img=$(imgname "$n")
  [ -f "$img" ] && continue
  blocks=$(( 2 * n + n / 256 + n / 64 + 65536 ))
  log "-- making $img ($n extents, $blocks blocks of 4 KiB)"
  rm -f "$img.tmp"
  truncate -s $(( blocks * 4096 )) "$img.tmp" || exit 2
  t0=$(now)
  mke2fs -q -F -t ext4 -b 4096 -O "$mkfs_o" \
         -E lazy_itable_init=1,nodiscard -i 4194304 -m 0 \
         "$img.tmp" "$blocks" >>"$LOG" 2>&1 || { log "mke2fs failed"; exit 1; }
  t1=$(now)
  "$MKFRAG" "$img.tmp" "$n" >>"$LOG" 2>&1 || { log "mkfrag failed (see $LOG)"; exit 1; }
  t2=$(now)
  log "   mke2fs $(elapsed "$t0" "$t1") s, mkfrag $(elapsed "$t1" "$t2") s, $(du -h "$img.tmp" | cut -f1) allocated"
  if [ "$FSCK" = 1 ]; then
    if e2fsck -fn "$img.tmp" >>"$LOG" 2>&1; then
      log "   e2fsck -fn clean ($(elapsed "$t2" "$(now)") s)"
    else
      log "   e2fsck -fn NOT clean: see $LOG"; exit 1
    fi
  fi
  mv "$img.tmp" "$img"
done

# One run: start the server, time it, read, stop it.  Prints one
# tab-separated line: status open_s connect_s pread0_ms far_ms rand_s
# iops hwm_kb message.
cat >"$WD/fragrun.py" <<'EOF'
import errno, os, random, signal, subprocess, sys, time
import nbd

sock, logpath, expect, seed, nreads, timeout = sys.argv[1:7]
expect, seed, nreads, timeout = int(expect), int(seed), int(nreads), int(timeout)
cmd = sys.argv[7:]
ZERO = bytes(4096)

class Fail(Exception):
    pass

def on_alarm(sig, frame):
    raise Fail("timeout (%d s)" % timeout)
signal.signal(signal.SIGALRM, on_alarm)

def retry(e):
    v = e.errno
    return v in ("ENOENT", "ECONNREFUSED", errno.ENOENT, errno.ECONNREFUSED)

def server_error(start):
    with open(logpath, "rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    for l in reversed(lines):
        if "error" in l.lower():
            return l.strip()
    return lines[-1].strip() if lines else ""

try:
    os.unlink(sock)
except FileNotFoundError:
    pass
logf = open(logpath, "ab")
start = logf.tell()
out = ["ok", "", "", "", "", "", "", "", ""]
t0 = time.monotonic()
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
h = None
try:
    signal.alarm(timeout)
    while True:
        if p.poll() is not None:
            raise Fail("server exited (status %d)" % p.returncode)
        h = nbd.NBD()
        try:
            h.connect_unix(sock)
            break
        except nbd.Error as e:
            h = None
            if not retry(e):
                raise Fail("connect: %s" % e.string)
            time.sleep(0.002)
    t1 = time.monotonic()
    b = h.pread(4096, 0)
    t2 = time.monotonic()
    signal.alarm(0)
    out[1] = "%.3f" % (t2 - t0)
    out[2] = "%.3f" % (t1 - t0)
    out[3] = "%.2f" % ((t2 - t1) * 1e3)
    size = h.get_size()
    if size != expect:
        raise Fail("size %d, expected %d" % (size, expect))
    if b != ZERO:
        raise Fail("nonzero data at offset 0")
    rng = random.Random(seed)
    nblk = size // 4096
    far = rng.randrange(nblk - nblk // 10, nblk) * 4096
    offs = [rng.randrange(nblk) * 4096 for _ in range(nreads)]
    signal.alarm(timeout)
    t = time.monotonic()
    b = h.pread(4096, far)
    out[4] = "%.2f" % ((time.monotonic() - t) * 1e3)
    if b != ZERO:
        raise Fail("nonzero data at offset %d" % far)
    t = time.monotonic()
    bad = 0
    for o in offs:
        if h.pread(4096, o) != ZERO:
            bad += 1
    d = time.monotonic() - t
    signal.alarm(0)
    out[5] = "%.3f" % d
    out[6] = "%.0f" % (nreads / d)
    if bad:
        raise Fail("%d random reads returned nonzero data" % bad)
    with open("/proc/%d/status" % p.pid) as f:
        for l in f:
            if l.startswith("VmHWM:"):
                out[7] = l.split()[1]
except (Fail, nbd.Error) as e:
    signal.alarm(0)
    out[0] = "fails"
    msg = e.string if isinstance(e, nbd.Error) else str(e)
    err = server_error(start)
    out[8] = (msg + ("; server: " + err if err else "")).replace("\t", " ")
finally:
    signal.alarm(0)
    if out[0] == "fails" and not out[7] and p.poll() is None:
        try:
            with open("/proc/%d/status" % p.pid) as f:
                for l in f:
                    if l.startswith("VmHWM:"):
                        out[7] = l.split()[1]
        except OSError:
            pass
    h = None
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
print("\t".join(out))
EOF

ro=(); [ "$RO" = 1 ] && ro=(-r)
SOCK=$WD/frag.sock
names=()
for c in $CONTESTANTS; do
  case $c in
    ext4fs|ext2) names+=("$c") ;;
    ext4fs2) [ -n "$FILTER2" ] && names+=("$c") ;;
    *) echo "frag.sh: unknown contestant $c" >&2; exit 2 ;;
  esac
done
label() { case $1 in ext4fs2) echo "$FILTER2_NAME" ;; *) echo "$1" ;; esac; }

printf 'extents\tcontestant\trep\tstatus\topen_s\tconnect_s\tpread0_ms\tfar_ms\trand_s\tiops\thwm_kb\tmessage\n' >"$RES"
for n in $FRAG_SIZES; do
  img=$(imgname "$n")
  for rep in $(seq 1 "$R"); do
    for c in "${names[@]}"; do
      case $c in
        ext4fs)  srv=(--filter="$WD/ext4fs-1.so" file "$img" ext4file=/frag) ;;
        ext4fs2) srv=(--filter="$WD/ext4fs-2.so" file "$img" ext4file=/frag) ;;
        ext2)    srv=(--filter=ext2 file "$img" ext2file=/frag) ;;
      esac
      echo "--- $n $(label "$c") rep $rep: nbdkit ${ro[*]} ${srv[*]}" >>"$LOG"
      line=$(timeout $(( 2 * TIMEOUT + 60 )) "$PYTHON" "$WD/fragrun.py" "$SOCK" "$LOG" \
               $(( n * 4096 )) "$SEED" "$NREADS" "$TIMEOUT" \
               nbdkit "${ro[@]}" -U "$SOCK" -f "${srv[@]}")
      [ -n "$line" ] || line=$(printf 'fails\t\t\t\t\t\t\t\tfragrun.py did not finish')
      printf '%s\t%s\t%s\t%s\n' "$n" "$(label "$c")" "$rep" "$line" >>"$RES"
      log "   $n $(label "$c") rep $rep: $(echo "$line" | tr '\t' ' ')"
    done
  done
done
rm -f "$SOCK"

# Medians as a markdown table.
"$PYTHON" - "$RES" "$NREADS" "$R" <<'EOF'
import csv, statistics, sys
res, nreads, r = sys.argv[1], sys.argv[2], sys.argv[3]
rows = list(csv.DictReader(open(res), delimiter="\t"))
groups = {}
for x in rows:
    groups.setdefault((x["extents"], x["contestant"]), []).append(x)
def med(xs, k, fmt):
    v = [float(x[k]) for x in xs if x[k] != ""]
    return fmt % statistics.median(v) if v else "-"
print("| extents | contestant | open (s) | first pread (ms) | far pread (ms) "
      "| %s random preads (s) | IOPS | peak RSS (KiB) | status |" % nreads)
print("|---|---|---|---|---|---|---|---|---|")
for (n, c), xs in groups.items():
    ok = [x for x in xs if x["status"] == "ok"]
    bad = [x for x in xs if x["status"] != "ok"]
    status = "ok" if not bad else "fails (%d/%d): %s" % (len(bad), len(xs), bad[0]["message"])
    if not ok:
        print("| %s | %s | - | - | - | - | - | %s | %s |"
              % (n, c, med(xs, "hwm_kb", "%.0f"), status))
        continue
    print("| %s | %s | %s | %s | %s | %s | %s | %s | %s |"
          % (n, c, med(ok, "open_s", "%.3f"), med(ok, "pread0_ms", "%.2f"),
             med(ok, "far_ms", "%.2f"), med(ok, "rand_s", "%.3f"),
             med(ok, "iops", "%.0f"), med(ok, "hwm_kb", "%.0f"), status))
print()
print("Medians of %s runs; open = from starting nbdkit to the return of the "
      "first 4 KiB pread at offset 0." % r)
EOF
