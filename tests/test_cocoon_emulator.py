"""The cocoon v0.3.8 emulator (tests/cocoon_emulator.py) against ocifixture, the other
independent witness of cocoon's formats, and against cocoonplan's own node reader."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

import cocoon_emulator
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
    node: Path, *args: str, stdin: bytes | None = None, seed: str = "t"
) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "COCOON_EMULATOR_HOST_ROOT": str(node),
        "COCOON_EMULATOR_CPUS": "16",
        "COCOON_EMULATOR_SEED": seed,
    }
    env.pop("COCOON_DNS", None)
    argv = [sys.executable, str(EMULATOR), "--root-dir", ROOT_DIR, *args]
    result = subprocess.run(argv, input=stdin, capture_output=True, env=env, check=False)
    return subprocess.CompletedProcess(
        argv, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def ok(node: Path, *args: str, stdin: bytes | None = None) -> str:
    result = cocoon(node, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(node: Path, *args: str, stdin: bytes | None = None) -> str:
    result = cocoon(node, *args, stdin=stdin)
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
