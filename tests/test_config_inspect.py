"""proxy.config.inspect: the check-config report and the explain answer (text and exit code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import load_config, parse_config
from proxy.config.inspect import EXIT_DENIED, EXIT_MATCHED, EXIT_UNSAFE, render_check, render_explain
from proxy.settings import Settings

DEMO = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"


@pytest.fixture(scope="module")
def demo() -> Settings:
    return load_config(str(DEMO), {})


def settings(routes: list[dict[str, Any]], **extra: Any) -> Settings:
    raw = {
        "auth": {"client_id": "cc_client_t", "client_secret": "very-secret-value"},
        "routes": routes,
        **extra,
    }
    return parse_config(raw, {}, check_files=False)


# ------------------------------------------------------------ check-config
def test_check_lists_every_route_with_its_scopes_and_audience(demo: Settings) -> None:
    text = render_check(demo)
    assert "Routes: 34 (first match wins" in text
    line = next(row for row in text.splitlines() if "payments.disbursements.create" in row)
    assert line.split() == [
        "16",
        "payments.disbursements.create",
        "POST",
        "/partner/v1/payments/disbursements",
        "payments:write",
        "partner/v1",
    ]
    prefetched = next(row for row in text.splitlines() if " decisions.get " in row)
    assert prefetched.split()[-1] == "yes"
    assert "GET,DELETE" in text, "methods in HTTP order, not alphabetical"


def test_check_groups_routes_by_distinct_scope_set(demo: Settings) -> None:
    text = render_check(demo)
    assert "Scope sets: 10 (one token each)" in text
    row = next(r for r in text.splitlines() if r.split()[:2] == ["partner/v1", "decisions:read"])
    assert row.split(None, 2)[2] == "decisions.list, decisions.get"
    assert text.rstrip().endswith("Warnings: none")


def test_check_shows_warnings_and_never_the_secret() -> None:
    routes = [
        {"methods": ["GET"], "path": "/partner/v1/decisions/**", "scopes": ["decisions:read"]},
        {
            "methods": ["GET"],
            "path": "/partner/v1/decisions/{id}",
            "scopes": ["decisions:read", "identity:read"],
        },
    ]
    s = settings(routes, cache={"url": "redis://ccp:hunter2@redis:6379/0", "encryption_key_file": "/run/k"})
    text = render_check(s)
    assert "Warnings: 1\n  - routes[1] is shadowed by routes[0] (GET /partner/v1/decisions/**)" in text
    assert "decisions:read identity:read" in text, "a scope set is shown in its wire form"
    assert "very-secret-value" not in text and "hunter2" not in text
    assert "redis://ccp:***@redis:6379/0" in text
    assert "routes[1]" in text.split("Scope sets")[1], "unnamed routes are listed by position"


def test_check_shows_unix_and_ipv6_listeners() -> None:
    routes = [{"methods": ["GET"], "path": "/a", "scopes": ["decisions:read"]}]
    text = render_check(settings(routes, listen="unix:/run/ccp.sock", admin_listen="[::1]:9090"))
    assert "listen:   unix:/run/ccp.sock  admin [::1]:9090" in text


# ---------------------------------------------------------------- explain
def test_explain_a_match_shows_route_params_scopes_audience_and_upstream(demo: Settings) -> None:
    text, code = render_explain(demo, "get", "/partner/v1/identity/companies/09876543/directors?page=2")
    assert code == EXIT_MATCHED
    assert text.splitlines() == [
        "GET /partner/v1/identity/companies/09876543/directors?page=2",
        "  query:    ?page=2 (never used for matching; forwarded as is)",
        "  route:    routes[18] identity.directors.list",
        "  matches:  GET /partner/v1/identity/companies/{company_number}/directors",
        "  params:   company_number=09876543",
        "  scopes:   identity:read",
        "  audience: partner/v1",
        "  upstream: http://127.0.0.1:8444/partner/v1/identity/companies/09876543/directors?page=2",
    ]


def test_explain_literal_route_wins_over_the_parameter_route(demo: Settings) -> None:
    text, code = render_explain(demo, "GET", "/partner/v1/payments/reconciliation")
    assert code == EXIT_MATCHED and "payments.reconciliation" in text


def test_explain_head_rides_on_get(demo: Settings) -> None:
    text, code = render_explain(demo, "HEAD", "/partner/v1/decisions/dec_1")
    assert code == EXIT_MATCHED
    assert text.splitlines()[-1] == "  note:     HEAD is allowed wherever GET is"


def test_explain_a_wrong_method_lists_the_routes_for_that_path(demo: Settings) -> None:
    text, code = render_explain(demo, "DELETE", "/partner/v1/applications/app_1")
    assert code == EXIT_DENIED
    assert text.splitlines()[1:] == [
        "  denied:   403 route_not_allowed (deny by default)",
        "  why:      routes match the path but not the method DELETE: routes[1] (GET), routes[4] (PATCH)",
    ]


def test_explain_an_unknown_path_is_denied(demo: Settings) -> None:
    text, code = render_explain(demo, "GET", "/partner/v1/secrets")
    assert code == EXIT_DENIED
    assert "why:      no route matches the path" in text


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/partner/v1/%2e%2e/admin"),
        ("GET", "/partner/v1/decisions/..;/x"),
        ("GET", "http://evil.example/partner/v1/decisions"),
        ("CONNECT", "/partner/v1/decisions"),
        ("GET", "//partner/v1/decisions"),
    ],
)
def test_explain_an_unsafe_target_is_refused_before_matching(
    demo: Settings, method: str, target: str
) -> None:
    text, code = render_explain(demo, method, target)
    assert code == EXIT_UNSAFE
    assert text.splitlines()[1].startswith("  refused:  400 bad_request: ")
    assert text.endswith("(checked before any route)")
