"""JSON-lines logging with a redaction safety net.

Every record becomes one JSON object; structured fields come from ``extra=``.
Code never logs a token or secret on purpose (``Token`` and ``Credentials``
hide them from ``repr``), and as a second line of defence every rendered
line is scrubbed of bearer values, JWT-shaped strings and secret-named
fields before it is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Final

_RESERVED: Final = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_SECRET_FIELDS: Final = frozenset(
    {"authorization", "proxy-authorization", "access_token", "client_secret", "secret", "token", "password"}
)
_REDACTED: Final = "[redacted]"
_SCRUBBERS: Final = (
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*"),  # JWT
    re.compile(r"(?i)(client_secret|access_token|password)=([^&\s\"']+)"),
)


def scrub(text: str) -> str:
    """Remove anything shaped like a credential from ``text``."""
    text = _SCRUBBERS[0].sub(lambda m: f"{m.group(1)} {_REDACTED}", text)
    text = _SCRUBBERS[1].sub(_REDACTED, text)
    return _SCRUBBERS[2].sub(lambda m: f"{m.group(1)}={_REDACTED}", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _RESERVED or key.startswith("_"):
                continue
            entry[key] = _REDACTED if key.lower() in _SECRET_FIELDS else value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(entry, default=str, separators=(",", ":")))


def configure_logging(level: str = "info", stream: Any = None) -> None:
    """Route every logger of the process to one JSON handler at ``level``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate ours (and print raw request lines).
    logging.getLogger("aiohttp.access").disabled = True
