"""The listeners' connection bounds in a real ``credicorp-proxy run`` process, at its descriptor limit.

The descriptor limit is a process attribute, so these run the proxy as a
child process (as deployed) and set its ``RLIMIT_NOFILE``: at start (the
caps must fit below it) or while it runs (``prlimit``, to exhaust its
descriptors the way a leak or a flood from elsewhere would). Before these
bounds, 15,000 idle connections took every descriptor: ``/healthz`` timed out
and asyncio logged ``socket.accept() out of system resource`` with a
traceback on every retry (hundreds of lines a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.emulator.app import EmulatorServer
from tests.helpers import ends_within, eventually
from tests.proxy_fixtures import base_config, merge, open_connection
from tests.redis_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
DECISION = "/partner/v1/decisions/dec_demo_001"
#: ``credicorp-proxy run`` on asyncio's own loop, as it runs without the ``speed`` extra (no uvloop).
WITHOUT_UVLOOP = (
    "import sys; sys.modules['uvloop'] = None; from proxy.cli import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass
class Child:
    proc: asyncio.subprocess.Process
    proxy_url: str
    admin_url: str
    log_path: Path

    def logs(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def events(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.logs():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    found.append(record)
        return found


async def healthy(url: str) -> bool:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status == 200
    return False


@contextlib.asynccontextmanager
async def run_proxy(
    tmp_path: Path,
    emulator: EmulatorServer,
    overrides: dict[str, Any],
    *,
    python_args: Sequence[str] = ("-m", "proxy"),
    nofile: int | None = None,
) -> AsyncIterator[Child]:
    port, admin_port = free_port(), free_port()
    raw = merge(base_config(emulator.url), overrides)
    raw |= {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    log_path = tmp_path / "proxy.log"

    def limit_descriptors() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *python_args, "run", "-c", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=limit_descriptors,
        )  # fmt: skip
    child = Child(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", log_path)
    try:

        async def started() -> bool:
            if proc.returncode is not None:
                pytest.fail(f"the proxy exited with {proc.returncode}:\n{log_path.read_text()}")
            return await healthy(child.admin_url)

        await eventually(started, within=START_TIMEOUT_S)
        yield child
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()




async def test_connection_caps_fit_below_the_descriptor_limit_and_probes_keep_answering(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    """``run`` (uvloop) with RLIMIT_NOFILE 256 and the default cap of 1024: the cap is lowered to fit,
    300 idle connections never exhaust the descriptors, and /healthz answers throughout."""
    overrides = {
        "upstream": {"pool_size": 8},
        "limits": {"admin_max_connections": 4, "header_timeout_s": 30},
    }
    async with run_proxy(tmp_path, emulator, overrides, nofile=256) as child:
        connections = [await open_connection(child.proxy_url) for _ in range(300)]
        try:
            outcomes = await asyncio.gather(*(ends_within(reader, 2.0) for reader, _ in connections))
            assert await healthy(child.admin_url), "/healthz did not answer with the proxy listener full"
        finally:
            for _, writer in connections:
                writer.close()
        [caps] = child.events("connection_caps")
        cap = caps["proxy_max_connections"]
        assert outcomes.count(False) == cap, f"{outcomes.count(False)} connections served, cap {cap}"
        assert caps["nofile_soft"] == 256 and 0 < cap <= 256 - caps["reserved"], caps
        assert caps["level"] == "warning", caps  # lowered from the configured 1024, and said so

        async def room_again() -> bool:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                async with http.get(child.proxy_url + DECISION) as resp:
                    return resp.status == 200

        await eventually(room_again)


async def test_a_turned_away_connection_reads_a_503_under_uvloop(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    """The over-cap answer on uvloop's transports (which ``run`` uses): a raw 503, then the close."""
    async with run_proxy(tmp_path, emulator, {"limits": {"listen_max_connections": 2}}) as child:
        idle = [await open_connection(child.proxy_url) for _ in range(2)]
        try:
            reader, writer = await open_connection(child.proxy_url)
            writer.write(f"GET {DECISION} HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        finally:
            for _, idle_writer in idle:
                idle_writer.close()
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 503 Service Unavailable", answer
        assert b"X-Credicorp-Proxy-Error: too_many_connections\r\n" in rest and b"Connection: close" in rest
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"] == "too_many_connections"


async def test_accept_errors_are_logged_once_per_interval_not_per_retry(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    """asyncio's loop at the descriptor limit: one ``accept_failed`` line (with a count) per 10 s."""
    async with run_proxy(tmp_path, emulator, {}, python_args=("-c", WITHOUT_UVLOOP)) as child:
        pid = child.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use, hard))  # not one descriptor left
        waiting = [await open_connection(child.proxy_url) for _ in range(20)]
        try:
            await asyncio.sleep(2.5)  # a window of retries: asyncio retries at once, and every second
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            await eventually(lambda: healthy(child.admin_url))  # and it recovers
        finally:
            for _, writer in waiting:
                writer.close()
        logs = child.logs()
        flood = [ln for ln in logs if "out of system resource" in ln]
        assert not flood, f"asyncio logged {len(flood)} accept failures itself"
        assert not [ln for ln in logs if "Traceback" in ln]
        [line] = child.events("accept_failed")
        assert line["failures"] == 1 and line["error"] == "EMFILE", line
