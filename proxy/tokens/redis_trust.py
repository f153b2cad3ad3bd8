"""Whether a token read from the shared tier (Redis) may be sent for the slot it was read from.

Redis is shared by every replica and usually reachable by more than the proxy:
whoever can write a value there can choose the bearer token this replica sends.
So a value read from Redis is a *claim*, never a fact. Before its first use in
this process it must be exactly the token the slot's own mint would have
produced, judged from the token itself and not from the metadata stored beside it:

* **signature, issuer, not expired** (``auth.verify: true``): checked against the
  issuer's JWKS by the same ``JwtVerifier`` that checks minted tokens;
* **audience**: the ``aud`` claim is the slot's audience, and only it;
* **client**: ``client_id`` (RFC 9068), else ``azp``, else ``sub``, is the slot's
  client id (a token minted for another client is someone else's authority);
* **scopes**: the granted set equals the slot's scope set exactly: not missing
  any (the API would answer 403) and not one more (the route would carry
  authority its config does not give it);
* **times**: ``exp`` and ``iat`` come from the token's claims; a stored ``exp``
  that disagrees is ignored (a forged ten-year ``exp`` must not keep a token past
  its real end, nor show in ``ccp_token_ttl_seconds``);
* **never backwards**: this process remembers, per slot, the newest token (by
  its ``iat``) it has minted, stored or admitted, and refuses an older one. An
  attacker who can write Redis but has no ``cache.encryption_key_file`` key cannot
  forge a sealed value, but can write an older sealed value of the same slot back
  (say, a token since revoked); this stops that replay.

A refused token is counted in ``ccp_redis_tokens_rejected_total{reason}``, logged
once (``redis_token_rejected``, with its digest, never the token) and deleted
from Redis with compare-and-delete (only if the slot still holds that very
token, so a good token written meanwhile survives); the caller then mints as on a
miss. The one exception is ``unverifiable`` (the JWKS cannot be fetched): the
token may be fine, so it is left in Redis for replicas that can check it.

An admitted token is remembered by slot and digest, so reading it again (a
second read under the lease, a copy dropped by an invalidation) costs a dict
lookup, not another signature check.

With ``auth.verify: false`` there is no signature check: the claims of a JWT
are still decoded (unverified) and must agree with the slot, and its ``exp``
still wins over the stored one; an opaque (non-JWT) token is taken with its
stored metadata. Without verification and without an encryption key this is
not a trust boundary: whoever writes Redis can write a self-made JWT with the
right claims.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import jwt

from proxy.metrics import Metrics
from proxy.tokens.model import CacheKey, Token
from proxy.tokens.verify import JwtVerifier, TokenVerificationError, scope_claim

log = logging.getLogger("proxy.tokens")

Clock = Callable[[], float]

#: Every value of the ``reason`` label (a bounded set: a label never comes from the token).
REASONS: Final = (
    "malformed",
    "signature",
    "issuer",
    "audience",
    "client",
    "scopes",
    "expired",
    "not_yet_valid",
    "replayed",
    "unverifiable",
)
#: Clock skew allowed for ``iat``/``nbf`` in the future (the verifier's leeway).
LEEWAY_S: Final = 30.0
_ADMITTED_LIMIT: Final = 1024
_NEWEST_LIMIT: Final = 4096
_LOGGED_LIMIT: Final = 1024
#: A legitimate stored exp is the minting replica's own clock, up to about a second past the
#: claim's whole-second exp: a token read in that last moment has simply ended, nobody lied.
_NATURAL_END_S: Final = 2.0
_UNVERIFIED: Final[Any] = {"verify_signature": False}


class Purger(Protocol):
    async def purge_if_same(self, key: CacheKey, token: Token) -> bool: ...


class Rejected(Exception):
    """Why a Redis token is refused; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Ended(Exception):
    """The token's own exp has passed and the stored one agrees: a plain miss, not a refusal."""


@dataclass(frozen=True, slots=True)
class _Admitted:
    token: Token  # times from the claims, scopes and audience those of the slot
    generation: float  # the token's iat: what "newer" means for the never-backwards rule


def unverified_claims(value: str) -> dict[str, Any] | None:
    """The payload of a JWT without checking anything, or None when ``value`` is not a JWT."""
    try:
        claims: dict[str, Any] = jwt.decode(value, options=_UNVERIFIED)
    except jwt.exceptions.PyJWTError:
        return None
    return claims


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def issued_to(claims: dict[str, Any], client_id: str) -> bool:
    """The token names ``client_id`` as the client it was issued to.

    ``client_id`` (RFC 9068) and ``azp`` name the client; every one present must
    match. Only when neither is there does ``sub`` count (for client credentials
    it is the client), because with them ``sub`` may use another form.
    """
    named = [claims[name] for name in ("client_id", "azp") if name in claims]
    if not named:
        named = [claims.get("sub")]
    return all(isinstance(value, str) and value == client_id for value in named)


