"""The ``cocoonplan`` command line: parse arguments, call :mod:`cocoonplan.api`, render, exit.

Exit codes: 0 success (no changes), 1 error, 2 changes present (with ``--detailed-exitcode``).

Conventions: a command's product (a plan, JSON, a file list) goes to stdout; status lines,
progress and prompts go to stderr, so stdout stays parseable. ``--chdir DIR`` runs as if started
in DIR; the common flags also read ``COCOONPLAN_*`` environment variables.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cocoonplan import __version__
from cocoonplan.defaults import BOOT_TIMEOUT_SECONDS, DEFAULT_ROOT_DIR
from cocoonplan.errors import CocoonplanError
from cocoonplan.project import HypervisorBuild
from cocoonplan.proof.host import KERNEL_ROOT_VARIABLE, KvmMode

# Each command imports what it uses when it runs, so `--version`, `--help` and completion
# start without loading httpx, jinja2 and the planner.
if TYPE_CHECKING:
    from cocoonplan import api
    from cocoonplan.planner.model import Plan
    from cocoonplan.proof.verdict import Verification

app = typer.Typer(
    name="cocoonplan",
    help="Plan cocoon microVMs from YAML specs: digest-pinned layers, disks and Cloud Hypervisor config.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

Paths = Annotated[
    list[Path] | None,
    typer.Argument(
        help="Spec files or directories (searched for *.yaml/*.yml); default: the current directory."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the versioned JSON plan document.")]
AsMarkdown = Annotated[
    bool,
    typer.Option("--markdown", help="Print the Markdown pull-request comment (every part, if it splits)."),
]
MarkdownDir = Annotated[
    Path | None,
    typer.Option(
        "--markdown-dir",
        envvar="COCOONPLAN_MARKDOWN_DIR",
        help="Write the Markdown comment as DIR/plan-1.md, plan-2.md, … each under 60,000 characters.",
    ),
]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", envvar="COCOONPLAN_VERBOSE", help="Show every change and each VM's full detail."
    ),
]
NoColor = Annotated[
    bool,
    typer.Option("--no-color", help="No colour, even on a terminal (the NO_COLOR variable does the same)."),
]
ROOT_VARIABLE = "COCOONPLAN_ROOT"
_SEVERAL = " Repeatable; the environment variable takes several separated by spaces."
NodeStates = Annotated[
    list[str] | None,
    typer.Option(
        "--state",
        envvar="COCOONPLAN_STATE",
        help="[NODE=]FILE: read the node's state from an exported state document." + _SEVERAL,
    ),
]
NodeRoots = Annotated[
    list[str] | None,
    typer.Option(
        "--root", envvar=ROOT_VARIABLE, help="[NODE=]DIR: the node's cocoon root directory." + _SEVERAL
    ),
]


CHDIR_VARIABLE = "COCOONPLAN_CHDIR"
_started_in: Path | None = None
"""The directory ``--chdir`` named for this invocation (absolute), or None: the process's own."""


def _cwd() -> Path:
    """The directory the command runs as if started in; the process itself never changes directory."""
    return _started_in if _started_in is not None else Path.cwd()


def _here(path: Path) -> Path:
    """``path`` as given on the command line, relative to ``--chdir`` (absolute paths unchanged).

    Without ``--chdir`` it stays as given, so messages quote the user's own spelling."""
    return path if _started_in is None else _started_in / path


def _environment() -> api.Environment:
    from cocoonplan import api

    return api.Environment(env=dict(os.environ), cwd=_cwd())


def _status(message: str) -> None:
    """A status line: to stderr, so stdout carries only the command's product."""
    typer.echo(message, err=True)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _global_options(
    chdir: Annotated[
        Path | None,
        typer.Option(
            "--chdir",
            metavar="DIR",
            envvar=CHDIR_VARIABLE,
            help="Run as if started in DIR: paths, the project file and the lock are found from there.",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_show_version, help="Print the version and exit."),
    ] = False,
) -> None:
    global _started_in
    _started_in = None
    if chdir is not None:
        directory = Path.cwd() / chdir
        if not directory.is_dir():
            problem = "not a directory" if directory.exists() else "no such directory"
            raise _fail(CocoonplanError(f"--chdir {chdir}: {problem}"))
        _started_in = directory


