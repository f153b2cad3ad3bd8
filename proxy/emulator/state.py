"""Everything one emulator instance knows: clients, secrets, keys, tokens, counters, log.

It is a plain object, not hidden inside handlers, because tests hold it
(``EmulatorServer.state``) to assert what the service saw, and the control
surface mutates it to reproduce incidents (leaked secret, revoke-all, key
rotation). All access happens on the event loop, so no locking is needed.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from proxy.emulator.faults import Faults
from proxy.emulator.keys import KeyRing
from proxy.emulator.resources import Store
from proxy.emulator.samples import seed_store
from proxy.scopes import DEFAULT_AUDIENCE, KNOWN_AUDIENCES, KNOWN_SCOPES, PARTNER_SCOPES

#: The documented zero-downtime rotation allows two live secrets per client.
MAX_LIVE_SECRETS = 2
#: Request-log entries kept (oldest dropped first), so a long demo cannot grow without bound.
LOG_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """A provisioned client: its id, live secrets, granted scopes and audiences."""

    client_id: str
    secrets: tuple[str, ...] = field(repr=False)
    scopes: frozenset[str]
    audiences: frozenset[str] = frozenset({DEFAULT_AUDIENCE})

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("client_id must not be empty")
        if not 1 <= len(set(self.secrets)) == len(self.secrets) <= MAX_LIVE_SECRETS:
            raise ValueError(f"{self.client_id}: 1 to {MAX_LIVE_SECRETS} distinct secrets are allowed")
        if unknown := sorted(set(self.scopes) - KNOWN_SCOPES):
            raise ValueError(f"{self.client_id}: unknown scopes {unknown}")
        if unknown := sorted(set(self.audiences) - KNOWN_AUDIENCES):
            raise ValueError(f"{self.client_id}: unknown audiences {unknown}")


DEMO_CLIENT = ClientSpec(
    "cc_client_demo", ("demo-secret",), PARTNER_SCOPES, frozenset({"partner/v1", "internal/v1"})
)


def secret_id(secret: str) -> str:
    """A stable, non-reversible name for a secret, used in stats instead of the secret."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(slots=True)
class SecretRecord:
    """One live secret and its usage, like the dashboard's last-used column."""

    value: str = field(repr=False)
    created_at: float
    last_used_at: float | None = None
    tokens_issued: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "id": secret_id(self.value),
            "hint": self.value[:3] + "...",
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "tokens_issued": self.tokens_issued,
        }


class SecretConflict(Exception):
    """The secret is already live, or the client already has two."""


@dataclass(slots=True)
class Client:
    """Runtime view of a ClientSpec: secrets can be added and revoked while running."""

    client_id: str
    scopes: frozenset[str]
    audiences: frozenset[str]
    secrets: list[SecretRecord]

    @classmethod
    def from_spec(cls, spec: ClientSpec, now: float) -> Client:
        return cls(spec.client_id, spec.scopes, spec.audiences, [SecretRecord(s, now) for s in spec.secrets])

    def authenticate(self, secret: str) -> SecretRecord | None:
        """The live secret record matching ``secret`` (constant-time compare), or None."""
        match = None
        for record in self.secrets:
            if hmac.compare_digest(record.value.encode(), secret.encode()):
                match = record
        return match

    def add_secret(self, secret: str, now: float) -> SecretRecord:
        if self.authenticate(secret):
            raise SecretConflict("that secret is already live for this client")
        if len(self.secrets) >= MAX_LIVE_SECRETS:
            raise SecretConflict(f"a client has at most {MAX_LIVE_SECRETS} live secrets; revoke one first")
        record = SecretRecord(secret, now)
        self.secrets.append(record)
        return record

    def revoke_secret(self, secret: str) -> bool:
        """Stop ``secret`` authenticating; tokens already minted with it stay valid."""
        record = self.authenticate(secret)
        if record is None:
            return False
        self.secrets.remove(record)
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "scopes": sorted(self.scopes),
            "audiences": sorted(self.audiences),
            "secrets": [s.describe() for s in self.secrets],
        }


@dataclass(slots=True)
class IssuedToken:
    """What the server remembers about a token it minted (never the token itself)."""

    jti: str
    digest: str
    client_id: str
    scopes: tuple[str, ...]
    audience: str
    issuer: str
    kid: str
    secret_id: str
    iat: int
    exp: int
    revoked: bool = False
    force_expired: bool = False

    @property
    def scope(self) -> str:
        return " ".join(self.scopes)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(slots=True)
