"""The control surface's bookkeeping, the in-process server and the ``emulator`` command."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aiohttp
import pytest

from proxy.emulator import cli
from proxy.emulator.app import EmulatorServer
from proxy.emulator.state import DEMO_CLIENT, ClientSpec
from proxy.emulator.testing import EmulatorClient
from proxy.scopes import PARTNER_SCOPES

STATS_KEYS = {
    "tokens_issued", "token_requests", "tokens_by_scope", "api_requests", "api_by_status",
    "revocations", "introspections", "rate_limited", "tokens_by_secret", "cancelled", "in_flight",
}  # fmt: skip


async def test_fresh_stats_are_zero(emu_client: EmulatorClient):
    stats = await emu_client.stats()
    assert STATS_KEYS <= set(stats)
    assert stats["tokens_issued"] == stats["token_requests"] == stats["api_requests"] == 0
    assert stats["tokens_by_scope"] == {} and stats["api_by_status"] == {}


async def test_reset_clears_counters_faults_and_logs_but_not_tokens(emu_client: EmulatorClient):
    token = await emu_client.mint("decisions:read")
    await emu_client.api("GET", "/partner/v1/decisions/dec_demo_001", token)
    await emu_client.set_faults(token_latency_ms=5)
    assert (await emu_client.control("POST", "/reset"))[0] == 204
    stats = await emu_client.stats()
    assert stats["tokens_issued"] == 0 and stats["api_requests"] == 0
    assert (await emu_client.control("GET", "/faults"))[1]["token_latency_ms"] == 0
    assert await emu_client.requests() == []
    assert (await emu_client.api("GET", "/partner/v1/decisions/dec_demo_001", token))[0] == 200


async def test_reset_also_clears_rate_windows(make_emulator):
    emu = await make_emulator(rate_limit=1)
    async with aiohttp.ClientSession() as session:
        client = EmulatorClient(session, emu.url)
        assert [(await client.token_request())[0] for _ in range(2)] == [200, 429]
        await client.control("POST", "/reset")
        assert (await client.token_request())[0] == 200


async def test_clearing_the_request_log(emu_client: EmulatorClient):
    await emu_client.token_request()
    await emu_client.api("GET", "/partner/v1/accounts")
    _, logs = await emu_client.control("GET", "/requests")
    assert len(logs["requests"]) == len(logs["token_requests"]) == 1
    assert logs["token_requests"][0]["status"] == 200 and "demo-secret" not in str(logs)
    assert (await emu_client.control("DELETE", "/requests"))[0] == 204
    assert (await emu_client.control("GET", "/requests"))[1] == {"requests": [], "token_requests": []}
    assert (await emu_client.stats())["api_requests"] == 1  # counters are separate from the log


async def test_control_errors_are_json(emu_client: EmulatorClient):
    async with emu_client.session.post(f"{emu_client.url}/_emulator/faults", data=b"{nope") as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
    assert (await emu_client.control("GET", "/nothing"))[0] == 404
    assert (await emu_client.control("POST", "/settings", {"rate_limit": 0.5}))[0] == 400


async def test_control_paths_are_not_logged_as_api_requests(emu_client: EmulatorClient):
    await emu_client.stats()
    async with emu_client.session.get(f"{emu_client.url}/oauth/token") as resp:
        assert resp.status == 405  # the auth server's own route, not the API's 404
    assert (await emu_client.stats())["api_requests"] == 0


def test_client_spec_validation():
    with pytest.raises(ValueError, match="secrets"):
        ClientSpec("cc_client_x", ("a", "b", "c"), frozenset({"decisions:read"}))
    with pytest.raises(ValueError, match="secrets"):
        ClientSpec("cc_client_x", ("a", "a"), frozenset({"decisions:read"}))
    with pytest.raises(ValueError, match="unknown scopes"):
        ClientSpec("cc_client_x", ("a",), frozenset({"decisions:write"}))
    assert DEMO_CLIENT.scopes == PARTNER_SCOPES and DEMO_CLIENT.audiences == {"partner/v1", "internal/v1"}


async def test_emulator_server_lifecycle():
    server = EmulatorServer(port=0)
    async with server as emu:
        assert emu.port != 0 and emu.url == f"http://127.0.0.1:{emu.port}"
        async with aiohttp.ClientSession() as session:
            assert await EmulatorClient(session, emu.url).mint()
        assert emu.state.counters.tokens_issued == 1
    await server.stop()  # idempotent
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{server.url}/_emulator/stats")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_arguments():
    args = _parse()
    assert (args.host, args.port, args.client, args.token_ttl, args.rate_limit) == (
        "127.0.0.1",
        8444,
        None,
        3600,
        10,
    )
    args = _parse("--client", "cc_client_a:s3cret:decisions:read,payments:read", "--client", "cc_client_b:x",
                  "--token-ttl", "60", "--rate-limit", "off")  # fmt: skip
    a, b = args.client
    assert (a.client_id, a.secrets, a.scopes) == (
        "cc_client_a",
        ("s3cret",),
        {"decisions:read", "payments:read"},
    )
    assert b.scopes == PARTNER_SCOPES and args.rate_limit is None and args.token_ttl == 60
    for bad in (
        ["--client", "nosecret"],
        ["--client", "a:b:made:up"],
        ["--token-ttl", "0"],
        ["--rate-limit", "x"],
    ):
        with pytest.raises(SystemExit):
            _parse(*bad)


async def test_emulator_command_serves_until_sigterm():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.emulator", "--port", "0", "--client", "cc_client_cli:pw:decisions:read",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        url = first.rsplit(" ", 1)[1].strip()
        assert first.startswith("Credicorp emulator listening on http://127.0.0.1:")
        banner = (await proc.stdout.readline()).decode()
        assert "cc_client_cli" in banner
        async with aiohttp.ClientSession() as session:
            token = await EmulatorClient(session, url).mint(
                "decisions:read", client_id="cc_client_cli", secret="pw"
            )
            assert token.count(".") == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
    assert proc.returncode == 0


async def test_emulator_command_reports_a_busy_port(emulator: EmulatorServer):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.emulator", "--port", str(emulator.port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 1 and b"cannot listen" in err
