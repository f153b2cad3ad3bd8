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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Final

from proxy.settings import RouteSpec

__all__ = [
    "ANY_METHOD",
    "HTTP_METHODS",
    "READ_METHODS",
    "Explanation",
    "Pattern",
    "RouteTable",
    "Seg",
    "parse_pattern",
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
