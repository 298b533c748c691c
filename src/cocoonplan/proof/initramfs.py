"""The guest program and the initramfs that carries it, as newc cpio archives built in memory.

The initramfs is two archives, which the kernel unpacks one after the other: the **base**
(static busybox, the kernel modules in load order, ``/init`` and the probe script), built once
per proof run, and the **request** of one boot (the paths to look up, and whether to list the
whole root). ``/init`` does the job of cocoon's guest script ``cocoon-overlay``
(cocoon-formats.md §5.9) generically; every name it uses comes from the kernel command line or
the request, never from cocoonplan's plan. It

1. reads ``cocoon.layers=`` (layer serials, top first) and ``cocoon.cow=`` from /proc/cmdline;
2. finds each disk by its virtio serial in ``/sys/block/vd*/serial``, never by probe order;
3. mounts every layer read-only as EROFS and the cow disk as ext4 (``noatime``);
4. mounts the overlay on ``/root``: ``lowerdir`` in the command line's order, the upper on the
   cow, with cocoon-overlay's options;
5. when asked, prints ``COCOON-FILE: <sha256>  ./<path>`` for every regular file of the root;
6. looks up every requested path *inside* the root (chrooted into it, so that links resolve as
   the VM would resolve them) and prints ``COCOON-EXPECT: <n> <kind> <mode> <sha256> <path>``;
7. checks that a write lands on the cow disk, prints ``COCOON-MARKER: done`` and powers off.

A failure prints ``COCOON-ERROR: …`` and the kernel log's tail, then powers off: the host
judges by these markers alone (recipes.md §7.6).
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Sequence

from cocoonplan.model import Model
from cocoonplan.proof.target import Probe

OVERLAY_OPTIONS = "index=on,redirect_dir=on,metacopy=on,xino=on"
"""cocoon-overlay's overlay options (cocoon-formats.md §5.9): the proof mounts the same."""
TOOLS = "cocoon"
"""The initramfs directory of busybox, the probe, the modules and the request."""
PROBE_MOUNT = "/.cocoon-proof"
"""Where the guest's root sees the tools while it is probed (a directory on the scratch cow)."""

INIT = r"""#!/@TOOLS@/busybox sh
/@TOOLS@/busybox --install -s /bin
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
for m in $(cat /@TOOLS@/modules/order); do insmod "/@TOOLS@/modules/$m.ko" || fail "insmod $m"; done

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

if [ -f /@TOOLS@/inventory ]; then
  (cd /root && find . -type f | sort | while read -r f; do echo "COCOON-FILE: $(sha256sum "$f")"; done)
fi
# The probe runs chrooted into the root, so an absolute link resolves in the VM's root, not
# in the initramfs. Its tools are bind-mounted there, on the scratch cow.
mkdir -p /root@PROBE_MOUNT@ && mount -o bind /@TOOLS@ /root@PROBE_MOUNT@ || fail "mount the probe into the root"
chroot /root @PROBE_MOUNT@/busybox sh @PROBE_MOUNT@/probe @PROBE_MOUNT@/expect || fail "probe the root"
umount /root@PROBE_MOUNT@
# The root is only usable if writes go to the cow disk and leave the read-only layers alone.
echo cocoon-boot-proof > /root/.cocoon-boot-proof || fail "write to the merged root"
[ -f /.cocoon/cow/upper/.cocoon-boot-proof ] || fail "a write to the merged root missed the cow disk"
echo "COCOON-MARKER: done"
poweroff -f
sleep 60
"""

