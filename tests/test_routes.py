"""proxy.routes: pattern grammar, trie matcher, explanations, shadowing."""

from __future__ import annotations

import random
import time

import pytest

from proxy.routes import (
    Pattern,
    RouteTable,
    Seg,
    parse_pattern,
    pattern_covers,
    shadowed_routes,
)
from proxy.settings import RouteSpec


def route(methods: str, path: str, scope: str = "decisions:read", name: str = "") -> RouteSpec:
    return RouteSpec(frozenset(methods.split(",")), path, (scope,), name=name)


def hit(table: RouteTable, method: str, path: tuple[str, ...]) -> RouteSpec:
    found = table.match(method, path)
    assert found is not None, (method, path)
    return found


def segs(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def reference_match(pattern: Pattern, segments: tuple[str, ...]) -> bool:
    """The pattern grammar read literally, one segment at a time, with no trie: the trie must agree."""
    for pos, (kind, value) in enumerate(pattern.parts):
        if kind is Seg.REST:
            return True
        if pos >= len(segments) or (kind is Seg.LITERAL and segments[pos] != value):
            return False
    return len(segments) == len(pattern.parts)


def reference_accepts(methods: frozenset[str], method: str) -> bool:
    """The method rule read literally: ``*`` is any method, and HEAD rides on GET."""
    return "*" in methods or method in methods or (method == "HEAD" and "GET" in methods)


# ------------------------------------------------------------------ patterns
def test_pattern_forms_compile_to_segment_kinds() -> None:
    p = parse_pattern("/partner/v1/{id}/*/**")
    assert p.parts == (
        (Seg.LITERAL, "partner"),
        (Seg.LITERAL, "v1"),
        (Seg.ONE, "id"),
        (Seg.ONE, ""),
        (Seg.REST, ""),
    )
    assert parse_pattern("/").parts == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("partner/v1", "a pattern starts with '/'"),
        ("", "a pattern starts with '/'"),
        ("/a/**/b", "'**' is only allowed as the last segment"),
        ("/a//b", "empty segment 2"),
        ("/a/", "empty segment 2"),
        ("/a/./b", "dot segment '.' is not allowed"),
        ("/a/..", "dot segment '..' is not allowed"),
        ("/a/%2e", "character '%'"),
        ("/a;x=1", "character ';'"),
        ("/a\\b", "character '\\\\'"),
        ("/a b", "character ' '"),
        ("/a/{1x}", "a {name} must be a whole segment and an identifier"),
        ("/a/x{id}", "a {name} must be a whole segment and an identifier"),
        ("/a/b*", "'*' must be a whole segment"),
        ("/a/***", "'*' must be a whole segment"),
        ("/a/{id}/b/{id}", "segment name {id} is used twice"),
    ],
)
def test_invalid_patterns_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        parse_pattern(text)
    assert message in str(err.value)


def test_bind_returns_named_segments_only() -> None:
    p = parse_pattern("/a/{company}/*/{id}/**")
    assert p.bind(("a", "c1", "x", "i9", "more", "rest")) == {"company": "c1", "id": "i9"}


# ------------------------------------------------------------------ matching
def test_literal_segments_match_exactly_and_case_sensitively() -> None:
    table = RouteTable.compile([route("GET", "/partner/v1/decisions")])
    assert table.match("GET", segs("/partner/v1/decisions")) is not None
    assert table.match("GET", segs("/partner/v1/Decisions")) is None
    assert table.match("GET", segs("/partner/v1/decisions/x")) is None
    assert table.match("GET", segs("/partner/v1")) is None


def test_star_and_named_segment_match_exactly_one_segment() -> None:
    table = RouteTable.compile([route("GET", "/a/*/x"), route("GET", "/b/{id}")])
    assert hit(table, "GET", ("a", "anything", "x")).index == 0
    assert table.match("GET", ("a", "x")) is None
    assert hit(table, "GET", ("b", "42")).index == 1
    assert table.match("GET", ("b",)) is None
    assert table.match("GET", ("b", "42", "more")) is None


def test_double_star_matches_zero_or_more_segments() -> None:
    table = RouteTable.compile([route("GET", "/partner/v1/decisions/**")])
    for path in ("/partner/v1/decisions", "/partner/v1/decisions/1", "/partner/v1/decisions/1/2/3"):
        assert table.match("GET", segs(path)) is not None, path
    assert table.match("GET", segs("/partner/v1/decisionsX")) is None
    assert table.match("GET", segs("/partner/v1")) is None


