"""Configuration: YAML + ``${VAR}`` interpolation + ``CCP_*`` overrides -> an immutable ``Settings``.

A bad config must be refused at start with every problem listed, each naming
the key path (``routes[3].scopes[0]: unknown scope "payment:write"``), never a
traceback: an operator fixes them all in one round. So every parser here
appends to a ``Report`` and carries on, and ``ConfigError`` is raised once, at
the end, with the whole list. Validation has no side effects: files are only
checked for readability (a mounted secret is *read* by the credential loader
at run time, so rotation works), nothing connects anywhere.

Precedence, per scalar key: ``CCP_<SECTION>_<KEY>`` (``CCP_<KEY>`` at top
level) > the YAML file > the dataclass default in ``proxy.settings``. The env
names are derived from the settings dataclasses, so a new field gets one too.
Route entries are parsed by ``proxy.routes.parse_routes`` (the route table
owns its schema); this module owns everything else.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import yaml

from proxy.errors import ConfigError
from proxy.routes import did_you_mean, parse_routes, show
from proxy.scopes import KNOWN_AUDIENCES
from proxy.settings import (
    AuthSettings,
    CacheSettings,
    ListenAddress,
    LogSettings,
    RefreshSettings,
    Settings,
    UpstreamSettings,
)

__all__ = ["ENV_PREFIX", "SECTIONS", "env_variables", "load_config", "parse_config"]

ENV_PREFIX: Final = "CCP_"
SECTIONS: Final[dict[str, type]] = {
    "upstream": UpstreamSettings,
    "auth": AuthSettings,
    "cache": CacheSettings,
    "refresh": RefreshSettings,
    "logging": LogSettings,
}
TOP_SCALARS: Final = ("listen", "admin_listen", "shutdown_grace_s")
TOP_KEYS: Final = (*SECTIONS, *TOP_SCALARS, "routes", "routes_file")
ROUTES_FILE_ENV: Final = "CCP_ROUTES_FILE"
PACKAGED_ROUTES: Final = "credicorp-partner-v1.yaml"
#: CCP_ variables that are not config keys but are still ours (no "unknown variable" warning).
OTHER_ENV: Final = frozenset({ROUTES_FILE_ENV, "CCP_CONFIG"})
_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})
_NOT_SET: Final = object()


class Report:
    """Collects problems (fatal) and warnings; at most one problem per key path, the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self._bad: set[str] = set()

    def problem(self, where: str, message: str) -> None:
        if where not in self._bad:
            self._bad.add(where)
            self.problems.append(f"{where}: {message}")

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{where}: {message}")


def key_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def check_keys(raw: Mapping[str, Any], allowed: typing.Iterable[str], where: str, report: Report) -> None:
    """Unknown keys are problems: a typo (``scope:``) must not silently fall back to a default."""
    allowed = tuple(allowed)
    for key in raw:
        if key not in allowed:
            report.problem(key_path(where, str(key)), "unknown key" + did_you_mean(str(key), allowed))


# ------------------------------------------------------------ loading files
class _Loader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys (PyYAML silently keeps the last)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []


def _mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen and key != "<<":
            loader.duplicates.append(f"line {key_node.start_mark.line + 1}: duplicate key {show(key)}")
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: str | Path) -> Any:
    """Parse one YAML file; ``ConfigError`` (never a traceback) when it is missing or malformed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        loader = _Loader(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}".replace("\n", " ")]) from None
    if loader.duplicates:
        raise ConfigError([f"{path}: {d}" for d in loader.duplicates])
    return {} if data is None else data


def packaged_routes() -> list[Any]:
    """The built-in partner/v1 route table (``proxy/data``, a copy of ``config/``)."""
    return list(read_yaml(Path(__file__).parent / "data" / PACKAGED_ROUTES)["routes"])


def _routes_from(path: Path, where: str) -> Any:
    data = read_yaml(path)
    if isinstance(data, Mapping) and "routes" in data:
        return data["routes"]
    if isinstance(data, list):
        return data
    raise ConfigError([f"{where}: {path} holds neither a list of routes nor a mapping with routes:"])


def load_config(
    path: str | None, env: Mapping[str, str] = os.environ, *, check_files: bool = True
) -> Settings:
    """Read ``path`` (None: environment only, built-in route table) and validate it.

    The route table comes from, first found: ``CCP_ROUTES_FILE``; the file's
    ``routes_file`` (relative to the config file); its ``routes``; and only
    when there is no config file at all, the packaged partner/v1 table.
    """
    data = read_yaml(path) if path is not None else {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {show(data)}"])
    raw = dict(data)
    routes_file = env.get(ROUTES_FILE_ENV) or raw.get("routes_file")
    if env.get(ROUTES_FILE_ENV):
        raw["routes"] = _routes_from(Path(env[ROUTES_FILE_ENV]), f"env {ROUTES_FILE_ENV}")
    elif routes_file is not None:
        if not isinstance(routes_file, str) or "routes" in raw:
            raise ConfigError(["routes_file: expected one path, and no routes: beside it"])
        raw["routes"] = _routes_from(Path(str(path)).parent / routes_file, "routes_file")
    elif path is None:
        raw["routes"] = packaged_routes()
    raw.pop("routes_file", None)
    return parse_config(raw, env, check_files=check_files)


# ---------------------------------------------------------- interpolation
_REFERENCE: Final = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)\}|\$\{")
_BODY: Final = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)


def interpolate(value: Any, env: Mapping[str, str], where: str, report: Report, skip: set[str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string value; ``$${`` is a literal ``${``.

    Keys overridden from the environment (``skip``) are not interpolated, so an
    unset variable in a value the operator replaced is not reported.
    """
    if where in skip:
        return value
    if isinstance(value, Mapping):
        return {k: interpolate(v, env, key_path(where, str(k)), report, skip) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, key_path(where, i), report, skip) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        return _REFERENCE.sub(lambda m: _substitute(m, env, where, report), value)
    return value


