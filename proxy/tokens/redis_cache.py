"""The shared token tier: Redis, read by every replica behind its memory tier.

Why it looks the way it does:

* **Redis must never fail a request.** Every call has a short budget
  (``cache.timeout_s`` for connect and read, one quick retry so a pooled
  connection killed by a Redis restart is replaced transparently), and any
  failure is counted in ``ccp_redis_errors_total{op}`` and degrades: ``get``
  is a miss, ``put`` a no-op, ``lease`` proceeds without the lease (the
  manager still has per-replica single flight). After a connection failure a
  short breaker skips Redis for ``BREAKER_S`` so an unreachable server costs
  one timeout per second, not one per call.
* **Slots.** ``{prefix}:tok:{<storage id>}``; the braces are a Cluster hash tag,
  so the token, its lease (``{prefix}:lease:{<storage id>}``) and the
  compare-and-delete script live in one slot. Freshness is judged from the
  absolute ``expires_at`` with the injected clock; the Redis TTL only cleans up.
* **Lease** = ``{prefix}:lease:{..}`` holding a random owner token, set with
  ``PX lease_ttl_s`` and renewed every third of that while the mint runs (Lua
  compare on the owner token for renewal and release). A holder that dies stops
  renewing, its lease expires after ``lease_ttl_s``, and a waiter takes over.
  Whoever can write Redis can also write a lease, so one is trusted only while
  it looks like a live owner's: a lease with no TTL, or a TTL longer than
  ``lease_ttl_s`` (no replica ever sets that), is foreign and is taken over at
  once (counted as ``lease_foreign``). A lease that keeps being renewed (a slow
  mint elsewhere, or someone mimicking one) is waited for at most
  ``lease_wait_s``; then the waiter mints without it (``lease_timeout``).
* **Invalidation.** ``purge_if_same`` deletes and PUBLISHes in one Lua script
  (atomic; compares the clear digest, so no key is needed); the message it
  publishes is built here beforehand, so it can carry a MAC. Messages on
  ``{prefix}:inval`` are JSON ``{"o": origin, "t": sent at, "k": [client, fp,
  audience, [scopes]] | null, "d": digest | null}`` -- the key travels as fields,
  not as the storage id, because scopes contain ``:`` and cannot be split back
  unambiguously. A replica ignores its own messages.
* **Invalidations are not trusted.** Anyone who can PUBLISH on Redis can send
  them. A message over ``MAX_MESSAGE_BYTES`` or with more than
  ``MAX_MESSAGE_CONTAINERS`` JSON arrays/objects is refused before it is
  parsed, and nothing a message contains can stop the listener. With
  ``cache.encryption_key_file`` every message ends in ``"m": HMAC-SHA256`` (hex)
  of the message without that field, under a key derived from the sealing key
  (never the AES key itself); it is accepted under any key of the ring, so a key
  rotation works across a rolling restart. Unsigned or badly signed messages
  are dropped. An authenticated message is accepted once and only within
  ``INVALIDATION_MAX_AGE_S`` of its ``t`` (a captured "drop everything" cannot
  be replayed). Whatever the key: at most one drop-all is applied per
  ``INVALIDATION_INTERVAL_S`` (one arriving sooner is applied once at the end of
  the interval, never lost) and a repeated per-key drop within the interval is
  folded into the first, so a flood costs the memory tier at most one refill
  per interval. A per-key drop names the digest of the token it drops; the
  handler drops only that token. Each message is counted in
  ``ccp_invalidations_total{result}``. The listener reads at most
  ``MAX_MESSAGES_PER_S`` (and yields to the request path after every message);
  held back by that for ``SHED_AFTER_S`` without catching up, it drops the
  subscription and its backlog and re-subscribes, so a flood costs a bounded
  share of one core and the listener is current again seconds after it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import random
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, ResponseError

from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.settings import CacheSettings
from proxy.tokens.model import CacheKey, Token
from proxy.tokens.redis_connect import REDIS_ERRORS, Client, Connection, connect
from proxy.tokens.sealing import Keyring, SealingKeyError, TokenCodec

log = logging.getLogger("proxy.tokens.redis")

T = TypeVar("T")
Clock = Callable[[], float]
#: ``(key or None for everything, digest of the purged token or None)``.
Invalidate = Callable[[CacheKey | None, str | None], None]

LEASE_TTL_S = 5.0  # a dead holder blocks others at most this long; a live one renews every third of it
LEASE_WAIT_S = 2.0  # a renewed lease (a slow mint elsewhere) is waited for at most this long
LEASE_POLL_S = 0.05
BREAKER_S = 1.0
INVALIDATION_INTERVAL_S = 1.0  # at most one drop-all applied per interval; per-key repeats folded
INVALIDATION_MAX_AGE_S = 60.0  # an authenticated message this far from our clock is refused
MAX_MESSAGE_BYTES = 4096  # ours are a few hundred bytes; bigger is refused unparsed
MAX_MESSAGE_CONTAINERS = 8  # JSON arrays/objects per message (ours: 3), so parse depth is bounded
MAX_MESSAGES_PER_S = 1000  # the listener reads no faster (1 s burst): a flood must not eat the CPU
SHED_AFTER_S = 2.0  # held back by that rate this long without catching up: drop the backlog
_SEEN_MACS_MAX = 4096  # authenticated messages remembered (within the max age) to refuse replays
_RECENT_KEYS_MAX = 1024  # per-key drops remembered for one interval to fold repeats
_LISTEN_BACKOFF_S = (0.1, 5.0)

# KEYS[1] token slot; ARGV: digest, channel, message. Deletes only the rejected token.
_PURGE_IF_SAME = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local ok, doc = pcall(cjson.decode, raw)
if not ok or type(doc) ~= 'table' or doc['d'] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# KEYS[1] lease; ARGV: owner token, ttl ms. 1 = taken, 2 = taken over from a foreign holder (no TTL,
# or a TTL no live replica sets), 0 = held by a live-looking owner. Atomic: nothing can slip between
# the look at the holder and the takeover.
_LEASE_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
local left = redis.call('PTTL', KEYS[1])
if left == -1 or left > tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""
# KEYS[1] lease; ARGV: owner token, ttl ms. Extends it only while it is still ours.
_LEASE_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS[1] lease; ARGV: owner token. Deletes it only while it is still ours.
_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_MAC_OPEN = b',"m":"'
_MAC_TAIL = len(_MAC_OPEN) + 64 + 2  # ,"m":"<64 hex>"}
_HEX = re.compile(rb"[0-9a-f]{64}")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One message: drop ``key``'s token with ``digest``, or everything when ``key`` is None."""

    origin: str
    key: CacheKey | None
    digest: str | None
    sent_at: float | None  # sender's clock; required (and checked) only when messages are signed


