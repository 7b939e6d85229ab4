#!/usr/bin/env bash
# Several contexts ("lanes") into the plugin (ext4contexts=N).
# The log filter sits BELOW ext4fs, so each context the filter opens
# shows up there as its own "connection=K Connect".
#  1. a plugin that supports multi-conn (file), writable: N contexts,
#     and 4 concurrent writers' requests reach the plugin through more
#     than one of them; a flush after the writes, kill -9, and the
#     image is clean and holds every byte;
#  2. multi-conn disabled underneath (--filter=multi-conn
#     multi-conn-mode=disable): a writable filesystem uses exactly one
#     context; read-only (-r) it may use N;
#  3. a plugin that serializes all requests: one context; one that
#     serializes requests per handle: N, each called one at a time;
#  4. bad values of ext4contexts are refused with a message;
#  5. over the nbd plugin (a second nbdkit serving the image): 4
#     contexts, i.e. 4 NBD connections to the far server; writes from 2
#     clients, flush, stop, e2fsck and the bytes; the nbd plugin's
#     dynamic-export=true is refused with a message (it aborted nbdkit).
source "$srcdir/functions.sh"
# Below the serializing plugins, tests/nbdkit-overlap-filter.c fails
# any call that overlaps another where the thread model forbids it.
overlap=$(test_filter overlap)
export here=$(cd "$srcdir" && pwd)
requires nbdsh --version
requires python3 -c 'import nbd'
requires debugfs -V
cd "$tmpdir"

mkdir src
head -c $((8*1024*1024)) /dev/urandom > src/f
truncate -s 64M img
mke2fs -q -F -t ext4 -d src img
cp img img.orig

# The "context(s) into the plugin (MODE)" debug lines of a log.
contexts () { grep -o "[0-9]* context(s) into the plugin ([a-z-]*)" "$1" | sort -u; }

# Distinct plugin-side connection ids that saw a request of type $2.
ids_with () { grep -E "connection=[0-9]+ $2 " "$1" | grep -o 'connection=[0-9]*' | sort -u | wc -l; }

# --- 1. multi-conn plugin, writable, 4 writers at once.
sock=$tmpdir/sock
rm -f plog
start_nbdkit "$sock" -v --filter="$FILTER" --filter=log \
    file img ext4file=/f ext4contexts=3 logfile="$tmpdir/plog" 2> log1
cp src/f expected
pids=()
for i in 0 1 2 3; do
    head -c $((1024*1024)) /dev/urandom > part$i
    dd if=part$i of=expected bs=1M seek=$((i*2)) conv=notrunc status=none
    # 64 KiB writes, 8 in flight, flush, read back.
    python3 -m e4test put "$sock" $((i*2*1048576)) part$i 65536 8 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || fail "writer $p failed"; done
# Everything was flushed: kill -9 now must lose nothing.
pid=$(cat "$sock.pid")
kill -9 "$pid"
wait_gone "$pid" 10 || fail "nbdkit $pid survived kill -9"
contexts log1 | grep -q "^3 context(s) into the plugin (read-write)" ||
    fail "expected 3 read-write contexts: $(contexts log1)"
n=$(ids_with plog Write)
[ "$n" -ge 2 ] || fail "writes went down $n context(s) only"
n=$(ids_with plog Read)
[ "$n" -ge 2 ] || fail "reads went down $n context(s) only"
e2fsck -fn img > fsck1.log 2>&1 ||
    { cat fsck1.log; fail "e2fsck after kill -9 following flushes"; }
dump_cmp img /f expected

# --- 2. multi-conn disabled underneath.
cp img.orig img
nbdkit_srv -v -U - --filter="$FILTER" --filter=multi-conn \
    file img ext4file=/f multi-conn-mode=disable ext4contexts=4 \
    --run 'nbdsh -u "$uri" -c "h.pwrite(b\"x\" * 4096, 0); h.flush()"' 2> log2 ||
    { tail log2; fail "write over a non-multi-conn plugin failed"; }
contexts log2 | grep -q "^1 context(s) into the plugin (read-write)" ||
    fail "a writable filesystem over a non-multi-conn plugin must use one context: $(contexts log2)"
grep -q "does not support multi-conn" log2 || fail "no message about multi-conn"
fsck_clean img
{ printf 'x%.0s' $(seq 4096); tail -c +4097 src/f; } > expected2
dump_cmp img /f expected2

cp img.orig img
nbdkit_srv -v -r -U - --filter="$FILTER" --filter=multi-conn \
    file img ext4file=/f multi-conn-mode=disable ext4contexts=4 \
    --run 'nbdcopy --connections=2 "$uri" out2' 2> log3 ||
    { tail log3; fail "read-only copy failed"; }
cmp out2 src/f || fail "read-only copy over several contexts differs"
contexts log3 | grep -q "^4 context(s) into the plugin (read-only)" ||
    fail "a read-only filesystem should use all 4 contexts: $(contexts log3)"
