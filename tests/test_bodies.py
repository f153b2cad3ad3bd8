"""Bodies at the edges: ``Expect: 100-continue``, body limits on every framing, the
retry buffer above aiohttp's own 1 MiB default, and response transfer codings.

Real proxy, real emulator and raw sockets: the interim ``100 Continue`` and
the exact framing are only visible on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.emulator.app import EmulatorServer
from tests.proxy_fixtures import StartProxy, emulator_requests, fixed_upstream, open_connection, raw_request

DOC = "/partner/v1/applications/app_demo_001/documents"
DECISION = "/partner/v1/decisions/dec_demo_001"
PDF = {"Content-Type": "application/pdf"}


def upload_head(length: int, expect: str | None = "100-continue", path: str = DOC) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Connection: close", "Content-Type: application/pdf"]
    lines.append(f"Content-Length: {length}")
    if expect is not None:
        lines.append(f"Expect: {expect}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ------------------------------------------------------------------ Expect


async def test_expect_100_continue_is_answered_before_the_body_is_sent(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    reader, writer = await open_connection(proxy.proxy_url)
    writer.write(upload_head(5))
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)  # the client waits for this
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"%PDF-")
    final = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert final.startswith(b"HTTP/1.1 201 "), final[:100]
    [seen] = await emulator_requests(http, emulator)
    assert seen["body_size"] == 5 and "expect" not in seen["headers"]  # hop-by-hop: never forwarded


@pytest.mark.parametrize(
    ("path", "length", "status"),
    [
        ("/partner/v1/nowhere", 5, 403),  # no route: refused before the client sends anything
        (DOC, 10_000, 413),  # over max_body_bytes by its declared length
    ],
    ids=["no-route", "too-large"],
)
async def test_a_refused_upload_gets_its_final_answer_instead_of_100(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    emulator: EmulatorServer,
    path: str,
    length: int,
    status: int,
) -> None:
    """The final answer comes at once, with no 100 before it: the client never sends the body."""
    proxy = await start_proxy({"upstream": {"max_body_bytes": 1000}})
    reader, writer = await open_connection(proxy.proxy_url)
    writer.write(upload_head(length, path=path))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    writer.close()
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    assert await emulator_requests(http, emulator) == []


async def test_an_unknown_expectation_is_refused_with_417(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    answer = await raw_request(proxy.proxy_url, upload_head(5, expect="something-else") + b"%PDF-")
    assert answer.startswith(b"HTTP/1.1 417 ") and b"X-Credicorp-Proxy-Error: expectation_failed" in answer
    assert await emulator_requests(http, emulator) == []


# ------------------------------------------------------------------ limits


async def test_a_chunked_body_over_max_body_bytes_is_refused_even_below_the_retry_buffer(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    """A chunked body declares no length; it is counted as it arrives, whatever its size."""
    proxy = await start_proxy({"upstream": {"max_body_bytes": 1000}})  # retry buffer: 1 MiB
    body = b"x" * 5000
    head = (
        f"POST {DOC} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/pdf\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    answer = await raw_request(proxy.proxy_url, head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ") and b"body_too_large" in answer
    assert await emulator_requests(http, emulator) == []


async def test_a_retry_buffer_above_one_mib_keeps_bodies_up_to_it(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    """aiohttp's ``request.read()`` stops at its own 1 MiB ``client_max_size`` with a plain-text
    413; the configured ``retry_body_limit`` is the only limit on what is kept."""
    proxy = await start_proxy({"upstream": {"retry_body_limit": 4 * 1024 * 1024}})
    body = b"x" * (2 * 1024 * 1024)
    pdf = {"Content-Type": "application/pdf"}
    async with http.post(proxy.proxy_url + DOC, data=io.BytesIO(body), headers=pdf) as resp:
        assert resp.status == 201, await resp.text()
    [seen] = await emulator_requests(http, emulator)
    assert seen["body_size"] == len(body)


# ------------------------------------------------- response transfer codings


async def test_a_response_coded_beyond_chunked_is_refused_not_relayed_without_its_coding(
    start_proxy: StartProxy,
) -> None:
    body = gzip.compress(b"hello world " * 10)
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        + b"%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n"
    )
    async with fixed_upstream(response) as url:
        proxy = await start_proxy({"upstream": {"url": url}})
        answer = await raw_request(proxy.proxy_url, f"GET {DECISION} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502 ") and b"upstream_unreachable" in answer
    assert body not in answer


# ------------------------------------------------------------------ timeouts
#
# upstream.timeout_s bounds connect + send + the API's wait before the response head;
# a streamed upload starts that clock only once it is sent, and the response body is
# bounded by read_timeout_s (silence) alone. A long transfer is never cut by a total.


async def test_a_download_longer_than_timeout_s_is_not_cut(start_proxy: StartProxy) -> None:
    body = b"y" * 20_000
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/pdf\r\nContent-Length: %d\r\n\r\n" % len(body)

    done = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(head)
            for start in range(0, len(body), 2000):  # 10 pieces over ~1.5 s, 0.15 s apart
                await asyncio.sleep(0.15)
                writer.write(body[start : start + 2000])
                await writer.drain()
        writer.close()
        await writer.wait_closed()
        done.set()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        proxy = await start_proxy(
            {"upstream": {"url": url, "timeout_s": 0.5, "read_timeout_s": 1.0, "response_buffer_bytes": 0}}
        )
        get = f"GET {DECISION} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        answer = await raw_request_all(proxy.proxy_url, get)
        await asyncio.wait_for(done.wait(), 5)
    finally:
        server.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(body)


async def test_a_slow_streamed_upload_longer_than_timeout_s_is_not_cut(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy({"upstream": {"timeout_s": 0.5, "retry_body_limit": 1000}})

    async def slowly() -> AsyncIterator[bytes]:
        for _ in range(10):  # ~1.5 s in all, far past timeout_s
            yield b"x" * 2000
            await asyncio.sleep(0.15)

    async with http.post(proxy.proxy_url + DOC, data=slowly(), headers=PDF) as r:
        assert r.status == 201, await r.text()
    [seen] = await emulator_requests(http, emulator)
    assert seen["body_size"] == 20_000


async def test_an_api_slow_to_answer_after_a_streamed_upload_is_still_cut_at_timeout_s(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy({"upstream": {"timeout_s": 0.5, "retry_body_limit": 1000}})
    async with http.post(emulator.url + "/_emulator/faults", json={"api_latency_ms": 3000}) as resp:
        assert resp.status == 200
    started = asyncio.get_running_loop().time()
    async with http.post(proxy.proxy_url + DOC, data=b"x" * 5000, headers=PDF) as r:
        assert r.status == 504 and r.headers["X-Credicorp-Proxy-Error"] == "upstream_timeout"
    assert asyncio.get_running_loop().time() - started < 2.0


async def raw_request_all(url: str, request: bytes) -> bytes:
    """Send raw bytes and read the whole answer until the proxy closes (``Connection: close``)."""
    reader, writer = await open_connection(url)
    writer.write(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
