"""The client side of the admin listener's ``GET /healthz``, for the image's HEALTHCHECK.

Plain ``http.client`` over TCP or a Unix socket: the check runs every few
seconds in every container, so it must start fast and load nothing of the
server (no aiohttp, no Redis client, no metrics).
"""

from __future__ import annotations

import http.client
import socket

from proxy.settings import ListenAddress

#: A bind-all admin listener is probed on loopback.
_LOOPBACK_FOR = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


def get_healthz(address: ListenAddress, *, timeout: float) -> int:
    """The status ``/healthz`` answered; ``OSError`` when nothing answers (refused, timed out, no socket)."""
    if address.unix_path:
        connection: http.client.HTTPConnection = _UnixHTTPConnection(address.unix_path, timeout)
    else:
        host = _LOOPBACK_FOR.get(address.host, address.host)
        connection = http.client.HTTPConnection(host, address.port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status
    finally:
        connection.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket (the admin listener may be ``unix:/path``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock
