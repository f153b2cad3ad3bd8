"""Byte-exact request logging and streamed bodies (uploads and statement downloads)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.emulator.api import statement_bytes, statement_gzip_bytes
from proxy.emulator.app import EmulatorServer
from proxy.emulator.streams import CHUNK_SIZE
from proxy.emulator.testing import EmulatorClient

DOCS = "/partner/v1/applications/app_demo_001/documents"
STATEMENT = "/partner/v1/accounts/acc_demo_001/statement"
MIB = 1024 * 1024


def _rss() -> int:
    """Resident set size now (bytes), from /proc: catches a body materialised in memory."""
    pages = Path("/proc/self/statm").read_text().split()[1]
    return int(pages) * os.sysconf("SC_PAGE_SIZE")


async def _pattern(total: int, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
    for offset in range(0, total, chunk):
        yield bytes((offset // chunk + i) % 251 for i in range(256)) * (min(chunk, total - offset) // 256)


def _pattern_sha256(total: int, chunk: int = 256 * 1024) -> str:
    digest = hashlib.sha256()
    for offset in range(0, total, chunk):
        digest.update(
            bytes((offset // chunk + i) % 251 for i in range(256)) * (min(chunk, total - offset) // 256)
        )
    return digest.hexdigest()


def test_statement_bytes_are_deterministic_and_sized():
    for n in (0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, 3 * CHUNK_SIZE + 17):
        chunks = list(statement_bytes(n, "acc_1"))
        assert sum(map(len, chunks)) == n and all(len(c) <= CHUNK_SIZE for c in chunks)
        assert b"".join(chunks) == b"".join(statement_bytes(n, "acc_1"))
    two = b"".join(statement_bytes(2 * CHUNK_SIZE, "acc_1"))
    assert two[:CHUNK_SIZE] != two[CHUNK_SIZE:]  # a repeated chunk would change the digest
    assert two != b"".join(statement_bytes(2 * CHUNK_SIZE, "acc_2"))
    assert gzip.decompress(b"".join(statement_gzip_bytes(100_000, "s"))) == b"".join(
        statement_bytes(100_000, "s")
    )


async def test_multi_mb_chunked_upload_is_hashed_byte_exact(emu_client: EmulatorClient):
    size = 8 * MIB + 256
    token = await emu_client.mint("applications:write")
    status, _, doc = await emu_client.api(
        "POST", DOCS + "?kind=bank%20statement&x=1&x=2", token,
        data=_pattern(size), headers={"Content-Type": "application/pdf", "X-Trace": "a, b"},
    )  # fmt: skip
    expected = _pattern_sha256(size)
    assert status == 201 and (doc["size"], doc["sha256"]) == (size, expected)
    [entry] = await emu_client.requests()
    assert (entry["method"], entry["raw_path"], entry["route"]) == (
        "POST",
        DOCS,
        "/partner/v1/applications/{id}/documents",
    )
    assert entry["query_string"] == "kind=bank%20statement&x=1&x=2"
    assert (entry["body_sha256"], entry["body_size"], entry["body_complete"]) == (expected, size, True)
    assert entry["headers"]["transfer-encoding"] == ["chunked"]
    assert entry["headers"]["content-type"] == ["application/pdf"] and entry["headers"]["x-trace"] == ["a, b"]
    assert "authorization" not in entry["headers"] and token not in str(entry)
    assert entry["auth"] == {
        "present": True, "count": 1, "scheme": "Bearer", "valid": True, "client_id": "cc_client_demo",
        "scope": "applications:write", "jti": entry["auth"]["jti"], "error": None,
    }  # fmt: skip
    assert entry["status"] == 201


async def test_rejected_requests_are_logged_with_their_body(emu_client: EmulatorClient):
    body = b'{"amount": 1}'
    status, _, _ = await emu_client.api(
        "POST", "/partner/v1/payments/links", data=body,
        headers=[("Proxy-Authorization", "Basic c2VjcmV0"), ("X-Dup", "1"), ("X-Dup", "2")],
    )  # fmt: skip
    assert status == 401
    [entry] = await emu_client.requests()
    assert entry["status"] == 401 and entry["auth"]["present"] is False and entry["auth"]["valid"] is False
    assert entry["body_sha256"] == hashlib.sha256(body).hexdigest() and entry["body_size"] == len(body)
    assert entry["headers"]["proxy-authorization"] == ["[redacted]"]
    assert entry["headers"]["x-dup"] == ["1", "2"]
    stats = await emu_client.stats()
    assert (stats["api_requests"], stats["api_by_status"]) == (1, {"401": 1})


async def test_revoked_token_is_attributed_in_the_log(emu_client: EmulatorClient):
    token = await emu_client.mint("decisions:read")
    await emu_client.control("POST", "/revoke-all")
    await emu_client.api("GET", "/partner/v1/decisions/dec_demo_001", token)
    auth = (await emu_client.requests())[-1]["auth"]
    assert (auth["valid"], auth["client_id"], auth["error"]) == (
        False,
        "cc_client_demo",
        "The access token has been revoked",
    )


async def test_oversized_json_body_is_413_but_fully_hashed(emu_client: EmulatorClient):
    token = await emu_client.mint("payments:write")
    body = b"[" + b"0," * (MIB // 2) + b"0]"
    status, _, answer = await emu_client.api(
        "POST", "/partner/v1/payments/links", token, data=io.BytesIO(body)
    )
    assert (status, answer["error"]) == (413, "payload_too_large")
    assert (await emu_client.requests())[-1]["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_statement_streams_the_expected_bytes(emulator: EmulatorServer, emu_client: EmulatorClient):
    token = await emu_client.mint("accounts:read")
    n = 3 * MIB + 12345
    headers = {"Authorization": f"Bearer {token}"}
    async with emu_client.session.get(f"{emulator.url}{STATEMENT}?bytes={n}", headers=headers) as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == str(n)
        assert resp.headers["Content-Type"] == "application/octet-stream"
        digest = hashlib.sha256()
        async for chunk in resp.content.iter_chunked(MIB):
            digest.update(chunk)
    expected = hashlib.sha256()
    for chunk in statement_bytes(n, "acc_demo_001"):
        expected.update(chunk)
    assert digest.hexdigest() == expected.hexdigest()
    status, _, body = await emu_client.api("GET", STATEMENT, token)
    assert status == 200 and body == b"".join(statement_bytes(4096, "acc_demo_001"))


async def test_gzip_statement_is_sent_pre_encoded(emulator: EmulatorServer, emu_client: EmulatorClient):
    token = await emu_client.mint("accounts:read")
    expected = b"".join(statement_gzip_bytes(MIB, "acc_demo_001"))
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        url = f"{emulator.url}{STATEMENT}?bytes={MIB}&gzip=1"
        async with raw.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.headers["Content-Length"] == str(len(expected))
            assert await resp.read() == expected
    assert gzip.decompress(expected) == b"".join(statement_bytes(MIB, "acc_demo_001"))


@pytest.mark.parametrize(
    "query", ["bytes=-1", "bytes=abc", f"bytes={64 * 1024**3 + 1}", f"bytes={300 * MIB}&gzip=1"]
)
async def test_statement_rejects_bad_sizes(emu_client: EmulatorClient, query):
    token = await emu_client.mint("accounts:read")
    status, _, body = await emu_client.api("GET", f"{STATEMENT}?{query}", token)
    assert (status, body["error"]) == (400, "invalid_request")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to sample memory")
async def test_large_download_keeps_memory_flat(emulator: EmulatorServer, emu_client: EmulatorClient):
    """256 MiB through a real socket while sampling RSS: both ends hold one chunk at a time."""
    token = await emu_client.mint("accounts:read")
    n, baseline, peak, received = 256 * MIB, _rss(), 0, 0
    headers = {"Authorization": f"Bearer {token}"}
    async with emu_client.session.get(f"{emulator.url}{STATEMENT}?bytes={n}", headers=headers) as resp:
        async for chunk in resp.content.iter_chunked(MIB):
            received += len(chunk)
            peak = max(peak, _rss() - baseline)
    assert received == n
    assert peak < 48 * MIB, f"memory grew by {peak // MIB} MiB while streaming {n // MIB} MiB"
