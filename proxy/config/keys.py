"""Every configuration key, declared once: its doc line, its check, whether it names a file, its env name.

mitmproxy's ``add_option(name, type, default, help)`` is the model: adding a
key means one ``Key`` here beside its field in ``proxy.settings``, and
everything else follows from the two: the env variable (``CCP_<SECTION>_<KEY>``),
coercion to the field's type, the check, the readability check of a file it
names, and its row in config/README.md (``python -m proxy.config.reference``).

A key's type and default are its settings field's and are read from there,
never restated: the settings dataclasses stay plain, statically typed classes
that the whole proxy imports without the config loader. At import the
declarations are matched with the fields both ways, so a field with no
declaration, or a declaration with no field, stops ``proxy.config`` from
importing at all instead of going unvalidated or undocumented.

The order here is the reference table's. Values are read and checked in the
settings dataclasses' field order, which is the order problems are listed in.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxy.config.cache_url import check_cache_url
from proxy.config.report import key_path
from proxy.config.values import (
    Check,
    header_names,
    in_range,
    key_file,
    matches,
    non_negative,
    not_empty,
    one_of,
    positive,
)
from proxy.scopes import KNOWN_AUDIENCES
from proxy.settings import (
    AuthSettings,
    CacheSettings,
    LimitSettings,
    LogSettings,
    RefreshSettings,
    Settings,
    UpstreamSettings,
)
from proxy.tokens.discovery_trust import check_allowed_hosts
from proxy.urls import check_url

__all__ = [
    "ENV_PREFIX",
    "FIELDS",
    "KEYS",
    "ROUTES_FILE",
    "SCALARS",
    "SECTIONS",
    "TABLE_KEYS",
    "TOP_KEYS",
    "Key",
    "resolve",
]

ENV_PREFIX: Final = "CCP_"
#: Section name -> its settings dataclass; the top-level scalars are ``Settings``'s own fields.
SECTIONS: Final[dict[str, type]] = {
    "upstream": UpstreamSettings,
    "auth": AuthSettings,
    "cache": CacheSettings,
    "refresh": RefreshSettings,
    "logging": LogSettings,
    "limits": LimitSettings,
}
#: ``Settings`` fields that are not scalar keys: the sections, the route table, validation's output.
_NOT_SCALARS: Final = (*SECTIONS, "routes", "warnings")


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key. ``type`` and ``default`` are filled from its settings field by ``resolve``."""

    path: str  # "upstream.url"; no dot at top level ("listen")
    doc: str  # its notes in the reference table (Markdown, one line)
    check: Check | None = None  # the rule the value must meet on its own: a message, or None when fine
    names_file: bool = False  # a path that must be readable (parse_config checks access, never reads it)
    file_check: Callable[[str], str | None] | None = None  # ... and whose contents must be usable
    shown_default: str | None = None  # the default as the reference shows it, when the value would mislead
    from_env: bool = True  # settable from its CCP_ variable
    type: Any = None
    default: Any = None

    @property
    def section(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]

    @property
    def env(self) -> str:
        """``CCP_<SECTION>_<KEY>`` upper-cased (``CCP_<KEY>`` at top level); used only if ``from_env``."""
        return ENV_PREFIX + self.path.upper().replace(".", "_")


def _origin_url(url: str) -> str | None:
    return check_url(url, origin=True)


_MiB: Final = 1024 * 1024
_LOG_LEVELS: Final = one_of(("debug", "info", "warning", "error", "critical"))

