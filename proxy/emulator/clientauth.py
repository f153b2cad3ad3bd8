"""OAuth request parsing and client authentication for the token, revoke and introspect endpoints.

Strict on purpose: a proxy that sends a duplicated parameter, two
authentication methods or a wrong content type should fail here, in a test,
rather than work against the emulator and fail against Credicorp.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web

from proxy.emulator.state import Client, EmulatorState, SecretRecord

FORM_LIMIT = 64 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"
BASIC_CHALLENGE = 'Basic realm="credicorp"'
_UNSAFE = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")


def safe_text(text: str) -> str:
    """Text fit for an ``error_description`` (RFC 6749 5.2 character set): echoes nothing exotic."""
    return _UNSAFE.sub("?", text)[:200]


class OAuthError(Exception):
    """An RFC 6749 error response: status, ``error`` code, description, extra headers."""

    def __init__(self, status: int, error: str, description: str, headers: dict[str, str] | None = None):
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = safe_text(description)
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"error": self.error, "error_description": self.description}
        return web.json_response(body, status=self.status, headers={**NO_STORE, **self.headers})


NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def invalid_request(description: str) -> OAuthError:
    return OAuthError(400, "invalid_request", description)


async def read_body(request: web.Request) -> bytes:
    """The whole (small) form body; larger than FORM_LIMIT is a malformed request."""
    body = bytearray()
    async for chunk in request.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > FORM_LIMIT:
            raise invalid_request(f"the request body is larger than {FORM_LIMIT} bytes")
    return bytes(body)


def parse_form(request: web.Request, raw: bytes) -> dict[str, str]:
    """Form parameters; RFC 6749 3.2 forbids repeating one, so a repeat is invalid_request."""
    if request.content_type != FORM_TYPE:
        raise invalid_request(f"the body must be {FORM_TYPE}")
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise invalid_request("the body is not valid UTF-8 form data") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise invalid_request(f"parameter {name} is repeated")
        form[name] = value
    return form


def claimed_client_id(request: web.Request, raw: bytes) -> str | None:
    """The client id a request claims (unauthenticated), for rate limiting before anything else."""
    try:
        basic = basic_credentials(request)
    except OAuthError:
        basic = None
    if basic:
        return basic[0]
    for name, value in parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True):
        if name == "client_id":
            return value
    return None


def basic_credentials(request: web.Request) -> tuple[str, str] | None:
    """(client_id, secret) from HTTP Basic, form-decoded as RFC 6749 2.3.1 requires; None if absent."""
    values = request.headers.getall("Authorization", [])
    if not values:
        return None
    if len(values) > 1:
        raise invalid_request("more than one Authorization header")
    scheme, _, param = values[0].strip().partition(" ")
    if scheme.lower() != "basic":
        raise OAuthError(
            401,
            "invalid_client",
            "unsupported client authentication scheme",
            {"WWW-Authenticate": BASIC_CHALLENGE},
        )
    try:
        decoded = b64decode(param.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise invalid_request("the Basic credentials are not valid base64") from None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        raise invalid_request("the Basic credentials must be client_id:client_secret")
    return unquote_plus(user), unquote_plus(password)


@dataclass(frozen=True, slots=True)
class AuthenticatedClient:
    client: Client
    secret: SecretRecord
    method: str


def authenticate(request: web.Request, state: EmulatorState, form: dict[str, str]) -> AuthenticatedClient:
    """Authenticate by exactly one of client_secret_basic or client_secret_post."""
    basic = basic_credentials(request)
    form_id, form_secret = form.get("client_id"), form.get("client_secret")
    if basic:
        if form_secret is not None:
            raise invalid_request("use one client authentication method, not Basic and client_secret")
        if form_id is not None and form_id != basic[0]:
            raise invalid_request("client_id in the body does not match the Authorization header")
        (client_id, secret), method = basic, "client_secret_basic"
    else:
        if not form_id:
            raise invalid_request("client_id is required")
        if form_secret is None:
            raise invalid_request("client_secret is required")
        client_id, secret, method = form_id, form_secret, "client_secret_post"
    client = state.clients.get(client_id)
    record = client.authenticate(secret) if client else None
    if client is None or record is None:
        headers = {"WWW-Authenticate": BASIC_CHALLENGE} if basic else None
        raise OAuthError(
            401, "invalid_client", "Client authentication failed: unknown client or wrong secret", headers
        )
    return AuthenticatedClient(client, record, method)
