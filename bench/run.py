"""cocoonplan against skopeo and the hardware, side by side in one run (not part of the tests).

    .venv/bin/python bench/run.py [--quick] [--rounds 5] [--only plan,pull,verify,erofs,startup]
                                  [--write bench/RESULTS.md]

Builds its own data in a temporary directory (a loopback docker-registry with content pushed
by oras-py and skopeo, through the test suite's fixture builders) and measures, alternating
the runs it compares and reporting medians of ``--rounds`` runs each:

* plan: ``cocoonplan plan specs --json`` for N = 10, 100, 1,000 specs over 10 snapshots of
  12-layer bases, cold (no cache) and warm (cache and a complete lock), wall time, peak RSS
  and registry requests (counted by a proxy the project's registry mirror points at); and
  cold with 50 ms added to every request;
* pull: an artifact of 8 random 128 MiB blobs and one of a 1 GiB blob, placed by
  cocoonplan's blob executor (apply's path, verified) against ``skopeo copy`` into an OCI
  layout, whole processes both;
* verify: the executor placing blobs from its cache (linked, hashed) against a bare
  ``hashlib.sha256`` loop over the same files, time in process;
* erofs: a tar+gzip layer of ~200 MiB of files (4/5 text, 1/5 random: erofs-utils 1.5
  compresses random data at about 2 MB/s) converted by cocoonplan against ``tar -xzf`` then
  ``mkfs.erofs`` with cocoon's flags, and 4 layers at once against 4 bare pipelines run
  ``nproc`` at a time;
* startup: ``cocoonplan --version`` against importing its dependencies.

``--quick`` shrinks every data set and runs one round: a smoke run of the harness.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from proxy import CountingProxy  # noqa: E402

from data import (  # noqa: E402
    PlanProject,
    PulledBlob,
    mixed_layer,
    plan_project,
    pull_artifact,
    push_snapshots,
)

COCOONPLAN = [sys.executable, "-m", "cocoonplan"]
"""``python -m cocoonplan``: the package found first on PYTHONPATH (``--src``), else the installed one."""
CHILD = str(BENCH / "child.py")
MIB = 1 << 20
DEPENDENCIES = "typer, pydantic, jinja2, httpx, deepdiff, yaml"
MKFS = ["mkfs.erofs", "--quiet", "-zlz4hc", "-C4096", "-T0"]
LATENCY = 0.05
TIME = shutil.which("time", path="/usr/bin:/bin") or "/usr/bin/time"
"""GNU time (Debian package ``time``), for each command's peak RSS."""


@dataclass(frozen=True)
class Run:
    wall: float
    rss_mib: float
    stdout: str


