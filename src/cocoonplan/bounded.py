"""Parsing of untrusted text within fixed bounds: the one JSON loader and the one YAML loader
every reader uses.

Spec files come from pull requests, node roots and registries from elsewhere: none of them
may exhaust the stack or memory of the process that plans. Python's ``json`` recurses once
per nesting level (about 1,000 levels raise ``RecursionError``) and refuses integers of over
4,300 digits with a bare ``ValueError``; here every such input is a :class:`InputLimitError`
the caller turns into its own located error, and nesting is refused long before the stack
is at risk. YAML adds aliases, which make a few KiB of text stand for gigabytes of nodes
(:class:`BoundedLoader`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from yaml._yaml import CParser
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

MAX_DEPTH = 64
"""Nesting levels any document cocoonplan reads may have; real ones use fewer than 10."""
MAX_YAML_BYTES = 4 << 20
"""Largest YAML file read; spec and project files are a few KiB."""
MAX_YAML_NODES = 100_000
"""Nodes a YAML file may hold, each alias counted as the nodes it stands for. Parsing costs
about 1 KiB of memory per node, so a file at the limit takes about 100 MB; real ones of
4 MiB hold fewer."""
MAX_ALIAS_NODES = 10_000
"""Of those, the nodes aliases may add: real files repeat a few small anchors."""
MAX_INT_CHARS = sys.int_info.default_max_str_digits
"""Longest integer read, in JSON digits or YAML characters: Python's own limit for decimal
ones (converting a base-60 YAML one, ``1:2:3``, takes time quadratic in its length)."""
_INT_TAG = "tag:yaml.org,2002:int"
_CHUNK = 1 << 20


class InputLimitError(ValueError):
    """A document is malformed or exceeds a bound; the message says which, without location."""


def check_depth(text: str, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON text nested deeper than ``limit`` (arrays and objects; strings skipped)."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                raise InputLimitError(f"nested more than {limit} levels deep")
        elif char in "]}":
            depth -= 1


def _bounded_int(digits: str) -> int:
    # int() refuses these too, but its message tells the user to call sys.set_int_max_str_digits.
    if len(digits.lstrip("-")) > MAX_INT_CHARS:
        raise InputLimitError(f"an integer of more than {MAX_INT_CHARS} digits")
    return int(digits)


def loads(
    data: bytes | str,
    *,
    max_depth: int = MAX_DEPTH,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
    parse_constant: Callable[[str], Any] | None = None,
    parse_float: Callable[[str], Any] | None = None,
    parse_int: Callable[[str], Any] | None = None,
) -> Any:
    """Parse UTF-8 JSON within the bounds; raises :class:`InputLimitError` for anything else."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise InputLimitError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    check_depth(text, max_depth)
    try:
        return json.loads(
            text,
            object_pairs_hook=object_pairs_hook,
            parse_constant=parse_constant,
            parse_float=parse_float,
            parse_int=parse_int or _bounded_int,
        )
    except json.JSONDecodeError as exc:
        raise InputLimitError(f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
    except (ValueError, RecursionError) as exc:
        # ValueError: an integer of more digits than Python converts, or a hook's refusal.
        raise InputLimitError(f"not valid JSON: {exc}") from exc


def read_limited(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, refused with :class:`InputLimitError` when there are more than
    ``limit``; ``OSError`` is the caller's to report.

    Read a chunk at a time, so a link to ``/dev/zero`` stops at the limit, and a small file
    costs its size, not the limit (``read(limit)`` allocates the whole limit first)."""
    chunks: list[bytes] = []
    size = 0
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise InputLimitError(f"larger than {limit} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


class YAMLLimitError(InputLimitError):
    """A YAML document exceeds a bound at ``line``:``column`` (1-based) of the event that does."""

    def __init__(self, message: str, event: yaml.Event) -> None:
        super().__init__(message)
        mark = event.start_mark
        self.line = mark.line + 1 if mark else None
        self.column = mark.column + 1 if mark else None


class _PythonParser(Reader, Scanner, Parser):
    """PyYAML's pure-Python event source, for the files libyaml refuses as too deep (see below)."""

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)


_LIBYAML_TOO_DEEP = "exceeded maximum nesting depth"
"""libyaml's refusal of flow nesting beyond its own limit (1,000), met while its scanner looks
ahead, before the first event of the collection: the levels past MAX_DEPTH are not reached yet."""


class BoundedLoader(Composer, SafeConstructor, Resolver):
    """PyYAML's safe loader on libyaml's parser, refusing a document before its nodes exhaust
    memory or the stack.

    Composing is where both happen: the composer recurses once per nesting level, and an alias
    is the node its anchor names, which every reader walking the document expands in full
    (``document.py`` does, and so does every ``<<`` merge). So each anchored node's expanded
    size, in nodes and in nesting levels, is recorded once it is composed, and an alias is
    charged both where it stands, before anything is expanded: a "billion laughs" file is
    refused at the alias that crosses :data:`MAX_ALIAS_NODES`, within a few KiB of memory. An
    alias inside the node it names (``&a [*a]``) would expand without end and is refused too.

    Every refusal is a :class:`YAMLLimitError` at the offending node or alias. A value the safe
    constructor cannot build (a date such as ``2024-13-01``) is a ``ConstructorError`` at its
    node, like every other malformed value, not a bare ``ValueError``.

    Events come from libyaml (``CParser``: scanning and parsing, most of the work, in C, with
    every event's line and column), nodes from PyYAML's Python composer: ``CSafeLoader`` would
    compose in C too, out of reach of these checks, holding the whole node graph before any
    could run. libyaml's scanner looks ahead over a line of flow collections and refuses one
    nested 1,000 deep before any of its events exist; then the events are taken again, past
    those already composed, from the pure-Python parser, so the refusal is this loader's, at
    the level that crosses MAX_DEPTH.
    """

    def __init__(self, stream: str) -> None:
        self._text = stream
        self._events: CParser | _PythonParser = CParser(stream)
        self._taken = 0
        """Events composed so far: where the pure-Python parser takes over."""
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        """Collection levels open at the node being composed."""
        self._deepest = 0
        """The deepest level the node being composed reaches, aliases expanded."""
        self._nodes = 0
        """Nodes composed so far in the file, aliases counted expanded."""
        self._aliased = 0
        """Of those, the nodes aliases stand for."""
        self._anchored: dict[str, tuple[int, int]] = {}
        """Per anchor of the current document: (nodes, nesting levels) its node expands to."""

    def check_event(self, *choices: type[yaml.Event]) -> bool:
        """Whether the next event is one of ``choices`` (any, without)."""
        return bool(self._from_parser(lambda: self._events.check_event(*choices)))

    def peek_event(self) -> yaml.Event:
        """The next event, left in place (the composer asks only while there is one)."""
        event: yaml.Event = self._from_parser(lambda: self._events.peek_event())
        return event

    def get_event(self) -> yaml.Event:
        """The next event, taken."""
        event: yaml.Event = self._from_parser(lambda: self._events.get_event())
        self._taken += 1
        return event

    def dispose(self) -> None:
        """Nothing to release: kept for PyYAML's loader interface."""

    def _from_parser(self, call: Callable[[], Any]) -> Any:
        # ``call`` reads ``self._events`` when called, so it asks whichever parser is current.
        try:
            return call()
        except yaml.MarkedYAMLError as exc:
            if exc.problem != _LIBYAML_TOO_DEEP or isinstance(self._events, _PythonParser):
                raise
        python = _PythonParser(self._text)
        for _ in range(self._taken):
            python.get_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
        self._events = python
        return call()

    def compose_document(self) -> yaml.Node | None:
        """Compose one document; its anchors are forgotten after it, as PyYAML forgets them."""
        node = super().compose_document()
        self._anchored.clear()
        return node

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        """Compose the next node within the bounds; an alias is charged what it expands to."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            # An alias of an anchor not defined yet is PyYAML's own error, raised just below.
            if event.anchor in self.anchors:
                self._charge_alias(event)
            return super().compose_node(parent, index)
        levels = 1 if isinstance(event, yaml.CollectionStartEvent) else 0
        self._check_depth(self._depth + levels, event)
        self._depth += levels
        outer_deepest, self._deepest = self._deepest, self._depth
        first = self._nodes
        node = super().compose_node(parent, index)
        self._count(1, event)
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            self._anchored[event.anchor] = (self._nodes - first, self._deepest - self._depth + levels)
        self._depth -= levels
        self._deepest = max(outer_deepest, self._deepest)
        if isinstance(node, yaml.ScalarNode) and node.tag == _INT_TAG and len(node.value) > MAX_INT_CHARS:
            raise YAMLLimitError(f"an integer of more than {MAX_INT_CHARS} characters", event)
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """Build a node's value; a value the constructor refuses is an error at the node."""
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:
            # SafeConstructor lets datetime's refusal of a month 13, say, escape as it is.
            kind = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid {kind} value: {exc}", node.start_mark
            ) from exc

    def _charge_alias(self, event: yaml.AliasEvent) -> None:
        expanded = self._anchored.get(str(event.anchor))
        if expanded is None:
            raise YAMLLimitError(
                f"alias *{event.anchor} stands inside the node it names, which would expand without end",
                event,
            )
        nodes, levels = expanded
        self._check_depth(self._depth + levels, event, f" once alias *{event.anchor} is expanded")
        self._deepest = max(self._deepest, self._depth + levels)
        self._aliased += nodes
        if self._aliased > MAX_ALIAS_NODES:
            raise YAMLLimitError(f"aliases expand to more than {MAX_ALIAS_NODES} nodes", event)
        self._count(nodes, event)

    def _check_depth(self, depth: int, event: yaml.Event, how: str = "") -> None:
        if depth > MAX_DEPTH:
            raise YAMLLimitError(f"nested more than {MAX_DEPTH} levels deep{how}", event)

    def _count(self, nodes: int, event: yaml.Event) -> None:
        self._nodes += nodes
        if self._nodes > MAX_YAML_NODES:
            raise YAMLLimitError(f"more than {MAX_YAML_NODES} nodes, aliases counted expanded", event)


def load_yaml(text: str) -> list[Any]:
    """Every document of ``text``, as :class:`BoundedLoader` constructs them (None for an empty
    one); a refusal raises its YAMLError."""
    loader = BoundedLoader(text)
    documents = []
    while loader.check_data():  # type: ignore[no-untyped-call]  # untyped in the stubs
        documents.append(loader.get_data())
    return documents


class _NotGoJSONError(ValueError):
    """Text Python's json accepts but Go's encoder never writes."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of two equal keys; Go's encoder never writes two, so one means
    # the text was not written by cocoon and which value counts is unknowable.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _NotGoJSONError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise _NotGoJSONError(f"{name} is not JSON")


def loads_written_by_go(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """:func:`loads` for text cocoon wrote with Go's encoder: duplicate keys and NaN/Infinity,
    which Go never writes, are refused; object key order is kept."""
    return loads(
        data, max_depth=max_depth, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant
    )
