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
* **Lease** = redis-py's ``Lock`` (owner token, Lua release, ``reacquire``),
  renewed in the background while the mint runs. A holder that dies stops
  renewing, its lease expires after ``lease_ttl_s``, and a waiter takes over;
  waiting is bounded by ``lease_wait_s``, after which the waiter mints anyway.
* **Invalidation.** ``purge_if_same`` deletes and PUBLISHes in one Lua script
  (atomic; compares the clear digest, so no key is needed). Messages on
  ``{prefix}:inval`` are JSON ``{"o": origin, "k": [client, fp, audience,
  [scopes]] | null, "d": digest | null}`` -- the key travels as fields, not as
  the storage id, because scopes contain ``:`` and cannot be split back
  unambiguously. A replica ignores its own messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import LockError, RedisClusterException, RedisError, ResponseError

from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.settings import CacheSettings
from proxy.tokens.model import CacheKey, Token
from proxy.tokens.sealing import Keyring, SealingKeyError, TokenCodec

log = logging.getLogger("proxy.tokens.redis")

T = TypeVar("T")
Clock = Callable[[], float]
#: ``(key or None for everything, digest of the purged token or None)``.
Invalidate = Callable[[CacheKey | None, str | None], None]
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)

LEASE_TTL_S = 5.0  # a dead holder blocks others at most this long
LEASE_WAIT_S = 8.0  # a live but slow holder is waited for at most this long
LEASE_POLL_S = 0.05
BREAKER_S = 1.0
_LISTEN_BACKOFF_S = (0.1, 5.0)
HEALTH_CHECK_S = 10

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


Client = Redis | RedisCluster


@dataclass(frozen=True, slots=True)
class Connection:
    """A client and what must be closed with it (a Sentinel set also holds sentinel connections)."""

    client: Client
    closers: tuple[Callable[[], Awaitable[None]], ...]


def _client_options(timeout_s: float) -> dict[str, Any]:
    """Short timeouts and ONE quick retry: redis-py's default (10 retries, 1 s cap) would stall requests."""
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
        "health_check_interval": HEALTH_CHECK_S,
    }


def _split_netloc(netloc: str) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """``[user[:password]@]host:port[,host:port...]`` -> (auth kwargs, hosts)."""
    auth: dict[str, Any] = {}
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        auth = {"username": unquote(user) or None, "password": unquote(password) or None}
    hosts = []
    for item in netloc.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cache.url: expected host:port, got {item!r}")
        hosts.append((host.strip("[]"), int(port)))
    return auth, hosts


def _sentinel(url: str, options: dict[str, Any]) -> Connection:
    """``redis+sentinel://[auth@]h:p[,h:p]/service[/db]``: the current master, re-resolved on failover."""
    parts = urlsplit(url)
    auth, hosts = _split_netloc(parts.netloc)
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("cache.url: redis+sentinel://host:port[,host:port]/service_name[/db]")
    sentinel_options = {k: v for k, v in options.items() if k != "health_check_interval"}
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_options, **options, **auth)  # type: ignore[no-untyped-call]
    client: Redis = sentinel.master_for(path[0], db=int(path[1]) if len(path) == 2 else 0)
    return Connection(client, (client.aclose, *(s.aclose for s in sentinel.sentinels)))


def _cluster(url: str, options: dict[str, Any]) -> Connection:
    """``redis+cluster://[auth@]h:p[,h:p]`` (``rediss+cluster`` for TLS): any node bootstraps the map."""
    scheme = url.partition("://")[0].lower()
    auth, hosts = _split_netloc(urlsplit(url).netloc)
    tls: dict[str, Any] = {}
    if scheme.startswith("rediss"):
        tls = {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True}
    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts], **options, **auth, **tls)
    return Connection(client, (client.aclose,))


def _standalone(url: str, options: dict[str, Any]) -> Connection:
    tls = url.lower().startswith("rediss://")
    extra: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True} if tls else {}
    client = Redis.from_url(url, **options, **extra)
    kwargs = client.connection_pool.connection_kwargs
    if tls and (
        kwargs.get("ssl_cert_reqs") not in ("required", ssl.CERT_REQUIRED)
        or not kwargs.get("ssl_check_hostname")
    ):
        raise ValueError("cache.url: rediss:// always verifies the server certificate and host name")
    return Connection(client, (client.aclose,))


