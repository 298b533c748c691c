"""Values are checked where they enter: spec and project fields (strict types, cocoon's bounds,
nothing that could add a kernel or launch parameter), and a registry's snapshot config blob.

Each refusal exits 1 with one line naming the file, line and field, or the reference and
digest of the blob.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clirunner import copy_examples, example_builder, plan_json, run_cli, vm_entry
from cocoonplan.cocoon import DiskRole, StorageConfig, storage_config_problems
from cocoonplan.document import SCHEMA_HINT
from ocifixture import snapshot, write_layout
from test_spec import GOOD as SPEC

build = example_builder()
ARTIFACTS, _ = build.scenario()
SOURCE_VM = ARTIFACTS[build.AGENT_SNAP].snapshot.vm  # type: ignore[union-attr]
SPEC_HINT = "hint: " + SCHEMA_HINT.format(schema="vmspec.schema.json") + "\n"
PROJECT_HINT = "hint: " + SCHEMA_HINT.format(schema="project.schema.json") + "\n"
NODE = """apiVersion: cocoonplan/v1alpha1
kind: Project
registries:
  ghcr.io: {layout: oci}
nodes:
  node-a:
    state: node
    cpus: 16
"""
TOO_LARGE = "a size cannot be over 9223372036854775807 bytes (8 EiB), the most cocoon accepts"
NETWORK = "String should match pattern '^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$'"

SPEC_CASES = {
    "cpu-true": ("  cpu: true\n", "8:3: spec.cpu: Input should be a valid integer"),
    "cpu-negative": ("  cpu: -5\n", "8:3: spec.cpu: Input should be greater than or equal to 1"),
    "cpu-above-kvm": ("  cpu: 5000\n", "8:3: spec.cpu: Input should be less than or equal to 1024"),
    "nics-yes": ("  nics: yes\n", "8:3: spec.nics: Input should be a valid integer"),
    "nics-above-a-pci-segment": (
        "  nics: 1000\n",
        "8:3: spec.nics: Input should be less than or equal to 32",
    ),
    "queue-size-fraction": ("  queueSize: 1.5\n", "8:3: spec.queueSize: Input should be a valid integer"),
    "queue-size-above-virtio": (
        "  diskQueueSize: 65536\n",
        "8:3: spec.diskQueueSize: Input should be less than or equal to 32768",
    ),
    "no-direct-io-string": ("  noDirectIO: 'yes'\n", "8:3: spec.noDirectIO: Input should be a valid boolean"),
    "memory-negative": ("  memory: -1\n", "8:3: spec.memory: a size cannot be negative"),
    "memory-5000-digits": ("  memory: '" + "9" * 5000 + "G'\n", f"8:3: spec.memory: {TOO_LARGE}"),
    "memory-400-digit-integer": ("  memory: " + "9" * 400 + "\n", f"8:3: spec.memory: {TOO_LARGE}"),
    "storage-of-8-eib": ("  storage: 8589934592G\n", f"8:3: spec.storage: {TOO_LARGE}"),
    "data-disk-too-large": (
        "  dataDisks:\n    - {name: db, size: 9999999999999999999999}\n",
        f"9:18: spec.dataDisks.0.size: {TOO_LARGE}",
    ),
    "network-with-a-space": ("  network: 'cni --net=host'\n", f"8:3: spec.network: {NETWORK}"),
    "network-with-a-newline": ('  network: "a\\nb"\n', f"8:3: spec.network: {NETWORK}"),
    "mount-with-dotdot": (
        "  dataDisks:\n    - {name: db, size: 1G, mount: /mnt/../etc}\n",
        "9:28: spec.dataDisks.0.mount: '/mnt/../etc' must not contain ..",
    ),
    "mount-with-a-comma": (
        "  dataDisks:\n    - {name: db, size: 1G, mount: '/mnt/db,fstype=none'}\n",
        "9:28: spec.dataDisks.0.mount: '/mnt/db,fstype=none' may hold only letters, digits and ._+@~- "
        "between its slashes",
    ),
    "mount-relative": (
        "  dataDisks:\n    - {name: db, size: 1G, mount: mnt/db}\n",
        "9:28: spec.dataDisks.0.mount: 'mnt/db' must be an absolute path",
    ),
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_examples(tmp_path / "repo")


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_spec_values_are_strict_and_bounded(project: Path, case: str) -> None:
    extra, expected = SPEC_CASES[case]
    (project / "bad.yaml").write_text(SPEC + extra)
    result = run_cli(["validate", "bad.yaml"], project)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"Error: bad.yaml:{expected}\n" + SPEC_HINT


def test_labels_hold_no_control_characters(project: Path) -> None:
    (project / "bad.yaml").write_text(
        SPEC.replace("  name: web\n", '  name: web\n  labels: {team: "\\e[31mred"}\n')
    )
    result = run_cli(["plan", "bad.yaml"], project)
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: bad.yaml:5:3: metadata.labels: labels may hold printable characters only, not '\\x1b[31mred'\n"
        + SPEC_HINT
    )


PROJECT_CASES = {
    "dns-injecting-a-parameter": (
        "    dns: ['8.8.8.8 init=/bin/sh']\n",
        "9:5: nodes.node-a.dns: dns entry '8.8.8.8 init=/bin/sh' is not an IPv4 address",
    ),
    "dns-adding-ip-fields": (
        "    dns: ['8.8.8.8:10.0.0.1']\n",
        "9:5: nodes.node-a.dns: dns entry '8.8.8.8:10.0.0.1' is not an IPv4 address",
    ),
    "dns-ipv6": (
        "    dns: ['2001:db8::1']\n",
        "9:5: nodes.node-a.dns: dns entry '2001:db8::1' is not an IPv4 address",
    ),
    "dns-three-entries": (
        "    dns: [8.8.8.8, 1.1.1.1, 9.9.9.9]\n",
        "9:5: nodes.node-a.dns: cocoon uses the first two dns entries only; list at most two",
    ),
    "root-dir-with-dotdot": (
        "    rootDir: /var/lib/../../etc\n",
        "9:5: nodes.node-a.rootDir: '/var/lib/../../etc' must not contain ..",
    ),
    "root-dir-relative": (
        "    rootDir: var/lib/cocoon\n",
        "9:5: nodes.node-a.rootDir: 'var/lib/cocoon' must be an absolute path",
    ),
    "run-dir-with-a-newline": (
        '    runDir: "/run/a\\nb"\n',
        "9:5: nodes.node-a.runDir: '/run/a\\nb' may hold only letters, digits and ._+@~- between its slashes",
    ),
    "run-dir-with-a-comma": (
        "    runDir: /run/cocoon,readonly=on\n",
        "9:5: nodes.node-a.runDir: '/run/cocoon,readonly=on' may hold only letters, digits and ._+@~- "
        "between its slashes",
    ),
    "hugepages-string": (
        "    hugepages: 'yes'\n",
        "9:5: nodes.node-a.hugepages: Input should be a valid boolean",
    ),
    "default-network-with-a-space": (
        "    defaultNetwork: 'a b'\n",
        f"9:5: nodes.node-a.defaultNetwork: {NETWORK}",
    ),
}


@pytest.mark.parametrize("case", sorted(PROJECT_CASES))
def test_node_settings_are_checked(project: Path, case: str) -> None:
    extra, expected = PROJECT_CASES[case]
    (project / "cocoonplan.yaml").write_text(NODE + extra)
    result = run_cli(["plan", "agent-run.yaml", "--markdown"], project)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"Error: cocoonplan.yaml:{expected}\n" + PROJECT_HINT


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [
        ("true", "Input should be a valid integer"),
        ("0", "Input should be greater than or equal to 1"),
        ("100000", "Input should be less than or equal to 1024"),
    ],
)
def test_host_cpus_are_a_bounded_integer(project: Path, cpus: str, expected: str) -> None:
    (project / "cocoonplan.yaml").write_text(NODE.replace("cpus: 16", f"cpus: {cpus}"))
    result = run_cli(["validate", "agent-run.yaml"], project)
    assert result.exit_code == 1
    assert result.stderr == f"Error: cocoonplan.yaml:8:5: nodes.node-a.cpus: {expected}\n" + PROJECT_HINT


def test_a_root_dir_is_planned_normalized(project: Path) -> None:
    (project / "cocoonplan.yaml").write_text(NODE)
    code, document = plan_json(project)
    (project / "cocoonplan.yaml").write_text(NODE + "    rootDir: /var/lib//./cocoon/\n")
    assert plan_json(project) == (code, document)


def test_a_snapshot_mount_point_cannot_add_options() -> None:
    cow = StorageConfig(path="/r/run/x/cow.raw", ro=False, serial="cocoon-cow", role=DiskRole.COW)
    data = StorageConfig(
        path="/r/run/x/data-db.raw", ro=False, serial="db", role=DiskRole.DATA, fstype="ext4", mount_point=""
    )
    for mount in ("/mnt/db,fstype=none", "/mnt/../etc", "/mnt/d b"):
        configs = (cow, data.model_copy(update={"mount_point": mount}))
        assert storage_config_problems(configs) == [(1, f"data disk db has an invalid mount point {mount!r}")]


SNAPSHOT_CASES = {
    "cpu-true": ({"cpu": True}, "cpu: Input should be a valid integer"),
    "cpu-negative": ({"cpu": -5}, "cpu: Input should be greater than or equal to 1"),
    "memory-negative": ({"memory": -1}, "memory: Input should be greater than or equal to 536870912"),
    "memory-400-digits": (
        {"memory": int("9" * 400)},
        "memory: Input should be less than or equal to 9223372036854775807",
    ),
    "storage-below-cocoons-minimum": (
        {"storage": 1},
        "storage: Input should be greater than or equal to 10737418240",
    ),
    "cpu-missing": ({"cpu": None}, "cpu: Input should be a valid integer"),
    "nics-above-a-pci-segment": ({"nics": 1000}, "nics: Input should be less than or equal to 32"),
    "network-with-a-space": ({"network": "a --b"}, f"network: {NETWORK}"),
    "windows-string": ({"windows": "false"}, "windows: Input should be a valid boolean"),
    "file-size-negative": (
        {"files": {"cow.raw": {"mode": 420, "sparseSize": -1}}},
        "files.cow.raw.sparseSize: Input should be greater than or equal to 0",
    ),
}


def _hostile_snapshot(project: Path, override: dict[str, Any]) -> str:
    """Tag the example snapshot to a re-pushed one whose config blob carries ``override``."""
    bad = snapshot(ARTIFACTS[build.XFACE], base_ref=build.XFACE, vm=SOURCE_VM, config_override=override)
    write_layout(project / "oci", {**ARTIFACTS, build.AGENT_SNAP: bad})
    return f"snapshot {build.AGENT_SNAP}@{bad.digest}: config blob is not a cocoon snapshot config"


@pytest.mark.parametrize("case", sorted(SNAPSHOT_CASES))
def test_a_snapshot_config_blob_is_checked(project: Path, case: str) -> None:
    override, problem = SNAPSHOT_CASES[case]
    what = _hostile_snapshot(project, override)
    locked = run_cli(["lock", ".", "--update"], project)
    assert locked.exit_code == 1
    assert locked.stderr == f"Error: {what}: {problem}\n"
    (project / "cocoonplan.lock").unlink()
    planned = run_cli(["plan", "agent-clone.yaml", "--json"], project)
    assert planned.exit_code == 1
    (error,) = json.loads(planned.stdout)["errors"]
    assert (error["vm"], error["summary"]) == ("agent-clone", f"{what}: {problem}")


def test_a_sane_snapshot_config_still_plans(project: Path) -> None:
    _hostile_snapshot(project, {"cpu": 4, "nics": 1, "network": "cocoon-net.1"})
    assert run_cli(["lock", ".", "--update"], project).exit_code == 0
    code, document = plan_json(project)
    assert code == 0
    clone = vm_entry(document, "agent-clone")
    assert (clone["cpu"], clone["network"]) == (4, "cocoon-net.1")


VMS_DB = "cloudhypervisor/db/vms.json"
LEGACY = "46BZKCOI3T74VCLJPOYZQFNBDS"
"""legacy-tool's record in examples/node: one CNI NIC, 10.22.0.11/16 via 10.22.0.1."""
REPAIR = "hint: cocoon keeps this file consistent under its lock; restore it from the node, or repair it with cocoon"
NOT_IPV4 = "is not an IPv4 address"
NIC_CASES = {
    "prefix-33": ("network.prefix", 33, "Input should be less than or equal to 32"),
    "prefix-negative": ("network.prefix", -1, "Input should be greater than or equal to 0"),
    "prefix-true": ("network.prefix", True, "Input should be a valid integer"),
    "prefix-string": ("network.prefix", "16", "Input should be a valid integer"),
    "ip-adding-a-parameter": (
        "network.ip",
        "10.22.0.10 init=/bin/sh",
        f"'10.22.0.10 init=/bin/sh' {NOT_IPV4}",
    ),
    "ip-adding-fields": ("network.ip", "10.22.0.10:x:y", f"'10.22.0.10:x:y' {NOT_IPV4}"),
    "ip-ipv6": ("network.ip", "fd00::5", f"'fd00::5' {NOT_IPV4}"),
    "ip-leading-zeros": ("network.ip", "010.022.0.5", f"'010.022.0.5' {NOT_IPV4}"),
    "gateway-adding-a-parameter": (
        "network.gateway",
        "10.22.0.1 rdinit=/x",
        f"'10.22.0.1 rdinit=/x' {NOT_IPV4}",
    ),
    "mac-adding-an-option": (
        "mac",
        "62:43:fe:c7:b2:d0,tap=eth0",
        "String should match pattern '^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$'",
    ),
    "tap-adding-an-option": (
        "tap",
        "tap0,mac=00:00:00:00:00:01",
        "String should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]{0,14}$'",
    ),
    "tap-too-long-for-linux": ("tap", "tap46BZKCOI-0123", "String should match pattern"),
}


