"""``cocoonplan import NODE/NAME SPEC``: a VM cocoon created, taken into cocoonplan's ownership.

Real CLI on copies of the examples, whose node-a runs ``legacy-tool``: a ``vm run`` of the
6-layer image that cocoonplan did not create.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clirunner import copy_examples, plan_json, run_cli, tree, vm_entry

LEGACY_ID = "46BZKCOI3T74VCLJPOYZQFNBDS"
IMAGE = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513"
LEGACY_RUN = f"""\
apiVersion: cocoonplan/v1alpha1
kind: VM
metadata:
  name: legacy-tool
spec:
  image: {IMAGE}
  node: node-a
  cpu: 2
  memory: 1G
  storage: 10G
"""
LEGACY_CLONE = """\
apiVersion: cocoonplan/v1alpha1
kind: VM
metadata:
  name: legacy-tool
spec:
  snapshot: ghcr.io/cocoonstack/agent-snap:v1
  node: node-a
"""


def _project(tmp_path: Path, spec: str = LEGACY_RUN) -> Path:
    project = copy_examples(tmp_path / "project")
    (project / "legacy-tool.yaml").write_text(spec)
    return project


def _owned(project: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((project / "node/cocoonplan/owned.json").read_text())
    return document


def test_a_spec_over_the_foreign_vm_points_at_import(tmp_path: Path) -> None:
    project = _project(tmp_path)
    code, document = plan_json(project)
    assert code == 1
    (error,) = document["errors"]
    assert error["vm"] == "legacy-tool"
    assert "cocoonplan import node-a/legacy-tool SPEC" in error["hint"]


def test_import_records_the_vm_and_plan_then_keeps_it(tmp_path: Path) -> None:
    project = _project(tmp_path)
    before = _owned(project)
    result = run_cli(["import", "node-a/legacy-tool", "legacy-tool.yaml", "--auto-approve"], project)
    assert result.exit_code == 0, result.output
    assert "legacy-tool" in result.stdout  # the VM's plan is shown first
    assert f"node-a/legacy-tool ({LEGACY_ID}) imported" in result.stderr
    owned = _owned(project)
    # Every other entry is kept as it was; no plan was applied, so none is recorded.
    assert {k: v for k, v in owned["vms"].items() if k != LEGACY_ID} == before["vms"]
    assert owned.get("applied_plan") == before.get("applied_plan")
    entry = owned["vms"][LEGACY_ID]
    record = json.loads((project / "node/cloudhypervisor/db/vms.json").read_text())["vms"][LEGACY_ID]
    assert entry["name"] == "legacy-tool"
    assert entry["spec_file"] == "legacy-tool.yaml"
    assert entry["mode"] == "run"
    assert entry["source"] == record["config"]["image_digest"]
    assert entry["source_ref"] == IMAGE
    assert entry["cmdline"] == record["boot_config"]["cmdline"]
    assert not (project / "node/cocoonplan/apply.lock").exists()
    code, document = plan_json(project)
    assert code == 0, document["errors"]
    planned = vm_entry(document, "legacy-tool")
    assert (planned["action"], planned["observed_id"], planned["drift"]) == ("no-op", LEGACY_ID, [])
    assert not any(w["vm"] == "legacy-tool" for w in document["warnings"])
    # Imported once, it is cocoonplan's: a second import is refused.
    again = run_cli(["import", "node-a/legacy-tool", "legacy-tool.yaml", "--auto-approve"], project)
    assert again.exit_code == 1
    assert "already cocoonplan's" in again.stderr


def test_an_imported_vm_that_differs_from_its_spec_is_replaced(tmp_path: Path) -> None:
    project = _project(tmp_path, LEGACY_RUN.replace("cpu: 2", "cpu: 4"))
    result = run_cli(["import", "node-a/legacy-tool", "legacy-tool.yaml", "--auto-approve"], project)
    assert result.exit_code == 0, result.output
    assert "replace" in result.stdout
    assert "Once imported, `cocoonplan apply` replaces node-a/legacy-tool" in result.stderr
    code, document = plan_json(project)
    assert code == 0
    entry = vm_entry(document, "legacy-tool")
    assert entry["action"] == "replace"
    assert entry["replace_paths"] == ["cpu"]


def test_declining_changes_nothing(tmp_path: Path) -> None:
    project = _project(tmp_path)
    before = tree(project)
    result = run_cli(["import", "node-a/legacy-tool", "legacy-tool.yaml"], project, input_text="n\n")
    assert result.exit_code == 1
    assert "Import node-a/legacy-tool into cocoonplan's ownership?" in result.stderr
    assert "Nothing imported." in result.stderr
    assert tree(project) == before


def _refused(project: Path, *args: str) -> str:
    before = tree(project)
    result = run_cli(["import", *args, "--auto-approve"], project)
    assert result.exit_code == 1, result.output
    assert tree(project) == before
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ")
    assert lines[-1].startswith("hint: ")
    return result.stderr


def test_an_owned_vm_is_refused(tmp_path: Path) -> None:
    project = _project(tmp_path)
    message = _refused(project, "node-a/agent-run", "agent-run.yaml")
    assert "VM agent-run (KYOCHF64FKGH7F6CHC5JFVZL7U) on node node-a is already cocoonplan's" in message


def test_a_spec_of_another_vm_is_refused(tmp_path: Path) -> None:
    project = _project(tmp_path)
    message = _refused(project, "node-a/legacy-tool", "agent-run.yaml")
    assert "agent-run.yaml: defines node-a/agent-run, not node-a/legacy-tool" in message


def test_a_vm_not_on_the_node_is_refused(tmp_path: Path) -> None:
    project = _project(tmp_path, LEGACY_RUN.replace("name: legacy-tool", "name: ghost"))
    message = _refused(project, "node-a/ghost", "legacy-tool.yaml")
    assert "no VM named ghost is on node node-a" in message


def test_a_clone_spec_over_a_run_vm_is_refused(tmp_path: Path) -> None:
    project = _project(tmp_path, LEGACY_CLONE)
    message = _refused(project, "node-a/legacy-tool", "legacy-tool.yaml")
    assert "is a run, and the spec plans a clone" in message


def test_a_node_given_by_a_state_document_is_refused(tmp_path: Path) -> None:
    project = _project(tmp_path)
    exported = run_cli(["state", "export", "--root", "node"], project)
    assert exported.exit_code == 0, exported.output
    (project / "node-a.json").write_text(exported.stdout)
    config = project / "cocoonplan.yaml"
    config.write_text(config.read_text().replace("state: node\n", "state: node-a.json\n"))
    message = _refused(project, "node-a/legacy-tool", "legacy-tool.yaml")
    assert "node node-a has no cocoon root directory reachable from here" in message


def test_an_address_without_a_node_is_refused(tmp_path: Path) -> None:
    project = _project(tmp_path)
    message = _refused(project, "legacy-tool", "legacy-tool.yaml")
    assert "is not NODE/NAME" in message
