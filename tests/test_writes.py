"""Writes never go through planted links, fail as one error line, and render removes only its own files.

Also: nothing read back from the cache decides a plan unless it is verified (boot-scan records
are never believed; cached blobs and manifests are checked against their digests).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from clirunner import copy_examples, plan_json, run_cli, tree, vm_entry
from cocoonplan.atomic import atomic_writer, write_atomic
from cocoonplan.errors import CocoonplanError
from cocoonplan.gitops import MANIFEST
from cocoonplan.oci.cache import BlobCache, CachingStore
from cocoonplan.oci.layout import LayoutStore
from cocoonplan.oci.manifest import Descriptor
from needs import run_unprivileged

PRECIOUS = b"precious: must never be overwritten\n"
CACHE = Path(".cocoonplan/cache")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_examples(tmp_path / "examples")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside every directory cocoonplan writes, which a planted link points at."""
    path = tmp_path / "outside" / "victim"
    path.parent.mkdir()
    path.write_bytes(PRECIOUS)
    return path


def snapshot(root: Path, *, cache: bool = False) -> dict[str, tuple[str, bytes | str | None]]:
    """Every entry under ``root`` (hidden ones too; the download cache only with ``cache``),
    links as links, for "nothing changed" checks that a followed link cannot fool."""
    entries: dict[str, tuple[str, bytes | str | None]] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if not cache and name.startswith(CACHE.parts[0]):
            continue
        if path.is_symlink():
            entries[name] = ("link", path.readlink().as_posix())
        elif path.is_dir():
            entries[name] = ("dir", None)
        elif path.is_file():
            entries[name] = ("file", path.read_bytes())
        else:
            entries[name] = ("special", None)  # a FIFO: reading it would wait for a writer
    return entries


def one_error(result: Result) -> str:
    """The error line of a failed command, after checking it is a reported error, not a crash."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Error: ") and len(lines) <= 2, result.stderr
    return lines[0].removeprefix("Error: ")


def render(project: Path, out: Path, *extra: str) -> Result:
    return run_cli(["render", ".", "--dir", str(out), *extra], project)


def boot_layers(document: dict[str, Any]) -> set[str]:
    """The layers agent-run's kernel and initrd are planned from."""
    return {f["layer"] for f in vm_entry(document, "agent-run")["boot_files"]}


# --- planted links under the temporary names earlier versions used -------------------------


def test_render_ignores_a_planted_temporary_link(project: Path, tmp_path: Path, victim: Path) -> None:
    out = tmp_path / "rendered"
    (out / "node-a/agent-clone").mkdir(parents=True)
    (out / "node-a/agent-clone/.config.json.tmp").symlink_to(victim)
    (out / "node-a/agent-run").mkdir()
    (out / "node-a/agent-run/.launch.tmp").symlink_to(victim)
    assert render(project, out).exit_code == 0
    assert victim.read_bytes() == PRECIOUS
    assert (out / "node-a/agent-clone/.config.json.tmp").is_symlink()
    assert json.loads((out / "node-a/agent-clone/config.json").read_text())["disks"]


def test_plan_out_ignores_a_planted_temporary_link(project: Path, victim: Path) -> None:
    (project / "plan.json.tmp").symlink_to(victim)
    result = run_cli(["plan", ".", "--out", "plan.json"], project)
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == PRECIOUS
    assert json.loads((project / "plan.json").read_text())["format_version"] == 2
    assert run_cli(["show", "plan.json"], project).exit_code == 0


def test_lock_ignores_a_planted_temporary_link(project: Path, victim: Path) -> None:
    committed = (project / "cocoonplan.lock").read_bytes()
    (project / "cocoonplan.lock").unlink()
    (project / ".cocoonplan.lock.tmp").symlink_to(victim)
    result = run_cli(["lock", "."], project)
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == PRECIOUS
    assert (project / "cocoonplan.lock").read_bytes() == committed


def test_schemas_ignore_planted_temporary_links(tmp_path: Path, victim: Path) -> None:
    out = tmp_path / "schemas"
    out.mkdir()
    for name in ("plan", "vmspec", "lock"):
        (out / f".{name}.schema.json.tmp").symlink_to(victim)
        (out / f"{name}.schema.json.tmp").symlink_to(victim)
    result = run_cli(["schemas", "--dir", str(out)], tmp_path)
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == PRECIOUS
    assert json.loads((out / "plan.schema.json").read_text())["title"]


# --- a link, directory or special file as the target ------------------------------------------


