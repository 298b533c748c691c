"""The cocoon v0.3.8 emulator (tests/cocoon_emulator.py) against ocifixture, the other
independent witness of cocoon's formats, and against cocoonplan's own node reader."""

from __future__ import annotations

import gzip
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

import cocoon_emulator
import metafixture
import ocifixture
from ocifixture import GIB, Artifact, DataDisk, Nic, NodeVM, Run, SourceVM

EMULATOR = Path(cocoon_emulator.__file__)
ROOT_DIR = "/var/lib/cocoon"
RUN_DIR = f"{ROOT_DIR}/run"
REF = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface"
LEASE = Nic(ip="10.88.0.2", prefix=16, gateway="10.88.0.1")


@pytest.fixture(scope="module")
def base() -> Artifact:
    return ocifixture.image(
        [
            ocifixture.layer({"etc/os-release": b"ID=ubuntu\n"}),
            ocifixture.layer({"boot/vmlinuz-6.1": b"kernel", "boot/initrd.img-6.1": b"initrd"}),
            ocifixture.layer({"usr/bin/agent": b"agent"}),
        ]
    )


@pytest.fixture(scope="module")
def stray() -> Artifact:
    """An image that is never pulled: its layers are not on the node."""
    return ocifixture.image([ocifixture.layer({"opt/other": b"other"})])


@pytest.fixture
def node(tmp_path: Path, base: Artifact) -> Path:
    root = tmp_path / "node"
    ocifixture.node_root(root, images={REF: base}, vms=[])
    return root


