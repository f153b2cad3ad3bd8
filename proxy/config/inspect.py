"""Human-readable views of a validated config, for ``check-config`` and ``explain``.

Least privilege only holds if someone can read the route table and see which
token each request gets, so these views answer the operator's two questions:
"what does this config allow, and with which scope sets?" and "what would
happen to *this* request?". They take a ``Settings`` (already validated) and
return text; the CLI prints it. Nothing here prints a secret: the client
secret is never shown and every URL goes through ``mask_url`` (a Redis password
may sit in the cache URL's userinfo or in a ``?password=`` option).
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.errors import BadRequest
from proxy.paths import validate_target
from proxy.redact import mask_url
from proxy.routes import RouteTable
from proxy.scopes import scope_set_label
from proxy.settings import ListenAddress, RouteSpec, Settings

__all__ = ["EXIT_DENIED", "EXIT_MATCHED", "EXIT_UNSAFE", "render_check", "render_explain"]

EXIT_MATCHED, EXIT_DENIED, EXIT_UNSAFE = 0, 1, 2
_METHOD_ORDER = ("*", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def render_check(settings: Settings) -> str:
    """Summary, the route table, the distinct (audience, scope set) tokens, then warnings."""
    return "\n\n".join(
        [_summary(settings), _route_table(settings.routes), _scope_sets(settings.routes), _warnings(settings)]
    )


def render_explain(settings: Settings, method: str, raw_target: str) -> tuple[str, int]:
    """What the proxy would do with ``METHOD raw_target``; exit 0 matched, 1 denied, 2 unsafe target."""
    method = method.upper()
    head = f"{method} {raw_target}"
    try:
        target = validate_target(method, raw_target)
    except BadRequest as exc:
        text = f"{head}\n  refused:  400 bad_request: {exc.description} (checked before any route)"
        return text, EXIT_UNSAFE
    found = RouteTable.compile(settings.routes).explain(method, target.segments)
    lines = [head]
    if target.query:
        lines.append(f"  query:    ?{target.query} (never used for matching; forwarded as is)")
    if found.route is None:
        lines += ["  denied:   403 route_not_allowed (deny by default)", f"  why:      {found.reason}"]
        return "\n".join(lines), EXIT_DENIED
    route = found.route
    query = f"?{target.query}" if target.query else ""
    lines += [
        f"  route:    routes[{route.index}] {route.name or '(unnamed)'}",
        f"  matches:  {_methods(route.methods)} {route.path}",
        *(["  params:   " + ", ".join(f"{k}={v}" for k, v in found.params.items())] if found.params else []),
        f"  scopes:   {scope_set_label(route.scopes)}",
        f"  audience: {route.audience}",
        f"  upstream: {mask_url(settings.upstream.url.rstrip('/'))}{target.path}{query}",
    ]
    if method == "HEAD" and "HEAD" not in route.methods and "*" not in route.methods:
        lines.append("  note:     HEAD is allowed wherever GET is")
    return "\n".join(lines), EXIT_MATCHED


# ------------------------------------------------------------------ pieces
def _summary(settings: Settings) -> str:
    auth = settings.auth
    secret = f"from {auth.client_secret_file}" if auth.client_secret_file else "inline client_secret"
    endpoint = f" (token endpoint {mask_url(auth.token_endpoint)})" if auth.token_endpoint else ""
    rows = [
        ("upstream", mask_url(settings.upstream.url)),
        ("issuer", mask_url(auth.issuer) + endpoint),
        ("client", f"{auth.client_id} ({auth.method}, secret {secret})"),
        ("listen", f"{_listen(settings.listen)}  admin {_listen(settings.admin_listen)}"),
        ("cache", mask_url(settings.cache.url)),
    ]
    return "Config OK\n" + "\n".join(f"  {k + ':':<10}{v}" for k, v in rows)


def _route_table(routes: Sequence[RouteSpec]) -> str:
    header = ("#", "name", "methods", "path", "scopes", "audience", "prefetch")
    rows = [
        (
            str(r.index),
            r.name or "-",
            _methods(r.methods),
            r.path,
            scope_set_label(r.scopes),
            r.audience,
            "yes" if r.prefetch else "",
        )
        for r in routes
    ]
    title = f"Routes: {len(rows)} (first match wins; anything else is refused with 403 route_not_allowed)"
    return title + "\n" + _table(header, rows)


def _scope_sets(routes: Sequence[RouteSpec]) -> str:
    """One token per (audience, scope set): the blast radius of each cached token, and who uses it."""
    users: dict[tuple[str, str], list[str]] = {}
    for r in routes:
        users.setdefault((r.audience, scope_set_label(r.scopes)), []).append(r.name or f"routes[{r.index}]")
    rows = [(aud, scopes, ", ".join(names)) for (aud, scopes), names in sorted(users.items())]
    title = f"Scope sets: {len(rows)} (one token each)"
    return title + "\n" + _table(("audience", "scopes", "routes"), rows)


def _warnings(settings: Settings) -> str:
    if not settings.warnings:
        return "Warnings: none"
    return f"Warnings: {len(settings.warnings)}\n" + "\n".join(f"  - {w}" for w in settings.warnings)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    return "\n".join(
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    )


def _methods(methods: frozenset[str]) -> str:
    known = [m for m in _METHOD_ORDER if m in methods]
    return ",".join(known + sorted(methods - set(known)))


def _listen(address: ListenAddress) -> str:
    if address.unix_path:
        return f"unix:{address.unix_path}"
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}"
