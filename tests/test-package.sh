#!/usr/bin/env bash
# The Debian package (debian/): build it with dpkg-buildpackage from
# the distributed sources (make distdir, so a file missing from the
# tarball fails here too), without the test suite; check its
# dependencies and contents; run lintian if present; check that
# make install puts the same files in the same places; install the
# package and serve a file with --filter=ext4fs by name.
#
# Installing: as root, into the machine with dpkg -i, purged again at
# exit unless the package was installed before (then the new build
# stays); a filter left by make install is put back.  Otherwise into a
# scratch root (dpkg-deb -x) that a private mount namespace
# (unshare -rm) puts over nbdkit's filter directory.
source "$srcdir/functions.sh"

if [ -n "${EXT4FS_PACKAGE_BUILD:-}" ]; then
    echo "$0: test skipped inside the package build itself"
    exit 77
fi
requires dpkg-buildpackage --version
requires dpkg-deb --version
requires test -x /usr/bin/dh
requires pkg-config --exists nbdkit
requires nbdkit --version
requires nbdcopy --version
requires mke2fs -V

top_srcdir=$(cd "$srcdir/.." && pwd)
top_builddir=$(cd "$abs_builddir/.." && pwd)
filterdir=$(pkg-config --variable=filterdir nbdkit)
nbdkit_version=$(pkg-config --modversion nbdkit)
pkg=nbdkit-ext4fs-filter
cd "$tmpdir"

# The test harness's variables are not for the package build.
clean_env=(env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL -u srcdir -u abs_builddir
           -u FILTER -u EXT4FS_FILTER -u EXT4FS_SERVER_ENV)

# --- The changelog's version is the tree's version.
version=$(sed -n 's/^PACKAGE_VERSION = //p' "$top_builddir/Makefile")
chver=$(cd "$top_srcdir" && dpkg-parsechangelog -S Version)
[ "$chver" = "$version" ] ||
    fail "debian/changelog is at $chver but configure.ac at $version"

# --- Build from a clean copy of the distributed files.
src=$tmpdir/build/$pkg-$version
mkdir -p "$tmpdir/build"
# (automake's distdir must be relative to the top build directory)
"${clean_env[@]}" make -s -C "$top_builddir" distdir \
    distdir="$(realpath --relative-to="$top_builddir" "$src")" > distdir.log 2>&1 ||
    { cat distdir.log; fail "make distdir"; }
start=$SECONDS
if ! (cd "$src" &&
      "${clean_env[@]}" DEB_BUILD_OPTIONS="nocheck parallel=$(nproc 2>/dev/null || echo 2)" \
          DEB_BUILD_PROFILES=nocheck dpkg-buildpackage -b -us -uc) > build.log 2>&1; then
    tail -40 build.log
    fail "dpkg-buildpackage failed (log above)"
fi
echo "dpkg-buildpackage: $((SECONDS - start)) s"
deb=$(echo "$tmpdir"/build/${pkg}_"$version"_*.deb)
changes=$(echo "$tmpdir"/build/${pkg}_"$version"_*.changes)
[ -f "$deb" ] && [ -f "$changes" ] || fail "no .deb or .changes in $tmpdir/build"

# --- Dependencies: exactly the nbdkit the headers came from, and the
# libraries dpkg-shlibdeps found.
depends=$(dpkg-deb -f "$deb" Depends)
echo "Depends: $depends"
case ", $depends," in
    *", nbdkit (>= $nbdkit_version), nbdkit (<< $nbdkit_version.~),"*) ;;
    *) fail "Depends does not pin nbdkit $nbdkit_version: $depends" ;;
esac
for lib in libext2fs2 libcom-err2 libc6; do
    case ", $depends" in
        *", $lib "*|*", $lib,"*) ;;
        *) fail "Depends lacks $lib: $depends" ;;
    esac
done

# --- Contents: the filter in nbdkit's filter directory, the man page
# in section 1, no libtool archive.
dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|' | grep -v '/$' | sort > pkg.files
cat pkg.files
grep -qx "$filterdir/$pkg.so" pkg.files || fail "no $filterdir/$pkg.so in the package"
grep -qx "/usr/share/man/man1/$pkg.1.gz" pkg.files || fail "no man page in section 1"
! grep -q '\.la$' pkg.files || fail "the package ships a libtool archive"

