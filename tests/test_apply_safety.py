"""``cocoonplan apply`` when things go wrong: the #46 setup (a stale local snapshot of the tag),
a clone cocoon builds on the wrong layers, two applies at once, and ``kill -9`` mid-apply.

The node is an empty cocoon root run by the v0.3.8 emulator (tests/cocoon_emulator.py), whose
``COCOON_EMULATOR_FAULT`` knob injects the faults; layers are converted with the real
mkfs.erofs and checked with the real fsck.erofs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import ocifixture
from clirunner import REPO, copy_examples, example_builder, plan_json, run_cli, vm_entry
from cocoon_emulator import install_shim
from cocoonplan.cocoon import snapshot_import_name
from cocoonplan.executors.blobs import STALE_TEMPORARY
from cocoonplan.executors.lease import LEASE_FILE, hold

pytestmark = pytest.mark.usefixtures("erofs_as_root")

ROOT_DIR = "/var/lib/cocoon"
LAYOUT = "    layout: oci\n"


def _shim(tmp_path: Path, root: Path, **env: str) -> Path:
    """(Re)write the ``cocoon`` shim of the test's node, with extra emulator settings."""
    return install_shim(
        tmp_path / "bin",
        {
            "COCOON_EMULATOR_HOST_ROOT": str(root),
            "COCOON_EMULATOR_SEED": "apply-safety",
            "COCOON_EMULATOR_CPUS": "16",
            **env,
        },
    )


def _node(tmp_path: Path, **env: str) -> tuple[Path, Path]:
    """A copy of the examples whose node-a is an empty cocoon root run by the emulator: the
    project directory and the node root."""
    project = copy_examples(tmp_path / "examples")
    root = tmp_path / "node-root"
    root.mkdir()
    shim = _shim(tmp_path, root, **env)
    config = project / "cocoonplan.yaml"
    config.write_text(
        config.read_text().replace(
            "    state: node\n",
            f"    state: {root}\n    cocoonVersion: v0.3.8\n    cocoon: {shim}\n",
        )
    )
    return project, root


def _cocoon(tmp_path: Path, *args: str, stdin: bytes | None = None) -> str:
    """Run the node's cocoon (the emulator shim) directly, as an operator would."""
    result = subprocess.run(
        [str(tmp_path / "bin/cocoon"), "--root-dir", ROOT_DIR, *args],
        input=stdin,
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def _db(root: Path, rel: str) -> dict[str, Any]:
    path = root / rel
    return json.loads(path.read_text()) if path.exists() else {}


def _listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.stat().st_size < 1 << 20}


def _layer_paths(storage_configs: list[dict[str, Any]]) -> list[str]:
    return [sc["path"] for sc in storage_configs if sc["role"] == "layer"]


def _erofs(hexes: list[str]) -> list[str]:
    return [f"{ROOT_DIR}/oci/blobs/{h}.erofs" for h in hexes]


# --------------------------------------------------------------------------- cocoon #46


