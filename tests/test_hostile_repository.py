"""A hostile repository: what a pull request can commit beside the specs never hangs, leaks,
crashes or deletes.

Every file cocoonplan reads from the project (specs, ``cocoonplan.yaml``, ``cocoonplan.lock``,
the OCI layout's ``oci-layout``, ``index.json`` and blobs) is read without following a link,
only if it is a regular file (a FIFO is never waited on) and within its size cap; a directory
of the project that cannot be listed is an error, never a directory without specs; the cache
is never written through a link inside the project; and an output directory that writing
would fail on is refused before anything is planned or printed. Each case exits 1 with one
``Error:`` line naming the file and a hint, no traceback.

The CLI runs in a child process (``needs.run_unprivileged``): a regression that waits on a
FIFO fails on the timeout instead of stalling the run, and as root the child lacks the
capabilities that read any file, so permission bits hold for it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from clirunner import copy_examples
from needs import run_unprivileged

LAYOUT_FILES = ("oci-layout", "index.json")
CONFIG_HEX = "00da665717baa60f078fa1b5b81065226b20e92017d97e27f52d607021d67d11"
"""A config blob of agent-run's image in examples/oci: read by every plan of agent-run."""
LINKED = "is a symbolic link, not a regular file; cocoonplan never writes or reads through it"
FIFO = "is a FIFO, not a regular file; cocoonplan never writes or reads through it"
REFUSED_HINT = "hint: cocoonplan reads only regular files and never follows a link"
DENIED_HINT = "hint: make it readable for this user (and its directories searchable)"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A private copy of examples/ without a cache: every blob is read from the layout."""
    return copy_examples(tmp_path / "repo")


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    """A FIFO outside the project that no one ever writes: opening it for reading would wait."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root`` (links not followed, nothing opened) with its mode and size;
    the download cache, which holds verified content only, is left out."""
    found = {}
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".cocoonplan"]
        for name in (*dirs, *files):
            info = Path(directory, name).lstat()
            found[Path(directory, name).relative_to(root).as_posix()] = (info.st_mode, info.st_size)
    return found


def _refused(child: subprocess.CompletedProcess[str], error: str, hint: str) -> None:
    """Exit 1 with ``Error: <error>`` as the one line, then a hint starting ``hint``."""
    assert child.returncode == 1, child.stdout + child.stderr
    assert "Traceback" not in child.stderr
    assert child.stderr.splitlines() == [error, child.stderr.splitlines()[1]], child.stderr
    assert child.stderr.splitlines()[1].startswith(hint), child.stderr


def _replace(path: Path, make: Callable[[Path], None]) -> None:
    path.unlink(missing_ok=True)
    make(path)


# --------------------------------------------------------------------------- links and FIFOs


@pytest.mark.parametrize(
    ("name", "args", "error"),
    [
        ("cocoonplan.lock", ["plan", "."], "cocoonplan.lock {problem}"),
        ("cocoonplan.lock", ["lock", "."], "cocoonplan.lock {problem}"),
        ("cocoonplan.yaml", ["validate", "."], "cocoonplan.yaml: the file {problem}"),
        ("agent-run.yaml", ["plan", "."], "agent-run.yaml: the file {problem}"),
        ("agent-run.yaml", ["validate", "agent-run.yaml"], "agent-run.yaml: the file {problem}"),
        # Another file of the project: read by the scan of every spec a partial plan makes.
        ("tools/other.yml", ["plan", "agent-clone.yaml"], "tools/other.yml: the file {problem}"),
        (
            "oci/index.json",
            ["lock", "agent-clone.yaml"],
            "layout {layout} (for ghcr.io): index.json {problem}",
        ),
        (
            "oci/oci-layout",
            ["lock", "agent-clone.yaml"],
            "layout {layout} (for ghcr.io): oci-layout {problem}",
        ),
    ],
)
@pytest.mark.parametrize("kind", ["link-to-fifo", "fifo"])
def test_a_repository_file_that_is_a_fifo_or_link_is_refused_unopened(
    project: Path, fifo: Path, name: str, args: list[str], error: str, kind: str
) -> None:
    path = project / name
    path.parent.mkdir(exist_ok=True)
    _replace(path, lambda p: p.symlink_to(fifo) if kind == "link-to-fifo" else os.mkfifo(p))
    before = _listing(project)
    child = run_unprivileged(args, project)
    problem = FIFO if kind == "fifo" else LINKED
    _refused(child, "Error: " + error.format(problem=problem, layout=project / "oci"), REFUSED_HINT)
    assert _listing(project) == before


@pytest.mark.parametrize(
    ("name", "args", "error"),
    [
        ("cocoonplan.lock", ["plan", "."], f"cocoonplan.lock {LINKED}"),
        (
            "oci/index.json",
            ["lock", "agent-clone.yaml"],
            f"layout {{layout}} (for ghcr.io): index.json {LINKED}",
        ),
    ],
)
def test_a_link_to_a_device_is_refused_unopened(
    project: Path, name: str, args: list[str], error: str
) -> None:
    _replace(project / name, lambda p: p.symlink_to("/dev/stdin"))
    reader, writer = os.pipe()  # open for writing, never written: reading it would wait
    try:
        child = run_unprivileged(args, project, stdin=reader)
    finally:
        os.close(reader)
        os.close(writer)
    _refused(child, "Error: " + error.format(layout=project / "oci"), REFUSED_HINT)


def test_a_linked_spec_is_refused_even_when_it_points_into_the_project(project: Path) -> None:
    (project / "specs").mkdir()
    (project / "agent-run.yaml").rename(project / "specs" / "agent-run.txt")
    (project / "agent-run.yaml").symlink_to("specs/agent-run.txt")
    child = run_unprivileged(["validate", "."], project)
    _refused(child, f"Error: agent-run.yaml: the file {LINKED}", REFUSED_HINT)


def test_a_linked_directory_of_the_layout_is_refused(project: Path, tmp_path: Path) -> None:
    (project / "oci" / "blobs").rename(tmp_path / "blobs")
    (project / "oci" / "blobs").symlink_to(tmp_path / "blobs")
    child = run_unprivileged(["plan", ".", "--json"], project)
    assert child.returncode == 1, child.stderr
    errors = json.loads(child.stdout)["errors"]
    assert errors and all(
        e["summary"].endswith(
            f"{project / 'oci' / 'blobs'} is a symbolic link, not a directory; "
            "cocoonplan never writes or reads through links"
        )
        for e in errors
    ), errors
    assert all(e["hint"] for e in errors)


# --------------------------------------------------------------------------- unreadable layout blobs


@pytest.mark.parametrize("kind", ["unreadable", "link-to-unreadable"])
def test_an_unreadable_layout_blob_is_an_error_naming_the_blob_and_the_layout(
    project: Path, tmp_path: Path, kind: str
) -> None:
    blob = project / "oci" / "blobs" / "sha256" / CONFIG_HEX
    if kind == "unreadable":
        blob.chmod(0)
        problem, hint = f"cannot read blobs/sha256/{CONFIG_HEX}: Permission denied", DENIED_HINT
    else:
        private = tmp_path / "private"
        private.write_bytes(blob.read_bytes())
        private.chmod(0)
        _replace(blob, lambda p: p.symlink_to(private))
        problem, hint = f"blobs/sha256/{CONFIG_HEX} {LINKED}", REFUSED_HINT
    child = run_unprivileged(["plan", ".", "--json"], project)
    assert child.returncode == 1 and "Traceback" not in child.stderr, child.stderr
    (error,) = json.loads(child.stdout)["errors"]
    assert error["vm"] == "agent-run"
    assert error["summary"] == (
        f"blob sha256:{CONFIG_HEX} of cocoonstack/cocoon/ubuntu in layout {project / 'oci'} (for ghcr.io): "
        + problem
    )
    assert f"hint: {error['hint']}".startswith(hint)


# --------------------------------------------------------------------------- unreadable directories


@pytest.mark.parametrize(
    "args", [["validate", "."], ["plan", "."], ["plan", "agent-run.yaml"], ["lock", "agent-run.yaml"]]
)
def test_an_unreadable_directory_is_an_error_never_a_deleted_spec(project: Path, args: list[str]) -> None:
    # Skipped, agent-clone.yaml would be gone, and `plan` would delete agent-clone.
    (project / "sub").mkdir()
    (project / "agent-clone.yaml").rename(project / "sub" / "agent-clone.yaml")
    (project / "sub").chmod(0)
    try:
        child = run_unprivileged(args, project)
    finally:
        (project / "sub").chmod(0o755)
    _refused(child, "Error: sub: cannot list the directory: Permission denied", "hint: make it readable")
    assert "exclude it" in child.stderr
    assert "delete" not in child.stdout


def test_an_unreadable_spec_is_an_error_naming_it(project: Path) -> None:
    (project / "agent-clone.yaml").chmod(0)
    child = run_unprivileged(["plan", "agent-run.yaml"], project)
    _refused(child, "Error: agent-clone.yaml: cannot read the file: Permission denied", DENIED_HINT)


def test_hidden_directories_are_still_not_read(project: Path) -> None:
    (project / ".hidden").mkdir()
    (project / ".hidden" / "agent-clone.yaml").write_text("{")
    (project / ".hidden").chmod(0)
    try:
        child = run_unprivileged(["validate", "."], project)
    finally:
        (project / ".hidden").chmod(0o755)
    assert child.returncode == 0, child.stderr


# --------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("linked", [".cocoonplan/cache", ".cocoonplan"])
@pytest.mark.parametrize("args", [["plan", "."], ["lock", "agent-clone.yaml"]])
def test_a_cache_reached_through_a_link_in_the_project_is_refused(
    project: Path, tmp_path: Path, linked: str, args: list[str]
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (project / linked).parent.mkdir(parents=True, exist_ok=True)
    (project / linked).symlink_to(victim)
    child = run_unprivileged(args, project)
    _refused(
        child,
        f"Error: cache directory .cocoonplan/cache: {linked} is a symbolic link inside the project; "
        "cocoonplan never writes its cache through a link",
        "hint: remove the link",
    )
    assert list(victim.iterdir()) == []


def test_an_absolute_cache_outside_the_project_is_the_project_files_choice(
    project: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "shared-cache"
    with (project / "cocoonplan.yaml").open("a") as out:
        out.write(f"cache: {cache}\n")
    child = run_unprivileged(["plan", ".", "--json"], project)
    assert child.returncode == 0, child.stderr
    assert any((cache / "blobs" / "sha256").iterdir())
    assert not (project / ".cocoonplan").exists()


# --------------------------------------------------------------------------- output directories


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["plan", ".", "--markdown-dir", "cocoonplan.yaml/comments"], "cannot read cocoonplan.yaml/comments"),
        (["plan", ".", "--markdown-dir", "linked"], "linked is a symbolic link, not a directory"),
        (["plan", ".", "--markdown-dir", "locked"], "cannot write into locked: Permission denied"),
        (["plan", ".", "--markdown-dir", "locked/a/b"], "cannot write into locked: Permission denied"),
        (["show", "plan.json", "--markdown-dir", "linked"], "linked is a symbolic link, not a directory"),
        (["show", "plan.json", "--markdown-dir", "locked"], "cannot write into locked: Permission denied"),
        (["render", ".", "--dir", "linked"], "linked is a symbolic link, not a directory"),
        (["render", ".", "--dir", "linked", "--check"], "linked is a symbolic link, not a directory"),
        (["render", ".", "--dir", "locked"], "cannot write into locked: Permission denied"),
        (["render", ".", "--dir", "locked/rendered"], "cannot write into locked: Permission denied"),
    ],
)
def test_a_bad_output_directory_is_refused_before_anything_is_planned_or_printed(
    project: Path, tmp_path: Path, args: list[str], error: str
) -> None:
    (tmp_path / "elsewhere").mkdir()
    (project / "linked").symlink_to(tmp_path / "elsewhere")
    (project / "locked").mkdir(mode=0o555)
    (project / "plan.json").write_text("{}")  # never read: the directory is refused first
    before = _listing(project)
    child = run_unprivileged(args, project)
    assert child.returncode == 1, child.stderr
    assert child.stdout == ""
    first, hint = child.stderr.splitlines()
    assert first.startswith(f"Error: {error}"), child.stderr
    assert hint.startswith("hint: ")
    assert _listing(project) == before
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_render_check_into_a_missing_directory_reports_every_file_missing(project: Path) -> None:
    child = run_unprivileged(["render", ".", "--dir", "absent", "--check"], project)
    assert child.returncode == 1
    assert child.stdout and all(line.startswith("missing: ") for line in child.stdout.splitlines())
    assert not (project / "absent").exists()