PROBE = """bb=@PROBE_MOUNT@/busybox
# One line per path: index, whether to hash it, the path (printable, so never a tab).
while IFS='\t' read -r index hash path; do
  mode=-; sum=-
  if [ -e "$path" ]; then
    if [ -f "$path" ]; then kind=file; elif [ -d "$path" ]; then kind=dir; else kind=other; fi
    mode=$($bb stat -L -c %a "$path")
    if [ "$hash" = 1 ] && [ "$kind" = file ]; then sum=$($bb sha256sum "$path" | $bb cut -d ' ' -f 1); fi
  elif [ -L "$path" ]; then
    kind=dangling
  else
    kind=missing
  fi
  $bb printf 'COCOON-EXPECT: %s %s %s %s %s\\n' "$index" "$kind" "$mode" "$sum" "$path"
done < "$1"
"""

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class Entry(Model):
    """One member of a newc archive."""

    name: str
    """Relative to the initramfs root, without a leading slash."""
    mode: int
    """File type and permission bits (``stat.S_IFREG | 0o755``)."""
    data: bytes = b""
    device: tuple[int, int] = (0, 0)
    """Major and minor of a device node."""


def directory(name: str) -> Entry:
    """A directory entry (0755)."""
    return Entry(name=name, mode=stat.S_IFDIR | 0o755)


def regular(name: str, data: bytes, mode: int = 0o644) -> Entry:
    """A regular file entry."""
    return Entry(name=name, mode=stat.S_IFREG | mode, data=data)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(inode: int, entry: Entry) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = (
        inode, entry.mode, 0, 0, 2 if stat.S_ISDIR(entry.mode) else 1, 0, len(entry.data),
        0, 0, *entry.device, len(name), 0,
    )  # fmt: skip
    header = _MAGIC + b"".join(b"%08x" % value for value in fields)
    return header + name + _pad(len(header) + len(name)) + entry.data + _pad(len(entry.data))


def archive(entries: Iterable[Entry]) -> bytes:
    """A newc (``cpio -H newc``) archive of ``entries``, owned by root, dated 0: the same bytes
    for the same entries. Parents must come before their children."""
    members = [_member(inode, entry) for inode, entry in enumerate(entries, 1)]
    members.append(_member(0, Entry(name=_TRAILER, mode=0)))
    return b"".join(members)


def _fill(text: str) -> str:
    for key, value in (
        ("@TOOLS@", TOOLS),
        ("@PROBE_MOUNT@", PROBE_MOUNT),
        ("@OVERLAY_OPTIONS@", OVERLAY_OPTIONS),
    ):
        text = text.replace(key, value)
    return text


def base_archive(busybox: bytes, modules: Sequence[tuple[str, bytes]]) -> bytes:
    """The part of the initramfs every boot shares: ``/init``, static busybox, the probe, and the
    kernel modules (``(name, .ko bytes)``) in the order ``/init`` loads them.

    Uncompressed: a few MB that never leave the machine, and compressing them saved no boot
    time under TCG when measured.
    """
    entries = [
        *(directory(name) for name in ("bin", "dev", "proc", "sys", "root", TOOLS, f"{TOOLS}/modules")),
        # The kernel opens /dev/console for /init's output before /init mounts devtmpfs.
        Entry(name="dev/console", mode=stat.S_IFCHR | 0o600, device=(5, 1)),
        regular("init", _fill(INIT).encode(), 0o755),
        regular(f"{TOOLS}/busybox", busybox, 0o755),
        regular(f"{TOOLS}/probe", _fill(PROBE).encode()),
        *(regular(f"{TOOLS}/modules/{name}.ko", data) for name, data in modules),
        regular(f"{TOOLS}/modules/order", "".join(f"{name}\n" for name, _ in modules).encode()),
    ]
    return archive(entries)


def request_archive(probes: Sequence[Probe], inventory: bool) -> bytes:
    """The part of the initramfs that is one boot's: the paths to look up (an empty file when
    there are none) and, with ``inventory``, the request to list every file of the root."""
    lines = "".join(f"{p.index}\t{int(p.hash)}\t{p.path}\n" for p in probes)
    entries = [regular(f"{TOOLS}/expect", lines.encode())]
    if inventory:
        entries.append(regular(f"{TOOLS}/inventory", b""))
    return archive(entries)