def _fail(exc: CocoonplanError) -> typer.Exit:
    from cocoonplan.render.escape import plain, plain_lines

    # The summary and hint may quote file names or server messages: one visible line each.
    lines = [f"Error: {plain(exc.summary)}"]
    if exc.detail:
        lines.append(plain_lines(exc.detail))
    if exc.hint:
        lines.append(f"hint: {plain(exc.hint)}")
    typer.echo("\n".join(lines), err=True)
    return typer.Exit(1)


def _colour(no_color: bool) -> bool:
    """Colour only on a terminal, unless refused (``--no-color``, https://no-color.org)."""
    return (
        not no_color
        and not os.environ.get("NO_COLOR")
        and os.environ.get("TERM") != "dumb"
        and sys.stdout.isatty()
    )


def _human(plan: Plan, *, verbose: bool = False, no_color: bool = False) -> str:
    from cocoonplan.render.document import plan_document
    from cocoonplan.render.text import render_human

    return render_human(plan_document(plan), verbose=verbose, color=_colour(no_color))


def _print_plan(
    plan: Plan,
    as_json: bool,
    as_markdown: bool,
    *,
    verbose: bool = False,
    no_color: bool = False,
    markdown_dir: Path | None = None,
) -> None:
    from cocoonplan.comments import write_comments
    from cocoonplan.render.document import json_chunks, plan_document
    from cocoonplan.render.escape import plain
    from cocoonplan.render.text import render_human, render_markdown, render_markdown_parts

    if as_json:
        sys.stdout.writelines(json_chunks(plan))  # never the whole document in memory
        if markdown_dir is None:
            return
    document = plan_document(plan)
    if as_markdown:
        sys.stdout.write(render_markdown(document))
    elif not as_json:
        sys.stdout.write(render_human(document, verbose=verbose, color=_colour(no_color)))
    if markdown_dir is not None:
        for line in write_comments(render_markdown_parts(document), _here(markdown_dir)):
            _status(plain(line))


def _check_output_directory(directory: Path | None, *, writable: bool = True) -> None:
    """Refuse an output directory (``--markdown-dir``, ``render --dir``) that writing would
    fail on, before anything is planned or printed: a plan printed in full and then an error
    reads as if it had been written."""
    from cocoonplan.atomic import check_directory

    if directory is not None:
        try:
            check_directory(_here(directory), writable=writable)
        except CocoonplanError as exc:
            raise _fail(exc) from exc


def _exit_code(plan: Plan, detailed: bool) -> int:
    if plan.errors:
        return 1
    return 2 if detailed and plan.has_changes else 0


@app.command()
def validate(
    paths: Paths = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print a JSON array of {file, line, name, node, source}, one per VM."),
    ] = False,
) -> None:
    """Check specs and the project file offline; print one line per VM."""
    from cocoonplan.context import load_all
    from cocoonplan.render.escape import plain

    try:
        _, specs = load_all(paths or [Path()], _cwd())
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    if as_json:
        found = [
            {
                "file": item.file,
                "line": item.line,
                "name": item.spec.name,
                "node": item.spec.spec.node,
                "source": item.spec.spec.snapshot or item.spec.spec.image,
            }
            for item in specs
        ]
        sys.stdout.write(json.dumps(found, indent=2) + "\n")
        return
    for item in specs:
        body = item.spec.spec
        # File names and references come from the repository: shown, never interpreted.
        typer.echo(
            plain(
                f"ok  {item.file}:{item.line}  {item.spec.name} on {body.node}: {body.snapshot or body.image}"
            )
        )
    _status(f"{len(specs)} VM spec{'' if len(specs) == 1 else 's'} valid.")