def test_a_stale_local_snapshot_of_the_tag_is_never_used(tmp_path: Path) -> None:
    project, root = _node(tmp_path)
    build = example_builder()
    artifacts, _ = build.scenario()
    xface, xface_0513, agent_snap = (
        artifacts[build.XFACE],
        artifacts[build.XFACE_0513],
        artifacts[build.AGENT_SNAP],
    )
    # The #46 setup: a local snapshot named after the tag, baked from the 6-layer image.
    source = ocifixture.SourceVM(
        id="UJZDEGXDNCF32EPF3DHODZDOCI",
        name="agent-src",
        nics=[ocifixture.Nic(ip="10.22.0.5", prefix=16, gateway="10.22.0.1")],
        host_cpus=16,
    )
    stale = ocifixture.snapshot(xface_0513, base_ref=build.XFACE_0513, vm=source)
    stale_id = _cocoon(
        tmp_path, "snapshot", "import", "--name", "agent-snap", stdin=ocifixture.export_tar(stale)
    )
    stale_id = stale_id.strip()
    stale_record = _db(root, "snapshot/db/snapshots.json")["snapshots"][stale_id]
    stale_dir = root / stale_record["data_dir"].removeprefix(ROOT_DIR + "/")
    stale_files = _listing(stale_dir)
    assert _layer_paths(json.loads(stale_files["cocoon.json"])["storage_configs"]) == _erofs(
        [b.hex for b in xface_0513.layers]
    )

    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    applied = run_cli(["apply", "p.json"], project)
    assert applied.exit_code == 0, applied.stdout + applied.stderr

    snapshots = _db(root, "snapshot/db/snapshots.json")
    imported = snapshot_import_name(agent_snap.digest)
    assert set(snapshots["names"]) == {"agent-snap", imported}, "the artifact imported under its digest name"
    assert snapshots["names"]["agent-snap"] == stale_id and snapshots["snapshots"][stale_id] == stale_record
    assert _listing(stale_dir) == stale_files, "the stale snapshot is untouched"
    vms = _db(root, "cloudhypervisor/db/vms.json")
    clone = vms["vms"][vms["names"]["agent-clone"]]
    assert _layer_paths(clone["storage_configs"]) == _erofs([b.hex for b in xface.layers])
    assert len(xface.layers) == 11
    config = json.loads((root / clone["run_dir"].removeprefix(ROOT_DIR + "/") / "config.json").read_text())
    assert [d["path"] for d in config["disks"] if d.get("readonly")][:11] == _erofs(
        [b.hex for b in xface.layers]
    )
    _, document = plan_json(project)
    entry = vm_entry(document, "agent-clone")
    assert entry["action"] == "no-op" and entry["drift"] == []
    assert run_cli(["plan", ".", "--detailed-exitcode"], project).exit_code == 0


# --------------------------------------------------------------------------- the proof


def test_the_proof_names_the_layers_of_a_clone_cocoon_built_wrong(tmp_path: Path) -> None:
    project, root = _node(tmp_path, COCOON_EMULATOR_FAULT="clone-drop-top-layers:9")
    build = example_builder()
    artifacts, _ = build.scenario()
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    applied = run_cli(["apply", "p.json"], project)
    assert applied.exit_code == 1, applied.stdout
    message = " ".join(applied.stderr.split())
    assert "does not run what the plan says" in message and "agent-clone" in message, message
    dropped = artifacts[build.XFACE].layers[2:]
    for index, blob in enumerate(dropped, start=2):
        # Each layer cocoon left out is named with the file the plan has for it.
        planned = f"/var/lib/cocoon/oci/blobs/{blob.hex}.erofs"
        assert f"disks.cocoon-layer{index} is missing (planned {planned})" in message, message
        assert f"drift disks[{index}]: layer{index} {blob.hex[:12]} " in message, message
    # Bound to what cocoon chose, the clone's own disks and run files are where the plan has
    # them: the re-plan's provisional ID must not show as a difference of their paths.
    vms = _db(root, "cloudhypervisor/db/vms.json")
    clone = vms["vms"][vms["names"]["agent-clone"]]
    for noise in (
        "cow.raw",
        "data-db.raw",
        clone["id"],
        "/run/",
        "disks.cocoon-cow",
        "disks.db",
        "blobs.sha256",
    ):
        assert noise not in message, (noise, message)
    assert len(_layer_paths(clone["storage_configs"])) == 2, "the emulator built the clone wrong"
    # The VMs made are cocoonplan's whatever the proof says; the plan is not recorded as applied.
    owned = _db(root, "cocoonplan/owned.json")
    assert {entry["name"] for entry in owned["vms"].values()} == {"agent-clone", "agent-run"}
    assert clone["id"] in owned["vms"] and "building" not in owned
    assert "applied_plan" not in owned, "a plan whose proof failed is not recorded as applied"


