"""Every fault knob of ``POST /_emulator/faults``, observed from a real client."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from proxy.emulator.app import EmulatorServer
from proxy.emulator.faults import KNOWN_KNOBS
from proxy.emulator.testing import EmulatorClient

DECISION = "/partner/v1/decisions/dec_demo_001"


async def _settled(client: EmulatorClient, **expected: int) -> dict:
    """Stats once the server has caught up (a cancelled handler finishes a moment after the client)."""
    for _ in range(100):
        stats = await client.stats()
        if all(stats[k] == v for k, v in expected.items()):
            return stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"stats never reached {expected}: {stats}")


async def test_token_503_for_the_next_n_requests(emu_client: EmulatorClient):
    await emu_client.set_faults(token_status=503, token_count=2)
    for _ in range(2):
        status, headers, body = await emu_client.token_request("decisions:read")
        assert (status, body["error"]) == (503, "temporarily_unavailable")
        assert headers["Cache-Control"] == "no-store"
    assert (await emu_client.token_request("decisions:read"))[0] == 200
    _, faults = await emu_client.control("GET", "/faults")
    assert faults["token_count"] == 0
    stats = await emu_client.stats()
    assert (stats["token_requests"], stats["tokens_issued"], stats["faults_injected"]) == (3, 1, 2)


async def test_token_count_defaults_to_one(emu_client: EmulatorClient):
    await emu_client.set_faults(token_status=503)
    assert [(await emu_client.token_request())[0] for _ in range(2)] == [503, 200]


@pytest.mark.parametrize(
    ("knobs", "status", "retry_after", "error"),
    [
        ({"token_status": 500}, 500, None, None),
        ({"token_status": 429}, 429, "1", "slow_down"),
        ({"token_status": 429, "token_retry_after": 7}, 429, "7", "slow_down"),
        ({"token_status": 503, "token_retry_after": 3}, 503, "3", "temporarily_unavailable"),
        ({"token_status": 400}, 400, None, "invalid_request"),
        ({"token_status": 401}, 401, None, "invalid_client"),
    ],
)
async def test_token_status_shapes(emu_client: EmulatorClient, knobs, status, retry_after, error):
    await emu_client.set_faults(**knobs)
    got, headers, body = await emu_client.token_request()
    assert got == status and headers.get("Retry-After") == retry_after
    if error is None:
        assert body == "Internal Server Error"  # plain text, not JSON
    else:
        assert body["error"] == error


async def test_token_body_returns_a_malformed_200(emu_client: EmulatorClient):
    await emu_client.set_faults(token_body='{"token_type": "Bearer"', token_count=2)
    for _ in range(2):
        async with emu_client.session.post(
            f"{emu_client.url}/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "cc_client_demo",
                "client_secret": "demo-secret",
            },
        ) as resp:
            assert resp.status == 200 and await resp.text() == '{"token_type": "Bearer"'
    assert (await emu_client.token_request())[0] == 200


async def test_token_body_with_a_status(emu_client: EmulatorClient):
    await emu_client.set_faults(token_status=502, token_body="<html>bad gateway</html>")
    status, _, body = await emu_client.token_request()
    assert (status, body) == (502, "<html>bad gateway</html>")


async def test_token_latency(emu_client: EmulatorClient):
    await emu_client.set_faults(token_latency_ms=300)
    start = time.monotonic()
    assert (await emu_client.token_request())[0] == 200
    assert time.monotonic() - start >= 0.3


async def test_token_latency_is_cancelled_when_the_client_leaves(emu_client: EmulatorClient):
    await emu_client.set_faults(token_latency_ms=30_000)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as impatient:
        with pytest.raises(asyncio.TimeoutError):
            await EmulatorClient(impatient, emu_client.url).token_request()
    await _settled(emu_client, in_flight=0, cancelled=1, tokens_issued=0)


@pytest.mark.parametrize(("mode", "error"), [("before_headers", aiohttp.ServerDisconnectedError),
                                             ("after_headers", aiohttp.ClientPayloadError)])  # fmt: skip
async def test_token_drop(emu_client: EmulatorClient, mode, error):
    await emu_client.set_faults(token_drop=mode)
    with pytest.raises(error):
        await emu_client.token_request()
    assert (await emu_client.token_request())[0] == 200
    _, log = await emu_client.control("GET", "/requests")
    assert log["token_requests"][0]["dropped"] == mode


async def test_api_status_with_headers_for_the_next_n(emu_client: EmulatorClient):
    token = await emu_client.mint("decisions:read")
    await emu_client.set_faults(api_status=503, api_count=2, api_headers={"Retry-After": "3"})
    for _ in range(2):
        status, headers, body = await emu_client.api("GET", DECISION, token)
        assert (status, headers["Retry-After"], body["error"]) == (503, "3", "injected_fault")
    assert (await emu_client.api("GET", DECISION, token))[0] == 200
    assert (await emu_client.stats())["api_by_status"] == {"503": 2, "200": 1}


async def test_api_401_looks_like_a_real_invalid_token(emu_client: EmulatorClient):
    token = await emu_client.mint("decisions:read")
    await emu_client.set_faults(api_status=401)
    status, headers, body = await emu_client.api("GET", DECISION, token)
    assert (status, body["error"]) == (401, "invalid_token")
    assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert (await emu_client.api("GET", DECISION, token))[0] == 200  # the token itself was fine


async def test_api_body_is_sent_raw(emu_client: EmulatorClient):
    await emu_client.set_faults(
        api_status=502, api_body="upstream broke", api_headers={"Content-Type": "text/plain"}
    )
    status, headers, body = await emu_client.api("GET", DECISION)
    assert (status, body, headers["Content-Type"]) == (502, b"upstream broke", "text/plain")


async def test_api_latency_and_its_cancellation(emu_client: EmulatorClient):
    token = await emu_client.mint("decisions:read")
    await emu_client.set_faults(api_latency_ms=250)
    start = time.monotonic()
    assert (await emu_client.api("GET", DECISION, token))[0] == 200
    assert time.monotonic() - start >= 0.25
    await emu_client.set_faults(api_latency_ms=30_000)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as impatient:
        with pytest.raises(asyncio.TimeoutError):
            await EmulatorClient(impatient, emu_client.url).api("GET", DECISION, token)
    await _settled(emu_client, in_flight=0, cancelled=1)
    assert (await emu_client.requests())[-1]["status"] == "cancelled"


async def test_api_drop_before_headers_counted(emu_client: EmulatorClient):
    token = await emu_client.mint("payments:write")
    link = {"json": {"amount": 5, "reference": "r"}}
    await emu_client.set_faults(api_drop="before_headers", api_drop_count=2)
    # POST, because aiohttp's client silently retries an idempotent GET once after such a drop
    for _ in range(2):
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await emu_client.api("POST", "/partner/v1/payments/links", token, **link)
    assert (await emu_client.api("POST", "/partner/v1/payments/links", token, **link))[0] == 201
    log = await emu_client.requests()
    assert [(e["status"], e.get("dropped")) for e in log] == [
        (None, "before_headers"),
        (None, "before_headers"),
        (201, None),
    ]
    assert (await emu_client.stats())["api_by_status"] == {"dropped": 2, "201": 1}


async def test_api_drop_after_headers_truncates_a_content_length_body(emulator: EmulatorServer, emu_client):
    token = await emu_client.mint("decisions:read")
    await emu_client.set_faults(api_drop="after_headers")
    headers = {"Authorization": f"Bearer {token}"}
    async with emu_client.session.get(emulator.url + DECISION, headers=headers) as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == "1024"
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert (await emu_client.api("GET", DECISION, token))[0] == 200


async def test_fault_validation_names_every_problem(emu_client: EmulatorClient):
    status, body = await emu_client.control(
        "POST",
        "/faults",
        {"token_stauts": 503, "api_drop": "sometimes", "token_count": -1, "api_headers": [1]},
    )
    assert status == 400 and body["error"] == "invalid_faults"
    assert len(body["problems"]) == 4 and "token_stauts" in body["problems"][0]
    assert body["known"] == list(KNOWN_KNOBS)
    assert (await emu_client.control("POST", "/faults", [1]))[0] == 400
    assert (await emu_client.control("POST", "/faults", {"token_status": True}))[0] == 400


async def test_empty_object_clears_every_fault(emu_client: EmulatorClient):
    await emu_client.set_faults(token_status=503, token_count=5, api_latency_ms=10_000)
    await emu_client.set_faults()
    _, faults = await emu_client.control("GET", "/faults")
    assert faults["token_count"] == 0 and faults["api_latency_ms"] == 0
    assert (await emu_client.token_request())[0] == 200
