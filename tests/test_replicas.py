"""Several real proxies sharing one real Redis, against the real emulator.

What the token endpoint sees is the measure: one mint per scope set per
refresh period, whatever the number of replicas, through cold starts,
expiry, 401 purges, flushes, a lease holder dying mid-mint and Redis going
away and coming back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.app import ProxyServer
from proxy.config import parse_config
from proxy.emulator.app import EmulatorServer
from proxy.tokens.redis_cache import BREAKER_S, RedisTokenCache
from tests.at_rest import assert_sealed
from tests.helpers import eventually, sample
from tests.proxy_fixtures import base_config, emulator_stats, merge, set_faults
from tests.redis_fixtures import RedisServer, free_port

PATHS = {
    "decisions:read": "/partner/v1/decisions/dec_demo_001",
    "applications:read": "/partner/v1/applications/app_demo_001",
    "accounts:read": "/partner/v1/accounts/acc_demo_001",
}
SCOPES = tuple(PATHS)
ROOT = Path(__file__).resolve().parents[1]


class Fleet:
    """N proxies on one Redis and one emulator; requests, counters and Redis contents in one place."""

    def __init__(
        self, emulator: EmulatorServer, redis: RedisServer, http: aiohttp.ClientSession, tmp: Path
    ) -> None:
        self.emulator, self.redis, self.http, self.tmp = emulator, redis, http, tmp
        self.servers: list[ProxyServer] = []

    def config(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        cache = {"cache": {"url": self.redis.url, "timeout_s": 0.3}}
        return merge(merge(base_config(self.emulator.url), cache), overrides or {})

    async def start(self, n: int, overrides: dict[str, Any] | None = None) -> list[ProxyServer]:
        settings = parse_config(self.config(overrides), env={})
        started = [await ProxyServer(settings).start() for _ in range(n)]
        self.servers.extend(started)
        return started

    async def stop(self, server: ProxyServer) -> None:
        if server in self.servers:
            self.servers.remove(server)
            await server.stop()

    async def close(self) -> None:
        for server in list(self.servers):
            await self.stop(server)

    async def get(self, server: ProxyServer | str, scope: str) -> int:
        """One application request; a proxy-made error counts as a failure (status 599)."""
        base = server if isinstance(server, str) else server.proxy_url
        async with self.http.get(base + PATHS[scope]) as resp:
            await resp.read()
            return 599 if "X-Credicorp-Proxy-Error" in resp.headers else resp.status

    async def herd(
        self, count: int, servers: Sequence[ProxyServer] | None = None, scopes: Sequence[str] = SCOPES
    ) -> list[int]:
        """``count`` concurrent requests spread over every server and scope set."""
        targets = list(servers or self.servers)

        def target(n: int) -> tuple[ProxyServer, str]:
            return targets[n % len(targets)], scopes[(n // len(targets)) % len(scopes)]

        return list(await asyncio.gather(*(self.get(*target(n)) for n in range(count))))

    async def mints(self) -> dict[str, int]:
        return dict((await emulator_stats(self.http, self.emulator))["tokens_by_scope"])

    async def mint_times(self, scope: str) -> list[float]:
        entries = [e for e in await self._token_log() if e.get("scope") == scope and e.get("status") == 200]
        return sorted(e["time"] for e in entries)

    async def _token_log(self) -> list[dict[str, Any]]:
        async with self.http.get(self.emulator.url + "/_emulator/requests") as resp:
            return list((await resp.json())["token_requests"])

    async def emulator_settings(self, **settings: Any) -> None:
        async with self.http.post(self.emulator.url + "/_emulator/settings", json=settings) as resp:
            assert resp.status == 200, await resp.text()

    def raw_values(self) -> dict[bytes, bytes]:
        with self.redis.client() as client:
            return {name: client.get(name) or b"" for name in client.scan_iter("ccp:tok:*")}


@pytest.fixture
async def fleet(
    emulator: EmulatorServer, redis_server: RedisServer, http: aiohttp.ClientSession, tmp_path: Path
) -> AsyncIterator[Fleet]:
    built = Fleet(emulator, redis_server, http, tmp_path)
    yield built
    await built.close()


def all_ok(statuses: list[int]) -> bool:
    return bool(statuses) and all(status == 200 for status in statuses)


# ------------------------------------------------------------------- herds
@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
async def test_cold_herd_on_three_replicas_mints_once_per_scope_set(fleet: Fleet, sealed: bool) -> None:
    overrides: dict[str, Any] = {}
    key_file = fleet.tmp / "cache-key"
    if sealed:
        key_file.write_text(f"k1:{base64.b64encode(os.urandom(32)).decode()}\n")
        overrides = {"cache": {"encryption_key_file": str(key_file)}}
    await fleet.start(3, overrides)
    assert all_ok(await fleet.herd(300))
    assert await fleet.mints() == dict.fromkeys(SCOPES, 1)
    values = fleet.raw_values()
    assert len(values) == 3
    if sealed:  # no JWT, not even its header, and the metadata too is inside the seal
        payloads = [assert_sealed(value, slot, key_file) for slot, value in values.items()]
        assert sorted(" ".join(sorted(p["s"])) for p in payloads) == sorted(SCOPES)
    else:
        assert all(b"eyJ" in value for value in values.values())  # what deploy/README.md warns about


async def test_expiry_herd_mints_once_per_scope_set(fleet: Fleet) -> None:
    await fleet.emulator_settings(token_ttl=3)
    await fleet.start(3, {"refresh": {"idle_s": 0.5, "min_margin_s": 0, "jitter_s": 0}})
    assert all_ok(await fleet.herd(60))
    await asyncio.sleep(3.2)  # idle, so not refreshed: every copy everywhere has expired
    assert all_ok(await fleet.herd(300))
    assert await fleet.mints() == dict.fromkeys(SCOPES, 2)


async def test_refresh_is_done_by_one_replica_per_period(fleet: Fleet) -> None:
    await fleet.emulator_settings(token_ttl=4)
    servers = await fleet.start(3, {"refresh": {"at_fraction": 0.5, "min_margin_s": 0, "jitter_s": 0.3}})
    statuses: list[int] = []
    started = time.monotonic()
    while time.monotonic() - started < 12:
        statuses += await fleet.herd(9, servers)
        await asyncio.sleep(0.1)
    assert all_ok(statuses)
    for scope in SCOPES:
        times = await fleet.mint_times(scope)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert 4 <= len(times) <= 9, (scope, times)  # ~ every 2 s for 12 s: one mint per period
        assert min(gaps) > 1.0, (scope, gaps)  # never two mints for one refresh


# ----------------------------------------------------------- a dying holder
def write_config(fleet: Fleet, path: Path, **overrides: Any) -> Path:
    raw = fleet.config(overrides)
    raw["listen"], raw["admin_listen"] = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    path.write_text(yaml.safe_dump(raw))
    return path


async def wait_ready(http: aiohttp.ClientSession, url: str, within: float = 20) -> None:
    async def up() -> bool:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(url) as resp:
                return resp.status == 200
        return False

    await eventually(up, within=within, every=0.05)


async def test_a_lease_holder_killed_mid_mint_is_replaced_by_another_replica(fleet: Fleet) -> None:
    config = write_config(fleet, fleet.tmp / "holder.yaml")
    raw = yaml.safe_load(config.read_text())
    log = (fleet.tmp / "holder.log").open("wb")
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(config), cwd=ROOT, stdout=log, stderr=log
    )
    try:
        await wait_ready(fleet.http, f"http://{raw['admin_listen']}/healthz")
        (survivor,) = await fleet.start(1)
        await set_faults(fleet.http, fleet.emulator, token_latency_ms=2500)
        doomed = asyncio.create_task(fleet.get(f"http://{raw['listen']}", "decisions:read"))
        await eventually(lambda: fleet.emulator.state.in_flight == 1, within=5)  # the holder is minting
        waiting = asyncio.create_task(fleet.get(survivor, "decisions:read"))
        await asyncio.sleep(0.3)
        holder.send_signal(signal.SIGKILL)
        assert await waiting == 200  # after the dead holder's lease expired, the survivor minted
        with pytest.raises(aiohttp.ClientError):
            await doomed
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()
        log.close()
    stats = await emulator_stats(fleet.http, fleet.emulator)
    assert stats["tokens_by_scope"] == {"decisions:read": 1} and stats["cancelled"] >= 1
    minted = sample(survivor.runtime.metrics, "ccp_token_mints_total", scopes="decisions:read", result="ok")
    assert minted == 1


# ------------------------------------------------------------------- outages
async def test_redis_outage_keeps_serving_and_minting_then_recovers(fleet: Fleet) -> None:
    servers = await fleet.start(3)
    assert all_ok(await fleet.herd(60, scopes=["decisions:read"]))
    fleet.redis.kill()
    assert all_ok(await fleet.herd(90, scopes=["decisions:read"]))  # memory tier, no Redis needed
    assert all_ok(await fleet.herd(90, scopes=["accounts:read"]))  # a new scope set: minted per replica
    mints = await fleet.mints()
    assert mints["decisions:read"] == 1 and 1 <= mints["accounts:read"] <= 3
    for server in servers:
        async with fleet.http.get(server.admin_url + "/readyz") as resp:
            assert resp.status == 200
        assert sum(s.value for s in _redis_errors(server)) > 0
    fleet.redis.start()  # same port, empty
    await asyncio.sleep(BREAKER_S + 0.2)
    assert all_ok(await fleet.herd(300, scopes=["applications:read"]))
    assert (await fleet.mints())["applications:read"] == 1  # shared single flight is back
    await eventually(lambda: all(_shared(s).subscribed for s in servers), within=10)


def _shared(server: ProxyServer) -> RedisTokenCache:
    shared = server.runtime.shared
    assert isinstance(shared, RedisTokenCache)
    return shared


def _redis_errors(server: ProxyServer) -> list[Any]:
    return [
        s
        for m in server.runtime.metrics.redis_errors.collect()
        for s in m.samples
        if s.name.endswith("_total")
    ]


# -------------------------------------------------------------- invalidation
async def test_flush_drops_every_replicas_copies_and_the_next_herd_mints_once(fleet: Fleet) -> None:
    servers = await fleet.start(3)
    assert all_ok(await fleet.herd(90))
    flushed = set.union(*(held(s) for s in servers))
    assert len(flushed) == 3
    config = write_config(fleet, fleet.tmp / "flush.yaml")
    flush = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "flush",
        "-c",
        str(config),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await flush.communicate()
    assert flush.returncode == 0, err.decode()
    assert "dropped 3 cached token(s)" in out.decode()
    # Every replica drops its copies (its refresher may then re-fill recently used scope sets: one mint each).
    await eventually(lambda: all(not held(s) & flushed for s in servers), within=5)
    assert all_ok(await fleet.herd(300))
    assert await fleet.mints() == dict.fromkeys(SCOPES, 2)


def held(server: ProxyServer) -> set[str]:
    """Digests of the tokens in a replica's memory tier."""
    memory = server.runtime.tokens.memory
    return {token.digest for key in memory.keys() if (token := memory.peek(key)) is not None}


