"""The token source's retry rules, driven directly: no HTTP, a clock the test moves.

``proxy/tokens/backoff.py`` keeps these rules pure so they can be read and
checked one by one: how a failed token response is classified, how a
``Retry-After`` is read, how long the backoff waits, and how many
token-endpoint calls one replica may start. Each row's id states its rule.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from proxy.errors import TokenUnavailable
from proxy.tokens.backoff import (
    MAX_CEILING_PER_S,
    MAX_RETRY_AFTER_S,
    Backoff,
    ErrorClass,
    MintRateLimiter,
    classify,
    effective_ceiling,
    parse_retry_after,
)
from tests.helpers import FakeClock

NOW = 1_700_000_000.0

# ------------------------------------------------------------------ classify
REJECTED, SCOPE = ErrorClass.REJECTED, ErrorClass.SCOPE
CONFIG, TRANSIENT = ErrorClass.CONFIG, ErrorClass.TRANSIENT

#: (HTTP status, OAuth ``error`` field) -> (class, metric label), and the rule the row checks.
CLASSIFY: list[tuple[int, str | None, ErrorClass, str, str]] = [
    (401, "invalid_client", REJECTED, "invalid_client", "invalid_client: never again with this secret"),
    (400, "invalid_client", REJECTED, "invalid_client", "invalid_client whatever the status"),
    (400, "invalid_scope", SCOPE, "invalid_scope", "invalid_scope: a route-table problem"),
    (400, "invalid_request", CONFIG, "invalid_request", "invalid_request: our request is wrong"),
    (401, "unauthorized_client", CONFIG, "unauthorized_client", "unauthorized_client: config"),
    (400, "unsupported_grant_type", CONFIG, "unsupported_grant_type", "unsupported_grant_type: config"),
    (400, "invalid_grant", CONFIG, "invalid_grant", "invalid_grant: config"),
    (503, "temporarily_unavailable", TRANSIENT, "temporarily_unavailable", "temporarily_unavailable"),
    (500, "server_error", TRANSIENT, "server_error", "server_error: the endpoint is unwell"),
    (400, "server_error", TRANSIENT, "server_error", "the error field decides, not a 4xx"),
    (503, "invalid_request", CONFIG, "invalid_request", "the error field decides, not a 5xx"),
    (429, None, TRANSIENT, "http_429", "no error field: a 429 is transient"),
    (500, None, TRANSIENT, "http_5xx", "no error field: a 500 is transient"),
    (503, None, TRANSIENT, "http_5xx", "no error field: a 503 is transient"),
    (302, None, CONFIG, "http_3xx", "no error field: a redirect is config"),
    (404, None, CONFIG, "http_4xx", "no error field: a 404 is config"),
    (400, "slow_down", CONFIG, "other_oauth_error", "an unknown code gets a bounded label"),
    (302, "x" * 300, CONFIG, "other_oauth_error", "an unknown code on a redirect too"),
    (400, "INVALID_CLIENT", CONFIG, "other_oauth_error", "codes are case-sensitive"),
    (503, "slow_down", TRANSIENT, "http_5xx", "an unknown code on a 5xx: the status label"),
    (429, "slow_down", TRANSIENT, "http_429", "an unknown code on a 429: the status label"),
]


@pytest.mark.parametrize(
    ("status", "oauth_error", "kind", "label", "rule"), CLASSIFY, ids=[r[-1] for r in CLASSIFY]
)
def test_classify(status: int, oauth_error: str | None, kind: ErrorClass, label: str, rule: str) -> None:
    assert classify(status, oauth_error) == (kind, label), rule


# ------------------------------------------------------------- Retry-After
def http_date(at: float) -> str:
    return format_datetime(datetime.fromtimestamp(at, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param(None, None, id="no header: no floor"),
        pytest.param("", None, id="an empty header: no floor"),
        pytest.param("   ", None, id="a blank header: no floor"),
        pytest.param("120", 120.0, id="delta-seconds"),
        pytest.param(" 7 ", 7.0, id="surrounding spaces are ignored"),
        pytest.param("0", 0.0, id="zero is no wait"),
        pytest.param("-5", 0.0, id="a negative delay is no wait"),
        pytest.param("300", MAX_RETRY_AFTER_S, id="up to the cap it is honoured"),
        pytest.param("301", MAX_RETRY_AFTER_S, id="past the cap it is capped"),
        pytest.param("1e9", MAX_RETRY_AFTER_S, id="a huge delay is capped, not obeyed for years"),
        pytest.param("inf", None, id="infinity is garbage"),
        pytest.param("nan", None, id="nan is garbage"),
        pytest.param("soon", None, id="words are garbage"),
        pytest.param("12abc", None, id="a number with trailing garbage is garbage"),
        pytest.param(http_date(NOW + 60), 60.0, id="an HTTP-date is judged on the injected clock"),
        pytest.param(http_date(NOW - 60), 0.0, id="an HTTP-date in the past is no wait"),
        pytest.param(http_date(NOW + 3600), MAX_RETRY_AFTER_S, id="a far HTTP-date is capped"),
        pytest.param("Tue, 14 Nov 2023 23:14:20 +0100", 60.0, id="a numeric offset is honoured"),
        pytest.param("Tue, 14 Nov 2023 22:14:20 -0000", None, id="an HTTP-date without a zone is garbage"),
        pytest.param("Tue, 14 Nov 2023 22:14:20", None, id="an HTTP-date with no zone at all is garbage"),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_the_dates_above_are_sixty_seconds_from_now() -> None:
    """The literal dates in the table are ``NOW + 60`` in GMT: the rows rely on it."""
    assert http_date(NOW + 60) == "Tue, 14 Nov 2023 22:14:20 GMT"


# ------------------------------------------------------------------ Backoff
class HighestDraw(random.Random):
    """Full jitter always drawing the top of its range: the delay is the ceiling itself."""

    def uniform(self, a: float, b: float) -> float:
        return b


class LowestDraw(random.Random):
    """Full jitter always drawing 0: only the floor is left."""

    def uniform(self, a: float, b: float) -> float:
        return a


def delays(backoff: Backoff, count: int, *, every: float = 100.0) -> list[float]:
    """The delay after each of ``count`` failures, each call starting after the previous one counted."""
    return [backoff.failure(NOW + i * every, started=NOW + i * every - 1) for i in range(count)]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({}, [0.5, 1, 2, 4, 8, 16, 32, 60, 60], id="doubles from 0.5 s up to the 60 s cap"),
        pytest.param({"base": 1.0, "factor": 3.0, "cap": 20.0}, [1, 3, 9, 20, 20], id="base, factor and cap"),
        pytest.param({"cap": 0.25}, [0.5, 0.5, 0.5], id="the floor wins over a cap below it"),
    ],
)
def test_backoff_ceiling_grows_exponentially_to_the_cap(
    kwargs: dict[str, float], expected: list[float]
) -> None:
    assert delays(Backoff(HighestDraw(), **kwargs), len(expected)) == expected


def test_backoff_never_waits_less_than_its_floor() -> None:
    assert delays(Backoff(LowestDraw()), 8) == [0.5] * 8


@pytest.mark.parametrize("seed", range(20))
def test_backoff_jitter_stays_between_the_floor_and_the_ceiling(seed: int) -> None:
    drawn = delays(Backoff(random.Random(seed)), 10)
    ceilings = [min(60.0, 0.5 * 2**n) for n in range(10)]
    assert all(0.5 <= d <= c for d, c in zip(drawn, ceilings, strict=True)), drawn


def test_backoff_jitter_spreads_replicas_that_failed_together() -> None:
    """Twenty replicas after their fifth failure (ceiling 8 s) retry at many instants, spread out."""
    fifth = {delays(Backoff(random.Random(seed)), 5)[-1] for seed in range(20)}
    assert len(fifth) >= 15 and max(fifth) - min(fifth) > 6.0, sorted(fifth)


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        pytest.param(30.0, 30.0, id="a Retry-After above the draw is a floor"),
        pytest.param(0.1, 4.0, id="a Retry-After below the draw changes nothing"),
    ],
)
def test_backoff_takes_retry_after_as_a_floor(retry_after: float, expected: float) -> None:
    backoff = Backoff(HighestDraw())
    delays(backoff, 3)  # the fourth failure's ceiling is 4 s
    assert backoff.failure(NOW + 1000, retry_after, started=NOW + 999) == expected


def test_a_burst_of_calls_that_were_on_their_way_counts_once() -> None:
    backoff = Backoff(HighestDraw())
    assert backoff.failure(NOW, started=NOW - 1) == 0.5
    # Seven more scope sets whose calls started before that failure was counted: one failure.
    for i in range(1, 8):
        assert backoff.failure(NOW + i * 0.01, started=NOW - 0.5) == pytest.approx(0.5 - i * 0.01)
    assert backoff.failures == 1
    assert backoff.failure(NOW + 0.1, started=NOW + 0.05) == 1.0  # started after it: escalates
    assert backoff.failures == 2


def test_a_call_of_the_burst_still_brings_its_retry_after() -> None:
    backoff = Backoff(HighestDraw())
    backoff.failure(NOW, started=NOW - 1)
    assert backoff.failure(NOW + 0.1, 30.0, started=NOW - 0.5) == pytest.approx(30.0)
    assert backoff.failures == 1 and backoff.until == NOW + 30.1


def test_a_failure_without_a_start_time_always_counts() -> None:
    backoff = Backoff(HighestDraw())
    assert [backoff.failure(NOW) for _ in range(3)] == [0.5, 1.0, 2.0]


def test_the_backoff_only_grows_a_later_shorter_failure_keeps_the_longer_wait() -> None:
    backoff = Backoff(LowestDraw())
    assert backoff.failure(NOW, 60.0, started=NOW - 1) == 60.0  # the server asked for a minute
    assert backoff.failure(NOW + 1, started=NOW + 0.5) == 59.0  # 0.5 s drawn, the minute stays
    assert backoff.until == NOW + 60


@pytest.mark.parametrize(
    ("at", "left"),
    [
        pytest.param(NOW, 4.0, id="the whole wait right after the failure"),
        pytest.param(NOW + 3, 1.0, id="what is left of it later"),
        pytest.param(NOW + 4, 0.0, id="nothing at the end of it"),
        pytest.param(NOW + 10, 0.0, id="nothing after it"),
    ],
)
def test_backoff_remaining(at: float, left: float) -> None:
    backoff = Backoff(LowestDraw())
    backoff.failure(NOW, 4.0)
    assert backoff.remaining(at) == left


def test_success_resets_growth_wait_and_burst_memory() -> None:
    backoff = Backoff(HighestDraw())
    delays(backoff, 5)
    backoff.success()
    assert (backoff.failures, backoff.until, backoff.remaining(NOW)) == (0, None, 0.0)
    # A call that started before the reset is a new failure again, from the bottom of the curve.
    assert backoff.failure(NOW + 500, started=NOW) == 0.5
    assert backoff.failures == 1


def test_a_fresh_backoff_does_not_wait() -> None:
    assert Backoff(random.Random(1)).remaining(NOW) == 0.0


# ------------------------------------------------------------ rate ceiling
@pytest.mark.parametrize(
    ("configured", "enforced"),
    [
        pytest.param(5.0, 5.0, id="a ceiling under the limit is kept"),
        pytest.param(0.5, 0.5, id="a ceiling under one per second is kept"),
        pytest.param(MAX_CEILING_PER_S, MAX_CEILING_PER_S, id="the highest accepted ceiling is kept"),
        pytest.param(10.0, MAX_CEILING_PER_S, id="the platform's own limit is lowered below it"),
        pytest.param(100.0, MAX_CEILING_PER_S, id="anything higher is lowered too"),
        pytest.param(0.0, 5.0, id="zero falls back to the default"),
        pytest.param(-1.0, 5.0, id="a negative ceiling falls back to the default"),
        pytest.param(math.nan, 5.0, id="nan falls back to the default"),
        pytest.param(math.inf, 5.0, id="infinity falls back to the default"),
    ],
)
def test_effective_ceiling(configured: float, enforced: float) -> None:
    assert effective_ceiling(configured) == enforced


class Limiter:
    """A ``MintRateLimiter`` on a fake clock whose ``sleep`` only records (the test moves the clock).

    Not advancing the clock in ``sleep`` models callers that arrive together:
    each reserves its start time up front, before anyone has slept.
    """

    def __init__(self, rate: float, **kwargs: float) -> None:
        self.clock = FakeClock(NOW)
        self.slept: list[float] = []
        self.limiter = MintRateLimiter(rate, self.clock, self._sleep, **kwargs)

    async def _sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    async def acquire(self, count: int = 1) -> None:
        for _ in range(count):
            await self.limiter.acquire()


@pytest.mark.parametrize(
    ("rate", "calls", "slept"),
    [
        pytest.param(3.0, 3, [], id="a burst up to the ceiling goes out at once"),
        pytest.param(3.0, 4, [1.0], id="the next call waits for the window to slide"),
        pytest.param(3.0, 6, [1.0, 1.0, 1.0], id="a backlog queues one window later"),
        pytest.param(2.0, 5, [1.0, 1.0, 2.0], id="and two windows later, in order"),
        pytest.param(2.5, 3, [1.0], id="a fractional rate over 1 allows its whole part per second"),
        pytest.param(0.5, 2, [2.0], id="a rate under 1: one call per 1/rate seconds"),
    ],
)
async def test_rate_ceiling_slots(rate: float, calls: int, slept: list[float]) -> None:
    limited = Limiter(rate)
    await limited.acquire(calls)
    assert limited.slept == slept


async def test_a_slot_further_out_than_max_wait_is_refused_with_how_long_to_wait() -> None:
    limited = Limiter(1.0, max_wait=2.0)
    await limited.acquire(3)  # at once, then 1 s and 2 s out: both within max_wait
    assert limited.slept == [1.0, 2.0]
    with pytest.raises(TokenUnavailable, match="rate ceiling") as refused:
        await limited.acquire()
    assert refused.value.retry_after == 3.0
    assert limited.limiter.refused_for(NOW) == 1.0  # 3 s out, 2 of them acceptable


async def test_a_refused_call_reserves_nothing() -> None:
    limited = Limiter(1.0, max_wait=2.0)
    await limited.acquire(3)
    for _ in range(3):
        with pytest.raises(TokenUnavailable):
            await limited.acquire()
    limited.clock.advance(1.0)
    await limited.acquire()  # the slot 3 s after the start is still free: 2 s from now
    assert limited.slept == [1.0, 2.0, 2.0]


async def test_the_window_slides_with_the_clock() -> None:
    limited = Limiter(2.0)
    await limited.acquire(2)
    assert limited.limiter.next_slot(NOW) == NOW + 1
    limited.clock.advance(1.0)
    assert limited.limiter.next_slot(limited.clock()) == limited.clock()
    await limited.acquire(2)
    assert limited.slept == []  # a full window later the whole burst is free again


@pytest.mark.parametrize(
    ("max_wait", "refused_for"),
    [
        pytest.param(2.0, 0.0, id="within max_wait: not refused"),
        pytest.param(0.5, 0.5, id="past max_wait: refused for the rest"),
        pytest.param(0.0, 1.0, id="max_wait 0: refused until the slot itself"),
    ],
)
async def test_refused_for(max_wait: float, refused_for: float) -> None:
    limited = Limiter(1.0, max_wait=max_wait)
    await limited.acquire()
    assert limited.limiter.refused_for(NOW) == refused_for
