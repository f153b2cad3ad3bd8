"""Hot secret rotation through a Kubernetes Secret volume, with no restart and no failed request.

The volume is laid out exactly as the kubelet does it: ``client-secret`` is a
symlink to ``..data/client-secret``, ``..data`` a symlink to a timestamped
directory, and an update writes a new directory, points ``..data_tmp`` at it
and renames that over ``..data`` (one atomic ``rename(2)``). The proxy runs
for real against the emulator, which follows Credicorp's two-secret roll.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from proxy.emulator.app import EmulatorServer
from proxy.emulator.state import secret_id
from tests.helpers import eventually, get
from tests.proxy_fixtures import StartProxy, emulator_stats, scrape
from tests.proxy_process import launch_proxy
from tests.secret_volume import (
    CLIENT_ID,
    SecretVolume,
    add_emulator_secret,
    revoke_emulator_secret,
    secret_file_config,
)

OLD_SECRET = "demo-secret"  # the emulator's provisioned secret
NEW_SECRET = "rotated-secret-2"
DECISION = "/partner/v1/decisions/dec_demo_001"
APPLICATION = "/partner/v1/applications/app_demo_001"
ACCOUNT = "/partner/v1/accounts/acc_demo_001"


async def minted_with(http: aiohttp.ClientSession, emulator: EmulatorServer, secret: str) -> int:
    stats = await emulator_stats(http, emulator)
    return int(stats["tokens_by_secret"].get(f"{CLIENT_ID}/{secret_id(secret)}", 0))


async def wait_for_generation(http: aiohttp.ClientSession, admin_url: str, generation: int) -> None:
    async def reached() -> bool:
        return (await scrape(http, admin_url)).value("ccp_credential_generation") == generation

    await eventually(reached)


async def test_symlink_swap_under_load_no_failed_request_and_new_mints_use_the_new_secret(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, tmp_path: Path
) -> None:
    await add_emulator_secret(http, emulator, NEW_SECRET)  # step 1 of the roll: both authenticate
    volume = SecretVolume.create(tmp_path / "credicorp", OLD_SECRET)
    proxy = await start_proxy(secret_file_config(volume))
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load(path: str) -> None:
        while not stop.is_set():
            statuses.append(await get(http, proxy.proxy_url + path))

    workers = [asyncio.create_task(load(p)) for p in (DECISION, DECISION, APPLICATION, APPLICATION)]
    try:
        await eventually(lambda: _at_least(statuses, 20))
        assert await minted_with(http, emulator, OLD_SECRET) == 2  # one token per scope set in use

        volume.swap(NEW_SECRET)  # step 2: deploy the new secret; the watcher sees the swap
        await wait_for_generation(http, proxy.admin_url, 2)

        async def new_secret_used() -> bool:
            return await minted_with(http, emulator, NEW_SECRET) >= 2  # both scope sets, new key

        await eventually(new_secret_used)
        await revoke_emulator_secret(http, emulator, OLD_SECRET)  # step 4: revoke the old secret
        seen = len(statuses)
        await eventually(lambda: _at_least(statuses, seen + 20))
        assert await get(http, proxy.proxy_url + ACCOUNT) == 200  # a brand-new mint after the revoke
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert len(statuses) > 40
    assert set(statuses) == {200}, f"failed requests during the rotation: {sorted(set(statuses))}"
    assert await minted_with(http, emulator, OLD_SECRET) == 2  # nothing minted with it after the swap
    assert await minted_with(http, emulator, NEW_SECRET) == 3
    m = await scrape(http, proxy)
    assert m.value("ccp_credential_generation") == 2
    assert m.value("ccp_token_mints_total", scopes="accounts:read", result="ok") == 1


async def _at_least(items: list[int], n: int) -> bool:
    return len(items) >= n


async def test_reload_credentials_is_immediate_and_unchanged_content_is_no_new_generation(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, tmp_path: Path
) -> None:
    """The SIGHUP path in-process: an edit stat() cannot see is picked up the moment it is asked for."""
    new = "demo-secreX"  # same length as demo-secret, so size and mtime can be kept
    await add_emulator_secret(http, emulator, new)
    volume = SecretVolume.create(tmp_path / "credicorp", OLD_SECRET)
    proxy = await start_proxy(secret_file_config(volume))
    assert await get(http, proxy.proxy_url + DECISION) == 200
    proxy.runtime.reload_credentials()  # same content: nothing changes
    assert (await scrape(http, proxy)).value("ccp_credential_generation") == 1
    volume.rewrite_in_place(new)
    assert proxy.runtime.credentials.check_file() is False  # invisible to the watcher's stat()
    proxy.runtime.reload_credentials()
    assert (await scrape(http, proxy)).value("ccp_credential_generation") == 2
    assert await get(http, proxy.proxy_url + DECISION) == 200
    assert await minted_with(http, emulator, new) == 1


async def test_after_invalid_client_the_token_endpoint_is_called_again_only_for_a_new_secret(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, tmp_path: Path
) -> None:
    volume = SecretVolume.create(tmp_path / "credicorp", "wrong-secret")
    proxy = await start_proxy(secret_file_config(volume))
    async with http.get(proxy.proxy_url + DECISION) as resp:
        assert resp.status == 503
        assert resp.headers["X-Credicorp-Proxy-Error"] == "credentials_rejected"
        assert int(resp.headers["Retry-After"]) >= 1
    calls = (await emulator_stats(http, emulator))["token_requests"]
    assert calls == 1
    for path in (DECISION, APPLICATION, ACCOUNT, DECISION):
        assert await get(http, proxy.proxy_url + path) == 503
    volume.swap("wrong-secret")  # a new file with the same secret is not a new secret
    proxy.runtime.reload_credentials()
    await asyncio.sleep(2.5)  # more than one watcher and refresher tick
    assert await get(http, proxy.proxy_url + DECISION) == 503
    assert (await emulator_stats(http, emulator))["token_requests"] == calls
    assert (await scrape(http, proxy)).value("ccp_credential_generation") == 1

    volume.swap(OLD_SECRET)  # the fix: the right secret arrives through the volume
    await wait_for_generation(http, proxy.admin_url, 2)
    assert await get(http, proxy.proxy_url + DECISION) == 200
    m = await scrape(http, proxy)
    assert m.value("ccp_credentials_rejected") == 0
    assert (await emulator_stats(http, emulator))["token_requests"] > calls


async def test_a_rotated_secret_not_registered_yet_keeps_the_previous_secrets_tokens_serving(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, tmp_path: Path
) -> None:
    """Steps 1 and 2 of the roll done in the wrong order: the tokens minted with the previous
    secret are still valid and keep their routes working; the pod still reports the rejected
    secret (not ready, alert gauge 1), and a scope set with no such token gets 503."""
    volume = SecretVolume.create(tmp_path / "credicorp", OLD_SECRET)
    proxy = await start_proxy(secret_file_config(volume))
    assert await get(http, proxy.proxy_url + DECISION) == 200
    volume.swap(NEW_SECRET)  # deployed before it was added at Credicorp
    proxy.runtime.reload_credentials()
    for _ in range(3):
        assert await get(http, proxy.proxy_url + DECISION) == 200
    async with http.get(proxy.proxy_url + ACCOUNT) as resp:
        assert resp.status == 503
        assert resp.headers["X-Credicorp-Proxy-Error"] == "credentials_rejected"
    async with http.get(proxy.admin_url + "/readyz") as resp:
        assert resp.status == 503 and (await resp.json())["reason"] == "credentials_rejected"
    m = await scrape(http, proxy)
    assert m.value("ccp_credentials_rejected") == 1
    assert await minted_with(http, emulator, OLD_SECRET) == 1  # the old secret is never used again


async def test_an_empty_or_missing_secret_file_keeps_the_previous_secret(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    volume = SecretVolume.create(tmp_path / "credicorp", OLD_SECRET)
    proxy = await start_proxy(secret_file_config(volume))
    assert await get(http, proxy.proxy_url + DECISION) == 200
    volume.swap("")  # a half-written update
    proxy.runtime.reload_credentials()
    m = await scrape(http, proxy)
    assert m.value("ccp_credential_reload_errors_total") == 1
    assert m.value("ccp_credential_generation") == 1
    assert await get(http, proxy.proxy_url + ACCOUNT) == 200  # new mint with the previous secret


async def test_prefetched_scope_sets_are_minted_again_with_a_rotated_secret(
    start_proxy: StartProxy, http: aiohttp.ClientSession, emulator: EmulatorServer, tmp_path: Path
) -> None:
    """Prefetch promises warm tokens for its scope sets; a new secret means new cache keys,
    so they are minted again with it instead of waiting for the first request to pay."""
    await add_emulator_secret(http, emulator, NEW_SECRET)
    volume = SecretVolume.create(tmp_path / "credicorp", OLD_SECRET)
    proxy = await start_proxy(secret_file_config(volume, refresh={"prefetch": "all"}))

    async def warm() -> bool:
        async with http.get(proxy.admin_url + "/readyz") as resp:
            return resp.status == 200 and await resp.json() == {"ready": True}

    await eventually(warm)
    assert await minted_with(http, emulator, OLD_SECRET) == 4
    volume.swap(NEW_SECRET)
    proxy.runtime.reload_credentials()
    assert not await warm()  # new keys: nothing cached under the new secret yet
    await eventually(warm)
    assert await minted_with(http, emulator, NEW_SECRET) == 4


async def test_sighup_rereads_the_secret_in_a_running_process(
    http: aiohttp.ClientSession, emulator: EmulatorServer, tmp_path: Path
) -> None:
    new = "demo-secreY"
    await add_emulator_secret(http, emulator, new)
    volume = SecretVolume.create(tmp_path / "credicorp", OLD_SECRET)
    async with launch_proxy(tmp_path, emulator, secret_file_config(volume)) as process:
        assert await get(http, process.proxy_url + DECISION) == 200
        volume.rewrite_in_place(new)  # the watcher's stat() cannot see this; SIGHUP must
        process.proc.send_signal(signal.SIGHUP)
        await wait_for_generation(http, process.admin_url, 2)
        assert await get(http, process.proxy_url + APPLICATION) == 200
        assert await minted_with(http, emulator, new) == 1
        process.proc.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    events = [line.get("event") for line in process.logs()]
    assert "sighup" in events and "credentials_reloaded" in events
