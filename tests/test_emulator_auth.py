"""The emulated authorization server against the Credicorp OAuth 2.0 page (seeds/000)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil

import aiohttp
import jwt
import pytest

from proxy.emulator.app import EmulatorServer
from proxy.emulator.state import ClientSpec
from proxy.emulator.testing import DEMO_ID, DEMO_SECRET, EmulatorClient, basic_header
from proxy.scopes import PARTNER_SCOPES

SEED_SCOPE = "applications:write decisions:read payments:write"


def verify_with_jwks(token: str, jwks: dict, issuer: str, audience: str = "partner/v1") -> dict:
    """Verify like an independent client would: PyJWT, keys only from the published JWKS."""
    keyset = jwt.PyJWKSet.from_dict(jwks)
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keyset.keys if k.key_id == kid)
    return jwt.decode(token, key, algorithms=["ES256"], audience=audience, issuer=issuer)


async def test_discovery_document_points_at_this_emulator(
    emulator: EmulatorServer, emu_client: EmulatorClient
):
    async with emu_client.session.get(f"{emulator.url}/.well-known/openid-configuration") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["issuer"] == emulator.url
    assert doc["token_endpoint"] == f"{emulator.url}/oauth/token"
    assert doc["jwks_uri"] == f"{emulator.url}/.well-known/jwks.json"
    assert doc["revocation_endpoint"] == f"{emulator.url}/oauth/revoke"
    assert doc["introspection_endpoint"] == f"{emulator.url}/oauth/introspect"
    assert "client_credentials" in doc["grant_types_supported"]
    assert doc["token_endpoint_auth_methods_supported"] == ["client_secret_post", "client_secret_basic"]
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
    assert PARTNER_SCOPES <= set(doc["scopes_supported"])


async def test_fixed_issuer_is_used_in_discovery_and_tokens(make_emulator):
    emu = await make_emulator(issuer="https://sso.credicorp.example")
    async with aiohttp.ClientSession() as session:
        client = EmulatorClient(session, emu.url)
        async with session.get(f"{emu.url}/.well-known/openid-configuration") as resp:
            assert (await resp.json())["token_endpoint"] == "https://sso.credicorp.example/oauth/token"
        token = await client.mint("decisions:read")
        assert (
            jwt.decode(token, options={"verify_signature": False})["iss"] == "https://sso.credicorp.example"
        )
        status, _, _ = await client.api("GET", "/partner/v1/decisions/dec_demo_001", token)
        assert status == 200


async def test_jwks_publishes_p256_es256_public_keys(emulator: EmulatorServer, emu_client: EmulatorClient):
    async with emu_client.session.get(f"{emulator.url}/.well-known/jwks.json") as resp:
        jwks = await resp.json()
    [key] = jwks["keys"]
    assert key["kty"] == "EC" and key["crv"] == "P-256"
    assert key["alg"] == "ES256" and key["use"] == "sig" and key["kid"].startswith("cc-")
    assert "d" not in key  # never the private part


async def test_seed_curl_mints_a_token_that_verifies_against_the_jwks(emulator, emu_client):
    """The exact curl of the OAuth 2.0 page, run as curl, and the token checked with PyJWT."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", f"{emulator.url}/oauth/token",
        "-d", "grant_type=client_credentials", "-d", f"client_id={DEMO_ID}",
        "-d", f"client_secret={DEMO_SECRET}", "-d", f"scope={SEED_SCOPE}",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    body = json.loads(out)
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600 and body["scope"] == SEED_SCOPE
    async with emu_client.session.get(f"{emulator.url}/.well-known/jwks.json") as resp:
        jwks = await resp.json()
    claims = verify_with_jwks(body["access_token"], jwks, emulator.url)
    assert claims["scope"] == SEED_SCOPE
    assert claims["sub"] == claims["client_id"] == DEMO_ID
    assert claims["exp"] - claims["iat"] == 3600 and claims["jti"]
    assert jwt.get_unverified_header(body["access_token"]) == {"alg": "ES256", "kid": jwks["keys"][0]["kid"]}


async def test_token_response_shape_and_no_store(emu_client: EmulatorClient):
    status, headers, body = await emu_client.token_request("decisions:read")
    assert status == 200
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert headers["Cache-Control"] == "no-store"


async def test_basic_auth_mints_the_same_as_post(emulator, emu_client: EmulatorClient):
    status, _, body = await emu_client.token_request("accounts:read", basic=True)
    assert status == 200 and body["scope"] == "accounts:read"
    log = (await emu_client.control("GET", "/requests"))[1]["token_requests"]
    assert log[-1]["auth_method"] == "client_secret_basic" and log[-1]["client_id"] == DEMO_ID


async def test_basic_credentials_are_form_decoded(make_emulator):
    emu = await make_emulator(
        clients=[ClientSpec("cc_client_x", ("p@ss word+:/",), frozenset({"decisions:read"}))]
    )
    async with aiohttp.ClientSession() as session:
        raw = base64.b64encode(b"cc_client_x:p%40ss+word%2B%3A%2F").decode()
        form = {"grant_type": "client_credentials"}
        headers = {"Authorization": f"Basic {raw}"}
        async with session.post(f"{emu.url}/oauth/token", data=form, headers=headers) as resp:
            assert resp.status == 200, await resp.text()


