"""Large deterministic bodies: the account statement download.

``GET /partner/v1/accounts/{id}/statement?bytes=N`` streams N bytes that are
a pure function of (N, account id), generated chunk by chunk, so a test can
push gigabytes through the proxy with flat memory on both sides and still
check every byte by recomputing the digest with ``statement_bytes``.
``gzip=1`` sends the same bytes pre-compressed with ``Content-Encoding: gzip``
(and an exact ``Content-Length``) to prove the proxy passes encodings through
untouched; recompute them with ``statement_gzip_bytes``.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator

from aiohttp import web

from proxy.emulator.resources import ApiContext, ApiError

CHUNK_SIZE = 64 * 1024
DEFAULT_STATEMENT_BYTES = 4096
MAX_STATEMENT_BYTES = 64 * 1024**3
#: gzip bodies are produced twice (once to size the Content-Length), so they are capped.
MAX_GZIP_STATEMENT_BYTES = 256 * 1024**2


def statement_bytes(n: int, seed: str = "") -> Iterator[bytes]:
    """N deterministic bytes in chunks of at most CHUNK_SIZE.

    Each chunk is a fixed pseudo-random block (derived from ``seed``) whose
    first eight bytes are the chunk number, so reordered, repeated or dropped
    chunks change the digest while generation stays a cheap copy per chunk.
    """
    block = hashlib.shake_256(b"ccp-statement:" + seed.encode()).digest(CHUNK_SIZE)
    index = 0
    remaining = n
    while remaining > 0:
        chunk = index.to_bytes(8, "big") + block[8:]
        yield chunk[:remaining]
        remaining -= len(chunk)
        index += 1


def statement_gzip_bytes(n: int, seed: str = "") -> Iterator[bytes]:
    """The gzip stream (mtime 0, so reproducible) of ``statement_bytes(n, seed)``."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    for chunk in statement_bytes(n, seed):
        if out := compressor.compress(chunk):
            yield out
    yield compressor.flush()


def _requested_size(ctx: ApiContext, gzip: bool) -> int:
    raw = ctx.request.query.get("bytes", str(DEFAULT_STATEMENT_BYTES))
    limit = MAX_GZIP_STATEMENT_BYTES if gzip else MAX_STATEMENT_BYTES
    if not raw.isdigit() or int(raw) > limit:
        raise ApiError(400, "invalid_request", f"bytes must be an integer from 0 to {limit}")
    return int(raw)


async def get_statement(ctx: ApiContext) -> web.StreamResponse:
    """Stream the statement with an exact Content-Length, one chunk in memory at a time."""
    account = ctx.store.get("accounts", ctx.params["id"], "account")
    gzip = ctx.request.query.get("gzip") in ("1", "true")
    n = _requested_size(ctx, gzip)
    seed = account["id"]
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="statement-{seed}.bin"',
        }
    )
    if gzip:
        response.headers["Content-Encoding"] = "gzip"
        response.content_length = sum(len(c) for c in statement_gzip_bytes(n, seed))
        chunks = statement_gzip_bytes(n, seed)
    else:
        response.content_length = n
        chunks = statement_bytes(n, seed)
    await response.prepare(ctx.request)
    for chunk in chunks:
        await response.write(chunk)  # waits for the socket to drain: memory stays flat
    return response
