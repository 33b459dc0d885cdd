"""vhostd's VMM boots Linux to userspace, on real hardware virtualisation.

This machine's /dev/kvm (PVM) cannot run a Linux kernel at speed, so these
tests run one level down (tests/nested): a QEMU TCG guest with an emulated
SVM CPU, whose /dev/kvm is real.  One nested session serves the module (it
costs ~5 s to start and Python runs slowly in it): there `vhostd serve`
runs the devices and `vhostd vm run` boots the Debian cloud kernel with the
test guest's busybox initramfs (tests/guest) several times:

* `boot`: 2 vCPUs, a vhostd blk disk (virtio-mmio, described by ACPI, on
  a packed ring: Linux takes it when offered); the guest writes and reads
  back a sector, then /init powers off;
* `panic`: the guest panics (sysrq c);
* `auto`: the `boot` guest on 1 vCPU, started by `vhostd serve` itself
  (autostart), its console on serve's log;
* `net`: a vhostd net port on a TAP device of the nested guest, which has
  10.9.0.1: the VM pings it and sends it 1 MiB over TCP.

Two VMs booting at once on a vhostd switch are not tested here: in this
nested guest one of the two now and then stops early in its boot (seen with
QEMU's guests too, in benchmarks/vmm_linux.py), so one VM and a TAP it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nested  # noqa: E402
from guest.build_guest import GUEST_EXIT_MARKER, ensure_guest_image  # noqa: E402
from guest.scripts import net_up_and_ping  # noqa: E402
from guest.cpio import CpioWriter, gzip_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTOR_OFFSET = 2048 * 512
PATTERN = "vhostd-linux-boot"
STREAM_BYTES = 1 << 20
STREAM_PORT = 5000
TAP, HOST_IP, GUEST_IP = "vhtap0", "10.9.0.1", "10.9.0.2"

SCRIPTS = {
    "boot": f"""
echo "VHOSTD-RESULT nproc=$(nproc)"
echo "VHOSTD-RESULT features=$(cat /sys/bus/virtio/devices/virtio0/features)"
printf '{PATTERN}' | dd of=/dev/vda bs=512 seek=2048 conv=sync,fsync 2>/dev/null
back=$(dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -c {len(PATTERN)})
[ "$back" = {PATTERN} ] || exit 3
echo "VHOSTD-RESULT readback=ok"
""",
    "panic": "echo 1 > /proc/sys/kernel/sysrq\necho c > /proc/sysrq-trigger\nsleep 30\n",
    "net": f"""
