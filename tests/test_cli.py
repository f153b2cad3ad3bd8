"""The ``credicorp-proxy`` command as a user runs it: real subprocesses, real ports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy import __version__
from proxy.emulator.app import EmulatorServer
from tests.helpers import cli
from tests.proxy_fixtures import StartProxy, base_config, merge
from tests.redis_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"credicorp-proxy {__version__}"


def test_check_config_passes_on_the_shipped_route_table() -> None:
    result = cli("check-config", "-c", "config/credicorp-partner-v1.yaml")
    assert result.returncode == 0, result.stderr
    assert "decisions:read" in result.stdout and "Warnings: none" in result.stdout
    assert "must be set where the proxy runs: CC_CLIENT_ID" in result.stdout


def test_check_config_strict_requires_what_run_requires() -> None:
    result = cli("check-config", "--strict", "-c", "config/credicorp-partner-v1.yaml")
    assert result.returncode == 2
    assert "auth.client_id: environment variable CC_CLIENT_ID is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_lists_every_problem_with_its_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "upstream: {url: 'http://api.example.com/path'}\n"
        "auth: {issuer: https://sso.credicorp.co.uk, client_id: cc_client_x, client_secret: s,"
        " method: nope}\n"
        "listen: 'not-an-address'\n"
        "routes:\n"
        "  - {methods: [GET], path: /partner/v1/decisions/**, scopes: [decisions:read, payment:write]}\n"
        "  - {methods: [GET], path: /partner/v1/payments/**, scopes: [payments:write]}\n"
    )
    result = cli("check-config", "-c", str(bad))
    assert result.returncode == 2
    for key_path in ("upstream.url", "auth.method", "listen", "routes[0].scopes[1]", "routes[1]"):
        assert key_path in result.stderr, (key_path, result.stderr)
    assert 'unknown scope "payment:write"' in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_a_clear_error() -> None:
    result = cli("check-config", "-c", "/nonexistent/config.yaml")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "/nonexistent/config.yaml" in result.stderr


@pytest.mark.parametrize(
    ("method", "target", "code", "expect"),
    [
        ("GET", "/partner/v1/decisions/dec_1?x=/partner/v1/payments", 0, "decisions:read"),
        ("DELETE", "/partner/v1/decisions/dec_1", 1, "route_not_allowed"),
        ("GET", "/partner/v1/decisions/%2e%2e/payments", 2, "bad_request"),
    ],
)
def test_explain_names_the_route_scopes_or_the_reason(
    method: str, target: str, code: int, expect: str
) -> None:
    result = cli("explain", "-c", "config/demo.yaml", method, target)
    assert result.returncode == code, result.stdout + result.stderr
    assert expect in result.stdout


async def _wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


async def test_demo_serves_its_curl_lines_and_stops_cleanly_on_ctrl_c() -> None:
    port, admin, emu = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "demo",
            "--port",
            str(port),
            "--admin-port",
            str(admin),
            "--emulator-port",
            str(emu),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        await _wait_ready(f"http://127.0.0.1:{admin}/readyz", proc)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/partner/v1/decisions/dec_demo_001") as resp:
                assert resp.status == 200
            body = {"company_number": "09876543", "amount": 25000, "term_months": 12}
            async with http.post(base + "/partner/v1/applications", json=body) as resp:
                assert resp.status == 201
            async with http.delete(base + "/partner/v1/applications/app_demo_001") as resp:
                assert resp.status == 403
                assert resp.headers["X-Credicorp-Proxy-Error"] == "route_not_allowed"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"curl -s {base}/partner/v1/decisions/dec_demo_001" in out
    assert "demo-secret" not in err  # the demo's own secret never reaches the logs


async def test_run_from_environment_alone(make_emulator) -> None:  # type: ignore[no-untyped-def]
    emulator = await make_emulator()
    port, admin = free_port(), free_port()
    env = {
        **os.environ,
        "CCP_UPSTREAM_URL": emulator.url,
        "CCP_AUTH_ISSUER": emulator.url,
        "CCP_AUTH_CLIENT_ID": "cc_client_demo",
        "CCP_AUTH_CLIENT_SECRET": "demo-secret",
        "CCP_LISTEN": f"127.0.0.1:{port}",
        "CCP_ADMIN_LISTEN": f"127.0.0.1:{admin}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await _wait_ready(f"http://127.0.0.1:{admin}/readyz", proc)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/partner/v1/accounts/acc_demo_001") as resp:
                assert resp.status == 200  # the built-in partner/v1 route table
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "demo-secret" not in err


def test_flush_against_an_unreachable_redis_fails_loudly(tmp_path: Path) -> None:
    """After a leaked secret an operator must never read "dropped" when nothing was dropped."""
    config = tmp_path / "flush.yaml"
    port = free_port()  # nothing listens here
    config.write_text(
        "auth: {issuer: 'http://127.0.0.1:9', client_id: cc_client_demo, client_secret: s3cr3t-value}\n"
        f"cache: {{url: 'redis://:hunter2-pass@127.0.0.1:{port}/0'}}\n"
        "routes: [{methods: [GET], path: /partner/v1/decisions/**, scopes: [decisions:read]}]\n"
    )
    result = cli("flush", "-c", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "flush failed: Redis at redis://:***@127.0.0.1:" in result.stderr
    assert "dropped" not in result.stdout
    assert "hunter2-pass" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["run", "flush", "check-config"])
def test_a_malformed_encryption_key_file_is_a_config_error_not_a_traceback(
    tmp_path: Path, command: str
) -> None:
    key_file = tmp_path / "cache-key"
    key_file.write_text("k1:this is not base64!!\n")
    config = tmp_path / "sealed.yaml"
    config.write_text(
        "auth: {issuer: 'http://127.0.0.1:9', client_id: cc_client_demo, client_secret: s3cr3t-value}\n"
        f"cache: {{url: 'redis://127.0.0.1:{free_port()}/0', encryption_key_file: '{key_file}'}}\n"
        "routes: [{methods: [GET], path: /partner/v1/decisions/**, scopes: [decisions:read]}]\n"
    )
    strict = ["--strict"] if command == "check-config" else []
    result = cli(command, *strict, "-c", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cache.encryption_key_file: {key_file}:1: not valid base64" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_ccp_config_names_the_file_when_c_is_not_given() -> None:
    result = cli("check-config", env={"CCP_CONFIG": "config/demo.yaml"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Config OK") and "127.0.0.1:8444" in result.stdout
    missing = cli("check-config", env={"CCP_CONFIG": "/nonexistent/ccp.yaml"})
    assert missing.returncode != 0 and "/nonexistent/ccp.yaml" in missing.stderr


def test_check_config_lists_only_real_references_and_explain_works_on_a_template(tmp_path: Path) -> None:
    """The shipped pod config names its secret file and ${CC_CLIENT_ID}: on a laptop, check-config
    lists what the pod must provide (not a ${VAR} in a comment) and explain still answers."""
    env = {k: v for k, v in os.environ.items() if k not in ("CC_CLIENT_ID", "REDIS_PASSWORD")}
    config = tmp_path / "template.yaml"
    config.write_text(
        "# a comment mentioning ${REDIS_PASSWORD} is not a reference\n"
        + (ROOT / "deploy/k8s/files/config.yaml").read_text()
    )
    checked = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "-c", str(config)],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.rstrip().endswith("must be set where the proxy runs: CC_CLIENT_ID")
    explained = subprocess.run(
        [sys.executable, "-m", "proxy", "explain", "-c", str(config), "GET", "/partner/v1/decisions/dec_1"],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert explained.returncode == 0, explained.stdout + explained.stderr
    assert "scopes:   decisions:read" in explained.stdout


@pytest.mark.parametrize("content", [None, b"\xff\xfe not utf-8"], ids=["missing", "not-utf-8"])
def test_check_config_on_an_unreadable_file_is_a_clear_error(tmp_path: Path, content: bytes | None) -> None:
    config = tmp_path / "c.yaml"
    if content is not None:
        config.write_bytes(content)
    result = cli("check-config", "-c", str(config))
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_the_emulator_command_takes_the_emulators_own_arguments() -> None:
    """The emulator sub-parser gets proxy/emulator/cli.py's arguments only when it is the command."""
    shown = cli("emulator", "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: credicorp-proxy emulator")
    assert "--token-ttl SECONDS" in shown.stdout
    refused = cli("emulator", "--client", "nosecret")
    assert refused.returncode == 2 and "argument --client: 'nosecret': expected ID:SECRET" in refused.stderr
    assert "--token-ttl" not in cli("--help").stdout  # the top level lists the command, not its arguments


