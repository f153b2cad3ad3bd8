"""Local verification of tokens against the issuer's JWKS: every minted token, and every token
read from Redis before its first use (``proxy.tokens.redis_trust``).

The proxy treats tokens as opaque bearer strings, but checking a freshly
minted one (ES256 signature, iss, aud, exp, scope) catches a misrouted or
spoofed token endpoint before its token is sent anywhere. Time is the
injected clock, never PyJWT's own ``time.time()``, so tests move time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jwt

from proxy.tokens.attempt import SharedAttempt

Clock = Callable[[], float]
JwksUriProvider = Callable[[], Awaitable[str]]

ALGORITHM = "ES256"
_MAX_JWKS_BYTES = 256 * 1024
#: PyJWT checks signature, iss and aud; time claims are checked here with our clock.
_DECODE_OPTIONS: Any = {
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "require": ["exp", "iss", "aud"],
}


class TokenVerificationError(Exception):
    """A token failed verification; the message gives the reason, never the token.

    ``reason`` is one word from a fixed set (``malformed``, ``signature``, ``issuer``,
    ``audience``, ``scopes``, ``expired``, ``not_yet_valid``, ``unverifiable``), so a caller
    can count refusals by it without parsing the message (a metric label must stay bounded).
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class JwksUnavailable(TokenVerificationError):
    """The signing keys could not be fetched, so nothing can be verified."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "unverifiable")


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, but never more than ``limit`` + 1 bytes of it (so callers can tell "too big").

    ``StreamReader.read(n)`` returns whatever has arrived, not ``n`` bytes, and a
    body cut short raises ``ClientPayloadError`` here rather than looking complete.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(16 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)


def _usable_key(jwk: Any) -> jwt.PyJWK | None:
    """A P-256 signing key as a PyJWK bound to ES256, or None for any other key."""
    if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
        return None
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        return None
    if jwk.get("alg", ALGORITHM) != ALGORITHM or jwk.get("use", "sig") != "sig":
        return None
    try:
        return jwt.PyJWK(jwk, algorithm=ALGORITHM)
    except jwt.exceptions.PyJWTError:
        return None


def parse_jwks(document: Any) -> dict[str, jwt.PyJWK]:
    """kid -> key for every usable ES256 key of a JWKS document."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksUnavailable("JWKS document has no 'keys' list")
    keys = {}
    for raw in document["keys"]:
        key = _usable_key(raw)
        if key is not None:
            keys[raw["kid"]] = key
    return keys


def scope_claim(claims: dict[str, Any]) -> set[str]:
    """Scopes in the token: RFC 9068 ``scope`` string, or an ``scp`` list."""
    scope = claims.get("scope")
    if isinstance(scope, str):
        return set(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list) and all(isinstance(s, str) for s in scp):
        return set(scp)
    return set()


