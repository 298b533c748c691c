"""cocoon's Cloud Hypervisor artefacts, checked against the worked examples of the reference.

The golden file ``golden/example-c-clone-config.json`` is Example C of
shared/reference/cocoon-formats.md §8.9: the clone's config.json after cocoon's patch.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from chschema import OPENAPI, SCHEMA, config_errors, shared_reference
from cocoonplan.cocoon import DiskRole, StorageConfig
from cocoonplan.observed import NicAddress
from cocoonplan.planner.hypervisor import (
    Boot,
    Tuning,
    build_cmdline,
    disk_argument,
    encode_config,
    launch_command,
    patch_clone_config,
    run_config,
)
from cocoonplan.planner.identity import NicIdentity
from cocoonplan.planner.rules import RULES
from cocoonplan.releases import CocoonLine
from cocoonplan.units import GIB

GOLDEN = Path(__file__).parent / "golden"
L0 = "4fbec69b941195fd56f8212a5000e304129451d82efca94ff0e0fb2d5355472e"
L1 = "77ea7eee3d80b1a38f83906dd3048e2689457eb90e18a7d12f839c5ae37106a2"
L2 = "95cf1a2e1698fe3ca1fcc3f653119146b271d0b62e487ec264441e886a11bd06"
SRC = "/var/lib/cocoon/run/cloudhypervisor/UJZDEGXDNCF32EPF3DHODZDOCI"
CLONE_ID = "V4SEH2KVJ72CEUVW75EFR6EDT4"
CLONE = f"/var/lib/cocoon/run/cloudhypervisor/{CLONE_ID}"
TUNING = Tuning(cpu=2, memory=GIB, host_cpus=16)
STATIC_CMDLINE = (
    "console=hvc0 loglevel=3 boot=cocoon-overlay cocoon.layers=cocoon-layer2,cocoon-layer1,cocoon-layer0 "
    "cocoon.cow=cocoon-cow clocksource=kvm-clock rw net.ifnames=0 cocoon.hostname=agent-src "
    "ip=10.22.0.5::10.22.0.1:255.255.0.0:agent-src:eth0:off:8.8.8.8:1.1.1.1"
)


def _disks(run_dir: str) -> list[StorageConfig]:
    layers = [
        StorageConfig(
            path=f"/var/lib/cocoon/oci/blobs/{h}.erofs",
            ro=True,
            serial=f"cocoon-layer{i}",
            role=DiskRole.LAYER,
        )
        for i, h in enumerate((L0, L1, L2))
    ]
    return [
        *layers,
        StorageConfig(path=f"{run_dir}/cow.raw", ro=False, serial="cocoon-cow", role=DiskRole.COW),
        StorageConfig(
            path=f"{run_dir}/data-db.raw",
            ro=False,
            serial="db",
            role=DiskRole.DATA,
            mount_point="/mnt/db",
            fstype="ext4",
        ),
    ]


def _example_c() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((GOLDEN / "example-c-clone-config.json").read_text())
    return loaded


def _source_of_example_c() -> dict[str, Any]:
    """The snapshot's config.json as CH wrote it for the source VM: source paths, CH's own serial/console."""
    source = copy.deepcopy(_example_c())
    for disk in source["disks"]:
        disk["path"] = disk["path"].replace(CLONE, SRC)
        disk["queue_size"] = 1024  # cocoon rewrites this from disk_queue_size
    source["serial"] = {"file": None, "mode": "Null", "iommu": False, "socket": None}
    source["console"] = {"file": None, "mode": "Tty", "iommu": False, "socket": None}
    source["cpus"]["boot_vcpus"] = 1
    return source


def test_clone_patch_reproduces_example_c_byte_for_byte() -> None:
    patched = patch_clone_config(_source_of_example_c(), _disks(CLONE), TUNING, run_dir=CLONE, vm_id=CLONE_ID)
    expected = _example_c()
    assert patched == expected
    # Key order is part of the contract: compare the Go-style encoding, not just the values.
    assert encode_config(patched) == encode_config(expected)


def test_clone_patch_keeps_unknown_keys_and_does_not_touch_the_source() -> None:
    source = _source_of_example_c()
    source["future_field"] = {"b": 1, "a": 2}
    before = copy.deepcopy(source)
    patched = patch_clone_config(source, _disks(CLONE), TUNING, run_dir=CLONE, vm_id=CLONE_ID)
    assert patched["future_field"] == {"b": 1, "a": 2}
    assert list(patched["future_field"]) == ["b", "a"]
    assert source == before


def test_clone_patch_balloon_rules() -> None:
    source = _source_of_example_c()
    small = patch_clone_config(
        source, _disks(CLONE), Tuning(cpu=2, memory=128 << 20, host_cpus=16), run_dir="s", vm_id=CLONE_ID
    )
    assert "balloon" not in small
    del source["balloon"]
    added = patch_clone_config(
        source, _disks(CLONE), Tuning(cpu=4, memory=2 * GIB, host_cpus=16), run_dir="s", vm_id=CLONE_ID
    )
    assert list(added["balloon"].items()) == [
        ("size", GIB // 2),
        ("deflate_on_oom", True),
        ("free_page_reporting", True),
    ]
    assert added["cpus"]["boot_vcpus"] == 4
    assert added["memory"]["size"] == 2 * GIB


def test_clone_patch_uefi_serial_console() -> None:
    source = _source_of_example_c()
    source["payload"]["firmware"] = "/var/lib/cocoon/firmware/CLOUDHV.fd"
    patched = patch_clone_config(source, _disks(CLONE), TUNING, run_dir=CLONE, vm_id=CLONE_ID)
    assert patched["serial"] == {"mode": "Socket", "socket": f"{CLONE}/console.sock"}
    assert patched["console"] == {"mode": "Off"}


def test_example_c_is_valid_against_the_ch_v51_schema() -> None:
    assert config_errors(_example_c()) == []


NIC = NicIdentity(
    tap="tapUJZDEGXD-0",
    mac="6a:1f:3c:88:0d:42",
    address=NicAddress(ip="10.22.0.5", gateway="10.22.0.1", prefix=16),
)
DNS = ("8.8.8.8", "1.1.1.1")


def test_cmdline_matches_the_worked_example() -> None:
    assert build_cmdline(3, "agent-src", [NIC], DNS) == STATIC_CMDLINE
    dhcp = NIC.model_copy(update={"address": None})
    assert build_cmdline(3, "agent-src", [dhcp], DNS) == STATIC_CMDLINE.rsplit(" ip=", 1)[0]
    no_gateway = NIC.model_copy(update={"address": NicAddress(ip="10.0.0.2", prefix=24)})
    assert build_cmdline(1, "v", [dhcp, no_gateway], ("9.9.9.9",)).endswith(
        "cocoon.hostname=v ip=10.0.0.2:::255.255.255.0:v:eth1:off:9.9.9.9"
    )
    assert build_cmdline(2, "x", [], DNS) == (
        "console=hvc0 loglevel=3 boot=cocoon-overlay cocoon.layers=cocoon-layer1,cocoon-layer0 "
        "cocoon.cow=cocoon-cow clocksource=kvm-clock rw"
    )


def test_disk_arguments_have_cocoons_shapes() -> None:
    layer, _, _, cow, data = _disks(SRC)
    assert disk_argument(layer, TUNING) == (
        f"path=/var/lib/cocoon/oci/blobs/{L0}.erofs,readonly=on,image_type=raw,num_queues=2,queue_size=512,serial=cocoon-layer0"
    )
    assert disk_argument(cow, TUNING) == (
        f"path={SRC}/cow.raw,direct=on,sparse=on,image_type=raw,num_queues=2,queue_size=512,"
        "queue_affinity=[0@[0],1@[1]],serial=cocoon-cow"
    )
    no_direct = Tuning(cpu=1, memory=GIB, host_cpus=16, no_direct_io=True)
    assert (
        disk_argument(data, no_direct)
        == f"path={SRC}/data-db.raw,sparse=on,image_type=raw,num_queues=1,queue_size=512,serial=db"
    )
    forced = data.model_copy(update={"direct_io": True})
    assert "direct=on" in disk_argument(forced, no_direct)


V0_3, V0_6 = CocoonLine.V0_3, CocoonLine.V0_6
OVERLAY = f"{SRC}/overlay.qcow2"
"""A cloud image VM's writable COW disk: a qcow2 overlay over the shared base image."""


