"""What the partner/v1 API received, as ``GET /_emulator/requests`` reports it.

Proxy tests assert byte-exact forwarding against this log: the raw request
target (never normalised), the raw query string, every header value as sent
(except credentials) and the SHA-256 of the body, computed while streaming so
a multi-gigabyte upload is never held in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from typing import Any

from aiohttp import web

from proxy.emulator.resources import ApiError

READ_CHUNK = 64 * 1024
#: JSON bodies are kept for the handler up to this size; larger ones are only hashed.
JSON_BODY_LIMIT = 1024 * 1024
REDACTED = "[redacted]"
_ids = itertools.count(1)


def split_target(request: web.BaseRequest) -> tuple[str, str]:
    """(raw path, raw query) exactly as on the request line."""
    path, _, query = request.raw_path.partition("?")
    return path, query


def header_map(request: web.BaseRequest) -> dict[str, list[str]]:
    """Lower-case name -> every value in arrival order; Authorization left out, Proxy-Authorization masked."""
    headers: dict[str, list[str]] = {}
    for raw_name, raw_value in request.raw_headers:
        name = raw_name.decode("latin-1").lower()
        if name == "authorization":
            continue
        value = REDACTED if name == "proxy-authorization" else raw_value.decode("latin-1")
        headers.setdefault(name, []).append(value)
    return headers


def new_entry(request: web.BaseRequest) -> dict[str, Any]:
    path, query = split_target(request)
    return {
        "id": next(_ids),
        "time": time.time(),
        "method": request.method,
        "raw_path": path,
        "query_string": query,
        "headers": header_map(request),
        "auth": None,
        "route": None,
        "body_sha256": None,
        "body_size": 0,
        "body_complete": False,
        "status": None,
    }


async def consume_body(request: web.BaseRequest, entry: dict[str, Any], retain: bool) -> bytes | None:
    """Read the whole body in chunks, hashing it into ``entry``; keep it only if ``retain``.

    A retained body over JSON_BODY_LIMIT is still read to the end (so the hash
    is complete and the connection stays usable) and then refused with 413.
    """
    digest = hashlib.sha256()
    kept: bytearray | None = bytearray() if retain else None
    size = 0
    async for chunk in request.content.iter_chunked(READ_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if kept is not None and size <= JSON_BODY_LIMIT:
            kept += chunk
        entry["body_size"] = size
    entry.update(body_sha256=digest.hexdigest(), body_size=size, body_complete=True)
    if retain and size > JSON_BODY_LIMIT:
        raise ApiError(413, "payload_too_large", f"JSON bodies are limited to {JSON_BODY_LIMIT} bytes")
    return bytes(kept) if kept is not None else None
