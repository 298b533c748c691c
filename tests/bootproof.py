"""Boot a real Linux guest on a set of disks and report the root filesystem it assembles.

The guest is Debian's stock kernel under QEMU TCG (``-machine microvm``: virtio-mmio disks,
direct PVH kernel boot, the same shape of machine Cloud Hypervisor gives a cocoon VM). Its
initramfs is static busybox plus the handful of modules it needs, and its ``/init`` does the
job of cocoon's guest script ``cocoon-overlay`` (cocoon-formats.md §5.9) generically: every
name it uses comes from the kernel command line, nothing from the test. It

1. reads ``cocoon.layers=`` (layer serials, top first) and ``cocoon.cow=`` from /proc/cmdline;
2. finds each disk by its virtio serial in ``/sys/block/vd*/serial``, never by probe order;
3. mounts every layer read-only as EROFS and the cow disk as ext4;
4. mounts overlayfs with ``lowerdir`` in the command line's order and the upper on the cow;
5. prints ``COCOON-FILE: <sha256>  ./<path>`` for every regular file of the merged root,
   checks that a write lands on the cow disk, prints ``COCOON-MARKER: done``, powers off.

Success is judged from those serial-console markers only, never from QEMU's exit status: with
``panic=-1 -no-reboot`` a guest that panics also ends QEMU with status 0 (recipes.md §7.6).
KVM is not usable on the CI machine kind (recipes.md §8), hence TCG.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ocifixture import Blob, erofs_from_layer, files_of

KERNEL_ROOT_ENV = "COCOONPLAN_KERNEL_ROOT"
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
# The modules /init loads, dependencies resolved from each .ko's modinfo. crc32c_generic is
# named because erofs and ext4 reach it only through libcrc32c's crypto lookup of "crc32c"
# (a softdep on an alias, which modinfo's depends= does not list).
GUEST_MODULES = ("virtio_mmio", "virtio_blk", "crc32c_generic", "ext4", "erofs", "overlay")
# cocoon-overlay's overlay options (cocoon-formats.md §5.9), so the proof uses the same mount.
OVERLAY_OPTIONS = "index=on,redirect_dir=on,metacopy=on,xino=on"
BOOT_TIMEOUT = 120  # seconds; a TCG boot takes ~2-3 s, the margin is for a loaded CI machine

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
# Kernel messages would interleave with the markers mid-line; fail() shows them instead.
dmesg -n 1
echo "COCOON-MARKER: init"
fail() {
  echo "COCOON-ERROR: $*"
  dmesg | tail -n 30 | sed 's/^/COCOON-DMESG: /'
  poweroff -f
  sleep 60
}
for m in $(cat /modules/order); do insmod "/modules/$m.ko" || fail "insmod $m"; done

layers=; cow=
for token in $(cat /proc/cmdline); do
  case "$token" in
    cocoon.layers=*) layers="${token#cocoon.layers=}" ;;
    cocoon.cow=*) cow="${token#cocoon.cow=}" ;;
  esac
done
[ -n "$layers" ] || fail "no cocoon.layers= on the kernel command line"
[ -n "$cow" ] || fail "no cocoon.cow= on the kernel command line"
layers=$(echo "$layers" | tr , ' ')

# By serial, as cocoon-overlay does: virtio-mmio probe order says nothing about plan order.
device() {
  for d in /sys/block/vd*; do
    [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }
  done
  return 1
}
for i in $(seq 100); do
  missing=
  for s in $layers $cow; do device "$s" >/dev/null || missing="$missing $s"; done
  [ -z "$missing" ] && break
  sleep 0.1
done
[ -z "$missing" ] || fail "no disk with serial$missing"
for d in /sys/block/vd*; do echo "COCOON-DISK: $(cat "$d/serial") ${d##*/} ro=$(cat "$d/ro")"; done

lower=
for s in $layers; do
  mkdir -p "/.cocoon/layers/$s"
  mount -t erofs -o ro "$(device "$s")" "/.cocoon/layers/$s" || fail "mount layer $s"
  lower="${lower:+$lower:}/.cocoon/layers/$s"
done
mkdir -p /.cocoon/cow /root
mount -t ext4 -o noatime "$(device "$cow")" /.cocoon/cow || fail "mount cow $cow"
mkdir -p /.cocoon/cow/upper /.cocoon/cow/work
mount -t overlay overlay \
  -o "lowerdir=$lower,upperdir=/.cocoon/cow/upper,workdir=/.cocoon/cow/work,@OVERLAY_OPTIONS@" /root \
  || fail "overlay mount"
echo "COCOON-OVERLAY: $(awk '$2 == "/root" && $3 == "overlay" {print $4}' /proc/mounts)"

cd /root
find . -type f | sort | while read -r f; do echo "COCOON-FILE: $(sha256sum "$f")"; done
cd /
# The root is only usable if writes go to the cow disk and leave the read-only layers alone.
echo cocoon-boot-proof > /root/.cocoon-boot-proof || fail "write to the merged root"
[ -f /.cocoon/cow/upper/.cocoon-boot-proof ] || fail "a write to the merged root missed the cow disk"
echo "COCOON-MARKER: done"
poweroff -f
sleep 60
"""


