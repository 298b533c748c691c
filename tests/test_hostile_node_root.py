"""A hostile node root: every read stays in the root and reads regular files of bounded size.

A root (or exported state) holding symbolic links (to files outside, to directories, in the
middle of a path), FIFOs, devices, oversized files, huge directories or unreadable files is
refused: exit 1, one line ``Error: <path>: …`` naming the path relative to the root (then a
hint), no traceback, nothing written. Whatever a root holds or links to that may be secret
reaches neither ``state export``, nor ``plan --json``/``--markdown``, nor ``render``.

Roots are real directories (a copy of ``examples/`` and ``ocifixture.node_root``); the CLI runs
in a child process with a timeout wherever a regression would hang it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import Result

from chschema import SCHEMA
from clirunner import copy_examples, run_cli
from cocoonplan.errors import StateError
from cocoonplan.nodefs import Cap, Listing
from cocoonplan.observed import VM_CONFIG_KEYS, VM_CONFIG_SHAPE, redact_credentials
from cocoonplan.resolvers.node import load_state_document
from needs import run_unprivileged, unavailable
from ocifixture import NodeVM, Run, derive_id, image, layer, node_root

SECRET = "FAKE-SECRET-c0c00n-7d1e"
CLONE = "run/cloudhypervisor/V4SEH2KVJ72CEUVW75EFR6EDT4"
"""agent-clone's run dir in examples/node: config.json, cocoon.json, state.json, cmdline."""
RUN = "run/cloudhypervisor/KYOCHF64FKGH7F6CHC5JFVZL7U"
"""agent-run's run dir in examples/node: cmdline only."""
VMS_DB = "cloudhypervisor/db/vms.json"
KERNEL_HEX = "7481b97e1affcf8163a1db1149a861e695a5789610f080b5211600a7a361be02"
BLOB_HEX = "ef556a89bd78e18dcf42a844edb76ff15b696b05a332c9a0a50f7a16f5832b15"
COMMANDS = (
    ["state", "export", "--root", "node"],
    ["plan", ".", "--out", "plan.json"],
    ["render", ".", "--dir", "out"],
)
LINKED = "is a symbolic link, not a regular file; cocoonplan does not follow or open it"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A private copy of examples/ (whose cocoonplan.yaml reads node-a from ./node)."""
    return copy_examples(tmp_path / "project")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the project: what a link in the root must never reach."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text(f"AWS_SECRET_ACCESS_KEY={SECRET}\n")
    (path / "config.json").write_text(json.dumps({"auths": {"ghcr.io": {"auth": SECRET}}}))
    return path


def _listing(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` (links not followed) with its mode, size and mtime; the
    digest-addressed download cache is left out, as in ``clirunner.tree``."""
    found = {}
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".cocoonplan"]
        for name in (*dirs, *files):
            path = Path(directory, name)
            info = path.lstat()
            found[path.relative_to(root).as_posix()] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return found


def _assert_refused(
    result: Result | subprocess.CompletedProcess[str], exit_code: int, where: str, problem: str
) -> None:
    assert exit_code == 1, result.stdout
    assert "Traceback" not in result.stderr
    first, *rest = result.stderr.splitlines()
    assert first.startswith(f"Error: {where}: "), first
    assert problem in first
    assert [line for line in rest if not line.startswith("hint: ")] == [], "one line, then the hint"
    assert SECRET not in result.stdout + result.stderr


def _refused_by_every_command(project: Path, where: str, problem: str, *, isolated: bool = False) -> None:
    before = _listing(project)
    for args in COMMANDS:
        if isolated:
            child = run_unprivileged(args, project)
            _assert_refused(child, child.returncode, where, problem)
        else:
            result = run_cli(args, project)
            _assert_refused(result, result.exit_code, where, problem)
        assert _listing(project) == before, f"{args[0]} wrote something"


def _link(path: Path, target: Path | str) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.move(path, target)
    else:
        path.unlink(missing_ok=True)
    path.symlink_to(target)


