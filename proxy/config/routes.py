"""The ``routes:`` key: each entry's schema and the rules across the table, problems by key path.

The route table decides which token a request gets, so an entry that is
wrong must not be guessed at: an unknown key, method or scope is a problem
naming its key path (``routes[3].scopes[0]``), with a did-you-mean. What is
allowed but probably a mistake (a route that can never match, several
high-risk scopes on one route, a ``**`` at the API root) is a warning. Both go
into the one ``Report`` of the whole config. The pattern grammar, the matcher
and the shadowing rule are the route table's own: ``proxy.routes``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from proxy.config.report import Report
from proxy.config.values import parse_bool
from proxy.routes import ANY_METHOD, HTTP_METHODS, READ_METHODS, Seg, parse_pattern, shadowed_routes
from proxy.scopes import HIGH_RISK_SCOPES, KNOWN_AUDIENCES, KNOWN_SCOPES, PARTNER_SCOPES, WRITE_SCOPES
from proxy.settings import RouteSpec
from proxy.wording import did_you_mean, show

__all__ = ["ROUTE_KEYS", "parse_routes"]

ROUTE_KEYS: Final = ("name", "methods", "path", "scopes", "audience", "prefetch", "allow_write_scope_on_read")
_ROUTE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")


def parse_routes(raw: Any, default_audience: str, report: Report) -> tuple[RouteSpec, ...]:
    """The ``routes:`` list -> its routes; every problem and warning goes to ``report``.

    Routes without an ``audience`` get ``default_audience`` (``auth.audience``).
    An entry with a problem is left out, so the table rules only see good ones.
    """
    if raw is None:
        report.problem("routes", "required: the route table (deny by default refuses every other request)")
    elif not isinstance(raw, list):
        report.problem("routes", f"expected a list of routes, got {show(raw)}")
    elif not raw:
        report.problem("routes", "the route table is empty: every request would be refused")
    else:
        parsed = [_parse_route(entry, i, default_audience, report) for i, entry in enumerate(raw)]
        routes = tuple(r for r in parsed if r is not None)
        _check_table(routes, report)
        return routes
    return ()


def _parse_route(raw: Any, i: int, default_audience: str, report: Report) -> RouteSpec | None:
    where = f"routes[{i}]"
    if not isinstance(raw, Mapping):
        report.problem(where, f"expected a mapping with methods, path and scopes, got {show(raw)}")
        return None
    for key in raw:
        if key not in ROUTE_KEYS:
            report.problem(f"{where}.{key}", "unknown key" + did_you_mean(str(key), ROUTE_KEYS))
    methods = _methods(raw.get("methods"), f"{where}.methods", report)
    path = _path(raw.get("path"), f"{where}.path", report)
    scopes = _scopes(raw.get("scopes"), f"{where}.scopes", report)
    audience = _choice(raw.get("audience", default_audience), KNOWN_AUDIENCES, f"{where}.audience", report)
    name = raw.get("name", "")
    if not isinstance(name, str) or (name and not _ROUTE_NAME.fullmatch(name)):
        report.problem(
            f"{where}.name", f"expected a label matching [A-Za-z0-9][A-Za-z0-9_.:-]*, got {show(name)}"
        )
    flags = {key: _flag(raw.get(key, False), f"{where}.{key}", report) for key in ROUTE_KEYS[-2:]}
    if methods is None or path is None or scopes is None or audience is None:
        return None
    _check_scopes_for_methods(methods, scopes, flags["allow_write_scope_on_read"], where, report)
    unique = tuple(sorted(set(scopes)))
    return RouteSpec(methods, path, unique, audience, str(name), flags["prefetch"], index=i)


def _methods(raw: Any, where: str, report: Report) -> frozenset[str] | None:
    if not isinstance(raw, list) or not raw:
        report.problem(where, 'required: a non-empty list of HTTP methods, e.g. [GET] or ["*"] for any')
        return None
    ok = True
    for j, method in enumerate(raw):
        upper = method.upper() if isinstance(method, str) else method
        if upper in ("CONNECT", "TRACE", "TRACK"):
            report.problem(f"{where}[{j}]", f"{upper} is never proxied")
        elif upper == ANY_METHOD and len(raw) > 1:
            report.problem(f"{where}[{j}]", '"*" (any method) must be the only method')
        elif upper != ANY_METHOD and upper not in HTTP_METHODS:
            hint = did_you_mean(str(upper), HTTP_METHODS)
            report.problem(f"{where}[{j}]", f"unknown HTTP method {show(method)}{hint}")
        else:
            continue
        ok = False
    return frozenset(m.upper() for m in raw) if ok else None


def _path(raw: Any, where: str, report: Report) -> str | None:
    if not isinstance(raw, str):
        report.problem(
            where, f"required: a path pattern such as /partner/v1/decisions/{{id}}, got {show(raw)}"
        )
        return None
    try:
        parse_pattern(raw)
    except ValueError as exc:
        report.problem(where, f"invalid pattern {show(raw)}: {exc}")
        return None
    return raw


def _scopes(raw: Any, where: str, report: Report) -> list[str] | None:
    if not isinstance(raw, list) or not raw:
        report.problem(where, "required: a non-empty list of scopes, e.g. [decisions:read]")
        return None
    ok = True
    for j, scope in enumerate(raw):
        if not isinstance(scope, str) or scope not in KNOWN_SCOPES:
            hint = " (one scope per list item)" if isinstance(scope, str) and " " in scope.strip() else ""
            hint = hint or did_you_mean(str(scope), PARTNER_SCOPES)
            report.problem(f"{where}[{j}]", f"unknown scope {show(scope)}{hint}")
        elif scope not in PARTNER_SCOPES:
            report.problem(
                f"{where}[{j}]", f"{show(scope)} is an OpenID Connect sign-in scope, not an API scope"
            )
        else:
            continue
        ok = False
    return list(raw) if ok else None


def _choice(raw: Any, choices: frozenset[str], where: str, report: Report) -> str | None:
    if raw in choices:
        return str(raw)
    report.problem(where, f"expected one of {', '.join(sorted(choices))}, got {show(raw)}")
    return None


def _flag(raw: Any, where: str, report: Report) -> bool:
    try:
        return parse_bool(raw)  # interpolated ``${VAR}`` values arrive as text
    except ValueError as exc:
        report.problem(where, str(exc))
        return False


def _check_scopes_for_methods(
    methods: frozenset[str], scopes: list[str], allow_write: bool, where: str, report: Report
) -> None:
    """A read-only route asking for a write scope that has a read twin is over-broad: an error.

    ``webhooks:manage`` and ``partner:manage`` have no read twin (they are the
    only scopes that read those resources), so they are allowed on GET routes.
    """
    read_only = ANY_METHOD not in methods and methods <= READ_METHODS
    for j, scope in enumerate(scopes):
        twin = scope.split(":")[0] + ":read"
        if read_only and not allow_write and scope in WRITE_SCOPES and twin in KNOWN_SCOPES:
            report.problem(
                f"{where}.scopes[{j}]",
                f"write scope {show(scope)} on a read-only route ({','.join(sorted(methods))}): "
                f"use {show(twin)}, or set allow_write_scope_on_read: true",
            )
    if len(risky := sorted(set(scopes) & HIGH_RISK_SCOPES)) > 1:
        report.warn(
            f"{where}.scopes",
            f"{len(risky)} high-risk scopes on one route ({', '.join(risky)}): "
            "a leaked token could do all of it; split the route",
        )


def _check_table(routes: tuple[RouteSpec, ...], report: Report) -> None:
    """Cross-route rules: unique names (they label metrics), shadowing, catch-all patterns."""
    names: dict[str, int] = {}
    for route in routes:
        if route.name and route.name in names:
            report.problem(
                f"routes[{route.index}].name",
                f"duplicate name {show(route.name)} (also routes[{names[route.name]}])",
            )
        names.setdefault(route.name, route.index)
        parts = parse_pattern(route.path).parts
        if any(kind is Seg.REST and pos <= 2 for pos, (kind, _) in enumerate(parts)):
            report.warn(
                f"routes[{route.index}].path",
                f"{show(route.path)} covers the whole API (over-broad): "
                "list the resources the application uses",
            )
    for later, earlier in shadowed_routes(routes):
        report.warn(
            f"routes[{routes[later].index}]",
            f"is shadowed by routes[{routes[earlier].index}] ({routes[earlier].label}): it can never match",
            sep=" ",
        )
