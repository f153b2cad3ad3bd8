"""The Redis tier beyond the shared contract: sealing, URL forms, invalidation, leases, outages.

Every test talks to a real ``redis-server`` (standalone, TLS, Sentinel or a
3-node Cluster) started on free ports; outages are real SIGKILL/SIGSTOP.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.settings import CacheSettings
from proxy.tokens.model import CacheKey, Credentials, Token
from proxy.tokens.redis_cache import BREAKER_S, RedisTokenCache
from proxy.tokens.sealing import Keyring, SealingKeyError, TokenCodec, derive_kid
from tests.helpers import eventually, sample
from tests.redis_fixtures import ClusterSet, MakeRedis, RedisServer, SentinelSet

AUD = "partner/v1"
SECRET_TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzY29wZSI6InBheW1lbnRzOndyaXRlIn0.c2lnbmF0dXJl"
Invalidations = list[tuple[CacheKey | None, str | None]]


def b64key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def b64(fill: bytes) -> str:
    return base64.b64encode(fill * 32).decode()


def key(scope: str = "decisions:read", secret: str = "s1") -> CacheKey:
    return CacheKey.create(Credentials.create("cc_client_demo", secret), (scope,), AUD)


def token(value: str = SECRET_TOKEN, lifetime: float = 600) -> Token:
    now = time.time()
    return Token(value, now, now + lifetime, ("decisions:read",), AUD)


class Caches:
    """Makes caches (replicas) on real Redis with short timeouts, remembers their metrics, closes them."""

    def __init__(self) -> None:
        self.made: dict[RedisTokenCache, Metrics] = {}

    def __call__(self, url: str, key_file: str | None = None, **tuning: float) -> RedisTokenCache:
        metrics = Metrics()
        settings = CacheSettings(url=url, encryption_key_file=key_file, timeout_s=0.3)
        cache = RedisTokenCache.from_settings(settings, clock=time.time, metrics=metrics, **tuning)
        self.made[cache] = metrics
        return cache

    def errors(self, cache: RedisTokenCache, op: str) -> float:
        return sample(self.made[cache], "ccp_redis_errors_total", op=op)

    def lookups(self, cache: RedisTokenCache, result: str) -> float:
        return sample(self.made[cache], "ccp_token_cache_lookups_total", tier="redis", result=result)


@pytest.fixture
async def caches() -> AsyncIterator[Caches]:
    factory = Caches()
    yield factory
    for cache in factory.made:
        await cache.close()


# ------------------------------------------------------------------ key files
def test_a_key_file_writes_with_its_first_key_and_reads_with_all(tmp_path: Path) -> None:
    ring = Keyring.from_text(f"# rotated 2024-05\nnew:{b64key()}\n\nold:{b64key()}\n")
    assert ring.current == "new" and set(ring.keys) == {"new", "old"}


def test_a_bare_key_gets_a_kid_derived_from_the_key() -> None:
    raw = os.urandom(32)
    ring = Keyring.from_text(base64.b64encode(raw).decode() + "\n")
    assert ring.current == derive_kid(raw) and len(ring.current) == 12


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no key found"),
        (base64.b64encode(os.urandom(16)).decode(), "must be 32 bytes"),
        ("k1:not base64!!", "not valid base64"),
        (
            f"k1:{base64.b64encode(b'x' * 32).decode()}\nk1:{base64.b64encode(b'y' * 32).decode()}",
            "duplicate",
        ),
        (f"bad kid:{b64(b'x')}", "expected 'kid:base64key'"),
    ],
)
def test_a_bad_key_file_names_the_line_and_never_the_key(text: str, problem: str) -> None:
    with pytest.raises(SealingKeyError, match=problem) as caught:
        Keyring.from_text(text, "/etc/ccp/keys")
    assert "/etc/ccp/keys" in str(caught.value)
    assert b64(b"x") not in str(caught.value)


def test_an_unreadable_key_file_fails_at_start_up(tmp_path: Path) -> None:
    settings = CacheSettings(url="redis://127.0.0.1:1/0", encryption_key_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"cache\.encryption_key_file: .*cannot read"):
        RedisTokenCache.from_settings(settings, clock=time.time, metrics=Metrics())


def test_a_sealed_value_is_bound_to_its_slot_and_to_its_key() -> None:
    codec = TokenCodec(Keyring.from_text(f"k1:{b64key()}"))
    sealed = codec.encode(token(), "ccp:tok:{a}")
    assert codec.decode(sealed, "ccp:tok:{a}") is not None
    assert codec.decode(sealed, "ccp:tok:{b}") is None  # copied into another slot
    assert TokenCodec(Keyring.from_text(f"k1:{b64key()}")).decode(sealed, "ccp:tok:{a}") is None
    assert TokenCodec(None).decode(sealed, "ccp:tok:{a}") is None
    assert codec.decode(TokenCodec(None).encode(token(), "ccp:tok:{a}"), "ccp:tok:{a}") is None
    assert codec.decode(b"\xff not json", "ccp:tok:{a}") is None


# ------------------------------------------------------------- encryption at rest
async def test_an_unknown_key_id_is_a_counted_miss(
    redis_server: RedisServer, caches: Caches, tmp_path: Path
) -> None:
    (tmp_path / "a").write_text(f"k1:{b64key()}")
    (tmp_path / "b").write_text(f"k2:{b64key()}")
    writer, reader = (
        caches(redis_server.url, str(tmp_path / "a")),
        caches(redis_server.url, str(tmp_path / "b")),
    )
    await writer.put(key(), token())
    assert await reader.get(key()) is None
    assert caches.lookups(reader, "unreadable") == 1


async def test_a_rotated_key_file_still_reads_what_the_old_key_wrote(
    redis_server: RedisServer, caches: Caches, tmp_path: Path
) -> None:
    old, new = b64key(), b64key()
    (tmp_path / "before").write_text(f"old:{old}\n")
    (tmp_path / "after").write_text(f"new:{new}\nold:{old}\n")
    before, after = (
        caches(redis_server.url, str(tmp_path / "before")),
        caches(redis_server.url, str(tmp_path / "after")),
    )
    await before.put(key(), token())
    assert (await after.get(key())) is not None
    await after.put(key("accounts:read"), token())  # written under the new key
    with redis_server.client() as raw:
        assert b'"kid":"new"' in raw.get(after.slot(key("accounts:read")))
    assert await before.get(key("accounts:read")) is None  # a replica not yet rotated: a miss, not a crash


# ---------------------------------------------------------------- URL forms
async def test_tls_is_verified_and_works_with_the_right_ca(
    make_redis: MakeRedis, caches: Caches, tmp_path: Path
) -> None:
    server = make_redis(tls=True)
    untrusted = caches(server.url)
    await untrusted.put(key(), token())
    assert caches.errors(untrusted, "put") == 1  # self-signed: refused
    trusted = caches(f"{server.url}?ssl_ca_certs={tmp_path / 'tls' / 'ca.pem'}")
    await trusted.put(key(), token())
    assert (await trusted.get(key())) is not None


@pytest.mark.parametrize(
    "url",
    [
        "memcached://127.0.0.1:11211",
        "redis+sentinel://127.0.0.1:26379",
        "redis+sentinel://127.0.0.1:26379/svc/notadb",
        "redis+cluster://127.0.0.1",
        "rediss://127.0.0.1:6380/0?ssl_cert_reqs=none",
    ],
)
def test_malformed_or_unverified_urls_are_refused_at_start(url: str) -> None:
    with pytest.raises(ValueError, match=r"cache\.url"):
        RedisTokenCache.from_settings(CacheSettings(url=url), clock=time.time, metrics=Metrics())


async def exercise(a: RedisTokenCache, b: RedisTokenCache) -> Invalidations:
    """put/get across replicas, lease exclusion, purge broadcast, purge_all: the whole surface."""
    seen: Invalidations = []
    await b.start(lambda k, d: seen.append((k, d)))
    assert b.subscribed
    keys = [key(f"scope{n}:read") for n in range(12)]
    for k in keys:
        await a.put(k, token(f"{SECRET_TOKEN}-{k.scopes[0]}"))
    assert [await b.get(k) is not None for k in keys] == [True] * len(keys)
    order: list[str] = []

    async def hold(cache: RedisTokenCache, name: str) -> None:
        async with cache.lease(keys[0]):
            order.append(f"{name}+")
            await asyncio.sleep(0.1)
            order.append(f"{name}-")

    await asyncio.gather(hold(a, "a"), hold(b, "b"))
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])
    purged = await b.get(keys[1])
    assert purged is not None and await a.purge_if_same(keys[1], purged)
    assert await a.purge_all("cc_client_demo") == len(keys) - 1
    await eventually(lambda: len(seen) == 2, within=5)
    return seen


async def test_cluster_url_spreads_slots_over_nodes_and_keeps_everything_working(
    redis_cluster: ClusterSet, caches: Caches
) -> None:
    a, b = caches(redis_cluster.url), caches(redis_cluster.url)
    seen = await exercise(a, b)
    assert seen[0] == (key("scope1:read"), token(f"{SECRET_TOKEN}-scope1:read").digest)
    assert seen[1] == (None, None)
    assert sum(caches.errors(c, op) for c in (a, b) for op in ("get", "put", "purge", "lease")) == 0


async def test_cluster_nodes_each_hold_some_of_the_slots(redis_cluster: ClusterSet, caches: Caches) -> None:
    cache = caches(redis_cluster.url)
    for n in range(12):
        await cache.put(key(f"scope{n}:read"), token())
    per_node = []
    for node in redis_cluster.nodes:
        with node.client() as raw:
            per_node.append(raw.dbsize())
    assert sum(per_node) == 12 and sum(1 for n in per_node if n) >= 2


async def test_sentinel_url_finds_the_master_and_keeps_everything_working(
    redis_sentinel: SentinelSet, caches: Caches
) -> None:
    seen = await exercise(caches(redis_sentinel.url), caches(redis_sentinel.url))
    assert seen[1] == (None, None)
    with redis_sentinel.master.client() as raw:
        assert raw.dbsize() == 0  # everything was purged on the master the sentinel named


async def test_a_token_read_from_redis_carries_no_receipt_time_of_the_replica_that_minted_it(
    redis_server: RedisServer, caches: Caches
) -> None:
    """``received_at`` is local knowledge: another replica's copy never counts as minted here,
    so a 401 on it is always purged and retried once (see ``Token``)."""
    a, b = caches(redis_server.url), caches(redis_server.url)
    now = time.time()
    minted = Token(SECRET_TOKEN, now - 1, now + 599, ("decisions:read",), AUD, received_at=now)
    await a.put(key(), minted)
    read = await b.get(key())
    assert read == minted and read is not None and read.received_at is None
    assert minted.received_since(now) and not read.received_since(0.0)


# ------------------------------------------------------------- invalidation
async def test_a_purge_reaches_other_replicas_with_its_digest_but_not_the_purger(
    redis_server: RedisServer, caches: Caches
) -> None:
    a, b = caches(redis_server.url), caches(redis_server.url)
    at_a: Invalidations = []
    at_b: Invalidations = []
    await a.start(lambda k, d: at_a.append((k, d)))
    await b.start(lambda k, d: at_b.append((k, d)))
    rejected = token()
    await a.put(key(), rejected)
    assert not await a.purge_if_same(key(), token("another"))  # not the stored one: no broadcast
    assert await a.purge_if_same(key(), rejected)
    await eventually(lambda: at_b == [(key(), rejected.digest)], within=5)
    await asyncio.sleep(0.1)
    assert at_a == []


async def test_garbage_on_the_channel_is_ignored(redis_server: RedisServer, caches: Caches) -> None:
    a, b = caches(redis_server.url), caches(redis_server.url)
    seen: Invalidations = []
    await b.start(lambda k, d: seen.append((k, d)))
    with redis_server.client() as raw:
        for junk in (b"*", b"{}", b'{"o": 1}', b'{"o": "x", "k": [1]}', b"\xff"):
            raw.publish(b.channel, junk)
    await a.purge_all("cc_client_demo")
    await eventually(lambda: seen == [(None, None)], within=5)


# --------------------------------------------------------------------- leases
async def test_a_live_holder_keeps_its_lease_past_the_ttl(redis_server: RedisServer, caches: Caches) -> None:
    a, b = caches(redis_server.url, lease_ttl_s=0.5), caches(redis_server.url, lease_ttl_s=0.5)
    entered: list[str] = []

    async def slow_holder() -> None:
        async with a.lease(key()):
            entered.append("a")
            await asyncio.sleep(1.5)  # three TTLs: only renewal keeps it
            entered.append("a done")

    holder = asyncio.create_task(slow_holder())
    await eventually(lambda: entered == ["a"], within=5)
    async with b.lease(key()):
        entered.append("b")
    await holder
    assert entered == ["a", "a done", "b"]


async def test_a_dead_holders_lease_expires_and_a_waiter_takes_over(
    redis_server: RedisServer, caches: Caches
) -> None:
    b = caches(redis_server.url, lease_wait_s=5.0)
    with redis_server.client() as raw:
        raw.set(b.lease_name(key()), "crashed-replica", px=600)
    started = time.monotonic()
    async with b.lease(key()):
        waited = time.monotonic() - started
        with redis_server.client() as raw:
            assert raw.get(b.lease_name(key())) != b"crashed-replica"
    assert 0.4 < waited < 2.0
    assert caches.errors(b, "lease_timeout") == 0


async def test_a_lease_taken_over_after_expiry_is_not_released_by_the_old_holder(
    redis_server: RedisServer, caches: Caches
) -> None:
    a = caches(redis_server.url, lease_ttl_s=0.6)
    async with a.lease(key()):
        with redis_server.client() as raw:
            raw.set(a.lease_name(key()), "next-holder", px=5000)  # as if ours expired and was re-taken
        await asyncio.sleep(0.5)  # a renewal notices it no longer owns the lease
    with redis_server.client() as raw:
        assert raw.get(a.lease_name(key())) == b"next-holder"
    assert caches.errors(a, "lease") == 1


# -------------------------------------------------------------------- outages
async def test_every_operation_degrades_quickly_when_redis_is_killed(
    redis_server: RedisServer, caches: Caches
) -> None:
    cache = caches(redis_server.url)
    await cache.put(key(), token())
    redis_server.kill()
    started = time.monotonic()
    assert await cache.get(key()) is None
    await cache.put(key(), token())
    assert not await cache.purge_if_same(key(), token())
    assert await cache.purge_all("cc_client_demo") == 0
    async with cache.lease(key()):
        pass
    assert not await cache.ping()
    assert time.monotonic() - started < 1.0
    for op in ("get", "put", "purge", "scan", "publish", "lease", "ping"):
        assert caches.errors(cache, op) >= 1, op


async def test_a_hung_redis_costs_one_timeout_then_fails_fast(
    redis_server: RedisServer, caches: Caches
) -> None:
    cache = caches(redis_server.url)
    await cache.put(key(), token())
    redis_server.pause()
    try:
        started = time.monotonic()
        assert await cache.get(key()) is None
        first = time.monotonic() - started
        started = time.monotonic()
        for _ in range(20):
            assert await cache.get(key()) is None
        assert first < 1.0 and time.monotonic() - started < first  # 20 calls cost less than one timeout
    finally:
        redis_server.resume()
    await asyncio.sleep(BREAKER_S + 0.1)
    assert (await cache.get(key())) is not None


async def test_a_restarted_redis_on_the_same_port_is_used_again_by_the_same_client(
    redis_server: RedisServer, caches: Caches
) -> None:
    a, b = caches(redis_server.url), caches(redis_server.url)
    seen: Invalidations = []
    await b.start(lambda k, d: seen.append((k, d)))
    redis_server.kill()
    assert await a.get(key()) is None
    await eventually(lambda: not b.subscribed, within=5)
    redis_server.start()
    await asyncio.sleep(BREAKER_S + 0.1)
    await a.put(key(), token())
    assert (await b.get(key())) is not None
    await eventually(lambda: b.subscribed, within=10)
    assert await a.purge_if_same(key(), token())
    await eventually(lambda: seen == [(key(), token().digest)], within=5)


async def test_start_does_not_wait_for_a_redis_that_is_down(make_redis: MakeRedis, caches: Caches) -> None:
    server = make_redis()
    server.kill()
    cache = caches(server.url)
    seen: Invalidations = []
    started = time.monotonic()
    await cache.start(lambda k, d: seen.append((k, d)))
    assert time.monotonic() - started < 1.0 and not cache.subscribed
    server.start()
    await eventually(lambda: cache.subscribed, within=10)
