"""What aiohttp's real HTTP parsers hand to our path checks, byte for byte over a socket.

Unit tests call ``validate_target`` with strings we chose; these tests write raw
request lines to a real server so we learn what ``request.raw_path`` actually is
for absolute-form, CONNECT, ``*``, dot-segments, backslashes and NUL, and that
no unsafe target reaches a handler. Every case runs under the C parser (this
process) and the pure-Python parser (a subprocess with ``AIOHTTP_NO_EXTENSIONS=1``,
which aiohttp reads at import time, so it cannot be switched in-process).

For each refused case the table records who refuses it under each parser:
``None`` means aiohttp's parser answers 400 before any of our code runs, a
string is the ``raw_path`` our validator was given (and refused).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.errors import BadRequest
from proxy.paths import validate_target
from tests.parsers import check_expected_parser, parser_kind, rerun_under_pure_python

INNER_ENV = "CTP_WIRE_PARSER"  # set by the outer run: which parser the inner run must be using
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]




@dataclass
class Recorder:
    """What our code saw: every raw target validated, and every path a handler was given."""

    validated: list[str] = field(default_factory=list)
    reached: list[str] = field(default_factory=list)


def make_app(recorder: Recorder) -> web.Application:
    """Validate in a middleware, as the proxy will, so unroutable targets are checked too."""

    @web.middleware
    async def path_safety(request: web.Request, handler: Handler) -> web.StreamResponse:
        recorder.validated.append(request.raw_path)
        try:
            validate_target(request.method, request.raw_path)
        except BadRequest as exc:
            body = {"error": exc.code, "error_description": exc.description}
            return web.json_response(body, status=exc.status, headers={"X-Credicorp-Proxy-Error": exc.code})
        return await handler(request)

    async def catch_all(request: web.Request) -> web.Response:
        target = validate_target(request.method, request.raw_path)
        recorder.reached.append(target.path)
        return web.json_response({"path": target.path, "query": target.query, "segments": target.segments})

    app = web.Application(middlewares=[path_safety])
    app.router.add_route("*", "/{tail:.*}", catch_all)
    return app


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def exchange(server: TestServer, request_line: bytes) -> Reply:
    """Send one raw request line (plus Host and Connection: close) and read one response.

    The body is read by Content-Length, not to EOF: after a CONNECT the pure-Python
    parser treats the connection as a tunnel and aiohttp lingers ~10 s before closing.
    """
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request_line + b"\r\nHost: proxy.test\r\nConnection: close\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        status_line, *header_lines = head.decode("latin-1").strip().split("\r\n")
        pairs = (line.split(":", 1) for line in header_lines)
        headers = {name.strip().lower(): value.strip() for name, value in pairs}
        length = headers.get("content-length")
        body = reader.readexactly(int(length)) if length is not None else reader.read()
        return Reply(int(status_line.split(" ")[1]), headers, await asyncio.wait_for(body, timeout=5))
    finally:
        writer.close()


@pytest.fixture
async def served(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[TestServer, Recorder]:
    recorder = Recorder()
    return await aiohttp_server(make_app(recorder)), recorder


# --------------------------------------------------------------------------- accepted

ACCEPTED = [
    (
        b"GET /partner/v1/applications/app%20x?x=1 HTTP/1.1",
        {
            "path": "/partner/v1/applications/app%20x",
            "query": "x=1",
            "segments": ["partner", "v1", "applications", "app x"],
        },
    ),
    (b"GET /a/b/?q=1?2 HTTP/1.1", {"path": "/a/b/", "query": "q=1?2", "segments": ["a", "b"]}),
    (b"POST /a%2eb/%C3%A9 HTTP/1.1", {"path": "/a%2eb/%C3%A9", "query": "", "segments": ["a.b", "\u00e9"]}),
    (b"OPTIONS /a HTTP/1.1", {"path": "/a", "query": "", "segments": ["a"]}),
]


@pytest.mark.parametrize(("line", "expected"), ACCEPTED, ids=[c[0].decode() for c in ACCEPTED])
async def test_safe_targets_reach_the_handler_unchanged(
    served: tuple[TestServer, Recorder], line: bytes, expected: dict[str, object]
) -> None:
    server, recorder = served
    reply = await exchange(server, line)
    assert reply.status == 200, reply.body
    assert json.loads(reply.body) == expected
    assert recorder.reached == [expected["path"]]


# --------------------------------------------------------------------------- refused


@dataclass(frozen=True)
class Refusal:
    line: bytes
    seen: str | dict[str, str | None] | None  # raw_path our validator gets: one value, or per parser
    reason: str = ""  # words our description must contain when we are the one refusing

    def seen_under(self, kind: str) -> str | None:
        return self.seen[kind] if isinstance(self.seen, dict) else self.seen


REFUSED = [
    # absolute-form: raw_path keeps scheme and host; request.path would be "/a/b", request.host "evil.example"
    Refusal(b"GET http://evil.example/a/b?x=1 HTTP/1.1", "http://evil.example/a/b?x=1", "absolute-form"),
    Refusal(b"GET HTTP://evil.example/a HTTP/1.1", "HTTP://evil.example/a", "absolute-form"),
    Refusal(b"GET https://evil.example HTTP/1.1", "https://evil.example", "absolute-form"),
    Refusal(
        b"GET http://u:p@evil.example:8080/a HTTP/1.1", "http://u:p@evil.example:8080/a", "absolute-form"
    ),
    # CONNECT: authority-form raw_path, request.path ""; and CONNECT with a path-looking target
    Refusal(b"CONNECT evil.example:443 HTTP/1.1", "evil.example:443", "method CONNECT"),
    Refusal(b"CONNECT /a HTTP/1.1", "/a", "method CONNECT"),
    Refusal(
        b"connect evil.example:443 HTTP/1.1", {"c": None, "python": "evil.example:443"}, "method CONNECT"
    ),
    Refusal(b"GET evil.example:443 HTTP/1.1", None),
    Refusal(b"GET a/b HTTP/1.1", None),
    # asterisk-form: allowed by the parsers for OPTIONS only
    Refusal(b"OPTIONS * HTTP/1.1", "*", "asterisk-form"),
    Refusal(b"GET * HTTP/1.1", None),
    Refusal(b"TRACE /a HTTP/1.1", "/a", "method TRACE"),
    # dot-segments and separators: the parsers pass them all through untouched
    Refusal(b"GET /a/../b HTTP/1.1", "/a/../b", "dot-segment"),
    Refusal(b"GET /a/./b HTTP/1.1", "/a/./b", "dot-segment"),
    Refusal(b"GET /a/%2e%2e/b HTTP/1.1", "/a/%2e%2e/b", "dot-segment"),
    Refusal(b"GET /a/.%2E/b HTTP/1.1", "/a/.%2E/b", "dot-segment"),
    Refusal(b"GET /a/%252e%252e/b HTTP/1.1", "/a/%252e%252e/b", "double-encoded"),
    Refusal(b"GET //evil.example/x HTTP/1.1", "//evil.example/x", "starts with '//'"),
    Refusal(b"GET /a//b HTTP/1.1", "/a//b", "empty segment"),
    Refusal(b"GET /a\\b HTTP/1.1", "/a\\b", "backslash"),
    Refusal(b"GET /a\\..\\b HTTP/1.1", "/a\\..\\b", "backslash"),
    Refusal(b"GET /a%5Cb HTTP/1.1", "/a%5Cb", "encodes '\\'"),
    Refusal(b"GET /a%2Fb HTTP/1.1", "/a%2Fb", "encodes '/'"),
    Refusal(b"GET /a;b HTTP/1.1", "/a;b", "path parameters"),
    Refusal(b"GET /a|b HTTP/1.1", "/a|b", "not allowed unencoded"),
    # fragments reach us (request.path silently drops them)
    Refusal(b"GET /a#frag HTTP/1.1", "/a#frag", "fragment"),
    Refusal(b"GET /a?b#c HTTP/1.1", "/a?b#c", "fragment"),
    # control characters: raw ones never get past either parser; encoded ones do
    Refusal(b"GET /a\x00b HTTP/1.1", None),
    Refusal(b"GET /a\x01b HTTP/1.1", None),
    Refusal(b"GET /a\x7fb HTTP/1.1", None),
    Refusal(b"GET /a\tb HTTP/1.1", None),
    Refusal(b"GET /a?x=\x1b HTTP/1.1", None),
    Refusal(b"GET /a%00b HTTP/1.1", "/a%00b", "U+0000"),
    Refusal(b"GET /a%0D%0AX:1 HTTP/1.1", "/a%0D%0AX:1", "U+000D"),
    # raw non-ASCII: llhttp refuses it; the Python parser decodes it (surrogateescape) and passes it on
    Refusal(b"GET /caf\xc3\xa9 HTTP/1.1", {"c": None, "python": "/caf\u00e9"}, "non-ASCII"),
    Refusal(b"GET /a\x80 HTTP/1.1", {"c": None, "python": "/a\udc80"}, "non-ASCII"),
    Refusal(b"GET /a?x=\xff HTTP/1.1", {"c": None, "python": "/a?x=\udcff"}, "non-ASCII"),
    # encoded invalid UTF-8 reaches us under both
    Refusal(b"GET /a/%C0%AF HTTP/1.1", "/a/%C0%AF", "UTF-8"),
    Refusal(b"GET /a/%ED%A0%80 HTTP/1.1", "/a/%ED%A0%80", "UTF-8"),
    # over aiohttp's 8190-byte request-line limit
    Refusal(b"GET /" + b"a" * 9000 + b" HTTP/1.1", None),
]


@pytest.mark.parametrize("case", REFUSED, ids=[repr(c.line[:48])[2:-1] for c in REFUSED])
async def test_unsafe_targets_get_400_and_never_reach_the_handler(
    served: tuple[TestServer, Recorder], case: Refusal
) -> None:
    server, recorder = served
    reply = await exchange(server, case.line)
    assert reply.status == 400, reply.body
    assert recorder.reached == []
    seen = case.seen_under(parser_kind())
    if seen is None:  # aiohttp's parser refused it; our code never ran
        assert recorder.validated == []
        assert "x-credicorp-proxy-error" not in reply.headers
        return
    assert recorder.validated == [seen]
    assert reply.headers["x-credicorp-proxy-error"] == "bad_request"
    body = json.loads(reply.body)
    assert body["error"] == "bad_request" and case.reason in body["error_description"]


# --------------------------------------------------------------------------- both parsers


def test_the_expected_parser_is_in_use() -> None:
    """Guards the cross-parser run: a silent fallback would test one parser twice."""
    check_expected_parser(INNER_ENV)


@pytest.mark.skipif(INNER_ENV in os.environ, reason="this is the inner run")
def test_wire_cases_also_pass_under_the_pure_python_parser() -> None:
    rerun_under_pure_python(__file__, INNER_ENV)
