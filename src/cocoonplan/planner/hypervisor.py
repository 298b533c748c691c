"""Cloud Hypervisor artefacts cocoon produces: kernel cmdline, launch command, config.json.

Everything here is a pure function of its arguments and follows cocoon v0.3.8
(``buildCmdline``, ``buildCLIArgs``, ``storageConfigToDisk``, ``patchCHConfig``); the
reference is ``shared/reference/cocoon-formats.md`` §5.5, §5.7 and §8.6. ``config.json`` is
built as data and never templated.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cocoonplan.cocoon import COW_SERIAL, DEFAULT_QUEUE_SIZE, StorageConfig, layer_serial
from cocoonplan.errors import PlanError
from cocoonplan.observed import ObservedVM
from cocoonplan.planner.identity import NicIdentity
from cocoonplan.planner.model import ApiRequest
from cocoonplan.planner.rules import RULES, Rules
from cocoonplan.project import NodeConfig
from cocoonplan.releases import CocoonLine
from cocoonplan.spec import RestoreMode
from cocoonplan.units import MIB

CH_BINARY = "cloud-hypervisor"
VSOCK_CID = 3
"""The guest's vsock context ID cocoon (v0.6) always gives."""
BALLOON_MIN_MEMORY = 256 * MIB


@dataclass(frozen=True)
class Tuning:
    """The VM settings that shape disks, NICs and the launch line."""

    cpu: int
    memory: int
    host_cpus: int
    queue_size: int = DEFAULT_QUEUE_SIZE
    disk_queue_size: int = DEFAULT_QUEUE_SIZE
    no_direct_io: bool = False
    hugepages: bool = False
    windows: bool = False
    rules: Rules = RULES[CocoonLine.V0_3]


@dataclass(frozen=True)
class Boot:
    """Direct kernel boot: the kernel, the initramfs and the kernel command line."""

    kernel: str
    initrd: str
    cmdline: str


def _netmask(prefix: int) -> str:
    mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if prefix else 0
    return ".".join(str((mask >> shift) & 0xFF) for shift in (24, 16, 8, 0))


def build_cmdline(layer_count: int, vm_name: str, nics: Sequence[NicIdentity], dns: Sequence[str]) -> str:
    """The guest kernel command line cocoon builds (``buildCmdline``, §5.5).

    ``cocoon.layers`` lists the top layer first (overlayfs lowerdir order). Each NIC with a
    static address gets an ``ip=`` parameter with up to two DNS servers; DHCP NICs get none.
    """
    layers = ",".join(layer_serial(j) for j in reversed(range(layer_count)))
    parts = [
        "console=hvc0 loglevel=3 boot=cocoon-overlay",
        f"cocoon.layers={layers}",
        f"cocoon.cow={COW_SERIAL}",
        "clocksource=kvm-clock rw",
    ]
    if nics:
        parts.append(f"net.ifnames=0 cocoon.hostname={vm_name}")
    for index, nic in enumerate(nics):
        if nic.address is None:
            continue
        a = nic.address
        value = f"ip={a.ip}::{a.gateway}:{_netmask(a.prefix)}:{vm_name}:eth{index}:off"
        parts.append(":".join([value, *dns[:2]]))
    return " ".join(parts)


def is_direct(disk: StorageConfig, no_direct_io: bool, rules: Rules) -> bool:
    """cocoon's O_DIRECT rule: the disk's override, else writable disks unless noDirectIO; on
    lines whose ``qcow2_direct_io`` is off, never a writable qcow2 overlay (``effectiveDirectIO``)."""
    if disk.direct_io is not None:
        return disk.direct_io
    if not rules.qcow2_direct_io and not disk.ro and _is_qcow2(disk.path):
        return False
    return not disk.ro and not no_direct_io


def _is_qcow2(path: str) -> bool:
    return path.endswith(".qcow2")


def _affinity(cpu: int) -> list[dict[str, Any]]:
    return [{"queue_index": i, "host_cpus": [i]} for i in range(cpu)]


def disk_argument(disk: StorageConfig, tuning: Tuning) -> str:
    """One ``--disk`` value, keys in cocoon's order (``storageConfigToDisk``)."""
    parts = [f"path={disk.path}"]
    if disk.ro:
        parts.append("readonly=on")
    if is_direct(disk, tuning.no_direct_io, tuning.rules):
        parts.append("direct=on")
    qcow2 = _is_qcow2(disk.path)
    if not disk.ro and not qcow2:
        parts.append("sparse=on")
    parts.append(f"image_type={'qcow2' if qcow2 else 'raw'}")
    if not disk.ro and qcow2:
        parts.append("backing_files=on")
    parts += [f"num_queues={tuning.cpu}", f"queue_size={tuning.disk_queue_size}"]
    if not disk.ro and tuning.cpu > 1:
        parts.append("queue_affinity=[" + ",".join(f"{i}@[{i}]" for i in range(tuning.cpu)) + "]")
    parts.append(f"serial={disk.serial}")
    return ",".join(parts)


