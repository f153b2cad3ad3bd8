"""How configuration problems are collected and named: the ``Report`` and key paths.

The one collector of a config's problems and warnings: the environment, each
key's check, the rules across keys and the route table all record into the
same ``Report``, so each problem names the key path an operator edits
(``auth.issuer``, ``routes[3].scopes[0]``), at most one problem is kept per
path, and every warning is masked the same way.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

from proxy.redact import mask_secrets_in
from proxy.wording import did_you_mean


class Report:
    """Collects problems (fatal) and warnings; at most one problem per key path, the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self._bad: set[str] = set()

    def problem(self, where: str, message: str) -> None:
        if where not in self._bad:
            self._bad.add(where)
            self.problems.append(f"{where}: {message}")

    def warn(self, where: str, message: str, *, sep: str = ": ") -> None:
        """Warnings are printed by check-config and logged at start: masked like problems.

        ``sep=" "`` makes the key path the subject of a sentence (``routes[5] is shadowed ...``).
        """
        self.warnings.append(mask_secrets_in(f"{where}{sep}{message}"))


def key_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def check_keys(raw: Mapping[str, Any], allowed: typing.Iterable[str], where: str, report: Report) -> None:
    """Unknown keys are problems: a typo (``scope:``) must not silently fall back to a default."""
    allowed = tuple(allowed)
    for key in raw:
        if key not in allowed:
            report.problem(key_path(where, str(key)), "unknown key" + did_you_mean(str(key), allowed))
