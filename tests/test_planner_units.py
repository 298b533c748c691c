"""Unit tests of the pure planner: resolved inputs and node views built in Python, no I/O.

Every case calls :func:`make_plan` directly with a module-local factory: a run-mode image of
three made-up layers, a clone-mode snapshot shaped like the reference's Example C (its
``config.json`` is the golden file, read here as data before the planner runs), and VMs on
the node built from a first plan's desired values, so that a healthy VM is a no-op and each
case varies one thing.
"""

from __future__ import annotations

import builtins
import json
import pathlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cocoonplan.cocoon import DiskRole, SnapshotConfig, SnapshotMeta, StorageConfig, blob_path, vm_run_dir
from cocoonplan.errors import StateError
from cocoonplan.model import Mode
from cocoonplan.observed import (
    BootConfig,
    NodeState,
    ObservedNic,
    ObservedVM,
    Owner,
    VMSettings,
    comparable_config,
)
from cocoonplan.planner.compile import PlanInput, compile_vm, make_plan
from cocoonplan.planner.identity import fresh_identity
from cocoonplan.planner.model import Action, DesiredVM, Plan, VMPlan
from cocoonplan.project import HypervisorBuild, NodeConfig
from cocoonplan.releases import CocoonLine, CocoonVersion, VersionSource
from cocoonplan.resolved import (
    BlobRef,
    NodeView,
    PinnedRef,
    ResolvedImage,
    ResolvedSnapshot,
    ResolvedVM,
    RunningBase,
)
from cocoonplan.spec import LoadedSpec, RestoreMode, VMSpec
from cocoonplan.units import GIB

NODE = "n1"
ROOT = "/var/lib/cocoon"
RUN = f"{ROOT}/run"
TOOL = "0.0.0-test"
LAYER_MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"

GOLDEN_CONFIG: dict[str, Any] = json.loads(
    (Path(__file__).parent / "golden" / "example-c-clone-config.json").read_text()
)


def _digest(char: str) -> str:
    return "sha256:" + char * 64


# --------------------------------------------------------------------------- run-mode image

IMAGE_REF = "ghcr.io/example/ubuntu:24.04"
IMAGE_REPO = "ghcr.io/example/ubuntu"
IMAGE_DIGEST = _digest("a")
RUN_LAYERS = (_digest("1"), _digest("2"), _digest("3"))
RUN_LAYER_SIZES = (1000, 2000, 3000)
OTHER_IMAGE_DIGEST = _digest("b")


def _image(digest: str = IMAGE_DIGEST, layers: Sequence[str] = RUN_LAYERS) -> ResolvedImage:
    return ResolvedImage(
        pinned=PinnedRef(ref=IMAGE_REF, digest=digest),
        repository=IMAGE_REPO,
        layers=tuple(
            BlobRef(digest=d, size=size, media_type=LAYER_MEDIA, source=IMAGE_REPO)
            for d, size in zip(layers, RUN_LAYER_SIZES, strict=True)
        ),
        kernel_layer=layers[-1],
        initrd_layer=layers[-1],
    )


# --------------------------------------------------------------------------- clone-mode snapshot (Example C)

SNAPSHOT_REF = "ghcr.io/example/agent-snap:v1"
SNAPSHOT_REPO = "ghcr.io/example/agent-snap"
SNAPSHOT_DIGEST = _digest("c")
BASE_DIGEST = _digest("d")
GOLDEN_HEXES = tuple(
    d["path"].rsplit("/", 1)[-1].removesuffix(".erofs") for d in GOLDEN_CONFIG["disks"] if d["readonly"]
)
KERNEL_HEX = GOLDEN_CONFIG["payload"]["kernel"].split("/")[-2]


def _role(serial: str) -> DiskRole:
    if serial.startswith("cocoon-layer"):
        return DiskRole.LAYER
    return DiskRole.COW if serial == "cocoon-cow" else DiskRole.DATA


def _snapshot_meta() -> SnapshotMeta:
    configs = []
    for disk in GOLDEN_CONFIG["disks"]:
        role = _role(disk["serial"])
        data = role is DiskRole.DATA
        configs.append(
            StorageConfig(
                path=disk["path"],
                ro=disk["readonly"],
                serial=disk["serial"],
                role=role,
                mount_point=f"/mnt/{disk['serial']}" if data else None,
                fstype="ext4" if data else None,
            )
        )
    return SnapshotMeta(storage_configs=tuple(configs))


def _file(title: str | None, char: str, size: int = 100) -> BlobRef:
    media = "application/vnd.cocoonstack.snapshot.file"
    return BlobRef(digest=_digest(char), size=size, media_type=media, source=SNAPSHOT_REPO, title=title)


