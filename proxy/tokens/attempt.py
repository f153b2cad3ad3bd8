"""One attempt at a fetch, shared by every caller that asks while it runs.

Discovery and the JWKS are fetched behind one attempt rather than one lock:
with a lock, callers queued behind a hung or failing fetch each fetched again
in turn (N waiters, N timeouts); sharing the attempt gives them all its
answer, success or failure, after one timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedAttempt(Generic[T]):
    """At most one ``fetch`` runs at a time; concurrent callers await that one."""

    def __init__(self) -> None:
        self._task: asyncio.Task[T] | None = None

    async def run(self, fetch: Callable[[], Awaitable[T]]) -> T:
        """The running attempt's result (or error), starting ``fetch`` if none runs.

        Shielded: a caller that goes away does not cancel the fetch the others wait on.
        """
        task = self._task
        if task is None or task.done():
            task = self._task = asyncio.ensure_future(fetch())
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)


def _retrieve(task: asyncio.Task[T]) -> None:
    """Mark the error as seen, so asyncio does not warn when every waiter went away."""
    if not task.cancelled():
        task.exception()
