#!/usr/bin/env bash
# Install the Debian packages the test suite needs (apt only; Python packages
# are installed separately with pip).  Idempotent: when everything is already
# installed it only runs one dpkg-query and exits.
#
#   scripts/test-deps.sh          # install what is missing (needs root or sudo)
#   scripts/test-deps.sh --check  # exit 1 and list what is missing, install nothing
set -euo pipefail

PACKAGES=(
    # Guest boots: QEMU (TCG) as vhost-user front-end, and qemu-storage-daemon
    # (in qemu-system-common, pulled in by qemu-system-x86) as reference back-end.
    qemu-system-x86
    qemu-utils            # qemu-img
    # Guest initramfs: busybox-static is copied in; the kernel .deb is fetched
    # with `apt-get download` and unpacked with `dpkg -x` (apt/dpkg are essential).
    busybox-static
    cpio
    # mkfs.ext4/e2fsck are copied into the guest; e2fsck/debugfs check images on the host.
    e2fsprogs
    # C data plane of the daemon (cffi extension, io_uring).
    gcc
    libc6-dev             # only a Recommends of gcc, so --no-install-recommends skips it
    liburing-dev
    libffi-dev
    python3-dev           # Python.h for building the cffi extension
    make
    # vhost-user-net tests: DPDK testpmd is the reference peer (virtio-user
    # front-end and net_vhost back-end PMDs).  Debian ships dpdk-testpmd in
    # dpdk-dev (the `dpdk` package only has python helper scripts); it pulls
    # in every PMD library as a dependency, ~40 s to install.
    dpdk-dev
    iproute2              # ip netns / ip link / ip tuntap for namespaces, TAP, veth
    # A disk that really hangs (tests/hanging_disk.py): nbdkit's pause filter
    # behind nbdfuse, which shows an NBD export as a file through FUSE.
    nbdkit
    libnbd-bin            # nbdfuse
    libnbd-dev            # the NBD store (backend: nbd) is built with it
    fuse3                 # fusermount3
    # Disks in Ceph (backend: rbd): the store is built with librbd, and the
    # tests run a throw-away cluster (tests/ceph.py): a monitor, an OSD, and
    # the ceph/rbd tools (ceph-common; monmaptool is in ceph-base).
    librbd-dev
    librados-dev
    ceph-mon
    ceph-osd
    ceph-common
    ethtool               # offload/queue inspection of TAPs in tests
    # libvirt runs a guest on vhostd (tests/test_libvirt.py): libvirtd and
    # virtlogd started by the test (no systemd needed as root), virsh.
    libvirt-daemon
    libvirt-daemon-driver-qemu
    libvirt-clients
    # The web console is tested in a real browser (tests/test_web.py): Debian's
    # headless Chromium driven through Selenium and chromedriver; nothing
    # downloads a browser of its own.
    chromium
    chromium-driver
    fonts-dejavu-core     # text in the console's screenshot
)

missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
    [[ "$status" == ii* ]] || missing+=("$p")
done

# The guest image build (tests/guest/build_guest.py) also needs the package
# lists, to `apt-get download` the kernel: images often delete them.
have_lists() { compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; }

if [[ ${#missing[@]} -eq 0 ]] && have_lists; then
    exit 0
fi

if [[ "${1:-}" == "--check" ]]; then
    [[ ${#missing[@]} -eq 0 ]] || echo "missing apt packages: ${missing[*]}" >&2
    have_lists || echo "no apt package lists (run apt-get update)" >&2
    exit 1
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null; then
        SUDO=(sudo)
    else
        echo "test-deps.sh: need root (or sudo) to install: ${missing[*]:-package lists}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they are absent or the first attempt fails
# (a fresh container has empty /var/lib/apt/lists).
if ! have_lists; then
    "${SUDO[@]}" apt-get update
fi
[[ ${#missing[@]} -gt 0 ]] || exit 0
echo "test-deps.sh: installing ${missing[*]}" >&2
if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"; then
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
fi