@app.command()
def plan(
    paths: Paths = None,
    as_json: AsJson = False,
    as_markdown: AsMarkdown = False,
    markdown_dir: MarkdownDir = None,
    verbose: Verbose = False,
    no_color: NoColor = False,
    out: Annotated[Path | None, typer.Option("--out", help="Write the plan document to this file.")] = None,
    detailed_exitcode: Annotated[
        bool,
        typer.Option(
            "--detailed-exitcode",
            envvar="COCOONPLAN_DETAILED_EXITCODE",
            help="Exit 0 without changes, 1 on error, 2 with changes.",
        ),
    ] = False,
    locked: Annotated[
        bool,
        typer.Option(
            "--locked",
            envvar="COCOONPLAN_LOCKED",
            help="Fail when the lock file lacks an entry or a tag moved.",
        ),
    ] = False,
    refresh_only: Annotated[
        bool, typer.Option("--refresh-only", help="Report drift on the nodes only; propose no change.")
    ] = False,
    root: Annotated[
        list[str] | None,
        typer.Option(
            "--root",
            envvar=ROOT_VARIABLE,
            help="[NODE=]DIR: read the node's state from this cocoon root directory." + _SEVERAL,
        ),
    ] = None,
    state: NodeStates = None,
    assume_empty_node: Annotated[
        list[str] | None,
        typer.Option(
            "--assume-empty-node",
            envvar="COCOONPLAN_ASSUME_EMPTY_NODE",
            help="NODE: plan a node whose state is not given as empty (creates); without it its VMs are unknown."
            + _SEVERAL,
        ),
    ] = None,
) -> None:
    """Resolve specs and show what would change on the nodes, Terraform style."""
    from cocoonplan import api
    from cocoonplan.context import find_project
    from cocoonplan.planfile import located, write_plan

    _check_output_directory(markdown_dir)
    try:
        result = api.plan(
            paths or [Path()],
            _environment(),
            locked=locked,
            refresh_only=refresh_only,
            roots=root or [],
            states=state or [],
            assume_empty=assume_empty_node or [],
        )
        if out is not None:
            # The file says where its project is, so `apply FILE` works from any directory.
            project = find_project(paths or [Path()], _environment().cwd).directory
            result = located(result, project, _here(out))
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    try:
        _print_plan(
            result, as_json, as_markdown, verbose=verbose, no_color=no_color, markdown_dir=markdown_dir
        )
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    if out is not None and not result.errors:
        try:
            write_plan(result, _here(out))
        except CocoonplanError as exc:
            raise _fail(exc) from exc
    raise typer.Exit(_exit_code(result, detailed_exitcode))


@app.command()
def show(
    planfile: Annotated[Path, typer.Argument(help="A plan written by `cocoonplan plan --out`.")],
    as_json: AsJson = False,
    as_markdown: AsMarkdown = False,
    markdown_dir: MarkdownDir = None,
    verbose: Verbose = False,
    no_color: NoColor = False,
    steps: Annotated[
        bool, typer.Option("--steps", help="Print the ordered steps apply would carry out, and nothing else.")
    ] = False,
    target: Annotated[
        list[str] | None, typer.Option("--target", help="With --steps: only these VMs (repeatable).")
    ] = None,
) -> None:
    """Print a saved plan, or the steps that carry it out."""
    from cocoonplan.planfile import read_plan
    from cocoonplan.planner.steps import compile_steps
    from cocoonplan.render.escape import plain

    if not steps:
        _check_output_directory(markdown_dir)
    try:
        saved = read_plan(_here(planfile))
        planned = compile_steps(saved, target or []) if steps else None
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    if planned is None:
        try:
            _print_plan(
                saved, as_json, as_markdown, verbose=verbose, no_color=no_color, markdown_dir=markdown_dir
            )
        except CocoonplanError as exc:
            raise _fail(exc) from exc
    elif as_json:
        sys.stdout.write(json.dumps([step.model_dump(mode="json") for step in planned], indent=2) + "\n")
    else:
        for number, step in enumerate(planned, 1):
            where = f"{step.node}/{step.vm}" if step.vm else step.node
            what = " ".join(part for part in (step.digest or "", step.detail) if part)
            typer.echo(plain(f"{number:>3}. {step.kind:<16} {where:<24} {what}"))


