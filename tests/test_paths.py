"""Request-target safety (proxy/README.md, "Path safety"): accepted and refused targets, generated sweeps.

The wire-level counterpart (what aiohttp's parsers actually hand us) is test_paths_wire.py.
"""

from __future__ import annotations

import itertools
import string
from urllib.parse import unquote

import pytest
from aiohttp.test_utils import make_mocked_request

import proxy.paths
from proxy.errors import BadRequest
from proxy.paths import MAX_SEGMENTS, MAX_TARGET_LENGTH, SafeTarget, validate_target

# RFC 3986 pchar minus ';' (and '%', which is handled as an escape): the only raw path characters.
PLAIN_CHARS = frozenset(string.ascii_letters + string.digits + "-._~!$&'()*+,=:@")

# --------------------------------------------------------------------------- accepted

ACCEPTED: list[tuple[str, str, str, tuple[str, ...]]] = [
    # raw_target, path, query, segments
    ("/", "/", "", ()),
    ("/partner/v1/applications", "/partner/v1/applications", "", ("partner", "v1", "applications")),
    (
        "/partner/v1/applications/app%20x?x=1",
        "/partner/v1/applications/app%20x",
        "x=1",
        ("partner", "v1", "applications", "app x"),
    ),
    ("/a/b/", "/a/b/", "", ("a", "b")),
    ("/a/b/?x=1", "/a/b/", "x=1", ("a", "b")),
    ("/?x=1", "/", "x=1", ()),
    ("/a?b?c", "/a", "b?c", ("a",)),
    ("/a?", "/a", "", ("a",)),
    ("/a?x=%00&y=%zz&z=%2e%2e", "/a", "x=%00&y=%zz&z=%2e%2e", ("a",)),
    ("/a?p=../..;x\\y/%2F", "/a", "p=../..;x\\y/%2F", ("a",)),
    ("/a?x={|}^<>", "/a", "x={|}^<>", ("a",)),
    ("/.well-known/jwks.json", "/.well-known/jwks.json", "", (".well-known", "jwks.json")),
    ("/a/..b/b../.a.", "/a/..b/b../.a.", "", ("a", "..b", "b..", ".a.")),
    ("/a%2eb", "/a%2eb", "", ("a.b",)),
    ("/a%2E%2Eb", "/a%2E%2Eb", "", ("a..b",)),
    ("/50%25off", "/50%25off", "", ("50%off",)),
    ("/%25", "/%25", "", ("%",)),
    ("/%25zz", "/%25zz", "", ("%zz",)),
    ("/%C3%A9t%c3%a9", "/%C3%A9t%c3%a9", "", ("été",)),
    ("/%F0%9F%98%80", "/%F0%9F%98%80", "", ("\U0001f600",)),
    ("/%F4%8F%BF%BF", "/%F4%8F%BF%BF", "", ("\U0010ffff",)),
    ("/a%3Fb%23c", "/a%3Fb%23c", "", ("a?b#c",)),
    ("/a+b/A%2Bb", "/a+b/A%2Bb", "", ("a+b", "A+b")),
    ("/%20", "/%20", "", (" ",)),
    ("/a:b@c!$&'()*+,=~-_", "/a:b@c!$&'()*+,=~-_", "", ("a:b@c!$&'()*+,=~-_",)),
    ("/http:/x", "/http:/x", "", ("http:", "x")),
    ("/a/%7Bid%7D", "/a/%7Bid%7D", "", ("a", "{id}")),
]


@pytest.mark.parametrize(("raw", "path", "query", "segments"), ACCEPTED)
def test_safe_target_keeps_raw_path_and_query_and_decodes_segments(
    raw: str, path: str, query: str, segments: tuple[str, ...]
) -> None:
    assert validate_target("GET", raw) == SafeTarget(path=path, query=query, segments=segments)


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get"])
def test_ordinary_methods_are_accepted(method: str) -> None:
    assert validate_target(method, "/a").segments == ("a",)


def test_trailing_slash_is_kept_in_the_forwarded_path_but_adds_no_empty_segment() -> None:
    with_slash, without = validate_target("GET", "/a/b/"), validate_target("GET", "/a/b")
    assert with_slash.segments == without.segments == ("a", "b")
    assert (with_slash.path, without.path) == ("/a/b/", "/a/b")
    assert validate_target("GET", "/") == SafeTarget("/", "", ())  # the root: no segment at all