_DECLARED: Final = (
    Key(
        "upstream.url",
        "origin only (`scheme://host[:port]`); the request path is kept as sent. `http://` only to a "
        "loopback host",
        check=_origin_url,
    ),
    Key(
        "upstream.timeout_s",
        "the API's time to answer, per attempt: connect, sending the request and the wait for the "
        "response head. A streamed upload (over `retry_body_limit`) starts this clock only once it is"
        " fully sent, and the response body has no total limit, only `read_timeout_s`. A long "
        "transfer is never cut while bytes keep flowing",
        check=positive,
    ),
    Key(
        "upstream.connect_timeout_s",
        "to get a connection to the API: a new one's TCP and TLS set-up, or the wait for a free one "
        "when all `pool_size` are busy",
        check=positive,
    ),
    Key(
        "upstream.read_timeout_s",
        "longest silence while reading the response (then `504`, or a reset once the head is out)",
        check=positive,
    ),
    Key(
        "upstream.ca_file",
        "extra PEM bundle; TLS is always verified",
        names_file=True,
    ),
    Key(
        "upstream.retry_body_limit",
        "bodies up to this many bytes are kept for the one retry after a 401",
        check=non_negative,
    ),
    Key(
        "upstream.kept_body_budget_bytes",
        "all kept bodies together, across concurrent requests (32 MiB). A body that does not fit "
        "streams instead (flat memory, its `Content-Length` kept) and is not retried on a 401; see "
        "[The 401 retry](../proxy/README.md#the-401-retry-precisely). `0` = never keep",
        check=non_negative,
    ),
    Key(
        "upstream.max_body_bytes",
        "larger request bodies get `413 body_too_large`",
        check=positive,
        shown_default="none (unlimited)",
    ),
    Key(
        "upstream.forwarded_headers",
        "add `X-Forwarded-For` / `X-Forwarded-Proto`",
    ),
    Key(
        "upstream.strip_headers",
        "request headers never forwarded, underscore lookalikes included (see "
        "[Headers](../proxy/README.md#headers)). A YAML list, or comma-separated text in the "
        "variable; it replaces the default (`[]` strips none of these). Each must be a header name "
        "(an RFC 9110 token)",
        check=header_names,
    ),
    Key(
        "upstream.pool_size",
        "keep-alive connections to the API",
        check=positive,
    ),
    Key(
        "upstream.response_buffer_bytes",
        "a response with a `Content-Length` up to this is relayed in one write (headers and body "
        "together); larger or unsized ones stream chunk by chunk. `0` = always stream",
        check=in_range(lambda v: 0 <= v <= 16 * _MiB, "must be between 0 and 16777216 (16 MiB)"),
    ),
    Key(
        "auth.issuer",
        "discovery at `{issuer}/.well-known/openid-configuration`",
        check=check_url,
    ),
    Key(
        "auth.token_endpoint",
        "override only",
        check=check_url,
        shown_default="none (from discovery)",
    ),
    Key(
        "auth.client_id",
        "warning if it does not start with `cc_client_`",
        check=not_empty,
        shown_default="**required**",
    ),
    Key(
        "auth.client_secret_file",
        "preferred: re-read when it changes and on SIGHUP",
        names_file=True,
        shown_default="one of the two is **required**",
    ),
    Key(
        "auth.client_secret",
        "inline secret (use `${VAR}`); exactly one of the two",
        check=not_empty,
        shown_default="",
    ),
    Key(
        "auth.method",
        "or `client_secret_basic`",
    ),
    Key(
        "auth.audience",
        "default audience of routes that name none: `partner/v1`, `internal/v1`, `public/v1`",
        check=one_of(KNOWN_AUDIENCES),
    ),
    Key(
        "auth.verify",
        "verify minted JWTs against `jwks_uri` (ES256, iss, aud, exp, scope)",
    ),
    Key(
        "auth.default_expires_in",
        "token lifetime when the response has no `expires_in`",
        check=positive,
    ),
    Key(
        "auth.timeout_s",
        "per token-endpoint / discovery call",
        check=positive,
    ),
    Key(
        "auth.max_mint_rate",
        "token-endpoint calls per second per replica; must be < 10 (the platform limit)",
        check=in_range(lambda v: 0 < v < 10, "must be > 0 and < 10 (platform limit 10/s)"),
    ),
    Key(
        "auth.ca_file",
        "extra PEM bundle for the authorization server",
        names_file=True,
    ),
    Key(
        "auth.allowed_hosts",
        "hosts a **discovered** `token_endpoint` / `jwks_uri` may name (a YAML list, or "
        "comma-separated text): host names, IP addresses, or `*.example.com` for any host one or more"
        " labels below `example.com` (not `example.com` itself). The issuer's own host is always "
        "allowed; a configured `auth.token_endpoint` is not pinned. See [Trusting the discovery "
        "document](../proxy/README.md#trusting-the-discovery-document)",
        check=check_allowed_hosts,
        shown_default="none: the issuer's host and `*.` its parent domain",
    ),
    Key(
        "listen",
        "`host:port`, `[v6]:port` or `unix:/absolute/path`",
    ),
    Key(
        "admin_listen",
        "`/metrics`, `/healthz`, `/readyz`; must differ from `listen`",
    ),
    Key(
        "cache.url",
        "see the forms below",
        check=check_cache_url,
    ),
    Key(
        "cache.key_prefix",
        "`[A-Za-z0-9_.:-]+`",
        check=matches(r"[\w.:-]+", "expected [A-Za-z0-9_.:-]+"),
    ),
    Key(
        "cache.encryption_key_file",
        "tokens in Redis are AEAD-encrypted when set",
        names_file=True,
        file_check=key_file,
    ),
    Key(
        "cache.timeout_s",
        "every Redis call; Redis trouble never stalls a request",
        check=positive,
    ),
    Key(
        "refresh.at_fraction",
        "refresh at this fraction of the lifetime, 0 < x < 1 ...",
        check=in_range(lambda v: 0 < v < 1, "must be between 0 and 1, exclusive"),
    ),
    Key(
        "refresh.min_margin_s",
        "... and never later than this before `exp`",
        check=non_negative,
    ),
    Key(
        "refresh.idle_s",
        "stop refreshing a scope set nobody used for this long",
        check=positive,
    ),
    Key(
        "refresh.jitter_s",
        "spreads refreshes of replicas and scope sets",
        check=non_negative,
    ),
    Key(
        "refresh.prefetch",
        "mint at start: `marked` (routes with `prefetch: true`), `all`, `none`",
    ),
    Key(
        "logging.level",
        "`debug`, `info`, `warning`, `error`, `critical`",
        check=lambda v: _LOG_LEVELS(v.lower()),
    ),
    Key(
        "logging.access_log",
        "one JSON line per request",
    ),
    Key(
        "limits.max_header_bytes",
        "request line + headers of one request, both listeners; over it `431 headers_too_large` and "
        "close. Counted as the bytes arrive, so no more than this is ever held for a head (1024 to "
        "1048576)",
        check=in_range(lambda v: 1024 <= v <= _MiB, "must be between 1024 and 1048576 (1 MiB)"),
    ),
    Key(
        "limits.max_headers",
        "header fields in one request; over it `431` (1 to 1000)",
        check=in_range(lambda v: 1 <= v <= 1000, "must be between 1 and 1000"),
    ),
    Key(
        "limits.header_timeout_s",
        "from the accept (or a later request's first byte) to the end of its headers; then `408 "
        "request_timeout` and close",
        check=positive,
    ),
    Key(
        "limits.keepalive_timeout_s",
        "an idle connection between requests is closed after this",
        check=positive,
    ),
    Key(
        "limits.body_timeout_s",
        "longest silence of a request body while the proxy waits for it; then `408` (or a reset once "
        "the response has started). A slow body that keeps arriving is never cut",
        check=positive,
    ),
    Key(
        "limits.listen_max_connections",
        "client connections open at once on the proxy listener; more get a raw `503 "
        "too_many_connections`. At start the soft `RLIMIT_NOFILE` is raised to the hard one, and the "
        "cap is lowered (a `connection_caps` warning says to what) if it does not fit below it with "
        "descriptors kept for the admin listener and the outbound pools",
        check=positive,
    ),
    Key(
        "limits.admin_max_connections",
        "the same for the admin listener, whose descriptors are kept apart so probes answer while the"
        " proxy listener is full",
        check=positive,
    ),
    Key(
        "shutdown_grace_s",
        "SIGTERM: time for in-flight requests to finish",
        check=non_negative,
    ),
    Key(
        "reuse_port",
        "`SO_REUSEPORT` on the proxy listener, so several `run` processes can share one port (see "
        "[Several processes on one port](../deploy/README.md#several-processes-on-one-port)). Off by "
        "default: a second instance on a taken port fails to start, instead of silently taking a "
        "share of the app's connections",
    ),
)

