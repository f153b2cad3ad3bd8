"""CredentialProvider: reading, reloading and watching the client secret file.

The Kubernetes case is laid out on disk exactly as the kubelet does it: the
visible file is a symlink through ``..data``, and an update swaps ``..data``
to a new timestamped directory with one atomic rename.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.tokens.credentials import CredentialProvider, read_secret_file
from proxy.tokens.model import Credentials

CLIENT_ID = "cc_client_demo"


def kubelet_write(root: Path, secret: str, version: str) -> Path:
    """Publish ``secret`` the way a Secret volume update does; returns the visible path."""
    data = root / f"..{version}"
    data.mkdir()
    (data / "client-secret").write_text(secret + "\n")
    staging = root / "..data_tmp"
    staging.symlink_to(data.name)
    staging.replace(root / "..data")  # rename(2): atomic, the path never disappears
    visible = root / "client-secret"
    if not visible.is_symlink():
        visible.symlink_to("..data/client-secret")
    return visible


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text("first-secret\n")
    return path


def test_reads_the_file_without_the_trailing_newline(secret_file: Path) -> None:
    metrics = Metrics()
    provider = CredentialProvider(CLIENT_ID, secret_file=str(secret_file), metrics=metrics)
    creds = provider.current()
    assert (creds.secret, creds.generation) == ("first-secret", 1)
    assert creds == Credentials.create(CLIENT_ID, "first-secret")
    assert metrics.registry.get_sample_value("ccp_credential_generation") == 1


def test_inline_secret_never_reloads() -> None:
    provider = CredentialProvider(CLIENT_ID, secret="inline")
    assert provider.reload() is False and provider.check_file() is False
    assert provider.current().secret == "inline"


def test_exactly_one_secret_source_is_required() -> None:
    with pytest.raises(ConfigError):
        CredentialProvider(CLIENT_ID)
    with pytest.raises(ConfigError):
        CredentialProvider(CLIENT_ID, secret="a", secret_file="/x")


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_unusable_file_at_start_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "secret"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"auth\.client_secret_file: .*empty"):
        CredentialProvider(CLIENT_ID, secret_file=str(path))
    with pytest.raises(ConfigError, match="client_secret_file"):
        CredentialProvider(CLIENT_ID, secret_file=str(tmp_path / "missing"))


def test_reload_reports_a_change_bumps_the_generation_and_tells_subscribers(secret_file: Path) -> None:
    metrics = Metrics()
    provider = CredentialProvider(CLIENT_ID, secret_file=str(secret_file), metrics=metrics)
    seen: list[Credentials] = []
    provider.on_change(seen.append)
    assert provider.reload() is False  # same content: no new generation
    secret_file.write_text("second-secret\n")
    assert provider.reload() is True
    assert provider.current().secret == "second-secret" and provider.current().generation == 2
    assert seen == [provider.current()]
    assert provider.current().fingerprint != Credentials.create(CLIENT_ID, "first-secret").fingerprint
    assert metrics.registry.get_sample_value("ccp_credential_generation") == 2


def test_unsubscribe_and_a_failing_subscriber_do_not_stop_the_others(secret_file: Path) -> None:
    provider = CredentialProvider(CLIENT_ID, secret_file=str(secret_file))
    seen: list[int] = []

    def broken(_: Credentials) -> None:
        raise RuntimeError("subscriber bug")

    provider.on_change(broken)
    unsubscribe = provider.on_change(lambda c: seen.append(-c.generation))
    provider.on_change(lambda c: seen.append(c.generation))
    secret_file.write_text("second")
    assert provider.reload() is True
    unsubscribe()
    secret_file.write_text("third")
    assert provider.reload() is True
    assert seen == [-2, 2, 3]


@pytest.mark.parametrize("breakage", ["empty", "missing", "binary"])
def test_an_unusable_file_keeps_the_previous_secret_and_counts_an_error(
    secret_file: Path, caplog: pytest.LogCaptureFixture, breakage: str
) -> None:
    metrics = Metrics()
    provider = CredentialProvider(CLIENT_ID, secret_file=str(secret_file), metrics=metrics)
    before = provider.current()
    if breakage == "empty":
        secret_file.write_text("\n")
    elif breakage == "missing":
        secret_file.unlink()
    else:
        secret_file.write_bytes(b"\xff\xfe\x00bad")
    assert provider.reload() is False
    assert provider.current() is before
    assert metrics.registry.get_sample_value("ccp_credential_reload_errors_total") == 1
    assert metrics.registry.get_sample_value("ccp_credential_generation") == 1
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "credentials_reload_failed"]
    assert record.levelno == logging.ERROR
    assert "first-secret" not in caplog.text


def test_kubernetes_symlink_swap_is_detected(tmp_path: Path) -> None:
    visible = kubelet_write(tmp_path, "first-secret", "2024_01_01")
    provider = CredentialProvider(CLIENT_ID, secret_file=str(visible))
    assert provider.check_file() is False
    kubelet_write(tmp_path, "second-secret", "2024_02_01")
    assert provider.check_file() is True
    assert provider.current().secret == "second-secret"
    assert provider.check_file() is False
    kubelet_write(tmp_path, "second-secret", "2024_03_01")  # re-published, same content
    assert provider.check_file() is False and provider.current().generation == 2


def test_same_size_edit_with_the_same_mtime_is_caught_by_the_content_check(secret_file: Path) -> None:
    provider = CredentialProvider(CLIENT_ID, secret_file=str(secret_file))
    st = secret_file.stat()
    with open(secret_file, "r+") as fh:  # in place: same inode, same size
        fh.write("FIRST")
    os.utime(secret_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert provider.check_file() is False  # stat() cannot see it ...
    assert provider.check_file(compare_content=True) is True  # ... the periodic content check does
    assert provider.current().secret == "FIRST-secret"


async def test_watch_picks_up_a_symlink_swap(tmp_path: Path) -> None:
    visible = kubelet_write(tmp_path, "first-secret", "v1")
    provider = CredentialProvider(CLIENT_ID, secret_file=str(visible))
    changed = asyncio.Event()
    provider.on_change(lambda _: changed.set())
    task = asyncio.create_task(provider.watch(interval_s=0.01))
    try:
        kubelet_write(tmp_path, "second-secret", "v2")
        await asyncio.wait_for(changed.wait(), timeout=5)
    finally:
        task.cancel()
    assert provider.current().secret == "second-secret"


async def test_watch_returns_at_once_without_a_file() -> None:
    await asyncio.wait_for(CredentialProvider(CLIENT_ID, secret="x").watch(0.01), timeout=1)


def test_secrets_stay_out_of_reprs_and_messages(secret_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    provider = CredentialProvider(CLIENT_ID, secret_file=str(secret_file))
    secret_file.write_text("second-secret")
    provider.reload()
    texts = [repr(provider), repr(provider.current()), str(provider.current()), caplog.text]
    texts += [repr(vars(r)) for r in caplog.records]
    assert not any("first-secret" in t or "second-secret" in t for t in texts)


def test_read_secret_file_strips_only_trailing_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_text(" lead\tand trail \r\n")
    assert read_secret_file(str(path)) == " lead\tand trail"
