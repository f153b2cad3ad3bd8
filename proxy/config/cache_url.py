"""``cache.url``: one parser for the shared cache's URL, used by validation and by the Redis connection.

The forms: ``memory://``; ``redis[s]://[auth@]host[:port][/db]``;
``unix://[auth@]/path.sock``; ``redis+sentinel://[auth@]h:p[,h:p...]/service_name[/db]``;
``redis[s]+cluster://[auth@]h:p[,h:p...]``. Query options (``?db=``,
``?password=``) pass through to the client.

Validation and ``proxy.tokens.redis_connect.connect`` both read the URL through
``parse_cache_url``, so a URL the config accepts is exactly one the connection
understands, split the same way. A problem raises ``ValueError`` with the
message a config error shows; it quotes the URL only masked (``mask_url``): a
mistyped scheme must not print the password that follows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import unquote

from proxy.config.addresses import host_port
from proxy.redact import mask_url
from proxy.wording import show

__all__ = ["CacheUrl", "Topology", "check_cache_url", "parse_cache_url"]

Topology = Literal["memory", "standalone", "sentinel", "cluster"]

#: scheme -> (what may follow the host list, as a regex; the same, for humans).
_REDIS_PATHS: Final = {
    "redis": (r"(/\d+)?/?", "[/db]"),
    "rediss": (r"(/\d+)?/?", "[/db]"),
    "redis+sentinel": (r"/[^/]+(/\d+)?/?", "/service_name[/db]"),
    "redis+cluster": (r"/?", "no path"),
    "rediss+cluster": (r"/?", "no path"),
}


@dataclass(frozen=True, slots=True)
class CacheUrl:
    """What a valid ``cache.url`` names. The password never shows in a repr (it lands in logs)."""

    scheme: str  # lower-case: memory, unix, redis, rediss, redis+sentinel, redis+cluster, rediss+cluster
    hosts: tuple[tuple[str, int | None], ...] = ()  # every node, as written; none for memory:// and unix://
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int | None = None  # from the path; None when the path names none
    service: str | None = None  # the Sentinel service name
    socket_path: str | None = None  # unix:// only
    options: str = ""  # the query, as written, for the client

    @property
    def topology(self) -> Topology:
        if self.scheme == "memory":
            return "memory"
        if self.scheme == "redis+sentinel":
            return "sentinel"
        return "cluster" if self.scheme.endswith("+cluster") else "standalone"

    @property
    def tls(self) -> bool:
        return self.scheme in ("rediss", "rediss+cluster")

    def nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node: Sentinel and Cluster URLs name a port for each (checked)."""
        return [(host, port) for host, port in self.hosts if port is not None]


def parse_cache_url(url: str) -> CacheUrl:
    """Split and check ``url``; ``ValueError`` says what is wrong, in the config error's words."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and "@" in rest and any(ch in rest[: rest.rfind("@")] for ch in "/?#"):
        # The client would end the host part at that character and read the rest of the
        # password as the path; the pieces this check would then quote hold part of it.
        raise ValueError(
            "percent-encode '/', '?' and '#' in the user and password (%2F, %3F, %23)"
            " and an '@' after the host (%40)"
        )
    if sep and scheme in ("memory", "unix"):
        return _local(scheme, rest)
    if not sep or scheme not in _REDIS_PATHS:
        raise ValueError(
            f"expected memory://, unix:// or a {', '.join(_REDIS_PATHS)} URL, got {show(mask_url(url))}"
        )
    location, _, options = rest.partition("?")
    netloc, slash, tail = location.partition("/")
    userinfo, _, host_list = netloc.rpartition("@")
    hosts = host_list.split(",")
    if scheme in ("redis", "rediss") and len(hosts) > 1:
        raise ValueError("one host only; use redis+sentinel:// or redis+cluster:// for several")
    nodes = tuple(host_port(host) for host in hosts)
    if "+" in scheme and any(port is None for _, port in nodes):
        raise ValueError(f"{scheme}:// needs host:port for every node")
    pattern, expected = _REDIS_PATHS[scheme]
    if not re.fullmatch(pattern, slash + tail):
        raise ValueError(f"{scheme}:// takes {expected} after the host, got {show(slash + tail)}")
    service, db = _path(scheme, tail)
    username, password = _auth(userinfo)
    return CacheUrl(scheme, nodes, username, password, db=db, service=service, options=options)


def check_cache_url(url: str) -> str | None:
    """The config check of ``cache.url``: the parser's message, or None when the URL is fine."""
    try:
        parse_cache_url(url)
    except ValueError as exc:
        return str(exc)
    return None


def _local(scheme: str, rest: str) -> CacheUrl:
    """``memory://`` (nothing after it) or ``unix://[auth@]/absolute/path.sock[?options]``."""
    userinfo, _, after = rest.rpartition("@")
    if scheme == "memory" and rest == "":
        return CacheUrl("memory")
    if scheme == "unix" and after.startswith("/"):
        socket_path, _, options = after.partition("?")
        username, password = _auth(userinfo)
        return CacheUrl("unix", (), username, password, socket_path=socket_path, options=options)
    raise ValueError("expected memory:// or unix:///absolute/path.sock")


def _path(scheme: str, tail: str) -> tuple[str | None, int | None]:
    """(service, db) from the checked path; a ``#fragment`` is no part of a service name."""
    parts = [part for part in tail.partition("#")[0].split("/") if part]
    if scheme == "redis+sentinel":
        return parts[0], int(parts[1]) if len(parts) > 1 else None
    return None, int(parts[0]) if parts else None


def _auth(userinfo: str) -> tuple[str | None, str | None]:
    """``user[:password]``, percent-decoded; an empty part is none."""
    user, _, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) or None
