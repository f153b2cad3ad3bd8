"""Ending client connections: deliver every byte that was promised, reset what was cut.

Two ways a response can end short are dangerous because they look fine:

* a handler is done once its last bytes are *buffered*; ``close()`` only
  schedules their flush, so a process that exits right after drops the tail
  of a download its access log records as a complete 200;
* ``abort()`` closes the socket, and the kernel still delivers what it holds
  and then a clean FIN. A close-delimited body cut there looks complete.

So a drain waits for the buffers to empty (within the grace period), and a
cut connection is reset with ``SO_LINGER`` 0, so the client gets a TCP RST and
knows the body is incomplete.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time

from aiohttp import web

_LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends RST, discards the queue
_POLL_S = 0.01


def reset(transport: asyncio.Transport | None) -> None:
    """Close with a TCP reset, so a truncated body can never look complete.

    Transports are duck-typed throughout: uvloop's do not subclass asyncio's.
    """
    if transport is None:
        return
    if _flushed(transport):
        return  # already closed with nothing left to cut, and asyncio would fail on abort()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already shut down by the peer: abort() still applies
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def client_transports(runner: web.ServerRunner) -> list[asyncio.Transport]:
    """The listener's live client connections, taken before aiohttp's shutdown lets go of them."""
    server = runner.server
    handlers = server.connections if server is not None else []
    return [h.transport for h in handlers if h.transport is not None]


async def flush_or_reset(transports: list[asyncio.Transport], deadline: float) -> None:
    """Wait until each closed connection has handed its buffered bytes to the kernel.

    Called after aiohttp's shutdown has closed them; returns at once when
    nothing is buffered. Connections still holding bytes at ``deadline``
    (``time.monotonic()``) belong to cut requests or a reader that stopped,
    and are reset.
    """
    pending = [t for t in transports if not _flushed(t)]
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(_POLL_S)
        pending = [t for t in pending if not _flushed(t)]
    for transport in pending:
        reset(transport)


def _flushed(transport: asyncio.Transport) -> bool:
    return transport.is_closing() and transport.get_write_buffer_size() == 0
