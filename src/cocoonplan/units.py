"""Sizes as cocoon reads them: docker/go-units ``RAMInBytes``, binary multipliers.

``1G`` is 1073741824, the unit letter is case-insensitive and an optional ``b``/``ib``
suffix is accepted (``1g``, ``1GB``, ``1GiB``); a bare number is bytes.
"""

from __future__ import annotations

import re

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
MAX_SIZE = (1 << 63) - 1
"""The largest size cocoon (a Go int64) and an OCI descriptor hold."""
_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?) ?([kKmMgGtTpP])?[iI]?[bB]?$")


def parse_size(value: object) -> int:
    """Parse ``value`` (``"1G"``, ``"512MiB"``, an int of bytes) into bytes.

    Raises ValueError with the accepted forms for anything else, and for sizes over MAX_SIZE.
    """
    if isinstance(value, bool):
        raise ValueError("a size is a number with an optional unit such as 1G or 512M")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return _at_most_max(value)
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            number, unit = match.groups()
            # A number of hundreds of digits is an infinite float: compared, never converted.
            return _at_most_max(float(number) * _UNITS[(unit or "").lower()])
    raise ValueError(
        f"invalid size {value!r}: write a number with an optional unit, such as 1G, 512M or 10GiB"
    )


def _at_most_max(size: float) -> int:
    if size > MAX_SIZE:
        raise ValueError(f"a size cannot be over {MAX_SIZE} bytes (8 EiB), the most cocoon accepts")
    return int(size)


def format_size(size: int) -> str:
    """Render bytes for humans in binary units (``1.5 GiB``); exact below 1 KiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}".replace(".0 ", " ")
        value /= 1024
    raise AssertionError("unreachable")
