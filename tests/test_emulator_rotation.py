"""Credential life cycle: two-secret rotation, signing-key rotation, revoke-all, expiry."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import jwt

from proxy.emulator.state import ClientSpec, secret_id
from proxy.emulator.testing import DEMO_ID, DEMO_SECRET, EmulatorClient

DECISION = "/partner/v1/decisions/dec_demo_001"


async def _jwks(client: EmulatorClient) -> dict:
    async with client.session.get(f"{client.url}/.well-known/jwks.json") as resp:
        return await resp.json()


async def test_zero_downtime_secret_rotation(emu_client: EmulatorClient):
    """The documented roll: add a second secret, both mint, revoke the old one."""
    status, body = await emu_client.control("POST", f"/clients/{DEMO_ID}/secrets", {"secret": "new-secret"})
    assert status == 201 and body["secret"]["id"] == secret_id("new-secret")
    old_token = await emu_client.mint("decisions:read")
    new_token = await emu_client.mint("decisions:read", secret="new-secret")
    assert (await emu_client.stats())["tokens_by_secret"] == {
        f"{DEMO_ID}/{secret_id(DEMO_SECRET)}": 1,
        f"{DEMO_ID}/{secret_id('new-secret')}": 1,
    }
    _, clients = await emu_client.control("GET", "/clients")
    secrets = clients["clients"][0]["secrets"]
    assert [s["tokens_issued"] for s in secrets] == [1, 1] and all(s["last_used_at"] for s in secrets)
    assert "demo-secret" not in str(clients)  # only hints and ids, never the secret

    status, _ = await emu_client.control("DELETE", f"/clients/{DEMO_ID}/secrets/{DEMO_SECRET}")
    assert status == 204
    status, _, body = await emu_client.token_request("decisions:read")
    assert (status, body["error"]) == (401, "invalid_client")
    assert (await emu_client.token_request("decisions:read", secret="new-secret"))[0] == 200
    # tokens already issued under the revoked secret stay valid until they expire
    assert (await emu_client.api("GET", DECISION, old_token))[0] == 200
    assert (await emu_client.api("GET", DECISION, new_token))[0] == 200


async def test_at_most_two_live_secrets(emu_client: EmulatorClient):
    path = f"/clients/{DEMO_ID}/secrets"
    assert (await emu_client.control("POST", path, {"secret": "second"}))[0] == 201
    status, body = await emu_client.control("POST", path, {"secret": "third"})
    assert status == 409 and body["error"] == "conflict"
    assert (await emu_client.token_request(secret="third"))[0] == 401
    assert (await emu_client.control("POST", path, {"secret": "second"}))[0] == 409  # already live


async def test_secret_control_errors(emu_client: EmulatorClient):
    assert (await emu_client.control("POST", "/clients/cc_client_nope/secrets", {"secret": "x"}))[0] == 404
    assert (await emu_client.control("DELETE", f"/clients/{DEMO_ID}/secrets/not-live"))[0] == 404
    status, body = await emu_client.control("POST", f"/clients/{DEMO_ID}/secrets", {"secret": ""})
    assert status == 400 and body["error"] == "invalid_request"


async def test_client_spec_allows_two_secrets_from_the_start(make_emulator):
    spec = ClientSpec("cc_client_two", ("one", "two"), frozenset({"decisions:read"}))
    emu = await make_emulator(clients=[spec])
    async with aiohttp.ClientSession() as session:
        client = EmulatorClient(session, emu.url)
        for secret in ("one", "two"):
            assert (await client.token_request(client_id="cc_client_two", secret=secret))[0] == 200


async def test_key_rotation_keeps_the_previous_key_published(emu_client: EmulatorClient):
    before = await emu_client.mint("decisions:read")
    old_kid = jwt.get_unverified_header(before)["kid"]
    status, body = await emu_client.control("POST", "/rotate-signing-key")
    assert status == 200 and body["published"] == [body["kid"], old_kid]
    jwks = await _jwks(emu_client)
    assert [k["kid"] for k in jwks["keys"]] == [body["kid"], old_kid]

    after = await emu_client.mint("decisions:read")
    assert jwt.get_unverified_header(after)["kid"] == body["kid"]
    keyset = jwt.PyJWKSet.from_dict(jwks)
    for token in (before, after):  # both verify independently against the published JWKS
        kid = jwt.get_unverified_header(token)["kid"]
        jwt.decode(token, keyset[kid], algorithms=["ES256"], audience="partner/v1", issuer=emu_client.url)
        assert (await emu_client.api("GET", DECISION, token))[0] == 200

    await emu_client.control("POST", "/rotate-signing-key")  # the first key is now unpublished
    assert old_kid not in [k["kid"] for k in (await _jwks(emu_client))["keys"]]
    status, headers, _ = await emu_client.api("GET", DECISION, before)
    assert status == 401
    assert headers["WWW-Authenticate"] == (
        'Bearer error="invalid_token", error_description="The access token is not signed by a published key"'
    )
    assert (await emu_client.api("GET", DECISION, after))[0] == 200


async def test_revoke_all_invalidates_issued_tokens_only(emu_client: EmulatorClient):
    issued = [await emu_client.mint("decisions:read"), await emu_client.mint("accounts:read")]
    status, body = await emu_client.control("POST", "/revoke-all")
    assert (status, body) == (200, {"revoked": 2})
    for token in issued:
        status, headers, _ = await emu_client.api("GET", DECISION, token)
        assert status == 401 and "has been revoked" in headers["WWW-Authenticate"]
    fresh = await emu_client.mint("decisions:read")
    assert (await emu_client.api("GET", DECISION, fresh))[0] == 200


async def test_revoke_all_for_one_client(make_emulator):
    specs = [ClientSpec(f"cc_client_{i}", ("s",), frozenset({"decisions:read"})) for i in "ab"]
    emu = await make_emulator(clients=specs)
    async with aiohttp.ClientSession() as session:
        client = EmulatorClient(session, emu.url)
        a, b = [await client.mint(client_id=f"cc_client_{i}", secret="s") for i in "ab"]
        assert (await client.control("POST", "/revoke-all", {"client_id": "cc_client_a"}))[1] == {
            "revoked": 1
        }
        assert (await client.api("GET", DECISION, a))[0] == 401
        assert (await client.api("GET", DECISION, b))[0] == 200


async def test_expire_all_treats_issued_tokens_as_expired(emu_client: EmulatorClient):
    token = await emu_client.mint("decisions:read")
    assert (await emu_client.control("POST", "/expire-all"))[1] == {"expired": 1}
    status, headers, body = await emu_client.api("GET", DECISION, token)
    assert status == 401 and body["error"] == "invalid_token"
    assert (
        headers["WWW-Authenticate"]
        == 'Bearer error="invalid_token", error_description="The access token expired"'
    )
    form = {"token": token, "client_id": DEMO_ID, "client_secret": DEMO_SECRET}
    async with emu_client.session.post(f"{emu_client.url}/oauth/introspect", data=form) as resp:
        assert await resp.json() == {"active": False}
    assert (await emu_client.api("GET", DECISION, await emu_client.mint("decisions:read")))[0] == 200


async def test_tokens_expire_after_their_ttl(make_emulator):
    emu = await make_emulator(token_ttl=2)  # iat is whole seconds, so a 2 s token lives at least 1 s
    async with aiohttp.ClientSession() as session:
        client = EmulatorClient(session, emu.url)
        status, _, body = await client.token_request("decisions:read")
        assert status == 200 and body["expires_in"] == 2
        token = body["access_token"]
        assert (await client.api("GET", DECISION, token))[0] == 200
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        await asyncio.sleep(max(0.0, exp - time.time()) + 0.05)
        status, headers, _ = await client.api("GET", DECISION, token)
        assert status == 401 and 'error_description="The access token expired"' in headers["WWW-Authenticate"]


async def test_token_ttl_can_change_at_run_time(emu_client: EmulatorClient):
    status, body = await emu_client.control("POST", "/settings", {"token_ttl": 120})
    assert (status, body) == (200, {"token_ttl": 120, "rate_limit": 10})
    _, _, token = await emu_client.token_request("decisions:read")
    assert token["expires_in"] == 120
    status, body = await emu_client.control("POST", "/settings", {"token_ttl": 0, "color": "red"})
    assert status == 400 and len(body["problems"]) == 2
