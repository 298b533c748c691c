"""Bounded parsing: hostile YAML and JSON fail a command with one located line, quickly.

Every reader is fed what once crashed or hung it: YAML alias bombs ("billion laughs", ``<<``
merges, an alias inside its own anchor, chains that nest deeper once expanded), nesting about
1,000 and 100,000 levels deep, integers of thousands of digits, and files beyond their size
caps, in YAML (spec files, ``cocoonplan.yaml``, another tool's file anywhere in the project)
and in JSON (manifests, snapshot config blobs and files, the layout's ``index.json``, docker
config, token answers, plan files and the lock file). Each run goes through the real CLI on
a copy of the examples and must exit 1 with an ``Error:`` line naming the file (and the line
and column, for YAML) and a hint, no traceback (the runner does not catch exceptions), within
seconds and a fraction of the gigabytes these inputs took unbounded.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from clirunner import copy_examples, run_cli
from cocoonplan.bounded import MAX_ALIAS_NODES, MAX_DEPTH, MAX_INT_CHARS, MAX_YAML_BYTES, MAX_YAML_NODES
from cocoonplan.lock import MAX_LOCK_BYTES
from cocoonplan.planfile import MAX_PLAN_BYTES

SECONDS = 30.0
"""Every refusal comes within this, memory traced (which slows Python about five times) or not.
A guard against a hang or super-linear work, not a speed target (those live in bench/): it holds
on a loaded CI machine, while an unbounded expansion of these inputs runs for minutes."""
MEMORY = 128 << 20
"""Peak memory Python allocates during a refused command: unbounded, these inputs take
gigabytes; a plan of the examples alone takes about 64 MiB."""
DEPTHS = [1_000, 100_000]
SNAPSHOT = "ghcr.io/cocoonstack/agent-snap:v1"
TITLE = "org.opencontainers.image.title"
REFUSED_DEPTH = f"nested more than {MAX_DEPTH} levels deep"
REFUSED_ALIASES = f"aliases expand to more than {MAX_ALIAS_NODES} nodes"
REFUSED_INT = f"an integer of more than {MAX_INT_CHARS} characters"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the examples without its lock, so ``lock`` reads every manifest afresh."""
    root = copy_examples(tmp_path / "repo")
    (root / "cocoonplan.lock").unlink()
    return root


def refused(
    args: list[str],
    cwd: Path,
    expected: str,
    env: dict[str, str] | None = None,
    *,
    trace: bool = True,
    hinted: bool = True,
) -> str:
    """Run ``cocoonplan ARGS``; assert exit 1 with the one line ``Error: <expected>…`` and
    (when ``hinted``) a hint, within SECONDS and (when ``trace``) MEMORY. Returns what it printed."""
    if trace:
        tracemalloc.start()
    started = time.monotonic()
    try:
        result: Result = run_cli(args, cwd, env)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.output
    error, *hint = result.stderr.splitlines()
    assert error.startswith(f"Error: {expected}"), result.stderr
    assert [line[:6] for line in hint] == (["hint: "] if hinted else []), result.stderr
    assert elapsed < SECONDS, f"refused after {elapsed:.1f} s"
    assert peak < MEMORY, f"peak {peak >> 20} MiB"
    return str(result.stderr)


def line_of(text: str, start: str) -> int:
    """The 1-based number of the first line of ``text`` starting with ``start``."""
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(start))


# --------------------------------------------------------------------------- hostile YAML


def laughs() -> tuple[str, str, int]:
    """A "billion laughs" mapping (9**10 scalars expanded); the line of the alias that crosses
    the budget, and its column."""
    text = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)
    )
    return text, "a4:", len("a4: &a4 [") + 1


def merges() -> tuple[str, str, int]:
    """The same with ``<<`` merge keys, which PyYAML's own constructor expands too."""
    text = "m0: &m0 {k: 1, j: 2}\n" + "".join(
        f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}]}}\n" for i in range(1, 12)
    )
    return text, "m4:", len("m4: &m4 {<<: [*m3, ") + 1  # its second alias crosses


def self_alias() -> tuple[str, str, int]:
    """An alias inside the node its anchor names: an endless expansion."""
    return "loop: &loop [x, *loop]\n", "loop:", len("loop: &loop [x, ") + 1


