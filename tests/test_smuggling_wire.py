"""Request smuggling and bomb payloads, as raw bytes, through the real proxy to the emulator.

Request framing comes from the proxy's own HTTP client, never from the client
("Framing and bodies" in proxy/README.md); the smuggling and bomb payloads are
tested under both of aiohttp's parsers. Every case here writes raw bytes to the
proxy listener over a socket and checks one invariant: the proxy either refuses
(a 400-class answer, or it closes the connection) or forwards exactly the
request(s) the bytes honestly frame (RFC 9112). The emulator's request log must
never show a request the attacker hid in a body or behind a conflicting frame,
the API must never get the client's ``Content-Length``/``Transfer-Encoding``
(its framing is the proxy's own), every forwarded request carries exactly one
valid token for its own route, and a normal request afterwards still works.

The hidden request targets ``/partner/v1/payments/...``, and this module's
route table allows it (``payments.read``), so if the proxy ever parsed it as a
request it would be forwarded with a ``payments:read`` token and show in the
log; ``test_the_hidden_request_would_be_seen_if_it_were_parsed`` proves that.
Bytes that honestly frame a *second* request (pipelining) use the accounts
route instead, and both requests must then be forwarded, each on its own.

Every case runs under the C parser (this process) and the pure-Python parser
(a subprocess with ``AIOHTTP_NO_EXTENSIONS=1``, read by aiohttp at import
time). ``CASES`` records what each parser actually does where they differ: an
``Outcome`` per parser, like the Refusal table in test_paths_wire.py. The
safety invariant is asserted first, for every case and both parsers; the
recorded outcome second, so a changed aiohttp is noticed even when it is safe.

Parser differences found (aiohttp 3.14.5), all of them safe here:

==========================  ==============================  ===============================
case                        C parser (llhttp)               pure-Python parser
==========================  ==============================  ===============================
cl-overflow                 400                             accepted, waits for the body
te-chunked-chunked          400                             accepted; the proxy answers 400
chunk-overflow(-2^64)       400                             accepted, waits for the chunk
chunk-ext-control-char      400                             accepted, extension ignored
chunk-trailer-cl            400 (trailer CL = conflict)     accepted, trailer ignored
http-0.9 request line       505 (version 0.9)               400
==========================  ==============================  ===============================

The module's emulator runs with ``auto_decompress=False``: aiohttp's server
decodes a ``Content-Encoding: gzip`` request body by default, so the stock
emulator would hash the *decoded* bytes and could not tell a byte-exact
forward from a decoded one.

Three proxy bugs these tests found, now fixed and pinned by the tests at the end:
gzip request bodies were inflated by the listener (aiohttp's default
``auto_decompress=True``); an HTTP/1.0 request with ``Transfer-Encoding`` and
``Connection: keep-alive`` kept the connection open, so the bytes after it
became a new request (RFC 9112 §6.1: it MUST be closed); and a streamed body
passing ``max_body_bytes`` mid-stream got 502 instead of 413. A fourth,
``Transfer-Encoding: gzip, chunked`` being de-chunked with the gzip coding
silently dropped, is now refused by the proxy (400 ``bad_request``).

The listener counts a head's bytes before either parser sees them, so a head
over ``limits.max_header_bytes`` (or with more than ``limits.max_headers``
fields) is ``431`` under both parsers, and an ``Upgrade: h2c`` request (never
performed) is followed by the next pipelined request under both. Underscore lookalikes
(``Transfer_Encoding``, ``Content_Length``, ``Proxy_Authorization``) frame
nothing for either parser and are dropped, so a CGI-style API server cannot
read them as the real header.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import ProxyServer
from proxy.emulator.app import EmulatorServer
from proxy.emulator.streams import statement_gzip_bytes
from tests.parsers import check_expected_parser, parser_kind, rerun_under_pure_python
from tests.proxy_fixtures import (
    TEST_ROUTES,
    StartProxy,
    emulator_requests,
    emulator_stats,
    open_connection,
)

INNER_ENV = "CTP_SMUGGLING_PARSER"  # set by the outer run: which parser the inner run must be using

DOC = "/partner/v1/applications/app_demo_001/documents"  # applications.write, body streamed and hashed
DECISION = "/partner/v1/decisions/dec_demo_001"  # decisions.read
ACCOUNT = "/partner/v1/accounts/acc_demo_001"  # accounts.read: the honest second request
HIDDEN = "/partner/v1/payments/pay_smuggled"  # payments.read: must never reach the API from a case
ROUTES = [*TEST_ROUTES, {"name": "payments.read", "methods": ["GET"], "path": "/partner/v1/payments/**",
                         "scopes": ["payments:read"]}]  # fmt: skip
SCOPE_OF = {DOC: "applications:write", DECISION: "decisions:read", ACCOUNT: "accounts:read"}

#: Headers only the client could have put on a forwarded request (framing, hop-by-hop, trailers).
CLIENT_ONLY = frozenset(
    {"te", "trailer", "upgrade", "connection", "keep-alive", "expect", "http2-settings", "x-in-trailer"}
)
#: Names an underscore lookalike of which must never reach the API (CGI maps ``_`` and ``-`` alike).
LOOKALIKE_OF = CLIENT_ONLY | {"transfer-encoding", "content-length", "authorization", "proxy-authorization"}
REFUSAL_STATUSES = frozenset({400, 413, 431, 505})
SETTLE_S = 0.4  # how long an "open" case waits for anything more before it is judged
READ_S = 5.0  # the most any case may take to answer and close; a hang fails instead of hanging




# --------------------------------------------------------------------------- payload building

HOST = b"Host: proxy.test\r\n"
HIDDEN_REQUEST = b"GET " + HIDDEN.encode() + b" HTTP/1.1\r\n" + HOST + b"\r\n"
#: A legitimate pipelined request that ends the exchange (so an honest parse closes promptly).
NEXT_REQUEST = b"GET " + ACCOUNT.encode() + b" HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"


def post(headers: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1", path: str = DOC) -> bytes:
    """A POST with ``headers`` (each line CRLF-terminated), then the blank line, then ``body`` raw."""
    return b"POST " + path.encode() + b" " + version + b"\r\n" + HOST + headers + b"\r\n" + body


def get(headers: bytes, body: bytes = b"", path: str = DECISION) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\n" + HOST + headers + b"\r\n" + body


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def cl(n: int | bytes) -> bytes:
    return b"Content-Length: " + (n if isinstance(n, bytes) else str(n).encode()) + b"\r\n"


TE = b"Transfer-Encoding: chunked\r\n"
CLOSE = b"Connection: close\r\n"
#: A chunked body whose one chunk is the hidden request: honest parsers see it as body bytes.
CHUNKED_HIDING = chunked(HIDDEN_REQUEST)
#: TE.CL: under ``Content-Length`` the body is just the chunk-size line, and the hidden request follows.
TE_CL_SIZE_LINE = b"%x\r\n" % len(HIDDEN_REQUEST)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Sent:
    """One request the API must receive, as the bytes honestly frame it."""

    method: str
    path: str
    body: bytes = b""

    @property
    def status(self) -> int:
        return 201 if self.path == DOC else 200


def upload(body: bytes) -> Sent:
    return Sent("POST", DOC, body)


NEXT = Sent("GET", ACCOUNT)


@dataclass(frozen=True)
class Outcome:
    """What the client reads and the API receives.

    ``forwarded``: the requests the API gets, in order (the client gets their
    answers, in order). ``refused``: the status of the proxy's final refusal,
    if any. ``end``: "closed" if the proxy then closes the connection, "open"
    if it keeps waiting for more bytes (nothing more may be forwarded).
    """

    forwarded: tuple[Sent, ...] = ()
    refused: int | None = None
    end: str = "closed"

    @property
    def replies(self) -> tuple[int, ...]:
        return tuple(s.status for s in self.forwarded) + ((self.refused,) if self.refused else ())


REFUSED = Outcome(refused=400)
TOO_LARGE = Outcome(refused=431)  # over limits.max_header_bytes or limits.max_headers
WAITING = Outcome(end="open")  # accepted a frame that has not ended yet; nothing forwarded


def forwards(*sent: Sent) -> Outcome:
    return Outcome(tuple(sent))


@dataclass(frozen=True)
class Case:
    id: str
    payload: bytes
    outcome: Outcome | dict[str, Outcome]  # one for both parsers, or {"c": ..., "python": ...}

    def expected(self, kind: str) -> Outcome:
        return self.outcome[kind] if isinstance(self.outcome, dict) else self.outcome

    def honest(self) -> set[Sent]:
        """The requests these bytes honestly frame: whatever either parser is recorded forwarding.

        Each entry of CASES was checked against RFC 9112 by hand; none lists the hidden request.
        """
        outcomes = self.outcome.values() if isinstance(self.outcome, dict) else [self.outcome]
        return {s for o in outcomes for s in o.forwarded}


ABC = upload(b"abc")
CASES: list[Case] = [
    # ---- Content-Length and Transfer-Encoding together (RFC 9112 §6.3: reject, or TE and close)
    Case("cl-te", post(cl(5 + len(HIDDEN_REQUEST)) + TE, b"0\r\n\r\n" + HIDDEN_REQUEST), REFUSED),
    Case(
        "te-cl",
        post(TE + cl(len(TE_CL_SIZE_LINE)), TE_CL_SIZE_LINE + HIDDEN_REQUEST + b"\r\n0\r\n\r\n"),
        REFUSED,
    ),
    Case(
        "cl-te-lowercase-names",
        post(b"content-length: 5\r\ntransfer-encoding: chunked\r\n", b"0\r\n\r\n" + HIDDEN_REQUEST),
        REFUSED,
    ),
    Case(
        "cl-te-http10",
        post(cl(5 + len(HIDDEN_REQUEST)) + TE, b"0\r\n\r\n" + HIDDEN_REQUEST, b"HTTP/1.0"),
        REFUSED,
    ),
    Case(
        "cl-te-chunked-identity",
        post(
            cl(len(TE_CL_SIZE_LINE)) + b"Transfer-Encoding: chunked, identity\r\n",
            TE_CL_SIZE_LINE + HIDDEN_REQUEST + b"\r\n0\r\n\r\n",
        ),
        REFUSED,
    ),
    Case(
        "cl-te-xchunked",
        post(cl(5) + b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n" + HIDDEN_REQUEST),
        REFUSED,
    ),
    Case(
        "cl-te-tab", post(cl(5) + b"Transfer-Encoding: \tchunked\r\n", b"0\r\n\r\n" + HIDDEN_REQUEST), REFUSED
    ),
    Case(
        "cl-te-in-second-te-header",
        post(cl(5) + b"Transfer-Encoding: identity\r\n" + TE, b"0\r\n\r\n" + HIDDEN_REQUEST),
        REFUSED,
    ),
    # ---- Content-Length alone: duplicates, signs, spaces, non-digits
    Case("two-different-cl", post(cl(3) + cl(3 + len(HIDDEN_REQUEST)), b"abc" + HIDDEN_REQUEST), REFUSED),
    Case("two-equal-cl", post(cl(3) + cl(3) + CLOSE, b"abc"), REFUSED),
    Case("cl-list", post(cl(b"3, 3") + CLOSE, b"abc"), REFUSED),
    Case("cl-plus", post(cl(b"+3"), b"abc" + HIDDEN_REQUEST), REFUSED),
    Case("cl-minus", post(cl(b"-3"), b"abc" + HIDDEN_REQUEST), REFUSED),
    Case("cl-space-inside", post(cl(b"3 3"), b"abc" + HIDDEN_REQUEST), REFUSED),
    Case("cl-hex", post(cl(b"0x3"), b"abc" + HIDDEN_REQUEST), REFUSED),
    Case("cl-trailing-letter", post(cl(b"3a"), b"abc" + HIDDEN_REQUEST), REFUSED),
    Case("cl-empty", post(cl(b""), b"abc" + HIDDEN_REQUEST), REFUSED),
    Case(
        "cl-overflow",
        post(cl(b"99999999999999999999999"), b"abc" + HIDDEN_REQUEST),
        {"c": REFUSED, "python": WAITING},
    ),
    # OWS around the value and leading zeros are valid: forwarded, re-framed by the proxy's client.
    Case("cl-ows", post(b"Content-Length: \t 3 \t\r\n" + CLOSE, b"abc"), forwards(ABC)),
    Case("cl-leading-zeros", post(cl(b"003") + CLOSE, b"abc"), forwards(ABC)),
    # ---- honest pipelining: both requests are legitimate, each forwarded on its own, own token
    Case("cl0-then-pipelined", get(cl(0)) + NEXT_REQUEST, forwards(Sent("GET", DECISION), NEXT)),
    Case("cl-body-then-pipelined", post(cl(3), b"abc") + NEXT_REQUEST, forwards(ABC, NEXT)),
    Case("chunked-then-pipelined", post(TE, chunked(b"abc")) + NEXT_REQUEST, forwards(ABC, NEXT)),
    # ---- a request hidden in a body is body bytes, nothing more
    Case(
        "request-in-cl-body",
        get(cl(len(HIDDEN_REQUEST)) + CLOSE, HIDDEN_REQUEST),
        forwards(Sent("GET", DECISION, HIDDEN_REQUEST)),
    ),
    Case("request-in-chunk", post(TE + CLOSE, CHUNKED_HIDING), forwards(upload(HIDDEN_REQUEST))),
    # ---- obfuscated Transfer-Encoding (no Content-Length): only a valid final "chunked" is chunked
    Case(
        "te-chunked-identity",
        post(b"Transfer-Encoding: chunked, identity\r\n" + CLOSE, CHUNKED_HIDING),
        REFUSED,
    ),
    Case("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n" + CLOSE, CHUNKED_HIDING), REFUSED),
    Case("te-identity", post(b"Transfer-Encoding: identity\r\n" + CLOSE, CHUNKED_HIDING), REFUSED),
    Case("te-empty", post(b"Transfer-Encoding: \r\n" + CLOSE, CHUNKED_HIDING), REFUSED),
    Case("te-vertical-tab", post(b"Transfer-Encoding: \x0bchunked\r\n" + CLOSE, CHUNKED_HIDING), REFUSED),
    Case("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n" + CLOSE, CHUNKED_HIDING), REFUSED),
    Case(
        "te-in-second-header", post(b"Transfer-Encoding: identity\r\n" + TE + CLOSE, CHUNKED_HIDING), REFUSED
    ),
    Case("te-chunked-twice-in-two-headers", post(TE + TE + CLOSE, CHUNKED_HIDING), REFUSED),
    Case(
        "te-chunked-chunked",
        # the pure-Python parser accepts it (de-chunked once); the proxy's own check refuses it
        post(b"Transfer-Encoding: chunked, chunked\r\n" + CLOSE, CHUNKED_HIDING),
        REFUSED,
    ),
    # OWS (space, tab) around the value and case are allowed: plain chunked, honestly framed.
    Case(
        "te-leading-space",
        post(b"Transfer-Encoding:  chunked\r\n" + CLOSE, CHUNKED_HIDING),
        forwards(upload(HIDDEN_REQUEST)),
    ),
    Case(
        "te-tab",
        post(b"Transfer-Encoding: \tchunked\r\n" + CLOSE, CHUNKED_HIDING),
        forwards(upload(HIDDEN_REQUEST)),
    ),
    Case(
        "te-trailing-space",
        post(b"Transfer-Encoding: chunked \r\n" + CLOSE, CHUNKED_HIDING),
        forwards(upload(HIDDEN_REQUEST)),
    ),
    Case(
        "te-uppercase",
        post(b"Transfer-Encoding: CHUNKED\r\n" + CLOSE, CHUNKED_HIDING),
        forwards(upload(HIDDEN_REQUEST)),
    ),
    # "gzip, chunked": aiohttp de-chunks it and would drop the gzip coding; the proxy refuses it.
    Case(
        "te-gzip-chunked",
        post(b"Transfer-Encoding: gzip, chunked\r\n" + CLOSE, CHUNKED_HIDING),
        REFUSED,
    ),
    # HTTP/1.0 with TE and no keep-alive: dechunked, then the connection closes (see the test below).
    Case("te-http10", post(TE, CHUNKED_HIDING, b"HTTP/1.0"), forwards(upload(HIDDEN_REQUEST))),
    # Lookalike names are ordinary headers to both parsers: framing stays Content-Length's,
    # and the proxy drops them (check_forwarded_entry asserts none reaches the API).
    Case(
        "te-underscore-lookalike",
        post(b"Transfer_Encoding: chunked\r\n" + cl(3) + CLOSE, b"abc"),
        forwards(ABC),
    ),
    Case(
        "cl-underscore-lookalike",
        post(b"Content_Length: 99\r\n" + cl(3) + CLOSE, b"abc"),
        forwards(ABC),
    ),
    Case(
        "proxy-auth-underscore-lookalike",
        post(b"Proxy_Authorization: Bearer forged\r\n" + cl(3) + CLOSE, b"abc"),
        forwards(ABC),
    ),
    # ---- bad chunk sizes and chunk framing
    Case("chunk-size-0x", post(TE, b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n" + HIDDEN_REQUEST), REFUSED),
    Case("chunk-size-plus", post(TE, b"+10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n" + HIDDEN_REQUEST), REFUSED),
    Case("chunk-size-minus", post(TE, b"-1\r\na\r\n0\r\n\r\n" + HIDDEN_REQUEST), REFUSED),
    Case(
        "chunk-size-overflow",
        post(TE, b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n" + HIDDEN_REQUEST),
        {"c": REFUSED, "python": WAITING},
    ),
    Case(
        "chunk-size-2^64+3",
        post(TE, b"10000000000000003\r\nabc\r\n0\r\n\r\n" + HIDDEN_REQUEST),
        {"c": REFUSED, "python": WAITING},
    ),
    Case("chunk-size-bws", post(TE, b"3 \r\nabc\r\n0\r\n\r\n" + HIDDEN_REQUEST), REFUSED),
    Case("chunk-size-short", post(TE, b"2\r\nabc\r\n0\r\n\r\n" + HIDDEN_REQUEST), REFUSED),
    Case("chunk-ext-ok", post(TE + CLOSE, b"3;name=value\r\nabc\r\n0\r\n\r\n"), forwards(ABC)),
    Case(
        "chunk-ext-control-char",
        post(TE + CLOSE, b"3;a=\x01\r\nabc\r\n0\r\n\r\n"),
        {"c": REFUSED, "python": forwards(ABC)},
    ),
    Case("chunk-ext-bare-lf", post(TE, b"3;a\nb\r\nabc\r\n0\r\n\r\n" + HIDDEN_REQUEST), REFUSED),
    Case("chunk-ext-quoted-crlf", post(TE, b'3;a="b\r\nc"\r\nabc\r\n0\r\n\r\n' + HIDDEN_REQUEST), REFUSED),
    Case("chunk-size-bare-lf", post(TE, b"3\nabc\r\n0\r\n\r\n" + HIDDEN_REQUEST), REFUSED),
    Case("chunk-data-bare-lf", post(TE, b"3\r\nabc\n0\r\n\r\n" + HIDDEN_REQUEST), REFUSED),
    Case("last-chunk-bare-lf", post(TE, b"3\r\nabc\r\n0\n\n" + HIDDEN_REQUEST), REFUSED),
    Case("last-chunk-without-final-crlf", post(TE, b"3\r\nabc\r\n0\r\n" + HIDDEN_REQUEST), REFUSED),
    # trailers never become headers upstream (and never a second Authorization)
    Case(
        "chunk-trailers",
        post(TE, b"3\r\nabc\r\n0\r\nX-In-Trailer: 1\r\nAuthorization: Bearer forged\r\n\r\n") + NEXT_REQUEST,
        forwards(ABC, NEXT),
    ),
    Case(
        "chunk-trailer-cl",
        post(TE, b"3\r\nabc\r\n0\r\nContent-Length: 99\r\n\r\n") + NEXT_REQUEST,
        {"c": REFUSED, "python": forwards(ABC, NEXT)},
    ),
    # ---- bare LF, obs-fold, NUL and bare CR in the head
    Case("request-line-bare-lf", post(cl(3), b"abc").replace(b"HTTP/1.1\r\n", b"HTTP/1.1\n", 1), REFUSED),
    Case("header-bare-lf", post(cl(3), b"abc").replace(HOST, b"Host: proxy.test\n"), REFUSED),
    Case("head-ends-bare-lf", post(cl(3))[:-2] + b"\nabc", REFUSED),
    Case("obs-fold", post(b"X-A: 1\r\n 2\r\n" + cl(3), b"abc"), REFUSED),
    Case(
        "obs-fold-hides-te", post(b"X-A: 1\r\n Transfer-Encoding: chunked\r\n" + cl(5), b"0\r\n\r\n"), REFUSED
    ),
    Case("obs-fold-te-value", post(b"Transfer-Encoding:\r\n chunked\r\n", CHUNKED_HIDING), REFUSED),
    Case("nul-in-header-value", post(b"X-A: a\x00b\r\n" + cl(3), b"abc"), REFUSED),
    Case("nul-in-header-name", post(b"X-\x00A: 1\r\n" + cl(3), b"abc"), REFUSED),
    Case("bare-cr-in-header-value", post(b"X-A: a\rb\r\n" + cl(3), b"abc"), REFUSED),
    Case("bare-cr-hides-cl", post(b"X-A: 1\rContent-Length: 3\r\n", b"abc" + HIDDEN_REQUEST), REFUSED),
    # ---- header bombs
    Case("one-100KB-header", post(b"X-Big: " + b"a" * 100_000 + b"\r\n" + cl(3), b"abc"), TOO_LARGE),
    Case(
        "10000-small-headers",
        post(b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)) + cl(3), b"abc"),
        TOO_LARGE,
    ),
    # Within the parsers' per-line (8190) and count limits, but over the whole-head cap.
    Case(
        "800KB-head-in-100-headers",
        post(b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 8000) for i in range(100)) + cl(3) + CLOSE, b"abc"),
        TOO_LARGE,
    ),
    # ---- upgrades the proxy never performs: what follows is the next request, or dropped
    Case(
        "upgrade-websocket",
        get(b"Connection: Upgrade\r\nUpgrade: websocket\r\n") + NEXT_REQUEST,
        forwards(Sent("GET", DECISION), NEXT),
    ),
    Case(
        "upgrade-h2c",
        get(b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n")
        + NEXT_REQUEST,
        forwards(Sent("GET", DECISION), NEXT),
    ),
    Case("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", REFUSED),
    Case(
        "http09-request-line",
        b"GET " + DECISION.encode() + b"\r\n\r\n",
        {"c": Outcome(refused=505), "python": REFUSED},
    ),
]


# --------------------------------------------------------------------------- fixtures and wire helpers


class WireEmulator(EmulatorServer):
    """The emulator with request-body decoding off, so its log hashes the bytes on the wire."""

    async def start(self) -> WireEmulator:
        runner = web.AppRunner(
            self.app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None, auto_decompress=False
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = next(a for a in runner.addresses if isinstance(a, tuple))[1]
        return self


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    """Overrides conftest's: the same emulator, hashing request bodies exactly as received."""
    server = await WireEmulator(port=0).start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> ProxyServer:
    return await start_proxy({"routes": ROUTES})


