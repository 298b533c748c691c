"""Pull-request comments written as numbered files (``plan --markdown-dir``), for a CI job to post.

Part ``N`` is ``plan-N.md``. A later, shorter plan leaves no stale part behind: the parts after
the last are removed, but only those that begin with cocoonplan's hidden marker, as a file
cocoonplan did not write is not its to delete.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cocoonplan.atomic import read_bounded, remove_file, write_atomic

MARKER = b"<!-- cocoonplan-plan "


def part_name(number: int) -> str:
    """The file name of comment part ``number`` (from 1)."""
    return f"plan-{number}.md"


def write_comments(parts: Sequence[str], directory: Path) -> list[str]:
    """Write ``parts`` as ``directory/plan-N.md`` and remove stale later parts; the report
    lines (``wrote: …``, ``removed: …``)."""
    report = []
    for number, text in enumerate(parts, 1):
        write_atomic(directory, part_name(number), text)
        report.append(f"wrote: {directory / part_name(number)}")
    number = len(parts) + 1
    while (held := read_bounded(directory, part_name(number), len(MARKER))) is not None:
        if not held.startswith(MARKER):
            break
        remove_file(directory, part_name(number))
        report.append(f"removed: {directory / part_name(number)}")
        number += 1
    return report
