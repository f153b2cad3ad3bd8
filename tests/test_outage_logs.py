"""A token-endpoint outage with a stale-but-valid token cached: quiet, cheap, and it recovers.

Clients must see no failure while the cached token is still valid (that was
already so). What this guards: no request starts a refresh the source would
refuse anyway (each used to count a ``local_backoff`` mint and log a
``serve_stale`` warning: 25,382 warnings in 20 s under load), ``serve_stale``
is logged once per backoff period per scope set, and once the endpoint heals
the token is refreshed. Real source against the emulator (its faults answer
503), fake clock.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from proxy.emulator.app import EmulatorServer
from proxy.metrics import Metrics
from tests.conftest import MakeEmulator
from tests.helpers import FakeClock, eventually
from tests.proxy_fixtures import StartProxy, emulator_stats, set_faults
from tests.token_layer import make_manager

DECISION = "/partner/v1/decisions/dec_demo_001"
DECISIONS = ("decisions:read",)
AUD = "partner/v1"


@pytest.fixture
async def emulator(make_emulator: MakeEmulator) -> EmulatorServer:
    """Without the 10/s limit: the fake clock packs minutes of backoff into real milliseconds, and
    the emulator's limit runs on real time (it would answer 429s the proxy never provoked)."""
    return await make_emulator(rate_limit=None)


def _serve_stale_warnings(caplog: pytest.LogCaptureFixture) -> int:
    stale = [r for r in caplog.records if getattr(r, "event", None) == "serve_stale"]
    return sum(1 for r in stale if r.levelno >= logging.WARNING)


def _mints(metrics: Metrics, result: str) -> float:
    samples = next(iter(metrics.token_mints.collect())).samples
    return sum(s.value for s in samples if s.name.endswith("_total") and s.labels["result"] == result)


async def _until(check: object, within: float = 5.0) -> None:
    """Wait (real time) for ``check()`` to hold, instead of sleeping a guessed amount."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_stale_token_in_an_outage_starts_no_refused_flights_and_warns_once_per_backoff(
    emulator: EmulatorServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    clock, metrics = FakeClock(), Metrics()
    manager = make_manager(emulator, session, clock, metrics, idle_s=7200)
    first = await manager.get(DECISIONS, AUD)
    await set_faults(session, emulator, token_status=503, token_count=100_000)
    clock.now += 3300  # past the refresh point, 300 s before expiry: stale but valid
    caplog.set_level(logging.DEBUG, logger="proxy.tokens")
    for i in range(2000):  # 100 virtual seconds of requests, the refresher ticking every second
        assert (await manager.get(DECISIONS, AUD)).same_as(first)  # no request ever fails
        if i % 20 == 0:
            await manager.refresh_due()
        clock.now += 0.05
        await asyncio.sleep(0)  # let a flight that was started make progress
    await _until(lambda: not manager._flights)
    calls = _mints(metrics, "error")  # 503s the endpoint really answered: one per backoff period
    refused = _mints(metrics, "local_backoff") + _mints(metrics, "local_throttled")
    warnings = _serve_stale_warnings(caplog)
    assert 1 <= calls <= 25, calls  # backoff 0.5 s doubling to a 60 s cap: ~10 periods in 100 s
    assert refused <= 1, refused  # was one per request
    assert 1 <= warnings <= calls, (warnings, calls)

    await set_faults(session, emulator)  # the endpoint heals
    clock.now += 61  # past the longest backoff (60 s cap)
    assert (await manager.get(DECISIONS, AUD)).same_as(first)  # still served; a refresh starts behind
    await _until(lambda: not manager.memory.peek(manager.key_for(DECISIONS, AUD)).same_as(first))
    assert not (await manager.get(DECISIONS, AUD)).same_as(first)
    assert _mints(metrics, "ok") == 2  # the first token and its refresh


async def test_serve_stale_warns_once_per_backoff_period_per_scope_set(
    emulator: EmulatorServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Two scope sets failing together warn once each; a second failing attempt inside the same
    backoff period (a flight already past the check when the backoff began) is a debug line."""
    clock, metrics = FakeClock(), Metrics()
    manager = make_manager(emulator, session, clock, metrics, idle_s=7200)
    other = ("accounts:read",)
    await manager.get(DECISIONS, AUD)
    await manager.get(other, AUD)
    await set_faults(session, emulator, token_status=503, token_count=100, token_retry_after=30)
    clock.now += 3300
    caplog.set_level(logging.DEBUG, logger="proxy.tokens")
    await manager.get(DECISIONS, AUD)
    await manager.get(other, AUD)
    await _until(lambda: not manager._flights)
    for scopes in (DECISIONS, other):
        key = manager.key_for(scopes, AUD)
        await manager._await_flight(key, None)  # a refusal inside the 30 s period, as a late flight sees
    records = [r for r in caplog.records if getattr(r, "event", None) == "serve_stale"]
    warned = sorted(r.scopes for r in records if r.levelno >= logging.WARNING)
    assert warned == ["accounts:read", "decisions:read"]
    assert sum(1 for r in records if r.levelno == logging.DEBUG) == 2
    clock.now += 31  # the period is over: the next failure may warn again
    await set_faults(session, emulator, token_status=503, token_count=100)
    await manager.get(DECISIONS, AUD)
    await _until(lambda: not manager._flights)
    assert _serve_stale_warnings(caplog) == 3


async def test_an_outage_under_load_through_the_proxy_stays_quiet_and_every_request_succeeds(
    start_proxy: StartProxy,
    emulator: EmulatorServer,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    proxy = await start_proxy(clock=clock)
    metrics = proxy.runtime.metrics
    async with http.get(proxy.proxy_url + DECISION) as resp:
        assert resp.status == 200
    await set_faults(http, emulator, token_status=503, token_count=100_000)
    clock.now += 3300
    caplog.set_level(logging.DEBUG, logger="proxy.tokens")

    async def client() -> list[int]:
        statuses = []
        for _ in range(40):
            async with http.get(proxy.proxy_url + DECISION) as resp:
                statuses.append(resp.status)
            clock.now += 0.01
        return statuses

    results = await asyncio.gather(*(client() for _ in range(10)))
    assert [s for r in results for s in r] == [200] * 400
    calls = _mints(metrics, "error")
    assert calls <= 10 and _mints(metrics, "local_backoff") <= 1, (calls, _mints(metrics, "local_backoff"))
    assert 1 <= _serve_stale_warnings(caplog) <= calls, (_serve_stale_warnings(caplog), calls)

    await set_faults(http, emulator)
    clock.now += 61  # the backoff is over: the refresher (or the next request) refreshes the token
    async with http.get(proxy.proxy_url + DECISION) as resp:
        assert resp.status == 200
    stats: dict[str, int] = {}

    async def refreshed() -> bool:
        stats.update(await emulator_stats(http, emulator))
        return stats["tokens_issued"] == 2

    await eventually(refreshed, within=5, every=0.01)
    assert stats["tokens_issued"] == 2