def alias_chain() -> tuple[str, str, int]:
    """Each anchor 40 levels deep around an alias of the previous: deep only once expanded."""
    text = "".join(f"c{i}: &c{i} {'[' * 40}{f'*c{i - 1}' if i else 'x'}{']' * 40}\n" for i in range(3))
    return text, "c1:", len("c1: &c1 ") + 40 + 1


BOMBS: dict[str, tuple[Callable[[], tuple[str, str, int]], str]] = {
    "laughs": (laughs, REFUSED_ALIASES),
    "merges": (merges, REFUSED_ALIASES),
    "self-alias": (self_alias, "alias *loop stands inside the node it names"),
    "alias-chain": (alias_chain, f"{REFUSED_DEPTH} once alias *c0 is expanded"),
}


def nested(kind: str, depth: int) -> tuple[str, int, int]:
    """A mapping ``deep:`` whose value nests ``depth`` levels; where the first level too many opens."""
    if kind == "flow":
        return f"deep: {'[' * depth}{']' * depth}\n", 1, len("deep: ") + MAX_DEPTH
    if kind == "block":
        return f"deep:\n{'- ' * depth}x\n", 2, 2 * (MAX_DEPTH - 1) + 1
    return f"deep: {'{a: ' * depth}x{'}' * depth}\n", 1, len("deep: ") + 4 * (MAX_DEPTH - 1) + 1


def add_document(file: Path, document: str) -> int:
    """Append ``document`` to a YAML file as a new document; the line it starts on."""
    text = file.read_text()
    file.write_text(f"{text}---\n{document}")
    return text.count("\n") + 2


def add_keys(file: Path, keys: str) -> int:
    """Append top-level keys to a one-document YAML file; the line they start on."""
    text = file.read_text()
    file.write_text(text + keys)
    return text.count("\n") + 1


WHERE: dict[str, tuple[Callable[[Path, str], tuple[str, int]], list[str]]] = {
    # A spec file, planned; the project file; another tool's file the project scan reads.
    "spec": (lambda p, doc: ("agent-run.yaml", add_document(p / "agent-run.yaml", doc)), ["validate", "."]),
    "project": (lambda p, doc: ("cocoonplan.yaml", add_keys(p / "cocoonplan.yaml", doc)), ["validate", "."]),
    "other-tool": (
        lambda p, doc: ("tools/notes.yaml", _other_tool_file(p / "tools" / "notes.yaml", doc)),
        ["plan", "agent-run.yaml"],
    ),
}


def _other_tool_file(file: Path, keys: str) -> int:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("apiVersion: example.com/v1\nkind: Other\n" + keys)
    return 3


@pytest.mark.parametrize("where", sorted(WHERE))
@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_alias_bombs_are_refused_at_the_alias(project: Path, bomb: str, where: str) -> None:
    make, expected = BOMBS[bomb]
    text, anchor_line, column = make()
    place, args = WHERE[where]
    name, first = place(project, text)
    line = first + line_of(text, anchor_line) - 1
    refused(args, project, f"{name}:{line}:{column}: YAML refused: {expected}")


@pytest.mark.parametrize("command", [["lock", "agent-run.yaml"], ["plan", "agent-run.yaml", "--json"]])
def test_a_bomb_anywhere_in_the_project_stops_a_partial_plan_or_lock(
    project: Path, command: list[str]
) -> None:
    # Skipped, the file would define nothing, and a VM it defines could be deleted.
    text, anchor_line, column = laughs()
    _other_tool_file(project / "deploy" / "values.yml", text)
    line = 2 + line_of(text, anchor_line)
    printed = refused(command, project, f"deploy/values.yml:{line}:{column}: YAML refused: {REFUSED_ALIASES}")
    assert "hint: cocoonplan reads every *.yaml and *.yml file of the project" in printed


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("kind", ["flow", "block", "mapping"])
@pytest.mark.parametrize("where", sorted(WHERE))
def test_deep_yaml_is_refused_where_it_gets_too_deep(
    project: Path, where: str, kind: str, depth: int
) -> None:
    text, line, column = nested(kind, depth)
    place, args = WHERE[where]
    name, first = place(project, text)
    refused(args, project, f"{name}:{first + line - 1}:{column}: YAML refused: {REFUSED_DEPTH}")


