"""The benchmark's data, built each run with the test suite's own fixture builders.

* :func:`plan_projects`: 10 hot-snapshot artifacts of 12-layer bases (2 bottom layers shared),
  pushed with oras-py to a loopback docker-registry; one project per spec count, each with
  its spec files, a node root holding every layer and boot file, a complete lock, and a
  registry mirror pointing at the counting proxy;
* :func:`pull_artifact`: an OCI layout of random blobs, pushed with skopeo;
* :func:`mixed_layer`: a tar+gzip layer of text and random files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from ocifixture import (  # noqa: E402
    Artifact,
    Nic,
    SourceVM,
    derive_id,
    image,
    layer,
    push_with_oras,
    snapshot,
)

CANONICAL = "bench.registry.test"
"""The registry host the specs name; the project's mirror sends it to the counting proxy."""
SNAPSHOTS = 10
LAYERS = 12
NODES = ("node-a", "node-b")


@dataclass(frozen=True)
class PlanProject:
    specs: int
    directory: Path

    @property
    def cache(self) -> Path:
        return self.directory / ".cocoonplan"


def _bases() -> list[Artifact]:
    shared = [
        layer({"etc/os-release": b"ID=ubuntu\nVERSION_ID=24.04\n"}),
        layer({"boot/vmlinuz-6.1.0": b"kernel\n" * 64, "boot/initrd.img-6.1.0": b"initrd\n" * 64}),
    ]
    bases = []
    for s in range(SNAPSHOTS):
        uppers = [
            layer({f"usr/share/bench/{s}/{n}.txt": f"base {s} layer {n}\n".encode() * 32})
            for n in range(2, LAYERS)
        ]
        bases.append(image([*shared, *uppers]))
    return bases


def push_snapshots(registry_host: str) -> list[Artifact]:
    """Push the 10 bases and a snapshot of each; returns the bases."""
    bases = _bases()
    for s, base in enumerate(bases):
        push_with_oras(registry_host, f"bench/base-{s}:v1", base)
        vm = SourceVM(
            id=derive_id("bench-source", str(s)),
            name=f"bench-src-{s}",
            nics=[Nic(ip=f"10.22.0.{s + 5}", prefix=16, gateway="10.22.0.1")],
        )
        art = snapshot(base, base_ref=f"{CANONICAL}/bench/base-{s}:v1", vm=vm)
        push_with_oras(registry_host, f"bench/snap-{s}:v1", art)
    return bases


def plan_project(directory: Path, specs: int, bases: list[Artifact], proxy_host: str) -> PlanProject:
    """A project of ``specs`` VM spec files spread over the snapshots and nodes."""
    directory.mkdir(parents=True)
    nodes = "".join(
        f"  {node}:\n    cpus: 16\n    state: {node}\n    cocoonVersion: v0.3.8\n" for node in NODES
    )
    (directory / "cocoonplan.yaml").write_text(
        "apiVersion: cocoonplan/v1alpha1\nkind: Project\n"
        f'registries:\n  {CANONICAL}: {{mirror: "http://{proxy_host}"}}\n'
        f"nodes:\n{nodes}"
    )
    for node in NODES:
        blobs = directory / node / "oci" / "blobs"
        blobs.mkdir(parents=True)
        for base in bases:
            for blob in base.layers:
                (blobs / f"{blob.hex}.erofs").touch()
            kernel, initrd = base.boot_layers()
            for blob, name in ((kernel, "vmlinuz"), (initrd, "initrd.img")):
                boot = directory / node / "oci" / "boot" / blob.hex
                boot.mkdir(parents=True, exist_ok=True)
                (boot / name).write_bytes(b"boot\n")
    spec_dir = directory / "specs"
    spec_dir.mkdir()
    for i in range(specs):
        (spec_dir / f"vm-{i:04d}.yaml").write_text(
            "apiVersion: cocoonplan/v1alpha1\nkind: VM\n"
            f"metadata:\n  name: vm-{i:04d}\n  labels:\n    team: bench\n"
            f"spec:\n  snapshot: {CANONICAL}/bench/snap-{i % SNAPSHOTS}:v1\n"
            f"  node: {NODES[i % len(NODES)]}\n  cpu: 2\n  memory: 1G\n  restoreMode: copy\n"
        )
    return PlanProject(specs, directory)


# --------------------------------------------------------------------------- pull


@dataclass(frozen=True)
class PulledBlob:
    digest: str
    size: int
    path: Path


def _random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 << 20))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _put(blobs: Path, data: bytes) -> tuple[str, int]:
    hex_ = hashlib.sha256(data).hexdigest()
    (blobs / hex_).write_bytes(data)
    return "sha256:" + hex_, len(data)


def pull_artifact(
    layout: Path, count: int, size: int, registry_host: str, repository: str
) -> list[PulledBlob]:
    """An OCI layout of ``count`` random blobs of ``size`` bytes, pushed with skopeo."""
    blobs_dir = layout / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    blobs = []
    for _ in range(count):
        scratch = blobs_dir / "incoming"
        hex_ = _random_file(scratch, size)
        scratch.rename(blobs_dir / hex_)
        blobs.append(PulledBlob("sha256:" + hex_, size, blobs_dir / hex_))
    layer_type = "application/vnd.oci.image.layer.v1.tar"
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [b.digest for b in blobs]},
    }
    config_digest, config_size = _put(blobs_dir, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [{"mediaType": layer_type, "digest": b.digest, "size": b.size} for b in blobs],
    }
    manifest_digest, manifest_size = _put(blobs_dir, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"oci:{layout}:v1",
            f"docker://{registry_host}/{repository}:v1",
        ],
        check=True,
        capture_output=True,
    )
    return blobs


# --------------------------------------------------------------------------- layer conversion

_WORDS = [
    "cocoon",
    "snapshot",
    "layer",
    "erofs",
    "kernel",
    "initrd",
    "config",
    "disk",
    "vm",
    "clone",
    "plan",
    "apply",
    "digest",
    "registry",
    "manifest",
    "blob",
    "cache",
    "node",
    "root",
    "overlay",
    "whiteout",
    "hypervisor",
    "vcpu",
    "memory",
    "balloon",
    "serial",
    "console",
]


def mixed_layer(path: Path, text_bytes: int, random_bytes: int, seed: int = 0) -> str:
    """A tar+gzip layer of text files (a few KiB to a MiB) and random files (up to 8 MiB), in
    nested directories; returns its digest."""
    rng = random.Random(seed)
    with (
        path.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        number = 0
        for kind, budget in (("text", text_bytes), ("random", random_bytes)):
            while budget > 0:
                if kind == "text":
                    size = min(budget, rng.choice((2 << 10, 16 << 10, 128 << 10, 1 << 20)))
                    line = " ".join(rng.choices(_WORDS, k=12)) + "\n"
                    lines = [line if rng.random() < 0.7 else f"{number} {rng.random()}\n" for _ in range(64)]
                    block = "".join(lines).encode()
                    data = (block * (size // len(block) + 1))[:size]
                else:
                    size = min(budget, rng.choice((64 << 10, 1 << 20, 8 << 20)))
                    data = rng.randbytes(size)
                info = tarfile.TarInfo(f"usr/{kind}/{number % 37}/{number % 11}/f{number}.dat")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
                budget -= size
                number += 1
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
