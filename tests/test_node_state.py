"""A node's observed state is read from real cocoon node roots (built by ``ocifixture``, or the
committed ``examples/node``) and exported documents; the reader is never mocked.

Every broken or contradictory file is refused with its name relative to the root.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clirunner import EXAMPLES, REPO, run_cli
from cocoonplan import api
from cocoonplan.errors import StateError
from cocoonplan.observed import NodeState
from cocoonplan.resolvers.node import (
    encode_state,
    load_state_document,
    present_layers,
    read_node_root,
    read_node_state,
)
from ocifixture import (
    AS_WRITTEN,
    GIB,
    Clone,
    DataDisk,
    Nic,
    NodeVM,
    OwnerRecord,
    Run,
    SourceVM,
    derive_id,
    go_json,
    image,
    layer,
    node_root,
    snapshot,
)

XFACE = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface"
XFACE_0513 = "ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513"
AGENT_SNAP = "ghcr.io/cocoonstack/agent-snap:v1"
VMS_DB = "cloudhypervisor/db/vms.json"
BASE = image(
    [
        layer({"etc/os-release": b"ID=ubuntu\n"}),
        layer({"boot/vmlinuz-6.1": b"kernel", "boot/initrd.img-6.1": b"initrd"}),
        layer({"usr/share/top.txt": b"top\n"}),
    ]
)
SOURCE = SourceVM(
    id="UJZDEGXDNCF32EPF3DHODZDOCI",
    name="src",
    nics=[Nic(ip="10.22.0.5", gateway="10.22.0.1")],
    data_disks=[DataDisk(name="db", size=GIB)],
)
SNAP = snapshot(BASE, base_ref="b:1", vm=SOURCE)
CLONE_ID = derive_id("state", "web")
RUN_ID = derive_id("state", "worker")


def _build(path: Path, **owned: OwnerRecord | dict[str, Any]) -> Path:
    """A small node: clone ``web`` and run ``worker`` of image ``b:1``, owned as given by name."""
    vms = [
        NodeVM(id=CLONE_ID, name="web", source=Clone(SNAP), nics=[Nic(ip="10.22.0.9", gateway="10.22.0.1")]),
        NodeVM(id=RUN_ID, name="worker", source=Run("b:1"), state="stopped"),
    ]
    ids = {"web": CLONE_ID, "worker": RUN_ID}
    node_root(path, images={"b:1": BASE}, vms=vms, owned={ids.get(k, k): v for k, v in owned.items()})
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    owner = OwnerRecord(name="web", source=SNAP.digest, spec_file="web.yaml", config_sha256=AS_WRITTEN)
    return _build(tmp_path_factory.mktemp("node") / "root", web=owner)


@pytest.fixture
def node(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built node root, free to corrupt."""
    return Path(shutil.copytree(built, tmp_path / "root"))


def _edit_json(path: Path, change: Any) -> None:
    document = json.loads(path.read_bytes())
    change(document)
    path.write_bytes(go_json(document))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


# --------------------------------------------------------------------------- examples/node


