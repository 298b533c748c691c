"""Human and Markdown renders of the plan document, through jinja2 templates.

Every value a template outputs is escaped for its target, as HTML templates autoescape: the
human environment shows control characters as escapes (:func:`plain`), the Markdown one
escapes everything Markdown would read (:func:`md`). A value in another context goes through
the filter for it (``code``, ``fence``, ``html``), whose :class:`Escaped` result is kept as is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import jinja2

from cocoonplan.model import short_digest
from cocoonplan.planner.model import SYMBOLS, Action
from cocoonplan.render.changes import change_lines
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


def _environment(escape: Callable[[str], Escaped]) -> jinja2.Environment:
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
    env.filters["change_lines"] = change_lines
    env.filters["compact"] = lambda v: json.dumps(v, ensure_ascii=False, separators=(", ", ": "))
    env.filters["plain"] = plain
    env.filters["plain_lines"] = plain_lines
    env.filters["code"] = code
    env.filters["fence"] = fence
    env.filters["html"] = html
    return env


def _by_severity(document: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(document["vms"], key=lambda vm: (_ORDER[Action(vm["action"])], vm["node"], vm["name"]))


def render_human(document: dict[str, Any]) -> str:
    """Terraform-style text: lock changes, one block per VM, errors, then the summary line."""
    template = _environment(plain).get_template("plan.txt.j2")
    return template.render(doc=document, vms=_by_severity(document))


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


def render_markdown(document: dict[str, Any], limit: int = MARKDOWN_LIMIT) -> str:
    """A pull-request comment of at most ``limit`` characters.

    The summary, errors, lock changes and destructive changes come first; VM sections that
    do not fit are left out and the cut is said at the end.
    """
    env = _environment(md)
    head = env.get_template("plan.md.j2").render(doc=document)
    if len(head) > limit // 2:
        head = _cut(head, limit // 2, limit)
    section = env.get_template("vm.md.j2")
    parts = [head]
    used = len(head)
    vms = _by_severity(document)
    for shown, vm in enumerate(vms):
        text = section.render(vm=vm)
        note = f"\n_{len(vms) - shown} more VMs not shown: the comment would exceed {limit} characters; see `cocoonplan show`._\n"
        if used + len(text) + len(note) > limit:
            parts.append(note)
            break
        parts.append(text)
        used += len(text)
    return "".join(parts)
