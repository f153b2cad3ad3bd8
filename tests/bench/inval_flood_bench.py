"""Throughput of one proxy while someone floods its Redis invalidation channel with "drop everything".

Not a pytest test. Run from the repository root::

    python -m tests.bench.inval_flood_bench [--seconds 8] [--rounds 2] [--key] [--proxy-root /work/main]

Real processes only: a ``redis-server``, the emulator (tokens), the fast
upstream (``tests.bench.upstream``), and ``python -m proxy run`` with the Redis
tier, pinned to its own CPU when there are two. ``wrk`` loads the proxy for
``--seconds`` without a flood, then for the same time while
``tests.inval_flood`` publishes well-formed drop-alls from another process as
fast as one client can, and for the same time with the flood on another
channel (a control: the same load on the machine, nothing for the proxy to
read). Rounds alternate; each row is the median. After each flood the proxy's
subscription is disconnected (``CLIENT KILL TYPE pubsub``: its backlog in Redis
goes with it) so the next round starts clean. The invalidation counters are
read from ``/metrics`` at the end.
``--key`` sets ``cache.encryption_key_file`` (the flood is then unsigned and
refused before parsing); ``--proxy-root`` runs the proxy from another checkout
(e.g. main) with the same harness, for a before/after comparison.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from tests.bench import procs
from tests.bench.loadgen import Wrk, WrkResult, ensure_wrk
from tests.bench.procs import Child, python_module, spawn, wait_http
from tests.inval_flood import start_flood
from tests.redis_fixtures import RedisServer

GET_PATH = "/partner/v1/decisions/dec_bench_0001"
KINDS = {
    "calm": "no flood",
    "control": "flood on another channel (same load on the machine)",
    "flood": "drop-all flood on the proxy's channel",
}
_SAMPLE = re.compile(
    r"^(ccp_invalidations_total|ccp_token_cache_lookups_total|ccp_redis_errors_total)\{(.*)\} (\S+)$"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each load round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each kind (alternating)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--key", action="store_true", help="set cache.encryption_key_file")
    parser.add_argument("--nice", type=int, default=19, help="CPU niceness of the flood publisher")
    parser.add_argument("--rate", type=float, default=0, help="flood messages/s (0: as fast as it can)")
    parser.add_argument("--proxy-root", type=Path, default=procs.ROOT, help="checkout to run the proxy from")
    return parser.parse_args(argv)


def metrics(admin: str) -> dict[str, float]:
    with urllib.request.urlopen(admin + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            found[f"{match[1]}{{{match[2]}}}"] = float(match[3])
    return found


def pick(samples: dict[str, float], family: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v for name, v in samples.items() if name.startswith(family + "{") and all(w in name for w in want)
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    helper_cpus, server_cpus = procs.pin_layout()
    tmp = Path(tempfile.mkdtemp(prefix="ccp-flood-bench-"))
    children: list[Child] = []
    wrk = Wrk(ensure_wrk(), helper_cpus)
    redis_server = RedisServer(tmp)
    try:
        redis_server.start()
        procs.repin(redis_server.process.pid if redis_server.process else 0, helper_cpus)
        emu_port, up_port, port, admin_port = (procs.free_port() for _ in range(4))
        children.append(
            spawn("emulator", python_module("proxy.emulator", "--port", str(emu_port)), cpus=helper_cpus)
        )
        children.append(
            spawn("upstream", python_module("tests.bench.upstream", str(up_port)), cpus=helper_cpus)
        )
        emulator, upstream = f"http://127.0.0.1:{emu_port}", f"http://127.0.0.1:{up_port}"
        wait_http(emulator + "/.well-known/openid-configuration", child=children[0])
        wait_http(upstream + GET_PATH, child=children[1])
        cache: dict[str, object] = {"url": redis_server.url}
        if args.key:
            key_file = tmp / "cache-key"
            key_file.write_text(f"k1:{base64.b64encode(os.urandom(32)).decode()}\n")
            cache["encryption_key_file"] = str(key_file)
        config = tmp / "proxy.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "upstream": {"url": upstream},
                    "auth": {
                        "issuer": emulator,
                        "client_id": "cc_client_demo",
                        "client_secret": "demo-secret",
                    },
                    "listen": f"127.0.0.1:{port}",
                    "admin_listen": f"127.0.0.1:{admin_port}",
                    "cache": cache,
                    "logging": {"level": "warning"},
                    "routes": [
                        {
                            "name": "decisions",
                            "methods": ["GET"],
                            "path": "/partner/v1/decisions/**",
                            "scopes": ["decisions:read"],
                        }
                    ],
                }
            )
        )
        proxy = start_proxy(config, args.proxy_root, server_cpus, tmp / "proxy.log")
        children.append(proxy)
        admin, url = f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{port}"
        wait_http(admin + "/healthz", child=proxy, timeout=60)
        wait_http(url + GET_PATH, child=proxy, timeout=30)
        wrk.run(url + GET_PATH, seconds=2, connections=args.connections)  # warm-up
        rows: dict[str, list[tuple[WrkResult, float]]] = {kind: [] for kind in KINDS}
        sent = 0
        for _ in range(args.rounds):
            for kind in KINDS:
                flood = None
                if kind != "calm":
                    channel = "ccp:inval" if kind == "flood" else "elsewhere"
                    flood = start_flood(
                        redis_server.port, channel, args.seconds + 1, nice=args.nice, rate=args.rate
                    )
                    if helper_cpus:
                        procs.repin(flood.pid, helper_cpus)
                before = proxy.cpu_seconds()
                result = wrk.run(url + GET_PATH, seconds=args.seconds, connections=args.connections)
                rows[kind].append((result, (proxy.cpu_seconds() - before) / max(result.requests, 1) * 10_000))
                if flood is not None:
                    count = int(flood.communicate(timeout=60)[0])
                    sent += count if kind == "flood" else 0
                    reset_subscriber(redis_server)
        report(args, rows, sent, metrics(admin))
        return 0
    finally:
        for child in reversed(children):
            child.stop()
        redis_server.kill()
        wrk.close()
        shutil.rmtree(tmp, ignore_errors=True)


def report(
    args: argparse.Namespace,
    rows: dict[str, list[tuple[WrkResult, float]]],
    sent: int,
    samples: dict[str, float],
) -> None:
    key, rate = ("yes" if args.key else "no"), (f"{args.rate:,.0f}/s" if args.rate else "as fast as it can")
    print(
        f"\nproxy from {args.proxy_root}, cache key: {key}, flood {rate}, {args.rounds} x {args.seconds:g} s,"
    )
    print(f"{args.connections} connections, CPUs {procs.CPUS} (proxy pinned to the last)")
    print("| run | requests/s (median) | of no flood | errors | proxy CPU s / 10k requests |")
    print("|---|---|---|---|---|")
    calm = statistics.median(r.rps for r, _ in rows["calm"])
    for kind, label in KINDS.items():
        rps = statistics.median(r.rps for r, _ in rows[kind])
        errors = sum(r.errors for r, _ in rows[kind])
        cpu = statistics.median(c for _, c in rows[kind])
        print(f"| {label} | {rps:,.0f} | {rps / calm:.0%} | {errors} | {cpu:.2f} |")
    print(f"\nflood on the proxy's channel: {sent:,} messages in {args.rounds} x {args.seconds + 1:g} s")
    for result in ("applied", "coalesced", "unauthenticated", "malformed", "stale"):
        count = pick(samples, "ccp_invalidations_total", result=result)
        print(f"  ccp_invalidations_total{{result={result!r}}} = {count:,.0f}")
    misses = pick(samples, "ccp_token_cache_lookups_total", tier="memory", result="miss")
    print(f"  memory misses = {misses:,.0f}")


def reset_subscriber(server: RedisServer) -> None:
    """Disconnect the proxy's subscription (its backlog goes with it) and wait until it is back."""
    with server.client() as raw:
        raw.client_kill_filter(_type="pubsub")
        deadline = time.monotonic() + 30
        while dict(raw.pubsub_numsub("ccp:inval")).get(b"ccp:inval", 0) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the proxy did not re-subscribe")
            time.sleep(0.05)


def start_proxy(config: Path, root: Path, cpus: set[int] | None, log_path: Path) -> Child:
    """``python -m proxy run`` from ``root`` (this checkout or another), pinned to ``cpus``."""
    log = log_path.open("wb")

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    argv = [sys.executable, "-m", "proxy", "run", "-c", str(config)]
    proc = subprocess.Popen(argv, cwd=root, stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=pin)
    return Child("proxy", proc, log)


if __name__ == "__main__":
    raise SystemExit(main())
