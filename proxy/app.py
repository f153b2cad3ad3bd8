"""Assembly: build the runtime from settings, serve the proxy and admin listeners, drain on stop.

``ProxyServer`` is the one way the product runs: ``run``, ``demo``, the
benchmarks and the test suite all start it, on real sockets, so what is
tested is what ships.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Self

import aiohttp
from aiohttp import web

from proxy import connections
from proxy.admin import make_admin_app
from proxy.forward import Forwarder
from proxy.listener import AcceptErrorLog, BoundedAppRunner, Listener, connection_caps
from proxy.metrics import Metrics
from proxy.routes import RouteTable
from proxy.settings import ListenAddress, Settings
from proxy.tokens.cache import SharedTokenCache
from proxy.tokens.credentials import CredentialProvider
from proxy.tokens.manager import TokenManager
from proxy.tokens.redis_trust import SharedTokenTrust
from proxy.tokens.source import TokenSource
from proxy.tokens.verify import JwtVerifier

log = logging.getLogger("proxy.app")
Clock = Callable[[], float]
AUTH_POOL_SIZE = 16  # connections to the token endpoint (discovery, JWKS, mints)
REDIS_POOL_BUDGET = 32  # descriptors budgeted for the Redis client when a shared tier is configured


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """System trust plus an optional extra bundle; verification is never turned off."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def _client_session(
    *, limit: int, timeout: aiohttp.ClientTimeout, ca_file: str | None
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=limit,
        limit_per_host=limit,
        ttl_dns_cache=300,
        ssl=_ssl_context(ca_file),
        keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        read_bufsize=256 * 1024,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )


def open_shared_cache(settings: Settings, clock: Clock, metrics: Metrics) -> SharedTokenCache | None:
    """The shared (Redis) tier named by ``cache.url``, or None for ``memory://``.

    Typed as the protocol, not the class: the rest of the product reaches the shared
    tier only through ``SharedTokenCache``, and this return is where mypy checks that
    ``RedisTokenCache`` implements it.
    """
    if settings.cache.url.startswith("memory://"):
        return None
    from proxy.tokens.redis_cache import RedisTokenCache  # only when configured

    return RedisTokenCache.from_settings(settings.cache, clock=clock, metrics=metrics)


class Runtime:
    """Every long-lived object of one proxy process, opened and closed together."""

    def __init__(
        self, settings: Settings, *, metrics: Metrics | None = None, clock: Clock = time.time
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.draining = False
        self.table = RouteTable.compile(settings.routes)
        up, auth = settings.upstream, settings.auth
        # What can refuse to start (the secret file, the cache key file) comes before the HTTP
        # sessions, so a refused start-up leaves no unclosed session behind.
        self.credentials = CredentialProvider(
            auth.client_id,
            secret=auth.client_secret,
            secret_file=auth.client_secret_file,
            metrics=self.metrics,
        )
        self.shared = open_shared_cache(settings, clock, self.metrics)
        self.upstream_session = _client_session(
            limit=up.pool_size,
            ca_file=up.ca_file,
            # No total here: aiohttp's would also cut a long download. ``Forwarder._send`` bounds
            # the time to the response head with ``timeout_s``; the body has ``read_timeout_s``.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=up.connect_timeout_s, sock_read=up.read_timeout_s
            ),
        )
        self.auth_session = _client_session(
            limit=AUTH_POOL_SIZE,
            ca_file=auth.ca_file,
            timeout=aiohttp.ClientTimeout(total=auth.timeout_s),
        )
        verifier = JwtVerifier(self.auth_session, auth.issuer, clock=clock) if auth.verify else None
        self.source = TokenSource(
            auth, self.credentials, self.auth_session, clock=clock, metrics=self.metrics, verifier=verifier
        )
        self.tokens = TokenManager(
            self.source,
            self.credentials,
            refresh=settings.refresh,
            clock=clock,
            metrics=self.metrics,
            shared=self.shared,
            # A token read from Redis is checked like a minted one (same verifier) before first use.
            trust=SharedTokenTrust(verifier=verifier, clock=clock, metrics=self.metrics),
        )
        self.forwarder = Forwarder(
            up,
            self.table,
            self.tokens,
            self.upstream_session,
            self.metrics,
            clock=clock,
            access_log_enabled=settings.logging.access_log,
        )
        self._tasks: list[asyncio.Task[None]] = []

    def prefetch_sets(self) -> list[tuple[tuple[str, ...], str]]:
        mode = self.settings.refresh.prefetch
        routes = [r for r in self.settings.routes if mode == "all" or (mode == "marked" and r.prefetch)]
        return sorted({(r.scopes, r.audience) for r in routes})

    async def start(self) -> None:
        """Background tasks first, then a best-effort warm-up that never blocks start-up for long."""
        self._tasks.append(asyncio.create_task(self.tokens.run_refresher(), name="ccp-refresher"))
        if self.settings.auth.client_secret_file:
            self._tasks.append(asyncio.create_task(self.credentials.watch(), name="ccp-secret-watch"))
        if self.shared is not None:
            await self.shared.start(self.tokens.drop)
        self._tasks.append(asyncio.create_task(self._warm_up(), name="ccp-warm-up"))

    async def _warm_up(self) -> None:
        with contextlib.suppress(Exception):
            await self.source.discover()
        for error in await self.tokens.prefetch(self.prefetch_sets()):
            log.warning("prefetch failed", extra={"event": "prefetch_failed", "error": error.code})

    def reload_credentials(self) -> None:
        """SIGHUP: re-read the secret file now."""
        self.credentials.reload()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.tokens.close()
        if self.shared is not None:
            await self.shared.close()
        await self.upstream_session.close()
        await self.auth_session.close()


