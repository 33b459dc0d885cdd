"""Build (once, cached) the Linux guest that the end-to-end tests boot under QEMU.

`ensure_guest_image()` returns the kernel (bzImage) and a base initramfs
(`.cpio.gz`).  Both come from Debian packages plus a few host binaries:

* kernel: the package `linux-image-cloud-amd64` currently depends on, fetched
  with `apt-get download` and unpacked with `dpkg -x` (no root needed);
* initramfs: busybox-static with its applet symlinks, the virtio (and, when
  they are modules in that kernel, ext4) modules in load order, the host's
  dynamically linked mke2fs/e2fsck with their shared libraries and loader, and
  an `/init` that loads the modules, runs `/test.sh`, prints
  `VHOSTD-GUEST-EXIT=<rc>` and powers off.

`/test.sh` is not in the base image: each test appends its own small cpio
archive (see qemu.py), which the kernel unpacks on top of this one.

The result lives in `tests/.cache/guest/<kernel-package>_<version>-<recipe>/`
(override the root with $VHOSTD_GUEST_CACHE).  The directory name contains a
hash of this file, so editing the recipe rebuilds.  Builds take a lock file
and publish with an atomic rename, so concurrent pytest processes are safe.

Run `python3 tests/guest/build_guest.py` to build and print the paths.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpio import CpioWriter, gzip_bytes  # type: ignore
else:
    from .cpio import CpioWriter, gzip_bytes

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"

# Loaded in this order (dependencies found in each .ko are loaded first).
# Modules built into the kernel are skipped; "optional" ones may be absent.
VIRTIO_MODULES = [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
    "virtio_pci", "virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net",
    "pvpanic", "pvpanic_mmio",  # vhostd's VMM: virtio-mmio devices, panics reported to the VMM
]
EXT4_MODULES = ["crc16", "mbcache", "jbd2", "crc32c_generic", "ext4"]
REQUIRED_MODULES = {"virtio", "virtio_ring", "virtio_pci", "virtio_blk", "virtio_net", "ext4"}

# Host binaries copied into the guest: (path in guest, program name on host, aliases)
HOST_PROGRAMS = [
    ("/sbin/mke2fs", "mke2fs", ["/sbin/mkfs.ext4", "/sbin/mkfs.ext2"]),
    ("/sbin/e2fsck", "e2fsck", ["/sbin/fsck.ext4", "/sbin/fsck.ext2"]),
]
HOST_FILES = ["/etc/mke2fs.conf"]

GUEST_EXIT_MARKER = "VHOSTD-GUEST-EXIT="
GUEST_BOOT_MARKER = "VHOSTD-GUEST-BOOT"

INIT_SCRIPT = r"""#!/bin/sh
# vhostd test guest init: set up, load modules, run /test.sh, report, power off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mdev=
if ! mount -t devtmpfs devtmpfs /dev 2>/dev/null; then
    mount -t tmpfs -o mode=0755 tmpfs /dev
    mdev=1
fi
mkdir -p /tmp /run /mnt /root
echo "@BOOT@"
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m.ko" || echo "VHOSTD-GUEST-WARN: insmod $m failed"
done < /etc/vhostd-modules
[ -z "$mdev" ] || mdev -s
# No settle loop needed: insmod probes the PCI devices synchronously and
# devtmpfs has created /dev/vd* by the time it returns.
if [ -f /test.sh ]; then
    cd /
    sh /test.sh </dev/null
    rc=$?
else
    echo "VHOSTD-GUEST-WARN: no /test.sh in the initramfs"
    rc=127
