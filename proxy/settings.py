"""Typed, immutable settings: what ``proxy.config`` produces from YAML + environment.

Everything downstream takes these values, never raw dicts, so a setting is
validated once, at start, and cannot change under a running request. A field's
type and default here are its config key's; the rest of the key (its check,
env name, doc line) is its declaration in ``proxy/config/keys.py``, which must
exist for every field (``proxy.config`` does not import otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Final, Literal

from proxy.redact import mask_url
from proxy.scopes import DEFAULT_AUDIENCE

MiB = 1024 * 1024

#: Method and URL override headers. A framework or gateway that honours one acts on the method
#: or path it names instead of the request line the route table matched, so a GET route's token
#: would delete, or reach another path. Stripped from every request unless configured otherwise.
OVERRIDE_HEADERS: Final = (
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
    "X-Original-URL",
    "X-Rewrite-URL",
)


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """``host:port`` or ``unix:/path``."""

    host: str = "127.0.0.1"
    port: int = 8080
    unix_path: str | None = None

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str = "https://api.credicorp.co.uk"  # origin only: scheme://host[:port], no path
    timeout_s: float = 30.0  # total, per attempt
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0  # longest silence while reading the response
    ca_file: str | None = None
    retry_body_limit: int = 1 * MiB  # bodies up to this are kept for the 401 retry
    # All kept bodies together, across concurrent requests; past it a body streams (no 401 retry).
    kept_body_budget_bytes: int = 32 * MiB  # 0 = never keep
    max_body_bytes: int | None = None  # 413 body_too_large over this; None = unlimited
    forwarded_headers: bool = False  # add X-Forwarded-For / X-Forwarded-Proto
    pool_size: int = 256  # keep-alive connections to the upstream
    # Responses with a Content-Length up to this are relayed in one write (headers + body);
    # larger or unsized ones are streamed chunk by chunk. 0 = always stream.
    response_buffer_bytes: int = 64 * 1024
    # Request headers never forwarded (underscore lookalikes too); the list replaces the default.
    strip_headers: tuple[str, ...] = OVERRIDE_HEADERS


@dataclass(frozen=True, slots=True)
class AuthSettings:
    issuer: str = "https://sso.credicorp.co.uk"
    client_id: str = ""
    client_secret: str | None = field(default=None, repr=False)
    client_secret_file: str | None = None
    token_endpoint: str | None = None  # override; default comes from discovery
    method: Literal["client_secret_post", "client_secret_basic"] = "client_secret_post"
    audience: str = DEFAULT_AUDIENCE
    verify: bool = True
    default_expires_in: int = 3600  # when the token response has no expires_in
    timeout_s: float = 10.0
    max_mint_rate: float = 5.0  # token-endpoint calls per second, hard ceiling (platform: 10)
    ca_file: str | None = None
    # Hosts a discovered token_endpoint / jwks_uri may name, besides the issuer's own;
    # "*.example.com" = any host below example.com. Empty: hosts under the issuer's parent domain.
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CacheSettings:
    url: str = "memory://"  # may hold a Redis password: the repr masks it
    key_prefix: str = "ccp"
    encryption_key_file: str | None = None
    timeout_s: float = 0.5  # every Redis call; an outage must never stall a request

    def __repr__(self) -> str:  # kept by @dataclass: a settings repr lands in logs and tracebacks
        values = ", ".join(
            f"{f.name}={mask_url(self.url) if f.name == 'url' else getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"CacheSettings({values})"


@dataclass(frozen=True, slots=True)
class RefreshSettings:
    at_fraction: float = 0.9
    min_margin_s: float = 60.0
    idle_s: float = 900.0
    jitter_s: float = 5.0  # spread refreshes so replicas and scope sets do not line up
    prefetch: Literal["marked", "all", "none"] = "marked"


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "info"
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """What one client connection may cost, on the proxy and the admin listener alike.

    aiohttp's server defaults bound none of this (an hour of keep-alive, no deadline
    on a request head or body, no cap on connections, partial heads kept in memory),
    so a handful of slow or oversized clients could exhaust memory or descriptors.
    """

    max_header_bytes: int = 32 * 1024  # request line + header block; 431 over it
    max_headers: int = 100  # header fields in one head; 431 over it
    header_timeout_s: float = 30.0  # from the accept (or a later head's first byte) to its end; 408
    keepalive_timeout_s: float = 75.0  # idle time between requests, then the connection is closed
    body_timeout_s: float = 60.0  # longest silence while a handler waits for body bytes; 408 or reset
    listen_max_connections: int = 1024  # concurrent client connections on the proxy listener
    admin_max_connections: int = 64  # and on the admin listener (probes and scrapes)


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One entry of the route table, as written in the config."""

    methods: frozenset[str]  # upper-case; "*" means any method
    path: str  # the pattern as written
    scopes: tuple[str, ...]  # sorted, de-duplicated
    audience: str = DEFAULT_AUDIENCE
    name: str = ""  # metric/log label; defaults to "METHODS path"
    prefetch: bool = False
    index: int = 0  # position in the table (for messages: routes[index])

    @property
    def label(self) -> str:
        return self.name or f"{','.join(sorted(self.methods))} {self.path}"


@dataclass(frozen=True, slots=True)
class Settings:
    upstream: UpstreamSettings = UpstreamSettings()
    auth: AuthSettings = AuthSettings()
    listen: ListenAddress = ListenAddress()
    admin_listen: ListenAddress = ListenAddress("0.0.0.0", 9090)  # noqa: S104 - probes/scrapes
    cache: CacheSettings = CacheSettings()
    refresh: RefreshSettings = RefreshSettings()
    logging: LogSettings = LogSettings()
    limits: LimitSettings = LimitSettings()
    routes: tuple[RouteSpec, ...] = ()
    shutdown_grace_s: float = 30.0
    # SO_REUSEPORT on the proxy listener, for several processes on one port. Off by default: a
    # second instance on a taken port must fail to start, not silently take a share of the traffic.
    reuse_port: bool = False
    warnings: tuple[str, ...] = ()  # non-fatal findings of validation (shadowed, over-broad)
