"""Boot proof: the disks and kernel command line a plan lists give a real Linux guest the
right root filesystem, and the founding bug (cocoon issue #46) visibly loses files.

Plan-level tests show the plan lists the right digests; only a boot shows that those disks,
attached under those serials and stacked in the order ``cocoon.layers=`` names, make the
root filesystem the snapshot was taken on. So each test here plans the shipped examples with
the real CLI, turns the disks the plan lists into images (the EROFS of exactly the planned
layer digests, an empty ext4 cow, a blank data disk), attaches them in plan order as
virtio-blk devices carrying the planned serials, and boots Debian's kernel under QEMU TCG
with the plan's ``cocoon.layers=`` and ``cocoon.cow=``. The guest (``cocoonplan.proof``, run
through ``api.verify_boot`` as ``cocoonplan verify --boot`` runs it) does what cocoon's
``cocoon-overlay`` does and, asked for an inventory, hashes every file of the merged root.

Proven:

* the planned disk set of ``agent-clone`` boots to exactly the merged tree of the 11 layers
  of ``ubuntu:24.04-xface`` (the snapshot's base), computed independently from the layer tars;
* the disk set the node really runs ``agent-clone`` on (the 6 layers of
  ``ubuntu:24.04-xface-20260513``, as ``--as-on-node`` reads them from the node's vms.json)
  boots too, silently, without every file of layers 6..10
  (``opt/agent/VERSION`` among them) and with other builds of layers 2..5: the bug in a real
  kernel, and exactly the layers the plan's ``drift`` names;
* where paths repeat, the layer ``cocoon.layers=`` names first wins (a small control boot,
  because the example images never repeat a path).

Needs qemu-system-x86, busybox-static, e2fsprogs, erofs-utils and a kernel unpacked by
scripts/fetch-kernel (``COCOONPLAN_KERNEL_ROOT``); scripts/test provides all of them. Without
them the tests skip on a developer machine and fail under CI.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from bootproof import merged_tree, require_kernel_root
from clirunner import copy_examples, example_builder, run_cli
from cocoonplan import api
from cocoonplan.cocoon import DiskRole
from cocoonplan.executors.blobs import PlainProgress
from cocoonplan.oci.sources import open_sources
from cocoonplan.proof.boot import prove
from cocoonplan.proof.host import KvmMode, choose_machine
from cocoonplan.proof.target import BootTarget, DiskSet, TargetDisk, root_arguments
from cocoonplan.proof.verdict import Verdict, Verification
from ocifixture import Artifact, Blob, build_cmdline, files_of

BUILD = example_builder()
LAYER_ROOT = "/.cocoon/layers/"  # where the guest mounts each layer, named by its serial

JSON = dict[str, Any]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def kernel_root() -> Path:
    return require_kernel_root()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_examples(tmp_path_factory.mktemp("boot-examples") / "examples")


@pytest.fixture(scope="module")
def clone(project: Path) -> JSON:
    """VM ``agent-clone`` of ``plan . --json`` over the shipped examples."""
    result = run_cli(["plan", ".", "--json"], project)
    assert result.exit_code == 0, result.stderr
    document: JSON = json.loads(result.stdout)
    return next(vm for vm in document["vms"] if vm["name"] == "agent-clone")


@pytest.fixture(scope="module")
def images() -> dict[str, Artifact]:
    """The example images by reference (examples/build.py builds examples/oci from these)."""
    artifacts, _ = BUILD.scenario()
    return {ref: art for ref, art in artifacts.items() if art.snapshot is None}


@pytest.fixture(scope="module")
def planned_boot(kernel_root: Path, project: Path) -> Verification:
    """``agent-clone`` booted on the disks and cmdline the plan lists."""
    return verify(project, kernel_root, as_on_node=False)


@pytest.fixture(scope="module")
def node_boot(kernel_root: Path, project: Path) -> Verification:
    """``agent-clone`` booted on the disks and cmdline the node's record holds."""
    return verify(project, kernel_root, as_on_node=True)


# --------------------------------------------------------------------------- helpers


def verify(project: Path, kernel_root: Path, *, as_on_node: bool) -> Verification:
    """``verify --boot agent-clone.yaml`` with an inventory of the root; the guest must have
    seen and stacked the disks exactly as listed before anyone looks at its files."""
    (result,) = api.verify_boot(
        [project / "agent-clone.yaml"],
        api.Environment(env=dict(os.environ), cwd=project),
        progress=PlainProgress(io.StringIO()),
        kernel_root=kernel_root,
        as_on_node=as_on_node,
        inventory=True,
    )
    assert_stacked_as_listed(result)
    return result


