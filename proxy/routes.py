"""The route table: path patterns, a segment-trie matcher, explanations and shadowing.

A route decides which token (scope set, audience) a request gets, so matching
must be exact and cheap: exact because a loose match hands a token to a path it
was not minted for, cheap because it runs on every request. Patterns are
compiled once into a trie over path segments; a request walks the trie with
its decoded segments (``proxy.paths.SafeTarget.segments``), collects every
route whose pattern matches and keeps the lowest table index (first match
wins; no match = deny). The walk costs O(depth x live branches), independent
of the table size.

Pattern grammar (each segment, between ``/``):

* a literal, compared exactly (case-sensitive) with the decoded segment;
* ``*`` or ``{name}``: exactly one segment (``name`` is an identifier, unique
  in the pattern; it only documents and labels the segment);
* ``**``: the rest of the path, zero or more segments; last segment only.

``/`` alone is the root. Methods: ``*`` is any method; HEAD is allowed wherever
GET is (a HEAD is a GET without a body and needs the same scopes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any, Final

from proxy.scopes import HIGH_RISK_SCOPES, KNOWN_AUDIENCES, KNOWN_SCOPES, PARTNER_SCOPES, WRITE_SCOPES
from proxy.settings import RouteSpec
from proxy.wording import did_you_mean, show

__all__ = [
    "HTTP_METHODS",
    "Explanation",
    "Pattern",
    "RouteTable",
    "Seg",
    "accepts_method",
    "parse_pattern",
    "parse_routes",
    "pattern_covers",
    "shadowed_routes",
]

ANY_METHOD: Final = "*"
HTTP_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_NAME: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Characters that never appear in a decoded, validated segment, or that would
# make a literal ambiguous with the wildcard syntax.
_BAD_LITERAL: Final = re.compile(r"[%;\\/?#*{}\x00-\x20\x7f]")


class Seg(IntEnum):
    """The kind of one pattern segment."""

    LITERAL = 0
    ONE = 1  # '*' or '{name}'
    REST = 2  # '**'


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled path pattern: ``parts`` is one (kind, literal-or-name) per segment."""

    text: str
    parts: tuple[tuple[Seg, str], ...]

    def matches(self, segments: Sequence[str]) -> bool:
        """Reference (trie-free) matcher; the trie must agree with it."""
        for pos, (kind, value) in enumerate(self.parts):
            if kind is Seg.REST:
                return True
            if pos >= len(segments) or (kind is Seg.LITERAL and segments[pos] != value):
                return False
        return len(segments) == len(self.parts)

    def bind(self, segments: Sequence[str]) -> dict[str, str]:
        """The ``{name}`` values of a matching path, for ``explain`` output."""
        return {v: segments[i] for i, (k, v) in enumerate(self.parts) if k is Seg.ONE and v}


def parse_pattern(text: str) -> Pattern:
    """Compile one pattern; ``ValueError`` says what is wrong with it (no key path: the caller adds it)."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise ValueError("a pattern starts with '/'")
    if text == "/":
        return Pattern(text, ())
    raw = text[1:].split("/")
    parts = tuple(_parse_segment(seg, pos, len(raw)) for pos, seg in enumerate(raw, start=1))
    names = [v for k, v in parts if k is Seg.ONE and v]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"segment name {{{dupes[0]}}} is used twice")
    return Pattern(text, parts)


def _parse_segment(seg: str, pos: int, count: int) -> tuple[Seg, str]:
    if seg == "**":
        if pos != count:
            raise ValueError("'**' is only allowed as the last segment")
        return Seg.REST, ""
    if seg == "*":
        return Seg.ONE, ""
    if m := _NAME.fullmatch(seg):
        return Seg.ONE, m.group(1)
    if seg == "":
        raise ValueError(f"empty segment {pos} (no '//' and no trailing '/')")
    if seg.strip(".") == "":
        raise ValueError(f"dot segment {seg!r} is not allowed")
    if bad := _BAD_LITERAL.search(seg):
        what = "a {name} must be a whole segment and an identifier" if bad.group() in "{}" else ""
        what = what or ("'*' must be a whole segment" if bad.group() == "*" else f"character {bad.group()!r}")
        raise ValueError(f"segment {pos} {seg!r}: {what}")
    return Seg.LITERAL, seg


def accepts_method(methods: Iterable[str], method: str) -> bool:
    """Whether a route with ``methods`` takes ``method``; HEAD rides on GET."""
    methods = frozenset(methods)
    return ANY_METHOD in methods or method in methods or (method == "HEAD" and "GET" in methods)


def _effective(methods: frozenset[str]) -> frozenset[str] | None:
    """The methods a route really takes (None = any): GET implies HEAD."""
    if ANY_METHOD in methods:
        return None
    return methods | {"HEAD"} if "GET" in methods else methods


# --------------------------------------------------------------------- trie
class _Node:
    """One trie node; every index list is ascending (table order)."""

    __slots__ = ("end", "first", "literals", "rest", "wildcard")

    def __init__(self) -> None:
        self.literals: dict[str, _Node] = {}
        self.wildcard: _Node | None = None
        self.end: list[int] = []  # patterns that end exactly here
        self.rest: list[int] = []  # patterns with '**' here: match here and below
        self.first = 1 << 62  # lowest route index in this subtree (prunes the walk)

    def insert(self, parts: tuple[tuple[Seg, str], ...], index: int) -> None:
        node = self
        for kind, value in parts:
            node.first = min(node.first, index)
            if kind is Seg.REST:
                node.rest.append(index)
                return
            if kind is Seg.ONE:
                node.wildcard = node.wildcard or _Node()
                node = node.wildcard
            else:
                node = node.literals.setdefault(value, _Node())
        node.first = min(node.first, index)
        node.end.append(index)


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a request was (not) matched, for ``explain`` and for refusal messages."""

    method: str
    route: RouteSpec | None
    path_matches: tuple[RouteSpec, ...]  # every route whose pattern matches the path, table order
    params: dict[str, str]

    @property
    def reason(self) -> str:
        if self.route is not None:
            return f"matched routes[{self.route.index}] {self.route.label}"
        if not self.path_matches:
            return "no route matches the path"
        listed = ", ".join(f"routes[{r.index}] ({','.join(sorted(r.methods))})" for r in self.path_matches)
        return f"routes match the path but not the method {self.method}: {listed}"


