"""Shared fixtures. The emulator runs in-process on a real free port: no mocks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.emulator.app import EmulatorServer
from proxy.emulator.testing import EmulatorClient

pytest_plugins = ("tests.proxy_fixtures",)  # the real proxy, started against the emulator

MakeEmulator = Callable[..., Awaitable[EmulatorServer]]


@pytest.fixture
async def make_emulator() -> AsyncIterator[MakeEmulator]:
    """Factory: ``await make_emulator(**make_emulator_app kwargs)`` -> started server, stopped at teardown."""
    servers: list[EmulatorServer] = []

    async def factory(**kwargs: Any) -> EmulatorServer:
        server = await EmulatorServer(port=0, **kwargs).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.stop()


@pytest.fixture
async def emulator(make_emulator: MakeEmulator) -> EmulatorServer:
    """A started emulator with the demo client and the documented 10 req/s token rate limit."""
    return await make_emulator()


@pytest.fixture
async def emu_client(emulator: EmulatorServer) -> AsyncIterator[EmulatorClient]:
    """An EmulatorClient (own HTTP session) for the ``emulator`` fixture."""
    async with aiohttp.ClientSession() as session:
        yield EmulatorClient(session, emulator.url)


# ---- shared Redis tier: real redis-server fixtures (owner: redis cache work; see tests/redis_fixtures.py)
pytest_plugins = (*pytest_plugins, "tests.redis_fixtures")
# ---- end shared Redis tier
