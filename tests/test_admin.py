"""The admin listener: /healthz, /readyz transitions for every reason, read-only, not on the proxy port."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.admin import endpoint_failing
from proxy.app import ProxyServer
from proxy.emulator.app import EmulatorServer
from tests.helpers import eventually, get
from tests.proxy_fixtures import TEST_ROUTES, StartProxy, emulator_stats, scrape, set_faults
from tests.secret_volume import SecretVolume, secret_file_config

DECISION = "/partner/v1/decisions/dec_demo_001"
ACCOUNT = "/partner/v1/accounts/acc_demo_001"
ALL_SETS = ["accounts:read", "applications:read", "applications:write", "decisions:read"]


async def readyz(http: aiohttp.ClientSession, proxy: ProxyServer) -> tuple[int, dict[str, Any]]:
    async with http.get(proxy.admin_url + "/readyz") as resp:
        assert resp.headers["Cache-Control"] == "no-store"
        return resp.status, await resp.json()


async def wait_readyz(
    http: aiohttp.ClientSession,
    proxy: ProxyServer,
    status: int,
    reason: str | None = None,
    within: float = 20.0,
) -> dict[str, Any]:
    """Poll /readyz until it answers ``status`` (and ``reason``); returns that body."""
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        code, body = await readyz(http, proxy)
        seen.update(body, _status=code)
        return code == status and (reason is None or body.get("reason") == reason)

    await eventually(reached, within=within)
    seen.pop("_status")
    return seen


async def healthz(http: aiohttp.ClientSession, proxy: ProxyServer) -> int:
    async with http.get(proxy.admin_url + "/healthz") as resp:
        assert await resp.json() == {"alive": True}
        return resp.status


def marked_prefetch(*names: str) -> dict[str, Any]:
    routes = copy.deepcopy(TEST_ROUTES)
    for route in routes:
        route["prefetch"] = route["name"] in names
    return {"refresh": {"prefetch": "marked"}, "routes": routes}


# ------------------------------------------------------------- surface


async def test_ready_with_a_working_token_endpoint_and_warm_after_prefetch(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy({"refresh": {"prefetch": "all"}})
    assert await healthz(http, proxy) == 200
    assert await wait_readyz(http, proxy, 200) in ({"ready": True}, {"ready": True, "warming": ALL_SETS})

    async def warm() -> bool:
        return await readyz(http, proxy) == (200, {"ready": True})

    await eventually(warm)
    assert sorted((await emulator_stats(http, emulator))["tokens_by_scope"]) == ALL_SETS


async def test_the_proxy_listener_does_not_serve_admin_paths(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    for path in ("/metrics", "/healthz", "/readyz", "/metrics?x=1"):
        async with http.get(proxy.proxy_url + path) as resp:
            assert resp.status == 403, path
            assert resp.headers["X-Credicorp-Proxy-Error"] == "route_not_allowed"
            assert (await resp.json())["error"] == "route_not_allowed"
    stats = await emulator_stats(http, emulator)
    assert stats["token_requests"] == 0 and stats["api_requests"] == 0


async def test_the_admin_listener_is_read_only(start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    for path in ("/metrics", "/healthz", "/readyz"):
        async with http.head(proxy.admin_url + path) as resp:
            assert resp.status == 200
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            async with http.request(method, proxy.admin_url + path) as resp:
                assert resp.status == 405, (method, path)
    for path in ("/flush", "/partner/v1/decisions/dec_demo_001", "/"):
        assert await get(http, proxy.admin_url + path) == 404


# ------------------------------------------------------------ reasons


async def test_credentials_rejected_until_the_secret_file_changes(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    volume = SecretVolume.create(tmp_path / "credicorp", "wrong-secret")
    proxy = await start_proxy(secret_file_config(volume, refresh={"prefetch": "all"}))
    body = await wait_readyz(http, proxy, 503, "credentials_rejected")
    assert body["ready"] is False and "invalid_client" in body["detail"]
    assert await healthz(http, proxy) == 200
    assert (await scrape(http, proxy)).value("ccp_ready") == 0

    volume.swap("demo-secret")  # picked up by the watcher, no restart
    await wait_readyz(http, proxy, 200)
    assert await get(http, proxy.proxy_url + DECISION) == 200
    m = await scrape(http, proxy)
    assert m.value("ccp_credentials_rejected") == 0 and m.value("ccp_ready") == 1


async def test_a_new_secret_makes_the_proxy_ready_before_its_first_successful_mint(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """invalid_client says nothing about the endpoint being down: once a new secret lifts the
    latch the proxy is ready again, without waiting for some mint to succeed first."""
    volume = SecretVolume.create(tmp_path / "credicorp", "wrong-secret")
    proxy = await start_proxy(secret_file_config(volume))
    assert await get(http, proxy.proxy_url + DECISION) == 503
    assert (await readyz(http, proxy))[1]["reason"] == "credentials_rejected"
    volume.swap("demo-secret")
    proxy.runtime.reload_credentials()  # SIGHUP; nothing has minted with the new secret yet
    assert await readyz(http, proxy) == (200, {"ready": True})


async def test_token_endpoint_unavailable_at_start_then_ready_after_recovery(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    await set_faults(http, emulator, token_status=503, token_count=1_000_000)
    proxy = await start_proxy({"refresh": {"prefetch": "all"}})
    body = await wait_readyz(http, proxy, 503, "token_endpoint_unavailable")
    assert body["missing"] == ALL_SETS and body["detail"] == "temporarily_unavailable"
    assert await healthz(http, proxy) == 200
    await set_faults(http, emulator)  # the endpoint recovers; the refresher retries after its backoff
    await wait_readyz(http, proxy, 200)
    assert await get(http, proxy.proxy_url + DECISION) == 200


async def test_not_ready_stays_not_ready_between_backoff_windows_once_cached_tokens_expire(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    """The endpoint worked, went down, and the cached tokens ran out: 503 until it recovers.

    Judging only by the backoff window (a past success looks like a working
    endpoint whenever no backoff is running) made /readyz flap between windows.
    """
    async with http.post(emulator.url + "/_emulator/settings", json={"token_ttl": 4}) as resp:
        assert resp.status == 200
    proxy = await start_proxy({"refresh": {"prefetch": "all"}})

    async def warm() -> bool:  # every prefetch done: no mint still on the wire to succeed late
        return await readyz(http, proxy) == (200, {"ready": True})

    await eventually(warm)
    await set_faults(http, emulator, token_status=503, token_count=1_000_000)
    await wait_readyz(http, proxy, 503, "token_endpoint_unavailable")
    for _ in range(30):  # ~3 s of probes spanning several backoff windows and refresher ticks
        status, body = await readyz(http, proxy)
        assert (status, body.get("reason")) == (503, "token_endpoint_unavailable"), body
        await asyncio.sleep(0.1)
    await set_faults(http, emulator)
    health = proxy.runtime.source.health()
    backoff_left = max(0.0, (health.backing_off_until or 0.0) - proxy.runtime.clock())
    await wait_readyz(http, proxy, 200, within=backoff_left + 20)  # the next retry after the backoff


async def test_ready_while_the_endpoint_is_down_if_every_prefetched_set_has_a_valid_token(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy(marked_prefetch("decisions.read"))

    async def warm() -> bool:
        return await readyz(http, proxy) == (200, {"ready": True})

    await eventually(warm)
    await set_faults(http, emulator, token_status=503, token_count=1_000_000)
    async with http.get(proxy.proxy_url + ACCOUNT) as resp:  # not prefetched: needs a mint, fails
        assert resp.status == 503
        assert resp.headers["X-Credicorp-Proxy-Error"] == "token_unavailable"
    assert endpoint_failing(proxy.runtime.source.health(), proxy.runtime.clock())
    assert await readyz(http, proxy) == (200, {"ready": True})
    assert await get(http, proxy.proxy_url + DECISION) == 200  # served from the cached token


async def test_without_prefetch_ready_while_cached_tokens_last_then_not_ready(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    """Nothing prefetched: an endpoint outage is survivable while the scope sets in use are cached."""
    async with http.post(emulator.url + "/_emulator/settings", json={"token_ttl": 4}) as resp:
        assert resp.status == 200
    proxy = await start_proxy({"refresh": {"prefetch": "none"}})
    assert await get(http, proxy.proxy_url + DECISION) == 200  # decisions:read now cached
    await set_faults(http, emulator, token_status=503, token_count=1_000_000)
    assert await get(http, proxy.proxy_url + ACCOUNT) == 503  # a new scope set cannot be minted
    assert endpoint_failing(proxy.runtime.source.health(), proxy.runtime.clock())
    status, body = await readyz(http, proxy)
    assert (status, body) == (
        200,
        {"ready": True, "degraded": "token_endpoint_unavailable", "cached_scope_sets": 1},
    )
    assert await get(http, proxy.proxy_url + DECISION) == 200
    body = await wait_readyz(http, proxy, 503, "token_endpoint_unavailable")  # the 4 s token ran out
    assert body["missing"] == []


@pytest.mark.parametrize("prefetch", ["none", "all"])
async def test_draining_as_soon_as_stop_begins_while_in_flight_requests_finish(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, prefetch: str
) -> None:
    proxy = await start_proxy({"refresh": {"prefetch": prefetch}})
    assert await get(http, proxy.proxy_url + DECISION) == 200
    await set_faults(http, emulator, api_latency_ms=1500)
    slow = asyncio.create_task(get(http, proxy.proxy_url + DECISION))

    async def in_flight() -> bool:
        return (await scrape(http, proxy)).value("ccp_in_flight_requests") == 1

    await eventually(in_flight)
    stopping = asyncio.create_task(proxy.stop())
    assert await wait_readyz(http, proxy, 503, "draining") == {"ready": False, "reason": "draining"}
    assert await healthz(http, proxy) == 200
    assert await slow == 200
    await stopping