@app.command()
def lock(
    paths: Paths = None,
    update: Annotated[
        bool, typer.Option("--update", help="Re-resolve every tag, taking moved tags.")
    ] = False,
) -> None:
    """Resolve every reference once and write cocoonplan.lock beside the project file."""
    from cocoonplan import api
    from cocoonplan.render.escape import plain

    try:
        result = api.lock(paths or [Path()], _environment(), update=update)
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    for change in result.changes:
        typer.echo(
            plain(
                f"{'~' if change.before else '+'} {change.ref}: {change.before or '(new)'} → {change.after}"
            )
        )
    for original in result.removed:
        typer.echo(plain(f"- {original}: no spec references it"))
    _status(f"{result.path.name} {'written' if result.written else 'unchanged'}.")


@app.command()
def render(
    directory: Annotated[Path, typer.Option("--dir", help="Directory to write <node>/<vm>/ files under.")],
    paths: Paths = None,
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 when committed files differ.")
    ] = False,
) -> None:
    """Write each VM's config.json, disks.json and launch line for a GitOps repo."""
    from cocoonplan import api
    from cocoonplan.gitops import differences, write_tree
    from cocoonplan.render.document import plan_document
    from cocoonplan.render.escape import plain
    from cocoonplan.render.text import render_human

    # --check writes nothing: a missing directory is one whose files are all missing.
    _check_output_directory(directory, writable=not check)
    try:
        rendered = api.render(paths or [Path()], _environment())
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    result, keep = rendered.plan, rendered.elsewhere
    if result.errors:
        sys.stderr.write(render_human(plan_document(result)))
        raise typer.Exit(1)
    target = _here(directory)
    try:
        changed = differences(result, target, keep) if check else write_tree(result, target, keep)
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    for line in changed:
        typer.echo(plain(line if check else _done(line)))
    if check and changed:
        chdir = [] if _started_in is None else ["--chdir", shlex.quote(str(_started_in))]
        again = " ".join(
            [
                "cocoonplan",
                *chdir,
                "render",
                *(shlex.quote(str(p)) for p in paths or []),
                "--dir",
                shlex.quote(str(directory)),
            ]
        )
        typer.echo(plain(f"{len(changed)} rendered file(s) differ; run `{again}`."), err=True)
        raise typer.Exit(1)


def _done(difference: str) -> str:
    """A ``differences`` line (``missing:``, ``changed:``, ``stale:``) as what writing did about it."""
    kind, _, path = difference.partition(":")
    return f"{'removed' if kind == 'stale' else 'wrote'}: {path.strip()}"


@app.command()
def schemas(
    directory: Annotated[Path, typer.Option("--dir", help="Where to write the *.schema.json files.")] = Path(
        "schemas"
    ),
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 when a file is stale.")
    ] = False,
) -> None:
    """Write the JSON Schemas of the spec, project, lock and plan documents (for editors and tools)."""
    from cocoonplan.atomic import check_target
    from cocoonplan.schemas import generate as generate_schemas

    generated = generate_schemas()
    directory = _here(directory)
    try:
        for name in generated:
            check_target(directory, name)  # a link in the way fails before any file is written
        stale = [name for name, text in generated.items() if _stale(directory, name, text, write=not check)]
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    for name in stale:
        typer.echo(f"{'stale' if check else 'wrote'}: {directory / name}")
    if check and stale:
        raise typer.Exit(1)


