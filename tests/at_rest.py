"""What a Redis value holds at rest, read independently of the code under test.

Searching a sealed value for a JWT marker such as ``eyJ`` is flaky: the
ciphertext is base64 and contains any three letters now and then (about one
run in a hundred for three values). These helpers instead open the value with
AES-GCM straight from ``cryptography`` and the key file, so a test can assert
the precise property: the clear part holds no token material, and the token
itself appears only inside the authenticated ciphertext.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEALED_FIELDS = {"v", "d", "kid", "n", "c"}


def read_keys(key_file: str | Path) -> dict[str, bytes]:
    """kid -> raw key bytes from a ``kid:base64`` per line key file."""
    keys: dict[str, bytes] = {}
    for line in Path(key_file).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            kid, _, encoded = line.strip().partition(":")
            keys[kid] = base64.b64decode(encoded)
    return keys


def open_sealed(raw: bytes, slot: str | bytes, key_file: str | Path) -> dict[str, Any]:
    """The payload sealed in one Redis value; fails the test when the value is not sealed."""
    doc = json.loads(raw)
    assert set(doc) == SEALED_FIELDS, f"not a sealed value: fields {sorted(doc)}"
    aad = slot if isinstance(slot, bytes) else slot.encode()
    key = read_keys(key_file)[doc["kid"]]
    plain = AESGCM(key).decrypt(base64.b64decode(doc["n"]), base64.b64decode(doc["c"]), aad)
    payload: dict[str, Any] = json.loads(plain)
    return payload


def assert_sealed(raw: bytes, slot: str | bytes, key_file: str | Path) -> dict[str, Any]:
    """Assert nothing of the token or its scopes is readable in ``raw``; return the payload."""
    payload = open_sealed(raw, slot, key_file)
    token = payload["t"]
    assert token.startswith("eyJ"), "the sealed payload should carry the JWT"
    assert token.encode() not in raw
    clear = {name: value for name, value in json.loads(raw).items() if name != "c"}
    assert "eyJ" not in json.dumps(clear), "token material in the clear fields"
    for scope in payload["s"]:
        assert scope.encode() not in raw, "scope metadata must be sealed too"
    return payload