def _edit_json(path: Path, change: Callable[[Any], None]) -> None:
    document = json.loads(path.read_bytes())
    change(document)
    path.write_text(json.dumps(document))


def _sparse(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with path.open("wb") as file:
        file.truncate(size)


# --------------------------------------------------------------------------- symbolic links


@pytest.mark.parametrize(
    ("make", "where", "problem"),
    [
        pytest.param(
            lambda node, out: _link(node / RUN / "cmdline", out / "secret.txt"),
            f"{RUN}/cmdline",
            LINKED,
            id="cmdline-to-a-file-outside",
        ),
        pytest.param(
            lambda node, out: _link(node / CLONE / "config.json", out / "config.json"),
            f"{CLONE}/config.json",
            LINKED,
            id="config-json-to-a-docker-config",
        ),
        pytest.param(
            lambda node, out: _link(node / VMS_DB, "/proc/self/environ"),
            VMS_DB,
            LINKED,
            id="database-to-proc-environ",
        ),
        pytest.param(
            lambda node, out: _link(node / "cocoonplan/owned.json", "../../../outside/config.json"),
            "cocoonplan/owned.json",
            LINKED,
            id="relative-link-out-of-the-root",
        ),
        pytest.param(
            lambda node, out: _link(node / f"oci/boot/{KERNEL_HEX}/vmlinuz", out / "secret.txt"),
            f"oci/boot/{KERNEL_HEX}/vmlinuz",
            LINKED,
            id="boot-file",
        ),
        pytest.param(
            lambda node, out: _link(node / f"oci/blobs/{BLOB_HEX}.erofs", out / "secret.txt"),
            f"oci/blobs/{BLOB_HEX}.erofs",
            "is not a regular file but a symbolic link",
            id="layer-blob",
        ),
        pytest.param(
            lambda node, out: _link(node / "run/cloudhypervisor", out / "cloudhypervisor"),
            "run/cloudhypervisor",
            "is a symbolic link, not a directory",
            id="directory-in-the-middle-of-a-path",
        ),
        pytest.param(
            lambda node, out: _link(node / CLONE, out / "vm"),
            CLONE,
            "is a symbolic link, not a directory",
            id="a-vms-run-dir",
        ),
        pytest.param(
            lambda node, out: _link(node / "oci/db", out / "db"),
            "oci/db",
            "is a symbolic link, not a directory",
            id="database-directory",
        ),
        pytest.param(
            lambda node, out: _link(node / RUN / "cmdline", "/dev/zero"),
            f"{RUN}/cmdline",
            LINKED,
            id="cmdline-to-dev-zero",
        ),
    ],
)
def test_symbolic_links_are_never_followed(
    project: Path, outside: Path, make: Callable[[Path, Path], None], where: str, problem: str
) -> None:
    make(project / "node", outside)
    _refused_by_every_command(project, where, problem)


def test_a_path_recorded_outside_the_root_is_refused(project: Path) -> None:
    escape = "/var/lib/cocoon/run/cloudhypervisor/../../../../etc"
    _edit_json(
        project / "node" / VMS_DB, lambda d: d["vms"]["KYOCHF64FKGH7F6CHC5JFVZL7U"].update(run_dir=escape)
    )
    _refused_by_every_command(project, VMS_DB, f"run_dir {escape!r} is not a clean absolute path")


def test_a_link_in_a_root_with_its_own_run_dir_is_refused(tmp_path: Path) -> None:
    base = image([layer({"boot/vmlinuz-6.1": b"kernel", "boot/initrd.img-6.1": b"initrd"})])
    vm_id = derive_id("hostile", "worker")
    root = tmp_path / "srv"
    node_root(root, images={"b:1": base}, vms=[NodeVM(id=vm_id, name="worker", source=Run("b:1"))],
              root_dir="/srv/cocoon", run_dir="/srv/cocoon/vms")  # fmt: skip
    (tmp_path / "elsewhere").mkdir()
    _link(root / "vms", tmp_path / "elsewhere" / "vms")
    result = run_cli(
        ["state", "export", "--root", "srv", "--root-dir", "/srv/cocoon", "--run-dir", "/srv/cocoon/vms"],
        tmp_path,
    )
    _assert_refused(result, result.exit_code, "vms", "is a symbolic link, not a directory")


# --------------------------------------------------------------------------- FIFOs and devices


@pytest.mark.parametrize("where", [f"{RUN}/cmdline", VMS_DB, f"{CLONE}/config.json", "cocoonplan/owned.json"])
def test_a_fifo_is_refused_without_waiting_for_a_writer(project: Path, where: str) -> None:
    (project / "node" / where).unlink()
    os.mkfifo(project / "node" / where)
    _refused_by_every_command(project, where, "is a FIFO, not a regular file", isolated=True)


@pytest.mark.parametrize("where", ["oci/db/images.json", f"{CLONE}/cocoon.json"])
def test_a_device_node_is_never_opened(project: Path, where: str) -> None:
    path = project / "node" / where
    path.unlink()
    try:
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        unavailable("permission to create a device node (root)")
    _refused_by_every_command(project, where, "is a character device, not a regular file")


# --------------------------------------------------------------------------- sizes and listings


@pytest.mark.parametrize(
    ("where", "cap"),
    [
        (f"{RUN}/cmdline", Cap.CMDLINE),
        (f"{CLONE}/config.json", Cap.RUN_FILE),
        (f"{CLONE}/cocoon.json", Cap.RUN_FILE),
        (VMS_DB, Cap.DATABASE),
        ("oci/db/images.json", Cap.DATABASE),
        ("cocoonplan/owned.json", Cap.OWNERSHIP),
    ],
)
def test_a_file_over_its_cap_is_refused_unread(project: Path, where: str, cap: Cap) -> None:
    _sparse(project / "node" / where, cap.size + 1)
    _refused_by_every_command(project, where, f"is larger than {cap.size} bytes")


def test_a_cmdline_just_over_its_cap_is_refused(project: Path) -> None:
    (project / "node" / RUN / "cmdline").write_bytes(b"x" * (Cap.CMDLINE.size + 1))
    _refused_by_every_command(project, f"{RUN}/cmdline", f"is larger than {Cap.CMDLINE.size} bytes")


def test_json_nested_beyond_the_bound_is_refused(project: Path) -> None:
    (project / "node" / CLONE / "cocoon.json").write_text("[" * 100_000)
    _refused_by_every_command(project, f"{CLONE}/cocoon.json", "nested more than 64 levels deep")


def test_a_directory_of_too_many_entries_is_refused(project: Path) -> None:
    blobs = project / "node" / "oci" / "blobs"
    for index in range(Listing.NODE_DIR.size + 1 - len(list(blobs.iterdir()))):
        os.close(os.open(blobs / f"pull-{index}.tmp", os.O_CREAT | os.O_WRONLY, 0o644))
    result = run_cli(COMMANDS[0], project)
    _assert_refused(result, result.exit_code, "oci/blobs", f"holds more than {Listing.NODE_DIR.size} entries")


# --------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize("where", [VMS_DB, f"{CLONE}/config.json", CLONE, "oci/blobs"])
def test_an_unreadable_file_or_directory_is_refused(project: Path, where: str) -> None:
    (project / "node" / where).chmod(0)
    if not (project / "node" / where).is_dir():
        _refused_by_every_command(project, where, "cannot be", isolated=True)
        return
    # The root is inside the project, and plan and render first look for specs in every
    # directory of it: they refuse the directory there, by its path in the project.
    before = _listing(project)
    for args, named, problem in [
        (COMMANDS[0], where, "cannot be"),
        *((args, f"node/{where}", "cannot list the directory") for args in COMMANDS[1:]),
    ]:
        child = run_unprivileged(args, project)
        _assert_refused(child, child.returncode, named, problem)
        assert _listing(project) == before, f"{args[0]} wrote something"


# --------------------------------------------------------------------------- exported state documents


def _state_document(project: Path) -> Path:
    """The node's exported state, as the project's state of node-a from now on."""
    result = run_cli(COMMANDS[0], project)
    assert result.exit_code == 0, result.stderr
    path = project / "state.json"
    path.write_text(result.stdout)
    project_file = project / "cocoonplan.yaml"
    project_file.write_text(project_file.read_text().replace("state: node\n", "state: state.json\n"))
    return path


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        pytest.param(
            lambda path, out: (path.unlink(), os.mkfifo(path)), "is a FIFO, not a regular file", id="fifo"
        ),
        pytest.param(lambda path, out: _link(path, "/dev/zero"), LINKED, id="dev-zero"),
        pytest.param(
            lambda path, out: _sparse(path, Cap.STATE_DOCUMENT.size + 1),
            f"is larger than {Cap.STATE_DOCUMENT.size} bytes",
            id="oversized",
        ),
    ],
)
def test_a_hostile_state_document_is_refused(
    project: Path, outside: Path, make: Callable[[Path, Path], None], problem: str
) -> None:
    path = _state_document(project)
    make(path, outside)
    before = _listing(project)
    for args in COMMANDS[1:]:
        child = run_unprivileged(args, project)
        # The project file's state: is read by its name, so a link there is refused as one.
        _assert_refused(child, child.returncode, str(path), problem)
        assert _listing(project) == before


