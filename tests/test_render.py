"""Renders come from the plan document alone; the Markdown comment stays under its limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from clirunner import copy_examples, run_cli
from cocoonplan.render import render_human, render_markdown
from cocoonplan.render.changes import change_lines


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    project = copy_examples(tmp_path_factory.mktemp("render") / "examples")
    loaded: dict[str, Any] = json.loads(run_cli(["plan", ".", "--json"], project).stdout)
    return loaded


def _many(document: dict[str, Any], count: int) -> dict[str, Any]:
    clone = next(vm for vm in document["vms"] if vm["name"] == "agent-clone")
    run = next(vm for vm in document["vms"] if vm["name"] == "agent-run")
    vms = [dict(run, name=f"run-{i:03}", action="create") for i in range(count)]
    vms.append(dict(clone, name="zz-clone"))
    return dict(document, vms=vms)


def test_markdown_never_exceeds_the_limit_and_says_what_it_cut(document: dict[str, Any]) -> None:
    big = _many(document, 400)
    text = render_markdown(big)
    assert len(text) <= 60_000
    assert text.startswith("### cocoonplan:")
    assert "more VMs not shown" in text
    # Destructive changes and drift come before any create.
    assert text.index("⚠️ Drift") < text.index("zz-clone on node-a: must be replaced") < text.index("run-000")


def test_markdown_limit_is_exact(document: dict[str, Any]) -> None:
    big = _many(document, 50)
    for limit in (3_000, 10_000, 25_000):
        assert len(render_markdown(big, limit=limit)) <= limit


def test_human_render_lists_destructive_changes_first(document: dict[str, Any]) -> None:
    text = render_human(_many(document, 3))
    assert text.index('-/+ vm "zz-clone"') < text.index('+   vm "run-000"')
    assert (
        text.rstrip().splitlines()[-1].startswith("Plan: 0 to create, 1 to replace")
    )  # the summary is the document's


def test_disk_changes_collapse_into_ranges() -> None:
    def disk(serial: str, hex_: str) -> dict[str, Any]:
        return {
            "serial": serial,
            "role": "layer",
            "readonly": True,
            "path": f"/r/oci/blobs/{hex_ * 64}.erofs",
        }

    changes = [
        {"path": "disks[2]", "before": disk("cocoon-layer2", "a"), "after": disk("cocoon-layer2", "b")},
        *({"path": f"disks[{i}]", "before": None, "after": disk(f"cocoon-layer{i}", "c")} for i in (6, 7, 8)),
        {"path": "disks[10]", "before": None, "after": disk("cocoon-layer10", "d")},
        {"path": "disks[11]", "before": disk("x", "e"), "after": None},
        {"path": "config.memory.size", "before": 1, "after": 2},
    ]
    moved_cow = {
        "path": "disks[12]",
        "before": {"serial": "cocoon-cow", "role": "cow", "readonly": False, "path": "/run/A/cow.raw"},
        "after": {"serial": "cocoon-cow", "role": "cow", "readonly": False, "path": "/run/B/cow.raw"},
    }
    assert change_lines([moved_cow]) == ['~ disks[12] cocoon-cow: path "/run/A/cow.raw" → "/run/B/cow.raw"']
    assert change_lines(changes) == [
        f"~ disks[2] cocoon-layer2: {'a' * 12}…erofs → {'b' * 12}…erofs",
        "+ disks[6..8] cocoon-layer6, cocoon-layer7, cocoon-layer8",
        "+ disks[10] cocoon-layer10",
        "- disks[11] x",
        "~ config.memory.size: 1 → 2",
    ]


def test_show_needs_nothing_but_the_saved_document(tmp_path: Path) -> None:
    # A saved plan renders with no project, layout, lock or node state anywhere near it.
    project = copy_examples(tmp_path / "examples")
    out = tmp_path / "elsewhere" / "plan.json"
    out.parent.mkdir()
    planned = run_cli(["plan", ".", "--out", str(out)], project).stdout
    shutil.rmtree(project)
    shown = run_cli(["show", "plan.json"], out.parent)
    assert shown.exit_code == 0
    assert shown.stdout == planned


def test_a_huge_error_list_is_cut_too(document: dict[str, Any]) -> None:
    errors = [
        {"summary": f"error {i} " + "x" * 200, "detail": "d" * 300, "hint": "h", "vm": "v", "file": "f"}
        for i in range(400)
    ]
    text = render_markdown(dict(document, errors=errors))
    assert len(text) <= 60_000
    assert "cut here" in text
    assert text.count("```") % 2 == 0, "no code block is left open"
