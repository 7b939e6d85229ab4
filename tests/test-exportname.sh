#!/usr/bin/env bash
# ext4file=exportname: the client's export name is the path.  Good
# names (with or without a leading '/', through symlinks) serve the
# right bytes; nbdinfo --list lists exactly the regular files; bad
# names fail without stopping the server; ext4root= confines clients
# to a subtree (symlinks pointing out of it are refused).
source "$srcdir/functions.sh"
requires nbdcopy --version
requires nbdinfo --version
requires python3 -c 'import nbd'
cd "$tmpdir"

mkdir -p src/d1/d2/d3 src/tenant/sub src/emptydir
head -c 200000 /dev/urandom > src/d1/f
head -c $((8*1024*1024 + 17)) /dev/urandom > src/d1/d2/d3/deep
head -c 5000 /dev/urandom > src/top
: > src/empty1
: > src/d1/empty2
ln -s d1/f src/lnk                  # relative symlink to a file
ln -s /d1/d2/d3/deep src/alnk       # absolute symlink to a file
ln -s d1 src/dirlnk                 # symlink to a directory
ln -s lnk src/lnk2                  # symlink to a symlink
ln -s b src/a                       # loop a -> b -> a
ln -s a src/b
echo "top secret" > src/secret
head -c 3000 /dev/urandom > src/tenant/t1
head -c 70000 /dev/urandom > src/tenant/sub/t2
ln -s sub/t2 src/tenant/in_rel
ln -s /tenant/t1 src/tenant/in_abs
ln -s /secret src/tenant/out_abs
ln -s ../secret src/tenant/out_rel
ln -s sub/../../secret src/tenant/out_rel2
truncate -s 64M img
mke2fs -q -F -t ext4 -d src img
debugfs -w -R "mknod dev0 c 1 3" img >/dev/null 2>&1
debugfs -R "stat /dev0" img 2>/dev/null | grep -q 'character special' ||
    fail "test setup: could not make a device node"
fsck_clean img

# getname SOCK NAME OUT: copy the export NAME (any bytes) into OUT
# using libnbd directly, so the name reaches the server unchanged.
cat > get.py <<'EOF'
import sys
import e4test as t
sock, name, out = sys.argv[1:4]
h = t.connect(sock, name)
open(out, "wb").write(t.read_all(h))
h.shutdown()
EOF
getname () { rm -f "$3"; python3 get.py "$@"; }

sock=$tmpdir/sock
start_nbdkit "$sock" -r --filter="$FILTER" file img ext4file=exportname 2> srv.err

# Good names.
n=0
good ()
{
    local name="$1" src="$2"
    n=$((n+1))
    getname "$sock" "$name" out$n || fail "export '$name' failed"
    cmp out$n "$src" || fail "export '$name' differs from $src"
}
rm -f out
nbdcopy "nbd+unix:///d1/f?socket=$sock" out || fail "nbdcopy d1/f failed"
cmp out src/d1/f || fail "nbdcopy of d1/f (no leading /) differs"
dump_cmp img /d1/f out
rm -f out
nbdcopy "nbd+unix:////d1/f?socket=$sock" out || fail "nbdcopy /d1/f failed"
cmp out src/d1/f || fail "nbdcopy of /d1/f differs"
good /d1/f src/d1/f
good d1/f src/d1/f
good //d1//f src/d1/f
good /d1/d2/d3/deep src/d1/d2/d3/deep
good /top src/top
good top src/top
good /lnk src/d1/f
good lnk2 src/d1/f
good /alnk src/d1/d2/d3/deep
good /dirlnk/f src/d1/f
good /dirlnk/d2/d3/deep src/d1/d2/d3/deep
good /secret src/secret
good /tenant/out_abs src/secret      # no ext4root: symlinks may go anywhere
good /empty1 src/empty1
good /d1/empty2 src/d1/empty2

# Several connections at once.
rm -f out
nbdcopy --connections=4 "nbd+unix:////d1/d2/d3/deep?socket=$sock" out ||
    fail "nbdcopy --connections=4 failed"
cmp out src/d1/d2/d3/deep || fail "nbdcopy --connections=4 differs"
dump_cmp img /d1/d2/d3/deep out

# nbdinfo --list: exactly the regular files, with size and inode.
nbdinfo --list --json "nbd+unix:///?socket=$sock" > list.json ||
    fail "nbdinfo --list failed"
check_list ()   # check_list JSON EXPECTED-NAMES... (names relative to the listing)
{
    python3 - "$@" <<'EOF' || fail "nbdinfo --list output is wrong"
import json, sys, subprocess, re
j = json.load(open(sys.argv[1]))
want = sorted(sys.argv[3:])
prefix = sys.argv[2]          # path inside the image of the listed root
got = sorted(e["export-name"] for e in j["exports"])
if got != want:
    print("listed:  ", got, "\nexpected:", want); sys.exit(1)
for e in j["exports"]:
    path = prefix + e["export-name"]
    st = subprocess.run(["debugfs", "-R", "stat " + path, "img"],
                        capture_output=True, text=True).stdout
    ino = re.search(r"Inode: (\d+)", st).group(1)
    size = re.search(r"Size: (\d+)", st).group(1)
    want_desc = "%s bytes, inode %s" % (size, ino)
    if e.get("description") != want_desc:
        print(path, "description", repr(e.get("description")), "expected", want_desc); sys.exit(1)
    # nbdinfo --list opens every export: the size must be there.
    if e.get("export-size") != int(size):
        print(path, "export-size", e.get("export-size"), "expected", size); sys.exit(1)
EOF
}
check_list list.json "" /d1/f /d1/d2/d3/deep /top /empty1 /d1/empty2 \
    /secret /tenant/t1 /tenant/sub/t2