def _snapshot() -> ResolvedSnapshot:
    base_layers = tuple(
        BlobRef(digest=f"sha256:{h}", size=500 + i, media_type=LAYER_MEDIA, source=IMAGE_REPO)
        for i, h in enumerate(GOLDEN_HEXES)
    )
    return ResolvedSnapshot(
        pinned=PinnedRef(ref=SNAPSHOT_REF, digest=SNAPSHOT_DIGEST),
        repository=SNAPSHOT_REPO,
        artifact_type="application/vnd.cocoonstack.snapshot.v1+json",
        annotations={},
        config=SnapshotConfig.model_validate(
            {
                "schemaVersion": "v1",
                "snapshotId": "snap-agent-src",
                "image": IMAGE_REF,
                "imageDigest": BASE_DIGEST,
                "imageBlobIds": {h: {} for h in GOLDEN_HEXES},
                "hypervisor": "cloud-hypervisor",
                "cpu": 2,
                "memory": GIB,
                "storage": 10 * GIB,
                "nics": 1,
            }
        ),
        config_blob=_file(None, "e"),
        files=(
            _file("cocoon.json", "4"),
            _file("config.json", "5"),
            _file("state.json", "6"),
            _file("memory-ranges", "7", 1 << 20),
            _file("cow.raw", "8", 1 << 22),
            _file("data-db.raw", "9", 1 << 21),
        ),
        meta=_snapshot_meta(),
        ch_config=GOLDEN_CONFIG,
        base_image=ResolvedImage(
            pinned=PinnedRef(ref=IMAGE_REF, digest=BASE_DIGEST), repository=IMAGE_REPO, layers=base_layers
        ),
    )


# --------------------------------------------------------------------------- specs, nodes, inputs


def _spec(name: str, *, file: str | None = None, node: str = NODE, **body: Any) -> LoadedSpec:
    if "snapshot" not in body and "image" not in body:
        body["image"] = IMAGE_REF
    spec = VMSpec.model_validate(
        {
            "apiVersion": "cocoonplan/v1alpha1",
            "kind": "VM",
            "metadata": {"name": name},
            "spec": {"node": node, **body},
        }
    )
    return LoadedSpec(spec=spec, file=file or f"vms/{name}.yaml", line=1)


def _settings(**overrides: Any) -> NodeConfig:
    return NodeConfig.model_validate({"cpus": 8, **overrides})


def run_input(name: str = "web", *, image: ResolvedImage | None = None, **body: Any) -> PlanInput:
    return PlanInput(
        loaded=_spec(name, **body), resolved=ResolvedVM(image=image or _image()), node=_settings()
    )


def clone_input(name: str = "agent", *, node: NodeConfig | None = None, **body: Any) -> PlanInput:
    return PlanInput(
        loaded=_spec(name, snapshot=SNAPSHOT_REF, **body),
        resolved=ResolvedVM(snapshot=_snapshot()),
        node=node or _settings(),
    )


V0_6 = CocoonVersion(version="v0.6.4", line=CocoonLine.V0_6, source=VersionSource.SETTING)


def view(
    vms: Sequence[ObservedVM] | None = (),
    *,
    name: str = NODE,
    settings: NodeConfig | None = None,
    **extra: Any,
) -> NodeView:
    """A node holding ``vms``; ``vms=None`` is a node whose state is not known."""
    state = (
        None
        if vms is None
        else NodeState(
            root_dir=ROOT,
            run_dir=RUN,
            vms=tuple(vms),
            boot_files=(f"{KERNEL_HEX}/vmlinuz", f"{KERNEL_HEX}/initrd.img"),
        )
    )
    return NodeView(name=name, settings=settings or _settings(), state=state, **extra)


def plan(inputs: Sequence[PlanInput], *views: NodeView, **kwargs: Any) -> Plan:
    nodes = {v.name: v for v in views} or {NODE: view()}
    return make_plan(inputs, nodes=nodes, tool_version=TOOL, **kwargs)


def only(result: Plan, name: str | None = None) -> VMPlan:
    found = [vm for vm in result.vms if name is None or vm.name == name]
    assert len(found) == 1, [vm.name for vm in result.vms]
    return found[0]


