"""Metrics (deploy/README.md): each family moves for the event it counts, labels come only from config.

Everything is read the way Prometheus reads it: a GET of the admin listener's
``/metrics``, parsed with prometheus-client's own text parser.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid

import aiohttp
import pytest

from proxy import __version__
from proxy.emulator.app import EmulatorServer
from tests.helpers import eventually, get
from tests.proxy_fixtures import TEST_ROUTES, StartProxy, fixed_upstream, scrape, set_faults

DECISION = "/partner/v1/decisions/dec_demo_001"
APPLICATION = "/partner/v1/applications/app_demo_001"
ACCOUNT = "/partner/v1/accounts/acc_demo_001"
IDENTITY = "/partner/v1/identity/verifications/idv_demo_001"  # routed with accounts:read on purpose

# --------------------------------------------------------------- requests


async def test_requests_total_counts_route_method_and_code(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    assert await get(http, proxy.proxy_url + DECISION) == 200
    assert await get(http, proxy.proxy_url + DECISION) == 200
    assert await get(http, proxy.proxy_url + "/partner/v1/decisions/nope") == 404
    async with http.delete(proxy.proxy_url + APPLICATION) as resp:
        assert resp.status == 403
    m = await scrape(http, proxy)
    assert m.value("ccp_requests_total", route="decisions.read", method="GET", code="200") == 2
    assert m.value("ccp_requests_total", route="decisions.read", method="GET", code="404") == 1
    assert m.value("ccp_requests_total", route="(none)", method="DELETE", code="403") == 1
    assert m.value("ccp_proxy_errors_total", error="route_not_allowed") == 1


async def test_request_duration_is_observed_per_route_only_for_upstream_calls(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    await set_faults(http, emulator, api_latency_ms=300)
    assert await get(http, proxy.proxy_url + DECISION) == 200
    async with http.delete(proxy.proxy_url + APPLICATION) as resp:
        assert resp.status == 403  # refused locally: no upstream time to observe
    m = await scrape(http, proxy)
    assert m.value("ccp_request_duration_seconds_count", route="decisions.read") == 1
    assert m.value("ccp_request_duration_seconds_sum", route="decisions.read") >= 0.3
    assert m.value("ccp_request_duration_seconds_bucket", route="decisions.read", le="0.25") == 0
    assert m.value("ccp_request_duration_seconds_bucket", route="decisions.read", le="+Inf") == 1
    assert m.series("ccp_request_duration_seconds_count") == [{"route": "decisions.read"}]


async def test_in_flight_requests_rises_during_a_request_and_falls_after(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    await set_faults(http, emulator, api_latency_ms=1500)
    slow = asyncio.create_task(get(http, proxy.proxy_url + DECISION))

    async def one_in_flight() -> bool:
        return (await scrape(http, proxy)).value("ccp_in_flight_requests") == 1

    await eventually(one_in_flight)
    assert await slow == 200
    assert (await scrape(http, proxy)).value("ccp_in_flight_requests") == 0


# ------------------------------------------------------------------ tokens


async def test_mints_mint_duration_cache_lookups_ttl_and_age(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    assert await get(http, proxy.proxy_url + DECISION) == 200  # miss -> mint
    assert await get(http, proxy.proxy_url + DECISION) == 200  # hit
    assert await get(http, proxy.proxy_url + DECISION) == 200  # hit
    m = await scrape(http, proxy)
    assert m.value("ccp_token_mints_total", scopes="decisions:read", result="ok") == 1
    assert m.value("ccp_token_mint_duration_seconds_count") == 1
    assert m.value("ccp_token_cache_lookups_total", tier="memory", result="miss") == 1
    assert m.value("ccp_token_cache_lookups_total", tier="memory", result="hit") == 2
    assert 3000 < m.value("ccp_token_ttl_seconds", scopes="decisions:read", audience="partner/v1") <= 3600
    assert m.value("ccp_token_age_at_use_seconds_count") == 2
    assert m.series("ccp_token_ttl_seconds") == [{"scopes": "decisions:read", "audience": "partner/v1"}]


async def test_failed_mints_are_counted_by_result_and_oauth_error(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    await set_faults(http, emulator, token_status=503, token_count=1)
    async with http.get(proxy.proxy_url + DECISION) as resp:
        assert resp.status == 503
        assert resp.headers["X-Credicorp-Proxy-Error"] == "token_unavailable"
    m = await scrape(http, proxy)
    assert m.value("ccp_token_mints_total", scopes="decisions:read", result="error") == 1
    assert m.value("ccp_token_endpoint_errors_total", error="temporarily_unavailable") == 1
    assert m.value("ccp_proxy_errors_total", error="token_unavailable") == 1
    assert m.value("ccp_requests_total", route="decisions.read", method="GET", code="503") == 1


async def test_rejected_credentials_count_a_rejected_mint_and_raise_the_gauge(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"auth": {"client_secret": "not-the-secret"}})
    assert (await scrape(http, proxy)).value("ccp_credentials_rejected") == 0
    assert await get(http, proxy.proxy_url + DECISION) == 503
    assert await get(http, proxy.proxy_url + DECISION) == 503  # refused locally, not re-sent
    m = await scrape(http, proxy)
    assert m.value("ccp_token_mints_total", scopes="decisions:read", result="rejected") == 1
    assert m.value("ccp_token_mints_total", scopes="decisions:read", result="local_latched") == 1
    assert m.value("ccp_token_endpoint_errors_total", error="invalid_client") == 1
    assert m.value("ccp_credentials_rejected") == 1
    assert m.value("ccp_proxy_errors_total", error="credentials_rejected") == 2


async def test_background_refresh_is_counted_and_resets_the_ttl(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    async with http.post(emulator.url + "/_emulator/settings", json={"token_ttl": 4}) as resp:
        assert resp.status == 200
    proxy = await start_proxy()
    assert await get(http, proxy.proxy_url + DECISION) == 200

    async def refreshed() -> bool:
        m = await scrape(http, proxy)
        return m.value("ccp_token_refreshes_total", result="ok") >= 1

    await eventually(refreshed, within=15)  # due at half of the 4 s lifetime, refresher ticks each second
    m = await scrape(http, proxy)
    assert m.value("ccp_token_mints_total", scopes="decisions:read", result="ok") >= 2
    assert 0 < m.value("ccp_token_ttl_seconds", scopes="decisions:read", audience="partner/v1") <= 4


# ------------------------------------------------------------ 401 / 403


async def test_401_retry_success_after_revoke_all(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    assert await get(http, proxy.proxy_url + DECISION) == 200
    async with http.post(emulator.url + "/_emulator/revoke-all") as resp:
        assert resp.status == 200
    assert await get(http, proxy.proxy_url + DECISION) == 200
    m = await scrape(http, proxy)
    assert m.value("ccp_upstream_401_retries_total", outcome="success") == 1
    assert m.value("ccp_token_mints_total", scopes="decisions:read", result="ok") == 2


async def test_401_retry_outcomes_second_401_and_fresh_token_rejected(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    assert await get(http, proxy.proxy_url + DECISION) == 200  # a cached token from before
    await set_faults(http, emulator, api_status=401, api_count=2)
    assert await get(http, proxy.proxy_url + DECISION) == 401  # 401, purge, re-mint, 401 again
    await set_faults(http, emulator, api_status=401, api_count=1)
    assert await get(http, proxy.proxy_url + ACCOUNT) == 401  # minted for this request: not retried
    m = await scrape(http, proxy)
    assert m.value("ccp_upstream_401_retries_total", outcome="second_401") == 1
    assert m.value("ccp_upstream_401_retries_total", outcome="fresh_token_rejected") == 1
    assert m.value("ccp_upstream_401_retries_total", outcome="success") == 0


async def test_insufficient_scope_is_counted_by_route_and_needed_scope(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    async with http.get(proxy.proxy_url + IDENTITY) as resp:
        assert resp.status == 403
        assert "X-Credicorp-Proxy-Error" not in resp.headers  # the API's answer, unchanged
    m = await scrape(http, proxy)
    assert m.value("ccp_insufficient_scope_total", route="identity.misconfigured", scope="identity:read") == 1


@pytest.mark.parametrize(
    ("challenge", "label"),
    [
        ('scope="decisions:read applications:read"', "applications:read decisions:read"),
        ('scope="decisions:read no:such"', "unknown"),  # free text never becomes a label
    ],
    ids=["two-scopes", "not-in-catalogue"],
)
async def test_insufficient_scope_naming_several_scopes_is_labelled_with_the_sorted_set(
    start_proxy: StartProxy, http: aiohttp.ClientSession, challenge: str, label: str
) -> None:
    answer = (
        'HTTP/1.1 403 Forbidden\r\nWWW-Authenticate: Bearer error="insufficient_scope", '
        + challenge
        + "\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    async with fixed_upstream(answer.encode()) as url:
        proxy = await start_proxy({"upstream": {"url": url}})
        assert await get(http, proxy.proxy_url + DECISION) == 403
    m = await scrape(http, proxy)
    assert m.value("ccp_insufficient_scope_total", route="decisions.read", scope=label) == 1


# ----------------------------------------------------- static families


async def test_build_info_and_credential_generation(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    m = await scrape(http, proxy)
    [info] = m.series("ccp_build_info")
    assert info["version"] == __version__ and info["python"] and info["aiohttp"]
    assert m.value("ccp_build_info", **info) == 1
    assert m.value("ccp_credential_generation") == 1
    assert m.value("ccp_credential_reload_errors_total") == 0


async def test_ready_gauge_follows_readiness(start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    assert (await scrape(http, proxy)).value("ccp_ready") == 1
    proxy.runtime.draining = True
    assert (await scrape(http, proxy)).value("ccp_ready") == 0


# ------------------------------------------------------------- labels


async def test_label_values_come_only_from_the_config(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    marker = f"zzz-{uuid.uuid4().hex}"
    for path in (f"/partner/v1/{marker}", f"/partner/v1/decisions/{marker}", f"/{marker}?q={marker}"):
        async with http.get(proxy.proxy_url + path) as resp:
            await resp.read()
    async with http.request("PROPFIND", proxy.proxy_url + f"/partner/v1/{marker}") as resp:
        assert resp.status == 403
    for admin_path in ("/metrics", "/healthz", "/readyz"):
        async with http.get(proxy.proxy_url + admin_path) as resp:
            assert resp.status == 403
    m = await scrape(http, proxy)
    assert marker not in m.text
    routes = {r["name"] for r in TEST_ROUTES} | {"(none)"}
    scope_sets = {" ".join(sorted(r["scopes"])) for r in TEST_ROUTES}
    for (name, labels), _ in m.samples.items():
        for label, value in labels:
            if label == "route":
                assert value in routes, (name, value)
            elif label == "scopes":
                assert value in scope_sets, (name, value)
            elif label == "method":
                assert value in {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"}
            elif label == "code":
                assert value.isdigit() and len(value) == 3
    assert m.value("ccp_requests_total", route="(none)", method="OTHER", code="403") == 1


# ------------------------------------------------------------ promtool


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
async def test_exposition_passes_promtool_check_metrics(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    await get(http, proxy.proxy_url + DECISION)
    await get(http, proxy.proxy_url + IDENTITY)
    await get(http, proxy.proxy_url + "/partner/v1/unknown")
    async with http.post(emulator.url + "/_emulator/revoke-all") as resp:
        assert resp.status == 200
    await get(http, proxy.proxy_url + DECISION)
    await set_faults(http, emulator, token_status=503, token_count=1)
    await get(http, proxy.proxy_url + ACCOUNT)
    text = (await scrape(http, proxy)).text
    promtool = await asyncio.create_subprocess_exec(
        "promtool",
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await promtool.communicate(text.encode())
    assert promtool.returncode == 0, out.decode()
    assert out.decode().strip() == "", out.decode()  # no lint findings either
