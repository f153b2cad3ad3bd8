"""The token life cycle: lookup, single-flight minting, refresh ahead of expiry, purge on 401.

The request path asks ``get(scopes, audience)``. A fresh token in process
memory is returned without an await that could switch tasks and without any
Redis round trip. Everything slower goes through one *flight* per cache key:
an ``asyncio.Task`` that every concurrent caller awaits (shielded, so a client
that goes away never cancels a mint others are waiting on). Inside the
flight the shared tier (Redis) is consulted, then its lease is taken, so at
most one replica mints a key at a time.

Freshness, judged by the injected clock:

* ``refresh_at`` = the earlier of ``at_fraction`` of the lifetime and
  ``min_margin_s`` before expiry, but never before half the lifetime (so a
  short-lived token is not re-minted on every request), minus a per-token
  jitter so replicas and scope sets do not line up.
* a token past ``refresh_at`` is *stale*: still served, while a background
  flight replaces it; if the token endpoint is down it keeps being served.
  While the source is backing off no flight is started for it at all (it could
  only be refused), and ``serve_stale`` is logged once per backoff period per
  scope set: an outage under load is a handful of log lines, not one per request.
* a token within ``send_margin`` of expiry is *unusable*: never sent, because
  it could expire on the way to the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Callable, Iterable
from typing import Protocol

from proxy.errors import ProxyError, TokenError, TokenUnavailable
from proxy.metrics import Metrics
from proxy.settings import RefreshSettings
from proxy.tokens.cache import MemoryTokenCache, TokenCache
from proxy.tokens.model import CacheKey, Credentials, Token
from proxy.tokens.redis_trust import SharedTokenTrust

log = logging.getLogger("proxy.tokens")

Clock = Callable[[], float]
_MAX_SEND_MARGIN_S = 5.0


class Minter(Protocol):
    async def mint(self, scopes: tuple[str, ...], audience: str) -> Token: ...

    def refused_for(self, key: CacheKey) -> float:
        """Seconds a mint for ``key`` would be refused without calling the endpoint (0: tried)."""
        ...


class CredentialSource(Protocol):
    def current(self) -> Credentials: ...


class TokenManager:
    """Hands out tokens per (audience, scope set); owns the refresher task."""

    def __init__(
        self,
        source: Minter,
        credentials: CredentialSource,
        *,
        refresh: RefreshSettings,
        clock: Clock,
        metrics: Metrics,
        shared: TokenCache | None = None,
        rng: random.Random | None = None,
        trust: SharedTokenTrust | None = None,
    ) -> None:
        self._source = source
        self._credentials = credentials
        self._policy = refresh
        self._clock = clock
        self._metrics = metrics
        self._shared = shared
        # Checks every token read from ``shared`` before it is used (``proxy.tokens.redis_trust``). The
        # runtime always passes one; None (unit tests of the tiers alone) takes Redis at its word.
        self._trust = trust
        self._rng = rng or random.Random()
        self.memory = MemoryTokenCache(clock)
        self._flights: dict[CacheKey, asyncio.Task[Token]] = {}
        self._last_used: dict[CacheKey, float] = {}
        # Prefetched (scope set, audience) pairs: kept warm even when idle, because readiness
        # needs them. Held as pairs, not keys, so a rotated secret's new keys are pinned too.
        self._pinned: frozenset[tuple[tuple[str, ...], str]] = frozenset()
        self._due: dict[str, float] = {}  # token digest -> refresh_at (jittered once per token)
        self._stale_quiet_until: dict[CacheKey, float] = {}  # no serve_stale warning again before
        self._keys: dict[tuple[str, tuple[str, ...]], CacheKey] = {}
        self._keys_fingerprint = ""
        self._memory_hit = metrics.cache_lookups.labels("memory", "hit")
        self._memory_stale = metrics.cache_lookups.labels("memory", "stale")
        self._memory_miss = metrics.cache_lookups.labels("memory", "miss")

    # ----------------------------------------------------------- request path
    def key_for(self, scopes: tuple[str, ...], audience: str) -> CacheKey:
        """The cache key under the current credentials (memoised per scope set)."""
        creds = self._credentials.current()
        if creds.fingerprint != self._keys_fingerprint:
            self._keys.clear()
            self._keys_fingerprint = creds.fingerprint
        key = self._keys.get((audience, scopes))
        if key is None:
            key = self._keys[(audience, scopes)] = CacheKey.create(creds, scopes, audience)
        return key

    async def get(self, scopes: tuple[str, ...], audience: str) -> Token:
        """A token that is valid now for exactly this scope set and audience."""
        key = self.key_for(scopes, audience)
        now = self._clock()
        self._last_used[key] = now
        token = self.memory.peek(key)
        if token is not None and self.usable(token, now):
            if now >= self.refresh_at(token):
                self._memory_stale.inc()
                if key not in self._flights and not self._source.refused_for(key):
                    self._start_flight(key, None)  # refresh behind the request, never in front of it
            else:
                self._memory_hit.inc()
            self._metrics.token_age_at_use.observe(now - token.issued_at)
            return token
        self._memory_miss.inc()
        return self._sendable(key, await self._await_flight(key, None))

    async def replace(self, key: CacheKey, rejected: Token) -> Token:
        """After an upstream 401: purge ``rejected`` if still cached, get a new token once.

        Every request that saw the same token rejected joins one flight, and a
        request arriving after the flight landed simply picks up its token.
        """
        for held in (key, *self._earlier_generation_keys(key)):  # it may be a previous secret's token
            await self.memory.purge_if_same(held, rejected)
        if self._shared is not None:
            await self._shared.purge_if_same(key, rejected)
        current = self.memory.peek(key)
        if current is not None and not current.same_as(rejected) and self.usable(current, self._clock()):
            return current
        log.info(
            "token purged after upstream 401",
            extra={"event": "purge", "scopes": key.scope_label, "digest": rejected.digest},
        )
        token = await self._await_flight(key, rejected)
        if token.same_as(rejected):  # joined a refresh that started before the purge
            token = await self._await_flight(key, rejected)
        return self._sendable(key, token)

    def _sendable(self, key: CacheKey, token: Token) -> Token:
        """``token`` if it may still be sent now, else the error a caller with no token gets.

        A flight can outlive the token it lands with (a mint slower than what is left of the
        lifetime, or a request that joined a long flight late): the time that matters is the
        moment the token leaves for the API, not the moment the flight chose it.
        """
        if self.usable(token, self._clock()):
            return token
        raise TokenUnavailable(
            f"no valid token for scope set '{key.scope_label}'; it ran out while being fetched"
        )

    # ------------------------------------------------------------- freshness
    def usable(self, token: Token, now: float) -> bool:
        """Safe to send: not within the send margin of expiry."""
        margin = min(_MAX_SEND_MARGIN_S, 0.1 * token.lifetime)
        return now < token.expires_at - margin

    def refresh_at(self, token: Token) -> float:
        """When ``token`` becomes stale; computed once per token (the request path asks every time)."""
        due = self._due.get(token.digest)
        if due is None:
            if len(self._due) > 4096:
                self._due.clear()
            due = self._due[token.digest] = self._compute_refresh_at(token)
        return due

    def _compute_refresh_at(self, token: Token) -> float:
        life = token.lifetime
        policy = self._policy
        due = min(token.issued_at + policy.at_fraction * life, token.expires_at - policy.min_margin_s)
        due = max(due, token.issued_at + 0.5 * life)
        spread = min(policy.jitter_s, 0.05 * life)
        return due - self._rng.uniform(0.0, spread)

    def is_fresh(self, token: Token | None, now: float) -> bool:
        return token is not None and self.usable(token, now) and now < self.refresh_at(token)

    # ---------------------------------------------------------- single flight
    def _start_flight(self, key: CacheKey, rejected: Token | None) -> asyncio.Task[Token]:
        flight = self._flights.get(key)
        if flight is None or flight.done():
            flight = asyncio.get_running_loop().create_task(self._fill(key, rejected))
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._flight_done(key, done))
        return flight

    def _flight_done(self, key: CacheKey, done: asyncio.Task[Token]) -> None:
        if self._flights.get(key) is done:
            del self._flights[key]
        if not done.cancelled() and done.exception() is not None:
            # Retrieve it so asyncio does not warn when nobody was waiting (a background refresh).
            log.debug("token flight failed", extra={"event": "flight_failed", "scopes": key.scope_label})

    async def _await_flight(self, key: CacheKey, rejected: Token | None) -> Token:
        return await asyncio.shield(self._start_flight(key, rejected))

    async def _fill(self, key: CacheKey, rejected: Token | None) -> Token:
        """Find or mint a token for ``key``; fall back to a stale-but-usable one if minting fails."""
        fallback = self._usable_memory(key, rejected)
        shared = await self._shared_token(key, rejected)
        if shared is not None:
            if self.is_fresh(shared, self._clock()):
                return shared
            fallback = fallback or shared
        if self._shared is None:
            return await self._mint(key, fallback, rejected)
        async with self._shared.lease(key):
            shared = await self._shared_token(key, rejected)  # the lease holder before us may have minted
            if shared is not None and self.is_fresh(shared, self._clock()):
                return shared
            return await self._mint(key, fallback, rejected)

    def _usable_memory(self, key: CacheKey, rejected: Token | None) -> Token | None:
        token = self.memory.peek(key)
        if token is None or token.same_as(rejected) or not self.usable(token, self._clock()):
            return None
        return token

    async def _shared_token(self, key: CacheKey, rejected: Token | None) -> Token | None:
        """The shared tier's token (copied into memory), unless it is the rejected one."""
        if self._shared is None:
            return None
        token = await self._shared.get(key)
        if token is not None and self._trust is not None:
            token = await self._trust.admit(key, token, self._shared)  # None: refused, purged, counted
        if token is None or token.same_as(rejected) or not self.usable(token, self._clock()):
            self._metrics.cache_lookups.labels("redis", "miss").inc()
            return None
        self._metrics.cache_lookups.labels("redis", "hit").inc()
        await self._store_memory(key, token)
        return token

    async def _mint(self, key: CacheKey, fallback: Token | None, rejected: Token | None) -> Token:
        try:
            token = await self._source.mint(key.scopes, key.audience)
        except TokenError:
            chosen = self._fallback_now(key, fallback, rejected)
            if chosen is None:
                raise
            self._log_serve_stale(key, previous_secret=chosen is not fallback)
            return chosen
        await self._store_memory(key, token)
        if self._shared is not None:
            await self._shared.put(key, token)
        return token

    def _log_serve_stale(self, key: CacheKey, *, previous_secret: bool) -> None:
        """Warn once per backoff period per scope set; repeats inside it are debug lines.

        The failure that ended this mint has just set the source's backoff, so its length is
        the quiet period: the next attempt (the refresher's, when it ends) may warn again.
        """
        now = self._clock()
        quiet = now < self._stale_quiet_until.get(key, now)
        if not quiet:
            if len(self._stale_quiet_until) > 4096:
                self._stale_quiet_until.clear()
            self._stale_quiet_until[key] = now + self._source.refused_for(key)
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "token endpoint failing; serving the still-valid cached token",
            extra={"event": "serve_stale", "scopes": key.scope_label, "previous_secret": previous_secret},
        )

    def _fallback_now(self, key: CacheKey, fallback: Token | None, rejected: Token | None) -> Token | None:
        """What to serve when the mint failed, judged now: a long mint may have outlived ``fallback``."""
        if fallback is not None and self.usable(fallback, self._clock()):
            return fallback
        return self._earlier_generation_token(key, rejected)

    def _earlier_generation_keys(self, key: CacheKey) -> list[CacheKey]:
        """Keys in memory for the same client, audience and scope set under an earlier secret."""
        same = (key.client_id, key.audience, key.scopes)
        return [
            held
            for held in self.memory.keys()
            if held.fingerprint != key.fingerprint and (held.client_id, held.audience, held.scopes) == same
        ]

    def _earlier_generation_token(self, key: CacheKey, rejected: Token | None) -> Token | None:
        """The longest-lived usable token minted with an earlier secret for ``key``'s scope set.

        Credicorp keeps tokens valid until they expire when a secret changes, so after a
        rotation to a secret the token endpoint refuses (deployed before it was registered)
        or while the endpoint is down, the previous secret's tokens still serve their routes.
        They are never stored under the new key, and one the API refused is not chosen.
        """
        now = self._clock()
        held = (self.memory.peek(k) for k in self._earlier_generation_keys(key))
        usable = [t for t in held if t is not None and not t.same_as(rejected) and self.usable(t, now)]
        return max(usable, key=lambda t: t.expires_at, default=None)

    async def _store_memory(self, key: CacheKey, token: Token) -> None:
        if self._trust is not None:
            self._trust.note(key, token)  # the slot's newest token: an older one read later is a replay
        await self.memory.put(key, token)
        self._metrics.token_ttl.labels(key.scope_label, key.audience).set(token.expires_at - self._clock())

    # -------------------------------------------------------------- refresher
    async def refresh_due(self) -> int:
        """Start a flight for every recently used key whose token is stale or gone.

        Not for a key whose token still serves while the source would refuse its mint (backing
        off): that flight could only count a refusal; the first tick after the backoff tries it.
        Returns how many flights were started. Keys idle longer than
        ``refresh.idle_s`` are forgotten: nobody needs their token kept warm.
        """
        now = self._clock()
        started = 0
        current = self._credentials.current().fingerprint
        pinned = {self.key_for(scopes, audience) for scopes, audience in self._pinned}
        for key in pinned:  # after a rotation these are new keys: warm them with the new secret
            self._last_used.setdefault(key, now)
        for key, used in list(self._last_used.items()):
            idle = now - used > self._policy.idle_s and key not in pinned
            if idle or key.fingerprint != current:  # a rotated-out secret's keys are never asked for again
                del self._last_used[key]
                self._forget_ttl(key)
                continue
            token = self.memory.peek(key)
            if token is not None:
                left = max(0.0, token.expires_at - now)
                self._metrics.token_ttl.labels(key.scope_label, key.audience).set(left)
            if key in self._flights or (token is not None and now < self.refresh_at(token)):
                continue
            if token is not None and self.usable(token, now) and self._source.refused_for(key):
                continue  # it could only be refused and keep this token: tried once the backoff ends
            counted = functools.partial(self._count_refresh, key, token)
            self._start_flight(key, None).add_done_callback(counted)
            started += 1
        return started

    def _forget_ttl(self, key: CacheKey) -> None:
        """An idle scope set is no longer kept warm: stop exporting a TTL that would go stale.

        The series is per (scope set, audience): the same scopes for two audiences are two
        tokens, and one series for both would let a fresh one hide the other running out.
        """
        labels = (key.scope_label, key.audience)
        if not any((k.scope_label, k.audience) == labels for k in self._last_used):
            with contextlib.suppress(KeyError):
                self._metrics.token_ttl.remove(*labels)

    def _count_refresh(self, key: CacheKey, before: Token | None, done: asyncio.Task[Token]) -> None:
        """Count and log one background refresh (the token event operators look for).

        A refresh succeeded only if ``key`` now holds a token other than the one it had. A
        flight that lands with the very token it set out to replace (the mint failed and the
        still-valid token was kept, ``serve_stale``), or with a previous secret's token that
        is never stored under ``key``, refreshed nothing. That is an error, or the refresh
        metric would read healthy while tokens run out.
        """
        failed = done.cancelled() or done.exception() is not None
        if not failed:
            landed = done.result()
            failed = landed.same_as(before) or not landed.same_as(self.memory.peek(key))
        result = "error" if failed else "ok"
        self._metrics.token_refreshes.labels(result).inc()
        log.log(
            logging.DEBUG if failed else logging.INFO,  # a failure is already logged as mint_failed
            "background refresh failed" if failed else "token refreshed in the background",
            extra={
                "event": "refresh",
                "result": result,
                "scopes": key.scope_label,
                "audience": key.audience,
                "token_digest": None if failed else done.result().digest,
            },
        )

    async def run_refresher(self, interval_s: float = 1.0) -> None:
        """Background task: keep every scope set in use fresh until cancelled."""
        while True:
            try:
                await self.refresh_due()
            except Exception:  # a refresher that dies silently is worse than a logged error
                log.exception("refresher tick failed", extra={"event": "refresh_error"})
            await asyncio.sleep(interval_s)

    async def prefetch(self, wanted: Iterable[tuple[tuple[str, ...], str]]) -> list[ProxyError]:
        """Mint (or load from the shared tier) the given scope sets before traffic arrives."""
        self._pinned = frozenset(wanted)
        keys = {self.key_for(scopes, audience) for scopes, audience in self._pinned}
        for key in keys:
            self._last_used[key] = self._clock()
        results = await asyncio.gather(*(self._await_flight(k, None) for k in keys), return_exceptions=True)
        errors = [r for r in results if isinstance(r, ProxyError)]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ProxyError):
                raise result
        return errors

    def drop(self, key: CacheKey | None, digest: str | None) -> None:
        """Another replica (or ``flush``) invalidated one token, or everything.

        A per-key drop names the digest of the token that was purged, and only that token
        goes: the copy here may already be a newer one (minted after the purge), and a
        forged message that does not know the digest of what we hold drops nothing.
        """
        if key is None:
            self.memory.drop(None)
            return
        held = self.memory.peek(key)
        if held is not None and held.digest == digest:  # a per-key drop without a digest is malformed
            self.memory.drop(key)

    def usable_count(self) -> int:
        """How many scope sets have a token that can be sent now (readiness without prefetch)."""
        return sum(1 for key in self.memory.keys() if self._usable_memory(key, None) is not None)

    def has_usable(self, scopes: tuple[str, ...], audience: str) -> bool:
        return self._usable_memory(self.key_for(scopes, audience), None) is not None

    async def close(self) -> None:
        for flight in list(self._flights.values()):
            flight.cancel()
        await asyncio.gather(*self._flights.values(), return_exceptions=True)
        await self.memory.close()
