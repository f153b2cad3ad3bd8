"""Helpers every test module may use; test modules never import from one another.

One of each: ``eventually`` for conditions that settle on their own, a virtual
clock for code that takes ``clock`` and ``sleep``, one reading of this
process's memory, and ``sample`` for a metric value read the public way.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import pytest

#: A condition: returns a truthy value when it holds, or an awaitable of one.
Check = Callable[[], object]


async def eventually(check: Check, within: float = 10.0, every: float = 0.02) -> None:
    """Poll ``check`` (sync, or async returning an awaitable) until it is truthy.

    Fails the test after ``within`` seconds: a bound on how long the system may take to
    settle, not a claim that it is that slow. ``every`` is only the polling interval.
    """
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(every)
