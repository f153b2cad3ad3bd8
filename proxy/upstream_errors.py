"""What a failed call to the Credicorp API means to the client, in one ordered table.

aiohttp's client exceptions form a lattice, not a tree: ``ConnectionTimeoutError``
is a ``ServerTimeoutError``, which is both a ``TimeoutError`` and an
``OSError``; ``ClientConnectorCertificateError`` is an ``OSError`` and a
``ValueError``. So the first row that matches decides, and the order of the
rows is the policy: a connect that timed out means the API is unreachable
(502), not slow (504), so its row comes before the timeouts; a broken read of
the client's own body is the client's doing, so its row comes before the
catch-all for the rest of ``ClientError``. ``tests/test_upstream_errors.py``
names the intended answer for every aiohttp client exception class and fails
when aiohttp adds one, so a new class is a decision, not an accident of the
catch-all.

Anything no row matches (a bug of ours, say) is not turned into a 502: the
caller re-raises it as is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import aiohttp

from proxy import errors


def _connect_timed_out(exc: BaseException) -> Exception:
    return errors.UpstreamUnreachable("cannot reach the Credicorp API (connect timed out)")


def _no_answer_in_time(exc: BaseException) -> Exception:
    return errors.UpstreamTimeout("the Credicorp API did not answer in time")


def _client_body_broke(exc: BaseException) -> Exception:
    return errors.ClientGone()


def _unreachable(exc: BaseException) -> Exception:
    return errors.UpstreamUnreachable(f"cannot reach the Credicorp API ({type(exc).__name__})")


#: (exception class, what it becomes), first match wins.
UPSTREAM_ERRORS: Final[tuple[tuple[type[BaseException], Callable[[BaseException], Exception]], ...]] = (
    (aiohttp.ConnectionTimeoutError, _connect_timed_out),  # never connected: unreachable, not slow
    (aiohttp.ServerTimeoutError, _no_answer_in_time),  # sock_read: the API went silent
    (TimeoutError, _no_answer_in_time),  # our own deadline for the response head (timeout_s)
    (aiohttp.ClientPayloadError, _client_body_broke),  # reading the client's body failed
    (aiohttp.ClientError, _unreachable),
    (OSError, _unreachable),
)


def map_upstream_error(exc: BaseException) -> Exception | None:
    """The error to answer the client with, or None for an exception the table does not know.

    One case comes before the table: aiohttp wraps whatever a streamed request
    body raised while it was being sent, and the listener fails the client's body
    stream with a proxy error of its own (a body that went silent past
    ``limits.body_timeout_s`` is ``408``, broken chunked framing ``400``). The
    client gets that answer, not a ``502`` for an API that did nothing wrong.
    """
    cause = exc.__cause__
    if isinstance(cause, errors.ProxyError):
        return type(cause)(cause.description)
    for cls, mapped in UPSTREAM_ERRORS:
        if isinstance(exc, cls):
            return mapped(exc)
    return None