def test_root_pattern_matches_only_the_root() -> None:
    table = RouteTable.compile([route("GET", "/")])
    assert table.match("GET", ()) is not None
    assert table.match("GET", ("a",)) is None


def test_first_match_wins_in_table_order() -> None:
    table = RouteTable.compile(
        [
            route("GET", "/p/reconciliation", "payments:read", "literal"),
            route("GET", "/p/{id}", "payments:read", "param"),
            route("GET", "/p/**", "payments:write", "rest"),
        ]
    )
    assert hit(table, "GET", ("p", "reconciliation")).name == "literal"
    assert hit(table, "GET", ("p", "42")).name == "param"
    assert hit(table, "GET", ("p", "42", "x")).name == "rest"
    assert hit(table, "GET", ("p",)).name == "rest"


def test_an_earlier_wildcard_route_beats_a_later_literal_one() -> None:
    table = RouteTable.compile([route("GET", "/a/**", name="wide"), route("GET", "/a/b", name="narrow")])
    assert hit(table, "GET", ("a", "b")).name == "wide"


def test_method_filter_skips_to_the_next_route_for_the_same_path() -> None:
    table = RouteTable.compile(
        [route("POST", "/a/{id}", "applications:write"), route("GET", "/a/{id}", "applications:read")]
    )
    assert hit(table, "GET", ("a", "1")).scopes == ("applications:read",)
    assert hit(table, "POST", ("a", "1")).scopes == ("applications:write",)
    assert table.match("DELETE", ("a", "1")) is None


def test_deny_by_default() -> None:
    table = RouteTable.compile([route("GET", "/a")])
    assert table.match("GET", ("b",)) is None
    assert table.match("GET", ()) is None
    assert RouteTable.compile([]).match("GET", ("a",)) is None


def test_any_method_route_takes_every_method() -> None:
    table = RouteTable.compile([route("*", "/a")])
    for method in ("GET", "HEAD", "POST", "DELETE", "OPTIONS", "PROPFIND"):
        assert table.match(method, ("a",)) is not None


def test_head_is_allowed_where_get_is_but_not_the_reverse() -> None:
    table = RouteTable.compile([route("GET", "/g"), route("HEAD", "/h"), route("POST", "/p")])
    assert table.match("HEAD", ("g",)) is not None
    assert table.match("GET", ("h",)) is None
    assert table.match("HEAD", ("p",)) is None
    assert reference_accepts(frozenset({"GET"}), "HEAD") and not reference_accepts(frozenset({"HEAD"}), "GET")


def test_compile_sets_index_to_the_table_position() -> None:
    table = RouteTable.compile([route("GET", "/a"), route("GET", "/b")])
    assert [r.index for r in table.routes] == [0, 1]
    assert hit(table, "GET", ("b",)).index == 1


def test_trie_agrees_with_the_reference_matcher_on_random_tables() -> None:
    rng = random.Random(7)
    words = ["a", "b", "c"]

    def random_pattern() -> str:
        parts = [rng.choice([*words, "*", f"{{x{n}}}"]) for n in range(rng.randint(0, 3))]
        if rng.random() < 0.3:
            parts.append("**")
        return "/" + "/".join(parts) if parts else "/"

    methods = ["GET", "POST", "GET,POST", "*", "HEAD"]
    for _ in range(200):
        routes = [route(rng.choice(methods), random_pattern()) for _ in range(rng.randint(1, 12))]
        table = RouteTable.compile(routes)
        patterns = [parse_pattern(r.path) for r in routes]
        for _ in range(30):
            path = tuple(rng.choice(words) for _ in range(rng.randint(0, 4)))
            method = rng.choice(["GET", "HEAD", "POST", "DELETE"])
            expected = next(
                (
                    i
                    for i, (r, p) in enumerate(zip(routes, patterns, strict=True))
                    if reference_match(p, path) and reference_accepts(r.methods, method)
                ),
                None,
            )
            got = table.match(method, path)
            assert (got.index if got else None) == expected, (routes, method, path)