def assert_stacked_as_listed(result: Verification) -> None:
    report, target = result.report, result.target
    assert result.failure is None, f"{result.failure}\n{report.tail(80)}"
    # Every listed disk arrived under its serial with its access mode, and nothing else did.
    assert {serial: ro for serial, (_, ro) in report.disks.items()} == {
        d.serial: d.readonly for d in target.disks
    }
    # cocoon.layers lists the layer disks top first (cocoon-formats.md §5.5), and the kernel's
    # overlay took them in that order.
    layers = (
        next(a for a in target.kernel_args if a.startswith("cocoon.layers=")).partition("=")[2].split(",")
    )
    assert layers == [d.serial for d in reversed(target.disks) if d.role is DiskRole.LAYER]
    overlay = dict(option.partition("=")[::2] for option in report.overlay.split(","))
    assert overlay["lowerdir"].split(":") == [LAYER_ROOT + serial for serial in layers]


def paths_of(layers: list[Blob]) -> set[str]:
    return {name for blob in layers for name in files_of(blob)}


# --------------------------------------------------------------------------- tests


def test_planned_clone_boots_the_snapshots_eleven_layer_root(
    planned_boot: Verification, clone: JSON, images: dict[str, Artifact]
) -> None:
    """The plan's disks for ``agent-clone`` boot to the root its snapshot was taken on.

    The expectation is computed from the layer tars alone (bottom to top, later copies win),
    not from anything cocoonplan produced: every file of all 11 layers, nothing else, and the
    guest's sha256 of each equals the tar's.
    """
    xface = images[BUILD.XFACE]
    layers = [blob.digest for blob in xface.layers]
    assert list(planned_boot.target.layers) == layers
    assert [d["digest"] for d in clone["disks"] if d["role"] == "layer"] == layers
    files = planned_boot.report.files
    assert files == merged_tree(xface.layers)
    version = files_of(xface.layers[10])["opt/agent/VERSION"]
    assert files["opt/agent/VERSION"] == hashlib.sha256(version).hexdigest()


def test_node_layers_boot_without_the_upper_five_layers(
    node_boot: Verification, planned_boot: Verification, project: Path, images: dict[str, Artifact]
) -> None:
    """The founding bug in a real kernel: the clone's node disks boot without complaint to a
    root that lacks every file of layers 6..10 of the snapshot's image.

    The node runs ``agent-clone`` on the 6 layers of ``ubuntu:24.04-xface-20260513`` with the
    6-layer cmdline cocoon recorded. The guest mounts them without an error, and the root is
    exactly that image's tree: the agent (``opt/agent/VERSION``, its config, plugins and
    service) is gone, and layers 2..5 hold another build's files under the same paths.
    """
    vms = json.loads((project / "node" / "cloudhypervisor" / "db" / "vms.json").read_text())
    record = vms["vms"][vms["names"]["agent-clone"]]
    assert [(d.serial, d.readonly) for d in node_boot.target.disks] == [
        (sc["serial"], sc["ro"]) for sc in record["storage_configs"]
    ], "--as-on-node boots the disks of the node's record"
    assert set(node_boot.target.kernel_args) <= set(record["boot_config"]["cmdline"].split())

    xface, xface_0513 = images[BUILD.XFACE], images[BUILD.XFACE_0513]
    assert list(node_boot.target.layers) == [blob.digest for blob in xface_0513.layers]
    planned, node = planned_boot.report.files, node_boot.report.files
    assert node == merged_tree(xface_0513.layers)

    lost = planned.keys() - node.keys()
    assert lost == paths_of(list(xface.layers[6:]))
    assert "opt/agent/VERSION" in lost
    assert node.keys() - planned.keys() == set()
    # Same paths, other bytes: a substituted layer is worse than a missing one, as nothing
    # on the file system shows it.
    swapped = paths_of(list(xface.layers[2:6]))
    assert swapped and all(node[p] != planned[p] for p in swapped)
    shared = paths_of(list(xface.layers[:2]))
    assert all(node[p] == planned[p] for p in shared)