class Counters:
    """The numbers ``GET /_emulator/stats`` reports."""

    token_requests: int = 0
    tokens_issued: int = 0
    tokens_by_scope: Counter[str] = field(default_factory=Counter)
    tokens_by_secret: Counter[str] = field(default_factory=Counter)
    tokens_by_audience: Counter[str] = field(default_factory=Counter)
    token_errors: Counter[str] = field(default_factory=Counter)
    api_requests: int = 0
    api_by_status: Counter[str] = field(default_factory=Counter)
    revocations: int = 0
    introspections: int = 0
    rate_limited: int = 0
    cancelled: int = 0
    faults_injected: int = 0


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Counter) else value


class RateLimiter:
    """At most ``floor(rate)`` admitted requests per client in any sliding 1-second window.

    Refused requests do not enter the window, so a client that backs off is
    let back in as soon as its oldest admitted request is a second old.
    """

    WINDOW_S = 1.0

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._windows: dict[str, deque[float]] = collections.defaultdict(deque)

    def admit(self, key: str, now: float) -> float | None:
        """None when admitted (and recorded); else the seconds until a retry can succeed."""
        if self.rate is None:
            return None
        window = self._windows[key]
        while window and window[0] <= now - self.WINDOW_S:
            window.popleft()
        if len(window) >= max(1, math.floor(self.rate)):
            return window[0] + self.WINDOW_S - now
        window.append(now)
        return None

    def clear(self) -> None:
        self._windows.clear()


class EmulatorState:
    """The live state of one emulator; see the module docstring."""

    def __init__(
        self,
        clients: list[ClientSpec] | None = None,
        *,
        token_ttl: int = 3600,
        rate_limit: float | None = 10.0,
        issuer: str | None = None,
    ) -> None:
        now = time.time()
        specs = clients if clients is not None else [DEMO_CLIENT]
        if len({s.client_id for s in specs}) != len(specs):
            raise ValueError("client ids must be unique")
        self.clients: dict[str, Client] = {s.client_id: Client.from_spec(s, now) for s in specs}
        self.token_ttl = token_ttl
        self.limiter = RateLimiter(rate_limit)
        self.fixed_issuer = issuer.rstrip("/") if issuer else None
        self.keys = KeyRing()
        self.tokens: dict[str, IssuedToken] = {}
        self._by_digest: dict[str, str] = {}
        self.counters = Counters()
        self.faults = Faults()
        self.request_log: deque[dict[str, Any]] = deque(maxlen=LOG_LIMIT)
        self.token_log: deque[dict[str, Any]] = deque(maxlen=LOG_LIMIT)
        self.in_flight = 0
        self.store: Store = seed_store()

    @property
    def rate_limit(self) -> float | None:
        return self.limiter.rate

    def issuer_for(self, scheme: str, host: str) -> str:
        """The issuer: fixed by configuration, else the base URL the request came in on."""
        return self.fixed_issuer or f"{scheme}://{host}"

    def remember(self, token: str, record: IssuedToken, secret: SecretRecord) -> None:
        """Record a minted token and count it under its scope set, secret and audience."""
        self.tokens[record.jti] = record
        self._by_digest[record.digest] = record.jti
        secret.last_used_at = record.iat
        secret.tokens_issued += 1
        c = self.counters
        c.tokens_issued += 1
        c.tokens_by_scope[record.scope] += 1
        c.tokens_by_secret[f"{record.client_id}/{record.secret_id}"] += 1
        c.tokens_by_audience[record.audience] += 1

    def lookup(self, token: str) -> IssuedToken | None:
        """The record of a token this server minted, by its digest, or None."""
        jti = self._by_digest.get(token_digest(token))
        return self.tokens.get(jti) if jti else None

    def revoke_all(self, client_id: str | None = None) -> int:
        """Revoke every token issued so far (of one client, or all); returns how many."""
        hit = [t for t in self.tokens.values() if not t.revoked and client_id in (None, t.client_id)]
        for record in hit:
            record.revoked = True
        return len(hit)

    def expire_all(self) -> int:
        """Treat every token issued so far as expired; tokens minted later are unaffected."""
        hit = [t for t in self.tokens.values() if not t.force_expired]
        for record in hit:
            record.force_expired = True
        return len(hit)

    def reset(self) -> None:
        """Forget counters, faults, logs and rate windows; keep clients, keys, tokens and data."""
        self.counters = Counters()
        self.faults = Faults()
        self.request_log.clear()
        self.token_log.clear()
        self.limiter.clear()

    def stats(self) -> dict[str, Any]:
        snap = {name: _plain(getattr(self.counters, name)) for name in Counters.__slots__}
        snap["in_flight"] = self.in_flight
        snap["live_tokens"] = sum(1 for t in self.tokens.values() if not (t.revoked or t.force_expired))
        return snap