# --------------------------------------------------------------------------- locks


def _hold(root: Path, ready: threading.Event, release: threading.Event, held: list[str]) -> None:
    with hold(
        root,
        node="node-a",
        owner="alice",
        host="ci-runner-7",
        pid=4242,
        operation="apply",
        clock=lambda: datetime.now(UTC),
        sleep=time.sleep,
    ) as lease:
        held.append(lease.id)
        ready.set()
        release.wait(60)


def test_a_second_apply_fails_naming_the_holder_or_waits_for_it(tmp_path: Path) -> None:
    project, root = _node(tmp_path)
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    ready, release, held = threading.Event(), threading.Event(), []
    holder = threading.Thread(target=_hold, args=(root, ready, release, held))
    holder.start()
    try:
        assert ready.wait(10)
        refused = run_cli(["apply", "p.json"], project)
        assert refused.exit_code == 1
        message = " ".join(refused.stderr.split())
        assert f"lease {held[0]} by alice@ci-runner-7 (pid 4242, apply)" in message, message
        assert not (root / "oci").exists(), "nothing done while another apply holds the node"
        threading.Timer(1.5, release.set).start()
        waited = run_cli(["apply", "p.json", "--lock-timeout", "30"], project)
        assert waited.exit_code == 0, waited.stdout + waited.stderr
    finally:
        release.set()
        holder.join()
    assert not (root / LEASE_FILE).exists()
    assert run_cli(["plan", ".", "--detailed-exitcode"], project).exit_code == 0


# --------------------------------------------------------------------------- kill -9


class Drip:
    """A mirror that serves the layout's blobs by sending half of each, then nothing until it
    is closed: a download that is always in progress."""

    def __init__(self, blobs: Path) -> None:
        self.blobs = blobs
        self.sent = threading.Event()
        self.closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        drip = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1].removeprefix("sha256:")
                path = drip.blobs / name
                if "/blobs/" not in self.path or not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                drip.sent.set()
                drip.closing.wait(60)
                self.close_connection = True

        return Handler