# --------------------------------------------------------------------------- prerequisites


def missing_prerequisites() -> list[str]:
    """What this machine lacks for a boot (empty: it can boot), each with how to get it."""
    missing = []
    root = os.environ.get(KERNEL_ROOT_ENV)
    if not root:
        missing.append(f"{KERNEL_ROOT_ENV} is not set (export {KERNEL_ROOT_ENV}=$(scripts/fetch-kernel))")
    elif not Path(root, "lib", "modules").is_dir():
        missing.append(f"{KERNEL_ROOT_ENV} has no lib/modules (run scripts/fetch-kernel)")
    tools = {QEMU: "qemu-system-x86", "cpio": "cpio", "mkfs.ext4": "e2fsprogs", "mkfs.erofs": "erofs-utils"}
    missing += [f"{tool} (apt-get install {pkg})" for tool, pkg in tools.items() if not _which(tool)]
    if not (BUSYBOX.is_file() and _is_static(BUSYBOX)):
        missing.append(f"a static {BUSYBOX} (apt-get install busybox-static)")
    return missing


def _which(tool: str) -> str | None:
    """``tool`` on PATH or in the sbin directories, which a normal user's PATH often lacks."""
    return shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def _is_static(path: Path) -> bool:
    """An ELF64 executable without a PT_INTERP segment runs in an initramfs with no libc."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


# --------------------------------------------------------------------------- kernel and initramfs


@dataclass(frozen=True)
class Guest:
    """What QEMU boots: an uncompressed PVH kernel and the proof initramfs."""

    kernel_version: str
    vmlinux: Path
    initramfs: Path


def prepare_guest(kernel_root: Path, work: Path) -> Guest:
    """Extract ``vmlinux`` from the newest kernel under ``kernel_root`` and build the initramfs."""
    versions = [
        p.name
        for p in (kernel_root / "lib" / "modules").iterdir()
        if (kernel_root / "boot" / f"vmlinuz-{p.name}").is_file()
    ]
    if not versions:
        raise RuntimeError(f"no kernel under {kernel_root} has both boot/vmlinuz-V and lib/modules/V")
    version = max(versions, key=lambda v: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", v)])
    work.mkdir(parents=True, exist_ok=True)
    vmlinux = extract_vmlinux(kernel_root / "boot" / f"vmlinuz-{version}", work / "vmlinux")
    modules = module_load_order(kernel_root / "lib" / "modules" / version, GUEST_MODULES)
    initramfs = build_initramfs(modules, work / "initramfs")
    return Guest(version, vmlinux, initramfs)


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """The ELF ``vmlinux`` inside a bzImage (Debian amd64 compresses it with xz).

    QEMU boots it through its PVH entry note, skipping the real-mode setup and the
    decompressor: 2.3x faster under TCG (recipes.md §7.2), and the way Cloud Hypervisor boots.
    """
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise RuntimeError(f"{bzimage.name}: no xz payload (is the kernel built with CONFIG_KERNEL_XZ?)")
    elf = lzma.LZMADecompressor().decompress(data[start:])
    if elf[:4] != b"\x7fELF":
        raise RuntimeError(f"{bzimage.name}: the xz payload is not an ELF image")
    out.write_bytes(elf)
    return out


def modinfo(ko: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a kernel module: key -> values, in order."""
    data = ko.read_bytes()
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if data[names_at + name : data.index(b"\0", names_at + name)] == b".modinfo":
            info: dict[str, list[str]] = {}
            for entry in data[offset : offset + size].split(b"\0"):
                key, sep, value = entry.decode().partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    raise RuntimeError(f"{ko.name}: no .modinfo section")


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """The ``.ko`` files for ``wanted`` and their dependencies, dependencies first; modules
    the kernel has built in (modules.builtin) need no file and are left out.

    Computed from each module's ``depends=`` because the linux-image package ships no
    modules.dep (depmod writes it at install time, and the package is only unpacked).
    """

    def module_name(path: str) -> str:
        return Path(path).name.removesuffix(".ko").replace("-", "_")

    by_name = {module_name(ko.name): ko for ko in modules_dir.rglob("*.ko")}
    builtin_list = modules_dir / "modules.builtin"
    builtin = (
        {module_name(line) for line in builtin_list.read_text().split()} if builtin_list.is_file() else set()
    )
    order: list[Path] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in builtin:
            return
        if name in chain:
            raise RuntimeError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        ko = by_name.get(name)
        if ko is None:
            raise RuntimeError(f"module {name} not found under {modules_dir} (compressed .ko?)")
        if ko in order:
            return
        for deps in modinfo(ko).get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep.replace("-", "_"), (*chain, name))
        order.append(ko)

    for name in wanted:
        visit(name, ())
    return order


