"""The client secret, kept current while the proxy runs.

A Kubernetes Secret volume updates a file by swapping the ``..data`` symlink to
a new directory, so the path never changes while the file behind it does.
``CredentialProvider`` notices that (and in-place edits), re-reads the secret,
bumps the generation and tells subscribers, so new mints use the new secret
without a restart while tokens minted with the old one stay in use until they
expire, as Credicorp's two-secret roll expects.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.tokens.model import Credentials

ChangeCallback = Callable[[Credentials], None]

#: Every this many watch ticks the content is compared even if stat() says
#: nothing changed (same-size in-place edits on filesystems with coarse mtimes).
_CONTENT_CHECK_EVERY = 15


class _FileSignature(NamedTuple):
    """What changes when the file behind the path changes (stat() follows symlinks)."""

    target: str
    inode: int
    mtime_ns: int
    size: int


def _signature(path: str) -> _FileSignature | None:
    try:
        st = os.stat(path)
        return _FileSignature(os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        return None


class SecretFileError(Exception):
    """The secret file could not be used; the message names the file, never its content."""


def read_secret_file(path: str) -> str:
    """The secret in ``path`` without the trailing newline an editor or ``echo`` leaves."""
    try:
        with open(path, encoding="utf-8") as fh:
            secret = fh.read(64 * 1024).rstrip()
    except UnicodeDecodeError:
        raise SecretFileError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise SecretFileError(f"{path}: {exc.strerror or type(exc).__name__}") from None
    if not secret:
        raise SecretFileError(f"{path}: empty")
    return secret


class CredentialProvider:
    """The current ``Credentials``; re-reads ``secret_file`` on ``reload()`` or ``watch()``."""

    def __init__(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        secret_file: str | None = None,
        metrics: Metrics | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if (secret is None) == (secret_file is None):
            raise ConfigError(["auth: set exactly one of client_secret and client_secret_file"])
        self._client_id = client_id
        self._file = secret_file
        self._metrics = metrics
        self._log = logger or logging.getLogger("proxy.tokens")
        self._callbacks: list[ChangeCallback] = []
        self._seen = _signature(secret_file) if secret_file else None
        self._current = Credentials.create(client_id, secret or self._initial_secret())
        self._publish_generation()

    def _initial_secret(self) -> str:
        assert self._file is not None
        try:
            return read_secret_file(self._file)
        except SecretFileError as exc:
            raise ConfigError([f"auth.client_secret_file: {exc}"]) from None

    @property
    def secret_file(self) -> str | None:
        return self._file

    def current(self) -> Credentials:
        """The credentials every new mint uses; cheap enough for the hot path."""
        return self._current

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call ``callback(new_credentials)`` after each change; returns an unsubscribe function."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    def reload(self) -> bool:
        """Re-read the secret file; True if the secret changed (and subscribers were told).

        An unreadable or empty file keeps the previous credentials: a half-written
        or briefly missing file must never take the proxy's credentials away.
        """
        if self._file is None:
            return False
        try:
            secret = read_secret_file(self._file)
        except SecretFileError as exc:
            self._reload_failed(str(exc))
            return False
        if hmac.compare_digest(secret.encode(), self._current.secret.encode()):
            return False
        self._apply(secret)
        return True

    def _apply(self, secret: str) -> None:
        old = self._current
        self._current = Credentials.create(self._client_id, secret, old.generation + 1)
        self._publish_generation()
        self._log.info(
            "client secret reloaded",
            extra={
                "event": "credentials_reloaded",
                "client_id": self._client_id,
                "generation": self._current.generation,
                "fingerprint": self._current.fingerprint,
                "previous_fingerprint": old.fingerprint,
            },
        )
        for callback in list(self._callbacks):
            self._notify(callback)

    def _notify(self, callback: ChangeCallback) -> None:
        try:
            callback(self._current)
        except Exception:  # one broken subscriber must not stop the others
            self._log.exception("credential change subscriber failed", extra={"event": "subscriber_error"})

    def _reload_failed(self, reason: str) -> None:
        counter = getattr(self._metrics, "credential_reload_errors", None)
        if counter is not None:
            counter.inc()
        self._log.error(
            "client secret file unusable; keeping the previous secret",
            extra={
                "event": "credentials_reload_failed",
                "reason": reason,
                "generation": self._current.generation,
            },
        )

    def _publish_generation(self) -> None:
        if self._metrics is not None:
            self._metrics.credential_generation.set(self._current.generation)

    def check_file(self, *, compare_content: bool = False) -> bool:
        """One watch tick: reload if the file behind the path changed; True if the secret changed."""
        if self._file is None:
            return False
        signature = _signature(self._file)
        if signature == self._seen and not compare_content:
            return False
        self._seen = signature
        return self.reload()

    async def watch(self, interval_s: float = 2.0) -> None:
        """Poll the secret file until cancelled (run it as a background task).

        Polling rather than inotify: a symlink swap in a Secret volume does not
        raise events on the watched path, and a stat() every few seconds is free.
        """
        if self._file is None:
            return
        tick = 0
        while True:
            await asyncio.sleep(interval_s)
            tick += 1
            self.check_file(compare_content=tick % _CONTENT_CHECK_EVERY == 0)
