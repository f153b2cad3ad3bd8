"""The static checks, run as tests: CI runs only README's test command (``python -m pytest``).

* ``mypy --strict`` over the whole ``proxy`` package (``[tool.mypy]`` in
  pyproject.toml says the same, for a bare ``mypy``). It is what checks the
  typed seams, e.g. that ``RedisTokenCache`` implements ``SharedTokenCache``.
* ``ruff check`` over the repository, with the project's configuration.

Each first shows on a canary that it really reports something, so a tool that
checks nothing (a wrong config, a silenced rule set) cannot pass for clean.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNTYPED = "def untyped(x):\n    return x\n"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m <tool> ...`` from the repository root (the tools read pyproject.toml there)."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=100, check=False
    )


def test_mypy_strict_reports_nothing_in_the_package(tmp_path: Path) -> None:
    canary = tmp_path / "canary.py"
    canary.write_text(UNTYPED)
    probe = run("mypy", "--strict", str(canary))
    assert probe.returncode == 1 and "[no-untyped-def]" in probe.stdout, (
        "mypy does not check: " + probe.stdout + probe.stderr
    )

    out = run("mypy", "--strict", "proxy")
    assert out.returncode == 0, f"mypy --strict proxy:\n{out.stdout}{out.stderr}"


def test_ruff_reports_nothing(tmp_path: Path) -> None:
    config = str(ROOT / "pyproject.toml")
    canary = tmp_path / "canary.py"
    canary.write_text("import os\n")
    probe = run("ruff", "check", "--no-cache", "--config", config, str(canary))
    assert probe.returncode == 1 and "F401" in probe.stdout, (
        "ruff does not lint: " + probe.stdout + probe.stderr
    )

    out = run("ruff", "check", "--no-cache", "--config", config, ".")
    assert out.returncode == 0, f"ruff check:\n{out.stdout}{out.stderr}"
