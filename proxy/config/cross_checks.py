"""The rules across keys: one secret source, two distinct listeners, a Redis others cannot read unkeyed.

Each takes values that are already checked one by one (``proxy.config.keys``),
so it judges only how they go together, and records into the same ``Report``.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.config.cache_url import parse_cache_url
from proxy.config.report import Report
from proxy.settings import AuthSettings, CacheSettings, ListenAddress
from proxy.urls import is_loopback
from proxy.wording import show

__all__ = ["check_cache_trust", "check_listeners", "check_secret_source"]


def check_secret_source(auth: AuthSettings, report: Report) -> None:
    """Exactly one secret source; a client id that is not Credicorp's shape is only a warning."""
    both = "client_secret (CCP_AUTH_CLIENT_SECRET) and client_secret_file (CCP_AUTH_CLIENT_SECRET_FILE)"
    if auth.client_secret is not None and auth.client_secret_file is not None:
        report.problem("auth", f"set only one of {both}")
    elif auth.client_secret is None and auth.client_secret_file is None:
        report.problem("auth", f"set one of {both}")
    if auth.client_id.strip() and not auth.client_id.startswith("cc_client_"):
        report.warn(
            "auth.client_id", f"{show(auth.client_id)} does not start with cc_client_ (Credicorp ids do)"
        )


def check_listeners(
    listen: ListenAddress, admin_listen: ListenAddress, where: Mapping[str, str], report: Report
) -> None:
    """The two listeners may not take the same socket: a port (any host collides with a bind-all)
    or a unix path."""
    a, b = listen, admin_listen
    if a.unix_path or b.unix_path:
        clash = a.unix_path == b.unix_path
    else:
        clash = a.port == b.port != 0 and (a.host == b.host or bool({a.host, b.host} & {"0.0.0.0", "::"}))  # noqa: S104
    if clash:
        report.problem(where["admin_listen"], f"must differ from listen ({a})")


def check_cache_trust(cache: CacheSettings, auth: AuthSettings, report: Report) -> None:
    """Warn (loudly: check-config shows it, ``run`` logs it) about a Redis that others can reach unkeyed.

    Without ``cache.encryption_key_file`` a Redis value is a clear bearer token that no
    one vouches for: anyone who can read the server can take it, anyone who can write it
    can swap it. Each token read back is still checked (with ``auth.verify``, against the
    issuer's keys), but only a key makes Redis values unforgeable. A Redis on loopback or a
    unix socket is reachable only from this host, so it gets no warning. Not refused:
    a private network with Redis AUTH and TLS may be the operator's accepted risk.
    """
    if cache.encryption_key_file is not None:
        return
    exposed = [host for host in _cache_hosts(cache.url) if not _loopback(host)]
    if exposed:
        also = "" if auth.verify else "; with auth.verify off, whoever can write Redis chooses the token sent"
        report.warn(
            "cache.url",
            "tokens in Redis are stored in clear and not authenticated; set cache.encryption_key_file"
            f" (Redis {'hosts' if len(exposed) > 1 else 'host'} {', '.join(exposed)}"
            f" {'are' if len(exposed) > 1 else 'is'} not loopback{also})",
        )


def _cache_hosts(url: str) -> list[str]:
    """The host names of a ``redis*://`` URL (every node of a Sentinel or Cluster list); none
    for ``memory://``, ``unix://`` and a URL the value checks already refused."""
    try:
        return [host for host, _ in parse_cache_url(url).hosts]  # credentials never shown
    except ValueError:
        return []


def _loopback(host: str) -> bool:
    """The URL rule's loopback test, with a Redis host's name read in any case and with a final dot."""
    host = host.lower()
    return is_loopback(host) or host.rstrip(".") == "localhost"