def test_safe_target_is_immutable() -> None:
    target = validate_target("GET", "/a")
    with pytest.raises(AttributeError):
        target.path = "/b"  # type: ignore[misc]


def test_limits_are_inclusive() -> None:
    at_cap = "/" + "/".join(["a"] * MAX_SEGMENTS)
    assert len(validate_target("GET", at_cap).segments) == MAX_SEGMENTS
    long_target = "/" + "a" * (MAX_TARGET_LENGTH - 1)
    assert validate_target("GET", long_target).path == long_target


def test_plain_paths_take_the_fast_path_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(_: str) -> bytes:
        raise AssertionError("plain path was percent-decoded")

    monkeypatch.setattr(proxy.paths, "unquote_to_bytes", fail)
    target = validate_target("GET", "/partner/v1/applications/APP-123_x.y~z?x=%2e")
    assert target.segments[-1] == "APP-123_x.y~z"


# --------------------------------------------------------------------------- refused

REFUSED: list[tuple[str, str, str]] = [
    # method, raw_target, words the description must contain
    ("CONNECT", "evil.example:443", "method CONNECT"),
    ("CONNECT", "/a", "method CONNECT"),
    ("connect", "/a", "method CONNECT"),
    ("TRACE", "/a", "method TRACE"),
    ("trace", "/a", "method TRACE"),
    ("TRACK", "/a", "method TRACK"),
    # request-target forms
    ("GET", "http://evil.example/a", "absolute-form"),
    ("GET", "HTTP://evil.example/a?x=1", "absolute-form"),
    ("GET", "https://evil.example", "absolute-form"),
    ("GET", "ftp://evil.example/x", "absolute-form"),
    ("GET", "x-custom+v1.2://evil/x", "absolute-form"),
    ("GET", "http://u:p@evil.example:8080/a", "absolute-form"),
    ("GET", "evil.example:443", "origin-form"),
    ("GET", "[::1]:443", "origin-form"),
    ("GET", "a/b", "origin-form"),
    ("GET", "", "origin-form"),
    ("GET", "?x=1", "origin-form"),
    ("OPTIONS", "*", "asterisk-form"),
    ("GET", "*", "asterisk-form"),
    # empty segments
    ("GET", "//evil.example/x", "starts with '//'"),
    ("GET", "//", "starts with '//'"),
    ("GET", "///x", "starts with '//'"),
    ("GET", "/a//b", "empty segment"),
    ("GET", "/a//", "empty segment"),
    ("GET", "/a/b//?x=1", "empty segment"),
    # raw dot-segments
    ("GET", "/.", "dot-segment '.'"),
    ("GET", "/..", "dot-segment '..'"),
    ("GET", "/./", "dot-segment '.'"),
    ("GET", "/../", "dot-segment '..'"),
    ("GET", "/a/./b", "dot-segment '.'"),
    ("GET", "/a/../b", "dot-segment '..'"),
    ("GET", "/a/..", "dot-segment '..'"),
    ("GET", "/a/../", "dot-segment '..'"),
    ("GET", "/../x", "dot-segment '..'"),
    ("GET", "/a/...", "dot-segment '...'"),
    ("GET", "/a/..?x=1", "dot-segment '..'"),
    # encoded dot-segments, any case mix
    ("GET", "/a/%2e/b", "percent-encoded dot-segment"),
    ("GET", "/a/%2E/b", "percent-encoded dot-segment"),
    ("GET", "/a/%2e%2e/b", "percent-encoded dot-segment"),
    ("GET", "/a/%2E%2e/b", "percent-encoded dot-segment"),
    ("GET", "/a/.%2e/b", "percent-encoded dot-segment"),
    ("GET", "/a/%2e./b", "percent-encoded dot-segment"),
    ("GET", "/a/.%2E", "percent-encoded dot-segment"),
    ("GET", "/%2e%2e/", "percent-encoded dot-segment"),
    ("GET", "/a/..%20", "percent-encoded dot-segment"),
    ("GET", "/a/.%20.", "percent-encoded dot-segment"),
    # double encoding
    ("GET", "/a/%252e%252e/b", "double-encoded"),
    ("GET", "/a/%252E/b", "double-encoded"),
    ("GET", "/a/.%252e/b", "double-encoded"),
    ("GET", "/a%252fb", "double-encoded"),
    ("GET", "/a%252Fb", "double-encoded"),
    ("GET", "/a%255cb", "double-encoded"),
    ("GET", "/a%255Cb", "double-encoded"),
    ("GET", "/a%253bb", "double-encoded"),
    ("GET", "/a%2500b", "double-encoded"),
    ("GET", "/a%257fb", "double-encoded"),
    ("GET", "/a/%25252e%25252e", "double-encoded"),
    ("GET", "/a/%25%32%65%25%32%65", "double-encoded"),
    # encoded separators
    ("GET", "/a%2Fb", "encodes '/'"),
    ("GET", "/a%2fb", "encodes '/'"),
    ("GET", "/a/%2F/b", "encodes '/'"),
    ("GET", "/a%5Cb", "encodes '\\'"),
    ("GET", "/a%5cb", "encodes '\\'"),
    ("GET", "/..%2f..%2fetc", "encodes '/'"),
    # raw backslash
    ("GET", "/a\\b", "backslash"),
    ("GET", "/a\\..\\b", "backslash"),
    ("GET", "\\\\evil\\x", "origin-form"),
    # path parameters
    ("GET", "/a;b", "path parameters"),
    ("GET", "/a;jsessionid=x/b", "path parameters"),
    ("GET", "/a/..;/b", "path parameters"),
    ("GET", "/a%3Bb", "encodes ';'"),
    ("GET", "/a%3bb", "encodes ';'"),
    # raw control characters and spaces, path and query
    ("GET", "/a\x00b", "control character or space (0x00)"),
    ("GET", "/a\x01b", "(0x01)"),
    ("GET", "/a\x1fb", "(0x1F)"),
    ("GET", "/a\x7fb", "(0x7F)"),
    ("GET", "/a\tb", "(0x09)"),
    ("GET", "/a\r\nX-Injected: 1", "(0x0D)"),
    ("GET", "/a\nb", "(0x0A)"),
    ("GET", "/a b", "(0x20)"),
    ("GET", "/a?x=\x00", "(0x00)"),
    ("GET", "/a?x=\x7f", "(0x7F)"),
    ("GET", "/a?x y", "(0x20)"),
    ("GET", "\x00/a", "(0x00)"),
    # encoded control characters (C0, DEL, C1)
    ("GET", "/a%00b", "control character U+0000"),
    ("GET", "/a%00", "control character U+0000"),
    ("GET", "/a%01", "control character U+0001"),
    ("GET", "/a%1F", "control character U+001F"),
    ("GET", "/a%1f", "control character U+001F"),
    ("GET", "/a%0d%0aX:1", "control character U+000D"),
    ("GET", "/a%7F", "control character U+007F"),
    ("GET", "/a%C2%80", "control character U+0080"),
    ("GET", "/a%c2%85", "control character U+0085"),
    ("GET", "/a%C2%9F", "control character U+009F"),
    # raw non-ASCII (the pure-Python parser hands it over decoded, with surrogateescape)
    ("GET", "/caf\u00e9", "non-ASCII"),
    ("GET", "/a\udc80", "non-ASCII"),
    ("GET", "/a\u2028b", "non-ASCII"),
    ("GET", "/a?x=\u00e9", "non-ASCII"),
    ("GET", "/a?x=\udcff", "non-ASCII"),
    # malformed percent-encodings
    ("GET", "/a%", "malformed percent-encoding"),
    ("GET", "/a%4", "malformed percent-encoding"),
    ("GET", "/a%4/b", "malformed percent-encoding"),
    ("GET", "/a%zz", "malformed percent-encoding"),
    ("GET", "/a%4g", "malformed percent-encoding"),
    ("GET", "/a%g4", "malformed percent-encoding"),
    ("GET", "/%%41", "malformed percent-encoding"),
    ("GET", "/a%%", "malformed percent-encoding"),
    ("GET", "/a%-1", "malformed percent-encoding"),
    ("GET", "/a% 1", "(0x20)"),
    # invalid UTF-8
    ("GET", "/a%FF", "valid UTF-8"),
    ("GET", "/a%80", "valid UTF-8"),
    ("GET", "/a%C3", "valid UTF-8"),
    ("GET", "/a%C3%28", "valid UTF-8"),
    ("GET", "/a%E2%82", "valid UTF-8"),
    # overlong UTF-8
    ("GET", "/a/%C0%AF", "valid UTF-8"),
    ("GET", "/a/%c0%af", "valid UTF-8"),
    ("GET", "/a/%E0%80%AF", "valid UTF-8"),
    ("GET", "/a/%C0%80", "valid UTF-8"),
    ("GET", "/a/%C0%AE%C0%AE/b", "valid UTF-8"),
    ("GET", "/a/%C1%9C", "valid UTF-8"),
    ("GET", "/a/%F0%80%80%AF", "valid UTF-8"),
    ("GET", "/a/%E0%80%80", "valid UTF-8"),
    # surrogates and beyond U+10FFFF
    ("GET", "/a/%ED%A0%80", "valid UTF-8"),
    ("GET", "/a/%ED%BF%BF", "valid UTF-8"),
    ("GET", "/a/%ED%A0%BD%ED%B8%80", "valid UTF-8"),
    ("GET", "/a/%F4%90%80%80", "valid UTF-8"),
    ("GET", "/a/%F5%80%80%80", "valid UTF-8"),
    ("GET", "/a/%F8%88%80%80%80", "valid UTF-8"),
    # Unicode look-alikes a normalising backend would fold into separators
    ("GET", "/a/%EF%BC%8E%EF%BC%8E/b", "normalises (NFKC)"),
    ("GET", "/a/%EF%BC%8E", "normalises (NFKC)"),
    ("GET", "/a/%E2%80%A5", "normalises (NFKC)"),
    ("GET", "/a%EF%BC%8Fb", "normalises (NFKC)"),
    ("GET", "/a%EF%BC%BCb", "normalises (NFKC)"),
    ("GET", "/a%EF%BC%9Bb", "normalises (NFKC)"),
    # fragments
    ("GET", "/a#b", "fragment"),
    ("GET", "/a?b#c", "fragment"),
    ("GET", "/#", "fragment"),
    ("GET", "#", "fragment"),
    # other characters RFC 3986 does not allow in a path
    *[("GET", f"/a{c}b", "not allowed unencoded") for c in '"<>[]^`{|}'],
    # limits
    ("GET", "/" + "a" * MAX_TARGET_LENGTH, f"longer than {MAX_TARGET_LENGTH}"),
    ("GET", "/a?" + "x" * MAX_TARGET_LENGTH, f"longer than {MAX_TARGET_LENGTH}"),
    ("GET", "/" + "/".join(["a"] * (MAX_SEGMENTS + 1)), f"more than {MAX_SEGMENTS} segments"),
    ("GET", "/" + "/".join(["a"] * (MAX_SEGMENTS + 1)) + "/", f"more than {MAX_SEGMENTS} segments"),
]