def measure(argv: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Run:
    """Run ``argv`` to its end: wall time, peak RSS and stdout; fail on exit != 0.

    The peak RSS is GNU time's (``%M``): Linux counts in a child's ``ru_maxrss`` the pages of
    the process it was forked from, so measured straight from this (large) process every
    command would show at least this process's size."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile() as rss,
    ):
        start = time.perf_counter()
        done = subprocess.run(
            [TIME, "-f", "%M", "-o", rss.name, *argv], cwd=cwd, env=env, stdout=out, stderr=err, check=False
        )
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}\n{err.read().decode()[-4000:]}")
        peak_kib = int(Path(rss.name).read_text().split()[-1])
        return Run(wall, peak_kib / 1024, out.read().decode())


@dataclass
class Series:
    """Samples of one measure across rounds."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return statistics.median(self.values[key])


@dataclass
class Row:
    measure: str
    cocoonplan: str
    peer: str
    ratio: str
    target: str
    met: bool | None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    lines: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _rounds(count: int, *steps: Callable[[], None]) -> None:
    """Run the steps ``count`` times, rotating which goes first, so no side always runs second."""
    for round_ in range(count):
        shift = round_ % len(steps)
        for step in (*steps[shift:], *steps[:shift]):
            step()


# --------------------------------------------------------------------------- plan


def bench_plan(work: Path, rounds: int, quick: bool, report: Report) -> None:
    from registry_server import RegistryFactory

    factory = RegistryFactory(work / "registries")
    server = factory.plain()
    proxy = CountingProxy(server.host)
    try:
        bases = push_snapshots(server.host)
        counts = (10, 100) if quick else (10, 100, 1000)
        projects = {n: plan_project(work / f"plan-{n}", n, bases, proxy.host) for n in counts}
        env = dict(os.environ, DOCKER_CONFIG=str(work / "docker-config"))
        for project in projects.values():
            measure([*COCOONPLAN, "lock", "specs"], project.directory, env)
            measure([*COCOONPLAN, "plan", "specs", "--json"], project.directory, env)  # warms the cache
        series = Series()

        def run(project: PlanProject, cold: bool, delay: float, label: str) -> None:
            if cold:
                shutil.rmtree(project.cache, ignore_errors=True)
            proxy.reset(delay)
            done = measure([*COCOONPLAN, "plan", "specs", "--json"], project.directory, env)
            document = json.loads(done.stdout)
            if document["errors"] or len(document["vms"]) != project.specs:
                raise RuntimeError(f"plan of {project.specs} specs: {document['errors'][:1]}")
            series.add(f"{label} wall", done.wall)
            series.add(f"{label} rss", done.rss_mib)
            series.add(f"{label} requests", proxy.requests)

        steps: list[Callable[[], None]] = []
        for n, project in projects.items():
            steps.append(lambda p=project, n=n: run(p, True, 0.0, f"{n} cold"))
            steps.append(lambda p=project, n=n: run(p, False, 0.0, f"{n} warm"))
        steps.append(lambda: run(projects[10], True, LATENCY, "10 cold+latency"))
        _rounds(rounds, *steps)
    finally:
        proxy.close()
        factory.close()

    big = max(counts)
    for n in counts:
        for state in ("cold", "warm"):
            label = f"{n} {state}"
            report.rows.append(
                Row(
                    f"plan {n} specs, {state}: wall s / peak RSS MiB / requests",
                    f"{series.median(label + ' wall'):.2f} / {series.median(label + ' rss'):.0f} / "
                    f"{series.median(label + ' requests'):.0f}",
                    "",
                    "",
                    "",
                    None,
                )
            )
    small = counts[-2]
    marginal = (
        (series.median(f"{big} warm wall") - series.median(f"{small} warm wall")) / (big - small) * 1000
    )
    added = series.median("10 cold+latency wall") - series.median("10 cold wall")
    rss = series.median(f"{big} warm rss")
    cold_requests = series.median(f"{big} cold requests")
    warm_requests = series.median(f"{big} warm requests")
    unique = 10
    report.rows += [
        Row(
            f"plan marginal cost, warm ((T{big} - T{small}) / {big - small})",
            f"{marginal:.2f} ms/spec",
            "",
            "",
            "<= 1.5 ms",
            marginal <= 1.5,
        ),
        Row(f"plan peak RSS, {big} specs (warm)", f"{rss:.0f} MiB", "", "", "<= 150 MiB", rss <= 150),
        Row(
            f"plan requests, cold, {big} specs",
            f"{cold_requests:.0f}",
            f"{unique} snapshots",
            "",
            f"<= {5 * unique}",
            cold_requests <= 5 * unique,
        ),
        Row(
            f"plan requests, warm, {big} specs",
            f"{warm_requests:.0f}",
            f"{unique} tags",
            "",
            f"<= {unique}",
            warm_requests <= unique,
        ),
        Row(
            "plan 10 specs cold: added by 50 ms per request",
            f"{added:.2f} s ({series.median('10 cold+latency wall'):.2f} s)",
            "",
            "",
            "<= 1.0 s",
            added <= 1.0,
        ),
    ]
    report.lines["plan marginal ms per spec"] = f"{marginal:.2f}"
    report.lines[f"plan peak rss MiB ({big} specs)"] = f"{rss:.0f}"
    report.lines[f"plan requests cold ({big} specs)"] = f"{cold_requests:.0f}"
    report.lines[f"plan requests warm ({big} specs)"] = f"{warm_requests:.0f}"


# --------------------------------------------------------------------------- pull and verify


def _blob_json(blobs: list[PulledBlob]) -> str:
    return json.dumps([{"digest": b.digest, "size": b.size} for b in blobs])


def bench_pull_and_verify(work: Path, rounds: int, quick: bool, report: Report, sections: set[str]) -> None:
    from registry_server import RegistryFactory

    factory = RegistryFactory(work / "registries-pull")
    server = factory.plain()
    try:
        small, large = (8 * MIB, 64 * MIB) if quick else (128 * MIB, 1024 * MIB)
        artifacts = {
            f"8 x {small // MIB} MiB": (
                "bench/pull8",
                pull_artifact(work / "layout8", 8, small, server.host, "bench/pull8"),
            ),
        }
        if "pull" in sections:
            artifacts[f"1 x {large // MIB} MiB"] = (
                "bench/pull1",
                pull_artifact(work / "layout1", 1, large, server.host, "bench/pull1"),
            )
        if "pull" in sections:
            _bench_pull(work, rounds, server.host, artifacts, report)
        if "verify" in sections:
            _bench_verify(work, rounds, artifacts[f"8 x {small // MIB} MiB"][1], report)
    finally:
        factory.close()


def _bench_pull(
    work: Path, rounds: int, host: str, artifacts: dict[str, tuple[str, list[PulledBlob]]], report: Report
) -> None:
    series = Series()

    def ours(name: str, repository: str, blobs: list[PulledBlob]) -> Callable[[], None]:
        def step() -> None:
            dest = work / "pull-ours"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            done = measure([sys.executable, CHILD, "pull", host, repository, str(dest), _blob_json(blobs)])
            series.add(f"{name} ours wall", done.wall)
            series.add(f"{name} ours rss", done.rss_mib)
            shutil.rmtree(dest)

        return step

    def skopeo(name: str, repository: str) -> Callable[[], None]:
        def step() -> None:
            dest = work / "pull-skopeo"
            shutil.rmtree(dest, ignore_errors=True)
            argv = [
                "skopeo",
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                f"docker://{host}/{repository}:v1",
                f"oci:{dest}:v1",
            ]
            done = measure(argv)
            series.add(f"{name} skopeo wall", done.wall)
            series.add(f"{name} skopeo rss", done.rss_mib)
            shutil.rmtree(dest)

        return step

    steps = []
    for name, (repository, blobs) in artifacts.items():
        steps += [ours(name, repository, blobs), skopeo(name, repository)]
    _rounds(rounds, *steps)
    ratios = []
    for name, (_, blobs) in artifacts.items():
        total = sum(b.size for b in blobs) / MIB
        mine, theirs = series.median(f"{name} ours wall"), series.median(f"{name} skopeo wall")
        ratio = theirs / mine
        ratios.append(ratio)
        report.rows.append(
            Row(
                f"pull {name}: MiB/s, peak RSS",
                f"{total / mine:.0f} MiB/s, {series.median(f'{name} ours rss'):.0f} MiB",
                f"{total / theirs:.0f} MiB/s, {series.median(f'{name} skopeo rss'):.0f} MiB",
                f"{ratio:.2f}",
                ">= 1.00",
                ratio >= 1.0,
            )
        )
    large = list(artifacts)[-1]
    rss = series.median(f"{large} ours rss")
    report.rows.append(Row(f"pull peak RSS, {large}", f"{rss:.0f} MiB", "", "", "< 100 MiB", rss < 100))
    report.lines["pull throughput ratio (cocoonplan/skopeo)"] = f"{min(ratios):.2f}"
    report.lines["pull peak rss MiB (1 GiB blob)"] = f"{rss:.0f}"


def _bench_verify(work: Path, rounds: int, blobs: list[PulledBlob], report: Report) -> None:
    cache = work / "verify-cache"
    entries = cache / "blobs" / "sha256"
    entries.mkdir(parents=True, exist_ok=True)
    for blob in blobs:
        target = entries / blob.digest.removeprefix("sha256:")
        if not target.exists():
            os.link(blob.path, target)
    files = [str(entries / b.digest.removeprefix("sha256:")) for b in blobs]
    series = Series()

    def ours() -> None:
        dest = work / "verify-dest"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        done = measure([sys.executable, CHILD, "verify", str(cache), str(dest), _blob_json(blobs)])
        series.add("ours", json.loads(done.stdout)["seconds"])
        shutil.rmtree(dest)

    def bare() -> None:
        done = measure([sys.executable, CHILD, "hashlib", *files])
        series.add("hashlib", json.loads(done.stdout)["seconds"])

    _rounds(rounds, ours, bare)
    total = sum(b.size for b in blobs) / MIB
    mine, theirs = series.median("ours"), series.median("hashlib")
    ratio = theirs / mine
    report.rows.append(
        Row(
            f"verify {len(blobs)} blobs on disk ({total:.0f} MiB): MiB/s",
            f"{total / mine:.0f} MiB/s",
            f"{total / theirs:.0f} MiB/s (hashlib loop)",
            f"{ratio:.2f}",
            ">= 0.90",
            ratio >= 0.9,
        )
    )
    report.lines["verify throughput ratio (cocoonplan/hashlib)"] = f"{ratio:.2f}"


# --------------------------------------------------------------------------- erofs


def _bare_pipeline(layer: Path, digest: str, scratch: Path) -> str:
    hex_ = digest.removeprefix("sha256:")
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, hex_))
    tree = scratch / f"tree-{hex_[:12]}"
    return (
        f"mkdir -p {tree} && tar -xzf {layer} -C {tree} && "
        f"{' '.join(MKFS)} -U {fs_uuid} {scratch / (hex_ + '.erofs')} {tree}"
    )


