"""Three real layers that exercise every overlay rule the file checks apply, for the merge
tests (read from the tar) and the EROFS tests (read from the node's conversion, and mounted).

Layer 1 deletes ``/etc/gone`` and ``/etc/back`` (which layer 2 adds again) and the directory
``/var/cache``, makes ``/opt/app`` opaque, replaces ``/usr/bin/tool`` (new content and mode),
hard-links ``/data/d`` to ``/data/c``, shadows the file ``/srv/plain`` with a directory and adds
symbolic links (relative, looping); layer 0 links ``/bin`` to ``usr/bin``, layer 2 ``/usr/local``
to ``/opt``.
"""

from __future__ import annotations

from ocifixture import directory, hardlink, layer_of, opaque, regular, symlink, whiteout

OS_RELEASE = b"ID=test\n"

LAYERS = [
    layer_of(
        [
            directory("etc"),
            regular("etc/os-release", OS_RELEASE),
            regular("etc/gone", b"deleted above\n"),
            regular("etc/back", b"v1\n"),
            directory("opt"),
            directory("opt/app"),
            regular("opt/app/old.txt", b"old\n"),
            regular("opt/app/keep.txt", b"keep\n"),
            directory("usr"),
            directory("usr/bin"),
            regular("usr/bin/tool", b"tool v1\n"),
            regular("usr/bin/sh", b"#!/bin/sh\n", 0o755),
            symlink("bin", "usr/bin"),
            directory("var"),
            directory("var/cache"),
            regular("var/cache/x", b"x\n"),
            directory("srv"),
            regular("srv/plain", b"a file below\n"),
        ]
    ),
    layer_of(
        [
            whiteout("etc/gone"),
            whiteout("etc/back"),
            # No directory entries: opt/app and data exist in this layer because files do.
            opaque("opt/app"),
            regular("opt/app/new.txt", b"new\n"),
            regular("usr/bin/tool", b"tool v2\n", 0o755),
            regular("data/c", b"content of c\n", 0o640),
            hardlink("data/d", "data/c"),
            symlink("etc/link", "../usr/bin/tool"),
            symlink("etc/loop", "loop"),
            whiteout("var/cache"),
            directory("srv/plain"),
            regular("srv/plain/inner", b"inner\n"),
        ]
    ),
    layer_of([regular("etc/back", b"v2\n"), symlink("usr/local", "/opt")]),
]

PATHS = (
    "/etc/os-release",
    "/etc/gone",
    "/etc/back",
    "/etc/link",
    "/etc/loop",
    "/opt/app",
    "/opt/app/old.txt",
    "/opt/app/keep.txt",
    "/opt/app/new.txt",
    "/usr/bin/tool",
    "/usr/bin/sh",
    "/bin/sh",
    "/usr/local/app/new.txt",
    "/data/c",
    "/data/d",
    "/var/cache",
    "/var/cache/x",
    "/srv/plain",
    "/srv/plain/inner",
    "/nowhere",
    "/etc/os-release/below-a-file",
)
"""Paths whose merged answer the tests compare: every rule above, and two that are nowhere."""