def test_nesting_up_to_the_bound_is_read(project: Path) -> None:
    text, _, _ = nested("flow", MAX_DEPTH - 1)  # the mapping around it is the last level
    add_document(project / "agent-run.yaml", text)
    result = run_cli(["validate", "."], project)
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    "value",
    ["1" * (MAX_INT_CHARS + 1), ":".join(["59"] * 2000), "0x" + "f" * MAX_INT_CHARS],
    ids=["decimal", "base-60", "hex"],
)
def test_huge_yaml_integers_are_refused(project: Path, value: str) -> None:
    # A base-60 integer of a few MiB would take minutes to convert.
    line = add_document(project / "agent-run.yaml", f"n: {value}\n")
    refused(["validate", "."], project, f"agent-run.yaml:{line}:4: YAML refused: {REFUSED_INT}")


@pytest.mark.parametrize(
    "memory",
    ["1" * 400 + "G", "9" * 30, str(1 << 63)],
    ids=["infinite-float", "beyond-int64", "just-beyond-int64"],
)
def test_sizes_beyond_int64_are_spec_errors(project: Path, memory: str) -> None:
    spec = project / "agent-run.yaml"
    spec.write_text(spec.read_text().replace("memory: 1G", f"memory: {memory}"))
    refused(
        ["validate", "."],
        project,
        f"agent-run.yaml:{line_of(spec.read_text(), '  memory:')}:3: spec.memory: a size cannot be over",
    )


def test_an_impossible_date_is_malformed_yaml_where_it_is(project: Path) -> None:
    line = _other_tool_file(project / "tools" / "dates.yaml", "when: 2026-13-01\n")
    refused(
        ["validate", "."],
        project,
        f"tools/dates.yaml:{line}:7: malformed YAML: invalid timestamp value: month must be in 1..12",
    )
    # Outside the planned paths it is malformed YAML like any other, which the project scan skips.
    result = run_cli(["plan", "agent-run.yaml"], project)
    assert result.exit_code == 0, result.stderr


def test_a_yaml_file_of_too_many_nodes_is_refused(project: Path) -> None:
    (project / "many.yaml").write_text(f"many: [{', '.join(['x'] * (MAX_YAML_NODES + 10))}]\n")
    # The key is the first node, so the list's item MAX_YAML_NODES crosses the budget. Its
    # memory is bounded by that budget; traced, the 100,000 nodes would take too long.
    column = len("many: [") + 3 * (MAX_YAML_NODES - 1) + 1
    refused(
        ["validate", "."],
        project,
        f"many.yaml:1:{column}: YAML refused: more than {MAX_YAML_NODES} nodes",
        trace=False,
    )


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("agent-run.yaml", ["validate", "."]),
        ("cocoonplan.yaml", ["validate", "."]),
        ("tools/big.yaml", ["plan", "agent-run.yaml"]),
    ],
)
def test_oversized_yaml_files_are_refused_unread(project: Path, name: str, args: list[str]) -> None:
    file = project / name
    file.parent.mkdir(exist_ok=True)
    with file.open("a") as out:
        out.write("# " + "x" * MAX_YAML_BYTES + "\n")
    refused(args, project, f"{name}: the file is larger than {MAX_YAML_BYTES} bytes")


def test_an_undeclared_node_elsewhere_never_breaks_a_partial_plan(project: Path) -> None:
    # Its own plan refuses it; planning another file must not crash on it (it once raised KeyError).
    (project / "elsewhere.yaml").write_text(
        "apiVersion: cocoonplan/v1alpha1\nkind: VM\nmetadata: {name: stray}\n"
        "spec: {image: ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface, node: node-z}\n"
    )
    result = run_cli(["plan", "agent-run.yaml", "--json"], project)
    assert result.exit_code == 0, result.stderr
    actions = {vm["name"]: vm["action"] for vm in json.loads(result.stdout)["vms"]}
    assert actions == {"agent-run": "no-op"}
    refused(["validate", "elsewhere.yaml"], project, "elsewhere.yaml:4:")


# --------------------------------------------------------------------------- hostile JSON


def deep_json(depth: int) -> bytes:
    return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


HUGE_INT = b'{"a": ' + b"7" * 5000 + b"}"
JSON_VARIANTS = {
    **{f"depth-{depth}": (deep_json(depth), REFUSED_DEPTH) for depth in DEPTHS},
    "huge-int": (HUGE_INT, f"not valid JSON: an integer of more than {MAX_INT_CHARS} digits"),
}