def observed_from(desired: DesiredVM, *, state: str = "running", **updates: Any) -> ObservedVM:
    """The VM on the node exactly as ``desired`` makes it (so a re-plan is a no-op), then ``updates``."""
    assert desired.source is not None
    clone = desired.mode is Mode.CLONE
    kernel, initrd = (f.path for f in desired.boot_files)
    vm = ObservedVM(
        id=desired.vm_id,
        name=desired.name,
        state=state,
        hypervisor="cloud-hypervisor",
        settings=VMSettings(
            name=desired.name,
            cpu=desired.cpu,
            memory=desired.memory,
            storage=desired.storage,
            image=IMAGE_REF,
            image_digest=desired.base_image.digest if clone and desired.base_image else desired.source.digest,
            network=desired.network,
        ),
        storage_configs=tuple(
            StorageConfig(
                path=d.path,
                ro=d.readonly,
                serial=d.serial,
                role=d.role,
                mount_point=d.mount_point,
                fstype=d.fstype,
                direct_io=d.direct_io,
            )
            for d in desired.disks
        ),
        boot_config=BootConfig(kernel_path=kernel, initrd_path=initrd, cmdline=desired.cmdline),
        nics=tuple(
            ObservedNic(
                tap=n.tap, mac=n.mac, num_queues=n.num_queues, queue_size=n.queue_size, network=n.address
            )
            for n in desired.interfaces
        ),
        run_dir=vm_run_dir(RUN, desired.vm_id),
        runtime_config=comparable_config(desired.config) if clone else None,
        owner=Owner(
            name=desired.name,
            spec_file=desired.spec_file,
            source=desired.source.digest,
            source_ref=desired.source.ref,
            mode=desired.mode,
        ),
    )
    return vm.model_copy(update=updates)


DRAWN = 7
"""cocoon draws a VM's ID at random: the VMs on the node get one the plan never proposes."""


def healthy(item: PlanInput, *, state: str = "running", **updates: Any) -> ObservedVM:
    """The VM a first plan of ``item`` on an empty node creates, as the node records it once
    cocoon drew its ID."""
    first = only(plan([item], view([])))
    assert first.action is Action.CREATE
    identity = fresh_identity(NODE, item.loaded.spec.name, first.nics, draw=DRAWN)
    created = compile_vm(item, identity, view([]))
    assert created.vm_id != first.vm_id
    return observed_from(created, state=state, **updates)


# --------------------------------------------------------------------------- create and unknown


def test_create_when_no_vm_of_the_name_is_on_the_node() -> None:
    vm = only(plan([run_input()], view([])))
    assert vm.action is Action.CREATE
    assert vm.reason == "no VM of this name is on the node"
    assert vm.observed_id is None and vm.observed_fingerprint is None
    assert "vm_id" in vm.provisional
    assert vm.source == PinnedRef(ref=IMAGE_REF, digest=IMAGE_DIGEST)
    assert [d.digest for d in vm.disks[:3]] == list(RUN_LAYERS)
    assert [d.role for d in vm.disks] == [DiskRole.LAYER] * 3 + [DiskRole.COW]
    assert vm.disks[0].path == blob_path(ROOT, RUN_LAYERS[0].removeprefix("sha256:"))
    assert vm.fetch_bytes == sum(RUN_LAYER_SIZES)
    assert (vm.cpu, vm.memory, vm.storage, vm.nics) == (2, GIB, 10 * GIB, 1)


def test_create_counts_present_layers_as_not_fetched() -> None:
    present = frozenset({RUN_LAYERS[0].removeprefix("sha256:")})
    item = run_input().model_copy(update={"resolved": ResolvedVM(image=_image(), present_blobs=present)})
    vm = only(plan([item], view([])))
    assert [b.present for b in vm.blobs] == [True, False, False]
    assert vm.fetch_bytes == sum(RUN_LAYER_SIZES[1:])


def test_unknown_when_the_node_state_is_not_known() -> None:
    result = plan([run_input()], view(None))
    vm = only(result)
    assert vm.action is Action.UNKNOWN
    assert f"state of node {NODE} is not known" in vm.reason
    assert vm.observed_id is None
    assert [w.summary for w in result.warnings] == [
        f"the state of node {NODE} is not known: its VMs are planned as unknown and nothing "
        "on it will be created, replaced or deleted"
    ]
    assert NODE in result.warnings[0].hint
    assert result.nodes[0].state_known is False
    assert result.summary.unknown == 1


@pytest.mark.parametrize("recorded", ["error", "creating"])
def test_unknown_when_cocoon_records_a_broken_vm(recorded: str) -> None:
    item = run_input()
    vm = only(plan([item], view([healthy(item, state=recorded)])))
    assert vm.action is Action.UNKNOWN
    assert f"cocoon records the VM as {recorded!r}" in vm.reason
    assert "cocoon vm inspect" in vm.reason
    assert vm.observed_state == recorded