def _killed_apply(project: Path, env: dict[str, str], reached: Callable[[], bool]) -> None:
    """Run ``cocoonplan apply p.json`` as a real process group and SIGKILL all of it (cocoon and
    mkfs.erofs children too) once ``reached`` says it is at the chosen moment."""
    argv = [sys.executable, "-m", "cocoonplan", "apply", "p.json"]
    with subprocess.Popen(
        argv, cwd=project, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as run:
        try:
            deadline = time.monotonic() + 60
            while not reached():
                if run.poll() is not None:
                    assert run.stdout is not None
                    output = run.stdout.read().decode()
                    pytest.fail(f"apply ended (exit {run.returncode}) before the kill: {output}")
                assert time.monotonic() < deadline, "apply never reached the moment of the kill"
                time.sleep(0.05)
        finally:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == -signal.SIGKILL


def _consistent(root: Path) -> None:
    """Nothing under a final name is partial after the kill."""
    for erofs in sorted((root / "oci/blobs").glob("*.erofs")) if (root / "oci/blobs").is_dir() else []:
        checked = subprocess.run(["fsck.erofs", str(erofs)], capture_output=True, check=False)
        assert checked.returncode == 0, f"{erofs.name}: {checked.stdout.decode()}{checked.stderr.decode()}"
    staging = root / "cocoonplan/staging"
    for blob in sorted(staging.iterdir()) if staging.is_dir() else []:
        if len(blob.name) == 64:
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"partial blob {blob.name}"
    for rel in ("oci/db/images.json", "cocoonplan/owned.json", "cloudhypervisor/db/vms.json"):
        if (root / rel).exists():
            json.loads((root / rel).read_text())
    for record in _db(root, "snapshot/db/snapshots.json").get("snapshots", {}).values():
        if not record.get("pending"):
            data = root / record["data_dir"].removeprefix(ROOT_DIR + "/")
            assert {"cocoon.json", "config.json", "state.json"} <= {p.name for p in data.iterdir()}


@pytest.fixture
def drip(tmp_path: Path) -> Iterator[Drip]:
    server = Drip(tmp_path / "examples/oci/blobs/sha256")
    yield server
    server.close()


def _slow_mkfs(directory: Path, marker: Path) -> Path:
    real = shutil.which("mkfs.erofs")
    assert real is not None
    directory.mkdir()
    wrapper = directory / "mkfs.erofs"
    wrapper.write_text(
        f'#!/bin/sh\ntouch {shlex.quote(str(marker))}\nsleep 60\nexec {shlex.quote(real)} "$@"\n'
    )
    wrapper.chmod(0o755)
    return directory


@pytest.mark.parametrize("moment", ["download", "conversion", "snapshot-import"])
def test_kill_9_mid_apply_then_force_unlock_and_apply_again(moment: str, tmp_path: Path, drip: Drip) -> None:
    fault = {"COCOON_EMULATOR_FAULT": "import-sleep:60"} if moment == "snapshot-import" else {}
    project, root = _node(tmp_path, **fault)
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    config = project / "cocoonplan.yaml"
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    reached: Callable[[], bool]
    if moment == "download":
        # Every blob through the dripping mirror: nothing from the layout or the digest cache.
        config.write_text(config.read_text().replace(LAYOUT, f"    mirror: {drip.url}\n"))
        shutil.rmtree(project / ".cocoonplan", ignore_errors=True)
        reached = drip.sent.is_set
    elif moment == "conversion":
        marker = tmp_path / "mkfs-started"
        env["PATH"] = f"{_slow_mkfs(tmp_path / 'slow', marker)}:{env['PATH']}"
        reached = marker.exists
    else:

        def reached() -> bool:
            pending = [
                r
                for r in _db(root, "snapshot/db/snapshots.json").get("snapshots", {}).values()
                if r.get("pending")
            ]
            return bool(pending) and any(
                (root / pending[0]["data_dir"].removeprefix(ROOT_DIR + "/")).iterdir()
            )

    _killed_apply(project, env, reached)
    _consistent(root)
    if moment == "download":
        staged = [p.name for p in (root / "cocoonplan/staging").iterdir()]
        assert any(STALE_TEMPORARY.fullmatch(name) for name in staged), f"killed mid-download: {staged}"
    if moment == "snapshot-import":
        [pending] = _db(root, "snapshot/db/snapshots.json")["snapshots"].values()
        assert pending["pending"] is True, "cocoon's own marker: the half snapshot is not live"

    # The dead apply's lease stays: a new apply is refused until it is removed by its id.
    lease = json.loads((root / LEASE_FILE).read_text())
    config.write_text(config.read_text().replace(f"    mirror: {drip.url}\n", LAYOUT))
    _shim(tmp_path, root)
    refused = run_cli(["apply", "p.json"], project)
    assert refused.exit_code == 1 and lease["id"] in refused.stderr
    unlocked = run_cli(["force-unlock", "node-a", lease["id"]], project)
    assert unlocked.exit_code == 0, unlocked.stdout + unlocked.stderr
    assert not (root / LEASE_FILE).exists()

    assert run_cli(["plan", ".", "--out", "again.json"], project).exit_code == 0
    applied = run_cli(["apply", "again.json"], project)
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    _consistent(root)
    assert run_cli(["plan", ".", "--detailed-exitcode"], project).exit_code == 0
    snapshots = _db(root, "snapshot/db/snapshots.json")["snapshots"]
    assert [r["name"] for r in snapshots.values()] == [
        r["name"] for r in snapshots.values() if not r.get("pending")
    ]
    assert not [p for p in (root / "cocoonplan/staging").iterdir() if p.name.endswith(".tmp")]


def _stalling_cocoon(tmp_path: Path, root: Path, command: str, marker: Path) -> None:
    """Make the node's cocoon the emulator behind a wrapper that, once ``cocoon <command>``
    succeeded, touches ``marker`` and stalls before printing: apply is killed right after
    cocoon acted, before it could read the ID cocoon printed."""
    real = _shim(tmp_path, root)
    emulator = real.with_name("cocoon-emulator")
    real.rename(emulator)
    real.write_text(
        "#!/bin/sh\n"
        f'out=$({shlex.quote(str(emulator))} "$@")\nrc=$?\n'
        f'case " $* " in *" {command} "*) [ $rc -eq 0 ] && touch {shlex.quote(str(marker))} && sleep 60;; esac\n'
        'printf "%s\\n" "$out"\nexit $rc\n'
    )
    real.chmod(0o755)


def _vms(root: Path) -> dict[str, dict[str, Any]]:
    db = _db(root, "cloudhypervisor/db/vms.json")
    return {record["config"]["name"]: record for record in db.get("vms", {}).values()}


def _force_unlock(project: Path, root: Path) -> None:
    lease = json.loads((root / LEASE_FILE).read_text())
    unlocked = run_cli(["force-unlock", "node-a", lease["id"]], project)
    assert unlocked.exit_code == 0, unlocked.stdout + unlocked.stderr


@pytest.mark.parametrize("rerun", ["same-plan", "new-plan"])
def test_kill_9_right_after_cocoon_created_a_vm_then_apply_again(rerun: str, tmp_path: Path) -> None:
    project, root = _node(tmp_path)
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    marker = tmp_path / "cloned"
    _stalling_cocoon(tmp_path, root, "vm clone", marker)
    _killed_apply(project, os.environ | {"PYTHONPATH": str(REPO / "src")}, marker.exists)
    _consistent(root)
    clone = _vms(root)["agent-clone"]
    owned = _db(root, "cocoonplan/owned.json")
    assert clone["id"] not in owned["vms"], "killed before cocoon's output was read"
    assert owned["building"]["agent-clone"]["plan"] == json.loads((project / "p.json").read_text())["digest"]

    _shim(tmp_path, root)
    _force_unlock(project, root)
    _, document = plan_json(project)
    assert document["errors"] == [], "the VM cocoon made for the killed apply is cocoonplan's"
    assert vm_entry(document, "agent-clone")["action"] == "no-op"
    assert vm_entry(document, "agent-run")["action"] == "create"
    if rerun == "new-plan":
        assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    applied = run_cli(["apply", "p.json"], project)
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    _consistent(root)
    vms = _vms(root)
    assert vms["agent-clone"] == clone, "the VM made before the kill is kept, not made twice"
    owned = _db(root, "cocoonplan/owned.json")
    assert {vm_id: entry["name"] for vm_id, entry in owned["vms"].items()} == {
        clone["id"]: "agent-clone",
        vms["agent-run"]["id"]: "agent-run",
    }
    assert owned["vms"][clone["id"]].get("config_sha256"), "recorded with the config.json it runs"
    assert "building" not in owned
    assert owned["applied_plan"] == json.loads((project / "p.json").read_text())["digest"]
    assert run_cli(["plan", ".", "--detailed-exitcode"], project).exit_code == 0


def test_kill_9_right_after_a_replaced_vm_was_removed_then_the_same_plan_again(tmp_path: Path) -> None:
    project, root = _node(tmp_path)
    assert run_cli(["apply", ".", "--auto-approve"], project).exit_code == 0
    old = _vms(root)["agent-run"]
    spec = project / "agent-run.yaml"
    spec.write_text(spec.read_text().replace("cpu: 2", "cpu: 4"))
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    marker = tmp_path / "removed"
    _stalling_cocoon(tmp_path, root, "vm rm", marker)
    _killed_apply(project, os.environ | {"PYTHONPATH": str(REPO / "src")}, marker.exists)
    _consistent(root)
    assert "agent-run" not in _vms(root)

    _shim(tmp_path, root)
    _force_unlock(project, root)
    applied = run_cli(["apply", "p.json"], project)
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    new = _vms(root)["agent-run"]
    assert new["id"] != old["id"] and new["config"]["cpu"] == 4
    owned = _db(root, "cocoonplan/owned.json")
    assert old["id"] not in owned["vms"] and owned["vms"][new["id"]]["name"] == "agent-run"
    assert run_cli(["plan", ".", "--detailed-exitcode"], project).exit_code == 0


# --------------------------------------------------------------------------- staging


def _staged(root: Path) -> set[str]:
    staging = root / "cocoonplan/staging"
    return {p.name for p in staging.iterdir()} if staging.is_dir() else set()


def test_staged_blobs_are_removed_once_consumed_and_kept_after_a_failure(tmp_path: Path) -> None:
    project, root = _node(tmp_path)
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    document = json.loads((project / "p.json").read_text())
    blobs = {b["digest"].removeprefix("sha256:"): b["kind"] for vm in document["vms"] for b in vm["blobs"]}
    snapshot_files = {hex_ for hex_, kind in blobs.items() if kind != "layer"}
    assert snapshot_files and len(snapshot_files) < len(blobs)

    # Content only: the layers are converted, so their blobs go; the snapshot's files wait
    # in staging for the VM apply.
    content = run_cli(["apply", "p.json", "--content-only"], project)
    assert content.exit_code == 0, content.stdout + content.stderr
    assert _staged(root) == snapshot_files

    # A failed apply keeps what it staged, for the run that resumes it.
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    _shim(tmp_path, root, COCOON_EMULATOR_FAULT="clone-drop-top-layers:9")
    failed = run_cli(["apply", "p.json"], project)
    assert failed.exit_code == 1 and "does not run what the plan says" in failed.stderr
    assert _staged(root) == snapshot_files

    _shim(tmp_path, root)
    assert run_cli(["plan", ".", "--out", "again.json"], project).exit_code == 0
    applied = run_cli(["apply", "again.json"], project)
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    assert _staged(root) == set(), "the node's apply succeeded: nothing staged is kept"
    assert run_cli(["plan", ".", "--detailed-exitcode"], project).exit_code == 0


# --------------------------------------------------------------------------- lease


def test_an_apply_whose_lease_is_taken_over_fails_naming_the_new_holder(tmp_path: Path) -> None:
    project, root = _node(tmp_path)
    assert run_cli(["plan", ".", "--out", "p.json"], project).exit_code == 0
    # While cocoon clones, another apply takes the node over (as one would once the lease expired).
    taken = {
        "id": "feedfacefeedface",
        "owner": "mallory",
        "host": "ci-runner-9",
        "pid": 77,
        "operation": "apply",
        "created": "2026-12-01T12:00:00Z",
        "expires": "2099-12-01T13:00:00Z",
    }
    real = _shim(tmp_path, root)
    emulator = real.with_name("cocoon-emulator")
    real.rename(emulator)
    lease = root / LEASE_FILE
    real.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" vm clone "*) printf %s {shlex.quote(json.dumps(taken))} > {shlex.quote(str(lease))};; esac\n'
        f'exec {shlex.quote(str(emulator))} "$@"\n'
    )
    real.chmod(0o755)
    applied = run_cli(["apply", "p.json"], project)
    assert applied.exit_code == 1
    message = " ".join(applied.stderr.split())
    assert "is no longer held by this apply's lease" in message, message
    assert "lease feedfacefeedface by mallory@ci-runner-9 (pid 77, apply)" in message, message
    assert "agent-run" not in _vms(root), "no step after the takeover was run"
    assert json.loads(lease.read_text()) == taken, "the new holder's lease is left alone"
