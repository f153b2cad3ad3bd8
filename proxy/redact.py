"""Masking credentials in text the proxy prints: config errors, check-config, flush, reprs.

A cache URL is the one config value that may carry a secret (a Redis password
in the userinfo, in a ``?password=`` option, in a Sentinel set's
``sentinel_password=``), and the messages that show it (``check-config``
output, a failed ``flush``, a config error for a mistyped scheme) get pasted
into tickets and chat. So every such message goes through one function that
knows every form a credential takes: ``mask_url`` when the URL is known,
``mask_secrets_in`` for free text that may hold one.

Masking errs on the side of hiding too much: a username with no password
beside it may be a token, so it is hidden; an ``@`` in a query makes
everything before it look like userinfo, and it is hidden. What is kept is
what an operator needs to recognise the value: the scheme, the username that
goes with a password, the hosts, the path and the option names.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

MASK: Final = "***"

#: Query options whose value is a credential: ``password``, ``sentinel_password``, ``pass``,
#: ``pwd``, ``token``, ``access_token``, ``secret``, ``auth``, ``api_key``, ``credentials``, ``sig``.
_SECRET_OPTION: Final = re.compile(r"pass|pwd|token|secret|auth|key|cred|sig", re.IGNORECASE)
#: The same outside a URL, narrower so ordinary ``name=value`` text is left alone.
_SECRET_WORD: Final = re.compile(
    r"(?P<name>\b[\w.-]*(?:pass|pwd|token|secret)[\w.-]*)(?P<eq>\s*=\s*)(?P<value>[^\s&;,\"'<>]+)",
    re.IGNORECASE,
)
_OPTION: Final = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#]*)=(?P<value>[^&;#]*)")
_URL: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>`]*")


def mask_url(url: str) -> str:
    """``url`` with every credential replaced by ``***``; anything else is kept as written.

    ``redis://user:pw@h:6379/0?password=pw&db=0`` -> ``redis://user:***@h:6379/0?password=***&db=0``;
    ``redis://token@h`` -> ``redis://***@h``; ``unix://:pw@/run/redis.sock?password=pw``
    -> ``unix://:***@/run/redis.sock?password=***``; multi-host Sentinel and Cluster forms alike.
    Text without ``://`` (a mistyped scheme separator) is treated as the part after it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    # Options first, so an "@" inside a credential option's value (?password=a@b) is masked with
    # the value and cannot be taken for the end of a userinfo that would leave its tail shown.
    rest = _mask_options(rest)
    at = rest.rfind("@")  # the last one: a password may hold an unencoded "@"
    if at >= 0:
        user, colon, password = rest[:at].partition(":")
        # A user with a password is a username; alone (or with an empty password) it may be a token.
        named = colon and password and not any(ch in user for ch in "/?#")
        userinfo = f"{user}:{MASK}" if named else MASK
        return f"{scheme}{sep}{userinfo}@{rest[at + 1 :]}"
    return f"{scheme}{sep}{rest}"


def mask_secrets_in(text: str) -> str:
    """Free text with every URL masked (``mask_url``), and ``password=...``-style pairs outside URLs."""
    text = _URL.sub(lambda m: mask_url(m.group(0)), text)
    return _SECRET_WORD.sub(lambda m: m.group("name") + m.group("eq") + MASK, text)


def _mask_options(tail: str) -> str:
    """The path is kept; the value of every query option named like a credential is masked."""
    return _OPTION.sub(_mask_option, tail)


def _mask_option(m: re.Match[str]) -> str:
    name = m.group("name")
    if not _SECRET_OPTION.search(unquote(name)):
        return m.group(0)
    return f"{m.group('lead')}{name}={MASK}"
