"""No trust in what discovery hands us: a discovered endpoint obeys the configured-URL rule and a host pin.

The attacks run over real sockets on loopback: an https issuer (a throw-away CA
in ``auth.ca_file``) whose discovery document names an attacker's endpoint,
and the attacker, a listener that records every connection and every byte sent
to it. Each refused document must leave the attacker with no connection at
all (so no ``client_secret``), answer the app ``503 token_unavailable``, make
``/readyz`` say ``discovery_untrusted``, log one ``discovery_refused`` line
naming the key, the rule and the host (never the URL), and count
``ccp_token_endpoint_errors_total{error="discovery_untrusted"}``. The positive
cases run the real emulator over TLS. The host rule itself is table-driven.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import ProxyServer
from proxy.config import parse_config
from proxy.emulator.app import make_emulator_app
from proxy.errors import ConfigError
from proxy.logs import JsonFormatter
from proxy.settings import AuthSettings
from proxy.tokens.discovery_trust import (
    DiscoveryTrust,
    check_allowed_host,
    default_patterns,
    host_matches,
)
from tests.proxy_fixtures import StartProxy, base_config, scrape
from tests.redis_fixtures import TlsFiles

DECISION = "/partner/v1/decisions/dec_demo_001"
SECRET = "demo-secret"  # base_config's client_secret


# ------------------------------------------------------------------ the parties


@dataclass
class Attacker:
    """A listener that records every connection and every byte it is sent, then answers 503."""

    url: str = ""
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)


@contextlib.asynccontextmanager
async def attacker(context: ssl.SSLContext | None = None) -> AsyncIterator[Attacker]:
    seen = Attacker()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            while len(seen.received) < 1 << 20:  # a bound, far above one token request
                chunk = await asyncio.wait_for(reader.read(65536), 1.0)
                if not chunk:
                    break
                seen.received += chunk
                if b"\r\n\r\n" in chunk:
                    break
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0, ssl=context)
    seen.url = f"{'https' if context else 'http'}://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield seen
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def serve(app: web.Application, context: ssl.SSLContext | None) -> AsyncIterator[int]:
    """``app`` on a free loopback port (TLS when ``context`` is given); yields the port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield next(a[1] for a in runner.addresses if isinstance(a, tuple))
    finally:
        await runner.cleanup()


@dataclass
class Issuer:
    """A discovery endpoint whose document a test writes; ``url`` is its issuer identifier."""

    url: str = ""
    document: dict[str, Any] = field(default_factory=dict)
    hits: int = 0

    def names(self, token_endpoint: str, jwks_uri: str | None = None) -> None:
        self.document = {"issuer": self.url, "token_endpoint": token_endpoint}
        if jwks_uri is not None:
            self.document["jwks_uri"] = jwks_uri


@contextlib.asynccontextmanager
async def issuer(context: ssl.SSLContext | None) -> AsyncIterator[Issuer]:
    scripted = Issuer()

    async def discovery(request: web.Request) -> web.Response:
        scripted.hits += 1
        return web.json_response(scripted.document)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    async with serve(app, context) as port:
        scripted.url = f"{'https' if context else 'http'}://127.0.0.1:{port}"
        yield scripted


@dataclass
class Tls:
    files: TlsFiles
    server: ssl.SSLContext


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    """A throw-away CA (the proxy trusts it through ``auth.ca_file``) and a server certificate
    for 127.0.0.1 and localhost."""
    files = TlsFiles(tmp_path / "tls")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    return Tls(files, context)


def https_auth(tls: Tls, issuer_url: str, **auth: Any) -> dict[str, Any]:
    return {"auth": {"issuer": issuer_url, "ca_file": str(tls.files.ca), **auth}}


# ------------------------------------------------------------------ what a refusal looks like


