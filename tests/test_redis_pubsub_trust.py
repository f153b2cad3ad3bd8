"""Invalidation messages and mint leases in Redis are not blindly trusted.

Whoever can reach Redis can PUBLISH on the invalidation channel and write lease
keys. These tests attack a real proxy (and a real ``RedisTokenCache``) over a
real ``redis-server`` on loopback, the way such a neighbour would: forged,
replayed, oversized and deeply nested messages, a flood of "drop everything",
a squatted lease and a lease someone keeps renewing. The MACs the tests build
or check are computed here from the key file with ``hmac`` directly, never
through the code under test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio

from proxy.app import ProxyServer
from proxy.metrics import Metrics
from proxy.settings import CacheSettings
from proxy.tokens.model import CacheKey
from proxy.tokens.redis_cache import RedisTokenCache
from tests.at_rest import read_keys
from tests.helpers import eventually, sample
from tests.inval_flood import start_flood
from tests.proxy_fixtures import StartProxy
from tests.redis_fixtures import RedisServer

PATHS = {
    "decisions:read": "/partner/v1/decisions/dec_demo_001",
    "applications:read": "/partner/v1/applications/app_demo_001",
    "accounts:read": "/partner/v1/accounts/acc_demo_001",
}
CLIENT = "cc_client_demo"
INTERVAL_S = 1.0  # documented: at most one drop-all applied per second
LEASE_CAP_S = 2.0  # documented: a renewed lease is waited for at most 2 s
MESSAGES_PER_S = 1000  # documented: the listener reads at most 1,000 messages a second
SHED_AFTER_S = 2.0  # documented: held back that long without catching up, it drops the backlog


# ------------------------------------------------------------------ helpers
def write_key_file(path: Path, *lines: tuple[str, bytes]) -> str:
    path.write_text("".join(f"{kid}:{base64.b64encode(raw).decode()}\n" for kid, raw in lines))
    return str(path)


def mac_of(raw_key: bytes, body: bytes) -> str:
    """The invalidation MAC as documented: HMAC-SHA256 under HMAC-SHA256(key, "ccp-inval-mac")."""
    mac_key = hmac.new(raw_key, b"ccp-inval-mac", hashlib.sha256).digest()
    return hmac.new(mac_key, body, hashlib.sha256).hexdigest()


def signed(body: str, mac: str) -> str:
    return f'{body[:-1]},"m":"{mac}"}}'


def cache_config(server: RedisServer, key_file: str | None = None) -> dict[str, Any]:
    cache: dict[str, Any] = {"url": server.url, "timeout_s": 0.3}
    if key_file:
        cache["encryption_key_file"] = key_file
    return {"cache": cache}


def shared(server: ProxyServer) -> RedisTokenCache:
    cache = server.runtime.shared
    assert isinstance(cache, RedisTokenCache)
    return cache


def invalidations(server: ProxyServer | Metrics, result: str) -> float:
    metrics = server.runtime.metrics if isinstance(server, ProxyServer) else server
    return sample(metrics, "ccp_invalidations_total", result=result)


def redis_errors(server: ProxyServer, op: str) -> float:
    return sample(server.runtime.metrics, "ccp_redis_errors_total", op=op)


def memory_misses(server: ProxyServer) -> float:
    return sample(server.runtime.metrics, "ccp_token_cache_lookups_total", tier="memory", result="miss")


def held(server: ProxyServer) -> dict[tuple[str, ...], str]:
    """Scope set -> digest of the token in the replica's memory tier."""
    memory = server.runtime.tokens.memory
    return {key.scopes: token.digest for key in memory.keys() if (token := memory.peek(key)) is not None}


def redis_lookups(server: ProxyServer) -> float:
    """Every read of the Redis tier so far, whatever its result."""
    samples = (s for m in server.runtime.metrics.cache_lookups.collect() for s in m.samples)
    return sum(s.value for s in samples if s.name.endswith("_total") and s.labels["tier"] == "redis")