def _set_nic(nic: dict[str, Any], field: str, value: Any) -> None:
    *parents, name = field.split(".")
    for parent in parents:
        nic = nic[parent]
    nic[name] = value


@pytest.mark.parametrize("case", sorted(NIC_CASES))
def test_a_vm_records_nic_is_checked(project: Path, case: str) -> None:
    field, value, problem = NIC_CASES[case]
    path = project / "node" / VMS_DB
    document = json.loads(path.read_text())
    _set_nic(document["vms"][LEGACY]["network_configs"][0], field, value)
    path.write_text(json.dumps(document))
    expected = f"Error: {VMS_DB}: VM {LEGACY} (legacy-tool): network_configs[0].{field}: {problem}"
    for args in (["state", "export", "--root", "node"], ["plan", ".", "--markdown"]):
        result = run_cli(args, project)
        assert result.exit_code == 1, args
        assert result.stdout == ""
        first, hint = result.stderr.splitlines()
        assert first.startswith(expected) and hint == REPAIR, result.stderr


@pytest.mark.parametrize("case", sorted(NIC_CASES))
def test_a_state_documents_nic_is_checked(project: Path, case: str) -> None:
    field, value, problem = NIC_CASES[case]
    exported = run_cli(["state", "export", "--root", "node"], project)
    assert exported.exit_code == 0
    document = json.loads(exported.stdout)
    run = next(vm for vm in document["vms"] if vm["name"] == "agent-run")
    _set_nic(run["nics"][0], field, value)
    (project / "state.json").write_text(json.dumps(document))
    config = project / "cocoonplan.yaml"
    config.write_text(config.read_text().replace("state: node\n", "state: state.json\n"))
    result = run_cli(["plan", ".", "--markdown"], project)
    assert result.exit_code == 1
    assert result.stdout == ""
    first, hint = result.stderr.splitlines()
    assert first.startswith(
        f"Error: {project / 'state.json'}: not a valid state document: "
        f"VM {run['id']} (agent-run): nics.0.{field}: {problem}"
    ), first
    assert hint == "hint: export it again with `cocoonplan state export`"


def test_sane_nic_values_still_plan(project: Path) -> None:
    path = project / "node" / VMS_DB
    document = json.loads(path.read_text())
    nic = document["vms"][LEGACY]["network_configs"][0]
    # An empty gateway (cocoon omits it) and the extreme prefixes are cocoon's to record.
    nic["network"] = {"ip": "192.168.0.7", "prefix": 32}
    nic["mac"] = nic["mac"].upper()
    path.write_text(json.dumps(document))
    assert run_cli(["plan", ".", "--markdown"], project).exit_code == 0
    nic["network"] = {"ip": "192.168.0.7", "gateway": "192.168.0.1", "prefix": 0}
    path.write_text(json.dumps(document))
    exported = run_cli(["state", "export", "--root", "node"], project)
    assert exported.exit_code == 0
    legacy = next(vm for vm in json.loads(exported.stdout)["vms"] if vm["name"] == "legacy-tool")
    assert legacy["nics"][0]["network"] == {"ip": "192.168.0.7", "gateway": "192.168.0.1", "prefix": 0}
