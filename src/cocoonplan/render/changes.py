"""Change and drift lines for human and Markdown renders, from the plan document alone.

A line is ``(marker, text)``: ``+`` added, ``-`` removed, ``~`` changed, ``→`` moved, ``!``
drift. The compact view shows the changes that stand on their own (``cause`` null), disk
runs collapsed (``~ disks cocoon-layer2..5: a b → c d``, ``→ disks cocoon-cow [6] → [11]``)
and a resource change with a digest of what follows from it; everything else is counted.
The full view lists every change, each consequence beneath its cause.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from cocoonplan.model import short_digest
from cocoonplan.planner.model import dotted
from cocoonplan.units import format_size

Line = tuple[str, str]
JSON = dict[str, Any]
_MARKERS = {"add": "+", "remove": "-", "update": "~", "move": "→"}
_LAYER = re.compile(r"^cocoon-layer(\d+)$")
_RUN_CHUNK = 4
"""Digests per line in a run of swapped or inserted layers."""
_VALUE_WIDTH = 96
"""Characters of a value the compact view shows."""


def value_text(value: Any, width: int | None = None) -> str:
    """A value as JSON text (strings quoted), cut to ``width`` characters with ``…``."""
    if isinstance(value, dict) and width is not None:
        return f"{{… {len(value)} keys}}"
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(", ", ": "))
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def _short(digest: str | None) -> str:
    return short_digest(digest) if digest else "-"


def _serials(disks: Sequence[JSON]) -> str:
    """``cocoon-layer6..10`` for consecutive layers, else the serials comma-joined."""
    numbers = [_LAYER.match(d["serial"]) for d in disks]
    if len(disks) > 1 and all(numbers):
        first, last = (int(m.group(1)) for m in (numbers[0], numbers[-1]) if m)
        if last - first == len(disks) - 1:
            return f"cocoon-layer{first}..{last}"
    return ", ".join(d["serial"] for d in disks)


def _runs(changes: Sequence[JSON], op: str) -> Iterator[list[JSON]]:
    """Consecutive (by index) disk changes of ``op``, as runs."""
    run: list[JSON] = []
    for change in changes:
        if change["op"] != op:
            continue
        side = change["after"] if op != "remove" else change["before"]
        if run and side["index"] != (run[-1]["after"] if op != "remove" else run[-1]["before"])["index"] + 1:
            yield run
            run = []
        run.append(change)
    if run:
        yield run


def _swapped(change: JSON) -> bool:
    before, after = change["before"], change["after"]
    return before["role"] == after["role"] == "layer" and {k for k in before if before[k] != after[k]} <= {
        "digest",
        "path",
    }


def _fields(before: JSON, after: JSON) -> str:
    return ", ".join(
        f"{key} {value_text(before.get(key), 40)} → {value_text(after.get(key), 40)}"
        for key in after
        if key not in ("index", "path") and before.get(key) != after.get(key)
    )


def disk_lines(changes: Sequence[JSON]) -> list[Line]:
    """Standing disk changes: swapped layers and insertions as runs, moves on one line."""
    lines: list[Line] = []
    swaps = [c for c in changes if c["op"] == "update" and _swapped(c)]
    for run in _runs(swaps, "update"):
        for at in range(0, len(run), _RUN_CHUNK):
            chunk = run[at : at + _RUN_CHUNK]
            old = " ".join(_short(c["before"]["digest"]) for c in chunk)
            new = " ".join(_short(c["after"]["digest"]) for c in chunk)
            lines.append(("~", f"disks {_serials([c['after'] for c in chunk])}: {old} → {new}"))
    for change in changes:
        if change["op"] == "update" and change not in swaps:
            lines.append(
                ("~", f"disks {change['after']['serial']}: {_fields(change['before'], change['after'])}")
            )
    for op, verb in (("add", "at"), ("remove", "gone from")):
        side = "after" if op == "add" else "before"
        for run in _runs(changes, op):
            disks = [c[side] for c in run]
            first, last = disks[0]["index"], disks[-1]["index"]
            where = f"[{first}]" if first == last else f"[{first}..{last}]"
            digests = " ".join(_short(d.get("digest")) for d in disks if d.get("digest"))
            lines.append(
                (
                    _MARKERS[op],
                    f"disks {_serials(disks)} {verb} {where}" + (f": {digests}" if digests else ""),
                )
            )
    moves = [c for c in changes if c["op"] == "move"]
    if moves:
        said = []
        for c in moves:
            other = _fields(c["before"], c["after"])
            said.append(
                f"{c['after']['serial']} [{c['before']['index']}] → [{c['after']['index']}]"
                + (f" ({other})" if other else "")
            )
        lines.append(("→", "disks " + ", ".join(said)))
    return lines


def _token(value: Any) -> str:
    # Launch and cmdline values are text: shown bare; anything else as JSON.
    return value if isinstance(value, str) else value_text(value)


def digest_of(changes: Sequence[JSON]) -> list[str]:
    """What a fact's consequences amount to, one entry per option: ``launch --cpus boot: 2 → 4``,
    ``launch --disk num_queues: 2 → 4 (7)``; an option changed alike on many devices is said
    once, with a count."""
    groups: Counter[tuple[str, str]] = Counter()
    for change in changes:
        path = change["path"]
        where = " ".join(str(p) for p in (path[:2] if len(path) > 2 else path))
        field = f" {path[-1]}" if len(path) > 2 else ""
        if change["op"] == "update":
            what = f"{_cut(_token(change['before']))} → {_cut(_token(change['after']))}"
        else:
            what = f"{change['op']}ed"
        groups[(f"{where}{field}", what)] += 1
    return [
        f"{where}: {what}" + (f" ({count})" if count > 1 else "") for (where, what), count in groups.items()
    ]


def _cut(text: str, width: int = _VALUE_WIDTH // 2) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _change_text(change: JSON, width: int | None) -> str:
    path, op = change["path"], change["op"]
    if change["kind"] == "blob":
        if op == "remove":
            return f"blob {_short(str(path[1]))} (no longer used by this VM)"
        after = change["after"]
        return f"blob {_short(str(path[1]))} {format_size(after['size'])} ({'present on the node' if after['present'] else 'to fetch'})"
    where = dotted(tuple(path))
    if change["kind"] == "disk":
        return f"{where}: {_disk_text(change, width)}"
    if op == "add":
        return f"{where}: {value_text(change['after'], width)}"
    if op == "remove":
        return f"{where}: {value_text(change['before'], width)}"
    if op == "move":
        return f"{where}: [{change['before']['index']}] → [{change['after']['index']}]"
    return f"{where}: {value_text(change['before'], width)} → {value_text(change['after'], width)}"


def _disk_text(change: JSON, width: int | None) -> str:
    before, after = change["before"], change["after"]
    if change["op"] in ("add", "remove"):
        disk = after if change["op"] == "add" else before
        said = [f"[{disk['index']}]", disk["role"], "ro" if disk["readonly"] else "rw"]
        return " ".join(said + [str(disk[k]) for k in ("digest", "path") if disk.get(k)])
    return ", ".join(
        f"{key} {value_text(before.get(key), width)} → {value_text(after.get(key), width)}"
        for key in after
        if before.get(key) != after.get(key)
    )


def _follows(changes: Sequence[JSON], cause: Sequence[str | int]) -> list[JSON]:
    return [c for c in changes if c["cause"] == list(cause)]


def fact_lines(vm: JSON) -> list[tuple[str, str, int]]:
    """The compact view of a VM's changes: each standing change once, disks as runs, and
    beneath a setting what it changes in the launch or ``config.json``."""
    changes = vm["changes"]
    standing = [c for c in changes if c["cause"] is None]
    lines = [(marker, text, 0) for marker, text in disk_lines([c for c in standing if c["kind"] == "disk"])]
    for change in standing:
        if change["kind"] == "disk":
            continue
        lines.append((_MARKERS[change["op"]], _change_text(change, _VALUE_WIDTH), 0))
        follows = [c for c in _follows(changes, change["path"]) if c["kind"] in ("launch", "config")]
        lines += [("~", said, 1) for said in digest_of(follows)]
    return lines


def follow_count(vm: JSON) -> tuple[int, list[str]]:
    """How many changes follow from others and are not in the compact view, and their kinds."""
    said = {tuple(c["path"]) for c in vm["changes"] if c["cause"] is None and c["kind"] not in ("disk",)}
    hidden = [
        c
        for c in vm["changes"]
        if c["cause"] is not None and not (tuple(c["cause"]) in said and c["kind"] in ("launch", "config"))
    ]
    return len(hidden), sorted({c["kind"] for c in hidden})


def all_lines(vm: JSON) -> list[tuple[str, str, int]]:
    """Every change, full values, each consequence indented beneath its cause."""
    changes = vm["changes"]
    lines: list[tuple[str, str, int]] = []

    def add(change: JSON, depth: int) -> None:
        lines.append((_MARKERS[change["op"]], _change_text(change, None), depth))
        for follower in _follows(changes, change["path"]):
            add(follower, depth + 1)

    known = {tuple(c["path"]) for c in changes}
    for change in changes:
        if change["cause"] is None or tuple(change["cause"]) not in known:
            add(change, 0)
    return lines


def _layer_runs(drift: Sequence[JSON]) -> Iterator[list[JSON]]:
    """Consecutive layer drift entries that say the same: alien layers from the same
    images, or missing layers."""
    run: list[JSON] = []
    for entry in drift:
        key = (entry["found"] is None, entry["found_in"])
        if run and (
            key != (run[-1]["found"] is None, run[-1]["found_in"])
            or entry["path"][1] != run[-1]["path"][1] + 1
        ):
            yield run
            run = []
        run.append(entry)
    if run:
        yield run


def drift_header(vm: JSON) -> str:
    """The line a drifted VM is introduced by; with layer drift, whose layers it should run on."""
    said = f"{vm['name']} on {vm['node']} ({vm['observed_id'] or vm['vm_id']})"
    if any(d["kind"] == "layer" for d in vm["drift"]):
        base = (vm.get("base_image") or vm.get("source") or {}).get("ref", "its image")
        whose = "the snapshot's base" if vm["mode"] == "clone" else "the image"
        said += f" runs on layers that are not {whose} {base}'s"
    return said


def drift_lines(vm: JSON) -> list[Line]:
    """A VM's drift: layer runs (``layer2..5 belong to X: …``), then launch and file drift."""
    lines: list[Line] = []
    for run in _layer_runs([d for d in vm["drift"] if d["kind"] == "layer"]):
        first, last = run[0]["path"][1], run[-1]["path"][1]
        where = f"layer{first}" if first == last else f"layer{first}..{last}"
        if run[0]["found"] is None:
            lines.append(
                (
                    "!",
                    f"{where} {'is' if first == last else 'are'} missing: {' '.join(_short(d['expected']) for d in run)}",
                )
            )
        else:
            owners = ", ".join(run[0]["found_in"]) or "no image on the node"
            lines.append(
                (
                    "!",
                    f"{where} belong{'s' if first == last else ''} to {owners}: {' '.join(_short(d['found']) for d in run)}",
                )
            )
    for entry in vm["drift"]:
        if entry["kind"] == "file":
            lines.append(("!", f"{entry['path'][1]} {entry['message']}"))
        elif entry["kind"] != "layer":
            text = f"{dotted(tuple(entry['path']))}: {entry['message']}"
            if entry["changes"]:
                text += f"; differs in {'; '.join(digest_of(entry['changes']))}"
            lines.append(("!", text))
    return lines


_VERDICT_MARKERS = {"holds": "✓", "fails": "✗", "unknown": "?"}


def file_lines(vm: JSON) -> list[Line]:
    """The spec's expected paths proven against the planned layers, one line each."""
    lines: list[Line] = []
    for check in vm.get("files", ()):
        what = "absent" if check["expect"] == "absent" else "present"
        said = f"{check['path']} {what}" + (f": {check['message']}" if check["message"] else "")
        lines.append((_VERDICT_MARKERS[check["verdict"]], said))
    return lines
