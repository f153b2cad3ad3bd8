"""A token read from Redis is sent only if it is exactly the token its slot should hold.

Each test plays someone who can write Redis against a real proxy, a real
redis-server and the real emulator: without an encryption key they can put
any value in a slot; with one, they can still write an older sealed value of
the same slot back. What reached the API is read from the emulator's request
log, which names the client and scopes of the bearer each request carried.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.app import ProxyServer
from proxy.config import parse_config
from proxy.emulator.app import EmulatorServer
from proxy.emulator.state import DEMO_CLIENT, ClientSpec
from proxy.emulator.testing import EmulatorClient
from proxy.metrics import Metrics
from proxy.scopes import PARTNER_SCOPES
from proxy.settings import CacheSettings
from proxy.tokens.model import CacheKey, Credentials
from proxy.tokens.redis_cache import RedisTokenCache
from tests.at_rest import open_sealed
from tests.conftest import MakeEmulator
from tests.helpers import cli
from tests.proxy_fixtures import base_config, merge, scrape
from tests.redis_fixtures import RedisServer

OTHER_ID, OTHER_SECRET = "cc_client_other", "other-secret"
OTHER_CLIENT = ClientSpec(OTHER_ID, (OTHER_SECRET,), PARTNER_SCOPES)
DECISION = "/partner/v1/decisions/dec_demo_001"
SLOT_SCOPES = ("decisions:read",)
AUDIENCE = "partner/v1"
KEY = CacheKey.create(Credentials.create("cc_client_demo", "demo-secret"), SLOT_SCOPES, AUDIENCE)
SLOT = f"ccp:tok:{{{KEY.storage_id()}}}"
REJECTED = "ccp_redis_tokens_rejected_total"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def plain_value(token: str, *, exp: float, scopes: tuple[str, ...] = SLOT_SCOPES) -> bytes:
    """A stored value in today's unkeyed format, metadata chosen by the writer (here: the attacker)."""
    payload = {"t": token, "iat": time.time(), "exp": exp, "s": list(scopes), "a": AUDIENCE}
    return json.dumps({"v": 1, "d": digest(token), "p": payload}).encode()


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


@dataclass
class Rig:
    emulator: EmulatorServer
    redis: RedisServer
    http: aiohttp.ClientSession
    emu: EmulatorClient
    tmp: Path
    servers: list[ProxyServer] = field(default_factory=list)

    async def proxy(self, overrides: dict[str, Any] | None = None) -> ProxyServer:
        cache = {"cache": {"url": self.redis.url}}
        raw = merge(merge(base_config(self.emulator.url), cache), overrides or {})
        server = await ProxyServer(parse_config(raw, env={})).start()
        self.servers.append(server)
        return server

    async def emulator_settings(self, **settings: Any) -> None:
        async with self.http.post(self.emulator.url + "/_emulator/settings", json=settings) as resp:
            assert resp.status == 200, await resp.text()

    async def get(self, proxy: ProxyServer) -> int:
        async with self.http.get(proxy.proxy_url + DECISION) as resp:
            await resp.read()
            return resp.status

    async def api_bearers(self) -> list[dict[str, Any]]:
        """Who each partner/v1 request's bearer was issued to (client, scopes, jti), in order."""
        return [entry["auth"] for entry in await self.emu.requests() if entry["raw_path"] == DECISION]

    def write(self, value: bytes) -> None:
        with self.redis.client() as client:
            client.set(SLOT, value, ex=3600)

    def stored(self) -> bytes | None:
        with self.redis.client() as client:
            value: bytes | None = client.get(SLOT)
            return value

    def stored_digest(self) -> str | None:
        value = self.stored()
        return None if value is None else str(json.loads(value)["d"])


