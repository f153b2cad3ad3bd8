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
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError

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