def _containers(data: bytes) -> int:
    """JSON arrays and objects outside strings: an upper bound on nesting, counted without parsing."""
    bare = _JSON_STRING.sub(b"", data)
    return bare.count(b"[") + bare.count(b"{")


def _wire_key(raw: Any) -> CacheKey | None:
    if not (isinstance(raw, list) and len(raw) == 4 and isinstance(raw[3], list)):
        return None
    client, fingerprint, audience, scopes = raw
    if not all(isinstance(part, str) for part in (client, fingerprint, audience, *scopes)):
        return None
    return CacheKey(client, fingerprint, audience, tuple(scopes))


def parse_invalidation(data: bytes) -> Invalidation | None:
    """The message in ``data``, or None if it is malformed (too big, too nested, wrong shape).

    Size and nesting are checked before ``json.loads`` so a hostile message costs a
    bounded amount of work; ``RecursionError`` is caught anyway.
    """
    if len(data) > MAX_MESSAGE_BYTES or _containers(data) > MAX_MESSAGE_CONTAINERS:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    origin, raw_key, digest, sent_at = doc.get("o"), doc.get("k"), doc.get("d"), doc.get("t")
    if not isinstance(origin, str) or (digest is not None and not isinstance(digest, str)):
        return None
    if sent_at is not None and (
        isinstance(sent_at, bool) or not isinstance(sent_at, int | float) or not math.isfinite(sent_at)
    ):
        return None
    key = None if raw_key is None else _wire_key(raw_key)
    if (raw_key is not None and key is None) or (key is None) != (digest is None):
        return None  # a per-key drop names the token it drops; a drop-all names none
    return Invalidation(origin, key, digest, None if sent_at is None else float(sent_at))


