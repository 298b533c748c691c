"""Rebuild the shipped example data: ``examples/oci`` (an OCI image layout) and ``examples/node``
(a cocoon node root for ``root_dir=/var/lib/cocoon``).

The data freezes the project's founding bug (cocoon issue #46): VM ``agent-clone`` is a clone of
the hot snapshot ``ghcr.io/cocoonstack/agent-snap:v1``, baked from the 11-layer image
``ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface``, but it runs on the 6 layers of
``ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513`` (the first 2 are shared, the upper
9 are missing, and with them the agent's watchdog script, which ``agent-clone.yaml`` expects).
VM ``agent-run`` is a healthy ``vm run`` of the 6-layer image. cocoonplan's
ownership file marks both as created by it (from ``agent-clone.yaml`` and ``agent-run.yaml``);
VM ``legacy-tool``, another ``vm run`` of the 6-layer image, was made by hand: cocoonplan
must leave it alone.

``examples/node-b`` is the same scenario on a node whose cocoon keeps its metadata in SQLite
(``meta/meta.db``, as a root set up by the v0.6 line has it), planned from
``agent-clone-b.yaml`` and ``agent-run-b.yaml``.

    .venv/bin/python examples/build.py           # rewrite examples/oci and examples/node
    .venv/bin/python examples/build.py --check   # exit 1 if the committed files differ

Every byte is deterministic (erofs bytes depend on the erofs-utils version: 1.5 here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the fixture library, imported as pytest imports it

from metafixture import write_sqlite_meta  # noqa: E402
from ocifixture import (  # noqa: E402
    AS_WRITTEN,
    GIB,
    Artifact,
    Blob,
    Clone,
    DataDisk,
    Nic,
    NodeVM,
    OwnerRecord,
    Run,
    SourceVM,
    derive_id,
    image,
    layer,
    node_root,
    snapshot,
    write_layout,
)

XFACE = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface"
XFACE_0513 = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513"
AGENT_SNAP = "ghcr.io/cocoonstack/agent-snap:v1"
OUTPUTS = ("oci", "node", "node-b")
SQLITE_NAMESPACES = {
    "vms_cloudhypervisor": "cloudhypervisor/db/vms.json",
    "snapshots": "snapshot/db/snapshots.json",
    "images_oci": "oci/db/images.json",
}
"""The metadata a fresh SQLite root keeps in meta/meta.db instead of these JSON files."""
NETWORK = "cocoon"
"""The CNI conflist the node's VMs are on: cocoon v0.3.8 records its name (``confList.Name``)
even for a VM given no ``--network``, and cocoonplan.yaml declares it as each node's default."""
AGENT_CLONE_ID = "V4SEH2KVJ72CEUVW75EFR6EDT4"
AGENT_RUN_ID = derive_id("examples", "agent-run")
LEGACY_TOOL_ID = derive_id("examples", "legacy-tool")

OS_RELEASE = b"""PRETTY_NAME="Ubuntu 24.04 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
"""
# What each upper layer adds besides usr/share/xface/<n>.txt (index = layer number).
UPPER_FILES = {
    2: "usr/bin/xface-session",
    3: "etc/xdg/xface/xface.conf",
    4: "usr/share/xface/themes/default.theme",
    5: "opt/agent/bin/agent",
    6: "opt/agent/config.yaml",
    7: "opt/agent/plugins/browser.json",
    8: "opt/agent/plugins/shell.json",
    9: "etc/systemd/system/agent.service",
    10: "opt/agent/VERSION",
}
WATCHDOG = "usr/local/bin/simular-agent-watchdog.sh"
"""The agent's watchdog, which the founding bug's clone lost: only layer 9 of the 11-layer
image provides it (``expect.files`` of agent-clone.yaml)."""
WATCHDOG_LAYER = 9
WATCHDOG_SCRIPT = b"""#!/bin/sh
# Restart the agent when it stops answering.
exec systemctl restart agent.service
"""


def base_layers() -> list[Blob]:
    """Layers 0 (tiny rootfs) and 1 (kernel + initrd), shared by both images."""
    rootfs = layer(
        {
            "etc/os-release": OS_RELEASE,
            "etc/hostname": b"cocoon\n",
            "etc/passwd": b"root:x:0:0:root:/root:/bin/bash\n",
        }
    )
    boot = layer(
        {
            "boot/vmlinuz-6.1.0-cocoon": b"FAKE bzImage 6.1.0-cocoon\n" + bytes(range(256)) * 4,
            "boot/initrd.img-6.1.0-cocoon": b"FAKE initramfs 6.1.0-cocoon cocoon-overlay\n"
            + bytes(range(256)) * 2,
            "lib/modules/6.1.0-cocoon/modules.dep": b"kernel/fs/erofs/erofs.ko:\nkernel/fs/overlayfs/overlay.ko:\n",
        }
    )
    return [rootfs, boot]


def upper_layer(n: int, total: int, build: str) -> Blob:
    """Upper layer ``n`` of an image with ``total`` layers, tagged with its ``build``."""
    files = {
        f"usr/share/xface/{n}.txt": f"xface {build} layer {n} of {total}\n".encode(),
        UPPER_FILES[n]: f"# {UPPER_FILES[n]} from xface {build} layer {n}\n".encode(),
    }
    if n == WATCHDOG_LAYER:
        files[WATCHDOG] = WATCHDOG_SCRIPT
    return layer(files, modes={WATCHDOG: 0o755})


