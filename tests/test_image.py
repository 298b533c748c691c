"""Run mode finds the kernel and initrd as cocoon does: the last layer holding them wins."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from clirunner import run_cli
from cocoonplan.resolvers.image import boot_files_in
from ocifixture import Blob, image, layer, write_layout

PROJECT = "apiVersion: cocoonplan/v1alpha1\nkind: Project\nregistries:\n  ghcr.io: {layout: oci}\nnodes:\n  n: {cpus: 4}\n"


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([("boot/vmlinuz-6.1", True), ("boot/initrd.img-6.1", True)], (True, True)),
        ([("./boot/vmlinuz", True)], (True, False)),
        ([("/boot/vmlinuz", True)], (False, False)),  # absolute names do not count
        ([("boot/vmlinuz", False), ("boot/initrd.img", False)], (False, False)),  # symlinks, hard links
        ([("boot/vmlinuz.old", True), ("boot/initrd.img.old", True)], (False, False)),
        ([("boot/efi/vmlinuz", True), ("etc/initrd.img", True)], (False, False)),  # boot/ or the top only
        ([("vmlinuz", True), ("./initrd.img-6.1", True)], (True, True)),  # the top level counts (".")
        ([("x/../boot/vmlinuz", True)], (True, False)),  # names are cleaned first
    ],
)
def test_boot_file_rules(entries: list[tuple[str, bool]], expected: tuple[bool, bool]) -> None:
    assert boot_files_in(entries) == expected


def _symlink_layer() -> Blob:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in ("boot/vmlinuz", "boot/initrd.img"):
            entry = tarfile.TarInfo(name)
            entry.type = tarfile.SYMTYPE
            entry.linkname = "vmlinuz-7.0"
            archive.addfile(entry)
    return Blob("application/vnd.oci.image.layer.v1.tar+gzip", gzip.compress(buffer.getvalue(), mtime=0))


def _plan_run(tmp_path: Path, layers: list[Blob]) -> dict[str, object]:
    project = tmp_path / "repo"
    project.mkdir()
    (project / "cocoonplan.yaml").write_text(PROJECT)
    write_layout(project / "oci", {"ghcr.io/x/os:1": image(layers)})
    (project / "vm.yaml").write_text(
        "apiVersion: cocoonplan/v1alpha1\nkind: VM\nmetadata: {name: vm}\nspec: {image: ghcr.io/x/os:1, node: n}\n"
    )
    result = run_cli(["plan", "vm.yaml", "--json"], project)
    document: dict[str, object] = json.loads(result.stdout)
    return document


def test_the_last_layer_with_boot_files_wins(tmp_path: Path) -> None:
    first = layer({"boot/vmlinuz-6.1": b"old kernel", "boot/initrd.img-6.1": b"old initrd"})
    newer = layer({"boot/vmlinuz-6.12": b"new kernel", "boot/initrd.img-6.12": b"new initrd"})
    layers = [
        layer({"etc/os-release": b"ID=x\n"}),
        first,
        layer({"etc/motd": b"hi\n"}),
        newer,
        _symlink_layer(),
    ]
    document = _plan_run(tmp_path, layers)
    (vm,) = document["vms"]  # type: ignore[misc]
    payload = vm["config"]["payload"]
    assert payload["kernel"] == f"/var/lib/cocoon/oci/boot/{newer.hex}/vmlinuz"
    assert payload["initramfs"] == f"/var/lib/cocoon/oci/boot/{newer.hex}/initrd.img"
    launch = vm["launch"]
    assert launch[launch.index("--kernel") + 1] == f"/var/lib/cocoon/oci/boot/{newer.hex}/vmlinuz"
    assert [d["serial"] for d in vm["disks"]] == [*(f"cocoon-layer{i}" for i in range(5)), "cocoon-cow"]


def test_an_image_without_boot_files_cannot_run(tmp_path: Path) -> None:
    document = _plan_run(tmp_path, [layer({"etc/os-release": b"ID=x\n"}), _symlink_layer()])
    (error,) = document["errors"]  # type: ignore[misc]
    assert "has no boot files" in error["summary"]
    assert document["vms"] == []


def test_python_dash_m_runs_the_cli() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "cocoonplan", "version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == __import__("cocoonplan").__version__
