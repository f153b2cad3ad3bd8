"""One configuration value: coerced from YAML or env text to its settings type, then checked.

Coercion accepts strings for numbers and booleans (``${VAR}`` and env values
are always strings); the per-key checks hold the rules a value must meet on
its own: listen addresses, URLs a token or secret may be sent to (TLS unless
loopback), cache URLs, ranges and choices. A check returns its message (None
when the value is fine) and coercion raises ``ValueError``; either way the
caller records a problem and goes on, so every bad key is reported in one round.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final

from proxy.config_report import Report, key_path
from proxy.redact import mask_url
from proxy.routes import parse_bool, show
from proxy.scopes import KNOWN_AUDIENCES
from proxy.settings import ListenAddress
from proxy.tokens.discovery_trust import check_allowed_hosts
from proxy.tokens.sealing import Keyring, SealingKeyError
from proxy.urls import HOSTNAME, check_url


# ------------------------------------------------------------- coercion
def coerce(value: Any, hint: Any, *, from_env: bool = False) -> Any:
    """Coerce a YAML or env value to a settings field type; ``ValueError`` names what was expected.

    Strings are accepted for numbers and booleans because ``${VAR}`` and env
    values are always strings; an empty env value clears an optional key.
    """
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None or (from_env and value == ""):
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return _to_str_tuple(value)
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {show(value)}")
        return value
    convert: Callable[[Any], Any] = _SCALARS.get(hint, _expect_str)
    return convert(value)


def _expect_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {show(value)}")
    return value


def _to_str_tuple(value: Any) -> tuple[str, ...]:
    """A list of strings: a YAML list, or comma-separated text (``${VAR}`` and ``CCP_*`` are text).

    Blank items are dropped, so ``"a, b,"`` is ``("a", "b")`` and an empty variable is an empty list.
    """
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(item.strip() for item in value if item.strip())
    raise ValueError(f"expected a list of strings (or comma-separated text), got {show(value)}")


def _to_bool(value: Any) -> bool:
    return parse_bool(value)


def _to_number(kind: type[int] | type[float]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and (kind is float or isinstance(value, int)):
            return kind(value)
        try:
            number = kind(value.strip()) if isinstance(value, str) else None
        except ValueError:
            number = None
        if number is None or number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {show(value)}")
        return number

    return convert


def _to_listen(value: Any) -> ListenAddress:
    return parse_listen(_expect_str(value))


_SCALARS: Final[dict[Any, Callable[[Any], Any]]] = {
    bool: _to_bool,
    int: _to_number(int),
    float: _to_number(float),
    str: _expect_str,
    ListenAddress: _to_listen,
}


# ------------------------------------------------------- checking a section
def check_values(
    obj: Any, section: str, where: Mapping[str, str], report: Report, *, check_files: bool
) -> None:
    """The per-key rules of one section, defaults included (an empty default client_id is a problem)."""
    for f in dataclasses.fields(obj):
        path, value = key_path(section, f.name), getattr(obj, f.name)
        check = _VALUE_CHECKS.get(path)
        if value is not None and check is not None and (message := check(value)):
            report.problem(where[path], message)
        if check_files and path in _FILES and value is not None:
            if not os.access(value, os.R_OK):
                report.problem(where[path], f"cannot read {show(value)}")
            elif (content_check := _FILE_CONTENT_CHECKS.get(path)) and (message := content_check(value)):
                report.problem(where[path], message)


def _check_key_file(path: str) -> str | None:
    """A key file that reads but cannot be used fails validation, not start-up with a traceback."""
    try:
        Keyring.from_file(path)
    except SealingKeyError as exc:  # names the file and line, never key material
        return str(exc)
    return None


# ------------------------------------------------------------ value checks
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


#: scheme -> (what may follow the host list, as a regex; the same, for humans). Matches
#: what ``proxy.tokens.redis_connect.connect`` accepts.
_REDIS_PATHS: Final = {
    "redis": (r"(/\d+)?/?", "[/db]"),
    "rediss": (r"(/\d+)?/?", "[/db]"),
    "redis+sentinel": (r"/[^/]+(/\d+)?/?", "/service_name[/db]"),
    "redis+cluster": (r"/?", "no path"),
    "rediss+cluster": (r"/?", "no path"),
}


def check_cache_url(url: str) -> str | None:
    """``memory://``; ``redis[s]://[auth@]host[:port][/db]``; ``unix://[auth@]/path.sock``;
    ``redis+sentinel://[auth@]h:p[,h:p...]/service_name[/db]``; ``redis[s]+cluster://[auth@]h:p[,h:p...]``.
    Query options (``?db=``) pass through to the client. Messages show the URL masked (``mask_url``):
    a mistyped scheme must not print the password that follows it."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and "@" in rest and any(ch in rest[: rest.rfind("@")] for ch in "/?#"):
        # The client would end the host part at that character and read the rest of the
        # password as the path; the pieces this check would then quote hold part of it.
        return (
            "percent-encode '/', '?' and '#' in the user and password (%2F, %3F, %23)"
            " and an '@' after the host (%40)"
        )
    if sep and scheme in ("memory", "unix"):
        ok = rest == "" if scheme == "memory" else rest.rpartition("@")[2].startswith("/")
        return None if ok else "expected memory:// or unix:///absolute/path.sock"
    if not sep or scheme not in _REDIS_PATHS:
        return f"expected memory://, unix:// or a {', '.join(_REDIS_PATHS)} URL, got {show(mask_url(url))}"
    netloc, slash, tail = rest.partition("?")[0].partition("/")
    hosts = netloc.rpartition("@")[2].split(",")
    if scheme in ("redis", "rediss") and len(hosts) > 1:
        return "one host only; use redis+sentinel:// or redis+cluster:// for several"
    try:
        ports = [host_port(host)[1] for host in hosts]
    except ValueError as exc:
        return str(exc)
    if "+" in scheme and None in ports:
        return f"{scheme}:// needs host:port for every node"
    pattern, expected = _REDIS_PATHS[scheme]
    if not re.fullmatch(pattern, slash + tail):
        return f"{scheme}:// takes {expected} after the host, got {show(slash + tail)}"
    return None


