"""One cache contract, every store (oauth2-proxy's shared session-store suite, for tokens).

``store`` runs each ``TokenCache`` test against the memory tier, Redis, and
Redis with encryption at rest; ``shared`` runs the ``SharedTokenCache`` tests
(invalidations between replicas, ping) against each shared store; the two-tier
tests run the manager's memory-in-front-of-shared behaviour over each store.
Every store is reached only through its protocol. Real redis-server and the
real emulator; the only fake is the clock.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from proxy.emulator.app import EmulatorServer
from proxy.metrics import Metrics
from proxy.settings import AuthSettings, CacheSettings, RefreshSettings
from proxy.tokens.cache import MemoryTokenCache, SharedTokenCache, TokenCache
from proxy.tokens.credentials import CredentialProvider
from proxy.tokens.manager import TokenManager
from proxy.tokens.model import CacheKey, Credentials, Token
from proxy.tokens.redis_cache import RedisTokenCache
from proxy.tokens.source import TokenSource
from tests.at_rest import assert_sealed
from tests.helpers import FakeClock
from tests.proxy_fixtures import emulator_stats
from tests.redis_fixtures import MakeRedis, RedisServer

AUD = "partner/v1"
DECISIONS = ("decisions:read",)
JWT_LIKE = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJzY29wZSI6ImRlY2lzaW9uczpyZWFkIn0.c2lnbmF0dXJl"


def new_key_file(path: Path, *kids: str) -> str:
    """A key file with one line per kid (first = current); returns its path."""
    path.write_text("".join(f"{kid}:{base64.b64encode(os.urandom(32)).decode()}\n" for kid in kids))
    return str(path)


@dataclass
class Store:
    """Two handles on one shared store (two replicas) and a peek at the raw values, if any."""

    kind: str
    clock: FakeClock
    replicas: Sequence[TokenCache]
    raw_values: Callable[[], dict[bytes, bytes]] | None = None
    key_file: str | None = None
    metrics: list[Metrics] = field(default_factory=list)

    @property
    def a(self) -> TokenCache:
        return self.replicas[0]

    @property
    def b(self) -> TokenCache:
        return self.replicas[-1]


def redis_replicas(
    url: str, clock: FakeClock, key_file: str | None, metrics: Sequence[Metrics]
) -> list[SharedTokenCache]:
    """One Redis replica per ``metrics``, all on the store at ``url``."""
    settings = CacheSettings(url=url, encryption_key_file=key_file)
    return [
        RedisTokenCache.from_settings(settings, clock=clock, metrics=m, lease_ttl_s=2.0, lease_wait_s=4.0)
        for m in metrics
    ]


def redis_store(
    kind: str, url: str, clock: FakeClock, key_file: str | None, raw: Callable[[], dict[bytes, bytes]]
) -> Store:
    metrics = [Metrics(), Metrics()]
    return Store(kind, clock, redis_replicas(url, clock, key_file, metrics), raw, key_file, metrics)


@pytest.fixture(params=["memory", "redis", "redis-sealed"])
async def store(
    request: pytest.FixtureRequest, make_redis: MakeRedis, tmp_path: Path
) -> AsyncIterator[Store]:
    clock = FakeClock()
    if request.param == "memory":
        shared = MemoryTokenCache(clock)  # one process: both "replicas" are the same object
        built = Store("memory", clock, [shared, shared])
    else:
        server = make_redis()
        key_file = new_key_file(tmp_path / "keys", "k1") if request.param == "redis-sealed" else None

        def raw() -> dict[bytes, bytes]:
            with server.client() as client:
                return {name: client.get(name) or b"" for name in client.scan_iter("ccp:tok:*")}

        built = redis_store(request.param, server.url, clock, key_file, raw)
    yield built
    for replica in {id(r): r for r in built.replicas}.values():
        await replica.close()


def key(
    scopes: tuple[str, ...] = DECISIONS, *, client: str = "cc_client_demo", secret: str = "s1"
) -> CacheKey:
    return CacheKey.create(Credentials.create(client, secret), scopes, AUD)


def token(clock: FakeClock, value: str = JWT_LIKE, lifetime: float = 3600) -> Token:
    return Token(value, clock.now, clock.now + lifetime, DECISIONS, AUD)


# ------------------------------------------------------------------ the contract
async def test_a_stored_token_is_read_back_by_every_replica(store: Store) -> None:
    stored = token(store.clock)
    await store.a.put(key(), stored)
    for replica in store.replicas:
        found = await replica.get(key())
        assert found is not None and found.same_as(stored)
        assert (found.issued_at, found.expires_at, found.scopes, found.audience) == (
            stored.issued_at,
            stored.expires_at,
            stored.scopes,
            stored.audience,
        )


async def test_an_unknown_key_is_a_miss(store: Store) -> None:
    assert await store.a.get(key()) is None


async def test_a_token_is_a_miss_once_the_clock_passes_its_expiry(store: Store) -> None:
    await store.a.put(key(), token(store.clock, lifetime=60))
    store.clock.now += 59.9
    assert await store.b.get(key()) is not None
    store.clock.now += 0.2
    assert await store.b.get(key()) is None


async def test_scope_set_audience_and_secret_each_get_their_own_slot(store: Store) -> None:
    keys = [
        key(),
        key(("accounts:read",)),
        key(("accounts:read", "decisions:read")),
        key(secret="rotated"),
        CacheKey.create(Credentials.create("cc_client_demo", "s1"), DECISIONS, "internal/v1"),
    ]
    for n, k in enumerate(keys):
        await store.a.put(k, token(store.clock, value=f"{JWT_LIKE}{n}"))
    for n, k in enumerate(keys):
        found = await store.b.get(k)
        assert found is not None and found.value == f"{JWT_LIKE}{n}"


async def test_purge_if_same_drops_only_the_rejected_token(store: Store) -> None:
    current = token(store.clock, value="current-token")
    await store.a.put(key(), current)
    assert not await store.b.purge_if_same(key(), token(store.clock, value="older-token"))
    assert (await store.a.get(key())) is not None
    assert await store.b.purge_if_same(key(), current)
    assert await store.a.get(key()) is None
    assert not await store.a.purge_if_same(key(), current)  # already gone: nothing to do


async def test_purge_all_drops_every_generation_of_one_client_only(store: Store) -> None:
    mine = [key(), key(("accounts:read",)), key(secret="rotated")]
    other = key(client="cc_client_other")
    for k in [*mine, other]:
        await store.a.put(k, token(store.clock))
    assert await store.b.purge_all("cc_client_demo") == 3
    assert [await store.a.get(k) for k in mine] == [None, None, None]
    assert await store.a.get(other) is not None


async def test_lease_holders_of_one_key_never_overlap(store: Store) -> None:
    held: list[tuple[float, float]] = []

    async def hold(cache: TokenCache) -> None:
        async with cache.lease(key()):
            start = time.monotonic()
            await asyncio.sleep(0.05)
            held.append((start, time.monotonic()))

    await asyncio.gather(*(hold(store.replicas[n % 2]) for n in range(6)))
    held.sort()
    assert len(held) == 6
    assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(held))


async def test_leases_of_different_keys_are_independent(store: Store) -> None:
    async with store.a.lease(key()):
        async with asyncio.timeout(1):
            async with store.b.lease(key(("accounts:read",))):
                pass


async def test_a_lease_is_free_again_after_its_holder_fails(store: Store) -> None:
    with pytest.raises(RuntimeError):
        async with store.a.lease(key()):
            raise RuntimeError("mint failed")
    async with asyncio.timeout(1):
        async with store.b.lease(key()):
            pass


# ------------------------------------------------------------ the shared contract
@dataclass
class Shared:
    """Two replicas on one shared store, and the server behind them (to take it away)."""

    clock: FakeClock
    replicas: list[SharedTokenCache]
    server: RedisServer


@pytest.fixture(params=["redis", "redis-sealed"])
async def shared(
    request: pytest.FixtureRequest, make_redis: MakeRedis, tmp_path: Path
) -> AsyncIterator[Shared]:
    clock = FakeClock()
    server = make_redis()
    key_file = new_key_file(tmp_path / "keys", "k1") if request.param == "redis-sealed" else None
    built = Shared(clock, redis_replicas(server.url, clock, key_file, [Metrics(), Metrics()]), server)
    yield built
    for replica in built.replicas:
        await replica.close()


class Heard:
    """An invalidation handler that records its calls and can wait for them."""

    def __init__(self) -> None:
        self.calls: list[tuple[CacheKey | None, str | None]] = []
        self._changed = asyncio.Event()

    def __call__(self, key: CacheKey | None, digest: str | None) -> None:
        self.calls.append((key, digest))
        self._changed.set()

    async def first(self, n: int, within: float = 5.0) -> list[tuple[CacheKey | None, str | None]]:
        """The calls once there are ``n`` of them (fails after ``within`` s)."""
        async with asyncio.timeout(within):
            while len(self.calls) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.calls[:n]


async def test_a_purge_reaches_the_other_replicas_but_not_the_purger(shared: Shared) -> None:
    a, b = shared.replicas
    heard_a, heard_b = Heard(), Heard()
    await a.start(heard_a)
    await b.start(heard_b)
    assert a.subscribed and b.subscribed
    rejected = token(shared.clock)
    await a.put(key(), rejected)
    assert await a.purge_if_same(key(), rejected)
    assert await heard_b.first(1) == [(key(), rejected.digest)]  # only that token goes, by its digest
    await b.purge_all("cc_client_demo")
    # The channel keeps its order: a's own purge reached a before b's drop-all, and was ignored.
    assert await heard_a.first(1) == [(None, None)]
    assert heard_b.calls == [(key(), rejected.digest)]


async def test_a_ping_answers_while_the_store_does(shared: Shared) -> None:
    a, _ = shared.replicas
    assert await a.ping()
    shared.server.kill()
    assert not await a.ping()


# ------------------------------------------------------------ at rest in Redis
async def test_with_a_key_redis_holds_no_readable_token(store: Store) -> None:
    if store.raw_values is None:
        pytest.skip("the memory tier has no 'at rest'")
    await store.a.put(key(), token(store.clock))
    ((slot, raw),) = store.raw_values().items()
    if store.kind == "redis-sealed":
        assert store.key_file is not None
        payload = assert_sealed(raw, slot, store.key_file)
        assert payload["t"] == JWT_LIKE and "decisions:read" in payload["s"]  # metadata is sealed too
    else:  # what deploy/README.md warns about: without a key Redis holds bearer tokens
        assert JWT_LIKE.encode() in raw


# ------------------------------------------------------------------ two tiers
class CountingStore:
    """A ``TokenCache`` over a real store that counts ``get`` calls (to prove memory hits stay local)."""

    def __init__(self, inner: TokenCache) -> None:
        self.inner = inner
        self.gets = 0

    async def get(self, k: CacheKey) -> Token | None:
        self.gets += 1
        return await self.inner.get(k)

    async def put(self, k: CacheKey, t: Token) -> None:
        await self.inner.put(k, t)

    async def purge_if_same(self, k: CacheKey, t: Token) -> bool:
        return await self.inner.purge_if_same(k, t)

    async def purge_all(self, client_id: str) -> int:
        return await self.inner.purge_all(client_id)

    def lease(self, k: CacheKey) -> AbstractAsyncContextManager[None]:
        return self.inner.lease(k)

    async def close(self) -> None:
        await self.inner.close()


def manager(
    emulator: EmulatorServer,
    session: aiohttp.ClientSession,
    store: Store,
    n: int,
    shared: TokenCache | None = None,
) -> TokenManager:
    auth = AuthSettings(
        issuer=emulator.url, client_id="cc_client_demo", client_secret="demo-secret", verify=False
    )
    creds = CredentialProvider(auth.client_id, secret=auth.client_secret)
    metrics = Metrics()
    source = TokenSource(auth, creds, session, clock=store.clock, metrics=metrics)
    refresh = RefreshSettings(jitter_s=0.0, idle_s=7200)
    shared = shared or store.replicas[n % 2]
    return TokenManager(source, creds, refresh=refresh, clock=store.clock, metrics=metrics, shared=shared)


async def test_cold_herd_across_replicas_mints_once(
    store: Store, emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    replicas = [manager(emulator, session, store, n) for n in range(2)]
    tokens = await asyncio.gather(*(replicas[n % 2].get(DECISIONS, AUD) for n in range(100)))
    assert all(t.same_as(tokens[0]) for t in tokens)
    assert (await emulator_stats(session, emulator))["tokens_issued"] == 1


async def test_a_memory_hit_never_touches_the_shared_tier(
    store: Store, emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    counting = CountingStore(store.a)
    replica = manager(emulator, session, store, 0, shared=counting)
    await replica.get(DECISIONS, AUD)
    before = counting.gets
    for _ in range(50):
        await replica.get(DECISIONS, AUD)
    assert counting.gets == before


async def test_a_memory_miss_reads_the_shared_tier_instead_of_minting(
    store: Store, emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    first, second = (manager(emulator, session, store, n) for n in range(2))
    minted = await first.get(DECISIONS, AUD)
    assert (await second.get(DECISIONS, AUD)).same_as(minted)
    assert (await emulator_stats(session, emulator))["tokens_issued"] == 1


async def test_a_401_on_every_replica_mints_one_replacement(
    store: Store, emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    replicas = [manager(emulator, session, store, n) for n in range(2)]
    rejected = await replicas[0].get(DECISIONS, AUD)
    assert (await replicas[1].get(DECISIONS, AUD)).same_as(rejected)
    k = replicas[0].key_for(DECISIONS, AUD)
    new = await asyncio.gather(*(replicas[n % 2].replace(k, rejected) for n in range(20)))
    assert all(t.same_as(new[0]) and not t.same_as(rejected) for t in new)
    assert (await emulator_stats(session, emulator))["tokens_issued"] == 2


async def test_a_refresh_by_one_replica_is_picked_up_by_the_other(
    store: Store, emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    first, second = (manager(emulator, session, store, n) for n in range(2))
    old = await first.get(DECISIONS, AUD)
    await second.get(DECISIONS, AUD)
    store.clock.now += 3300  # past at_fraction: stale on both
    assert await first.refresh_due() == 1
    await asyncio.sleep(0.3)
    assert await second.refresh_due() == 1
    await asyncio.sleep(0.3)
    renewed = await second.get(DECISIONS, AUD)
    assert not renewed.same_as(old) and renewed.same_as(await first.get(DECISIONS, AUD))
    assert (await emulator_stats(session, emulator))["tokens_issued"] == 2
