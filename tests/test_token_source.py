"""TokenSource: discovery, client authentication, the error policy, backoff and the rate ceiling.

Two kinds of authorization server, both over real sockets: a tiny scripted
one in this file (for answers the emulator does not give: a wrong issuer,
narrowed scopes, HTTP-date Retry-After) and the Credicorp emulator. Time is a
fake clock whose ``sleep`` moves it, so backoff and the ceiling are checked
without waiting.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.emulator.app import EmulatorServer
from proxy.emulator.testing import EmulatorClient
from proxy.errors import CredentialsRejected, ProxyError, ScopeNotGranted, TokenUnavailable
from proxy.logs import JsonFormatter
from proxy.metrics import Metrics
from proxy.scopes import PARTNER_SCOPES
from proxy.settings import AuthSettings
from proxy.tokens.credentials import CredentialProvider
from proxy.tokens.model import Token
from proxy.tokens.source import TokenSource
from tests.helpers import FakeClock, hanging_server, sample

CLIENT_ID = "cc_client_demo"
SECRET = "demo-secret"
READ = ("decisions:read",)
START = 1_700_000_000.0


@dataclass
class Call:
    at: float
    form: dict[str, str]
    headers: dict[str, str]


@dataclass
class ScriptedIssuer:
    """Discovery + token endpoint whose answers a test scripts; records every token call."""

    clock: FakeClock
    issuer: str = ""
    issuer_in_document: str | None = None
    script: list[tuple[int, str, dict[str, str]]] = field(default_factory=list)
    granted_scope: str | None = None
    calls: list[Call] = field(default_factory=list)
    discovery_hits: int = 0
    tokens: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_post("/oauth/token", self._token)
        return app

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_hits += 1
        return web.json_response(
            {
                "issuer": self.issuer_in_document or self.issuer,
                "token_endpoint": self.issuer + "/oauth/token",
                "jwks_uri": self.issuer + "/jwks",
            }
        )

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.calls.append(Call(self.clock(), form, dict(request.headers)))
        if self.script:
            status, body, headers = self.script.pop(0)
            return web.Response(status=status, body=body.encode(), headers=headers)
        value = f"at-{len(self.calls)}-{secrets.token_hex(12)}"
        self.tokens.append(value)
        scope = self.granted_scope if self.granted_scope is not None else form.get("scope", "")
        return web.json_response(
            {"access_token": value, "token_type": "Bearer", "expires_in": 3600, "scope": scope}
        )

    def fail(self, status: int, body: Any, *, count: int = 1, headers: dict[str, str] | None = None) -> None:
        """Answer the next ``count`` token requests with this (JSON unless told otherwise)."""
        text = body if isinstance(body, str) else json.dumps(body)
        self.script += [(status, text, {"Content-Type": "application/json", **(headers or {})})] * count


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def issuer(clock: FakeClock, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> ScriptedIssuer:
    scripted = ScriptedIssuer(clock)
    server = await aiohttp_server(scripted.app())
    scripted.issuer = f"http://{server.host}:{server.port}"
    return scripted


@pytest.fixture
def sent(clock: FakeClock) -> list[float]:
    """Virtual start times of every token request this test's session sends."""
    return []


@pytest.fixture
async def session(clock: FakeClock, sent: list[float]) -> AsyncIterator[aiohttp.ClientSession]:
    """Here in place of the shared ``session``: the same client, recording when each token request starts."""

    async def on_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        if params.method == "POST" and params.url.path == "/oauth/token":
            sent.append(clock())

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as client:
        yield client


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def make_source(
    issuer_url: str,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics | None = None,
    *,
    credentials: CredentialProvider | None = None,
    **auth: Any,
) -> TokenSource:
    settings = AuthSettings(issuer=issuer_url, client_id=CLIENT_ID, client_secret=SECRET, verify=False)
    settings = replace(settings, **auth)
    provider = credentials or CredentialProvider(CLIENT_ID, secret=settings.client_secret)
    return TokenSource(
        settings, provider, session, clock=clock, metrics=metrics, sleep=clock.sleep, rng=random.Random(7)
    )


# --------------------------------------------------------------------------- discovery