def test_a_linked_state_document_is_refused(project: Path, outside: Path) -> None:
    path = _state_document(project)
    _link(path, outside / "config.json")
    with pytest.raises(StateError) as caught:
        load_state_document(path)
    assert caught.value.summary == f"{path}: {LINKED}"
    # The project file's state: is read by its name, so the CLI refuses the link as one:
    # nothing of what it names is shown.
    codes, text = _outputs(project)
    assert LINKED in text
    assert codes == [0, 1, 1, 1, 1] and SECRET not in text and "Traceback" not in text


# --------------------------------------------------------------------------- secrets


def _outputs(project: Path) -> tuple[list[int], str]:
    """Exit codes and everything written by export, plan (human, every change shown), plan
    --json, plan --markdown and render."""
    runs = [
        run_cli(COMMANDS[0], project),
        run_cli(["plan", ".", "-v"], project),
        run_cli(["plan", ".", "--json"], project),
        run_cli(["plan", ".", "--markdown"], project),
        run_cli(["render", ".", "--dir", "out"], project),
    ]
    rendered = [p.read_text() for p in sorted((project / "out").rglob("*")) if p.is_file()]
    return [r.exit_code for r in runs], "\n".join([*(r.stdout + r.stderr for r in runs), *rendered])


def _add_to_clone_config(key: str, value: Any) -> Callable[[Path, Path], None]:
    return lambda node, out: _edit_json(node / CLONE / "config.json", lambda d: d.update({key: value}))


