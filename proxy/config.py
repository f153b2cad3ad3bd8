"""Configuration: YAML + ``${VAR}`` interpolation + ``CCP_*`` overrides -> an immutable ``Settings``.

A bad config must be refused at start with every problem listed, each naming
the key path (``routes[3].scopes[0]: unknown scope "payment:write"``), never a
traceback: an operator fixes them all in one round. So every parser here
appends to a ``Report`` and carries on, and ``ConfigError`` is raised once, at
the end, with the whole list. Validation has no side effects: files are only
checked for readability (a mounted secret is *read* by the credential loader
at run time, so rotation works), nothing connects anywhere.

This module loads and assembles: it reads the files, picks the route table
and builds each section. The environment's part (``${VAR}``, ``CCP_*``
overrides and their precedence) is ``proxy.config_env``; what one value may be
is ``proxy.config_values``; problems are collected in ``proxy.config_report``.
Route entries are parsed by ``proxy.routes.parse_routes`` (the route table
owns its schema).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from proxy.config_env import (
    ENV_PREFIX,
    ROUTES_FILE_ENV,
    SECTIONS,
    TOP_SCALARS,
    env_overrides,
    env_variables,
    interpolate,
)
from proxy.config_report import Report, check_keys, key_path
from proxy.config_values import check_values, coerce, host_port
from proxy.errors import ConfigError
from proxy.routes import parse_routes
from proxy.settings import AuthSettings, CacheSettings, ListenAddress, Settings
from proxy.wording import show

__all__ = ["ENV_PREFIX", "SECTIONS", "env_variables", "load_config", "parse_config"]

TOP_KEYS: Final = (*SECTIONS, *TOP_SCALARS, "routes", "routes_file")
PACKAGED_ROUTES: Final = "credicorp-partner-v1.yaml"
_NOT_SET: Final = object()


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
        raise ConfigError([f"{path}: not valid YAML: {_yaml_problem(exc)}"]) from None
    if loader.duplicates:
        raise ConfigError([f"{path}: {d}" for d in loader.duplicates])
    return {} if data is None else data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, without PyYAML's snippet: it quotes the file's line, secret and all."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc).replace("\n", " ")
    parts = []
    if exc.problem_mark is not None:
        parts.append(f"line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}:")
    parts.append(exc.problem or "syntax error")
    if exc.context:
        started = f" at line {exc.context_mark.line + 1}" if exc.context_mark is not None else ""
        parts.append(f"({exc.context}{started})")
    return " ".join(parts)


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
    _check_cache_trust(values["cache"], values["auth"], report)
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
        reuse_port=top.reuse_port,
        routes=routes,
        warnings=tuple(report.warnings),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _TopLevel:
    """The top-level scalars of ``Settings``, so they go through the same ``build`` as a section."""

    listen: ListenAddress = Settings().listen
    admin_listen: ListenAddress = Settings().admin_listen
    shutdown_grace_s: float = Settings().shutdown_grace_s
    reuse_port: bool = Settings().reuse_port


# ------------------------------------------------------ cross-key checks
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


def _check_cache_trust(cache: CacheSettings, auth: AuthSettings, report: Report) -> None:
    """Warn (loudly: check-config shows it, ``run`` logs it) about a Redis that others can reach unkeyed.

    Without ``cache.encryption_key_file`` a Redis value is a clear bearer token that no
    one vouches for: anyone who can read the server can take it, anyone who can write it
    can swap it. Each token read back is still checked (with ``auth.verify``, against the
    issuer's keys), but only a key makes Redis values unforgeable. A Redis on loopback or a
    unix socket is reachable only from this host, so it gets no warning. Not refused:
    a private network with Redis AUTH and TLS may be the operator's accepted risk.
    """
    if cache.encryption_key_file is not None:
        return
    exposed = [host for host in _cache_hosts(cache.url) if not _loopback(host)]
    if exposed:
        also = "" if auth.verify else "; with auth.verify off, whoever can write Redis chooses the token sent"
        report.warn(
            "cache.url",
            "tokens in Redis are stored in clear and not authenticated; set cache.encryption_key_file"
            f" (Redis {'hosts' if len(exposed) > 1 else 'host'} {', '.join(exposed)}"
            f" {'are' if len(exposed) > 1 else 'is'} not loopback{also})",
        )


def _cache_hosts(url: str) -> list[str]:
    """The host names of a ``redis*://`` URL (every node of a Sentinel or Cluster list); none
    for ``memory://``, ``unix://`` and a URL the value checks already refused."""
    scheme, _, rest = url.partition("://")
    if not scheme.lower().startswith("redis"):
        return []
    netloc = rest.partition("?")[0].partition("/")[0].rpartition("@")[2]  # credentials never shown
    try:
        return [host_port(item)[0] for item in netloc.split(",")]
    except ValueError:
        return []


def _loopback(host: str) -> bool:
    try:
        return host.lower().rstrip(".") == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
