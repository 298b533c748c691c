"""cocoon's own refusals of a snapshot's disk list and kind, applied before a plan is made."""

from __future__ import annotations

import pytest

from cocoonplan.cocoon import DiskRole, SnapshotConfig, StorageConfig, storage_config_problems
from cocoonplan.errors import ResolveError
from cocoonplan.resolvers.snapshot import _check_kind

LAYER = StorageConfig(
    path="/r/oci/blobs/" + "a" * 64 + ".erofs", ro=True, serial="cocoon-layer0", role=DiskRole.LAYER
)
COW = StorageConfig(path="/r/run/x/cow.raw", ro=False, serial="cocoon-cow", role=DiskRole.COW)
DATA = StorageConfig(
    path="/r/run/x/data-db.raw",
    ro=False,
    serial="db",
    role=DiskRole.DATA,
    mount_point="/mnt/db",
    fstype="ext4",
)


def test_a_valid_list_has_no_problems() -> None:
    assert storage_config_problems((LAYER, COW, DATA)) == []
    # direct_io is an override data disks may carry (only data disks).
    assert storage_config_problems((LAYER, COW, DATA.model_copy(update={"direct_io": False}))) == []


@pytest.mark.parametrize(
    ("configs", "problem"),
    [
        ((LAYER.model_copy(update={"ro": False}), COW), (0, "a layer disk must be read-only")),
        ((LAYER, COW.model_copy(update={"ro": True})), (1, "a cow disk must be writable")),
        ((LAYER, COW.model_copy(update={"direct_io": True})), (1, "a cow disk cannot carry direct_io")),
        ((LAYER,), (-1, "the disk list has no cow disk; a clone needs one")),
        (
            (LAYER, COW, LAYER.model_copy(update={"role": DiskRole.CIDATA, "ro": False})),
            (2, "a cidata disk must be read-only"),
        ),
        ((COW, DATA.model_copy(update={"ro": True})), (1, "a data disk must be writable")),
        (
            (COW, DATA.model_copy(update={"mount_point": "/mnt/a\nb"})),
            (1, "data disk db has an invalid mount point '/mnt/a\\nb'"),
        ),
        (
            (COW, DATA.model_copy(update={"serial": "db\n"})),
            (1, "data disk serial 'db\\n' is not a valid data disk name"),
        ),
        (
            (COW, DATA.model_copy(update={"fstype": "xfs"})),
            (1, "data disk db needs fstype ext4 or none, not 'xfs'"),
        ),
        (
            (COW, DATA.model_copy(update={"fstype": None})),
            (1, "data disk db needs fstype ext4 or none, not None"),
        ),
        (
            (COW, DATA.model_copy(update={"fstype": "none"})),
            (1, "data disk db has fstype none but mount point /mnt/db"),
        ),
        (
            (COW, DATA.model_copy(update={"mount_point": "mnt"})),
            (1, "data disk db has an invalid mount point 'mnt'"),
        ),
        (
            (COW, DATA.model_copy(update={"serial": "cocoon-db"})),
            (1, "data disk serial 'cocoon-db' is not a valid data disk name"),
        ),
    ],
)
def test_cocoons_role_rules(configs: tuple[StorageConfig, ...], problem: tuple[int, str]) -> None:
    assert storage_config_problems(configs) == [problem]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"hypervisor": "firecracker"},
            "is a firecracker snapshot; cocoonplan plans Cloud Hypervisor clones only",
        ),
        (
            {"imageType": "cloudimg"},
            "was baked from a cloudimg image; cocoonplan plans snapshots of OCI images only",
        ),
    ],
)
def test_unsupported_snapshot_kinds_are_refused(fields: dict[str, str], message: str) -> None:
    # The source VM's settings every snapshot config carries (the smallest cocoon accepts).
    required = {"schemaVersion": "v1", "cpu": 1, "memory": 512 << 20, "storage": 10 << 30}
    config = SnapshotConfig.model_validate(required | fields)
    with pytest.raises(ResolveError, match=message):
        _check_kind(config, "snapshot x")
    _check_kind(SnapshotConfig.model_validate(required | {"hypervisor": "cloud-hypervisor"}), "ok")
