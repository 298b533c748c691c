"""A node's default network: the CNI conflist cocoon uses when a VM is given no ``--network``.

cocoon v0.3.8 (``vm run``/``vm create``, and ``vm clone`` when the snapshot recorded no network
either) records the chosen conflist's ``name`` in the VM record's ``config.network``
(``network/cni/create.go``, ``(*CNI).Config``: ``vmCfg.Network = confList.Name``), so a spec
that omits ``network`` must be compared with that name, not with ``""``.

Which conflist is chosen (``network/cni/cni.go``: ``New``, ``loadConfLists`` and
``confListByName``, over libcni v1.3.0's ``ConfFiles`` and ``ConfListFromFile`` in
``libcni/conf.go``):

1. The entries of the CNI conf dir (global ``--cni-conf-dir``, default ``/etc/cni/net.d``)
   are listed in byte order of their names (Go's ``os.ReadDir``). Directories are skipped.
   A file counts when its extension, from the last ``.`` of the name, is exactly
   ``.conflist`` (case-sensitive; a file named ``.conflist`` counts too). ``.conf`` and
   ``.json`` files are never read: cocoon does not fall back to single-plugin configs.
2. Every counted file is parsed as a JSON object whose ``name`` must be present and a string
   (libcni's ``NetworkConfFromBytes``).
3. The default is the ``name`` of the first counted file, in that order, whose name is not
   empty (``loadConfLists`` keeps the first non-empty name). When every name is empty, the
   lookup of ``""`` still finds a conflist and cocoon records ``""``.
4. No counted file, a missing dir, or any counted file that fails to load: ``New`` drops the
   error and cocoon has no CNI network at all, so a VM with NICs cannot be created without
   ``--bridge``. cocoonplan reports no counted file as no default (None) and a file that fails
   to load as a StateError naming it, because a default read from a directory cocoon refuses
   would be a guess.

cocoonplan checks the JSON and ``name`` only. libcni also refuses a conflist whose other
fields are ill-typed (``cniVersion``, ``disableCheck``, ``plugins``…) or that has no plugins
(inline, or ``<name>/*.conf`` beside it); such a directory gives cocoon no network at all and
is not detected here.

The directory is untrusted input (a copy taken from a node). Only regular files are read: a
counted entry that is a symbolic link, FIFO, socket or device is refused rather than
followed or opened, each file is capped at :data:`MAX_CONFLIST_BYTES`, and the directory at
:data:`MAX_CONF_DIR_ENTRIES` entries. Every failure is a one-line :class:`StateError`.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from cocoonplan.context import ProjectContext
from cocoonplan.errors import StateError
from cocoonplan.observed import NodeState
from cocoonplan.project import NodeConfig

CONFLIST_EXTENSION = ".conflist"
MAX_CONFLIST_BYTES = 1 << 20
"""Per file; real conflists are a few hundred bytes."""
MAX_CONF_DIR_ENTRIES = 4096
"""Entries of any kind in the conf dir; a node's has a handful."""

_RECOPY = (
    "copy the node's CNI conf dir (cocoon's --cni-conf-dir, default /etc/cni/net.d) again "
    "with symbolic links resolved (cp -L, rsync -L)"
)
_FIX = "fix or remove the file on the node: cocoon v0.3.8 loads no CNI network at all while it fails to parse"


def _fail(where: str, problem: str, hint: str = _RECOPY) -> NoReturn:
    raise StateError(f"{where}: {problem}", hint=hint)


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((text for test, text in kinds if test(mode)), "not a regular file")


def _conflist_names(dir_fd: int, where: Path) -> list[str]:
    """The names cocoon reads, in the order it reads them."""
    names: list[str] = []
    try:
        with os.scandir(dir_fd) as entries:
            for count, entry in enumerate(entries, start=1):
                if count > MAX_CONF_DIR_ENTRIES:
                    _fail(str(where), f"holds more than {MAX_CONF_DIR_ENTRIES} entries; not a CNI conf dir")
                # endswith is Go's filepath.Ext test here: ".conflist" holds no other dot.
                if entry.name.endswith(CONFLIST_EXTENSION) and not entry.is_dir(follow_symlinks=False):
                    names.append(entry.name)
    except OSError as exc:
        _fail(str(where), f"cannot be listed: {exc.strerror or exc}")
    # Go compares strings byte-wise; undecodable bytes come back as surrogates, so sort on bytes.
    return sorted(names, key=os.fsencode)