# --------------------------------------------------------------------------- no-op, start, stop


@pytest.mark.parametrize("make", [run_input, clone_input], ids=["run", "clone"])
def test_a_healthy_vm_is_a_no_op(make: Any) -> None:
    item = make()
    running = healthy(item)
    vm = only(plan([item], view([running])))
    assert vm.action is Action.NO_OP, vm.changes
    assert vm.reason == "the node runs this VM as planned"
    assert vm.changes == () and vm.replace_paths == () and vm.drift == ()
    assert vm.vm_id == running.id == vm.observed_id
    assert vm.observed_fingerprint == running.fingerprint()
    assert vm.fetch_bytes == 0
    assert vm.provisional == () or "vm_id" not in vm.provisional


def test_a_healthy_clone_is_cloned_from_the_golden_snapshot() -> None:
    item = clone_input()
    vm = only(plan([item], view([healthy(item)])))
    assert vm.mode is Mode.CLONE
    assert vm.base_image == PinnedRef(ref=IMAGE_REF, digest=BASE_DIGEST)
    assert [d.digest for d in vm.disks[:3]] == [f"sha256:{h}" for h in GOLDEN_HEXES]
    assert [d.path for d in vm.disks[:3]] == [d["path"] for d in GOLDEN_CONFIG["disks"][:3]]
    run_dir = vm_run_dir(RUN, vm.vm_id)
    assert [d.path for d in vm.disks[3:]] == [f"{run_dir}/cow.raw", f"{run_dir}/data-db.raw"]
    assert vm.config["disks"][3]["path"] == f"{run_dir}/cow.raw"
    assert vm.restore_mode is RestoreMode.COPY


@pytest.mark.parametrize(
    ("recorded", "wanted", "action", "reason"),
    [
        ("stopped", "running", Action.START, "the VM is stopped as planned, and its spec says running"),
        ("created", "running", Action.START, "the VM is created as planned, and its spec says running"),
        ("running", "stopped", Action.STOP, "the VM runs as planned, and its spec says stopped"),
        ("stopped", "stopped", Action.NO_OP, "the VM is stopped as planned"),
    ],
)
def test_power_state(recorded: str, wanted: str, action: Action, reason: str) -> None:
    first = run_input()
    item = run_input(state=wanted)
    vm = only(plan([item], view([healthy(first, state=recorded)])))
    assert vm.action is action
    assert vm.reason == reason
    assert vm.changes == ()
    assert vm.observed_state == recorded
    assert vm.state.value == wanted


def test_a_stopped_clone_is_started_by_a_cold_boot() -> None:
    item = clone_input()
    running = healthy(item, state="stopped")
    vm = only(plan([item], view([running])))
    assert vm.action is Action.START
    assert vm.restore == ()
    assert any("cold-boots a clone" in note for note in vm.notes)
    assert vm.launch[0].endswith("cloud-hypervisor") and "--kernel" in vm.launch


# --------------------------------------------------------------------------- replace


def test_replace_when_the_source_digest_changed() -> None:
    item = run_input()
    running = healthy(item)
    moved = run_input(image=_image(digest=OTHER_IMAGE_DIGEST))
    vm = only(plan([moved], view([running])))
    assert vm.action is Action.REPLACE
    assert vm.replace_paths == ("source",)
    assert vm.reason == "its source is another digest now, and cocoon cannot change a VM in place"
    assert vm.action_reason == "replace_because_source_changed"
    assert [(c.kind, c.path, c.op, c.before, c.after) for c in vm.changes] == [
        ("source", ("source", "digest"), "update", IMAGE_DIGEST, OTHER_IMAGE_DIGEST)
    ]
    assert vm.observed_id == running.id
    assert vm.vm_id != running.id and "vm_id" in vm.provisional
    assert vm.fetch_bytes == sum(RUN_LAYER_SIZES)


def test_replace_when_cpu_changed() -> None:
    running = healthy(run_input())
    vm = only(plan([run_input(cpu=4)], view([running])))
    assert vm.action is Action.REPLACE
    assert vm.replace_paths == ("cpu",)
    assert vm.reason == "cpu 2 → 4 differs, and cocoon cannot change a VM in place"
    cpu = next(c for c in vm.changes if c.path == ("cpu",))
    assert (cpu.kind, cpu.op, cpu.before, cpu.after, cpu.cause) == ("resources", "update", 2, 4, None)
    # What the cpu count changes in the launch is said as its consequence, token by token.
    follows = {c.path: (c.before, c.after) for c in vm.changes if c.cause == ("cpu",)}
    assert follows[("launch", "--cpus", "boot")] == ("2", "4")
    assert {p[2] for p in follows if p[1] == "--disk" and p[-1] == "num_queues"} == {
        d.serial for d in vm.disks
    }
    assert all(c.kind == "launch" for c in vm.changes if c.cause == ("cpu",))
    assert vm.cpu == 4


