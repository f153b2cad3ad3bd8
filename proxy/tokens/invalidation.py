"""The invalidation message replicas send each other: its one shape, its signature, its bounds.

A replica that purges a token (an upstream 401, ``flush``) tells the others to
drop their memory copies with one message on ``{prefix}:inval``. This module is
only the message, pure functions and values, no Redis and no event loop;
``proxy.tokens.invalidation_channel`` sends and receives it.

Why it looks the way it does:

* **One shape.** JSON ``{"o": origin, "t": sent at, "k": [client, fp, audience,
  [scopes]] | null, "d": digest | null}``. The key travels as fields, not as the
  storage id, because scopes contain ``:`` and cannot be split back
  unambiguously. A per-key drop names the digest of the token it drops (the
  receiver drops only that token, so a newer copy minted since survives); a
  drop-all (``"k": null``) names none. Anything else is malformed.
* **Invalidations are not trusted.** Anyone who can PUBLISH on Redis can send
  them. A message over ``MAX_MESSAGE_BYTES`` or with more than
  ``MAX_MESSAGE_CONTAINERS`` JSON arrays/objects is refused before it is
  parsed, so a hostile one costs a bounded amount of work.
* **Signed with the cache key.** With ``cache.encryption_key_file`` every
  message ends in ``"m": HMAC-SHA256`` (hex) of the message without that field,
  under a key derived from the sealing key (never the AES key itself); it is
  accepted under any key of the ring, so a key rotation works across a rolling
  restart. Unsigned or badly signed messages are dropped. An authenticated
  message is accepted once and only within ``INVALIDATION_MAX_AGE_S`` of its
  ``t`` (a captured "drop everything" cannot be replayed); ``t`` is checked only
  on signed messages, since without a key anyone could write any ``t``.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from proxy.tokens.model import CacheKey
from proxy.tokens.sealing import Keyring

INVALIDATION_MAX_AGE_S = 60.0  # an authenticated message this far from our clock is refused
MAX_MESSAGE_BYTES = 4096  # ours are a few hundred bytes; bigger is refused unparsed
MAX_MESSAGE_CONTAINERS = 8  # JSON arrays/objects per message (ours: 3), so parse depth is bounded
_SEEN_MACS_MAX = 4096  # authenticated messages remembered (within the max age) to refuse replays
_MAC_OPEN = b',"m":"'
_MAC_TAIL = len(_MAC_OPEN) + 64 + 2  # ,"m":"<64 hex>"}
_HEX = re.compile(rb"[0-9a-f]{64}")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One message: drop ``key``'s token with ``digest``, or everything when ``key`` is None."""

    origin: str
    key: CacheKey | None
    digest: str | None
    sent_at: float | None  # sender's clock; required (and checked) only when messages are signed


def encode_invalidation(
    origin: str, sent_at: float, key: CacheKey | None, digest: str | None, keyring: Keyring | None
) -> str:
    """The message as published, signed when a key is set (the MAC is the last field)."""
    wire_key = None if key is None else [key.client_id, key.fingerprint, key.audience, list(key.scopes)]
    doc = {"o": origin, "t": round(sent_at, 3), "k": wire_key, "d": digest}
    body = json.dumps(doc, separators=(",", ":"))  # ASCII: these are the bytes Redis publishes
    if keyring is None:
        return body
    return f'{body[:-1]},"m":"{keyring.mac(body.encode())}"}}'


def verified(raw: bytes, keyring: Keyring) -> tuple[bytes, str] | None:
    """(the message without its MAC field, the MAC) if a key of the ring signed it, else None."""
    tail = raw[-_MAC_TAIL:]
    if len(raw) <= _MAC_TAIL or not tail.startswith(_MAC_OPEN) or not tail.endswith(b'"}'):
        return None
    mac = tail[len(_MAC_OPEN) : -2]
    if not _HEX.fullmatch(mac):
        return None
    body = raw[:-_MAC_TAIL] + b"}"  # exactly the bytes the sender signed
    return (body, mac.decode()) if keyring.mac_matches(body, mac.decode()) else None


def _containers(data: bytes) -> int:
    """JSON arrays and objects outside strings: an upper bound on nesting, counted without parsing."""
    bare = _JSON_STRING.sub(b"", data)
    return bare.count(b"[") + bare.count(b"{")


def _wire_key(raw: Any) -> CacheKey | None:
    if not (isinstance(raw, list) and len(raw) == 4 and isinstance(raw[3], list)):
        return None
    client, fingerprint, audience, scopes = raw
    if not all(isinstance(part, str) for part in (client, fingerprint, audience, *scopes)):
        return None
    return CacheKey(client, fingerprint, audience, tuple(scopes))


def parse_invalidation(data: bytes) -> Invalidation | None:
    """The message in ``data``, or None if it is malformed (too big, too nested, wrong shape).

    Size and nesting are checked before ``json.loads`` so a hostile message costs a
    bounded amount of work; ``RecursionError`` is caught anyway.
    """
    if len(data) > MAX_MESSAGE_BYTES or _containers(data) > MAX_MESSAGE_CONTAINERS:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    origin, raw_key, digest, sent_at = doc.get("o"), doc.get("k"), doc.get("d"), doc.get("t")
    if not isinstance(origin, str) or (digest is not None and not isinstance(digest, str)):
        return None
    if sent_at is not None and (
        isinstance(sent_at, bool) or not isinstance(sent_at, int | float) or not math.isfinite(sent_at)
    ):
        return None
    key = None if raw_key is None else _wire_key(raw_key)
    if (raw_key is not None and key is None) or (key is None) != (digest is None):
        return None  # a per-key drop names the token it drops; a drop-all names none
    return Invalidation(origin, key, digest, None if sent_at is None else float(sent_at))


class ReplayWindow:
    """Accepts each signed message once, and only near its send time (no replays).

    A MAC is remembered for ``max_age_s`` (after that its message is refused as stale
    anyway), at most ``_SEEN_MACS_MAX`` of them, oldest forgotten first.
    """

    def __init__(self, max_age_s: float) -> None:
        self._max_age = max_age_s
        self._seen: OrderedDict[str, float] = OrderedDict()  # MAC -> sender's time

    def fresh(self, message: Invalidation, mac: str, now: float) -> bool:
        sent = message.sent_at
        if sent is None or abs(now - sent) > self._max_age or mac in self._seen:
            return False
        seen = self._seen
        while seen and (len(seen) >= _SEEN_MACS_MAX or next(iter(seen.values())) < now - self._max_age):
            seen.popitem(last=False)
        seen[mac] = sent
        return True
