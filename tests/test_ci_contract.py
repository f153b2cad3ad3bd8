"""CI runs exactly the test command a newcomer copies from README.md, and that command is self-sufficient.

A CI script that drifts from README's command can stay green while the
documented command fails on a fresh machine (a missing redis-server, say), so
the two are compared here, and the OS-package step both call is checked.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    commands = [line for block in blocks for line in block.splitlines() if "python -m pytest" in line]
    assert len(commands) == 1, f"README.md should give exactly one test command, found {commands}"
    return commands[0].strip()


def test_ci_runs_readme_test_command_verbatim() -> None:
    command = readme_test_command()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert command in ci_lines, f".ci/run does not run README's test command:\n{command}"


def test_readme_test_command_installs_the_os_packages_first() -> None:
    command = readme_test_command()
    assert command.startswith("sh tests/os-packages.sh && "), command
    script = ROOT / "tests" / "os-packages.sh"
    parsed = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)
    assert parsed.returncode == 0, parsed.stderr
    text = script.read_text(encoding="utf-8")
    for tool, package in (("redis-server", "redis-server"), ("promtool", "prometheus")):
        assert f"command -v {tool} " in text and package in text, f"{script.name} does not install {package}"