def net_queues(cpu: int) -> int:
    """virtio-net queue count cocoon asks for: two per vCPU, at least two."""
    return max(2, 2 * cpu)


def balloon_size(memory: int, windows: bool) -> int | None:
    """Balloon size cocoon configures, or None when it adds no balloon."""
    if windows or memory < BALLOON_MIN_MEMORY:
        return None
    return memory // 4


def launch_command(
    *,
    api_socket: str,
    disks: Sequence[StorageConfig],
    nics: Sequence[NicIdentity],
    boot: Boot,
    tuning: Tuning,
) -> tuple[str, ...]:
    """The arguments cocoon starts a direct-boot VM with (§5.7): a fresh run, and every
    ``vm start`` (a clone's too, from its record). Kept as a list: ``--cmdline``'s value holds
    spaces and ``queue_affinity`` glob characters."""
    cpus = f"boot={tuning.cpu},max={tuning.host_cpus}" + (",kvm_hyperv=on" if tuning.windows else "")
    memory = f"size={tuning.memory}" + (",hugepages=on" if tuning.hugepages else "")
    args = [CH_BINARY, "--api-socket", api_socket, "--cpus", cpus, "--memory", memory]
    if disks:
        args += ["--disk", *(disk_argument(d, tuning) for d in disks)]
    args += ["--kernel", boot.kernel, "--initramfs", boot.initrd, "--cmdline", boot.cmdline]
    if nics:
        args.append("--net")
        args += [
            f"tap={n.tap},mac={n.mac},num_queues={net_queues(tuning.cpu)},queue_size={tuning.queue_size},"
            "offload_tso=on,offload_ufo=on,offload_csum=on"
            for n in nics
        ]
    args += ["--rng", "src=/dev/urandom", "--watchdog"]
    balloon = balloon_size(tuning.memory, tuning.windows)
    if balloon is not None:
        args += ["--balloon", f"size={balloon},deflate_on_oom=on,free_page_reporting=on"]
    if tuning.rules.vsock:
        args += ["--vsock", f"cid={VSOCK_CID},socket={vsock_socket(api_socket)}"]
    args += ["--serial", "off", "--console", "pty"]
    return tuple(args)


def vsock_socket(api_socket: str) -> str:
    """The vsock socket cocoon (v0.6) puts beside the API socket in the run directory."""
    return f"{posixpath.dirname(api_socket)}/vsock.uds"


def record_launch(vm: ObservedVM, node: NodeConfig, rules: Rules) -> tuple[str, ...] | None:
    """The arguments ``cocoon vm start`` would launch this VM with, from its record alone (a
    clone cold-boots this way too); None when the record holds no direct-boot config."""
    boot = vm.boot_config
    if boot is None or not boot.kernel_path or not boot.initrd_path:
        return None
    settings = vm.settings
    tuning = Tuning(
        cpu=settings.cpu,
        memory=settings.memory,
        host_cpus=node.cpus,
        queue_size=settings.queue_size or DEFAULT_QUEUE_SIZE,
        disk_queue_size=settings.disk_queue_size or DEFAULT_QUEUE_SIZE,
        no_direct_io=settings.no_direct_io,
        hugepages=node.hugepages and rules.hugepages_from_host,
        windows=settings.windows,
        rules=rules,
    )
    return launch_command(
        api_socket=f"{vm.run_dir}/api.sock",
        disks=vm.storage_configs,
        nics=[NicIdentity(tap=n.tap, mac=n.mac) for n in vm.nics],
        boot=Boot(kernel=boot.kernel_path, initrd=boot.initrd_path, cmdline=boot.cmdline or ""),
        tuning=tuning,
    )


def restore_launch_command(api_socket: str) -> tuple[str, ...]:
    """A clone or restore starts with the API socket only, then ``vm.restore`` (§8.7)."""
    return (CH_BINARY, "--api-socket", api_socket)


def net_body(nic: NicIdentity, tuning: Tuning) -> dict[str, Any]:
    """The ``vm.add-net`` body cocoon sends for one of a clone's NICs (``networkConfigToNet``);
    the v0.6 line names the device after its MAC instead of letting CH number it."""
    device = {"id": f"cocoon-net-{nic.mac.replace(':', '')}"} if tuning.rules.nic_ids else {}
    return device | {
        "tap": nic.tap,
        "mac": nic.mac,
        "num_queues": net_queues(tuning.cpu),
        "queue_size": tuning.queue_size,
        "offload_tso": True,
        "offload_ufo": True,
        "offload_csum": True,
    }