def cocoon(
    node: Path, *args: str, stdin: bytes | None = None, seed: str = "t", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "COCOON_EMULATOR_HOST_ROOT": str(node),
        "COCOON_EMULATOR_CPUS": "16",
        "COCOON_EMULATOR_SEED": seed,
        **(env or {}),
    }
    env.pop("COCOON_DNS", None)
    argv = [sys.executable, str(EMULATOR), "--root-dir", ROOT_DIR, *args]
    result = subprocess.run(argv, input=stdin, capture_output=True, env=env, check=False)
    return subprocess.CompletedProcess(
        argv, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def ok(node: Path, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> str:
    result = cocoon(node, *args, stdin=stdin, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(node: Path, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> str:
    result = cocoon(node, *args, stdin=stdin, env=env)
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("Error: "), result.stderr
    return result.stderr


def vms(node: Path) -> dict[str, Any]:
    raw = (node / "cloudhypervisor/db/vms.json").read_bytes()
    assert b"\n" not in raw.removesuffix(b"\n") and b": " not in raw  # compact, Go-style
    return dict(json.loads(raw))


def snapshots(node: Path) -> dict[str, Any]:
    return dict(json.loads((node / "snapshot/db/snapshots.json").read_bytes()))


def host(node: Path, path: str) -> Path:
    return node / path.removeprefix(ROOT_DIR + "/")


def expected_run(vm: NodeVM, base: Artifact, image: str) -> tuple[dict[str, Any], str]:
    """ocifixture's record (timestamps and pid aside) and launch line for a ``vm run`` VM."""
    vm_dir = f"{RUN_DIR}/cloudhypervisor/{vm.id}"
    layers = [b.hex for b in base.layers]
    kernel, initrd = (b.hex for b in base.boot_layers())
    scs = ocifixture.storage_configs(layers, vm_dir, vm.data_disks, ROOT_DIR)
    boot = {
        "kernel_path": f"{ROOT_DIR}/oci/boot/{kernel}/vmlinuz",
        "initrd_path": f"{ROOT_DIR}/oci/boot/{initrd}/initrd.img",
        "cmdline": ocifixture.build_cmdline(len(layers), vm.name, vm.nics),
    }
    config = {"image": image, "image_digest": base.digest, "image_type": "oci"}
    record = ocifixture._vm_record(vm, config, vm_dir, scs, boot, {*layers, kernel, initrd})
    return record, " ".join(ocifixture.ch_cli_args(vm, vm_dir, scs, boot))


def same_record(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    volatile = ("pid", "created_at", "updated_at", "started_at", "stopped_at")
    assert list(actual) == list(expected)
    assert {k: v for k, v in actual.items() if k not in volatile} == {
        k: v for k, v in expected.items() if k not in volatile
    }
    assert json.dumps(actual["config"]) == json.dumps(expected["config"])  # key order too


def test_version_prints_five_lines(node: Path) -> None:
    lines = ok(node, "version").splitlines()
    assert len(lines) == 5 and lines[0] == "Version: v0.3.8"
    assert [line.split(":")[0] for line in lines] == [
        "Version",
        "Git hash",
        "Built",
        "Golang version",
        "OS/Arch",
    ]


def test_vm_run_by_digest_matches_the_reference(node: Path, base: Artifact) -> None:
    out = ok(node, "vm", "run", "--name", "web", "--cpu", "2", "-o", "json", base.digest)
    printed = json.loads(out)
    doc = vms(node)
    record = doc["vms"][printed["id"]]
    assert printed == record and doc["names"] == {"web": record["id"]}
    assert (node / "cloudhypervisor/db/vms.json").read_bytes().endswith(b"}\n")  # AtomicWriteJSON
    vm_id = record["id"]
    assert len(vm_id) == 26 and set(vm_id) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    net = record["network_configs"][0]
    assert net["tap"] == f"tap{vm_id[:8]}-0"
    assert int(net["mac"][:2], 16) & 0x03 == 0x02  # locally administered unicast
    nic = Nic(ip="10.88.0.2", prefix=16, gateway="10.88.0.1", tap=net["tap"], mac=net["mac"])
    vm = NodeVM(id=vm_id, name="web", source=Run(REF), nics=[nic])
    expected, launch = expected_run(vm, base, base.digest)
    same_record(record, expected)
    assert record["state"] == "running" and record["first_booted"] and record["pid"] > 0
    vm_dir = host(node, record["run_dir"])
    assert (vm_dir / "cmdline").read_text() == launch
    assert (vm_dir / "ch.pid").is_file() and (vm_dir / "api.sock").exists()
    cow = (vm_dir / "cow.raw").stat()
    assert cow.st_size == 10 * GIB and cow.st_blocks == 0 and cow.st_mode & 0o777 == 0o600


def test_vm_create_start_stop_rm(node: Path, base: Artifact) -> None:
    disk = "size=64M,name=db,fstype=ext4,mount=/mnt/db"
    vm_id = json.loads(ok(node, "vm", "create", "--name", "db", "--data-disk", disk, "-o", "json", REF))["id"]
    record = vms(node)["vms"][vm_id]
    vm_dir = host(node, record["run_dir"])
    assert record["state"] == "created" and not (vm_dir / "cmdline").exists()
    assert (vm_dir / "data-db.raw").stat().st_size == 64 << 20
    ok(node, "vm", "start", "db")
    record = vms(node)["vms"][vm_id]
    net = record["network_configs"][0]
    nic = Nic(ip="10.88.0.2", prefix=16, gateway="10.88.0.1", tap=net["tap"], mac=net["mac"])
    vm = NodeVM(id=vm_id, name="db", source=Run(REF), nics=[nic], data_disks=[DataDisk("db", 64 << 20)])
    expected, launch = expected_run(vm, base, REF)
    same_record(record, expected)
    assert (vm_dir / "cmdline").read_text() == launch

    assert "is running" in refused(node, "vm", "rm", "db")
    ok(node, "vm", "stop", vm_id[:5])
    record = vms(node)["vms"][vm_id]
    assert record["state"] == "stopped" and "stopped_at" in record
    assert sorted(p.name for p in vm_dir.iterdir()) == ["cow.raw", "data-db.raw"]
    ok(node, "vm", "rm", "db")
    assert vms(node) == {"vms": {}, "names": {}} and not vm_dir.exists()


def test_leases_and_names_are_unique(node: Path, base: Artifact) -> None:
    ok(node, "vm", "run", "--name", "a", REF)
    ok(node, "vm", "run", "--name", "b", "--nics", "2", REF)
    records = {r["config"]["name"]: r for r in vms(node)["vms"].values()}
    ips = [n["network"]["ip"] for r in records.values() for n in r["network_configs"]]
    assert sorted(ips) == ["10.88.0.2", "10.88.0.3", "10.88.0.4"]
    assert "already exists" in refused(node, "vm", "run", "--name", "a", REF)
    listed = json.loads(ok(node, "vm", "list", "-o", "json"))
    assert sorted(r["config"]["name"] for r in listed) == ["a", "b"]
    assert json.loads(ok(node, "vm", "inspect", "b")) == records["b"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vm", "run", "--bogus", "x", REF], "Error: unknown flag: --bogus"),
        (["vm", "clone", "--restore-mode", "copy", "s"], "Error: unknown flag: --restore-mode"),
        (["vm", "run", "-x", REF], "Error: unknown shorthand flag: 'x' in -x"),
        (["vm", "run", "--cpu", "two", REF], 'invalid argument "two" for "--cpu" flag'),
        (["vm", "run", "--name"], "Error: flag needs an argument: --name"),
        (["vm", "run", "ghcr.io/cocoonstack/cocoon/ubuntu:24.04"], "not found"),  # no tag stems
        (["vm", "run", "ghcr.io/cocoonstack/cocoon/ubuntu"], "not found"),
        (["vm", "run", "--name", "-bad", REF], "invalid VM name"),
        (["vm", "run", "--cpu", "17", REF], "exceeds the host's 16 CPUs"),
        (["vm", "run", "--memory", "256M", REF], "memory must be at least 512M"),
        (["vm", "run", "--storage", "5G", REF], "storage must be at least 10G"),
        (["vm", "run", "--data-disk", "name=x", REF], "size= is required"),
        (["vm", "run"], "accepts 1 arg(s), received 0"),
        (["image", "pull", REF], "not emulated"),
        (["vm", "clone", "nosuch", "--name", "c"], "snapshot 'nosuch' not found"),
    ],
)
def test_refusals(node: Path, args: list[str], message: str) -> None:
    assert message in refused(node, *args)
    assert vms(node) == {"vms": {}, "names": {}}
    assert list((node / "run").glob("cloudhypervisor/*")) == []


def test_vm_run_refuses_a_missing_layer_blob(node: Path, base: Artifact) -> None:
    blob = f"{ROOT_DIR}/oci/blobs/{base.layers[2].hex}.erofs"
    host(node, blob).unlink()
    assert f"verify base files: base layer {blob}: stat {blob}: no such file or directory" in refused(
        node, "vm", "run", REF
    )
    assert vms(node) == {"vms": {}, "names": {}}


def test_vm_run_refuses_a_digest_prefix(node: Path, base: Artifact) -> None:
    assert "not found" in refused(node, "vm", "run", base.digest[:19])
    assert "not found" in refused(node, "vm", "run", base.hex)


def source_vm() -> SourceVM:
    return SourceVM(
        id="UJZDEGXDNCF32EPF3DHODZDOCI",
        name="agent-src",
        nics=[Nic(ip="10.22.0.5", prefix=16, gateway="10.22.0.1")],
        data_disks=[DataDisk("db", 20 * GIB)],
    )


def test_snapshot_import_then_clone_matches_the_reference(node: Path, base: Artifact) -> None:
    snap = ocifixture.snapshot(base, base_ref=REF, vm=source_vm())
    snap_id = ok(
        node, "snapshot", "import", "--name", "agent-snap", stdin=ocifixture.export_tar(snap)
    ).strip()
    doc = snapshots(node)
    record = doc["snapshots"][snap_id]
    assert doc["names"] == {"agent-snap": snap_id} and "pending" not in record
    assert record["data_dir"] == f"{ROOT_DIR}/snapshot/localfile/{snap_id}"
    assert (record["image"], record["image_digest"], record["cpu"], record["nics"]) == (
        REF,
        base.digest,
        2,
        1,
    )
    data_dir = host(node, record["data_dir"])
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "cocoon.json", "config.json", "cow.raw", "data-db.raw", "memory-ranges", "state.json"
    ]  # fmt: skip
    meta = json.loads(snap.config.data)["files"]
    for title in ("cow.raw", "memory-ranges", "data-db.raw"):
        with (data_dir / title).open("rb") as f:
            assert f.seek(0, os.SEEK_END) == meta[title]["sparseSize"]
            payload, pos = snap.file(title), 0
            for seg in json.loads(meta[title]["sparseMap"]):
                f.seek(seg["o"])
                assert f.read(seg["l"]) == payload[pos : pos + seg["l"]]
                pos += seg["l"]
        assert (data_dir / title).stat().st_blocks * 512 < 1 << 20  # holes kept
    assert (data_dir / "config.json").read_bytes() == snap.file("config.json")
    assert listed_snapshot(node) == [record]

    clone = json.loads(ok(node, "vm", "clone", "--name", "c1", "--memory", "2G", "agent-snap", "-o", "json"))
    vm_dir = f"{RUN_DIR}/cloudhypervisor/{clone['id']}"
    scs = json.loads(snap.file("cocoon.json"))["storage_configs"]
    moves = {}
    for sc in scs:
        new = {"cow": f"{vm_dir}/cow.raw", "data": f"{vm_dir}/data-{sc['serial']}.raw"}.get(sc["role"])
        if new:
            moves[sc["path"]], sc["path"] = new, new
    run = host(node, vm_dir)
    assert (run / "config.json").read_bytes() == ocifixture.patch_ch_config(
        snap.file("config.json"), scs, 2, 2 * GIB
    )
    state = ocifixture.go_json(ocifixture._replace_paths(json.loads(snap.file("state.json")), moves))
    assert (run / "state.json").read_bytes() == state
    assert (run / "cocoon.json").read_bytes() == snap.file("cocoon.json")
    assert (run / "cmdline").read_text() == f"cloud-hypervisor --api-socket {vm_dir}/api.sock"
    assert (run / "cow.raw").stat().st_size == 10 * GIB
    assert (run / "memory-ranges").stat().st_ino == (data_dir / "memory-ranges").stat().st_ino  # hard link
    assert clone["storage_configs"] == scs and clone["state"] == "running" and clone["first_booted"]
    net = clone["network_configs"][0]
    nic = Nic(ip="10.88.0.2", prefix=16, gateway="10.88.0.1", tap=net["tap"], mac=net["mac"])
    assert clone["boot_config"]["cmdline"] == ocifixture.build_cmdline(3, "c1", [nic])
    assert clone["config"] == {
        "name": "c1", "cpu": 2, "memory": 2 * GIB, "storage": 10 * GIB,
        "image": REF, "image_digest": base.digest, "image_type": "oci",
    }  # fmt: skip
    assert clone["image_blob_ids"] == record["image_blob_ids"]

    # a cold boot of the clone launches from its record (§8a)
    ok(node, "vm", "stop", "c1")
    ok(node, "vm", "start", "c1")
    vm = NodeVM(id=clone["id"], name="c1", source=Run(REF), memory=2 * GIB, nics=[nic])
    boot = vms(node)["vms"][clone["id"]]["boot_config"]
    assert (run / "cmdline").read_text() == " ".join(ocifixture.ch_cli_args(vm, vm_dir, scs, boot))

    assert "below the snapshot's" in refused(node, "vm", "clone", "--name", "c2", "--cpu", "1", "agent-snap")
    assert "invalid VM name" in refused(node, "vm", "clone", "agent-snap")  # v0.3.8: --name is required
    ok(node, "vm", "rm", "--force", "c1")
    ok(node, "snapshot", "rm", "agent-snap")
    assert snapshots(node) == {"snapshots": {}, "names": {}} and not data_dir.exists()


def listed_snapshot(node: Path) -> list[dict[str, Any]]:
    return list(json.loads(ok(node, "snapshot", "list", "-o", "json")))


def test_clone_of_a_snapshot_on_missing_layers_fails_verify_base_files(
    node: Path, base: Artifact, stray: Artifact
) -> None:
    layers = [base.layers[0].hex, base.layers[1].hex, stray.layers[0].hex]
    snap = ocifixture.snapshot(base, base_ref=REF, vm=source_vm(), layers_override=layers)
    ok(node, "snapshot", "import", "--name", "s", stdin=gzip.compress(ocifixture.export_tar(snap)))
    missing = f"{ROOT_DIR}/oci/blobs/{stray.layers[0].hex}.erofs"
    err = refused(node, "vm", "clone", "--name", "c", "s")
    assert f"Error: verify base files: base layer {missing}: stat {missing}: no such file or directory" in err
    assert vms(node) == {"vms": {}, "names": {}}
    assert list((node / "run").glob("cloudhypervisor/*")) == []


def retar(data: bytes, edit: Any) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    members = edit(members)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, payload in members:
            tar.addfile(member, io.BytesIO(payload))
    return out.getvalue()


def test_snapshot_import_refusals(node: Path, base: Artifact) -> None:
    snap = ocifixture.snapshot(base, base_ref=REF, vm=source_vm())
    good = ocifixture.export_tar(snap, name="named")
    assert "version 2" in refused(node, "snapshot", "import", stdin=ocifixture.export_tar(snap, version=2))
    swapped = retar(good, lambda ms: ms[1:] + ms[:1])
    assert "first entry must be snapshot.json" in refused(node, "snapshot", "import", stdin=swapped)
    escaping = retar(good, lambda ms: [*ms, (tarfile.TarInfo("../evil"), b"")])
    assert "refusing tar entry '../evil'" in refused(node, "snapshot", "import", stdin=escaping)
    assert snapshots(node) == {"snapshots": {}, "names": {}}
    assert list((node / "snapshot/localfile").glob("*")) == []

    tar_file = node.parent / "snap.tar"
    tar_file.write_bytes(good)
    snap_id = ok(node, "snapshot", "import", str(tar_file)).strip()
    assert snapshots(node)["names"] == {"named": snap_id}  # the exported name is kept
    assert "already exists" in refused(node, "snapshot", "import", str(tar_file))


def test_seed_makes_runs_reproducible(tmp_path: Path, base: Artifact) -> None:
    ids = []
    for name in ("one", "two"):
        root = tmp_path / name
        ocifixture.node_root(root, images={REF: base}, vms=[])
        ok(root, "vm", "run", "--name", "web", REF)
        ids.append(vms(root)["names"]["web"])
    assert ids[0] == ids[1]


def test_cocoonplan_reads_what_the_emulator_wrote(node: Path, base: Artifact, tmp_path: Path) -> None:
    ok(node, "vm", "run", "--name", "web", base.digest)
    ok(node, "vm", "create", "--name", "idle", "--nics", "0", REF)
    snap = ocifixture.snapshot(base, base_ref=REF, vm=source_vm())
    ok(node, "snapshot", "import", "--name", "agent-snap", stdin=ocifixture.export_tar(snap))
    ok(node, "vm", "clone", "--name", "c1", "agent-snap")
    shim = cocoon_emulator.install_shim(tmp_path / "bin", {"COCOON_EMULATOR_HOST_ROOT": str(node)})
    export = [
        sys.executable,
        "-m",
        "cocoonplan",
        "state",
        "export",
        "--root",
        str(node),
        "--cocoon",
        str(shim),
    ]
    result = subprocess.run(export, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for name in ("web", "idle", "c1", "agent-snap", "v0.3.8"):
        assert name in text


def test_default_network_and_dns(node: Path, base: Artifact, tmp_path: Path) -> None:
    conf = tmp_path / "net.d"
    conf.mkdir()
    (conf / "20-other.conflist").write_text('{"name": "other", "plugins": []}')
    (conf / "10-cocoon.conflist").write_text('{"name": "cocoon-net", "plugins": []}')
    ok(node, "--cni-conf-dir", str(conf), "--dns", "", "vm", "run", "--name", "a", REF)
    ok(node, "vm", "run", "--name", "b", "--network", "other", "--dns=9.9.9.9", REF)
    records = {r["config"]["name"]: r for r in vms(node)["vms"].values()}
    assert records["a"]["config"]["network"] == "cocoon-net"
    assert records["a"]["boot_config"]["cmdline"].endswith("ip=10.88.0.2::10.88.0.1:255.255.0.0:a:eth0:off")
    assert records["b"]["config"]["network"] == "other"
    assert records["b"]["boot_config"]["cmdline"].endswith(":b:eth0:off:9.9.9.9")


# --------------------------------------------------------------------------- the v0.6 line

V06 = {"COCOON_EMULATOR_VERSION": "v0.6.4"}
META_DB = "meta/meta.db"
JSON_DBS = ("cloudhypervisor/db/vms.json", "snapshot/db/snapshots.json", "oci/db/images.json")


@pytest.fixture
def registry(tmp_path: Path, base: Artifact) -> Path:
    """An OCI image layout standing for the registry ``image pull`` would ask for manifests."""
    layout = tmp_path / "registry"
    ocifixture.write_layout(layout, {REF: base})
    return layout


@pytest.fixture
def fresh(tmp_path: Path, base: Artifact, registry: Path) -> Path:
    """A v0.6 root with the image's EROFS layers and boot files in place (as ``cocoonplan apply``
    leaves them) and no metadata at all: the first command makes the SQLite store."""
    root = tmp_path / "fresh"
    ocifixture.node_root(root, images={REF: base}, vms=[])
    for rel in JSON_DBS:
        (root / rel).unlink()
    return root


def v06(registry: Path, **extra: str) -> dict[str, str]:
    return V06 | {"COCOON_EMULATOR_REGISTRY": str(registry)} | extra


def rows(root: Path, table: str) -> dict[str, Any]:
    with closing(sqlite3.connect(f"file:{root / META_DB}?mode=ro", uri=True)) as db:
        return {i: json.loads(d) for i, d in db.execute(f'SELECT id, data FROM "{table}" ORDER BY rowid')}


def api_calls(log: Path) -> list[tuple[str, Any]]:
    return [(c["endpoint"], c["body"]) for c in map(json.loads, log.read_text().splitlines())]


def test_v06_fresh_root_gets_the_sqlite_store_in_cocoons_layout(fresh: Path, registry: Path) -> None:
    assert ok(fresh, "version", env=V06).splitlines()[0] == "Version: v0.6.4"
    assert not (fresh / "meta").exists(), "version opens no store"
    assert json.loads(ok(fresh, "vm", "list", "-o", "json", env=V06)) == []
    with closing(sqlite3.connect(fresh / META_DB)) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == metafixture.APPLICATION_ID
        assert db.execute("PRAGMA user_version").fetchone()[0] == metafixture.USER_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        states = dict(db.execute("SELECT namespace, state FROM meta_state"))
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {t: db.execute(f'PRAGMA table_info("{t}")').fetchall() for t in tables}
    # The same layout as metafixture's store, the other witness written from cocoon's source.
    other = fresh.parent / "witness"
    metafixture.init_store(other / META_DB)
    with closing(sqlite3.connect(other / META_DB)) as db:
        witness = {t: db.execute(f'PRAGMA table_info("{t}")').fetchall() for t in columns}
    assert columns == witness and "vms_cloudhypervisor__records" in tables and "images_oci__records" in tables
    assert states == {ns.name: "initialized" for ns in metafixture.NAMESPACES}
    assert sorted(p.name for p in (fresh / "meta").iterdir()) == ["init.lock", "meta.db"]  # WAL checkpointed
    assert not any((fresh / rel).exists() for rel in JSON_DBS)


def test_v06_image_pull_reuses_converted_layers_and_records_the_image(
    fresh: Path, registry: Path, base: Artifact
) -> None:
    pinned = f"{REF}@{base.digest}"
    assert "fetching" in refused(fresh, "image", "pull", pinned, env=V06)  # no stand-in registry
    ok(fresh, "image", "pull", pinned, env=v06(registry))
    entry = rows(fresh, "images_oci__records")[pinned]
    kernel = base.boot_layers()[0]
    assert list(entry) == [
        "ref",
        "manifest_digest",
        "layers",
        "kernel_layer",
        "initrd_layer",
        "size",
        "created_at",
    ]
    assert entry["ref"] == pinned and entry["manifest_digest"] == base.digest
    assert entry["layers"] == [{"digest": b.digest} for b in base.layers]
    assert entry["kernel_layer"] == entry["initrd_layer"] == kernel.digest
    assert entry["size"] == sum(
        (fresh / f"oci/blobs/{b.hex}.erofs").stat().st_size for b in base.layers
    ) + sum((fresh / f"oci/boot/{kernel.hex}/{f}").stat().st_size for f in ("vmlinuz", "initrd.img"))
    assert "up to date" in ok(fresh, "image", "pull", pinned, env=v06(registry))
    # A layer not converted yet would have to be fetched: refused, nothing recorded.
    (fresh / f"oci/blobs/{base.layers[2].hex}.erofs").unlink()
    err = refused(fresh, "image", "pull", REF, env=v06(registry))
    assert "fetching and converting layers is not emulated" in err
    assert list(rows(fresh, "images_oci__records")) == [pinned]
    assert "not emulated" in refused(fresh, "image", "pull", REF)  # v0.3.8 has no image pull


def test_v06_vm_run_launch_record_and_lifecycle(fresh: Path, registry: Path, base: Artifact) -> None:
    ok(fresh, "image", "pull", REF, env=v06(registry))
    record = json.loads(ok(fresh, "vm", "run", "--name", "web", "-o", "json", base.digest[:19], env=V06))
    vm_id, run = record["id"], host(fresh, record["run_dir"])
    assert rows(fresh, "vms_cloudhypervisor__records") == {vm_id: record}
    assert rows(fresh, "vms_cloudhypervisor__names") == {"web": vm_id}
    assert record["vsock_socket"] == f"{record['run_dir']}/vsock.uds"
    assert (record["net_backend"], record["netns_path"]) == ("cni", f"/var/run/netns/cocoon-{vm_id}")
    assert (record["transition_generation"], record["last_transition_reason"]) == (2, "boot")
    launch = (run / "cmdline").read_text()
    assert (run / "cmdline").stat().st_mode & 0o777 == 0o600 and (run / "vsock.uds").exists()
    tail = f"--balloon size={GIB // 4},deflate_on_oom=on,free_page_reporting=on --vsock cid=3,socket={record['run_dir']}/vsock.uds --serial off"
    assert tail in launch and "--watchdog" in launch and "hugepages" not in launch
    domain = ",".join(map(str, record["queue_cpus"]))
    assert len(record["queue_cpus"]) == 8 and f"queue_affinity=[0@[{domain}],1@[{domain}]]" in launch
    assert (fresh / f"locks/vm/{vm_id}.lock").is_file()
    assert json.loads(ok(fresh, "vm", "stop", "web", "-o", "json", env=V06)) == {"succeeded": [vm_id]}
    assert sorted(p.name for p in run.iterdir()) == ["cow.raw"]
    stopped = rows(fresh, "vms_cloudhypervisor__records")[vm_id]
    assert (stopped["transition_generation"], stopped["last_transition_reason"]) == (3, "stop-user")
    ok(fresh, "vm", "create", "--name", "lean", "--no-watchdog", "--no-balloon", "--hugepages",
       "--cpu-weight", "50", "--cpuset-cpus", "2-3", REF, env=V06)  # fmt: skip
    ok(fresh, "vm", "start", "lean", env=V06)
    lean = next(
        r for r in rows(fresh, "vms_cloudhypervisor__records").values() if r["config"]["name"] == "lean"
    )
    assert {k: lean["config"][k] for k in ("no_watchdog", "no_balloon", "hugepages", "cpu_weight", "cpuset_cpus")} == {
        "no_watchdog": True, "no_balloon": True, "hugepages": True, "cpu_weight": 50, "cpuset_cpus": "2-3"
    }  # fmt: skip
    launch = (host(fresh, lean["run_dir"]) / "cmdline").read_text()
    assert f"size={GIB},hugepages=on" in launch and "--watchdog" not in launch and "--balloon" not in launch
    assert lean["queue_cpus"] == [2, 3] and "queue_affinity=[0@[2,3],1@[2,3]]" in launch
    ok(fresh, "vm", "rm", "--force", "web", "lean", env=V06)
    assert rows(fresh, "vms_cloudhypervisor__records") == {}
    assert list((fresh / "locks/vm").iterdir()) == []
    assert not any((fresh / rel).exists() for rel in JSON_DBS)


def clone_node(fresh: Path, base: Artifact) -> Artifact:
    """``fresh`` with a snapshot of a v0.6 source VM (vsock, one NIC, a data disk) imported as
    agent-snap; returns the snapshot."""
    source = SourceVM(
        id="UJZDEGXDNCF32EPF3DHODZDOCI",
        name="agent-src",
        nics=[Nic(ip="10.22.0.5", prefix=16, gateway="10.22.0.1")],
        data_disks=[DataDisk("db", 20 * GIB)],
        vsock=True,
    )
    snap = ocifixture.snapshot(base, base_ref=REF, vm=source)
    ok(fresh, "snapshot", "import", "--name", "agent-snap", stdin=ocifixture.export_tar(snap), env=V06)
    return snap


def test_v06_clone_patch_restore_and_nic_ids(fresh: Path, base: Artifact, tmp_path: Path) -> None:
    snap = clone_node(fresh, base)
    (snap_id, record), = rows(fresh, "snapshots__records").items()  # fmt: skip
    assert record["size_bytes"] > 0 and record["last_accessed_at"] == record["created_at"]
    assert (fresh / f"snapshot/localfile/{snap_id}.lease").is_file()
    log = tmp_path / "api.log"
    env = V06 | {"COCOON_EMULATOR_API_LOG": str(log)}
    clone = json.loads(ok(fresh, "vm", "clone", "--restore-mode", "copy", "--data-disk", "size=64M,name=scratch",
                          "agent-snap", "-o", "json", env=env))  # fmt: skip
    vm_id, vm_dir = clone["id"], clone["run_dir"]
    assert clone["config"]["name"] == f"cocoon-clone-{vm_id[:8]}"  # the default name works on v0.6
    assert (clone["config"]["cpu"], clone["config"]["memory"], clone["config"]["storage"]) == (
        2,
        GIB,
        10 * GIB,
    )
    assert (clone["transition_generation"], clone["last_transition_reason"]) == (1, "clone")
    source = json.loads(snap.file("config.json"))
    patched = json.loads((host(fresh, vm_dir) / "config.json").read_bytes())
    assert [n["tap"] for n in patched["net"]] == [f"rm{vm_id[:8]}-0"]
    assert patched["vsock"] == dict(sorted((source["vsock"] | {"socket": f"{vm_dir}/vsock.uds"}).items()))
    for key in ("cpus", "memory", "balloon"):
        assert patched[key] == source[key], f"{key} is not patched on v0.6"
    assert [d["path"] for d in patched["disks"]][-2:] == [f"{vm_dir}/cow.raw", f"{vm_dir}/data-db.raw"]
    assert (host(fresh, vm_dir) / "cow.raw").stat().st_size == 10 * GIB
    scratch = clone["storage_configs"][-1]
    assert (
        scratch["serial"] == "scratch"
        and (host(fresh, vm_dir) / "data-scratch.raw").stat().st_size == 64 << 20
    )
    mac = clone["network_configs"][0]["mac"]
    calls = api_calls(log)
    assert calls[0] == ("vm.restore", {"source_url": f"file://{vm_dir}"})  # copy sends no mode
    assert [c[0] for c in calls] == [
        "vm.restore",
        "vm.remove-device",
        "vm.add-net",
        "vm.add-disk",
        "vm.resume",
    ]
    assert (
        calls[2][1]["id"] == "cocoon-net-" + mac.replace(":", "")
        and calls[2][1]["tap"] == f"tap{vm_id[:8]}-0"
    )
    assert calls[3][1]["path"] == scratch["path"]


def test_v06_mmap_restore_needs_cocoonstacks_cloud_hypervisor(
    fresh: Path, base: Artifact, tmp_path: Path
) -> None:
    clone_node(fresh, base)
    err = refused(fresh, "vm", "clone", "--name", "c1", "agent-snap", env=V06)  # the default mode is mmap
    assert 'memory_restore_mode "CopyOnWrite"' in err and "--restore-mode copy" in err
    assert rows(fresh, "vms_cloudhypervisor__records") == {}
    assert (
        list((fresh / "run/cloudhypervisor").iterdir()) == [] and list((fresh / "locks/vm").iterdir()) == []
    )
    log = tmp_path / "api.log"
    fork = V06 | {"COCOON_EMULATOR_CH": "cocoonstack", "COCOON_EMULATOR_API_LOG": str(log)}
    ok(fresh, "vm", "clone", "--name", "c1", "agent-snap", env=fork)
    assert api_calls(log)[0][1]["memory_restore_mode"] == "CopyOnWrite"


def test_v06_clone_from_a_directory_checks_its_manifest(fresh: Path, base: Artifact, tmp_path: Path) -> None:
    snap = clone_node(fresh, base)
    staged = fresh / "staging/agent"  # on the node: --from-dir takes a node path
    staged.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(ocifixture.export_tar(snap))) as tar:
        member = tar.extractfile("snapshot.json")
        assert member is not None
        envelope = json.loads(member.read())
        names = sorted(m.name for m in tar.getmembers() if m.name != "snapshot.json")
    (staged / "snapshot.json").write_text(json.dumps(envelope | {"files": names}))
    (snap_id,) = rows(fresh, "snapshots__records")
    for name in names:
        cocoon_emulator.sparse_copy(fresh / f"snapshot/localfile/{snap_id}/{name}", staged / name)
    ok(fresh, "vm", "clone", "--name", "from-dir", "--restore-mode", "copy", "--from-dir",
       f"{ROOT_DIR}/staging/agent", env=V06)  # fmt: skip
    assert "give either" in refused(
        fresh, "vm", "clone", "--from-dir", f"{ROOT_DIR}/staging/agent", "agent-snap", env=V06
    )
    os.truncate(staged / "cow.raw", 5 * GIB)  # as a tool that drops the sparse records leaves it
    err = refused(fresh, "vm", "clone", "--name", "x", "--restore-mode", "copy", "--from-dir",
                  f"{ROOT_DIR}/staging/agent", env=V06)  # fmt: skip
    assert f"cow.raw is {5 * GIB} bytes, config.storage is {10 * GIB}" in err
    (staged / "memory-ranges").unlink()
    assert "lists memory-ranges, which is missing" in refused(
        fresh, "vm", "clone", "--name", "x", "--from-dir", f"{ROOT_DIR}/staging/agent", env=V06
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vm", "clone", "--cpu", "2", "agent-snap"], "Error: unknown flag: --cpu"),
        (["vm", "clone", "--memory", "2G", "agent-snap"], "Error: unknown flag: --memory"),
        (["vm", "clone", "--storage", "20G", "agent-snap"], "Error: unknown flag: --storage"),
        (["vm", "clone", "--on-demand", "agent-snap"], "Error: unknown flag: --on-demand"),
        (["vm", "clone", "--restore-mode", "lazy", "agent-snap"], 'invalid --restore-mode "lazy"'),
        (
            ["vm", "clone", "--data-disk", "size=64M,name=db", "--restore-mode", "copy", "agent-snap"],
            "data disk name 'db' is already a disk of the snapshot",
        ),
        (["vm", "clone"], "give a SNAPSHOT or --from-dir DIR"),
        (["vm", "clone", "a", "b"], "accepts at most 1 arg(s), received 2"),
        (
            ["vm", "run", "--network", "n", "--bridge", "b", REF],
            "if any flags in the group [network bridge] are set none of the others can be; [bridge network] were all set",
        ),
        (["vm", "run", "--pci", REF], "--pci (Firecracker only) is not emulated"),
        (["vm", "run", "--cpuset-cpus", "3-99", REF], 'invalid --cpuset-cpus "3-99"'),
        (["vm", "run", "--cpu-weight", "x", REF], 'invalid argument "x" for "--cpu-weight" flag'),
        (["vm", "exec", "x"], "is not emulated"),
        (["meta", "convert"], "is not emulated"),
    ],
)
def test_v06_refusals(fresh: Path, base: Artifact, registry: Path, args: list[str], message: str) -> None:
    if args[1] == "clone":
        clone_node(fresh, base)
    else:
        ok(fresh, "image", "pull", REF, env=v06(registry))
    assert message in refused(fresh, *args, env=V06)
    assert rows(fresh, "vms_cloudhypervisor__records") == {}
    assert list((fresh / "run").glob("cloudhypervisor/*")) == []


def test_v06_import_checks_the_envelope_files_and_the_cow_size(fresh: Path, base: Artifact) -> None:
    source = SourceVM(
        id="UJZDEGXDNCF32EPF3DHODZDOCI",
        name="src",
        nics=[Nic(ip="10.22.0.5", prefix=16, gateway="10.22.0.1")],
    )
    tar = ocifixture.export_tar(ocifixture.snapshot(base, base_ref=REF, vm=source))

    def envelope(edit: Any) -> Any:
        def apply(members: list[Any]) -> list[Any]:
            head, data = members[0]
            document = json.loads(data)
            edit(document)
            data = json.dumps(document).encode()
            head.size = len(data)
            return [(head, data), *members[1:]]

        return apply

    listed = retar(tar, envelope(lambda d: d.update(files=["cow.raw", "nvram.fd"])))
    assert "lists nvram.fd, which is missing" in refused(fresh, "snapshot", "import", stdin=listed, env=V06)
    resized = retar(tar, envelope(lambda d: d["config"].update(storage=20 * GIB)))
    assert "config.storage is 21474836480" in refused(fresh, "snapshot", "import", stdin=resized, env=V06)
    assert rows(fresh, "snapshots__records") == {} and list((fresh / "snapshot/localfile").iterdir()) == []
    ok(fresh, "snapshot", "import", "--name", "repo:tag/v1", stdin=tar, env=V06)  # v0.6 names take : and /
    assert [r["name"] for r in rows(fresh, "snapshots__records").values()] == ["repo:tag/v1"]
    ok(fresh, "snapshot", "rm", "repo:tag/v1", env=V06)
    assert list((fresh / "snapshot/localfile").iterdir()) == []


def test_v06_keeps_a_legacy_json_root_and_refuses_an_unfinished_conversion(
    node: Path, base: Artifact
) -> None:
    ok(node, "vm", "run", "--name", "a", REF, env=V06)
    ok(node, "vm", "run", "--name", "b", REF, env=V06)
    assert not (node / "meta").exists(), "a legacy root keeps the JSON engine"
    current, previous = vms(node), json.loads((node / "cloudhypervisor/db/vms.json.prev").read_bytes())
    assert set(current["names"]) == {"a", "b"} and set(previous["names"]) == {"a"}
    (node / "cloudhypervisor/db/vms.json").write_text("{torn")
    assert set(json.loads(ok(node, "vm", "inspect", "a", env=V06))) >= {"vsock_socket"}  # read from .prev
    (node / "meta").mkdir()
    (node / "meta/meta-convert.manifest").write_text("{}")
    assert "a conversion is in flight, run `cocoon meta convert` to finish it" in refused(
        node, "vm", "list", env=V06
    )


def test_an_unknown_release_is_refused(node: Path) -> None:
    assert "cocoon v0.5.8 is not emulated" in refused(
        node, "version", env={"COCOON_EMULATOR_VERSION": "v0.5.8"}
    )


def test_write_shim_bakes_the_settings(tmp_path: Path, fresh: Path) -> None:
    out = tmp_path / "bin/cocoon-b"
    command = [sys.executable, str(EMULATOR), "--write-shim", str(out), "--host-root", str(fresh), "--cpus", "16",
               "--version", "v0.6.4"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_EMULATOR_")}
    result = subprocess.run([str(out), "version"], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.startswith("Version: v0.6.4\n")
    subprocess.run([str(out), "vm", "list"], capture_output=True, env=env, check=True)
    assert (fresh / META_DB).is_file(), "the shim's host root stands for /var/lib/cocoon"