async def assert_refused(
    http: aiohttp.ClientSession,
    proxy: ProxyServer,
    caplog: pytest.LogCaptureFixture,
    *,
    key: str,
    rule: str,
    host: str | None,
    secret_free: tuple[str, ...] = (),
    details: tuple[str, ...] = ("discovery_untrusted",),
) -> None:
    """The app's 503, /readyz's reason, the one log line's fields and the counter."""
    async with http.get(proxy.proxy_url + DECISION) as resp:
        body = await resp.json()
        assert resp.status == 503, body
        assert resp.headers["X-Credicorp-Proxy-Error"] == "token_unavailable"
        assert "Retry-After" in resp.headers
    async with http.get(proxy.admin_url + "/readyz") as resp:
        ready = await resp.json()
        assert resp.status == 503, ready
    assert ready["reason"] == "token_endpoint_unavailable" and ready["detail"] in details, ready
    refused = [r for r in caplog.records if getattr(r, "event", None) == "discovery_refused"]
    assert refused, "no discovery_refused line"
    line = json.loads(JsonFormatter().format(refused[0]))
    assert line["level"] == "error" and line["error"] == "discovery_untrusted"
    assert (line["key"], line["rule"], line["host"]) == (key, rule, host), line
    everything = caplog.text + json.dumps(body) + json.dumps(ready)
    everything += "".join(JsonFormatter().format(r) for r in caplog.records)
    for text in (SECRET, *secret_free):
        assert text not in everything, f"{text!r} leaked into a log line or an answer"
    metrics = await scrape(http, proxy)
    assert metrics.value("ccp_token_endpoint_errors_total", error="discovery_untrusted") >= 1


@pytest.fixture
def tokens_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="proxy.tokens")
    return caplog


# ------------------------------------------------------------------ attacks on the token endpoint

#: (what the document names, with {plain}/{tls} for the attacker's ports; rule; host logged;
#: strings from the URL that must appear nowhere).
TOKEN_ENDPOINT_ATTACKS: list[tuple[str, str, str | None, tuple[str, ...]]] = [
    # http:// to a host that is not loopback by name, though the resolver takes it to 127.0.0.1
    ("http://0x7f000001:{plain}/oauth/token", "cleartext", "0x7f000001", ()),
    # an https issuer never hands the secret to http://, even on loopback
    ("http://127.0.0.1:{plain}/oauth/token", "downgrade", "127.0.0.1", ()),
    ("https://thief:hunter2@127.0.0.1:{tls}/oauth/token", "userinfo", "127.0.0.1", ("hunter2", "thief")),
    ("https://127.0.0.1:{tls}/oauth/token?copy_to=evil", "query_or_fragment", "127.0.0.1", ("copy_to",)),
    ("https://127.0.0.1:{tls}/oauth/token#frag", "query_or_fragment", "127.0.0.1", ("#frag",)),
    # the issuer is 127.0.0.1; localhost is another host, outside the default pin
    ("https://localhost:{tls}/oauth/token", "host_not_allowed", "localhost", ()),
    # a numeric form the resolver reads as 127.0.0.1, not a host name the pin could judge
    ("https://127.1:{tls}/oauth/token", "host_syntax", "127.1", ()),
    ("ftp://127.0.0.1:{tls}/oauth/token", "scheme", "127.0.0.1", ()),
]


@pytest.mark.parametrize(("named", "rule", "host", "secret_free"), TOKEN_ENDPOINT_ATTACKS)
async def test_an_https_issuers_document_cannot_send_the_secret_to_an_untrusted_token_endpoint(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tls: Tls,
    tokens_log: pytest.LogCaptureFixture,
    named: str,
    rule: str,
    host: str | None,
    secret_free: tuple[str, ...],
) -> None:
    async with issuer(tls.server) as iss, attacker() as plain, attacker(tls.server) as encrypted:
        ports = {"plain": plain.url.rsplit(":", 1)[1], "tls": encrypted.url.rsplit(":", 1)[1]}
        iss.names(named.format(**ports), iss.url + "/.well-known/jwks.json")
        proxy = await start_proxy(https_auth(tls, iss.url))
        await assert_refused(
            http, proxy, tokens_log, key="token_endpoint", rule=rule, host=host, secret_free=secret_free
        )
        for thief in (plain, encrypted):
            assert (thief.connections, bytes(thief.received)) == (0, b"")
        assert iss.hits >= 1