def _read_regular(dir_fd: int, name: str, where: str) -> bytes:
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):
            _fail(where, f"is {_kind(mode)}, not a regular file; cocoonplan does not follow or open it")
        # O_NOFOLLOW and the fstat below close the gap if the entry is swapped after the lstat;
        # O_NONBLOCK keeps a FIFO swapped in from blocking the open.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode):
                _fail(where, f"is {_kind(mode)}, not a regular file; cocoonplan does not follow or open it")
            data = file.read(MAX_CONFLIST_BYTES + 1)
    except OSError as exc:
        _fail(where, f"cannot be read: {exc.strerror or exc}")
    if len(data) > MAX_CONFLIST_BYTES:
        _fail(where, f"is larger than {MAX_CONFLIST_BYTES} bytes; not a CNI conflist")
    return data


class _NotGoJSONError(ValueError):
    """JSON Python accepts but Go's encoding/json refuses."""


def _go_number(text: str) -> float:
    # Go decodes every number of an interface{} into a float64 and refuses one out of range.
    value = float(text)
    if math.isinf(value):
        raise _NotGoJSONError(f"number {text[:20]} is out of range")
    return value


def _refuse_constant(name: str) -> NoReturn:
    raise _NotGoJSONError(f"{name} is not JSON")


def _conflist_name(data: bytes, where: str) -> str:
    """The ``name`` of one conflist, read the way libcni's ``NetworkConfFromBytes`` reads it."""
    # Go's decoder replaces invalid UTF-8 instead of failing; so does cocoonplan, to agree with it.
    text = data.decode("utf-8", errors="replace")
    try:
        document = json.loads(
            text, parse_float=_go_number, parse_int=_go_number, parse_constant=_refuse_constant
        )
    except json.JSONDecodeError as exc:
        _fail(where, f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", _FIX)
    except _NotGoJSONError as exc:
        _fail(where, f"not valid JSON: {exc}", _FIX)
    except RecursionError:
        # Go nests up to 10000 levels, Python's parser fewer: the file may be fine for cocoon.
        _fail(
            where,
            "cannot be read: JSON nested too deeply",
            "set the node's defaultNetwork in the project file instead",
        )
    if not isinstance(document, dict):
        _fail(where, "is not a JSON object; a CNI conflist is one", _FIX)
    if "name" not in document:
        _fail(where, "has no name; cocoon reads a conflist's network name from its name field", _FIX)
    name = document["name"]
    if not isinstance(name, str):
        kinds = {bool: "a boolean", list: "an array", dict: "an object", type(None): "null"}
        _fail(where, f"name is {kinds.get(type(name), 'a number')}, not a string", _FIX)
    return name


def read_default_network(conf_dir: Path) -> str | None:
    """The network cocoon v0.3.8 records for a VM given no ``--network``, by the rule in the
    module docstring, read from ``conf_dir`` (a CNI conf dir or a copy of one).

    None when the directory holds no ``.conflist`` file: cocoon then has no default. Raises
    StateError when the directory cannot be listed, or a conflist is not a regular file, is too
    large, or does not parse with a string ``name``.
    """
    try:
        dir_fd = os.open(conf_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        _fail(str(conf_dir), "CNI conf dir does not exist")
    except NotADirectoryError:
        _fail(str(conf_dir), "is not a directory; a CNI conf dir is one")
    except OSError as exc:
        _fail(str(conf_dir), f"cannot be read: {exc.strerror or exc}")
    names = []
    try:
        for file in _conflist_names(dir_fd, conf_dir):
            where = f"{conf_dir}/{file}"
            names.append(_conflist_name(_read_regular(dir_fd, file, where), where))
    finally:
        os.close(dir_fd)
    if not names:
        return None
    return next((name for name in names if name), "")


def node_default_network(context: ProjectContext, node: NodeConfig, state: NodeState | None) -> str | None:
    """The node's effective default network; None when unknown.

    The first source that is given decides: the project's ``defaultNetwork``, else the
    project's ``cniConfDir`` copy (None when it holds no conflist), else the node state's
    ``default_network`` (recorded by ``state export --cni-conf-dir``).
    """
    if node.default_network is not None:
        return node.default_network
    if node.cni_conf_dir is not None:
        return read_default_network(context.resolve(node.cni_conf_dir))
    return state.default_network if state is not None else None


def default_networks(
    context: ProjectContext, states: Mapping[str, NodeState | None]
) -> dict[str, str | None]:
    """:func:`node_default_network` of every node in ``states`` (nodes of the project)."""
    return {
        name: node_default_network(context, context.project.nodes[name], state)
        for name, state in states.items()
    }
