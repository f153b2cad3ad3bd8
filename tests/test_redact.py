"""Credentials never leave in output: the mask function, the real CLI, config errors, reprs and Redis logs.

A Redis password can sit in the cache URL's userinfo, in ``?password=`` or
``sentinel_password=``, in a multi-host Sentinel or Cluster URL or a
``unix://`` one. check-config output, a failed flush and config errors get
pasted into tickets, so the tests run the real ``credicorp-proxy`` commands
with a password in every form and look for it everywhere they print.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.logs import JsonFormatter
from proxy.metrics import Metrics
from proxy.redact import mask_secrets_in, mask_url
from proxy.settings import CacheSettings
from proxy.tokens.model import CacheKey, Credentials
from proxy.tokens.redis_cache import RedisTokenCache
from tests.helpers import cli
from tests.proxy_fixtures import base_config
from tests.redis_fixtures import HOST, MakeRedis, free_port

PW = "Hunter2-S3cr3t"

MASKED = [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://default:pw@h:6379/0", "redis://default:***@h:6379/0"),
    ("redis://tok3n@h:6379", "redis://***@h:6379"),  # a user alone may be a token
    ("redis://user:@h", "redis://***@h"),  # ... and so may one with an empty password
    ("redis://h:6379/0?password=pw&db=1", "redis://h:6379/0?password=***&db=1"),
    ("redis://h/0?db=1&PASSWORD=pw", "redis://h/0?db=1&PASSWORD=***"),
    ("redis://h/0?pass%77ord=pw", "redis://h/0?pass%77ord=***"),  # the client decodes option names
    ("rediss://u:pw@h:6380/0?ssl_cert_reqs=required", "rediss://u:***@h:6380/0?ssl_cert_reqs=required"),
    (
        "redis+sentinel://:pw@h1:26379,h2:26379/mymaster/0?sentinel_password=pw2",
        "redis+sentinel://:***@h1:26379,h2:26379/mymaster/0?sentinel_password=***",
    ),
    ("redis+cluster://u:pw@h1:7000,h2:7001", "redis+cluster://u:***@h1:7000,h2:7001"),
    ("rediss+cluster://tok3n@h1:7000,[::1]:7001", "rediss+cluster://***@h1:7000,[::1]:7001"),
    ("unix://:pw@/run/redis.sock?password=pw&db=0", "unix://:***@/run/redis.sock?password=***&db=0"),
    ("unix://u:pw@/run/redis.sock", "unix://u:***@/run/redis.sock"),
    ("redis://:p@ss@h", "redis://:***@h"),  # an unencoded "@" in the password
    ("redis://:pa/ss@h", "redis://:***@h"),  # an unencoded "/" in the password
    ("redis://h/0?client_name=a@b&password=pw", "redis://***@b&password=***"),  # "@" in a query
    ("redis://h:6379/0?password=s3cr@tTAIL", "redis://h:6379/0?password=***"),  # "@" in a password option
    ("reddis://:pw@h", "reddis://:***@h"),  # a mistyped scheme is masked the same way
    ("redis:/:pw@h", "redis:***@h"),  # ... and a mistyped separator
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ("memory://", "memory://"),
    ("https://sso.credicorp.co.uk/realms/x", "https://sso.credicorp.co.uk/realms/x"),
    ("https://api.example/?access_token=pw&x=1", "https://api.example/?access_token=***&x=1"),
]


@pytest.mark.parametrize(("url", "masked"), MASKED, ids=[u for u, _ in MASKED])
def test_mask_url_hides_every_credential_form_and_keeps_the_rest(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert mask_url(masked) == masked  # idempotent: masking twice changes nothing


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ('got "reddis://:pw@h/0?password=pw2" here', 'got "reddis://:***@h/0?password=***" here'),
        (
            "Redis at redis://u:pw@h:1 and unix://:pw@/s.sock",
            "Redis at redis://u:***@h:1 and unix://:***@/s.sock",
        ),
        ("failed with password=pw, retry", "failed with password=***, retry"),
        ("sentinel_password = pw", "sentinel_password = ***"),
        ("no secret here: must not contain credentials (user:password@)", None),
        ("cache.key_prefix: expected [A-Za-z0-9_.:-]+", None),
    ],
)
def test_mask_secrets_in_masks_urls_and_pairs_inside_free_text(text: str, masked: str | None) -> None:
    assert mask_secrets_in(text) == (text if masked is None else masked)


# ------------------------------------------------------------------ the CLI
#: Every form a password takes in cache.url that the config accepts; {pw} is the secret.
CACHE_URL_FORMS = [
    "redis://:{pw}@127.0.0.1:{port}/0",
    "redis://default:{pw}@127.0.0.1:{port}/0",
    "redis://{pw}@127.0.0.1:{port}/0",
    "redis://127.0.0.1:{port}/0?password={pw}",
    "redis://127.0.0.1:{port}/0?username=default&password={pw}",
    "rediss://default:{pw}@127.0.0.1:{port}/0",
    "redis+sentinel://:{pw}@127.0.0.1:{port},127.0.0.1:{port2}/mymaster/0?sentinel_password={pw}",
    "redis+cluster://default:{pw}@127.0.0.1:{port},127.0.0.1:{port2}",
    "unix://:{pw}@/nonexistent/redis.sock?password={pw}",
]


def _config(tmp_path: Path, cache_url: str) -> Path:
    config = tmp_path / "ccp.yaml"
    config.write_text(
        "auth: {issuer: 'http://127.0.0.1:9', client_id: cc_client_demo, client_secret: demo-value}\n"
        f"cache: {{url: '{cache_url}', timeout_s: 0.2}}\n"
        "routes: [{methods: [GET], path: /partner/v1/decisions/**, scopes: [decisions:read]}]\n"
    )
    return config


def _form(form: str) -> str:
    return form.format(pw=PW, port=free_port(), port2=free_port())


def _assert_no_password(output: str) -> None:
    assert PW not in output
    assert PW.lower() not in output.lower()


@pytest.mark.parametrize("form", CACHE_URL_FORMS)
def test_check_config_and_a_failed_flush_never_print_the_redis_password(tmp_path: Path, form: str) -> None:
    config = _config(tmp_path, _form(form))
    for args in (["check-config"], ["check-config", "--strict"]):
        result = cli(*args, "-c", str(config))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "cache:" in result.stdout and "***" in result.stdout
        _assert_no_password(result.stdout + result.stderr)
    flushed = cli("flush", "-c", str(config))  # nothing listens on these ports / that socket
    assert flushed.returncode != 0, flushed.stdout + flushed.stderr
    assert "Traceback" not in flushed.stderr
    _assert_no_password(flushed.stdout + flushed.stderr)


def test_the_cache_url_from_the_environment_is_masked_too(tmp_path: Path) -> None:
    config = _config(tmp_path, "memory://")
    url = f"redis://127.0.0.1:{free_port()}/0?password={PW}"
    result = cli("check-config", "-c", str(config), env={"CCP_CACHE_URL": url})
    assert result.returncode == 0, result.stderr
    assert "password=***" in result.stdout
    _assert_no_password(result.stdout + result.stderr)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("reddis://:{pw}@127.0.0.1:6379/0", '"reddis://:***@127.0.0.1:6379/0"'),
        ("redis//:{pw}@127.0.0.1:6379/0", '"***@127.0.0.1:6379/0"'),  # no scheme: all of the userinfo
        ("rediss://:{pw}@127.0.0.1:6379/zero?password={pw}", 'got "/zero"'),  # only the bad path is quoted
        ("redis://:pa/{pw}@127.0.0.1:6379/0", "percent-encode"),  # would split the password
    ],
)
def test_a_mistyped_cache_url_is_refused_with_its_password_masked(
    tmp_path: Path, url: str, shown: str
) -> None:
    config = _config(tmp_path, url.format(pw=PW))
    result = cli("check-config", "-c", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cache.url: " in result.stderr and shown in result.stderr
    _assert_no_password(result.stdout + result.stderr)


def test_a_mistyped_upstream_or_issuer_url_is_masked_in_the_config_error() -> None:
    raw = base_config("http://127.0.0.1:9")
    raw["upstream"]["url"] = f"htps://u:{PW}@api.example"
    raw["auth"]["issuer"] = f"https://u:{PW}@sso.example:99x"
    with pytest.raises(ConfigError) as err:
        parse_config(raw, env={})
    assert "upstream.url: expected an http(s) URL" in str(err.value)
    assert "auth.issuer: not a valid URL" in str(err.value)
    _assert_no_password(str(err.value))


def test_a_yaml_error_does_not_quote_the_line_it_failed_on(tmp_path: Path) -> None:
    """PyYAML's message carries a snippet of the file: here the line with the password."""
    config = tmp_path / "broken.yaml"
    config.write_text(f"auth: {{client_secret: {PW}, client_id: x}}: oops\ncache: {{url: 'redis://:{PW}@h'\n")
    result = cli("check-config", "-c", str(config))
    assert result.returncode == 2
    assert "not valid YAML: line 1, column" in result.stderr
    _assert_no_password(result.stdout + result.stderr)


