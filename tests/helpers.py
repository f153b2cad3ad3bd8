"""Helpers every test module may use; test modules never import from one another.

One of each: ``eventually`` for conditions that settle on their own, a virtual
clock for code that takes ``clock`` and ``sleep``, one reading of this
process's memory, ``sample`` for a metric value read the public way, and the
small clients and servers several modules need (``get``, ``cli``,
``hanging_server``). What starts the proxy or the emulator lives in
``tests/proxy_fixtures.py``; ``tests/test_test_suite.py`` keeps it this way.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import heapq
import inspect
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.metrics import Metrics
from tests.bench.procs import status_kib

ROOT = Path(__file__).resolve().parent.parent

#: A condition: returns a truthy value when it holds, or an awaitable of one.
Check = Callable[[], object]


async def eventually(check: Check, within: float = 10.0, every: float = 0.02) -> None:
    """Poll ``check`` (sync, or async returning an awaitable) until it is truthy.

    Fails the test after ``within`` seconds: a bound on how long the system may take to
    settle, not a claim that it is that slow. ``every`` is only the polling interval.
    """
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(every)


class FakeClock:
    """Virtual epoch seconds for code that takes a ``clock`` (and a ``sleep``).

    It starts at ``now``, or at the wall clock when not given: tokens from the
    emulator and keys in Redis carry real times, so a clock that only moves
    when told must still start near them. Tests move it with ``advance`` (or
    by setting ``now``). Its ``sleep`` waits for the clock: a driver wakes the
    earliest sleepers every real millisecond, jumping the clock to their wake
    time, so coroutines run in virtual-time order while real socket I/O gets
    real time to complete.
    """

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._driver: asyncio.Task[None] | None = None

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (self.now + seconds, self._seq, future))
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive())
        await future

    async def _drive(self) -> None:
        while self._sleepers:
            await asyncio.sleep(0.001)
            target = self._sleepers[0][0]
            self.now = max(self.now, target)
            while self._sleepers and self._sleepers[0][0] <= target:
                future = heapq.heappop(self._sleepers)[2]
                if not future.done():
                    future.set_result(None)


def rss_bytes(*, settle: bool) -> int:
    """Resident memory (VmRSS) of this process, where the proxy under test runs.

    ``settle=True`` first collects garbage and hands free heap back to the OS
    (``malloc_trim``), so earlier tests' freed memory does not inflate a baseline
    and the number is memory really held. ``settle=False`` reads it as it is, e.g.
    while an attack's connections are still open and nothing may be released first.
    """
    if settle:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status_kib(os.getpid(), "VmRSS") * 1024



async def ends_within(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True when the server ends the connection (EOF or a reset) within ``timeout``; bytes are discarded."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    """GET ``url`` and read the body to the end; returns the status."""
    async with http.get(url, **kwargs) as resp:
        await resp.read()
        return resp.status


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m proxy ARGS`` from the repository root, as a user runs it; never raises on exit codes."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=False,
    )


@dataclass
class HangingServer:
    """A TCP server that accepts and never answers (a hung issuer); counts connections."""

    url: str = ""
    connections: int = 0


@asynccontextmanager
async def hanging_server() -> AsyncIterator[HangingServer]:
    """Serve until the block ends; every connection is held open without a byte of answer."""
    hung = HangingServer()
    release = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.connections += 1
        try:
            await release.wait()
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    hung.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield hung
    finally:
        release.set()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)  # let the handlers close their side


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample of the registry, read with prometheus-client's public ``get_sample_value``.

    ``name`` is the sample's name as exposed: a counter ``ccp_x`` is read as
    ``ccp_x_total``, a gauge by its own name, a histogram as ``..._count`` or
    ``..._sum``. A labelled series that was never touched reads 0, as it would
    on a fresh child of the family; a name no family exposes fails the test, so
    a misspelt name (or a counter without ``_total``) cannot pass as a 0.
    """
    exposed = {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",))
    }
    assert name in exposed, f"no metric family exposes a sample named {name!r}"
    return metrics.registry.get_sample_value(name, labels) or 0.0


#: The sample names each family type exposes, after the family's own name.
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
