"""Fault injection for the emulator: what ``POST /_emulator/faults`` accepts.

Faults exist so the proxy's failure handling (back-off, retry-once, timeouts,
resets mid-body) can be tested against real sockets instead of mocks. A POST
replaces the whole fault set (``{}`` clears it); counted faults are consumed
one per request and disappear at zero, latencies stay until cleared.

Knobs (all optional):

=====================  =========================================================
``token_status``       next ``token_count`` token requests answer this status:
                       503 ``temporarily_unavailable`` JSON, 429 ``slow_down``
                       JSON with ``Retry-After``, 500 a plain-text server error,
                       anything else an OAuth-style JSON error
``token_body``         raw text answered (status ``token_status`` or 200) to the
                       next ``token_count`` token requests: malformed responses
``token_count``        how many token requests the two knobs above hit (default 1)
``token_retry_after``  ``Retry-After`` seconds for an injected 429/503
``token_latency_ms``   delay before every token response while set
``token_drop``         ``before_headers`` (close without answering) or
                       ``after_headers`` (headers + part of the body, then close)
``token_drop_count``   how many token requests are dropped (default 1)
``api_status``         next ``api_count`` partner/v1 requests answer this status
                       (401 defaults to an ``invalid_token`` body and challenge)
``api_count``          default 1
``api_headers``        extra headers (object of strings) for the injected status
``api_body``           raw body for the injected status
``api_latency_ms``     delay before every API response while set
``api_drop``           ``before_headers`` / ``after_headers`` as for the token endpoint
``api_drop_count``     default 1
=====================  =========================================================
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from aiohttp import web

DROP_MODES = ("before_headers", "after_headers")
_COUNT_DEFAULTS = {
    "token_count": ("token_status", "token_body"),
    "token_drop_count": ("token_drop",),
    "api_count": ("api_status",),
    "api_drop_count": ("api_drop",),
}


class FaultSpecError(ValueError):
    """A fault object the emulator cannot honour; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(slots=True)
class Faults:
    """The active fault set. Counts are remaining requests, decremented as faults fire."""

    token_status: int | None = None
    token_body: str | None = None
    token_count: int = 0
    token_retry_after: int | None = None
    token_latency_ms: float = 0.0
    token_drop: str | None = None
    token_drop_count: int = 0
    api_status: int | None = None
    api_count: int = 0
    api_headers: dict[str, str] = field(default_factory=dict)
    api_body: str | None = None
    api_latency_ms: float = 0.0
    api_drop: str | None = None
    api_drop_count: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def take_token_drop(self) -> str | None:
        """The drop mode for this token request, consuming one count."""
        if self.token_drop and self.token_drop_count > 0:
            self.token_drop_count -= 1
            return self.token_drop
        return None

    def take_token_status(self) -> tuple[int, str | None] | None:
        """(status, raw body or None) for this token request, consuming one count."""
        if (self.token_status is not None or self.token_body is not None) and self.token_count > 0:
            self.token_count -= 1
            return (self.token_status or 200, self.token_body)
        return None

    def take_api_drop(self) -> str | None:
        if self.api_drop and self.api_drop_count > 0:
            self.api_drop_count -= 1
            return self.api_drop
        return None

    def take_api_status(self) -> int | None:
        if self.api_status is not None and self.api_count > 0:
            self.api_count -= 1
            return self.api_status
        return None


_INT_KNOBS = {"token_status", "token_count", "token_retry_after", "token_drop_count"} | {
    "api_status",
    "api_count",
    "api_drop_count",
}
_NUMBER_KNOBS = {"token_latency_ms", "api_latency_ms"}
_TEXT_KNOBS = {"token_body", "api_body"}
_DROP_KNOBS = {"token_drop", "api_drop"}
KNOWN_KNOBS = tuple(f.name for f in fields(Faults))


def _check(name: str, value: Any) -> str | None:
    """Why ``value`` is not acceptable for knob ``name``, or None when it is."""
    if name in _INT_KNOBS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{name}: must be a non-negative integer"
        if name.endswith("_status") and not 100 <= value <= 599:
            return f"{name}: must be an HTTP status (100-599)"
    elif name in _NUMBER_KNOBS:
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            return f"{name}: must be a non-negative number of milliseconds"
    elif name in _TEXT_KNOBS:
        if not isinstance(value, str):
            return f"{name}: must be a string"
    elif name in _DROP_KNOBS:
        if value not in DROP_MODES:
            return f"{name}: must be one of {', '.join(DROP_MODES)}"
    elif name == "api_headers" and (
        not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values())
    ):
        return "api_headers: must be an object of string values"
    return None


def parse_faults(obj: Any) -> Faults:
    """Validate a ``POST /_emulator/faults`` body into a fresh fault set.

    Every problem is reported at once (unknown knobs are named), so a test
    author fixes a typo in one round trip instead of wondering why nothing failed.
    """
    if not isinstance(obj, dict):
        raise FaultSpecError(["the fault set must be a JSON object"])
    problems = [f"unknown knob {k!r} (known: {', '.join(KNOWN_KNOBS)})" for k in obj if k not in KNOWN_KNOBS]
    problems += [p for k, v in obj.items() if k in KNOWN_KNOBS and (p := _check(k, v))]
    if problems:
        raise FaultSpecError(problems)
    values = dict(obj)
    for count, triggers in _COUNT_DEFAULTS.items():
        if count not in values and any(values.get(t) is not None for t in triggers):
            values[count] = 1
    return Faults(**values)


async def delay(ms: float) -> None:
    """Sleep ``ms`` milliseconds; a plain await, so a cancelled handler stops at once."""
    if ms > 0:
        await asyncio.sleep(ms / 1000)


def drop_before_headers(request: web.BaseRequest) -> web.Response:
    """Close the connection without answering.

    The returned response is never written: aiohttp sees the closed transport
    and treats it as a client disconnect, which keeps the server log quiet.
    """
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=500)


async def drop_after_headers(request: web.BaseRequest, content_type: str) -> web.StreamResponse:
    """Send headers promising 1024 bytes, send 100 of them, then close the connection."""
    response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
    response.content_length = 1024
    await response.prepare(request)
    await response.write(b'{"partial": "' + b"x" * 87)
    if request.transport is not None:
        request.transport.close()  # flushes what was written, then FIN: a truncated body
    return response