def _edit_clone_config(change: Callable[[Any], None]) -> Callable[[Path, Path], None]:
    return lambda node, out: _edit_json(node / CLONE / "config.json", change)


NESTED_SECRETS: dict[str, Callable[[Any], None]] = {
    "docker-auths-under-payload": lambda d: d["payload"].update(auths={"ghcr.io": {"auth": SECRET}}),
    "token-in-a-disk-entry": lambda d: d["disks"][0].update(token=SECRET),
    "token-in-a-nic-entry": lambda d: d["net"][0].update(registry={"password": SECRET}),
    "token-three-levels-down": lambda d: d["cpus"]["features"].update(extra={"auth": SECRET}),
    "object-where-a-value-belongs": lambda d: d["cpus"]["features"].update(amx={"auth": SECRET}),
    "string-where-an-object-belongs": lambda d: d.update(tpm=SECRET),
    "token-in-a-list-of-objects": lambda d: d.update(
        landlock_rules=[{"path": "/x", "access": "r", "k": SECRET}]
    ),
}
"""Keys (or values) no VmConfig holds, planted below the top level of a run dir's config.json."""


def _append_to_cmdline(text: str) -> Callable[[Path, Path], None]:
    def append(node: Path, out: Path) -> None:
        with (node / RUN / "cmdline").open("a") as file:
            file.write(text)

    return append


