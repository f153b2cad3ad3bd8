"""Hostile clients against the resource bounds of both listeners, over real sockets.

Each attack here was reproduced against the proxy before the listeners were
bounded (aiohttp's defaults: an hour of keep-alive, no deadline on a head or
a body, no connection cap, partial heads kept in memory, any HTTP version
served): a header bomb of 50 connections grew the process by 78 MiB, a
slowloris head or a stalled body held its connection for ever, and an
``HTTP/2.0`` request line was proxied with a token. Every test attacks the
real proxy (``start_proxy``) on loopback with short configured limits and
checks the answer a client gets, that the proxy (and the API) did nothing
more, and the ``ccp_limit_hits_total`` count operators see.

The head bounds count bytes before the parser sees them, and the C (llhttp)
and pure-Python parsers buffer differently, so the module runs again under
the pure-Python parser (``tests/parsers.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import ProxyServer
from proxy.config import parse_config
from proxy.emulator.app import EmulatorServer
from proxy.errors import ConfigError
from tests.helpers import ends_within, eventually, rss_bytes
from tests.parsers import check_expected_parser, parser_kind, rerun_under_pure_python
from tests.proxy_fixtures import (
    Scrape,
    StartProxy,
    base_config,
    emulator_requests,
    emulator_stats,
    open_connection,
    scrape,
)

ROOT = Path(__file__).resolve().parent.parent
INNER_ENV = "CCP_LIMITS_WIRE_PARSER"
DECISION = "/partner/v1/decisions/dec_demo_001"
DOCUMENTS = "/partner/v1/applications/app_demo_001/documents"  # applications.write, takes a body
MiB = 1024 * 1024
#: Short deadlines so every timeout case takes about a second.
QUICK = {"header_timeout_s": 0.5, "keepalive_timeout_s": 0.5, "body_timeout_s": 0.5}
DEADLINE_SLACK_S = 1.5  # how late after its deadline a refusal may arrive on a busy 2-core machine
LISTENERS = ["proxy", "admin"]


# ------------------------------------------------------------------ helpers
@dataclass
class Answer:
    status_line: str
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader, timeout: float = 5.0) -> Answer:
    """One HTTP/1.1 response with a Content-Length, read off a raw connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout)
    return Answer(status_line, int(status_line.split()[1]), headers, body)


def url_of(proxy: ProxyServer, listener: str) -> str:
    return proxy.proxy_url if listener == "proxy" else proxy.admin_url


def target_of(listener: str) -> str:
    return DECISION if listener == "proxy" else "/healthz"