@dataclass
class Memory:
    """A replica's memory tier at one moment, to tell later whether anything was dropped.

    The refresher refills a dropped token from Redis within a second (the same token, the
    same digest), so the tokens alone could hide a drop: a refill also shows as a Redis read.
    """

    server: ProxyServer
    tokens: dict[tuple[str, ...], str]
    lookups: float

    @classmethod
    def of(cls, server: ProxyServer) -> Memory:
        return cls(server, held(server), redis_lookups(server))

    def kept(self) -> bool:
        return held(self.server) == self.tokens and redis_lookups(self.server) == self.lookups

    def dropped(self, scopes: tuple[str, ...]) -> bool:
        return (
            held(self.server).get(scopes) != self.tokens[scopes] or redis_lookups(self.server) > self.lookups
        )

    def others_kept(self, scopes: tuple[str, ...]) -> bool:
        """Every token but ``scopes``'s still there, and at most that one refilled."""
        now = held(self.server)
        others = all(now.get(s) == d for s, d in self.tokens.items() if s != scopes)
        return others and redis_lookups(self.server) <= self.lookups + 1


def replaced_all(server: ProxyServer, before: dict[tuple[str, ...], str]) -> bool:
    """After a drop-all *and* a purge of Redis: no token of ``before`` is held any more."""
    now = held(server)
    return all(now.get(scopes) != digest for scopes, digest in before.items())


def route_key(server: ProxyServer, scope: str) -> CacheKey:
    route = next(r for r in server.settings.routes if r.scopes == (scope,))
    return server.runtime.tokens.key_for(route.scopes, route.audience)


def wire_key(key: CacheKey) -> list[Any]:
    return [key.client_id, key.fingerprint, key.audience, list(key.scopes)]


async def get(http: aiohttp.ClientSession, server: ProxyServer, scope: str) -> int:
    async with http.get(server.proxy_url + PATHS[scope]) as resp:
        await resp.read()
        return 599 if "X-Credicorp-Proxy-Error" in resp.headers else resp.status


async def warm(http: aiohttp.ClientSession, server: ProxyServer) -> dict[tuple[str, ...], str]:
    assert [await get(http, server, scope) for scope in PATHS] == [200] * len(PATHS)
    tokens = held(server)
    assert len(tokens) == len(PATHS)
    return tokens


def publish(server: RedisServer, channel: str, *messages: str | bytes) -> None:
    """All in one MULTI/EXEC, so the listener receives them back to back."""
    with server.client() as raw:
        pipe = raw.pipeline(transaction=True)
        for message in messages:
            pipe.publish(channel, message)
        pipe.execute()


class Peers:
    """Other replicas as bare ``RedisTokenCache`` objects (each its own origin), closed at the end."""

    def __init__(self) -> None:
        self.made: list[RedisTokenCache] = []
        self.metrics: dict[RedisTokenCache, Metrics] = {}

    def __call__(
        self, url: str, key_file: str | None = None, clock: Callable[[], float] = time.time, **tuning: float
    ) -> RedisTokenCache:
        settings = CacheSettings(url=url, encryption_key_file=key_file, timeout_s=0.3)
        metrics = Metrics()
        cache = RedisTokenCache.from_settings(settings, clock=clock, metrics=metrics, **tuning)
        self.made.append(cache)
        self.metrics[cache] = metrics
        return cache


@pytest.fixture
async def peers() -> AsyncIterator[Peers]:
    made = Peers()
    yield made
    for cache in made.made:
        await cache.close()


class Capture:
    """A plain subscriber on the channel: what actually travels through Redis."""

    def __init__(self, server: RedisServer, channel: str) -> None:
        self.client = redis.asyncio.Redis(host="127.0.0.1", port=server.port)
        self.pubsub = self.client.pubsub()
        self.channel = channel

    async def __aenter__(self) -> Capture:
        await self.pubsub.subscribe(self.channel)
        return self

    async def next(self) -> bytes:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is not None:
                return bytes(message["data"])
        raise AssertionError("nothing published")

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.client.aclose()


