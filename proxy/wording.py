"""How a problem message words a value: quoted as the YAML shows it, with a did-you-mean.

A leaf module (standard library only) because both the configuration and the
run-time rules it shares with the token layer (``proxy.urls``,
``proxy.tokens.discovery_trust``) write such messages, and the token layer
must not import the config loader to do it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean", "show"]


def show(value: object) -> str:
    """A value as it appears in a problem message: strings double-quoted, like the YAML."""
    return '"' + value.replace('"', '\\"') + '"' if isinstance(value, str) else repr(value)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A difflib suggestion for a misspelt key, method or scope ("" when nothing is close)."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