@pytest.mark.parametrize(("method", "raw", "reason"), REFUSED)
def test_unsafe_targets_are_refused_with_a_specific_reason(method: str, raw: str, reason: str) -> None:
    with pytest.raises(BadRequest) as caught:
        validate_target(method, raw)
    description = caught.value.description
    assert reason in description
    assert caught.value.status == 400 and caught.value.code == "bad_request"
    assert description.isascii() and description.isprintable(), "description must not echo raw input"


def test_description_quotes_at_most_a_short_snippet() -> None:
    with pytest.raises(BadRequest) as caught:
        validate_target("GET", "/" + "%2e" * 1000)
    assert len(caught.value.description) < 200


# --------------------------------------------------------------------------- aiohttp requests


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://evil.example/a?x=1", "absolute-form"),
        ("/a/%2e%2e/b", "dot-segment"),
        ("*", "asterisk-form"),
    ],
)
def test_an_aiohttp_request_is_checked_by_its_raw_target_not_its_path(target: str, reason: str) -> None:
    """What the forwarder passes: ``request.raw_path`` keeps what ``request.path`` hides."""
    request = make_mocked_request("GET", target)
    assert request.path.startswith(("/", "*"))  # aiohttp's decoded view looks harmless...
    with pytest.raises(BadRequest, match=reason):
        validate_target(request.method, request.raw_path)