def head(listener: str, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    """A complete GET head for the listener (the proxied route, or the admin /healthz)."""
    line = b"GET " + target_of(listener).encode() + b" " + version + b"\r\n"
    return line + b"Host: proxy.test\r\n" + extra + b"\r\n"


def assert_refusal(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer
    assert answer.status_line.startswith("HTTP/1.1 "), answer.status_line
    assert answer.headers["x-credicorp-proxy-error"] == code, answer.headers
    assert answer.headers["connection"].lower() == "close", answer.headers
    assert answer.json()["error"] == code, answer.body


async def limit_hits(http: aiohttp.ClientSession, proxy: ProxyServer, listener: str, limit: str) -> float:
    metrics: Scrape = await scrape(http, proxy)
    return metrics.value("ccp_limit_hits_total", listener=listener, limit=limit)


async def assert_api_untouched(http: aiohttp.ClientSession, emulator: EmulatorServer) -> None:
    """Nothing was forwarded and no token was minted for it."""
    assert await emulator_requests(http, emulator) == []
    assert (await emulator_stats(http, emulator))["tokens_by_scope"] == {}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that never reuses a connection: the proxy closes idle ones after half a second here."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield session


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> ProxyServer:
    return await start_proxy({"limits": QUICK})


# ------------------------------------------------------------ header bombs
@pytest.mark.parametrize("listener", LISTENERS)
async def test_header_bomb_of_50_connections_leaves_memory_flat(
    start_proxy: StartProxy, http: aiohttp.ClientSession, listener: str
) -> None:
    """50 connections x 100 header lines of 8 KB, never ending the head: each gets 431 after 32 KiB.

    Before: every connection's 800 KB stayed in the parser, +78 MiB RSS (C parser), +40 MiB (Python).
    The attack runs in a child process, so only the proxy's memory is in this process's RSS.
    """
    proxy = await start_proxy()  # the default limits: 32 KiB of head, 100 fields
    before = rss_bytes(settle=True)
    attacker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.attack_bench", "bomb", url_of(proxy, listener),
        "--connections", "50", "--lines", "100",
        cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert attacker.stdin is not None and attacker.stdout is not None
    try:
        report = json.loads(await asyncio.wait_for(attacker.stdout.readline(), 60))
        growth = rss_bytes(settle=False) - before  # while the attack's connections are still open
    finally:
        attacker.stdin.close()
        await asyncio.wait_for(attacker.wait(), 30)
    assert growth < 20 * MiB, f"RSS grew {growth / MiB:.1f} MiB under the attack; answers {report}"
    assert report["outcomes"] == {"431": 50}, report
    assert await limit_hits(http, proxy, listener, "header_bytes") == 50


@pytest.mark.parametrize("listener", LISTENERS)
async def test_head_over_max_header_bytes_is_431_and_closed(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, listener: str
) -> None:
    proxy = await start_proxy({"limits": {"max_header_bytes": 4096}})
    reader, writer = await open_connection(url_of(proxy, listener))
    writer.write(head(listener, b"X-Fits: " + b"a" * 3900 + b"\r\n"))  # a head of ~4000 bytes
    assert (await read_answer(reader)).status == 200
    writer.write(head(listener, b"X-Big: " + b"a" * 4100 + b"\r\n"))
    assert_refusal(await read_answer(reader), 431, "headers_too_large")
    assert await ends_within(reader, 5)
    writer.close()
    if listener == "proxy":
        forwarded = [e["raw_path"] for e in await emulator_requests(http, emulator)]
        assert forwarded == [DECISION]  # the first request only
    assert await limit_hits(http, proxy, listener, "header_bytes") == 1


@pytest.mark.parametrize("listener", LISTENERS)
async def test_the_head_after_a_declined_upgrade_is_counted_like_any_other(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, listener: str
) -> None:
    """aiohttp keeps every byte after an Upgrade request as a tail until the handler declines it; the
    proxy never switches protocols, so those bytes are the next head, with its cap and its deadline."""
    proxy = await start_proxy({"limits": {"max_header_bytes": 4096}})
    reader, writer = await open_connection(url_of(proxy, listener))
    upgrade = head(listener, b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
    bomb = head(listener, b"X-Big: " + b"a" * 75_000 + b"\r\n").removesuffix(b"\r\n")  # never ended
    writer.write(upgrade + bomb)
    await writer.drain()
    assert (await read_answer(reader)).status // 100 in (2, 4)  # the upgrade request, answered as HTTP
    assert_refusal(await read_answer(reader), 431, "headers_too_large")
    assert await ends_within(reader, 5)
    writer.close()
    if listener == "proxy":
        forwarded = [e["raw_path"] for e in await emulator_requests(http, emulator)]
        assert forwarded == [DECISION]  # the upgrade request only: the bomb never reached the API
    assert await limit_hits(http, proxy, listener, "header_bytes") == 1


@pytest.mark.parametrize("listener", LISTENERS)
async def test_more_than_max_headers_is_431(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, listener: str
) -> None:
    proxy = await start_proxy({"limits": {"max_headers": 20}})
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(19))  # with Host: 20 fields
    reader, writer = await open_connection(url_of(proxy, listener))
    writer.write(head(listener, fields))
    assert (await read_answer(reader)).status == 200
    writer.write(head(listener, fields + b"X-One-More: v\r\n"))
    assert_refusal(await read_answer(reader), 431, "headers_too_large")
    assert await ends_within(reader, 5)
    writer.close()
    if listener == "proxy":
        assert len(await emulator_requests(http, emulator)) == 1
    assert await limit_hits(http, proxy, listener, "header_count") == 1


@pytest.mark.parametrize("framing", ["no-body", "content-length", "chunked"])
async def test_each_pipelined_head_is_counted_from_its_own_first_byte(
    start_proxy: StartProxy, http: aiohttp.ClientSession, framing: str
) -> None:
    """Where one head (or its body) ends and the next begins is found exactly, even when the end of
    a head is split across two reads: a 3 KB head after another is served, a 5 KB one is 431."""
    proxy = await start_proxy({"limits": {"max_header_bytes": 4096}})
    crlfs = b"\r\n\r\n" * 75  # 300 bytes of body that look like ends of heads, and are not
    if framing == "no-body":
        first, body = head("proxy"), b""
    elif framing == "content-length":
        first, body = upload_head(300), crlfs
    else:
        first = upload_head(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
        body = b"12c\r\n" + crlfs + b"\r\n0\r\n\r\n"
    first = first.removesuffix(b"\r\n")
    fits = head("proxy", b"X-Pad: " + b"p" * 3000 + b"\r\n")
    too_big = head("proxy", b"X-Pad: " + b"p" * 5000 + b"\r\n")
    reader, writer = await open_connection(proxy.proxy_url)
    writer.write(first + b"\r")  # the head's CRLF CRLF, split across two reads
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"\n" + body + fits + too_big)
    statuses = [(await read_answer(reader)).status for _ in range(3)]
    writer.close()
    assert statuses[0] // 100 == 2 and statuses[1:] == [200, 431], statuses
    assert await limit_hits(http, proxy, "proxy", "header_bytes") == 1


# ------------------------------------------------------------------ deadlines
@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("pace", ["trickle", "silent"])
async def test_slow_head_gets_408_and_close_at_the_header_deadline(
    proxy: ProxyServer, http: aiohttp.ClientSession, emulator: EmulatorServer, listener: str, pace: str
) -> None:
    """Slowloris: a head trickling one byte per 0.1 s is cut at header_timeout_s with a 408; a connection
    that sends nothing at all is closed then, without an answer."""
    reader, writer = await open_connection(url_of(proxy, listener))
    started = time.monotonic()

    async def trickle() -> None:
        writer.write(b"GET " + target_of(listener).encode() + b" HTTP/1.1\r\n")
        for byte in b"X-Slow: " + b"a" * 40:  # 4 s at this pace: far past the deadline
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))

    sender = asyncio.create_task(trickle()) if pace == "trickle" else None
    try:
        if pace == "silent":
            # Nothing of a request arrived, so there is nothing to answer: a 408 here would reach a
            # pooling client that pre-connected as the answer to the request it sends next.
            assert await reader.read() == b""
            elapsed = time.monotonic() - started
        else:
            answer = await read_answer(reader, timeout=QUICK["header_timeout_s"] + DEADLINE_SLACK_S)
            elapsed = time.monotonic() - started
            assert_refusal(answer, 408, "request_timeout")
            assert await ends_within(reader, 5)
        assert QUICK["header_timeout_s"] - 0.05 <= elapsed <= QUICK["header_timeout_s"] + DEADLINE_SLACK_S
    finally:
        if sender is not None:
            sender.cancel()
        writer.close()
    assert await limit_hits(http, proxy, listener, "header_timeout") == 1
    if listener == "proxy":
        await assert_api_untouched(http, emulator)


