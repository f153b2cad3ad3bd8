"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz`` and nothing that mutates.

Kept on its own port so probes and scrapes never share a listener with the
application's traffic, and so the proxy listener never answers these paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from proxy.app import Runtime
    from proxy.tokens.source import SourceHealth

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")

#: Token-endpoint errors that say nothing about the endpoint being down:
#: ``invalid_client`` is judged by the credential latch (lifted by a new secret),
#: ``invalid_scope`` is one scope set's route-table problem.
_NOT_OUTAGES: Final = frozenset({"invalid_client", "invalid_scope"})
_NO_STORE: Final = {"Cache-Control": "no-store"}


def endpoint_failing(health: SourceHealth, now: float) -> bool:
    """The token endpoint is known to be failing: backing off, or its last answer was a failure.

    ``last_error`` is cleared by the next successful mint, so this stays true
    between backoff windows too; judging by the backoff window alone would make
    readiness flap while the endpoint is down.
    """
    if health.backing_off_until is not None and health.backing_off_until > now:
        return True
    return health.last_error is not None and health.last_error not in _NOT_OUTAGES


def readiness(runtime: Runtime) -> tuple[bool, dict[str, Any]]:
    """Ready when requests can be served: every prefetched scope set has a valid token,
    or the token endpoint is working, or (nothing prefetched) some scope set still has
    a valid cached token while the endpoint is down. Never ready while draining or
    while the credentials are rejected."""
    if runtime.draining:
        return False, {"ready": False, "reason": "draining"}
    health = runtime.source.health()
    if health.credentials_rejected:
        return False, {
            "ready": False,
            "reason": "credentials_rejected",
            "detail": "the token endpoint said invalid_client; fix or rotate the secret",
        }
    prefetched = runtime.prefetch_sets()
    missing = [" ".join(s) for s, aud in prefetched if not runtime.tokens.has_usable(s, aud)]
    if prefetched and not missing:
        return True, {"ready": True}
    if not endpoint_failing(health, runtime.clock()):
        return True, {"ready": True, "warming": missing} if missing else {"ready": True}
    if not prefetched and (cached := runtime.tokens.usable_count()):
        # Nothing was promised warm: the scope sets in use are still served from the cache.
        return True, {"ready": True, "degraded": "token_endpoint_unavailable", "cached_scope_sets": cached}
    return False, {
        "ready": False,
        "reason": "token_endpoint_unavailable",
        "missing": missing,
        "detail": health.last_error,
    }


async def _readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    ok, body = readiness(runtime)
    runtime.metrics.ready.set(1 if ok else 0)
    return web.json_response(body, status=200 if ok else 503, headers=_NO_STORE)


async def _healthz(request: web.Request) -> web.Response:
    """Alive means the event loop answers; nothing else (a liveness failure restarts the pod)."""
    return web.json_response({"alive": True}, headers=_NO_STORE)


async def _metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    runtime.metrics.ready.set(1 if readiness(runtime)[0] else 0)
    return web.Response(
        body=runtime.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST, **_NO_STORE}
    )


def make_admin_app(runtime: Runtime) -> web.Application:
    """GET (and HEAD) only: every other method is 405, every other path 404."""
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app
