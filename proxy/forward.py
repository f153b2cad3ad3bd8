"""The request path, top to bottom.

validate target -> match route -> prepare the outbound request -> get token ->
send -> on 401 purge + retry once -> relay -> record.

This module is the spine; each step's rules live in their own module:
``proxy/paths.py`` (the target), ``proxy/routes.py`` (the match),
``proxy/outbound.py`` (headers, URL and body: kept for a retry, or streamed),
``proxy/upstream_errors.py`` (what a failed call means to the client),
``proxy/relay.py`` (the answer back) and ``proxy/exchange.py`` (the log line
and metrics). Everything the handler needs per request is prepared once when
the ``Forwarder`` is built (origin, timeouts, label children); the handler
itself does no work that could be done at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from proxy import errors
from proxy.exchange import METHODS, Exchange, Recorder, request_id
from proxy.logs import REQUEST_ID
from proxy.metrics import Metrics
from proxy.outbound import KeptBodies, OutboundPreparer, OutboundRequest
from proxy.paths import validate_target
from proxy.relay import Relay, foreign_transfer_coding
from proxy.routes import RouteTable
from proxy.scopes import KNOWN_SCOPES
from proxy.settings import RouteSpec, UpstreamSettings
from proxy.tokens.manager import TokenManager
from proxy.tokens.model import Token
from proxy.upstream_errors import map_upstream_error

log = logging.getLogger("proxy.forward")

_WWW_AUTH_ERROR = re.compile(r'error="?([A-Za-z_]+)"?')
_WWW_AUTH_SCOPE = re.compile(r'scope="([^"]*)"')


class Forwarder:
    """The proxy listener's one handler."""

    def __init__(
        self,
        upstream: UpstreamSettings,
        table: RouteTable,
        tokens: TokenManager,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        access_log_enabled: bool = True,
    ) -> None:
        self._timeout_s = upstream.timeout_s
        self._table = table
        self._tokens = tokens
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self.kept = KeptBodies(upstream.kept_body_budget_bytes, metrics)
        self._outbound = OutboundPreparer(upstream, self.kept)
        self._relay = Relay(upstream.response_buffer_bytes)
        self._recorder = Recorder(metrics, access_log_enabled=access_log_enabled)
        self._in_flight = metrics.in_flight

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The proxy listener's handler. A ``BaseRequest``: the listener is aiohttp's low-level
        ``web.Server``, which has no app or router and builds no ``web.Request``."""
        ex = Exchange(request_id(request), request.method if request.method in METHODS else "OTHER")
        self._in_flight.inc()
        # Token events logged by a mint this request starts carry its id (tasks copy the context).
        context = REQUEST_ID.set(ex.request_id)
        try:
            response = await self._proxy(request, ex)
        except errors.ProxyError as exc:
            response = self._error_response(exc, ex)
        except errors.ClientGone:
            ex.error, ex.status = "client_gone", 499
            response = web.Response(status=499)
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels the handler) or the drain grace ran out:
            # the request still gets its log line and its count, then the cancellation goes on.
            ex.error, ex.status = "client_gone", 499
            self._recorder.record(ex)
            raise
        finally:
            self._in_flight.dec()
            REQUEST_ID.reset(context)
        if request.version < HttpVersion11 and hdrs.TRANSFER_ENCODING in request.headers:
            # RFC 9112 §6.1: HTTP/1.0 with Transfer-Encoding has faulty framing; whatever
            # follows it on this connection must never be parsed as another request.
            response.force_close()
        self._recorder.record(ex)
        return response

    async def _proxy(self, request: web.BaseRequest, ex: Exchange) -> web.StreamResponse:
        target = validate_target(request.method, request.raw_path)
        _check_transfer_coding(request)
        route = self._table.match(request.method, target.segments)
        if route is None:
            raise errors.RouteNotAllowed(f"no route allows {request.method} {target.path}")
        ex.route = route.label
        self._outbound.check_declared_length(request)
        await _answer_expectation(request)
        outbound = await self._outbound.prepare(request, target, route, ex.request_id)
        try:
            started = self._clock()
            token = await self._tokens.get(route.scopes, route.audience)
            upstream = await self._send(outbound, token, ex)
            if upstream.status == 401 and _invalid_token(upstream):
                upstream = await self._retry_401(outbound, token, upstream, started, ex)
        finally:
            # No retry can follow: the kept body leaves memory and the budget before the relay.
            # (Dropping it also breaks the request <-> stream reference cycle of a streamed body.)
            outbound.body = None
            self.kept.release(outbound)
        if upstream.status == 403:
            self._note_insufficient_scope(upstream, route, ex)
        return await self._relay.relay(request, upstream, ex)

    async def _send(self, outbound: OutboundRequest, token: Token, ex: Exchange) -> aiohttp.ClientResponse:
        """One attempt, with ``token``; an upstream failure leaves as the proxy error it means."""
        outbound.headers["Authorization"] = "Bearer " + token.value
        ex.token_digest = token.digest
        started = time.perf_counter()
        try:
            async with outbound.answer_deadline(self._timeout_s):
                return await self._session.request(
                    outbound.method,
                    outbound.url,
                    headers=outbound.headers,
                    data=outbound.payload(),
                    allow_redirects=False,
                )
        except errors.ProxyError:
            raise
        except Exception as exc:
            # aiohttp wraps the BodyTooLarge a streamed body raised: the stream's note tells it apart.
            mapped = outbound.limit_passed() or map_upstream_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            ex.upstream_s += time.perf_counter() - started

    async def _retry_401(
        self,
        outbound: OutboundRequest,
        token: Token,
        first: aiohttp.ClientResponse,
        started: float,
        ex: Exchange,
    ) -> aiohttp.ClientResponse:
        """Compare-and-purge the rejected token and resend once with a new one.

        Not retried: a body too large to have been kept, and a token minted
        during this very request (a brand-new token being refused is not a
        stale-cache problem, and another mint would not fix it).
        """
        retries = self._metrics.retries_401
        if not outbound.replayable:
            retries.labels("body_not_replayable").inc()
            return first
        if token.received_since(started):
            retries.labels("fresh_token_rejected").inc()
            return first
        first.release()
        key = self._tokens.key_for(outbound.route.scopes, outbound.route.audience)
        fresh = await self._tokens.replace(key, token)
        ex.retried = True
        second = await self._send(outbound, fresh, ex)
        retries.labels("second_401" if second.status == 401 else "success").inc()
        return second

    def _note_insufficient_scope(
        self, upstream: aiohttp.ClientResponse, route: RouteSpec, ex: Exchange
    ) -> None:
        challenge = upstream.headers.get("WWW-Authenticate", "")
        if "insufficient_scope" not in challenge:
            return
        match = _WWW_AUTH_SCOPE.search(challenge)
        needed = sorted(set(match.group(1).split())) if match else []
        # The label is a scope set of the catalogue (bounded), never free text from the wire.
        label = " ".join(needed) if needed and KNOWN_SCOPES.issuperset(needed) else "unknown"
        self._metrics.insufficient_scope.labels(route.label, label).inc()
        log.warning(
            "upstream says the route's scope set is not enough; fix the route table",
            extra={
                "event": "insufficient_scope",
                "route": route.label,
                "needed_scope": label,
                "route_scopes": " ".join(route.scopes),
                "request_id": ex.request_id,
            },
        )

    def _error_response(self, exc: errors.ProxyError, ex: Exchange) -> web.Response:
        ex.status, ex.error = exc.status, exc.code
        self._metrics.proxy_errors.labels(exc.code).inc()
        return error_response(exc, ex.request_id)


def error_response(exc: errors.ProxyError, request_id: str | None = None) -> web.Response:
    """The proxy's own JSON error body, marked so apps can tell it from an upstream error."""
    response = web.json_response(
        {"error": exc.code, "error_description": exc.description},
        status=exc.status,
        headers={"X-Credicorp-Proxy-Error": exc.code, **exc.headers()},
    )
    if request_id:
        response.headers["X-Request-Id"] = request_id
    return response


