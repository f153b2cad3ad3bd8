"""From ``cache.url`` to a Redis client: standalone, TLS, Sentinel or Cluster.

Why it looks the way it does:

* **Redis must never fail a request**, so every client gets short socket
  timeouts (``cache.timeout_s`` for connect and read) and ONE quick retry, which
  replaces a pooled connection killed by a Redis restart transparently;
  redis-py's defaults would stall requests for seconds. A client connects
  lazily, so a Redis that is down does not stop start-up.
* **TLS is never unverified.** ``rediss://`` (and ``rediss+cluster://``)
  always check the server certificate and host name; a URL that asks for
  less is refused rather than quietly obeyed.
* **Sentinel** hands out the current master and re-resolves it on failover;
  **Cluster** bootstraps the slot map from any listed node. Either way the
  caller gets one ``Connection``: the client and everything to close with it.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError

from proxy.config.cache_url import CacheUrl, parse_cache_url

#: What a failing Redis call raises, whatever the topology: each is counted and degrades.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)
HEALTH_CHECK_S = 10

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


def _sentinel(url: CacheUrl, options: dict[str, Any]) -> Connection:
    """``redis+sentinel://[auth@]h:p[,h:p]/service[/db]``: the current master, re-resolved on failover."""
    auth = {"username": url.username, "password": url.password}
    sentinel_options = {k: v for k, v in options.items() if k != "health_check_interval"}
    sentinel = Sentinel(url.nodes(), sentinel_kwargs=sentinel_options, **options, **auth)  # type: ignore[no-untyped-call]
    client: Redis = sentinel.master_for(str(url.service), db=url.db or 0)
    return Connection(client, (client.aclose, *(s.aclose for s in sentinel.sentinels)))


def _cluster(url: CacheUrl, options: dict[str, Any]) -> Connection:
    """``redis+cluster://[auth@]h:p[,h:p]`` (``rediss+cluster`` for TLS): any node bootstraps the map."""
    tls: dict[str, Any] = {}
    if url.tls:
        tls = {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True}
    nodes = [ClusterNode(host, port) for host, port in url.nodes()]
    client = RedisCluster(
        startup_nodes=nodes, username=url.username, password=url.password, **options, **tls
    )
    return Connection(client, (client.aclose,))


def _standalone(url: str, tls: bool, options: dict[str, Any]) -> Connection:
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
    """A client for ``cache.url``; connects lazily, so a Redis that is down does not stop start-up.

    The URL is read by ``parse_cache_url``, the parser config validation uses; the
    standalone forms then go to redis-py whole, so their query options reach the client.
    """
    try:
        parsed = parse_cache_url(url)
    except ValueError as exc:
        raise ValueError(f"cache.url: {exc}") from None
    options = _client_options(timeout_s)
    if parsed.topology == "sentinel":
        return _sentinel(parsed, options)
    if parsed.topology == "cluster":
        return _cluster(parsed, options)
    if parsed.topology == "standalone":
        return _standalone(url, parsed.tls, options)
    raise ValueError(f"cache.url: unsupported scheme {parsed.scheme!r}")
