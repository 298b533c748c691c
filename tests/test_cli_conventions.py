"""CLI conventions: --version, completion, --chdir, COCOONPLAN_* variables, stdout for products only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clirunner import copy_examples, run_cli
from cocoonplan import __version__


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_examples(tmp_path / "examples")


def test_version_option_and_command_print_the_version(tmp_path: Path) -> None:
    for args in (["--version"], ["version"]):
        result = run_cli(args, tmp_path)
        assert result.exit_code == 0
        assert result.stdout == f"{__version__}\n"


def test_completion_script_is_printed_for_bash(tmp_path: Path) -> None:
    # A process of its own: completion reads the program name and environment of the process.
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cocoonplan"), "--show-completion", "bash"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith(("COCOONPLAN", "_COCOONPLAN"))},
    )
    assert result.returncode == 0, result.stderr
    assert "_COCOONPLAN_COMPLETE=complete_bash" in result.stdout
    assert "--install-completion" in run_cli(["--help"], tmp_path).stdout
    assert "--install-completion" in run_cli(["--help"], tmp_path).stdout


def test_chdir_plans_as_if_started_there(project: Path) -> None:
    here = run_cli(["plan", ".", "--json"], project)
    elsewhere = run_cli(["--chdir", "examples", "plan", ".", "--json"], project.parent)
    by_variable = run_cli(["plan", "--json"], project.parent, env={"COCOONPLAN_CHDIR": str(project)})
    assert here.exit_code == elsewhere.exit_code == by_variable.exit_code == 0, elsewhere.stderr
    assert json.loads(elsewhere.stdout) == json.loads(here.stdout) == json.loads(by_variable.stdout)


def test_chdir_leaves_the_process_directory_and_resolves_outputs_there(project: Path) -> None:
    start = Path.cwd()
    result = run_cli(["--chdir", "examples", "plan", "--out", "saved.json"], project.parent)
    assert result.exit_code == 0, result.stderr
    assert (project / "saved.json").is_file() and not (project.parent / "saved.json").exists()
    assert Path.cwd() == start
    shown = run_cli(["--chdir", str(project), "show", "saved.json", "--json"], start)
    assert shown.exit_code == 0 and json.loads(shown.stdout)["vms"]


@pytest.mark.parametrize("directory", ["no-such-dir", "examples/cocoonplan.yaml"])
def test_chdir_to_no_directory_is_a_one_line_error(project: Path, directory: str) -> None:
    result = run_cli(["--chdir", directory, "plan"], project.parent)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: --chdir {directory}: ")
    assert len(result.stderr.splitlines()) == 1


def test_locked_variable_behaves_as_the_flag(project: Path) -> None:
    (project / "cocoonplan.lock").unlink()
    flag = run_cli(["plan", ".", "--locked"], project)
    variable = run_cli(["plan", "."], project, env={"COCOONPLAN_LOCKED": "1"})
    assert flag.exit_code == variable.exit_code == 1
    assert "is not in cocoonplan.lock" in variable.stdout
    assert variable.stdout == flag.stdout
    assert run_cli(["plan", "."], project, env={"COCOONPLAN_LOCKED": "0"}).exit_code == 0


def test_detailed_exitcode_variable_behaves_as_the_flag(project: Path) -> None:
    assert run_cli(["plan", "."], project).exit_code == 0
    assert run_cli(["plan", ".", "--detailed-exitcode"], project).exit_code == 2
    assert run_cli(["plan", "."], project, env={"COCOONPLAN_DETAILED_EXITCODE": "true"}).exit_code == 2


@pytest.mark.parametrize(
    ("flags", "variable", "value"),
    [
        (["--root", "node-a=elsewhere"], "COCOONPLAN_ROOT", "node-a=elsewhere"),
        (["--root", "node-a=node", "--root", "node-b=gone"], "COCOONPLAN_ROOT", "node-a=node node-b=gone"),
        (["--state", "node-a=missing.json"], "COCOONPLAN_STATE", "node-a=missing.json"),
        (["--assume-empty-node", "ghost"], "COCOONPLAN_ASSUME_EMPTY_NODE", "ghost"),
    ],
)
def test_node_variables_behave_as_the_flags(
    project: Path, flags: list[str], variable: str, value: str
) -> None:
    plain = run_cli(["plan", ".", "--json"], project)
    flag = run_cli(["plan", ".", "--json", *flags], project)
    by_variable = run_cli(["plan", ".", "--json"], project, env={variable: value})
    assert (flag.exit_code, flag.stdout, flag.stderr) != (plain.exit_code, plain.stdout, plain.stderr)
    assert (by_variable.exit_code, by_variable.stdout, by_variable.stderr) == (
        flag.exit_code,
        flag.stdout,
        flag.stderr,
    )


def test_a_flag_given_wins_over_the_variable(project: Path) -> None:
    env = {"COCOONPLAN_ROOT": "node-a=elsewhere"}
    assert run_cli(["plan", ".", "--root", "node-a=node"], project, env=env).exit_code == 0


def test_auto_approve_variable_behaves_as_the_flag(tmp_path: Path) -> None:
    from test_apply import _empty_node_project

    project = _empty_node_project(tmp_path)
    result = run_cli(["apply", "."], project, env={"COCOONPLAN_AUTO_APPROVE": "1"})
    assert result.exit_code == 0, result.output
    assert "Apply this plan?" not in result.output
    assert "Applied " in result.stderr and "Applied " not in result.stdout
    again = run_cli(["apply", "."], project, env={"COCOONPLAN_AUTO_APPROVE": "1"})
    assert again.exit_code == 0
    assert "Nothing to apply." in again.stderr and "Nothing to apply." not in again.stdout


def test_every_variable_is_documented_in_the_help(tmp_path: Path) -> None:
    wide = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}
    assert "COCOONPLAN_CHDIR" in run_cli(["--help"], tmp_path, env=wide).stdout
    plan_help = run_cli(["plan", "--help"], tmp_path, env=wide).stdout
    for variable in (
        "COCOONPLAN_LOCKED",
        "COCOONPLAN_DETAILED_EXITCODE",
        "COCOONPLAN_ROOT",
        "COCOONPLAN_STATE",
        "COCOONPLAN_ASSUME_EMPTY_NODE",
    ):
        assert variable in plan_help
    assert "COCOONPLAN_AUTO_APPROVE" in run_cli(["apply", "--help"], tmp_path, env=wide).stdout


def test_validate_json_lists_the_valid_specs(project: Path) -> None:
    result = run_cli(["validate", ".", "--json"], project)
    assert result.exit_code == 0, result.stderr
    listed = json.loads(result.stdout)
    assert sorted(item["name"] for item in listed) == ["agent-clone", "agent-run"]
    for item in listed:
        assert set(item) == {"file", "line", "name", "node", "source"}
        assert item["node"] == "node-a"
        assert isinstance(item["line"], int) and item["line"] >= 1
        assert item["file"].endswith(".yaml") and item["source"].startswith("ghcr.io/")
    clone = next(item for item in listed if item["name"] == "agent-clone")
    assert clone["file"] == "agent-clone.yaml"


def test_validate_json_error_is_one_line_on_stderr(project: Path) -> None:
    spec = project / "agent-run.yaml"
    spec.write_text(spec.read_text().replace("node: node-a", "node: node-z"))
    result = run_cli(["validate", ".", "--json"], project)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ")


def test_validate_summary_is_a_status_line(project: Path) -> None:
    result = run_cli(["validate", "."], project)
    assert result.exit_code == 0
    assert "2 VM specs valid." in result.stderr and "valid." not in result.stdout
    assert all(line.startswith("ok  ") for line in result.stdout.splitlines())


def test_render_reports_what_it_wrote_and_removed(project: Path) -> None:
    first = run_cli(["render", ".", "--dir", "out"], project)
    assert first.exit_code == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines and all(line.startswith("wrote: ") for line in lines)
    assert "wrote: node-a/agent-run/launch" in lines
    assert not any("missing" in line for line in lines)
    assert run_cli(["render", ".", "--dir", "out"], project).stdout == ""
    (project / "agent-run.yaml").unlink()
    removed = run_cli(["render", ".", "--dir", "out"], project).stdout.splitlines()
    assert removed and all(line.startswith("removed: node-a/agent-run/") for line in removed)


def test_render_check_hint_keeps_the_paths_and_chdir(project: Path) -> None:
    assert run_cli(["render", ".", "--dir", "out"], project).exit_code == 0
    (project / "agent-run.yaml").write_text(
        (project / "agent-run.yaml").read_text().replace("cpu: 2", "cpu: 4")
    )
    checked = run_cli(["render", "agent-run.yaml", "--dir", "out", "--check"], project)
    assert checked.exit_code == 1
    assert "changed: node-a/agent-run/launch" in checked.stdout.splitlines()
    assert "run `cocoonplan render agent-run.yaml --dir out`" in checked.stderr
    elsewhere = run_cli(["--chdir", "examples", "render", "--dir", "out", "--check"], project.parent)
    assert elsewhere.exit_code == 1
    assert f"run `cocoonplan --chdir {project} render --dir out`" in elsewhere.stderr


def test_stdout_carries_only_products(project: Path) -> None:
    planned = run_cli(["plan", ".", "--json"], project)
    assert json.loads(planned.stdout)["vms"]
    locked = run_cli(["lock", "."], project)
    assert locked.exit_code == 0
    assert locked.stdout == "" and locked.stderr.strip() == "cocoonplan.lock unchanged."
    schemas = run_cli(["schemas", "--dir", "schemas"], project)
    assert schemas.exit_code == 0
    assert all(line.startswith("wrote: ") for line in schemas.stdout.splitlines())
    assert any((project / "schemas").iterdir())
