"""``cocoonplan apply`` end to end against cocoon's v0.6 line, through the emulator
(tests/cocoon_emulator.py with ``COCOON_EMULATOR_VERSION=v0.6.4``): a fresh SQLite node, and
issue 9's "Done when" on a copy of the whole examples/ (node-a on the v0.3.8 emulator,
node-b on the v0.6 one)."""

from __future__ import annotations

import json
import shlex
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from clirunner import copy_examples, run_cli, set_node, tree
from cocoon_emulator import install_shim, shim_env

pytestmark = pytest.mark.usefixtures("erofs_as_root")

META_DB = "meta/meta.db"
JSON_DBS = ("cloudhypervisor/db/vms.json", "snapshot/db/snapshots.json", "oci/db/images.json")


def _witnessed(path: Path, shim: Path, db: Path, ledger: Path) -> Path:
    """A ``cocoon`` that runs ``shim`` and writes to ``ledger`` each command line and the
    sha256 of ``db`` before and after it: between two cocoon commands nobody else wrote it."""
    digest = f"if [ -f {shlex.quote(str(db))} ]; then sha256sum {shlex.quote(str(db))} | cut -c1-64; else echo none; fi"
    log = shlex.quote(str(ledger))
    path.write_text(
        "#!/bin/sh\n"
        f'echo "before $({digest})" >> {log}\n'
        f'echo "argv $*" >> {log}\n'
        f'{shlex.quote(str(shim))} "$@"\nrc=$?\n'
        f'echo "after $({digest})" >> {log}\n'
        "exit $rc\n"
    )
    path.chmod(0o755)
    return path


def _records(root: Path, table: str) -> dict[str, Any]:
    with closing(sqlite3.connect(f"file:{root / META_DB}?mode=ro", uri=True)) as db:
        return {i: json.loads(d) for i, d in db.execute(f'SELECT id, data FROM "{table}"')}


def test_a_fresh_v06_node_is_applied_through_cocoon_and_proven(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "examples", node_b=True, node_a=False)
    root = tmp_path / "node-b-root"
    root.mkdir()
    api_log, ledger = tmp_path / "api.log", tmp_path / "ledger"
    env = shim_env(root, cpus=16, version="v0.6.4", registry=project / "oci", seed="v06", api_log=api_log)
    cocoon = _witnessed(tmp_path / "cocoon", install_shim(tmp_path / "bin", env), root / META_DB, ledger)
    set_node(project, "node-b", state=str(root), cocoonVersion="v0.6.4", cocoon=str(cocoon))

    planned = run_cli(["plan", ".", "--out", "p.json"], project)
    assert planned.exit_code == 0, planned.stderr
    applied = run_cli(["apply", "p.json", "--auto-approve"], project)
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    again = run_cli(["plan", ".", "--detailed-exitcode"], project)
    assert again.exit_code == 0, again.stdout + again.stderr

    # meta.db is cocoon's alone: it did not exist before the first cocoon command, and between
    # two of them (and after the last) nobody else changed it.
    lines = ledger.read_text().splitlines()
    digests = [line.split()[1] for line in lines if line.split()[0] in ("before", "after")]
    assert digests[0] == "none" and digests[-1] != "none"
    assert all(digests[i] == digests[i + 1] for i in range(1, len(digests) - 1, 2)), (
        "written between commands"
    )
    assert (root / META_DB).is_file() and digests[-1] == _sha256(root / META_DB)
    assert not any((root / rel).exists() for rel in JSON_DBS), "no JSON metadata on a fresh v0.6 root"

    commands = [line.removeprefix("argv ") for line in lines if line.startswith("argv ")]
    (pull,) = [c for c in commands if " image pull " in c]
    assert pull.endswith(f" image pull ghcr.io/cocoonstack/cocoon/ubuntu@{_run_image(project)}")
    (clone,) = [c for c in commands if " vm clone " in c]
    assert "--restore-mode copy" in clone and "--cpu" not in clone, "upstream CH: copy, never mmap"

    vms = {r["config"]["name"]: r for r in _records(root, "vms_cloudhypervisor__records").values()}
    assert set(vms) == {"agent-clone", "agent-run"}
    layers = [c for c in vms["agent-clone"]["storage_configs"] if c["role"] == "layer"]
    assert len(layers) == 11 and all(
        (root / c["path"].removeprefix("/var/lib/cocoon/")).is_file() for c in layers
    )
    run_dir = vms["agent-clone"]["run_dir"]
    config = json.loads((root / run_dir.removeprefix("/var/lib/cocoon/") / "config.json").read_text())
    assert [n["tap"] for n in config["net"]] == [f"rm{vms['agent-clone']['id'][:8]}-0"]
    calls = [json.loads(line) for line in api_log.read_text().splitlines()]
    assert "memory_restore_mode" not in calls[0]["body"]
    mac = vms["agent-clone"]["network_configs"][0]["mac"]
    assert {"cocoon-net-" + mac.replace(":", "")} == {
        c["body"]["id"] for c in calls if c["endpoint"] == "vm.add-net"
    }


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_image(project: Path) -> str:
    index = json.loads((project / "oci/index.json").read_text())
    ref = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513"
    return str(
        next(
            m["digest"]
            for m in index["manifests"]
            if m["annotations"]["org.opencontainers.image.ref.name"] == ref
        )
    )