def scenario() -> tuple[dict[str, Artifact], list[NodeVM]]:
    """The artifacts of examples/oci (by full reference) and the VMs of examples/node."""
    shared = base_layers()
    xface = image([*shared, *(upper_layer(n, 11, "24.04") for n in range(2, 11))])
    xface_0513 = image(
        [*shared, *(upper_layer(n, 6, "24.04-20260513") for n in range(2, 6))], created="2026-05-13T09:00:00Z"
    )
    source = SourceVM(
        id="UJZDEGXDNCF32EPF3DHODZDOCI",
        name="agent-src",
        cpu=2,
        memory=GIB,
        storage=10 * GIB,
        nics=[
            Nic(ip="10.22.0.5", prefix=16, gateway="10.22.0.1", tap="tapUJZDEGXD-0", mac="6a:1f:3c:88:0d:42")
        ],
        data_disks=[DataDisk(name="db", size=20 * GIB, fstype="ext4", mount="/mnt/db")],
        host_cpus=16,
    )
    snap = snapshot(xface, base_ref=XFACE, vm=source, snapshot_id="S2JHTLGMXGEDN73U55XTPLPFT7")
    vms = [
        NodeVM(
            id=AGENT_CLONE_ID,
            name="agent-clone",
            source=Clone(snap),
            layers=[b.digest for b in xface_0513.layers],
            nics=[Nic(ip="10.22.0.9", prefix=16, gateway="10.22.0.1")],
            network=NETWORK,
        ),
        NodeVM(
            id=AGENT_RUN_ID,
            name="agent-run",
            source=Run(XFACE_0513),
            nics=[Nic(ip="10.22.0.10", prefix=16, gateway="10.22.0.1")],
            network=NETWORK,
        ),
        NodeVM(
            id=LEGACY_TOOL_ID,
            name="legacy-tool",
            source=Run(XFACE_0513),
            nics=[Nic(ip="10.22.0.11", prefix=16, gateway="10.22.0.1")],
            network=NETWORK,
        ),
    ]
    return {XFACE: xface, XFACE_0513: xface_0513, AGENT_SNAP: snap}, vms


def owned(artifacts: dict[str, Artifact], suffix: str = "") -> dict[str, OwnerRecord]:
    """cocoonplan's ownership entries: the two VMs it applied (from ``agent-*<suffix>.yaml``),
    as it recorded them then."""
    return {
        AGENT_CLONE_ID: OwnerRecord(
            name="agent-clone",
            spec_file=f"agent-clone{suffix}.yaml",
            source=artifacts[AGENT_SNAP].digest,
            config_sha256=AS_WRITTEN,
            launch=AS_WRITTEN,
            cmdline=AS_WRITTEN,
        ),
        AGENT_RUN_ID: OwnerRecord(
            name="agent-run",
            spec_file=f"agent-run{suffix}.yaml",
            source=artifacts[XFACE_0513].digest,
            launch=AS_WRITTEN,
            cmdline=AS_WRITTEN,
        ),
    }


def build(out: Path) -> None:
    """Write ``out/oci`` and ``out/node`` from scratch."""
    artifacts, vms = scenario()
    write_layout(out / "oci", artifacts)
    images = {ref: art for ref, art in artifacts.items() if art.snapshot is None}
    node_root(out / "node", images=images, vms=vms, owned=owned(artifacts))
    node_root(out / "node-b", images=images, vms=vms, owned=owned(artifacts, "-b"))
    to_sqlite(out / "node-b")


def to_sqlite(root: Path) -> None:
    """Move a node root's metadata from the JSON files into ``meta/meta.db``, as a root that a
    v0.6 cocoon set up holds it (no JSON files at all)."""
    documents = {name: json.loads((root / file).read_bytes()) for name, file in SQLITE_NAMESPACES.items()}
    write_sqlite_meta(root, documents)
    for file in SQLITE_NAMESPACES.values():
        (root / file).unlink()


def _content(path: Path) -> bytes:
    # A database's bytes carry the writing SQLite's version: compare what it holds.
    if path.suffix != ".db":
        return path.read_bytes()
    with closing(sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)) as connection:
        return "\n".join(connection.iterdump()).encode()


def _files(root: Path) -> dict[str, bytes]:
    found = (p for name in OUTPUTS for p in sorted((root / name).rglob("*")))
    return {p.relative_to(root).as_posix(): _content(p) for p in found if p.is_file()}


def differences(built: Path, committed: Path) -> list[str]:
    """What differs between the oci/ and node/ trees under two directories (empty: identical)."""
    fresh, old = _files(built), _files(committed)
    out = [f"missing: {name}" for name in sorted(fresh.keys() - old.keys())]
    out += [f"unexpected: {name}" for name in sorted(old.keys() - fresh.keys())]
    out += [f"differs: {name}" for name in sorted(fresh.keys() & old.keys()) if fresh[name] != old[name]]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed files, change nothing"
    )
    parser.add_argument("--dest", type=Path, default=REPO / "examples", help="where oci/ and node/ live")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp)
        build(built)
        if args.check:
            diffs = differences(built, args.dest)
            for line in diffs:
                print(line, file=sys.stderr)
            return 1 if diffs else 0
        for name in OUTPUTS:
            if (args.dest / name).exists():
                shutil.rmtree(args.dest / name)
            shutil.copytree(built / name, args.dest / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
