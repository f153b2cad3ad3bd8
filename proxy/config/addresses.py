"""The address grammars the config shares: ``host[:port]`` and a listen address.

``host[:port]`` is one rule for every place a host is written (``listen``,
``admin_listen``, each node of ``cache.url``): an IP literal must be a valid
address, a name a DNS host name, a port at most 65535.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from proxy.settings import ListenAddress
from proxy.urls import HOSTNAME
from proxy.wording import show

__all__ = ["host_port", "parse_listen"]


def parse_listen(text: str) -> ListenAddress:
    """``host:port``, ``[v6]:port`` or ``unix:/absolute/path`` (port 0 = any free port, for tests)."""
    if text.startswith("unix:"):
        if not text[5:].startswith("/"):
            raise ValueError(f"expected unix:/absolute/path, got {show(text)}")
        return ListenAddress(host="", port=0, unix_path=text[5:])
    host, port = host_port(text) if ":" in text else ("", None)
    if port is None:
        raise ValueError(f"expected host:port, [v6]:port or unix:/path, got {show(text)}")
    return ListenAddress(host, port)


_HOST_PORT: Final = re.compile(
    r"\[(?P<v6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<host>[^:\[\]/\s@,]+)(?::(?P<port>\d+))?"
)


def host_port(text: str) -> tuple[str, int | None]:
    """Split and check ``host[:port]``; ``ValueError`` if the host or port is not valid."""
    m = _HOST_PORT.fullmatch(text)
    host = (m["v6"] or m["host"]) if m else ""
    port = (m["p6"] or m["port"]) if m else None
    try:
        if m and m["v6"]:
            ipaddress.IPv6Address(host)
        elif m and re.fullmatch(r"[\d.]+", host):
            ipaddress.IPv4Address(host)
        elif not HOSTNAME.fullmatch(host):
            raise ValueError
    except ValueError:
        raise ValueError(f"not a valid host[:port]: {show(text)}") from None
    if port is not None and int(port) > 65535:
        raise ValueError(f"port out of range in {show(text)}")
    return host, None if port is None else int(port)