def _stale(directory: Path, name: str, text: str, *, write: bool) -> bool:
    from cocoonplan.atomic import holds, update_file

    return update_file(directory, name, text) if write else not holds(directory, name, text)


@app.command()
def apply(
    what: Annotated[
        list[Path] | None,
        typer.Argument(
            help="A plan written by `cocoonplan plan --out`, or spec files/directories to plan now."
        ),
    ] = None,
    auto_approve: Annotated[
        bool,
        typer.Option(
            "--auto-approve", envvar="COCOONPLAN_AUTO_APPROVE", help="Apply a plan made now without asking."
        ),
    ] = False,
    target: Annotated[list[str] | None, typer.Option("--target", help="Only these VMs (repeatable).")] = None,
    content_only: Annotated[
        bool,
        typer.Option(
            "--content-only", help="Fetch blobs, convert layers, record images; no VM changes, no cocoon."
        ),
    ] = False,
    lock_timeout: Annotated[
        float, typer.Option("--lock-timeout", help="Seconds to wait for another apply on a node.")
    ] = 0.0,
    root: NodeRoots = None,
) -> None:
    """Carry out exactly a saved plan (or one made now, once approved), then prove the result."""
    from cocoonplan import api
    from cocoonplan.executors.blobs import progress_reporter
    from cocoonplan.planfile import project_of, read_plan
    from cocoonplan.render.escape import plain

    environment = _environment()
    paths = what or [Path()]
    try:
        if len(paths) == 1 and _here(paths[0]).is_file() and paths[0].suffix not in (".yaml", ".yml"):
            chosen = read_plan(_here(paths[0]))
            # The project the plan file names, else the working directory's.
            project = [project_of(chosen, _here(paths[0])), Path()]
        else:
            chosen = api.plan(paths, environment, roots=root or [])
            project = paths[:1]  # the project plan found (all paths share it)
            sys.stdout.write(_human(chosen))
            if not chosen.has_changes:
                _status("Nothing to apply.")
                return
            if not auto_approve and not typer.confirm("Apply this plan?", err=True):
                raise typer.Exit(1)
        with progress_reporter(sys.stderr) as progress:
            result = api.apply(
                chosen,
                environment,
                targets=target or [],
                content_only=content_only,
                lock_wait=timedelta(seconds=lock_timeout),
                progress=progress,
                roots=root or [],
                project=project,
            )
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    for node, created in sorted(result.created.items()):
        for name, vm_id in sorted(created.items()):
            typer.echo(plain(f"{node}/{name}: created as {vm_id}"))
    for step in result.left_to_cocoon:
        _status(
            plain(
                f"{step.node}: image record {step.detail} left to cocoon (cocoonplan never writes a SQLite "
                f"node's metadata): run `cocoon image pull {step.detail}` on the node, or a full apply will"
            )
        )
    if content_only:
        _status(_installed(result))
    else:
        _status(f"Applied {len(result.steps)} step(s); the nodes run the plan.")


def _installed(result: api.ApplyResult) -> str:
    """What ``apply --content-only`` put on the nodes, step kind by kind."""
    from cocoonplan.planner.steps import StepKind

    count = {kind: sum(step.kind is kind for step in result.steps) for kind in StepKind}
    return (
        f"Content only: {count[StepKind.FETCH_BLOB]} blob(s) fetched, {count[StepKind.CONVERT_LAYER]} "
        f"layer(s) converted with their boot files, {count[StepKind.RECORD_IMAGE]} image record(s) "
        "written; no VM changed."
    )


