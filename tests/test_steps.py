"""The step compiler, table-driven: plans built from the shipped examples' plan, varied in
Python, compiled to steps without any I/O."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from clirunner import copy_examples, run_cli
from cocoonplan.errors import PlanError
from cocoonplan.planfile import read_plan
from cocoonplan.planner.model import Action, Diagnostic, Plan, VMPlan
from cocoonplan.planner.steps import StepKind, compile_steps
from cocoonplan.spec import PowerState


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Plan]:
    project = copy_examples(tmp_path_factory.mktemp("steps") / "examples")
    assert run_cli(["plan", ".", "--out", "plan.json"], project).exit_code == 0
    return project, read_plan(project / "plan.json")


def _vm(plan: Plan, name: str) -> VMPlan:
    return next(vm for vm in plan.vms if vm.name == name)


def _with(plan: Plan, **vms: VMPlan) -> Plan:
    return plan.model_copy(update={"vms": tuple(vms.get(vm.name.replace("-", "_"), vm) for vm in plan.vms)})


def _kinds(plan: Plan, *targets: str) -> list[tuple[str, str | None]]:
    return [(step.kind.value, step.vm) for step in compile_steps(plan, targets)]


def test_the_examples_replace_is_content_first_then_remove_then_create(examples: tuple[Path, Plan]) -> None:
    _, plan = examples
    steps = compile_steps(plan)
    clone = _vm(plan, "agent-clone")
    assert [s.kind for s in steps] == [
        *[StepKind.FETCH_BLOB] * 7,  # the snapshot's config blob and files; its layers are on the node
        StepKind.IMPORT_SNAPSHOT,
        StepKind.REMOVE_VM,
        StepKind.CREATE_VM,
        StepKind.RECORD_OWNERSHIP,
        StepKind.PROVE,
    ]
    remove = next(s for s in steps if s.kind is StepKind.REMOVE_VM)
    assert remove.detail == clone.observed_id != clone.vm_id, "the old VM goes, not the planned one"
    imported = next(s for s in steps if s.kind is StepKind.IMPORT_SNAPSHOT)
    assert imported.detail.startswith("cocoonplan-") and imported.digest == clone.source.digest  # type: ignore[union-attr]


def _started(vm: VMPlan) -> VMPlan:
    return vm.model_copy(update={"action": Action.START})


def _stopped(vm: VMPlan) -> VMPlan:
    return vm.model_copy(update={"action": Action.STOP})


def _created_stopped_clone(vm: VMPlan) -> VMPlan:
    return vm.model_copy(update={"action": Action.CREATE, "state": PowerState.STOPPED})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: _with(p, agent_run=_started(_vm(p, "agent-run"))), ("start-vm", "agent-run")),
        (lambda p: _with(p, agent_run=_stopped(_vm(p, "agent-run"))), ("stop-vm", "agent-run")),
        (
            lambda p: _with(p, agent_clone=_created_stopped_clone(_vm(p, "agent-clone"))),
            ("stop-vm", "agent-clone"),
        ),
    ],
)
def test_power_actions_become_cocoon_start_and_stop(
    examples: tuple[Path, Plan], change: Callable[[Plan], Plan], expected: tuple[str, str]
) -> None:
    assert expected in _kinds(change(examples[1]))


def test_a_run_that_needs_its_image_fetches_converts_and_records_it_once(examples: tuple[Path, Plan]) -> None:
    _, plan = examples
    run = _vm(plan, "agent-run")
    absent = [b.model_copy(update={"present": False}) for b in run.blobs]
    record = run.image_record.model_copy(update={"present": False})  # type: ignore[union-attr]
    created = run.model_copy(update={"action": Action.CREATE, "blobs": tuple(absent), "image_record": record})
    twin = created.model_copy(update={"name": "agent-run-2"})
    doubled = plan.model_copy(update={"vms": (*plan.vms, twin)})
    doubled = _with(doubled, agent_run=created)
    steps = compile_steps(doubled, ["agent-run", "agent-run-2"])
    fetched = [s.digest for s in steps if s.kind is StepKind.FETCH_BLOB]
    assert fetched == [b.digest for b in run.blobs], "each layer once, in order, for both VMs"
    assert [s.digest for s in steps if s.kind is StepKind.CONVERT_LAYER] == fetched
    assert [s.detail for s in steps if s.kind is StepKind.RECORD_IMAGE] == [record.key]
    assert [s.vm for s in steps if s.kind is StepKind.CREATE_VM] == ["agent-run", "agent-run-2"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.model_copy(update={"errors": (Diagnostic(summary="boom"),)}), "holds 1 error(s)"),
        (
            lambda p: _with(p, agent_run=_vm(p, "agent-run").model_copy(update={"action": Action.UNKNOWN})),
            "node-a/agent-run (action unknown)",
        ),
        (lambda p: p.model_copy(update={"refresh_only": True}), "refresh-only"),
    ],
)
def test_a_plan_that_cannot_be_carried_out_is_refused(
    examples: tuple[Path, Plan], change: Callable[[Plan], Plan], message: str
) -> None:
    with pytest.raises(PlanError, match=re.escape(message)):
        compile_steps(change(examples[1]))


def test_targets_limit_the_steps_and_must_be_in_the_plan(examples: tuple[Path, Plan]) -> None:
    _, plan = examples
    assert compile_steps(plan, ["agent-run"]) == ()  # up to date: nothing to do
    with pytest.raises(PlanError, match="ghost"):
        compile_steps(plan, ["ghost"])


def test_show_steps_prints_them_and_refuses_what_apply_would(examples: tuple[Path, Plan]) -> None:
    project, _ = examples
    shown = run_cli(["show", "plan.json", "--steps"], project)
    assert shown.exit_code == 0
    assert shown.stdout.splitlines()[0].startswith("  1. fetch-blob")
    as_json = json.loads(run_cli(["show", "plan.json", "--steps", "--json"], project).stdout)
    assert [s["kind"] for s in as_json][-2:] == ["record-ownership", "prove"]
    refreshed = run_cli(["plan", ".", "--refresh-only", "--out", "refresh.json"], project)
    assert refreshed.exit_code == 0
    refused = run_cli(["show", "refresh.json", "--steps"], project)
    assert refused.exit_code == 1 and "refresh-only plan proposes nothing" in refused.stderr