#: The keys that hold or name the route table: top level, not settings scalars (``load_config``
#: resolves ``routes_file``; ``proxy.config.routes`` parses ``routes``).
ROUTES: Final = Key(
    "routes",
    "the route table, below",
    shown_default="**required** with a file",
    from_env=False,
)
ROUTES_FILE: Final = Key(
    "routes_file",
    "load the route table from another YAML (a list, or a mapping with `routes:`). In the file, a"
    " relative path is relative to the config file; in `CCP_ROUTES_FILE`, to the working "
    "directory, like any path on a command line. Not together with `routes`",
)
TABLE_KEYS: Final = (ROUTES, ROUTES_FILE)


def resolve(declared: Iterable[Key]) -> dict[str, tuple[Key, ...]]:
    """Section -> its keys in settings field order, each with the field's type and default.

    ``TypeError`` names a field without a declaration, a declaration without a field, or a key
    declared twice: either way a key would go unchecked, unset from the environment, or undocumented.
    """
    by_path: dict[str, Key] = {}
    for key in declared:
        if key.path in by_path:
            raise TypeError(f"configuration key {key.path} is declared twice in proxy/config/keys.py")
        by_path[key.path] = key
    resolved: dict[str, tuple[Key, ...]] = {}
    for section, cls in (*SECTIONS.items(), ("", Settings)):
        hints = typing.get_type_hints(cls)
        keys = []
        for f in dataclasses.fields(cls):
            if section == "" and f.name in _NOT_SCALARS:
                continue
            path = key_path(section, f.name)
            if path not in by_path:
                raise TypeError(f"settings field {path} has no Key in proxy/config/keys.py")
            keys.append(dataclasses.replace(by_path.pop(path), type=hints[f.name], default=f.default))
        resolved[section] = tuple(keys)
    if by_path:
        raise TypeError(f"Key without a settings field in proxy/config/keys.py: {', '.join(sorted(by_path))}")
    return resolved


#: Section ("" for the top level) -> its keys, in settings field order.
FIELDS: Final[Mapping[str, tuple[Key, ...]]] = resolve(_DECLARED)
_BY_PATH: Final = {key.path: key for keys in FIELDS.values() for key in keys}
#: Every scalar key, in declaration (reference) order, type and default filled in.
SCALARS: Final = tuple(_BY_PATH[key.path] for key in _DECLARED)
#: Every key of the reference: the scalars, then the route table's.
KEYS: Final = (*SCALARS, *TABLE_KEYS)
#: What may appear at the top level of the file.
TOP_KEYS: Final = (*SECTIONS, *(key.path for key in KEYS if not key.section))
