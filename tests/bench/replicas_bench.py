"""Replicas benchmark: mints per scope set per refresh period, and failed requests, for 1/3/10 replicas.

Not a pytest test. Run from the repository root::

    python -m tests.bench.replicas_bench [--seconds 60] [--replicas 1 3 10] [--no-baseline]

Real processes only: one ``redis-server``, the emulator (``credicorp-proxy
emulator``) and N ``credicorp-proxy run`` replicas sharing that Redis, under
concurrent load spread over every replica and three scope sets. Time is
compressed: a 6-second token stands for Credicorp's one-hour token (refresh
at half its life, jittered), so a 60-second run covers ten token lifetimes.
The emulator's token log is the judge: mints of one scope set are grouped into
refresh periods (mints closer than half a period belong to the same one);
the target is exactly one mint per scope set per period and zero failed
requests. A last row runs the largest fleet with ``memory://`` (no Redis)
to show what the shared tier saves. Output is also written to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))  # run as a script: python tests/bench/replicas_bench.py

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from tests.proxy_fixtures import TEST_ROUTES  # noqa: E402
from tests.redis_fixtures import RedisServer, free_port  # noqa: E402

PATHS = {
    "decisions:read": "/partner/v1/decisions/dec_demo_001",
    "applications:read": "/partner/v1/applications/app_demo_001",
    "accounts:read": "/partner/v1/accounts/acc_demo_001",
}
TOKEN_TTL_S = 6
AT_FRACTION = 0.5
PERIOD_S = TOKEN_TTL_S * AT_FRACTION
_MISSES = re.compile(
    r'^ccp_token_cache_lookups_total\{(?=.*tier="memory")(?=.*result="miss").*\} (\S+)$', re.M
)


@dataclass
class Result:
    replicas: int
    cache: str
    seconds: float = 0.0
    requests: int = 0
    failed: int = 0
    mints: int = 0
    periods: int = 0
    worst_period: int = 0
    token_errors: int = 0
    steady_misses: int = 0
    per_scope: dict[str, int] = field(default_factory=dict)

    @property
    def per_period(self) -> float:
        return self.mints / self.periods if self.periods else 0.0


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out, stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the proxy drains), SIGKILL if it does not exit; only our own children."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_up(http: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(url) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def proxy_config(emulator: str, cache_url: str, prefix: str) -> tuple[dict[str, Any], str, str]:
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    raw = {
        "upstream": {"url": emulator},
        "auth": {"issuer": emulator, "client_id": "cc_client_demo", "client_secret": "demo-secret"},
        "listen": listen,
        "admin_listen": admin,
        "cache": {"url": cache_url, "key_prefix": prefix},
        "refresh": {"at_fraction": AT_FRACTION, "min_margin_s": 0, "jitter_s": 0.5, "idle_s": 60},
        "logging": {"level": "warning", "access_log": False},
        "routes": TEST_ROUTES,
    }
    return raw, f"http://{listen}", f"http://{admin}"


class Load:
    """Closed-loop load: ``concurrency`` workers, each request to the next (replica, scope set)."""

    def __init__(self, http: aiohttp.ClientSession, proxies: list[str]) -> None:
        self.http, self.proxies = http, proxies
        self.requests = self.failed = 0
        self._turn = 0

    async def one(self) -> None:
        self._turn += 1
        base = self.proxies[self._turn % len(self.proxies)]
        path = list(PATHS.values())[(self._turn // len(self.proxies)) % len(PATHS)]
        self.requests += 1
        try:
            async with self.http.get(base + path) as resp:
                await resp.read()
                if resp.status != 200 or "X-Credicorp-Proxy-Error" in resp.headers:
                    self.failed += 1
        except (aiohttp.ClientError, TimeoutError):
            self.failed += 1

    async def run(self, seconds: float, concurrency: int) -> None:
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < deadline:
                await self.one()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def group_periods(times: list[float]) -> list[int]:
    """Sizes of the refresh periods: mints less than half a period apart belong together."""
    sizes: list[int] = []
    last = None
    for moment in sorted(times):
        if last is None or moment - last > PERIOD_S / 2:
            sizes.append(0)
        sizes[-1] += 1
        last = moment
    return sizes


async def misses(http: aiohttp.ClientSession, admins: list[str]) -> int:
    total = 0.0
    for admin in admins:
        async with http.get(admin + "/metrics") as resp:
            total += sum(float(m) for m in _MISSES.findall(await resp.text()))
    return int(total)


async def judge(http: aiohttp.ClientSession, emulator: str, result: Result) -> None:
    async with http.get(emulator + "/_emulator/requests") as resp:
        log = (await resp.json())["token_requests"]
    for scope in PATHS:
        times = [e["time"] for e in log if e.get("scope") == scope and e.get("status") == 200]
        sizes = group_periods(times)
        result.per_scope[scope] = len(times)
        result.mints += len(times)
        result.periods += len(sizes)
        result.worst_period = max([result.worst_period, *sizes])
    result.token_errors = sum(1 for e in log if e.get("status") != 200)


async def run_fleet(args: argparse.Namespace, work: Path, emulator: str, cache_url: str, n: int) -> Result:
    result = Result(n, "redis" if cache_url.startswith("redis") else "memory")
    procs: list[subprocess.Popen[bytes]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.post(emulator + "/_emulator/reset") as resp:
            assert resp.status == 204
        proxies, admins = [], []
        try:
            for i in range(n):
                raw, proxy, admin = proxy_config(emulator, cache_url, f"bench{n}{result.cache}")
                (work / f"r{n}-{i}.yaml").write_text(yaml.safe_dump(raw))
                argv = [sys.executable, "-m", "proxy", "run", "-c", str(work / f"r{n}-{i}.yaml")]
                procs.append(spawn(argv, work / f"replica-{n}-{i}.log"))
                proxies.append(proxy)
                admins.append(admin)
            for proc, admin in zip(procs, admins, strict=True):
                await wait_up(http, admin + "/healthz", proc)
            load = Load(http, proxies)
            started = time.monotonic()
            warm = asyncio.create_task(load.run(args.seconds, args.concurrency))
            await asyncio.sleep(PERIOD_S)  # cold start: the first mints happen in here
            before = await misses(http, admins)
            await warm
            result.seconds = time.monotonic() - started
            result.steady_misses = await misses(http, admins) - before
            result.requests, result.failed = load.requests, load.failed
            await judge(http, emulator, result)
        finally:
            for proc in procs:
                stop(proc)
    return result


def render(results: list[Result], args: argparse.Namespace) -> str:
    head = (
        f"replicas benchmark: token TTL {TOKEN_TTL_S} s (stands for 1 h), refresh at {AT_FRACTION:.0%} "
        f"of life + jitter -> one refresh period = {PERIOD_S:.0f} s; {args.seconds:.0f} s per fleet "
        f"(~{args.seconds / TOKEN_TTL_S:.0f} token lifetimes), {args.concurrency} concurrent clients, "
        f"{len(PATHS)} scope sets"
    )
    cols = (
        "replicas cache   requests failed  mints periods mints/scope/period worst  tok-errors  steady-misses"
    )
    lines = [head, "", cols, "-" * len(cols)]
    for r in results:
        lines.append(
            f"{r.replicas:>8} {r.cache:<6} {r.requests:>9} {r.failed:>6} {r.mints:>6} {r.periods:>7} "
            f"{r.per_period:>18.2f} {r.worst_period:>5} {r.token_errors:>11} {r.steady_misses:>14}"
        )
    lines += [
        "",
        "mints/scope/period: mints divided by refresh periods (target 1.00); worst: most mints in one period",
        "tok-errors: token-endpoint calls that failed (e.g. 429 over the 10 req/s limit)",
        "steady-misses: requests that found no usable token in memory after the first period"
        " (they waited on a mint)",
    ]
    return "\n".join(lines) + "\n"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration per fleet")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-baseline", action="store_true", help="skip the memory:// comparison row")
    parser.add_argument("--out", default="/tmp/replicas-bench.txt")
    parser.add_argument("--workdir", help="keep configs and process logs here (default: a temporary dir)")
    return parser.parse_args(argv)


async def bench(args: argparse.Namespace, work: Path) -> list[Result]:
    redis = RedisServer(work).start()
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "emulator", "--port", str(port), "--token-ttl", str(TOKEN_TTL_S)]
    emulator = spawn(argv, work / "emulator.log")
    results: list[Result] = []
    try:
        async with aiohttp.ClientSession() as http:
            await wait_up(http, f"http://127.0.0.1:{port}/.well-known/openid-configuration", emulator)
        fleets = [(n, redis.url) for n in args.replicas]
        if not args.no_baseline:
            fleets.append((max(args.replicas), "memory://"))
        for n, url in fleets:
            print(
                f"running {n} replica(s) on {url} for {args.seconds:.0f} s ...", file=sys.stderr, flush=True
            )
            results.append(await run_fleet(args, work, f"http://127.0.0.1:{port}", url, n))
    finally:
        stop(emulator)
        redis.kill()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="ccp-replicas-bench-"))
        Path(work).mkdir(parents=True, exist_ok=True)
        results = asyncio.run(bench(args, Path(work)))
    text = render(results, args)
    print(text, end="")
    Path(args.out).write_text(text)
    redis_rows = [r for r in results if r.cache == "redis"]
    return 0 if all(r.failed == 0 and r.worst_period == 1 for r in redis_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
