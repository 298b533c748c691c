"""A typo never deletes: a mistyped kind is a located error, and still claims its VM.

Before, a ``kind: Vm`` document was skipped like any other tool's document: ``validate``
passed and ``plan`` proposed deleting the VM it defines. These runs use the real CLI on a
copy of the examples, whose node records ``agent-run`` as created from ``agent-run.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from syrupy.assertion import SnapshotAssertion
from typer.testing import Result

from clirunner import copy_examples, run_cli, tree
from cocoonplan.specfile import index_project
from snapshotext import JSONFile

KIND_LINE = "kind: VM\n"
"""How examples/agent-run.yaml declares its kind, on line 3 (line 1 is a comment)."""

TYPOS = {
    "case": ("kind: Vm\n", "agent-run.yaml:3:1: kind: unknown kind 'Vm' (kinds are case-sensitive)"),
    "lower-case": ("kind: vm\n", "agent-run.yaml:3:1: kind: unknown kind 'vm'"),
    "unknown-kind-of-ours": (
        "kind: VirtualMachine\n",
        "agent-run.yaml:3:1: kind: unknown kind 'VirtualMachine' for apiVersion cocoonplan/v1alpha1",
    ),
    # No kind key: the error names the document's start, its apiVersion on line 2.
    "missing": ("", "agent-run.yaml:2:1: kind: missing in a document shaped like a VM spec"),
}

DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata:
  name: agent-run
spec:
  replicas: 1
  template:
    spec:
      node: node-a
      image: ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513
"""

OPENSHIFT_PROJECT = """apiVersion: project.openshift.io/v1
kind: Project
metadata:
  name: agents
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_examples(tmp_path / "repo")


def _mistype(file: Path, kind_line: str) -> None:
    text = file.read_text()
    assert text.count(KIND_LINE) == 1
    file.write_text(text.replace(KIND_LINE, kind_line))


def _actions(stdout: str) -> dict[str, str]:
    document: dict[str, Any] = json.loads(stdout)
    return {vm["name"]: vm["action"] for vm in document["vms"]}


def _assert_refused(project: Path, args: list[str], expected: str, hint: str) -> Result:
    before = tree(project)
    result = run_cli(args, project)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: {expected}")
    assert f"hint: {hint}" in result.stderr
    assert tree(project) == before, "a refused spec must change nothing on disk"
    return result


@pytest.mark.parametrize("typo", sorted(TYPOS))
@pytest.mark.parametrize(
    "args", [["validate", "."], ["plan", ".", "--out", "plan.json"]], ids=["validate", "plan"]
)
def test_a_mistyped_vm_kind_is_refused_where_it_is_written(
    project: Path, typo: str, args: list[str], snapshot: SnapshotAssertion
) -> None:
    kind_line, expected = TYPOS[typo]
    _mistype(project / "agent-run.yaml", kind_line)
    result = _assert_refused(project, args, expected, "did you mean kind: VM?")
    assert not (project / "plan.json").exists()
    # No plan at all, so no delete: the refusal is all there is.
    refused = {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr.splitlines()}
    assert refused == snapshot(extension_class=JSONFile)


def test_the_error_names_the_column_of_kind_in_a_later_document(project: Path) -> None:
    (project / "more.yaml").write_text(
        DEPLOYMENT
        + "---\n"
        + "{apiVersion: cocoonplan/v1alpha1, kind: vm, metadata: {name: web},"
        + " spec: {node: node-a, image: ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513}}\n"
    )
    _assert_refused(
        project, ["plan", "."], "more.yaml:12:35: kind: unknown kind 'vm'", "did you mean kind: VM?"
    )


def test_a_project_document_in_a_spec_file_is_refused(project: Path) -> None:
    (project / "project.yaml").write_text(
        "apiVersion: cocoonplan/v1alpha1\nkind: Project\nnodes:\n  node-b: {cpus: 4}\n"
    )
    _assert_refused(
        project,
        ["validate", "."],
        "project.yaml:2:1: kind: a Project document is read only from cocoonplan.yaml",
        "move it into cocoonplan.yaml",
    )


def test_a_mistyped_project_kind_is_refused_whatever_its_api_version(project: Path) -> None:
    (project / "project.yaml").write_text("apiVersion: example.com/v1\nkind: project\n")
    _assert_refused(
        project,
        ["validate", "project.yaml"],
        "project.yaml:2:1: kind: unknown kind 'project'",
        "did you mean kind: Project?",
    )


def test_other_tools_kinds_are_still_skipped(project: Path) -> None:
    (project / "deploy.yaml").write_text(DEPLOYMENT + "---\n" + OPENSHIFT_PROJECT)
    validated = run_cli(["validate", "."], project)
    assert validated.exit_code == 0, validated.stderr
    assert "2 VM specs valid." in validated.stderr
    planned = run_cli(["plan", ".", "--json"], project)
    assert planned.exit_code == 0, planned.stderr
    assert _actions(planned.stdout)["agent-run"] == "no-op"


def test_a_mistyped_vm_still_defines_its_vm_for_the_project_index(project: Path) -> None:
    _mistype(project / "agent-run.yaml", "kind: Vm\n")
    assert ("node-a", "agent-run") in index_project(project).vms


def test_a_typo_outside_a_partial_plan_never_deletes_its_vm(
    project: Path, snapshot: SnapshotAssertion
) -> None:
    # The node records agent-run as created from agent-run.yaml. Its spec moved to another
    # file, with a typo, and agent-run.yaml holds another tool's document: planning just
    # agent-run.yaml must not take the typo for a removal.
    moved = project / "moved" / "agent-run.yaml"
    moved.parent.mkdir()
    (project / "agent-run.yaml").rename(moved)
    _mistype(moved, "kind: Vm\n")
    (project / "agent-run.yaml").write_text(DEPLOYMENT)
    result = run_cli(["plan", "agent-run.yaml", "--json"], project)
    assert result.exit_code == 0, result.stderr
    kept = _actions(result.stdout)
    assert "agent-run" not in kept
    # Without the mistyped spec the same plan deletes it: the typo is what kept it.
    moved.unlink()
    result = run_cli(["plan", "agent-run.yaml", "--json"], project)
    assert result.exit_code == 0, result.stderr
    removed = _actions(result.stdout)
    assert removed["agent-run"] == "delete"
    assert {"with_the_mistyped_spec": kept, "without_it": removed} == snapshot(extension_class=JSONFile)


# A VM-shaped document of another kind and apiVersion: metadata.name, spec.node and
# spec.snapshot or spec.image. Skipped as another tool's, it would make the VM it defines
# look removed.
MACHINE = """apiVersion: example.com/v1
kind: Machine
metadata:
  name: agent-run
