"""syrupy extensions: plans as JSON files, renders as text files, one file per snapshot."""

from __future__ import annotations

from syrupy.extensions.json import JSONSnapshotExtension
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode


class JSONFile(JSONSnapshotExtension):
    """A plan document, key-sorted by syrupy, diffed line by line on failure."""


class TextFile(SingleFileSnapshotExtension):
    """A human or Markdown render, stored as a readable .txt file."""

    _write_mode = WriteMode.TEXT
    file_extension = "txt"
