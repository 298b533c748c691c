"""Human and Markdown renders of the plan document, through jinja2 templates.

Every value a template outputs is escaped for its target, as HTML templates autoescape: the
human environment shows control characters as escapes (:func:`plain`), the Markdown one
escapes everything Markdown would read (:func:`md`). A value in another context goes through
the filter for it (``code``, ``fence``, ``html``), whose :class:`Escaped` result is kept as is.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from typing import Any

import jinja2

from cocoonplan.model import short_digest
from cocoonplan.planner.model import SYMBOLS, Action
from cocoonplan.render.changes import (
    all_lines,
    drift_header,
    drift_lines,
    fact_lines,
    file_lines,
    follow_count,
)
from cocoonplan.render.escape import Escaped, code, fence, html, md, plain, plain_lines
from cocoonplan.units import format_size

MARKDOWN_LIMIT = 60_000
"""GitHub refuses comments over 65,536 characters; stay well below."""
_ORDER = {
    Action.DELETE: 0,
    Action.REPLACE: 1,
    Action.UNKNOWN: 2,
    Action.UPDATE: 3,
    Action.STOP: 4,
    Action.START: 5,
    Action.CREATE: 6,
    Action.NO_OP: 7,
}
_VERBS = {
    Action.CREATE: "will be created",
    Action.REPLACE: "must be replaced",
    Action.UPDATE: "will be updated in place",
    Action.DELETE: "will be deleted",
    Action.START: "will be started",
    Action.STOP: "will be stopped",
    Action.UNKNOWN: "is undecided: nothing will be done to it",
    Action.NO_OP: "is up to date",
}


_STYLES = {
    "bold": "1",
    "+": "32",
    "-": "31",
    "~": "33",
    "→": "33",
    "!": "35",
    Action.CREATE: "32",
    Action.DELETE: "31",
    Action.REPLACE: "31",
    Action.UPDATE: "33",
    Action.START: "32",
    Action.STOP: "33",
    Action.UNKNOWN: "35",
    Action.NO_OP: "0",
}
"""ANSI colours of markers, action symbols and headings (SGR codes)."""
_ABSOLUTE = re.compile(r"/\S+/")


def _painter(color: bool) -> Callable[[str, str], Escaped]:
    def paint(text: str, style: str) -> Escaped:
        shown = text if isinstance(text, Escaped) else plain(text)
        return Escaped(f"\x1b[{_STYLES[style]}m{shown}\x1b[0m") if color else shown

    return paint


def _footer(vm: dict[str, Any]) -> str:
    """What the compact view leaves out of a VM, and the values it shows that are provisional."""
    said = []
    if "vm_id" in vm["provisional"]:
        said.append(f"new vm id {vm['vm_id']} *")
    if vm["fetch_bytes"]:
        fetched = [b for b in vm["blobs"] if not b["present"]]
        said.append(
            f"{len(fetched)} blob{'' if len(fetched) == 1 else 's'} to fetch ({format_size(vm['fetch_bytes'])})"
        )
    count, kinds = follow_count(vm)
    if count:
        said.append(f"{count} change{'' if count == 1 else 's'} that follow ({', '.join(kinds)})")
    if vm["notes"]:
        said.append(f"{len(vm['notes'])} note{'' if len(vm['notes']) == 1 else 's'}")
    if count or vm["notes"]:
        said.append("-v shows all")
    return "; ".join(said)


def _environment(escape: Callable[[str], Escaped], color: bool = False) -> jinja2.Environment:
    def finalize(value: object) -> object:
        return escape(value) if isinstance(value, str) and not isinstance(value, Escaped) else value

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cocoonplan", "render/templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=finalize,
    )
    env.filters["short"] = lambda d: short_digest(d) if d else "-"
    env.filters["size"] = format_size
    env.filters["symbol"] = lambda a: SYMBOLS[Action(a)]
    env.filters["verb"] = lambda a: _VERBS[Action(a)]
    env.filters["fact_lines"] = fact_lines
    env.filters["all_lines"] = all_lines
    env.filters["drift_lines"] = drift_lines
    env.filters["drift_header"] = drift_header
    env.filters["file_lines"] = file_lines
    env.filters["footer"] = _footer
    env.filters["vm_label"] = lambda vm: f"{vm['name']} on {vm['node']}"
    env.filters["brief_path"] = lambda text: _ABSOLUTE.sub("…/", text)
    env.filters["shell"] = shlex.join
    env.filters["paint"] = _painter(color)
    env.filters["compact"] = lambda v: json.dumps(v, ensure_ascii=False, separators=(", ", ": "))
    env.filters["plain"] = plain
    env.filters["plain_lines"] = plain_lines
    env.filters["code"] = code
    env.filters["fence"] = fence
    env.filters["html"] = html
    return env


def _by_severity(document: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(document["vms"], key=lambda vm: (_ORDER[Action(vm["action"])], vm["node"], vm["name"]))


def _acting(document: dict[str, Any]) -> list[dict[str, Any]]:
    """VMs an action is proposed for (refresh-only: none), most severe first."""
    if document["refresh_only"]:
        return []
    return [vm for vm in _by_severity(document) if vm["action"] != Action.NO_OP]


def _unchanged(document: dict[str, Any]) -> list[dict[str, Any]]:
    if document["refresh_only"]:
        return [vm for vm in _by_severity(document) if not vm["drift"]]
    return [vm for vm in _by_severity(document) if vm["action"] == Action.NO_OP]


def render_human(document: dict[str, Any], *, verbose: bool = False, color: bool = False) -> str:
    """Terraform-style text: drift first, then actions (compact unless ``verbose``), the VMs
    without changes on one line, warnings, errors and one summary line."""
    template = _environment(plain, color).get_template("plan.txt.j2")
    acting = _acting(document)
    return template.render(
        doc=document,
        drifted=[vm for vm in _by_severity(document) if vm["drift"]],
        acting=acting,
        unchanged=_unchanged(document),
        provisional=any(vm["provisional"] for vm in acting),
        verbose=verbose,
    )


_FENCE_LINE = re.compile(r"( *)(`{3,})([^`]*)")


def _open_fence(text: str) -> str | None:
    """The fence line that would close a code block left open at the end of ``text``.

    Only the templates write lines of backticks: content inside a block never holds a run
    as long as its fence, and outside one every backtick is escaped or inside a span.
    """
    opened: re.Match[str] | None = None
    for line in text.split("\n"):
        found = _FENCE_LINE.fullmatch(line)
        if found is None:
            continue
        if opened is None:
            opened = found
        elif len(found.group(2)) >= len(opened.group(2)) and not found.group(3).strip():
            opened = None
    return opened.group(1) + opened.group(2) if opened else None


def _cut(text: str, size: int, limit: int) -> str:
    """``text`` cut to ``size`` characters with a note, any open code block closed."""
    note = f"\n_… cut here: the comment would exceed {limit} characters; see `cocoonplan show`._\n\n"
    kept = text[: size - len(note)]
    while True:
        fence_line = _open_fence(kept)
        closing = f"\n{fence_line}" if fence_line else ""
        if len(kept) + len(closing) + len(note) <= size:
            return kept + closing + note
        kept = kept[: size - len(note) - len(closing)]


_DIFF_MARKERS = {"~": "!", "→": "!"}
"""GitHub highlights ``+``, ``-`` and ``!`` lines of a ``diff`` block; ``~`` it leaves plain."""
_UNCHANGED_CHUNK = 200
"""VMs named per block of the no-change list, so that even it splits between comments."""


def _diff_line(line: tuple[str, ...]) -> str:
    marker, text = line[0], line[1]
    depth = int(line[2]) if len(line) > 2 else 0
    return f"{_DIFF_MARKERS.get(marker, marker)} {'  ' * depth}{text}"


def _marker(document: dict[str, Any], part: int, parts: int) -> str:
    """The hidden first line of every comment: a CI job finds its comment by it and updates it."""
    return f"<!-- cocoonplan-plan part={part} of={parts} digest={document['digest']} -->\n"


def _blocks(document: dict[str, Any]) -> list[str]:
    """The comment as blocks that are never split: the head, each error, each drifted VM,
    each acting VM's section, the no-change list in chunks, and the warnings."""
    env = _environment(md)
    env.filters["diff_line"] = _diff_line
    acting = _acting(document)
    destructive = [vm for vm in acting if vm["destroys"]]
    blocks = [env.get_template("plan.md.j2").render(doc=document, destructive=destructive)]
    error = env.get_template("error.md.j2")
    blocks += [error.render(e=e, first=i == 0) for i, e in enumerate(document["errors"])]
    drift = env.get_template("drift.md.j2")
    drifted = [vm for vm in _by_severity(document) if vm["drift"]]
    blocks += [drift.render(vm=vm, first=i == 0) for i, vm in enumerate(drifted)]
    section = env.get_template("vm.md.j2")
    blocks += [section.render(doc=document, vm=vm, first=i == 0) for i, vm in enumerate(acting)]
    unchanged = _unchanged(document)
    tail = env.get_template("tail.md.j2")
    only = document["refresh_only"]
    for at in range(0, len(unchanged), _UNCHANGED_CHUNK):
        chunk = unchanged[at : at + _UNCHANGED_CHUNK]
        blocks.append(tail.render(refresh_only=only, unchanged=chunk, warnings=[]))
    blocks.append(tail.render(refresh_only=only, unchanged=[], warnings=document["warnings"]))
    return [block for block in blocks if block.strip()]