def _record_url(node: Path, out: Path) -> None:
    url = f"https://legacy:{SECRET}@images.example/legacy.qcow2"
    _edit_json(node / VMS_DB, lambda d: d["vms"]["46BZKCOI3T74VCLJPOYZQFNBDS"]["config"].update(image=url))


@pytest.mark.parametrize(
    ("make", "readable"),
    [
        pytest.param(
            lambda node, out: _link(node / RUN / "cmdline", out / "secret.txt"), False, id="linked-cmdline"
        ),
        pytest.param(
            lambda node, out: _link(node / CLONE / "config.json", out / "config.json"),
            False,
            id="linked-config-json",
        ),
        pytest.param(_add_to_clone_config("registry_token", SECRET), True, id="extra-key-in-config-json"),
        pytest.param(
            _add_to_clone_config("auths", {"ghcr.io": {"auth": SECRET}}),
            True,
            id="docker-auths-in-config-json",
        ),
        pytest.param(
            _add_to_clone_config(
                "platform", {"num_pci_segments": 1, "oem_strings": [f"io.systemd.credential:tok={SECRET}"]}
            ),
            True,
            id="systemd-credential-in-oem-strings",
        ),
        pytest.param(
            lambda node, out: _edit_json(
                node / CLONE / "config.json",
                lambda d: d["payload"].update(
                    cmdline=f"{d['payload']['cmdline']} ds=nocloud;s=https://seed:{SECRET}@x/"
                ),
            ),
            True,
            id="url-userinfo-in-the-kernel-cmdline",
        ),
        pytest.param(
            _append_to_cmdline(f" systemd.set_credential=token:{SECRET}"),
            True,
            id="credential-in-the-launch-line",
        ),
        pytest.param(_record_url, True, id="url-userinfo-in-a-vm-record"),
        *(
            pytest.param(_edit_clone_config(change), True, id=f"nested-{name}")
            for name, change in NESTED_SECRETS.items()
        ),
    ],
)
def test_no_secret_of_the_root_reaches_an_export_plan_or_render(
    project: Path, outside: Path, make: Callable[[Path, Path], None], readable: bool
) -> None:
    make(project / "node", outside)
    codes, text = _outputs(project)
    assert SECRET not in text
    assert "Traceback" not in text
    assert codes == ([0, 0, 0, 0, 0] if readable else [1, 1, 1, 1, 1])


def test_no_secret_of_a_state_document_reaches_a_plan_or_render(project: Path) -> None:
    path = _state_document(project)
    document = json.loads(path.read_text())
    clone = next(vm for vm in document["vms"] if vm["name"] == "agent-clone")
    clone["runtime_config"]["registry_token"] = SECRET
    for plant in NESTED_SECRETS.values():
        plant(clone["runtime_config"])
    clone["launch"] += f" systemd.set_credential=token:{SECRET}"
    path.write_text(json.dumps(document))
    codes, text = _outputs(project)
    assert codes == [0, 0, 0, 0, 0] and SECRET not in text


def test_an_export_keeps_the_vm_config_and_marks_what_it_redacted(project: Path) -> None:
    _add_to_clone_config("registry_token", SECRET)(project / "node", project)
    _append_to_cmdline(f" systemd.set_credential=token:{SECRET}")(project / "node", project)
    result = run_cli(COMMANDS[0], project)
    document = json.loads(result.stdout)
    clone, run = (
        next(vm for vm in document["vms"] if vm["name"] == name) for name in ("agent-clone", "agent-run")
    )
    assert set(clone["runtime_config"]) == VM_CONFIG_KEYS, "every VmConfig key kept, nothing else"
    assert run["launch"].endswith(" systemd.set_credential=REDACTED")


