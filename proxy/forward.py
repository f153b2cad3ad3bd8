"""The request path, top to bottom.

validate target -> match route -> get token -> build upstream request ->
stream -> on 401 purge + retry once -> map errors.

Everything the handler needs per request is prepared once in ``Forwarder``'s
constructor (origin, timeouts, label children); the handler itself does no
work that could be done at start-up.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import connections, errors
from proxy.headers import downstream_response_headers, header_names, upstream_request_headers
from proxy.logs import REQUEST_ID, write_request_line
from proxy.metrics import Metrics
from proxy.paths import SafeTarget, validate_target
from proxy.routes import RouteTable
from proxy.scopes import KNOWN_SCOPES
from proxy.settings import RouteSpec, UpstreamSettings
from proxy.tokens.manager import TokenManager
from proxy.tokens.model import Token

log = logging.getLogger("proxy.forward")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_WWW_AUTH_ERROR = re.compile(r'error="?([A-Za-z_]+)"?')
_WWW_AUTH_SCOPE = re.compile(r'scope="([^"]*)"')
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CHUNK = 256 * 1024
_ONE_WRITE_BYTES = 1024 * 1024  # aiohttp's TOO_LARGE_BYTES_BODY: larger kept bodies go as a BytesIO
NO_ROUTE = "(none)"


class ClientGone(Exception):
    """The client's connection broke while we were streaming to it."""


@dataclass(slots=True)
class Exchange:
    """What one request did, for the access log and metrics."""

    request_id: str
    method: str
    route: str = NO_ROUTE
    status: int = 0
    upstream_status: int | None = None
    upstream_s: float = 0.0
    retried: bool = False
    error: str | None = None
    token_digest: str | None = None
    body_over_limit: bool = False  # the streamed request body passed max_body_bytes mid-upload
    kept_bytes: int = 0  # this request's share of the kept-body budget (see KeptBodies)
    answer_deadline: asyncio.Timeout | None = None  # armed once the request is sent (see _send)
    started: float = field(default_factory=time.perf_counter)


