# ext4fs: install the Debian packages the project needs, only those
# that are missing.  Sourced by check.sh and demo.sh.  dpkg-dev,
# debhelper, lintian and man-db are for tests/test-package.sh.

EXT4FS_DEPS=(
    build-essential autoconf automake libtool pkg-config
    nbdkit nbdkit-plugin-dev libext2fs-dev comerr-dev
    libnbd-dev libnbd-bin python3-libnbd
    e2fsprogs qemu-utils fio perl
    clang libclang-rt-dev gdb
    dpkg-dev debhelper lintian man-db
)

install_missing_deps ()
{
    local missing=() p
    for p in "${EXT4FS_DEPS[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "Installing missing packages: ${missing[*]}"
        local sudo=
        [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
    fi
    # A filter loads only in the nbdkit it was built against.
    local nv pv
    nv=$(nbdkit --version | awk '{print $2}')
    pv=$(pkg-config --modversion nbdkit)
    if [ "$nv" != "$pv" ]; then
        echo "error: nbdkit is $nv but nbdkit-plugin-dev is $pv: they must match" >&2
        return 1
    fi
}
