"""The founding bug, against a real registry: a clone must run on exactly its snapshot's layers.

Two tags of one repository share 2 prefix layers (``24.04-xface``: 11 layers,
``24.04-xface-20260513``: 6). A hot snapshot is baked from the 11-layer tag. Everything is
pushed with oras-py (an independent client) to Debian's docker-registry; cocoonplan plans
through its own httpx client.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from syrupy.assertion import SnapshotAssertion
from syrupy.extensions.json import JSONSnapshotExtension

from chschema import config_errors
from clirunner import run_cli
from ocifixture import GIB, Artifact, Blob, DataDisk, Nic, SourceVM, image, layer, push_with_oras, snapshot
from registry_server import RegistryFactory, RegistryServer
from snapshotext import JSONFile

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SOURCE = SourceVM(
    id="UJZDEGXDNCF32EPF3DHODZDOCI",
    name="agent-src",
    nics=[Nic(ip="10.22.0.5", prefix=16, gateway="10.22.0.1", tap="tapUJZDEGXD-0", mac="6a:1f:3c:88:0d:42")],
    data_disks=[DataDisk(name="db", size=20 * GIB)],
)


def _upper(n: int, build: str) -> Blob:
    return layer({f"usr/share/xface/{n}.txt": f"xface {build} layer {n}\n".encode()})


def _images(changed_layer: int | None = None) -> tuple[Artifact, Artifact]:
    shared = [
        layer({"etc/os-release": b"ID=ubuntu\n"}),
        layer({"boot/vmlinuz-6.1.0": b"kernel\n", "boot/initrd.img-6.1.0": b"initrd\n"}),
    ]
    uppers = [_upper(n, "changed" if n == changed_layer else "24.04") for n in range(2, 11)]
    return image([*shared, *uppers]), image([*shared, *(_upper(n, "20260513") for n in range(2, 6))])


@dataclass
class Scenario:
    host: str
    project: Path
    xface: Artifact
    xface_0513: Artifact

    def spec(self, name: str, reference: str, extra: str = "") -> None:
        (self.project / f"{name}.yaml").write_text(
            f"apiVersion: cocoonplan/v1alpha1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n"
            f"  snapshot: {reference}\n  node: node-a\n{extra}"
        )


def _push_scenario(server: RegistryServer, project: Path, changed_layer: int | None = None) -> Scenario:
    host = server.host
    xface, xface_0513 = _images(changed_layer)
    push_with_oras(host, "cocoon/ubuntu:24.04-xface", xface)
    push_with_oras(host, "cocoon/ubuntu:24.04-xface-20260513", xface_0513)
    base_ref = f"{host}/cocoon/ubuntu:24.04-xface"
    push_with_oras(host, "cocoon/agent-snap:v1", snapshot(xface, base_ref=base_ref, vm=SOURCE))
    # The #46 shape: cocoon.json and config.json name the 6-layer set, while the config blob
    # and the base manifest (by imageDigest) still say 11.
    substituted = snapshot(
        xface, base_ref=base_ref, vm=SOURCE, layers_override=[b.digest for b in xface_0513.layers]
    )
    push_with_oras(host, "cocoon/agent-snap:substituted", substituted)
    project.mkdir()
    # Both images are cached on the node: their EROFS blobs are present.
    blobs = project / "node" / "oci" / "blobs"
    blobs.mkdir(parents=True)
    for blob in (*xface.layers, *xface_0513.layers):
        (blobs / f"{blob.hex}.erofs").write_bytes(b"")
    (project / "cocoonplan.yaml").write_text(
        # A root holding only blobs shows no cocoon release: the project names it.
        "apiVersion: cocoonplan/v1alpha1\nkind: Project\nnodes:\n  node-a:\n    cpus: 16\n    state: node\n"
        "    cocoonVersion: v0.3.8\n"
    )
    return Scenario(host, project, xface, xface_0513)


@pytest.fixture(scope="module")
def scenario(registry_factory: RegistryFactory, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return _push_scenario(registry_factory.plain(), tmp_path_factory.mktemp("regression") / "repo")


def _plan(project: Path, *files: str) -> tuple[int, dict[str, Any], str]:
    result = run_cli(["plan", *files, "--json"], project)
    return result.exit_code, json.loads(result.stdout) if result.stdout else {}, result.stderr


def _pinned_view(vm: dict[str, Any]) -> dict[str, Any]:
    # Registry-independent parts only: the port of the loopback registry is not stable.
    return {"disks": vm["disks"], "config": vm["config"], "cmdline": vm["cmdline"]}


def test_clone_lists_exactly_the_declared_eleven_layers(
    scenario: Scenario, snapshot: SnapshotAssertion
) -> None:
    scenario.spec("good", f"{scenario.host}/cocoon/agent-snap:v1")
    code, document, stderr = _plan(scenario.project, "good.yaml")
    assert code == 0, stderr
    (vm,) = document["vms"]
    layers = [d for d in vm["disks"] if d["role"] == "layer"]
    assert [d["digest"] for d in layers] == [b.digest for b in scenario.xface.layers]
    assert [d["path"] for d in layers] == [
        f"/var/lib/cocoon/oci/blobs/{b.hex}.erofs" for b in scenario.xface.layers
    ]
    assert vm["base_image"]["digest"] == scenario.xface.digest
    # The 6-layer image is cached too, yet none of its own upper layers is used.
    alien = {b.digest for b in scenario.xface_0513.layers[2:]}
    assert alien.isdisjoint(d["digest"] for d in vm["disks"])
    assert all(b["present"] for b in vm["blobs"] if b["kind"] == "layer")
    assert config_errors(vm["config"]) == []
    assert _pinned_view(vm) == snapshot(extension_class=JSONFile)


def test_substituted_layer_set_fails_with_one_line_per_layer(scenario: Scenario) -> None:
    scenario.spec("bad", f"{scenario.host}/cocoon/agent-snap:substituted")
    result = run_cli(["plan", "bad.yaml", "--out", "plan.json"], scenario.project)
    assert result.exit_code == 1
    assert not (scenario.project / "plan.json").exists()
    text = result.stdout
    base = f"base manifest {scenario.host}/cocoon/ubuntu@{scenario.xface.digest} (config blob imageDigest)"
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("layer ")]
    assert [line.split(":")[0] for line in lines] == [f"layer {i}" for i in range(2, 11)], (
        "one line per index"
    )
    for index in range(2, 6):
        found, expected = scenario.xface_0513.layers[index].digest, scenario.xface.layers[index].digest
        line = lines[index - 2]
        assert line.startswith(f"layer {index}: cocoon.json says {found}; ")
        assert f"{base} says {expected}" in line
        assert "the config blob's imageBlobIds do not hold it" in line
    for index in range(6, 11):
        expected = scenario.xface.layers[index].digest
        assert lines[index - 2] == f"layer {index}: cocoon.json says (none); {base} says {expected}"
    assert "does not agree with itself about its 6 base layers" in text


def test_expect_base_image_mismatch_fails(scenario: Scenario) -> None:
    scenario.spec(
        "expect",
        f"{scenario.host}/cocoon/agent-snap:v1",
        f"  expect:\n    baseImage: {scenario.host}/cocoon/ubuntu:24.04-xface-20260513\n",
    )
    code, document, _ = _plan(scenario.project, "expect.yaml")
    assert code == 1
    (error,) = document["errors"]
    assert (
        f"expect.baseImage {scenario.host}/cocoon/ubuntu:24.04-xface-20260513 is {scenario.xface_0513.digest}"
        in error["detail"]
    )
    assert error["vm"] == "expect" and error["file"] == "expect.yaml"


def test_one_changed_layer_shows_as_a_readable_snapshot_diff(
    registry_factory: RegistryFactory, scenario: Scenario, tmp_path: Path
) -> None:
    changed = _push_scenario(registry_factory.plain(), tmp_path / "repo", changed_layer=7)
    scenario.spec("good", f"{scenario.host}/cocoon/agent-snap:v1")
    changed.spec("good", f"{changed.host}/cocoon/agent-snap:v1")
    before = _pinned_view(_plan(scenario.project, "good.yaml")[1]["vms"][0])
    after = _pinned_view(_plan(changed.project, "good.yaml")[1]["vms"][0])
    extension = JSONSnapshotExtension()
    diff = ANSI.sub(
        "", "\n".join(extension.diff_lines(extension.serialize(after), extension.serialize(before)))
    )
    old, new = scenario.xface.layers[7].hex, changed.xface.layers[7].hex
    removed = [line for line in diff.splitlines() if line.startswith("-")]
    added = [line for line in diff.splitlines() if line.startswith("+")]
    # Only lines naming the changed layer differ, and the diff shows its blob path old → new.
    assert removed and all(old in line for line in removed), diff
    assert added and all(new in line for line in added), diff
    assert any(f"/var/lib/cocoon/oci/blobs/{old}.erofs" in line for line in removed), diff
    assert any(f"/var/lib/cocoon/oci/blobs/{new}.erofs" in line for line in added), diff


def test_unreachable_registry_is_an_error_naming_the_reference(tmp_path: Path) -> None:
    project = tmp_path / "repo"
    project.mkdir()
    (project / "cocoonplan.yaml").write_text(
        "apiVersion: cocoonplan/v1alpha1\nkind: Project\nnodes: {node-a: {cpus: 2}}\n"
    )
    reference = "127.0.0.1:9/cocoon/agent-snap:v1"
    (project / "vm.yaml").write_text(
        f"apiVersion: cocoonplan/v1alpha1\nkind: VM\nmetadata: {{name: vm}}\nspec: {{snapshot: '{reference}', node: node-a}}\n"
    )
    result = run_cli(["plan", "vm.yaml"], project)
    assert result.exit_code == 1
    assert "VM vm (vm.yaml)" in result.stdout
    assert "127.0.0.1:9" in result.stdout and "cocoon/agent-snap" in result.stdout
    assert sorted(p.name for p in project.iterdir()) == ["cocoonplan.yaml", "vm.yaml"]


def test_missing_blob_is_an_error_naming_the_digest(
    registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    server = registry_factory.plain()
    broken = _push_scenario(server, tmp_path / "repo")
    cocoon_json = next(
        b
        for b in snapshot(broken.xface, base_ref=f"{server.host}/cocoon/ubuntu:24.04-xface", vm=SOURCE).layers
    )
    server.blob_file(cocoon_json.digest).unlink()
    broken.spec("vm", f"{server.host}/cocoon/agent-snap:v1")
    code, document, _ = _plan(broken.project, "vm.yaml")
    assert code == 1
    (error,) = document["errors"]
    assert cocoon_json.digest in error["summary"] + error["detail"]
