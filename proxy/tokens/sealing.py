"""Tokens at rest in Redis: the stored value format and its optional AEAD seal.

Redis is shared by every replica and usually by whoever operates it, so a
value there is a live bearer token. With ``cache.encryption_key_file`` the
token and its metadata are sealed with AES-256-GCM: a fresh random 96-bit
nonce per write, the Redis key as associated data (a value copied into
another slot fails authentication instead of being served for the wrong
scope set), and the key id stored beside the ciphertext so a rotated key
file (new key first, old keys after) keeps reading what the old key wrote.

What the seal cannot stop is a replay: someone who can write Redis but has
no key can copy an older sealed value of the same slot back. It carries its
own issue time (the JWT's ``iat``, and the minting replica's ``iat`` inside
the seal), so ``proxy.tokens.redis_trust`` refuses a value older than the newest one
this process has held; the format needs nothing more, and stays ``v: 1``.

A value that cannot be read (unknown key id, failed authentication, a
plaintext value while a key is configured, garbage) decodes to None: a cache
miss, never an exception on the request path.

Stored JSON (``v`` = format version, ``d`` = ``Token.digest`` in clear so the
compare-and-delete script needs no key)::

    plain:  {"v": 1, "d": "...", "p": {"t": token, "iat": .., "exp": .., "s": [..], "a": ".."}}
    sealed: {"v": 1, "d": "...", "kid": "..", "n": b64(nonce), "c": b64(AESGCM(json(p)))}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.tokens.model import Token

FORMAT_VERSION = 1
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96 bits, the GCM standard nonce
_KID = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Label of the invalidation MAC key derived from each sealing key: the AES key itself never signs.
MAC_LABEL = b"ccp-inval-mac"


class SealingKeyError(ValueError):
    """The key file cannot be used; the message names the file and line, never key material."""


def derive_kid(key: bytes) -> str:
    """Key id of a bare key: a short hash, so every replica derives the same id."""
    return hashlib.sha256(b"ccp-kid:" + key).hexdigest()[:12]


def derive_mac_key(key: bytes) -> bytes:
    """HMAC-SHA256(key, label): a separate key for authenticating invalidation messages.

    One secret in the key file serves two purposes, so each gets its own derived key:
    a MAC key can never be used as the AES key or the other way round.
    """
    return hmac.new(key, MAC_LABEL, hashlib.sha256).digest()


def _decode_key(text: str, where: str) -> bytes:
    padded = text.strip()
    try:
        if "-" in padded or "_" in padded:
            key = base64.urlsafe_b64decode(padded)
        else:
            key = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise SealingKeyError(f"{where}: not valid base64") from None
    if len(key) != KEY_BYTES:
        raise SealingKeyError(f"{where}: key must be {KEY_BYTES} bytes (AES-256), got {len(key)}")
    return key


def _parse_lines(text: str, source: str) -> list[tuple[str, bytes]]:
    lines = [
        (n, line.strip())
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise SealingKeyError(f"{source}: no key found")
    if len(lines) == 1 and ":" not in lines[0][1]:
        key = _decode_key(lines[0][1], f"{source}:{lines[0][0]}")
        return [(derive_kid(key), key)]
    entries: list[tuple[str, bytes]] = []
    for number, line in lines:
        kid, sep, encoded = line.partition(":")
        where = f"{source}:{number}"
        if not sep or not _KID.fullmatch(kid.strip()):
            raise SealingKeyError(f"{where}: expected 'kid:base64key' (kid: letters, digits, . _ -)")
        if kid.strip() in {k for k, _ in entries}:
            raise SealingKeyError(f"{where}: duplicate key id {kid.strip()!r}")
        entries.append((kid.strip(), _decode_key(encoded, where)))
    return entries


@dataclass(frozen=True, slots=True)
class Keyring:
    """The current key (used for writing) and every key accepted for reading.

    ``mac_keys`` are the invalidation MAC keys derived from the same keys, current first:
    messages are signed with the first and accepted under any. A replica restarted with
    "new, old" still accepts what a not yet restarted one signs with "old"; for the other
    direction the new key is added second everywhere before it is made first, as for reads.
    """

    current: str
    keys: dict[str, AESGCM]
    mac_keys: tuple[bytes, ...] = field(default=(), repr=False)

    @classmethod
    def from_text(cls, text: str, source: str = "key file") -> Keyring:
        entries = _parse_lines(text, source)
        macs = tuple(derive_mac_key(key) for _, key in entries)
        return cls(entries[0][0], {kid: AESGCM(key) for kid, key in entries}, macs)

    @classmethod
    def from_file(cls, path: str) -> Keyring:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise SealingKeyError(f"{path}: cannot read ({exc.strerror})") from None
        return cls.from_text(text, path)

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes, bytes]:
        """(kid, nonce, ciphertext+tag) under the current key."""
        nonce = os.urandom(NONCE_BYTES)
        return self.current, nonce, self.keys[self.current].encrypt(nonce, plaintext, aad)

    def mac(self, message: bytes) -> str:
        """Hex HMAC-SHA256 of ``message`` under the current MAC key."""
        return hmac.new(self.mac_keys[0], message, hashlib.sha256).hexdigest()

    def mac_matches(self, message: bytes, mac: str) -> bool:
        """True if ``mac`` is ``message``'s MAC under any key of the ring (constant-time compares)."""
        return any(
            hmac.compare_digest(hmac.new(key, message, hashlib.sha256).hexdigest(), mac)
            for key in self.mac_keys
        )

    def open(self, kid: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
        """The plaintext, or None for an unknown key id or a value that fails authentication."""
        aead = self.keys.get(kid)
        if aead is None or len(nonce) != NONCE_BYTES:
            return None
        try:
            return aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            return None


def _payload(token: Token) -> dict[str, Any]:
    return {
        "t": token.value,
        "iat": token.issued_at,
        "exp": token.expires_at,
        "s": list(token.scopes),
        "a": token.audience,
    }


def _token(payload: Any) -> Token | None:
    if not isinstance(payload, dict):
        return None
    try:
        value, scopes, audience = payload["t"], payload["s"], payload["a"]
        issued, expires = float(payload["iat"]), float(payload["exp"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (isinstance(value, str) and isinstance(audience, str) and isinstance(scopes, list)):
        return None
    return Token(value, issued, expires, tuple(str(s) for s in scopes), audience)


class TokenCodec:
    """Token <-> stored bytes for one Redis slot; sealed when a keyring is given."""

    def __init__(self, keyring: Keyring | None = None) -> None:
        self.keyring = keyring

    def encode(self, token: Token, slot: str) -> bytes:
        doc: dict[str, Any] = {"v": FORMAT_VERSION, "d": token.digest}
        if self.keyring is None:
            doc["p"] = _payload(token)
        else:
            plain = json.dumps(_payload(token), separators=(",", ":")).encode()
            kid, nonce, sealed = self.keyring.seal(plain, slot.encode())
            doc.update(kid=kid, n=_b64(nonce), c=_b64(sealed))
        return json.dumps(doc, separators=(",", ":")).encode()

    def decode(self, raw: bytes | str, slot: str) -> Token | None:
        """The stored token, or None when the value is unreadable here (a miss)."""
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(doc, dict) or doc.get("v") != FORMAT_VERSION:
            return None
        if self.keyring is None:
            token = _token(doc.get("p"))  # a sealed value without a key: unreadable, a miss
        else:
            token = self._unseal(doc, slot)
        # The clear digest drives compare-and-delete; one that disagrees with the token is tampering.
        return token if token is not None and token.digest == doc.get("d") else None

    def _unseal(self, doc: dict[str, Any], slot: str) -> Token | None:
        """Only sealed values are trusted once a key is configured: plaintext could be forged."""
        assert self.keyring is not None
        kid, nonce, sealed = doc.get("kid"), doc.get("n"), doc.get("c")
        if not (isinstance(kid, str) and isinstance(nonce, str) and isinstance(sealed, str)):
            return None
        try:
            plain = self.keyring.open(kid, _unb64(nonce), _unb64(sealed), slot.encode())
            return None if plain is None else _token(json.loads(plain))
        except (binascii.Error, ValueError):
            return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