@pytest.mark.parametrize(
    ("line", "path", "ro", "override", "no_direct_io", "direct"),
    [
        (V0_3, OVERLAY, False, None, False, True),  # §5.7: every writable disk
        (V0_6, OVERLAY, False, None, False, False),  # effectiveDirectIO: never a qcow2 overlay
        (V0_6, OVERLAY, False, True, False, True),  # …unless the disk's own override says so
        (V0_6, f"{SRC}/cow.raw", False, None, False, True),  # raw COW disks keep O_DIRECT
        (V0_6, f"{SRC}/cow.raw", False, None, True, False),
        (V0_6, "/var/lib/cocoon/cloudimg/base.qcow2", True, None, False, False),
        (V0_3, f"{SRC}/data-db.raw", False, False, False, False),
    ],
)
def test_direct_io_follows_each_lines_rule(
    line: CocoonLine, path: str, ro: bool, override: bool | None, no_direct_io: bool, direct: bool
) -> None:
    disk = StorageConfig(path=path, ro=ro, serial="cocoon-cow", role=DiskRole.COW, direct_io=override)
    tuning = Tuning(cpu=1, memory=GIB, host_cpus=16, no_direct_io=no_direct_io, rules=RULES[line])
    assert ("direct=on" in disk_argument(disk, tuning).split(",")) is direct
    config = run_config(
        api_socket=f"{SRC}/api.sock", disks=[disk], nics=[], boot=Boot("k", "i", "c"), tuning=tuning
    )
    assert config["disks"][0]["direct"] is direct