def build_initramfs(modules: Sequence[Path], out: Path) -> Path:
    """An uncompressed newc cpio: static busybox, the modules in load order, and ``/init``.

    Uncompressed: about 5 MB that never leave the machine, and gzip -1 saved no boot time
    under TCG when measured (about 2.0 s either way).
    """
    root = out.with_suffix(".d")
    for sub in ("bin", "dev", "proc", "sys", "modules"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for ko in modules:
        shutil.copyfile(ko, root / "modules" / ko.name)
    (root / "modules" / "order").write_text("".join(ko.name.removesuffix(".ko") + "\n" for ko in modules))
    init = root / "init"
    init.write_text(INIT.replace("@OVERLAY_OPTIONS@", OVERLAY_OPTIONS))
    init.chmod(0o755)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    with out.open("wb") as archive:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            input="\n".join(names).encode(),
            cwd=root,
            stdout=archive,
            check=True,
        )
    return out


# --------------------------------------------------------------------------- disks


@dataclass(frozen=True)
class Disk:
    """One virtio-blk device: the image file and the serial the guest finds it by."""

    serial: str
    path: Path
    readonly: bool


def ext4_image(path: Path, size: int = 16 << 20) -> Path:
    """An empty ext4 file system in a sparse raw file, like a fresh cocoon ``cow.raw``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(
        [_which("mkfs.ext4") or "mkfs.ext4", "-F", "-q", str(path)], check=True, capture_output=True
    )
    return path


def blank_image(path: Path, size: int = 1 << 20) -> Path:
    """A sparse raw file of zeros (a data disk nobody formats in the proof)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    return path


# --------------------------------------------------------------------------- booting


