"""Boot proof: the disks and kernel command line a plan lists give a real Linux guest the
right root filesystem, and the founding bug (cocoon issue #46) visibly loses files.

Plan-level tests show the plan lists the right digests; only a boot shows that those disks,
attached under those serials and stacked in the order ``cocoon.layers=`` names, make the
root filesystem the snapshot was taken on. So each test here plans the shipped examples with
the real CLI, turns the disks the plan lists into images (the EROFS of exactly the planned
layer digests, an empty ext4 cow, a blank data disk), attaches them in plan order as
virtio-blk devices carrying the planned serials, and boots Debian's kernel under QEMU TCG
with the plan's ``cocoon.layers=`` and ``cocoon.cow=``. The guest (tests/bootproof.py) does
what cocoon's ``cocoon-overlay`` does and hashes every file of the merged root.

Proven:

* the planned disk set of ``agent-clone`` boots to exactly the merged tree of the 11 layers
  of ``ubuntu:24.04-xface`` (the snapshot's base), computed independently from the layer tars;
* the disk set the node really runs ``agent-clone`` on (the 6 layers of
  ``ubuntu:24.04-xface-20260513``, read from the plan's own ``changes[].before``, which must
  agree with the node's vms.json) boots too, silently, without every file of layers 6..10
  (``opt/agent/VERSION`` among them) and with other builds of layers 2..5: the bug in a real
  kernel, and exactly the layers the plan's ``drift`` names;
* where paths repeat, the layer ``cocoon.layers=`` names first wins (a small control boot,
  because the example images never repeat a path).

Needs qemu-system-x86, busybox-static, cpio, e2fsprogs and a kernel unpacked by
scripts/fetch-kernel (``COCOONPLAN_KERNEL_ROOT``); scripts/test provides all of them. Without
them the tests skip on a developer machine and fail under CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

import bootproof
from bootproof import BootResult, Guest
from clirunner import copy_examples, example_builder, run_cli
from ocifixture import Artifact, Blob, build_cmdline, files_of

BUILD = example_builder()
LAYER_ROOT = "/.cocoon/layers/"  # where the guest mounts each layer, named by its serial

JSON = dict[str, Any]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """The kernel and proof initramfs, built once (extracting vmlinux takes about a second)."""
    missing = bootproof.missing_prerequisites()
    if missing:
        message = "boot proof needs " + "; ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must run it (scripts/test provides all of this)")
        pytest.skip(message)
    kernel_root = Path(os.environ[bootproof.KERNEL_ROOT_ENV])
    return bootproof.prepare_guest(kernel_root, tmp_path_factory.mktemp("guest"))


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
def blobs(images: dict[str, Artifact]) -> dict[str, Blob]:
    """Every layer blob of the example images, by digest: the source of each EROFS disk."""
    return {blob.digest: blob for art in images.values() for blob in art.layers}


@pytest.fixture(scope="module")
def planned_boot(
    guest: Guest, clone: JSON, blobs: dict[str, Blob], tmp_path_factory: pytest.TempPathFactory
) -> BootResult:
    """The guest booted on the disks and cmdline the plan lists for ``agent-clone``."""
    return boot_as_listed(guest, clone["disks"], clone["cmdline"], blobs, tmp_path_factory.mktemp("planned"))


@pytest.fixture(scope="module")
def node_side(clone: JSON, project: Path) -> tuple[list[JSON], str]:
    """The disks and cmdline the node runs ``agent-clone`` with, as the plan reports them.

    The plan's ``changes[]`` carry the node's value of each differing disk (``before``; None
    when the node has no such disk) and cmdline; disks without a change are as planned. This
    is checked against the node's own vms.json, so the boot below is of what really runs.
    """
    disks = {disk["index"]: disk for disk in clone["disks"]}
    cmdline = clone["cmdline"]
    for change in clone["changes"]:
        if match := re.fullmatch(r"disks\[(\d+)\]", change["path"]):
            index = int(match[1])
            if change["before"] is None:
                del disks[index]
            else:
                disks[index] = change["before"] | {"index": index}
        elif change["path"] == "cmdline":
            cmdline = change["before"]
    running = [disks[i] for i in sorted(disks)]

    vms = json.loads((project / "node" / "cloudhypervisor" / "db" / "vms.json").read_text())
    record = vms["vms"][vms["names"][clone["name"]]]
    assert [(d["serial"], d["path"], d["readonly"]) for d in running] == [
        (sc["serial"], sc["path"], sc["ro"]) for sc in record["storage_configs"]
    ], "the plan's changes[].before must describe the node's disks"
    assert cmdline == record["boot_config"]["cmdline"], "the plan's cmdline before must be the node's"
    return running, cmdline


@pytest.fixture(scope="module")
def node_boot(
    guest: Guest,
    node_side: tuple[list[JSON], str],
    blobs: dict[str, Blob],
    tmp_path_factory: pytest.TempPathFactory,
) -> BootResult:
    """The guest booted on the disks and cmdline ``agent-clone`` really runs with on the node."""
    disks, cmdline = node_side
    return boot_as_listed(guest, disks, cmdline, blobs, tmp_path_factory.mktemp("node"))


# --------------------------------------------------------------------------- helpers


def boot_as_listed(
    guest: Guest, disks: list[JSON], cmdline: str, blobs: dict[str, Blob], work: Path
) -> BootResult:
    """Boot ``disks`` (plan-document shape) with ``cmdline``'s cocoon tokens; check the guest
    saw and stacked them exactly as listed before anyone looks at its files."""
    args = bootproof.cocoon_args(cmdline)
    result = bootproof.boot(guest, bootproof.disk_images(disks, blobs, work), args)
    result.check()
    # Every listed disk arrived under its serial with its access mode, and nothing else did.
    assert {serial: ro for serial, (_, ro) in result.disks.items()} == {
        d["serial"]: d["readonly"] for d in disks
    }
    # cocoon.layers lists the layer disks top first (cocoon-formats.md §5.5), and the kernel's
    # overlay took them in that order.
    layers = next(a for a in args if a.startswith("cocoon.layers=")).removeprefix("cocoon.layers=").split(",")
    assert layers == [d["serial"] for d in reversed(disks) if d["role"] == "layer"]
    assert result.lowerdirs() == [LAYER_ROOT + serial for serial in layers]
    return result


def layer_digests(disks: list[JSON]) -> list[str]:
    return [d["digest"] for d in disks if d["role"] == "layer"]


def paths_of(layers: list[Blob]) -> set[str]:
    return {name for blob in layers for name in files_of(blob)}


# --------------------------------------------------------------------------- tests


def test_planned_clone_boots_the_snapshots_eleven_layer_root(
    planned_boot: BootResult, clone: JSON, images: dict[str, Artifact]
) -> None:
    """The plan's disks for ``agent-clone`` boot to the root its snapshot was taken on.

    The expectation is computed from the layer tars alone (bottom to top, later copies win),
    not from anything cocoonplan produced: every file of all 11 layers, nothing else, and the
    guest's sha256 of each equals the tar's.
    """
    xface = images[BUILD.XFACE]
    assert layer_digests(clone["disks"]) == [blob.digest for blob in xface.layers]
    assert planned_boot.files == bootproof.merged_tree(xface.layers)
    version = files_of(xface.layers[10])["opt/agent/VERSION"]
    assert planned_boot.files["opt/agent/VERSION"] == hashlib.sha256(version).hexdigest()


def test_node_layers_boot_without_the_upper_five_layers(
    node_boot: BootResult,
    planned_boot: BootResult,
    node_side: tuple[list[JSON], str],
    images: dict[str, Artifact],
) -> None:
    """The founding bug in a real kernel: the clone's node disks boot without complaint to a
    root that lacks every file of layers 6..10 of the snapshot's image.

    The node runs ``agent-clone`` on the 6 layers of ``ubuntu:24.04-xface-20260513`` with the
    6-layer cmdline cocoon recorded. The guest mounts them without an error, and the root is
    exactly that image's tree: the agent (``opt/agent/VERSION``, its config, plugins and
    service) is gone, and layers 2..5 hold another build's files under the same paths.
    """
    disks, _ = node_side
    xface, xface_0513 = images[BUILD.XFACE], images[BUILD.XFACE_0513]
    assert layer_digests(disks) == [blob.digest for blob in xface_0513.layers]
    assert node_boot.files == bootproof.merged_tree(xface_0513.layers)

    lost = planned_boot.files.keys() - node_boot.files.keys()
    assert lost == paths_of(list(xface.layers[6:]))
    assert "opt/agent/VERSION" in lost
    assert node_boot.files.keys() - planned_boot.files.keys() == set()
    # Same paths, other bytes: a substituted layer is worse than a missing one, as nothing
    # on the file system shows it.
    swapped = paths_of(list(xface.layers[2:6]))
    assert swapped and all(node_boot.files[p] != planned_boot.files[p] for p in swapped)
    shared = paths_of(list(xface.layers[:2]))
    assert all(node_boot.files[p] == planned_boot.files[p] for p in shared)


def test_plan_names_exactly_the_layers_the_node_boot_lost(
    clone: JSON, planned_boot: BootResult, node_boot: BootResult, blobs: dict[str, Blob]
) -> None:
    """What the plan reports is what the kernel shows: the layers its ``drift`` calls missing
    are exactly the ones whose files the node's root lacks, the substituted ones exactly
    those whose files have other bytes, and the plan replaces the VM."""
    assert clone["action"] == "replace"
    assert "disks" in clone["replace_paths"]
    missing = [blobs[d["expected"]] for d in clone["drift"] if d["found"] is None]
    substituted = [
        (blobs[d["expected"]], blobs[d["found"]]) for d in clone["drift"] if d["found"] is not None
    ]
    assert len(missing) == 5 and len(substituted) == 4

    assert planned_boot.files.keys() - node_boot.files.keys() == paths_of(missing)
    differing = {
        p
        for p in node_boot.files.keys() & planned_boot.files.keys()
        if node_boot.files[p] != planned_boot.files[p]
    }
    assert differing == paths_of([expected for expected, _ in substituted])
    for _, found in substituted:
        for path, data in files_of(found).items():
            assert node_boot.files[path] == hashlib.sha256(data).hexdigest()


def test_layer_named_first_in_cocoon_layers_wins(
    guest: Guest, images: dict[str, Artifact], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Precedence control: where two layers hold the same path, the guest shows the copy of
    the layer that ``cocoon.layers=`` names first (the top one).

    The example images never repeat a path within one image, so the boots above cannot show
    precedence. Here layer 2 of each build (both hold ``usr/bin/xface-session`` and
    ``usr/share/xface/2.txt``, with different bytes) is stacked on the shared base layer, with
    the cmdline cocoon builds for 3 layers (ocifixture.build_cmdline, cocoon-formats.md §5.5).
    """
    xface, xface_0513 = images[BUILD.XFACE], images[BUILD.XFACE_0513]
    stack = [xface.layers[0], xface_0513.layers[2], xface.layers[2]]  # bottom first
    disks: list[JSON] = [
        {"serial": f"cocoon-layer{j}", "role": "layer", "readonly": True, "digest": blob.digest}
        for j, blob in enumerate(stack)
    ]
    disks.append({"serial": "cocoon-cow", "role": "cow", "readonly": False})
    blobs = {blob.digest: blob for blob in stack}
    result = boot_as_listed(
        guest, disks, build_cmdline(len(stack), "precedence", ()), blobs, tmp_path_factory.mktemp("order")
    )

    repeated = files_of(stack[1]).keys() & files_of(stack[2]).keys()
    assert repeated == {"usr/bin/xface-session", "usr/share/xface/2.txt"}
    assert result.files == bootproof.merged_tree(stack)
    for path in repeated:
        top, below = files_of(stack[2])[path], files_of(stack[1])[path]
        assert top != below
        assert result.files[path] == hashlib.sha256(top).hexdigest()
