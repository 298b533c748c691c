"""Saved plans: written by ``plan --out``, read back by ``show`` (and, later, ``apply``)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from cocoonplan.atomic import atomic_writer
from cocoonplan.bounded import InputLimitError, loads, read_limited
from cocoonplan.errors import PlanFormatError
from cocoonplan.planner.model import FORMAT_VERSION, Plan
from cocoonplan.render.document import json_chunks

MAX_PLAN_BYTES = 64 << 20
"""Largest plan file read: about 25 KiB a VM, so room for thousands of VMs."""


def located(plan: Plan, project: Path, path: Path) -> Plan:
    """``plan`` to be written to ``path``, naming its project directory ``project`` relative
    to the file (its digest recomputed); unchanged when the file lies in that directory."""
    where = os.path.relpath(project.resolve(), path.resolve().parent)
    if where == ".":
        return plan
    placed = plan.model_copy(update={"project": Path(where).as_posix()})
    return placed.model_copy(update={"digest": placed.content_digest()})


def project_of(plan: Plan, path: Path) -> Path:
    """The project directory a plan read from ``path`` names (the file's own directory when
    it names none)."""
    return path.parent / (plan.project or ".")


def write_plan(plan: Plan, path: Path) -> None:
    """Write the plan document, atomically and never through a link (:mod:`cocoonplan.atomic`)."""
    with atomic_writer(path.parent, path.name) as out:
        for chunk in json_chunks(plan):
            out.write(chunk.encode())


def read_plan(path: Path) -> Plan:
    """Read a plan document, refusing other format versions, malformed files and edited ones."""
    try:
        data = loads(read_limited(path, MAX_PLAN_BYTES))
    except (OSError, InputLimitError) as exc:
        raise PlanFormatError(
            f"{path}: cannot read the plan file: {exc}", hint="write one with `cocoonplan plan --out FILE`"
        ) from exc
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise PlanFormatError(
            f"{path}: plan format_version {version!r}, this cocoonplan reads {FORMAT_VERSION}",
            hint="re-run `cocoonplan plan --out` with this version",
        )
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanFormatError(f"{path}: not a valid plan document", detail=str(exc)) from exc
    if plan.digest != plan.content_digest():
        raise PlanFormatError(
            f"{path}: the plan's content does not match its digest {plan.digest}",
            detail=f"its content hashes to {plan.content_digest()}",
            hint="the file was edited after `cocoonplan plan --out` wrote it; plan again",
        )
    return plan