@dataclass
class Observed:
    replies: list[int] = field(default_factory=list)
    end: str = "closed"  # "closed" (EOF), "reset", "open" (nothing more within the wait), "not read"
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


async def exchange(
    proxy: ProxyServer, payload: bytes, wait: float = READ_S, *, max_replies: int | None = None
) -> Observed:
    """Write ``payload`` in one go and read every response until EOF, a reset or ``wait`` runs out.

    ``max_replies`` stops after that many answers without waiting for the proxy to close.
    """
    reader, writer = await asyncio.wait_for(open_connection(proxy.proxy_url), READ_S)
    seen = Observed()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait

    async def within(aw: Any) -> Any:
        return await asyncio.wait_for(aw, max(0.01, deadline - loop.time()))

    try:
        with contextlib.suppress(ConnectionError):
            writer.write(payload)
            await within(writer.drain())
        while True:
            head = await within(reader.readuntil(b"\r\n\r\n"))
            status_line, *lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ")[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
            if 100 <= status < 200:
                continue
            seen.replies.append(status)
            seen.headers.append(headers)
            if "content-length" in headers:
                seen.bodies.append(await within(reader.readexactly(int(headers["content-length"]))))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                seen.bodies.append(await within(_read_chunked(reader)))
            else:
                seen.bodies.append(await within(reader.read()))
                return seen
            if max_replies is not None and len(seen.replies) >= max_replies:
                seen.end = "not read"
                return seen
    except asyncio.IncompleteReadError:
        seen.end = "closed"
    except ConnectionResetError:
        seen.end = "reset"
    except TimeoutError:
        seen.end = "open"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return seen


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        body += await reader.readexactly(size + 2)
        del body[-2:]
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
        pass
    return bytes(body)