class RouteTable:
    """The compiled, immutable route table; build it with ``RouteTable.compile``."""

    __slots__ = ("_methods", "_none", "_patterns", "_root", "routes")

    def __init__(self, routes: tuple[RouteSpec, ...], patterns: tuple[Pattern, ...]) -> None:
        self.routes = routes
        self._patterns = patterns
        self._methods = tuple(_effective(r.methods) for r in routes)
        self._none = len(routes)
        self._root = _Node()
        for index, pattern in enumerate(patterns):
            self._root.insert(pattern.parts, index)

    @classmethod
    def compile(cls, routes: Sequence[RouteSpec]) -> RouteTable:
        """Compile once at start; a bad pattern raises ``ValueError`` (config validation reports it first)."""
        routes = tuple(r if r.index == i else replace(r, index=i) for i, r in enumerate(routes))
        return cls(routes, tuple(parse_pattern(r.path) for r in routes))

    def __len__(self) -> int:
        return len(self.routes)

    def match(self, method: str, segments: tuple[str, ...]) -> RouteSpec | None:
        """The first route (table order) taking ``method`` on ``segments``; None = deny."""
        best = self._best(method, segments)
        return self.routes[best] if best < self._none else None

    def explain(self, method: str, segments: tuple[str, ...]) -> Explanation:
        """The match plus every route the path alone would match, to say why a request was denied."""
        best = self._best(method, segments)
        found = tuple(self.routes[i] for i in sorted({i for c in self._walk(segments) for i in c}))
        if best == self._none:
            return Explanation(method, None, found, {})
        return Explanation(method, self.routes[best], found, self._patterns[best].bind(segments))

    def _best(self, method: str, segments: tuple[str, ...]) -> int:
        """Walk the trie keeping the lowest accepted index; skip subtrees that cannot beat it.

        Hand-inlined (no generator, one small list per level) because it runs on every request.
        """
        best = self._none
        nodes = [self._root]
        for seg in segments:
            following: list[_Node] = []
            for node in nodes:
                if node.first >= best:
                    continue
                if node.rest:
                    best = self._first_taking(node.rest, method, best)
                if (child := node.literals.get(seg)) is not None:
                    following.append(child)
                if node.wildcard is not None:
                    following.append(node.wildcard)
            if not following:
                return best
            nodes = following
        for node in nodes:
            best = self._first_taking(node.end, method, best)
            best = self._first_taking(node.rest, method, best)
        return best

    def _first_taking(self, candidates: list[int], method: str, best: int) -> int:
        """The lowest index in ascending ``candidates`` that takes ``method`` and beats ``best``."""
        for index in candidates:
            if index >= best:
                break
            allowed = self._methods[index]
            if allowed is None or method in allowed:
                return index
        return best

    def _walk(self, segments: tuple[str, ...]) -> Iterator[list[int]]:
        """Yield the index lists of every pattern matching ``segments``, whatever the method."""
        nodes = [self._root]
        for seg in segments:
            following: list[_Node] = []
            for node in nodes:
                yield node.rest
                if (child := node.literals.get(seg)) is not None:
                    following.append(child)
                if node.wildcard is not None:
                    following.append(node.wildcard)
            nodes = following
        for node in nodes:
            yield node.end
            yield node.rest


