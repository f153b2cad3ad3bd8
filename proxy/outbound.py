"""The request as it goes to the Credicorp API: prepared once, then passed whole.

``OutboundPreparer.prepare`` turns a checked client request (safe target,
matched route) into one ``OutboundRequest``: method, URL, the headers that may
cross (see ``proxy/headers.py``), the route whose token it needs, and its body
in one of two forms. A body small enough is kept whole in memory, so a 401
retry can resend it; any other body is a ``StreamedBody`` that passes the
client's bytes on as they arrive, with flat memory, and is sent once. The
sender and the 401 retry take that one object instead of its loose parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from typing import Final

import aiohttp
from aiohttp import hdrs, web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict
from yarl import URL

from proxy import errors
from proxy.headers import header_names, request_drop, upstream_request_headers
from proxy.metrics import Metrics
from proxy.paths import SafeTarget
from proxy.settings import RouteSpec, UpstreamSettings

_ONE_WRITE_BYTES: Final = 1024 * 1024  # aiohttp's TOO_LARGE_BYTES_BODY: larger kept bodies go as a BytesIO


def _too_large(limit: int | None) -> errors.BodyTooLarge:
    return errors.BodyTooLarge(f"request body over the {limit}-byte limit")


class StreamedBody:
    """The client's body as it arrives, passed on within ``max_body_bytes``; sent once, never replayed.

    It owns the two things only the stream knows. Passing the limit mid-upload
    is noted (``over_limit``) before raising: aiohttp's client wraps whatever a
    body iterator raises in a connection error, and the sender turns the note
    back into ``413 body_too_large``. And the upload's end: the API's time to
    answer (``timeout_s``) starts when the last byte is sent, so a slow
    client's large upload is not cut.
    """

    __slots__ = ("_content", "_deadline", "_head", "_head_sent", "_timeout_s", "limit", "over_limit")

    def __init__(
        self, content: StreamReader, head: bytes, limit: int | None, head_sent: Callable[[], None]
    ) -> None:
        self._content = content
        self._head = head  # what was read while trying to keep the body
        self._head_sent = head_sent  # hands the head's share of the kept-body budget back
        self.limit = limit
        self._deadline: asyncio.Timeout | None = None
        self._timeout_s = 0.0
        self.over_limit = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        limit = self.limit
        sent = len(self._head)
        if self._head:
            yield self._head
            self._head = b""
        self._head_sent()
        while chunk := await self._content.readany():
            sent += len(chunk)
            if limit is not None and sent > limit:
                self.over_limit = True
                raise _too_large(limit)
            yield chunk
        if self._deadline is not None:  # the whole upload is sent: the API's time to answer starts now
            self._deadline.reschedule(asyncio.get_running_loop().time() + self._timeout_s)

    @contextlib.asynccontextmanager
    async def answer_deadline(self, timeout_s: float) -> AsyncIterator[None]:
        """A deadline armed by the stream's last byte, and disarmed when the send is over.

        The API may answer before the upload ends; the stream can go on after the
        send returned, and must not reschedule a deadline that no longer guards anything.
        """
        self._timeout_s = timeout_s
        try:
            async with asyncio.timeout(None) as self._deadline:
                yield
        finally:
            self._deadline = None


@dataclass(slots=True)
class OutboundRequest:
    """One request to the API, as prepared; each send attaches its own token to ``headers``."""

    method: str
    url: URL
    headers: CIMultiDict[str]
    route: RouteSpec  # the route it matched: its scopes and audience name the token
    body: bytes | StreamedBody | None = None
    kept_bytes: int = 0  # this request's share of the kept-body budget (see KeptBodies)

    @property
    def replayable(self) -> bool:
        """Kept whole (or no body at all), so a 401 retry can resend it."""
        return not isinstance(self.body, StreamedBody)

    def payload(self) -> bytes | io.BytesIO | StreamedBody | None:
        """What aiohttp is handed, fresh for each send.

        aiohttp writes a bytes body in one go and warns past 1 MiB; a fresh BytesIO (its
        payload is closed after sending) keeps the Content-Length and is written in chunks.
        """
        body = self.body
        if isinstance(body, bytes) and len(body) > _ONE_WRITE_BYTES:
            return io.BytesIO(body)
        return body

    def answer_deadline(self, timeout_s: float) -> AbstractAsyncContextManager[object]:
        """``timeout_s`` bounds connect + send + the API's wait for the response head.

        A streamed upload arms it only once its last byte is sent, so a slow
        client's large upload is not cut; the response body is bounded by
        ``read_timeout_s`` (silence) alone, so a long download is not cut either.
        """
        body = self.body
        if isinstance(body, StreamedBody):
            return body.answer_deadline(timeout_s)
        return asyncio.timeout(timeout_s)

    def limit_passed(self) -> errors.BodyTooLarge | None:
        """The 413 when the streamed body passed ``max_body_bytes`` mid-upload, else None."""
        body = self.body
        if isinstance(body, StreamedBody) and body.over_limit:
            return _too_large(body.limit)
        return None


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

    def reserve(self, outbound: OutboundRequest, size: int, *, keepable: bool = True) -> bool:
        """Take ``size`` bytes for ``outbound``; False when they do not fit.

        A refusal is counted when it costs a body its retry (``keepable``: it was small enough
        to be kept) and keeping is on at all (a budget of 0 is a choice, not an exhaustion).
        """
        if self.held + size > self.budget:
            if self.budget and keepable:
                self._exhausted.inc()
            return False
        if size:
            self.held += size
            outbound.kept_bytes += size
            self._gauge.set(self.held)
        return True

    def release(self, outbound: OutboundRequest) -> None:
        """Give back ``outbound``'s share; idempotent, so every exit path may call it."""
        if outbound.kept_bytes:
            self.held -= outbound.kept_bytes
            outbound.kept_bytes = 0
            self._gauge.set(self.held)