class KeptBodies:
    """The budget of request bodies kept whole in memory for a 401 retry, across all requests.

    ``retry_body_limit`` bounds one body; without a total, 150 concurrent 1 MiB
    uploads to a slow API hold 150 MiB (230 MiB of RSS measured). A body that
    does not fit in what is left streams instead, with flat memory, and is not
    retried on a 401 (``ccp_upstream_401_retries_total{outcome="body_not_replayable"}``).
    A request's share is returned when its retry can no longer happen, and at the
    latest when the request ends, whichever way it ends. One event loop, so no lock.
    """

    def __init__(self, budget: int, metrics: Metrics) -> None:
        self.budget = budget
        self.held = 0
        self._gauge = metrics.kept_body_bytes
        self._exhausted = metrics.kept_body_budget_exhausted

    def reserve(self, ex: Exchange, size: int, *, keepable: bool = True) -> bool:
        """Take ``size`` bytes for ``ex``; False when they do not fit.

        A refusal is counted when it costs a body its retry (``keepable``: it was small enough
        to be kept) and keeping is on at all (a budget of 0 is a choice, not an exhaustion).
        """
        if self.held + size > self.budget:
            if self.budget and keepable:
                self._exhausted.inc()
            return False
        if size:
            self.held += size
            ex.kept_bytes += size
            self._gauge.set(self.held)
        return True

    def release(self, ex: Exchange) -> None:
        """Give back ``ex``'s share; idempotent, so every exit path may call it."""
        if ex.kept_bytes:
            self.held -= ex.kept_bytes
            ex.kept_bytes = 0
            self._gauge.set(self.held)


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
        self._settings = upstream
        self._origin = upstream.url.rstrip("/")
        self._table = table
        self._tokens = tokens
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self._access_log = access_log_enabled
        self._strip = header_names(upstream.strip_headers)
        self.kept = KeptBodies(upstream.kept_body_budget_bytes, metrics)
        self._in_flight = metrics.in_flight
        # Metric children by label values, so the hot path skips prometheus-client's labels() lookup.
        self._request_counters: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[str, Any] = {}

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The proxy listener's handler. A ``BaseRequest``: the listener is aiohttp's low-level
        ``web.Server``, which has no app or router and builds no ``web.Request``."""
        ex = Exchange(_request_id(request), request.method if request.method in _METHODS else "OTHER")
        self._in_flight.inc()
        # Token events logged by a mint this request starts carry its id (tasks copy the context).
        context = REQUEST_ID.set(ex.request_id)
        try:
            response = await self._proxy(request, ex)
        except errors.ProxyError as exc:
            response = self._error_response(exc, ex)
        except ClientGone:
            ex.error, ex.status = "client_gone", 499
            response = web.Response(status=499)
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels the handler) or the drain grace ran out:
            # the request still gets its log line and its count, then the cancellation goes on.
            ex.error, ex.status = "client_gone", 499
            self._record(ex)
            raise
        finally:
            self.kept.release(ex)
            self._in_flight.dec()
            REQUEST_ID.reset(context)
        if request.version < HttpVersion11 and hdrs.TRANSFER_ENCODING in request.headers:
            # RFC 9112 §6.1: HTTP/1.0 with Transfer-Encoding has faulty framing; whatever
            # follows it on this connection must never be parsed as another request.
            response.force_close()
        self._record(ex)
        return response

    async def _proxy(self, request: web.BaseRequest, ex: Exchange) -> web.StreamResponse:
        target = validate_target(request.method, request.raw_path)
        _check_transfer_coding(request)
        route = self._table.match(request.method, target.segments)
        if route is None:
            raise errors.RouteNotAllowed(f"no route allows {request.method} {target.path}")
        ex.route = route.label
        self._check_declared_length(request)
        await _answer_expectation(request)
        headers = upstream_request_headers(
            request.headers, replace_forwarded=self._settings.forwarded_headers, strip=self._strip
        )
        self._add_forwarding_headers(request, headers, ex)
        body, replayable = await self._request_body(request, headers, ex)
        started = self._clock()
        token = await self._tokens.get(route.scopes, route.audience)
        upstream = await self._send(request, target, headers, body, token, ex)
        if upstream.status == 401 and _invalid_token(upstream):
            upstream = await self._retry_401(
                request, route, target, headers, body, token, upstream, replayable, started, ex
            )
        body = None  # no retry can follow: the kept body goes back to the budget before the relay
        self.kept.release(ex)
        if upstream.status == 403:
            self._note_insufficient_scope(upstream, route, ex)
        return await self._relay(request, upstream, ex)

    # ------------------------------------------------------------ request side
    def _check_declared_length(self, request: web.BaseRequest) -> None:
        limit = self._settings.max_body_bytes
        if limit is not None and (request.content_length or 0) > limit:
            raise self._too_large()

    def _too_large(self) -> errors.BodyTooLarge:
        return errors.BodyTooLarge(f"request body over the {self._settings.max_body_bytes}-byte limit")

    def _add_forwarding_headers(
        self, request: web.BaseRequest, headers: CIMultiDict[str], ex: Exchange
    ) -> None:
        headers["X-Request-Id"] = ex.request_id
        if self._settings.forwarded_headers:
            headers["X-Forwarded-For"] = request.remote or "unknown"
            headers["X-Forwarded-Proto"] = request.scheme

    async def _request_body(
        self, request: web.BaseRequest, headers: CIMultiDict[str], ex: Exchange
    ) -> tuple[bytes | AsyncIterator[bytes] | None, bool]:
        """The body to send, and whether it is kept whole so a 401 retry can resend it.

        Bodies up to ``retry_body_limit`` are read into memory while the kept-body
        budget has room for them; larger ones, chunked ones that grow past the
        limit, and any the budget cannot take are streamed with flat memory. A
        body streamed only because the budget was spent goes upstream with its
        ``Content-Length`` (aiohttp's parser has held the client to it), the
        framing it would have had if kept; larger bodies stream chunked, as always.
        """
        if not request.body_exists:
            return None, True
        keep = self._settings.retry_body_limit
        length = request.content_length
        if length is not None and length <= keep:
            if self.kept.reserve(ex, length):
                return await self._read_all(request, length), True
            headers[hdrs.CONTENT_LENGTH] = str(length)
            return self._stream_rest(request, b"", ex), False
        limit = self._settings.max_body_bytes
        head = bytearray()
        while len(head) <= keep:
            chunk = await request.content.readany()
            if not chunk:
                return bytes(head), True
            head += chunk
            if limit is not None and len(head) > limit:  # a chunked body has no declared length
                raise self._too_large()
            # The head is held in memory too (until the API takes it), so it draws on the budget;
            # a body that declared more than ``keep`` streams whatever happens (not keepable).
            if not self.kept.reserve(ex, len(chunk), keepable=length is None):
                break
        return self._stream_rest(request, bytes(head), ex), False

    async def _read_all(self, request: web.BaseRequest, length: int) -> bytes:
        """Exactly the declared body, from the stream.

        Not ``request.read()``: that enforces aiohttp's own 1 MiB
        ``client_max_size`` with a plain-text 413, whatever ``retry_body_limit``
        and ``max_body_bytes`` say.
        """
        try:
            return await request.content.readexactly(length)
        except (asyncio.IncompleteReadError, aiohttp.ClientConnectionError, ConnectionResetError) as exc:
            raise ClientGone() from exc

    async def _stream_rest(self, request: web.BaseRequest, head: bytes, ex: Exchange) -> AsyncIterator[bytes]:
        """``head`` (what was read while trying to keep the body), then the rest chunk by chunk,
        within ``max_body_bytes``.

        Passing the limit is noted on ``ex`` before raising: aiohttp's client
        wraps whatever the body iterator raises in a connection error, and
        ``_send`` turns that note back into ``413 body_too_large``. The budget
        share the head took is returned once the head is handed on.
        """
        limit = self._settings.max_body_bytes
        sent = len(head)
        if head:
            yield head
            del head
        self.kept.release(ex)
        while chunk := await request.content.readany():
            sent += len(chunk)
            if limit is not None and sent > limit:
                ex.body_over_limit = True
                raise self._too_large()
            yield chunk
        self._arm_answer_deadline(ex)  # the whole upload is sent: the API's time to answer starts now

    async def _send(
        self,
        request: web.BaseRequest,
        target: SafeTarget,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
        token: Token,
        ex: Exchange,
    ) -> aiohttp.ClientResponse:
        headers["Authorization"] = "Bearer " + token.value
        ex.token_digest = token.digest
        url = URL(self._origin + target.path + ("?" + target.query if target.query else ""), encoded=True)
        if isinstance(body, bytes) and len(body) > _ONE_WRITE_BYTES:
            # aiohttp writes a bytes body in one go and warns past 1 MiB; a fresh BytesIO (its
            # payload is closed after sending) keeps the Content-Length and is written in chunks.
            data: bytes | io.BytesIO | AsyncIterator[bytes] | None = io.BytesIO(body)
        else:
            data = body
        started = time.perf_counter()
        try:
            async with asyncio.timeout(None) as ex.answer_deadline:
                if body is None or isinstance(body, bytes):  # kept whole; a stream arms it when sent
                    self._arm_answer_deadline(ex)
                return await self._session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                )
        except errors.ProxyError:
            raise
        except Exception as exc:
            mapped = self._upstream_error(exc, ex)
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            ex.upstream_s += time.perf_counter() - started
            ex.answer_deadline = None

    def _arm_answer_deadline(self, ex: Exchange) -> None:
        """``timeout_s`` bounds connect + send + the API's wait for the response head.

        A streamed upload arms it only once its last byte is sent, so a slow
        client's large upload is not cut; the response body is bounded by
        ``read_timeout_s`` (silence) alone, so a long download is not cut either.
        """
        if ex.answer_deadline is not None:
            ex.answer_deadline.reschedule(asyncio.get_running_loop().time() + self._settings.timeout_s)

    def _upstream_error(self, exc: Exception, ex: Exchange) -> Exception:
        """What a failed upstream call means to the client; anything unexpected is returned as is."""
        if ex.body_over_limit:  # aiohttp wrapped the BodyTooLarge that our body iterator raised
            return self._too_large()
        if isinstance(exc.__cause__, errors.ProxyError):  # the listener failed the client's body stream
            return type(exc.__cause__)(exc.__cause__.description)
        if isinstance(exc, aiohttp.ConnectionTimeoutError):  # never connected: unreachable, not slow
            return errors.UpstreamUnreachable("cannot reach the Credicorp API (connect timed out)")
        if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
            return errors.UpstreamTimeout("the Credicorp API did not answer in time")
        if isinstance(exc, aiohttp.ClientPayloadError):  # reading the client's body failed
            return ClientGone()
        if isinstance(exc, aiohttp.ClientError | OSError):
            return errors.UpstreamUnreachable(f"cannot reach the Credicorp API ({type(exc).__name__})")
        return exc

    async def _retry_401(
        self,
        request: web.BaseRequest,
        route: RouteSpec,
        target: SafeTarget,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
        token: Token,
        first: aiohttp.ClientResponse,
        replayable: bool,
        started: float,
        ex: Exchange,
    ) -> aiohttp.ClientResponse:
        """Compare-and-purge the rejected token and resend once with a new one.

        Not retried: a body too large to have been kept, and a token minted
        during this very request (a brand-new token being refused is not a
        stale-cache problem, and another mint would not fix it).
        """
        retries = self._metrics.retries_401
        if not replayable:
            retries.labels("body_not_replayable").inc()
            return first
        if token.received_since(started):
            retries.labels("fresh_token_rejected").inc()
            return first
        first.release()
        key = self._tokens.key_for(route.scopes, route.audience)
        fresh = await self._tokens.replace(key, token)
        ex.retried = True
        second = await self._send(request, target, headers, body, fresh, ex)
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

    # ----------------------------------------------------------- response side
    async def _relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, ex: Exchange
    ) -> web.StreamResponse:
        """Relay the API's answer byte for byte; reset the client on a broken upstream body.

        A small answer of known length (most API calls) is read whole and sent
        in one write, headers and body together: one syscall and no chunk loop.
        Anything else streams with flat memory.
        """
        if _foreign_transfer_coding(upstream):
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
            self._upstream_broke(request, ex, exc)
        finally:
            upstream.close() if ex.error else upstream.release()
        return response

    def _can_buffer(self, request: web.BaseRequest, upstream: aiohttp.ClientResponse) -> bool:
        """Known, small length, and a body that really follows (not HEAD, 204 or 304)."""
        length = upstream.content_length
        return (
            length is not None
            and length <= self._settings.response_buffer_bytes
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
            self._upstream_broke(request, ex, exc)
            return web.Response(status=upstream.status)  # never written: the connection is gone
        except BaseException:  # cancelled (the client left): a half-read connection is not reused
            upstream.close()
            raise
        upstream.release()
        # Content-Length comes from the body that was read, which is the length the API declared.
        return web.Response(body=body, status=upstream.status, reason=upstream.reason, headers=headers)

    def _upstream_broke(self, request: web.BaseRequest, ex: Exchange, exc: BaseException) -> None:
        ex.error = "upstream_broke_mid_body"
        log.warning(
            "upstream broke mid-response; resetting the client connection",
            extra={"event": "upstream_mid_body", "request_id": ex.request_id, "error": type(exc).__name__},
        )
        connections.reset(request.transport)

    def _error_response(self, exc: errors.ProxyError, ex: Exchange) -> web.Response:
        ex.status, ex.error = exc.status, exc.code
        self._metrics.proxy_errors.labels(exc.code).inc()
        return error_response(exc, ex.request_id)

    # ------------------------------------------------------------- accounting
    def _record(self, ex: Exchange) -> None:
        counter = self._request_counters.get((ex.route, ex.method, ex.status))
        if counter is None:  # label values come from the config and status codes: a bounded set
            counter = self._metrics.requests.labels(ex.route, ex.method, str(ex.status))
            self._request_counters[(ex.route, ex.method, ex.status)] = counter
        counter.inc()
        if ex.upstream_status is not None:
            histogram = self._durations.get(ex.route)
            if histogram is None:
                histogram = self._durations[ex.route] = self._metrics.request_duration.labels(ex.route)
            histogram.observe(ex.upstream_s)
        if self._access_log:
            write_request_line(
                {
                    "event": "request",
                    "request_id": ex.request_id,
                    "method": ex.method,
                    "route": ex.route,
                    "status": ex.status,
                    "upstream_status": ex.upstream_status,
                    "duration_ms": round((time.perf_counter() - ex.started) * 1000, 2),
                    "upstream_ms": round(ex.upstream_s * 1000, 2),
                    "retried": ex.retried,
                    "proxy_error": ex.error,
                    "token_digest": ex.token_digest,
                }
            )


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


class _RequestIds:
    """Unique request ids without a syscall per request: a random per-process prefix plus a counter.

    Ids must be unique (to join log lines across services), not unpredictable,
    so ``uuid4`` (an ``os.urandom`` call and an object per request) is not needed.
    The prefix is redrawn in a forked child so two workers never share it.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_IDS = _RequestIds()


def _request_id(request: web.BaseRequest) -> str:
    supplied = request.headers.get("X-Request-Id")
    return supplied if supplied and _REQUEST_ID.fullmatch(supplied) else _IDS.next()


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


def _transfer_codings(headers: CIMultiDictProxy[str]) -> list[str]:
    """Every coding of every ``Transfer-Encoding`` header, in order, lower-cased."""
    values = headers.getall(hdrs.TRANSFER_ENCODING, ())
    return [coding.strip().lower() for value in values for coding in value.split(",")]


def _foreign_transfer_coding(upstream: aiohttp.ClientResponse) -> bool:
    """True when the API framed its answer with more than ``chunked`` (e.g. ``gzip, chunked``).

    aiohttp's client de-chunks it and leaves the gzip coding on the bytes;
    relayed, the client would get compressed bytes with no ``Content-Encoding``
    to say so. The mirror of ``_check_transfer_coding`` on the request side.
    """
    codings = _transfer_codings(upstream.headers)
    return bool(codings) and codings != ["chunked"]


def _check_transfer_coding(request: web.BaseRequest) -> None:
    """Only ``chunked`` framing is understood; any other transfer coding is refused, not dropped.

    aiohttp's parser de-chunks ``gzip, chunked`` and would silently lose the gzip
    coding, handing the API bytes it cannot know are compressed (RFC 9112 §6.1).
    """
    codings = _transfer_codings(request.headers)
    if codings and codings != ["chunked"]:
        raise errors.BadRequest("Transfer-Encoding other than a single 'chunked' is not supported")