async def test_an_explicit_pin_refuses_a_host_it_does_not_list(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tls: Tls, tokens_log: pytest.LogCaptureFixture
) -> None:
    """``auth.allowed_hosts`` replaces the parent-domain default (the issuer's host stays allowed)."""
    async with issuer(tls.server) as iss, attacker(tls.server) as thief:
        iss.names(thief.url.replace("127.0.0.1", "localhost") + "/oauth/token")
        proxy = await start_proxy(
            https_auth(tls, iss.url, allowed_hosts=["api.example.com", "*.example.org"])
        )
        await assert_refused(
            http, proxy, tokens_log, key="token_endpoint", rule="host_not_allowed", host="localhost"
        )
        assert thief.connections == 0


async def test_an_http_issuer_on_loopback_still_may_not_name_cleartext_to_another_host(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tokens_log: pytest.LogCaptureFixture
) -> None:
    """Without TLS on the issuer the downgrade rule has nothing to keep; the URL rule still holds."""
    async with issuer(None) as iss, attacker() as thief:
        iss.names(thief.url.replace("127.0.0.1", "0x7f000001") + "/oauth/token")
        proxy = await start_proxy({"auth": {"issuer": iss.url}})
        await assert_refused(
            http, proxy, tokens_log, key="token_endpoint", rule="cleartext", host="0x7f000001"
        )
        assert thief.connections == 0


# ------------------------------------------------------------------ attacks through jwks_uri


async def test_an_untrusted_jwks_uri_refuses_the_whole_document_before_the_secret_is_sent(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tls: Tls, tokens_log: pytest.LogCaptureFixture
) -> None:
    """The document is trusted whole or not at all: its (allowed) token endpoint gets nothing either."""
    async with issuer(tls.server) as iss, attacker(tls.server) as token_thief, attacker() as key_thief:
        iss.names(token_thief.url + "/oauth/token", key_thief.url + "/jwks.json")
        proxy = await start_proxy(https_auth(tls, iss.url))
        await assert_refused(http, proxy, tokens_log, key="jwks_uri", rule="downgrade", host="127.0.0.1")
        assert (token_thief.connections, key_thief.connections) == (0, 0)


async def test_with_a_configured_token_endpoint_the_discovered_jwks_uri_is_still_checked(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tls: Tls,
    tokens_log: pytest.LogCaptureFixture,
) -> None:
    """The verifier reads ``jwks_uri`` from discovery; an untrusted one is never fetched.

    The configured endpoint is the operator's choice and may mint; that token cannot be
    verified, so it is not used. ``/readyz`` then says ``discovery_untrusted`` (the start-up
    discovery failed first) or ``unverified`` (a request's mint got to verification first).
    """
    async with (
        issuer(tls.server) as iss,
        attacker(tls.server) as key_thief,
        emulator_over_tls(tls, iss.url) as emulator_url,
    ):
        iss.names("https://elsewhere.invalid/oauth/token", key_thief.url.replace("127.0.0.1", "localhost"))
        proxy = await start_proxy(https_auth(tls, iss.url, token_endpoint=emulator_url + "/oauth/token"))
        await assert_refused(
            http,
            proxy,
            tokens_log,
            key="jwks_uri",
            rule="host_not_allowed",
            host="localhost",
            details=("discovery_untrusted", "unverified"),
        )
        assert key_thief.connections == 0


# ------------------------------------------------------------------ what keeps working


@contextlib.asynccontextmanager
async def emulator_over_tls(tls: Tls, issuer_url: str | None = None) -> AsyncIterator[str]:
    """The real emulator behind TLS on 127.0.0.1; its tokens name ``issuer_url`` when given."""
    async with serve(make_emulator_app(issuer=issuer_url), tls.server) as port:
        yield f"https://127.0.0.1:{port}"