async def test_omitted_scope_is_the_full_granted_set(emu_client: EmulatorClient):
    _, _, body = await emu_client.token_request(None)
    assert body["scope"] == " ".join(sorted(PARTNER_SCOPES))


async def test_audience_internal_only_when_provisioned(make_emulator):
    emu = await make_emulator(clients=[ClientSpec("cc_client_p", ("s",), frozenset({"decisions:read"}))])
    async with aiohttp.ClientSession() as session:
        client = EmulatorClient(session, emu.url)
        status, _, body = await client.token_request(
            client_id="cc_client_p", secret="s", audience="internal/v1"
        )
        assert (status, body["error"]) == (400, "invalid_request")
        demo_emu = await EmulatorServer().start()
        try:
            demo = EmulatorClient(session, demo_emu.url)
            token = await demo.mint("decisions:read", audience="internal/v1")
            assert jwt.decode(token, options={"verify_signature": False})["aud"] == "internal/v1"
            status, headers, _ = await demo.api("GET", "/partner/v1/decisions/dec_demo_001", token)
            assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
        finally:
            await demo_emu.stop()


GOOD_FORM = {"grant_type": "client_credentials", "client_id": DEMO_ID, "client_secret": DEMO_SECRET}


@pytest.mark.parametrize(
    ("changes", "status", "error"),
    [
        ({"grant_type": None}, 400, "invalid_request"),
        ({"grant_type": ""}, 400, "invalid_request"),
        ({"client_id": None}, 400, "invalid_request"),
        ({"client_secret": None}, 400, "invalid_request"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"client_id": "cc_client_nope"}, 401, "invalid_client"),
        ({"client_secret": "wrong"}, 401, "invalid_client"),
        ({"scope": "decisions:write"}, 400, "invalid_scope"),
        ({"scope": "decisions:read openid"}, 400, "invalid_scope"),
        ({"scope": ""}, 400, "invalid_scope"),
    ],
)
async def test_token_errors_of_the_seed_table(emulator, emu_client, changes, status, error):
    form = {k: v for k, v in {**GOOD_FORM, **changes}.items() if v is not None}
    async with emu_client.session.post(f"{emulator.url}/oauth/token", data=form) as resp:
        body = await resp.json()
        assert (resp.status, body["error"]) == (status, error)
        assert body["error_description"]
        assert resp.headers["Cache-Control"] == "no-store"
        assert "WWW-Authenticate" not in resp.headers  # no Basic was used
    assert (await emu_client.stats())["tokens_issued"] == 0


async def test_invalid_client_over_basic_challenges_basic(emu_client: EmulatorClient):
    status, headers, body = await emu_client.token_request("decisions:read", basic=True, secret="wrong")
    assert (status, body["error"]) == (401, "invalid_client")
    assert headers["WWW-Authenticate"] == 'Basic realm="credicorp"'


async def test_not_granted_scope_is_invalid_scope(make_emulator):
    emu = await make_emulator(clients=[ClientSpec("cc_client_r", ("s",), frozenset({"decisions:read"}))])
    async with aiohttp.ClientSession() as session:
        client = EmulatorClient(session, emu.url)
        status, _, body = await client.token_request("payments:write", client_id="cc_client_r", secret="s")
        assert (status, body["error"]) == (400, "invalid_scope") and "payments:write" in body[
            "error_description"
        ]


