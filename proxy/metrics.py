"""Every Prometheus metric of the proxy, created once per ``Metrics`` object.

A ``Metrics`` is handed its own ``CollectorRegistry`` (never the global one),
so each test, and each app in one process, gets a fresh set. Label values come
only from the config (route labels, scope-set labels, status codes), never from
a raw request path, so cardinality is bounded by the config.
"""

from __future__ import annotations

import platform

import aiohttp
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest

from proxy import __version__

# The _created series only add noise to every family. prometheus_client leaves this function
# unannotated (a gap in its typing, not a misuse here).
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_MINT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_AGE_BUCKETS = (1, 10, 60, 300, 600, 1200, 1800, 2700, 3300, 3600, 7200)


class Metrics:
    """The proxy's metric families.

    Names, types and labels are a contract with the alert rules and the dashboard
    under ``deploy/`` and with the metrics table in deploy/README.md (Operations >
    Metrics); ``tests/test_readme_ops.py`` and ``tests/test_deploy.py`` fail when they drift.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ccp_requests",
            "Requests answered, by route, method and status code.",
            ["route", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "ccp_request_duration_seconds",
            "Time waiting on the upstream API, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.proxy_errors = Counter(
            "ccp_proxy_errors",
            "Errors the proxy answered itself, by error code.",
            ["error"],
            registry=r,
        )
        self.token_mints = Counter(
            "ccp_token_mints",
            "Token-endpoint calls, by scope set and result.",
            ["scopes", "result"],
            registry=r,
        )
        self.token_mint_duration = Histogram(
            "ccp_token_mint_duration_seconds",
            "Token-endpoint call latency.",
            buckets=_MINT_BUCKETS,
            registry=r,
        )
        self.token_endpoint_errors = Counter(
            "ccp_token_endpoint_errors",
            "Token-endpoint failures by OAuth error code.",
            ["error"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "ccp_token_cache_lookups",
            "Token cache lookups by tier and result.",
            ["tier", "result"],
            registry=r,
        )
        self.token_ttl = Gauge(
            "ccp_token_ttl_seconds",
            "Seconds left on the cached token, by scope set and audience.",
            ["scopes", "audience"],
            registry=r,
        )
        self.token_age_at_use = Histogram(
            "ccp_token_age_at_use_seconds",
            "Age of the token attached to a request.",
            buckets=_AGE_BUCKETS,
            registry=r,
        )
        self.token_refreshes = Counter(
            "ccp_token_refreshes",
            "Background refreshes by result.",
            ["result"],
            registry=r,
        )
        self.retries_401 = Counter(
            "ccp_upstream_401_retries",
            "Upstream 401s and what the one retry gave.",
            ["outcome"],
            registry=r,
        )
        self.kept_body_budget_exhausted = Counter(
            "ccp_kept_body_budget_exhausted",
            "Bodies streamed instead of kept because the kept-body budget was spent",
            registry=r,
        )
        self.kept_body_bytes = Gauge(
            "ccp_kept_body_bytes",
            "Request-body bytes kept in memory for a possible 401 retry, now.",
            registry=r,
        )
        self.insufficient_scope = Counter(
            "ccp_insufficient_scope",
            "Upstream 403 insufficient_scope by route and scope.",
            ["route", "scope"],
            registry=r,
        )
        self.redis_errors = Counter(
            "ccp_redis_errors",
            "Redis operations that failed, by operation.",
            ["op"],
            registry=r,
        )
        self.redis_tokens_rejected = Counter(
            "ccp_redis_tokens_rejected",
            "Tokens read from Redis that were refused and never sent, by reason.",
            ["reason"],
            registry=r,
        )
        self.invalidations = Counter(
            "ccp_invalidations",
            "Invalidation messages from other replicas, by what was done with them.",
            ["result"],
            registry=r,
        )
        self.in_flight = Gauge(
            "ccp_in_flight_requests",
            "Requests being proxied right now.",
            registry=r,
        )
        self.limit_hits = Counter(
            "ccp_limit_hits",
            "Connections a listener bound refused or ended, by listener and limit.",
            ["listener", "limit"],
            registry=r,
        )
        self.open_connections = Gauge(
            "ccp_open_connections",
            "Client connections open on each listener (within its cap).",
            ["listener"],
            registry=r,
        )
        self.credential_generation = Gauge(
            "ccp_credential_generation",
            "Generation of the client secret in use.",
            registry=r,
        )
        self.credential_reload_errors = Counter(
            "ccp_credential_reload_errors",
            "Secret-file re-reads that failed (unreadable or empty file); the previous secret stays.",
            registry=r,
        )
        self.credentials_rejected = Gauge(
            "ccp_credentials_rejected",
            "1 while the token endpoint rejects our credentials.",
            registry=r,
        )
        self.ready = Gauge("ccp_ready", "1 when /readyz answers 200.", registry=r)
        self.build_info = Info("ccp_build", "Build information.", registry=r)
        self.build_info.info(
            {"version": __version__, "python": platform.python_version(), "aiohttp": aiohttp.__version__}
        )

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
