#!/usr/bin/env bash
# Chained commits (DESIGN.md §15): with flushes back to back, a
# commit's commit block goes down with the next transaction's log and
# shares its flush; and a connection that closes never does journal
# I/O on its own thread (DESIGN.md §8, .finalize).
#
# Below ext4fs: a slow flush (failnth-flush-delay-us) and slow writes
# (the delay filter, whose sleeps end at once, failing the write, when
# the connection they run for closes).  3 "flushers" fill holes of /f
# (4 writes of 4 KiB at a time, then a flush: every flush commits
# mapping changes) while a "leaver" connects, fills holes without
# flushing and disconnects, 12 times over: its .finalize must hand the
# commit to the commit timer thread (a commit on its closing thread
# would write a staged commit block through the delay filter, fail and
# abort the journal: the flushers' flushes then fail).  Then:
#  - every client succeeded; with -v, journal_stats reports commit
#    blocks flushed with the next log (at least one);
#  - with -D ext4fs.chain_commit=0, none (and the same content);
#  - after a replay of a copy if one is pending (the delay filter fails
#    the writes at shutdown), e2fsck -fn and /f byte for byte: the
#    flushers' last flushes came after the leaver's last round, so
#    every byte written is durable.
# And idle clients after a chained commit: the commit timer commits
# what is left (below).
source "$srcdir/functions.sh"
requires /usr/bin/python3 -c 'import nbd'
requires debugfs -V
requires nbdkit --filter=delay null --dump-plugin
failnth=$(test_filter failnth) || exit $?
cd "$tmpdir"
bad () { fail "$@"; }
export SEED=${SEED:-$RANDOM}
echo "SEED=$SEED"

cat > chain.py <<'EOF'
import os, sys, time
import e4test as t

ident, sock, orig_path, out, role = (int(sys.argv[1]), sys.argv[2],
                                     sys.argv[3], sys.argv[4], sys.argv[5])