def test_a_clone_asking_for_more_cpu_on_v0_3_is_replaced_with_it() -> None:
    running = healthy(clone_input())
    vm = only(plan([clone_input(cpu=4)], view([running])))
    assert vm.action is Action.REPLACE
    assert vm.replace_paths == ("cpu",)
    boot = next(c for c in vm.changes if c.path == ("config", "cpus", "boot_vcpus"))
    assert (boot.before, boot.after, boot.cause) == (2, 4, ("cpu",))


def test_replace_when_layers_drifted() -> None:
    item = run_input()
    running = healthy(item)
    alien = _digest("f")
    configs = list(running.storage_configs)
    configs[1] = configs[1].model_copy(update={"path": blob_path(ROOT, alien.removeprefix("sha256:"))})
    drifted = running.model_copy(update={"storage_configs": tuple(configs)})
    base = RunningBase(ref=IMAGE_REF, digest=IMAGE_DIGEST, layers=RUN_LAYERS)
    result = plan([item], view([drifted], bases={running.id: base}))
    vm = only(result)
    assert vm.action is Action.REPLACE
    assert vm.replace_paths == ("disks",)
    assert vm.reason.startswith("it runs on layers that are not its source's")
    assert vm.action_reason == "replace_because_layers_drifted"
    assert [(d.kind, d.path, d.expected, d.found) for d in vm.drift] == [
        ("layer", ("disks", 1), RUN_LAYERS[1], alien)
    ]
    assert vm.drift[0].found_in == ()
    assert "belongs to no image on the node" in vm.drift[0].message
    disk = next(c for c in vm.changes if c.path == ("disks", "cocoon-layer1"))
    assert disk.op == "update" and disk.before["digest"] == alien and disk.after["digest"] == RUN_LAYERS[1]
    blob = next(c for c in vm.changes if c.path == ("blobs", alien))
    assert (blob.op, blob.cause) == ("remove", ("disks", "cocoon-layer1"))
    assert result.summary.drifted == 1


def test_no_drift_without_a_known_base() -> None:
    item = run_input()
    running = healthy(item)
    vm = only(plan([item], view([running], bases={})))
    assert vm.drift == ()


# --------------------------------------------------------------------------- delete, foreign, claimed


def _orphan(spec_file: str | None = "vms/old.yaml", *, owned: bool = True) -> ObservedVM:
    running = healthy(run_input("old"))
    owner = running.owner.model_copy(update={"spec_file": spec_file}) if owned and running.owner else None
    return running.model_copy(update={"owner": owner})


def test_delete_an_owned_vm_no_spec_defines() -> None:
    orphan = _orphan()
    result = plan([], view([orphan]))
    vm = only(result)
    assert vm.action is Action.DELETE
    assert vm.reason == "cocoonplan created it from vms/old.yaml, which no longer defines it"
    assert (vm.vm_id, vm.observed_id) == (orphan.id, orphan.id)
    assert vm.spec_file == "vms/old.yaml"
    assert vm.source == PinnedRef(ref=IMAGE_REF, digest=IMAGE_DIGEST)
    assert result.summary.delete == 1


@pytest.mark.parametrize(
    ("scope", "deleted"),
    [((".",), True), (("vms",), True), (("vms/",), True), (("vms/old.yaml",), True), (("other",), False)],
)
def test_delete_only_within_the_planned_scope(scope: tuple[str, ...], deleted: bool) -> None:
    result = plan([], view([_orphan()]), scope=scope)
    assert [vm.action for vm in result.vms] == ([Action.DELETE] if deleted else [])
    assert result.warnings == ()


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ({"owned": False}, "was not created by cocoonplan; left alone"),
        ({"spec_file": None}, "from no recorded spec file and no spec defines it; left alone"),
    ],
    ids=["foreign", "no-spec-file"],
)
def test_vms_not_deletable_are_left_alone_with_a_warning(kind: dict[str, Any], words: str) -> None:
    orphan = _orphan(**kind)
    result = plan([], view([orphan]))
    assert result.vms == ()
    assert [w.vm for w in result.warnings] == ["old"]
    assert words in result.warnings[0].summary
    assert orphan.id in result.warnings[0].summary


