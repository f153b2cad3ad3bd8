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
  publishes is built beforehand by the ``InvalidationChannel``, so it can carry
  a MAC. The message is ``proxy.tokens.invalidation``; listening, coalescing
  and the listener's rate are ``proxy.tokens.invalidation_channel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from redis.exceptions import RedisClusterException, ResponseError

from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.settings import CacheSettings
from proxy.tokens.cache import Clock, InvalidationHandler
from proxy.tokens.invalidation import INVALIDATION_MAX_AGE_S
from proxy.tokens.invalidation_channel import INVALIDATION_INTERVAL_S, MAX_MESSAGES_PER_S, InvalidationChannel
from proxy.tokens.model import CacheKey, Token
from proxy.tokens.redis_connect import REDIS_ERRORS, Client, Connection, connect
from proxy.tokens.sealing import Keyring, SealingKeyError, TokenCodec

log = logging.getLogger("proxy.tokens.redis")

T = TypeVar("T")

LEASE_TTL_S = 5.0  # a dead holder blocks others at most this long; a live one renews every third of it
LEASE_WAIT_S = 2.0  # a renewed lease (a slow mint elsewhere) is waited for at most this long
LEASE_POLL_S = 0.05
BREAKER_S = 1.0

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


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


class RedisTokenCache:
    """``SharedTokenCache`` over Redis (standalone, TLS, Sentinel or Cluster), with invalidation pub/sub."""

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
        self._invalidations = InvalidationChannel(
            self._client,
            f"{prefix}:inval",
            clock=clock,
            metrics=metrics,
            budget_s=self._budget,
            keyring=keyring,
            interval_s=invalidation_interval_s,
            max_age_s=invalidation_max_age_s,
            max_messages_per_s=max_messages_per_s,
        )
        self.channel = self._invalidations.name
        self._purge_script = self._client.register_script(_PURGE_IF_SAME)
        self._lease_scripts = tuple(
            self._client.register_script(lua) for lua in (_LEASE_ACQUIRE, _LEASE_RENEW, _LEASE_RELEASE)
        )
        self._foreign_lease_logged = False
        self._breaker_until = 0.0
        self._renewals: set[asyncio.Task[None]] = set()

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
        message = self._invalidations.message(key, token.digest)
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
        drop_all = self._invalidations.message(None, None)
        await self._call("publish", lambda: self._client.publish(self.channel, drop_all), 0)
        return deleted

    async def _scan(self, pattern: str) -> list[Any]:
        return [name async for name in self._client.scan_iter(match=pattern, count=1000)]

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
    async def start(self, on_invalidate: InvalidationHandler) -> None:
        """Listen for other replicas' invalidations (see ``InvalidationChannel.start``)."""
        await self._invalidations.start(on_invalidate)

    @property
    def subscribed(self) -> bool:
        return self._invalidations.subscribed

    async def close(self) -> None:
        """Stop the listener, pending drops and lease renewals, then close the connections."""
        await self._invalidations.close()
        renewals = list(self._renewals)
        for task in renewals:
            task.cancel()
        await asyncio.gather(*renewals, return_exceptions=True)
        for closer in self._closers:
            with contextlib.suppress(*REDIS_ERRORS):
                await closer()
