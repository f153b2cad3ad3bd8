"""A small async client for the emulator, for integration tests (ours and users').

It wraps the documented HTTP surface only (token endpoint, partner/v1,
``/_emulator``), so a test written with it works the same against an
emulator started with ``credicorp-proxy emulator`` in another process.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote_plus

import aiohttp
from multidict import CIMultiDict

DEMO_ID = "cc_client_demo"
DEMO_SECRET = "demo-secret"  # noqa: S105 - the documented, public demo credential


def basic_header(client_id: str, secret: str) -> str:
    """``Authorization`` value for client_secret_basic: both parts form-encoded first (RFC 6749 2.3.1)."""
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _json_or(raw: str | bytes) -> Any:
    """The parsed JSON document, or ``raw`` unchanged when it is not JSON (a malformed-body fault)."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class EmulatorClient:
    """Thin helpers over an ``aiohttp.ClientSession`` pointed at one emulator."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.url = base_url.rstrip("/")

    async def token_request(
        self,
        scope: str | None = None,
        *,
        client_id: str = DEMO_ID,
        secret: str = DEMO_SECRET,
        basic: bool = False,
        audience: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """POST /oauth/token; returns (status, headers, parsed JSON or raw text)."""
        form = {"grant_type": "client_credentials", **(extra or {})}
        headers = {"Authorization": basic_header(client_id, secret)} if basic else {}
        if not basic:
            form.update(client_id=client_id, client_secret=secret)
        if scope is not None:
            form["scope"] = scope
        if audience is not None:
            form["audience"] = audience
        async with self.session.post(f"{self.url}/oauth/token", data=form, headers=headers) as resp:
            return resp.status, dict(resp.headers), _json_or(await resp.text())

    async def mint(self, scope: str | None = None, **kwargs: Any) -> str:
        """An access token, or AssertionError with the endpoint's answer."""
        status, _, body = await self.token_request(scope, **kwargs)
        assert status == 200, (status, body)
        return str(body["access_token"])

    async def api(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> tuple[int, dict[str, str], Any]:
        """Call partner/v1 (``path`` starts with ``/partner/v1``); (status, headers, JSON or bytes)."""
        headers = CIMultiDict(kwargs.pop("headers", {}))  # keeps repeated headers
        if token is not None:
            headers.add("Authorization", f"Bearer {token}")
        async with self.session.request(method, self.url + path, headers=headers, **kwargs) as resp:
            raw = await resp.read()
            body = _json_or(raw) if resp.content_type == "application/json" else raw
            return resp.status, dict(resp.headers), body

    async def control(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Call ``/_emulator{path}``; (status, JSON body or None)."""
        async with self.session.request(method, f"{self.url}/_emulator{path}", json=body) as resp:
            body = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, body

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = (await self.control("GET", "/stats"))[1]
        return stats

    async def set_faults(self, **knobs: Any) -> None:
        status, body = await self.control("POST", "/faults", knobs)
        assert status == 200, body

    async def requests(self) -> list[dict[str, Any]]:
        log: list[dict[str, Any]] = (await self.control("GET", "/requests"))[1]["requests"]
        return log