async def proxied(http: aiohttp.ClientSession, proxy: ProxyServer) -> int:
    async with http.get(proxy.proxy_url + DECISION) as resp:
        await resp.read()
        return resp.status


async def test_an_https_issuer_with_its_endpoints_on_its_own_host_works(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tls: Tls, tokens_log: pytest.LogCaptureFixture
) -> None:
    async with emulator_over_tls(tls) as url:
        proxy = await start_proxy(merge_upstream(https_auth(tls, url), url, tls))
        assert await proxied(http, proxy) == 200
    assert not [r for r in tokens_log.records if getattr(r, "event", None) == "discovery_refused"]


def merge_upstream(config: dict[str, Any], url: str, tls: Tls) -> dict[str, Any]:
    return {**config, "upstream": {"url": url, "ca_file": str(tls.files.ca)}}


async def test_endpoints_on_an_allowed_host_work_and_the_same_document_is_refused_without_the_pin(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tls: Tls, tokens_log: pytest.LogCaptureFixture
) -> None:
    """Issuer on 127.0.0.1, token endpoint and JWKS on ``localhost`` (the emulator, over TLS)."""
    async with issuer(tls.server) as iss, emulator_over_tls(tls, iss.url) as emulator_url:
        elsewhere = emulator_url.replace("127.0.0.1", "localhost")
        iss.names(elsewhere + "/oauth/token", elsewhere + "/.well-known/jwks.json")
        pinned = await start_proxy(
            merge_upstream(https_auth(tls, iss.url, allowed_hosts=["LOCALHOST."]), emulator_url, tls)
        )
        assert await proxied(http, pinned) == 200
        assert not [r for r in tokens_log.records if getattr(r, "event", None) == "discovery_refused"]
        unpinned = await start_proxy(merge_upstream(https_auth(tls, iss.url), emulator_url, tls))
        await assert_refused(
            http, unpinned, tokens_log, key="token_endpoint", rule="host_not_allowed", host="localhost"
        )


async def test_with_verification_off_the_unused_jwks_uri_is_not_judged(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tls: Tls, tokens_log: pytest.LogCaptureFixture
) -> None:
    """``jwks_uri`` is read only to verify tokens; with ``auth.verify: false`` it refuses nothing."""
    async with (
        issuer(tls.server) as iss,
        emulator_over_tls(tls, iss.url) as emulator_url,
        attacker() as key_thief,
    ):
        iss.names(emulator_url + "/oauth/token", key_thief.url + "/jwks.json")  # http: a downgrade
        proxy = await start_proxy(merge_upstream(https_auth(tls, iss.url, verify=False), emulator_url, tls))
        assert await proxied(http, proxy) == 200
        assert key_thief.connections == 0
    assert not [r for r in tokens_log.records if getattr(r, "event", None) == "discovery_refused"]


async def test_a_document_that_turns_untrusted_is_refused_at_its_next_reading(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tls: Tls, tokens_log: pytest.LogCaptureFixture
) -> None:
    """The checks run on every fetch, not once: the re-read an hour later is judged again."""
    now = [time.time()]
    async with (
        issuer(tls.server) as iss,
        emulator_over_tls(tls, iss.url) as emulator_url,
        attacker() as thief,
    ):
        iss.names(emulator_url + "/oauth/token", emulator_url + "/.well-known/jwks.json")
        config = merge_upstream(https_auth(tls, iss.url), emulator_url, tls)
        proxy = await start_proxy(config, clock=lambda: now[0])
        assert await proxied(http, proxy) == 200
        iss.names(thief.url + "/oauth/token", emulator_url + "/.well-known/jwks.json")
        now[0] += 2 * 3600  # the token and the discovery document are both past their time
        async with http.get(proxy.proxy_url + DECISION) as resp:
            assert resp.status == 503
        assert thief.connections == 0
        refused = [r for r in tokens_log.records if getattr(r, "event", None) == "discovery_refused"]
        assert [(r.key, r.rule) for r in refused][:1] == [("token_endpoint", "downgrade")]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ the host rule, as a table

