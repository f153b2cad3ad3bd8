"""The baseline: the pass-through a user would write by hand in aiohttp, with a fixed token.

``python -m tests.bench.passthrough PORT UPSTREAM_URL TOKEN``

One ``ClientSession``, hop-by-hop headers dropped, ``Authorization`` replaced,
the request body and the response streamed. Like the proxy it uses the
low-level ``web.Server`` and uvloop when installed, so the comparison isolates
what the proxy's features cost. It has none of them: no path checks, no route
table, no token life cycle, no metrics, no logging, no 401 retry.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web
from yarl import URL

from tests.bench.upstream import run_loop

HOP = {
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "authorization",
    "proxy-authorization",
    "proxy-connection",
}


async def serve(port: int, upstream: str, token: str) -> None:
    session = aiohttp.ClientSession(auto_decompress=False)
    bearer = "Bearer " + token

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers["Authorization"] = bearer
        body = request.content if request.body_exists else None
        url = URL(upstream + request.raw_path, encoded=True)
        async with session.request(request.method, url, headers=headers, data=body) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            response = web.StreamResponse(status=up.status, reason=up.reason, headers=out)
            response.content_length = up.content_length
            await response.prepare(request)
            async for chunk in up.content.iter_chunked(256 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response

    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"pass-through listening on http://127.0.0.1:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await session.close()


if __name__ == "__main__":
    run_loop(serve(int(sys.argv[1]), sys.argv[2].rstrip("/"), sys.argv[3]))