def _substitute(m: re.Match[str], env: Mapping[str, str], where: str, report: Report) -> str:
    if m.group(0) == "$${":
        return "${"
    body = _BODY.fullmatch(m.group("body") or "")
    if body is None:
        report.problem(where, f"malformed reference {show(m.group(0))}: use ${{VAR}} or ${{VAR:-default}}")
        return m.group(0)
    value, default = env.get(body["name"]), body["default"]
    if default is not None and not value:
        return default
    if value is None:
        report.problem(where, f"environment variable {body['name']} is not set")
        return m.group(0)
    return value


# --------------------------------------------------------- env overrides
def env_variables() -> dict[str, str]:
    """Every ``CCP_*`` override -> the key path it sets (``CCP_AUTH_METHOD`` -> ``auth.method``)."""
    names = {f"{ENV_PREFIX}{k.upper()}": k for k in TOP_SCALARS}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            names[f"{ENV_PREFIX}{section.upper()}_{f.name.upper()}"] = f"{section}.{f.name}"
    return names


def env_overrides(env: Mapping[str, str], report: Report) -> dict[str, tuple[Any, str]]:
    """key path -> (value, where) for every CCP_ variable set; unknown CCP_ names are warned about."""
    known = env_variables()
    found: dict[str, tuple[Any, str]] = {known[n]: (v, f"env {n}") for n, v in env.items() if n in known}
    for name in sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known and n not in OTHER_ENV):
        report.warn(f"env {name}", "not a configuration variable, ignored" + did_you_mean(name, known))
    # The secret source set from the environment replaces the file's, whichever kind that is.
    for one, other in (("client_secret", "client_secret_file"), ("client_secret_file", "client_secret")):
        if found.get(f"auth.{one}", ("",))[0] and f"auth.{other}" not in found:
            found[f"auth.{other}"] = (None, found[f"auth.{one}"][1])
    return found


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


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {show(value)}")


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


# --------------------------------------------------------------- sections
def build(
    cls: type[Any], section: str, raw: Any, overrides: Mapping[str, tuple[Any, str]], report: Report
) -> tuple[Any, dict[str, str]]:
    """One settings dataclass from its YAML mapping plus overrides; also field -> where (for messages)."""
    if raw is not None and not isinstance(raw, Mapping):
        report.problem(section, f"expected a mapping, got {show(raw)}")
    raw = raw if isinstance(raw, Mapping) else {}
    check_keys(raw, [f.name for f in dataclasses.fields(cls)], section, report)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        path = key_path(section, f.name)
        value, where[path] = overrides.get(path, (raw.get(f.name, _NOT_SET), path))
        if value is _NOT_SET:
            continue
        try:
            values[f.name] = coerce(value, hints[f.name], from_env=path in overrides)
        except ValueError as exc:
            report.problem(where[path], str(exc))
    return cls(**values), where