@pytest.mark.parametrize(
    ("command", "target"),
    [
        (["plan", ".", "--out", "plan.json"], "plan.json"),
        (["lock", "."], "cocoonplan.lock"),
        (["schemas", "--dir", "schemas"], "schemas/plan.schema.json"),
        (["render", ".", "--dir", "rendered"], "rendered/node-a/agent-run/launch"),
        (["render", ".", "--dir", "rendered", "--check"], "rendered/node-a/agent-run/launch"),
    ],
)
def test_a_linked_target_is_refused_and_its_target_untouched(
    project: Path, victim: Path, command: list[str], target: str
) -> None:
    if target == "cocoonplan.lock":
        # The lock is read before it is written: a link to a valid lock reaches the writer.
        victim.write_bytes((project / target).read_bytes())
        (project / target).unlink()
    (project / target).parent.mkdir(parents=True, exist_ok=True)
    (project / target).symlink_to(victim)
    before, kept = snapshot(project), victim.read_bytes()
    error = one_error(run_cli(command, project))
    assert f"{target} is a symbolic link, not a regular file;" in error  # the lock's path is absolute
    assert snapshot(project) == before
    assert victim.read_bytes() == kept


@pytest.mark.parametrize(("make", "kind"), [(Path.mkdir, "a directory"), (os.mkfifo, "a special file")])
def test_a_directory_or_fifo_where_a_file_belongs_is_refused(project: Path, make: Any, kind: str) -> None:
    make(project / "plan.json")
    before = snapshot(project)
    error = one_error(run_cli(["plan", ".", "--out", "plan.json"], project))
    assert error.startswith(f"plan.json is {kind}, not a regular file")
    assert snapshot(project) == before


def test_a_linked_render_subdirectory_is_refused_before_anything_is_written(
    project: Path, tmp_path: Path
) -> None:
    out, elsewhere = tmp_path / "rendered", tmp_path / "elsewhere"
    (elsewhere / "agent-run").mkdir(parents=True)
    out.mkdir()
    (out / "node-a").symlink_to(elsewhere)
    for extra in ((), ("--check",)):
        error = one_error(render(project, out, *extra))
        assert error.startswith(f"{out / 'node-a'} is a symbolic link, not a directory")
        assert snapshot(elsewhere) == {"agent-run": ("dir", None)}
        assert sorted(p.name for p in out.iterdir()) == ["node-a"]  # not even the manifest


def test_a_linked_output_directory_is_refused(project: Path, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "rendered").symlink_to(tmp_path / "real")
    error = one_error(render(project, tmp_path / "rendered"))
    assert error.startswith(f"{tmp_path / 'rendered'} is a symbolic link, not a directory")
    assert list((tmp_path / "real").iterdir()) == []


# --- directories nothing can write into, not even root -------------------------------------------


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["plan", ".", "--out", "cocoonplan.yaml/plan.json"], "cannot write into cocoonplan.yaml"),
        (["render", ".", "--dir", "cocoonplan.yaml/rendered"], "cannot read cocoonplan.yaml/rendered"),
        (["schemas", "--dir", "cocoonplan.yaml/schemas"], "cannot read cocoonplan.yaml/schemas"),
    ],
)
def test_a_path_under_a_file_is_one_error_line(project: Path, command: list[str], message: str) -> None:
    before = tree(project)
    result = run_cli(command, project)
    assert one_error(result) == f"{message}: Not a directory"
    assert "hint: a component of the path is a file, not a directory" in result.stderr
    assert tree(project) == before


def test_an_unwritable_directory_is_one_error_line(project: Path) -> None:
    (project / "locked").mkdir(mode=0o500)
    # In a child that permission bits stop, root included.
    child = run_unprivileged(["plan", ".", "--out", "locked/plan.json"], project)
    assert child.returncode == 1 and "Traceback" not in child.stderr, child.stderr
    first, *rest = child.stderr.splitlines()
    assert first == "Error: cannot write locked/plan.json: Permission denied"
    assert rest == ["hint: make the directory writable for this user, or choose another one"]
    assert list((project / "locked").iterdir()) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_atomic(tmp_path, "plan.json", "old\n")

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(CocoonplanError) as raised:
        write_atomic(tmp_path, "plan.json", "new\n")
    assert raised.value.summary == f"cannot write {tmp_path / 'plan.json'}: No space left on device"
    assert raised.value.hint == "free space on that file system, then run the command again"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert (tmp_path / "plan.json").read_text() == "old\n"


