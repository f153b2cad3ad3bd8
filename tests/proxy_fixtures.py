"""Fixtures that start the real proxy (``ProxyServer``) against the in-process emulator."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import ProxyServer
from proxy.config import parse_config
from proxy.emulator.app import EmulatorServer

StartProxy = Callable[..., Awaitable[ProxyServer]]

#: A small route table exercising each kind of pattern; one route deliberately under-scoped.
TEST_ROUTES: list[dict[str, Any]] = [
    {
        "name": "decisions.read",
        "methods": ["GET"],
        "path": "/partner/v1/decisions/**",
        "scopes": ["decisions:read"],
    },
    {
        "name": "applications.write",
        "methods": ["POST", "PATCH"],
        "path": "/partner/v1/applications/**",
        "scopes": ["applications:write"],
    },
    {
        "name": "applications.read",
        "methods": ["GET"],
        "path": "/partner/v1/applications/{id}",
        "scopes": ["applications:read"],
    },
    {
        "name": "accounts.read",
        "methods": ["GET"],
        "path": "/partner/v1/accounts/**",
        "scopes": ["accounts:read"],
    },
    {
        "name": "identity.misconfigured",
        "methods": ["GET"],
        "path": "/partner/v1/identity/**",
        "scopes": ["accounts:read"],
    },
]


def base_config(emulator_url: str) -> dict[str, Any]:
    return {
        "upstream": {"url": emulator_url, "timeout_s": 10, "read_timeout_s": 10},
        "auth": {"issuer": emulator_url, "client_id": "cc_client_demo", "client_secret": "demo-secret"},
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "cache": {"url": "memory://"},
        "refresh": {"prefetch": "none"},
        "logging": {"level": "info"},
        "shutdown_grace_s": 5,
        "routes": copy.deepcopy(TEST_ROUTES),
    }


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (lists and scalars replace)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


@pytest.fixture
async def start_proxy(emulator: EmulatorServer) -> AsyncIterator[StartProxy]:
    """Factory: ``await start_proxy(**config overrides)`` -> a started ProxyServer on free ports."""
    servers: list[ProxyServer] = []

    async def factory(
        overrides: dict[str, Any] | None = None, *, emulator_url: str | None = None, **kwargs: Any
    ) -> ProxyServer:
        raw = merge(base_config(emulator_url or emulator.url), overrides or {})
        server = await ProxyServer(parse_config(raw, env={}), **kwargs).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client, as an application would be: no credentials, no decompression."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A default client session for the token layer under test (source, verifier, manager) to call with."""
    async with aiohttp.ClientSession() as client:
        yield client


async def emulator_stats(session: aiohttp.ClientSession, emulator: EmulatorServer) -> dict[str, Any]:
    async with session.get(emulator.url + "/_emulator/stats") as resp:
        return await resp.json()


async def emulator_requests(session: aiohttp.ClientSession, emulator: EmulatorServer) -> list[dict[str, Any]]:
    async with session.get(emulator.url + "/_emulator/requests") as resp:
        return (await resp.json())["requests"]


async def set_faults(session: aiohttp.ClientSession, emulator: EmulatorServer, **faults: Any) -> None:
    async with session.post(emulator.url + "/_emulator/faults", json=faults) as resp:
        assert resp.status == 200, await resp.text()


async def open_connection(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection to ``http://host:port`` (a proxy or emulator URL), for wire-level tests."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def raw_request(url: str, request: bytes) -> bytes:
    """Send raw bytes to ``url``'s host:port and return everything the server answers."""
    reader, writer = await open_connection(url)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def fixed_upstream(response: bytes) -> AsyncIterator[str]:
    """An API stand-in that answers every request with ``response``, then closes."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One parsed ``/metrics`` answer: ``value(sample_name, **labels)``; absent series read 0."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for (n, labels) in self.samples if n == name]


async def scrape(http: aiohttp.ClientSession, proxy: ProxyServer | str) -> Scrape:
    """GET the admin listener's ``/metrics`` (a server's, or at an admin URL), parsed as Prometheus does."""
    admin = proxy if isinstance(proxy, str) else proxy.admin_url
    async with http.get(admin + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return Scrape(await resp.text())