def test_a_plain_aiohttp_request_is_accepted_by_its_raw_target() -> None:
    request = make_mocked_request("POST", "/partner/v1/applications/app%20x?x=1")
    assert validate_target(request.method, request.raw_path) == SafeTarget(
        "/partner/v1/applications/app%20x", "x=1", ("partner", "v1", "applications", "app x")
    )


# --------------------------------------------------------------------------- generated sweeps


def _accepted(raw: str) -> SafeTarget | None:
    try:
        return validate_target("GET", raw)
    except BadRequest:
        return None


# Decoded bytes a segment may carry: printable ASCII except the separators '/', '\' and ';'.
SAFE_DECODED_BYTES = frozenset(range(0x20, 0x7F)) - {0x2F, 0x5C, 0x3B}


@pytest.mark.parametrize("hex_format", ["{:02X}", "{:02x}"])
def test_every_byte_percent_encoded_inside_a_segment(hex_format: str) -> None:
    accepted = set()
    for byte in range(256):
        result = _accepted(f"/a/x%{hex_format.format(byte)}y/b")
        if result is not None:
            accepted.add(byte)
            assert result.segments == ("a", f"x{chr(byte)}y", "b")
    assert accepted == SAFE_DECODED_BYTES


def test_every_byte_percent_encoded_as_a_whole_segment() -> None:
    accepted = {byte for byte in range(256) if _accepted(f"/a/%{byte:02X}") is not None}
    assert accepted == SAFE_DECODED_BYTES - {0x2E}  # '.' alone is a dot-segment