async def _start_site(
    runner: web.BaseRunner, address: ListenAddress, *, reuse_port: bool = False
) -> web.BaseSite:
    """Bind one listener. ``reuse_port`` only where asked: the admin port never shares, so a
    scrape or a probe always reaches the process it names."""
    if address.unix_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.unix_path)
        site: web.BaseSite = web.UnixSite(runner, address.unix_path)
    else:
        site = web.TCPSite(runner, address.host, address.port, reuse_port=reuse_port or None)
    await site.start()
    return site


def _bound_url(site: web.BaseSite, runner: web.BaseRunner) -> str:
    if isinstance(site, web.UnixSite):
        return site.name
    for address in runner.addresses:
        if isinstance(address, tuple):
            host, port = address[0], address[1]
            return f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    return site.name


class ProxyServer:
    """The proxy listener and the admin listener around one ``Runtime``."""

    def __init__(
        self, settings: Settings, *, metrics: Metrics | None = None, clock: Clock = time.time
    ) -> None:
        self.runtime = Runtime(settings, metrics=metrics, clock=clock)
        self.settings = settings
        self.proxy_url = ""
        self.admin_url = ""
        self._proxy_runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._accept_log: AcceptErrorLog | None = None
        self._stopped = False

    async def start(self) -> Self:
        """Start everything, or close what was started and raise (a taken port, a bad socket path)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start(self) -> None:
        await self.runtime.start()
        self._accept_log = AcceptErrorLog(asyncio.get_running_loop()).install()
        settings, metrics = self.settings, self.runtime.metrics
        redis = 0 if settings.cache.url.startswith("memory://") else REDIS_POOL_BUDGET
        caps = connection_caps(settings.limits, outbound=settings.upstream.pool_size + AUTH_POOL_SIZE + redis)
        # auto_decompress=False: request bodies are forwarded as sent, never inflated by the proxy;
        # a Content-Encoding: gzip upload must reach the API compressed, and a gzip bomb must not
        # be inflated by the proxy.
        server = Listener("proxy", settings.limits, caps.proxy, metrics).server(
            self.runtime.forwarder.handle, handler_cancellation=True, auto_decompress=False
        )
        self._proxy_runner = web.ServerRunner(server, shutdown_timeout=self.settings.shutdown_grace_s)
        await self._proxy_runner.setup()
        listen, reuse_port = self.settings.listen, self.settings.reuse_port
        site = await _start_site(self._proxy_runner, listen, reuse_port=reuse_port)
        self.proxy_url = _bound_url(site, self._proxy_runner)
        admin = Listener("admin", settings.limits, caps.admin, metrics)
        self._admin_runner = BoundedAppRunner(make_admin_app(self.runtime), admin, access_log=None)
        await self._admin_runner.setup()
        admin_site = await _start_site(self._admin_runner, self.settings.admin_listen)
        self.admin_url = _bound_url(admin_site, self._admin_runner)
        log.info(
            "proxy listening",
            extra={
                "event": "started",
                "listen": self.proxy_url,
                "admin": self.admin_url,
                "routes": len(self.settings.routes),
            },
        )

    async def stop(self) -> None:
        """Drain: readiness fails at once, the listener closes, in-flight requests get the grace period.

        Idempotent: ``start`` calls it on a failed start-up, and the caller's own clean-up may too.
        """
        if self._stopped:
            return
        self._stopped = True
        self.runtime.draining = True
        if self._proxy_runner is not None:
            deadline = time.monotonic() + self.settings.shutdown_grace_s
            transports = connections.client_transports(self._proxy_runner)
            await self._proxy_runner.cleanup()
            self._proxy_runner = None
            await connections.flush_or_reset(transports, deadline)  # a logged 200 is a delivered 200
        await self.runtime.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        if self._accept_log is not None:
            self._accept_log.uninstall()
            self._accept_log = None
        log.info("proxy stopped", extra={"event": "stopped"})

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