# --- lintian: no errors.
if command -v lintian >/dev/null; then
    start=$SECONDS
    lintian --fail-on error "$changes" > lintian.log 2>&1 || {
        cat lintian.log; fail "lintian reported errors"; }
    cat lintian.log
    echo "lintian: $((SECONDS - start)) s"
else
    echo "lintian not installed: not run"
fi

# --- make install installs the same files: the filter in the same
# place (when configured for nbdkit's filter directory, the default),
# the man page (uncompressed) in section 1 under its prefix.
"${clean_env[@]}" make -s -C "$top_builddir" install DESTDIR="$tmpdir/mi" > install.log 2>&1 ||
    { cat install.log; fail "make install DESTDIR=..."; }
(cd "$tmpdir/mi" && find . -type f -o -type l) | sed 's|^\.||' | sort > mi.files
cat mi.files
if ! grep -qx "$filterdir/$pkg.so" mi.files; then
    echo "note: this tree is configured with another filterdir"
    grep -q "/$pkg\.so\$" mi.files || fail "make install did not install the filter"
fi
grep -q "/share/man/man1/$pkg\.1\$" mi.files || fail "make install: no man page in section 1"
grep -v '^/usr/share/doc/' pkg.files | sed 's|.*/||; s/\.gz$//' | sort > pkg.names
sed 's|.*/||' mi.files | sort > mi.names
diff -u pkg.names mi.names || fail "make install and the package install different files"

# --- Install, and serve a file by the filter's name.
mkdir -p src
head -c $((300*1024+17)) /dev/urandom > src/disk.raw
truncate -s 64M img
mke2fs -q -F -t ext4 -d src img
serve_check='
    nbdkit -U - -r --filter=ext4fs file img ext4file=/disk.raw \
        --run "nbdcopy \"\$uri\" out" &&
    cmp out src/disk.raw'

status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || :)
if [ "$(id -u)" = 0 ] && [ -w /var/lib/dpkg ] && dpkg-query -W nbdkit >/dev/null 2>&1; then
    echo "installing $deb into this machine"
    if [ "$status" != "install ok installed" ]; then
        for f in "$filterdir/$pkg.so" "/usr/share/man/man1/$pkg.1"; do
            if [ -e "$f" ] && ! dpkg -S "$f" >/dev/null 2>&1; then
                mkdir -p "$tmpdir/saved$(dirname "$f")"
                cp -a "$f" "$tmpdir/saved$f"
                cleanup_fn "cp -a '$tmpdir/saved$f' '$f'"
            fi
        done
        cleanup_fn "DEBIAN_FRONTEND=noninteractive dpkg --purge $pkg >/dev/null"
    fi
    DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" > dpkg.log 2>&1 ||
        { cat dpkg.log; fail "dpkg -i"; }
    [ "$(dpkg-query -W -f='${Status}' "$pkg")" = "install ok installed" ] ||
        fail "$pkg is not installed after dpkg -i"
    sh -c "$serve_check" || fail "nbdkit --filter=ext4fs (installed package)"
    if command -v man >/dev/null; then
        m=$(man -w "$pkg") || fail "man -w $pkg"
        [ "$m" = "/usr/share/man/man1/$pkg.1.gz" ] || fail "man -w $pkg: $m"
        man "$pkg" 2>/dev/null | grep -q ext4file || fail "man $pkg: no ext4file"
    fi
elif unshare -rm true 2>/dev/null; then
    echo "installing $deb into a scratch root ($tmpdir/root)"
    # The filters already there stay visible beside ours.
    mkdir -p root"$filterdir"
    cp -a "$filterdir/." root"$filterdir"/
    dpkg-deb -x "$deb" root
    unshare -rm sh -c "mount --bind root$filterdir $filterdir && $serve_check" ||
        fail "nbdkit --filter=ext4fs (scratch root)"
    if command -v man >/dev/null; then
        m=$(MANPATH=$tmpdir/root/usr/share/man man -w "$pkg") || fail "man -w $pkg"
        [ "$m" = "$tmpdir/root/usr/share/man/man1/$pkg.1.gz" ] || fail "man -w $pkg: $m"
    fi
else
    echo "$0: test skipped: neither root nor unshare -rm to install the package"
    exit 77
fi
echo "served /disk.raw with nbdkit --filter=ext4fs from the package"
