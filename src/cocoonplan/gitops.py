"""``render --dir``: each VM's config.json, disk list and launch line as files for a GitOps repo."""

from __future__ import annotations

import json
import shlex
from collections.abc import Collection
from pathlib import Path

from cocoonplan.errors import PlanError
from cocoonplan.planner.model import Action, ConfigOrigin, Plan, VMPlan

RENDERED_FILES = (
    "config.json",
    "config.derived.json",
    "disks.json",
    "launch",
    "restore.json",
    "provisional.json",
)
CONFIG_FILES = {ConfigOrigin.WRITTEN: "config.json", ConfigOrigin.DERIVED: "config.derived.json"}
"""A config cocoon writes is ``config.json``; one derived from launch arguments says so in its name."""


def _json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def rendered_files(vm: VMPlan) -> dict[str, str]:
    """The files rendered for one VM, by name.

    The config keeps cocoon's key order, indented so that reviews diff field by field; the
    launch is quoted so that a shell runs exactly the planned arguments; a clone's restore
    calls follow its launch; ``provisional.json`` lists the values cocoon or CNI choose at
    create time, and why.
    """
    files = {
        CONFIG_FILES[vm.config_origin]: _json(vm.config),
        "disks.json": _json([d.model_dump(mode="json") for d in vm.disks]),
        "launch": shlex.join(vm.launch) + "\n",
        "provisional.json": _json({"provisional": list(vm.provisional), "notes": list(vm.notes)}),
    }
    if vm.restore:
        files["restore.json"] = _json([r.model_dump(mode="json") for r in vm.restore])
    return files


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
