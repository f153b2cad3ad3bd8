"""Request-target safety checks, before any route is matched ("Path safety" in proxy/README.md).

The proxy matches a route against the client's path and then forwards that
same path, byte for byte, to a fixed upstream with a token attached. Any
difference between what the route matcher sees and what the upstream (or a
server behind it) resolves is a way to reach a resource under a token that was
minted for another route. So this module does not normalise anything: it
refuses every target whose meaning could differ between two reasonable
parsers, and hands back the path exactly as sent plus its decoded segments.

Rules, each a ``BadRequest`` whose description never echoes a control
character (descriptions quote at most a short, printable-ASCII raw segment):

* methods ``CONNECT``, ``TRACE`` (and IIS's ``TRACK``) are refused outright,
  whatever the target: aiohttp hands ``CONNECT /a`` a path-looking target;
* the target is origin-form (``/...``): absolute-form (``http://x/y``, any
  scheme), authority-form (``host:443``) and asterisk-form (``*``) are refused,
  because aiohttp turns ``GET http://evil/a`` into ``request.path == "/a"``;
* printable ASCII only, no space, no ``#`` (a fragment never belongs on the
  wire), at most ``MAX_TARGET_LENGTH`` characters;
* path characters are RFC 3986 ``pchar`` + ``/`` minus ``;`` — so a raw ``\\``,
  ``;`` (path parameters) and ``"<>[]^`{|}`` are refused;
* no leading ``//`` and no empty segment, except that ONE trailing slash is
  allowed (REST clients send it); it stays in ``path`` (it is forwarded) but
  adds no empty string to ``segments``; at most ``MAX_SEGMENTS`` segments;
* no dot-only segment (``.``, ``..``, ``...``, ``. .``), raw or after one
  percent-decode in any case mix (``%2e``, ``.%2E``) — dot-and-space-only
  segments are refused too because Windows/IIS trim trailing dots and spaces;
* percent-encodings are well formed (``%`` + two hex digits), decode to strict
  UTF-8 (Python's decoder refuses overlongs like ``%C0%AF``, surrogates like
  ``%ED%A0%80`` and code points above U+10FFFF), and the decoded segment has
  no ``/``, ``\\``, ``;`` or control character (C0, DEL, C1);
* double encoding: after one decode a segment must not still contain an
  encoded dot, slash, backslash, semicolon, percent or control character
  (``%252e``, ``%252F``, ``%255c``, ``%2500`` ...). Including ``%25`` closes the
  rule under any depth (``%25252e``). A literal ``%`` stays usable (``50%25off``);
* a non-ASCII decoded segment is also checked after NFKC normalisation, so a
  fullwidth dot pair (``%EF%BC%8E%EF%BC%8E``) or solidus cannot become ``..``
  or ``/`` in a normalising backend;
* the query (after the first ``?``, kept raw, ``?`` inside it kept) is never
  matched and is checked only for the whole-target rules above (ASCII,
  no controls, no space, no ``#``); encoded bytes in it pass through.

Never use ``request.path``/``request.rel_url`` for routing: aiohttp decodes
them and drops the scheme, authority and fragment. Check ``request.raw_path``
(the request-target as sent) with ``validate_target``.
Forward ``SafeTarget.path`` (and ``query``) with ``yarl.URL(..., encoded=True)``:
without it yarl re-quotes (``%2e`` -> ``.``, ``%7e`` -> ``~``) and the forwarded
bytes would no longer be the matched bytes.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes

from proxy.errors import BadRequest

__all__ = ["MAX_SEGMENTS", "MAX_TARGET_LENGTH", "SafeTarget", "validate_target"]

MAX_TARGET_LENGTH: Final = 8192
MAX_SEGMENTS: Final = 128

_REFUSED_METHODS: Final = frozenset({"CONNECT", "TRACE", "TRACK"})

# Fast path: the whole path is pchar (minus ';') and '/', with no '%'.
_PLAIN_PATH: Final = re.compile(r"[A-Za-z0-9._~!$&'()*+,=:@/-]+")
# Same set plus '%': the path is decoded segment by segment.
_ALLOWED_PATH: Final = re.compile(r"[A-Za-z0-9._~!$&'()*+,=:@/%-]+")
# An empty (group 1 == '') or raw dot-only segment, checked on the path minus one trailing '/'.
_BAD_STRUCTURE: Final = re.compile(r"/(\.*)(?=/|$)")
_CONTROL_OR_SPACE: Final = re.compile(r"[\x00-\x20\x7f]")
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_MALFORMED_PCT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DECODED_FORBIDDEN: Final = re.compile(r"[\x00-\x1f\x7f-\x9f/\\;]")
_STILL_ENCODED: Final = re.compile(r"%(?:2[5EeFf]|5[Cc]|3[Bb]|[01][0-9A-Fa-f]|7[Ff])")
_DOTS_AND_SPACES: Final = frozenset(". ")
_SNIPPET_MAX: Final = 40


@dataclass(frozen=True, slots=True)
class SafeTarget:
    """A target that passed every check.

    ``path`` is both what is matched and what is forwarded, so the two can never
    disagree; ``segments`` is the decoded view the route matcher compares with
    literal pattern segments (safe because encoded ``/`` and ``\\`` are refused).
    A trailing ``/`` stays in ``path`` and adds no empty segment.
    """

    path: str
    query: str
    segments: tuple[str, ...]


def validate_target(method: str, raw_target: str) -> SafeTarget:
    """Return the safe, split target or raise ``BadRequest`` saying what is wrong."""
    _check_method(method)
    _check_whole_target(raw_target)
    path, _, query = raw_target.partition("?")
    return SafeTarget(path=path, query=query, segments=_path_segments(path))


def _check_method(method: str) -> None:
    """Refuse tunnelling and echo methods; aiohttp's Python parser upper-cases, so do we."""
    if method.upper() in _REFUSED_METHODS:
        raise BadRequest(f"method {method.upper()} is not supported by this proxy")