@pytest.mark.parametrize("listener", LISTENERS)
async def test_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(
    proxy: ProxyServer, http: aiohttp.ClientSession, listener: str
) -> None:
    reader, writer = await open_connection(url_of(proxy, listener))
    writer.write(head(listener))
    assert (await read_answer(reader)).status == 200
    await asyncio.sleep(0.2)  # idle, but within keepalive_timeout_s: the connection is still served
    writer.write(head(listener))
    assert (await read_answer(reader)).status == 200
    idle_from = time.monotonic()
    assert await ends_within(reader, QUICK["keepalive_timeout_s"] + DEADLINE_SLACK_S)
    assert time.monotonic() - idle_from >= QUICK["keepalive_timeout_s"] - 0.05
    writer.close()
    assert await limit_hits(http, proxy, listener, "keepalive_timeout") >= 1


def upload_head(length: int) -> bytes:
    return (
        b"POST " + DOCUMENTS.encode() + b" HTTP/1.1\r\nHost: proxy.test\r\n"
        b"Content-Type: application/pdf\r\nContent-Length: %d\r\n\r\n" % length
    )


@pytest.mark.parametrize("body", ["kept", "streamed"])
async def test_stalled_request_body_gets_408(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, body: str
) -> None:
    """A body that stops arriving is cut at body_timeout_s; one that arrives slowly but steadily is not.

    ``kept``: the body fits ``retry_body_limit`` and is read whole before anything is sent upstream.
    ``streamed``: it does not, and streams to the API as it arrives.
    """
    retry_body_limit = 4096 if body == "kept" else 64
    proxy = await start_proxy({"limits": QUICK, "upstream": {"retry_body_limit": retry_body_limit}})

    reader, writer = await open_connection(proxy.proxy_url)
    writer.write(upload_head(1000))
    for _ in range(5):  # 1.0 s in all, longer than body_timeout_s, but never 0.5 s of silence
        writer.write(b"b" * 200)
        await asyncio.sleep(0.2)
    assert (await read_answer(reader)).status in (200, 201)
    writer.close()
    requests_before = len(await emulator_requests(http, emulator))

    reader, writer = await open_connection(proxy.proxy_url)
    writer.write(upload_head(1000) + b"b" * 100)  # and then nothing
    started = time.monotonic()
    answer = await read_answer(reader, timeout=QUICK["body_timeout_s"] + DEADLINE_SLACK_S)
    assert_refusal(answer, 408, "request_timeout")
    assert time.monotonic() - started >= QUICK["body_timeout_s"] - 0.05
    assert await ends_within(reader, 5)
    writer.close()
    if body == "kept":
        assert len(await emulator_requests(http, emulator)) == requests_before  # nothing went upstream
    assert await limit_hits(http, proxy, "proxy", "body_timeout") == 1


