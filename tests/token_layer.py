"""The real token layer (source and manager) against the emulator, on a clock the test moves."""

from __future__ import annotations

from dataclasses import replace

import aiohttp

from proxy.emulator.app import EmulatorServer
from proxy.metrics import Metrics
from proxy.settings import AuthSettings, RefreshSettings
from proxy.tokens.credentials import CredentialProvider
from proxy.tokens.manager import TokenManager
from proxy.tokens.source import TokenSource
from tests.helpers import FakeClock


def make_manager(
    emulator: EmulatorServer,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    metrics: Metrics | None = None,
    **refresh: float,
) -> TokenManager:
    """A manager over a real source for the emulator's demo client; ``refresh`` overrides the policy.

    Refresh jitter is off, so a test can say exactly when a refresh is due.
    """
    auth = AuthSettings(
        issuer=emulator.url, client_id="cc_client_demo", client_secret="demo-secret", verify=False
    )
    creds = CredentialProvider(auth.client_id, secret=auth.client_secret)
    metrics = metrics or Metrics()
    source = TokenSource(auth, creds, session, clock=clock, metrics=metrics)
    policy = replace(RefreshSettings(jitter_s=0.0), **refresh)
    return TokenManager(source, creds, refresh=policy, clock=clock, metrics=metrics)