async def test_a_401_purge_on_one_replica_is_seen_by_every_replica(fleet: Fleet) -> None:
    servers = await fleet.start(3)
    assert all_ok(await fleet.herd(90))
    revoked = set.union(*(held(s) for s in servers))
    async with fleet.http.post(fleet.emulator.url + "/_emulator/revoke-all") as resp:
        assert resp.status == 200
    for scope in SCOPES:
        assert await fleet.get(servers[0], scope) == 200  # 401, purge, one new mint, retry
    assert await fleet.mints() == dict.fromkeys(SCOPES, 2)
    await eventually(lambda: all(not held(s) & revoked for s in servers[1:]), within=5)
    assert all_ok(await fleet.herd(300))
    stats = await emulator_stats(fleet.http, fleet.emulator)
    assert stats["tokens_by_scope"] == dict.fromkeys(SCOPES, 2)
    assert stats["api_by_status"].get("401") == len(SCOPES)  # the other replicas never sent a revoked token


async def test_a_rotated_secret_writes_a_new_slot_and_mints_once(fleet: Fleet) -> None:
    async with fleet.http.post(
        fleet.emulator.url + "/_emulator/clients/cc_client_demo/secrets", json={"secret": "second-secret"}
    ) as resp:
        assert resp.status == 201
    secret = fleet.tmp / "client-secret"
    secret.write_text("demo-secret\n")
    raw = fleet.config({"auth": {"client_secret_file": str(secret)}})
    del raw["auth"]["client_secret"]
    settings = parse_config(raw, env={})
    servers = [await ProxyServer(settings).start() for _ in range(3)]
    fleet.servers.extend(servers)
    assert all_ok(await fleet.herd(90, scopes=["decisions:read"]))
    old_slots = set(fleet.raw_values())
    secret.write_text("second-secret\n")
    for server in servers:
        server.runtime.reload_credentials()
    assert all_ok(await fleet.herd(90, scopes=["decisions:read"]))
    new_slots = set(fleet.raw_values()) - old_slots
    assert len(old_slots) == 1 and len(new_slots) == 1  # the old generation's slot is never read again
    stats = await emulator_stats(fleet.http, fleet.emulator)
    assert stats["tokens_by_scope"] == {"decisions:read": 2} and len(stats["tokens_by_secret"]) == 2