def _check_whole_target(target: str) -> None:
    """Rules that hold for the path and the query alike, then the target's form."""
    if len(target) > MAX_TARGET_LENGTH:
        raise BadRequest(f"request target is longer than {MAX_TARGET_LENGTH} characters")
    if not target.isascii():
        raise BadRequest("request target contains non-ASCII characters; percent-encode them")
    bad = None if target.isprintable() and " " not in target else _CONTROL_OR_SPACE.search(target)
    if bad:
        raise BadRequest(
            f"request target contains a control character or space (0x{ord(bad.group()):02X}) "
            f"at offset {bad.start()}"
        )
    if "#" in target:
        raise BadRequest("request target contains a fragment ('#'); fragments are never sent")
    _check_origin_form(target)


def _check_origin_form(target: str) -> None:
    """Only ``/path[?query]`` may be forwarded; other forms name a host or nothing."""
    if target.startswith("/"):
        return
    if target == "*":
        raise BadRequest("asterisk-form request target '*' is not supported")
    if _SCHEME.match(target) and "://" in target:
        raise BadRequest("absolute-form request target (scheme://host/...) is not accepted")
    raise BadRequest("request target must be origin-form, a path starting with '/' (no host:port)")


def _path_segments(path: str) -> tuple[str, ...]:
    """Split a path (already ASCII, starting with '/') into checked, decoded segments."""
    if path == "/":
        return ()
    if path.startswith("//"):
        raise BadRequest("path starts with '//', which some URL joiners read as a host")
    body = path[1:-1] if path.endswith("/") else path[1:]
    if body.count("/") >= MAX_SEGMENTS:
        raise BadRequest(f"path has more than {MAX_SEGMENTS} segments")
    plain = _PLAIN_PATH.fullmatch(path) is not None
    if not plain and _ALLOWED_PATH.fullmatch(path) is None:
        _raise_for_disallowed_character(path)
    _check_structure(path)
    raw_segments = body.split("/")
    if plain:
        return tuple(raw_segments)
    return tuple(_decode_segment(i, raw) for i, raw in enumerate(raw_segments, start=1))


def _raise_for_disallowed_character(path: str) -> None:
    """Name the first character outside the allowed set, most specific reason first."""
    if "\\" in path:
        raise BadRequest("path contains a raw backslash '\\'")
    if ";" in path:
        raise BadRequest("path contains ';' (path parameters are not accepted)")
    bad = next(ch for ch in path if _ALLOWED_PATH.fullmatch(ch) is None)
    raise BadRequest(f"path contains {bad!r}, which is not allowed unencoded in a URL path")


def _check_structure(path: str) -> None:
    """Refuse empty and dot-only raw segments; one trailing '/' is allowed."""
    trimmed = path[:-1] if path.endswith("/") else path
    if "//" not in trimmed and "/." not in trimmed and not trimmed.endswith("/"):
        return  # the common case, decided without the regex
    bad = _BAD_STRUCTURE.search(trimmed)
    if bad is None:
        return
    if not bad.group(1):
        raise BadRequest("path contains an empty segment ('//')")
    raise BadRequest(f"path contains a dot-segment {_snippet(bad.group(1))}")


def _decode_segment(index: int, raw: str) -> str:
    """Percent-decode one segment strictly and check what the decoding revealed."""
    if "%" not in raw:
        return raw
    where = f"path segment {index} {_snippet(raw)}"
    if _MALFORMED_PCT.search(raw):
        raise BadRequest(f"{where} has a malformed percent-encoding ('%' needs two hex digits)")
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(
            f"{where} does not decode to valid UTF-8 (overlong, surrogate or invalid bytes)"
        ) from None
    _check_decoded(where, text)
    return text


def _check_decoded(where: str, text: str) -> None:
    """Rules on the decoded text: what an upstream that decodes would see."""
    bad = _DECODED_FORBIDDEN.search(text)
    if bad:
        raise BadRequest(f"{where} encodes {_describe(bad.group())}, which is not allowed")
    if _is_dot_only(text):
        raise BadRequest(f"{where} is a percent-encoded dot-segment")
    if _STILL_ENCODED.search(text):
        raise BadRequest(
            f"{where} is double-encoded (after one decode it still encodes "
            "'.', '/', '\\', ';', '%' or a control character)"
        )
    if not text.isascii():
        _check_normalised(where, text)


def _check_normalised(where: str, text: str) -> None:
    """A backend that NFKC-normalises must not find a dot-segment or separator either."""
    folded = unicodedata.normalize("NFKC", text)
    if _DECODED_FORBIDDEN.search(folded) or _is_dot_only(folded):
        raise BadRequest(f"{where} normalises (NFKC) to a dot-segment or a separator")


def _is_dot_only(text: str) -> bool:
    """``.``, ``..`` and variants with extra dots/spaces that Windows would trim to them."""
    return "." in text and set(text) <= _DOTS_AND_SPACES


def _describe(char: str) -> str:
    """Name a forbidden decoded character without echoing it."""
    names = {"/": "'/'", "\\": "'\\'", ";": "';'"}
    return names.get(char, f"control character U+{ord(char):04X}")


def _snippet(raw: str) -> str:
    """Quote a raw piece of the path; by now it is printable ASCII, so it is safe to show."""
    shown = raw if len(raw) <= _SNIPPET_MAX else raw[:_SNIPPET_MAX] + "..."
    return repr(shown)