@app.command("import")
def import_(
    address: Annotated[
        str, typer.Argument(metavar="NODE/NAME", help="The VM cocoon created: its node and name.")
    ],
    spec: Annotated[Path, typer.Argument(help="The spec file that defines the VM.")],
    auto_approve: Annotated[
        bool, typer.Option("--auto-approve", help="Import without asking after showing the differences.")
    ] = False,
    root: NodeRoots = None,
) -> None:
    """Take a VM cocoonplan did not create into its ownership, after showing how it differs from SPEC."""
    from cocoonplan import api
    from cocoonplan.planner.model import Action
    from cocoonplan.render.escape import plain

    node, _, name = address.partition("/")
    environment = _environment()
    try:
        if not node or not name or "/" in name:
            raise CocoonplanError(f"{address!r} is not NODE/NAME", hint="for example: node-a/legacy-tool")
        adoption = api.plan_import(node, name, spec, environment, root or [])
        sys.stdout.write(_human(adoption.shown()))
        vm = adoption.vm
        if vm.action is Action.REPLACE:
            _status(plain(f"Once imported, `cocoonplan apply` replaces {address}: it differs from {spec}."))
        if not auto_approve and not typer.confirm(f"Import {address} into cocoonplan's ownership?", err=True):
            _status("Nothing imported.")
            raise typer.Exit(1)
        vm_id = api.adopt(adoption, environment)
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    _status(plain(f"{address} ({vm_id}) imported: cocoonplan now plans it from {vm.spec_file}."))


@app.command("force-unlock")
def force_unlock(
    node: Annotated[str, typer.Argument(help="The node whose apply lease to remove.")],
    lease_id: Annotated[str, typer.Argument(help="The lease's id, as the refused apply printed it.")],
    root: NodeRoots = None,
) -> None:
    """Remove a node's apply lease whose holder is gone; the lease id must match."""
    from cocoonplan import api
    from cocoonplan.render.escape import plain

    try:
        api.force_unlock(node, lease_id, _environment(), root or [])
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    _status(plain(f"lease {lease_id} on {node} removed."))


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI job's timeout, ``kill``) unwinds like Ctrl-C, so that what the command
    started (QEMU) and made (temporary files) is cleaned up on the way out."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_verification(verification: Verification) -> None:
    from cocoonplan.proof.target import DiskSet
    from cocoonplan.render.escape import plain

    disk_sets = {DiskSet.PLANNED: "planned disks", DiskSet.ON_NODE: "the node's disks"}
    target = verification.target
    how = (
        f"{disk_sets[target.disk_set]} ({len(target.layers)} layers), "
        f"{verification.machine.accelerator} boot in {verification.report.seconds:.1f} s"
    )
    if verification.failure is not None:
        typer.echo(plain(f"{target.label}: FAILED: {how}: {verification.failure}"))
        tail = verification.report.tail().splitlines()
        typer.echo(f"  console (last {len(tail)} lines):" if tail else "  console: (nothing)")
        for line in tail:
            typer.echo(plain(f"  | {line}"))
        return
    typer.echo(plain(f"{target.label}: {'proven' if verification.ok else 'FAILED'}: {how}"))
    for check in verification.checks:
        typer.echo(plain(f"  {check.describe()}"))
    if not verification.checks:
        typer.echo("  the root assembled; the spec expects no paths (expect.files, expect.absent)")


