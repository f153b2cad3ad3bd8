"""The request path end to end: real proxy, real emulator, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os

import aiohttp
import pytest

from proxy.emulator.api import statement_bytes
from proxy.emulator.app import EmulatorServer
from tests.helpers import eventually, get, sample
from tests.proxy_fixtures import (
    StartProxy,
    emulator_requests,
    emulator_stats,
    open_connection,
    raw_request,
    set_faults,
)
from tests.redis_fixtures import free_port

DECISION = "/partner/v1/decisions/dec_demo_001"


async def test_read_gets_a_token_with_exactly_the_routes_scope(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    async with http.get(proxy.proxy_url + DECISION) as resp:
        assert resp.status == 200
        assert (await resp.json())["id"] == "dec_demo_001"
        assert resp.headers["X-Request-Id"]
    stats = await emulator_stats(http, emulator)
    assert stats["tokens_by_scope"] == {"decisions:read": 1}
    seen = (await emulator_requests(http, emulator))[-1]
    assert seen["auth"]["valid"] is True and seen["auth"]["scope"] == "decisions:read"


async def test_unmatched_route_is_refused_by_the_proxy_without_minting(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    async with http.delete(proxy.proxy_url + "/partner/v1/applications/app_demo_001") as resp:
        assert resp.status == 403
        assert resp.headers["X-Credicorp-Proxy-Error"] == "route_not_allowed"
        body = await resp.json()
        assert body["error"] == "route_not_allowed" and body["error_description"]
    stats = await emulator_stats(http, emulator)
    assert stats["token_requests"] == 0 and stats["api_requests"] == 0


@pytest.mark.parametrize(
    "target",
    [
        "/partner/v1/decisions/../payments/links",
        "/partner/v1/decisions/%2e%2e/payments",
        "/partner/v1/decisions/%2E%2e/payments",
        "/partner/v1/decisions/a%2Fb",
        "/partner/v1/decisions/a%5Cb",
        "/partner/v1/decisions/a;b=c",
        "//partner/v1/decisions/x",
        "/partner/v1//decisions/x",
        "/partner/v1/decisions/%00",
        "/partner/v1/decisions/%C0%AF",
        "/partner/v1/decisions/a\\b",
    ],
)
async def test_unsafe_paths_get_400_and_never_reach_upstream(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, target: str
) -> None:
    proxy = await start_proxy()
    answer = await raw_request(proxy.proxy_url, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"bad_request" in answer or b"Bad Request" in answer
    assert (await emulator_stats(http, emulator))["token_requests"] == 0
    assert await emulator_requests(http, emulator) == []


@pytest.mark.parametrize(
    "request_line",
    [
        "GET http://evil.example/partner/v1/decisions/dec_demo_001 HTTP/1.1",
        "CONNECT evil.example:443 HTTP/1.1",
        "OPTIONS * HTTP/1.1",
    ],
)
async def test_non_origin_form_targets_are_refused(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, request_line: str
) -> None:
    proxy = await start_proxy()
    answer = await raw_request(
        proxy.proxy_url, f"{request_line}\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 400")
    assert await emulator_requests(http, emulator) == []


async def test_host_and_forwarded_headers_never_change_the_destination(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    headers = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "Forwarded": "host=evil.example"}
    async with http.get(proxy.proxy_url + DECISION, headers=headers) as resp:
        assert resp.status == 200
    assert len(await emulator_requests(http, emulator)) == 1  # it reached the configured upstream


async def test_client_authorization_is_replaced_and_connection_cannot_strip_ours(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    headers = {
        "Authorization": "Bearer stolen-or-forged",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Connection": "Authorization, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "X-Keep-Me": "1",
    }
    async with http.get(proxy.proxy_url + DECISION, headers=headers) as resp:
        assert resp.status == 200
    seen = (await emulator_requests(http, emulator))[-1]
    assert seen["auth"]["count"] == 1 and seen["auth"]["valid"] is True
    names = set(seen["headers"])
    assert "x-keep-me" in names
    assert not names & {"x-drop-me", "keep-alive", "proxy-authorization", "connection"}


async def test_forwarded_headers_are_added_only_when_configured(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    spoofed = {"X-Forwarded-For": "203.0.113.9", "X_Forwarded_For": "203.0.113.10", "Forwarded": "for=x"}
    plain = await start_proxy()
    async with http.get(plain.proxy_url + DECISION, headers=spoofed) as resp:
        assert resp.status == 200
    seen = (await emulator_requests(http, emulator))[-1]["headers"]
    assert seen["x-forwarded-for"] == ["203.0.113.9"]  # off: the client's own header passes untouched
    assert "x-forwarded-proto" not in seen

    adding = await start_proxy({"upstream": {"forwarded_headers": True}})
    async with http.get(adding.proxy_url + DECISION, headers=spoofed) as resp:
        assert resp.status == 200
    seen = (await emulator_requests(http, emulator))[-1]["headers"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"] and seen["x-forwarded-proto"] == ["http"]
    assert not {"forwarded", "x_forwarded_for"} & set(seen)  # replaced, lookalike included


async def test_underscore_lookalikes_of_dropped_or_proxy_set_headers_never_reach_the_api(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    """CGI-style servers read ``Proxy_Authorization`` as ``Proxy-Authorization``; other
    underscored names are ordinary end-to-end headers and pass."""
    proxy = await start_proxy()
    headers = {
        "Proxy_Authorization": "Basic Zm9vOmJhcg==",
        "Keep_Alive": "timeout=5",
        "X_Request_Id": "forged",
        "Connection": "X_Drop_Me",
        "X-Drop-Me": "1",
        "X_Tenant_Id": "t-1",
    }
    async with http.get(proxy.proxy_url + DECISION, headers=headers) as resp:
        assert resp.status == 200
        request_id = resp.headers["X-Request-Id"]
    seen = (await emulator_requests(http, emulator))[-1]
    assert seen["auth"]["count"] == 1 and seen["auth"]["valid"] is True
    names = set(seen["headers"])
    assert "x_tenant_id" in names
    assert not names & {"proxy_authorization", "keep_alive", "x_request_id", "x-drop-me"}
    assert seen["headers"]["x-request-id"] == [request_id]


async def test_query_is_forwarded_raw_and_never_used_for_matching(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    query = "next=/partner/v1/payments/links&x=%2e%2e&a=1&a=2"
    answer = await raw_request(
        proxy.proxy_url, f"GET {DECISION}?{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 200")
    seen = (await emulator_requests(http, emulator))[-1]
    assert seen["raw_path"] == DECISION and seen["query_string"] == query
    assert (await emulator_stats(http, emulator))["tokens_by_scope"] == {"decisions:read": 1}


async def test_percent_encoded_path_is_forwarded_byte_for_byte(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    target = "/partner/v1/decisions/dec%5Fdemo%5f001"
    answer = await raw_request(
        proxy.proxy_url, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.split(b"\r\n", 1)[0].startswith(b"HTTP/1.1 ")
    assert (await emulator_requests(http, emulator))[-1]["raw_path"] == target


async def test_multi_megabyte_upload_is_byte_exact(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    body = os.urandom(6 * 1024 * 1024 + 7)
    url = proxy.proxy_url + "/partner/v1/applications/app_demo_001/documents"
    async with http.post(url, data=io.BytesIO(body), headers={"Content-Type": "application/pdf"}) as resp:
        assert resp.status == 201, await resp.text()
        answer = await resp.json()
    assert answer["sha256"] == hashlib.sha256(body).hexdigest() and answer["size"] == len(body)


async def test_chunked_upload_streams_byte_exact(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    chunks = [os.urandom(700_000) for _ in range(5)]

    async def body():  # type: ignore[no-untyped-def]
        for chunk in chunks:
            yield chunk

    url = proxy.proxy_url + "/partner/v1/applications/app_demo_001/documents"
    async with http.post(url, data=body()) as resp:
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()


async def test_multi_megabyte_download_is_byte_exact(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    size = 9 * 1024 * 1024 + 3
    async with http.get(
        proxy.proxy_url + f"/partner/v1/accounts/acc_demo_001/statement?bytes={size}"
    ) as resp:
        assert resp.status == 200
        assert resp.content_length == size
        got = hashlib.sha256()
        async for chunk in resp.content.iter_chunked(1 << 16):
            got.update(chunk)
    want = hashlib.sha256(b"".join(statement_bytes(size, "acc_demo_001")))
    assert got.hexdigest() == want.hexdigest()


async def test_content_encoding_passes_through_undecoded(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    url = proxy.proxy_url + "/partner/v1/accounts/acc_demo_001/statement?bytes=50000&gzip=1"
    async with http.get(url, headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        raw = await resp.read()
    assert raw[:2] == b"\x1f\x8b"  # still gzip on the client side


async def test_concurrent_cold_requests_mint_once_per_scope_set(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    urls = [proxy.proxy_url + DECISION, proxy.proxy_url + "/partner/v1/accounts/acc_demo_001"] * 50
    statuses = await asyncio.gather(*(get(http, url) for url in urls))
    assert statuses == [200] * 100
    stats = await emulator_stats(http, emulator)
    assert stats["tokens_by_scope"] == {"decisions:read": 1, "accounts:read": 1}


async def test_401_purges_mints_once_and_retries_once(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    assert await get(http, proxy.proxy_url + DECISION) == 200
    async with http.post(emulator.url + "/_emulator/revoke-all") as resp:
        assert resp.status == 200
    statuses = await asyncio.gather(*(get(http, proxy.proxy_url + DECISION) for _ in range(20)))
    assert statuses == [200] * 20
    assert (await emulator_stats(http, emulator))["tokens_by_scope"] == {"decisions:read": 2}
    assert b'ccp_upstream_401_retries_total{outcome="success"}' in proxy.runtime.metrics.exposition()


async def test_second_401_goes_back_to_the_client(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    assert await get(http, proxy.proxy_url + DECISION) == 200
    await set_faults(http, emulator, api_status=401, api_count=2)
    async with http.get(proxy.proxy_url + DECISION) as resp:
        assert resp.status == 401
        assert "X-Credicorp-Proxy-Error" not in resp.headers
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    stats = await emulator_stats(http, emulator)
    assert stats["tokens_issued"] == 2  # the cold mint and exactly one replacement
    assert len(await emulator_requests(http, emulator)) == 3  # warm-up, first try, one retry


async def test_a_401_on_a_token_minted_during_the_request_is_not_retried_even_when_it_joined_late(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    """A token minted during this very request is not purged and re-minted (proxy/README.md, the 401 retry).

    The second request starts while the first one's mint POST is already on the wire,
    so the token's ``issued_at`` (stamped at the POST) is older than that request; it
    is still brand-new to it, and another mint would not fix a 401 on it.
    """
    proxy = await start_proxy()
    await set_faults(http, emulator, token_latency_ms=400, api_status=401, api_count=2)
    first = asyncio.create_task(get(http, proxy.proxy_url + DECISION))
    await asyncio.sleep(0.15)
    joined = asyncio.create_task(get(http, proxy.proxy_url + DECISION))
    assert await asyncio.gather(first, joined) == [401, 401]
    assert (await emulator_stats(http, emulator))["tokens_issued"] == 1
    counted = proxy.runtime.metrics.registry.get_sample_value
    assert counted("ccp_upstream_401_retries_total", {"outcome": "fresh_token_rejected"}) == 2


async def test_401_on_a_body_over_the_retry_limit_is_returned_as_is(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy({"upstream": {"retry_body_limit": 1024}})
    url = proxy.proxy_url + "/partner/v1/applications/app_demo_001/documents"
    async with http.post(url, data=b"x" * 10) as resp:  # warm the token
        assert resp.status == 201
    await set_faults(http, emulator, api_status=401, api_count=1)
    async with http.post(url, data=os.urandom(64 * 1024)) as resp:
        assert resp.status == 401
    assert (await emulator_stats(http, emulator))["tokens_issued"] == 1


async def test_small_body_is_resent_identically_on_the_retry(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    url = proxy.proxy_url + "/partner/v1/applications/app_demo_001/documents"
    async with http.post(url, data=b"warm") as resp:
        assert resp.status == 201
    await set_faults(http, emulator, api_status=401, api_count=1)
    body = os.urandom(300_000)
    async with http.post(url, data=body) as resp:
        assert resp.status == 201
        assert (await resp.json())["sha256"] == hashlib.sha256(body).hexdigest()


async def test_insufficient_scope_403_is_passed_through_and_counted(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    async with http.get(proxy.proxy_url + "/partner/v1/identity/verifications/ver_demo_001") as resp:
        assert resp.status == 403
        assert "X-Credicorp-Proxy-Error" not in resp.headers
        assert resp.headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope", scope="identity:read"'
    exposition = proxy.runtime.metrics.exposition().decode()
    assert (
        'ccp_insufficient_scope_total{route="identity.misconfigured",scope="identity:read"} 1.0' in exposition
    )


async def test_redirects_are_returned_not_followed(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    await set_faults(http, emulator, api_status=302, api_headers={"Location": "https://evil.example/steal"})
    async with http.get(proxy.proxy_url + DECISION, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "https://evil.example/steal"
    assert len(await emulator_requests(http, emulator)) == 1


async def test_upstream_unreachable_is_502(start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy({"upstream": {"url": "http://127.0.0.1:9"}})
    async with http.get(proxy.proxy_url + DECISION) as resp:
        assert resp.status == 502
        assert resp.headers["X-Credicorp-Proxy-Error"] == "upstream_unreachable"


async def test_upstream_timeout_is_504(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy({"upstream": {"timeout_s": 0.5, "read_timeout_s": 0.5}})
    assert await get(http, proxy.proxy_url + DECISION) == 200
    await set_faults(http, emulator, api_latency_ms=3000)
    async with http.get(proxy.proxy_url + DECISION) as resp:
        assert resp.status == 504
        assert resp.headers["X-Credicorp-Proxy-Error"] == "upstream_timeout"


async def test_a_connect_timeout_is_unreachable_502_not_a_slow_answer_504(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A listener whose accept queue is full drops further SYNs: the connect itself times out."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        try:
            proxy = await start_proxy(
                {"upstream": {"url": f"http://127.0.0.1:{port}", "connect_timeout_s": 0.3}}
            )
            async with http.get(proxy.proxy_url + DECISION) as resp:
                assert resp.status == 502
                assert resp.headers["X-Credicorp-Proxy-Error"] == "upstream_unreachable"
                assert "connect timed out" in (await resp.json())["error_description"]
        finally:
            for filler in fillers:
                filler.close()


@pytest.mark.parametrize(
    ("buffer_bytes", "expected"),
    [
        # streamed: the headers are already out, so the client sees its body cut short
        (0, (aiohttp.ClientPayloadError,)),
        # relayed whole (the default for small answers): nothing was sent, the connection is reset
        (64 * 1024, (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)),
    ],
    ids=["streamed", "buffered"],
)
async def test_upstream_drop_mid_body_resets_the_client(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    emulator: EmulatorServer,
    buffer_bytes: int,
    expected: tuple[type[Exception], ...],
) -> None:
    proxy = await start_proxy({"upstream": {"response_buffer_bytes": buffer_bytes}})
    assert await get(http, proxy.proxy_url + DECISION) == 200
    # Two drops: aiohttp's client resends a GET once when the server closes before answering.
    await set_faults(http, emulator, api_drop="after_headers", api_drop_count=2)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        with pytest.raises(expected):
            async with fresh.get(proxy.proxy_url + DECISION) as resp:
                await resp.read()
    assert sample(proxy.runtime.metrics, "ccp_in_flight_requests") == 0


async def test_upstream_drop_after_the_head_was_relayed_is_a_tcp_reset_not_an_eof(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    """Once the head is out, only a reset tells a client that reads to EOF (a close-delimited
    or HTTP/1.0 reader) that the body is incomplete: a plain close would send a clean FIN."""
    proxy = await start_proxy({"upstream": {"response_buffer_bytes": 0}})  # stream: the head goes first
    assert await get(http, proxy.proxy_url + DECISION) == 200
    await set_faults(http, emulator, api_drop="after_headers", api_drop_count=2)
    reader, writer = await open_connection(proxy.proxy_url)
    writer.write(f"GET {DECISION} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    received = b""
    with pytest.raises(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            received += chunk
    writer.close()
    assert received.startswith(b"HTTP/1.1 200")  # the head was relayed, then the connection was reset


async def test_small_answers_are_relayed_whole_and_large_ones_streamed(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Both relay paths give the same bytes and framing; only the write pattern differs."""
    proxy = await start_proxy({"upstream": {"response_buffer_bytes": 4096}})
    for size in (100, 4096, 4097, 300_000):
        url = proxy.proxy_url + f"/partner/v1/accounts/acc_demo_001/statement?bytes={size}"
        async with http.get(url) as resp:
            body = await resp.read()
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(size)
            assert "Transfer-Encoding" not in resp.headers
        assert body == b"".join(statement_bytes(size, "acc_demo_001"))
    async with http.head(proxy.proxy_url + "/partner/v1/accounts/acc_demo_001/statement?bytes=100") as resp:
        assert resp.status in (200, 405)
        assert await resp.read() == b""


