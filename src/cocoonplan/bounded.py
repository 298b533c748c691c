"""Parsing of untrusted text within fixed bounds: the one JSON loader every reader uses.

Spec files come from pull requests, node roots and registries from elsewhere: none of them
may exhaust the stack or memory of the process that plans. Python's ``json`` recurses once
per nesting level (about 1,000 levels raise ``RecursionError``) and refuses integers of over
4,300 digits with a bare ``ValueError``; here every such input is a :class:`InputLimitError`
the caller turns into its own located error, and nesting is refused long before the stack
is at risk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 64
"""Nesting levels any document cocoonplan reads may have; real ones use fewer than 10."""


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


def loads(
    data: bytes | str,
    *,
    max_depth: int = MAX_DEPTH,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
    parse_constant: Callable[[str], Any] | None = None,
) -> Any:
    """Parse UTF-8 JSON within the bounds; raises :class:`InputLimitError` for anything else."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise InputLimitError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    check_depth(text, max_depth)
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook, parse_constant=parse_constant)
    except json.JSONDecodeError as exc:
        raise InputLimitError(f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
    except (ValueError, RecursionError) as exc:
        # ValueError: an integer of more digits than Python converts, or a hook's refusal.
        raise InputLimitError(f"not valid JSON: {exc}") from exc