fi
sync
echo "@EXIT@$rc"
poweroff -f
# If poweroff failed, a panic (panic=-1 + -no-reboot) still ends QEMU.
exit $rc
""".replace("@BOOT@", GUEST_BOOT_MARKER).replace("@EXIT@", GUEST_EXIT_MARKER)


@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: Path          # bzImage
    initramfs: Path       # base initramfs, gzip-compressed newc cpio
    kernel_release: str   # e.g. 6.1.0-56-cloud-amd64
    modules: tuple[str, ...]   # modules /init loads, in order
    builtin: tuple[str, ...]   # requested modules found built into the kernel
    directory: Path


class GuestBuildError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[build_guest] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], **kw) -> str:
    try:
        p = subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError as e:
        raise GuestBuildError(f"{cmd[0]} not found ({e}); run scripts/test-deps.sh") from e
    except subprocess.CalledProcessError as e:
        raise GuestBuildError(
            f"command failed ({e.returncode}): {' '.join(cmd)}\n{e.stdout}{e.stderr}") from e
    return p.stdout


def cache_root() -> Path:
    env = os.environ.get("VHOSTD_GUEST_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / ".cache" / "guest"


def _recipe_hash() -> str:
    h = hashlib.sha256()
    for f in ("build_guest.py", "cpio.py"):
        h.update((Path(__file__).resolve().parent / f).read_bytes())
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------- kernel

def _apt_lists_stamp() -> str:
    """Changes whenever `apt-get update` changes the package lists."""
    lists = Path("/var/lib/apt/lists")
    files = sorted(lists.glob("*_Packages*")) if lists.is_dir() else []
    return ";".join(f"{f.name}:{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in files)


def resolve_kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel image linux-image-cloud-amd64 depends on.

    apt-cache takes about a second per call here (no pkgcache.bin), so the answer
    is memoised in the cache directory until the apt lists change.
    """
    memo = cache_root() / "resolved.json"
    stamp = _apt_lists_stamp()
    try:
        m = json.loads(memo.read_text())
        if m["stamp"] == stamp and stamp:
            return m["package"], m["version"]
    except (OSError, ValueError, KeyError):
        pass
    out = _run(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE])
    m = re.search(r"^Depends:.*?\b(linux-image-[^\s,]+)(?:\s*\(=\s*([^)\s]+)\))?", out, re.M)
    if not m:
        raise GuestBuildError(f"apt-cache show {KERNEL_META_PACKAGE} names no kernel:\n{out}")
    pkg, version = m.group(1), m.group(2)
    if not version:
        pol = _run(["apt-cache", "policy", pkg])
        mv = re.search(r"Candidate:\s*(\S+)", pol)
        if not mv or mv.group(1) == "(none)":
            raise GuestBuildError(f"no installable version of {pkg}:\n{pol}")
        version = mv.group(1)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"stamp": stamp, "package": pkg, "version": version}))
    os.replace(tmp, memo)
    return pkg, version


