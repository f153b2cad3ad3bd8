"""What a discovery document may point the proxy at: the URL rule, no downgrade, a host pin.

The token endpoint named by ``{issuer}/.well-known/openid-configuration``
receives the client secret, and ``jwks_uri`` decides which keys a token is
checked with. Whoever can change that document (a compromised issuer, a
misconfigured CDN in front of it, a proxy on the way) must not be able to send
the secret anywhere a config file could not, so a discovered URL must:

1. pass the same rule as a configured one (``proxy.urls.url_problem``: http(s),
   no userinfo, no query or fragment, TLS unless the host is loopback);
2. keep TLS when the issuer has it (``downgrade``): an https issuer's document
   naming ``http://`` is refused even to a loopback host;
3. name a plain host (``host_syntax``): an ASCII DNS name or a canonical IP
   literal, read the same way by our check and by the HTTP client that connects,
   and not a numeric form such as ``0x7f000001`` or ``127.1`` that resolvers
   turn into an address the rules never saw;
4. name an allowed host (``host_not_allowed``): the issuer's own host, plus
   ``auth.allowed_hosts`` when it is set, else hosts under the issuer's parent
   domain (see ``default_patterns``).

The document is trusted whole or not at all: one refused endpoint refuses it,
and nothing is sent to any endpoint it names. A configured
``auth.token_endpoint`` is the operator's choice and is not pinned; the
document's own ``token_endpoint`` is then ignored, so it is not checked either.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import yarl

from proxy.settings import AuthSettings
from proxy.tokens.backoff import EndpointFailure, ErrorClass
from proxy.urls import HOSTNAME, url_problem
from proxy.wording import show

#: The ``ccp_token_endpoint_errors_total`` label and the /readyz ``detail`` of a refused document.
UNTRUSTED: Final = "discovery_untrusted"
#: Longest host name shown in a log line (the DNS limit); longer ones are cut.
_MAX_SHOWN_HOST: Final = 253
#: A two-label parent whose top label is a two-letter country code and whose other label is this
#: short (``co.uk``, ``com.au``, ``ac.jp``, ``gov.uk``) is taken for a registry suffix, not a domain
#: one organisation owns: trusting ``*.co.uk`` would trust every company in the UK.
_SHORT_SECOND_LEVEL: Final = 3
_COUNTRY_CODE: Final = re.compile(r"[a-z]{2}")
#: One part of an IPv4 address as ``inet_aton`` reads it: decimal, octal (leading 0) or hex.
_NUMBER: Final = re.compile(r"0x[0-9a-f]*|[0-9]+")


def normalize_host(host: str) -> str:
    """The form hosts are compared in: lower case, no final dot, IP literals in canonical form."""
    host = host.strip().lower().removesuffix(".")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _plain_host(host: str) -> bool:
    """An IP literal, or a DNS name the system resolver will not read as an IPv4 address.

    ``127.1``, ``2130706433``, ``0177.0.0.1`` or ``0x7f000001`` pass a naive name check,
    but ``inet_aton`` (behind ``getaddrinfo``) takes any dot-separated decimal, octal or
    hex numbers for an address, which the rules would never have seen as one. Such a
    host is refused rather than judged as a name: its last label is all digits (no TLD
    is, RFC 3696 §2) or every label is a number.
    """
    if _is_ip(host):
        return True
    if not HOSTNAME.fullmatch(host):
        return False
    labels = host.removesuffix(".").split(".")
    return not labels[-1].isdigit() and not all(_NUMBER.fullmatch(label) for label in labels)


def check_allowed_host(entry: str) -> str | None:
    """Why one ``auth.allowed_hosts`` entry is unusable, or None.

    An entry is a host name (``api.credicorp.co.uk``), an IP literal, or ``*.`` and a
    domain of at least two labels (``*.credicorp.co.uk``), which matches any host one or
    more labels below that domain, never the domain itself. No scheme, port or path.
    """
    host = normalize_host(entry)
    if _is_ip(host):
        return None
    if host.startswith("*."):
        domain = host[2:]
        if "*" in domain or not _plain_host(domain) or _is_ip(domain):
            return f'{show(entry)}: a wildcard is "*." followed by a domain name, such as "*.example.com"'
        if domain.count(".") < 1:
            return f'{show(entry)}: a wildcard needs a domain of at least two labels, such as "*.example.com"'
        return None
    if not _plain_host(host):
        return f'{show(entry)}: expected a host name, an IP address or "*.domain" (no scheme, port or path)'
    return None


def check_allowed_hosts(entries: Sequence[str]) -> str | None:
    """The config check for ``auth.allowed_hosts``: every unusable entry, in one message."""
    problems = [p for entry in entries if (p := check_allowed_host(entry))]
    return "; ".join(problems) or None


def default_patterns(issuer_host: str) -> tuple[str, ...]:
    """The pin when ``auth.allowed_hosts`` is empty: the issuer's host and hosts under its parent.

    ``sso.credicorp.co.uk`` gives ``sso.credicorp.co.uk`` and ``*.credicorp.co.uk``, so the
    documented token endpoint on ``api.credicorp.co.uk`` keeps working with no setting.
    No parent is derived for an IP literal or a one-label host, nor when the parent would
    have fewer than two labels (``example.com`` -> not ``*.com``) or looks like a registry
    suffix (``credicorp.co.uk`` -> not ``*.co.uk``). Without a public-suffix list this is a
    heuristic: an issuer on a shared hosting domain (``tenant.herokuapp.com``) should set
    ``auth.allowed_hosts``, or every tenant of that domain is trusted.
    """
    host = normalize_host(issuer_host)
    if _is_ip(host) or "." not in host:
        return (host,)
    parent = host.split(".", 1)[1]
    labels = parent.split(".")
    if len(labels) < 2 or _looks_like_registry_suffix(labels):
        return (host,)
    return (host, f"*.{parent}")


def _looks_like_registry_suffix(labels: list[str]) -> bool:
    return (
        len(labels) == 2
        and _COUNTRY_CODE.fullmatch(labels[1]) is not None
        and len(labels[0]) <= _SHORT_SECOND_LEVEL
    )


def host_matches(host: str, patterns: Sequence[str]) -> bool:
    """``host`` equals an exact entry or lies one or more labels below a ``*.`` entry's domain."""
    host = normalize_host(host)
    for pattern in patterns:
        if pattern.startswith("*."):
            if not _is_ip(host) and host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