def test_a_v0_6_clone_of_a_qcow2_overlay_is_patched_without_direct_io() -> None:
    source = _source_of_example_c()
    source["disks"][3]["path"] = source["disks"][3]["path"].replace("cow.raw", "overlay.qcow2")
    disks = _disks(CLONE)
    disks[3] = disks[3].model_copy(update={"path": f"{CLONE}/overlay.qcow2"})
    for line, direct in ((V0_3, True), (V0_6, False)):
        tuning = Tuning(cpu=2, memory=GIB, host_cpus=16, rules=RULES[line])
        patched = patch_clone_config(source, disks, tuning, run_dir=CLONE, vm_id=CLONE_ID)
        assert patched["disks"][3]["direct"] is direct, line
        assert patched["disks"][4]["direct"] is True  # the raw data disk is unchanged


def test_launch_line_matches_the_worked_cmdline_file() -> None:
    boot = f"/var/lib/cocoon/oci/boot/{L1}"
    line = launch_command(
        api_socket=f"{SRC}/api.sock",
        disks=_disks(SRC),
        nics=[NIC],
        boot=Boot(kernel=f"{boot}/vmlinuz", initrd=f"{boot}/initrd.img", cmdline=STATIC_CMDLINE),
        tuning=TUNING,
    )
    ro = "readonly=on,image_type=raw,num_queues=2,queue_size=512"
    rw = "direct=on,sparse=on,image_type=raw,num_queues=2,queue_size=512,queue_affinity=[0@[0],1@[1]]"
    expected = (
        f"cloud-hypervisor --api-socket {SRC}/api.sock --cpus boot=2,max=16 --memory size=1073741824 --disk "
        f"path=/var/lib/cocoon/oci/blobs/{L0}.erofs,{ro},serial=cocoon-layer0 "
        f"path=/var/lib/cocoon/oci/blobs/{L1}.erofs,{ro},serial=cocoon-layer1 "
        f"path=/var/lib/cocoon/oci/blobs/{L2}.erofs,{ro},serial=cocoon-layer2 "
        f"path={SRC}/cow.raw,{rw},serial=cocoon-cow path={SRC}/data-db.raw,{rw},serial=db "
        f"--kernel {boot}/vmlinuz --initramfs {boot}/initrd.img --cmdline {STATIC_CMDLINE} "
        "--net tap=tapUJZDEGXD-0,mac=6a:1f:3c:88:0d:42,num_queues=4,queue_size=512,offload_tso=on,offload_ufo=on,offload_csum=on "
        "--rng src=/dev/urandom --watchdog --balloon size=268435456,deflate_on_oom=on,free_page_reporting=on "
        "--serial off --console pty"
    )
    # The worked file is the argument list space-joined; the list keeps --cmdline's spaces in one value.
    assert " ".join(line) == expected
    assert line[line.index("--cmdline") + 1] == STATIC_CMDLINE


def test_run_config_mirrors_the_launch_line_and_is_schema_valid() -> None:
    boot = f"/var/lib/cocoon/oci/boot/{L1}"
    config = run_config(
        api_socket=f"{SRC}/api.sock",
        disks=_disks(SRC),
        nics=[NIC],
        boot=Boot(kernel=f"{boot}/vmlinuz", initrd=f"{boot}/initrd.img", cmdline=STATIC_CMDLINE),
        tuning=TUNING,
    )
    assert config_errors(config) == []
    assert [d["id"] for d in config["disks"]] == ["_disk0", "_disk1", "_disk2", "_disk3", "_disk4"]
    assert config["net"][0]["id"] == "_net5"
    clone_shaped = {k: v for k, v in _example_c().items() if k not in ("disks", "net", "payload")}
    assert {k: v for k, v in config.items() if k not in ("disks", "net", "payload")} == clone_shaped
    assert list(config) == sorted(config)


def test_go_encoding_escapes_html_characters() -> None:
    assert encode_config({"b": "<&>", "a": 1}) == b'{"b":"\\u003c\\u0026\\u003e","a":1}'


SCHEMA_SHA256 = "3c95a736972390c0206618011ffecd7d18aa05fc45a6426a76d3ae0b44968e20"
"""The digest of shared/reference's Cloud Hypervisor v51.0 OpenAPI schema, taken when it was
vendored: what every clone can check, with or without shared/ beside it."""


def test_vendored_ch_schema_is_the_shared_reference() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    # Where shared/ lies beside the clone, the reference itself must still be the one pinned.
    shared = shared_reference() / OPENAPI
    if shared.is_file():
        assert hashlib.sha256(shared.read_bytes()).hexdigest() == SCHEMA_SHA256