CREDICORP_DOCUMENT = {  # as Credicorp documents it: issuer on sso., token endpoint on api.
    "token_endpoint": "https://api.credicorp.co.uk/oauth/token",
    "jwks_uri": "https://sso.credicorp.co.uk/.well-known/jwks.json",
}


def test_the_default_pin_keeps_credicorps_documented_endpoints_working() -> None:
    trust = DiscoveryTrust.for_settings(AuthSettings())
    assert trust.patterns == ("sso.credicorp.co.uk", "*.credicorp.co.uk")
    assert trust.refusal(CREDICORP_DOCUMENT) is None


@pytest.mark.parametrize(
    ("issuer_host", "expected"),
    [
        ("sso.credicorp.co.uk", ("sso.credicorp.co.uk", "*.credicorp.co.uk")),
        ("SSO.Credicorp.CO.UK.", ("sso.credicorp.co.uk", "*.credicorp.co.uk")),
        ("login.example.com", ("login.example.com", "*.example.com")),
        ("a.b.example.com", ("a.b.example.com", "*.b.example.com")),
        ("example.com", ("example.com",)),  # the parent would be "com"
        ("credicorp.co.uk", ("credicorp.co.uk",)),  # the parent would be "co.uk", a registry suffix
        ("sso.example.com.au", ("sso.example.com.au", "*.example.com.au")),
        ("idp.com.au", ("idp.com.au",)),
        ("auth.bank.de", ("auth.bank.de", "*.bank.de")),
        ("localhost", ("localhost",)),
        ("127.0.0.1", ("127.0.0.1",)),
        ("::1", ("::1",)),
        ("[::1]", ("::1",)),
    ],
)
def test_the_default_pin_is_the_issuer_host_and_hosts_under_its_parent(
    issuer_host: str, expected: tuple[str, ...]
) -> None:
    assert default_patterns(issuer_host) == expected


@pytest.mark.parametrize(
    ("host", "patterns", "allowed"),
    [
        ("api.credicorp.co.uk", ("*.credicorp.co.uk",), True),
        ("a.b.credicorp.co.uk", ("*.credicorp.co.uk",), True),  # one or more labels
        ("API.Credicorp.co.uk.", ("*.credicorp.co.uk",), True),
        ("credicorp.co.uk", ("*.credicorp.co.uk",), False),  # the domain itself is not below it
        ("evilcredicorp.co.uk", ("*.credicorp.co.uk",), False),  # a label boundary, not a suffix
        ("credicorp.co.uk.evil.com", ("*.credicorp.co.uk",), False),
        ("api.credicorp.co.uk", ("sso.credicorp.co.uk",), False),
        ("sso.credicorp.co.uk", ("sso.credicorp.co.uk",), True),
        ("127.0.0.1", ("127.0.0.1",), True),
        ("127.0.0.2", ("127.0.0.1",), False),
        ("::1", ("::1",), True),
        ("0:0::1", ("::1",), True),
        ("localhost", ("127.0.0.1",), False),  # names are not resolved
        ("1.2.3.4", ("*.3.4",), False),  # a wildcard never matches an address
    ],
)
def test_host_matching(host: str, patterns: tuple[str, ...], allowed: bool) -> None:
    assert host_matches(host, patterns) is allowed


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("https://api.credicorp.co.uk/oauth/token", None),
        ("https://api.credicorp.co.uk:8443/oauth/token", None),  # the pin is on hosts, not ports
        ("http://api.credicorp.co.uk/oauth/token", "cleartext"),
        ("http://localhost:8080/oauth/token", "downgrade"),
        ("https://u:p@api.credicorp.co.uk/oauth/token", "userinfo"),
        ("https://api.credicorp.co.uk/oauth/token?x=1", "query_or_fragment"),
        ("https://api.credicorp.co.uk/oauth/token#x", "query_or_fragment"),
        ("https://api.credicorp.co.uk:99999/oauth/token", "not_a_url"),
        ("javascript:alert(1)", "scheme"),
        ("oauth/token", "scheme"),
        ("https://evil.com/oauth/token", "host_not_allowed"),
        ("https://credicorp.co.uk.evil.com/oauth/token", "host_not_allowed"),
        ("https://2130706433/oauth/token", "host_syntax"),
        ("https://0x7f000001/oauth/token", "host_syntax"),
        ("https://0x7f.0.0.1/oauth/token", "host_syntax"),
        ("https://0177.0.0.1/oauth/token", "host_syntax"),
        ("https://0x1.credicorp.co.uk/oauth/token", None),  # a name that merely starts with 0x
        ("https://api.credicorp.co.uk%2eevil.com/oauth/token", "host_syntax"),
        ("https://bücher.credicorp.co.uk/oauth/token", "host_syntax"),
        ("https://api credicorp.co.uk/oauth/token", "host_syntax"),
    ],
)
def test_the_rule_each_discovered_url_breaks(url: str, rule: str | None) -> None:
    refusal = DiscoveryTrust.for_settings(AuthSettings()).refusal({"token_endpoint": url})
    assert (refusal.rule if refusal else None) == rule
    if refusal is not None:
        assert refusal.failure().label == "discovery_untrusted"
        assert "p@" not in (refusal.host or "") and "?" not in (refusal.host or "")


