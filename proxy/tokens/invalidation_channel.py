"""One replica's end of the invalidation channel: stamp what it sends, listen, check, coalesce, apply.

The message itself (shape, signature, bounds) is ``proxy.tokens.invalidation``;
this is what a replica does with it on ``{prefix}:inval``.

Why it looks the way it does:

* **The listener never stops.** It waits briefly for its subscription at
  start-up, never for Redis to come up; on any loss it re-subscribes with
  jittered exponential backoff; nothing a message contains can stop it (a
  message that fails is counted as ``malformed`` and logged). A replica
  ignores its own messages: its memory copy was dropped where it was purged.
* **A flood costs a bounded amount.** Whatever the key: at most one drop-all
  is applied per ``INVALIDATION_INTERVAL_S`` (one arriving sooner is applied
  once at the end of the interval, never lost) and a repeated per-key drop
  within the interval is folded into the first, so a flood costs the memory
  tier at most one refill per interval. The listener reads at most
  ``MAX_MESSAGES_PER_S`` (and yields to the request path after every
  message); held back by that for ``SHED_AFTER_S`` without catching up, it
  drops the subscription and its backlog and re-subscribes, so a flood costs a
  bounded share of one core and the listener is current again seconds after
  it stops.
* **Counted, logged once.** Each message is counted in
  ``ccp_invalidations_total{result}``; the first refusal of each kind and the
  first shed are logged, later ones only counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import uuid

from redis.asyncio.cluster import RedisCluster

from proxy.metrics import Metrics
from proxy.tokens.cache import Clock, InvalidationHandler
from proxy.tokens.invalidation import (
    INVALIDATION_MAX_AGE_S,
    MAX_MESSAGE_BYTES,
    Invalidation,
    ReplayWindow,
    encode_invalidation,
    parse_invalidation,
    verified,
)
from proxy.tokens.model import CacheKey
from proxy.tokens.redis_connect import REDIS_ERRORS, Client
from proxy.tokens.sealing import Keyring

log = logging.getLogger("proxy.tokens.redis")

INVALIDATION_INTERVAL_S = 1.0  # at most one drop-all applied per interval; per-key repeats folded
MAX_MESSAGES_PER_S = 1000  # the listener reads no faster (1 s burst): a flood must not eat the CPU
SHED_AFTER_S = 2.0  # held back by that rate this long without catching up: drop the backlog
_RECENT_KEYS_MAX = 1024  # per-key drops remembered for one interval to fold repeats
_LISTEN_BACKOFF_S = (0.1, 5.0)


class _Pace:
    """A token bucket for the listener: ``rate`` messages a second, bursts of up to one second's worth.

    A flood is not read faster than this; what it sends beyond waits in Redis, which
    disconnects a subscriber that falls too far behind (``client-output-buffer-limit
    pubsub``), and the listener sheds a backlog it cannot catch up with. Once over the
    rate it waits for a batch (1/20 s) worth at a time, not one message's: a timer per
    message would cost more CPU than reading the messages.
    """

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._allowance = rate
        self._last: float | None = None

    def delay(self, now: float) -> float:
        """Seconds to wait after one more message (0 within the rate)."""
        if self._last is not None:
            self._allowance = min(self._rate, self._allowance + (now - self._last) * self._rate)
        self._last = now
        self._allowance -= 1
        if self._allowance >= 0:
            return 0.0
        return (self._rate / 20 - self._allowance) / self._rate


class InvalidationChannel:
    """Invalidations on ``channel`` for one replica (its own ``origin``); the cache publishes them."""

    def __init__(
        self,
        client: Client,
        channel: str,
        *,
        clock: Clock,
        metrics: Metrics,
        budget_s: float,
        keyring: Keyring | None = None,
        interval_s: float = INVALIDATION_INTERVAL_S,
        max_age_s: float = INVALIDATION_MAX_AGE_S,
        max_messages_per_s: float = MAX_MESSAGES_PER_S,
    ) -> None:
        self._client = client
        self.name = channel
        self.origin = uuid.uuid4().hex
        self._clock = clock
        self._metrics = metrics
        self._budget = budget_s
        self._keyring = keyring if keyring is not None and keyring.mac_keys else None
        self._handler: InvalidationHandler | None = None
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._interval = interval_s
        self._max_rate = max_messages_per_s
        self._pace = _Pace(max_messages_per_s)  # kept across re-subscriptions: no fresh burst each time
        self._replays = ReplayWindow(max_age_s)
        self._last_drop_all = -math.inf  # loop time of the last drop-all applied
        self._pending_drop_all: asyncio.TimerHandle | None = None
        self._recent_keys: dict[tuple[CacheKey, str | None], float] = {}
        self._refusals_logged: set[str] = set()
        self._shed_logged = False

    def message(self, key: CacheKey | None, digest: str | None) -> str:
        """What to publish to drop ``key``'s token ``digest`` (or everything) on every other replica."""
        return encode_invalidation(self.origin, self._clock(), key, digest, self._keyring)

    # ---------------------------------------------------------------- listen
    async def start(self, on_invalidate: InvalidationHandler) -> None:
        """Listen for invalidations; waits briefly for the subscription, never for Redis to come up."""
        self._handler = on_invalidate
        self._listener = asyncio.get_running_loop().create_task(self._listen(), name="ccp-redis-inval")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._budget):
                await self._subscribed.wait()

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    async def _listen(self) -> None:
        """Subscribe, dispatch, and on any loss re-subscribe with jittered exponential backoff."""
        delay = _LISTEN_BACKOFF_S[0]
        while True:
            try:
                await self._subscribe_and_dispatch()
                self._subscribed.clear()  # returned: it shed a flood's backlog; re-subscribe at once
                delay = _LISTEN_BACKOFF_S[0]
                continue
            except Exception as exc:  # a listener that dies silently would leave stale copies forever
                if self._subscribed.is_set():
                    delay = _LISTEN_BACKOFF_S[0]
                self._subscribed.clear()
                self._metrics.redis_errors.labels("subscribe").inc()
                level = logging.DEBUG if isinstance(exc, REDIS_ERRORS) else logging.WARNING
                log.log(level, "invalidation listener lost Redis: %r", exc, extra={"event": "subscribe_lost"})
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(2 * delay, _LISTEN_BACKOFF_S[1])

    async def _subscribe_and_dispatch(self) -> None:
        if isinstance(self._client, RedisCluster):
            async with asyncio.timeout(self._budget):
                await self._client.initialize()  # its pub/sub needs the slot map first
        pubsub = self._client.pubsub()
        pace = self._pace
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._budget):
                await pubsub.subscribe(self.name)
            self._subscribed.set()
            behind_since: float | None = None
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    behind_since = None  # the channel was empty: caught up
                    continue
                if message.get("type") != "message":
                    continue
                try:
                    self._dispatch(message["data"])
                except Exception:  # nothing a message holds may stop the listener
                    self._count("malformed")
                    log.exception("invalidation message failed", extra={"event": "invalidation_error"})
                # Always yield (redis-py returns buffered messages without yielding, so a flood
                # would starve the request path), and past the rate wait: the backlog stays in Redis.
                now = loop.time()
                wait = pace.delay(now)
                if wait > 0:
                    behind_since = now if behind_since is None else behind_since
                    if now - behind_since >= SHED_AFTER_S:
                        self._shed()
                        return
                await asyncio.sleep(wait)
        finally:
            with contextlib.suppress(*REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _shed(self) -> None:
        """Behind a flood for ``SHED_AFTER_S``: let its backlog go with the subscription.

        Reading it at the capped rate could take minutes (Redis buffers up to its pubsub
        output limit, the socket more). Real invalidations buried in it are lost, as in a
        Redis outage: a token purged elsewhere meanwhile costs this replica one 401 retry.
        Nothing is dropped for it: with a key set, unsigned junk must never empty the memory tier.
        """
        self._metrics.redis_errors.labels("subscribe").inc()
        if not self._shed_logged:
            self._shed_logged = True
            log.warning(
                "invalidation channel flooded (over %d messages/s for %.0f s); dropping its backlog "
                "and re-subscribing (counted as subscribe errors)",
                self._max_rate,
                SHED_AFTER_S,
                extra={"event": "invalidation_flood"},
            )

    # ------------------------------------------------------- check and apply
    def _dispatch(self, data: bytes | str) -> None:
        """Check one message (size, MAC, shape, freshness), then coalesce and apply it."""
        raw = data.encode() if isinstance(data, str) else data
        if len(raw) > MAX_MESSAGE_BYTES:
            self._refuse("malformed")
            return
        mac = None
        if self._keyring is not None:
            signed = verified(raw, self._keyring)
            if signed is None:
                self._refuse("unauthenticated")
                return
            raw, mac = signed
        message = parse_invalidation(raw)
        if message is None:
            self._refuse("malformed")
            return
        if message.origin == self.origin:
            return  # our own purge: the memory copy was already dropped where it was purged
        if mac is not None and not self._replays.fresh(message, mac, self._clock()):
            self._refuse("stale")
            return
        self._coalesce(message)

    def _coalesce(self, message: Invalidation) -> None:
        if message.key is None:
            self._drop_all()
        else:
            self._drop_key(message.key, message.digest)

    def _drop_all(self) -> None:
        """Apply now, or once at the end of the interval if one was applied less than an interval ago."""
        if self._pending_drop_all is not None:
            self._count("coalesced")
            return
        loop = asyncio.get_running_loop()
        due = self._last_drop_all + self._interval
        if loop.time() >= due:
            self._apply_drop_all()
        else:
            self._pending_drop_all = loop.call_at(due, self._apply_drop_all)

    def _apply_drop_all(self) -> None:
        self._pending_drop_all = None
        self._last_drop_all = asyncio.get_running_loop().time()
        self._apply(None, None)

    def _drop_key(self, key: CacheKey, digest: str | None) -> None:
        """Apply at once (a rejected token should go soon); a repeat within the interval is folded."""
        now = asyncio.get_running_loop().time()
        marker = (key, digest)
        last = self._recent_keys.get(marker)
        if last is not None and now - last < self._interval:
            self._count("coalesced")
            return
        recent = self._recent_keys
        if len(recent) >= _RECENT_KEYS_MAX:
            for old in [m for m, at in recent.items() if now - at >= self._interval]:
                del recent[old]
            if len(recent) >= _RECENT_KEYS_MAX:
                recent.clear()  # a flood of distinct keys: forgetting only lets a repeat through
        recent[marker] = now
        self._apply(key, digest)

    def _apply(self, key: CacheKey | None, digest: str | None) -> None:
        self._count("applied")
        if self._handler is None:
            return
        try:
            self._handler(key, digest)
        except Exception:
            log.exception("invalidation handler failed", extra={"event": "invalidation_error"})

    def _count(self, result: str) -> None:
        self._metrics.invalidations.labels(result).inc()

    def _refuse(self, result: str) -> None:
        """Count every refused message; log the first of each kind (a flood must not flood the log)."""
        self._count(result)
        if result not in self._refusals_logged:
            self._refusals_logged.add(result)
            log.warning(
                "refused an invalidation message (%s); further ones are only counted in "
                "ccp_invalidations_total",
                result,
                extra={"event": "invalidation_refused", "result": result},
            )

    async def close(self) -> None:
        """Stop the listener and any drop-all still pending."""
        if self._pending_drop_all is not None:
            self._pending_drop_all.cancel()
            self._pending_drop_all = None
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