def test_a_streaming_write_commits_only_when_its_body_succeeds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source failed"), atomic_writer(tmp_path, "a/b/blob") as out:
        out.write(b"partial")
        raise ValueError("source failed")
    assert list((tmp_path / "a/b").iterdir()) == []
    with atomic_writer(tmp_path, "a/b/blob") as out:
        out.write(b"whole")
    assert (tmp_path / "a/b/blob").read_bytes() == b"whole"
    with pytest.raises(CocoonplanError, match="not a plain file name"):
        write_atomic(tmp_path, "a/../../escape", b"x")
    assert not (tmp_path.parent / "escape").exists()


# --- a read-only checkout still plans -------------------------------------------------------------


@pytest.fixture
def read_only(project: Path) -> Iterator[Path]:
    """The examples with a cache nobody can create (a path under a file) and every file and
    directory read-only (which stops all but root)."""
    with (project / "cocoonplan.yaml").open("a") as out:
        out.write("cache: cocoonplan.yaml/cache\n")
    modes = {p: p.stat().st_mode for p in [project, *project.rglob("*")]}
    for path, mode in modes.items():
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield project
    for path, mode in modes.items():
        path.chmod(mode)


def test_a_read_only_checkout_plans_without_caching_and_says_so(
    read_only: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = snapshot(read_only, cache=True)
    with caplog.at_level(logging.WARNING):
        code, document = plan_json(read_only)
    assert code == 0
    assert boot_layers(document) == {vm_entry(document, "agent-run")["image_record"]["kernel_layer"]}
    warnings = [r.getMessage() for r in caplog.records if "not caching" in r.getMessage()]
    cache = read_only / "cocoonplan.yaml/cache"
    assert warnings == [
        f"warning: not caching in {cache}, going on without: cannot write into {cache}: Not a directory"
    ]
    assert snapshot(read_only, cache=True) == before


def test_plan_without_out_writes_nothing_but_the_cache(project: Path) -> None:
    before = tree(project)
    assert plan_json(project)[0] == 0
    assert tree(project) == before
    assert sorted(p.name for p in project.iterdir() if p.name.startswith(".")) == [".cocoonplan"]


# --- render owns only what it wrote ---------------------------------------------------------------


def test_render_removes_only_files_it_wrote(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "rendered"
    foreign = {
        ".config/gh/config.json": b'{"oauth_token": "not render\'s"}\n',
        ".git/node-a/launch": b"x\n",
        "node-a/ghost/launch": b"hand-made\n",
        "node-b/agent-run/config.json": b"{}\n",
        "README.md": b"# rendered files\n",
    }
    for name, content in foreign.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    assert render(project, out).exit_code == 0
    owned = json.loads((out / MANIFEST).read_text())["files"]
    assert "node-a/agent-run/launch" in owned and not set(owned) & set(foreign)

    (project / "agent-run.yaml").unlink()
    checked = render(project, out, "--check")
    assert checked.exit_code == 1
    assert checked.stdout.splitlines() == [
        f"stale:   node-a/agent-run/{f}"
        for f in ("config.derived.json", "disks.json", "launch", "provisional.json")
    ]
    assert render(project, out).exit_code == 0
    assert not (out / "node-a/agent-run").exists() or not list((out / "node-a/agent-run").iterdir())
    assert {n: (out / n).read_bytes() for n in foreign} == foreign
    assert not any(
        f.startswith("node-a/agent-run/") for f in json.loads((out / MANIFEST).read_text())["files"]
    )
    assert render(project, out, "--check").exit_code == 0


@pytest.mark.parametrize(
    "entry", ["../outside/victim", ".config/gh/config.json", "node-a/agent-clone/notes.txt", "/etc/passwd"]
)
def test_an_edited_manifest_cannot_make_render_remove_anything_else(
    project: Path, tmp_path: Path, victim: Path, entry: str
) -> None:
    out = tmp_path / "rendered"
    assert render(project, out).exit_code == 0
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"].append(entry)
    (out / MANIFEST).write_text(json.dumps(manifest))
    before = snapshot(out)
    for extra in ((), ("--check",)):
        error = one_error(render(project, out, *extra))
        assert (
            error
            == f"{out / MANIFEST}: not a render manifest cocoonplan can trust: it lists {entry!r}, which render never writes"
        )
    assert snapshot(out) == before
    assert victim.read_bytes() == PRECIOUS


def test_a_kept_vms_files_stay_owned(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "rendered"
    assert render(project, out).exit_code == 0
    assert run_cli(["render", "agent-clone.yaml", "--dir", str(out)], project).exit_code == 0
    owned = json.loads((out / MANIFEST).read_text())["files"]
    assert "node-a/agent-run/launch" in owned  # still render's, for when its spec goes
    assert (out / "node-a/agent-run/launch").is_file()


# --- cached records and blobs are verified before anything is taken from them ---------------------


def _plant_lying_scan_records(project: Path, document: dict[str, Any]) -> None:
    # The record format earlier versions trusted: every layer claims the opposite of the truth.
    kernel = vm_entry(document, "agent-run")["image_record"]["kernel_layer"]
    records = project / CACHE / "boot-scan" / "v2"
    records.mkdir(parents=True, exist_ok=True)
    for layer in vm_entry(document, "agent-run")["image_record"]["layers"]:
        lie = layer != kernel
        (records / f"{layer.removeprefix('sha256:')}.json").write_text(
            json.dumps({"kernel": lie, "initrd": lie})
        )


@pytest.mark.parametrize("warm", [False, True], ids=["empty-cache", "warm-cache"])
def test_an_edited_boot_scan_record_is_not_believed(project: Path, warm: bool) -> None:
    code, truth = plan_json(project)
    assert code == 0
    if not warm:
        shutil.rmtree(project / CACHE)
    _plant_lying_scan_records(project, truth)
    code, document = plan_json(project)
    assert code == 0
    assert (
        boot_layers(document)
        == boot_layers(truth)
        == {vm_entry(truth, "agent-run")["image_record"]["kernel_layer"]}
    )
    assert vm_entry(document, "agent-run")["launch"] == vm_entry(truth, "agent-run")["launch"]


def _blob(project: Path, digest: str) -> Path:
    return project / CACHE / "blobs/sha256" / digest.removeprefix("sha256:")


def test_a_tampered_cached_layer_is_refetched_not_believed(project: Path, victim: Path) -> None:
    code, truth = plan_json(project)
    layers = vm_entry(truth, "agent-run")["image_record"]["layers"]
    kernel = vm_entry(truth, "agent-run")["image_record"]["kernel_layer"]
    other = next(layer for layer in layers if layer != kernel)
    good = _blob(project, kernel).read_bytes()
    # A kernel-less layer's bytes under the kernel layer's name, and a kernel under another's.
    _blob(project, kernel).write_bytes(_blob(project, other).read_bytes())
    _blob(project, other).unlink()
    _blob(project, other).symlink_to(victim)
    code, document = plan_json(project)
    assert code == 0
    assert boot_layers(document) == {kernel}
    assert _blob(project, kernel).read_bytes() == good  # dropped and fetched again
    assert _blob(project, other).is_file() and not _blob(project, other).is_symlink()
    assert victim.read_bytes() == PRECIOUS


def test_a_tampered_cached_manifest_is_refetched(project: Path) -> None:
    code, truth = plan_json(project)
    source = vm_entry(truth, "agent-run")["source"]["digest"]
    _blob(project, source).write_text('{"schemaVersion": 2, "layers": []}')
    code, document = plan_json(project)
    assert code == 0
    assert vm_entry(document, "agent-run")["disks"] == vm_entry(truth, "agent-run")["disks"]
    assert json.loads(_blob(project, source).read_text())["layers"]


def test_the_blob_cache_verifies_every_read(project: Path, tmp_path: Path) -> None:
    layout = LayoutStore(project / "oci", "ghcr.io")
    cache = BlobCache(tmp_path / "cache")
    store = CachingStore(layout, cache)
    index = json.loads((project / "oci/index.json").read_text())
    manifest = json.loads(_layout_blob(project, index["manifests"][0]["digest"]))
    layer = Descriptor.model_validate(manifest["layers"][-1])
    store.download_blob("any", layer, tmp_path / "first")
    good = cache.path_for(layer.digest).read_bytes()
    cache.path_for(layer.digest).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert cache.get(layer.digest, layer.size) is None
    assert not cache.path_for(layer.digest).exists()  # dropped
    cache.path_for(layer.digest).write_bytes(b"tampered")
    assert cache.hand_off(layer, tmp_path / "second") is None
    assert not (tmp_path / "second").exists()
    store.download_blob("any", layer, tmp_path / "third")
    assert (tmp_path / "third").read_bytes() == good == cache.path_for(layer.digest).read_bytes()


def _layout_blob(project: Path, digest: str) -> bytes:
    return (project / "oci/blobs/sha256" / digest.removeprefix("sha256:")).read_bytes()