def test_plan_names_exactly_the_layers_the_node_boot_lost(
    clone: JSON, planned_boot: Verification, node_boot: Verification, images: dict[str, Artifact]
) -> None:
    """What the plan reports is what the kernel shows: the layers its ``drift`` calls missing
    are exactly the ones whose files the node's root lacks, the substituted ones exactly
    those whose files have other bytes, and the plan replaces the VM."""
    blobs = {blob.digest: blob for art in images.values() for blob in art.layers}
    assert clone["action"] == "replace"
    assert "disks" in clone["replace_paths"]
    layer_drift = [d for d in clone["drift"] if d["kind"] == "layer"]
    missing = [blobs[d["expected"]] for d in layer_drift if d["found"] is None]
    substituted = [(blobs[d["expected"]], blobs[d["found"]]) for d in layer_drift if d["found"] is not None]
    assert len(missing) == 5 and len(substituted) == 4

    planned, node = planned_boot.report.files, node_boot.report.files
    assert planned.keys() - node.keys() == paths_of(missing)
    differing = {p for p in node.keys() & planned.keys() if node[p] != planned[p]}
    assert differing == paths_of([expected for expected, _ in substituted])
    for _, found in substituted:
        for path, data in files_of(found).items():
            assert node[path] == hashlib.sha256(data).hexdigest()


def test_the_node_boot_names_every_expected_file_of_the_lost_layers(
    planned_boot: Verification, node_boot: Verification, images: dict[str, Artifact]
) -> None:
    """The shipped spec's expectations (the founding scenario's watchdog among them) hold on
    the planned disks, and on the node's disks every expected file that only layers 6..10
    hold is reported missing by name: exactly those, so the node's boot fails iff there is one."""
    assert planned_boot.ok, [c.describe() for c in planned_boot.findings]
    lost = paths_of(list(images[BUILD.XFACE].layers[6:]))
    only_lost = {f.path for f in node_boot.target.files if f.path.lstrip("/") in lost}
    assert {c.path for c in node_boot.findings if c.verdict is Verdict.MISSING} == only_lost
    assert node_boot.ok is not bool(only_lost)


def test_layer_named_first_in_cocoon_layers_wins(
    kernel_root: Path, project: Path, images: dict[str, Artifact]
) -> None:
    """Precedence control: where two layers hold the same path, the guest shows the copy of
    the layer that ``cocoon.layers=`` names first (the top one).

    The example images never repeat a path within one image, so the boots above cannot show
    precedence. Here layer 2 of each build (both hold ``usr/bin/xface-session`` and
    ``usr/share/xface/2.txt``, with different bytes) is stacked on the shared base layer, with
    the cmdline cocoon builds for 3 layers (ocifixture.build_cmdline, cocoon-formats.md §5.5),
    each layer booted from the example node's own EROFS file.
    """
    xface, xface_0513 = images[BUILD.XFACE], images[BUILD.XFACE_0513]
    stack = [xface.layers[0], xface_0513.layers[2], xface.layers[2]]  # bottom first
    disks = [
        TargetDisk(serial=f"cocoon-layer{j}", role=DiskRole.LAYER, readonly=True, layer=blob.digest)
        for j, blob in enumerate(stack)
    ]
    disks.append(TargetDisk(serial="cocoon-cow", role=DiskRole.COW, readonly=False))
    target = BootTarget(
        node="node-a",
        vm="precedence",
        disk_set=DiskSet.PLANNED,
        disks=tuple(disks),
        kernel_args=root_arguments(build_cmdline(len(stack), "precedence", ()), "precedence"),
    )
    context = api.find_project([project], project)
    with httpx.Client() as client, open_sources(context, client, {}) as sources:
        (result,) = prove(
            [target],
            kernel_root=kernel_root,
            machine=choose_machine(KvmMode.AUTO),
            timeout=api.BOOT_TIMEOUT_SECONDS,
            local_roots={"node-a": project / "node"},
            blobs={},
            sources=sources,
            progress=PlainProgress(io.StringIO()),
            inventory=True,
        )
    assert_stacked_as_listed(result)

    repeated = files_of(stack[1]).keys() & files_of(stack[2]).keys()
    assert repeated == {"usr/bin/xface-session", "usr/share/xface/2.txt"}
    assert result.report.files == merged_tree(stack)
    for path in repeated:
        top, below = files_of(stack[2])[path], files_of(stack[1])[path]
        assert top != below
        assert result.report.files[path] == hashlib.sha256(top).hexdigest()
