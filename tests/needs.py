"""What a test needs from the machine. On a developer's machine a missing piece skips the test
and says what to install; under CI (``CI`` set), which provides everything through
scripts/test (root, Debian's tools, a kernel) and sets it, it fails the test,
so nothing is ever skipped silently where it must run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest


def unavailable(message: str) -> NoReturn:
    """Skip for a developer; fail under CI, which must provide what ``message`` names."""
    if os.environ.get("CI"):
        pytest.fail(message + ": CI must provide it (scripts/test does)")
    pytest.skip(message)


def missing_tool(tool: str, package: str) -> NoReturn:
    """``tool`` is not installed."""
    unavailable(f"{tool} not installed (apt-get install {package})")


def require_root(why: str) -> None:
    """The test does what only root may do (``why``)."""
    if os.geteuid() != 0:
        unavailable(f"needs root: {why}")


def run_unprivileged(
    args: list[str], cwd: Path, *, stdin: int | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI in a child process: a hang fails the test instead of stalling it. As root, the
    child runs without the capabilities that read or write any file, so permissions hold for
    it too. ``stdin`` is the child's standard input (a descriptor; the test's own by default)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            missing_tool("setpriv", "util-linux")  # root ignores permission bits without it
        prefix = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
    command = [*prefix, sys.executable, "-m", "cocoonplan", *args]
    return subprocess.run(
        command, cwd=cwd, stdin=stdin, capture_output=True, text=True, timeout=60, check=False
    )