def connect(url: str, timeout_s: float) -> Connection:
    """A client for ``cache.url``; connects lazily, so a Redis that is down does not stop start-up."""
    scheme = url.partition("://")[0].lower()
    options = _client_options(timeout_s)
    if scheme == "redis+sentinel":
        return _sentinel(url, options)
    if scheme in ("redis+cluster", "rediss+cluster"):
        return _cluster(url, options)
    if scheme in ("redis", "rediss", "unix"):
        return _standalone(url, options)
    raise ValueError(f"cache.url: unsupported scheme {scheme!r}")


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _accepting_digest(handler: Callable[..., None]) -> Invalidate:
    """Adapt a one-argument ``drop(key)`` until the manager's handler takes the digest too."""
    try:
        inspect.signature(handler).bind(None, None)
    except (TypeError, ValueError):
        return lambda key, _digest: handler(key)
    return handler


def parse_invalidation(data: bytes | str) -> tuple[str, CacheKey | None, str | None] | None:
    """(origin, key or None for all, digest or None) of a message; None if malformed."""
    try:
        doc = json.loads(data)
        origin, raw_key, digest = doc["o"], doc.get("k"), doc.get("d")
        key = None if raw_key is None else CacheKey(raw_key[0], raw_key[1], raw_key[2], tuple(raw_key[3]))
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    if not isinstance(origin, str) or (digest is not None and not isinstance(digest, str)):
        return None
    return origin, key, digest


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
        self._breaker_until = 0.0
        self._handler: Invalidate | None = None
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
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
        wire_key = None if key is None else [key.client_id, key.fingerprint, key.audience, list(key.scopes)]
        return json.dumps({"o": self.origin, "k": wire_key, "d": digest}, separators=(",", ":"))

    # ----------------------------------------------------------------- lease
    @asynccontextmanager
    async def lease(self, key: CacheKey) -> AsyncIterator[None]:
        """Hold the cluster-wide lease for ``key`` if Redis grants it in time; proceed regardless."""
        lock = await self._acquire(self.lease_name(key))
        if lock is None:
            yield
            return
        renewal = asyncio.get_running_loop().create_task(self._renew(lock))
        self._renewals.add(renewal)
        renewal.add_done_callback(self._renewals.discard)
        try:
            yield
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
            await self._release(lock)

    async def _acquire(self, name: str) -> Lock | None:
        lock = Lock(
            self._client,
            name,
            timeout=self._lease_ttl,
            sleep=LEASE_POLL_S,
            blocking_timeout=self._lease_wait,
            thread_local=False,
            raise_on_release_error=False,
        )
        acquired = await self._call("lease", lock.acquire, None, budget=self._lease_wait + self._budget)
        if acquired is False:
            self._metrics.redis_errors.labels("lease_timeout").inc()
            log.warning("lease not granted in time; minting without it", extra={"event": "lease_timeout"})
        return lock if acquired else None

    async def _renew(self, lock: Lock) -> None:
        """Keep the lease alive while the mint runs; stop if it was lost (expired and taken)."""
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            try:
                async with asyncio.timeout(self._budget):
                    await lock.reacquire()
            except LockError:
                self._metrics.redis_errors.labels("lease").inc()
                return
            except REDIS_ERRORS as exc:
                self._failed("lease", exc)

    async def _release(self, lock: Lock) -> None:
        """Release only our own lease (Lua compare on the owner token); an expired one is left alone."""
        try:
            async with asyncio.timeout(self._budget):
                await lock.release()
        except LockError:
            pass  # expired, possibly re-taken by another replica: nothing of ours to release
        except REDIS_ERRORS as exc:
            self._failed("lease", exc)

    # ---------------------------------------------------------- invalidation
    async def start(self, on_invalidate: Callable[..., None]) -> None:
        """Listen for invalidations; waits briefly for the subscription, never for Redis to come up."""
        self._handler = _accepting_digest(on_invalidate)
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
        try:
            async with asyncio.timeout(self._budget):
                await pubsub.subscribe(self.channel)
            self._subscribed.set()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    self._dispatch(message["data"])
        finally:
            with contextlib.suppress(*REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _dispatch(self, data: bytes) -> None:
        parsed = parse_invalidation(data)
        if parsed is None or parsed[0] == self.origin or self._handler is None:
            return  # our own purge: the memory copy was already dropped where it was purged
        try:
            self._handler(parsed[1], parsed[2])
        except Exception:
            log.exception("invalidation handler failed", extra={"event": "invalidation_error"})

    async def close(self) -> None:
        """Stop the listener and lease renewals, then close the connections."""
        tasks = [t for t in (self._listener, *self._renewals) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for closer in self._closers:
            with contextlib.suppress(*REDIS_ERRORS):
                await closer()
