"""Token-level differences of a kernel command line and of a launch argument list.

A one-line ``~ launch: "…" → "…"`` of 4,000 characters hides that ``cpu: 2 → 4`` changed
``--cpus boot`` and each disk's ``num_queues``. Both are split into named tokens first:

- a kernel command line into ``key[=value]`` parameters (``cocoon.layers``, ``ip``, ``rw``);
- a ``cloud-hypervisor`` argument list into flags, each flag's values into ``key=value``
  options (``--disk path=…,num_queues=2,serial=cocoon-cow``), disks named by their serial
  so that a disk that moved is still the same disk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

Path = tuple[str | int, ...]
Token = tuple[Path, str | None]
"""A token's path below its document and its value (None for a bare flag or parameter)."""


def cmdline_tokens(cmdline: str) -> dict[Path, str | None]:
    """``console=hvc0 rw ip=a ip=b`` → {(console,): hvc0, (rw,): None, (ip,): a, (ip, 1): b}."""
    tokens: dict[Path, str | None] = {}
    seen: dict[str, int] = {}
    for token in cmdline.split():
        key, equals, value = token.partition("=")
        count = seen.get(key, 0)
        seen[key] = count + 1
        tokens[(key,) if count == 0 else (key, count)] = value if equals else None
    return tokens


def _options(value: str) -> list[tuple[str, str | None]]:
    """``a=1,b=[0@[0],1@[1]],c`` → [(a, 1), (b, [0@[0],1@[1]]), (c, None)]: commas inside
    brackets belong to the value (Cloud Hypervisor's ``queue_affinity``)."""
    options: list[tuple[str, str | None]] = []
    depth, start = 0, 0
    for at, char in enumerate(value + ","):
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            key, equals, text = value[start:at].partition("=")
            options.append((key, text if equals else None))
            start = at + 1
    return options


def _flags(argv: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """(flag, its values) in order; the binary and anything before the first flag are skipped."""
    flag: str | None = None
    values: list[str] = []
    for arg in argv:
        if arg.startswith("--"):
            if flag is not None:
                yield flag, values
            flag, values = arg, []
        elif flag is not None:
            values.append(arg)
    if flag is not None:
        yield flag, values


def launch_tokens(argv: Sequence[str]) -> dict[Path, str | None]:
    """Every option of every flag, by path: ``(--cpus, boot)``, ``(--disk, cocoon-cow,
    num_queues)``, ``(--net, 0, mac)``, ``(--kernel,)`` for a plain value, ``(--watchdog,)``
    for a bare flag, ``(--cmdline, cocoon.layers)`` for a kernel parameter."""
    tokens: dict[Path, str | None] = {}
    for flag, values in _flags(argv):
        if flag == "--cmdline":
            # The guest's command line, parameter by parameter (a cmdline file space-joins it).
            tokens.update({(flag, *path): value for path, value in cmdline_tokens(" ".join(values)).items()})
            continue
        if not values:
            tokens[(flag,)] = None
            continue
        for index, value in enumerate(values):
            if "=" not in value:
                tokens[(flag,) if len(values) == 1 else (flag, index)] = value
                continue
            options = _options(value)
            named = dict(options).get("serial")
            item: Path = (flag,) if len(values) == 1 else (flag, named or index)
            for key, text in options:
                tokens[(*item, key)] = text
    return tokens


def token_differences(
    before: dict[Path, str | None], after: dict[Path, str | None]
) -> list[tuple[Path, str, str | None, str | None]]:
    """(path, op, before, after) for every token added, removed or changed; in the order of
    ``after``, then what only ``before`` had."""
    found: list[tuple[Path, str, str | None, str | None]] = []
    for path, value in after.items():
        if path not in before:
            found.append((path, "add", None, value))
        elif before[path] != value:
            found.append((path, "update", before[path], value))
    found += [(path, "remove", value, None) for path, value in before.items() if path not in after]
    return found