# ---------------------------------------------------------------- shadowing
def pattern_covers(wide: Pattern, narrow: Pattern) -> bool:
    """Whether every path ``narrow`` matches is also matched by ``wide`` (literal < one < rest)."""
    for pos, (kind, value) in enumerate(wide.parts):
        if kind is Seg.REST:
            return True
        if pos >= len(narrow.parts):
            return False
        n_kind, n_value = narrow.parts[pos]
        if n_kind is Seg.REST or (kind is Seg.LITERAL and (n_kind is not Seg.LITERAL or n_value != value)):
            return False
    return len(narrow.parts) == len(wide.parts)


def _methods_cover(wide: frozenset[str], narrow: frozenset[str]) -> bool:
    w, n = _effective(wide), _effective(narrow)
    return w is None or (n is not None and n <= w)


def shadowed_routes(routes: Sequence[RouteSpec]) -> list[tuple[int, int]]:
    """``(shadowed, by)`` position pairs: route ``shadowed`` can never match because the earlier
    route ``by`` takes every (method, path) it takes. Only the first shadowing route is named."""
    patterns = [parse_pattern(r.path) for r in routes]
    found: list[tuple[int, int]] = []
    for j, later in enumerate(routes):
        for i in range(j):
            if _methods_cover(routes[i].methods, later.methods) and pattern_covers(patterns[i], patterns[j]):
                found.append((j, i))
                break
    return found


# ----------------------------------------------------- route table schema
ROUTE_KEYS: Final = ("name", "methods", "path", "scopes", "audience", "prefetch", "allow_write_scope_on_read")
_ROUTE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")


class _Findings:
    """Problems (fatal) and warnings of one route table, one problem per key path."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")


_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})


def parse_bool(value: object) -> bool:
    """A YAML boolean, or its text from ``${VAR}`` or a ``CCP_`` variable.

    Text accepted: true/false, 1/0, yes/no, on/off, in any case.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {show(value)}")


def parse_routes(raw: Any, default_audience: str) -> tuple[tuple[RouteSpec, ...], list[str], list[str]]:
    """The ``routes:`` list -> (routes, problems, warnings); pure, every problem named by key path.

    Routes without an ``audience`` get ``default_audience`` (``auth.audience``).
    """
    found = _Findings()
    if raw is None:
        found.problem("routes", "required: the route table (deny by default refuses every other request)")
    elif not isinstance(raw, list):
        found.problem("routes", f"expected a list of routes, got {show(raw)}")
    elif not raw:
        found.problem("routes", "the route table is empty: every request would be refused")
    else:
        parsed = [_parse_route(entry, i, default_audience, found) for i, entry in enumerate(raw)]
        routes = tuple(r for r in parsed if r is not None)
        _check_table(routes, found)
        return routes, found.problems, found.warnings
    return (), found.problems, found.warnings


def _parse_route(raw: Any, i: int, default_audience: str, found: _Findings) -> RouteSpec | None:
    where = f"routes[{i}]"
    if not isinstance(raw, Mapping):
        found.problem(where, f"expected a mapping with methods, path and scopes, got {show(raw)}")
        return None
    for key in raw:
        if key not in ROUTE_KEYS:
            found.problem(f"{where}.{key}", "unknown key" + did_you_mean(str(key), ROUTE_KEYS))
    methods = _methods(raw.get("methods"), f"{where}.methods", found)
    path = _path(raw.get("path"), f"{where}.path", found)
    scopes = _scopes(raw.get("scopes"), f"{where}.scopes", found)
    audience = _choice(raw.get("audience", default_audience), KNOWN_AUDIENCES, f"{where}.audience", found)
    name = raw.get("name", "")
    if not isinstance(name, str) or (name and not _ROUTE_NAME.fullmatch(name)):
        found.problem(
            f"{where}.name", f"expected a label matching [A-Za-z0-9][A-Za-z0-9_.:-]*, got {show(name)}"
        )
    flags = {key: _flag(raw.get(key, False), f"{where}.{key}", found) for key in ROUTE_KEYS[-2:]}
    if methods is None or path is None or scopes is None or audience is None:
        return None
    _check_scopes_for_methods(methods, scopes, flags["allow_write_scope_on_read"], where, found)
    unique = tuple(sorted(set(scopes)))
    return RouteSpec(methods, path, unique, audience, str(name), flags["prefetch"], index=i)