class _Pace:
    """A token bucket for the listener: ``rate`` messages a second, bursts of up to one second's worth.

    A flood is not read faster than this; what it sends beyond waits in Redis, which
    disconnects a subscriber that falls too far behind (``client-output-buffer-limit
    pubsub``), and the listener sheds a backlog it cannot catch up with. Once over the
    rate it waits for a batch (1/20 s) worth at a time, not one message's: a timer per
    message would cost more CPU than reading the messages.
    """

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._allowance = rate
        self._last: float | None = None

    def delay(self, now: float) -> float:
        """Seconds to wait after one more message (0 within the rate)."""
        if self._last is not None:
            self._allowance = min(self._rate, self._allowance + (now - self._last) * self._rate)
        self._last = now
        self._allowance -= 1
        if self._allowance >= 0:
            return 0.0
        return (self._rate / 20 - self._allowance) / self._rate


class RedisTokenCache:
    """``TokenCache`` over Redis (standalone, TLS, Sentinel or Cluster) plus invalidation pub/sub."""

    def __init__(
        self,
        connection: Connection,
        *,
        prefix: str,
        codec: TokenCodec,
        clock: Clock,
        metrics: Metrics,
        timeout_s: float,
        lease_ttl_s: float = LEASE_TTL_S,
        lease_wait_s: float = LEASE_WAIT_S,
        keyring: Keyring | None = None,
        invalidation_interval_s: float = INVALIDATION_INTERVAL_S,
        invalidation_max_age_s: float = INVALIDATION_MAX_AGE_S,
        max_messages_per_s: float = MAX_MESSAGES_PER_S,
    ) -> None:
        self._client: Client = connection.client
        self._closers = connection.closers
        self._prefix = prefix
        self._codec = codec
        self._clock = clock
        self._metrics = metrics
        self._budget = 2 * timeout_s + 0.1  # connect + read, and the one retry's backoff
        self._lease_ttl = lease_ttl_s
        self._lease_wait = lease_wait_s
        self.channel = f"{prefix}:inval"
        self.origin = uuid.uuid4().hex
        self._purge_script = self._client.register_script(_PURGE_IF_SAME)
        self._lease_scripts = tuple(
            self._client.register_script(lua) for lua in (_LEASE_ACQUIRE, _LEASE_RENEW, _LEASE_RELEASE)
        )
        self._foreign_lease_logged = False
        self._breaker_until = 0.0
        self._handler: Invalidate | None = None
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._renewals: set[asyncio.Task[None]] = set()
        # Invalidation trust and coalescing (see the module docstring).
        self._keyring = keyring if keyring is not None and keyring.mac_keys else None
        self._interval = invalidation_interval_s
        self._max_age = invalidation_max_age_s
        self._max_rate = max_messages_per_s
        self._pace = _Pace(max_messages_per_s)  # kept across re-subscriptions: no fresh burst each time
        self._last_drop_all = -math.inf  # loop time of the last drop-all applied
        self._pending_drop_all: asyncio.TimerHandle | None = None
        self._recent_keys: dict[tuple[CacheKey, str | None], float] = {}
        self._seen_macs: OrderedDict[str, float] = OrderedDict()  # MAC -> sender's time
        self._refusals_logged: set[str] = set()
        self._shed_logged = False

    @classmethod
    def from_settings(
        cls, cache: CacheSettings, *, clock: Clock, metrics: Metrics, **tuning: float
    ) -> RedisTokenCache:
        """Build from config; reads the key file now so a bad key fails start-up, not a request."""
        try:
            keyring = Keyring.from_file(cache.encryption_key_file) if cache.encryption_key_file else None
        except SealingKeyError as exc:  # changed since validation: still a config error, not a crash
            raise ConfigError([f"cache.encryption_key_file: {exc}"]) from None
        return cls(
            connect(cache.url, cache.timeout_s),
            prefix=cache.key_prefix,
            codec=TokenCodec(keyring),
            clock=clock,
            metrics=metrics,
            timeout_s=cache.timeout_s,
            keyring=keyring,
            **tuning,
        )

    # ------------------------------------------------------------------ names
    def slot(self, key: CacheKey) -> str:
        return f"{self._prefix}:tok:{{{key.storage_id()}}}"

    def lease_name(self, key: CacheKey) -> str:
        return f"{self._prefix}:lease:{{{key.storage_id()}}}"

    # ------------------------------------------------------- failure policy
    async def _call(self, op: str, call: Callable[[], Awaitable[T]], default: T, budget: float = 0) -> T:
        """Run one Redis operation within its budget; on any Redis failure count it and degrade."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._breaker_until:
            self._metrics.redis_errors.labels(op).inc()
            return default
        try:
            async with asyncio.timeout(budget or self._budget):
                result = await call()
        except REDIS_ERRORS as exc:
            self._failed(op, exc)
            return default
        except Exception:  # a client-library surprise must not fail a request either
            self._metrics.redis_errors.labels(op).inc()
            log.exception("redis %s failed unexpectedly", op, extra={"event": "redis_error", "op": op})
            return default
        if self._breaker_until:
            self._breaker_until = 0.0
            log.info("redis reachable again", extra={"event": "redis_recovered", "op": op})
        return result

    def _failed(self, op: str, exc: BaseException) -> None:
        self._metrics.redis_errors.labels(op).inc()
        if isinstance(exc, ResponseError) and not isinstance(exc, RedisClusterException):
            log.warning("redis %s refused: %s", op, exc, extra={"event": "redis_error", "op": op})
            return
        if not self._breaker_until:
            log.warning(
                "redis %s failed (%s); serving from memory and minting per replica",
                op,
                type(exc).__name__,
                extra={"event": "redis_unavailable", "op": op},
            )
        self._breaker_until = asyncio.get_running_loop().time() + BREAKER_S

    async def ping(self) -> bool:
        """True when Redis answers now (for ``flush`` and diagnostics, not for readiness)."""
        return bool(await self._call("ping", self._client.ping, False))

    # ---------------------------------------------------------------- tokens
    async def get(self, key: CacheKey) -> Token | None:
        slot = self.slot(key)
        raw = await self._call("get", lambda: self._client.get(slot), None)
        if raw is None:
            return None
        token = self._codec.decode(raw, slot)
        if token is None:
            self._metrics.cache_lookups.labels("redis", "unreadable").inc()
            return None
        return None if token.is_expired(self._clock()) else token

    async def put(self, key: CacheKey, token: Token) -> None:
        ttl_ms = int((token.expires_at - self._clock()) * 1000)
        if ttl_ms <= 0:
            return
        slot = self.slot(key)
        value = self._codec.encode(token, slot)
        await self._call("put", lambda: self._client.set(slot, value, px=ttl_ms), None)

    async def purge_if_same(self, key: CacheKey, token: Token) -> bool:
        message = self._message(key, token.digest)
        args = [token.digest, self.channel, message]
        deleted = await self._call("purge", lambda: self._purge_script(keys=[self.slot(key)], args=args), 0)
        return bool(deleted)

    async def purge_all(self, client_id: str) -> int:
        """Delete every slot of ``client_id`` (all fingerprints), then tell every replica."""
        pattern = f"{_glob_escape(self._prefix)}:tok:{{{_glob_escape(client_id)}:*"
        names: list[Any] = await self._call("scan", lambda: self._scan(pattern), [], budget=10 * self._budget)
        deleted = 0
        for name in names:
            deleted += await self._call("purge", functools.partial(self._client.unlink, name), 0)
        await self._call("publish", lambda: self._client.publish(self.channel, self._message(None, None)), 0)
        return deleted

    async def _scan(self, pattern: str) -> list[Any]:
        return [name async for name in self._client.scan_iter(match=pattern, count=1000)]

    def _message(self, key: CacheKey | None, digest: str | None) -> str:
        """The invalidation message, signed when a key is set (the MAC is the last field)."""
        wire_key = None if key is None else [key.client_id, key.fingerprint, key.audience, list(key.scopes)]
        doc = {"o": self.origin, "t": round(self._clock(), 3), "k": wire_key, "d": digest}
        body = json.dumps(doc, separators=(",", ":"))  # ASCII: these are the bytes Redis publishes
        if self._keyring is None:
            return body
        return f'{body[:-1]},"m":"{self._keyring.mac(body.encode())}"}}'

    # ----------------------------------------------------------------- lease
    @asynccontextmanager
    async def lease(self, key: CacheKey) -> AsyncIterator[None]:
        """Hold the cluster-wide lease for ``key`` if Redis grants it in time; proceed regardless."""
        name = self.lease_name(key)
        owner = await self._acquire(name)
        if owner is None:
            yield
            return
        renewal = asyncio.get_running_loop().create_task(self._renew(name, owner))
        self._renewals.add(renewal)
        renewal.add_done_callback(self._renewals.discard)
        try:
            yield
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
            await self._release(name, owner)

    @property
    def _lease_ttl_ms(self) -> int:
        return max(1, int(self._lease_ttl * 1000))

    async def _acquire(self, name: str) -> str | None:
        """Our owner token once the lease is ours; None to proceed without it.

        Polls while a live-looking owner holds it, for at most ``lease_wait_s``
        (then ``lease_timeout``). A foreign lease is taken over by the same script
        that looked at it. A Redis failure means no lease: never a failed request.
        """
        owner = uuid.uuid4().hex
        attempt = functools.partial(self._lease_scripts[0], keys=[name], args=[owner, self._lease_ttl_ms])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lease_wait
        while True:
            got = await self._call("lease", attempt, None)
            if got is None:
                return None  # counted by _call
            if got == 2:
                self._foreign_lease()
            if got:
                return owner
            left = deadline - loop.time()
            if left <= 0:
                self._metrics.redis_errors.labels("lease_timeout").inc()
                log.warning("lease not granted in time; minting without it", extra={"event": "lease_timeout"})
                return None
            await asyncio.sleep(min(LEASE_POLL_S, left))

    def _foreign_lease(self) -> None:
        """Counted every time, logged once: a foreign lease means someone else writes our keys."""
        self._metrics.redis_errors.labels("lease_foreign").inc()
        if not self._foreign_lease_logged:
            self._foreign_lease_logged = True
            log.warning(
                "took over a mint lease no replica could have set (no expiry, or one longer than %.0f s); "
                "something other than the proxies writes to this Redis",
                self._lease_ttl,
                extra={"event": "lease_foreign"},
            )

    async def _renew(self, name: str, owner: str) -> None:
        """Keep the lease alive while the mint runs; stop if it was lost (expired and taken)."""
        renew = self._lease_scripts[1]
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            try:
                async with asyncio.timeout(self._budget):
                    kept = await renew(keys=[name], args=[owner, self._lease_ttl_ms])
            except REDIS_ERRORS as exc:
                self._failed("lease", exc)
                continue
            if not kept:
                self._metrics.redis_errors.labels("lease").inc()
                return

    async def _release(self, name: str, owner: str) -> None:
        """Release only our own lease (Lua compare on the owner token); an expired one is left alone."""
        try:
            async with asyncio.timeout(self._budget):
                await self._lease_scripts[2](keys=[name], args=[owner])
        except REDIS_ERRORS as exc:
            self._failed("lease", exc)

    # ---------------------------------------------------------- invalidation
    async def start(self, on_invalidate: Invalidate) -> None:
        """Listen for invalidations; waits briefly for the subscription, never for Redis to come up."""
        self._handler = on_invalidate
        self._listener = asyncio.get_running_loop().create_task(self._listen(), name="ccp-redis-inval")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._budget):
                await self._subscribed.wait()

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    async def _listen(self) -> None:
        """Subscribe, dispatch, and on any loss re-subscribe with jittered exponential backoff."""
        delay = _LISTEN_BACKOFF_S[0]
        while True:
            try:
                await self._subscribe_and_dispatch()
                self._subscribed.clear()  # returned: it shed a flood's backlog; re-subscribe at once
                delay = _LISTEN_BACKOFF_S[0]
                continue
            except Exception as exc:  # a listener that dies silently would leave stale copies forever
                if self._subscribed.is_set():
                    delay = _LISTEN_BACKOFF_S[0]
                self._subscribed.clear()
                self._metrics.redis_errors.labels("subscribe").inc()
                level = logging.DEBUG if isinstance(exc, REDIS_ERRORS) else logging.WARNING
                log.log(level, "invalidation listener lost Redis: %r", exc, extra={"event": "subscribe_lost"})
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(2 * delay, _LISTEN_BACKOFF_S[1])

    async def _subscribe_and_dispatch(self) -> None:
        if isinstance(self._client, RedisCluster):
            async with asyncio.timeout(self._budget):
                await self._client.initialize()  # its pub/sub needs the slot map first
        pubsub = self._client.pubsub()
        pace = self._pace
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._budget):
                await pubsub.subscribe(self.channel)
            self._subscribed.set()
            behind_since: float | None = None
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    behind_since = None  # the channel was empty: caught up
                    continue
                if message.get("type") != "message":
                    continue
                try:
                    self._dispatch(message["data"])
                except Exception:  # nothing a message holds may stop the listener
                    self._count("malformed")
                    log.exception("invalidation message failed", extra={"event": "invalidation_error"})
                # Always yield (redis-py returns buffered messages without yielding, so a flood
                # would starve the request path), and past the rate wait: the backlog stays in Redis.
                now = loop.time()
                wait = pace.delay(now)
                if wait > 0:
                    behind_since = now if behind_since is None else behind_since
                    if now - behind_since >= SHED_AFTER_S:
                        self._shed()
                        return
                await asyncio.sleep(wait)
        finally:
            with contextlib.suppress(*REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _shed(self) -> None:
        """Behind a flood for ``SHED_AFTER_S``: let its backlog go with the subscription.

        Reading it at the capped rate could take minutes (Redis buffers up to its pubsub
        output limit, the socket more). Real invalidations buried in it are lost, as in a
        Redis outage: a token purged elsewhere meanwhile costs this replica one 401 retry.
        Nothing is dropped for it: with a key set, unsigned junk must never empty the memory tier.
        """
        self._metrics.redis_errors.labels("subscribe").inc()
        if not self._shed_logged:
            self._shed_logged = True
            log.warning(
                "invalidation channel flooded (over %d messages/s for %.0f s); dropping its backlog "
                "and re-subscribing (counted as subscribe errors)",
                self._max_rate,
                SHED_AFTER_S,
                extra={"event": "invalidation_flood"},
            )

    def _dispatch(self, data: bytes | str) -> None:
        """Check one message (size, MAC, shape, freshness), then coalesce and apply it."""
        raw = data.encode() if isinstance(data, str) else data
        if len(raw) > MAX_MESSAGE_BYTES:
            self._refuse("malformed")
            return
        mac = None
        if self._keyring is not None:
            signed = self._verified(raw)
            if signed is None:
                self._refuse("unauthenticated")
                return
            raw, mac = signed
        message = parse_invalidation(raw)
        if message is None:
            self._refuse("malformed")
            return
        if message.origin == self.origin:
            return  # our own purge: the memory copy was already dropped where it was purged
        if mac is not None and not self._fresh(message, mac):
            self._refuse("stale")
            return
        if message.key is None:
            self._drop_all()
        else:
            self._drop_key(message.key, message.digest)

    def _verified(self, raw: bytes) -> tuple[bytes, str] | None:
        """(the message without its MAC field, the MAC) if a key of the ring signed it, else None."""
        assert self._keyring is not None
        tail = raw[-_MAC_TAIL:]
        if len(raw) <= _MAC_TAIL or not tail.startswith(_MAC_OPEN) or not tail.endswith(b'"}'):
            return None
        mac = tail[len(_MAC_OPEN) : -2]
        if not _HEX.fullmatch(mac):
            return None
        body = raw[:-_MAC_TAIL] + b"}"  # exactly the bytes the sender signed
        return (body, mac.decode()) if self._keyring.mac_matches(body, mac.decode()) else None

    def _fresh(self, message: Invalidation, mac: str) -> bool:
        """A signed message is accepted once, and only near its send time (no replays)."""
        now = self._clock()
        sent = message.sent_at
        if sent is None or abs(now - sent) > self._max_age or mac in self._seen_macs:
            return False
        seen = self._seen_macs
        while seen and (len(seen) >= _SEEN_MACS_MAX or next(iter(seen.values())) < now - self._max_age):
            seen.popitem(last=False)
        seen[mac] = sent
        return True

    def _drop_all(self) -> None:
        """Apply now, or once at the end of the interval if one was applied less than an interval ago."""
        if self._pending_drop_all is not None:
            self._count("coalesced")
            return
        loop = asyncio.get_running_loop()
        due = self._last_drop_all + self._interval
        if loop.time() >= due:
            self._apply_drop_all()
        else:
            self._pending_drop_all = loop.call_at(due, self._apply_drop_all)

    def _apply_drop_all(self) -> None:
        self._pending_drop_all = None
        self._last_drop_all = asyncio.get_running_loop().time()
        self._apply(None, None)

    def _drop_key(self, key: CacheKey, digest: str | None) -> None:
        """Apply at once (a rejected token should go soon); a repeat within the interval is folded."""
        now = asyncio.get_running_loop().time()
        marker = (key, digest)
        last = self._recent_keys.get(marker)
        if last is not None and now - last < self._interval:
            self._count("coalesced")
            return
        recent = self._recent_keys
        if len(recent) >= _RECENT_KEYS_MAX:
            for old in [m for m, at in recent.items() if now - at >= self._interval]:
                del recent[old]
            if len(recent) >= _RECENT_KEYS_MAX:
                recent.clear()  # a flood of distinct keys: forgetting only lets a repeat through
        recent[marker] = now
        self._apply(key, digest)

    def _apply(self, key: CacheKey | None, digest: str | None) -> None:
        self._count("applied")
        if self._handler is None:
            return
        try:
            self._handler(key, digest)
        except Exception:
            log.exception("invalidation handler failed", extra={"event": "invalidation_error"})

    def _count(self, result: str) -> None:
        self._metrics.invalidations.labels(result).inc()

    def _refuse(self, result: str) -> None:
        """Count every refused message; log the first of each kind (a flood must not flood the log)."""
        self._count(result)
        if result not in self._refusals_logged:
            self._refusals_logged.add(result)
            log.warning(
                "refused an invalidation message (%s); further ones are only counted in "
                "ccp_invalidations_total",
                result,
                extra={"event": "invalidation_refused", "result": result},
            )

    async def close(self) -> None:
        """Stop the listener, pending drops and lease renewals, then close the connections."""
        if self._pending_drop_all is not None:
            self._pending_drop_all.cancel()
            self._pending_drop_all = None
        tasks = [t for t in (self._listener, *self._renewals) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for closer in self._closers:
            with contextlib.suppress(*REDIS_ERRORS):
                await closer()