# ------------------------------------------------------------ authentication
async def test_unsigned_or_wrongly_signed_drop_alls_are_refused_and_counted_when_a_key_is_set(
    start_proxy: StartProxy, redis_server: RedisServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    ours, theirs = os.urandom(32), os.urandom(32)
    server = await start_proxy(cache_config(redis_server, write_key_file(tmp_path / "keys", ("k1", ours))))
    await warm(http, server)
    memory = Memory.of(server)
    body = json.dumps({"o": "intruder", "t": time.time(), "k": None, "d": None}, separators=(",", ":"))
    hmac_with_the_aes_key = hmac.new(ours, body.encode(), hashlib.sha256).hexdigest()
    publish(
        redis_server,
        shared(server).channel,
        '{"o":"intruder","k":null,"d":null}',  # a well-formed drop-all with no MAC
        signed(body, "0" * 64),
        signed(body, mac_of(theirs, body.encode())),  # another key (same kid) signed it
        signed(body, hmac_with_the_aes_key),  # the sealing key itself is never the MAC key
        signed(body, mac_of(ours, body.encode()).upper()),  # not our encoding: refused, not parsed
    )
    await eventually(lambda: invalidations(server, "unauthenticated") == 5, within=5)
    assert invalidations(server, "applied") == 0
    assert memory.kept()  # every memory token kept, none refilled


async def test_a_signed_drop_all_from_another_replica_is_applied_across_a_key_rotation(
    start_proxy: StartProxy,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    peers: Peers,
    tmp_path: Path,
) -> None:
    """Rotation: the restarted replica has "new, old"; one not yet restarted still signs with "old"."""
    new, old = os.urandom(32), os.urandom(32)
    rotated = write_key_file(tmp_path / "rotated", ("new", new), ("old", old))
    not_yet = write_key_file(tmp_path / "not-yet", ("old", old))
    server = await start_proxy(cache_config(redis_server, rotated))
    before = await warm(http, server)
    peer = peers(redis_server.url, not_yet)
    async with Capture(redis_server, peer.channel) as capture:
        await peer.purge_all(CLIENT)
        wire = await capture.next()
    await eventually(lambda: replaced_all(server, before), within=5)
    assert invalidations(server, "applied") == 1
    doc = json.loads(wire)
    body = wire[: wire.rindex(b',"m":')] + b"}"
    assert doc["m"] == mac_of(old, body) and doc["m"] != hmac.new(old, body, hashlib.sha256).hexdigest()
    assert abs(doc["t"] - time.time()) < 5 and doc["k"] is None and doc["d"] is None
    assert sorted(read_keys(rotated)) == ["new", "old"]


async def test_a_replayed_or_out_of_window_signed_message_is_refused(
    start_proxy: StartProxy,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    peers: Peers,
    tmp_path: Path,
) -> None:
    keys = write_key_file(tmp_path / "keys", ("k1", os.urandom(32)))
    server = await start_proxy(cache_config(redis_server, keys))
    before = await warm(http, server)
    peer = peers(redis_server.url, keys)
    async with Capture(redis_server, peer.channel) as capture:
        await peer.purge_all(CLIENT)
        captured = await capture.next()
    await eventually(lambda: replaced_all(server, before), within=5)
    await warm(http, server)
    memory = Memory.of(server)
    publish(redis_server, peer.channel, captured)  # the attacker re-publishes a valid "drop all"
    await eventually(lambda: invalidations(server, "stale") == 1, within=5)
    for skew in (-120.0, 120.0):  # signed with the right key, but two minutes off our clock
        await peers(redis_server.url, keys, clock=lambda skew=skew: time.time() + skew).purge_all(CLIENT)
    await eventually(lambda: invalidations(server, "stale") == 3, within=5)
    assert memory.kept()
    assert invalidations(server, "applied") == 1


# ----------------------------------------------------------- per-key drops
async def test_a_per_key_drop_takes_only_the_token_it_names(
    start_proxy: StartProxy, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    server = await start_proxy(cache_config(redis_server))
    before = await warm(http, server)
    key = route_key(server, "decisions:read")
    channel = shared(server).channel

    def drop(digest: str) -> str:
        return json.dumps({"o": "peer", "k": wire_key(key), "d": digest})

    memory = Memory.of(server)
    publish(redis_server, channel, drop("0" * 16))  # not the token we hold: nothing goes
    await eventually(lambda: invalidations(server, "applied") == 1, within=5)
    assert memory.kept()
    publish(redis_server, channel, drop(before[key.scopes]))
    await eventually(lambda: memory.dropped(key.scopes), within=5)
    assert memory.others_kept(key.scopes)


# ------------------------------------------------------- size, depth, shape
async def test_huge_or_deeply_nested_messages_never_stop_the_listener(
    start_proxy: StartProxy, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    server = await start_proxy(cache_config(redis_server))  # no key: every message reaches the parser
    before = await warm(http, server)
    memory = Memory.of(server)
    key = route_key(server, "decisions:read")
    valid = json.dumps({"o": "peer", "k": wire_key(key), "d": before[key.scopes]})
    publish(
        redis_server,
        shared(server).channel,
        "[" * 100_000 + "]" * 100_000,  # 200 KB: RecursionError in json.loads
        '{"o":"x","k":' + "[" * 2000 + "]" * 2000 + "}",  # under 4 KiB, still 2,000 deep
        json.dumps({"o": "x" * 5000, "k": None, "d": None}),  # a well-formed drop-all, but 5 KB
        valid,
    )
    await eventually(lambda: memory.dropped(key.scopes), within=5)
    assert memory.others_kept(key.scopes)  # the 5 KB drop-all was refused, not applied
    assert invalidations(server, "malformed") == 3 and invalidations(server, "applied") == 1
    assert redis_errors(server, "subscribe") == 0  # the listener was never dropped


# -------------------------------------------------------------- coalescing
async def test_drop_alls_within_the_interval_are_applied_once_at_its_end_never_lost(
    redis_server: RedisServer, peers: Peers
) -> None:
    interval = 0.5
    replica = peers(redis_server.url, invalidation_interval_s=interval)
    applied: list[float] = []
    await replica.start(lambda key, digest: applied.append(time.monotonic()))
    publish(redis_server, replica.channel, *['{"o":"peer","k":null,"d":null}'] * 5)  # back to back
    await eventually(lambda: len(applied) == 2, within=5)
    assert applied[1] - applied[0] >= interval * 0.9  # the second, at the end of the interval
    await asyncio.sleep(interval * 1.5)
    assert len(applied) == 2  # the other three were folded into it, none was lost or repeated


async def test_a_flood_of_drop_alls_applies_a_bounded_number_and_requests_keep_succeeding(
    start_proxy: StartProxy, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """The issue's attack, bounded: 3 s of drop-alls as fast as one client publishes them.

    The throughput it costs is measured by ``python -m tests.bench.inval_flood_bench``; here
    the bounded things are asserted, at any moment of the flood: how many messages the
    listener read, how many drops it applied, how many requests had to go past the memory
    tier because of them, and that every request succeeded.
    """
    server = await start_proxy(cache_config(redis_server))  # no key: the worst case, all well-formed
    await warm(http, server)
    misses_before = memory_misses(server)
    workers = 4
    flood = start_flood(redis_server.port, shared(server).channel, seconds=3.0)
    started = time.monotonic()
    statuses: list[int] = []

    def read() -> float:
        return sum(invalidations(server, r) for r in ("applied", "coalesced", "malformed"))

    def check_bounds() -> None:
        span = time.monotonic() - started
        applied = invalidations(server, "applied")
        assert applied <= span / INTERVAL_S + 1, (applied, span)
        assert read() <= MESSAGES_PER_S * (span + 1), (read(), span)
        assert memory_misses(server) - misses_before <= (applied + 1) * workers

    async def requests() -> None:
        while flood.poll() is None:
            statuses.append(await get(http, server, "decisions:read"))
            check_bounds()

    await asyncio.gather(*(requests() for _ in range(workers)))
    sent = int(flood.communicate(timeout=10)[0])
    await asyncio.sleep(INTERVAL_S)  # a drop-all due at the end of the interval lands, within bounds
    check_bounds()
    assert sent > 10 * read() and read() >= MESSAGES_PER_S, (sent, read())  # the listener was flooded
    assert len(statuses) > 100 and set(statuses) == {200}
    assert await get(http, server, "decisions:read") == 200


async def test_a_backlog_the_listener_cannot_catch_up_with_is_shed_and_it_is_soon_current_again(
    redis_server: RedisServer, peers: Peers
) -> None:
    """Read at 1,000/s, a 4 s flood would keep the listener behind for minutes; it sheds it instead.

    What was queued behind the flood is lost with it (as in a Redis outage), so the probe is
    a real message published every 0.1 s from the end of the flood: the first one to land
    says when the listener was current again.
    """
    replica = peers(redis_server.url)
    calls: list[tuple[CacheKey | None, str | None]] = []
    await replica.start(lambda key, digest: calls.append((key, digest)))
    started = time.monotonic()
    flood = start_flood(redis_server.port, replica.channel, seconds=4.0)
    while flood.poll() is None:
        await asyncio.sleep(0.05)
    sent = int(flood.communicate(timeout=10)[0])
    ended = time.monotonic()
    marker = CacheKey(CLIENT, "0123456789abcdef", "partner/v1", ("decisions:read",))
    probes = 0
    while not any(key == marker for key, _ in calls):
        assert time.monotonic() - ended < 20, "the listener never caught up"
        publish(
            redis_server,
            replica.channel,
            json.dumps({"o": "p", "k": wire_key(marker), "d": f"{probes:016x}"}),
        )
        probes += 1
        await asyncio.sleep(0.1)
    assert time.monotonic() - ended < SHED_AFTER_S + 2.0, time.monotonic() - ended
    metrics = peers.metrics[replica]
    read = sum(invalidations(metrics, r) for r in ("applied", "coalesced"))
    assert sent > 2 * MESSAGES_PER_S * 4, sent  # the flood did outpace the listener
    assert read <= MESSAGES_PER_S * (time.monotonic() - started + 1), (read, sent)  # the rest never read
    assert sample(metrics, "ccp_redis_errors_total", op="subscribe") >= 1  # each shed is counted
    assert calls.count((None, None)) <= (time.monotonic() - started) / INTERVAL_S + 1


# ------------------------------------------------------------------- leases
@pytest.mark.parametrize("px", [3_600_000, None], ids=["one-hour-ttl", "no-ttl"])
async def test_a_foreign_lease_does_not_delay_the_first_mint_and_is_removed(
    start_proxy: StartProxy, redis_server: RedisServer, http: aiohttp.ClientSession, px: int | None
) -> None:
    server = await start_proxy(cache_config(redis_server))
    name = shared(server).lease_name(route_key(server, "decisions:read"))
    with redis_server.client() as raw:
        raw.set(name, "squatter", px=px)
    started = time.monotonic()
    assert await get(http, server, "decisions:read") == 200
    waited = time.monotonic() - started
    assert waited < 1.0, waited  # not the lease wait, let alone the hour
    with redis_server.client() as raw:
        assert raw.get(name) is None  # taken over, then released by its new owner
    assert redis_errors(server, "lease_foreign") == 1 and redis_errors(server, "lease_timeout") == 0


async def test_a_lease_someone_keeps_renewing_delays_a_request_at_most_the_cap(
    start_proxy: StartProxy, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """A TTL within the lease TTL looks live; the cap bounds the wait, then the request mints."""
    server = await start_proxy(cache_config(redis_server))
    name = shared(server).lease_name(route_key(server, "decisions:read"))
    stop = threading.Event()

    def mimic() -> None:
        with redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5) as raw:
            while not stop.is_set():
                raw.set(name, "mimic", px=1000)
                stop.wait(0.2)

    renewer = threading.Thread(target=mimic, daemon=True)
    renewer.start()
    try:
        with redis_server.client() as raw:
            while raw.get(name) is None:
                time.sleep(0.01)
        started = time.monotonic()
        assert await get(http, server, "decisions:read") == 200
        waited = time.monotonic() - started
        with redis_server.client() as raw:
            assert raw.get(name) == b"mimic"  # a live-looking lease is not ours to take
    finally:
        stop.set()
        renewer.join(5)
    assert LEASE_CAP_S - 0.2 <= waited < LEASE_CAP_S + 1.0, waited
    assert redis_errors(server, "lease_timeout") == 1 and redis_errors(server, "lease_foreign") == 0
