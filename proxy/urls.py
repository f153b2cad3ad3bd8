"""The rule for a URL a token or a client secret may be sent to, shared by config and discovery.

One rule, in one place: a URL the operator configures (``upstream.url``,
``auth.issuer``, ``auth.token_endpoint``) and a URL the issuer's discovery
document names (``token_endpoint``, ``jwks_uri``) must both pass it, so a
document can never point the proxy somewhere a config file could not. It lives
outside ``proxy.config`` because the token layer needs it at run time
and has no business importing the config loader.

Each failure carries a short ``rule`` label (for a log field) besides the
message a config error shows, so the discovery path can say which rule broke
without echoing the URL, which may carry userinfo or a query.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from proxy.redact import mask_url
from proxy.wording import show

#: A DNS host name in ASCII: labels of letters, digits and inner hyphens, an optional final dot.
HOSTNAME: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


@dataclass(frozen=True, slots=True)
class UrlProblem:
    """Why a URL may not receive a token or a secret.

    ``rule`` is one of a fixed set of labels (``not_a_url``, ``scheme``, ``userinfo``,
    ``query_or_fragment``, ``path``, ``cleartext``) and never holds any part of the URL.
    """

    rule: str
    message: str


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal; no name resolution (a name is judged as written)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_problem(url: str, *, origin: bool = False) -> UrlProblem | None:
    """The first rule ``url`` breaks: http(s), no userinfo, query or fragment, TLS unless loopback."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return UrlProblem("not_a_url", f"not a valid URL {show(mask_url(url))}: {exc}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return UrlProblem("scheme", f"expected an http(s) URL, got {show(mask_url(url))}")
    if parts.username is not None or parts.password is not None:
        return UrlProblem("userinfo", "must not contain credentials (user:password@)")
    if parts.query or parts.fragment:
        return UrlProblem("query_or_fragment", "must not have a query or a fragment")
    if origin and parts.path not in ("", "/"):
        return UrlProblem(
            "path", f"must be an origin (scheme://host[:port]) without a path, got path {show(parts.path)}"
        )
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        return UrlProblem(
            "cleartext",
            "http:// is only allowed to a loopback host: a token or secret sent in clear can be stolen",
        )
    return None


def check_url(url: str, *, origin: bool = False) -> str | None:
    """An http(s) URL a token or secret may be sent to: TLS unless the host is loopback."""
    problem = url_problem(url, origin=origin)
    return problem.message if problem else None