@pytest.fixture
async def rig(
    make_emulator: MakeEmulator, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Rig]:
    emulator = await make_emulator(clients=[DEMO_CLIENT, OTHER_CLIENT])
    async with aiohttp.ClientSession() as http:
        built = Rig(emulator, redis_server, http, EmulatorClient(http, emulator.url), tmp_path)
        yield built
        for server in built.servers:
            await server.stop()


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def forged_jwt(kid: str, **claims: Any) -> str:
    """A well-formed ES256 JWT naming the emulator's key id, signed with a key the attacker made."""
    now = int(time.time())
    body = {"iss": "", "aud": AUDIENCE, "client_id": "cc_client_demo", "sub": "cc_client_demo"}
    body |= {"scope": "decisions:read", "iat": now, "nbf": now, "exp": now + 600, "jti": "forged"} | claims
    return jwt.encode(body, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": kid})


# ------------------------------------------------------------ unkeyed Redis
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("other_client", "client"),
        ("more_scopes", "scopes"),
        ("other_audience", "audience"),
        ("forged_signature", "signature"),
        ("expired_with_a_later_stored_exp", "expired"),
    ],
)
async def test_a_token_that_is_not_the_slots_own_is_never_sent_counted_and_purged(
    rig: Rig, case: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The finding: a token minted for another client with payments:write partner:manage, written
    into the decisions:read slot, went upstream on every request of that route."""
    proxy = await rig.proxy()
    demo_token = await rig.emu.mint("decisions:read")  # only for its kid and issuer
    if case == "other_client":
        planted = await rig.emu.mint(
            "decisions:read payments:write partner:manage", client_id=OTHER_ID, secret=OTHER_SECRET
        )
    elif case == "more_scopes":
        planted = await rig.emu.mint("decisions:read payments:write")
    elif case == "other_audience":
        planted = await rig.emu.mint("decisions:read", audience="internal/v1")
    elif case == "expired_with_a_later_stored_exp":
        planted = await ended_token(rig)
    else:
        kid = jwt.get_unverified_header(demo_token)["kid"]
        planted = forged_jwt(kid, iss=claims_of(demo_token)["iss"])
    rig.write(plain_value(planted, exp=time.time() + 3600))  # metadata claims it is the slot's own
    planted_jti = claims_of(planted)["jti"]
    minted_before = (await rig.emu.stats())["tokens_issued"]

    caplog.set_level(logging.WARNING, logger="proxy.tokens")
    assert [await rig.get(proxy) for _ in range(3)] == [200, 200, 200]

    bearers = await rig.api_bearers()
    assert len(bearers) == 3 and all(b["jti"] != planted_jti for b in bearers), "the planted token went out"
    assert all(b["client_id"] == "cc_client_demo" and b["scope"] == "decisions:read" for b in bearers)
    assert (await rig.emu.stats())["tokens_issued"] == minted_before + 1, "the proxy minted its own, once"
    stored = rig.stored()
    assert stored is not None and json.loads(stored)["d"] != digest(planted), "the planted value is gone"
    assert {b["jti"] for b in bearers} == {claims_of(json.loads(stored)["p"]["t"])["jti"]}, "its own, shared"
    metrics = await scrape(rig.http, proxy)
    assert metrics.value(REJECTED, reason=reason) == 1
    assert sum(metrics.value(REJECTED, reason=r["reason"]) for r in metrics.series(REJECTED)) == 1
    refused = [r for r in caplog.records if getattr(r, "event", None) == "redis_token_rejected"]
    assert [(getattr(r, "reason", None), getattr(r, "digest", None)) for r in refused] == [
        (reason, digest(planted))
    ]
    assert all(planted not in r.getMessage() and planted not in str(r.__dict__) for r in caplog.records)



async def test_a_forged_stored_exp_gives_way_to_the_tokens_own(rig: Rig) -> None:
    """The slot's own token with a ten-year stored exp: used (it is the right token) until its real
    end, and the TTL gauge shows the JWT's exp, not the stored one."""
    await rig.emulator_settings(token_ttl=120)
    proxy = await rig.proxy()
    own = await rig.emu.mint("decisions:read")
    rig.write(plain_value(own, exp=time.time() + 10 * 365 * 86400))

    assert await rig.get(proxy) == 200
    assert [b["jti"] for b in await rig.api_bearers()] == [claims_of(own)["jti"]]
    metrics = await scrape(rig.http, proxy)
    ttl = metrics.value("ccp_token_ttl_seconds", scopes="decisions:read", audience=AUDIENCE)
    assert 100 < ttl <= 120, ttl
    assert metrics.series(REJECTED) == []


async def test_without_verify_a_self_made_jwt_for_another_client_is_still_refused(rig: Rig) -> None:
    """``auth.verify: false`` has no signature check, but the claims of a JWT must still be the slot's."""
    proxy = await rig.proxy({"auth": {"verify": False}})
    demo_token = await rig.emu.mint("decisions:read")
    kid = jwt.get_unverified_header(demo_token)["kid"]
    planted = forged_jwt(kid, client_id=OTHER_ID, sub=OTHER_ID, exp=int(time.time()) + 3600)
    rig.write(plain_value(planted, exp=time.time() + 10 * 365 * 86400))

    assert await rig.get(proxy) == 200
    assert [b["client_id"] for b in await rig.api_bearers()] == ["cc_client_demo"]
    assert (await scrape(rig.http, proxy)).value(REJECTED, reason="client") == 1


async def test_a_token_that_cannot_be_verified_now_is_not_sent_and_stays_in_redis(rig: Rig) -> None:
    """The JWKS is unreachable: the token may be fine, so it is left for replicas that can check it,
    but this one does not send it unverified."""
    proxy = await rig.proxy()
    own = await rig.emu.mint("decisions:read")
    rig.write(plain_value(own, exp=time.time() + 3600))
    await rig.emulator.stop()  # keys, token endpoint and API all gone

    async with rig.http.get(proxy.proxy_url + DECISION) as resp:
        assert resp.status == 503 and resp.headers.get("X-Credicorp-Proxy-Error") == "token_unavailable"
    assert rig.stored_digest() == digest(own)
    assert (await scrape(rig.http, proxy)).value(REJECTED, reason="unverifiable") >= 1


async def ended_token(rig: Rig) -> str:
    """A genuine token of the slot whose own exp has just passed (the emulator's TTL put back after)."""
    await rig.emulator_settings(token_ttl=1)
    token = await rig.emu.mint("decisions:read")
    await rig.emulator_settings(token_ttl=3600)
    await until(lambda: time.time() > claims_of(token)["exp"] + 0.05)
    return token


async def test_a_token_at_its_natural_end_is_a_plain_miss(rig: Rig) -> None:
    """Its stored exp a moment after its own (the minting replica's clock): not sent, not a refusal."""
    proxy = await rig.proxy()
    ended = await ended_token(rig)
    rig.write(plain_value(ended, exp=claims_of(ended)["exp"] + 1.5))
    assert await rig.get(proxy) == 200
    assert [b["jti"] for b in await rig.api_bearers()] != [claims_of(ended)["jti"]]
    assert len(await rig.api_bearers()) == 1, "the ended token went out (and came back 401)"
    assert (await scrape(rig.http, proxy)).series(REJECTED) == []


# ------------------------------------------------------------- keyed Redis
async def test_an_older_sealed_value_written_back_is_refused_as_a_replay(rig: Rig) -> None:
    """With a key nobody can forge a value, but an older sealed value of the same slot can be
    copied back; the proxy never goes back to a token older than the newest it has held."""
    key_file = rig.tmp / "cache-key"
    key_file.write_text(f"k1:{base64.b64encode(os.urandom(32)).decode()}\n")
    proxy = await rig.proxy({"cache": {"encryption_key_file": str(key_file)}})
    settings = CacheSettings(url=rig.redis.url, encryption_key_file=str(key_file))
    replica = RedisTokenCache.from_settings(settings, clock=time.time, metrics=Metrics())
    memory = proxy.runtime.tokens.memory
    try:
        assert await rig.get(proxy) == 200
        old_value = rig.stored()
        assert old_value is not None
        old_jti = claims_of(open_sealed(old_value, SLOT, key_file)["t"])["jti"]
        old = await replica.get(KEY)
        assert old is not None
        await until(lambda: time.time() >= claims_of(old.value)["iat"] + 1)  # iat has whole seconds

        await replica.purge_if_same(KEY, old)  # as another replica would after a 401
        await until(lambda: memory.peek(KEY) is None)
        assert await rig.get(proxy) == 200  # mints the newer token
        newer = await replica.get(KEY)
        assert newer is not None and not newer.same_as(old)

        await replica.purge_if_same(KEY, newer)  # its copy leaves the proxy's memory ...
        await until(lambda: memory.peek(KEY) is None)
        rig.write(old_value)  # ... and the attacker writes the older sealed value back
        assert await rig.get(proxy) == 200
    finally:
        await replica.close()

    bearers = await rig.api_bearers()
    assert [b["jti"] for b in bearers].count(old_jti) == 1, "the old token went out again after the replay"
    assert (await scrape(rig.http, proxy)).value(REJECTED, reason="replayed") == 1
    assert rig.stored() != old_value


# ------------------------------------------------------------ check-config
def config_with_cache(tmp: Path, cache: dict[str, Any]) -> Path:
    raw = copy.deepcopy(base_config("http://127.0.0.1:9"))
    raw["cache"] = cache
    path = tmp / "ccp.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def test_check_config_warns_about_an_unkeyed_redis_that_is_not_on_loopback(tmp_path: Path) -> None:
    result = cli("check-config", "-c", str(config_with_cache(tmp_path, {"url": "redis://:pw@redis.internal:6379/0"})))
    assert result.returncode == 0, result.stderr
    assert (
        "cache.url: tokens in Redis are stored in clear and not authenticated; set cache.encryption_key_file"
        in result.stdout
    )
    assert "redis.internal" in result.stdout and ":pw@" not in result.stdout.split("Warnings")[1]


#: cache settings -> the part of the warning that names the exposed hosts (None: no warning).
HOST_CASES: list[tuple[dict[str, Any], str | None]] = [
    ({"url": "rediss://10.0.4.12:6380/0"}, "host 10.0.4.12 is"),
    ({"url": "redis+sentinel://127.0.0.1:26379,s2.internal:26379/main"}, "host s2.internal is"),
    ({"url": "redis+cluster://n1:7000,127.0.0.1:7001,n3:7002"}, "hosts n1, n3 are"),
    ({"url": "redis://127.0.0.1:6379/0"}, None),
    ({"url": "redis://127.0.0.2:6379/0"}, None),
    ({"url": "redis://localhost:6379/0"}, None),
    ({"url": "redis://[::1]:6379/0"}, None),
    ({"url": "unix:///run/redis.sock"}, None),
    ({"url": "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/main"}, None),
    ({"url": "redis://redis.internal:6379/0", "encryption_key_file": "/run/key"}, None),
]


def test_each_redis_host_is_judged_and_loopback_or_a_key_is_quiet() -> None:
    for cache, warned in HOST_CASES:
        raw = merge(base_config("http://127.0.0.1:9"), {"cache": cache})
        settings = parse_config(raw, env={}, check_files=False)
        warnings = [w for w in settings.warnings if w.startswith("cache.url")]
        if warned is None:
            assert warnings == [], cache
        else:
            assert len(warnings) == 1 and warned in warnings[0], (cache, warnings)