def _done_when(tmp_path: Path) -> Path:
    """Issue 9's "Done when" setup in ``tmp_path``: a copy of the whole ``examples/`` whose
    node-a reads an empty root (rootDir stays /var/lib/cocoon) run by the v0.3.8 emulator and
    whose node-b keeps its copy of the shipped SQLite root, run by the v0.6.4 emulator."""
    project = copy_examples(tmp_path / "examples", node_b=True)
    empty = tmp_path / "node-a-root"
    empty.mkdir()
    node_a = install_shim(tmp_path / "bin-a", shim_env(empty, cpus=16, seed="done-when"))
    node_b = install_shim(
        tmp_path / "bin-b",
        shim_env(project / "node-b", cpus=16, version="v0.6.4", registry=project / "oci", seed="done-when"),
    )
    set_node(project, "node-a", state=str(empty), cocoonVersion="v0.3.8", cocoon=str(node_a))
    set_node(project, "node-b", cocoon=str(node_b))
    return project


def test_done_when_both_example_nodes_are_applied_and_proven(tmp_path: Path) -> None:
    project = _done_when(tmp_path)
    planned = run_cli(["plan", "examples/", "--out", "p.json"], tmp_path)
    assert planned.exit_code == 0, planned.stderr
    # As the issue runs it, from the directory holding examples/: the plan file names its project.
    applied = run_cli(["apply", "p.json", "--auto-approve"], tmp_path)
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    for made in ("node-a/agent-clone", "node-a/agent-run", "node-b/agent-clone"):
        assert f"{made}: created as " in applied.stdout
    again = run_cli(["plan", "examples/", "--detailed-exitcode"], tmp_path)
    assert again.exit_code == 0, again.stdout + again.stderr
    vms = {
        r["config"]["name"]: r for r in _records(project / "node-b", "vms_cloudhypervisor__records").values()
    }
    assert set(vms) == {"agent-clone", "agent-run", "legacy-tool"}
    assert vms["agent-clone"]["id"] != "V4SEH2KVJ72CEUVW75EFR6EDT4", "the drifted clone was replaced"
    assert len([c for c in vms["agent-clone"]["storage_configs"] if c["role"] == "layer"]) == 11


def test_done_when_a_corrupted_example_blob_installs_nothing(tmp_path: Path) -> None:
    project = _done_when(tmp_path)
    assert run_cli(["plan", "examples/", "--out", "p.json"], tmp_path).exit_code == 0
    document = json.loads((tmp_path / "p.json").read_text())
    layer = next(b["digest"] for vm in document["vms"] for b in vm["blobs"] if b["kind"] == "layer")
    victim = project / "oci/blobs/sha256" / layer.removeprefix("sha256:")
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    shutil.rmtree(project / ".cocoonplan")  # planning cached verified copies of the run image's layers
    roots = (tmp_path / "node-a-root", project / "node-b")
    before = [tree(root) for root in roots]
    result = run_cli(["apply", "p.json", "--content-only"], tmp_path)
    assert result.exit_code == 1 and layer in result.stderr
    after = [{k: v for k, v in tree(root).items() if not k.startswith("cocoonplan/")} for root in roots]
    assert after == [{k: v for k, v in t.items() if not k.startswith("cocoonplan/")} for t in before]
