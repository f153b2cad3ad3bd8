"""What the token endpoint and the discovery document look like on the wire.

Pure functions over bytes, kept apart from ``source.py`` so the exchange logic
there reads as policy while every rule about a response's shape (RFC 6749 §5,
RFC 8414) sits here, testable without HTTP. Anything unusable becomes an
``EndpointFailure`` whose text is our own, never a body echoed from the wire.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any
from urllib.parse import quote_plus

from proxy.tokens.backoff import EndpointFailure, ErrorClass
from proxy.tokens.model import CacheKey, Credentials, Token

#: The largest token-endpoint or discovery body read; anything longer is not parsed.
MAX_BODY = 64 * 1024


def basic_authorization(creds: Credentials) -> str:
    """HTTP Basic for the token endpoint: id and secret form-urlencoded first (RFC 6749 §2.3.1)."""
    pair = f"{quote_plus(creds.client_id)}:{quote_plus(creds.secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def _json_object(body: bytes) -> dict[str, Any] | None:
    if len(body) > MAX_BODY:
        return None
    try:
        doc = json.loads(body)
    except ValueError:  # includes bad UTF-8
        return None
    return doc if isinstance(doc, dict) else None


def transient(label: str, description: str) -> EndpointFailure:
    """A failure that says the endpoint is unwell, so every key backs off."""
    return EndpointFailure(label, ErrorClass.TRANSIENT, description)


def _malformed(why: str) -> EndpointFailure:
    return transient("malformed", f"token endpoint sent a malformed response ({why})")


def parse_error_code(body: bytes) -> str | None:
    """The OAuth ``error`` code of an error response, if it has one."""
    doc = _json_object(body)
    code = doc.get("error") if doc is not None else None
    return code if isinstance(code, str) and 0 < len(code) <= 64 else None


def parse_token_response(body: bytes, key: CacheKey, issued_at: float, default_expires_in: float) -> Token:
    """A Token from a 200 response, or a ``malformed`` failure; times come from our clock."""
    doc = _json_object(body)
    if doc is None:
        raise _malformed("not a JSON object")
    value = doc.get("access_token")
    if not isinstance(value, str) or not value or not all(33 <= ord(c) <= 126 for c in value):
        raise _malformed("no usable access_token")
    token_type = doc.get("token_type")
    if token_type is not None and (not isinstance(token_type, str) or token_type.lower() != "bearer"):
        raise _malformed("token_type is not Bearer")
    lifetime = _lifetime(doc.get("expires_in"), default_expires_in)
    scopes = _granted_scopes(doc.get("scope"), key.scopes)
    return Token(value, issued_at, issued_at + lifetime, scopes, key.audience)


def _lifetime(raw: object, default: float) -> float:
    if raw is None:
        return float(default)
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise _malformed("expires_in is not a number")
    try:
        seconds = float(raw)
    except ValueError:
        raise _malformed("expires_in is not a number") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise _malformed("expires_in is not positive")
    return seconds


def _granted_scopes(raw: object, requested: tuple[str, ...]) -> tuple[str, ...]:
    """RFC 6749 §5.1: no ``scope`` means exactly what was asked."""
    if raw is None:
        return requested
    if not isinstance(raw, str):
        raise _malformed("scope is not a string")
    return tuple(sorted(set(raw.split())))


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_discovery(status: int, body: bytes, issuer: str) -> tuple[str, str | None]:
    """(token_endpoint, jwks_uri) of a discovery document whose issuer is exactly ours (RFC 8414).

    The URLs come back as written: whether the proxy may use them is decided in
    ``proxy.tokens.discovery_trust``, by the same rule as a configured URL, so a value such
    as ``ftp://...`` or ``http://`` to another host is refused there, with its reason.
    """
    if status != 200:
        raise EndpointFailure("discovery_http", ErrorClass.TRANSIENT, f"discovery answered HTTP {status}")
    doc = _json_object(body)
    if doc is None:
        raise EndpointFailure("discovery_malformed", ErrorClass.TRANSIENT, "discovery document is not JSON")
    if doc.get("issuer") != issuer:
        shown = doc.get("issuer") if isinstance(doc.get("issuer"), str) else None
        raise EndpointFailure(
            "discovery_issuer_mismatch",
            ErrorClass.TRANSIENT,
            f"discovery document names issuer {str(shown)[:200]!r}, not the configured {issuer!r}"
            " (RFC 8414 requires an exact match); check auth.issuer",
        )
    token_endpoint = _text(doc.get("token_endpoint"))
    if token_endpoint is None:
        raise EndpointFailure(
            "discovery_malformed", ErrorClass.TRANSIENT, "discovery document has no token_endpoint"
        )
    return token_endpoint, _text(doc.get("jwks_uri"))