def render_markdown_parts(document: dict[str, Any], limit: int = MARKDOWN_LIMIT) -> list[str]:
    """The pull-request comment, split into as many comments as it takes, each at most
    ``limit`` characters: blocks are never split (one too large on its own is cut, its code
    block closed), each part starts with a hidden marker and says which part it is."""
    reserve = len(_marker(document, 999_999, 999_999)) + 300  # marker and continuation lines
    budget = limit - reserve
    parts: list[list[str]] = [[]]
    used = 0
    for block in _blocks(document):
        if len(block) > budget:
            block = _cut(block, budget, limit)
        if used + len(block) > budget and parts[-1]:
            parts.append([])
            used = 0
        parts[-1].append(block)
        used += len(block)
    total = len(parts)
    rendered = []
    for number, blocks in enumerate(parts, 1):
        head = _marker(document, number, total)
        if number > 1:
            head += f"_cocoonplan plan {code(document['digest'])}, continued: part {number} of {total}._\n"
        body = "".join(blocks)
        if number < total:
            body += f"\n_Continued in part {number + 1} of {total}._\n"
        rendered.append(head + body)
    return rendered


def render_markdown(document: dict[str, Any], limit: int = MARKDOWN_LIMIT) -> str:
    """Every part of the pull-request comment, one after the other (each begins with its
    hidden marker line, so a CI job can split them)."""
    return "\n".join(render_markdown_parts(document, limit))
