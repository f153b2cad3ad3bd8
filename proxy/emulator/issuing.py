"""Minting and verifying the emulator's ES256 access tokens.

Both the token endpoint (mint, introspect, revoke) and the partner/v1 API
(verify) use this one module, so "valid" means the same thing everywhere:
signed by a currently published key, right issuer and audience, not expired
(by ``exp`` or by ``expire-all``), not revoked.
"""

from __future__ import annotations

import secrets
import time

import jwt
from jwt.types import Options

from proxy.emulator.keys import ALGORITHM
from proxy.emulator.state import Client, EmulatorState, IssuedToken, SecretRecord, secret_id, token_digest


class TokenRejected(Exception):
    """The token is not acceptable; ``description`` is safe to send back (no token inside).

    ``record`` is set when the token is one this server minted (revoked or
    expired), so the request log can still say whose token it was.
    """

    def __init__(self, description: str, record: IssuedToken | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.record = record


def mint(
    state: EmulatorState,
    client: Client,
    secret: SecretRecord,
    scopes: tuple[str, ...],
    audience: str,
    issuer: str,
) -> tuple[str, IssuedToken]:
    """Sign a token for ``client`` and remember it; returns (token, record)."""
    now = int(time.time())
    key = state.keys.current
    record = IssuedToken(
        jti=secrets.token_urlsafe(16),
        digest="",
        client_id=client.client_id,
        scopes=tuple(sorted(scopes)),
        audience=audience,
        issuer=issuer,
        kid=key.kid,
        secret_id=secret_id(secret.value),
        iat=now,
        exp=now + state.token_ttl,
    )
    claims = {
        "iss": issuer,
        "sub": client.client_id,
        "aud": audience,
        "client_id": client.client_id,
        "scope": record.scope,
        "iat": now,
        "nbf": now,
        "exp": record.exp,
        "jti": record.jti,
    }
    token = jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": None})
    record.digest = token_digest(token)
    state.remember(token, record, secret)
    return token, record


def verify(state: EmulatorState, token: str, issuer: str, audience: str | None) -> IssuedToken:
    """The record of a valid token, or TokenRejected saying why (``audience`` None = any)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenRejected("The access token is malformed") from None
    key = state.keys.find(str(header.get("kid", "")))
    if header.get("alg") != ALGORITHM or key is None:
        raise TokenRejected("The access token is not signed by a published key")
    options: Options = {
        "require": ["exp", "iat", "iss", "aud", "jti", "scope"],
        "verify_aud": audience is not None,
    }
    try:
        claims = jwt.decode(
            token, key.public_key, algorithms=[ALGORITHM], audience=audience, issuer=issuer, options=options
        )
    except jwt.ExpiredSignatureError:
        raise TokenRejected("The access token expired", state.lookup(token)) from None
    except jwt.InvalidAudienceError:
        raise TokenRejected(f"The access token is not for audience {audience}", state.lookup(token)) from None
    except jwt.InvalidIssuerError:
        raise TokenRejected("The access token was issued by another issuer", state.lookup(token)) from None
    except jwt.PyJWTError:
        raise TokenRejected("The access token signature or claims are invalid") from None
    record = state.tokens.get(str(claims["jti"]))
    if record is None or record.digest != token_digest(token):
        raise TokenRejected("The access token is unknown")
    if record.revoked:
        raise TokenRejected("The access token has been revoked", record)
    if record.force_expired:
        raise TokenRejected("The access token expired", record)
    return record