def test_a_foreign_vm_of_the_same_name_is_an_error_entry() -> None:
    item = run_input()
    foreign = healthy(item, owner=None)
    result = plan([item], view([foreign]))
    assert result.vms == ()
    (error,) = result.errors
    assert error.vm == "web" and error.file == "vms/web.yaml"
    assert error.summary == (
        f"VM web ({foreign.id}) already runs on node {NODE} and was not created by cocoonplan"
    )
    assert "cocoonplan import n1/web" in error.hint
    assert result.summary.errors == 1


def test_a_foreign_vm_being_adopted_is_planned_as_owned() -> None:
    item = run_input()
    result = plan([item], view([healthy(item, owner=None)]), adopting=[(NODE, "web")])
    assert result.errors == ()
    assert only(result).action is Action.NO_OP


def test_adopting_with_the_wrong_mode_is_an_error_entry() -> None:
    foreign = healthy(run_input("agent"), owner=None)
    result = plan([clone_input()], view([foreign]), adopting=[(NODE, "agent")])
    (error,) = result.errors
    assert "is a run, and the spec plans a clone" in error.summary


def test_a_vm_claimed_by_a_spec_elsewhere_is_kept() -> None:
    # The spec that defines it failed to resolve (or lives outside the planned paths): its VM stays.
    result = plan([], view([_orphan()]), claimed=[(NODE, "old")])
    assert result.vms == () and result.warnings == ()
    # A claim on an undeclared node protects nothing and breaks nothing.
    result = plan([], view([_orphan()]), claimed=[("elsewhere", "old")])
    assert [vm.action for vm in result.vms] == [Action.DELETE]


# --------------------------------------------------------------------------- network default


def test_an_empty_desired_network_is_no_change() -> None:
    # The spec leaves the network to the node's default, which is not known: whatever the
    # node recorded may be it.
    item = run_input()
    running = healthy(item, settings=healthy(item).settings.model_copy(update={"network": "whatever"}))
    vm = only(plan([item], view([running])))
    assert vm.network == ""
    assert vm.action is Action.NO_OP


@pytest.mark.parametrize(
    ("recorded", "action"),
    [("bridge", Action.NO_OP), ("other", Action.REPLACE)],
)
def test_a_known_default_network_is_compared(recorded: str, action: Action) -> None:
    item = run_input()
    first = healthy(item)
    running = first.model_copy(update={"settings": first.settings.model_copy(update={"network": recorded})})
    vm = only(plan([item], view([running], default_network="bridge")))
    assert vm.network == "bridge"
    assert vm.action is action
    if action is Action.REPLACE:
        assert vm.replace_paths == ("network",)
        assert [(c.path, c.before, c.after) for c in vm.changes] == [(("network",), "other", "bridge")]


def test_the_specs_network_wins_over_the_default() -> None:
    vm = only(plan([run_input(network="mynet")], view([], default_network="bridge")))
    assert vm.network == "mynet"


# --------------------------------------------------------------------------- v0.6 rules


def test_v0_6_refuses_a_clone_with_more_cpu() -> None:
    result = plan([clone_input(cpu=4)], view([], cocoon=V0_6))
    assert result.vms == ()
    (error,) = result.errors
    assert error.vm == "agent"
    assert "cpu 4 differs from the snapshot's 2" in error.summary
    assert "v0.6 clones with the snapshot's own cpu" in error.summary


def test_v0_3_refuses_a_clone_with_less_cpu_than_the_snapshot() -> None:
    result = plan([clone_input(cpu=1)], view([]))
    (error,) = result.errors
    assert "cpu 1 is below the snapshot's 2" in error.summary


def test_v0_6_on_an_upstream_hypervisor_restores_with_copy() -> None:
    vm = only(plan([clone_input()], view([], cocoon=V0_6)))
    assert vm.action is Action.CREATE
    assert vm.restore_mode is RestoreMode.COPY
    assert any("the clone restores with copy" in note for note in vm.notes)
    assert any("new network interface" in note for note in vm.notes)
    # v0.6 renames the snapshot's TAPs to throwaway ones before the restore.
    assert vm.config["net"][0]["tap"] == f"rm{vm.vm_id[:8]}-0"
    assert "config.net[0].tap" in vm.provisional


