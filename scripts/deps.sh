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
    local missing=() p sudo=
    [ "$(id -u)" = 0 ] || sudo=sudo
    for p in "${EXT4FS_DEPS[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "Installing missing packages: ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
    fi
    # qemu-system-x86 for tests/test-vm-boot.sh (a machine booting from
    # an export), without its recommends (graphics, audio, ~130 more
    # packages).  Optional: the test skips without it.
    if ! dpkg -s qemu-system-x86 >/dev/null 2>&1; then
        echo "Installing qemu-system-x86 (--no-install-recommends)"
        [ ${#missing[@]} -gt 0 ] || $sudo apt-get update -qq || true
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
            --no-install-recommends qemu-system-x86 ||
            echo "warning: qemu-system-x86 not installed: test-vm-boot.sh will skip"
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
