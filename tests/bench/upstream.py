"""A fast stand-in for the Credicorp API, for load tests only: it checks no token.

``python -m tests.bench.upstream PORT``

* ``GET  /anything``              -> a small JSON decision (about 200 bytes)
* ``GET  /anything?bytes=N``      -> N bytes of zeros, streamed with a Content-Length
* ``POST|PUT|PATCH /anything``    -> ``{"received": <body size>}``, the body read and dropped as it arrives

It uses aiohttp's low-level ``web.Server`` (no router, no middlewares) and
uvloop when installed, so it costs as little CPU per request as aiohttp can.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

DECISION = json.dumps(
    {
        "id": "dec_bench_0001",
        "application_id": "app_bench_0001",
        "status": "approved",
        "amount": 25000,
        "currency": "GBP",
        "term_months": 36,
        "apr": "7.9",
        "decided_at": "2024-05-01T10:00:00Z",
    }
).encode()
_ZEROS = bytes(256 * 1024)


async def _count_body(request: web.BaseRequest) -> web.Response:
    received = 0
    while chunk := await request.content.readany():
        received += len(chunk)
    return web.Response(body=json.dumps({"received": received}).encode(), content_type="application/json")


async def _generate(request: web.BaseRequest, size: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    view = memoryview(_ZEROS)
    left = size
    while left > 0:
        step = min(left, len(_ZEROS))
        await response.write(view[:step])
        left -= step
    await response.write_eof()
    return response


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    if request.method in ("POST", "PUT", "PATCH"):
        return await _count_body(request)
    if "bytes=" in request.query_string:
        return await _generate(request, int(request.query.get("bytes", "0")))
    return web.Response(body=DECISION, content_type="application/json")


async def serve(port: int) -> None:
    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"upstream listening on http://127.0.0.1:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run_loop(coro: object) -> None:
    """uvloop when installed, as ``proxy.serve.run_async`` does for the proxy."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    uvloop.run(coro)  # type: ignore[arg-type]


if __name__ == "__main__":
    run_loop(serve(int(sys.argv[1])))