class Layout:
    """The examples' OCI layout, changed in place as a hostile source would serve it."""

    def __init__(self, project: Path) -> None:
        self.path = project / "oci"

    def put(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    def index(self) -> dict[str, Any]:
        index: dict[str, Any] = json.loads((self.path / "index.json").read_bytes())
        return index

    def entry(self, ref_name: str) -> dict[str, Any]:
        return next(
            m
            for m in self.index()["manifests"]
            if m["annotations"]["org.opencontainers.image.ref.name"] == ref_name
        )

    def manifest(self, ref_name: str) -> dict[str, Any]:
        digest = self.entry(ref_name)["digest"].removeprefix("sha256:")
        manifest: dict[str, Any] = json.loads((self.path / "blobs" / "sha256" / digest).read_bytes())
        return manifest

    def retag(self, ref_name: str, manifest: bytes) -> str:
        """Point ``ref_name`` at new manifest bytes; their digest."""
        digest = self.put(manifest)
        index = self.index()
        for entry in index["manifests"]:
            if entry["annotations"]["org.opencontainers.image.ref.name"] == ref_name:
                entry.update(digest=digest, size=len(manifest))
        (self.path / "index.json").write_text(json.dumps(index))
        return digest

    def snapshot_with(self, title: str, data: bytes) -> str:
        """Serve the snapshot with ``data`` as its config blob (``title`` ``config``) or as the
        layer of that title; the blob's digest."""
        manifest = self.manifest(SNAPSHOT)
        digest = self.put(data)
        for descriptor in [manifest["config"], *manifest["layers"]]:
            if title == "config" or descriptor.get("annotations", {}).get(TITLE) == title:
                descriptor.update(digest=digest, size=len(data))
                break
        self.retag(SNAPSHOT, json.dumps(manifest).encode())
        return digest


@pytest.mark.parametrize("variant", sorted(JSON_VARIANTS))
def test_hostile_manifests_are_refused(project: Path, variant: str) -> None:
    data, expected = JSON_VARIANTS[variant]
    Layout(project).retag(SNAPSHOT, data)
    refused(
        ["lock", "agent-clone.yaml"],
        project,
        f"manifest cocoonstack/agent-snap:v1 is {expected}",
    )


@pytest.mark.parametrize("field", ["size", "annotations", "layers"])
def test_manifests_of_any_shape_are_refused(project: Path, field: str) -> None:
    layout = Layout(project)
    manifest = layout.manifest(SNAPSHOT)
    if field == "size":  # a valid JSON integer beyond an int64 (once an OverflowError in renders)
        manifest["layers"][0]["size"] = 10**400
    else:
        manifest[field] = 5
    layout.retag(SNAPSHOT, json.dumps(manifest).encode())
    refused(["lock", "agent-clone.yaml"], project, "manifest ghcr.io/cocoonstack/agent-snap@sha256:")


@pytest.mark.parametrize("title", ["config", "cocoon.json", "config.json"])
@pytest.mark.parametrize("variant", sorted(JSON_VARIANTS))
def test_hostile_snapshot_blobs_are_refused(project: Path, title: str, variant: str) -> None:
    data, expected = JSON_VARIANTS[variant]
    digest = Layout(project).snapshot_with(title, data)
    printed = refused(["lock", "agent-clone.yaml"], project, "snapshot ghcr.io/cocoonstack/agent-snap:v1@")
    assert f"({digest} in ghcr.io/cocoonstack/agent-snap) is {expected}" in printed.splitlines()[0]


@pytest.mark.parametrize("variant", sorted(JSON_VARIANTS))
def test_a_hostile_layout_index_is_refused(project: Path, variant: str) -> None:
    data, expected = JSON_VARIANTS[variant]
    (project / "oci" / "index.json").write_bytes(data)
    refused(
        ["lock", "agent-clone.yaml"], project, f"cannot read {project / 'oci' / 'index.json'}: {expected}"
    )


def test_an_endless_layout_index_is_read_no_further_than_its_cap(project: Path) -> None:
    index = project / "oci" / "index.json"
    with index.open("r+b") as file:
        file.truncate(64 << 30)  # sparse: 64 GiB that take no disk
    refused(["lock", "agent-clone.yaml"], project, f"cannot read {index}: larger than")
    # A link to an endless device is not even opened (test_hostile_repository.py has the rest).
    index.unlink()
    index.symlink_to("/dev/zero")
    refused(
        ["lock", "agent-clone.yaml"],
        project,
        f"layout {index.parent} (for ghcr.io): index.json is a symbolic link, not a regular file",
    )


@pytest.mark.parametrize("variant", [*sorted(JSON_VARIANTS), "oversized"])
def test_a_hostile_docker_config_is_refused(project: Path, tmp_path: Path, variant: str) -> None:
    # Credentials are read for a registry the project reads over HTTP, before any request.
    (project / "remote.yaml").write_text(
        "apiVersion: cocoonplan/v1alpha1\nkind: VM\nmetadata: {name: remote}\n"
        "spec: {image: registry.example/app:v1, node: node-a}\n"
    )
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    if variant == "oversized":
        config.write_bytes(b" " * (5 << 20) + b"{}")
        expected = "larger than"
    else:
        config.write_bytes(JSON_VARIANTS[variant][0])
        expected = JSON_VARIANTS[variant][1]
    refused(
        ["lock", "remote.yaml"],
        project,
        f"cannot read docker config {config}: {expected}",
        env={"DOCKER_CONFIG": str(config.parent)},
    )


@pytest.mark.parametrize("variant", sorted(JSON_VARIANTS))
def test_a_hostile_plan_file_is_refused(tmp_path: Path, variant: str) -> None:
    data, expected = JSON_VARIANTS[variant]
    (tmp_path / "plan.json").write_bytes(data)
    refused(["show", "plan.json"], tmp_path, f"plan.json: cannot read the plan file: {expected}")


def test_an_endless_plan_file_is_read_no_further_than_its_cap(tmp_path: Path) -> None:
    (tmp_path / "plan.json").symlink_to("/dev/zero")
    refused(
        ["show", "plan.json"],
        tmp_path,
        f"plan.json: cannot read the plan file: larger than {MAX_PLAN_BYTES} bytes",
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        *((deep_json(depth), "Invalid JSON: recursion limit exceeded") for depth in DEPTHS),
        (HUGE_INT, "Invalid JSON: number out of range"),
        (None, f"larger than {MAX_LOCK_BYTES} bytes"),
    ],
    ids=[*(f"depth-{depth}" for depth in DEPTHS), "huge-int", "endless"],
)
def test_a_hostile_lock_file_is_refused(project: Path, content: bytes | None, expected: str) -> None:
    lock = project / "cocoonplan.lock"
    if content is None:
        with lock.open("wb") as file:
            file.truncate(64 << 30)  # sparse: 64 GiB that take no disk
    else:
        lock.write_bytes(content)
    refused(["plan", "."], project, f"{lock.name}: lock file is not valid: {expected}")


