"""Which headers cross the proxy, in each direction.

Request headers are filtered *before* the token is attached, so nothing a
client sends (``Connection: Authorization``, a second ``Authorization``, a
``Proxy-Authorization``) can remove, replace or duplicate the proxy's own
credential. Framing headers are never copied: the proxy's HTTP client frames
the body it actually sends, which closes the door on request smuggling.

Names spelled with ``_`` for ``-`` are compared as the dashed name: CGI-style
servers (WSGI, PHP, many gateways) map both to the same variable
(``Proxy_Authorization`` and ``Proxy-Authorization`` are both
``HTTP_PROXY_AUTHORIZATION``), so a lookalike of a header the proxy drops or
sets itself would reach the API as that header. nginx drops every underscored
name by default; the proxy drops only the lookalikes and keeps the rest.

Method and URL override headers (``X-HTTP-Method-Override``, ``X-Original-URL``
and the rest of ``upstream.strip_headers``) are stripped, not refused. The
route table chose the token for the request line it matched; a gateway or
framework that honours an override would spend that token on another method
or path. Stripping keeps the request's meaning the one that was checked, and
does not break clients whose libraries add such a header on their own (PATCH
tunnelled as POST); a client that depended on one gets the plain request its
request line says, which the route table did allow.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

#: RFC 9110 §7.6.1 hop-by-hop headers, plus the proxy-auth family and framing.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
#: Never forwarded upstream: credentials the client must not hold, framing the client chose,
#: and the client's Host (the upstream Host comes from the configured origin).
REQUEST_DROP: Final = HOP_BY_HOP | {"authorization", "host", "content-length", "expect"}
FORWARDED: Final = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"})
#: Headers the proxy writes itself; a client's underscore lookalike of one is dropped.
#: (Lookalikes of the configured ``upstream.strip_headers`` and of ``REQUEST_DROP`` are dropped
#: because the comparison is made on the dashed, lower-cased name.)
PROXY_SET: Final = frozenset({"x-request-id"}) | FORWARDED
#: Framing of the response is re-done by our server; everything else passes through as sent.
RESPONSE_DROP: Final = HOP_BY_HOP | {"content-length"}


def _connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    listed: set[str] = set()
    for value in headers.getall("Connection", ()):
        listed.update(name.strip().lower().replace("_", "-") for name in value.split(",") if name.strip())
    return listed


def header_names(names: Iterable[str]) -> frozenset[str]:
    """Names as ``upstream_request_headers`` compares them: lower-case, ``_`` read as ``-``."""
    return frozenset(name.lower().replace("_", "-") for name in names)


def request_drop(*, replace_forwarded: bool = False, strip: frozenset[str] = frozenset()) -> frozenset[str]:
    """Every name ``upstream_request_headers`` drops whatever the request says, computed once per config.

    ``strip`` (from ``header_names``) are further names never forwarded: the method and URL
    override headers by default; ``replace_forwarded`` drops the client's forwarding headers,
    which the proxy then writes itself.
    """
    return REQUEST_DROP | strip | (FORWARDED if replace_forwarded else frozenset())


def upstream_request_headers(
    incoming: CIMultiDictProxy[str], *, drop: frozenset[str] = REQUEST_DROP
) -> CIMultiDict[str]:
    """The client's end-to-end headers, minus ``drop`` (``request_drop``) and what ``Connection`` names."""
    listed = _connection_listed(incoming)
    if listed:
        drop = drop | listed
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lowered = name.lower()
        if "_" in lowered:
            lowered = lowered.replace("_", "-")
            if lowered in PROXY_SET:
                continue
        if lowered not in drop and not lowered.startswith("proxy-"):
            out.add(name, value)
    return out


def downstream_response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The API's end-to-end response headers (Set-Cookie and other repeats kept)."""
    drop = RESPONSE_DROP | _connection_listed(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lowered = name.lower()
        if lowered not in drop and not lowered.startswith("proxy-"):
            out.add(name, value)
    return out
