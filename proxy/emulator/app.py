"""Assembling the emulator: the aiohttp app factory and an in-process server for tests.

One app serves the authorization server (``/.well-known``, ``/oauth``), the
control surface (``/_emulator``) and, for every other target, the partner/v1
API. The API is reached through a middleware on the *raw* request target
rather than through aiohttp's router, so a path the router would normalise
(``/partner/v1/a/../b``) is seen, logged and refused exactly as sent.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.emulator import authserver
from proxy.emulator.api import handle_api, record_status
from proxy.emulator.authserver import STATE_KEY
from proxy.emulator.control import PREFIX, control_app
from proxy.emulator.state import ClientSpec, EmulatorState

_NOT_API = ("/.well-known/", "/oauth/", PREFIX + "/")


@web.middleware
async def _api_by_raw_target(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Send everything outside the auth server and control surface to the API dispatcher."""
    path = request.raw_path.partition("?")[0]
    if path.startswith(_NOT_API) or path == PREFIX:
        return await handler(request)
    return await handle_api(request)


def make_emulator_app(
    *,
    clients: list[ClientSpec] | None = None,
    token_ttl: int = 3600,
    rate_limit: float | None = 10.0,
    issuer: str | None = None,
) -> web.Application:
    """A fresh emulator with its own state, keys and sample data.

    ``clients`` defaults to the demo client (``cc_client_demo`` / ``demo-secret``,
    every partner scope, audiences partner/v1 and internal/v1). ``issuer`` None
    means "the base URL each request arrived on", so an emulator on a random
    port is self-consistent; ``rate_limit`` None turns the 10 req/s limit off.
    """
    app = web.Application(middlewares=[_api_by_raw_target])
    app[STATE_KEY] = EmulatorState(clients, token_ttl=token_ttl, rate_limit=rate_limit, issuer=issuer)
    authserver.add_routes(app)
    app.add_subapp(PREFIX, control_app())
    app.on_response_prepare.append(_on_prepare)
    return app


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    record_status(request, response)


class EmulatorServer:
    """Runs an emulator in this process on a real socket (``port=0``: a free port).

    ``async with EmulatorServer(port=0) as emu:`` then use ``emu.url`` and
    ``emu.state``. Handlers are cancelled when their client disconnects (as
    in production servers), so injected latency never outlives its request.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **factory_kwargs: Any) -> None:
        self.host = host
        self.port = port
        self.app = make_emulator_app(**factory_kwargs)
        self._runner: web.AppRunner | None = None

    @property
    def state(self) -> EmulatorState:
        return self.app[STATE_KEY]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> EmulatorServer:
        runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = [a for a in runner.addresses if isinstance(a, tuple)]
        self.port = bound[0][1] if bound else self.port
        return self

    async def stop(self) -> None:
        """Close the listener and every connection; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> EmulatorServer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