def test_examples_node_holds_two_owned_vms_and_a_foreign_one() -> None:
    state = read_node_root(EXAMPLES / "node")
    index = json.loads((EXAMPLES / "oci" / "index.json").read_bytes())
    digests = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
    assert [(vm.name, vm.id, len(vm.storage_configs)) for vm in state.vms] == [
        ("agent-clone", "V4SEH2KVJ72CEUVW75EFR6EDT4", 8),
        ("agent-run", derive_id("examples", "agent-run"), 7),
        ("legacy-tool", derive_id("examples", "legacy-tool"), 7),
    ]
    clone, run, legacy = state.vms
    assert clone.owner is not None and run.owner is not None and legacy.owner is None
    assert (clone.owner.spec_file, clone.owner.source) == ("agent-clone.yaml", digests[AGENT_SNAP])
    assert (run.owner.spec_file, run.owner.source) == ("agent-run.yaml", digests[XFACE_0513])
    clone_run = EXAMPLES / "node" / clone.run_dir.removeprefix("/var/lib/cocoon/")
    config = (clone_run / "config.json").read_bytes()
    assert clone.owner.config_sha256 == "sha256:" + hashlib.sha256(config).hexdigest()
    assert clone.runtime_config is not None and len(clone.runtime_config["disks"]) == 8
    assert list(clone.runtime_config) == list(json.loads(config)), "key order kept"
    assert clone.runtime_meta is not None and len(clone.runtime_meta.storage_configs) == 8
    assert clone.launch == clone.owner.launch == (clone_run / "cmdline").read_text()
    assert clone.boot_config is not None and clone.owner.cmdline == clone.boot_config.cmdline
    assert run.runtime_config is None and run.launch == run.owner.launch
    assert run.boot_config is not None and run.owner.cmdline == run.boot_config.cmdline
    assert [nic.network.ip if nic.network else None for vm in state.vms for nic in vm.nics] == [
        "10.22.0.9",
        "10.22.0.10",
        "10.22.0.11",
    ]
    assert clone.settings.image_digest == digests[XFACE]
    assert [image.ref for image in state.images] == [XFACE, XFACE_0513]
    assert [len(image.layers) for image in state.images] == [11, 6]
    assert len(state.blobs) == 15 and present_layers(state) == frozenset(state.blobs)
    assert present_layers(None) == frozenset()
    assert state.vm_named("legacy-tool") is legacy


def test_export_round_trips_and_is_deterministic(built: Path, tmp_path: Path) -> None:
    for root in (EXAMPLES / "node", built):
        state = read_node_root(root)
        text = encode_state(state)
        assert text.endswith("}\n") and text == encode_state(read_node_root(root))
        assert list(json.loads(text)) == list(NodeState.model_fields)
        document = tmp_path / f"{root.name}.json"
        document.write_text(text)
        assert load_state_document(document) == state
        assert read_node_state(document, "/var/lib/cocoon", None) == state
        assert read_node_state(root, "/var/lib/cocoon", "/var/lib/cocoon/run") == state


def test_cli_exports_node_paths_only(tmp_path: Path) -> None:
    result = run_cli(["state", "export", "--root", str(EXAMPLES / "node")], tmp_path)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["format_version"], document["kind"]) == (1, "cocoonplan/node-state")
    assert str(REPO) not in result.stdout and str(tmp_path) not in result.stdout
    node_paths = ("/var/lib/cocoon", "/var/log/cocoon/", "/var/run/netns/", "/dev/urandom", "/mnt/")
    absolute = [s for s in _strings(document) if s.startswith("/")]
    assert absolute and all(s.startswith(node_paths) for s in absolute)
    assert result.stdout == encode_state(api.export_state(EXAMPLES / "node", api.Environment({}, tmp_path)))


def test_cli_names_a_truncated_vm_database(node: Path) -> None:
    db = node / VMS_DB
    db.write_bytes(db.read_bytes()[:200])
    result = run_cli(["state", "export", "--root", "root"], node.parent)
    assert result.exit_code == 1 and result.stdout == ""
    # cocoon falls back to the .prev generation of a file it cannot decode; a copy without one fails.
    assert result.stderr.startswith(f"Error: {VMS_DB}: cannot be decoded (not valid JSON: ")
    assert f"there is no {VMS_DB}.prev" in result.stderr
    assert "hint: " in result.stderr


# --------------------------------------------------------------------------- a built node


def test_built_node_reads_clone_run_and_owner(built: Path) -> None:
    state = read_node_root(built)
    web, worker = state.vms
    assert (web.name, web.hypervisor, web.state, worker.state) == (
        "web",
        "cloud-hypervisor",
        "running",
        "stopped",
    )
    assert [sc.role.value for sc in web.storage_configs] == ["layer"] * 3 + ["cow", "data"]
    assert web.owner is not None and web.owner.launch is None and worker.owner is None
    assert web.run_dir == f"/var/lib/cocoon/run/cloudhypervisor/{CLONE_ID}"
    assert web.image_blob_ids == tuple(sorted(web.image_blob_ids)) and len(web.image_blob_ids) == 3
    assert [i.ref for i in state.images] == ["b:1"] and state.snapshots == ()
    assert state.images[0].kernel_layer == BASE.layers[1].digest


