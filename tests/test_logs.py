"""JSON logs: one line per request and per token event, a configurable level, and never a secret.

The leak test runs real traffic at DEBUG (every logger of the process, the
emulator's included) through every token event, then searches the captured
output for each token the emulator minted and each client secret, in every
encoding they travel in.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest

from proxy.emulator.app import EmulatorServer
from proxy.emulator.state import IssuedToken, SecretRecord
from proxy.errors import CredentialsRejected
from proxy.logs import (
    REQUEST_ID,
    JsonFormatter,
    configure_logging,
    parse_level,
    redact,
    scrub,
    write_request_line,
)
from proxy.settings import AuthSettings, Settings
from proxy.tokens.credentials import CredentialProvider
from proxy.tokens.model import CacheKey, Credentials, Token
from tests.helpers import eventually, get
from tests.proxy_fixtures import StartProxy, emulator_requests, set_faults
from tests.secret_volume import (
    CLIENT_ID,
    SecretVolume,
    add_emulator_secret,
    revoke_emulator_secret,
    secret_file_config,
)

DECISION = "/partner/v1/decisions/dec_demo_001"
APPLICATION = "/partner/v1/applications/app_demo_001"
ACCOUNT = "/partner/v1/accounts/acc_demo_001"

Capture = Callable[[str], io.StringIO]


@pytest.fixture
def capture_logs() -> Iterator[Capture]:
    """``capture_logs(level)`` routes the whole process's logging into a StringIO, as ``run`` does."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    access = logging.getLogger("aiohttp.access")
    saved_access = access.disabled

    def start(level: str) -> io.StringIO:
        stream = io.StringIO()
        configure_logging(level, stream=stream)
        return stream

    yield start
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    access.disabled = saved_access


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line must be one JSON object."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def events(stream: io.StringIO, name: str) -> list[dict[str, Any]]:
    return [line for line in lines(stream) if line.get("event") == name]


# ------------------------------------------------------------- formatter


