"""Running a wire-test module under both of aiohttp's HTTP parsers.

aiohttp picks its parser at import time (``AIOHTTP_NO_EXTENSIONS=1`` means the
pure-Python one), so it cannot be switched in-process. A module runs its cases
here under the C parser, then re-runs itself in a subprocess under the
pure-Python parser; each run first checks it really has the parser it expects,
so a silent fallback can never test one parser twice.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import http_parser

ROOT = Path(__file__).resolve().parent.parent
RERUN_TEST = "also_pass_under_the_pure_python_parser"  # the outer-run test's name must contain this


def parser_kind() -> str:
    """'c' for aiohttp's llhttp-based extension, 'python' for the pure-Python parser."""
    return "c" if http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser" else "python"


def check_expected_parser(inner_env: str) -> None:
    """Fail unless this run uses the parser the outer run (or the environment) asked for."""
    expected = os.environ.get(inner_env) or ("python" if os.environ.get("AIOHTTP_NO_EXTENSIONS") else "c")
    if expected == "c" and parser_kind() != "c":
        pytest.skip("aiohttp's C extension is not available on this platform")
    assert parser_kind() == expected


def rerun_under_pure_python(module_file: str, inner_env: str, allowed: tuple[str, ...] = ("passed",)) -> None:
    """Run ``module_file``'s tests again in a subprocess on the pure-Python parser.

    ``allowed`` are the outcome words the inner summary may contain (besides
    the deselected outer test); at least one test must have passed.
    """
    env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1", inner_env: "python"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(module_file).resolve()), "-q", "-p", "no:cacheprovider",
         "-k", f"not {RERUN_TEST}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}
    assert counts.get("passed", 0) > 0, summary
    unexpected = {w: n for w, n in counts.items() if w not in (*allowed, "deselected")}
    assert not unexpected, summary
