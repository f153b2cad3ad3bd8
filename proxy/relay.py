"""The response side: the API's answer back to the client, byte for byte.

A small answer of known length (most API calls) is read whole and sent in one
write, headers and body together: one syscall and no chunk loop. Anything
else streams with flat memory. An upstream body that breaks mid-way resets the
client connection (see ``proxy/connections.py``), so a cut body can never
look complete.
"""

from __future__ import annotations

import logging
from typing import Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import connections, errors
from proxy.exchange import Exchange
from proxy.headers import downstream_response_headers

# The forwarder's logger: the relay's events keep the logger name operators already filter on.
log = logging.getLogger("proxy.forward")

_CHUNK: Final = 256 * 1024


class Relay:
    """Relays one upstream response per call; holds only the configured buffer size."""

    def __init__(self, response_buffer_bytes: int) -> None:
        self._buffer_bytes = response_buffer_bytes

    async def relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, ex: Exchange
    ) -> web.StreamResponse:
        """Relay the API's answer byte for byte; reset the client on a broken upstream body."""
        if foreign_transfer_coding(upstream.headers):
            upstream.close()
            raise errors.UpstreamUnreachable("the Credicorp API used a transfer coding other than chunked")
        ex.status = ex.upstream_status = upstream.status
        headers = downstream_response_headers(upstream.headers)
        headers["X-Request-Id"] = ex.request_id
        if self._can_buffer(request, upstream):
            return await self._relay_whole(request, upstream, headers, ex)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(_CHUNK):
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:  # the client went away (aiohttp's ClientConnectionResetError too)
            ex.error = "client_gone"
        except (TimeoutError, aiohttp.ClientError) as exc:
            _upstream_broke(request, ex, exc)
        finally:
            upstream.close() if ex.error else upstream.release()
        return response

    def _can_buffer(self, request: web.BaseRequest, upstream: aiohttp.ClientResponse) -> bool:
        """Known, small length, and a body that really follows (not HEAD, 204 or 304)."""
        length = upstream.content_length
        return (
            length is not None
            and length <= self._buffer_bytes
            and request.method != "HEAD"
            and upstream.status not in (204, 304)
        )

    async def _relay_whole(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        ex: Exchange,
    ) -> web.StreamResponse:
        try:
            body = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            upstream.close()
            _upstream_broke(request, ex, exc)
            return web.Response(status=upstream.status)  # never written: the connection is gone
        except BaseException:  # cancelled (the client left): a half-read connection is not reused
            upstream.close()
            raise
        upstream.release()
        # Content-Length comes from the body that was read, which is the length the API declared.
        return web.Response(body=body, status=upstream.status, reason=upstream.reason, headers=headers)


def _upstream_broke(request: web.BaseRequest, ex: Exchange, exc: BaseException) -> None:
    ex.error = "upstream_broke_mid_body"
    log.warning(
        "upstream broke mid-response; resetting the client connection",
        extra={"event": "upstream_mid_body", "request_id": ex.request_id, "error": type(exc).__name__},
    )
    connections.reset(request.transport)


def foreign_transfer_coding(headers: CIMultiDictProxy[str]) -> bool:
    """True when a message is framed with more than ``chunked`` (e.g. ``gzip, chunked``).

    aiohttp's parsers, client and server alike, de-chunk it and leave the gzip
    coding on the bytes: passed on, the receiver would get compressed bytes
    with nothing to say so (RFC 9112 §6.1). So an answer coded so is refused
    here, and a request coded so is refused before it is forwarded (the
    request side's ``_check_transfer_coding`` in ``proxy/forward.py``).
    """
    values = headers.getall(hdrs.TRANSFER_ENCODING, ())
    codings = [coding.strip().lower() for value in values for coding in value.split(",")]
    return bool(codings) and codings != ["chunked"]
