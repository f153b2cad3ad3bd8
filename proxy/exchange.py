"""The record of one request through the proxy: its id, what it did, and where that is written.

An ``Exchange`` is filled in along the request path and written once at the
end, as one access-log line and the request metrics, however the request
ended. It records; it steers nothing (what the request path needs to decide
travels with the outbound request instead).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from proxy.logs import write_request_line
from proxy.metrics import Metrics

NO_ROUTE: Final = "(none)"
#: The method label: a bounded set, whatever method a client sends.
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(slots=True)
class Exchange:
    """What one request did, for the access log and metrics."""

    request_id: str
    method: str
    route: str = NO_ROUTE
    status: int = 0
    upstream_status: int | None = None
    upstream_s: float = 0.0
    retried: bool = False
    error: str | None = None
    token_digest: str | None = None
    started: float = field(default_factory=time.perf_counter)


class Recorder:
    """Writes each finished ``Exchange`` to the request metrics and the access log."""

    def __init__(self, metrics: Metrics, *, access_log_enabled: bool = True) -> None:
        self._metrics = metrics
        self._access_log = access_log_enabled
        # Metric children by label values, so the hot path skips prometheus-client's labels() lookup.
        self._request_counters: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[str, Any] = {}

    def record(self, ex: Exchange) -> None:
        counter = self._request_counters.get((ex.route, ex.method, ex.status))
        if counter is None:  # label values come from the config and status codes: a bounded set
            counter = self._metrics.requests.labels(ex.route, ex.method, str(ex.status))
            self._request_counters[(ex.route, ex.method, ex.status)] = counter
        counter.inc()
        if ex.upstream_status is not None:
            histogram = self._durations.get(ex.route)
            if histogram is None:
                histogram = self._durations[ex.route] = self._metrics.request_duration.labels(ex.route)
            histogram.observe(ex.upstream_s)
        if self._access_log:
            write_request_line(
                {
                    "event": "request",
                    "request_id": ex.request_id,
                    "method": ex.method,
                    "route": ex.route,
                    "status": ex.status,
                    "upstream_status": ex.upstream_status,
                    "duration_ms": round((time.perf_counter() - ex.started) * 1000, 2),
                    "upstream_ms": round(ex.upstream_s * 1000, 2),
                    "retried": ex.retried,
                    "proxy_error": ex.error,
                    "token_digest": ex.token_digest,
                }
            )


class _RequestIds:
    """Unique request ids without a syscall per request: a random per-process prefix plus a counter.

    Ids must be unique (to join log lines across services), not unpredictable,
    so ``uuid4`` (an ``os.urandom`` call and an object per request) is not needed.
    The prefix is redrawn in a forked child so two workers never share it.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_IDS = _RequestIds()


def request_id(request: web.BaseRequest) -> str:
    """The client's ``X-Request-Id`` when it is a sane one, else a new id."""
    supplied = request.headers.get("X-Request-Id")
    return supplied if supplied and _REQUEST_ID.fullmatch(supplied) else _IDS.next()
