"""Retry policy of the token source: error classes, backoff, latches and the rate ceiling.

Kept apart from ``source.py`` because these are pure, clock-driven rules that
tests can drive without any HTTP: how an OAuth error is treated, how long to
wait after a failure, when the endpoint must not be called at all, and how
many token-endpoint calls one replica may make.
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime

from proxy.errors import CredentialsRejected, ProxyError, ScopeNotGranted, TokenUnavailable
from proxy.tokens.model import CacheKey

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]

#: The highest ceiling we accept, whatever the config says: always below the
#: platform's limit of 10 token-endpoint calls per second.
MAX_CEILING_PER_S = 9.0
#: A server-sent Retry-After is honoured up to this; a larger one is a server bug,
#: and obeying it would take the proxy out for hours.
MAX_RETRY_AFTER_S = 300.0


class ErrorClass(enum.Enum):
    """What a failed token request means for the next one."""

    REJECTED = "rejected"  # invalid_client: never again with this secret
    SCOPE = "invalid_scope"  # this scope set is not granted: a route-table problem
    CONFIG = "config"  # our request is wrong (invalid_request ...): back off this key
    TRANSIENT = "transient"  # the endpoint is unwell: back off every key


_CONFIG_ERRORS = frozenset(
    {"invalid_request", "unauthorized_client", "unsupported_grant_type", "invalid_grant"}
)
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})


def classify(status: int, oauth_error: str | None) -> tuple[ErrorClass, str]:
    """(class, metric label) of a non-200 token response.

    The parsed JSON ``error`` field decides, never the description text; without
    one, the HTTP status decides. Labels stay bounded: an unknown code sent by
    a server becomes ``other_oauth_error``.
    """
    if oauth_error == "invalid_client":
        return ErrorClass.REJECTED, oauth_error
    if oauth_error == "invalid_scope":
        return ErrorClass.SCOPE, oauth_error
    if oauth_error in _CONFIG_ERRORS:
        return ErrorClass.CONFIG, oauth_error
    if oauth_error in _TRANSIENT_ERRORS:
        return ErrorClass.TRANSIENT, oauth_error
    kind, label = _classify_status(status)
    if oauth_error is not None and kind is ErrorClass.CONFIG:
        label = "other_oauth_error"
    return kind, label


def _classify_status(status: int) -> tuple[ErrorClass, str]:
    if status == 429:
        return ErrorClass.TRANSIENT, "http_429"
    if status >= 500:
        return ErrorClass.TRANSIENT, "http_5xx"
    if 300 <= status < 400:
        return ErrorClass.CONFIG, "http_3xx"
    return ErrorClass.CONFIG, "http_4xx"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date).

    ``now`` is the injected clock, so an HTTP-date is judged on the same time
    line as everything else. Garbage gives None (the header is only a floor).
    """
    if not value:
        return None
    text = value.strip()
    seconds: float | None
    try:
        seconds = float(text)
    except ValueError:
        seconds = _seconds_until_date(text, now)
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def _seconds_until_date(text: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT by definition
        return None
    return when.timestamp() - now


class Backoff:
    """Capped exponential backoff with full jitter and a floor.

    Full jitter spreads replicas that failed together; the floor (``base``)
    keeps a lucky draw from retrying at once, and a server's Retry-After is a
    floor on top of that.
    """

    def __init__(
        self, rng: random.Random, *, base: float = 0.5, factor: float = 2.0, cap: float = 60.0
    ) -> None:
        self._rng = rng
        self._base, self._factor, self._cap = base, factor, cap
        self.failures = 0
        self.until: float | None = None
        self._counted_at: float | None = None  # when the last failure that counted was recorded

    def failure(self, now: float, floor: float | None = None, *, started: float | None = None) -> float:
        """Record a failure of a call that started at ``started``; returns the delay before the next.

        A call that was already on its way when the last failure was counted belongs to
        the same burst: it saw nothing the counted one did not, so it does not escalate
        the back-off (eight scope sets failing together are one failure, not eight).
        Its Retry-After still counts. The back-off only ever grows here: a concurrent
        failure without Retry-After must not cut short a longer wait the server asked for.
        """
        if started is not None and self._counted_at is not None and started <= self._counted_at:
            if floor is not None:
                self.until = max(now + floor, self.until or now)
            return max(0.0, (self.until or now) - now)
        self._counted_at = now
        ceiling = min(self._cap, self._base * self._factor ** min(self.failures, 64))
        delay = max(self._base, self._rng.uniform(0.0, ceiling))
        if floor is not None:
            delay = max(delay, floor)
        self.failures += 1
        self.until = max(now + delay, self.until or now)
        return self.until - now

    def success(self) -> None:
        self.failures = 0
        self.until = None
        self._counted_at = None

    def remaining(self, now: float) -> float:
        """Seconds left to wait, 0 when not backing off."""
        if self.until is None or now >= self.until:
            return 0.0
        return self.until - now


def effective_ceiling(configured: float) -> float:
    """The per-second ceiling actually enforced: positive and always under the platform limit."""
    if not math.isfinite(configured) or configured <= 0:
        return 5.0
    return min(configured, MAX_CEILING_PER_S)


class MintRateLimiter:
    """Sliding-window ceiling on token-endpoint calls of this replica.

    At most ``n`` calls start in any window of ``window`` seconds (``n`` calls
    per second for a rate >= 1), so bursts at cold start go out at once and a
    backlog of scope sets queues in order. Each caller reserves its start time
    up front; a reservation further out than ``max_wait`` is refused instead,
    so a request never waits long on the ceiling.
    """

    def __init__(self, rate: float, clock: Clock, sleep: Sleep, *, max_wait: float = 2.0) -> None:
        rate = effective_ceiling(rate)
        self.rate = rate
        self._n = max(1, math.floor(rate))
        self._window = 1.0 if rate >= 1 else 1.0 / rate
        self._clock, self._sleep, self._max_wait = clock, sleep, max_wait
        self._starts: deque[float] = deque(maxlen=self._n)

    def next_slot(self, now: float) -> float:
        """The earliest start time a new call could reserve."""
        if len(self._starts) < self._n:
            return now
        return max(now, self._starts[0] + self._window)

    def refused_for(self, now: float) -> float:
        """Seconds until ``acquire`` would stop refusing (0: it would take or wait for a slot)."""
        return max(0.0, self.next_slot(now) - now - self._max_wait)

    async def acquire(self) -> None:
        """Wait for a slot, or raise TokenUnavailable if it is too far out."""
        now = self._clock()
        slot = self.next_slot(now)
        wait = slot - now
        if wait > self._max_wait:
            raise TokenUnavailable(
                f"token endpoint rate ceiling ({self.rate:g}/s) reached; try again shortly", wait
            )
        self._starts.append(slot)
        if wait > 0:
            await self._sleep(wait)


class EndpointFailure(Exception):
    """A failed exchange with the authorization server, classified for the policy.

    Internal to the token layer: ``TokenSource`` turns it into the ProxyError
    the caller sees. ``label`` is a bounded metric/log value; ``description``
    is our own text, never a body or header from the wire.
    """

    def __init__(
        self,
        label: str,
        kind: ErrorClass,
        description: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(description)
        self.label, self.kind, self.description = label, kind, description
        self.retry_after, self.status = retry_after, status

    @property
    def endpoint_may_have_moved(self) -> bool:
        """Whether discovery should be re-read: the answer may not be from the token endpoint.

        True for a transient failure and for an HTTP error with no OAuth error code (a
        404 or a redirect from a moved endpoint). An OAuth error (``invalid_request`` ...)
        came from the token endpoint itself, so re-reading discovery would not help.
        """
        return self.kind is ErrorClass.TRANSIENT or self.label in ("http_3xx", "http_4xx")

    @property
    def result(self) -> str:
        """The ``token_mints{result}`` value of this failure."""
        if self.kind is ErrorClass.REJECTED:
            return "rejected"
        if self.kind is ErrorClass.SCOPE:
            return "invalid_scope"
        if self.status == 429:
            return "rate_limited"
        return self.label if self.label in ("malformed", "unverified", "timeout") else "error"


def credentials_rejected_error() -> CredentialsRejected:
    return CredentialsRejected(
        "the token endpoint rejected the client credentials (invalid_client); waiting for a new client secret"
    )


def scope_not_granted_error(key: CacheKey) -> ScopeNotGranted:
    return ScopeNotGranted(
        f"the token endpoint refused scope set '{key.scope_label}' for audience '{key.audience}'"
        " (invalid_scope); fix the route table or have the scope granted to this client"
    )


class MintGate:
    """Whether a key may call the token endpoint now, and what each failure changes.

    - ``invalid_client`` latches the credential generation: no call until a new secret;
    - ``invalid_scope`` is remembered per key (fingerprint, audience, scopes) for a while;
    - config errors back off that key alone; transient errors back off every key.
    No I/O and no logging, so these rules are tested with a clock alone.
    """

    def __init__(self, clock: Clock, rng: random.Random, *, scope_memo_s: float = 300.0) -> None:
        self._clock, self._rng, self._scope_memo_s = clock, rng, scope_memo_s
        self.backoff = Backoff(rng)
        self._key_backoff: dict[CacheKey, Backoff] = {}
        self._scope_memo: dict[CacheKey, float] = {}
        self._rejected_generation: int | None = None

    def is_rejected(self, generation: int) -> bool:
        return self._rejected_generation == generation

    def clear_rejection(self) -> bool:
        """A new secret arrived; True if that lifted a latch."""
        latched, self._rejected_generation = self._rejected_generation is not None, None
        return latched

    def refused_for(self, generation: int, key: CacheKey) -> float:
        """Seconds a mint for ``key`` would still be refused without a call (0: it would go ahead).

        ``inf`` while the credentials are latched: only a new secret (a new key) lifts that.
        The same rules as ``refusal``, without building an error, for callers that ask per request.
        """
        if self.is_rejected(generation):
            return math.inf
        now = self._clock()
        state = self._key_backoff.get(key)
        return max(
            self._scope_memo.get(key, now) - now,
            self.backoff.remaining(now),
            state.remaining(now) if state else 0.0,
            0.0,
        )

    def refusal(self, generation: int, key: CacheKey) -> tuple[str, ProxyError] | None:
        """(metric result, error) when the answer is known without calling; None to go ahead."""
        now = self._clock()
        if self.is_rejected(generation):
            return "local_latched", credentials_rejected_error()
        if now < self._scope_memo.get(key, now):
            return "local_latched", scope_not_granted_error(key)
        state = self._key_backoff.get(key)
        wait = max(self.backoff.remaining(now), state.remaining(now) if state else 0.0)
        if wait > 0:
            return "local_backoff", TokenUnavailable("the token endpoint is failing; backing off", wait)
        return None

    def record_failure(
        self, generation: int, key: CacheKey, failure: EndpointFailure, started: float | None = None
    ) -> Backoff | None:
        """Apply a failure of a call that started at ``started``; returns the backoff it advanced, if any.

        The backoff's ``until`` says how long; see ``Backoff.failure`` for why ``started`` matters.
        """
        now = self._clock()
        if failure.kind is ErrorClass.REJECTED:
            self._rejected_generation = generation
            return None
        if failure.kind is ErrorClass.SCOPE:
            self._scope_memo[key] = now + self._scope_memo_s
            return None
        if failure.kind is ErrorClass.CONFIG:
            state = self._key_backoff.setdefault(key, Backoff(self._rng))
        else:
            state = self.backoff
        state.failure(now, failure.retry_after, started=started)
        return state

    def record_success(self, key: CacheKey) -> int:
        """Reset the backoffs ``key`` was under; returns how many failures the endpoint-wide one had."""
        failures = self.backoff.failures
        self.backoff.success()
        self._key_backoff.pop(key, None)
        return failures