MEMORY_RESTORE_MODES = {
    RestoreMode.COPY: None,
    RestoreMode.ONDEMAND: "OnDemand",
    RestoreMode.MMAP: "CopyOnWrite",
}
"""What each restore mode sends as ``memory_restore_mode`` (copy sends none)."""


def restore_requests(
    run_dir: str, config: dict[str, Any], nics: Sequence[NicIdentity], tuning: Tuning, mode: RestoreMode
) -> tuple[ApiRequest, ...]:
    """The REST calls that turn a launched, empty VMM into the clone (§8.7): restore the
    snapshot copied into ``run_dir``, unplug every snapshot NIC that has a device ID, plug the
    clone's NICs (CH assigns their IDs), resume."""
    restore: dict[str, Any] = {"source_url": f"file://{run_dir}"}
    if MEMORY_RESTORE_MODES[mode] is not None:
        restore["memory_restore_mode"] = MEMORY_RESTORE_MODES[mode]
    calls = [ApiRequest(endpoint="vm.restore", body=restore)]
    calls += [
        ApiRequest(endpoint="vm.remove-device", body={"id": n["id"]})
        for n in config.get("net") or ()
        if isinstance(n, dict) and n.get("id")
    ]
    calls += [ApiRequest(endpoint="vm.add-net", body=net_body(nic, tuning)) for nic in nics]
    calls.append(ApiRequest(endpoint="vm.resume"))
    return tuple(calls)


def _disk_config(index: int, disk: StorageConfig, tuning: Tuning) -> dict[str, Any]:
    qcow2 = _is_qcow2(disk.path)
    return {
        "backing_files": not disk.ro and qcow2,
        "direct": is_direct(disk, tuning.no_direct_io, tuning.rules),
        "disable_aio": False,
        "disable_io_uring": False,
        "id": f"_disk{index}",
        "image_type": "Qcow2" if qcow2 else "Raw",
        "iommu": False,
        "num_queues": tuning.cpu,
        "path": disk.path,
        "pci_segment": 0,
        "queue_affinity": _affinity(tuning.cpu) if not disk.ro and tuning.cpu > 1 else None,
        "queue_size": tuning.disk_queue_size,
        "rate_limit_group": None,
        "rate_limiter_config": None,
        "readonly": disk.ro,
        "serial": disk.serial,
        "sparse": True,
        "vhost_socket": None,
        "vhost_user": False,
    }


def _net_config(device: int, nic: NicIdentity, tuning: Tuning) -> dict[str, Any]:
    return {
        "tap": nic.tap,
        "ip": None,
        "mask": None,
        "mac": nic.mac,
        "host_mac": None,
        "mtu": None,
        "iommu": False,
        "num_queues": net_queues(tuning.cpu),
        "queue_size": tuning.queue_size,
        "vhost_user": False,
        "vhost_socket": None,
        "vhost_mode": "Client",
        "id": f"_net{device}",
        "fds": None,
        "rate_limiter_config": None,
        "pci_segment": 0,
        "offload_tso": True,
        "offload_ufo": True,
        "offload_csum": True,
    }


def run_config(
    *,
    api_socket: str,
    disks: Sequence[StorageConfig],
    nics: Sequence[NicIdentity],
    boot: Boot,
    tuning: Tuning,
) -> dict[str, Any]:
    """The VmConfig Cloud Hypervisor holds after a fresh run's launch command (§5.7).

    cocoon writes no config.json for a fresh run; this is the configuration the launch
    arguments produce, in the shape CH v51 serialises (values cocoon does not set are CH's
    defaults, as recorded in a v51 snapshot), with top-level keys sorted as cocoon writes.
    """
    balloon = balloon_size(tuning.memory, tuning.windows)
    return {
        "balloon": None
        if balloon is None
        else {"deflate_on_oom": True, "free_page_reporting": True, "size": balloon},
        "console": {"mode": "Pty"},
        "cpus": {
            "affinity": None,
            "boot_vcpus": tuning.cpu,
            "features": {"amx": False},
            "kvm_hyperv": tuning.windows,
            "max_phys_bits": 46,
            "max_vcpus": tuning.host_cpus,
            "nested": True,
            "topology": None,
        },
        "debug_console": {"file": None, "mode": "Off", "iobase": 233},
        "devices": None,
        "disks": [_disk_config(i, d, tuning) for i, d in enumerate(disks)],
        "fs": None,
        "iommu": False,
        "landlock_enable": False,
        "landlock_rules": None,
        "memory": {
            "hotplug_method": "Acpi",
            "hotplug_size": None,
            "hotplugged_size": None,
            "hugepage_size": None,
            "hugepages": tuning.hugepages,
            "mergeable": False,
            "prefault": False,
            "shared": False,
            "size": tuning.memory,
            "thp": True,
            "zones": None,
        },
        "net": [_net_config(len(disks) + i, n, tuning) for i, n in enumerate(nics)] or None,
        "numa": None,
        "payload": {
            "firmware": None,
            "kernel": boot.kernel,
            "cmdline": boot.cmdline,
            "initramfs": boot.initrd,
        },
        "pci_segments": None,
        "platform": None,
        "pmem": None,
        "pvpanic": False,
        "rate_limit_groups": None,
        "rng": {"src": "/dev/urandom", "iommu": False},
        "serial": {"mode": "Off"},
        "tpm": None,
        "user_devices": None,
        "vdpa": None,
        "vsock": _vsock_config(api_socket) if tuning.rules.vsock else None,
        "watchdog": True,
    }


