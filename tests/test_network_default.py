"""A node's default network: the conflist cocoon v0.3.8 records for a VM given no ``--network``.

The rule is read from real directories (never mocked); every refused entry is named in a
one-line error, and the CLI exits 1 without a traceback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from clirunner import EXAMPLES, run_cli
from cocoonplan import api
from cocoonplan.errors import SpecError, StateError
from cocoonplan.observed import NodeState
from cocoonplan.resolved import NodeView
from cocoonplan.resolvers.network import (
    MAX_CONF_DIR_ENTRIES,
    MAX_CONFLIST_BYTES,
    default_networks,
    read_default_network,
)
from cocoonplan.resolvers.node import encode_state, load_state_document, read_node_root


def _conflist(name: Any, *, key: str = "name") -> str:
    return json.dumps({"cniVersion": "1.0.0", key: name, "plugins": [{"type": "bridge"}]})


def _conf_dir(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


# --------------------------------------------------------------------------- the rule


def test_the_first_conflist_by_name_is_the_default(tmp_path: Path) -> None:
    conf_dir = _conf_dir(
        tmp_path / "net.d",
        {
            "20-b.conflist": _conflist("second"),
            "10-a.conflist": _conflist("first"),
            # Never read by cocoon: other extensions, and single-plugin .conf files.
            "00-single.conf": json.dumps({"cniVersion": "1.0.0", "name": "single", "type": "bridge"}),
            "01.json": _conflist("json"),
            "02-a.conflist.bak": _conflist("backup"),
            "03-upper.CONFLIST": _conflist("upper"),
        },
    )
    (conf_dir / "04-dir.conflist").mkdir()  # a directory is skipped, not refused
    assert read_default_network(conf_dir) == "first"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # Byte order, as Go sorts: upper case before lower case, "9" before "a".
        ({"a.conflist": _conflist("lower"), "Z.conflist": _conflist("upper")}, "upper"),
        ({"a.conflist": _conflist("letter"), "9.conflist": _conflist("digit")}, "digit"),
        # A file named just ".conflist" has that extension in Go.
        ({".conflist": _conflist("hidden"), "a.conflist": _conflist("plain")}, "hidden"),
        # The first non-empty name wins; with none, cocoon records "".
        ({"10.conflist": _conflist(""), "20.conflist": _conflist("named")}, "named"),
        ({"10.conflist": _conflist(""), "20.conflist": _conflist("")}, ""),
        # Go keeps the last of two equal keys, and so does the reader.
        ({"10.conflist": '{"name": "old", "name": "new", "plugins": [{"type": "x"}]}'}, "new"),
    ],
)
def test_conflist_order_and_names(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    assert read_default_network(_conf_dir(tmp_path / "net.d", files)) == expected


def test_no_conflist_means_no_default(tmp_path: Path) -> None:
    assert read_default_network(_conf_dir(tmp_path / "empty", {})) is None
    only_conf = _conf_dir(tmp_path / "conf", {"10-bridge.conf": _conflist("bridge")})
    assert read_default_network(only_conf) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (_conflist("x", key="Name"), "has no name"),
        (_conflist(7), "name is a number, not a string"),
        (_conflist(None), "name is null, not a string"),
        ("null", "is not a JSON object"),
        ('["a"]', "is not a JSON object"),
        ('{"name": "x",', "not valid JSON: "),
        ('{"name": "x", "mtu": NaN}', "not valid JSON: NaN is not JSON"),
        ('{"name": "x", "mtu": 1e999}', "not valid JSON: number 1e999 is out of range"),
    ],
)
def test_a_conflist_cocoon_cannot_load_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    # One bad file makes cocoon load no network at all, even when an earlier file is fine.
    conf_dir = _conf_dir(tmp_path / "net.d", {"10-good.conflist": _conflist("good"), "20-bad.conflist": text})
    with pytest.raises(StateError, match=r"cocoon v0\.3\.8 loads no CNI network") as caught:
        read_default_network(conf_dir)
    assert caught.value.summary.startswith(f"{conf_dir}/20-bad.conflist: {problem}")
    assert "\n" not in caught.value.summary


def test_json_nested_beyond_the_parser_is_refused(tmp_path: Path) -> None:
    conf_dir = _conf_dir(tmp_path / "net.d", {"10.conflist": "[" * 100_000})
    with pytest.raises(StateError, match=r"10\.conflist: cannot be read: JSON nested too deeply"):
        read_default_network(conf_dir)


def test_invalid_utf8_is_replaced_as_go_does(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10.conflist").write_bytes(b'{"name": "net\xff", "plugins": [{"type": "x"}]}')
    assert read_default_network(conf_dir) == "net\ufffd"


# --------------------------------------------------------------------------- hostile directories


def _symlink(conf_dir: Path) -> None:
    (conf_dir.parent / "outside.conflist").write_text(_conflist("outside"))
    (conf_dir / "10-link.conflist").symlink_to("../outside.conflist")


def _fifo(conf_dir: Path) -> None:
    os.mkfifo(conf_dir / "10-link.conflist")


@pytest.mark.parametrize(("make", "kind"), [(_symlink, "a symbolic link"), (_fifo, "a FIFO")])
def test_links_and_special_files_are_refused(tmp_path: Path, make: Any, kind: str) -> None:
    conf_dir = _conf_dir(tmp_path / "net.d", {"20-real.conflist": _conflist("real")})
    make(conf_dir)
    with pytest.raises(StateError) as caught:
        read_default_network(conf_dir)
    assert caught.value.summary == (
        f"{conf_dir}/10-link.conflist: is {kind}, not a regular file; cocoonplan does not follow or open it"
    )

    result = run_cli(
        ["state", "export", "--root", str(EXAMPLES / "node"), "--cni-conf-dir", "net.d"], tmp_path
    )
    assert result.exit_code == 1 and result.stdout == ""
    first, hint = result.stderr.splitlines()
    assert first == f"Error: {caught.value.summary}"
    assert hint.startswith("hint: copy the node's CNI conf dir") and "Traceback" not in result.stderr


def test_a_symlinked_entry_without_the_extension_is_not_read(tmp_path: Path) -> None:
    conf_dir = _conf_dir(tmp_path / "net.d", {"10.conflist": _conflist("real")})
    (conf_dir / "README").symlink_to("/etc/passwd")
    assert read_default_network(conf_dir) == "real"


def test_size_and_entry_limits(tmp_path: Path) -> None:
    big = _conf_dir(tmp_path / "big", {"10.conflist": _conflist("x" * MAX_CONFLIST_BYTES)})
    with pytest.raises(StateError, match=rf"10\.conflist: is larger than {MAX_CONFLIST_BYTES} bytes"):
        read_default_network(big)

    many = tmp_path / "many"
    many.mkdir()
    for index in range(MAX_CONF_DIR_ENTRIES + 1):
        (many / f"f{index}").touch()
    with pytest.raises(
        StateError, match=f"^{re.escape(str(many))}: holds more than {MAX_CONF_DIR_ENTRIES} entries"
    ):
        read_default_network(many)


def test_a_missing_conf_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError, match=f"^{re.escape(str(tmp_path))}/absent: CNI conf dir does not exist"):
        read_default_network(tmp_path / "absent")
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="file: is not a directory"):
        read_default_network(tmp_path / "file")


# --------------------------------------------------------------------------- state export


def test_state_export_records_the_default_network(tmp_path: Path) -> None:
    _conf_dir(tmp_path / "net.d", {"10-cocoon.conflist": _conflist("cocoon")})
    result = run_cli(
        ["state", "export", "--root", str(EXAMPLES / "node"), "--cni-conf-dir", "net.d"], tmp_path
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["default_network"] == "cocoon"
    assert str(tmp_path) not in result.stdout

    document = tmp_path / "state.json"
    document.write_text(result.stdout)
    state = load_state_document(document)
    assert state.default_network == "cocoon"
    assert state == read_node_root(EXAMPLES / "node").model_copy(update={"default_network": "cocoon"})
    assert encode_state(state) == result.stdout

    # Without --cni-conf-dir nothing is known; a document written before the field reads as unknown.
    plain = run_cli(["state", "export", "--root", str(EXAMPLES / "node")], tmp_path)
    assert json.loads(plain.stdout)["default_network"] is None
    older = json.loads(plain.stdout)
    del older["default_network"]
    document.write_text(json.dumps(older))
    assert load_state_document(document).default_network is None


# --------------------------------------------------------------------------- precedence


def _project(root: Path, node: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    project = {
        "apiVersion": "cocoonplan/v1alpha1",
        "kind": "Project",
        "nodes": {"node-a": {"cpus": 4, **node}},
    }
    # JSON is YAML: the project file needs no YAML writer.
    (root / "cocoonplan.yaml").write_text(json.dumps(project))
    return root


def _state(root: Path, default_network: str | None) -> str:
    state = NodeState(
        root_dir="/var/lib/cocoon", run_dir="/var/lib/cocoon/run", default_network=default_network
    )
    (root / "state.json").write_text(encode_state(state))
    return "state.json"


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ({"project", "dir", "state"}, "from-project"),
        ({"dir", "state"}, "from-dir"),
        ({"state"}, "from-state"),
        ({"project"}, "from-project"),
        (set(), None),
        # A conf dir copy holding no conflist says cocoon has no default; the state is not asked.
        ({"empty-dir", "state"}, None),
    ],
)
def test_precedence_of_the_sources(tmp_path: Path, sources: set[str], expected: str | None) -> None:
    root = tmp_path / "project"
    root.mkdir()
    node: dict[str, Any] = {}
    if "project" in sources:
        node["defaultNetwork"] = "from-project"
    if "dir" in sources:
        _conf_dir(root / "cni", {"10.conflist": _conflist("from-dir")})
        node["cniConfDir"] = "cni"
    if "empty-dir" in sources:
        _conf_dir(root / "cni", {})
        node["cniConfDir"] = "cni"
    if "state" in sources:
        node["state"] = _state(root, "from-state")
    _project(root, node)

    context = api.find_project([root], tmp_path)
    assert default_networks(context, api.read_nodes(context, {})) == {"node-a": expected}


def test_plan_hands_the_default_network_to_the_planner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _project(
        tmp_path / "project", {"cniConfDir": "cni", "state": "state.json", "cocoonVersion": "v0.3.8"}
    )
    _conf_dir(root / "cni", {"10.conflist": _conflist("from-dir")})
    _state(root, "from-state")
    seen: dict[str, NodeView] = {}

    def capture(*_: Any, nodes: dict[str, NodeView], **__: Any) -> None:
        seen.update(nodes)

    # The planner is another module's concern: only what plan() gives it is checked here.
    monkeypatch.setattr(api, "make_plan", capture)
    api.plan([root], api.Environment({}, tmp_path))
    assert seen["node-a"].default_network == "from-dir"
    assert seen["node-a"].state is not None and seen["node-a"].state.default_network == "from-state"


def test_a_bad_project_cni_conf_dir_fails_the_plan(tmp_path: Path) -> None:
    root = _project(tmp_path / "project", {"cniConfDir": "missing"})
    with pytest.raises(StateError, match=re.escape(f"{root.resolve()}/missing: CNI conf dir does not exist")):
        api.plan([root], api.Environment({}, tmp_path))


def test_default_network_must_name_something(tmp_path: Path) -> None:
    root = _project(tmp_path / "project", {"defaultNetwork": ""})
    with pytest.raises(SpecError, match="defaultNetwork"):
        api.find_project([root], tmp_path)