async def test_client_going_away_cancels_the_upstream_request(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    assert await get(http, proxy.proxy_url + DECISION) == 200
    await set_faults(http, emulator, api_latency_ms=10_000)
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(proxy.proxy_url + DECISION, timeout=aiohttp.ClientTimeout(total=0.3)):
            pass
    await eventually(
        lambda: sample(proxy.runtime.metrics, "ccp_in_flight_requests") == 0, within=2.5, every=0.05
    )
    # The abandoned request is still counted (as 499 client_gone), not silently lost.
    gone = {"route": "decisions.read", "method": "GET", "code": "499"}
    assert sample(proxy.runtime.metrics, "ccp_requests_total", **gone) == 1


async def test_body_over_the_limit_is_413(start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy({"upstream": {"max_body_bytes": 1000}})
    url = proxy.proxy_url + "/partner/v1/applications/app_demo_001/documents"
    async with http.post(url, data=b"x" * 5000) as resp:
        assert resp.status == 413
        assert resp.headers["X-Credicorp-Proxy-Error"] == "body_too_large"


async def test_token_endpoint_down_is_503_with_retry_after(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    await set_faults(http, emulator, token_status=503, token_count=100)
    async with http.get(proxy.proxy_url + DECISION) as resp:
        assert resp.status == 503
        assert resp.headers["X-Credicorp-Proxy-Error"] == "token_unavailable"
        assert int(resp.headers["Retry-After"]) >= 1


async def test_cached_token_keeps_serving_while_the_token_endpoint_is_down(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy()
    assert await get(http, proxy.proxy_url + DECISION) == 200
    await set_faults(http, emulator, token_status=503, token_count=100)
    assert await get(http, proxy.proxy_url + DECISION) == 200


async def test_invalid_client_is_503_credentials_rejected(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"auth": {"client_secret": "wrong"}})
    for _ in range(2):
        async with http.get(proxy.proxy_url + DECISION) as resp:
            assert resp.status == 503
            assert resp.headers["X-Credicorp-Proxy-Error"] == "credentials_rejected"
            assert "wrong" not in await resp.text()


async def test_invalid_scope_is_500_scope_not_granted(
    make_emulator,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,  # type: ignore[no-untyped-def]
) -> None:
    from proxy.emulator.state import ClientSpec

    narrow = await make_emulator(
        clients=[ClientSpec("cc_client_narrow", ("s3cret",), frozenset({"decisions:read"}))]
    )
    proxy = await start_proxy(
        {"auth": {"client_id": "cc_client_narrow", "client_secret": "s3cret"}}, emulator_url=narrow.url
    )
    assert await get(http, proxy.proxy_url + DECISION) == 200
    async with http.get(proxy.proxy_url + "/partner/v1/accounts/acc_demo_001") as resp:
        assert resp.status == 500
        assert resp.headers["X-Credicorp-Proxy-Error"] == "scope_not_granted"


async def test_unix_socket_listener(
    start_proxy: StartProxy,
    emulator: EmulatorServer,
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    sock = str(tmp_path / "proxy.sock")
    await start_proxy({"listen": f"unix:{sock}"})
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as client:
        async with client.get("http://localhost" + DECISION) as resp:
            assert resp.status == 200


# ------------------------------------------------------------------ listeners


async def test_a_second_proxy_on_a_taken_port_fails_to_start_unless_reuse_port_is_set(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Without ``reuse_port`` a stale or duplicate instance must not silently take a share of
    the app's connections; with it (several workers), both serve, and the admin ports stay apart."""
    port = free_port()
    await start_proxy({"listen": f"127.0.0.1:{port}"})
    with pytest.raises(OSError, match="address already in use"):
        await start_proxy({"listen": f"127.0.0.1:{port}"})

    shared = free_port()
    first = await start_proxy({"listen": f"127.0.0.1:{shared}", "reuse_port": True})
    second = await start_proxy({"listen": f"127.0.0.1:{shared}", "reuse_port": True})
    assert first.proxy_url == second.proxy_url and first.admin_url != second.admin_url
    async with http.get(first.proxy_url + DECISION) as resp:
        assert resp.status == 200