def test_a_root_recorded_under_another_root_dir(tmp_path: Path) -> None:
    root = tmp_path / "srv"
    vms = [NodeVM(id=RUN_ID, name="worker", source=Run("b:1"))]
    node_root(root, images={"b:1": BASE}, vms=vms, root_dir="/srv/cocoon", run_dir="/srv/cocoon/vms")
    state = read_node_root(root, "/srv/cocoon/", "/srv/cocoon/vms")
    assert (state.root_dir, state.run_dir) == ("/srv/cocoon", "/srv/cocoon/vms")
    assert state.vms[0].launch is not None
    with pytest.raises(
        StateError,
        match=rf"{VMS_DB}: VM {RUN_ID} \(worker\) run_dir /srv/cocoon/vms/\S+ is outside the root dir /var/lib/cocoon",
    ):
        read_node_root(root)
    with pytest.raises(StateError, match="is not under the run dir /srv/cocoon/run"):
        read_node_root(root, "/srv/cocoon")
    with pytest.raises(StateError, match="run dir /run/cocoon is outside the root dir /srv/cocoon"):
        read_node_root(root, "/srv/cocoon", "/run/cocoon")


def test_empty_and_missing_roots(tmp_path: Path) -> None:
    assert read_node_root(tmp_path) == NodeState(root_dir="/var/lib/cocoon", run_dir="/var/lib/cocoon/run")
    with pytest.raises(StateError, match="does not exist"):
        read_node_root(tmp_path / "gone")
    with pytest.raises(StateError, match="does not exist"):
        read_node_state(tmp_path / "gone", "/var/lib/cocoon", None)
    (tmp_path / "file").write_text("{}")
    with pytest.raises(StateError, match="is not a directory"):
        read_node_root(tmp_path / "file")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["names"].update({"agent-x": "ABC"}), "names maps agent-x to VM ABC which has no record"),
        (lambda d: d["vms"][RUN_ID].update(id="ABC"), f"VM record ID key {RUN_ID} holds id ABC"),
        (
            lambda d: (d["vms"][RUN_ID]["config"].update(name="web"), d["names"].pop("worker")),
            "two records are named web",
        ),
        (lambda d: d["vms"][RUN_ID].pop("state"), f"VM record {RUN_ID} is missing required field.s. state"),
        (
            lambda d: d["vms"][RUN_ID]["storage_configs"][0].update(role="bogus"),
            rf"VM {RUN_ID} \(worker\): storage_configs not valid",
        ),
        (lambda d: d["vms"][RUN_ID]["config"].update(cpu="many"), r"\(worker\): config not valid"),
        (lambda d: d["names"].pop("worker"), rf"VM {RUN_ID} \(worker\) has no entry in names"),
        (
            lambda d: d["names"].update(worker=CLONE_ID),
            f"names maps worker to VM {CLONE_ID}, whose record is named web",
        ),
        (lambda d: d["vms"][RUN_ID].update(hypervisor="firecracker"), "is a 'firecracker' record"),
        (lambda d: d["vms"][RUN_ID].update(image_blob_ids=3), "image_blob_ids is not an object or array"),
        (lambda d: d.update(vms=[]), "'vms' is an array, not an object"),
    ],
)
def test_inconsistent_vm_database_is_refused(node: Path, change: Any, message: str) -> None:
    _edit_json(node / VMS_DB, change)
    with pytest.raises(StateError, match=f"^{VMS_DB}: .*{message}") as caught:
        read_node_root(node)
    assert caught.value.hint


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"vms": {}, "vms": {}, "names": {}}', "key 'vms' appears twice"),
        (b'\xff{"vms": {}}', "not UTF-8 text"),
        (b'{"vms": NaN}', "NaN is not JSON"),
        (b"[]", "the document is an array"),
    ],
)
def test_unreadable_vm_database_is_refused(node: Path, content: bytes, message: str) -> None:
    (node / VMS_DB).write_bytes(content)
    with pytest.raises(StateError, match=f"^{VMS_DB}: .*{message}"):
        read_node_root(node)