async def test_stalled_body_after_the_response_started_is_reset(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """An API that answers before reading the whole upload: once the answer is under way a 408 cannot
    be sent, so the client connection is reset (a cut answer must not look complete)."""

    answered: list[asyncio.StreamWriter] = []

    async def early_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nearly\r\n")  # and no end
        await writer.drain()
        await reader.read()  # keep the connection until the proxy drops it

    api = await asyncio.start_server(early_answer, "127.0.0.1", 0)
    try:
        api_url = f"http://127.0.0.1:{api.sockets[0].getsockname()[1]}"
        proxy = await start_proxy({"limits": QUICK, "upstream": {"url": api_url, "retry_body_limit": 64}})
        reader, writer = await open_connection(proxy.proxy_url)
        writer.write(upload_head(1000) + b"b" * 100)  # then the upload stalls
        started = time.monotonic()
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
        rest = b""
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(QUICK["body_timeout_s"] + DEADLINE_SLACK_S):
                while chunk := await reader.read(65536):
                    rest += chunk
        assert time.monotonic() - started >= QUICK["body_timeout_s"] - 0.05
        assert b"0\r\n\r\n" not in rest  # the chunked answer never looked complete
        writer.close()
        assert await limit_hits(http, proxy, "proxy", "body_timeout") == 1
    finally:
        api.close()
        for api_side in answered:
            api_side.close()


# --------------------------------------------------------------- connections
async def test_connection_cap_answers_503_and_the_admin_listener_still_answers(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    cap, admin_cap = 3, 2
    limits = {"listen_max_connections": cap, "admin_max_connections": admin_cap, "header_timeout_s": 30}
    proxy = await start_proxy({"limits": limits})

    def proxy_connections_open(count: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            async with http.get(proxy.admin_url + "/metrics") as resp:
                if resp.status == 503:  # the admin listener's own closed connections are not gone yet
                    return False
                return Scrape(await resp.text()).value("ccp_open_connections", listener="proxy") == count

        return check

    # Accepted in order, so the connection after these is over the cap when it arrives.
    idle = [await open_connection(proxy.proxy_url) for _ in range(cap)]
    reader, writer = await open_connection(proxy.proxy_url)
    writer.write(head("proxy"))
    assert_refusal(await read_answer(reader), 503, "too_many_connections")
    assert await ends_within(reader, 5)
    writer.close()
    await eventually(proxy_connections_open(cap))
    async with http.get(proxy.admin_url + "/healthz") as resp:  # probes answer while the proxy is full
        assert resp.status == 200

    admin_idle = [await open_connection(proxy.admin_url) for _ in range(admin_cap)]
    reader, writer = await open_connection(proxy.admin_url)
    writer.write(head("admin"))
    assert_refusal(await read_answer(reader), 503, "too_many_connections")
    writer.close()
    for _, idle_writer in admin_idle + idle:
        idle_writer.close()

    await eventually(proxy_connections_open(0))
    async with http.get(proxy.proxy_url + DECISION) as resp:  # room again
        assert resp.status == 200
    assert await limit_hits(http, proxy, "proxy", "connections") == 1
    assert await limit_hits(http, proxy, "admin", "connections") >= 1  # the waits above may add some


# ------------------------------------------------------------- HTTP versions
VERSION_CASES = {
    # request line -> status per parser (a parser that cannot parse the line at all answers 400)
    "HTTP/2.0": (b"HTTP/2.0", {"c": 505, "python": 505}),
    "HTTP/0.9": (b"HTTP/0.9", {"c": 505, "python": 505}),
    "no-version": (None, {"c": 505, "python": 400}),  # "GET /path" alone: an HTTP/0.9 request line
}


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("case", list(VERSION_CASES))
async def test_http_versions_other_than_1_0_and_1_1_are_refused_without_a_token(
    proxy: ProxyServer, http: aiohttp.ClientSession, emulator: EmulatorServer, listener: str, case: str
) -> None:
    version, expected = VERSION_CASES[case]
    line = b"GET " + target_of(listener).encode()
    request = line + b"\r\n\r\n" if version is None else head(listener, version=version)
    reader, writer = await open_connection(url_of(proxy, listener))
    writer.write(request)
    answer = await read_answer(reader)
    writer.close()
    assert answer.status == expected[parser_kind()], answer
    if answer.status == 505:
        assert_refusal(answer, 505, "http_version_not_supported")
        assert await limit_hits(http, proxy, listener, "http_version") == 1
    if listener == "proxy":
        await assert_api_untouched(http, emulator)

    reader, writer = await open_connection(url_of(proxy, listener))  # HTTP/1.0 is still served
    writer.write(head(listener, version=b"HTTP/1.0"))
    answer = await read_answer(reader)
    writer.close()
    assert answer.status == 200 and answer.status_line.startswith("HTTP/1.0 200"), answer


# ------------------------------------------------------------- configuration
def test_limit_keys_are_checked_and_take_environment_overrides(emulator: EmulatorServer) -> None:
    raw = base_config(emulator.url) | {"limits": {"max_headers": 0, "header_timeout_s": -1}}
    with pytest.raises(ConfigError) as refused:
        parse_config(raw, env={})
    assert "limits.max_headers: must be between 1 and 1000, got 0" in refused.value.problems
    assert "limits.header_timeout_s: must be > 0, got -1.0" in refused.value.problems
    env = {"CCP_LIMITS_MAX_HEADER_BYTES": "65536", "CCP_LIMITS_ADMIN_MAX_CONNECTIONS": "8"}
    limits = parse_config(base_config(emulator.url), env=env).limits
    assert (limits.max_header_bytes, limits.admin_max_connections, limits.body_timeout_s) == (65536, 8, 60.0)


# ---------------------------------------------------------- the other parser
def test_the_expected_parser_is_in_use() -> None:
    check_expected_parser(INNER_ENV)


@pytest.mark.skipif(bool(os.environ.get(INNER_ENV)), reason="already the inner run")
def test_limits_also_pass_under_the_pure_python_parser() -> None:
    rerun_under_pure_python(__file__, INNER_ENV)