@pytest.mark.parametrize(
    ("build", "wanted", "mode"),
    [
        (HypervisorBuild.COCOONSTACK, None, RestoreMode.MMAP),
        (HypervisorBuild.UPSTREAM, "ondemand", RestoreMode.ONDEMAND),
        (HypervisorBuild.COCOONSTACK, "copy", RestoreMode.COPY),
    ],
)
def test_v0_6_restore_modes(build: HypervisorBuild, wanted: str | None, mode: RestoreMode) -> None:
    node = _settings(cloudHypervisor=build.value)
    body = {} if wanted is None else {"restoreMode": wanted}
    vm = only(plan([clone_input(node=node, **body)], view([], settings=node, cocoon=V0_6)))
    assert vm.restore_mode is mode
    assert not any("restores with copy" in note for note in vm.notes)


def test_v0_6_refuses_mmap_on_an_upstream_hypervisor() -> None:
    result = plan([clone_input(restoreMode="mmap")], view([], cocoon=V0_6))
    (error,) = result.errors
    assert "mmap sends CopyOnWrite" in error.summary
    assert "cloudHypervisor: cocoonstack" in error.hint


def _eager_clone(memory: dict[str, bool], node: NodeConfig, **body: Any) -> PlanInput:
    """A clone of a snapshot whose ``config.json`` memory has ``memory`` set (hugepages, shared)."""
    snapshot = _snapshot()
    config = GOLDEN_CONFIG | {"memory": GOLDEN_CONFIG["memory"] | memory}
    resolved = ResolvedVM(snapshot=snapshot.model_copy(update={"ch_config": config}))
    return PlanInput(loaded=_spec("agent", snapshot=SNAPSHOT_REF, **body), resolved=resolved, node=node)


@pytest.mark.parametrize(
    ("memory", "build", "wanted", "mode", "warned"),
    [
        # cocoon's resolveRestoreMode: mmap asked for on such memory falls back to copy, with a
        # warning, and never sends CopyOnWrite, so a stock Cloud Hypervisor is no reason to refuse.
        ({"hugepages": True}, HypervisorBuild.UPSTREAM, "mmap", RestoreMode.COPY, "hugepage-backed"),
        ({"shared": True}, HypervisorBuild.COCOONSTACK, "mmap", RestoreMode.COPY, "shared"),
        ({"hugepages": True}, HypervisorBuild.COCOONSTACK, None, RestoreMode.COPY, None),
        ({"shared": True}, HypervisorBuild.UPSTREAM, "ondemand", RestoreMode.ONDEMAND, None),
        ({}, HypervisorBuild.COCOONSTACK, "mmap", RestoreMode.MMAP, None),
    ],
)
def test_v0_6_restore_mode_of_hugepage_or_shared_memory(
    memory: dict[str, bool], build: HypervisorBuild, wanted: str | None, mode: RestoreMode, warned: str | None
) -> None:
    node = _settings(cloudHypervisor=build.value)
    body = {} if wanted is None else {"restoreMode": wanted}
    result = plan([_eager_clone(memory, node, **body)], view([], settings=node, cocoon=V0_6))
    assert result.errors == ()
    vm = only(result)
    assert vm.restore_mode is mode
    assert ("memory_restore_mode" in (vm.restore[0].body or {})) is (mode is not RestoreMode.COPY)
    assert not any("stock build" in note for note in vm.notes)
    warnings = [w for w in result.warnings if w.vm == "agent"]
    if warned is None:
        assert warnings == []
    else:
        (warning,) = warnings
        assert f"the snapshot's memory is {warned}" in warning.summary
        assert "cocoon falls back to copy" in warning.summary
        assert warning.file == "vms/agent.yaml"
        assert "warnings" not in vm.model_dump()  # lifted into the plan, not repeated per VM


def _state_build(build: HypervisorBuild | None, **settings: Any) -> NodeView:
    node_view = view([], settings=_settings(**settings), cocoon=V0_6)
    assert node_view.state is not None
    return node_view.model_copy(
        update={"state": node_view.state.model_copy(update={"cloud_hypervisor": build})}
    )


@pytest.mark.parametrize(
    ("recorded", "setting", "build", "mode"),
    [
        (None, None, HypervisorBuild.UPSTREAM, RestoreMode.COPY),  # nothing says: a stock build
        (HypervisorBuild.COCOONSTACK, None, HypervisorBuild.COCOONSTACK, RestoreMode.MMAP),
        (HypervisorBuild.UPSTREAM, None, HypervisorBuild.UPSTREAM, RestoreMode.COPY),
        (None, "cocoonstack", HypervisorBuild.COCOONSTACK, RestoreMode.MMAP),
        (HypervisorBuild.COCOONSTACK, "cocoonstack", HypervisorBuild.COCOONSTACK, RestoreMode.MMAP),
    ],
)
def test_the_build_comes_from_the_setting_else_the_exported_state(
    recorded: HypervisorBuild | None, setting: str | None, build: HypervisorBuild, mode: RestoreMode
) -> None:
    settings = {} if setting is None else {"cloudHypervisor": setting}
    result = plan([clone_input(node=_settings(**settings))], _state_build(recorded, **settings))
    assert [n.cloud_hypervisor for n in result.nodes] == [build]
    assert only(result).restore_mode is mode


