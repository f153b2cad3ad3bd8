"""Cost of checking tokens read from Redis, and memory under a flood of forged ones.

Not a pytest test. Run from the repository root::

    python -m tests.bench.trust_bench [--forged 20000]

Against the in-process emulator (its JWKS, its tokens): the first admission of
a token (ES256 signature and claims), a re-read of an admitted token (what a
second read under the lease or after an invalidation costs), and refusing
``--forged`` distinct tokens signed with a key the attacker made. The point of
the last row: refused tokens are not remembered (only a bounded "already
logged" set), so this process's RSS stays flat however many are planted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.emulator.app import EmulatorServer
from proxy.emulator.testing import EmulatorClient
from proxy.metrics import Metrics
from proxy.tokens.model import CacheKey, Credentials, Token
from proxy.tokens.redis_trust import SharedTokenTrust
from proxy.tokens.verify import JwtVerifier
from tests.bench.procs import status_kib

SCOPES = ("decisions:read",)
AUDIENCE = "partner/v1"


class NoPurge:
    """Stands where Redis would: the bench measures the checks, not a Redis round trip."""

    async def purge_if_same(self, key: CacheKey, token: Token) -> bool:
        return True


def stored(value: str) -> Token:
    now = time.time()
    return Token(value, now, now + 3600, SCOPES, AUDIENCE)


async def run(forged_count: int) -> None:
    emulator = await EmulatorServer(port=0, rate_limit=None).start()
    try:
        async with aiohttp.ClientSession() as http:
            client = EmulatorClient(http, emulator.url)
            verifier = JwtVerifier(http, emulator.url, jwks_uri=emulator.url + "/.well-known/jwks.json")
            trust = SharedTokenTrust(verifier=verifier, clock=time.time, metrics=Metrics())
            key = CacheKey.create(Credentials.create("cc_client_demo", "demo-secret"), SCOPES, AUDIENCE)
            tokens = [await client.mint(" ".join(SCOPES)) for _ in range(201)]
            assert await trust.admit(key, stored(tokens[0]), NoPurge())  # fetches the JWKS once
            started = time.perf_counter()
            for value in tokens[1:]:
                assert await trust.admit(key, stored(value), NoPurge())
            first = (time.perf_counter() - started) / (len(tokens) - 1)
            again = stored(tokens[-1])
            started = time.perf_counter()
            for _ in range(10_000):
                await trust.admit(key, again, NoPurge())
            cached = (time.perf_counter() - started) / 10_000
            kid = jwt.get_unverified_header(tokens[0])["kid"]
            claims = jwt.decode(tokens[0], options={"verify_signature": False})
            attacker = ec.generate_private_key(ec.SECP256R1())
            forged = [
                jwt.encode(claims | {"jti": f"forged-{n}"}, attacker, algorithm="ES256", headers={"kid": kid})
                for n in range(forged_count)
            ]
            before = status_kib(os.getpid(), "VmRSS")
            started = time.perf_counter()
            for value in forged:
                assert await trust.admit(key, stored(value), NoPurge()) is None
            refused = (time.perf_counter() - started) / len(forged)
            after = status_kib(os.getpid(), "VmRSS")
    finally:
        await emulator.stop()
    print(f"first admission (ES256 + claims): {first * 1e6:7.0f} us per token")
    print(f"re-read of an admitted token:     {cached * 1e6:7.1f} us")
    print(f"refusing a forged token:          {refused * 1e6:7.0f} us per token")
    growth = (after - before) / 1024
    print(f"RSS over {forged_count} forged tokens: {before} -> {after} KiB ({growth:+.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forged", type=int, default=20_000)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # one refusal line per forged token would measure the logger
    asyncio.run(run(args.forged))


if __name__ == "__main__":
    main()