def test_an_export_keeps_the_vm_config_as_ch_wrote_it_and_nothing_else_at_any_depth(project: Path) -> None:
    config = json.loads((project / "node" / CLONE / "config.json").read_text())
    for plant in NESTED_SECRETS.values():
        _edit_clone_config(plant)(project / "node", project)
    result = run_cli(COMMANDS[0], project)
    assert result.exit_code == 0
    clone = next(vm for vm in json.loads(result.stdout)["vms"] if vm["name"] == "agent-clone")
    planted = {
        **config,
        "cpus": {**config["cpus"], "features": {"amx": {}}},
        "landlock_rules": [{"path": "/x", "access": "r"}],
    }
    del planted["tpm"]  # a string where CH writes an object or null is nothing CH wrote
    assert clone["runtime_config"] == planted
    assert list(clone["runtime_config"]) == [k for k in config if k != "tpm"], "key order kept"


# --------------------------------------------------------------------------- the rules themselves


def _schema_shape(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any] | None:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    schema = schema.get("items", schema)
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    if "properties" not in schema:
        return None
    return {key: _schema_shape(value, components) for key, value in schema["properties"].items()}


def _paths(shape: Any, prefix: str = "") -> set[str]:
    if shape is None:
        return set()
    return {f"{prefix}{key}" for key in shape} | {
        path for key, inner in shape.items() for path in _paths(inner, f"{prefix}{key}.")
    }


def test_the_vm_config_shape_is_cloud_hypervisor_v51s_at_every_depth() -> None:
    components = yaml.safe_load(SCHEMA.read_text())["components"]["schemas"]
    documented = _paths(_schema_shape({"$ref": "#/components/schemas/VmConfig"}, components))
    kept = _paths(VM_CONFIG_SHAPE)
    # What CH serialises beyond its OpenAPI document (see test_examples), and nothing else.
    assert kept - documented == {
        "disks.disable_aio", "disks.disable_io_uring", "net.fds",
        "user_devices", "user_devices.socket", "user_devices.id", "user_devices.pci_segment",
    }  # fmt: skip
    assert documented <= kept


def test_the_vm_config_keys_are_cloud_hypervisor_v51s() -> None:
    properties = yaml.safe_load(SCHEMA.read_text())["components"]["schemas"]["VmConfig"]["properties"]
    # CH serialises user_devices; its OpenAPI document does not list it (see test_examples).
    assert set(properties) | {"user_devices"} == VM_CONFIG_KEYS


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("https://user:pw@host/x", "https://REDACTED@host/x"),
        ("git+ssh://token@example.com/repo", "git+ssh://REDACTED@example.com/repo"),
        ("ds=nocloud;s=http://u:p@10.0.0.1:8000/ rw", "ds=nocloud;s=http://REDACTED@10.0.0.1:8000/ rw"),
        ('a systemd.set_credential="db:x y" b', "a systemd.set_credential=REDACTED b"),
        ("systemd.set_credential_binary=k:AAAA", "systemd.set_credential_binary=REDACTED"),
        ("io.systemd.credential.binary:k=QUJD", "io.systemd.credential.binary:REDACTED"),
        # Not credentials: references by digest, file URLs, paths, e-mail-like text.
        ("ghcr.io/cocoonstack/agent@sha256:" + "0" * 64, None),
        ("file:///var/lib/cocoon/run/x", None),
        ("https://host/path@v2", None),
        ("root@node", None),
    ],
)
def test_redaction(text: str, redacted: str | None) -> None:
    expected = text if redacted is None else redacted
    assert redact_credentials({text: [text]}) == {expected: [expected]}
    assert redact_credentials(expected) == expected, "idempotent"
