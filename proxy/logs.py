"""JSON-lines logging with a redaction safety net.

Every record becomes one JSON object; structured fields come from ``extra=``.
Code never logs a token or secret on purpose (``Token`` and ``Credentials``
hide them from ``repr``), and as a second line of defence every rendered
line is scrubbed of bearer values, JWT-shaped strings and secret-named
fields (at any depth of a structured field) before it is written.

The request id of the request being served travels in a context variable
(``REQUEST_ID``), so a token event logged inside a mint that a request
triggered carries that request's id without every layer passing it along.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, TextIO

_RESERVED: Final = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_SECRET_FIELDS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "proxy_authorization",
        "access_token",
        "refresh_token",
        "id_token",
        "client_secret",
        "secret",
        "token",
        "password",
        "cookie",
        "set-cookie",
    }
)
_REDACTED: Final = "[redacted]"
_MAX_DEPTH: Final = 6
_BEARER: Final = re.compile(r"(?i)\b(bearer|basic)(\s+|%20|\+)[A-Za-z0-9._~+/=%-]{8,}")
_JWT: Final = re.compile(r"\beyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*")
# name=value (form bodies, query strings) and "name": "value" (dict reprs, JSON, also
# JSON escaped inside a JSON string: \"name\": \"value\").
_NAMED_SECRET: Final = re.compile(
    r"(?i)\b(client_secret|access_token|refresh_token|id_token|password)"
    r"((?:\\?[\"'])?\s*[:=]\s*(?:\\?[\"'])?)"
    r"([^&\s\"'\\,}\][]+)"
)

#: The id of the request being served (set by the forwarding handler), or None.
REQUEST_ID: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar("ccp_request_id", default=None)

_SCALARS: Final = frozenset({str, int, float, bool})
#: One encoder for every line (``json.dumps`` with options builds a new one per call).
_ENCODER: Final = json.JSONEncoder(default=str, separators=(",", ":"))
_LEVEL_ALIASES: Final = {"warn": "WARNING", "fatal": "CRITICAL"}


#: Each pattern above needs one of these literally (case-insensitively), so a line holding none
#: of them is returned untouched without running the three substitutions (the access-log case).
_NEEDLES: Final = (
    "bearer", "basic", "client_secret", "access_token", "refresh_token", "id_token", "password"
)


def scrub(text: str) -> str:
    """Remove anything shaped like a credential from ``text``."""
    if text.isascii() and "eyJ" not in text:  # non-ASCII: re's case folding is wider than lower()
        lowered = text.lower()
        if not any(needle in lowered for needle in _NEEDLES):
            return text
    text = _BEARER.sub(lambda m: f"{m.group(1)} {_REDACTED}", text)
    text = _JWT.sub(_REDACTED, text)
    return _NAMED_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{_REDACTED}", text)


def redact(value: Any, depth: int = 0) -> Any:
    """``value`` with every secret-named mapping key's value replaced, at any nesting depth.

    Why: a structured field such as ``headers`` or ``form`` may hold a secret under
    a harmless top-level name; the regex scrub is the backstop, this is the rule.
    """
    if value is None or type(value) in _SCALARS:
        return value
    if depth > _MAX_DEPTH:
        return "[too deep]"
    if isinstance(value, Mapping):
        return {
            str(k): _REDACTED if str(k).lower() in _SECRET_FIELDS else redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v, depth + 1) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the extra fields."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def _timestamp(self, created: float) -> str:
        """ISO-8601 UTC with milliseconds; the seconds part is formatted once per second."""
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"  # as LogRecord.msecs

    def request_line(self, fields: dict[str, Any]) -> str:
        """The line ``format`` would give an INFO ``proxy.access`` "request" record with ``fields``."""
        entry: dict[str, Any] = {
            "ts": self._timestamp(time.time()),
            "level": "info",
            "logger": "proxy.access",
            "msg": "request",
        }
        entry.update(fields)
        return scrub(_ENCODER.encode(entry))

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _RESERVED or key.startswith("_"):
                continue
            entry[key] = _REDACTED if key.lower() in _SECRET_FIELDS else redact(value)
        if "request_id" not in entry and (request_id := REQUEST_ID.get()) is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return scrub(_ENCODER.encode(entry))


#: The handler ``configure_logging`` installed, for ``write_request_line``'s direct path.
_installed: logging.Handler | None = None
_ACCESS: Final = logging.getLogger("proxy.access")
_PROXY: Final = logging.getLogger("proxy")


def write_request_line(fields: dict[str, Any]) -> None:
    """Log one request line (logger ``proxy.access``, INFO), as cheaply as logging allows.

    Why: this runs once per proxied request, and a ``LogRecord`` travelling the
    logger hierarchy into the generic formatter costs more CPU than the
    routing and token lookup together. While the JSON handler of
    ``configure_logging`` is the only handler in play, the same line (same
    fields and order, scrubbed the same way) is written to it directly, under
    its lock. Any other logging set-up (tests' caplog, an embedding app's
    handlers or filters) gets an ordinary ``LogRecord``. ``fields`` must hold
    only plain values (str, int, float, bool, None): no redaction pass is made.
    """
    handler = _installed
    root = logging.getLogger()
    if (
        handler is None
        or len(root.handlers) != 1
        or root.handlers[0] is not handler
        or _ACCESS.handlers
        or _ACCESS.filters
        or _PROXY.handlers
        or _PROXY.filters
        or root.filters
        or handler.filters
        or not _ACCESS.propagate
        or not _PROXY.propagate
        or not isinstance(handler, logging.StreamHandler)
        or not isinstance(handler.formatter, JsonFormatter)
    ):
        _ACCESS.info("request", extra=fields)
        return
    if not _ACCESS.isEnabledFor(logging.INFO) or handler.level > logging.INFO:
        return
    line = handler.formatter.request_line(fields)
    handler.acquire()
    try:
        handler.stream.write(line + handler.terminator)
        handler.flush()
    except Exception:
        handler.handleError(_ACCESS.makeRecord(_ACCESS.name, logging.INFO, "", 0, "request", (), None))
    finally:
        handler.release()


def parse_level(level: str | int) -> int:
    """A logging level from a config value (``debug``, ``INFO``, ``warn``, 10 ...).

    Raises ValueError naming the accepted values, so a typo in the config is a
    clear error instead of logging's bare ``Unknown level``.
    """
    if isinstance(level, int):
        return level
    name = _LEVEL_ALIASES.get(level.strip().lower(), level.strip().upper())
    value = logging.getLevelNamesMapping().get(name)
    if value is None or name == "NOTSET":
        raise ValueError(f"unknown log level {level!r} (use debug, info, warning, error or critical)")
    return value


def configure_logging(level: str | int = "info", stream: TextIO | None = None) -> logging.Handler:
    """Route every logger of the process to one JSON handler at ``level``; returns the handler.

    aiohttp's own access log is turned off: ours carries the route and request id
    instead of the raw request line (which could hold a secret in a query string).
    """
    # No caller, thread or process lookups per record (the logging HOWTO's "Optimization"):
    # the JSON line never shows them, and the access log writes one record per request.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _installed
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    _installed = handler
    root.setLevel(parse_level(level))
    logging.getLogger("aiohttp.access").disabled = True
    return handler