def test_directory_where_a_file_should_be(node: Path) -> None:
    (node / VMS_DB).unlink()
    (node / VMS_DB).mkdir()
    with pytest.raises(StateError, match=f"^{VMS_DB}: is a directory"):
        read_node_root(node)


def test_run_dir_files_are_checked(node: Path) -> None:
    run = f"run/cloudhypervisor/{CLONE_ID}"
    (node / run / "config.json").write_text('{"disks": [')
    with pytest.raises(StateError, match=f"^{run}/config.json: not valid JSON"):
        read_node_root(node)
    (node / run / "config.json").write_text("[]")
    with pytest.raises(StateError, match=f"^{run}/config.json: the document is an array"):
        read_node_root(node)
    (node / run / "config.json").unlink()
    (node / run / "cocoon.json").write_text('{"storage_configs": [{"path": "/x"}]}')
    with pytest.raises(StateError, match=f"^{run}/cocoon.json: the snapshot sidecar is not valid") as caught:
        read_node_root(node)
    assert "storage_configs.0.ro" in caught.value.detail
    (node / run / "cocoon.json").unlink()
    (node / run / "cmdline").write_bytes(b"\xfe")
    with pytest.raises(StateError, match=f"^{run}/cmdline: not UTF-8"):
        read_node_root(node)
    shutil.rmtree(node / run)
    with pytest.raises(StateError, match=rf"^{run}: run directory of VM {CLONE_ID} \(web\) is missing"):
        read_node_root(node)


def test_ownership_needs_the_same_id_and_name(tmp_path: Path) -> None:
    renamed = OwnerRecord(name="web-old", source=SNAP.digest)
    gone = {"name": "ghost", "source": BASE.digest}
    root = _build(
        tmp_path / "root", web=renamed, worker=OwnerRecord(name="worker", source=BASE.digest), GONE=gone
    )
    assert json.loads((root / "cocoonplan/owned.json").read_bytes())["vms"]["GONE"] == gone
    web, worker = read_node_root(root).vms
    assert web.owner is None, "a VM renamed since apply is no longer cocoonplan's"
    assert worker.owner is not None and worker.owner.source == BASE.digest


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"format_version": 2, "vms": {}}, "format_version 2 is not supported"),
        ({"format_version": 1, "vms": {RUN_ID: {"name": "worker"}}}, "the ownership file is not valid"),
        ({"format_version": 1, "vms": {RUN_ID: {"name": "worker", "source": "latest"}}}, "the own"),
    ],
)
def test_bad_ownership_file_is_refused(node: Path, document: Any, message: str) -> None:
    (node / "cocoonplan/owned.json").write_text(json.dumps(document))
    with pytest.raises(StateError, match=f"^cocoonplan/owned.json: {message}"):
        read_node_root(node)


def test_firecracker_vms_are_read_too(node: Path) -> None:
    record = json.loads((node / VMS_DB).read_bytes())["vms"][RUN_ID]
    fc_id = derive_id("state", "fc")
    run_dir = f"/var/lib/cocoon/run/firecracker/{fc_id}"
    record |= {"id": fc_id, "run_dir": run_dir, "config": record["config"] | {"name": "fc"}}
    del record["hypervisor"]
    (node / "firecracker/db").mkdir(parents=True)
    (node / "firecracker/db/vms.json").write_bytes(go_json({"vms": {fc_id: record}, "names": {"fc": fc_id}}))
    (node / run_dir.removeprefix("/var/lib/cocoon/")).mkdir(parents=True)
    state = read_node_root(node)
    assert [(vm.name, vm.hypervisor) for vm in state.vms] == [
        ("fc", "firecracker"),
        ("web", "cloud-hypervisor"),
        ("worker", "cloud-hypervisor"),
    ]
    assert state.vm_named("fc") is not None and state.vm_named("fc").launch is None  # type: ignore[union-attr]
    record["config"]["name"] = "web"
    (node / "firecracker/db/vms.json").write_bytes(go_json({"vms": {fc_id: record}, "names": {"web": fc_id}}))
    with pytest.raises(StateError, match="two records are named web"):
        read_node_root(node)


