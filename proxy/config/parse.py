"""Validating an already-read config mapping into an immutable ``Settings``, every problem at once.

A bad config must be refused at start with every problem listed, each naming
the key path (``routes[3].scopes[0]: unknown scope "payment:write"``), never a
traceback: an operator fixes them all in one round. So every step records into
one ``Report`` and carries on, and ``ConfigError`` is raised once, at the end,
with the whole list. This module only assembles: what each key is and which
check it gets is ``proxy.config.keys``, the environment's part
``proxy.config.env``, the rules across keys ``proxy.config.cross_checks``, the
route table's schema ``proxy.config.routes``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final

from proxy.config.cross_checks import check_cache_trust, check_listeners, check_secret_source
from proxy.config.env import env_overrides, interpolate
from proxy.config.keys import FIELDS, SECTIONS, TOP_KEYS, Key
from proxy.config.report import Report, check_keys
from proxy.config.routes import parse_routes
from proxy.config.values import coerce
from proxy.errors import ConfigError
from proxy.settings import Settings
from proxy.wording import show

__all__ = ["parse_config"]

_NOT_SET: Final = object()
Overrides = Mapping[str, tuple[Any, str]]


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str], *, check_files: bool = True) -> Settings:
    """Validate an already-parsed config mapping (routes inline); ``ConfigError`` lists every problem.

    Pure: the result depends only on ``raw`` and ``env``, and nothing is changed or
    kept anywhere. With ``check_files`` the files the config names are checked for
    readability and the sealing key file is parsed, so a bad one fails here; none of
    them is kept (the credential loader reads the secret at run time, so rotation works).
    """
    report = Report()
    if not isinstance(raw, Mapping):
        raise ConfigError([f"the top level must be a mapping of sections, got {show(raw)}"])
    overrides = env_overrides(env, report)
    check_keys(raw, TOP_KEYS, "", report)
    if "routes_file" in raw:
        report.problem("routes_file", "is resolved by load_config; parse_config takes routes inline")
    tree = interpolate(raw, env, "", report, skip=set(overrides))
    top_raw = {key.name: tree[key.name] for key in FIELDS[""] if key.name in tree}
    values: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    for section in (*SECTIONS, ""):
        raw_section = top_raw if section == "" else tree.get(section)
        values[section], section_where = _read_section(section, raw_section, overrides, report)
        _check_section(section, values[section], section_where, report, check_files=check_files)
        where |= section_where
    sections = {name: cls(**values[name]) for name, cls in SECTIONS.items()}
    top = values[""]
    check_secret_source(sections["auth"], report)
    check_listeners(top["listen"], top["admin_listen"], where, report)
    check_cache_trust(sections["cache"], sections["auth"], report)
    routes = parse_routes(tree.get("routes"), sections["auth"].audience, report)
    if report.problems:
        raise ConfigError(report.problems)
    return Settings(**sections, **top, routes=routes, warnings=tuple(report.warnings))


def _read_section(
    section: str, raw: Any, overrides: Overrides, report: Report
) -> tuple[dict[str, Any], dict[str, str]]:
    """Every key of one section ("" = top level), coerced: field name -> value (the default when
    unset or unusable), and key path -> where it came from (for messages)."""
    if raw is not None and not isinstance(raw, Mapping):
        report.problem(section, f"expected a mapping, got {show(raw)}")
    raw = raw if isinstance(raw, Mapping) else {}
    check_keys(raw, [key.name for key in FIELDS[section]], section, report)
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key in FIELDS[section]:
        value, where[key.path] = overrides.get(key.path, (raw.get(key.name, _NOT_SET), key.path))
        values[key.name] = key.default
        if value is _NOT_SET:
            continue
        try:
            values[key.name] = coerce(value, key.type, from_env=key.path in overrides)
        except ValueError as exc:
            report.problem(where[key.path], str(exc))
    return values, where


def _check_section(
    section: str, values: Mapping[str, Any], where: Mapping[str, str], report: Report, *, check_files: bool
) -> None:
    """Each key's own rule, defaults included (an empty default client_id is a problem)."""
    for key in FIELDS[section]:
        if (message := _problem(key, values[key.name], check_files=check_files)) is not None:
            report.problem(where[key.path], message)


def _problem(key: Key, value: Any, *, check_files: bool) -> str | None:
    if value is None:
        return None
    if key.check is not None and (message := key.check(value)):
        return message
    if not (check_files and key.names_file):
        return None
    if not os.access(value, os.R_OK):
        return f"cannot read {show(value)}"
    return key.file_check(value) if key.file_check is not None else None
