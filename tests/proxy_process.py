"""The proxy as a child process: ``python -m proxy run -c FILE`` with its own config file and free ports.

For what only a real process shows: signals, exit codes, the JSON log it writes.
The emulator stays in the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import pytest
import yaml

from proxy.emulator.app import EmulatorServer
from tests.helpers import eventually, get
from tests.proxy_fixtures import base_config, merge
from tests.redis_fixtures import free_port

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


@dataclass
class ProxyProcess:
    """A running ``python -m proxy run`` child and where it listens."""

    proc: asyncio.subprocess.Process
    proxy_url: str
    admin_url: str
    port: int
    log_path: Path

    async def wait(self, within: float = 30.0) -> int:
        """The exit code, failing the test if the process outlives ``within`` seconds."""
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            pytest.fail(f"the proxy did not exit within {within}s; log:\n{self.log_path.read_text()}")

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines the process wrote (anything else is a test failure)."""
        lines = [line for line in self.log_path.read_text().splitlines() if line.strip()]
        return [json.loads(line) for line in lines]


def _open_for_writing(path: Path) -> BinaryIO:
    return path.open("wb")


@contextlib.asynccontextmanager
async def launch_proxy(
    tmp_path: Path, emulator: EmulatorServer, overrides: dict[str, Any] | None = None
) -> AsyncIterator[ProxyProcess]:
    """Write a config with free ports, start the proxy process, wait until /healthz answers."""
    port, admin_port = free_port(), free_port()
    raw = merge(base_config(emulator.url), overrides or {})
    raw |= {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    log_path = tmp_path / "proxy.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with _open_for_writing(log_path) as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "-c", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd=REPO, env=env,
        )  # fmt: skip
    process = ProxyProcess(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", port, log_path)
    try:
        await _wait_alive(process)
        yield process
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _wait_alive(process: ProxyProcess) -> None:
    async with aiohttp.ClientSession() as http:

        async def alive() -> bool:
            if process.proc.returncode is not None:
                pytest.fail(
                    f"the proxy exited with {process.proc.returncode}:\n{process.log_path.read_text()}"
                )
            with contextlib.suppress(aiohttp.ClientError):
                return await get(http, process.admin_url + "/healthz") == 200
            return False

        await eventually(alive, within=START_TIMEOUT_S)