def test_images_snapshots_and_blobs(node: Path) -> None:
    a, b = "A" * 26, "B" * 26
    hexes = [BASE.layers[0].hex, BASE.layers[1].hex]
    snapshots = {
        "snapshots": {
            b: {"id": b, "name": "nightly", "image": "b:1", "image_blob_ids": hexes[::-1]},
            a: {"id": a, "name": "", "image_blob_ids": {h: {} for h in hexes}, "data_dir": "/x"},
        },
        "names": {"nightly": b},
    }
    (node / "snapshot/db/snapshots.json").write_bytes(go_json(snapshots))
    (node / "oci/blobs/not-a-blob.tmp").write_text("")
    state = read_node_root(node)
    assert [(s.id, s.name, s.image_blob_ids) for s in state.snapshots] == [
        (a, "", tuple(sorted(hexes))),
        (b, "nightly", tuple(sorted(hexes))),
    ]
    assert state.blobs == tuple(sorted(layer.hex for layer in BASE.layers))
    _edit_json(node / "snapshot/db/snapshots.json", lambda d: d["names"].update(weekly="C"))
    with pytest.raises(
        StateError, match=r"^snapshot/db/snapshots\.json: names maps weekly to snapshot C which has no record"
    ):
        read_node_root(node)
    (node / "snapshot/db/snapshots.json").unlink()
    _edit_json(node / "oci/db/images.json", lambda d: d["images"]["b:1"].update(ref="b:2"))
    with pytest.raises(StateError, match=r"^oci/db/images\.json: image key b:1 holds ref b:2"):
        read_node_root(node)
    _edit_json(
        node / "oci/db/images.json", lambda d: d["images"]["b:1"].update(ref="b:1", manifest_digest="x")
    )
    with pytest.raises(StateError, match=r"^oci/db/images\.json: image b:1 is not valid"):
        read_node_root(node)
    (node / "oci/db/images.json").write_text("{}")
    (node / f"oci/blobs/{BASE.layers[0].hex}.erofs").unlink()
    (node / f"oci/blobs/{BASE.layers[0].hex}.erofs").mkdir()
    with pytest.raises(StateError, match=f"^oci/blobs/{BASE.layers[0].hex}.erofs: is not a regular file"):
        read_node_root(node)


# --------------------------------------------------------------------------- state documents


def test_state_documents_of_other_versions_are_refused(built: Path, tmp_path: Path) -> None:
    document = json.loads(encode_state(read_node_root(built)))
    path = tmp_path / "state.json"
    path.write_text(json.dumps(document | {"format_version": 2}))
    with pytest.raises(StateError, match=f"^{path}: state document format_version 2 is not supported"):
        load_state_document(path)
    path.write_text(json.dumps(document | {"kind": "other"}))
    with pytest.raises(StateError, match="kind 'other' is not"):
        load_state_document(path)
    path.write_text(json.dumps(document | {"vms": [document["vms"][0]] * 2}))
    with pytest.raises(StateError, match="two records have the ID"):
        load_state_document(path)
    path.write_text(json.dumps(document | {"surprise": 1}))
    with pytest.raises(StateError, match="not a valid state document"):
        load_state_document(path)


def test_state_document_must_match_the_node_dirs(built: Path, tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(encode_state(read_node_root(built)))
    with pytest.raises(
        StateError, match="exported for root dir /var/lib/cocoon, but the node's root dir is /srv"
    ):
        read_node_state(path, "/srv", None)
    with pytest.raises(
        StateError,
        match="exported for run dir /var/lib/cocoon/run, but the node's run dir is /var/lib/cocoon/r",
    ):
        read_node_state(path, "/var/lib/cocoon", "/var/lib/cocoon/r")
