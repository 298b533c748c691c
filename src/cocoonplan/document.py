"""YAML documents that remember where each value was written.

Every user-authored file (VM specs, the project file) is loaded through here so that a
validation error can name ``file:line:column`` of the offending key, not just its path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cocoonplan.atomic import ReadError, read_bounded
from cocoonplan.bounded import (
    MAX_ALIAS_NODES,
    MAX_DEPTH,
    MAX_YAML_BYTES,
    MAX_YAML_NODES,
    BoundedLoader,
    YAMLLimitError,
)
from cocoonplan.errors import SpecError

Location = tuple[int, int]
"""1-based (line, column)."""
YAML_BOUNDS = (
    f"YAML files of at most {MAX_YAML_BYTES >> 20} MiB and {MAX_YAML_NODES} nodes ({MAX_ALIAS_NODES} "
    f"through aliases), nested at most {MAX_DEPTH} levels deep"
)
LIMITS_HINT = f"cocoonplan reads only {YAML_BOUNDS}: keep the file within them"
MALFORMED_HINT = "fix the YAML there (quote a value YAML would read as another type, such as a date)"
SCHEMA_HINT = (
    "fix the value there; {schema} lists every field and its type (`cocoonplan schemas --dir DIR` writes it)"
)
"""The hint of a validation error, formatted with the schema file of the document's kind."""
PARSED_FILES = 4096
"""Parses :func:`parsed_text` keeps: a plan reads each spec file twice (its specs, then the
project's index of the VMs every file defines), and parsing is most of what a spec costs."""


@dataclass(frozen=True)
class LocatedDocument:
    """One YAML document: its data, and the location of every mapping key and item."""

    file: str
    data: Any
    start: Location
    marks: dict[tuple[str | int, ...], Location] = field(default_factory=dict)

    def locate(self, path: tuple[str | int, ...]) -> Location:
        """Return where ``path`` was written, or its nearest written ancestor."""
        for end in range(len(path), 0, -1):
            found = self.marks.get(path[:end])
            if found is not None:
                return found
        return self.start

    def error(self, path: tuple[str | int, ...], summary: str, hint: str = "") -> SpecError:
        """Build a :class:`SpecError` pointing at ``path`` in this document."""
        line, column = self.locate(path)
        return SpecError(summary, file=self.file, line=line, column=column, hint=hint)

    def validation_error(self, exc: ValidationError, schema: str = "vmspec.schema.json") -> SpecError:
        """Turn pydantic's errors into one SpecError located at the first, listing the rest;
        the hint points at ``schema``, the JSON Schema of the document's kind."""
        problems = []
        for item in exc.errors(include_url=False):
            path = tuple(p for p in item["loc"] if isinstance(p, str | int))
            line, column = self.locate(path)
            where = ".".join(str(p) for p in path) or "(document)"
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown field"
            problems.append((line, column, f"{where}: {message}"))
        problems.sort()
        line, column, first = problems[0]
        detail = "\n".join(f"  {self.file}:{ln}:{col}: {msg}" for ln, col, msg in problems[1:])
        hint = SCHEMA_HINT.format(schema=schema)
        return SpecError(first, file=self.file, line=line, column=column, detail=detail, hint=hint)


def _mark(node: yaml.Node) -> Location:
    return node.start_mark.line + 1, node.start_mark.column + 1


def limit_error(exc: YAMLLimitError, file: str, hint: str = LIMITS_HINT) -> SpecError:
    """The SpecError for a YAML document of ``file`` that exceeds a bound, where it does."""
    return SpecError(f"YAML refused: {exc}", file=file, line=exc.line, column=exc.column, hint=hint)


def _convert(
    loader: BoundedLoader,
    node: yaml.Node,
    path: tuple[str | int, ...],
    marks: dict[tuple[str | int, ...], Location],
    file: str,
) -> Any:
    marks.setdefault(path, _mark(node))
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int):
                line, column = _mark(key_node)
                raise SpecError(
                    "mapping keys must be strings",
                    file=file,
                    line=line,
                    column=column,
                    hint="write the key as plain text (quote it if YAML reads it as another type)",
                )
            if key in result:
                line, column = _mark(key_node)
                raise SpecError(
                    f"duplicate key {key!r}",
                    file=file,
                    line=line,
                    column=column,
                    hint="keep one of the two: YAML would silently take the last",
                )
            marks[(*path, key)] = _mark(key_node)
            result[key] = _convert(loader, value_node, (*path, key), marks, file)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(loader, item, (*path, i), marks, file) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def parse_documents(text: str, file: str) -> Iterator[LocatedDocument]:
    """Yield each non-empty YAML document of ``text``; ``file`` names it in errors.

    Documents are read within the bounds of :class:`~cocoonplan.bounded.BoundedLoader`, so
    walking them here (aliases and ``<<`` merges expanded) stays within them too."""
    loader = BoundedLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            marks: dict[tuple[str | int, ...], Location] = {}
            data = _convert(loader, node, (), marks, file)
            if data is not None:
                yield LocatedDocument(file=file, data=data, start=_mark(node), marks=marks)
    except YAMLLimitError as exc:
        raise limit_error(exc, file) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise SpecError(
            f"malformed YAML: {exc.problem or exc.context}",
            file=file,
            line=line,
            column=column,
            hint=MALFORMED_HINT,
        ) from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"malformed YAML: {exc}", file=file, hint=MALFORMED_HINT) from exc
    finally:
        loader.dispose()


def read_yaml(path: Path, display: str, hint: str = LIMITS_HINT) -> str:
    """The text of a YAML file of at most MAX_YAML_BYTES; SpecError naming ``display`` otherwise,
    with ``hint`` for a file too large.

    Read as every repository file is (:func:`cocoonplan.atomic.read_bounded`): a pull request
    can commit a link to a FIFO or to ``/dev/stdin`` under a spec's name, so a link, FIFO or
    device is refused, never followed or waited on."""
    try:
        data = read_bounded(path.parent, path.name, MAX_YAML_BYTES)
    except ReadError as exc:
        raise SpecError(exc.about("the file"), file=display, hint=exc.hint) from exc
    if data is None:
        raise SpecError(
            "cannot read the file: it no longer exists", file=display, hint="run the command again"
        )
    if len(data) > MAX_YAML_BYTES:
        raise SpecError(f"the file is larger than {MAX_YAML_BYTES} bytes", file=display, hint=hint)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"cannot read the file: not UTF-8 text: {exc.reason} at byte {exc.start}",
            file=display,
            hint="save the file as UTF-8",
        ) from exc


@functools.lru_cache(maxsize=PARSED_FILES)
def parsed_text(text: str, file: str) -> tuple[LocatedDocument, ...]:
    """The documents of ``text`` as :func:`parse_documents` yields them, parsed once per text
    and name in a process (callers never change them); a refusal is raised again each time."""
    return tuple(parse_documents(text, file))


def read_documents(path: Path, display: str) -> list[LocatedDocument]:
    """Read and parse a YAML file; ``display`` is the (relative) name used in messages."""
    return list(parsed_text(read_yaml(path, display), display))
