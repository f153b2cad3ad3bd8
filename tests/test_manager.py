"""Token life cycle: freshness, single flight, refresh, purge — real source, real emulator, fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from proxy.emulator.app import EmulatorServer
from proxy.errors import CredentialsRejected, TokenUnavailable
from proxy.metrics import Metrics
from proxy.settings import AuthSettings, RefreshSettings
from proxy.tokens.credentials import CredentialProvider
from proxy.tokens.manager import TokenManager
from proxy.tokens.model import Token
from proxy.tokens.source import TokenSource
from tests.helpers import FakeClock, eventually
from tests.proxy_fixtures import emulator_stats, set_faults
from tests.token_layer import make_manager

DECISIONS = ("decisions:read",)
AUD = "partner/v1"


def token(issued: float, lifetime: float) -> Token:
    return Token("x", issued, issued + lifetime, DECISIONS, AUD)


@pytest.mark.parametrize(
    ("lifetime", "due_after"),
    [(3600, 3240), (300, 240), (60, 30)],  # at_fraction; min_margin_s; never before half the lifetime
)
async def test_refresh_point_follows_fraction_margin_and_floor(
    emulator: EmulatorServer, session: aiohttp.ClientSession, lifetime: float, due_after: float
) -> None:
    manager = make_manager(emulator, session, FakeClock())
    assert manager.refresh_at(token(1000.0, lifetime)) == pytest.approx(1000.0 + due_after)


async def test_fresh_token_is_reused_without_minting(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    manager = make_manager(emulator, session, clock)
    first = await manager.get(DECISIONS, AUD)
    clock.now += 3000
    assert (await manager.get(DECISIONS, AUD)).same_as(first)
    assert (await emulator_stats(session, emulator))["tokens_issued"] == 1


async def test_stale_token_is_served_while_a_refresh_runs_behind_it(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    manager = make_manager(emulator, session, clock)
    first = await manager.get(DECISIONS, AUD)
    clock.now += 3300  # past 90 % of 3600 s
    assert (await manager.get(DECISIONS, AUD)).same_as(first)  # no waiting on the endpoint
    await eventually(lambda: manager.memory.peek(manager.key_for(DECISIONS, AUD)) is not first, within=2)
    assert not (await manager.get(DECISIONS, AUD)).same_as(first)
    assert (await emulator_stats(session, emulator))["tokens_issued"] == 2


async def test_expired_token_is_never_returned(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    manager = make_manager(emulator, session, clock)
    first = await manager.get(DECISIONS, AUD)
    clock.now = first.expires_at - 1  # inside the send margin
    assert not (await manager.get(DECISIONS, AUD)).same_as(first)


async def test_expired_token_is_not_served_even_when_the_endpoint_is_down(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    manager = make_manager(emulator, session, clock)
    first = await manager.get(DECISIONS, AUD)
    await set_faults(session, emulator, token_status=503, token_count=50)
    clock.now = first.expires_at + 1
    with pytest.raises(TokenUnavailable):
        await manager.get(DECISIONS, AUD)


async def test_a_request_joining_a_long_failing_flight_never_gets_an_expired_fallback(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    """The fallback is judged when the flight returns it, not when the flight chose it."""
    clock = FakeClock()
    manager = make_manager(emulator, session, clock)
    first = await manager.get(DECISIONS, AUD)
    clock.now = first.expires_at - 6  # stale but still usable (the send margin is 5 s)
    await set_faults(session, emulator, token_latency_ms=500, token_status=503, token_count=50)
    assert (await manager.get(DECISIONS, AUD)).same_as(first)  # starts a refresh with fallback=first
    await asyncio.sleep(0.1)
    clock.now = first.expires_at + 1  # expired while the refresh is on the wire; a request joins it
    with pytest.raises(TokenUnavailable):
        await manager.get(DECISIONS, AUD)


async def test_a_token_that_ran_out_during_a_slow_mint_is_not_handed_out(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    """get() and replace() check the token they return at return time, whatever the flight did."""
    clock = FakeClock()
    manager = make_manager(emulator, session, clock)
    rejected = await manager.get(DECISIONS, AUD)
    await set_faults(session, emulator, token_latency_ms=300)
    replacing = asyncio.create_task(manager.replace(manager.key_for(DECISIONS, AUD), rejected))
    await asyncio.sleep(0.1)
    clock.now += 3600  # the token on the wire (stamped at the POST) is spent before it lands
    with pytest.raises(TokenUnavailable):
        await replacing
    cold = asyncio.create_task(manager.get(("accounts:read",), AUD))
    await asyncio.sleep(0.1)
    clock.now += 3600
    with pytest.raises(TokenUnavailable):
        await cold


async def test_stale_token_survives_a_failed_refresh(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    manager = make_manager(emulator, session, clock, idle_s=7200)
    first = await manager.get(DECISIONS, AUD)
    await set_faults(session, emulator, token_status=503, token_count=50)
    clock.now += 3300
    assert await manager.refresh_due() == 1
    await asyncio.sleep(0.2)
    assert (await manager.get(DECISIONS, AUD)).same_as(first)


async def test_a_failed_refresh_that_kept_the_old_token_is_counted_as_an_error(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    metrics = Metrics()
    manager = make_manager(emulator, session, clock, metrics, idle_s=7200)
    first = await manager.get(DECISIONS, AUD)
    await set_faults(session, emulator, token_status=503, token_count=50)
    clock.now += 3300
    assert await manager.refresh_due() == 1
    await asyncio.sleep(0.2)
    assert manager.memory.peek(manager.key_for(DECISIONS, AUD)).same_as(first)  # nothing was refreshed
    refreshes = metrics.registry.get_sample_value
    assert refreshes("ccp_token_refreshes_total", {"result": "error"}) == 1
    assert not refreshes("ccp_token_refreshes_total", {"result": "ok"})


async def test_refresher_renews_used_scope_sets_and_forgets_idle_ones(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    manager = make_manager(emulator, session, clock, idle_s=600)
    await manager.get(DECISIONS, AUD)
    clock.now += 3300  # stale, and used 3300 s ago: idle
    assert await manager.refresh_due() == 0
    await manager.get(DECISIONS, AUD)  # used again (starts its own refresh)
    await asyncio.sleep(0.2)
    assert (await emulator_stats(session, emulator))["tokens_issued"] == 2


async def test_concurrent_cold_gets_share_one_mint(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    manager = make_manager(emulator, session, FakeClock())
    tokens = await asyncio.gather(*(manager.get(DECISIONS, AUD) for _ in range(100)))
    assert all(t.same_as(tokens[0]) for t in tokens)
    assert (await emulator_stats(session, emulator))["tokens_issued"] == 1


async def test_replace_purges_only_the_rejected_token_and_mints_once(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    manager = make_manager(emulator, session, FakeClock())
    rejected = await manager.get(DECISIONS, AUD)
    key = manager.key_for(DECISIONS, AUD)
    replacements = await asyncio.gather(*(manager.replace(key, rejected) for _ in range(20)))
    assert all(t.same_as(replacements[0]) and not t.same_as(rejected) for t in replacements)
    # A late 401 for the old token must not purge the new one.
    assert (await manager.replace(key, rejected)).same_as(replacements[0])
    assert (await emulator_stats(session, emulator))["tokens_issued"] == 2


async def test_a_cancelled_waiter_does_not_cancel_the_mint_for_others(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    manager = make_manager(emulator, session, FakeClock())
    await set_faults(session, emulator, token_latency_ms=300)
    impatient = asyncio.create_task(manager.get(DECISIONS, AUD))
    patient = asyncio.create_task(manager.get(DECISIONS, AUD))
    await asyncio.sleep(0.05)
    impatient.cancel()
    assert (await patient).value
    assert (await emulator_stats(session, emulator))["tokens_issued"] == 1


async def test_rotated_credentials_use_a_new_cache_key(
    emulator: EmulatorServer,
    session: aiohttp.ClientSession,
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("demo-secret\n")
    async with session.post(
        emulator.url + "/_emulator/clients/cc_client_demo/secrets", json={"secret": "second-secret"}
    ) as resp:
        assert resp.status == 201
    auth = AuthSettings(
        issuer=emulator.url, client_id="cc_client_demo", client_secret_file=str(secret), verify=False
    )
    creds = CredentialProvider(auth.client_id, secret_file=str(secret))
    clock = FakeClock()
    metrics = Metrics()
    manager = TokenManager(
        TokenSource(auth, creds, session, clock=clock, metrics=metrics),
        creds,
        refresh=RefreshSettings(),
        clock=clock,
        metrics=metrics,
    )
    old_key = manager.key_for(DECISIONS, AUD)
    await manager.get(DECISIONS, AUD)
    secret.write_text("second-secret\n")
    assert creds.reload()
    assert manager.key_for(DECISIONS, AUD) != old_key
    await manager.get(DECISIONS, AUD)
    assert (await emulator_stats(session, emulator))["tokens_issued"] == 2


def rotate_to_an_unregistered_secret(
    emulator: EmulatorServer, session: aiohttp.ClientSession, clock: FakeClock, secret: Path, metrics: Metrics
) -> tuple[TokenManager, CredentialProvider]:
    """A manager whose secret file starts with the demo secret (the test then rotates it)."""
    secret.write_text("demo-secret")
    auth = AuthSettings(
        issuer=emulator.url, client_id="cc_client_demo", client_secret_file=str(secret), verify=False
    )
    creds = CredentialProvider(auth.client_id, secret_file=str(secret))
    source = TokenSource(auth, creds, session, clock=clock, metrics=metrics)
    manager = TokenManager(source, creds, refresh=RefreshSettings(jitter_s=0.0), clock=clock, metrics=metrics)
    return manager, creds


async def test_after_a_rotation_to_a_refused_secret_the_previous_secrets_token_is_served(
    emulator: EmulatorServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Until it expires or the API refuses it; a refresh that could only serve it refreshed nothing."""
    clock, metrics = FakeClock(), Metrics()
    manager, creds = rotate_to_an_unregistered_secret(emulator, session, clock, tmp_path / "s", metrics)
    old = await manager.get(DECISIONS, AUD)
    (tmp_path / "s").write_text("not-yet-registered-secret")
    assert creds.reload()
    clock.now += 60
    assert (await manager.get(DECISIONS, AUD)).same_as(old)
    with pytest.raises(CredentialsRejected):
        await manager.get(("accounts:read",), AUD)  # no earlier token for this scope set

    clock.now += 60
    assert await manager.refresh_due() == 2  # the new keys have no token of their own
    await asyncio.sleep(0.2)
    refreshes = metrics.registry.get_sample_value
    assert refreshes("ccp_token_refreshes_total", {"result": "error"}) == 2
    assert not refreshes("ccp_token_refreshes_total", {"result": "ok"})

    with pytest.raises(CredentialsRejected):  # the API refused it (a revoke-all): dropped, not re-served
        await manager.replace(manager.key_for(DECISIONS, AUD), old)
    with pytest.raises(CredentialsRejected):
        await manager.get(DECISIONS, AUD)
    clock.now = old.expires_at  # and it would not have outlived its expiry either
    with pytest.raises(CredentialsRejected):
        await manager.get(DECISIONS, AUD)