def _invalid_token(upstream: aiohttp.ClientResponse) -> bool:
    """A 401 that a new token could fix: ``invalid_token``, or a bare Bearer challenge."""
    match = _WWW_AUTH_ERROR.search(upstream.headers.get("WWW-Authenticate", ""))
    return match is None or match.group(1) == "invalid_token"


async def _answer_expectation(request: web.BaseRequest) -> None:
    """``Expect: 100-continue`` gets its interim answer once the request passed our own checks.

    aiohttp's low-level server never sends it, so a client that waits for it
    (curl waits 1 s before sending any body over 1 KiB; some clients wait for
    ever) would stall. It is sent only after the path, route and declared
    length were accepted, so a refused upload is refused before its body is
    sent (RFC 9110 §10.1.1). The header itself is never forwarded.
    """
    expect = request.headers.get(hdrs.EXPECT)
    if expect is None:
        return
    if expect.strip().lower() != "100-continue":
        raise errors.ExpectationFailed("only 'Expect: 100-continue' is supported")
    if request.version >= HttpVersion11 and request.body_exists:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not part of the response


def _check_transfer_coding(request: web.BaseRequest) -> None:
    """Only ``chunked`` framing is understood; any other transfer coding is refused, not dropped.

    aiohttp's parser de-chunks ``gzip, chunked`` and would silently lose the gzip
    coding, handing the API bytes it cannot know are compressed (RFC 9112 §6.1).
    """
    if foreign_transfer_coding(request.headers):
        raise errors.BadRequest("Transfer-Encoding other than a single 'chunked' is not supported")
