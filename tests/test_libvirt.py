"""libvirt runs a guest on vhostd: a real libvirtd (started here when none
runs; as root it needs no systemd, only the libvirt-qemu user) defines the
domain of config/libvirt/vhostd-guest.xml, with this test's paths, as a TCG
domain, and `virsh start`s it.  Inside, the guest writes and reads the vhostd
disk and pings through the vhostd NIC (a TAP in a namespace); then `virsh
destroy` and `virsh start` again: vhostd serves the new sessions."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import wait_until
from guest.build_guest import GUEST_EXIT_MARKER
from guest.scripts import net_up_and_ping
from guest.cpio import CpioWriter, gzip_bytes
from guest.qemu import KERNEL_CMDLINE

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[1]
URI = "qemu:///system"
DOMAIN = "vhostd-test-guest"
TAP, HOST_IP, GUEST_IP = "vhlv0", "10.78.0.1", "10.78.0.2"
PATTERN = "vhostd-under-libvirt"
SCRIPT = f"""
back=$(dd if=/dev/vda bs=512 skip=64 count=1 2>/dev/null | head -c {len(PATTERN)})
echo "VHOSTD-RESULT before=$back"
printf '{PATTERN}' | dd of=/dev/vda bs=512 seek=64 conv=sync,fsync 2>/dev/null || exit 3
back=$(dd if=/dev/vda bs=512 skip=64 count=1 iflag=direct 2>/dev/null | head -c {len(PATTERN)})
[ "$back" = {PATTERN} ] || exit 4
echo "VHOSTD-RESULT disk=ok"
{net_up_and_ping(GUEST_IP, HOST_IP, 5)}echo "VHOSTD-RESULT net=ok"
"""


def virsh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {r.stdout}{r.stderr}")
    return r


@pytest.fixture(scope="module")
def libvirtd():
    """A running libvirtd (this test's, or the machine's)."""
    if not shutil.which("libvirtd") or not shutil.which("virsh"):
        pytest.skip("libvirt is not installed (scripts/test-deps.sh installs libvirt-daemon-driver-qemu)")
    if os.geteuid() != 0:
        pytest.skip("libvirtd's system instance needs root")
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:  # Debian's package makes it with systemd-sysusers, which needs systemd
        subprocess.run(["useradd", "-r", "libvirt-qemu"], check=True)
    started = []
    log = open(tempfile.mktemp(prefix="libvirtd-", suffix=".log", dir="/tmp"), "w")
    if not os.path.exists("/run/libvirt/virtlogd-sock"):  # where QEMU's own output goes
        started.append(subprocess.Popen(["virtlogd"], stdout=log, stderr=subprocess.STDOUT))
        wait_until(lambda: os.path.exists("/run/libvirt/virtlogd-sock") or started[-1].poll() is not None, 30,
                   what="virtlogd to listen")
    if virsh("version", check=False).returncode != 0:
        started.append(subprocess.Popen(["libvirtd"], stdout=log, stderr=subprocess.STDOUT))
        wait_until(lambda: virsh("version", check=False).returncode == 0 or started[-1].poll() is not None, 30,
                   what="libvirtd to answer")
    assert all(p.poll() is None for p in started), open(log.name).read()[-3000:]
    yield
    for p in reversed(started):
        p.terminate()
        p.wait(20)


def domain_xml(work: Path, kernel: Path, initrd: Path, disk_sock: str, net_sock: str) -> str:
    """The example domain, with this test's paths and TCG instead of KVM.
    QEMU 7.2 under TCG segfaults when a vhost-user NIC uses MSI-X
    (tests/guest/qemu.py): the NIC gets vectors=0 through qemu:override."""
    xml = (REPO / "config" / "libvirt" / "vhostd-guest.xml").read_text()
    for old, new in (("<domain type='kvm'>",
                      "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"),
                     ("</domain>", "  <qemu:override><qemu:device alias='net0'><qemu:frontend>"
                                   "<qemu:property name='vectors' type='unsigned' value='0'/>"
                                   "</qemu:frontend></qemu:device></qemu:override>\n</domain>"),
                     ("vhostd-guest</name>", f"{DOMAIN}</name>"),
                     ("<memory unit='MiB'>1024</memory>", "<memory unit='MiB'>256</memory>"),
                     ("<vcpu>2</vcpu>", "<vcpu>1</vcpu>"),
                     ("/var/lib/vhostd/vmlinuz", str(kernel)), ("/var/lib/vhostd/initrd.img", str(initrd)),
                     ("<cmdline>console=ttyS0</cmdline>", f"<cmdline>{KERNEL_CMDLINE}</cmdline>"),
                     ("/run/vhostd/disk0.sock", disk_sock), ("/run/vhostd/net0.sock", net_sock),
                     ("/var/log/libvirt/qemu/vhostd-guest.console", str(work / "console.log"))):
        assert old in xml, old
        xml = xml.replace(old, new)
    return xml


def boot_once(work: Path, timeout: float = 300) -> str:
    """virsh start; the console once the guest has ended (on_poweroff destroy)."""
    console = work / "console.log"
    if console.exists():
        console.unlink()
    virsh("start", DOMAIN)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "shut off" in virsh("domstate", DOMAIN).stdout:
            break
        time.sleep(1)
    else:
        virsh("destroy", DOMAIN, check=False)
        raise AssertionError(f"the guest did not end in {timeout} s:\n{console.read_text()[-3000:]}")
    return console.read_text(errors="replace")


def test_libvirt_domain_on_a_vhostd_disk_and_nic(libvirtd, netns, vhostd_factory, guest_image):
    ns = netns()
    # libvirt runs QEMU as libvirt-qemu: everything it opens is in a directory it can reach.
    work = Path(tempfile.mkdtemp(prefix="vhostd-libvirt-", dir="/tmp"))
    os.chmod(work, 0o777)
    try:
        disk_sock, net_sock = str(work / "disk0.sock"), str(work / "net0.sock")
        vd = vhostd_factory([
            {"name": "disk0", "type": "blk", "socket": disk_sock, "socket_mode": "0666", "size": "16M"},
            {"name": "net0", "type": "net", "socket": net_sock, "socket_mode": "0666", "backend": "tap", "tap": TAP},
        ], prefix=ns.wrap([]))
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
        ns.ip("link", "set", TAP, "up")
        w = CpioWriter()
        w.file("test.sh", ("#!/bin/sh\n" + SCRIPT).encode(), 0o755)
        initrd = work / "initrd.img"
        initrd.write_bytes(guest_image.initramfs.read_bytes() + gzip_bytes(w.getvalue(), level=1))
        kernel = work / "vmlinuz"
        shutil.copyfile(guest_image.kernel, kernel)
        for f in (initrd, kernel):
            os.chmod(f, 0o644)
        virsh("undefine", DOMAIN, check=False)
        (work / "domain.xml").write_text(domain_xml(work, kernel, initrd, disk_sock, net_sock))
        virsh("define", str(work / "domain.xml"))
        try:
            first = boot_once(work)
            assert f"{GUEST_EXIT_MARKER}0" in first and "VHOSTD-RESULT net=ok" in first, first[-3000:]
            assert vd.read_image("disk0", 64 * 512, len(PATTERN)) == PATTERN.encode()
            # again, after destroy: new sessions on the same devices, the write is still there
            virsh("destroy", DOMAIN, check=False)
            second = boot_once(work)
            assert f"VHOSTD-RESULT before={PATTERN}" in second, second[-3000:]
            assert f"{GUEST_EXIT_MARKER}0" in second and "VHOSTD-RESULT net=ok" in second, second[-3000:]
        finally:
            virsh("destroy", DOMAIN, check=False)
            virsh("undefine", DOMAIN, check=False)
        log = vd.log()
        assert log.count("disk0: front-end connected") == 2 and log.count("net0: front-end connected") == 2, log
    finally:
        shutil.rmtree(work, ignore_errors=True)