def _download_deb(pkg: str, version: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    quoted = version.replace(":", "%3a")
    for f in debs.glob(f"{pkg}_*.deb"):
        if f.name.startswith(f"{pkg}_{quoted}_") or f.name.startswith(f"{pkg}_{version}_"):
            return f
    tmp = Path(tempfile.mkdtemp(prefix="dl-", dir=debs))
    try:
        _log(f"apt-get download {pkg}={version}")
        _run(["apt-get", "download", f"{pkg}={version}"], cwd=tmp)
        got = list(tmp.glob("*.deb"))
        if len(got) != 1:
            raise GuestBuildError(f"apt-get download produced {got}")
        dest = debs / got[0].name
        os.replace(got[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- modules

def _modinfo(ko: Path) -> dict[str, list[str]]:
    """key -> values from the .modinfo section of an (uncompressed) ELF64 module."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError(f"{ko}: not an uncompressed ELF64 module")
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def sh(i):  # name, offset, size
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize)
        return name, off, size

    _, stroff, _ = sh(e_shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(e_shnum):
        name, off, size = sh(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            for item in data[off:off + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    info.setdefault(k, []).append(v)
    return info


def _modname(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def plan_modules(moddir: Path, wanted: list[str]) -> tuple[list[tuple[str, Path]], list[str]]:
    """Return ([(name, .ko path)] in load order, [wanted names that are built in])."""
    builtin = {_modname(l) for l in (moddir / "modules.builtin").read_text().split()}
    available: dict[str, Path] = {}
    for ko in (moddir / "kernel").rglob("*.ko*"):
        if ko.suffix != ".ko":
            raise GuestBuildError(f"compressed module {ko}: this recipe expects plain .ko files")
        available[_modname(ko.name)] = ko

    order: list[tuple[str, Path]] = []
    seen: set[str] = set()
    found_builtin: list[str] = []

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise GuestBuildError(f"module dependency cycle: {chain + (name,)}")
        if name in builtin:
            seen.add(name)
            found_builtin.append(name)
            return
        ko = available.get(name)
        if ko is None:
            if name in REQUIRED_MODULES:
                raise GuestBuildError(f"module {name} is neither built in nor a module in {moddir}")
            _log(f"module {name} not in this kernel; skipped")
            seen.add(name)
            return
        for deps in _modinfo(ko).get("depends", []):
            for dep in filter(None, deps.split(",")):
                add(dep.replace("-", "_"), chain + (name,))
        seen.add(name)
        order.append((name, ko))

    for name in wanted:
        add(name, ())
    return order, found_builtin


# --------------------------------------------------------------------------- host programs

def _find_program(name: str) -> Path:
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"
    found = shutil.which(name, path=path)
    if not found:
        raise GuestBuildError(f"{name} not found on the host; run scripts/test-deps.sh")
    return Path(found).resolve()


def _shared_libs(binary: Path) -> list[str]:
    """Absolute paths (as the loader resolves them) of the libraries and the loader."""
    out = _run(["ldd", str(binary)])
    libs = []
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
            continue
        m = re.match(r"(/\S+) \(0x", line)  # the dynamic loader (PT_INTERP path)
        if m:
            libs.append(m.group(1))
        elif "not found" in line:
            raise GuestBuildError(f"ldd {binary}: {line}")
    return libs


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a PT_INTERP program header."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, e_phoff + i * e_phentsize)[0] != 3  # PT_INTERP
               for i in range(e_phnum))


def _busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.exists() and _is_static_elf(p.resolve()):
            return p.resolve()
    raise GuestBuildError("static busybox not found; run scripts/test-deps.sh (busybox-static)")


# --------------------------------------------------------------------------- build

def _build(workdir: Path, out: Path, pkg: str, version: str) -> dict:
    deb = _download_deb(pkg, version, cache_root() / "debs")
    root = workdir / "kernel"
    _log(f"dpkg -x {deb.name}")
    _run(["dpkg", "-x", str(deb), str(root)])
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise GuestBuildError(f"expected one vmlinuz in {deb.name}, found {vmlinuz}")
    release = vmlinuz[0].name[len("vmlinuz-"):]
    moddir = root / "lib" / "modules" / release
    if not moddir.is_dir():
        moddir = root / "usr" / "lib" / "modules" / release

    modules, builtin = plan_modules(moddir, VIRTIO_MODULES + EXT4_MODULES)
    shutil.copyfile(vmlinuz[0], out / "bzImage")

    w = CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp",
              "run", "mnt", "root", "lib/modules"):
        w.mkdir(d)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.chardev("dev/ttyS0", 4, 64)

    bb = _busybox()
    w.file("bin/busybox", bb.read_bytes(), 0o755)
    applets = _run([str(bb), "--list-full"]).split()
    host_names = {g for g, _, aliases in HOST_PROGRAMS for g in [g, *aliases]}
    for a in applets:
        if "/" + a not in host_names and a != "bin/busybox":
            w.symlink(a, "/bin/busybox")

    libs: set[str] = set()
    for guest_path, name, aliases in HOST_PROGRAMS:
        prog = _find_program(name)
        w.file(guest_path, prog.read_bytes(), 0o755)
        for alias in aliases:
            w.symlink(alias, Path(guest_path).name)
        libs.update(_shared_libs(prog))
    for lib in sorted(libs):
        # Stored at the path ldd printed (the loader at its PT_INTERP path);
        # the guest has no ld.so.cache, so glibc searches its built-in
        # /lib/x86_64-linux-gnu etc., which these paths cover.
        w.file(lib, Path(lib).resolve().read_bytes(), 0o755)
    for f in HOST_FILES:
        if Path(f).exists():
            w.file(f, Path(f).read_bytes())

    for name, ko in modules:
        w.file(f"lib/modules/{name}.ko", ko.read_bytes())
    w.file("etc/vhostd-modules", "".join(f"{n}\n" for n, _ in modules).encode())
    w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.file("etc/group", b"root:x:0:\n")
    w.file("init", INIT_SCRIPT.encode(), 0o755)

    raw = w.getvalue()
    (out / "initramfs.cpio.gz").write_bytes(gzip_bytes(raw))
    manifest = {
        "kernel_package": pkg,
        "kernel_version": version,
        "kernel_release": release,
        "modules": [n for n, _ in modules],
        "builtin": builtin,
        "host_libs": sorted(libs),
        "initramfs_bytes_uncompressed": len(raw),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _image_from(directory: Path) -> GuestImage:
    m = json.loads((directory / "manifest.json").read_text())
    return GuestImage(
        kernel=directory / "bzImage",
        initramfs=directory / "initramfs.cpio.gz",
        kernel_release=m["kernel_release"],
        modules=tuple(m["modules"]),
        builtin=tuple(m["builtin"]),
        directory=directory,
    )


def _touch(directory: Path) -> None:
    try:
        os.utime(directory)  # marks the image as in use for the cleanup above
    except OSError:
        pass


def _latest_cached(root: Path) -> Path | None:
    tag = _recipe_hash()
    cands = [d for d in root.glob(f"*-{tag}") if (d / "manifest.json").exists()]
    return max(cands, key=lambda d: d.stat().st_mtime) if cands else None


def ensure_guest_image() -> GuestImage:
    """Return the cached guest image, building it first if needed."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    try:
        pkg, version = resolve_kernel_package()
    except GuestBuildError as e:
        # No apt lists (offline dev box)?  Fall back to what was built before.
        cached = _latest_cached(root)
        if cached is not None:
            _log(f"cannot resolve kernel package ({e.__class__.__name__}); using cached {cached.name}")
            return _image_from(cached)
        if not (os.geteuid() == 0 and not _apt_lists_stamp()):
            raise GuestBuildError(f"{e}\n(hint: run scripts/test-deps.sh, which runs apt-get update)") from e
        # A fresh container whose image deleted /var/lib/apt/lists: fetch them once.
        _log("no apt package lists: running apt-get update")
        _run(["apt-get", "update"])
        pkg, version = resolve_kernel_package()

    final = root / f"{pkg}_{version.replace(':', '%3a')}-{_recipe_hash()}"
    if (final / "manifest.json").exists():
        _touch(final)
        return _image_from(final)

    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if (final / "manifest.json").exists():
            return _image_from(final)
        t0 = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            out = work / "out"
            out.mkdir()
            _build(work, out, pkg, version)
            os.rename(out, final)  # atomic publish: manifest.json is already inside
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _log(f"built {final.name} in {time.monotonic() - t0:.1f}s")
        # Drop images of other recipes/kernels that nobody used for a while (a
        # pytest process running older code may still be booting one right now).
        for old in root.glob("linux-image-*"):
            if old != final and old.is_dir() and time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
    return _image_from(final)


if __name__ == "__main__":
    t = time.monotonic()
    img = ensure_guest_image()
    print(f"kernel     {img.kernel}\ninitramfs  {img.initramfs}\nrelease    {img.kernel_release}")
    print(f"modules    {' '.join(img.modules)}\nbuiltin    {' '.join(img.builtin)}")
    print(f"took       {time.monotonic() - t:.2f}s")
