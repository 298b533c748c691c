"""Bad input is refused with a message naming file:line:column, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from clirunner import copy_examples, run_cli, tree
from cocoonplan.units import parse_size

GOOD = """apiVersion: cocoonplan/v1alpha1
kind: VM
metadata:
  name: web
spec:
  image: ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513
  node: node-a
"""

CASES = {
    "malformed-yaml": (GOOD + "  memory: [1G\n", "bad.yaml:9:1: malformed YAML"),
    "unknown-field": (GOOD + "  memroy: 1G\n", "bad.yaml:8:3: spec.memroy: unknown field"),
    "both-sources": (
        GOOD + "  snapshot: ghcr.io/cocoonstack/agent-snap:v1\n",
        "bad.yaml:5:1: spec: give exactly one of snapshot (clone mode) or image (run mode)",
    ),
    "neither-source": (
        GOOD.replace("  image: ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513\n", ""),
        "give exactly one of snapshot",
    ),
    "memory-below-minimum": (
        GOOD + "  memory: 256M\n",
        "bad.yaml:8:3: spec.memory: memory 268435456 bytes is below cocoon's minimum of 512M",
    ),
    "storage-below-minimum": (
        GOOD + "  storage: 5G\n",
        "bad.yaml:8:3: spec.storage: storage 5368709120 bytes is below cocoon's minimum of 10G",
    ),
    "bad-size": (GOOD + "  memory: lots\n", "bad.yaml:8:3: spec.memory: invalid size 'lots'"),
    "firecracker": (GOOD + "  backend: firecracker\n", "backend firecracker is not supported yet"),
    "bad-reference": (
        GOOD.replace("ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513", "ghcr.io/Bad Name:x"),
        "bad.yaml:6:3: spec.image: reference",
    ),
    "unknown-node": (
        GOOD.replace("node-a", "node-z"),
        "bad.yaml:7:3: spec.node: unknown node 'node-z' (the project file declares: node-a)",
    ),
    "bad-name": (
        GOOD.replace("name: web", "name: -web"),
        "bad.yaml:4:3: metadata.name: String should match pattern",
    ),
    "duplicate-key": (GOOD + "  node: node-b\n", "bad.yaml:8:3: duplicate key 'node'"),
    "data-disk-name": (
        GOOD + "  dataDisks:\n    - {name: cocoon-db, size: 1G}\n",
        "bad.yaml:9:8: spec.dataDisks.0.name: data disk name 'cocoon-db'",
    ),
    "data-disk-too-small": (
        GOOD + "  dataDisks:\n    - {name: db, size: 1M}\n",
        "below cocoon's minimum of 16M",
    ),
    "data-disk-none-with-mount": (
        GOOD + "  dataDisks:\n    - {name: db, size: 1G, fstype: none, mount: /mnt/db}\n",
        "a data disk with fstype none cannot have a mount point",
    ),
    "clone-with-data-disks": (
        GOOD.replace(
            "image: ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513",
            "snapshot: ghcr.io/cocoonstack/agent-snap:v1",
        )
        + "  dataDisks:\n    - {name: db, size: 1G}\n",
        "dataDisks cannot be set on a clone",
    ),
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_examples(tmp_path / "repo")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_bad_input_is_refused_with_location(project: Path, case: str, command: str) -> None:
    text, expected = CASES[case]
    (project / "bad.yaml").write_text(text)
    before = tree(project)
    args = [command, "bad.yaml"] + (["--out", "plan.json"] if command == "plan" else [])
    result = run_cli(args, project)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ")
    assert expected in result.stderr
    assert result.stderr.splitlines()[-1].startswith("hint: "), "every refusal says what to do"
    assert tree(project) == before, "bad input must change nothing on disk"


@pytest.mark.parametrize(
    ("file", "text", "schema"),
    [
        ("bad.yaml", GOOD + "  memroy: 1G\n", "vmspec.schema.json"),
        (
            "cocoonplan.yaml",
            "apiVersion: cocoonplan/v1alpha1\nkind: Project\nnodse: {}\n",
            "project.schema.json",
        ),
    ],
)
def test_a_validation_error_points_at_the_schema(project: Path, file: str, text: str, schema: str) -> None:
    (project / file).write_text(text)
    result = run_cli(["validate", "."], project)
    assert result.exit_code == 1
    first, hint = result.stderr.splitlines()
    assert first.startswith(f"Error: {file}:") and "unknown field" in first
    assert hint == (
        f"hint: fix the value there; {schema} lists every field and its type "
        "(`cocoonplan schemas --dir DIR` writes it)"
    )


def test_every_error_of_a_document_is_listed(project: Path) -> None:
    (project / "bad.yaml").write_text(GOOD + "  memory: 1K\n  cpu: 0\n  colour: blue\n")
    result = run_cli(["validate", "bad.yaml"], project)
    assert result.exit_code == 1
    assert "bad.yaml:8:3: spec.memory" in result.stderr
    assert "bad.yaml:9:3: spec.cpu: Input should be greater than or equal to 1" in result.stderr
    assert "bad.yaml:10:3: spec.colour: unknown field" in result.stderr


def test_duplicate_vm_names_on_a_node_are_refused(project: Path) -> None:
    (project / "again.yaml").write_text(GOOD.replace("name: web", "name: agent-run"))
    result = run_cli(["validate", "."], project)
    assert result.exit_code == 1
    assert (
        "agent-run.yaml:2:1: VM 'agent-run' on node 'node-a' is also defined at again.yaml:1" in result.stderr
    )


def test_other_kinds_are_skipped_and_multi_document_files_load(project: Path) -> None:
    (project / "many.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n"
        + GOOD
        + "---\n"
        + GOOD.replace("name: web", "name: web2")
    )
    result = run_cli(["validate", "many.yaml"], project)
    assert result.exit_code == 0, result.stderr
    assert "many.yaml:5  web on node-a" in result.stdout
    assert "many.yaml:13  web2 on node-a" in result.stdout
    assert "2 VM specs valid." in result.stderr


def test_malformed_project_file_is_located(project: Path) -> None:
    (project / "cocoonplan.yaml").write_text(
        "apiVersion: cocoonplan/v1alpha1\nkind: Project\nnodes:\n  node-a:\n    cpus: zero\n"
    )
    result = run_cli(["validate", "agent-run.yaml"], project)
    assert result.exit_code == 1
    assert "cocoonplan.yaml:5:5: nodes.node-a.cpus" in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1G", 1 << 30),
        ("512M", 512 << 20),
        ("1g", 1 << 30),
        ("1GB", 1 << 30),
        ("1GiB", 1 << 30),
        ("10G", 10 << 30),
        ("1.5G", 3 << 29),
        ("2048", 2048),
        (4096, 4096),
        ("1 K", 1024),
    ],
)
def test_sizes_follow_go_units_binary_multipliers(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "1X", "-1G", "1.G", True, 1.5])
def test_bad_sizes_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_node_names_cannot_escape_directories(project: Path) -> None:
    (project / "cocoonplan.yaml").write_text(
        "apiVersion: cocoonplan/v1alpha1\nkind: Project\nnodes:\n  ../../escape: {cpus: 2}\n"
    )
    result = run_cli(["validate", "agent-run.yaml"], project)
    assert result.exit_code == 1
    assert "cocoonplan.yaml:3:1: nodes: node name(s) '../../escape' must match" in result.stderr


def test_a_node_must_say_how_many_cpus_it_has(project: Path) -> None:
    (project / "cocoonplan.yaml").write_text(
        "apiVersion: cocoonplan/v1alpha1\nkind: Project\nnodes:\n  node-a: {}\n"
    )
    result = run_cli(["validate", "agent-run.yaml"], project)
    assert result.exit_code == 1
    assert "nodes.node-a.cpus: Field required" in result.stderr
