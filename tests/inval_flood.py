"""A flood of invalidation messages from another process, as fast as one Redis client can publish.

Used by tests/test_redis_pubsub_trust.py (bounded: a few seconds) and by
tests/bench/inval_flood_bench.py. A separate process, so the flood does not share
the event loop (or the GIL) with the proxy it attacks. It prints how many it sent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: What the attack sends: a well-formed "drop everything" that needs no key to build.
DROP_ALL = '{"o":"flood","k":null,"d":null}'

_SCRIPT = """
import sys, time
import redis
port, channel, message = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
seconds, rate = float(sys.argv[4]), float(sys.argv[5])
client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
sent = 0
start = time.monotonic()
while time.monotonic() - start < seconds:
    pipe = client.pipeline(transaction=False)
    for _ in range(200):
        pipe.publish(channel, message)
    pipe.execute()
    sent += 200
    if rate:
        time.sleep(max(0.0, start + sent / rate - time.monotonic()))
print(sent, flush=True)
"""


def start_flood(
    port: int, channel: str, seconds: float, message: str = DROP_ALL, *, nice: int = 0, rate: float = 0
) -> subprocess.Popen[str]:
    """Start publishing ``message`` on ``channel`` for ``seconds``; ``communicate()`` gives the count.

    ``rate`` caps messages a second (0: as fast as the client can).
    ``nice`` lowers the publisher's CPU priority: on a small machine a full-speed publisher
    otherwise starves the load generator too, and the benchmark would measure that.
    """
    argv = [sys.executable, "-c", _SCRIPT, str(port), channel, message, str(seconds), str(rate)]
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )
