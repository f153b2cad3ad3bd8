"""proxy.config.cache_url: the one parser of cache.url, shared by validation and the Redis connection."""

from __future__ import annotations

import pytest

from proxy.config.cache_url import CacheUrl, parse_cache_url
from proxy.tokens.redis_connect import connect

PARSED = [
    ("memory://", CacheUrl("memory")),
    ("redis://redis", CacheUrl("redis", (("redis", None),))),
    ("REDIS://h:6379/0", CacheUrl("redis", (("h", 6379),), db=0)),
    (
        "rediss://us%3Aer:p%40ss@redis.internal:6380/2?ssl_ca_certs=/ca.pem",
        CacheUrl(
            "rediss", (("redis.internal", 6380),), "us:er", "p@ss", db=2, options="ssl_ca_certs=/ca.pem"
        ),
    ),
    (
        "unix://:pw@/run/redis.sock?db=1",
        CacheUrl("unix", (), None, "pw", socket_path="/run/redis.sock", options="db=1"),
    ),
    (
        "redis+sentinel://s1:26379,[::1]:26380/mymaster/1",
        CacheUrl("redis+sentinel", (("s1", 26379), ("::1", 26380)), db=1, service="mymaster"),
    ),
    (
        "redis+sentinel://u:p@s1:26379/main",
        CacheUrl("redis+sentinel", (("s1", 26379),), "u", "p", service="main"),
    ),
    ("rediss+cluster://n1:7000,n2:7001", CacheUrl("rediss+cluster", (("n1", 7000), ("n2", 7001)))),
]


@pytest.mark.parametrize(("url", "expected"), PARSED, ids=[u for u, _ in PARSED])
def test_each_form_is_split_into_its_parts(url: str, expected: CacheUrl) -> None:
    assert parse_cache_url(url) == expected


@pytest.mark.parametrize(
    ("url", "topology", "tls"),
    [
        ("memory://", "memory", False),
        ("unix:///run/redis.sock", "standalone", False),
        ("redis://h", "standalone", False),
        ("rediss://h", "standalone", True),
        ("redis+sentinel://h:1/s", "sentinel", False),
        ("redis+cluster://h:1", "cluster", False),
        ("rediss+cluster://h:1", "cluster", True),
    ],
)
def test_topology_and_tls_follow_the_scheme(url: str, topology: str, tls: bool) -> None:
    parsed = parse_cache_url(url)
    assert (parsed.topology, parsed.tls) == (topology, tls)


def test_the_password_is_not_in_the_repr() -> None:
    parsed = parse_cache_url("redis://user:hunter2@h:6379/0")
    assert parsed.password == "hunter2" and "hunter2" not in repr(parsed)


def test_a_fragment_is_no_part_of_the_sentinel_service_name() -> None:
    assert parse_cache_url("redis+sentinel://h:1/main#x").service == "main"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h:26379", 'redis+sentinel:// takes /service_name[/db] after the host, got ""'),
        ("redis+cluster://h", "redis+cluster:// needs host:port for every node"),
        (
            "memcached://u:pw@h",
            "expected memory://, unix:// or a redis, rediss, redis+sentinel, redis+cluster, "
            'rediss+cluster URL, got "memcached://u:***@h"',
        ),
    ],
)
def test_validation_and_the_connection_refuse_a_url_with_the_same_words(url: str, message: str) -> None:
    with pytest.raises(ValueError) as parsed:
        parse_cache_url(url)
    assert str(parsed.value) == message
    with pytest.raises(ValueError) as connecting:
        connect(url, 0.5)
    assert str(connecting.value) == f"cache.url: {message}"