def test_every_byte_double_percent_encoded_inside_a_segment() -> None:
    refused = {byte for byte in range(256) if _accepted(f"/a/x%25{byte:02X}y") is None}
    dangerous = set(range(0x20)) | {0x7F, 0x2E, 0x2F, 0x5C, 0x3B, 0x25}
    assert refused == dangerous


def test_every_raw_character_inside_a_segment() -> None:
    accepted = set()
    for code in range(256):
        char = chr(code)
        if char in "/?%":  # separators and the escape character are covered elsewhere
            continue
        result = _accepted(f"/a/x{char}y")
        if result is not None:
            accepted.add(char)
            assert result.segments == ("a", f"x{char}y")
    assert accepted == PLAIN_CHARS


def test_every_raw_character_in_the_query() -> None:
    accepted = {chr(code) for code in range(256) if _accepted(f"/a?x{chr(code)}y") is not None}
    assert accepted == {chr(code) for code in range(0x21, 0x7F)} - {"#"}


DOT_SPELLINGS = [".", "%2e", "%2E"]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_every_spelling_of_a_dot_segment_is_refused_anywhere(count: int) -> None:
    for parts in itertools.product(DOT_SPELLINGS, repeat=count):
        segment = "".join(parts)
        for template in ("/{}", "/{}/", "/a/{}", "/a/{}/b", "/{}/b", "/a/{}?x=1"):
            assert _accepted(template.format(segment)) is None, template.format(segment)


@pytest.mark.parametrize("count", [1, 2])
def test_every_double_encoded_dot_segment_is_refused(count: int) -> None:
    spellings = [*DOT_SPELLINGS, "%252e", "%252E", "%25%32%65", "%25%32%45"]
    for parts in itertools.product(spellings, repeat=count):
        assert _accepted("/a/" + "".join(parts) + "/b") is None, parts


def test_every_overlong_encoding_of_ascii_is_refused() -> None:
    for code in range(0x80):
        two = f"%{0xC0 | code >> 6:02X}%{0x80 | code & 0x3F:02X}"
        three = f"%E0%{0x80 | code >> 6:02X}%{0x80 | code & 0x3F:02X}"
        four = f"%F0%80%{0x80 | code >> 6:02X}%{0x80 | code & 0x3F:02X}"
        for spelling in (two, three, four):
            assert _accepted(f"/a/{spelling}/b") is None, spelling


def test_every_surrogate_is_refused() -> None:
    for code in range(0xD800, 0xE000, 0x3F):
        utf8 = bytes([0xE0 | code >> 12, 0x80 | (code >> 6) & 0x3F, 0x80 | code & 0x3F])
        assert _accepted("/a/" + "".join(f"%{b:02X}" for b in utf8)) is None, hex(code)


@pytest.mark.parametrize("raw", [case[0] for case in ACCEPTED])
def test_path_and_query_rebuild_the_target_and_segments_are_its_decoding(raw: str) -> None:
    target = validate_target("GET", raw)
    assert raw == target.path + ("?" + target.query if "?" in raw else "")
    body = target.path[1:].removesuffix("/")
    assert target.segments == (tuple(unquote(s) for s in body.split("/")) if body else ())
