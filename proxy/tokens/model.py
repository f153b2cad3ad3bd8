"""Value types of the token layer: credentials, cache keys and tokens.

``Token`` and ``Credentials`` hide their secrets from ``repr``/``str`` so that a
stray log line, an exception message or a debugger dump cannot leak them.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from proxy.scopes import scope_set_label

_FINGERPRINT_ITERATIONS = 20_000


def credential_fingerprint(client_id: str, secret: str) -> str:
    """A short, slow-to-invert fingerprint of a secret, used in cache keys.

    It changes whenever the secret changes, so a rotated secret never reads a
    slot written under the old one. PBKDF2 (salted by client id) keeps a
    low-entropy secret from being recovered from a Redis key name.
    """
    raw = hashlib.pbkdf2_hmac(
        "sha256", secret.encode(), b"ccp-fp:" + client_id.encode(), _FINGERPRINT_ITERATIONS, 8
    )
    return raw.hex()


@dataclass(frozen=True, slots=True)
class Credentials:
    """One generation of the client's credentials."""

    client_id: str
    secret: str = field(repr=False)
    fingerprint: str = ""
    generation: int = 1

    @classmethod
    def create(cls, client_id: str, secret: str, generation: int = 1) -> Credentials:
        return cls(client_id, secret, credential_fingerprint(client_id, secret), generation)

    def __str__(self) -> str:
        return f"Credentials({self.client_id}, fp={self.fingerprint}, gen={self.generation})"


@dataclass(frozen=True, slots=True, order=True)
class CacheKey:
    """(client_id, credential fingerprint, audience, sorted scope set)."""

    client_id: str
    fingerprint: str
    audience: str
    scopes: tuple[str, ...]

    @classmethod
    def create(
        cls, creds: Credentials, scopes: frozenset[str] | tuple[str, ...], audience: str
    ) -> CacheKey:
        return cls(creds.client_id, creds.fingerprint, audience, tuple(sorted(set(scopes))))

    @property
    def scope_label(self) -> str:
        """The scope set as a metric label / log field (from config, never from a request)."""
        return scope_set_label(self.scopes)

    def storage_id(self) -> str:
        """Stable text form for shared stores (Redis key suffix); contains no secret."""
        return f"{self.client_id}:{self.fingerprint}:{self.audience}:{','.join(self.scopes)}"


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token with absolute times judged by the injected clock.

    ``issued_at``/``expires_at`` are epoch seconds of the proxy's clock, so
    freshness is decided locally and tests move the clock instead of sleeping.
    ``issued_at`` is stamped when the mint POST starts (the safe side for expiry).

    ``received_at`` is when *this replica* had the minted token in hand (the
    response received and verified): the moment it became available to requests,
    so a request that joined the mint after the POST started still knows the token
    is newer than itself. It is local knowledge: not compared, not stored in Redis.
    A token read from the shared tier has none (``None``), even if another replica
    minted it a moment ago: this replica cannot tell that from another clock, and a
    Redis copy may be an old, revoked token that a purge and one re-mint would fix.
    """

    value: str = field(repr=False)
    issued_at: float
    expires_at: float
    scopes: tuple[str, ...]
    audience: str
    received_at: float | None = field(default=None, compare=False, repr=False)
    #: Identifies this token (compare-and-purge, logs, Redis) without revealing it. Computed
    #: once here because the request path reads it on every request.
    digest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", hashlib.sha256(self.value.encode()).hexdigest()[:16])

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at

    def received_since(self, moment: float) -> bool:
        """True if this replica received this token from the token endpoint at or after ``moment``.

        The 401 retry asks this: a token minted during the very request it failed
        for is not a stale-cache problem, so purging it and minting again would not help.
        """
        return self.received_at is not None and self.received_at >= moment

    def same_as(self, other: Token | None) -> bool:
        return other is not None and hmac.compare_digest(self.value, other.value)

    def __str__(self) -> str:
        return f"Token(digest={self.digest}, scopes={' '.join(self.scopes)}, exp={self.expires_at:.0f})"

    __repr__ = __str__
