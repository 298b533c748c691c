"""Renders quote hostile text literally: no name, path or message can open a heading, link,
image or HTML in the pull-request comment, leave a code span or block, split a table row,
or reach the terminal as a control sequence.

A CommonMark parser with GitHub's tables (markdown-it-py) checks the structure; the exact
escaped text is pinned too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

from clirunner import copy_examples, run_cli, vm_entry
from cocoonplan.planner.model import Plan
from cocoonplan.render.document import plan_document, render_json
from cocoonplan.render.escape import code, fence, html, md, plain, plain_lines
from cocoonplan.render.text import render_markdown_parts

PARSER = MarkdownIt("commonmark").enable(["table", "strikethrough"])

PAYLOADS = [
    "x\n```\n# Pwned\n<img src=x onerror=alert(1)>\n[click](https://evil.example)\n```",
    "![img](https://evil.example/p.png) and [ref]: https://evil.example",
    "<details open><summary>hi</summary>",
    "`` ` `` and ````",
    "| a | b |\n|---|---|",
    "\x1b[31mred\x1b[0m\r\x85\u202egnp.exe",
    "1. item",
    "- item",
    "> quote",
    "    indented",
    "&lt;entity&gt; &#60;",
    "~~strike~~ **bold** _em_ $x^2$ \\*",
    " padded ",
    "`",
    "",
]
EVIL_FILE = "evil\n```\n# Pwned\n<img src=x onerror=alert(1)>\n[click](javascript:alert(1))\n```.yaml"
RUN_SPEC = """apiVersion: cocoonplan/v1alpha1
kind: VM
metadata:
  name: {name}
spec:
  image: ghcr.io/cocoonstack/cocoon/ubuntu:24.04-xface-20260513
  node: node-a
