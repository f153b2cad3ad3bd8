"""ES256 signing keys of the emulated authorization server, and their JWKS.

Credicorp signs access tokens with P-256 keys and publishes the public halves
at ``/.well-known/jwks.json``. Rotation makes a new current key but keeps the
previous one published until the next rotation, so tokens minted just before
a rotation keep verifying: that is the window a verifier (the proxy, or the
emulator's own API) must cope with, and the one tests need to reproduce.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

ALGORITHM = "ES256"


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One P-256 key pair and the ``kid`` that names it in token headers and the JWKS."""

    kid: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK as published: never any private component."""
        jwk = dict(ECAlgorithm.to_jwk(self.public_key, as_dict=True))
        jwk.update({"kid": self.kid, "use": "sig", "alg": ALGORITHM})
        return jwk


class KeyRing:
    """The current signing key plus, after a rotation, the one before it.

    Kids look like the documented ``cc-07`` with a random suffix, so two
    emulators (or one restarted) never publish the same kid for different keys.
    """

    def __init__(self) -> None:
        self._serial = itertools.count(1)
        self._instance = secrets.token_hex(3)
        self.current: SigningKey = self._new_key()
        self.previous: SigningKey | None = None

    def _new_key(self) -> SigningKey:
        kid = f"cc-{next(self._serial):02d}-{self._instance}"
        return SigningKey(kid, ec.generate_private_key(ec.SECP256R1()))

    def rotate(self) -> SigningKey:
        """Make a new current key; the old current stays published, the older one is dropped."""
        self.previous, self.current = self.current, self._new_key()
        return self.current

    def published(self) -> list[SigningKey]:
        """Keys a verifier may use: current first."""
        return [self.current] + ([self.previous] if self.previous else [])

    def find(self, kid: str) -> SigningKey | None:
        """The published key with this kid, or None (unknown, or rotated out)."""
        return next((k for k in self.published() if k.kid == kid), None)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.published()]}
