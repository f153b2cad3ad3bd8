"""How a client connection is bounded, on the proxy listener and the admin listener alike.

aiohttp's server, left at its defaults, bounds almost nothing a client
controls: keep-alive lasts an hour, a request head or body may take for ever,
there is no cap on connections, and a partial head is kept in memory up to
128 lines of 8 KiB each. A few slow or oversized clients were enough to push
the process past its memory limit or its descriptor limit, and with it the
health probes. Both listeners therefore run ``BoundedConnection``, aiohttp's
own request handler with these bounds put on the bytes as they arrive:

* **head size and count** (``limits.max_header_bytes``, ``max_headers``):
  the bytes of a request head are counted *before* they reach the parser, so
  no parser, C (llhttp) or pure Python, ever holds more than the cap of one
  head; past it the client gets ``431`` and the connection is closed;
* **head deadline** (``header_timeout_s``): from the accept, or from the
  first byte of a later request, to the end of its head; then ``408``;
* **keep-alive idle** (``keepalive_timeout_s``): an idle connection between
  requests is closed (aiohttp's own timer, shortened);
* **body silence** (``body_timeout_s``): while a handler waits for body
  bytes that do not come; ``408``, or a reset once the response has started;
* **connections** (``listen_max_connections``, ``admin_max_connections``,
  clamped below ``RLIMIT_NOFILE``): a connection over the cap gets a raw
  ``503`` and is closed, so descriptors never run out and the admin
  listener keeps answering while the proxy listener is full;
* **HTTP version**: only HTTP/1.0 and 1.1 are served; anything else is
  ``505`` before any handler (so before any token) sees it;
* **accept errors**: logged once per interval with a count, not per retry.

Where a head ends is found by looking for the CRLF CRLF that ends every head;
a Content-Length body is counted out exactly, and a chunked body can only end
right after a CRLF CRLF, so the count of the next head starts where the
parser's does. Refusals (431, 408) are queued behind the requests already
parsed, so pipelined answers stay in order, and are answered by the
listener's handler like any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, TypedDict, cast

from aiohttp import hdrs, web
from aiohttp.helpers import BaseTimerContext
from aiohttp.http import HttpRequestParser, HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE, RequestHandler, RequestPayloadError, _ErrInfo
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import connections, errors
from proxy.forward import error_response
from proxy.metrics import Metrics
from proxy.settings import LimitSettings

log = logging.getLogger("proxy.listener")

#: The ``limit`` label values of ``ccp_limit_hits_total``.
LIMITS: Final = (
    "header_bytes",
    "header_count",
    "header_timeout",
    "keepalive_timeout",
    "body_timeout",
    "connections",
    "http_version",
)
SERVED_VERSIONS: Final = frozenset({HttpVersion10, HttpVersion11})
#: How long a refused connection is kept half-closed, discarding what the client still sends, so
#: the answer is not destroyed by the reset a close with unread bytes provokes.
LINGER_S: Final = 2.0
#: Connections being turned away at once, per listener; past this they are reset unanswered, so a
#: flood over the cap holds at most this many descriptors on top of the cap.
TURN_AWAY_MAX: Final = 32
#: Descriptors kept for everything that is neither a client nor an outbound pool connection
#: (log and secret files, DNS, the listeners' own sockets opened later, a child process).
SPARE_DESCRIPTORS: Final = 32
ACCEPT_LOG_INTERVAL_S: Final = 10.0
#: The parsers' own header-count limit sits above ours, so ours (431) always answers first.
_PARSER_HEADER_SLACK: Final = 2
_HEAD_END: Final = b"\r\n\r\n"
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: Request key under which the refusal a request is answered with travels to the handler.
REFUSAL: Final = web.RequestKey("ccp_refusal", errors.ProxyError)
#: The stand-in message queued for a refused head (one object, recognised by identity).
_REFUSED_HEAD: Final = RawRequestMessage(
    "GET", "/", HttpVersion11, CIMultiDictProxy(CIMultiDict()), (), True, None, False, False, URL("/")
)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def raw_error(exc: errors.ProxyError) -> bytes:
    """A whole HTTP/1.1 response for ``exc``, for a connection no request was read from."""
    body = json.dumps({"error": exc.code, "error_description": exc.description}).encode()
    fields = {
        "Content-Type": "application/json; charset=utf-8",
        "Content-Length": str(len(body)),
        "X-Credicorp-Proxy-Error": exc.code,
        **exc.headers(),
    }
    head = f"HTTP/1.1 {exc.status} {HTTPStatus(exc.status).phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return head.encode("ascii") + b"\r\n" + body


# ------------------------------------------------------------------ one listener
class Listener:
    """One listener's bounds and counters, shared by all of its connections."""

    def __init__(self, name: str, limits: LimitSettings, cap: int, metrics: Metrics) -> None:
        self.name = name
        self.limits = limits
        self.cap = cap
        self.open = 0
        self.turning_away: set[asyncio.Transport] = set()
        self._hits = {limit: metrics.limit_hits.labels(name, limit) for limit in LIMITS}
        self._open_gauge = metrics.open_connections.labels(name)
        self._open_gauge.set(0)
        self.busy_answer = raw_error(
            errors.TooManyConnections(f"the {name} listener has too many open connections; retry shortly")
        )

    def hit(self, limit: str) -> None:
        self._hits[limit].inc()

    def opened(self) -> None:
        self.open += 1
        self._open_gauge.set(self.open)

    def closed(self) -> None:
        self.open -= 1
        self._open_gauge.set(self.open)

    def server(self, handler: Handler, **kwargs: Any) -> BoundedServer:
        """aiohttp's low-level ``web.Server`` for this listener, with every connection bounded."""
        return BoundedServer(handler, listener=self, **kwargs)

    def turn_away(self, transport: asyncio.Transport) -> None:
        """Answer a connection over the cap with a raw 503 and close it, reading none of its request."""
        self.hit("connections")
        if len(self.turning_away) >= TURN_AWAY_MAX:
            transport.abort()
            return
        transport.set_protocol(_TurnAway(self, transport))