def test_a_setting_and_an_exported_state_naming_other_builds_are_refused() -> None:
    node_view = _state_build(HypervisorBuild.COCOONSTACK, cloudHypervisor="upstream")
    with pytest.raises(StateError) as raised:
        plan([clone_input(node=node_view.settings)], node_view)
    assert raised.value.summary == (
        f"node {NODE}: cloudHypervisor says upstream, and its exported state says cocoonstack"
    )
    assert "--cloud-hypervisor upstream" in raised.value.hint


def test_v0_3_refuses_mmap() -> None:
    (error,) = plan([clone_input(restoreMode="mmap")], view([])).errors
    assert "needs cocoon v0.6's --restore-mode" in error.summary


# --------------------------------------------------------------------------- summary


def test_the_summary_counts_every_action() -> None:
    to_start = run_input("to-start")
    to_stop = run_input("to-stop")
    same = run_input("same")
    to_replace = run_input("to-replace")
    vms = [
        healthy(to_start, state="stopped"),
        healthy(to_stop),
        healthy(same),
        healthy(to_replace),
        _orphan(),
        healthy(run_input("foreign"), owner=None),
    ]
    inputs = [
        run_input("new-a"),
        run_input("new-b"),  # the same image on the same node: its layers are fetched once
        to_start,
        run_input("to-stop", state="stopped"),
        same,
        run_input("to-replace", cpu=4),
        run_input("foreign"),
    ]
    result = plan(inputs, view(vms))
    assert [(vm.name, vm.action) for vm in result.vms] == [
        ("new-a", Action.CREATE),
        ("new-b", Action.CREATE),
        ("old", Action.DELETE),
        ("same", Action.NO_OP),
        ("to-replace", Action.REPLACE),
        ("to-start", Action.START),
        ("to-stop", Action.STOP),
    ]
    summary = result.summary
    assert summary.model_dump(by_alias=True) == {
        "create": 2,
        "update": 0,
        "replace": 1,
        "delete": 1,
        "start": 1,
        "stop": 1,
        "unknown": 0,
        "no-op": 1,
        "fetch_bytes": sum(RUN_LAYER_SIZES),
        "fetch_blobs": 3,
        "errors": 1,
        "drifted": 0,
    }
    assert result.has_changes


def test_an_empty_plan_has_no_changes() -> None:
    result = plan([], view([]))
    assert result.vms == () and not result.has_changes
    assert result.summary.model_dump() == {key: 0 for key in result.summary.model_dump()}


# --------------------------------------------------------------------------- determinism and purity


def _mixed() -> tuple[list[PlanInput], dict[str, NodeView]]:
    web = run_input("web")
    agent = clone_input("agent")
    nodes = {NODE: view([healthy(web, state="stopped"), healthy(agent), _orphan()])}
    return [web, agent, run_input("new"), clone_input("agent-2")], nodes


def test_make_plan_is_deterministic() -> None:
    inputs, nodes = _mixed()
    first = make_plan(inputs, nodes=nodes, tool_version=TOOL)
    second = make_plan(inputs, nodes=nodes, tool_version=TOOL)
    assert first.digest is not None and first.digest == second.digest
    assert first.digest == first.content_digest()
    assert first.model_dump(mode="json") == second.model_dump(mode="json")
    # The order the specs are given in changes nothing: VMs are sorted.
    reordered = make_plan(list(reversed(inputs)), nodes=nodes, tool_version=TOOL)
    assert reordered.digest == first.digest
    # The digest covers what the plan says.
    assert make_plan(inputs, nodes=nodes, tool_version="other").digest != first.digest


def test_make_plan_does_no_file_io(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, nodes = _mixed()
    expected = make_plan(inputs, nodes=nodes, tool_version=TOOL)  # warm up any lazy imports

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the planner touched the filesystem: {args!r}")

    monkeypatch.setattr(builtins, "open", refuse)
    for method in ("open", "read_bytes", "read_text", "write_bytes", "write_text", "exists", "stat"):
        monkeypatch.setattr(pathlib.Path, method, refuse)
    result = make_plan(inputs, nodes=nodes, tool_version=TOOL)
    monkeypatch.undo()
    assert result.digest == expected.digest