def bench_erofs(work: Path, rounds: int, quick: bool, report: Report) -> None:
    scale = 1 / 16 if quick else 1.0
    big = work / "layer-big.tar.gz"
    big_digest = mixed_layer(big, int(160 * MIB * scale), int(40 * MIB * scale), seed=1)
    several = []
    for i in range(4):
        path = work / f"layer-{i}.tar.gz"
        several.append((path, mixed_layer(path, int(40 * MIB * scale), int(10 * MIB * scale), seed=10 + i)))
    cores = os.cpu_count() or 1
    series = Series()

    def ours(label: str, layers: list[tuple[Path, str]]) -> Callable[[], None]:
        def step() -> None:
            root = work / "erofs-root"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            items = [json.dumps({"digest": d, "path": str(p)}) for p, d in layers]
            done = measure([sys.executable, CHILD, "convert", str(root), *items])
            series.add(f"{label} ours", done.wall)
            shutil.rmtree(root)

        return step

    def bare(label: str, layers: list[tuple[Path, str]]) -> Callable[[], None]:
        def step() -> None:
            scratch = work / "erofs-bare"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            commands = "\n".join(_bare_pipeline(p, d, scratch) for p, d in layers)
            script = scratch / "pipelines"
            script.write_text(commands + "\n")
            done = measure(["bash", "-c", f"xargs -P {cores} -I{{}} -d '\\n' bash -c '{{}}' < {script}"])
            series.add(f"{label} bare", done.wall)
            shutil.rmtree(scratch)

        return step

    with tarfile.open(big) as archive:
        size = sum(member.size for member in archive) / MIB
    _rounds(
        rounds,
        ours("one", [(big, big_digest)]),
        bare("one", [(big, big_digest)]),
        ours("four", several),
        bare("four", several),
    )
    one = series.median("one ours") / series.median("one bare")
    four = series.median("four ours") / series.median("four bare")
    report.rows += [
        Row(
            f"erofs: one layer of {size:.0f} MiB of files ({big.stat().st_size / MIB:.0f} MiB tar+gzip), s",
            f"{series.median('one ours'):.2f}",
            f"{series.median('one bare'):.2f} (tar -xzf; mkfs.erofs)",
            f"{one:.2f}",
            "<= 1.10",
            one <= 1.10,
        ),
        Row(
            f"erofs: 4 layers at once on {cores} cores, s",
            f"{series.median('four ours'):.2f}",
            f"{series.median('four bare'):.2f} (4 pipelines, {cores} at a time)",
            f"{four:.2f}",
            "<= 1.10",
            four <= 1.10,
        ),
    ]
    report.lines["erofs overhead ratio (cocoonplan/bare)"] = f"{max(one, four):.2f}"