class JwtVerifier:
    """Verifies ES256 JWTs from ``issuer`` with keys fetched from its JWKS and cached.

    Unknown ``kid`` triggers a refetch (key rotation), at most once per
    ``min_refetch_s`` so a stream of forged kids cannot hammer the issuer.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        issuer: str,
        *,
        clock: Clock = time.time,
        jwks_uri: str | None = None,
        jwks_uri_provider: JwksUriProvider | None = None,
        cache_ttl_s: float = 600.0,
        min_refetch_s: float = 10.0,
        leeway_s: float = 30.0,
        timeout_s: float = 10.0,
    ) -> None:
        self._session, self._issuer, self._clock = session, issuer, clock
        self._jwks_uri = jwks_uri
        self._jwks_uri_provider = jwks_uri_provider
        self._ttl, self._min_refetch, self._leeway = cache_ttl_s, min_refetch_s, leeway_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._refreshing: SharedAttempt[None] = SharedAttempt()

    @property
    def needs_jwks_uri(self) -> bool:
        return self._jwks_uri is None and self._jwks_uri_provider is None

    def set_jwks_uri_provider(self, provider: JwksUriProvider) -> None:
        """Let the token source supply ``jwks_uri`` from its discovery document."""
        self._jwks_uri_provider = provider

    async def verify(self, token_value: str, *, audience: str, scopes: tuple[str, ...]) -> dict[str, Any]:
        """The token's claims, if it is a valid ES256 JWT for ``audience`` with ``scopes``."""
        kid = self._check_header(token_value)
        key = await self._key_for(kid)
        claims = self._decode(token_value, key, audience)
        self._check_times(claims)
        missing = set(scopes) - scope_claim(claims)
        if missing:
            raise TokenVerificationError(f"token lacks granted scopes: {' '.join(sorted(missing))}", "scopes")
        return claims

    def _check_header(self, token_value: str) -> str:
        try:
            header = jwt.get_unverified_header(token_value)
        except jwt.exceptions.PyJWTError:
            raise TokenVerificationError("token is not a JWT") from None
        alg = header.get("alg")
        if alg != ALGORITHM:
            shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
            message = f"token algorithm {shown!r} not allowed (only {ALGORITHM})"
            raise TokenVerificationError(message, "signature")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenVerificationError("token header has no kid")
        return kid

    def _decode(self, token_value: str, key: jwt.PyJWK, audience: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token_value,
                key,
                algorithms=[ALGORITHM],
                audience=audience,
                issuer=self._issuer,
                options=_DECODE_OPTIONS,
            )
        except jwt.exceptions.InvalidAudienceError:
            raise TokenVerificationError("token audience does not match", "audience") from None
        except jwt.exceptions.InvalidIssuerError:
            raise TokenVerificationError("token issuer does not match", "issuer") from None
        except jwt.exceptions.InvalidSignatureError:
            raise TokenVerificationError("token signature invalid", "signature") from None
        except jwt.exceptions.MissingRequiredClaimError as exc:
            raise TokenVerificationError(f"token lacks the {exc.claim!r} claim") from None
        except jwt.exceptions.PyJWTError as exc:
            raise TokenVerificationError(f"token rejected ({type(exc).__name__})") from None

    def _check_times(self, claims: dict[str, Any]) -> None:
        now = self._clock()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise TokenVerificationError("token exp is not a number")
        if exp <= now - self._leeway:
            raise TokenVerificationError("token already expired", "expired")
        if isinstance(nbf, int | float) and nbf > now + self._leeway:
            raise TokenVerificationError("token not valid yet (nbf)", "not_yet_valid")

    async def _key_for(self, kid: str) -> jwt.PyJWK:
        """The key for ``kid``: from the cache, after a TTL refresh, or after an unknown-kid refetch.

        Concurrent callers share one refresh (and its failure), never queue for one each.
        """
        if self._refresh_due(kid, self._clock()):
            await self._refreshing.run(self._refresh)
        key = self._keys.get(kid)
        if key is None:
            raise TokenVerificationError("token signed with an unknown key (kid)", "signature")
        return key

    def _refresh_due(self, kid: str, now: float) -> bool:
        if self._fetched_at is None or now - self._fetched_at >= self._ttl:
            return True
        return kid not in self._keys and now - self._fetched_at >= self._min_refetch

    async def _refresh(self) -> None:
        """Fetch the keys; a failure keeps the previous ones, if there are any."""
        try:
            keys = await self._fetch()
        except JwksUnavailable:
            if not self._keys:
                raise
            self._fetched_at = self._clock()  # retry after min_refetch/ttl, not on every token
            return
        self._keys, self._fetched_at = keys, self._clock()

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        uri = await self._resolve_uri()
        try:
            async with self._session.get(
                uri, timeout=self._timeout, allow_redirects=False, headers={"Accept": "application/json"}
            ) as resp:
                body = await read_bounded(resp, _MAX_JWKS_BYTES)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JwksUnavailable(f"JWKS fetch failed ({type(exc).__name__})") from None
        if status != 200 or len(body) > _MAX_JWKS_BYTES:
            raise JwksUnavailable(f"JWKS fetch answered HTTP {status}")
        try:
            return parse_jwks(json.loads(body))
        except ValueError:
            raise JwksUnavailable("JWKS document is not JSON") from None

    async def _resolve_uri(self) -> str:
        if self._jwks_uri is not None:
            return self._jwks_uri
        if self._jwks_uri_provider is None:
            raise JwksUnavailable("no jwks_uri configured or discovered")
        try:
            return await self._jwks_uri_provider()
        except Exception as exc:  # discovery failed: nothing to verify with
            raise JwksUnavailable(f"jwks_uri unavailable ({type(exc).__name__})") from None
