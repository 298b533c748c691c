"""``render --dir``: each VM's config.json, disk list and launch line as files for a GitOps repo."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from cocoonplan.errors import PlanError
from cocoonplan.planner.model import Action, Plan, VMPlan

RENDERED_FILES = ("config.json", "disks.json", "launch")


def rendered_files(vm: VMPlan) -> dict[str, str]:
    """The files rendered for one VM, by name: pretty JSON (key order kept) and the launch line.

    config.json keeps cocoon's key order; it is indented so that reviews diff field by field.
    """
    disks = [d.model_dump(mode="json") for d in vm.disks]
    return {
        "config.json": json.dumps(vm.config, indent=2, ensure_ascii=False) + "\n",
        "disks.json": json.dumps(disks, indent=2) + "\n",
        "launch": vm.launch + "\n",
    }


def render_tree(plan: Plan) -> dict[str, str]:
    """Every rendered file of the plan, keyed by ``<node>/<vm>/<file>``; VMs to delete have none."""
    return {
        f"{vm.node}/{vm.name}/{name}": text
        for vm in plan.vms
        if vm.action is not Action.DELETE
        for name, text in rendered_files(vm).items()
    }


def _inside(directory: Path, relative: str) -> Path:
    # Node and VM names are checked against cocoon's name syntax; this is the last guard.
    target = (directory / relative).resolve()
    if not target.is_relative_to(directory.resolve()):
        raise PlanError(f"rendered path {relative!r} would leave {directory}", hint="rename the node or VM")
    return target


def existing_tree(directory: Path) -> dict[str, str]:
    """The rendered files already under ``directory``."""
    if not directory.is_dir():
        return {}
    return {
        p.relative_to(directory).as_posix(): p.read_text()
        for p in directory.glob("*/*/*")
        if p.is_file() and p.name in RENDERED_FILES
    }


def _stale(plan: Plan, directory: Path, keep: Collection[tuple[str, str]]) -> list[str]:
    # Files of a VM that a spec outside the rendered paths defines are not this render's to remove.
    wanted = render_tree(plan)
    return [p for p in existing_tree(directory) if p not in wanted and tuple(p.split("/")[:2]) not in keep]


def differences(plan: Plan, directory: Path, keep: Collection[tuple[str, str]] = ()) -> list[str]:
    """Paths whose committed content differs from the plan: changed, missing, or stale (files of
    VMs no spec defines; ``keep`` lists (node, VM) pairs defined elsewhere)."""
    wanted = render_tree(plan)
    have = existing_tree(directory)
    return sorted(
        [f"changed: {p}" for p in wanted if p in have and have[p] != wanted[p]]
        + [f"missing: {p}" for p in wanted if p not in have]
        + [f"stale:   {p}" for p in _stale(plan, directory, keep)]
    )


def write_tree(plan: Plan, directory: Path, keep: Collection[tuple[str, str]] = ()) -> list[str]:
    """Write the rendered files and remove stale ones; returns the paths that changed."""
    changed = differences(plan, directory, keep)
    for path, text in render_tree(plan).items():
        target = _inside(directory, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text() != text:
            temp = target.with_name(f".{target.name}.tmp")
            temp.write_text(text)
            temp.replace(target)
    for path in _stale(plan, directory, keep):
        _inside(directory, path).unlink()
    return changed
