"""Renders come from the plan document alone; the Markdown comment stays under its limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from clirunner import copy_examples, run_cli
from cocoonplan.model import sha256_digest
from cocoonplan.planner.model import Plan
from cocoonplan.render.changes import all_lines, disk_lines, fact_lines
from cocoonplan.render.document import json_chunks
from cocoonplan.render.text import render_human, render_markdown, render_markdown_parts


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


def test_markdown_splits_into_parts_each_under_the_limit(document: dict[str, Any]) -> None:
    big = _many(document, 400)
    parts = render_markdown_parts(big)
    assert len(parts) > 1 and all(len(part) <= 60_000 for part in parts)
    for number, part in enumerate(parts, 1):
        assert part.startswith(f"<!-- cocoonplan-plan part={number} of={len(parts)} digest=")
        assert part.count("```") % 2 == 0, "no code block is left open"
        assert part.count("<details>") == part.count("</details>"), "no section is split"
    whole = "".join(parts)
    # Nothing is cut: every VM is in some part, destructive changes and drift first.
    assert all(f"<b>run-{i:03}</b>" in whole for i in range(400))
    assert (
        whole.index("Changed outside cocoonplan")
        < whole.index("<b>zz-clone</b>")
        < whole.index("<b>run-000</b>")
    )
    assert render_markdown(big) == "\n".join(parts)


def test_markdown_limit_is_exact(document: dict[str, Any]) -> None:
    big = _many(document, 50)
    for limit in (3_000, 10_000, 25_000):
        assert all(len(part) <= limit for part in render_markdown_parts(big, limit=limit))


def test_a_thousand_vm_plan_splits_under_github_s_limit(document: dict[str, Any]) -> None:
    parts = render_markdown_parts(_many(document, 1_000))
    assert len(parts) >= 3 and max(len(part) for part in parts) < 60_000


def test_human_render_lists_destructive_changes_first(document: dict[str, Any]) -> None:
    text = render_human(_many(document, 3))
    assert text.index("-/+ zz-clone") < text.index("+   run-000")
    assert text.rstrip().splitlines()[-1].startswith("Plan: 1 to replace")  # the document's summary


def _disk(serial: str, index: int, hex_: str, role: str = "layer") -> dict[str, Any]:
    return {
        "index": index,
        "serial": serial,
        "role": role,
        "readonly": role == "layer",
        "path": f"/r/oci/blobs/{hex_ * 64}.erofs",
        "digest": f"sha256:{hex_ * 64}" if role == "layer" else None,
    }


def _typed(
    kind: str, path: list[Any], op: str, before: Any = None, after: Any = None, cause: Any = None
) -> dict[str, Any]:
    return {"kind": kind, "path": path, "op": op, "before": before, "after": after, "cause": cause}


def test_disk_changes_collapse_into_runs_and_moves() -> None:
    changes = [
        _typed(
            "disk",
            ["disks", "cocoon-layer2"],
            "update",
            _disk("cocoon-layer2", 2, "a"),
            _disk("cocoon-layer2", 2, "b"),
        ),
        *(
            _typed("disk", ["disks", f"cocoon-layer{i}"], "add", after=_disk(f"cocoon-layer{i}", i, "c"))
            for i in (6, 7, 8)
        ),
        _typed("disk", ["disks", "cocoon-layer10"], "add", after=_disk("cocoon-layer10", 10, "d")),
        _typed(
            "disk",
            ["disks", "cocoon-cow"],
            "move",
            _disk("cocoon-cow", 6, "e", "cow"),
            _disk("cocoon-cow", 11, "e", "cow"),
        ),
        _typed("disk", ["disks", "x"], "remove", before=_disk("x", 7, "f", "data")),
    ]
    assert disk_lines(changes) == [
        ("~", f"disks cocoon-layer2: {'a' * 12} → {'b' * 12}"),
        ("+", f"disks cocoon-layer6..8 at [6..8]: {' '.join(['c' * 12] * 3)}"),
        ("+", f"disks cocoon-layer10 at [10]: {'d' * 12}"),
        ("-", "disks x gone from [7]"),
        ("→", "disks cocoon-cow [6] → [11]"),
    ]


def test_a_setting_s_consequences_are_said_once_with_a_count() -> None:
    cpu = _typed("resources", ["cpu"], "update", 2, 4)
    follows = [
        _typed("launch", ["launch", "--cpus", "boot"], "update", "2", "4", ["cpu"]),
        *(
            _typed(
                "launch", ["launch", "--disk", f"cocoon-layer{i}", "num_queues"], "update", "2", "4", ["cpu"]
            )
            for i in range(7)
        ),
        _typed("launch", ["launch", "--net", "num_queues"], "update", "4", "8", ["cpu"]),
    ]
    vm = {"changes": [cpu, *follows]}
    assert fact_lines(vm) == [
        ("~", "cpu: 2 → 4", 0),
        ("~", "launch --cpus boot: 2 → 4", 1),
        ("~", "launch --disk num_queues: 2 → 4 (7)", 1),
        ("~", "launch --net num_queues: 4 → 8", 1),
    ]
    assert [(marker, depth) for marker, _, depth in all_lines(vm)] == [("~", 0)] + [("~", 1)] * 9


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


def test_a_huge_error_list_splits_too(document: dict[str, Any]) -> None:
    errors = [
        {"summary": f"error {i} " + "x" * 200, "detail": "d" * 300, "hint": "h", "vm": "v", "file": "f"}
        for i in range(400)
    ]
    parts = render_markdown_parts(dict(document, errors=errors))
    assert len(parts) > 1 and all(len(part) <= 60_000 for part in parts)
    assert all(part.count("```") % 2 == 0 for part in parts), "no code block is left open"
    assert all(f"error {i} " in "".join(parts) for i in range(400))


def test_one_block_too_large_for_a_comment_is_cut_with_its_code_block_closed(
    document: dict[str, Any],
) -> None:
    errors = [{"summary": "huge", "detail": "d\n" * 40_000, "hint": "", "vm": "v", "file": "f"}]
    parts = render_markdown_parts(dict(document, errors=errors))
    assert all(len(part) <= 60_000 for part in parts)
    assert any("cut here" in part for part in parts)
    assert all(part.count("```") % 2 == 0 for part in parts)


def test_the_json_is_written_vm_by_vm_as_one_dump_would_write_it(document: dict[str, Any]) -> None:
    many = Plan.model_validate(_many(document, 30))
    assert (
        "".join(json_chunks(many))
        == json.dumps(many.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False) + "\n"
    )
    empty = many.model_copy(update={"vms": ()})
    assert (
        "".join(json_chunks(empty))
        == json.dumps(empty.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False) + "\n"
    )
    # The digest, hashed VM by VM, is the one over the whole compact document, vms last.
    whole = many.model_dump(mode="json", by_alias=True, exclude={"digest"})
    whole["vms"] = whole.pop("vms")
    compact = json.dumps(whole, separators=(",", ":"), ensure_ascii=False)
    assert many.content_digest() == sha256_digest(compact.encode())