class OutboundPreparer:
    """Builds each request's ``OutboundRequest``; everything per-config is computed here, once."""

    def __init__(self, settings: UpstreamSettings, kept: KeptBodies) -> None:
        self._origin = settings.url.rstrip("/")
        self._forwarded = settings.forwarded_headers
        self._drop = request_drop(
            replace_forwarded=settings.forwarded_headers, strip=header_names(settings.strip_headers)
        )
        self._keep = settings.retry_body_limit
        self._limit = settings.max_body_bytes
        self._kept = kept

    def check_declared_length(self, request: web.BaseRequest) -> None:
        """A body declared over ``max_body_bytes`` is refused before any of it is read."""
        if self._limit is not None and (request.content_length or 0) > self._limit:
            raise _too_large(self._limit)

    async def prepare(
        self, request: web.BaseRequest, target: SafeTarget, route: RouteSpec, request_id: str
    ) -> OutboundRequest:
        """The request to send, its body read or ready to stream; a failure gives its budget share back."""
        headers = upstream_request_headers(request.headers, drop=self._drop)
        headers["X-Request-Id"] = request_id
        if self._forwarded:
            headers["X-Forwarded-For"] = request.remote or "unknown"
            headers["X-Forwarded-Proto"] = request.scheme
        url = URL(self._origin + target.path + ("?" + target.query if target.query else ""), encoded=True)
        outbound = OutboundRequest(request.method, url, headers, route)
        if request.body_exists:
            try:
                outbound.body = await self._body(request, outbound)
            except BaseException:
                self._kept.release(outbound)
                raise
        return outbound

    async def _body(self, request: web.BaseRequest, outbound: OutboundRequest) -> bytes | StreamedBody:
        """The body kept whole, so a 401 retry can resend it, or streamed.

        Bodies up to ``retry_body_limit`` are read into memory while the kept-body
        budget has room for them; larger ones, chunked ones that grow past the
        limit, and any the budget cannot take are streamed with flat memory. A
        body streamed only because the budget was spent goes upstream with its
        ``Content-Length`` (aiohttp's parser has held the client to it), the
        framing it would have had if kept; larger bodies stream chunked, as always.
        """
        keep = self._keep
        length = request.content_length
        if length is not None and length <= keep:
            if self._kept.reserve(outbound, length):
                return await _read_all(request, length)
            outbound.headers[hdrs.CONTENT_LENGTH] = str(length)
            return self._stream(request, b"", outbound)
        limit = self._limit
        head = bytearray()
        while len(head) <= keep:
            chunk = await request.content.readany()
            if not chunk:
                return bytes(head)
            head += chunk
            if limit is not None and len(head) > limit:  # a chunked body has no declared length
                raise _too_large(limit)
            # The head is held in memory too (until the API takes it), so it draws on the budget;
            # a body that declared more than ``keep`` streams whatever happens (not keepable).
            if not self._kept.reserve(outbound, len(chunk), keepable=length is None):
                break
        return self._stream(request, bytes(head), outbound)

    def _stream(self, request: web.BaseRequest, head: bytes, outbound: OutboundRequest) -> StreamedBody:
        """``head``, then the rest; the head's budget share goes back once the head is handed on."""
        return StreamedBody(request.content, head, self._limit, partial(self._kept.release, outbound))


async def _read_all(request: web.BaseRequest, length: int) -> bytes:
    """Exactly the declared body, from the stream.

    Not ``request.read()``: that enforces aiohttp's own 1 MiB
    ``client_max_size`` with a plain-text 413, whatever ``retry_body_limit``
    and ``max_body_bytes`` say.
    """
    try:
        return await request.content.readexactly(length)
    except (asyncio.IncompleteReadError, aiohttp.ClientConnectionError, ConnectionResetError) as exc:
        raise errors.ClientGone() from exc
