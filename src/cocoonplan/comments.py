"""Pull-request comments written as numbered files (``plan --markdown-dir``), for a CI job to post.

Part ``N`` is ``plan-N.md``. A later, shorter plan leaves no stale part behind: the parts after
the last are removed, but only those that begin with cocoonplan's hidden marker, as a file
cocoonplan did not write is not its to delete.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cocoonplan.atomic import check_target, read_bounded, remove_file, write_atomic

MARKER = b"<!-- cocoonplan-plan "


def part_name(number: int) -> str:
    """The file name of comment part ``number`` (from 1)."""
    return f"plan-{number}.md"


def write_comments(parts: Sequence[str], directory: Path) -> list[str]:
    """Write ``parts`` as ``directory/plan-N.md`` and remove stale later parts; the report
    lines (``wrote: …``, ``removed: …``). A link or special file where a part goes, or among
    the stale parts, is refused before anything is written."""
    for number in range(1, len(parts) + 1):
        check_target(directory, part_name(number))
    stale = []
    number = len(parts) + 1
    while (held := read_bounded(directory, part_name(number), len(MARKER))) is not None:
        if not held.startswith(MARKER):
            break  # not ours: neither it nor what follows is removed
        stale.append(part_name(number))
        number += 1
    report = []
    for number, text in enumerate(parts, 1):
        write_atomic(directory, part_name(number), text)
        report.append(f"wrote: {directory / part_name(number)}")
    for name in stale:
        remove_file(directory, name)
        report.append(f"removed: {directory / name}")
    return report