def check_values(
    obj: Any, section: str, where: Mapping[str, str], report: Report, *, check_files: bool
) -> None:
    """The per-key rules of one section, defaults included (an empty default client_id is a problem)."""
    for f in dataclasses.fields(obj):
        path, value = key_path(section, f.name), getattr(obj, f.name)
        check = _VALUE_CHECKS.get(path)
        if value is not None and check is not None and (message := check(value)):
            report.problem(where[path], message)
        if check_files and path in _FILES and value is not None and not os.access(value, os.R_OK):
            report.problem(where[path], f"cannot read {show(value)}")


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str], *, check_files: bool = True) -> Settings:
    """Validate an already-parsed config mapping (routes inline); ``ConfigError`` lists every problem.

    Pure apart from ``check_files``: readability checks of the files the config
    names (secret, CA bundles, encryption key), never their contents.
    """
    report = Report()
    if not isinstance(raw, Mapping):
        raise ConfigError([f"the top level must be a mapping of sections, got {show(raw)}"])
    overrides = env_overrides(env, report)
    check_keys(raw, TOP_KEYS, "", report)
    if "routes_file" in raw:
        report.problem("routes_file", "is resolved by load_config; parse_config takes routes inline")
    tree = interpolate(raw, env, "", report, skip=set(overrides))
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    top_raw = {k: tree[k] for k in TOP_SCALARS if k in tree}
    for name, cls in (*SECTIONS.items(), ("", _TopLevel)):
        obj, obj_where = build(cls, name, top_raw if cls is _TopLevel else tree.get(name), overrides, report)
        check_values(obj, name, obj_where, report, check_files=check_files)
        values[name], where = obj, where | obj_where
    top = values.pop("")
    _check_secret(values["auth"], report)
    _check_listeners(top, where, report)
    routes, problems, warnings = parse_routes(tree.get("routes"), values["auth"].audience)
    for problem in problems:  # through the report, so an interpolation problem is not repeated
        report.problem(*problem.split(": ", 1))
    report.warnings += warnings
    if report.problems:
        raise ConfigError(report.problems)
    return Settings(
        **values,
        listen=top.listen,
        admin_listen=top.admin_listen,
        shutdown_grace_s=top.shutdown_grace_s,
        routes=routes,
        warnings=tuple(report.warnings),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _TopLevel:
    """The top-level scalars of ``Settings``, so they go through the same ``build`` as a section."""

    listen: ListenAddress = Settings().listen
    admin_listen: ListenAddress = Settings().admin_listen
    shutdown_grace_s: float = Settings().shutdown_grace_s


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
_HOSTNAME: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


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
        elif not _HOSTNAME.fullmatch(host):
            raise ValueError
    except ValueError:
        raise ValueError(f"not a valid host[:port]: {show(text)}") from None
    if port is not None and int(port) > 65535:
        raise ValueError(f"port out of range in {show(text)}")
    return host, None if port is None else int(port)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, origin: bool = False) -> str | None:
    """An http(s) URL a token or secret may be sent to: TLS unless the host is loopback."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return f"not a valid URL {show(url)}: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an http(s) URL, got {show(url)}"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials (user:password@)"
    if parts.query or parts.fragment:
        return "must not have a query or a fragment"
    if origin and parts.path not in ("", "/"):
        return f"must be an origin (scheme://host[:port]) without a path, got path {show(parts.path)}"
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        return "http:// is only allowed to a loopback host: a token or secret sent in clear can be stolen"
    return None


#: scheme -> (what may follow the host list, as a regex; the same, for humans). Matches
#: what ``proxy.tokens.redis_cache.connect`` accepts.
_REDIS_PATHS: Final = {
    "redis": (r"(/\d+)?/?", "[/db]"),
    "rediss": (r"(/\d+)?/?", "[/db]"),
    "redis+sentinel": (r"/[^/]+(/\d+)?/?", "/service_name[/db]"),
    "redis+cluster": (r"/?", "no path"),
    "rediss+cluster": (r"/?", "no path"),
}


def check_cache_url(url: str) -> str | None:
    """``memory://``; ``redis[s]://[auth@]host[:port][/db]``; ``unix:///path.sock``;
    ``redis+sentinel://[auth@]h:p[,h:p...]/service_name[/db]``; ``redis[s]+cluster://[auth@]h:p[,h:p...]``.
    Query options (``?db=``) pass through to the client."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("memory", "unix"):
        ok = rest == "" if scheme == "memory" else rest.startswith("/")
        return None if ok else "expected memory:// or unix:///absolute/path.sock"
    if not sep or scheme not in _REDIS_PATHS:
        return f"expected memory://, unix:// or a {', '.join(_REDIS_PATHS)} URL, got {show(url)}"
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
    "upstream.max_body_bytes": _POSITIVE,
    "upstream.pool_size": _POSITIVE,
    "auth.issuer": check_url,
    "auth.token_endpoint": check_url,
    "auth.client_id": lambda v: None if v.strip() else "must not be empty",
    "auth.client_secret": lambda v: None if v.strip() else "must not be empty",
    "auth.audience": _one_of(KNOWN_AUDIENCES),
    "auth.default_expires_in": _POSITIVE,
    "auth.timeout_s": _POSITIVE,
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
    "shutdown_grace_s": _NON_NEGATIVE,
}
_FILES: Final = ("upstream.ca_file", "auth.ca_file", "auth.client_secret_file", "cache.encryption_key_file")


def _check_secret(auth: AuthSettings, report: Report) -> None:
    both = "client_secret (CCP_AUTH_CLIENT_SECRET) and client_secret_file (CCP_AUTH_CLIENT_SECRET_FILE)"
    if auth.client_secret is not None and auth.client_secret_file is not None:
        report.problem("auth", f"set only one of {both}")
    elif auth.client_secret is None and auth.client_secret_file is None:
        report.problem("auth", f"set one of {both}")
    if auth.client_id.strip() and not auth.client_id.startswith("cc_client_"):
        report.warn(
            "auth.client_id", f"{show(auth.client_id)} does not start with cc_client_ (Credicorp ids do)"
        )


def _check_listeners(top: _TopLevel, where: Mapping[str, str], report: Report) -> None:
    a, b = top.listen, top.admin_listen
    if a.unix_path or b.unix_path:
        clash = a.unix_path == b.unix_path
    else:
        clash = a.port == b.port != 0 and (a.host == b.host or bool({a.host, b.host} & {"0.0.0.0", "::"}))  # noqa: S104
    if clash:
        report.problem(where["admin_listen"], f"must differ from listen ({a})")
