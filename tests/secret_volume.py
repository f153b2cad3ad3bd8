"""A client secret as Kubernetes mounts it, and the emulator's side of a secret roll.

The volume is laid out exactly as the kubelet does it: ``client-secret`` is a
symlink to ``..data/client-secret``, ``..data`` a symlink to a timestamped
directory, and an update writes a new directory, points ``..data_tmp`` at it
and renames that over ``..data`` (one atomic ``rename(2)``).
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from proxy.emulator.app import EmulatorServer

#: The emulator's demo client, whose secrets these calls add and revoke.
CLIENT_ID = "cc_client_demo"


class SecretVolume:
    """A directory laid out like a mounted Kubernetes Secret with one key, ``client-secret``."""

    _versions = itertools.count(1)

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "client-secret"

    @classmethod
    def create(cls, root: Path, secret: str) -> SecretVolume:
        root.mkdir(parents=True, exist_ok=True)
        volume = cls(root)
        volume.swap(secret)
        volume.path.symlink_to("..data/client-secret")
        return volume

    def swap(self, secret: str) -> None:
        """Publish ``secret`` atomically and remove the previous version, as the kubelet does."""
        data = self.root / "..data"
        old = data.resolve() if data.is_symlink() else None
        version = self.root / f"..2025_01_01_00_00_{next(self._versions):02d}.000000001"
        version.mkdir()
        (version / "client-secret").write_text(secret + "\n")
        staging = self.root / "..data_tmp"
        staging.symlink_to(version.name)
        os.replace(staging, data)
        if old is not None:
            shutil.rmtree(old)

    def rewrite_in_place(self, secret: str) -> None:
        """Change the content behind the path keeping inode, size and mtime (what stat() sees).

        Only an explicit reload (SIGHUP) or the watcher's slow content check can notice.
        """
        target = self.path.resolve()
        before = target.stat()
        assert len(secret) + 1 == before.st_size, "same size keeps stat() unchanged"
        with open(target, "r+") as fh:
            fh.write(secret + "\n")
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))


def secret_file_config(volume: SecretVolume, **extra: Any) -> dict[str, Any]:
    """Config overrides that make the proxy read its secret from ``volume`` (and ``extra`` besides)."""
    return {"auth": {"client_secret": None, "client_secret_file": str(volume.path)}, **extra}


async def add_emulator_secret(http: aiohttp.ClientSession, emulator: EmulatorServer, secret: str) -> None:
    url = f"{emulator.url}/_emulator/clients/{CLIENT_ID}/secrets"
    async with http.post(url, json={"secret": secret}) as resp:
        assert resp.status == 201, await resp.text()


async def revoke_emulator_secret(http: aiohttp.ClientSession, emulator: EmulatorServer, secret: str) -> None:
    url = URL(f"{emulator.url}/_emulator/clients/{CLIENT_ID}/secrets/{quote(secret, safe='')}", encoded=True)
    async with http.delete(url) as resp:
        assert resp.status == 204, await resp.text()