"""


# --------------------------------------------------------------------------- the filters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\x1b[31mred\x1b[0m\r\n", r"\x1b[31mred\x1b[0m\r\n"),
        ("tab\there\x00\x7f", r"tab\there\x00\x7f"),
        ("\x9b2J \u202eevil \u2066x\u2069 \u2028", r"\x9b2J \u202eevil \u2066x\u2069 \u2028"),
        ("naïve ✓ 日本", "naïve ✓ 日本"),
    ],
)
def test_plain_shows_control_characters_as_escapes(text: str, expected: str) -> None:
    assert plain(text) == expected
    assert plain(plain(text)) == plain(text), "escaping twice changes nothing"


def test_plain_lines_keeps_line_breaks_only() -> None:
    assert plain_lines("one\n\x1b[2Jtwo\r\n") == "one\n\\x1b[2Jtwo\\r\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a`b", "``a`b``"),
        ("`x", "`` `x ``"),
        ("x`", "`` x` ``"),
        ("a ``` b", "````a ``` b````"),
        (" a ", "`  a  `"),
        (" a", "` a`"),
        (" ", "` `"),
        ("", "` `"),
        ("a\nb", "`a\\nb`"),
    ],
)
def test_a_code_span_is_longer_than_any_run_it_holds(text: str, expected: str) -> None:
    assert code(text) == expected


def test_a_code_span_in_a_table_escapes_pipes() -> None:
    assert code("a|b`c", table=True) == "``a\\|b`c``"


@pytest.mark.parametrize(
    ("text", "info", "indent", "expected"),
    [
        ("x\n```\ny", "", 0, "````\nx\n```\ny\n````"),
        ("~~~\n`````", "diff", 0, "``````diff\n~~~\n`````\n``````"),
        ("a\n\nb\x1b", "", 2, "  ```\n  a\n\n  b\\x1b\n  ```"),
    ],
)
def test_a_fence_is_longer_than_any_run_it_holds(text: str, info: str, indent: int, expected: str) -> None:
    assert fence(text, info, indent=indent) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# h [l](u) ![i](u) <b> &amp; |x|", r"\# h \[l\](u) !\[i\](u) \<b\> \&amp; \|x\|"),
        ("*a* _b_ ~c~ $d$ `e` \\", r"\*a\* \_b\_ \~c\~ \$d\$ \`e\` \\"),
        ("https://e.example www.e.example a@e.example", r"https\://e.example www\.e.example a\@e.example"),
        ("1. x", r"1\. x"),
        ("2) x", r"2\) x"),
        ("- x", r"\- x"),
        ("+ x", r"\+ x"),
        ("===", r"\==="),
        ("36.2 KiB, version 0.1.0", "36.2 KiB, version 0.1.0"),
        ("line\n# two", r"line\\n\# two"),
    ],
)
def test_md_escapes_what_markdown_would_read(text: str, expected: str) -> None:
    assert md(text) == expected


def test_html_escapes_tags_and_entities() -> None:
    assert html('<img src="x">&amp;\n') == "&lt;img src=&quot;x&quot;&gt;&amp;amp;\\n"


# --------------------------------------------------------------------------- structure, by a parser


def _inline(source: str) -> list[Token]:
    tokens = PARSER.parse(source)
    inline = [t for t in tokens if t.type == "inline"]
    assert len(inline) == 1, [t.type for t in tokens]
    return inline[0].children or []


@pytest.mark.parametrize("payload", PAYLOADS)
def test_md_text_is_shown_as_text(payload: str) -> None:
    # Leading spaces may make an indented code block at the start of a block: still literal.
    allowed = {"paragraph", "bullet_list", "list_item", "blockquote", "inline", "code_block", "strong", "em"}
    for context in ("{}", "- {}", "> {}", "**x** {}", "_{}_"):
        tokens = PARSER.parse(context.format(md(payload)))
        flat = [*tokens, *(c for t in tokens for c in t.children or [])]
        assert {t.type.removesuffix("_open").removesuffix("_close") for t in flat} <= allowed | {"text"}
        shown = "".join(t.content for t in flat if t.type in ("text", "code_block"))
        assert plain(payload).strip() in shown


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_code_span_holds_exactly_its_content(payload: str) -> None:
    children = _inline("see " + code(payload) + " here")
    assert [c.type for c in children] == ["text", "code_inline", "text"]
    assert children[1].content == (plain(payload) or " ")


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_table_cell_holds_exactly_its_code_span(payload: str) -> None:
    source = f"| a | b |\n|---|---|\n| {code(payload, table=True)} | {md(payload)} |\n"
    cells = [t for t in PARSER.parse(source) if t.type == "inline"]
    assert len(cells) == 4, "the row still has two cells"
    assert [c.type for c in cells[2].children or []] == ["code_inline"]
    assert (cells[2].children or [])[0].content == (plain(payload) or " ")
    assert all(c.type == "text" for c in cells[3].children or [])


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_fenced_block_holds_exactly_its_content(payload: str) -> None:
    source = "- item\n\n" + fence(payload, indent=2) + "\n\nafter\n"
    tokens = PARSER.parse(source)
    assert [t.type for t in tokens if t.type.endswith("_open") or t.type == "fence"] == [
        "bullet_list_open",
        "list_item_open",
        "paragraph_open",
        "fence",
        "paragraph_open",
    ]
    (block,) = (t for t in tokens if t.type == "fence")
    assert block.content == plain_lines(payload) + "\n"


# --------------------------------------------------------------------------- end to end


def _structure(comment: str, *, first: bool = True) -> None:
    """The comment's headings, HTML and links are the templates' own, whatever it quotes."""
    tokens = PARSER.parse(comment)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    if first:
        assert headings[0].startswith(("cocoonplan plan: ", "cocoonplan refresh: "))
    later = headings[1:] if first else headings
    assert all(h.startswith(("❌", "⚠️", "Actions", "VMs", "Lock changes", "Warnings")) for h in later), (
        headings
    )
    for token in tokens:
        if token.type == "html_block":
            assert token.content.startswith(
                ("<details><summary>", "</details>", "<!-- cocoonplan-plan part=")
            ), token.content
        assert token.type != "html_inline"
        for child in token.children or []:
            assert child.type not in ("html_inline", "link_open", "image"), child


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    project = copy_examples(tmp_path_factory.mktemp("injection") / "examples")
    loaded: dict[str, Any] = json.loads(run_cli(["plan", ".", "--json"], project).stdout)
    return loaded


def _hostile(document: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(document)
    run = vm_entry(doc, "agent-run")
    run["name"] = "evil\n# Pwned <img src=x onerror=alert(1)>"
    run["action"], run["action_reason"] = "create", "create_because_absent"
    run["changes"] = [
        {
            "kind": "config",
            "path": ["config", "x`y"],
            "op": "add",
            "before": None,
            "after": "<b>\n```",
            "cause": None,
        }
    ]
    run["spec_file"] = "specs/x`y.yaml"
    run["disks"][0]["path"] = "/var/lib/cocoon/a|b`c"
    run["notes"] = ["see [link](https://evil.example)\n## heading \x1b[2J"]
    doc["lock_changes"] = [{"ref": "ghcr.io/x|y:1", "before": None, "after": "sha256:" + "a" * 64}]
    doc["errors"] = [
        {
            "summary": "registry said: \n```\n# Pwned\n![img](https://evil.example/x.png)",
            "detail": "line1\n````\n<script>alert(1)</script>\x1b[31m",
            "hint": "see [here](https://evil.example)",
            "vm": "agent-run",
            "file": "agent-run.yaml",
        }
    ]
    return doc


def _saved(tmp_path: Path, doc: dict[str, Any]) -> Path:
    plan = Plan.model_validate(doc)
    path = tmp_path / "plan.json"
    path.write_text(render_json(plan_document(plan.model_copy(update={"digest": plan.content_digest()}))))
    return path


def test_a_crafted_plan_renders_escaped_in_markdown(tmp_path: Path, document: dict[str, Any]) -> None:
    _saved(tmp_path, _hostile(document))
    shown = run_cli(["show", "plan.json", "--markdown"], tmp_path)
    assert shown.exit_code == 0, shown.stderr
    lines = shown.stdout.splitlines()
    expected = [
        r"- **agent-run** (`agent-run.yaml`): registry said: \\n\`\`\`\\n\# Pwned\\n!\[img\](https\://evil.example/x.png)",
        "  `````",
        "  line1",
        "  ````",
        "  <script>alert(1)</script>\\x1b[31m",
        "  `````",
        r"  _see \[here\](https\://evil.example)_",
        "| `ghcr.io/x\\|y:1` | _not locked_ | `sha256:" + "a" * 64 + "` |",
        "<details><summary><code>+</code> <b>evil\\n# Pwned &lt;img src=x onerror=alert(1)&gt;</b> on node-a "
        "(run) will be created: the node runs this VM as planned</summary>",
        "| spec | ``specs/x`y.yaml`` |",
        '+ config.x`y: "<b>\\n```"',
        "| 0 | `cocoon-layer0` | layer | ro | `ef556a89bd78` | ``/var/lib/cocoon/a\\|b`c`` |",
        r"> see \[link\](https\://evil.example)\\n\#\# heading \\x1b\[2J",
    ]
    for line in expected:
        assert line in lines
    assert "\x1b" not in shown.stdout
    _structure(shown.stdout)


def test_a_crafted_plan_renders_escaped_for_the_terminal(tmp_path: Path, document: dict[str, Any]) -> None:
    _saved(tmp_path, _hostile(document))
    shown = run_cli(["show", "plan.json", "-v"], tmp_path)
    assert shown.exit_code == 0, shown.stderr
    lines = shown.stdout.splitlines()
    for line in [
        r"+   evil\n# Pwned <img src=x onerror=alert(1)> on node-a (run, specs/x`y.yaml) will be created",
        r'        + config.x`y: "<b>\n```"',
        "      spec:       specs/x`y.yaml",
        r"      note:       see [link](https://evil.example)\n## heading \x1b[2J",
        r"  ✗ VM agent-run (agent-run.yaml): registry said: \n```\n# Pwned\n![img](https://evil.example/x.png)",
        "    line1",
        "    ````",
        r"    <script>alert(1)</script>\x1b[31m",
        "    hint: see [here](https://evil.example)",
    ]:
        assert line in lines
    assert "\x1b" not in shown.stdout
    assert "# Pwned" not in lines


def test_a_spec_file_name_cannot_leave_its_code_span(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "repo")
    (project / EVIL_FILE).write_text(RUN_SPEC.format(name="injected"))
    result = run_cli(["plan", ".", "--markdown"], project)
    assert result.exit_code == 0, result.stderr
    quoted = (
        r"````evil\n```\n# Pwned\n<img src=x onerror=alert(1)>\n[click](javascript:alert(1))\n```.yaml````"
    )
    assert f"| spec | {quoted} |" in result.stdout
    _structure(result.stdout)
    human = run_cli(["plan", ".", "-v"], project)
    assert human.exit_code == 0
    assert "      spec:       " + quoted.strip("`") in human.stdout.splitlines()


def test_a_layout_path_in_an_error_cannot_break_the_comment(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "repo")
    config = project / "cocoonplan.yaml"
    config.write_text(
        config.read_text().replace(
            "layout: oci", 'layout: "oci\\n```\\n# Pwned\\n<img src=x onerror=alert(1)>\\n[a](b)"'
        )
    )
    (project / "cocoonplan.lock").unlink()
    result = run_cli(["plan", ".", "--markdown"], project)
    assert result.exit_code == 1
    quoted = (
        r"/oci\\n\`\`\`\\n\# Pwned\\n\<img src=x onerror=alert(1)\>\\n\[a\](b) for ghcr.io does not exist"
    )
    assert result.stdout.count(quoted) == 2, "one error per VM, each on its own line"
    _structure(result.stdout)


def test_ansi_escapes_in_a_file_name_never_reach_the_terminal(tmp_path: Path) -> None:
    project = copy_examples(tmp_path / "repo")
    (project / "\x1b[31mred\x1b[0m.yaml").write_text(RUN_SPEC.format(name="red"))
    result = run_cli(["plan", ".", "-v"], project)
    assert result.exit_code == 0, result.stderr
    assert "      spec:       \\x1b[31mred\\x1b[0m.yaml" in result.stdout.splitlines()
    assert "\x1b" not in result.stdout
    (project / "\x1b]0;owned\x07bad.yaml").write_text(RUN_SPEC.format(name="bad") + "  cpu: true\n")
    failed = run_cli(["validate", "."], project)
    assert failed.exit_code == 1
    assert failed.stderr == (
        "Error: \\x1b]0;owned\\x07bad.yaml:8:3: spec.cpu: Input should be a valid integer\n"
        "hint: fix the value there; vmspec.schema.json lists every field and its type "
        "(`cocoonplan schemas --dir DIR` writes it)\n"
    )


def test_a_cut_comment_closes_the_fence_it_was_in(document: dict[str, Any]) -> None:
    detail = "\n".join(["```", "# not a heading", "````"] * 2000)
    doc = dict(document, errors=[{"summary": "s", "detail": detail, "hint": "", "vm": None, "file": None}])
    parts = render_markdown_parts(doc, limit=20_000)
    assert all(len(part) <= 20_000 for part in parts)
    (comment,) = (part for part in parts if "cut here" in part)
    tokens = PARSER.parse(comment)
    fences = [t for t in tokens if t.type == "fence"]
    assert len(fences) == 1
    assert fences[0].markup == "`````"
    assert "cut here" not in fences[0].content
    assert any("cut here" in t.content for t in tokens if t.type == "inline"), "the note is outside the block"
    _structure(comment, first=comment is parts[0])