def check_forwarded_entry(entry: dict[str, Any], emulator: EmulatorServer) -> None:
    """One request as the API got it: proxy framing only, one valid token for its own route."""
    headers = entry["headers"]
    assert not CLIENT_ONLY & set(headers), headers
    assert not {n for n in headers if "_" in n and n.replace("_", "-") in LOOKALIKE_OF}, headers
    assert headers.get("host") == [f"{emulator.host}:{emulator.port}"], headers.get("host")
    if "transfer-encoding" in headers:
        assert headers["transfer-encoding"] == ["chunked"] and "content-length" not in headers, headers
    if "content-length" in headers:
        assert headers["content-length"] == [str(entry["body_size"])], headers
    auth = entry["auth"]
    assert auth["count"] == 1 and auth["valid"] is True, auth
    assert auth["scope"] == SCOPE_OF.get(entry["raw_path"]), (entry["raw_path"], auth)


def as_sent(entry: dict[str, Any]) -> tuple[str, str, str | None]:
    return entry["method"], entry["raw_path"], entry["body_sha256"]


def sent_key(sent: Sent) -> tuple[str, str, str]:
    return sent.method, sent.path, hashlib.sha256(sent.body).hexdigest()


async def assert_still_serving(
    proxy: ProxyServer, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    async with http.get(proxy.proxy_url + DECISION) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
    last = (await emulator_requests(http, emulator))[-1]
    assert (last["method"], last["raw_path"], last["status"]) == ("GET", DECISION, 200)
    check_forwarded_entry(last, emulator)


# --------------------------------------------------------------------------- the cases


async def test_the_hidden_request_would_be_seen_if_it_were_parsed(
    proxy: ProxyServer, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    """Positive control: sent honestly, the hidden request IS forwarded, with a payments:read token."""
    seen = await exchange(proxy, HIDDEN_REQUEST.replace(HOST, HOST + CLOSE))
    assert seen.replies == [404] and seen.end == "closed"  # the emulator has no such payment
    [entry] = await emulator_requests(http, emulator)
    assert entry["raw_path"] == HIDDEN and entry["auth"]["scope"] == "payments:read"
    assert (await emulator_stats(http, emulator))["tokens_by_scope"] == {"payments:read": 1}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_smuggling_payload_is_refused_or_honestly_framed(
    proxy: ProxyServer, http: aiohttp.ClientSession, emulator: EmulatorServer, case: Case
) -> None:
    expected = case.expected(parser_kind())
    seen = await exchange(proxy, case.payload, SETTLE_S if expected.end == "open" else READ_S)
    log = await emulator_requests(http, emulator)

    # The invariant, whatever the parser does.
    assert not [e for e in log if "smuggled" in e["raw_path"]], "a hidden request reached the API"
    assert "payments:read" not in (await emulator_stats(http, emulator))["tokens_by_scope"]
    honest = {sent_key(s) for s in case.honest()}
    assert all(as_sent(e) in honest for e in log), [as_sent(e) for e in log]
    for entry in log:
        check_forwarded_entry(entry, emulator)
    honest_statuses = {s.status for s in case.honest()}
    assert all(r in honest_statuses or r in REFUSAL_STATUSES for r in seen.replies), seen.replies
    if seen.replies and seen.replies[-1] in REFUSAL_STATUSES:
        assert seen.end in ("closed", "reset"), "a refused connection must not stay open"

    # What this parser actually does, as recorded in CASES.
    assert [as_sent(e) for e in log] == [sent_key(s) for s in expected.forwarded]
    if expected.refused and seen.end == "reset":  # an RST (unread bytes at close) may overtake the 400
        assert seen.replies in (list(expected.replies), list(expected.replies[:-1])), seen
    else:
        assert seen.replies == list(expected.replies), seen
        assert seen.end == expected.end, seen

    await assert_still_serving(proxy, http, emulator)


# --------------------------------------------------------------------------- an abort mid-body


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_client_abort_mid_body_never_desyncs_the_upstream_connection(
    proxy: ProxyServer, http: aiohttp.ClientSession, emulator: EmulatorServer, framing: str
) -> None:
    """A body cut off half way (past the retry buffer, so it was already streaming upstream)
    must not leave a half-sent request on a pooled upstream connection for the next one to
    complete: the next requests arrive whole, each as itself."""
    part = os.urandom(2 * 1024 * 1024)
    if framing == "content-length":
        payload = post(cl(4 * len(part)), part)
    else:
        payload = post(TE, b"%x\r\n" % (4 * len(part)) + part)
    _, writer = await asyncio.wait_for(open_connection(proxy.proxy_url), READ_S)
    writer.write(payload)
    await asyncio.wait_for(writer.drain(), READ_S)
    for _ in range(100):  # until the emulator has started receiving it
        if any(e["raw_path"] == DOC for e in await emulator_requests(http, emulator)):
            break
        await asyncio.sleep(0.02)
    writer.transport.abort()
    body = os.urandom(300_000)
    async with http.post(proxy.proxy_url + DOC, data=body) as resp:
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["sha256"] == hashlib.sha256(body).hexdigest()
    await assert_still_serving(proxy, http, emulator)
    log = await emulator_requests(http, emulator)
    assert [e["raw_path"] for e in log] == [DOC, DOC, DECISION]
    assert log[0]["body_complete"] is False and log[0]["body_size"] < 4 * len(part)
    assert log[1]["body_sha256"] == hashlib.sha256(body).hexdigest()
    for entry in log:
        check_forwarded_entry(entry, emulator)


# --------------------------------------------------------------------------- bodies and encodings


def _zeros_gzip_bomb() -> bytes:
    """~1 MB of gzip that inflates to 1 GiB of zeros: 512 identical members of 2 MiB each.

    Concatenated members are one valid gzip stream (RFC 1952 §2.2), which makes
    the bomb cheap to build; a single 1 GiB deflate would take seconds to compress.
    """
    member = gzip.compress(bytes(2 * 1024 * 1024), compresslevel=9, mtime=0)
    return member * 512


BOMB = _zeros_gzip_bomb()


async def test_gzip_bomb_response_passes_through_undecoded(
    proxy: ProxyServer, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    """The download direction: a gzip response arrives exactly as the API encoded it."""
    size = 200_000
    target = f"{ACCOUNT}/statement?bytes={size}&gzip=1"
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"
    seen = await exchange(proxy, request.encode())
    assert seen.replies == [200] and seen.end == "closed"
    assert seen.headers[0]["content-encoding"] == "gzip"
    want = b"".join(statement_gzip_bytes(size, "acc_demo_001"))
    assert seen.bodies[0] == want
    assert int(seen.headers[0].get("content-length", len(want))) == len(want)


async def test_gzip_bomb_upload_reaches_the_api_byte_exact_and_undecoded(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    """~1 MB of gzip (1 GiB of zeros inflated) must reach the API as the same ~1 MB, undecoded.

    ``max_body_bytes`` is 4 MiB, well above the upload, so a correct proxy
    forwards it untouched while a decoding one stops forwarding after 4 MiB.
    (Today the listener still inflates the whole GiB, ~1.5 s of CPU on the
    event loop, before the 502 goes out; with no limit the API gets 1 GiB.)
    """
    proxy = await start_proxy({"routes": ROUTES, "upstream": {"max_body_bytes": 4 * 1024 * 1024}})
    head = b"Content-Encoding: gzip\r\nContent-Type: application/pdf\r\n" + CLOSE
    # One answer is all that is read: after answering, aiohttp would drain (inflate) the rest.
    seen = await exchange(proxy, post(head + cl(len(BOMB)), BOMB), max_replies=1)
    digest = hashlib.sha256(BOMB).hexdigest()
    assert seen.replies == [201], (seen.replies, seen.bodies[:1])
    assert json.loads(seen.bodies[0])["sha256"] == digest
    [entry] = await emulator_requests(http, emulator)
    assert entry["body_sha256"] == digest and entry["body_size"] == len(BOMB)
    assert entry["headers"]["content-encoding"] == ["gzip"]
    check_forwarded_entry(entry, emulator)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_small_gzip_upload_reaches_the_api_byte_exact(
    proxy: ProxyServer, http: aiohttp.ClientSession, emulator: EmulatorServer, framing: str
) -> None:
    """An ordinary compressed upload (10 KB inflated): the API must get the gzip bytes as sent."""
    body = gzip.compress(b'{"note": "compressible"}' * 400, mtime=0)
    head = b"Content-Encoding: gzip\r\n" + CLOSE
    payload = (
        post(head + cl(len(body)), body) if framing == "content-length" else post(head + TE, chunked(body))
    )
    seen = await exchange(proxy, payload)
    assert seen.replies == [201]
    [entry] = await emulator_requests(http, emulator)
    assert entry["headers"]["content-encoding"] == ["gzip"]
    assert entry["body_sha256"] == hashlib.sha256(body).hexdigest() and entry["body_size"] == len(body)


async def test_streamed_body_over_the_limit_is_413(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    proxy = await start_proxy({"routes": ROUTES, "upstream": {"max_body_bytes": 2 * 1024 * 1024}})
    step = bytes(256 * 1024)
    seen = await exchange(proxy, post(TE + CLOSE, chunked(*[step] * 12)), max_replies=1)
    assert seen.replies == [413], (seen.replies, seen.bodies[:1])
    assert seen.headers[0]["x-credicorp-proxy-error"] == "body_too_large"


# --------------------------------------------------------------------------- HTTP/1.0 + Transfer-Encoding

TE_HTTP10_KEEPALIVE = post(b"Connection: keep-alive\r\n" + TE, chunked(b"abc"), b"HTTP/1.0") + HIDDEN_REQUEST


async def test_http10_transfer_encoding_closes_the_connection_after_the_message(
    proxy: ProxyServer, http: aiohttp.ClientSession, emulator: EmulatorServer
) -> None:
    seen = await exchange(proxy, TE_HTTP10_KEEPALIVE, SETTLE_S)
    log = await emulator_requests(http, emulator)
    assert [e["raw_path"] for e in log] == [DOC], "bytes after an HTTP/1.0 TE message became a request"
    assert seen.replies in ([201], [201, 400]) and seen.end in ("closed", "reset"), seen
    await assert_still_serving(proxy, http, emulator)


# --------------------------------------------------------------------------- both parsers


def test_the_expected_parser_is_in_use() -> None:
    """Guards the cross-parser run: a silent fallback would test one parser twice."""
    check_expected_parser(INNER_ENV)


@pytest.mark.skipif(INNER_ENV in os.environ, reason="this is the inner run")
def test_wire_cases_also_pass_under_the_pure_python_parser() -> None:
    rerun_under_pure_python(__file__, INNER_ENV, allowed=("passed", "xfailed"))