def _remember(table: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """``table[key] = value``, evicting the oldest entry first when full (memory stays bounded)."""
    if key not in table and len(table) >= limit:
        del table[next(iter(table))]
    table[key] = value


class SharedTokenTrust:
    """Admits tokens read from Redis for one slot, or refuses, counts and purges them."""

    def __init__(self, *, verifier: JwtVerifier | None, clock: Clock, metrics: Metrics) -> None:
        self._verifier = verifier
        self._clock = clock
        self._rejected = metrics.redis_tokens_rejected
        self._admitted: dict[tuple[CacheKey, str], _Admitted] = {}
        self._newest: dict[CacheKey, float] = {}
        self._logged: dict[tuple[str, str], None] = {}

    async def admit(self, key: CacheKey, stored: Token, shared: Purger) -> Token | None:
        """``stored`` as the slot's token (times from its claims), or None after refusing it."""
        entry = self._admitted.get((key, stored.digest))
        if entry is None or not entry.token.same_as(stored):
            try:
                entry = await self._check(key, stored)
            except Rejected as refusal:
                await self._refuse(key, stored, refusal.reason, shared)
                return None
            except _Ended:
                return None
            _remember(self._admitted, (key, stored.digest), entry, _ADMITTED_LIMIT)
        elif entry.token.is_expired(self._clock()):
            del self._admitted[(key, stored.digest)]
            if stored.expires_at - entry.token.expires_at > _NATURAL_END_S:
                await self._refuse(key, stored, "expired", shared)
            return None
        if entry.generation < self._newest.get(key, -math.inf):
            await self._refuse(key, stored, "replayed", shared)
            return None
        self._see(key, entry.generation)
        return entry.token

    def note(self, key: CacheKey, token: Token) -> None:
        """A token this process holds for ``key`` (minted or admitted): the slot's newest so far.

        A minted token is trusted as it is (it came from the token endpoint, and was
        verified there when ``auth.verify`` is on), so reading it back from Redis later
        needs no check, and its own times stay the ones it was minted with.
        """
        admitted = self._admitted.get((key, token.digest))
        if admitted is None or not admitted.token.same_as(token):
            claims = unverified_claims(token.value)
            iat = _number(claims.get("iat")) if claims is not None else None
            admitted = _Admitted(token, token.issued_at if iat is None else iat)
            _remember(self._admitted, (key, token.digest), admitted, _ADMITTED_LIMIT)
        self._see(key, admitted.generation)

    def _see(self, key: CacheKey, generation: float) -> None:
        if generation > self._newest.get(key, -math.inf):
            _remember(self._newest, key, generation, _NEWEST_LIMIT)

    # ------------------------------------------------------------ checks
    async def _check(self, key: CacheKey, stored: Token) -> _Admitted:
        if self._verifier is not None:
            try:
                claims = await self._verifier.verify(stored.value, audience=key.audience, scopes=key.scopes)
            except TokenVerificationError as exc:
                raise Rejected(exc.reason if exc.reason in REASONS else "malformed") from None
            return self._from_claims(key, stored, claims)
        unverified = unverified_claims(stored.value)
        if unverified is None:
            return self._from_metadata(key, stored)
        return self._from_claims(key, stored, unverified)

    def _from_claims(self, key: CacheKey, stored: Token, claims: dict[str, Any]) -> _Admitted:
        """The slot's own claims, exactly; times from the token, never from the stored metadata."""
        audience = claims.get("aud")
        if audience != key.audience and audience != [key.audience]:
            raise Rejected("audience")
        if not issued_to(claims, key.client_id):
            raise Rejected("client")
        if scope_claim(claims) != set(key.scopes):
            raise Rejected("scopes")
        now = self._clock()
        expires, claimed = _number(claims.get("exp")), _number(claims.get("iat"))
        if expires is None or ("iat" in claims and claimed is None):
            raise Rejected("malformed")
        if claimed is None:  # no iat claim: the stored one, but never after the token's end
            issued = min(stored.issued_at, expires)
        else:  # claims are whole seconds; the minting replica's own time, if it fits, is finer
            issued = min(max(stored.issued_at, claimed), claimed + 1.0)
        if issued > expires:
            raise Rejected("malformed")
        if expires <= now:
            raise _Ended() if stored.expires_at - expires <= _NATURAL_END_S else Rejected("expired")
        not_before = _number(claims.get("nbf"))
        if issued > now + LEEWAY_S or (not_before is not None and not_before > now + LEEWAY_S):
            raise Rejected("not_yet_valid")
        token = Token(stored.value, issued, expires, key.scopes, key.audience)
        return _Admitted(token, issued if claimed is None else claimed)

    def _from_metadata(self, key: CacheKey, stored: Token) -> _Admitted:
        """An opaque token (only without ``auth.verify``): its stored metadata is all there is."""
        if stored.audience != key.audience:
            raise Rejected("audience")
        if set(stored.scopes) != set(key.scopes):
            raise Rejected("scopes")
        if stored.issued_at > stored.expires_at:
            raise Rejected("malformed")
        token = Token(stored.value, stored.issued_at, stored.expires_at, key.scopes, key.audience)
        return _Admitted(token, stored.issued_at)

    # ----------------------------------------------------------- refusal
    async def _refuse(self, key: CacheKey, stored: Token, reason: str, shared: Purger) -> None:
        self._rejected.labels(reason).inc()
        if (reason, stored.digest) not in self._logged:  # one line per token, however often it is read
            _remember(self._logged, (reason, stored.digest), None, _LOGGED_LIMIT)
            log.warning(
                "token read from Redis refused; it is not sent",
                extra={
                    "event": "redis_token_rejected",
                    "reason": reason,
                    "digest": stored.digest,
                    "scopes": key.scope_label,
                    "audience": key.audience,
                },
            )
        if reason != "unverifiable":  # a token we merely cannot check now may be fine
            await shared.purge_if_same(key, stored)
