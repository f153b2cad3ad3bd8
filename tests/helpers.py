"""Helpers every test module may use; test modules never import from one another.

One of each: ``eventually`` for conditions that settle on their own, a virtual
clock for code that takes ``clock`` and ``sleep``, one reading of this
process's memory, and ``sample`` for a metric value read the public way.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import heapq
import inspect
import os
import time
from collections.abc import Callable

import pytest

from tests.bench.procs import status_kib

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