@dataclass
class BootResult:
    """What the guest reported on its serial console."""

    log: str
    seconds: float
    files: dict[str, str] = field(default_factory=dict)
    """Merged root: path (no leading ``./``) -> sha256 hex, as the guest hashed it."""
    disks: dict[str, tuple[str, bool]] = field(default_factory=dict)
    """serial -> (guest block device, read-only), for every virtio disk the guest saw."""
    overlay: str = ""
    """The overlay's options as /proc/mounts shows them."""
    errors: list[str] = field(default_factory=list)
    init_started: bool = False
    done: bool = False

    def lowerdirs(self) -> list[str]:
        """The ``lowerdir`` entries of the mounted overlay, top first (as the kernel took them)."""
        options = dict(opt.partition("=")[::2] for opt in self.overlay.split(","))
        return options.get("lowerdir", "").split(":")

    def check(self) -> None:
        """Raise with the console log unless the guest finished without a single error."""
        if self.errors or not self.done:
            problem = "; ".join(self.errors) or "the guest never printed COCOON-MARKER: done"
            raise AssertionError(f"boot failed: {problem}\n--- serial console ---\n{self.log[-6000:]}")


def host_tsc_khz() -> int | None:
    """The host CPU's rate in kHz from /proc/cpuinfo, if it has one (x86 hosts): the TSC rate
    on the CI machine kind (no cpufreq), the current clock, close to it, elsewhere."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.MULTILINE)
    return round(float(match[1]) * 1000) if match else None


def kernel_command_line(kernel_args: Sequence[str]) -> list[str]:
    """The guest's command line: serial console, power off on panic, then ``kernel_args``.

    Under TCG the guest's TSC is the host's, and microvm has no HPET or ACPI PM timer to
    calibrate it against, only the PIT. On a busy host the PIT calibration fails ("Unable to
    calibrate against PIT"), the kernel marks the TSC unusable and then never sees a timer
    tick: the boot hangs silently (half of all boots with three running at once on two
    CPUs). ``tsc_early_khz`` with the host's rate skips that calibration. Where the host
    reports no rate the kernel calibrates as usual; a wrong rate would only skew guest time.
    """
    args = ["console=ttyS0", "panic=-1", "loglevel=3"]
    khz = host_tsc_khz()
    if khz:
        args.append(f"tsc_early_khz={khz}")
    return [*args, *kernel_args]


def boot(guest: Guest, disks: Sequence[Disk], kernel_args: Sequence[str]) -> BootResult:
    """Boot ``guest`` with ``disks`` attached in the given order and parse its console."""
    command = [
        QEMU,
        *("-accel", "tcg", "-machine", "microvm,rtc=on", "-m", "256", "-smp", "1"),
        *("-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"),
        *("-kernel", str(guest.vmlinux), "-initrd", str(guest.initramfs)),
        *("-append", " ".join(kernel_command_line(kernel_args))),
    ]
    for i, disk in enumerate(disks):
        # QEMU option values escape a comma by doubling it.
        drive = f"id=disk{i},if=none,format=raw,file={str(disk.path).replace(',', ',,')}"
        command += ["-drive", drive + (",readonly=on" if disk.readonly else "")]
        command += ["-device", f"virtio-blk-device,drive=disk{i},serial={disk.serial}"]
    started = time.monotonic()
    timed_out = False
    try:
        run = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT)
        output, stderr = run.stdout, run.stderr
    except subprocess.TimeoutExpired as expired:
        output, stderr, timed_out = expired.stdout or b"", expired.stderr or b"", True
    result = parse_console(output.decode(errors="replace"), time.monotonic() - started)
    if stderr.strip():
        result.log += "\n--- qemu stderr ---\n" + stderr.decode(errors="replace")
    if timed_out:
        stage = "in /init" if result.init_started else "before /init started"
        result.errors.append(f"no power-off within {BOOT_TIMEOUT} s, stuck {stage}")
    return result


_MARKER = re.compile(r"COCOON-[A-Z]+: .*")
_FILE = re.compile(r"COCOON-FILE: ([0-9a-f]{64})  \./(.+)")
_DISK = re.compile(r"COCOON-DISK: (\S+) (vd[a-z]+) ro=([01])")


def parse_console(log: str, seconds: float) -> BootResult:
    """The markers of one boot. A marker line that does not parse is an error, not skipped:
    a garbled line must not quietly drop a file from the comparison."""
    result = BootResult(log=log, seconds=seconds)
    for raw in log.splitlines():
        line = raw.rstrip("\r")
        if not _MARKER.fullmatch(line) or line.startswith("COCOON-DMESG: "):
            continue
        if match := _FILE.fullmatch(line):
            result.files[match[2]] = match[1]
        elif match := _DISK.fullmatch(line):
            result.disks[match[1]] = (match[2], match[3] == "1")
        elif line.startswith("COCOON-OVERLAY: "):
            result.overlay = line.removeprefix("COCOON-OVERLAY: ")
        elif line.startswith("COCOON-ERROR: "):
            result.errors.append(line.removeprefix("COCOON-ERROR: "))
        elif line == "COCOON-MARKER: init":
            result.init_started = True
        elif line == "COCOON-MARKER: done":
            result.done = True
        else:
            result.errors.append(f"garbled console line: {line!r}")
    return result


# --------------------------------------------------------------------------- expectations


def merged_tree(layers_bottom_first: Sequence[Blob]) -> dict[str, str]:
    """The regular files an overlay of these layers must show: path -> sha256 hex.

    Layers are applied bottom to top, so the top-most copy of a repeated path wins. The model
    has no whiteouts (OCI ``.wh.`` entries), so it refuses layers that carry any.
    """
    merged: dict[str, str] = {}
    for blob in layers_bottom_first:
        for name, data in files_of(blob).items():
            if Path(name).name.startswith(".wh."):
                raise ValueError(f"layer {blob.digest} has whiteout {name}: merged_tree does not model it")
            merged[name] = hashlib.sha256(data).hexdigest()
    return merged


def disk_images(planned: Iterable[Mapping[str, Any]], blobs: Mapping[str, Blob], out: Path) -> list[Disk]:
    """One image per planned disk, in plan order: what each role holds on a fresh cocoon VM.

    ``layer``: the EROFS of the layer blob with the planned digest (built as cocoon converts
    it); a digest not among ``blobs`` raises, because the proof must boot exactly what the plan
    lists, never a stand-in. ``cow``: an empty ext4. ``data``: blank (the guest leaves it alone).
    """
    disks = []
    for disk in planned:
        serial, role = str(disk["serial"]), disk["role"]
        if role == "layer":
            blob = blobs.get(str(disk["digest"]))
            if blob is None:
                raise LookupError(f"{serial}: no layer blob {disk['digest']} to build an EROFS from")
            image = out / f"{blob.hex}.erofs"
            if not image.exists():
                erofs_from_layer(blob, image)
        elif role == "cow":
            image = ext4_image(out / f"{serial}.ext4")
        elif role == "data":
            image = blank_image(out / f"{serial}.raw")
        else:
            raise ValueError(f"{serial}: no image for disk role {role!r}")
        disks.append(Disk(serial, image, readonly=bool(disk["readonly"])))
    return disks


def cocoon_args(cmdline: str) -> list[str]:
    """The tokens of a cocoon kernel command line that decide the root filesystem.

    Only ``cocoon.layers=`` and ``cocoon.cow=`` are passed to the proof guest: the rest is
    for cocoon's own initramfs and hardware (``console=hvc0``, ``clocksource=kvm-clock``, and
    ``ip=`` for a NIC the proof machine does not have).
    """
    tokens = [t for t in cmdline.split() if t.startswith(("cocoon.layers=", "cocoon.cow="))]
    keys = sorted(t.partition("=")[0] for t in tokens)
    if keys != ["cocoon.cow", "cocoon.layers"]:
        raise ValueError(f"expected one cocoon.layers= and one cocoon.cow= in {cmdline!r}")
    return tokens