def _vsock_config(api_socket: str) -> dict[str, Any]:
    return {
        "cid": VSOCK_CID,
        "socket": vsock_socket(api_socket),
        "iommu": False,
        "id": None,
        "pci_segment": 0,
    }


def _sorted(value: Any) -> Any:
    return dict(sorted(value.items())) if isinstance(value, dict) else value


def patch_clone_config(
    source: dict[str, Any], disks: Sequence[StorageConfig], tuning: Tuning, *, run_dir: str, vm_id: str
) -> dict[str, Any]:
    """The snapshot's config.json as cocoon's ``patchCHConfig`` rewrites it for clone ``vm_id``
    in ``run_dir`` (§8.6).

    Only disk paths, disk queue sizes, O_DIRECT and serial/console change, and per line: boot
    vCPUs, memory size and the balloon (v0.3.8), or each NIC's TAP (to a throwaway
    ``rm<ID8>-<i>``, replaced after the restore) and the vsock socket (v0.6); every other key
    is kept as CH wrote it. Key order follows cocoon's writer: top level sorted, and the
    objects it re-encodes as maps (each disk, ``cpus``, ``memory``, a pre-existing
    ``balloon``) sorted too.
    """
    # Shallow: every value patched below is replaced by a new object, never changed in place,
    # so the snapshot's config (shared by every clone of it) stays as it was read.
    config = dict(source)
    source_disks = config.get("disks") or []
    if len(source_disks) != len(disks):
        # check_snapshot_layers has already refused this; cocoon refuses it too (§8.6).
        raise PlanError("the device list of a clone cannot differ from its snapshot's config.json")
    patched_disks = []
    for entry, disk in zip(source_disks, disks, strict=True):
        entry = dict(entry)
        entry["path"] = disk.path
        entry["queue_size"] = tuning.disk_queue_size
        entry["direct"] = is_direct(disk, tuning.no_direct_io, tuning.rules)
        patched_disks.append(_sorted(entry))
    config["disks"] = patched_disks
    uefi = bool((config.get("payload") or {}).get("firmware"))
    config["serial"] = {"mode": "Socket", "socket": f"{run_dir}/console.sock"} if uefi else {"mode": "Off"}
    config["console"] = {"mode": "Off"} if uefi else {"mode": "Pty"}
    if tuning.rules.restore_taps:
        _rename_restore_devices(config, run_dir, vm_id)
    if tuning.rules.clone_patches_resources:
        _patch_resources(config, tuning)
    return dict(sorted(config.items()))


def _rename_restore_devices(config: dict[str, Any], run_dir: str, vm_id: str) -> None:
    # The restored VMM opens the snapshot's TAPs by name before cocoon swaps the NICs: later
    # cocoon points them at throwaway names so the source VM's TAPs are never touched.
    nets = config.get("net")
    if isinstance(nets, list):
        config["net"] = [
            {**net, "tap": f"rm{vm_id[:8]}-{i}"} if isinstance(net, dict) else net
            for i, net in enumerate(nets)
        ]
    if isinstance(config.get("vsock"), dict):
        config["vsock"] = {**config["vsock"], "socket": f"{run_dir}/vsock.uds"}


def _patch_resources(config: dict[str, Any], tuning: Tuning) -> None:
    if isinstance(config.get("cpus"), dict):
        config["cpus"] = _sorted({**config["cpus"], "boot_vcpus": tuning.cpu})
    config["memory"] = _sorted({**(config.get("memory") or {}), "size": tuning.memory})
    balloon = balloon_size(tuning.memory, tuning.windows)
    if balloon is None:
        config.pop("balloon", None)
    elif isinstance(config.get("balloon"), dict):
        config["balloon"] = _sorted({**config["balloon"], "size": balloon})
    else:
        config["balloon"] = {"size": balloon, "deflate_on_oom": True, "free_page_reporting": True}


def encode_config(config: dict[str, Any]) -> bytes:
    """Encode config.json as Go's ``json.Marshal`` does: compact, key order kept, HTML-escaped."""
    text = json.dumps(config, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text.encode()
