"""proxy.config: schema, key-path problems, ${VAR} interpolation, CCP_ overrides, shipped configs."""

from __future__ import annotations

import base64
import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load_config, parse_config
from proxy.config.env import env_variables, interpolate, references
from proxy.config.keys import SECTIONS
from proxy.config.report import Report
from proxy.config.routes import parse_routes
from proxy.emulator.api import API_ROUTES
from proxy.errors import ConfigError
from proxy.settings import ListenAddress, Settings

ROOT = Path(__file__).resolve().parent.parent
PARTNER = ROOT / "config" / "credicorp-partner-v1.yaml"
PACKAGED = ROOT / "proxy" / "data" / "credicorp-partner-v1.yaml"
DEMO = ROOT / "config" / "demo.yaml"

ROUTE = {
    "name": "decisions.get",
    "methods": ["GET"],
    "path": "/partner/v1/decisions/{id}",
    "scopes": ["decisions:read"],
}


def minimal() -> dict[str, Any]:
    return {"auth": {"client_id": "cc_client_test", "client_secret": "s3cret"}, "routes": [dict(ROUTE)]}


def with_key(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``raw`` with ``a.b`` set (``routes.0.x`` indexes lists)."""
    raw = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node: Any = raw
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return raw


def parse(raw: dict[str, Any], env: dict[str, str] | None = None) -> Settings:
    return parse_config(raw, env or {}, check_files=False)


def problems(raw: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse(raw, env)
    return err.value.problems


def route(**fields: Any) -> dict[str, Any]:
    return {**ROUTE, "name": "", **fields}


# ---------------------------------------------------------------- defaults
def test_minimal_config_gets_the_documented_defaults() -> None:
    settings = parse(minimal())
    assert settings.upstream.url == "https://api.credicorp.co.uk"
    assert settings.auth.method == "client_secret_post" and settings.auth.audience == "partner/v1"
    assert settings.listen == ListenAddress("127.0.0.1", 8080)
    assert settings.cache.url == "memory://" and settings.refresh.at_fraction == 0.9
    assert settings.routes[0].audience == "partner/v1" and settings.warnings == ()


# ---------------------------------------------------- one problem per rule
BAD_VALUES = [
    (
        "upstream.url",
        "http://api.credicorp.co.uk",
        "upstream.url: http:// is only allowed to a loopback host: "
        "a token or secret sent in clear can be stolen",
    ),
    (
        "upstream.url",
        "https://api.credicorp.co.uk/partner",
        'upstream.url: must be an origin (scheme://host[:port]) without a path, got path "/partner"',
    ),
    (
        "upstream.url",
        "https://u:p@api.credicorp.co.uk",
        "upstream.url: must not contain credentials (user:password@)",
    ),
    ("upstream.url", "https://api.credicorp.co.uk?x=1", "upstream.url: must not have a query or a fragment"),
    ("upstream.url", "ftp://api", 'upstream.url: expected an http(s) URL, got "ftp://api"'),
    ("upstream.timeout_s", 0, "upstream.timeout_s: must be > 0, got 0.0"),
    ("upstream.timeout_s", "soon", 'upstream.timeout_s: expected a number, got "soon"'),
    ("upstream.timeout_s", True, "upstream.timeout_s: expected a number, got True"),
    ("upstream.pool_size", 1.5, "upstream.pool_size: expected an integer, got 1.5"),
    ("upstream.max_body_bytes", 0, "upstream.max_body_bytes: must be > 0, got 0"),
    ("upstream.retry_body_limit", -1, "upstream.retry_body_limit: must be >= 0, got -1"),
    (
        "upstream.forwarded_headers",
        "maybe",
        'upstream.forwarded_headers: expected true or false, got "maybe"',
    ),
    ("upstream.ca_file", 5, "upstream.ca_file: expected a string, got 5"),
    (
        "auth.issuer",
        "http://sso.credicorp.co.uk",
        "auth.issuer: http:// is only allowed to a loopback host: "
        "a token or secret sent in clear can be stolen",
    ),
    ("auth.token_endpoint", "token", 'auth.token_endpoint: expected an http(s) URL, got "token"'),
    ("auth.client_id", " ", "auth.client_id: must not be empty"),
    ("auth.client_secret", "", "auth.client_secret: must not be empty"),
    (
        "auth.method",
        "basic",
        'auth.method: expected one of client_secret_post, client_secret_basic, got "basic"',
    ),
    (
        "auth.audience",
        "partner/v2",
        'auth.audience: expected one of internal/v1, partner/v1, public/v1, got "partner/v2"',
    ),
    ("auth.max_mint_rate", 10, "auth.max_mint_rate: must be > 0 and < 10 (platform limit 10/s), got 10.0"),
    ("auth.default_expires_in", 0, "auth.default_expires_in: must be > 0, got 0"),
    ("listen", "localhost", 'listen: expected host:port, [v6]:port or unix:/path, got "localhost"'),
    ("listen", "unix:proxy.sock", 'listen: expected unix:/absolute/path, got "unix:proxy.sock"'),
    ("listen", "127.0.0.1:70000", 'listen: port out of range in "127.0.0.1:70000"'),
    ("listen", "[::g]:80", 'listen: not a valid host[:port]: "[::g]:80"'),
    ("listen", "300.1.1.1:80", 'listen: not a valid host[:port]: "300.1.1.1:80"'),
    ("admin_listen", "127.0.0.1:8080", "admin_listen: must differ from listen (127.0.0.1:8080)"),
    ("admin_listen", "0.0.0.0:8080", "admin_listen: must differ from listen (127.0.0.1:8080)"),
    (
        "cache.url",
        "memcached://x",
        "cache.url: expected memory://, unix:// or a redis, rediss, redis+sentinel, "
        'redis+cluster, rediss+cluster URL, got "memcached://x"',
    ),
    ("cache.url", "memory://x", "cache.url: expected memory:// or unix:///absolute/path.sock"),
    (
        "cache.url",
        "redis://a:1,b:2",
        "cache.url: one host only; use redis+sentinel:// or redis+cluster:// for several",
    ),
    ("cache.url", "redis://h/abc", 'cache.url: redis:// takes [/db] after the host, got "/abc"'),
    (
        "cache.url",
        "redis+sentinel://h:26379",
        'cache.url: redis+sentinel:// takes /service_name[/db] after the host, got ""',
    ),
    ("cache.url", "redis+cluster://h", "cache.url: redis+cluster:// needs host:port for every node"),
    ("cache.key_prefix", "a b", "cache.key_prefix: expected [A-Za-z0-9_.:-]+"),
    ("cache.timeout_s", -0.5, "cache.timeout_s: must be > 0, got -0.5"),
    ("refresh.at_fraction", 1, "refresh.at_fraction: must be between 0 and 1, exclusive, got 1.0"),
    ("refresh.min_margin_s", -1, "refresh.min_margin_s: must be >= 0, got -1.0"),
    ("refresh.idle_s", 0, "refresh.idle_s: must be > 0, got 0.0"),
    ("refresh.prefetch", "some", 'refresh.prefetch: expected one of marked, all, none, got "some"'),
    (
        "logging.level",
        "loud",
        'logging.level: expected one of critical, debug, error, info, warning, got "loud"',
    ),
    ("shutdown_grace_s", -1, "shutdown_grace_s: must be >= 0, got -1.0"),
    ("reuse_port", "sometimes", 'reuse_port: expected true or false, got "sometimes"'),
    ("upstream.timout_s", 3, 'upstream.timout_s: unknown key (did you mean "timeout_s"?)'),
    ("rotes", [], 'rotes: unknown key (did you mean "routes"?)'),
    ("upstream", "https://x", 'upstream: expected a mapping, got "https://x"'),
    ("routes", None, "routes: required: the route table (deny by default refuses every other request)"),
    ("routes", [], "routes: the route table is empty: every request would be refused"),
    ("routes", "all", 'routes: expected a list of routes, got "all"'),
    ("routes.0", "GET /x", 'routes[0]: expected a mapping with methods, path and scopes, got "GET /x"'),
    (
        "routes.0.scopes",
        ["payment:write"],
        'routes[0].scopes[0]: unknown scope "payment:write" (did you mean "payments:write"?)',
    ),
    (
        "routes.0.scopes",
        ["decisions:read", "openid"],
        'routes[0].scopes[1]: "openid" is an OpenID Connect sign-in scope, not an API scope',
    ),
    (
        "routes.0.scopes",
        ["decisions:read applications:read"],
        'routes[0].scopes[0]: unknown scope "decisions:read applications:read" (one scope per list item)',
    ),
    ("routes.0.scopes", [], "routes[0].scopes: required: a non-empty list of scopes, e.g. [decisions:read]"),
    (
        "routes.0.methods",
        [],
        'routes[0].methods: required: a non-empty list of HTTP methods, e.g. [GET] or ["*"] for any',
    ),
    (
        "routes.0.methods",
        "GET",
        'routes[0].methods: required: a non-empty list of HTTP methods, e.g. [GET] or ["*"] for any',
    ),
    ("routes.0.methods", ["CONNECT"], "routes[0].methods[0]: CONNECT is never proxied"),
    ("routes.0.methods", ["GET", "trace"], "routes[0].methods[1]: TRACE is never proxied"),
    ("routes.0.methods", ["GETT"], 'routes[0].methods[0]: unknown HTTP method "GETT" (did you mean "GET"?)'),
    ("routes.0.methods", ["*", "GET"], 'routes[0].methods[0]: "*" (any method) must be the only method'),
    (
        "routes.0.path",
        "partner/v1",
        "routes[0].path: invalid pattern \"partner/v1\": a pattern starts with '/'",
    ),
    (
        "routes.0.path",
        "/a/**/b",
        "routes[0].path: invalid pattern \"/a/**/b\": '**' is only allowed as the last segment",
    ),
    (
        "routes.0.path",
        None,
        "routes[0].path: required: a path pattern such as /partner/v1/decisions/{id}, got None",
    ),
    (
        "routes.0.audience",
        "partner",
        'routes[0].audience: expected one of internal/v1, partner/v1, public/v1, got "partner"',
    ),
    (
        "routes.0.name",
        "has space",
        'routes[0].name: expected a label matching [A-Za-z0-9][A-Za-z0-9_.:-]*, got "has space"',
    ),
    ("routes.0.prefetch", "sometimes", 'routes[0].prefetch: expected true or false, got "sometimes"'),
    ("routes.0.scope", ["decisions:read"], 'routes[0].scope: unknown key (did you mean "scopes"?)'),
    (
        "routes.0.scopes",
        ["payments:write"],
        'routes[0].scopes[0]: write scope "payments:write" on a read-only '
        'route (GET): use "payments:read", or set allow_write_scope_on_read: true',
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), BAD_VALUES, ids=[f"{p}={v!r}" for p, v, _ in BAD_VALUES]
)
def test_each_problem_is_reported_with_its_key_path(path: str, value: Any, message: str) -> None:
    assert message in problems(with_key(minimal(), path, value))


def test_every_problem_is_reported_together_in_order() -> None:
    raw = with_key(minimal(), "upstream.url", "http://example.com")
    raw = with_key(raw, "auth.method", "basic")
    raw = with_key(raw, "listen", "nowhere")
    raw["routes"].append(route(scopes=["payment:write"], methods=["POST"]))
    found = problems(raw)
    assert [p.split(":")[0] for p in found] == [
        "upstream.url",
        "auth.method",
        "listen",
        "routes[1].scopes[0]",
    ]
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert str(err.value).startswith("invalid configuration:\n  - upstream.url: ")


def test_exactly_one_client_secret_source_is_required() -> None:
    both = with_key(minimal(), "auth.client_secret_file", "/run/secret")
    message = "client_secret (CCP_AUTH_CLIENT_SECRET) and client_secret_file (CCP_AUTH_CLIENT_SECRET_FILE)"
    assert f"auth: set only one of {message}" in problems(both)
    neither = copy.deepcopy(minimal())
    del neither["auth"]["client_secret"]
    assert f"auth: set one of {message}" in problems(neither)


def test_write_scope_on_read_route_is_allowed_when_the_route_says_so() -> None:
    raw = with_key(minimal(), "routes.0", route(scopes=["payments:write"], allow_write_scope_on_read=True))
    assert parse(raw).routes[0].scopes == ("payments:write",)


def test_manage_scopes_have_no_read_twin_so_they_are_fine_on_get_routes() -> None:
    raw = with_key(minimal(), "routes.0", route(path="/partner/v1/webhooks", scopes=["webhooks:manage"]))
    assert parse(raw).warnings == ()


def test_duplicate_route_names_are_a_problem() -> None:
    raw = minimal()
    raw["routes"].append(route(name="decisions.get", path="/partner/v1/decisions"))
    assert problems(raw) == ['routes[1].name: duplicate name "decisions.get" (also routes[0])']


def test_routes_keep_their_order_scopes_sorted_and_default_label() -> None:
    raw = with_key(minimal(), "routes.0.scopes", ["decisions:read", "applications:read", "decisions:read"])
    raw["routes"].append(
        route(methods=["post", "PUT"], path="/partner/v1/applications", scopes=["applications:write"])
    )
    routes = parse(raw).routes
    assert routes[0].scopes == ("applications:read", "decisions:read")
    assert [r.index for r in routes] == [0, 1]
    assert routes[1].label == "POST,PUT /partner/v1/applications"


def test_route_audience_overrides_the_default() -> None:
    raw = with_key(minimal(), "routes.0.audience", "internal/v1")
    raw = with_key(raw, "auth.audience", "public/v1")
    raw["routes"].append(route(path="/partner/v1/decisions"))
    assert [r.audience for r in parse(raw).routes] == ["internal/v1", "public/v1"]


def test_parse_routes_normalises_methods_and_scopes() -> None:
    raw = [{"methods": ["get", "Head"], "path": "/a", "scopes": ["decisions:read", "applications:read"] * 2}]
    report = Report()
    routes = parse_routes(raw, "partner/v1", report)
    assert report.problems == [] and report.warnings == []
    assert routes[0].methods == frozenset({"GET", "HEAD"})
    assert routes[0].scopes == ("applications:read", "decisions:read")
    assert routes[0].audience == "partner/v1" and routes[0].name == "" and routes[0].index == 0
    assert routes[0].label == "GET,HEAD /a"


def test_parse_routes_keeps_the_table_index_of_each_route() -> None:
    raw = [{"methods": ["GET"], "path": f"/r{i}", "scopes": ["decisions:read"]} for i in range(3)]
    routes = parse_routes(raw, "internal/v1", Report())
    assert [r.index for r in routes] == [0, 1, 2]
    assert {r.audience for r in routes} == {"internal/v1"}


def test_a_route_with_a_problem_already_reported_at_its_path_is_still_left_out() -> None:
    """The report keeps one problem per path; the entry is dropped all the same, so the table rules
    (here: unique names) never judge a route that is already wrong."""
    raw = minimal()
    raw["routes"].append(route(name="decisions.get", path="/partner/v1/decisions", scopes=["${SCOPE}"]))
    assert problems(raw) == ["routes[1].scopes[0]: environment variable SCOPE is not set"]


# ----------------------------------------------------------------- warnings
def test_shadowed_route_is_a_warning() -> None:
    raw = minimal()
    raw["routes"] = [
        route(path="/partner/v1/decisions/**", name="all"),
        route(path="/partner/v1/decisions/{id}"),
    ]
    assert parse(raw).warnings == ("routes[1] is shadowed by routes[0] (all): it can never match",)


def test_over_broad_routes_are_warnings() -> None:
    raw = minimal()
    raw["routes"] = [
        route(methods=["POST"], path="/partner/v1/**", scopes=["payments:write", "partner:manage"]),
    ]
    assert parse(raw).warnings == (
        "routes[0].scopes: 2 high-risk scopes on one route (partner:manage, payments:write): "
        "a leaked token could do all of it; split the route",
        'routes[0].path: "/partner/v1/**" covers the whole API (over-broad): '
        "list the resources the application uses",
    )


def test_client_id_without_the_credicorp_prefix_is_a_warning() -> None:
    raw = with_key(minimal(), "auth.client_id", "acme")
    assert parse(raw).warnings == (
        'auth.client_id: "acme" does not start with cc_client_ (Credicorp ids do)',
    )


# ------------------------------------------------------------ interpolation
def test_variables_are_interpolated_in_string_values() -> None:
    raw = with_key(minimal(), "auth.client_id", "cc_client_${TEAM}")
    raw = with_key(raw, "upstream.timeout_s", "${TIMEOUT:-12.5}")
    raw = with_key(raw, "routes.0.scopes", ["${SCOPE}"])
    settings = parse(raw, {"TEAM": "acme", "SCOPE": "decisions:read"})
    assert settings.auth.client_id == "cc_client_acme"
    assert settings.upstream.timeout_s == 12.5
    assert settings.routes[0].scopes == ("decisions:read",)


def test_default_applies_when_the_variable_is_unset_or_empty() -> None:
    raw = with_key(minimal(), "cache.key_prefix", "${PREFIX:-ccp-dev}")
    assert parse(raw, {}).cache.key_prefix == "ccp-dev"
    assert parse(raw, {"PREFIX": ""}).cache.key_prefix == "ccp-dev"
    assert parse(raw, {"PREFIX": "prod"}).cache.key_prefix == "prod"


def test_unset_variable_without_default_names_the_key_and_the_variable() -> None:
    raw = with_key(minimal(), "auth.client_id", "${CC_CLIENT_ID}")
    raw = with_key(raw, "routes.0.scopes", ["${ROUTE_SCOPE}"])
    assert problems(raw) == [
        "auth.client_id: environment variable CC_CLIENT_ID is not set",
        "routes[0].scopes[0]: environment variable ROUTE_SCOPE is not set",
    ]


def test_double_dollar_escapes_and_malformed_references_are_reported() -> None:
    raw = with_key(minimal(), "auth.client_secret", "pa$${not-a-var}")
    assert parse(raw).auth.client_secret == "pa${not-a-var}"
    bad = with_key(minimal(), "auth.client_secret", "${1BAD}")
    assert problems(bad) == [
        'auth.client_secret: malformed reference "${1BAD}": use ${VAR} or ${VAR:-default}'
    ]
    unterminated = with_key(minimal(), "auth.client_secret", "${OPEN")
    assert problems(unterminated) == [
        'auth.client_secret: malformed reference "${": use ${VAR} or ${VAR:-default}'
    ]


def test_keys_overridden_from_the_environment_are_not_interpolated() -> None:
    raw = with_key(minimal(), "auth.client_id", "${CC_CLIENT_ID}")
    assert parse(raw, {"CCP_AUTH_CLIENT_ID": "cc_client_env"}).auth.client_id == "cc_client_env"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("${A}", {"A"}),
        ("x-${A}-${B_2}", {"A", "B_2"}),
        ("$${A}", set()),  # a literal ${A}
        ("$$${A}", set()),
        ("${A:-default}", set()),
        ("${A:-}", set()),
        ("${1A} ${A", set()),  # malformed: interpolation reports them
    ],
)
def test_references_are_the_variables_without_a_default(text: str, names: set[str]) -> None:
    tree = {"auth": {"client_id": text}, "routes": [{"scopes": [text]}], "n": 5}
    assert references(tree) == names


def test_references_name_exactly_what_interpolation_finds_unset() -> None:
    tree = {"a": "${A}", "b": "$${B}", "c": "${C:-c}", "d": ["x${D}y"], "e": "${1E}"}
    report = Report()
    interpolate(tree, {}, "", report, skip=set())
    unset = {p.split(" ")[-4] for p in report.problems if p.endswith(" is not set")}
    assert unset == references(tree) == {"A", "D"}


# --------------------------------------------------------- env overrides
def test_every_settings_field_has_a_ccp_variable() -> None:
    names = env_variables()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert names[f"CCP_{section.upper()}_{f.name.upper()}"] == f"{section}.{f.name}"
    assert names["CCP_LISTEN"] == "listen" and names["CCP_ADMIN_LISTEN"] == "admin_listen"
    assert names["CCP_SHUTDOWN_GRACE_S"] == "shutdown_grace_s"
    assert {
        "CCP_UPSTREAM_URL",
        "CCP_AUTH_VERIFY",
        "CCP_CACHE_ENCRYPTION_KEY_FILE",
        "CCP_REFRESH_AT_FRACTION",
    } <= set(names)


def test_route_flags_take_interpolated_booleans_like_every_other_key() -> None:
    raw = with_key(minimal(), "routes.0.prefetch", "${ROUTE_PREFETCH:-false}")
    assert parse(raw, {"ROUTE_PREFETCH": "true"}).routes[0].prefetch is True
    assert parse(raw, {}).routes[0].prefetch is False


def test_environment_wins_over_the_file_and_is_coerced() -> None:
    env = {
        "CCP_UPSTREAM_URL": "https://sandbox.credicorp.co.uk",
        "CCP_UPSTREAM_TIMEOUT_S": "12",
        "CCP_UPSTREAM_POOL_SIZE": "16",
        "CCP_UPSTREAM_MAX_BODY_BYTES": "1048576",
        "CCP_AUTH_VERIFY": "no",
        "CCP_AUTH_METHOD": "client_secret_basic",
        "CCP_UPSTREAM_FORWARDED_HEADERS": "1",
        "CCP_LISTEN": "[::1]:8081",
        "CCP_ADMIN_LISTEN": "unix:/run/ccp/admin.sock",
        "CCP_REFRESH_AT_FRACTION": "0.8",
        "CCP_SHUTDOWN_GRACE_S": "5",
        "CCP_LOGGING_ACCESS_LOG": "off",
        "CCP_REUSE_PORT": "true",
    }
    s = parse(with_key(minimal(), "upstream.url", "https://ignored.example"), env)
    assert s.upstream.url == "https://sandbox.credicorp.co.uk"
    assert (s.upstream.timeout_s, s.upstream.pool_size, s.upstream.max_body_bytes) == (12.0, 16, 1048576)
    assert s.auth.verify is False and s.auth.method == "client_secret_basic" and s.upstream.forwarded_headers
    assert s.listen == ListenAddress("::1", 8081)
    assert s.admin_listen.unix_path == "/run/ccp/admin.sock"
    assert (s.refresh.at_fraction, s.shutdown_grace_s, s.logging.access_log) == (0.8, 5.0, False)
    assert s.reuse_port is True and parse(minimal(), {}).reuse_port is False  # off unless asked


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CCP_UPSTREAM_TIMEOUT_S", "abc", 'env CCP_UPSTREAM_TIMEOUT_S: expected a number, got "abc"'),
        ("CCP_UPSTREAM_TIMEOUT_S", "nan", 'env CCP_UPSTREAM_TIMEOUT_S: expected a number, got "nan"'),
        ("CCP_UPSTREAM_POOL_SIZE", "1.5", 'env CCP_UPSTREAM_POOL_SIZE: expected an integer, got "1.5"'),
        ("CCP_AUTH_VERIFY", "perhaps", 'env CCP_AUTH_VERIFY: expected true or false, got "perhaps"'),
        (
            "CCP_REFRESH_AT_FRACTION",
            "1.5",
            "env CCP_REFRESH_AT_FRACTION: must be between 0 and 1, exclusive, got 1.5",
        ),
        ("CCP_LISTEN", "8080", 'env CCP_LISTEN: expected host:port, [v6]:port or unix:/path, got "8080"'),
        (
            "CCP_UPSTREAM_URL",
            "http://10.0.0.1",
            "env CCP_UPSTREAM_URL: http:// is only allowed to a loopback host: "
            "a token or secret sent in clear can be stolen",
        ),
    ],
)
def test_bad_environment_values_are_named_by_variable(name: str, value: str, message: str) -> None:
    assert problems(minimal(), {name: value}) == [message]


def test_empty_env_value_clears_an_optional_key() -> None:
    raw = with_key(minimal(), "upstream.max_body_bytes", 100)
    assert parse(raw, {"CCP_UPSTREAM_MAX_BODY_BYTES": ""}).upstream.max_body_bytes is None


def test_a_secret_source_from_the_environment_replaces_the_files_other_source() -> None:
    from_file = with_key(minimal(), "auth", {"client_id": "cc_client_x", "client_secret_file": "/run/s"})
    s = parse(from_file, {"CCP_AUTH_CLIENT_SECRET": "env-secret"})
    assert (s.auth.client_secret, s.auth.client_secret_file) == ("env-secret", None)
    s = parse(minimal(), {"CCP_AUTH_CLIENT_SECRET_FILE": "/run/s"})
    assert (s.auth.client_secret, s.auth.client_secret_file) == (None, "/run/s")


def test_unknown_ccp_variables_are_warned_about_with_a_suggestion() -> None:
    s = parse(
        minimal(), {"CCP_UPSTREM_URL": "https://x", "CCP_ROUTES_FILE": "", "CCP_CONFIG": "x", "OTHER": "1"}
    )
    assert s.warnings == (
        'env CCP_UPSTREM_URL: not a configuration variable, ignored (did you mean "CCP_UPSTREAM_URL"?)',
    )


def test_listen_forms() -> None:
    for text, expected in [
        ("127.0.0.1:0", ListenAddress("127.0.0.1", 0)),
        ("localhost:8080", ListenAddress("localhost", 8080)),
        ("[::]:9091", ListenAddress("::", 9091)),
        ("unix:/run/credicorp/proxy.sock", ListenAddress("", 0, "/run/credicorp/proxy.sock")),
    ]:
        assert parse(with_key(minimal(), "listen", text)).listen == expected
    both_zero = with_key(with_key(minimal(), "listen", "127.0.0.1:0"), "admin_listen", "127.0.0.1:0")
    assert parse(both_zero).admin_listen.port == 0


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "redis://localhost:6379/0",
        "rediss://user:pw@redis.internal:6380/2",
        "redis://redis",
        "unix:///run/redis.sock",
        "redis+sentinel://s1:26379,s2:26379/mymaster/1",
        "redis+cluster://n1:7000,n2:7000",
        "rediss+cluster://n1:7000",
        "redis://h:6379/0?health_check_interval=5",
    ],
)
def test_cache_url_forms_are_accepted(url: str) -> None:
    assert parse(with_key(minimal(), "cache.url", url)).cache.url == url


# ---------------------------------------------------------------- files
def write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_load_config_reports_a_missing_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "nope.yaml"), {})
    assert err.value.problems == [f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory"]
    bad = write(tmp_path / "bad.yaml", "auth: [\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad), {})
    assert err.value.problems[0].startswith(f"{bad}: not valid YAML: ")


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "auth:\n  client_id: a\nlisten: 127.0.0.1:1\nauth:\n  client_id: b\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path), {})
    assert err.value.problems == [f'{path}: line 4: duplicate key "auth"']


def test_named_files_must_be_readable_unless_file_checks_are_off(tmp_path: Path) -> None:
    raw = with_key(minimal(), "auth", {"client_id": "cc_client_x", "client_secret_file": str(tmp_path / "s")})
    raw = with_key(raw, "cache.encryption_key_file", str(tmp_path / "k"))
    with pytest.raises(ConfigError) as err:
        parse_config(raw, {})
    assert err.value.problems == [
        f'auth.client_secret_file: cannot read "{tmp_path / "s"}"',
        f'cache.encryption_key_file: cannot read "{tmp_path / "k"}"',
    ]
    write(tmp_path / "s", "secret")
    write(tmp_path / "k", "key")
    with pytest.raises(ConfigError) as err:  # readable but unusable: refused here, not at start-up
        parse_config(raw, {})
    assert err.value.problems == [f"cache.encryption_key_file: {tmp_path / 'k'}:1: not valid base64"]
    (tmp_path / "k").write_text(base64.b64encode(bytes(32)).decode())
    settings = parse_config(raw, {})
    assert settings.auth.client_secret is None, "the secret is read at run time, never stored in Settings"
    assert parse_config(with_key(raw, "upstream.ca_file", "/nonexistent"), {}, check_files=False)


def test_routes_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    write(tmp_path / "routes.yaml", [route(path="/partner/v1/decisions")])
    config = {k: v for k, v in minimal().items() if k != "routes"} | {"routes_file": "routes.yaml"}
    path = write(tmp_path / "c.yaml", config)
    assert [r.path for r in load_config(str(path), {}).routes] == ["/partner/v1/decisions"]
    write(path, minimal() | {"routes_file": "routes.yaml"})
    with pytest.raises(ConfigError) as err:
        load_config(str(path), {})
    assert err.value.problems == ["routes_file: expected one path, and no routes: beside it"]


def test_ccp_routes_file_replaces_the_files_routes(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", minimal())
    settings = load_config(str(path), {"CCP_ROUTES_FILE": str(PARTNER), "CC_CLIENT_ID": "unused"})
    assert len(settings.routes) == len(yaml.safe_load(PARTNER.read_text())["routes"]) > 1


def test_without_a_file_the_config_comes_from_env_and_the_builtin_table() -> None:
    env = {"CCP_AUTH_CLIENT_ID": "cc_client_env", "CCP_AUTH_CLIENT_SECRET": "s"}
    settings = load_config(None, env)
    assert settings.auth.client_id == "cc_client_env"
    assert settings.routes == load_config(str(PARTNER), {"CC_CLIENT_ID": "x"}, check_files=False).routes
    with pytest.raises(ConfigError) as err:
        load_config(None, {})
    assert err.value.problems[0] == "auth.client_id: must not be empty"


# -------------------------------------------------------- shipped configs
def test_shipped_partner_config_has_no_problems_and_no_warnings() -> None:
    settings = load_config(str(PARTNER), {"CC_CLIENT_ID": "cc_client_prod"}, check_files=False)
    assert settings.warnings == ()
    assert settings.auth.client_secret_file == "/var/run/secrets/credicorp/client-secret"
    assert all(len(r.scopes) == 1 and r.name for r in settings.routes)


def test_shipped_partner_config_needs_its_secret_file_and_client_id() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(str(PARTNER), {})
    assert err.value.problems == [
        "auth.client_id: environment variable CC_CLIENT_ID is not set",
        'auth.client_secret_file: cannot read "/var/run/secrets/credicorp/client-secret"',
    ]


def test_demo_config_has_no_problems_and_no_warnings() -> None:
    settings = load_config(str(DEMO), {})
    assert settings.warnings == ()
    assert settings.upstream.url == "http://127.0.0.1:8444" and settings.auth.client_id == "cc_client_demo"
    assert [r.name for r in settings.routes if r.prefetch] == ["applications.get", "decisions.get"]


def test_packaged_route_table_is_a_copy_of_the_shipped_one() -> None:
    assert PACKAGED.read_bytes() == PARTNER.read_bytes(), "cp config/credicorp-partner-v1.yaml proxy/data/"


def test_demo_routes_equal_the_partner_routes_except_prefetch() -> None:
    def strip(routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "prefetch"} for r in routes]

    assert strip(yaml.safe_load(DEMO.read_text())["routes"]) == strip(
        yaml.safe_load(PARTNER.read_text())["routes"]
    )


def test_shipped_table_covers_exactly_the_emulated_partner_api() -> None:
    settings = load_config(str(PARTNER), {"CC_CLIENT_ID": "cc_client_x"}, check_files=False)
    shipped = {(m, r.path, r.scopes) for r in settings.routes for m in r.methods}
    emulated = {(r.method, r.path, (r.scope,)) for r in API_ROUTES}
    assert shipped == emulated


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["a", " b "], ("a", "b")),
        ("a, b,", ("a", "b")),  # env and ${VAR} text: comma-separated, blanks dropped
        ("", ()),
        ([], ()),
    ],
)
def test_list_keys_take_a_yaml_list_or_comma_separated_text(value: Any, expected: tuple[str, ...]) -> None:
    from proxy.config.values import coerce

    assert coerce(value, tuple[str, ...]) == expected


@pytest.mark.parametrize("value", [["a", 1], 3, {"a": 1}])
def test_list_keys_refuse_anything_but_strings(value: Any) -> None:
    from proxy.config.values import coerce

    with pytest.raises(ValueError, match="expected a list of strings"):
        coerce(value, tuple[str, ...])
