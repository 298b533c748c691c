"""What a reviewer reads: the compact human view, colour rules, split comments, and the
scenarios of a plan (layer count change, cpu change, drifted clone, healthy VM, refresh
only) pinned in human, Markdown and JSON."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from syrupy.assertion import SnapshotAssertion

from clirunner import copy_examples, run_cli
from snapshotext import JSONFile, TextFile

ESCAPE = "\x1b["


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_examples(tmp_path_factory.mktemp("views") / "examples", node_b=True)


def _cpu_change(tmp_path: Path) -> Path:
    project = copy_examples(tmp_path / "examples")
    spec = project / "agent-run.yaml"
    spec.write_text(spec.read_text().replace("cpu: 2", "cpu: 4"))
    return project


def test_the_examples_read_in_forty_lines_cause_first(examples: Path) -> None:
    text = run_cli(["plan", "."], examples).stdout
    lines = text.splitlines()
    assert len(lines) <= 40, text
    # Drift before the actions, and the replace says the drift is its cause.
    assert lines.index("Changed outside cocoonplan (drift):") < lines.index("Actions:")
    replace = lines.index("-/+ agent-clone on node-a (clone, agent-clone.yaml) must be replaced")
    assert "runs on layers that are not its source's (see its drift)" in lines[replace + 1]
    assert lines[replace + 2].startswith("      destroys: the running guest's memory; cow disk")
    # The cow and data disks moved; the five layers were inserted; nothing of config.json.
    assert "      → disks cocoon-cow [6] → [11], db [7] → [12]" in lines
    assert any(line.startswith("      + disks cocoon-layer6..10 at [6..10]: ") for line in lines)
    assert not any("config.disks" in line or "+ blob" in line for line in lines)
    assert "No changes: agent-run on node-a, agent-run on node-b." in lines
    assert lines[-1].startswith("Plan: 2 to replace, 2 unchanged, 2 drifted")


def test_verbose_shows_every_change_beneath_its_cause(examples: Path) -> None:
    text = run_cli(["plan", ".", "-v"], examples).stdout
    assert "        ~ disks.cocoon-layer2: path " in text
    assert "          ~ config.disks.cocoon-layer2.path: " in text
    assert '          ~ config.disks.cocoon-cow.id: "_disk6" → "_disk11"' in text


def _in_a_terminal(args: list[str], cwd: Path, **env: str) -> str:
    """The output of ``cocoonplan ARGS`` run on a pseudo-terminal."""
    main, child = pty.openpty()
    environment = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm", **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "cocoonplan", *args],
        cwd=cwd,
        stdin=child,
        stdout=child,
        stderr=child,
        env=environment,
    )
    os.close(child)
    chunks = []
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=60)
    os.close(main)
    return b"".join(chunks).decode()


def test_colour_on_a_terminal_only(examples: Path) -> None:
    coloured = _in_a_terminal(["plan", "."], examples)
    assert f"{ESCAPE}31m-/+" in coloured and f"{ESCAPE}1mPlan:" in coloured
    assert ESCAPE not in _in_a_terminal(["plan", "."], examples, NO_COLOR="1")
    assert ESCAPE not in _in_a_terminal(["plan", ".", "--no-color"], examples)
    piped = subprocess.run(
        [sys.executable, "-m", "cocoonplan", "plan", "."],
        cwd=examples,
        capture_output=True,
        text=True,
        check=True,
    )
    assert ESCAPE not in piped.stdout
    # The colours are the only difference.
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured).replace("\r\n", "\n") == piped.stdout


def test_every_render_is_built_from_the_saved_json_alone(examples: Path, tmp_path: Path) -> None:
    saved = examples / "plan.json"  # in its project: the file names no project directory
    assert run_cli(["plan", ".", "--out", str(saved)], examples).exit_code == 0
    document = json.loads(saved.read_text())
    assert document == json.loads(run_cli(["plan", ".", "--json"], examples).stdout)
    for flags in ([], ["-v"], ["--markdown"], ["--json"]):
        planned = run_cli(["plan", ".", *flags], examples).stdout
        assert run_cli(["show", str(saved), *flags], tmp_path).stdout == planned, flags


def test_markdown_dir_writes_numbered_parts_and_removes_only_its_own_stale_ones(
    examples: Path, tmp_path: Path
) -> None:
    out = tmp_path / "comments"
    out.mkdir()
    (out / "plan-2.md").write_text("<!-- cocoonplan-plan part=2 of=2 digest=old -->\nstale\n")
    (out / "plan-3.md").write_text("a note someone else wrote\n")
    result = run_cli(["plan", ".", "--markdown-dir", str(out)], examples)
    assert result.exit_code == 0, result.stderr
    assert (out / "plan-1.md").read_text() == run_cli(["plan", ".", "--markdown"], examples).stdout
    assert not (out / "plan-2.md").exists(), "a stale part of ours is removed"
    assert (out / "plan-3.md").read_text() == "a note someone else wrote\n", "what we did not write stays"
    assert f"wrote: {out / 'plan-1.md'}" in result.stderr and f"removed: {out / 'plan-2.md'}" in result.stderr


def _typed(vm: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    return [(c["kind"], ".".join(map(str, c["path"])), c["op"], c["cause"]) for c in vm["changes"]]


def test_a_cpu_change_is_one_fact_and_its_launch_consequences(
    tmp_path: Path, snapshot: SnapshotAssertion
) -> None:
    project = _cpu_change(tmp_path)
    document = json.loads(run_cli(["plan", "agent-run.yaml", "--json"], project).stdout)
    (vm,) = (v for v in document["vms"] if v["name"] == "agent-run" and v["node"] == "node-a")
    assert (vm["action"], vm["action_reason"], vm["replace_paths"]) == (
        "replace",
        "replace_because_resources_changed",
        ["cpu"],
    )
    standing = [c for c in vm["changes"] if c["cause"] is None]
    assert [(c["path"], c["before"], c["after"]) for c in standing] == [(["cpu"], 2, 4)]
    human = run_cli(["plan", "agent-run.yaml"], project).stdout
    assert "          ~ launch --cpus boot: 2 → 4" in human
    assert "          ~ launch --disk num_queues: 2 → 4 (7)" in human
    assert max(len(line) for line in human.splitlines()) < 160
    assert _typed(vm) == snapshot(extension_class=JSONFile)
    assert human == snapshot(extension_class=TextFile)
    assert run_cli(["plan", "agent-run.yaml", "--markdown"], project).stdout == snapshot(
        extension_class=TextFile
    )


def test_a_healthy_vm_is_one_line(tmp_path: Path, snapshot: SnapshotAssertion) -> None:
    project = copy_examples(tmp_path / "examples")
    human = run_cli(["plan", "agent-run.yaml"], project).stdout
    assert "No changes: agent-run on node-a." in human.splitlines()
    assert "Actions:" not in human
    assert human == snapshot(extension_class=TextFile)
    assert run_cli(["plan", "agent-run.yaml", "--markdown"], project).stdout == snapshot(
        extension_class=TextFile
    )


def test_refresh_only_reports_drift_once_and_proposes_nothing(
    examples: Path, snapshot: SnapshotAssertion
) -> None:
    human = run_cli(["plan", ".", "--refresh-only"], examples).stdout
    assert "spec: None" not in human and "Actions:" not in human
    assert human.count("refresh only") + human.count("Refresh only") == 1
    document = json.loads(run_cli(["plan", ".", "--refresh-only", "--json"], examples).stdout)
    assert not document["applyable"] and {vm["action"] for vm in document["vms"]} == {"no-op"}
    assert [(d["vm"], d["node"], d["kind"]) for d in document["drift"]] == [
        ("agent-clone", node, "layer") for node in ("node-a", "node-b") for _ in range(9)
    ]
    assert human == snapshot(extension_class=TextFile)
    assert run_cli(["plan", ".", "--refresh-only", "--markdown"], examples).stdout == snapshot(
        extension_class=TextFile
    )


def test_a_thousand_vm_project_splits_into_comments_under_github_s_limit(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "examples")
    spec = (project / "agent-run.yaml").read_text()
    fleet = project / "fleet"
    fleet.mkdir()
    for number in range(1_000):
        (fleet / f"vm-{number:04}.yaml").write_text(spec.replace("name: agent-run", f"name: vm-{number:04}"))
    out = tmp_path / "comments"
    result = run_cli(["plan", "fleet", "--markdown-dir", str(out)], project)
    assert result.exit_code == 0, result.stderr
    parts = sorted(out.iterdir(), key=lambda path: int(path.stem.removeprefix("plan-")))
    texts = [path.read_text() for path in parts]
    assert len(texts) > 1 and all(len(text) < 60_000 for text in texts)
    assert [path.name for path in parts] == [f"plan-{n}.md" for n in range(1, len(texts) + 1)]
    whole = "".join(texts)
    assert all(f"<b>vm-{number:04}</b>" in whole for number in range(1_000)), "nothing is cut"
    assert texts[0].splitlines()[1] == "### cocoonplan plan: 1000 to create"


@pytest.mark.parametrize("planted", ["plan-1.md", "plan-2.md"])
def test_markdown_dir_refuses_a_planted_link_before_writing_anything(
    examples: Path, tmp_path: Path, planted: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("<!-- cocoonplan-plan part=2 of=2 digest=old -->\nprecious\n")
    out = tmp_path / "comments"
    out.mkdir()
    (out / planted).symlink_to(victim)
    result = run_cli(["plan", ".", "--markdown-dir", str(out)], examples)
    assert result.exit_code == 1
    assert f"{out / planted} is a symbolic link, not a regular file" in result.stderr
    assert victim.read_text() == "<!-- cocoonplan-plan part=2 of=2 digest=old -->\nprecious\n"
    assert sorted(p.name for p in out.iterdir()) == [planted] and (out / planted).is_symlink()