cmp img img.orig || fail "read-only server changed the image"

# --- 3. serializing plugins.
nbdkit_srv -v -U - --filter="$FILTER" --filter=noparallel --filter="$overlap" \
    file img ext4file=/f serialize=all-requests overlap=all-requests \
    ext4contexts=4 \
    --run 'nbdcopy --connections=2 "$uri" out3' 2> log4 ||
    { tail log4; fail "copy over serialize=all-requests failed"; }
grep "error: overlap:" log4 && fail "calls overlapped over serialize=all-requests"
cmp out3 src/f || fail "copy over serialize=all-requests differs"
[ "$(contexts log4 | grep -c '^1 context')" -ge 1 ] &&
    ! contexts log4 | grep -qv '^1 context' ||
    fail "serialize=all-requests must use one context: $(contexts log4)"
nbdkit_srv -v -U - --filter="$FILTER" --filter=noparallel --filter="$overlap" \
    file img ext4file=/f serialize=requests overlap=requests ext4contexts=2 \
    --run 'nbdcopy --connections=2 "$uri" out4' 2> log5 ||
    { tail log5; fail "copy over serialize=requests failed"; }
grep "error: overlap:" log5 && fail "calls on one context overlapped over serialize=requests"
# Many small requests from 4 clients: no two calls may meet where the
# thread model forbids it (one context over serialize=all-requests,
# one call per context over serialize=requests).
for m in all-requests:4 requests:2; do
    nbdkit_srv -U - --filter="$FILTER" --filter=noparallel --filter="$overlap" \
        file img ext4file=/f serialize=${m%:*} overlap=${m%:*} ext4contexts=${m#*:} \
        --run '/usr/bin/python3 "$here/parallel-readers.py" "$uri" src/f' 2> log-r ||
        { grep -m3 error log-r; fail "readers over serialize=${m%:*} failed"; }
    grep "error: overlap:" log-r && fail "calls overlapped over serialize=${m%:*}"
done
cmp out4 src/f || fail "copy over serialize=requests differs"
contexts log5 | grep -q "^2 context(s)" ||
    fail "serialize=requests may use 2 contexts: $(contexts log5)"

# --- 4. the default is one context (servers such as qemu-nbd accept
# one client unless told otherwise: more would hang the open).
nbdkit_srv -v -U - --filter="$FILTER" file img ext4file=/f \
    --run 'nbdinfo --size "$uri"' 2> log9 || { tail log9; fail "default server failed"; }
! contexts log9 | grep -qv "^1 context(s)" && contexts log9 | grep -q "^1 context(s)" ||
    fail "the default should be one context: $(contexts log9)"

# Bad values.
for v in 0 17 abc -1 ""; do
    if nbdkit_srv -U - --filter="$FILTER" file img ext4file=/f \
           ext4contexts="$v" --run true 2> log6; then
        fail "ext4contexts=$v was accepted"
    fi
    grep -q "ext4contexts" log6 || { cat log6; fail "no message naming ext4contexts=$v"; }
done

# --- 5. over the nbd plugin.
if nbdkit nbd --version >/dev/null 2>&1; then
    cp img.orig img
    far=$tmpdir/far.sock
    start_nbdkit "$far" -v file img 2> farlog
    sock5=$tmpdir/sock5
    start_nbdkit "$sock5" -v --filter="$FILTER" nbd socket="$far" ext4file=/f \
        ext4contexts=4 2> log7
    cp src/f expected5
    pids=()
    for i in 0 1; do
        head -c $((256*1024)) /dev/urandom > p5.$i
        dd if=p5.$i of=expected5 bs=256K seek=$((i*5)) conv=notrunc status=none
        python3 -m e4test put "$sock5" $((i*5*262144)) p5.$i &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || fail "nbd-plugin writer $p failed"; done
    nbdcopy "nbd+unix:///?socket=$sock5" out5 || fail "copy over the nbd plugin failed"
    cmp out5 expected5 || fail "read back over the nbd plugin differs"
    stop_nbdkit "$sock5"
    stop_nbdkit "$far"
    contexts log7 | grep -q "^4 context(s) into the plugin (read-write)" ||
        fail "expected 4 read-write contexts over the nbd plugin: $(contexts log7)"
    # Each context is an NBD connection to the far server.
    n=$(grep -c "accepted connection" farlog || true)
    [ "$n" -ge 4 ] || fail "the far server saw $n connection(s), expected >= 4"
    fsck_clean img
    dump_cmp img /f expected5

    if nbdkit_srv -U - --filter="$FILTER" nbd socket="$far" ext4file=/f \
           dynamic-export=true --run true 2> log8; then
        fail "dynamic-export=true was accepted"
    fi
    grep -q "dynamic-export=true cannot be used under ext4fs" log8 ||
        { cat log8; fail "no message for dynamic-export=true"; }
else
    echo "nbd plugin not installed: skipping part 5"
fi
echo ok
