"""``render --dir``: each VM's config.json, disk list and launch line as files for a GitOps repo."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Collection
from pathlib import Path

from cocoonplan import bounded
from cocoonplan.atomic import check_target, read_bounded, remove_file, update_file
from cocoonplan.bounded import InputLimitError
from cocoonplan.errors import CocoonplanError
from cocoonplan.model import NAME_PATTERN
from cocoonplan.planner.model import Action, ConfigOrigin, Plan, VMPlan

RENDERED_FILES = (
    "config.json",
    "config.derived.json",
    "disks.json",
    "launch",
    "restore.json",
    "provisional.json",
    "files.json",
)
CONFIG_FILES = {ConfigOrigin.WRITTEN: "config.json", ConfigOrigin.DERIVED: "config.derived.json"}
"""A config cocoon writes is ``config.json``; one derived from launch arguments says so in its name."""
MANIFEST = ".cocoonplan-render.json"
"""The files ``render --dir`` wrote into the directory: the only ones it ever removes."""
MANIFEST_KIND = "cocoonplan/render-manifest"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 4 << 20
_NAME = NAME_PATTERN.removeprefix("^").removesuffix("$")
_OWNABLE = re.compile(rf"{_NAME}/{_NAME}/(?:{'|'.join(map(re.escape, RENDERED_FILES))})")
"""The paths render writes, so the only ones a manifest may list."""


def _json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def rendered_files(vm: VMPlan) -> dict[str, str]:
    """The files rendered for one VM, by name.

    The config keeps cocoon's key order, indented so that reviews diff field by field; the
    launch is quoted so that a shell runs exactly the planned arguments; a clone's restore
    calls follow its launch; ``provisional.json`` lists the values cocoon or CNI choose at
    create time, and why; ``files.json`` is the proof of the spec's expected paths.
    """
    files = {
        CONFIG_FILES[vm.config_origin]: _json(vm.config),
        "disks.json": _json([d.model_dump(mode="json") for d in vm.disks]),
        "launch": shlex.join(vm.launch) + "\n",
        "provisional.json": _json({"provisional": list(vm.provisional), "notes": list(vm.notes)}),
    }
    if vm.restore:
        files["restore.json"] = _json([r.model_dump(mode="json") for r in vm.restore])
    if vm.files:
        files["files.json"] = _json([check.model_dump(mode="json") for check in vm.files])
    return files


def render_tree(plan: Plan) -> dict[str, str]:
    """Every rendered file of the plan, keyed by ``<node>/<vm>/<file>``; VMs to delete have none."""
    return {
        f"{vm.node}/{vm.name}/{name}": text
        for vm in plan.vms
        if vm.action is not Action.DELETE
        for name, text in rendered_files(vm).items()
    }


def _vm_of(path: str) -> tuple[str, str]:
    node, vm, _ = path.split("/")
    return node, vm


def _manifest_error(path: Path, problem: str) -> CocoonplanError:
    return CocoonplanError(
        f"{path}: not a render manifest cocoonplan can trust: {problem}",
        hint="it lists the files `render` wrote here; restore it from version control, or delete it "
        "(render then removes no file until it has written it again)",
    )


def read_manifest(directory: Path) -> set[str]:
    """The files an earlier ``render`` wrote under ``directory``: none without a manifest.

    Every entry must be a path render writes (``<node>/<vm>/<rendered file>``, names in cocoon's
    syntax, so never hidden and never ``..``): an edited manifest cannot make render remove
    anything else.
    """
    path = directory / MANIFEST
    data = read_bounded(directory, MANIFEST, MAX_MANIFEST_BYTES)
    if data is None:
        return set()
    try:
        if len(data) > MAX_MANIFEST_BYTES:
            raise InputLimitError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        document = bounded.loads(data)
    except InputLimitError as exc:
        raise _manifest_error(path, str(exc)) from exc
    known = isinstance(document, dict) and (document.get("kind"), document.get("format_version")) == (
        MANIFEST_KIND,
        MANIFEST_VERSION,
    )
    files = document.get("files") if known else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise _manifest_error(path, f"not a {MANIFEST_KIND} document of format_version {MANIFEST_VERSION}")
    if foreign := [f for f in files if not _OWNABLE.fullmatch(f)]:
        raise _manifest_error(path, f"it lists {foreign[0]!r}, which render never writes")
    return set(files)


def _record(directory: Path, files: Collection[str]) -> None:
    document = {"kind": MANIFEST_KIND, "format_version": MANIFEST_VERSION, "files": sorted(files)}
    update_file(directory, MANIFEST, _json(document))


def _present(directory: Path, relative: str) -> bool:
    path = directory / relative
    return path.is_symlink() or path.exists()


def _stale(
    plan: Plan, directory: Path, owned: Collection[str], keep: Collection[tuple[str, str]]
) -> list[str]:
    # Only files render wrote itself; those of a VM a spec outside the rendered paths defines
    # are not this render's to remove.
    wanted = render_tree(plan)
    return sorted(p for p in owned if p not in wanted and _vm_of(p) not in keep and _present(directory, p))


def differences(plan: Plan, directory: Path, keep: Collection[tuple[str, str]] = ()) -> list[str]:
    """Paths whose committed content differs from the plan: changed, missing, or stale (files an
    earlier render wrote for VMs no spec defines; ``keep`` lists (node, VM) pairs defined
    elsewhere). Files render did not write are never stale."""
    report = []
    for path, text in render_tree(plan).items():
        data = text.encode()
        current = read_bounded(directory, path, len(data))
        if current != data:
            report.append(f"{'missing' if current is None else 'changed'}: {path}")
    stale = _stale(plan, directory, read_manifest(directory), keep)
    return sorted(report + [f"stale:   {p}" for p in stale])


def write_tree(plan: Plan, directory: Path, keep: Collection[tuple[str, str]] = ()) -> list[str]:
    """Write the rendered files and remove the stale ones; returns the paths that changed.

    Every path is checked first, so a link or special file in the way fails the render before
    anything is written; each file is written atomically and never through a link
    (:mod:`cocoonplan.atomic`).
    """
    changed = differences(plan, directory, keep)
    wanted = render_tree(plan)
    owned = read_manifest(directory)
    stale = _stale(plan, directory, owned, keep)
    for path in (MANIFEST, *wanted, *stale):
        check_target(directory, path)
    # Claimed before written: an interrupted render still knows every file it may have left.
    _record(directory, owned | wanted.keys())
    for path, text in wanted.items():
        update_file(directory, path, text)
    for path in stale:
        remove_file(directory, path)
    _record(directory, (owned - set(stale)) | wanted.keys())
    return changed