def test_a_thousand_route_table_matches_correctly_and_fast() -> None:
    routes = [route("GET", f"/partner/v1/res{i}/{{id}}/sub{i % 7}", name=f"r{i}") for i in range(1000)]
    routes.append(route("*", "/partner/v1/**", name="catch-all"))
    table = RouteTable.compile(routes)
    for i in (0, 1, 499, 999):
        assert hit(table, "GET", ("partner", "v1", f"res{i}", "x", f"sub{i % 7}")).name == f"r{i}"
    assert hit(table, "POST", ("partner", "v1", "res5", "x", "sub5")).name == "catch-all"
    assert hit(table, "GET", ("partner", "v1", "res5", "x", "sub6")).name == "catch-all"
    assert table.match("GET", ("other",)) is None
    path = ("partner", "v1", "res999", "x", "sub5")
    runs = 20_000
    started = time.perf_counter()
    for _ in range(runs):
        table.match("GET", path)
    per_match = (time.perf_counter() - started) / runs
    assert per_match < 50e-6, f"{per_match * 1e6:.1f} us per match"


# ---------------------------------------------------------------- explain
def test_explain_names_the_match_and_its_params() -> None:
    table = RouteTable.compile([route("GET", "/a/{id}", name="a.get")])
    found = table.explain("GET", ("a", "7"))
    assert found.route is not None and found.route.name == "a.get"
    assert found.params == {"id": "7"}
    assert found.reason == "matched routes[0] a.get"


def test_explain_lists_routes_that_match_the_path_but_not_the_method() -> None:
    table = RouteTable.compile([route("POST", "/a/{id}"), route("GET,PATCH", "/a/*"), route("GET", "/b")])
    found = table.explain("DELETE", ("a", "7"))
    assert found.route is None
    assert [r.index for r in found.path_matches] == [0, 1]
    assert (
        found.reason
        == "routes match the path but not the method DELETE: routes[0] (POST), routes[1] (GET,PATCH)"
    )


def test_explain_says_when_no_route_matches_the_path() -> None:
    found = RouteTable.compile([route("GET", "/a")]).explain("GET", ("b",))
    assert found.route is None and found.path_matches == ()
    assert found.reason == "no route matches the path"


# -------------------------------------------------------------- shadowing
@pytest.mark.parametrize(
    ("wide", "narrow"),
    [
        ("/a/{id}", "/a/b"),
        ("/a/*", "/a/{id}"),
        ("/a/**", "/a"),
        ("/a/**", "/a/b/{c}/**"),
        ("/**", "/"),
        ("/a/*/c", "/a/b/c"),
        ("/a/b", "/a/b"),
    ],
)
def test_pattern_covers(wide: str, narrow: str) -> None:
    assert pattern_covers(parse_pattern(wide), parse_pattern(narrow))


@pytest.mark.parametrize(
    ("wide", "narrow"),
    [
        ("/a/b", "/a/{id}"),
        ("/a/{id}", "/a/**"),
        ("/a/{id}", "/a"),
        ("/a/*", "/a/b/c"),
        ("/a/*/**", "/a/**"),
        ("/a/b/**", "/a/**"),
        ("/a", "/b"),
        ("/", "/a"),
    ],
)
def test_pattern_does_not_cover(wide: str, narrow: str) -> None:
    assert not pattern_covers(parse_pattern(wide), parse_pattern(narrow))


def test_shadowed_routes_are_reported_with_the_first_shadowing_route() -> None:
    routes = [
        route("GET", "/a/**"),
        route("GET,POST", "/a/*"),
        route("GET", "/a/b/{x}"),
        route("POST", "/a/b"),
        route("*", "/c/*"),
        route("HEAD", "/c/d"),
        route("GET", "/e"),
        route("HEAD", "/e"),
    ]
    assert shadowed_routes(routes) == [(2, 0), (3, 1), (5, 4), (7, 6)]


def test_routes_that_differ_in_methods_or_come_wider_later_are_not_shadowed() -> None:
    routes = [
        route("GET", "/p/reconciliation"),
        route("GET", "/p/{id}"),
        route("POST", "/p/{id}"),
        route("GET,POST", "/q"),
        route("*", "/q"),
        route("HEAD", "/r"),
        route("GET", "/r"),
    ]
    assert shadowed_routes(routes) == []