def test_a_configured_token_endpoint_is_not_pinned_but_an_explicit_pin_is_exact() -> None:
    """Only what the document names is judged; the configured list replaces the parent default."""
    auth = AuthSettings(allowed_hosts=("login.partner.example",))
    trust = DiscoveryTrust.for_settings(auth)
    assert trust.patterns == ("sso.credicorp.co.uk", "login.partner.example")
    refused = trust.refusal(CREDICORP_DOCUMENT)
    assert refused is not None and (refused.key, refused.host) == ("token_endpoint", "api.credicorp.co.uk")
    assert trust.refusal({"token_endpoint": None, "jwks_uri": CREDICORP_DOCUMENT["jwks_uri"]}) is None


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("api.credicorp.co.uk", None),
        ("*.credicorp.co.uk", None),
        ("*.example.com", None),
        ("127.0.0.1", None),
        ("::1", None),
        ("[::1]", None),
        ("localhost", None),
        ("*", "expected a host name"),
        ("*.com", "at least two labels"),
        ("*.*.example.com", "a wildcard is"),
        ("api.*.example.com", "expected a host name"),
        ("*.127.0.0.1", "a wildcard is"),
        ("https://api.credicorp.co.uk", "expected a host name"),
        ("api.credicorp.co.uk:443", "expected a host name"),
        ("api.credicorp.co.uk/oauth", "expected a host name"),
        ("127.1", "expected a host name"),
    ],
)
def test_allowed_hosts_entries_are_checked(entry: str, problem: str | None) -> None:
    message = check_allowed_host(entry)
    assert (message is None) if problem is None else (message is not None and problem in message), message


def test_allowed_hosts_comes_from_yaml_or_the_environment_and_bad_entries_are_config_errors() -> None:
    raw = base_config("http://127.0.0.1:1")
    settings = parse_config(raw, env={"CCP_AUTH_ALLOWED_HOSTS": "api.example.com, *.example.org"})
    assert settings.auth.allowed_hosts == ("api.example.com", "*.example.org")
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {**raw, "auth": {**raw["auth"], "allowed_hosts": ["*.com", "ok.example.com", "h:1"]}}, env={}
        )
    text = str(caught.value)
    assert 'auth.allowed_hosts: "*.com": a wildcard needs a domain of at least two labels' in text
    assert '"h:1": expected a host name' in text and "ok.example.com" not in text