async def test_the_emulator_command_serves_until_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "emulator", "--port", "0", "--client", "cc_cli:pw:decisions:read",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert first.startswith("Credicorp emulator listening on http://127.0.0.1:")
        url = first.rsplit(" ", 1)[1].strip()
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/.well-known/openid-configuration") as resp:
                assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
    assert proc.returncode == 0


async def _healthcheck(config: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "healthcheck", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, err.decode()


@pytest.mark.parametrize("admin", ["tcp", "unix"])
async def test_healthcheck_follows_the_configured_admin_listener(
    start_proxy: StartProxy, emulator: EmulatorServer, tmp_path: Path, admin: str
) -> None:
    """The image's HEALTHCHECK: it finds /healthz wherever the config puts the admin port."""
    listen = f"unix:{tmp_path / 'admin.sock'}" if admin == "unix" else f"127.0.0.1:{free_port()}"
    raw = merge(base_config(emulator.url), {"admin_listen": listen})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    code, err = await _healthcheck(config)  # nothing listens there yet
    assert code == 1 and "healthcheck" in err
    await start_proxy({"admin_listen": listen})
    assert (await _healthcheck(config))[0] == 0


async def test_a_refused_start_up_leaves_no_http_session_open(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    """An empty secret file stops the start; nothing it opened may be left for the GC to warn
    about ("Unclosed client session" lines in the log of a process that already failed)."""
    import gc

    from proxy.app import ProxyServer
    from proxy.config import parse_config
    from proxy.errors import ConfigError

    secret = tmp_path / "client-secret"
    secret.write_text("")
    raw = base_config(emulator.url)
    raw["auth"] = {k: v for k, v in raw["auth"].items() if k != "client_secret"}
    raw["auth"]["client_secret_file"] = str(secret)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match=r"client_secret_file: .* empty"):
            ProxyServer(parse_config(raw, {}, check_files=False))  # emptied after validation
        gc.collect()
    assert not [w for w in caught if "Unclosed" in str(w.message)], [str(w.message) for w in caught]