def test_the_settings_repr_masks_the_cache_url() -> None:
    raw = base_config("http://127.0.0.1:9")
    raw["cache"] = {"url": f"redis+sentinel://u:{PW}@h1:1,h2:2/m?sentinel_password={PW}"}
    settings = parse_config(raw, env={})
    assert settings.cache.url.count(PW) == 2  # the value itself is intact
    for text in (repr(settings), repr(settings.cache), str(settings)):
        _assert_no_password(text)
        assert "redis+sentinel://u:***@h1:1,h2:2/m?sentinel_password=***" in text


# --------------------------------------------------------------- Redis logs
async def test_redis_error_log_lines_never_carry_the_password(
    make_redis: MakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong password (AUTH refused) and a right one without permissions (NOPERM, whose
    server text is logged) on a real redis-server: every log record, as shipped, is clean."""
    server = make_redis(args=["--user", "limited", "on", f">{PW}", "+ping"])
    caplog.set_level(logging.DEBUG)
    key = CacheKey.create(Credentials.create("cc_client_demo", "s"), ("decisions:read",), "partner/v1")
    urls = [
        f"redis://limited:{PW}x@{HOST}:{server.port}/0",  # wrong password
        f"redis://{HOST}:{server.port}/0?username=limited&password={PW}x",
        f"redis://limited:{PW}@{HOST}:{server.port}/0",  # right password, no permission to GET
    ]
    for url in urls:
        cache = RedisTokenCache.from_settings(
            CacheSettings(url=url, timeout_s=0.5), clock=time.time, metrics=Metrics()
        )
        try:
            assert await cache.get(key) is None
        finally:
            await cache.close()
    events = {getattr(r, "event", None) for r in caplog.records}
    assert {"redis_unavailable", "redis_error"} <= events  # both kinds of failure were logged
    formatter = JsonFormatter()
    for record in caplog.records:
        _assert_no_password(formatter.format(record))
        _assert_no_password(repr(vars(record)))


@pytest.mark.parametrize("secret", [123456789, ["s3cret", "x"], {"v": 1}])
def test_an_inline_secret_that_is_not_a_string_is_refused_without_echoing_it(secret: object) -> None:
    """An all-digit secret left unquoted in YAML is an int: the error names the key, never the value."""
    raw = base_config("http://127.0.0.1:9")
    raw["auth"]["client_secret"] = secret
    with pytest.raises(ConfigError) as err:
        parse_config(raw, env={})
    text = " ".join(err.value.problems)
    assert "auth.client_secret: expected a string" in text and "(not shown)" in text
    assert "123456789" not in text and "s3cret" not in text
