"""Escaping for every place a render quotes text it did not write.

Names, paths, references, messages and hints come from spec files, node roots and
registries, any of which a pull request or a hostile server controls. Each function here
turns such text into something its target shows literally:

- :func:`plain`, :func:`plain_lines`: a terminal. Control characters (C0, DEL, C1) and the
  bidirectional overrides that reorder what a reader sees are shown as ``\\x1b``-style
  escapes, so an ANSI sequence or a carriage return can neither restyle nor overwrite output.
- :func:`md`: Markdown prose. Everything that could start a heading, list, quote, link,
  image, HTML, entity, table cell, autolink or math is backslash-escaped.
- :func:`code`, :func:`fence`: Markdown code spans and fenced blocks whose backtick runs are
  longer than any run inside, so no content can close them.
- :func:`html`: text inside a raw HTML block (``<summary>``), where Markdown escapes do not apply.

Each returns :class:`Escaped`, which the template environments' ``finalize`` leaves alone; any
other string a template outputs is escaped for its target by default.
"""

from __future__ import annotations

import html as _html
import re

# C0 and C1 controls, DEL, and the bidirectional marks, embeddings, overrides and isolates
# (and U+2028/9, which some viewers break lines at): none belong in a name or a message.
_NOT_C0 = r"\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
_UNSAFE_CHAR = re.compile(rf"[\x00-\x1f{_NOT_C0}]")
_UNSAFE_BUT_NEWLINE = re.compile(rf"[\x00-\x09\x0b-\x1f{_NOT_C0}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# Inline Markdown (CommonMark + GitHub): escapes, code, emphasis, links and images (``!`` is
# inert without ``[``), raw HTML and ``<…>`` autolinks, entities, table cells, strikethrough,
# math, ATX headings; GitHub's bare autolinks (``http://``, ``www.``, e-mail addresses).
_MD_INLINE = re.compile(r"[\\`*_\[\]<>&|~$#@]|:(?=//)|(?<=www)\.", re.IGNORECASE)
# At the start of a block only: bullets, thematic breaks and setext underlines, and ordered
# list markers (up to 9 digits, then ``.`` or ``)`` and a space; ``36.2 KiB`` is no marker).
# Every value is escaped as if it began a block: a template may put it after ``- `` or ``> ``.
_MD_LEADING = re.compile(r"^\s*(?=[-+=])|^\s*\d{1,9}(?=[.)](?:\s|$))")
_BACKTICKS = re.compile(r"`+")


class Escaped(str):
    """Text already escaped for the render it is part of."""

    __slots__ = ()


def _show(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    point = ord(char)
    return f"\\x{point:02x}" if point < 0x100 else f"\\u{point:04x}"


def plain(text: str) -> Escaped:
    """``text`` as one terminal line: every control character shown as an escape."""
    return Escaped(_UNSAFE_CHAR.sub(_show, text))


def plain_lines(text: str) -> Escaped:
    """``text`` for a terminal, keeping its line breaks (a multi-line error detail)."""
    return Escaped(_UNSAFE_BUT_NEWLINE.sub(_show, text))


def md(text: str) -> Escaped:
    """``text`` as literal Markdown prose on one line."""
    line = _MD_INLINE.sub(lambda m: "\\" + m.group(), plain(text))
    return Escaped(_MD_LEADING.sub(lambda m: m.group() + "\\", line, count=1))


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in _BACKTICKS.findall(text)), default=0)


def code(text: object, *, table: bool = False) -> Escaped:
    """``text`` as one Markdown code span; ``table=True`` inside a GitHub table cell, whose
    pipes split cells even within a span unless escaped (GitHub removes the backslash)."""
    body: str = plain(str(text))
    if table:
        body = body.replace("|", "\\|")
    ticks = "`" * (_longest_backtick_run(body) + 1)
    # A backtick next to the fence would lengthen it; one space is stripped from each side
    # when a body that is not all spaces has both (CommonMark 6.1); a span cannot be empty.
    if not body:
        body = " "
    elif "`" in (body[0], body[-1]) or (body[0] == body[-1] == " " and body.strip(" ")):
        body = f" {body} "
    return Escaped(f"{ticks}{body}{ticks}")


def fence(text: str, info: str = "", *, indent: int = 0) -> Escaped:
    """``text`` as a fenced code block (no trailing newline), every line indented by ``indent``.

    Only a backtick line at least as long as the opening fence closes it (a tilde run never
    does), so the fence is one backtick longer than the longest run in ``text``.
    """
    body = plain_lines(text)
    ticks = "`" * max(3, _longest_backtick_run(body) + 1)
    pad = " " * indent
    lines = [f"{ticks}{info}", *body.split("\n"), ticks]
    return Escaped("\n".join(f"{pad}{line}" if line else "" for line in lines))


def html(text: object) -> Escaped:
    """``text`` inside a raw HTML block: tags and entities shown literally."""
    return Escaped(_html.escape(plain(str(text)), quote=True))