spec:
  node: node-a
  image: ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513
"""

KUBERNETES_DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata:
  name: agent-run
  labels: {app: agent}
spec:
  replicas: 2
  selector:
    matchLabels: {app: agent}
  template:
    metadata:
      labels: {app: agent}
    spec:
      nodeName: node-a
      nodeSelector: {node: node-a}
      containers:
        - name: agent
          image: ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513
"""


@pytest.mark.parametrize(
    "args", [["validate", "."], ["plan", ".", "--out", "plan.json"]], ids=["validate", "plan"]
)
@pytest.mark.parametrize(
    ("document", "kind"),
    [(MACHINE, "'Machine'"), (MACHINE.replace("  image:", "  snapshot:"), "'Machine'")],
    ids=["image", "snapshot"],
)
def test_a_vm_shaped_document_of_another_kind_is_refused_where_its_kind_is(
    project: Path, args: list[str], document: str, kind: str
) -> None:
    # It replaces agent-run.yaml, the file the node records agent-run as created from: were it
    # skipped, the plan would delete agent-run.
    (project / "agent-run.yaml").write_text(document)
    result = _assert_refused(
        project,
        args,
        f"agent-run.yaml:2:1: kind: {kind} in a document shaped like a VM spec "
        "(metadata.name, spec.node and spec.snapshot or spec.image)",
        "did you mean kind: VM?",
    )
    assert len(result.stderr.splitlines()) == 2
    assert not (project / "plan.json").exists()


def test_a_vm_shaped_document_elsewhere_claims_its_vm_in_a_partial_plan(project: Path) -> None:
    moved = project / "tools" / "machine.yaml"
    moved.parent.mkdir()
    moved.write_text(MACHINE)
    (project / "agent-run.yaml").write_text(KUBERNETES_DEPLOYMENT)
    assert ("node-a", "agent-run") in index_project(project).vms
    result = run_cli(["plan", "agent-run.yaml", "--json"], project)
    assert result.exit_code == 0, result.stderr
    assert "agent-run" not in _actions(result.stdout)


def test_a_kubernetes_deployment_in_the_repo_is_still_ignored(project: Path) -> None:
    (project / "k8s").mkdir()
    (project / "k8s" / "deployment.yaml").write_text(KUBERNETES_DEPLOYMENT)
    validated = run_cli(["validate", "."], project)
    assert validated.exit_code == 0, validated.stderr
    assert "2 VM specs valid." in validated.stderr
    assert ("node-a", "agent-run") in index_project(project).vms  # from agent-run.yaml alone
    (project / "agent-run.yaml").unlink()
    assert ("node-a", "agent-run") not in index_project(project).vms
    planned = run_cli(["plan", ".", "--json"], project)
    assert planned.exit_code == 0, planned.stderr
    assert _actions(planned.stdout)["agent-run"] == "delete"  # its spec is gone: the Deployment is not one