def record(msg: str, *args: object, exc: bool = False, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("proxy.test", logging.INFO, __file__, 1, msg, args, None)
    if exc:
        try:
            raise ValueError("boom: Authorization: Bearer abcdefghijklmnop")
        except ValueError:
            rec.exc_info = sys.exc_info()
    rec.__dict__.update(extra)
    return rec


def test_formatter_writes_one_json_object_with_the_extra_fields() -> None:
    out = JsonFormatter().format(record("hello %s", "world", event="mint_ok", scopes="decisions:read"))
    assert "\n" not in out
    entry = json.loads(out)
    assert entry["msg"] == "hello world" and entry["level"] == "info" and entry["logger"] == "proxy.test"
    assert entry["event"] == "mint_ok" and entry["scopes"] == "decisions:read"
    assert entry["ts"].endswith("Z")


def test_formatter_redacts_secret_named_fields_at_any_depth_and_scrubs_text() -> None:
    jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjY19jbGllbnQifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    out = JsonFormatter().format(
        record(
            "sending Authorization: Bearer %s body client_secret=%s&x=1",
            "opaque-token-value-123",
            "s3cr3t-form",
            exc=True,
            authorization="Bearer top-level-secret",
            headers={
                "Authorization": "Basic Y2M6c2VjcmV0",
                "X-Ok": "1",
                "nested": [{"client_secret": "deep"}],
            },
            note=f"got {jwt} back",
            dump="{'client_secret': 'dict-repr-secret'}",
        )
    )
    for secret in ("opaque-token-value-123", "s3cr3t-form", "top-level-secret", "Y2M6c2VjcmV0", "deep",
                   jwt, "dict-repr-secret", "abcdefghijklmnop"):  # fmt: skip
        assert secret not in out
    entry = json.loads(out)
    assert entry["headers"]["X-Ok"] == "1" and entry["headers"]["Authorization"] == "[redacted]"
    assert entry["headers"]["nested"] == [{"client_secret": "[redacted]"}]
    assert "ValueError" in entry["exc"]


REQUEST_FIELDS: dict[str, Any] = {
    "event": "request",
    "request_id": "req-7",
    "method": "GET",
    "route": 'decisions "read"',
    "status": 200,
    "upstream_status": 200,
    "duration_ms": 1.25,
    "upstream_ms": 0.5,
    "retried": False,
    "proxy_error": None,
    "token_digest": "0123456789abcdef",
}


def test_the_direct_request_line_equals_what_the_formatter_writes(capture_logs: Capture) -> None:
    stream = capture_logs("info")
    write_request_line(dict(REQUEST_FIELDS))
    direct = json.loads(stream.getvalue())
    rec = logging.LogRecord("proxy.access", logging.INFO, __file__, 1, "request", (), None)
    rec.__dict__.update(REQUEST_FIELDS)
    via_record = json.loads(JsonFormatter().format(rec))
    assert direct.pop("ts").endswith("Z") and via_record.pop("ts")
    assert list(direct.items()) == list(via_record.items())  # same fields, same order


def test_the_direct_request_line_is_scrubbed_and_respects_the_level(capture_logs: Capture) -> None:
    jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjY19jbGllbnQifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    stream = capture_logs("info")
    write_request_line({**REQUEST_FIELDS, "request_id": jwt})  # a client may send anything it has
    assert jwt not in stream.getvalue() and "[redacted]" in stream.getvalue()
    quiet = capture_logs("warning")
    write_request_line(dict(REQUEST_FIELDS))
    assert quiet.getvalue() == ""


def test_another_handler_gets_an_ordinary_record(capture_logs: Capture) -> None:
    """An embedding app's handler (or a test's) is in play: the direct path steps aside."""
    stream = capture_logs("info")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    extra = Keep()
    logging.getLogger("proxy.access").addHandler(extra)
    try:
        write_request_line(dict(REQUEST_FIELDS))
    finally:
        logging.getLogger("proxy.access").removeHandler(extra)
    (rec,) = seen
    assert rec.getMessage() == "request" and rec.__dict__["route"] == 'decisions "read"'
    assert json.loads(stream.getvalue())["route"] == 'decisions "read"'  # and the JSON line as usual


def test_scrub_leaves_ordinary_text_alone() -> None:
    text = 'route "decisions.read" token_digest=ab12cd34 access_token_digest=zz {"password":"[redacted]"}'
    assert scrub(text) == text
    assert redact({"a": [1, {"b": 2}]}) == {"a": [1, {"b": 2}]}


def test_request_id_of_the_current_request_is_added_to_every_line() -> None:
    token = REQUEST_ID.set("req-42")
    try:
        assert json.loads(JsonFormatter().format(record("mint")))["request_id"] == "req-42"
        explicit = JsonFormatter().format(record("x", request_id="other"))
        assert json.loads(explicit)["request_id"] == "other"
    finally:
        REQUEST_ID.reset(token)
    assert "request_id" not in json.loads(JsonFormatter().format(record("mint")))


@pytest.mark.parametrize(
    ("name", "level"),
    [("debug", logging.DEBUG), ("INFO", logging.INFO), ("warn", logging.WARNING), ("Error", logging.ERROR)],
)
def test_level_names(name: str, level: int) -> None:
    assert parse_level(name) == level


def test_an_unknown_level_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown log level 'verbose'"):
        parse_level("verbose")


def test_the_configured_level_filters(capture_logs: Capture) -> None:
    stream = capture_logs("warning")
    log = logging.getLogger("proxy.test")
    log.info("not shown")
    log.warning("shown")
    assert [line["msg"] for line in lines(stream)] == ["shown"]
    stream = capture_logs("debug")
    log.debug("now shown")
    assert [line["level"] for line in lines(stream)] == ["debug"]


# ------------------------------------------------------------ requests


async def test_one_line_per_request_with_the_request_id_propagated(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, capture_logs: Capture
) -> None:
    stream = capture_logs("info")
    proxy = await start_proxy()
    async with http.get(proxy.proxy_url + DECISION, headers={"X-Request-Id": "req-abc-123"}) as resp:
        assert resp.status == 200 and resp.headers["X-Request-Id"] == "req-abc-123"
    assert (await emulator_requests(http, emulator))[-1]["headers"]["x-request-id"] == ["req-abc-123"]
    async with http.get(proxy.proxy_url + DECISION, headers={"X-Request-Id": "bad id\u00e9" * 3}) as resp:
        generated = resp.headers["X-Request-Id"]
        assert len(generated) == 32 and "bad" not in generated
    async with http.delete(proxy.proxy_url + APPLICATION) as resp:
        refused = resp.headers["X-Request-Id"]
    async with http.post(emulator.url + "/_emulator/revoke-all") as resp:
        assert resp.status == 200
    assert await get(http, proxy.proxy_url + DECISION) == 200

    requests = events(stream, "request")
    assert len(requests) == 4
    first, second, third, fourth = requests
    assert first["request_id"] == "req-abc-123" and second["request_id"] == generated
    assert third["request_id"] == refused
    for line in requests:
        assert {
            "method",
            "route",
            "status",
            "upstream_status",
            "duration_ms",
            "retried",
            "proxy_error",
        } <= set(line)
        assert line["logger"] == "proxy.access" and line["level"] == "info"
    assert (first["method"], first["route"], first["status"], first["upstream_status"]) == (
        "GET",
        "decisions.read",
        200,
        200,
    )
    assert first["retried"] is False and first["proxy_error"] is None and first["duration_ms"] >= 0
    assert (third["route"], third["status"], third["upstream_status"], third["proxy_error"]) == (
        "(none)",
        403,
        None,
        "route_not_allowed",
    )
    assert fourth["retried"] is True and fourth["status"] == 200


# ---------------------------------------------------------- token events


async def test_token_events_mint_purge_backoff_reload_and_rejection_are_logged(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    emulator: EmulatorServer,
    capture_logs: Capture,
    tmp_path: Path,
) -> None:
    stream = capture_logs("info")
    await add_emulator_secret(http, emulator, "second-secret")
    volume = SecretVolume.create(tmp_path / "credicorp", "demo-secret")
    proxy = await start_proxy(secret_file_config(volume))
    assert await get(http, proxy.proxy_url + DECISION) == 200
    [mint] = events(stream, "mint_ok")
    assert mint["scopes"] == "decisions:read" and mint["expires_in"] > 0 and mint["token_digest"]

    async with http.post(emulator.url + "/_emulator/revoke-all") as resp:
        assert resp.status == 200
    assert await get(http, proxy.proxy_url + DECISION) == 200
    [purge] = events(stream, "purge")
    assert purge["scopes"] == "decisions:read" and purge["digest"] == mint["token_digest"]
    assert len(events(stream, "mint_ok")) == 2

    await set_faults(http, emulator, token_status=503, token_count=1)
    assert await get(http, proxy.proxy_url + ACCOUNT) == 503
    [backoff] = events(stream, "mint_failed")
    assert backoff["error"] == "temporarily_unavailable" and backoff["retry_after"] > 0
    assert backoff["level"] == "warning" and backoff["failures"] == 1

    async def backoff_over() -> bool:
        return proxy.runtime.source.health().backing_off_until is None

    await eventually(backoff_over)
    volume.swap("second-secret")
    proxy.runtime.reload_credentials()
    [reload] = events(stream, "credentials_reloaded")
    assert reload["generation"] == 2 and reload["fingerprint"] != reload["previous_fingerprint"]

    volume.swap("not-a-live-secret")
    proxy.runtime.reload_credentials()
    assert await get(http, proxy.proxy_url + APPLICATION) == 503
    [rejected] = events(stream, "credentials_rejected")
    assert rejected["level"] == "error" and rejected["generation"] == 3


async def test_token_events_carry_the_id_of_the_request_that_triggered_them(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, capture_logs: Capture
) -> None:
    stream = capture_logs("info")
    proxy = await start_proxy()
    assert await get(http, proxy.proxy_url + DECISION, headers={"X-Request-Id": "req-mint-1"}) == 200
    async with http.post(emulator.url + "/_emulator/revoke-all") as resp:
        assert resp.status == 200
    assert await get(http, proxy.proxy_url + DECISION, headers={"X-Request-Id": "req-retry-2"}) == 200
    first, second = events(stream, "mint_ok")
    [purge] = events(stream, "purge")
    assert first["request_id"] == "req-mint-1"
    assert purge["request_id"] == second["request_id"] == "req-retry-2"


async def test_background_refresh_is_logged_without_a_request_id(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, capture_logs: Capture
) -> None:
    stream = capture_logs("info")
    async with http.post(emulator.url + "/_emulator/settings", json={"token_ttl": 4}) as resp:
        assert resp.status == 200
    proxy = await start_proxy()
    assert await get(http, proxy.proxy_url + DECISION) == 200

    async def refreshed() -> bool:
        return bool(events(stream, "refresh"))

    await eventually(refreshed, within=15)
    refresh = events(stream, "refresh")[0]
    assert refresh["result"] == "ok" and refresh["scopes"] == "decisions:read"
    assert refresh["token_digest"] and "request_id" not in refresh


# ---------------------------------------------------------------- leaks


def _needles(secret: str) -> set[str]:
    """A secret in every form it travels in: raw, form-encoded, and inside HTTP Basic."""
    pair = f"{CLIENT_ID}:{secret}".encode()
    return {
        secret,
        quote_plus(secret),
        quote(secret, safe=""),
        base64.b64encode(pair).decode(),
        base64.b64encode(f"{quote_plus(CLIENT_ID)}:{quote_plus(secret)}".encode()).decode(),
        base64.b64encode(secret.encode()).decode().rstrip("="),
    }


def _token_needles(token: str) -> set[str]:
    parts = token.split(".")
    return {token, parts[-1]} if len(parts) == 3 else {token}  # the whole JWT and its signature


@pytest.mark.parametrize("method", ["client_secret_post", "client_secret_basic"])
async def test_no_token_or_secret_anywhere_in_debug_output_of_real_traffic(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    emulator: EmulatorServer,
    capture_logs: Capture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    minted: list[str] = []
    remember = emulator.state.remember

    def spy(token: str, rec: IssuedToken, secret: SecretRecord) -> None:
        minted.append(token)
        remember(token, rec, secret)

    monkeypatch.setattr(emulator.state, "remember", spy)
    tag = uuid.uuid4().hex[:12]
    wrong, first, second = f"wrong-{tag}", f"first+/{tag}=", f"second&{tag}%"
    stream = capture_logs("debug")
    volume = SecretVolume.create(tmp_path / "credicorp", wrong)
    auth = {"method": method, "client_secret": None, "client_secret_file": str(volume.path)}
    proxy = await start_proxy({"auth": auth})

    # invalid_client with a wrong secret
    assert await get(http, proxy.proxy_url + DECISION) == 503
    # the right secret arrives (SIGHUP path): mint
    await add_emulator_secret(http, emulator, first)
    volume.swap(first)
    proxy.runtime.reload_credentials()
    assert await get(http, proxy.proxy_url + DECISION) == 200
    # revoke-all: upstream 401, purge, re-mint, retry
    async with http.post(emulator.url + "/_emulator/revoke-all") as resp:
        assert resp.status == 200
    assert await get(http, proxy.proxy_url + DECISION) == 200
    # rotation: roll to a second secret, revoke the first
    await revoke_emulator_secret(http, emulator, "demo-secret")
    await add_emulator_secret(http, emulator, second)
    volume.swap(second)
    proxy.runtime.reload_credentials()
    await revoke_emulator_secret(http, emulator, first)
    assert await get(http, proxy.proxy_url + APPLICATION) == 200
    # failures on both sides, and a client that sends a real token of its own
    await set_faults(http, emulator, token_drop="before_headers", token_drop_count=1)
    assert await get(http, proxy.proxy_url + ACCOUNT) == 503
    await set_faults(http, emulator)
    stolen = minted[-1]  # the application token, cached under the current secret
    headers = {"Authorization": f"Bearer {stolen}", "X-Request-Id": "leak-check"}
    assert await get(http, proxy.proxy_url + f"{APPLICATION}?access_token={stolen}", headers=headers) == 200

    assert len(minted) >= 3
    output = stream.getvalue()
    assert output, "nothing was captured"
    for line in lines(stream):  # every line is JSON, whatever logged it
        assert isinstance(line, dict)
    names = {line.get("event") for line in lines(stream)}
    assert {"credentials_rejected", "credentials_reloaded", "mint_ok", "purge", "request"} <= names
    assert logging.getLogger().level == logging.DEBUG
    for token in minted:
        for needle in _token_needles(token):
            assert needle not in output, "a token leaked into the logs"
    for secret in (wrong, first, second, "demo-secret"):
        for needle in _needles(secret):
            assert needle not in output, f"secret {secret!r} leaked as {needle!r}"


def test_reprs_messages_and_logged_exceptions_never_show_a_token_or_secret(capture_logs: Capture) -> None:
    secret = f"reprs-secret-{uuid.uuid4().hex}"
    value = f"opaque-token-{uuid.uuid4().hex}"  # not JWT-shaped: only repr hiding protects it
    token = Token(value, 1000.0, 4600.0, ("decisions:read",), "partner/v1")
    creds = Credentials.create(CLIENT_ID, secret)
    provider = CredentialProvider(CLIENT_ID, secret=secret)
    auth = AuthSettings(client_id=CLIENT_ID, client_secret=secret)
    rendered = [
        repr(token), str(token), f"{token}", repr([token]), repr({"t": token}),
        repr(creds), str(creds), repr(provider.current()),
        repr(CacheKey.create(creds, ("decisions:read",), "partner/v1")),
        repr(auth), repr(Settings(auth=auth)), str(CredentialsRejected("x")),
    ]  # fmt: skip
    for text in rendered:
        assert value not in text and secret not in text, text

    stream = capture_logs("debug")
    log = logging.getLogger("proxy.test")
    log.debug("using %s with %r", token, creds, extra={"obj": token, "creds": creds, "auth": auth})
    try:
        raise RuntimeError(f"mint failed for {token!r} with {creds} / {auth!r}")
    except RuntimeError:
        log.exception("wrapped failure")
    output = stream.getvalue()
    assert "wrapped failure" in output and "RuntimeError" in output
    assert value not in output and secret not in output
