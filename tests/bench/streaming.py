"""1 GiB through the proxy each way while sampling the proxy's RSS: memory must stay flat."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from tests.bench.procs import status_kib

_CHUNK = bytes(256 * 1024)


@dataclass(frozen=True)
class StreamResult:
    direction: str
    size: int
    moved: int
    seconds: float
    rss_before_kib: int
    rss_peak_kib: int
    rss_after_kib: int
    status: int

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.moved == self.size

    @property
    def mib_per_s(self) -> float:
        return self.moved / self.seconds / 2**20 if self.seconds else 0.0


class RssSampler:
    """Samples VmRSS of ``pids`` every 20 ms in a thread (the event loop is busy moving bytes)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return sum(status_kib(pid, "VmRSS") for pid in self.pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


async def _zeros(size: int) -> AsyncIterator[bytes]:
    left = size
    while left > 0:
        step = min(left, len(_CHUNK))
        yield _CHUNK if step == len(_CHUNK) else _CHUNK[:step]
        left -= step


async def _download(session: aiohttp.ClientSession, url: str) -> tuple[int, int]:
    moved = 0
    async with session.get(url) as resp:
        async for chunk in resp.content.iter_any():
            moved += len(chunk)
        return resp.status, moved


async def _upload(session: aiohttp.ClientSession, url: str, size: int) -> tuple[int, int]:
    headers = {"Content-Type": "application/octet-stream"}
    async with session.post(url, data=_zeros(size), headers=headers) as resp:
        body = await resp.read()
        try:
            return resp.status, int(json.loads(body)["received"])
        except (ValueError, KeyError, TypeError):
            return resp.status, 0


async def _measure(direction: str, pids: list[int], url: str, size: int) -> StreamResult:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        sampler = RssSampler(pids)
        before = sampler.rss()
        started = time.perf_counter()
        with sampler:
            if direction == "download":
                status, moved = await _download(session, f"{url}?bytes={size}")
            else:
                status, moved = await _upload(session, url, size)
        seconds = time.perf_counter() - started
    await asyncio.sleep(0.5)  # let the proxy release buffers before "after"
    return StreamResult(direction, size, moved, seconds, before, sampler.peak, sampler.rss(), status)


def stream_through(pids: list[int], download_url: str, upload_url: str, size: int) -> list[StreamResult]:
    """Download then upload ``size`` bytes through the proxy at the given URLs."""

    async def both() -> list[StreamResult]:
        return [
            await _measure("download", pids, download_url, size),
            await _measure("upload", pids, upload_url, size),
        ]

    return asyncio.run(both())