async def test_discovery_issuer_mismatch_is_refused_and_counted(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock, metrics: Metrics
) -> None:
    issuer.issuer_in_document = "https://sso.evil.example"
    source = make_source(issuer.issuer, session, clock, metrics)
    with pytest.raises(TokenUnavailable) as caught:
        await source.mint(READ, "partner/v1")
    assert "issuer" in caught.value.description and "RFC 8414" in caught.value.description
    assert issuer.calls == []  # no token request to an endpoint from an untrusted document
    errors = sample(metrics, "ccp_token_endpoint_errors_total", error="discovery_issuer_mismatch")
    assert errors == 1
    assert source.health().last_error == "discovery_issuer_mismatch"


async def test_discovery_issuer_must_match_exactly_even_a_trailing_slash(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    issuer.issuer_in_document = issuer.issuer + "/"
    with pytest.raises(TokenUnavailable):
        await make_source(issuer.issuer, session, clock).discover()


async def test_discovery_is_cached_and_reread_after_a_token_endpoint_failure(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = make_source(issuer.issuer, session, clock)
    await source.mint(READ, "partner/v1")
    await source.mint(("payments:read",), "partner/v1")
    assert issuer.discovery_hits == 1
    issuer.fail(503, {"error": "temporarily_unavailable"})
    with pytest.raises(TokenUnavailable) as caught:
        await source.mint(READ, "partner/v1")
    clock.advance(caught.value.retry_after)
    await source.mint(READ, "partner/v1")
    assert issuer.discovery_hits == 2
    await source.mint(READ, "partner/v1")
    assert issuer.discovery_hits == 2


@pytest.mark.parametrize(
    ("status", "body", "rereads"),
    [
        pytest.param(404, "", True, id="404-moved"),
        pytest.param(302, "", True, id="302-moved"),
        pytest.param(400, '{"error": "invalid_request"}', False, id="oauth-error-from-the-endpoint"),
    ],
)
async def test_discovery_is_reread_after_an_answer_that_is_not_from_a_token_endpoint(
    issuer: ScriptedIssuer,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    status: int,
    body: str,
    rereads: bool,
) -> None:
    """Discovery is re-read after a failure: a 404 or a redirect means the endpoint may have moved."""
    source = make_source(issuer.issuer, session, clock)
    issuer.fail(status, body, headers={"Content-Type": "application/json" if body else "text/plain"})
    with pytest.raises(TokenUnavailable) as caught:
        await source.mint(READ, "partner/v1")
    clock.advance(caught.value.retry_after)
    await source.mint(READ, "partner/v1")
    assert issuer.discovery_hits == (2 if rereads else 1)


async def test_a_hung_discovery_costs_every_waiting_scope_set_one_timeout_not_one_each(
    session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """Waiters share the discovery fetch in progress, and its failure, instead of queueing
    behind a lock and each fetching again after the one before them timed out."""
    async with hanging_server() as hung:
        source = make_source(hung.url, session, clock, timeout_s=0.5)
        started = time.monotonic()
        results = await asyncio.gather(
            *(source.mint((f"s{i}:read",), "partner/v1") for i in range(6)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
    assert all(isinstance(r, TokenUnavailable) for r in results), results
    assert hung.connections == 1
    assert elapsed < 1.5


async def test_discovery_is_reread_after_its_ttl(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = make_source(issuer.issuer, session, clock)
    first = await source.discover()
    clock.advance(3601)
    second = await source.discover()
    assert issuer.discovery_hits == 2 and second.fetched_at > first.fetched_at
    assert first.token_endpoint == issuer.issuer + "/oauth/token"
    assert first.jwks_uri == issuer.issuer + "/jwks"


async def test_configured_token_endpoint_overrides_discovery(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = make_source("http://127.0.0.1:9", session, clock, token_endpoint=issuer.issuer + "/oauth/token")
    await source.mint(READ, "partner/v1")
    assert issuer.discovery_hits == 0 and len(issuer.calls) == 1


# --------------------------------------------------------------------------- the request


async def test_client_secret_post_puts_credentials_in_the_form(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = make_source(issuer.issuer, session, clock, method="client_secret_post")
    token = await source.mint(("payments:read", "decisions:read"), "partner/v1")
    (call,) = issuer.calls
    assert call.form == {
        "grant_type": "client_credentials",
        "scope": "decisions:read payments:read",
        "audience": "partner/v1",
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
    }
    assert "Authorization" not in call.headers
    assert call.headers["Accept"] == "application/json"
    assert token.scopes == ("decisions:read", "payments:read")
    assert token.issued_at == START and token.expires_at == START + 3600


async def test_client_secret_basic_form_urlencodes_id_and_secret(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    odd_secret = "s3:cr/t+ é&=%"
    creds = CredentialProvider(CLIENT_ID, secret=odd_secret)
    source = make_source(issuer.issuer, session, clock, method="client_secret_basic", credentials=creds)
    await source.mint(READ, "partner/v1")
    (call,) = issuer.calls
    assert "client_secret" not in call.form and "client_id" not in call.form
    scheme, _, encoded = call.headers["Authorization"].partition(" ")
    raw_id, _, raw_secret = base64.b64decode(encoded).decode().partition(":")
    assert scheme == "Basic"
    assert ":" not in raw_secret and " " not in raw_secret  # RFC 6749 §2.3.1 encoding happened
    assert (unquote_plus(raw_id), unquote_plus(raw_secret)) == (CLIENT_ID, odd_secret)


async def test_redirects_from_the_token_endpoint_are_not_followed(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    issuer.fail(307, "", headers={"Location": "http://127.0.0.1:9/steal"})
    with pytest.raises(TokenUnavailable):
        await make_source(issuer.issuer, session, clock).mint(READ, "partner/v1")
    assert len(issuer.calls) == 1


@pytest.mark.parametrize(("expires_in", "lifetime"), [("1800", 1800.0), (900.5, 900.5), (None, 3600.0)])
async def test_expires_in_may_be_a_numeric_string_a_float_or_absent(
    issuer: ScriptedIssuer,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    expires_in: Any,
    lifetime: float,
) -> None:
    body: dict[str, Any] = {"access_token": "abc.def.ghi", "token_type": "bearer"}
    if expires_in is not None:
        body["expires_in"] = expires_in
    issuer.fail(200, body)
    token = await make_source(issuer.issuer, session, clock).mint(READ, "partner/v1")
    assert token.lifetime == lifetime


async def test_narrowed_scope_is_logged_and_used(
    issuer: ScriptedIssuer,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    issuer.granted_scope = "decisions:read"
    caplog.set_level(logging.INFO, logger="proxy.tokens")
    token = await make_source(issuer.issuer, session, clock).mint(
        ("decisions:read", "payments:read"), "partner/v1"
    )
    assert token.scopes == ("decisions:read",)
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "scope_narrowed"]
    assert record.missing == "payments:read"  # type: ignore[attr-defined]
    assert record.granted == "decisions:read"  # type: ignore[attr-defined]


async def test_unrequested_scope_is_logged_and_kept_in_the_token_scopes(
    issuer: ScriptedIssuer,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    issuer.granted_scope = "decisions:read payments:write"
    token = await make_source(issuer.issuer, session, clock).mint(READ, "partner/v1")
    assert token.scopes == ("decisions:read", "payments:write")
    assert any(getattr(r, "event", "") == "scope_unexpected" for r in caplog.records)


# --------------------------------------------------------------------------- malformed answers

MALFORMED = [
    ("not json", {"Content-Type": "application/json"}),
    ("<html>502 from some middlebox</html>", {"Content-Type": "text/html"}),
    ('{"token_type": "Bearer", "expires_in": 3600}', {}),
    ('{"access_token": "", "expires_in": 3600}', {}),
    ('{"access_token": "abc", "expires_in": -5}', {}),
    ('{"access_token": "abc", "expires_in": "soon"}', {}),
    ('{"access_token": "abc", "expires_in": true}', {}),
    ('{"access_token": "abc", "token_type": "mac"}', {}),
    ('{"access_token": "abc\\r\\nX-Injected: 1"}', {}),
    ('{"access_token": "abc", "scope": ["decisions:read"]}', {}),
    ('["access_token"]', {}),
    ("\xff\xfe garbage", {"Content-Type": "application/octet-stream"}),
    ('{"access_token": "abc", "padding": "' + "x" * 70_000 + '"}', {}),
]


@pytest.mark.parametrize(("body", "headers"), MALFORMED)
async def test_malformed_token_response_backs_off_then_recovers(
    issuer: ScriptedIssuer,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics,
    body: str,
    headers: dict[str, str],
) -> None:
    issuer.script.append((200, body, {"Content-Type": "application/json", **headers}))
    source = make_source(issuer.issuer, session, clock, metrics)
    with pytest.raises(TokenUnavailable) as caught:
        await source.mint(READ, "partner/v1")
    assert "malformed" in caught.value.description
    assert sample(metrics, "ccp_token_mints_total", scopes="decisions:read", result="malformed") == 1
    with pytest.raises(TokenUnavailable):  # backing off: refused without a call
        await source.mint(READ, "partner/v1")
    assert len(issuer.calls) == 1
    clock.advance(caught.value.retry_after)
    assert isinstance(await source.mint(READ, "partner/v1"), Token)


# --------------------------------------------------------------------------- error policy


async def test_retry_after_http_date_is_a_floor_on_the_backoff(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.tokens")
    issuer.fail(
        503,
        {"error": "temporarily_unavailable"},
        headers={"Retry-After": formatdate(START + 120, usegmt=True)},
    )
    source = make_source(issuer.issuer, session, clock)
    with pytest.raises(TokenUnavailable) as caught:
        await source.mint(READ, "partner/v1")
    assert 120 <= caught.value.retry_after < 121
    clock.advance(119)
    with pytest.raises(TokenUnavailable) as again:
        await source.mint(READ, "partner/v1")
    assert again.value.retry_after <= 1.0 and len(issuer.calls) == 1
    clock.advance(1)
    await source.mint(READ, "partner/v1")
    assert source.health().backing_off_until is None
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events.index("backoff") < events.index("backoff_ended") < events.index("mint_ok")


async def test_backoff_grows_exponentially_and_is_capped(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = make_source(issuer.issuer, session, clock)
    issuer.fail(500, "boom", count=12, headers={"Content-Type": "text/plain"})
    delays = []
    for _ in range(12):
        with pytest.raises(TokenUnavailable) as caught:
            await source.mint(READ, "partner/v1")
        delays.append(caught.value.retry_after)
        until = source.health().backing_off_until
        assert until is not None  # compare the wait: on epoch seconds approx tolerates ~30 min
        # TokenError clamps the caller's retry_after to at least 1 s; below that the wait is exact
        assert max(1.0, until - clock()) == pytest.approx(caught.value.retry_after, abs=1e-6)
        clock.advance(caught.value.retry_after)
    assert all(0.5 <= d <= 60 for d in delays)
    assert max(delays[6:]) > 8  # grew beyond the first steps (full jitter keeps it random)
    assert source.health().last_error == "http_5xx"


async def test_config_errors_back_off_only_their_scope_set(
    issuer: ScriptedIssuer,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = make_source(issuer.issuer, session, clock)
    issuer.fail(400, {"error": "invalid_request", "error_description": "bad audience"})
    with pytest.raises(TokenUnavailable):
        await source.mint(READ, "internal/v1")
    with pytest.raises(TokenUnavailable):
        await source.mint(READ, "internal/v1")
    assert len(issuer.calls) == 1
    await source.mint(READ, "partner/v1")  # other keys are unaffected
    (record,) = [r for r in caplog.records if getattr(r, "error", "") == "invalid_request"]
    assert record.levelno == logging.ERROR


async def test_error_classification_uses_the_error_field_not_the_text(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    issuer.fail(400, {"error": "invalid_request", "error_description": "invalid_client invalid_scope"})
    with pytest.raises(TokenUnavailable):
        await make_source(issuer.issuer, session, clock).mint(READ, "partner/v1")


async def test_invalid_client_with_status_400_is_also_a_hard_failure(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock, metrics: Metrics
) -> None:
    issuer.fail(400, {"error": "invalid_client"})
    source = make_source(issuer.issuer, session, clock, metrics)
    for _ in range(3):
        with pytest.raises(CredentialsRejected):
            await source.mint(READ, "partner/v1")
    assert len(issuer.calls) == 1
    assert sample(metrics, "ccp_credentials_rejected") == 1


# --------------------------------------------------------------------------- rate ceiling


def max_in_any_window(times: list[float], window: float = 1.0) -> int:
    """The most calls that started inside any half-open window [t, t + window)."""
    times = sorted(times)
    return max((sum(1 for u in times if t <= u < t + window) for t in times), default=0)


async def test_cold_start_of_many_scope_sets_queues_on_the_ceiling(
    issuer: ScriptedIssuer,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics,
    sent: list[float],
) -> None:
    source = make_source(issuer.issuer, session, clock, metrics, max_mint_rate=5)
    await source.discover()  # so every mint below reaches the ceiling in the same instant
    scope_sets = [(f"s{i:02d}",) for i in range(30)]
    results = await asyncio.gather(
        *(source.mint(s, "partner/v1") for s in scope_sets), return_exceptions=True
    )
    minted = [r for r in results if isinstance(r, Token)]
    throttled = [r for r in results if isinstance(r, TokenUnavailable)]
    assert len(minted) == 15 and len(throttled) == 15  # 5 now, 5 after 1 s, 5 after 2 s; the rest refused
    assert all(2 < t.retry_after <= 60 for t in throttled)
    assert sent == [START] * 5 + [START + 1] * 5 + [START + 2] * 5
    assert max_in_any_window(sent) <= 5
    assert sample(metrics, "ccp_token_mints_total", scopes="s29", result="local_throttled") == 1


async def test_configured_ceiling_is_clamped_below_the_platform_limit(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock, sent: list[float]
) -> None:
    source = make_source(issuer.issuer, session, clock, max_mint_rate=50)
    await source.discover()
    await asyncio.gather(*(source.mint((f"s{i}",), "partner/v1") for i in range(20)), return_exceptions=True)
    assert max_in_any_window(sent) == 9


async def test_backoff_and_retries_never_exceed_the_ceiling(
    issuer: ScriptedIssuer, session: aiohttp.ClientSession, clock: FakeClock, sent: list[float]
) -> None:
    """Many scope sets, each retrying as soon as told, against an endpoint that fails in bursts."""
    source = make_source(issuer.issuer, session, clock, max_mint_rate=5)
    issuer.fail(503, {"error": "temporarily_unavailable"}, count=3, headers={"Retry-After": "0"})
    issuer.fail(429, {"error": "slow_down"}, count=2)
    issuer.fail(200, "garbage", count=2)
    issuer.fail(503, {"error": "temporarily_unavailable"}, count=3)
    deadline = clock() + 200

    async def worker(scopes: tuple[str, ...]) -> None:
        while clock() < deadline:
            try:
                await source.mint(scopes, "partner/v1")
                await clock.sleep(0.05)
            except ProxyError as exc:
                await clock.sleep(getattr(exc, "retry_after", 0.01) or 0.01)

    await asyncio.gather(*(worker((f"s{i:02d}",)) for i in range(25)))
    assert len(sent) == len(issuer.calls) > 500
    assert max_in_any_window(sent) <= 5
    assert issuer.script == []  # every scripted failure was seen, and recovered from


# --------------------------------------------------------------------------- secrecy


async def test_no_secret_or_token_in_logs_or_exceptions(
    issuer: ScriptedIssuer,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sup3r-" + secrets.token_hex(8)
    creds = CredentialProvider(CLIENT_ID, secret=secret)
    source = make_source(issuer.issuer, session, clock, credentials=creds, method="client_secret_basic")
    issuer.granted_scope = "decisions:read"
    token = await source.mint(("decisions:read", "payments:read"), "partner/v1")
    texts = [repr(token), str(token), repr(creds.current()), str(creds.current()), repr(source.health())]
    issuer.fail(200, '{"access_token": "leaky-token-value", "expires_in": "x"}')
    issuer.fail(401, {"error": "invalid_client", "error_description": secret})
    for _ in range(3):
        try:
            await source.mint(READ, "partner/v1")
        except ProxyError as exc:
            texts += [str(exc), repr(exc), exc.description]
            clock.advance(getattr(exc, "retry_after", 0))
    texts.append(caplog.text)
    texts += [repr(vars(r)) for r in caplog.records]
    texts += [JsonFormatter().format(r) for r in caplog.records]  # the records as shipped
    assert {"mint_ok", "scope_narrowed", "mint_failed", "credentials_rejected"} <= {
        getattr(r, "event", None) for r in caplog.records
    }
    blob = "\n".join(texts)
    for needle in (
        secret,
        token.value,
        "leaky-token-value",
        base64.b64encode(f"{CLIENT_ID}:{secret}".encode()).decode(),
    ):
        assert needle not in blob


# --------------------------------------------------------------------------- the emulator


@pytest.fixture
async def emu(make_emulator: Callable[..., Awaitable[EmulatorServer]]) -> EmulatorServer:
    """The emulator without its own rate limit: virtual time packs many calls into little real time."""
    return await make_emulator(rate_limit=None)


@pytest.fixture
def control(emu: EmulatorServer, session: aiohttp.ClientSession) -> EmulatorClient:
    return EmulatorClient(session, emu.url)


@pytest.mark.parametrize("method", ["client_secret_post", "client_secret_basic"])
async def test_emulator_accepts_both_client_auth_methods(
    emu: EmulatorServer,
    control: EmulatorClient,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    method: str,
) -> None:
    source = make_source(emu.url, session, clock, method=method)
    token = await source.mint(READ, "partner/v1")
    assert token.scopes == READ and token.lifetime == 3600
    assert (await control.stats())["tokens_issued"] == 1


def write_k8s_secret(root: Path, secret: str, version: str) -> Path:
    """Lay out a Secret volume the way the kubelet does: a ``..data`` symlink swapped atomically."""
    target = root / f"..{version}"
    target.mkdir()
    (target / "client-secret").write_text(secret + "\n")
    tmp = root / "..data_tmp"
    tmp.symlink_to(target.name)
    tmp.replace(root / "..data")
    link = root / "client-secret"
    if not link.is_symlink():
        link.symlink_to("..data/client-secret")
    return link


@pytest.mark.parametrize("notice", ["watch_tick", "sighup_reload"])
async def test_invalid_client_is_latched_until_the_secret_file_changes(
    emu: EmulatorServer,
    control: EmulatorClient,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics,
    tmp_path: Path,
    notice: str,
) -> None:
    path = write_k8s_secret(tmp_path, "wrong-secret", "v1")
    creds = CredentialProvider(CLIENT_ID, secret_file=str(path), metrics=metrics)
    source = make_source(emu.url, session, clock, metrics, credentials=creds)
    with pytest.raises(CredentialsRejected):
        await source.mint(READ, "partner/v1")
    requests_after_rejection = (await control.stats())["token_requests"]
    for scopes in (READ, ("payments:read",), READ):
        clock.advance(3600)  # however long we wait, the same secret is not retried
        with pytest.raises(CredentialsRejected):
            await source.mint(scopes, "partner/v1")
    assert (await control.stats())["token_requests"] == requests_after_rejection
    assert source.health().credentials_rejected
    assert sample(metrics, "ccp_credentials_rejected") == 1
    assert creds.check_file() is False and creds.reload() is False  # same secret: still latched
    assert source.health().credentials_rejected

    write_k8s_secret(tmp_path, SECRET, "v2")
    assert (creds.check_file() if notice == "watch_tick" else creds.reload()) is True
    assert creds.current().generation == 2
    assert not source.health().credentials_rejected
    assert sample(metrics, "ccp_credentials_rejected") == 0
    assert sample(metrics, "ccp_credential_generation") == 2
    token = await source.mint(READ, "partner/v1")
    assert token.scopes == READ


async def test_a_late_invalid_client_for_a_replaced_secret_latches_nothing(
    emu: EmulatorServer,
    control: EmulatorClient,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics,
    tmp_path: Path,
) -> None:
    """The fixed secret arrives while a mint with the old one is on the wire: its late
    invalid_client must not latch the new generation nor raise the alert gauge."""
    path = write_k8s_secret(tmp_path, "wrong-secret", "v1")
    creds = CredentialProvider(CLIENT_ID, secret_file=str(path), metrics=metrics)
    source = make_source(emu.url, session, clock, metrics, credentials=creds)
    await source.discover()
    await control.set_faults(token_latency_ms=300)
    late = asyncio.create_task(source.mint(READ, "partner/v1"))
    await asyncio.sleep(0.1)
    write_k8s_secret(tmp_path, SECRET, "v2")
    assert creds.reload()
    with pytest.raises(CredentialsRejected):
        await late
    assert not source.health().credentials_rejected
    assert sample(metrics, "ccp_credentials_rejected") == 0
    await control.set_faults()
    assert (await source.mint(READ, "partner/v1")).scopes == READ


async def test_two_secret_roll_switches_new_mints_to_the_new_secret(
    emu: EmulatorServer,
    control: EmulatorClient,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """The documented roll: add a second secret, deploy it, revoke the old one; no mint fails."""
    path = write_k8s_secret(tmp_path, SECRET, "v1")
    creds = CredentialProvider(CLIENT_ID, secret_file=str(path))
    source = make_source(emu.url, session, clock, credentials=creds)
    await source.mint(READ, "partner/v1")
    status, _ = await control.control("POST", f"/clients/{CLIENT_ID}/secrets", {"secret": "rolled-secret"})
    assert status == 201
    write_k8s_secret(tmp_path, "rolled-secret", "v2")
    assert creds.check_file() is True
    await source.mint(READ, "partner/v1")
    status, _ = await control.control("DELETE", f"/clients/{CLIENT_ID}/secrets/{SECRET}")
    assert status == 204
    await source.mint(READ, "partner/v1")
    by_secret = (await control.stats())["tokens_by_secret"]
    assert sorted(by_secret.values()) == [1, 2]  # one mint under the old secret, two under the new


async def test_invalid_scope_raises_scope_not_granted_and_is_not_requested_again(
    emu: EmulatorServer,
    control: EmulatorClient,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics,
) -> None:
    source = make_source(emu.url, session, clock, metrics)
    not_granted = ("decisions:read", "openid")
    with pytest.raises(ScopeNotGranted) as caught:
        await source.mint(not_granted, "partner/v1")
    assert "decisions:read openid" in caught.value.description
    before = (await control.stats())["token_requests"]
    for _ in range(5):
        with pytest.raises(ScopeNotGranted):
            await source.mint(not_granted, "partner/v1")
    assert (await control.stats())["token_requests"] == before
    await source.mint(READ, "partner/v1")  # other scope sets are unaffected
    clock.advance(301)  # the memo expires: a fixed grant would be picked up
    with pytest.raises(ScopeNotGranted):
        await source.mint(not_granted, "partner/v1")
    assert (await control.stats())["token_requests"] == before + 2
    mints = sample(metrics, "ccp_token_mints_total", scopes="decisions:read openid", result="invalid_scope")
    assert mints == 2


FAULTS = [
    pytest.param({"token_status": 503}, "temporarily_unavailable", id="503"),
    pytest.param({"token_status": 502, "token_body": "<html>bad gateway</html>"}, "http_5xx", id="502-html"),
    pytest.param({"token_status": 500}, "http_5xx", id="500"),
    pytest.param({"token_status": 429, "token_retry_after": 7}, "http_429", id="429-retry-after"),
    pytest.param({"token_latency_ms": 1500}, "timeout", id="timeout"),
    pytest.param({"token_drop": "before_headers"}, "connect", id="drop-before-headers"),
    pytest.param({"token_drop": "after_headers"}, "connect", id="drop-after-headers"),
    pytest.param({"token_body": '{"access_token": 42}'}, "malformed", id="malformed-json"),
    pytest.param({"token_body": "<html>oops</html>"}, "malformed", id="malformed-html"),
]


@pytest.mark.parametrize(("knobs", "label"), FAULTS)
async def test_endpoint_faults_back_off_then_recover(
    emu: EmulatorServer,
    control: EmulatorClient,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics,
    knobs: dict[str, Any],
    label: str,
) -> None:
    source = make_source(emu.url, session, clock, metrics, timeout_s=0.5)
    await source.discover()
    await control.set_faults(**knobs)
    with pytest.raises(TokenUnavailable) as caught:
        await source.mint(READ, "partner/v1")
    if "token_retry_after" in knobs:
        assert caught.value.retry_after >= 7
    assert sample(metrics, "ccp_token_endpoint_errors_total", error=label) == 1
    requests = (await control.stats())["token_requests"]
    with pytest.raises(TokenUnavailable):  # still backing off: no call
        await source.mint(READ, "partner/v1")
    assert (await control.stats())["token_requests"] == requests
    assert source.health().backing_off_until is not None
    await control.set_faults()  # the endpoint heals
    clock.advance(caught.value.retry_after)
    token = await source.mint(READ, "partner/v1")
    assert token.scopes == READ
    assert source.health().backing_off_until is None and source.health().last_error is None


async def test_a_concurrent_failure_without_retry_after_keeps_the_servers_longer_retry_after(
    emu: EmulatorServer, control: EmulatorClient, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = make_source(emu.url, session, clock)
    await source.discover()
    await control.set_faults(token_latency_ms=300, token_status=429, token_count=1, token_retry_after=60)
    told_to_wait = asyncio.create_task(source.mint(READ, "partner/v1"))  # 429, Retry-After: 60
    await asyncio.sleep(0.1)
    await control.set_faults(token_latency_ms=600, token_drop="before_headers", token_drop_count=1)
    dropped = asyncio.create_task(source.mint(("accounts:read",), "partner/v1"))  # fails after it
    for mint in (told_to_wait, dropped):
        with pytest.raises(TokenUnavailable):
            await mint
    until = source.health().backing_off_until
    assert until is not None and until - clock() == pytest.approx(60)


async def test_one_burst_of_concurrent_failures_is_one_step_of_the_backoff(
    emu: EmulatorServer,
    control: EmulatorClient,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Eight scope sets on the wire together, all answered 503: the endpoint failed once, as
    far as the back-off knows; the next failure after the wait is the second step."""
    source = make_source(emu.url, session, clock, max_mint_rate=9)
    await source.discover()
    await control.set_faults(token_status=503, token_count=9)
    scope_sets = [(s,) for s in sorted(PARTNER_SCOPES)][:8]
    mints = (source.mint(s, "partner/v1") for s in scope_sets)
    results = await asyncio.gather(*mints, return_exceptions=True)
    assert all(isinstance(r, TokenUnavailable) for r in results), results
    assert (await control.stats())["token_requests"] == 8
    steps = [r.failures for r in caplog.records if getattr(r, "event", None) == "mint_failed"]
    assert steps == [1] * 8
    until = source.health().backing_off_until
    assert until is not None and until - clock() <= 1.0  # the first step's wait, not the eighth's
    clock.advance(until - clock())
    with pytest.raises(TokenUnavailable):
        await source.mint(READ, "partner/v1")
    assert [r.failures for r in caplog.records if getattr(r, "event", None) == "mint_failed"][-1] == 2


async def test_emulator_load_with_faults_stays_under_the_ceiling(
    emu: EmulatorServer,
    control: EmulatorClient,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    sent: list[float],
) -> None:
    """Every partner scope set minting in a loop for 60 virtual seconds while the endpoint has 503s."""
    source = make_source(emu.url, session, clock, max_mint_rate=5)
    await control.set_faults(token_status=503, token_count=6)
    deadline = clock() + 60

    async def worker(scopes: tuple[str, ...]) -> None:
        while clock() < deadline:
            try:
                await source.mint(scopes, "partner/v1")
                await clock.sleep(0.1)
            except ProxyError as exc:
                await clock.sleep(getattr(exc, "retry_after", 0.1))

    await asyncio.gather(*(worker((s,)) for s in sorted(PARTNER_SCOPES)))
    stats = await control.stats()
    assert stats["token_requests"] == len(sent) > 100
    assert stats["tokens_issued"] == len(sent) - 6
    assert max_in_any_window(sent) <= 5


async def test_emulator_never_answers_429_to_a_stampede(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    """Real time, and the emulator's documented 10 req/s limit on: our ceiling keeps us under it."""
    settings = AuthSettings(issuer=emulator.url, client_id=CLIENT_ID, client_secret=SECRET, verify=False)
    source = TokenSource(settings, CredentialProvider(CLIENT_ID, secret=SECRET), session)
    scope_sets = [(s,) for s in sorted(PARTNER_SCOPES)] + [tuple(sorted(PARTNER_SCOPES))]
    results = await asyncio.gather(
        *(source.mint(s, "partner/v1") for s in scope_sets), return_exceptions=True
    )
    assert all(isinstance(r, Token) for r in results), results
    stats = await EmulatorClient(session, emulator.url).stats()
    assert stats["tokens_issued"] == len(scope_sets) == stats["token_requests"]
