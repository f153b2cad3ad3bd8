"""Method and URL override headers never reach the API with the route's token.

A gateway or framework that honours ``X-HTTP-Method-Override: DELETE`` or
``X-Original-URL: /admin`` would spend a GET route's token on another method
or path. The proxy strips them (``upstream.strip_headers``), underscore
lookalikes included; a configured list replaces the default. Real proxy,
real emulator, loopback sockets; the emulator's request log is what the API saw.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from proxy.config import parse_config
from proxy.emulator.app import EmulatorServer
from proxy.errors import ConfigError
from proxy.settings import OVERRIDE_HEADERS
from tests.proxy_fixtures import StartProxy, base_config, emulator_requests, open_connection

DECISION = "/partner/v1/decisions/dec_demo_001"
OVERRIDES = {
    "X-HTTP-Method-Override": "DELETE",
    "X-HTTP-Method": "DELETE",
    "X-Method-Override": "PUT",
    "X-Original-URL": "/partner/v1/applications/app_demo_001",
    "X-Rewrite-URL": "/partner/v1/applications/app_demo_001",
}
LOOKALIKES = {
    "X_HTTP_Method_Override": "DELETE",
    "x-http_method": "DELETE",
    "X_METHOD_OVERRIDE": "PUT",
    "x_original_url": "/admin",
    "X-Rewrite_URL": "/admin",
}


def _seen_names(seen: dict[str, Any]) -> set[str]:
    return {name.lower().replace("_", "-") for name in seen["headers"]}


async def test_override_headers_and_their_lookalikes_never_reach_the_api(
    start_proxy: StartProxy, emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    """Over a raw socket, so every spelling goes on the wire exactly as written."""
    proxy = await start_proxy()
    lines = [f"GET {DECISION} HTTP/1.1", "Host: x", "Connection: close", "X-Tenant-Id: t-1"]
    lines += [f"{name}: {value}" for name, value in (OVERRIDES | LOOKALIKES).items()]
    reader, writer = await open_connection(proxy.proxy_url)
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    [seen] = await emulator_requests(http, emulator)
    assert seen["method"] == "GET" and seen["auth"]["valid"] is True
    names = _seen_names(seen)
    assert "x-tenant-id" in names  # ordinary headers still pass
    assert not names & {name.lower() for name in OVERRIDES}, names


async def test_a_configured_list_replaces_the_default(
    start_proxy: StartProxy, emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"upstream": {"strip_headers": ["X-Debug-Impersonate"]}})
    headers = {"X-Debug-Impersonate": "root", "X_Debug_Impersonate": "root", "X-HTTP-Method-Override": "PUT"}
    async with http.get(proxy.proxy_url + DECISION, headers=headers) as resp:
        assert resp.status == 200
    [seen] = await emulator_requests(http, emulator)
    names = _seen_names(seen)
    assert "x-debug-impersonate" not in names
    assert "x-http-method-override" in names  # no longer in the (replaced) list


async def test_an_empty_list_strips_nothing_extra(
    start_proxy: StartProxy, emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"upstream": {"strip_headers": []}})
    async with http.get(proxy.proxy_url + DECISION, headers={"X-HTTP-Method-Override": "PUT"}) as resp:
        assert resp.status == 200
    [seen] = await emulator_requests(http, emulator)
    assert "x-http-method-override" in _seen_names(seen)


def test_the_default_list_and_the_environment_form() -> None:
    raw = base_config("http://127.0.0.1:9")
    assert parse_config(raw, env={}).upstream.strip_headers == OVERRIDE_HEADERS
    env = {"CCP_UPSTREAM_STRIP_HEADERS": "X-HTTP-Method-Override, X-Forwarded-Prefix,"}
    settings = parse_config(raw, env=env)
    assert settings.upstream.strip_headers == ("X-HTTP-Method-Override", "X-Forwarded-Prefix")


@pytest.mark.parametrize("bad", ["X Method", "X-Method:", "X-Méthode", "(X)"])
def test_a_name_that_is_not_a_header_token_is_a_config_error(bad: str) -> None:
    raw = base_config("http://127.0.0.1:9")
    raw["upstream"]["strip_headers"] = ["X-Fine", bad]
    with pytest.raises(ConfigError) as err:
        parse_config(raw, env={})
    assert err.value.problems == [f'upstream.strip_headers: not a header name: "{bad}"']