# --------------------------------------------------------------------------- a hostile token service


@pytest.fixture
def token_server() -> Iterator[tuple[str, list[bytes]]]:
    """A registry on loopback that asks for a bearer token from its own ``/token``, which
    answers the first body of the returned list."""
    answers: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host = f"127.0.0.1:{self.server.server_address[1]}"
            if self.path.startswith("/token"):
                self._answer(200, answers[0], {"Content-Type": "application/json"})
            else:
                realm = f'Bearer realm="http://{host}/token",service="test"'
                self._answer(401, b"{}", {"WWW-Authenticate": realm})

        def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", answers
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "body",
    [
        *(b'{"token": "t", "x": ' + deep_json(depth) + b"}" for depth in DEPTHS),
        HUGE_INT,
        b'{"token": "t", "expires_in": 1' + b"0" * 400 + b"}",
    ],
    ids=[*(f"depth-{depth}" for depth in DEPTHS), "huge-int", "expiry-beyond-float"],
)
def test_a_hostile_token_answer_is_refused(
    project: Path, token_server: tuple[str, list[bytes]], body: bytes
) -> None:
    host, answers = token_server
    answers.append(body)
    (project / "remote.yaml").write_text(
        "apiVersion: cocoonplan/v1alpha1\nkind: VM\nmetadata: {name: remote}\n"
        f"spec: {{image: '{host}/app:v1', node: node-a}}\n"
    )
    refused(
        ["lock", "remote.yaml"],
        project,
        f"token service http://{host}/token returned an unreadable answer for {host}",
        env={"DOCKER_CONFIG": str(project / "no-docker-config")},
    )