# Bad names: each fails, and the server keeps serving.
# bad NAME PHRASE: the connection is refused and the server logs PHRASE.
bad ()
{
    local name="$1" phrase="$2"
    : > srv.err.before; cp srv.err srv.err.before
    if getname "$sock" "$name" out.bad 2>client.err; then
        fail "bad export name '${name:0:80}' was accepted"
    fi
    # The server's message for this name (appended to srv.err).
    diff srv.err.before srv.err | grep -q -F -- "$phrase" ||
        { cat srv.err; fail "bad export name '${name:0:80}': server did not say '$phrase'"; }
    kill -0 "$(cat "$sock.pid")" || fail "server died after bad name '${name:0:80}'"
    good "$alive_name" "$alive_src"
}
alive_name=/top alive_src=src/top
bad /nope "no such file or directory"
bad nope/x "no such file or directory"
bad /d1 "only regular files"
bad d1/ "only regular files"
bad / "only regular files"
bad /dirlnk "only regular files"
bad /emptydir "only regular files"
bad /dev0 "only regular files"
bad /a "too many levels of symbolic links"
bad /top/x "not a directory"
bad /top/ "'top' is not a directory"      # a trailing slash names a directory
bad //top// "'top' is not a directory"
bad /lnk/ "'f' is not a directory"       # through a symlink to a file
bad /dirlnk/ "only regular files"
bad /d1/../top "may not contain '.' or '..'"
bad ../top "may not contain '.' or '..'"
bad /d1/./f "may not contain '.' or '..'"
bad /d1/.. "may not contain '.' or '..'"
bad "/$(printf 'x%.0s' $(seq 300))" "longer than 255"
long=$(printf '/%0200d' $(seq 20))        # 20 components, 4020 bytes
bad "$long" "no such file or directory"
# Names are escaped in the log: a newline cannot forge a line of it,
# nor an escape sequence reach the terminal; a long name is cut short.
bad "$(printf '/x\nnbdkit: error: forged')" 'x\x0anbdkit: error: forged'
grep -q "^nbdkit: error: forged" srv.err && fail "a client's export name forged a log line"
bad "$(printf '/\033[31mred')" '/\x1b[31mred: no such file'
grep -q "$(printf '\033')" srv.err && fail "an escape character reached the log"
bad '/back\slash' '/back\\slash: no such file'
bad "/$(printf 'y%.0s' $(seq 3000))" "...: a path component is longer than 255"
# The empty name (the default export): there is no default file.
if nbdinfo --size "nbd+unix:///?socket=$sock" 2>/dev/null; then
    fail "the empty export name was accepted"
fi
grep -q "no file name" srv.err || fail "no message for the empty export name"
# A 5000-byte name: over the NBD protocol's limit of 4096, refused
# (by the client library or the server), and the server survives.
name5000=/$(printf 'y%.0s' $(seq 4999))
if getname "$sock" "$name5000" out.bad 2>/dev/null; then
    fail "a 5000-byte export name was accepted"
fi
if nbdinfo --size "nbd+unix:///$name5000?socket=$sock" 2>/dev/null; then
    fail "a 5000-byte export name was accepted (nbdinfo)"
fi
kill -0 "$(cat "$sock.pid")" || fail "server died after a 5000-byte name"
good /d1/f src/d1/f
grep -q -E 'Sanitizer|Segmentation|Aborted' srv.err && fail "server crashed"
stop_nbdkit "$sock"

# ext4root=/tenant: names are relative to /tenant.
sock=$tmpdir/sock2
start_nbdkit "$sock" -r --filter="$FILTER" file img ext4file=exportname \
    ext4root=/tenant 2> srv.err
alive_name=/t1 alive_src=src/tenant/t1
rm -f out*
good /t1 src/tenant/t1
good t1 src/tenant/t1
good /sub/t2 src/tenant/sub/t2
good in_rel src/tenant/sub/t2
good in_abs src/tenant/t1         # absolute, but lands inside the root
rm -f out
nbdcopy --connections=4 "nbd+unix:///sub/t2?socket=$sock" out ||
    fail "nbdcopy (ext4root) failed"
cmp out src/tenant/sub/t2 || fail "nbdcopy (ext4root) differs"
bad out_abs "outside ext4root"
bad /out_rel "outside ext4root"
bad out_rel2 "outside ext4root"
bad ../secret "may not contain '.' or '..'"
bad /secret "no such file or directory"
bad /tenant/t1 "no such file or directory"
bad /d1/f "no such file or directory"
bad / "only regular files"
# The secret's bytes never came out.
for f in out*; do
    cmp -s "$f" src/secret && fail "the secret was served through ext4root"
done
nbdinfo --list --json "nbd+unix:///?socket=$sock" > list.json ||
    fail "nbdinfo --list (ext4root) failed"
check_list list.json /tenant /t1 /sub/t2
stop_nbdkit "$sock"

# ext4root given with a trailing slash and through a symlink-free
# nested path.
sock=$tmpdir/sock3
start_nbdkit "$sock" -r --filter="$FILTER" file img ext4file=exportname \
    ext4root=/d1/d2/ 2> srv.err
good /d3/deep src/d1/d2/d3/deep
nbdinfo --list --json "nbd+unix:///?socket=$sock" > list.json ||
    fail "nbdinfo --list (ext4root=/d1/d2/) failed"
check_list list.json /d1/d2 /d3/deep
stop_nbdkit "$sock"

echo "export names work"