def _methods(raw: Any, where: str, found: _Findings) -> frozenset[str] | None:
    if not isinstance(raw, list) or not raw:
        found.problem(where, 'required: a non-empty list of HTTP methods, e.g. [GET] or ["*"] for any')
        return None
    ok = len(found.problems)
    for j, method in enumerate(raw):
        upper = method.upper() if isinstance(method, str) else method
        if upper in ("CONNECT", "TRACE", "TRACK"):
            found.problem(f"{where}[{j}]", f"{upper} is never proxied")
        elif upper == ANY_METHOD and len(raw) > 1:
            found.problem(f"{where}[{j}]", '"*" (any method) must be the only method')
        elif upper != ANY_METHOD and upper not in HTTP_METHODS:
            hint = did_you_mean(str(upper), HTTP_METHODS)
            found.problem(f"{where}[{j}]", f"unknown HTTP method {show(method)}{hint}")
    return frozenset(m.upper() for m in raw) if len(found.problems) == ok else None


def _path(raw: Any, where: str, found: _Findings) -> str | None:
    if not isinstance(raw, str):
        found.problem(
            where, f"required: a path pattern such as /partner/v1/decisions/{{id}}, got {show(raw)}"
        )
        return None
    try:
        parse_pattern(raw)
    except ValueError as exc:
        found.problem(where, f"invalid pattern {show(raw)}: {exc}")
        return None
    return raw


def _scopes(raw: Any, where: str, found: _Findings) -> list[str] | None:
    if not isinstance(raw, list) or not raw:
        found.problem(where, "required: a non-empty list of scopes, e.g. [decisions:read]")
        return None
    ok = len(found.problems)
    for j, scope in enumerate(raw):
        if not isinstance(scope, str) or scope not in KNOWN_SCOPES:
            hint = " (one scope per list item)" if isinstance(scope, str) and " " in scope.strip() else ""
            hint = hint or did_you_mean(str(scope), PARTNER_SCOPES)
            found.problem(f"{where}[{j}]", f"unknown scope {show(scope)}{hint}")
        elif scope not in PARTNER_SCOPES:
            found.problem(
                f"{where}[{j}]", f"{show(scope)} is an OpenID Connect sign-in scope, not an API scope"
            )
    return list(raw) if len(found.problems) == ok else None


def _choice(raw: Any, choices: frozenset[str], where: str, found: _Findings) -> str | None:
    if raw in choices:
        return str(raw)
    found.problem(where, f"expected one of {', '.join(sorted(choices))}, got {show(raw)}")
    return None


def _flag(raw: Any, where: str, found: _Findings) -> bool:
    try:
        return parse_bool(raw)  # interpolated ``${VAR}`` values arrive as text
    except ValueError as exc:
        found.problem(where, str(exc))
        return False


def _check_scopes_for_methods(
    methods: frozenset[str], scopes: list[str], allow_write: bool, where: str, found: _Findings
) -> None:
    """A read-only route asking for a write scope that has a read twin is over-broad: an error.

    ``webhooks:manage`` and ``partner:manage`` have no read twin (they are the
    only scopes that read those resources), so they are allowed on GET routes.
    """
    read_only = ANY_METHOD not in methods and methods <= READ_METHODS
    for j, scope in enumerate(scopes):
        twin = scope.split(":")[0] + ":read"
        if read_only and not allow_write and scope in WRITE_SCOPES and twin in KNOWN_SCOPES:
            found.problem(
                f"{where}.scopes[{j}]",
                f"write scope {show(scope)} on a read-only route ({','.join(sorted(methods))}): "
                f"use {show(twin)}, or set allow_write_scope_on_read: true",
            )
    if len(risky := sorted(set(scopes) & HIGH_RISK_SCOPES)) > 1:
        found.warnings.append(
            f"{where}.scopes: {len(risky)} high-risk scopes on one route ({', '.join(risky)}): "
            "a leaked token could do all of it; split the route"
        )


def _check_table(routes: tuple[RouteSpec, ...], found: _Findings) -> None:
    """Cross-route rules: unique names (they label metrics), shadowing, catch-all patterns."""
    names: dict[str, int] = {}
    for route in routes:
        if route.name and route.name in names:
            found.problem(
                f"routes[{route.index}].name",
                f"duplicate name {show(route.name)} (also routes[{names[route.name]}])",
            )
        names.setdefault(route.name, route.index)
        parts = parse_pattern(route.path).parts
        if any(kind is Seg.REST and pos <= 2 for pos, (kind, _) in enumerate(parts)):
            found.warnings.append(
                f"routes[{route.index}].path: {show(route.path)} covers the whole API (over-broad): "
                "list the resources the application uses"
            )
    for later, earlier in shadowed_routes(routes):
        found.warnings.append(
            f"routes[{routes[later].index}] is shadowed by routes[{routes[earlier].index}] "
            f"({routes[earlier].label}): it can never match"
        )
