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

The directory is untrusted input (a copy taken from a node), read through
:mod:`cocoonplan.nodefs` like a node root: only regular files are read (a counted entry that
is a symbolic link, FIFO, socket or device is refused rather than followed or opened), each
file is capped at :data:`MAX_CONFLIST_BYTES`, and the directory at
:data:`MAX_CONF_DIR_ENTRIES` entries. Every failure is a one-line :class:`StateError`.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from cocoonplan.bounded import MAX_DEPTH, InputLimitError, check_depth, loads
from cocoonplan.context import ProjectContext
from cocoonplan.errors import StateError
from cocoonplan.nodefs import Cap, Listing, Tree
from cocoonplan.observed import NodeState
from cocoonplan.project import NodeConfig

CONFLIST_EXTENSION = ".conflist"
MAX_CONFLIST_BYTES = Cap.CONFLIST.size
"""Per file, from the one table of caps in :mod:`cocoonplan.nodefs`."""
MAX_CONF_DIR_ENTRIES = Listing.CONF_DIR.size
"""Entries of any kind in the conf dir, from the same table."""

_RECOPY = (
    "copy the node's CNI conf dir (cocoon's --cni-conf-dir, default /etc/cni/net.d) again "
    "with symbolic links resolved (cp -L, rsync -L)"
)
_FIX = "fix or remove the file on the node: cocoon v0.3.8 loads no CNI network at all while it fails to parse"


def _fail(where: str, problem: str, hint: str) -> NoReturn:
    raise StateError(f"{where}: {problem}", hint=hint)


def _conflist_files(tree: Tree) -> list[str]:
    """The names cocoon reads, in the order it reads them."""
    entries = tree.entries(".", Listing.CONF_DIR) or {}
    # endswith is Go's filepath.Ext test here: ".conflist" holds no other dot.
    names = [n for n, mode in entries.items() if n.endswith(CONFLIST_EXTENSION) and not stat.S_ISDIR(mode)]
    # Go compares strings byte-wise; undecodable bytes come back as surrogates, so sort on bytes.
    return sorted(names, key=os.fsencode)


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
        check_depth(text)
    except InputLimitError:
        # Go nests up to 10000 levels, cocoonplan fewer: the file may be fine for cocoon.
        _fail(
            where,
            f"cannot be read: JSON nested too deeply (more than {MAX_DEPTH} levels)",
            "set the node's defaultNetwork in the project file instead",
        )
    try:
        document = loads(text, parse_float=_go_number, parse_int=_go_number, parse_constant=_refuse_constant)
    except InputLimitError as exc:
        _fail(where, str(exc), _FIX)
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
    names = []
    with Tree.open(conf_dir, "CNI conf dir", _RECOPY, label=conf_dir) as tree:
        for file in _conflist_files(tree):
            data = tree.read(file, Cap.CONFLIST)
            # None: removed since the listing, so cocoon would not find it either.
            if data is not None:
                names.append(_conflist_name(data, tree.where(file)))
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
