"""Change and drift lines for human renders, computed from the plan document alone.

Disks read as ``~ disks[2] cocoon-layer2: 51189d…erofs → e91c01…erofs``; runs of added or
removed disks collapse to ``+ disks[6..10]``; config.json changes read field by field.
"""

from __future__ import annotations

import json
from typing import Any

from cocoonplan.model import short_digest
from cocoonplan.units import format_size

_ABBREV = 12


def _value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(", ", ": "))


def _file(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    stem, _, suffix = name.partition(".")
    if len(stem) == 64:
        return f"{stem[:_ABBREV]}…{suffix}"
    return name


def _changed_disk(path: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    same_disk = before["serial"] == after["serial"] and before["role"] == after["role"]
    if (
        same_disk
        and before["readonly"] == after["readonly"]
        and _file(before["path"]) != _file(after["path"])
    ):
        return f"~ {path} {after['serial']}: {_file(before['path'])} → {_file(after['path'])}"
    # Anything else shows every field that differs, full paths included.
    fields = [
        f"{key} {_value(before.get(key))} → {_value(after.get(key))}"
        for key in ("serial", "role", "readonly", "path", "digest")
        if before.get(key) != after.get(key)
    ]
    return f"~ {path} {after['serial']}: " + ", ".join(fields)


def _index(path: str) -> int:
    return int(path[len("disks[") : -1])


def _disk_runs(changes: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    run: list[dict[str, Any]] = []

    def flush() -> None:
        if not run:
            return
        symbol = "+" if run[0]["before"] is None else "-"
        first, last = _index(run[0]["path"]), _index(run[-1]["path"])
        where = f"disks[{first}]" if first == last else f"disks[{first}..{last}]"
        side = "after" if symbol == "+" else "before"
        lines.append(f"{symbol} {where} {', '.join(c[side]['serial'] for c in run)}")
        run.clear()

    for change in changes:
        before, after = change["before"], change["after"]
        if before is not None and after is not None:
            flush()
            lines.append(_changed_disk(change["path"], before, after))
            continue
        adding = before is None
        contiguous = bool(run) and _index(change["path"]) == _index(run[-1]["path"]) + 1
        if run and ((run[0]["before"] is None) != adding or not contiguous):
            flush()
        run.append(change)
    flush()
    return lines


def _blob(change: dict[str, Any]) -> str:
    digest = change["path"][len("blobs[") : -1]
    after = change["after"]
    if after is None:
        return f"- blob {short_digest(digest)} (no longer used by this VM)"
    where = "present on the node" if after["present"] else "to fetch"
    return f"+ blob {short_digest(digest)} {format_size(after['size'])} ({where})"


def change_lines(changes: list[dict[str, Any]]) -> list[str]:
    """Terraform-style lines for a VM's changes, disks collapsed, everything else field by field."""
    disks = [c for c in changes if c["path"].startswith("disks[")]
    lines = []
    for change in changes:
        if change["path"].startswith("disks["):
            if change is disks[0]:
                lines += _disk_runs(disks)
            continue
        if change["path"].startswith("blobs["):
            lines.append(_blob(change))
            continue
        before, after = change["before"], change["after"]
        if before is None:
            lines.append(f"+ {change['path']}: {_value(after)}")
        elif after is None:
            lines.append(f"- {change['path']}: {_value(before)}")
        else:
            lines.append(f"~ {change['path']}: {_value(before)} → {_value(after)}")
    return lines