# --------------------------------------------------------------------------- startup


def bench_startup(rounds: int, report: Report) -> None:
    series = Series()

    def ours() -> None:
        series.add("ours", measure([*COCOONPLAN, "--version"]).wall)

    def imports() -> None:
        series.add("imports", measure([sys.executable, "-c", f"import {DEPENDENCIES}"]).wall)

    _rounds(max(rounds, 5) * 2, ours, imports)
    mine, theirs = series.median("ours"), series.median("imports")
    ratio = mine / theirs
    report.rows.append(
        Row(
            "startup: `cocoonplan --version`, s",
            f"{mine:.3f}",
            f"{theirs:.3f} (import {DEPENDENCIES})",
            f"{ratio:.2f}",
            "<= 1.30",
            ratio <= 1.3,
        )
    )
    report.lines["startup ratio (cocoonplan/imports)"] = f"{ratio:.2f}"


# --------------------------------------------------------------------------- report


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError:
        return "not installed"
    return (done.stdout or done.stderr).strip().splitlines()[0]


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = next(
        line.split()[1]
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {int(memory) // 1024} MiB RAM, "
        f"Linux {platform.release()}; Python {platform.python_version()}; "
        f"{_version(['skopeo', '--version'])}; {_version(['docker-registry', '--version'])}; "
        f"mkfs.erofs {_version(['mkfs.erofs', '--version'])}"
    )


def render(report: Report, argv: list[str], started: datetime, seconds: float) -> str:
    def mark(met: bool | None) -> str:
        return "" if met is None else ("met" if met else "**missed**")

    table = ["| measure | cocoonplan | peer | ratio | target | |", "|---|---|---|---|---|---|"]
    table += [
        f"| {r.measure} | {r.cocoonplan} | {r.peer} | {r.ratio} | {r.target} | {mark(r.met)} |"
        for r in report.rows
    ]
    lines = [f"{key}: {value}" for key, value in report.lines.items()]
    return "\n".join(
        [
            f"Run {started:%Y-%m-%d %H:%M} UTC, {seconds / 60:.0f} min: `{' '.join(argv)}`",
            "",
            f"Machine: {machine()}",
            "",
            *table,
            "",
            "```",
            *lines,
            "```",
            *(["", *report.notes] if report.notes else []),
            "",
        ]
    )


SECTIONS = ("plan", "pull", "verify", "erofs", "startup")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small data, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each measure (median taken)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--write", type=Path, help="also write the report (Markdown) to this file")
    parser.add_argument("--keep", type=Path, help="build the data under this directory and keep it")
    parser.add_argument(
        "--src",
        type=Path,
        help="measure the cocoonplan package of this src directory (e.g. an unpacked commit)",
    )
    args = parser.parse_args()
    sections = set(args.only.split(","))
    if unknown := sections - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    rounds = 1 if args.quick else args.rounds
    if args.src:
        os.environ["PYTHONPATH"] = str(args.src.resolve())
    started, clock = datetime.now(UTC), time.perf_counter()
    report = Report()
    with tempfile.TemporaryDirectory(prefix="cocoonplan-bench-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if "plan" in sections:
            bench_plan(work, rounds, args.quick, report)
        if sections & {"pull", "verify"}:
            bench_pull_and_verify(work, rounds, args.quick, report, sections)
        if "erofs" in sections:
            bench_erofs(work, rounds, args.quick, report)
        if "startup" in sections:
            bench_startup(rounds, report)
    text = render(report, ["bench/run.py", *sys.argv[1:]], started, time.perf_counter() - clock)
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
