"""JwtVerifier: ES256 only, kid required, iss/aud/exp/scope, JWKS caching and rotation.

Forged and wrong tokens are signed here with keys the test controls and
served from a tiny JWKS endpoint over a real socket; real tokens come from
the Credicorp emulator (minted by ``TokenSource``, as in production).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from proxy.errors import TokenUnavailable
from proxy.metrics import Metrics
from proxy.settings import AuthSettings
from proxy.tokens.credentials import CredentialProvider
from proxy.tokens.source import TokenSource
from proxy.tokens.verify import JwksUnavailable, JwtVerifier, TokenVerificationError, parse_jwks
from tests.helpers import FakeClock, hanging_server

ISSUER = "https://sso.credicorp.test"
AUDIENCE = "partner/v1"
NOW = 1_700_000_000.0


def public_jwk(key: ec.EllipticCurvePrivateKey, kid: str, **extra: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "alg": "ES256", **extra}


class Keys:
    """A JWKS endpoint whose key set the test changes; counts fetches."""

    def __init__(self) -> None:
        self.private: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.published: list[dict[str, Any]] = []
        self.fetches = 0
        self.status = 200
        self.add("k1")

    def add(self, kid: str) -> ec.EllipticCurvePrivateKey:
        key = ec.generate_private_key(ec.SECP256R1())
        self.private[kid] = key
        self.published.append(public_jwk(key, kid))
        return key

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        return app

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.status != 200:
            return web.Response(status=self.status)
        return web.json_response({"keys": self.published})

    def sign(self, kid: str = "k1", *, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        body = {"iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 3600, "scope": "decisions:read", **claims}
        return jwt.encode(body, self.private[kid], algorithm="ES256", headers={"kid": kid, **(headers or {})})


@pytest.fixture
async def keys(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> AsyncIterator[tuple[Keys, str]]:
    served = Keys()
    server = await aiohttp_server(served.app())
    yield served, f"http://{server.host}:{server.port}/jwks"


class JwksFetches:
    """A client session that counts the JWKS documents fetched through it (GETs of a ``jwks`` path)."""

    def __init__(self) -> None:
        self.count = 0
        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(self._started)
        self.session = aiohttp.ClientSession(trace_configs=[trace])

    async def _started(self, _: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        if params.method == "GET" and "jwks" in params.url.path:
            self.count += 1


@pytest.fixture
async def jwks_fetches() -> AsyncIterator[JwksFetches]:
    counted = JwksFetches()
    async with counted.session:
        yield counted


def verifier_for(session: aiohttp.ClientSession, uri: str, clock: FakeClock) -> JwtVerifier:
    return JwtVerifier(session, ISSUER, clock=clock, jwks_uri=uri)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def hs256_confusion(claims: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    """The algorithm-confusion forgery: HS256 keyed with the (public) verification key."""
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64({'alg': 'HS256', 'kid': 'k1', 'typ': 'JWT'})}.{b64(claims)}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def tamper(token: str, claims: dict[str, Any]) -> str:
    """``token`` with its payload replaced and its original signature kept."""
    header, _, signature = token.split(".")
    return f"{header}.{b64(claims)}.{signature}"


# --------------------------------------------------------------------------- accepted


async def test_a_valid_token_verifies_and_keys_are_cached(
    keys: tuple[Keys, str], session: aiohttp.ClientSession
) -> None:
    served, uri = keys
    verifier = verifier_for(session, uri, FakeClock(NOW))
    claims = await verifier.verify(served.sign(), audience=AUDIENCE, scopes=("decisions:read",))
    assert claims["iss"] == ISSUER
    await verifier.verify(served.sign(aud=[AUDIENCE, "other"]), audience=AUDIENCE, scopes=())
    assert served.fetches == 1


async def test_scp_list_claim_is_accepted(keys: tuple[Keys, str], session: aiohttp.ClientSession) -> None:
    served, uri = keys
    token = served.sign(scope=None, scp=["decisions:read", "payments:read"])
    verifier = verifier_for(session, uri, FakeClock(NOW))
    await verifier.verify(token, audience=AUDIENCE, scopes=("payments:read",))


async def test_keys_are_refetched_after_the_cache_ttl(
    keys: tuple[Keys, str], session: aiohttp.ClientSession
) -> None:
    served, uri = keys
    clock = FakeClock(NOW)
    verifier = verifier_for(session, uri, clock)
    await verifier.verify(served.sign(), audience=AUDIENCE, scopes=())
    clock.now += 601
    await verifier.verify(served.sign(exp=clock.now + 60), audience=AUDIENCE, scopes=())
    assert served.fetches == 2


async def test_unknown_kid_refetches_at_most_once_per_interval(
    keys: tuple[Keys, str], session: aiohttp.ClientSession
) -> None:
    served, uri = keys
    clock = FakeClock(NOW)
    verifier = verifier_for(session, uri, clock)
    await verifier.verify(served.sign(), audience=AUDIENCE, scopes=())
    served.add("k2")  # rotation: a new key published after our fetch
    clock.now += 2
    for _ in range(5):  # a burst of unknown kids inside the interval: no fetch storm
        with pytest.raises(TokenVerificationError, match="unknown key"):
            await verifier.verify(served.sign("k2"), audience=AUDIENCE, scopes=())
    assert served.fetches == 1
    clock.now += 10
    await verifier.verify(served.sign("k2"), audience=AUDIENCE, scopes=())
    assert served.fetches == 2


async def test_stale_keys_are_kept_when_a_refresh_fails(
    keys: tuple[Keys, str], session: aiohttp.ClientSession
) -> None:
    served, uri = keys
    clock = FakeClock(NOW)
    verifier = verifier_for(session, uri, clock)
    await verifier.verify(served.sign(), audience=AUDIENCE, scopes=())
    served.status = 503
    clock.now += 601
    await verifier.verify(served.sign(exp=clock.now + 60), audience=AUDIENCE, scopes=())


async def test_jwks_unavailable_without_cached_keys(
    keys: tuple[Keys, str], session: aiohttp.ClientSession
) -> None:
    served, uri = keys
    served.status = 500
    with pytest.raises(JwksUnavailable):
        await verifier_for(session, uri, FakeClock(NOW)).verify(served.sign(), audience=AUDIENCE, scopes=())


async def test_a_hung_jwks_fetch_is_shared_by_every_waiting_token(
    keys: tuple[Keys, str], jwks_fetches: JwksFetches
) -> None:
    """Concurrent verifications share one JWKS fetch and its failure: one timeout, not one each."""
    served, _ = keys
    async with hanging_server() as hung:
        verifier = JwtVerifier(
            jwks_fetches.session, ISSUER, clock=FakeClock(NOW), jwks_uri=hung.url + "/jwks", timeout_s=0.5
        )
        started = time.monotonic()
        results = await asyncio.gather(
            *(verifier.verify(served.sign(), audience=AUDIENCE, scopes=()) for _ in range(6)),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
    assert all(isinstance(r, JwksUnavailable) for r in results), results
    assert hung.connections == 1 and jwks_fetches.count == 1
    assert elapsed < 1.5


def test_only_p256_signing_keys_are_taken_from_a_jwks() -> None:
    good = public_jwk(ec.generate_private_key(ec.SECP256R1()), "good")
    p384 = public_jwk(ec.generate_private_key(ec.SECP384R1()), "p384", alg="ES384")
    rsa_key = json.loads(
        jwt.algorithms.RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 2048).public_key())
    )
    document = {
        "keys": [
            good,
            p384,
            {**rsa_key, "kid": "rsa"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**good, "kid": "enc", "use": "enc"},
            {**good, "kid": None},
            "junk",
        ]
    }
    assert list(parse_jwks(document)) == ["good"]
    with pytest.raises(JwksUnavailable):
        parse_jwks({"nokeys": []})


# --------------------------------------------------------------------------- refused


async def test_forged_and_wrong_tokens_are_rejected(
    keys: tuple[Keys, str], session: aiohttp.ClientSession
) -> None:
    served, uri = keys
    verifier = verifier_for(session, uri, FakeClock(NOW))
    stranger = ec.generate_private_key(ec.SECP256R1())
    header = {"alg": "none", "kid": "k1", "typ": "JWT"}
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 3600, "scope": "decisions:read"}
    forged = {
        "hs256 keyed with the public key": hs256_confusion(claims, served.private["k1"]),
        "alg none": f"{b64(header)}.{b64(claims)}.",
        "alg None spelled differently": f"{b64({**header, 'alg': 'None'})}.{b64(claims)}.",
        "es256 signed by a stranger": jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": "k1"}),
        "es384": jwt.encode(
            claims, ec.generate_private_key(ec.SECP384R1()), algorithm="ES384", headers={"kid": "k1"}
        ),
        "no kid": jwt.encode(claims, served.private["k1"], algorithm="ES256"),
        "wrong issuer": served.sign(iss="https://sso.evil.example"),
        "wrong audience": served.sign(aud="internal/v1"),
        "expired": served.sign(exp=NOW - 31),
        "not yet valid": served.sign(nbf=NOW + 120),
        "missing exp": served.sign(exp=None),
        "scope not granted": served.sign(scope="payments:read"),
        "not a jwt": "opaque-bearer-value",
        "tampered payload": tamper(served.sign(), {**claims, "scope": "decisions:read payments:write"}),
    }
    for name, token in forged.items():
        with pytest.raises(TokenVerificationError) as caught:
            await verifier.verify(token, audience=AUDIENCE, scopes=("decisions:read",))
        assert token not in str(caught.value), name


async def test_leeway_accepts_a_token_just_past_exp(
    keys: tuple[Keys, str], session: aiohttp.ClientSession
) -> None:
    served, uri = keys
    verifier = verifier_for(session, uri, FakeClock(NOW))
    await verifier.verify(served.sign(exp=NOW - 10), audience=AUDIENCE, scopes=())


# --------------------------------------------------------------------------- with the emulator


@pytest.fixture
async def emu() -> AsyncIterator[Any]:
    app_module = pytest.importorskip("proxy.emulator.app")
    async with app_module.EmulatorServer(port=0, rate_limit=None) as server:
        yield server


def emulator_source(
    url: str, session: aiohttp.ClientSession, clock: FakeClock, metrics: Metrics | None = None
) -> tuple[TokenSource, JwtVerifier]:
    auth = AuthSettings(issuer=url, client_id="cc_client_demo", client_secret="demo-secret")
    verifier = JwtVerifier(session, url, clock=clock)
    creds = CredentialProvider(auth.client_id, secret=auth.client_secret)
    source = TokenSource(
        auth, creds, session, clock=clock, metrics=metrics, verifier=verifier, rng=random.Random(1)
    )
    return source, verifier


async def test_emulator_tokens_verify_and_a_rotated_key_is_picked_up(
    emu: Any, jwks_fetches: JwksFetches
) -> None:
    clock, session = FakeClock(), jwks_fetches.session
    source, verifier = emulator_source(emu.url, session, clock)
    first = await source.mint(("decisions:read",), AUDIENCE)
    claims = await verifier.verify(first.value, audience=AUDIENCE, scopes=first.scopes)
    old_kid = jwt.get_unverified_header(first.value)["kid"]
    assert claims["iss"] == emu.url and jwks_fetches.count == 1

    async with session.post(f"{emu.url}/_emulator/rotate-signing-key") as resp:
        assert resp.status < 300
    clock.now += 11  # past the unknown-kid refetch interval
    second = await source.mint(("payments:read",), AUDIENCE)  # verified inside mint
    assert jwt.get_unverified_header(second.value)["kid"] != old_kid
    assert jwks_fetches.count == 2


async def test_emulator_token_checked_against_the_wrong_audience_is_refused(
    emu: Any, session: aiohttp.ClientSession
) -> None:
    source, verifier = emulator_source(emu.url, session, FakeClock())
    token = await source.mint(("decisions:read",), AUDIENCE)
    with pytest.raises(TokenVerificationError, match="audience"):
        await verifier.verify(token.value, audience="internal/v1", scopes=token.scopes)


async def test_a_token_failing_verification_is_not_returned_by_the_source(
    emu: Any, session: aiohttp.ClientSession
) -> None:
    """Verifier pointed at a different issuer: every minted token fails, the source backs off."""
    clock = FakeClock()
    metrics = Metrics()
    auth = AuthSettings(issuer=emu.url, client_id="cc_client_demo", client_secret="demo-secret")
    verifier = JwtVerifier(session, "https://sso.credicorp.co.uk", clock=clock)
    creds = CredentialProvider(auth.client_id, secret=auth.client_secret)
    source = TokenSource(auth, creds, session, clock=clock, metrics=metrics, verifier=verifier)
    with pytest.raises(TokenUnavailable, match="verification"):
        await source.mint(("decisions:read",), AUDIENCE)
    labels = {"scopes": "decisions:read", "result": "unverified"}
    assert metrics.registry.get_sample_value("ccp_token_mints_total", labels) == 1
    assert source.health().backing_off_until is not None