@app.command()
def verify(
    paths: Paths = None,
    boot: Annotated[
        bool,
        typer.Option(
            "--boot",
            help="Cold-boot each VM's disks in a throwaway QEMU microVM and check its spec's "
            "expect.files and expect.absent in the root the guest assembles.",
        ),
    ] = False,
    as_on_node: Annotated[
        bool,
        typer.Option(
            "--as-on-node", help="Boot the disks the node's record of each VM holds, not the planned ones."
        ),
    ] = False,
    kernel_root: Annotated[
        Path | None,
        typer.Option(
            "--kernel-root",
            metavar="DIR",
            help=f"An unpacked Debian linux-image (scripts/fetch-kernel prints one) [default: ${KERNEL_ROOT_VARIABLE}].",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", metavar="SECONDS", help="The bound of each boot.")
    ] = BOOT_TIMEOUT_SECONDS,
    kvm: Annotated[
        KvmMode,
        typer.Option(
            "--kvm", help="auto: KVM where it can boot a stock kernel, else TCG; on: KVM or fail; off: TCG."
        ),
    ] = KvmMode.AUTO,
    root: NodeRoots = None,
    state: NodeStates = None,
) -> None:
    """Prove by booting each VM's disks that its root holds what its spec expects; exit 1
    naming every VM and path that fails."""
    from cocoonplan import api
    from cocoonplan.executors.blobs import progress_reporter
    from cocoonplan.render.escape import plain

    if not boot:
        raise _fail(
            CocoonplanError(
                "nothing to verify: `verify` proves by boot, give --boot",
                hint="cocoonplan verify --boot PATH...",
            )
        )
    try:
        with _terminate_as_interrupt(), progress_reporter(sys.stderr) as progress:
            results = api.verify_boot(
                paths or [Path()],
                _environment(),
                progress=progress,
                kernel_root=_here(kernel_root) if kernel_root else None,
                timeout=timeout,
                kvm=kvm,
                as_on_node=as_on_node,
                roots=root or [],
                states=state or [],
            )
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    for verification in results:
        _print_verification(verification)
    if results and results[0].machine.note:
        _status(plain(f"Booted under TCG ({results[0].machine.note})."))
    failed = [v for v in results if not v.ok]
    for verification in failed:
        why = verification.failure or "; ".join(check.describe() for check in verification.findings)
        _status(plain(f"Boot proof failed: {verification.target.label}: {why}"))
    if failed:
        raise typer.Exit(1)
    _status(f"Proven by boot: {len(results)} VM{'' if len(results) == 1 else 's'}.")


@app.command()
def version() -> None:
    """Print the cocoonplan version."""
    typer.echo(__version__)


state_app = typer.Typer(
    help="Read what a cocoon node runs and holds, for planning without access to it.",
    no_args_is_help=True,
)
app.add_typer(state_app, name="state")


@state_app.command("export")
def state_export(
    root: Annotated[Path, typer.Option("--root", help="The node's cocoon root directory, or a copy of it.")],
    root_dir: Annotated[
        str, typer.Option("--root-dir", help="The node's cocoon --root-dir: where its records say files are.")
    ] = DEFAULT_ROOT_DIR,
    run_dir: Annotated[
        str | None, typer.Option("--run-dir", help="The node's cocoon --run-dir [default: <root-dir>/run].")
    ] = None,
    cni_conf_dir: Annotated[
        Path | None,
        typer.Option(
            "--cni-conf-dir",
            help="The node's cocoon --cni-conf-dir (or a copy): records its default network.",
        ),
    ] = None,
    cocoon: Annotated[
        str | None,
        typer.Option(
            "--cocoon",
            help="The node's cocoon binary [default: cocoon on PATH]: records what `cocoon version` prints.",
        ),
    ] = None,
    cloud_hypervisor: Annotated[
        HypervisorBuild | None,
        typer.Option(
            "--cloud-hypervisor",
            help="The node's Cloud Hypervisor build, recorded for the restore-mode choice: cocoonstack's "
            "fork (`cocoon doctor --upgrade`) accepts the mmap restore, a stock release does not.",
        ),
    ] = None,
) -> None:
    """Print the node's state document (JSON) for a project's `state:`; no secrets, no local paths."""
    from cocoonplan import api
    from cocoonplan.render.escape import plain
    from cocoonplan.resolvers.node import encode_state

    try:
        state = api.export_state(
            root, _environment(), root_dir, run_dir, cni_conf_dir, cocoon, cloud_hypervisor
        )
    except CocoonplanError as exc:
        raise _fail(exc) from exc
    for line in state.recovered:
        _status(plain(f"warning: {line}"))
    sys.stdout.write(encode_state(state))


def main() -> None:
    """Console-script entry point."""
    app()