_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _check_header_names(names: tuple[str, ...]) -> str | None:
    """Each a header name (an RFC 9110 token): a typo with a space or a colon would strip nothing."""
    bad = [name for name in names if not _HEADER_NAME.fullmatch(name)]
    return f"not a header name: {', '.join(show(name) for name in bad)}" if bad else None


def _one_of(choices: typing.Collection[str]) -> Callable[[str], str | None]:
    return lambda v: None if v in choices else f"expected one of {', '.join(sorted(choices))}, got {show(v)}"


def _check_range(test: Callable[[float], bool], message: str) -> Callable[[float], str | None]:
    return lambda v: None if test(v) else f"{message}, got {v}"


_POSITIVE: Final = _check_range(lambda v: v > 0, "must be > 0")
_NON_NEGATIVE: Final = _check_range(lambda v: v >= 0, "must be >= 0")
_VALUE_CHECKS: Final[dict[str, Callable[[Any], str | None]]] = {
    "upstream.url": lambda v: check_url(v, origin=True),
    "upstream.timeout_s": _POSITIVE,
    "upstream.connect_timeout_s": _POSITIVE,
    "upstream.read_timeout_s": _POSITIVE,
    "upstream.retry_body_limit": _NON_NEGATIVE,
    "upstream.kept_body_budget_bytes": _NON_NEGATIVE,
    "upstream.max_body_bytes": _POSITIVE,
    "upstream.pool_size": _POSITIVE,
    "upstream.response_buffer_bytes": _check_range(
        lambda v: 0 <= v <= 16 * 1024 * 1024, "must be between 0 and 16777216 (16 MiB)"
    ),
    "upstream.strip_headers": _check_header_names,
    "auth.issuer": check_url,
    "auth.token_endpoint": check_url,
    "auth.client_id": lambda v: None if v.strip() else "must not be empty",
    "auth.client_secret": lambda v: None if v.strip() else "must not be empty",
    "auth.audience": _one_of(KNOWN_AUDIENCES),
    "auth.default_expires_in": _POSITIVE,
    "auth.timeout_s": _POSITIVE,
    "auth.allowed_hosts": check_allowed_hosts,
    "auth.max_mint_rate": _check_range(lambda v: 0 < v < 10, "must be > 0 and < 10 (platform limit 10/s)"),
    "cache.url": check_cache_url,
    "cache.key_prefix": lambda v: (
        None if re.fullmatch(r"[\w.:-]+", v, re.ASCII) else "expected [A-Za-z0-9_.:-]+"
    ),
    "cache.timeout_s": _POSITIVE,
    "refresh.at_fraction": _check_range(lambda v: 0 < v < 1, "must be between 0 and 1, exclusive"),
    "refresh.min_margin_s": _NON_NEGATIVE,
    "refresh.idle_s": _POSITIVE,
    "refresh.jitter_s": _NON_NEGATIVE,
    "logging.level": lambda v: _one_of(("debug", "info", "warning", "error", "critical"))(v.lower()),
    "limits.max_header_bytes": _check_range(
        lambda v: 1024 <= v <= 1024 * 1024, "must be between 1024 and 1048576 (1 MiB)"
    ),
    "limits.max_headers": _check_range(lambda v: 1 <= v <= 1000, "must be between 1 and 1000"),
    "limits.header_timeout_s": _POSITIVE,
    "limits.keepalive_timeout_s": _POSITIVE,
    "limits.body_timeout_s": _POSITIVE,
    "limits.listen_max_connections": _POSITIVE,
    "limits.admin_max_connections": _POSITIVE,
    "shutdown_grace_s": _NON_NEGATIVE,
}
_FILES: Final = ("upstream.ca_file", "auth.ca_file", "auth.client_secret_file", "cache.encryption_key_file")
_FILE_CONTENT_CHECKS: Final[dict[str, Callable[[str], str | None]]] = {
    "cache.encryption_key_file": _check_key_file,
}
