"""The token cache contracts and the process-memory implementation.

Every store (memory, Redis) implements ``TokenCache``; one conformance suite
(``tests/test_cache_contract.py``) runs against each so behaviour cannot drift
between them. The manager layers a memory cache in front of an optional shared
one and needs nothing more than ``TokenCache`` of it.

A store shared by replicas (Redis) is a ``SharedTokenCache``: it also carries
the invalidations between replicas and can be asked whether it answers. The
runtime starts it and ``flush`` pings it through this protocol, never through
the Redis class, so the seam between the product and the shared tier is typed
and checked (``mypy --strict`` runs in the test suite).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from proxy.tokens.model import CacheKey, Token

Clock = Callable[[], float]
#: Called with the key and the digest of the token to drop, or (None, None) for "drop everything".
InvalidationHandler = Callable[[CacheKey | None, str | None], None]


class TokenCache(Protocol):
    """Where tokens live between mints."""

    async def get(self, key: CacheKey) -> Token | None:
        """The stored, unexpired token for ``key``, or None."""

    async def put(self, key: CacheKey, token: Token) -> None:
        """Store ``token``; it expires from the store with the token."""

    async def purge_if_same(self, key: CacheKey, token: Token) -> bool:
        """Drop the entry only if it still holds ``token`` (the one upstream rejected)."""

    async def purge_all(self, client_id: str) -> int:
        """Drop every token of ``client_id``; returns how many were dropped."""

    def lease(self, key: CacheKey) -> AbstractAsyncContextManager[None]:
        """Held around a mint so only one holder mints ``key`` at a time."""

    async def close(self) -> None:
        """Release connections and background tasks."""


class SharedTokenCache(TokenCache, Protocol):
    """A ``TokenCache`` every replica reads; a purge on one must reach the memory tier of all."""

    async def start(self, on_invalidate: InvalidationHandler) -> None:
        """Deliver other replicas' invalidations to ``on_invalidate`` from now until ``close``.

        Waits briefly for the subscription, never for the store to come up: a shared
        tier that is down must not stop a replica from starting.
        """

    @property
    def subscribed(self) -> bool:
        """True while other replicas' invalidations are being received."""

    async def ping(self) -> bool:
        """True when the store answers now (for ``flush`` and diagnostics, not for readiness)."""

    async def purge_all(self, client_id: str) -> int:
        """Drop every token of ``client_id`` and tell every replica to drop its memory copies."""


class MemoryTokenCache:
    """Tokens in a dict of this process; leases are per-key asyncio locks."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._tokens: dict[CacheKey, Token] = {}
        self._locks: dict[CacheKey, asyncio.Lock] = {}

    def peek(self, key: CacheKey) -> Token | None:
        """Synchronous ``get`` for the hot path: no await, no task switch."""
        token = self._tokens.get(key)
        if token is not None and token.is_expired(self._clock()):
            del self._tokens[key]
            return None
        return token

    async def get(self, key: CacheKey) -> Token | None:
        return self.peek(key)

    async def put(self, key: CacheKey, token: Token) -> None:
        self._tokens[key] = token

    def drop(self, key: CacheKey | None) -> None:
        """Forget one key's token, or all of them (an invalidation from elsewhere)."""
        if key is None:
            self._tokens.clear()
        else:
            self._tokens.pop(key, None)

    async def purge_if_same(self, key: CacheKey, token: Token) -> bool:
        if token.same_as(self._tokens.get(key)):
            del self._tokens[key]
            return True
        return False

    async def purge_all(self, client_id: str) -> int:
        doomed = [k for k in self._tokens if k.client_id == client_id]
        for key in doomed:
            del self._tokens[key]
        return len(doomed)

    def keys(self) -> list[CacheKey]:
        return list(self._tokens)

    @asynccontextmanager
    async def lease(self, key: CacheKey) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            yield

    async def close(self) -> None:
        self._tokens.clear()