NCLIENTS, BS = 4, 4096
orig = open(orig_path, "rb").read()
size = len(orig)
rnd = t.client_rng(ident)
# Block b is this client's if b % NCLIENTS == ident; the file is a
# hole: every first write of a block allocates.
mine = [b for b in range(size // BS) if b % NCLIENTS == ident]
rnd.shuffle(mine)
owned = []
model = bytearray(orig)

def fill(h, blocks):
    cmds = []
    for b in blocks:
        buf = rnd.randbytes(BS)
        model[b * BS:(b + 1) * BS] = buf
        owned.append((b * BS, BS))
        cmds.append(h.aio_pwrite(buf, b * BS))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cmds:
        h.aio_command_completed(c)      # raises on error

def save():
    with open(out, "wb") as f:
        import pickle
        pickle.dump([(o, bytes(model[o:o + n])) for o, n in owned], f)

if role == "leaver":
    t.barrier("chain.%d" % ident)
    for rnd_i in range(12):
        h = t.connect(sock, size=size)
        fill(h, [mine.pop() for _ in range(8)])
        h.shutdown()                    # no flush: .finalize commits
        del h
    save()
    t.touch("leaver.done")
else:
    h = t.connect(sock, size=size)
    t.barrier("chain.%d" % ident)
    rounds = 0
    while not os.path.exists("leaver.done") or rounds < 20:
        fill(h, [mine.pop() for _ in range(4)])
        h.flush()
        # A pause: the commit staged by this flush may then be the
        # leaver's .finalize's to write.
        time.sleep(rnd.uniform(0.001, 0.01))
        rounds += 1
        if len(mine) < 4:
            t.fail("client %d: out of holes, the leaver never finished" % ident)
    for o, n in owned:
        if h.pread(n, o) != bytes(model[o:o + n]):
            t.fail("client %d: %d+%d reads wrong" % (ident, o, n))
    h.flush()
    h.shutdown()
    save()
EOF

mkdir src
truncate -s 32M src/f
truncate -s 128M img0
mke2fs -q -F -t ext4 -b 4096 -d src img0

for chain in 1 0; do
    echo "=== chain_commit=$chain"
    cp --sparse=always img0 img
    rm -f out.* ready.* go leaver.done
    srv_start srv$chain -v -D ext4fs.chain_commit=$chain -D ext4fs.journal_stats=1 \
        --filter="$FILTER" --filter="$failnth" --filter=delay \
        file img failnth-file=$tmpdir/ctl failnth-flush-delay-us=3000 \
        delay-write=2ms ext4file=/f
    sock=$tmpdir/srv$chain.sock
    pids=()
    for ((i=0; i<4; i++)); do
        role=flusher
        [ $i = 0 ] && role=leaver
        /usr/bin/python3 chain.py $i "$sock" src/f out.$i $role &
        pids+=($!)
    done
    release_clients 4 "${pids[@]}"
    srv_stop srv$chain
    if grep -q "journal was aborted\|aborting the journal" srv$chain.err; then
        grep -m3 "error:" srv$chain.err
        fail "chain_commit=$chain: the journal was aborted"
    fi
    stats=$(grep "ext4fs: journal: .* commits," srv$chain.err | tail -1)
    [ -n "$stats" ] || fail "chain_commit=$chain: no journal_stats line"
    chained=$(sed -n 's/.* \([0-9]*\) commit blocks flushed with the next log.*/\1/p' \
                  <<< "$stats")
    commits=$(sed -n 's/.*ext4fs: journal: \([0-9]*\) commits,.*/\1/p' <<< "$stats")
    echo "chain_commit=$chain: $chained of $commits commit blocks flushed with the next log"
    if [ $chain = 1 ]; then
        [ "${chained:-0}" -ge 1 ] ||
            fail "chain_commit=1: no commit block went with the next log"
    else
        [ "${chained:-x}" = 0 ] ||
            fail "chain_commit=0: $chained commit blocks chained"
    fi
    replay_copy img
    fsck_clean img.chk
    /usr/bin/python3 -m e4test merge src/f exp out.*
    dump_cmp img.chk /f exp
done

# Idle clients after a chained commit: A's flush is held at its first
# step's flush (failnth), B fills holes meanwhile (without a flush:
# they go into the next transaction, U, which A's second step stages
# once A's own commit is durable); then nothing happens.  The commit
# timer must commit what is left, U's commit block included, within
# its interval (COMMIT_INTERVAL, 5 s): after 8 s, nbdkit is killed
# (SIGKILL, no .finalize, no close), and a replay of the image must
# give B's data as well as A's.  (With the timer's commit disabled,
# B's blocks read as holes.  The timer also takes a staged commit with
# nothing else running, which this does not isolate: here B's
# requests leave something in the running transaction too.)
echo "=== idle clients, a commit staged"
cp --sparse=always img0 img
rm -f ctl ctl.hold ctl.held
sock=$tmpdir/idle.sock
start_nbdkit "$sock" -v --filter="$FILTER" --filter="$failnth" \
    file img failnth-file="$tmpdir/ctl" ext4file=/f 2> idle.err
cat > idle.py <<'EOF2'
import os, sys, threading, time
import nbd
import e4test as t
sock, orig_path = sys.argv[1], sys.argv[2]
BS = 4096
exp = bytearray(open(orig_path, "rb").read())
a = t.connect(sock)
b = t.connect(sock)
for k in range(8):
    buf = t.pattern(k, BS, b"a")
    a.pwrite(buf, (2 * k) * BS)
    exp[(2 * k) * BS:(2 * k + 1) * BS] = buf
open("ctl.hold", "w").write("f\n")
th, res = t.flush_in_thread(a)
t.wait_for("ctl.held", "A's commit to be held", timeout=30)
for k in range(8):
    buf = t.pattern(100 + k, BS, b"b")
    off = (1000 + 2 * k) * BS
    b.pwrite(buf, off)
    exp[off:off + BS] = buf
os.unlink("ctl.hold")
th.join(60)
if res.get("r") != "ok":
    t.fail("idle: A's flush: %s" % res.get("r"))
open("exp-idle", "wb").write(exp)
time.sleep(8)
# Still connected (no .finalize) when nbdkit is killed.
t.touch("idle.slept")
time.sleep(60)
EOF2
/usr/bin/python3 idle.py "$sock" src/f &
idle_pid=$!
for ((i=0; i<300; i++)); do
    [ -e idle.slept ] && break
    kill -0 $idle_pid 2>/dev/null || { wait $idle_pid || true; fail "idle: the clients failed"; }
    sleep 0.1
done
[ -e idle.slept ] || fail "idle: the clients did not finish"
kill -9 "$(cat "$sock.pid")"
kill $idle_pid 2>/dev/null || true
wait $idle_pid 2>/dev/null || true
sleep 0.5
grep -q "failnth: holding f" idle.err || fail "idle: test setup: A's flush was not held"
needs_recovery img ||
    fail "idle: test setup: the image does not need recovery"
replay_copy img
fsck_clean img.chk
dump_cmp img.chk /f exp-idle
echo "ok"
