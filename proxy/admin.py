"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz`` and nothing that mutates.

Kept on its own port so probes and scrapes never share a listener with the
application's traffic, and so the proxy listener never answers these paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from proxy.app import Runtime

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")


def readiness(runtime: Runtime) -> tuple[bool, dict[str, Any]]:
    """Ready when requests can be served: every prefetched scope set has a valid token,
    or the token endpoint is working. Never ready while draining or while the
    credentials are rejected."""
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
    backing_off = health.backing_off_until is not None and health.backing_off_until > runtime.clock()
    endpoint_ok = not backing_off and (health.last_success_at is not None or health.last_error is None)
    if endpoint_ok:
        return True, {"ready": True, "warming": missing} if missing else {"ready": True}
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
    return web.json_response(body, status=200 if ok else 503)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"alive": True})


async def _metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    runtime.metrics.ready.set(1 if readiness(runtime)[0] else 0)
    return web.Response(body=runtime.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app