class _TurnAway(asyncio.Protocol):
    """A connection over the cap: the 503 is written, then it is half-closed and dropped.

    Its bytes are read and discarded (a close with unread bytes would reset the
    connection and could destroy the answer) until the client closes, for at
    most ``LINGER_S``.
    """

    def __init__(self, listener: Listener, transport: asyncio.Transport) -> None:
        self._listener = listener
        self._transport = transport
        listener.turning_away.add(transport)
        transport.write(listener.busy_answer)
        if transport.can_write_eof():
            transport.write_eof()
        self._deadline = asyncio.get_running_loop().call_later(LINGER_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> None:
        return None  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        self._deadline.cancel()
        self._listener.turning_away.discard(self._transport)


class BoundedServer(web.Server):
    """``web.Server`` whose connections are ``BoundedConnection`` and whose handler answers refusals.

    The refusal check wraps both the request factory (the HTTP version is seen
    there, before aiohttp builds a request in that version's terms) and the
    handler, so the wrapped handler (the forwarder, or the admin app) never
    sees a refused request.
    """

    def __init__(self, handler: Handler, *, listener: Listener, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.listener = listener
        self._inner_handler, self._inner_factory = self.request_handler, self.request_factory
        self.request_handler, self.request_factory = self._answer, self._make_checked_request

    def __call__(self) -> BoundedConnection:
        return BoundedConnection(self, loop=self._loop, **self._kwargs)

    def _make_checked_request(
        self,
        message: Any,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: Any,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        refusal: errors.ProxyError | None = None
        if message is _REFUSED_HEAD and isinstance(protocol, BoundedConnection):
            refusal = protocol.refusal
        elif message.version not in SERVED_VERSIONS:
            self.listener.hit("http_version")
            version = f"HTTP/{message.version.major}.{message.version.minor}"
            refusal = errors.HttpVersionNotSupported(f"{version} is not served here; use HTTP/1.1")
            # The answer's status line is written in the request's version: make it a 1.1 one.
            message = message._replace(version=HttpVersion11, should_close=True)
        request = self._inner_factory(message, payload, protocol, writer, task)
        if refusal is not None:
            request[REFUSAL] = refusal
        return request

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        refusal = request.get(REFUSAL)
        if refusal is None:
            return await self._inner_handler(request)
        response = error_response(refusal)
        response.force_close()
        protocol = request.protocol
        if message_unread(refusal) and isinstance(protocol, BoundedConnection):
            await response.prepare(request)
            await response.write_eof()
            await protocol.linger()
        return response

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for transport in list(self.listener.turning_away):
            transport.abort()


def message_unread(refusal: errors.ProxyError) -> bool:
    """A refusal sent while the rest of the client's head was not read: the connection lingers."""
    return isinstance(refusal, errors.HeadersTooLarge | errors.RequestTimeout)


class BoundedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose server is the listener's ``BoundedServer`` (for the admin app)."""

    def __init__(self, app: web.Application, listener: Listener, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._listener = listener

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's start-up and freezes it
        return self._listener.server(
            plain.request_handler, request_factory=plain.request_factory, **self._kwargs
        )


# ------------------------------------------------------------- one connection
class _BodyWait(BaseTimerContext):
    """The parser's read timer: it runs only while a handler waits for body bytes.

    aiohttp enters it around every wait on a request body's ``StreamReader``,
    so the deadline is exactly "no body byte for ``body_timeout_s`` while
    someone waits": a handler busy elsewhere (an upstream that reads the
    upload slowly) is never cut, and every byte that arrives starts it anew.
    """

    __slots__ = ("_connection", "_handle")

    def __init__(self, connection: BoundedConnection) -> None:
        self._connection = connection
        self._handle: asyncio.TimerHandle | None = None

    def __enter__(self) -> _BodyWait:
        if self._handle is not None:
            self._handle.cancel()
        connection = self._connection
        self._handle = connection._loop.call_later(
            connection._limits.body_timeout_s, connection._body_timed_out
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def assert_timeout(self) -> None:
        """Part of aiohttp's timer interface; a body timeout acts on the stream instead of raising here."""


class _ParserLimits(TypedDict):
    """The head bounds handed to aiohttp's parser (typed, so both constructors are checked)."""

    max_line_size: int
    max_field_size: int
    max_headers: int


class BoundedConnection(RequestHandler):
    """aiohttp's ``RequestHandler`` with the bounds of ``LimitSettings`` on the bytes as they arrive."""

    __slots__ = (
        "_body",
        "_body_left",
        "_carry",
        "_chunk_left",
        "_chunk_line",
        "_chunk_lost",
        "_chunk_trailers",
        "_counted",
        "_head_bytes",
        "_head_deadline",
        "_head_lines",
        "_limits",
        "_lingering",
        "_listener",
        "_refused",
        "_stash",
        "refusal",
    )

    def __init__(self, manager: BoundedServer, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        limits = manager.listener.limits
        parser_limits: _ParserLimits = {
            "max_line_size": limits.max_header_bytes,
            "max_field_size": limits.max_header_bytes,
            "max_headers": limits.max_headers + _PARSER_HEADER_SLACK,
        }
        auto_decompress = kwargs.pop("auto_decompress", True)
        super().__init__(
            manager,
            loop=loop,
            keepalive_timeout=limits.keepalive_timeout_s,
            auto_decompress=auto_decompress,
            **parser_limits,
            **kwargs,
        )
        # The same parser aiohttp builds, plus the body timer (the C parser takes it only here).
        self._parser = HttpRequestParser(
            self,
            loop,
            self._read_bufsize,
            timer=_BodyWait(self),
            payload_exception=RequestPayloadError,
            auto_decompress=auto_decompress,
            max_msg_queue_size=MAX_MSG_QUEUE_SIZE,
            **parser_limits,
        )
        self._listener = manager.listener
        self._limits = limits
        self._counted = False
        self._refused = False
        self.refusal: errors.ProxyError | None = None
        self._stash = b""  # bytes held back while aiohttp's queue of parsed requests is full
        self._carry = b""  # the last bytes fed, to see a CRLF CRLF split across two reads
        self._head_bytes = 0
        self._head_lines = 0
        self._head_deadline: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the incomplete body of the last request parsed
        self._body_left: int | None = None  # its bytes still to come; None for a chunked body
        # Where a chunked body is in its framing (see ``_chunked_end``).
        self._chunk_left = 0  # bytes of the current chunk (and its CRLF) still to come
        self._chunk_line = b""  # a size or trailer line begun in an earlier read
        self._chunk_trailers = False  # past the last chunk: trailer lines until an empty one
        self._chunk_lost = False  # framing we cannot follow: the parser refuses it, so feed on
        self._lingering: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self._listener
        if listener.open >= listener.cap:
            listener.turn_away(cast(asyncio.Transport, transport))
            return
        listener.opened()
        self._counted = True
        super().connection_made(transport)
        # aiohttp arms its keep-alive timer for a connection that never sends anything; until the
        # first head is complete the (shorter) head deadline stands in for it.
        self._stop_keepalive_timer()
        self._arm_head_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._listener.closed()
        self._cancel_head_deadline()
        self._end_linger()
        super().connection_lost(exc)

    def eof_received(self) -> None:
        self._end_linger()
        return super().eof_received()

    def _process_keepalive(self) -> None:
        closing = self._force_close
        super()._process_keepalive()
        if self._force_close and not closing:
            self._listener.hit("keepalive_timeout")

    # --------------------------------------------------------------- the bytes
    def data_received(self, data: bytes) -> None:
        if self._refused or self._force_close or self._close:
            return  # refused or closing: nothing more is parsed
        if self._upgraded or self._payload_parser is not None:
            super().data_received(data)  # a switched protocol; aiohttp bounds its buffer itself
            return
        if self._stash:
            data, self._stash = self._stash + data, b""
        if not data:
            super().data_received(data)  # resumed: the parser goes on with bytes it held
            self._check_body_end()
            return
        while data and not (self._refused or self._force_close or self._close):
            if self._upgraded:  # the rest belongs to the switched protocol (aiohttp keeps it as a tail)
                super().data_received(data)
                return
            if len(self._messages) >= self._max_msg_queue_size:
                self._stash = data  # aiohttp paused reading; it resumes with data_received(b"")
                return
            self._check_body_end()
            data = self._feed_body(data) if self._body is not None else self._feed_head(data)

    def _feed_head(self, data: bytes) -> bytes:
        """Feed up to the end of one head, counted and checked before the parser sees it."""
        if self._head_deadline is None:  # the first byte of a later request's head
            self._stop_keepalive_timer()
            self._arm_head_deadline()
        end = self._end_of_block(data)
        complete = end >= 0
        take = end if complete else len(data)
        piece = data[:take]
        self._head_bytes += take
        self._head_lines += piece.count(b"\n")
        fields = self._head_lines - (2 if complete else 1)  # not the request line or the blank line
        limits = self._limits
        if self._head_bytes > limits.max_header_bytes:
            self._refuse(
                errors.HeadersTooLarge(
                    f"request line and headers over the {limits.max_header_bytes}-byte limit"
                ),
                "header_bytes",
            )
        elif fields > limits.max_headers:
            self._refuse(
                errors.HeadersTooLarge(f"more than {limits.max_headers} header fields"), "header_count"
            )
        else:
            return self._feed(piece) + data[take:]
        return data[take:]

    def _feed_body(self, data: bytes) -> bytes:
        """Feed body bytes, up to where the body must end if it can end within ``data``."""
        if self._body_left is not None:  # Content-Length: exactly this many bytes are body
            take = min(len(data), self._body_left)
            self._body_left -= take
            if self._body_left == 0:
                self._body = None
        else:  # chunked: the body ends after the last chunk and its trailers, found by the framing
            end = self._chunked_end(data)
            take = end if end >= 0 else len(data)
        tail = self._feed(data[:take])
        self._check_body_end()
        return tail + data[take:]

    def _chunked_end(self, data: bytes) -> int:
        """The index just past the end of the chunked body in ``data``, or -1 if it goes on.

        Follows the chunk sizes, so chunk data is skipped whole: a body full of CRLF CRLF
        costs one pass, not a parser call per look-alike end. A size or trailer line longer
        than ``max_header_bytes``, or a size that is not hex, is framing the parser refuses
        anyway; the rest of the body is then fed as it comes.
        """
        if self._chunk_lost:
            return -1
        at, size = 0, len(data)
        while at < size:
            if self._chunk_left:
                step = min(self._chunk_left, size - at)
                self._chunk_left -= step
                at += step
                continue
            eol = data.find(b"\n", at)
            if eol < 0:
                self._chunk_line += data[at:]
                self._chunk_lost = len(self._chunk_line) > self._limits.max_header_bytes
                return -1
            line, self._chunk_line = self._chunk_line + data[at:eol], b""
            at = eol + 1
            if self._chunk_trailers:
                if not line.rstrip(b"\r"):
                    return at  # the empty line after the last chunk's trailers
                continue
            try:
                chunk = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._chunk_lost = True
                return -1
            if chunk == 0:
                self._chunk_trailers = True
            else:
                self._chunk_left = chunk + 2  # the data and its CRLF
        return -1

    def _end_of_block(self, data: bytes) -> int:
        """The index just past the first CRLF CRLF in ``data`` (one may start in the previous read), or -1.

        Remembers the last bytes of a ``data`` without one, for the next read.
        """
        carry = self._carry
        if carry:
            edge = (carry + data[:3]).find(_HEAD_END)
            if edge >= 0:
                self._carry = b""
                return edge + len(_HEAD_END) - len(carry)
        end = data.find(_HEAD_END)
        if end >= 0:
            self._carry = b""
            return end + len(_HEAD_END)
        self._carry = data[-3:] if len(data) >= 3 else (carry + data)[-3:]
        return -1

    def _feed(self, piece: bytes) -> bytes:
        """Hand ``piece`` to aiohttp's parser; returns bytes it did not take (after an Upgrade)."""
        before = self._request_count
        super().data_received(piece)
        if self._request_count != before:
            self._message_arrived()
        if self._upgraded and self._payload_parser is None:
            return self._decline_upgrade()
        return b""

    def _decline_upgrade(self) -> bytes:
        """Back to HTTP at once after a request that asked to switch protocols.

        The proxy never switches (the forwarder drops ``Upgrade``, the admin app has no
        WebSocket), and aiohttp would keep every byte after such a request as an uncounted
        tail until the handler declined it, past the head cap and its deadline. Turned back
        now, those bytes are the next request and are counted and bounded as one, in the
        order aiohttp itself would parse them after declining.
        """
        if self._parser is not None:
            self._parser.set_upgraded(False)
        self._upgraded = False
        tail, self._message_tail = self._message_tail, b""
        return tail

    def _check_body_end(self) -> None:
        if self._body is not None and self._body.is_eof():
            self._body = None
            self._carry = b""

    def _message_arrived(self) -> None:
        """A head is complete: the deadline stops, the next head is counted from zero."""
        self._cancel_head_deadline()
        self._head_bytes = self._head_lines = 0
        self._carry = b""
        message, payload = self._messages[-1]
        if isinstance(message, _ErrInfo):
            self._refused = True  # nothing more is parsed; aiohttp answers the error with 400 and closes
            body = self._body
            if body is not None and not body.is_eof():
                # The framing broke inside a body that a handler reads (or will): fail that body, so
                # the handler answers 400 instead of waiting for bytes that will never be parsed,
                # and answer nothing after it.
                self._messages.pop()
                self._lingering_time = 0.0
                self.close()
                body.set_exception(errors.BadRequest("the request body's framing is malformed"))
        elif payload is not EMPTY_PAYLOAD and not payload.is_eof():
            self._body = payload
            length = message.headers.get(hdrs.CONTENT_LENGTH)
            self._body_left = None if message.chunked or length is None else int(length)
            self._chunk_left, self._chunk_line = 0, b""
            self._chunk_trailers = self._chunk_lost = False

    # ---------------------------------------------------------------- refusals
    def _refuse(self, refusal: errors.ProxyError, limit: str) -> None:
        """Stop reading, and queue the refusal behind the requests already parsed (in order)."""
        self._refused = True
        self.refusal = refusal
        self._stash = b""
        self._cancel_head_deadline()
        self._listener.hit(limit)
        self._messages.append((_REFUSED_HEAD, EMPTY_PAYLOAD))
        self._request_count += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def linger(self) -> None:
        """Half-close after a refusal and discard what the client still sends, up to ``LINGER_S``.

        A socket closed with unread bytes sends a reset, which can destroy the
        answer before the client has read it; a client that reads its 431 or
        408 and closes ends this at once.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._lingering = self._loop.create_future()
        if transport.can_write_eof():
            transport.write_eof()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lingering, LINGER_S)

    def _end_linger(self) -> None:
        if self._lingering is not None and not self._lingering.done():
            self._lingering.set_result(None)

    # --------------------------------------------------------------- deadlines
    def _arm_head_deadline(self) -> None:
        self._head_deadline = self._loop.call_later(self._limits.header_timeout_s, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _stop_keepalive_timer(self) -> None:
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._refused or self._force_close or self._close or self.transport is None:
            return
        if self._stash or len(self._messages) >= self._max_msg_queue_size:
            self._arm_head_deadline()  # reading is paused by us (a full queue), not by the client
            return
        if self._head_bytes == 0:
            # Not one byte of a request: close without an answer. An unsolicited 408 would reach a
            # client that pre-connected (a pool warming up) as the answer to its next request.
            self._listener.hit("header_timeout")
            self.force_close()
            return
        timeout = self._limits.header_timeout_s
        self._refuse(
            errors.RequestTimeout(f"the request line and headers did not arrive within {timeout:g} s"),
            "header_timeout",
        )

    def _body_timed_out(self) -> None:
        """No body byte for ``body_timeout_s`` while a handler waited for one."""
        body = self._body
        if body is None or body.is_eof() or self.transport is None:
            return
        self._listener.hit("body_timeout")
        request = self._current_request
        if request is None:  # aiohttp's own read of an unread body after the response: just close
            self.force_close()
            return
        if request.writer.output_size > 0:
            # The response has started: a 408 cannot be sent any more, and a reset (not a FIN)
            # keeps a cut response from looking complete.
            connections.reset(self.transport)
            return
        self._lingering_time = 0.0  # aiohttp would wait on the dead body again after the answer
        self.close()  # no keep-alive: the rest of the body may still arrive
        timeout = self._limits.body_timeout_s
        body.set_exception(errors.RequestTimeout(f"no request body bytes for {timeout:g} s"))


# --------------------------------------------------------------- descriptors
@dataclass(frozen=True, slots=True)
class ConnectionCaps:
    """The connection caps in effect, after clamping them below the descriptor limit."""

    proxy: int
    admin: int
    descriptors: int  # the soft RLIMIT_NOFILE in effect
    reserved: int  # descriptors kept for what is not a proxy-listener client


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one (a process may); the (soft, hard) in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # e.g. above fs.nr_open: keep the soft limit we have
    return soft, hard


def _descriptors_in_use() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: a generous guess
        return 64


def connection_caps(limits: LimitSettings, *, outbound: int) -> ConnectionCaps:
    """Caps that leave descriptors for the admin listener, the outbound pools and the process.

    ``outbound`` is the most connections the upstream, token-endpoint and
    Redis pools may open. The proxy listener gets what is left after those,
    the admin listener's cap, the descriptors already open and a spare; it
    is clamped (and said so) if the configured cap does not fit.
    """
    soft, hard = raise_descriptor_limit()
    spare = SPARE_DESCRIPTORS + 2 * TURN_AWAY_MAX + _descriptors_in_use()
    admin = max(1, min(limits.admin_max_connections, soft - spare))
    reserved = spare + admin + outbound
    proxy = max(1, min(limits.listen_max_connections, soft - reserved))
    caps = ConnectionCaps(proxy=proxy, admin=admin, descriptors=soft, reserved=reserved)
    fields = {
        "event": "connection_caps",
        "proxy_max_connections": proxy,
        "admin_max_connections": admin,
        "nofile_soft": soft,
        "nofile_hard": -1 if hard == resource.RLIM_INFINITY else hard,
        "reserved": reserved,
    }
    if proxy < limits.listen_max_connections or admin < limits.admin_max_connections:
        log.warning("connection caps lowered to fit the descriptor limit (RLIMIT_NOFILE)", extra=fields)
    else:
        log.info("connection caps", extra=fields)
    return caps


# -------------------------------------------------------------- accept errors
class AcceptErrorLog:
    """The loop's exception handler, with failing ``accept()`` calls logged once per interval.

    At the descriptor limit asyncio's selector loop reports ``socket.accept()
    out of system resource``, with a traceback, on every retry: hundreds of
    lines a second per listener (measured: 761 in 3 s), which buried the
    logs and cost CPU. This keeps one line per ``interval_s``, with how many
    failures it stands for; anything else goes to the handler that was there
    before. uvloop (libuv) drops such connections without reporting them, so
    under uvloop the filter is installed but sees nothing.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = ACCEPT_LOG_INTERVAL_S) -> None:
        self._loop = loop
        self._interval_s = interval_s
        self._previous = loop.get_exception_handler()
        self._failures = 0
        self._last: OSError | None = None
        self._flush: asyncio.TimerHandle | None = None

    def install(self) -> AcceptErrorLog:
        self._loop.set_exception_handler(self)
        return self

    def uninstall(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._loop.get_exception_handler() is self:
            self._loop.set_exception_handler(self._previous)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (
            isinstance(exc, OSError)
            and exc.errno in _RESOURCE_ERRNOS
            and "accept" in str(context.get("message", ""))
        ):
            self._note(exc)
        elif self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def _note(self, exc: OSError) -> None:
        self._last = exc
        if self._flush is None:  # the first failure of a quiet period is logged at once
            self._write(exc, 1)
            self._flush = self._loop.call_later(self._interval_s, self._write_pending)
        else:
            self._failures += 1

    def _write_pending(self) -> None:
        self._flush = None
        if self._failures and self._last is not None:
            self._write(self._last, self._failures)
            self._failures = 0
            self._flush = self._loop.call_later(self._interval_s, self._write_pending)

    def _write(self, exc: OSError, failures: int) -> None:
        log.error(
            "accepting connections fails (%s); new clients wait in the listen backlog",
            exc.strerror or exc,
            extra={
                "event": "accept_failed",
                "error": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                "failures": failures,
                "interval_s": self._interval_s,
            },
        )