@dataclass(frozen=True, slots=True)
class Refusal:
    """One discovered endpoint the proxy will not use; ``host`` only, never the whole URL."""

    key: str  # token_endpoint | jwks_uri
    rule: str  # a fixed label: see the module docstring and proxy.urls.UrlProblem
    host: str | None

    def failure(self) -> EndpointFailure:
        """The mint's failure: our own words (no wire text), backing off every scope set."""
        return EndpointFailure(
            UNTRUSTED,
            ErrorClass.TRANSIENT,
            f"the issuer's discovery document names a {self.key} the proxy does not trust"
            f" ({self.rule}); nothing was sent to it",
        )


@dataclass(frozen=True, slots=True)
class DiscoveryTrust:
    """The rules for one issuer's discovered endpoints, built from the auth settings."""

    issuer_https: bool
    patterns: tuple[str, ...]

    @classmethod
    def for_settings(cls, auth: AuthSettings) -> DiscoveryTrust:
        issuer = urlsplit(auth.issuer)
        issuer_host = normalize_host(issuer.hostname or "")
        configured = tuple(normalize_host(entry) for entry in auth.allowed_hosts)
        patterns = (issuer_host, *configured) if configured else default_patterns(issuer_host)
        return cls(issuer.scheme == "https", patterns)

    def refusal(self, endpoints: Mapping[str, str | None]) -> Refusal | None:
        """The first endpoint (key -> URL; None = absent or not used) that breaks a rule."""
        for key, url in endpoints.items():
            if url is not None and (refused := self._check(key, url)):
                return refused
        return None

    def _check(self, key: str, url: str) -> Refusal | None:
        host = _shown_host(url)
        if problem := url_problem(url):
            return Refusal(key, problem.rule, host)
        if self.issuer_https and urlsplit(url).scheme != "https":
            return Refusal(key, "downgrade", host)
        if host is None or not _plain_host(host) or _client_host(url) != host:
            return Refusal(key, "host_syntax", host)
        if not host_matches(host, self.patterns):
            return Refusal(key, "host_not_allowed", host)
        return None


def _shown_host(url: str) -> str | None:
    """The host part as our URL parser reads it (no userinfo, port, path or query), bounded."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host[:_MAX_SHOWN_HOST] if host else None


def _client_host(url: str) -> str | None:
    """The host the HTTP client (aiohttp, through yarl) would connect to, in ASCII."""
    try:
        raw = yarl.URL(url).raw_host
    except (ValueError, TypeError):
        return None
    return raw.lower() if raw else None