echo "VHOSTD-RESULT features=$(cat /sys/bus/virtio/devices/virtio0/features)"
{net_up_and_ping(GUEST_IP, HOST_IP, 5)}echo "VHOSTD-RESULT ping=ok"
dd if=/dev/zero bs=1024 count={STREAM_BYTES // 1024} 2>/dev/null | nc {HOST_IP} {STREAM_PORT} || exit 7
echo "VHOSTD-RESULT sent=ok"
""",
}


def initrd(base: Path, script: str, out: Path) -> Path:
    w = CpioWriter()
    w.file("test.sh", ("#!/bin/sh\n" + script).encode(), 0o755)
    out.write_bytes(base.read_bytes() + gzip_bytes(w.getvalue(), level=1))
    return out


@pytest.fixture(scope="module")
def nested_run(tmp_path_factory):
    why = nested.why_not()
    if why:
        pytest.skip(why)
    image = ensure_guest_image()
    work = tmp_path_factory.mktemp("linux-vms")
    disk = work / "disk.img"
    disk.write_bytes(b"")
    with open(disk, "r+b") as f:
        f.truncate(64 << 20)
    socks = {"d0": str(work / "d0.sock"), "n0": str(work / "n0.sock")}
    devices = [{"name": "d0", "type": "blk", "socket": socks["d0"], "path": str(disk)},
               {"name": "n0", "type": "net", "socket": socks["n0"], "backend": "tap", "tap": TAP}]

    def vm(name: str, vcpus: int, devs: list[dict]) -> dict:
        return {"name": name, "memory": "256M", "vcpus": vcpus, "kernel": str(image.kernel),
                "initrd": str(initrd(image.initramfs, SCRIPTS[name], work / f"{name}.img")),
                "cmdline": "console=ttyS0", "devices": devs}

    vms = [vm("boot", 2, [{"type": "blk", "socket": socks["d0"]}]), vm("panic", 1, []),
           vm("net", 1, [{"type": "net", "socket": socks["n0"]}])]
    config = work / "vhostd.yaml"
    config.write_text(yaml.safe_dump({"daemon": {"workers": 1}, "devices": devices, "vms": vms}, sort_keys=False))
    # `vhostd serve` then runs a VM next to its devices (autostart), on a disk of its own.
    auto_disk = work / "auto.img"
    with open(auto_disk, "wb") as f:
        f.truncate(64 << 20)
    auto_sock = str(work / "d1.sock")
    auto_config = work / "autostart.yaml"
    auto_config.write_text(yaml.safe_dump({
        "daemon": {"workers": 1},
        "devices": [{"name": "d1", "type": "blk", "socket": auto_sock, "path": str(auto_disk)}],
        "vms": [{**vm("boot", 1, [{"type": "blk", "socket": auto_sock}]), "name": "auto", "autostart": True}],
    }, sort_keys=False))
    spec = work / "spec.json"
    spec.write_text(json.dumps({"config": str(config), "sockets": list(socks.values()),
                                "groups": [["boot"], ["panic"], ["net"]], "timeout": 90,
                                "reads": {"sector": [str(disk), SECTOR_OFFSET, len(PATTERN)]},
                                "host_setup": [["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP],
                                               ["ip", "link", "set", TAP, "up"]],
                                "listen": STREAM_PORT, "autostart": str(auto_config)}))
    cmd = [sys.executable, str(ROOT / "tests" / "nested" / "linux_vms.py"), str(spec)]
    # linux_vms.py bounds itself (each VM 90 s, autostart 90 s): the session
    # usually takes about 70 s, so running out of 480 s means the emulated
    # machine itself stopped.
    p = nested.run(cmd, timeout=480)
    if p.returncode in (nested.L1_FAILED, nested.L1_TIMED_OUT):
        # The emulated machine itself died or froze (its kernel has been
        # seen to crash under TCG's SVM): not what is tested here; once more.
        print(f"nested guest failed, retrying once:\n{p.stderr[-2000:]}", file=sys.stderr)
        p = nested.run(cmd, timeout=480)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("NESTED-RESULT ")), None)
    assert line, f"nested run failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    result = json.loads(line.split(" ", 1)[1])
    assert "error" not in result, f"{result['error']}\n{result['serve_log']}"
    return result


def vm_result(run: dict, name: str) -> dict:
    r = run["vms"][name]
    r["why"] = f"{name}: status {r['status']} after {r['seconds']} s\n{r['console'][-3000:]}\n{r['stderr']}"
    return r


def results(console: str) -> dict[str, str]:
    out = {}
    for line in console.splitlines():
        if line.startswith("VHOSTD-RESULT "):
            k, _, v = line[len("VHOSTD-RESULT "):].partition("=")
            out[k] = v.strip()
    return out


def test_linux_boots_to_init_on_two_vcpus_and_powers_off(nested_run):
    r = vm_result(nested_run, "boot")
    assert f"{GUEST_EXIT_MARKER}0" in r["console"], r["why"]
    assert results(r["console"])["nproc"] == "2", r["why"]
    assert r["status"] == 0, r["why"]  # /init's `poweroff -f`: ACPI S5


def test_linux_writes_a_vhostd_disk_and_the_host_image_has_it(nested_run):
    r = vm_result(nested_run, "boot")
    assert results(r["console"]).get("readback") == "ok", r["why"]
    assert results(r["console"])["features"][34] == "1", r["why"]  # on a packed ring
    assert bytes.fromhex(nested_run["reads"]["sector"]) == PATTERN.encode()


def test_a_guest_panic_ends_the_vm_with_255_and_the_panic_on_the_console(nested_run):
    r = vm_result(nested_run, "panic")
    assert r["status"] == 255, r["why"]
    assert "Kernel panic - not syncing" in r["console"], r["why"]
    assert "panicked" in r["stderr"], r["why"]


def test_linux_passes_traffic_through_a_vhostd_net_port_to_a_tap(nested_run):
    r = vm_result(nested_run, "net")
    assert results(r["console"]).get("sent") == "ok", r["why"]
    assert results(r["console"]).get("ping") == "ok", r["why"]
    assert nested_run.get("received") == STREAM_BYTES, r["why"]
    assert results(r["console"])["features"][34] == "1", r["why"]  # on packed rings
    assert r["status"] == 0, r["why"]


def test_serve_autostarts_a_linux_vm_next_to_its_devices(nested_run):
    log = nested_run["autostart_log"]
    assert "auto: console: VHOSTD-RESULT readback=ok" in log, log
    assert "auto: VM ended: the guest powered off (status 0" in log, log
