"""Validating an already-read config mapping into an immutable ``Settings``, every problem at once.

A bad config must be refused at start with every problem listed, each naming
the key path (``routes[3].scopes[0]: unknown scope "payment:write"``), never a
traceback: an operator fixes them all in one round. So every parser appends
to one ``Report`` and carries on, and ``ConfigError`` is raised once, at the
end, with the whole list. This module assembles: the environment's part is
``proxy.config.env``, what one value may be ``proxy.config.values``, the
route table's schema ``proxy.config.routes``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import typing
from collections.abc import Mapping
from typing import Any, Final

from proxy.config.cache_url import parse_cache_url
from proxy.config.env import SECTIONS, TOP_SCALARS, env_overrides, interpolate
from proxy.config.report import Report, check_keys, key_path
from proxy.config.routes import parse_routes
from proxy.config.values import check_values, coerce
from proxy.errors import ConfigError
from proxy.settings import AuthSettings, CacheSettings, ListenAddress, Settings
from proxy.wording import show

__all__ = ["parse_config"]

TOP_KEYS: Final = (*SECTIONS, *TOP_SCALARS, "routes", "routes_file")
_NOT_SET: Final = object()


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
    routes = parse_routes(tree.get("routes"), values["auth"].audience, report)
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
    try:
        return [host for host, _ in parse_cache_url(url).hosts]  # credentials never shown
    except ValueError:
        return []


def _loopback(host: str) -> bool:
    try:
        return host.lower().rstrip(".") == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