async def test_prefetched_scope_sets_are_kept_warm_even_when_idle(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    manager = make_manager(emulator, session, clock, idle_s=600)
    assert await manager.prefetch([(DECISIONS, AUD)]) == []
    clock.now += 3300  # stale, and nobody used it for far longer than idle_s
    assert await manager.refresh_due() == 1
    await asyncio.sleep(0.2)
    assert (await emulator_stats(session, emulator))["tokens_issued"] == 2
    assert manager.has_usable(DECISIONS, AUD)


async def test_keys_of_a_rotated_out_secret_are_not_refreshed(
    emulator: EmulatorServer,
    session: aiohttp.ClientSession,
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("demo-secret")
    async with session.post(
        emulator.url + "/_emulator/clients/cc_client_demo/secrets", json={"secret": "second-secret"}
    ) as resp:
        assert resp.status == 201
    auth = AuthSettings(
        issuer=emulator.url, client_id="cc_client_demo", client_secret_file=str(secret), verify=False
    )
    creds = CredentialProvider(auth.client_id, secret_file=str(secret))
    clock = FakeClock()
    metrics = Metrics()
    manager = TokenManager(
        TokenSource(auth, creds, session, clock=clock, metrics=metrics),
        creds,
        refresh=RefreshSettings(jitter_s=0.0),
        clock=clock,
        metrics=metrics,
    )
    await manager.get(DECISIONS, AUD)
    secret.write_text("second-secret")
    assert creds.reload()
    clock.now += 3300  # the old-secret key is stale but will never be asked for again
    assert await manager.refresh_due() == 0


async def test_ttl_gauge_has_one_series_per_scope_set_and_audience(
    emulator: EmulatorServer, session: aiohttp.ClientSession
) -> None:
    """Same scopes, two audiences: two tokens, so two series; one would let the fresher
    token hide the other running out (the near-expiry alert reads this gauge)."""
    clock = FakeClock()
    metrics = Metrics()
    manager = make_manager(emulator, session, clock, metrics)
    await manager.get(DECISIONS, AUD)
    clock.now += 600
    await manager.get(DECISIONS, "internal/v1")
    assert await manager.refresh_due() == 0  # neither is due yet; the tick re-reads both TTLs
    gauge = metrics.registry.get_sample_value
    left = {
        aud: gauge("ccp_token_ttl_seconds", {"scopes": "decisions:read", "audience": aud})
        for aud in (AUD, "internal/v1")
    }
    assert left["internal/v1"] is not None and left[AUD] is not None
    assert left["internal/v1"] - left[AUD] == pytest.approx(600, abs=2)
