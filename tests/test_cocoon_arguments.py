"""The cocoon command lines apply runs, per release line, from the examples' plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from clirunner import copy_examples, run_cli
from cocoonplan.executors.cocoon import clone_arguments, run_arguments
from cocoonplan.planfile import read_plan
from cocoonplan.planner.model import Plan, VMPlan
from cocoonplan.planner.rules import RULES
from cocoonplan.releases import CocoonLine
from cocoonplan.spec import PowerState, RestoreMode


def _plan(tmp_path: Path, version: str) -> Plan:
    project = copy_examples(tmp_path / version)
    config = project / "cocoonplan.yaml"
    config.write_text(
        config.read_text().replace("    cpus: 16\n", f"    cpus: 16\n    cocoonVersion: {version}\n")
    )
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    return read_plan(project / "p.json")


def _vm(plan: Plan, name: str) -> VMPlan:
    return next(vm for vm in plan.vms if vm.name == name)


def test_a_run_is_created_by_its_manifest_digest_with_every_planned_setting(tmp_path: Path) -> None:
    run = _vm(_plan(tmp_path, "v0.3.8"), "agent-run")
    assert run.source is not None
    args = run_arguments(run)
    assert args[:2] == ["vm", "run"] and args[-1] == run.source.digest
    for flag, value in (("--name", "agent-run"), ("--cpu", "2"), ("--memory", "1073741824"), ("--nics", "1")):
        assert args[args.index(flag) + 1] == value
    assert "--no-direct-io" not in args
    stopped = run.model_copy(update={"state": PowerState.STOPPED})
    assert run_arguments(stopped)[:2] == ["vm", "create"], "a VM to be left stopped is only created"


@pytest.mark.parametrize(
    ("version", "resizes", "extra"),
    [("v0.3.8", True, []), ("v0.6.4", False, ["--restore-mode", "copy"])],
)
def test_a_clone_takes_the_flags_of_its_nodes_line(
    tmp_path: Path, version: str, resizes: bool, extra: list[str]
) -> None:
    plan = _plan(tmp_path, version)
    clone = _vm(plan, "agent-clone")
    line = plan.nodes[0].cocoon.line if plan.nodes[0].cocoon else CocoonLine.V0_3
    args = clone_arguments(clone, "cocoonplan-snap", RULES[line])
    assert args[:2] == ["vm", "clone"] and args[-1] == "cocoonplan-snap"
    assert ("--cpu" in args) is resizes and ("--memory" in args) is resizes
    assert all(flag in args for flag in extra)
    assert "--on-demand" not in args
    if resizes:
        on_demand = clone.model_copy(update={"restore_mode": RestoreMode.ONDEMAND})
        assert "--on-demand" in clone_arguments(on_demand, "s", RULES[line])