@pytest.mark.parametrize(
    ("headers", "data"),
    [
        ({"Authorization": "Basic " + base64.b64encode(b"cc_client_other:x").decode()},
         {"grant_type": "client_credentials", "client_id": DEMO_ID}),  # two different ids
        ({"Authorization": "Basic " + base64.b64encode(f"{DEMO_ID}:{DEMO_SECRET}".encode()).decode()},
         {"grant_type": "client_credentials", "client_secret": DEMO_SECRET}),  # two methods
        ({"Authorization": "Basic !!notbase64"}, {"grant_type": "client_credentials"}),
        ({}, "grant_type=client_credentials&grant_type=client_credentials&client_id=a&client_secret=b"),
    ],
)  # fmt: skip
async def test_malformed_client_authentication_is_invalid_request(emulator, emu_client, headers, data):
    if isinstance(data, str):
        headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    async with emu_client.session.post(f"{emulator.url}/oauth/token", data=data, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"


async def test_json_body_is_invalid_request(emulator, emu_client: EmulatorClient):
    form = {"grant_type": "client_credentials", "client_id": DEMO_ID, "client_secret": DEMO_SECRET}
    async with emu_client.session.post(f"{emulator.url}/oauth/token", json=form) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"


async def test_rate_limit_10_per_second_then_429_with_retry_after(emulator, emu_client: EmulatorClient):
    results = await asyncio.gather(*(emu_client.token_request("decisions:read") for _ in range(12)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 10 + [429] * 2
    limited = next(r for r in results if r[0] == 429)
    assert limited[2]["error"] == "slow_down"
    assert int(limited[1]["Retry-After"]) >= 1
    stats = await emu_client.stats()
    assert (stats["rate_limited"], stats["token_requests"], stats["tokens_issued"]) == (2, 12, 10)
    await asyncio.sleep(1.05)  # the sliding window has moved on
    assert (await emu_client.token_request("decisions:read"))[0] == 200


async def test_rate_limit_is_per_client_and_can_be_switched_off(make_emulator):
    clients = [ClientSpec(f"cc_client_{i}", ("s",), frozenset({"decisions:read"})) for i in "ab"]
    emu = await make_emulator(clients=clients, rate_limit=2)
    async with aiohttp.ClientSession() as session:
        client = EmulatorClient(session, emu.url)
        a = [await client.token_request(client_id="cc_client_a", secret="s") for _ in range(3)]
        b = [await client.token_request(client_id="cc_client_b", secret="s") for _ in range(2)]
        assert [r[0] for r in a] == [200, 200, 429] and [r[0] for r in b] == [200, 200]
        status, body = await client.control("POST", "/settings", {"rate_limit": None})
        assert status == 200 and body["rate_limit"] is None
        assert [(await client.token_request(client_id="cc_client_a", secret="s"))[0] for _ in range(5)] == [
            200
        ] * 5


async def test_counters_by_scope_secret_and_audience(emu_client: EmulatorClient):
    await emu_client.mint("payments:read decisions:read")
    await emu_client.mint("decisions:read payments:read")
    await emu_client.mint("decisions:read", audience="internal/v1")
    stats = await emu_client.stats()
    assert stats["tokens_by_scope"] == {"decisions:read payments:read": 2, "decisions:read": 1}
    assert stats["tokens_by_audience"] == {"partner/v1": 2, "internal/v1": 1}
    assert list(stats["tokens_by_secret"].values()) == [3]


async def test_revoke_invalidates_only_that_token(emu_client: EmulatorClient):
    token, other = await emu_client.mint("decisions:read"), await emu_client.mint("decisions:read")
    form = {"token": token, "client_id": DEMO_ID, "client_secret": DEMO_SECRET}
    async with emu_client.session.post(f"{emu_client.url}/oauth/revoke", data=form) as resp:
        assert resp.status == 200
    status, headers, body = await emu_client.api("GET", "/partner/v1/decisions/dec_demo_001", token)
    assert status == 401 and body["error"] == "invalid_token"
    assert headers["WWW-Authenticate"] == (
        'Bearer error="invalid_token", error_description="The access token has been revoked"'
    )
    assert (await emu_client.api("GET", "/partner/v1/decisions/dec_demo_001", other))[0] == 200
    assert (await emu_client.stats())["revocations"] == 1


async def test_revoke_unknown_token_is_200_but_needs_client_auth(emu_client: EmulatorClient):
    url = f"{emu_client.url}/oauth/revoke"
    form = {"token": "not-a-token", "client_id": DEMO_ID, "client_secret": DEMO_SECRET}
    async with emu_client.session.post(url, data=form) as resp:
        assert resp.status == 200
    async with emu_client.session.post(url, data={**form, "client_secret": "wrong"}) as resp:
        assert resp.status == 401 and (await resp.json())["error"] == "invalid_client"
    async with emu_client.session.post(
        url, data={"client_id": DEMO_ID, "client_secret": DEMO_SECRET}
    ) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"


async def test_introspect_active_then_inactive_after_revoke(emu_client: EmulatorClient):
    token = await emu_client.mint("decisions:read accounts:read")
    url = f"{emu_client.url}/oauth/introspect"
    auth = {"Authorization": basic_header(DEMO_ID, DEMO_SECRET)}
    async with emu_client.session.post(url, data={"token": token}, headers=auth) as resp:
        info = await resp.json()
    assert info["active"] is True
    assert info["scope"] == "accounts:read decisions:read" and info["client_id"] == DEMO_ID
    assert info["aud"] == "partner/v1" and info["iss"] == emu_client.url and info["token_type"] == "Bearer"
    assert info["exp"] - info["iat"] == 3600
    async with emu_client.session.post(f"{emu_client.url}/oauth/revoke", data={"token": token}, headers=auth):
        pass
    for candidate in (token, "garbage", token[:-4] + "AAAA"):
        async with emu_client.session.post(url, data={"token": candidate}, headers=auth) as resp:
            assert await resp.json() == {"active": False}
    assert (await emu_client.stats())["introspections"] == 4


async def test_introspect_hides_other_clients_tokens(make_emulator):
    clients = [ClientSpec(f"cc_client_{i}", ("s",), frozenset({"decisions:read"})) for i in "ab"]
    emu = await make_emulator(clients=clients)
    async with aiohttp.ClientSession() as session:
        client = EmulatorClient(session, emu.url)
        token = await client.mint(client_id="cc_client_a", secret="s")
        form = {"token": token, "client_id": "cc_client_b", "client_secret": "s"}
        async with session.post(f"{emu.url}/oauth/introspect", data=form) as resp:
            assert await resp.json() == {"active": False}
