"""Side-by-side benchmark: upstream direct, a hand-written pass-through, and this proxy.

    python -m tests.bench.proxy_bench            # about 4 minutes
    python -m tests.bench.proxy_bench --quick    # about 80 seconds

In one run on one machine it starts, each in its own process:

* a fast local upstream (``tests.bench.upstream``: low-level aiohttp, no token check);
* the Credicorp emulator, only to mint the real tokens the proxy and the baseline send;
* (b) the hand-written pass-through (``tests.bench.passthrough``) with a fixed token;
* (c) this proxy, ``python -m proxy run -c FILE``, with everything on: the shipped
  partner/v1 route table, metrics, JSON access logging at INFO (to a file), memory cache;
* (d) the same with the Redis tier (a ``redis-server`` on a free port);
* (e) full mode only: N proxy workers sharing the port (SO_REUSEPORT) and the Redis tier.

and loads each with ``wrk`` (keep-alive, warm-up, several rounds, median). The
server under test is pinned to one CPU and wrk plus the helpers to the other,
so every row gets the same single core. It prints a Markdown table and writes
it to ``/tmp/bench-latest.md``. Not a pytest test: nothing here is collected.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.bench import procs
from tests.bench.loadgen import Wrk, WrkResult, ensure_wrk, wrk_version
from tests.bench.procs import Child, python_module, spawn, status_kib, wait_http
from tests.bench.streaming import StreamResult, stream_through

CLIENT_ID, CLIENT_SECRET = "cc_client_demo", "demo-secret"
GET_PATH = "/partner/v1/decisions/dec_bench_0001"
DOWNLOAD_PATH = "/partner/v1/decisions/dec_bench_download"
ROUTE_TABLES = ("proxy/data/credicorp-partner-v1.yaml", "config/credicorp-partner-v1.yaml")
OUT = Path("/tmp/bench-latest.md")


# ------------------------------------------------------------------ options
@dataclass(frozen=True)
class Plan:
    quick: bool
    warmup_s: float
    round_s: float
    rounds: int
    connections: int
    threads: int
    paced_s: float
    stream_bytes: int
    workers: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = args.quick
        return cls(
            quick=quick,
            warmup_s=args.warmup if args.warmup is not None else (1.0 if quick else 3.0),
            round_s=args.duration if args.duration is not None else (3.0 if quick else 10.0),
            rounds=args.rounds,
            connections=args.connections,
            threads=args.threads,
            paced_s=3.0 if quick else 6.0,
            stream_bytes=args.stream_mib * 2**20,
            workers=args.workers if args.workers is not None else (0 if quick else 2),
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.proxy_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 x 3 s rounds, no worker row")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=None, help="seconds per round (10; quick 3)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of warm-up (3; quick 1)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stream-mib", type=int, default=1024, help="size of the streaming test")
    parser.add_argument("--workers", type=int, default=None, help="row (e) workers; 0 = skip (quick)")
    parser.add_argument("--only", default="abcde", help="rows to run, e.g. 'bc' (a is always run)")
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


# ------------------------------------------------------------------ results
@dataclass
class Row:
    key: str
    name: str
    rounds: list[WrkResult] = field(default_factory=list)
    cpu_per_10k: list[float] = field(default_factory=list)
    peak_rss_kib: int = 0
    note: str = ""
    paced: WrkResult | None = None
    startup_s: float | None = None
    mints_during_load: int | None = None

    @property
    def ok(self) -> bool:
        return bool(self.rounds)

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.rounds)

    @property
    def p50(self) -> float:
        return statistics.median(r.p50_ms for r in self.rounds)

    @property
    def p99(self) -> float:
        return statistics.median(r.p99_ms for r in self.rounds)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_per_10k)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.rounds)


@dataclass
class Target:
    """Something to load: its URL, the pids whose CPU and RSS count, optional set-up around the load."""

    row: Row
    url: str
    pids: list[int]
    around: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext


# ------------------------------------------------------------------ helpers
def http_json(url: str, data: bytes | None = None) -> Any:
    request = urllib.request.Request(url, data=data)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def http_status(url: str, method: str = "GET", body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def mint_token(emulator: str, scope: str) -> str:
    form = urllib.parse.urlencode(
        {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scope": scope,
        }
    ).encode()
    return str(http_json(emulator + "/oauth/token", form)["access_token"])


def token_calls(emulator: str) -> int:
    """Every call the token endpoint has seen (issued or refused)."""
    stats = http_json(emulator + "/_emulator/stats")
    return int(stats.get("token_requests", stats.get("tokens_issued", 0)))


def shipped_routes() -> tuple[list[dict[str, Any]], str]:
    for relative in ROUTE_TABLES:
        path = procs.ROOT / relative
        if path.exists():
            data = yaml.safe_load(path.read_text())
            routes = data["routes"] if isinstance(data, dict) else data
            return routes, f"{relative} ({len(routes)} routes)"
    raise SystemExit(f"no shipped route table yet (looked for {', '.join(ROUTE_TABLES)})")


def concrete_path(pattern: str) -> str:
    parts = ["bench" if p in ("*", "**") or p.startswith("{") else p for p in pattern.split("/")]
    return "/".join(parts)


def upload_paths(routes: list[dict[str, Any]]) -> Iterator[str]:
    """Paths of routes that take a POST (or PUT), for the upload test, most specific first."""
    for route in routes:
        methods = {m.upper() for m in route.get("methods", [])}
        if methods & {"POST", "PUT", "*"}:
            yield concrete_path(str(route["path"]))


def proxy_config(
    directory: Path,
    name: str,
    *,
    upstream: str,
    emulator: str,
    routes: list[dict[str, Any]],
    port: int,
    admin_port: int,
    cache_url: str,
    reuse_port: bool = False,
) -> Path:
    raw = {
        "upstream": {"url": upstream, "timeout_s": 300},  # 1 GiB streams take longer than the 30 s default
        "auth": {"issuer": emulator, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "cache": {"url": cache_url},
        "reuse_port": reuse_port,
        "logging": {"level": "info", "access_log": True},
        "routes": routes,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start_redis(cpus: set[int] | None) -> tuple[Child, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
    port = procs.free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    child = spawn("redis", argv, cpus=cpus)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(16).startswith(b"+PONG"):
                return child, port
        time.sleep(0.05)
    child.stop()
    raise RuntimeError("redis-server did not answer PING")


# ------------------------------------------------------------------ the run
class Bench:
    def __init__(self, plan: Plan, only: str) -> None:
        self.plan = plan
        self.only = only
        self.helper_cpus, self.server_cpus = procs.pin_layout()
        self.children: list[Child] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="ccp-bench-"))
        self.wrk = Wrk(ensure_wrk(), self.helper_cpus)
        self.rows: list[Row] = []
        self.streams: list[StreamResult] = []
        self.notes: list[str] = []
        self.mints_at_start = 0
        self.routes: list[dict[str, Any]] = []
        self.route_source = "(no proxy row)"
        self.access_log_lines = 0
        self.loadavg = ""
        self.upload_path = ""
        self.paced_rate, self.paced_delay_ms, self.paced_connections = 0.0, 10, 2

    def child(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.wrk.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def log_file(self, name: str) -> Any:
        return (self.tmp / f"{name}.log").open("wb")

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- set-up
    def start_helpers(self) -> None:
        self.say("starting the emulator and the fast upstream ...")
        emu_port, up_port = procs.free_port(), procs.free_port()
        emulator = self.child(
            spawn(
                "emulator",
                python_module("proxy.emulator", "--port", str(emu_port)),
                cpus=self.helper_cpus,
                log=self.log_file("emulator"),
            )
        )
        self.emulator = f"http://127.0.0.1:{emu_port}"
        upstream = self.child(
            spawn("upstream", python_module("tests.bench.upstream", str(up_port)), cpus=self.helper_cpus)
        )
        self.upstream_child = upstream
        self.upstream = f"http://127.0.0.1:{up_port}"
        wait_http(self.emulator + "/.well-known/openid-configuration", child=emulator)
        wait_http(self.upstream + GET_PATH, child=upstream)

    def start_baseline(self) -> Target:
        port = procs.free_port()
        token = mint_token(self.emulator, "decisions:read")
        argv = python_module("tests.bench.passthrough", str(port), self.upstream, token)
        child = self.child(spawn("baseline", argv, cpus=self.server_cpus, log=self.log_file("baseline")))
        url = f"http://127.0.0.1:{port}"
        wait_http(url + GET_PATH, child=child)
        return Target(Row("b", "hand-written aiohttp pass-through, fixed token (baseline)"), url, [child.pid])

    def start_proxy(self, key: str, name: str, cache_url: str, workers: int = 1) -> Target:
        if not self.routes:
            self.routes, self.route_source = shipped_routes()
        port, admin = procs.free_port(), procs.free_port()
        config = proxy_config(
            self.tmp,
            key,
            upstream=self.upstream,
            emulator=self.emulator,
            routes=self.routes,
            port=port,
            admin_port=admin,
            cache_url=cache_url,
            reuse_port=workers > 1,
        )
        cpus = self.server_cpus if workers == 1 else None
        # Workers share the proxy port (reuse_port); each keeps its own admin port.
        admin_env: list[dict[str, str]] = [{}]
        admin_env += [{"CCP_ADMIN_LISTEN": f"127.0.0.1:{procs.free_port()}"} for _ in range(workers - 1)]
        started = time.perf_counter()
        children = [
            self.child(
                spawn(
                    f"proxy-{key}{i}",
                    python_module("proxy", "run", "-c", str(config)),
                    cpus=cpus,
                    log=self.log_file(f"proxy-{key}{i}"),
                    env=admin_env[i],
                )
            )
            for i in range(workers)
        ]
        admin_url = f"http://127.0.0.1:{admin}"
        wait_http(admin_url + "/readyz", child=children[0], timeout=60)
        startup = time.perf_counter() - started
        for extra in children[1:]:
            if extra.proc.poll() is not None:
                raise RuntimeError(f"{extra.name} exited with {extra.proc.returncode}")
        url = f"http://127.0.0.1:{port}"
        status = http_status(url + GET_PATH)
        if status != 200:
            raise RuntimeError(f"GET {GET_PATH} through the proxy answered {status}, not 200")
        row = Row(key, name, startup_s=startup)
        return Target(row, url, [c.pid for c in children])

    # ---------------------------------------------------------------- load
    def load(self, target: Target) -> Row:
        row, plan = target.row, self.plan
        self.say(f"({row.key}) {row.name}: warm-up {plan.warmup_s:g} s, {plan.rounds} x {plan.round_s:g} s")
        url = target.url + GET_PATH
        with target.around():
            self.wrk.run(url, seconds=plan.warmup_s, connections=plan.connections, threads=plan.threads)
            calls_before = token_calls(self.emulator)
            for _ in range(plan.rounds):
                cpu_before = sum(procs.cpu_seconds(p) for p in target.pids)
                result = self.wrk.run(
                    url, seconds=plan.round_s, connections=plan.connections, threads=plan.threads
                )
                cpu = sum(procs.cpu_seconds(p) for p in target.pids) - cpu_before
                row.rounds.append(result)
                row.cpu_per_10k.append(cpu / max(result.requests, 1) * 10_000)
            row.mints_during_load = token_calls(self.emulator) - calls_before
        row.peak_rss_kib = max(status_kib(p, "VmHWM") for p in target.pids)
        self.say(f"    {row.rps:,.0f} req/s  p50 {row.p50:.2f} ms  p99 {row.p99:.2f} ms")
        return row

    def paced(self, target: Target, connections: int, delay_ms: int) -> None:
        url = target.url + GET_PATH
        with target.around():
            self.wrk.run(
                url, seconds=1, connections=connections, threads=self.plan.threads, delay_ms=delay_ms
            )
            calls_before = token_calls(self.emulator)
            target.row.paced = self.wrk.run(
                url,
                seconds=self.plan.paced_s,
                connections=connections,
                threads=self.plan.threads,
                delay_ms=delay_ms,
            )
            target.row.mints_during_load = (target.row.mints_during_load or 0) + (
                token_calls(self.emulator) - calls_before
            )

    @contextlib.contextmanager
    def upstream_on_server_cpu(self) -> Iterator[None]:
        """For the direct row the upstream is the server under test: give it the server's CPU."""
        procs.repin(self.upstream_child.pid, self.server_cpus)
        try:
            yield
        finally:
            procs.repin(self.upstream_child.pid, self.helper_cpus)

    def stream(self, target: Target) -> None:
        size = self.plan.stream_bytes
        self.say(f"streaming {size / 2**20:,.0f} MiB down and up through ({target.row.key}) ...")
        upload = next(
            (p for p in upload_paths(self.routes) if http_status(target.url + p, "POST", b"{}") == 200), None
        )
        if upload is None:
            self.notes.append("streaming upload skipped: no POST route of the table answered 200")
            upload = DOWNLOAD_PATH
        self.upload_path = upload
        self.streams = stream_through(target.pids, target.url + DOWNLOAD_PATH, target.url + upload, size)

    # ---------------------------------------------------------------- all
    def run(self) -> None:
        plan = self.plan
        self.start_helpers()
        direct = Target(
            Row("a", "upstream direct (no proxy)"),
            self.upstream,
            [self.upstream_child.pid],
            around=self.upstream_on_server_cpu,
        )
        targets = [direct]
        if "b" in self.only:
            targets.append(self.start_baseline())
        calls_before_start = token_calls(self.emulator)
        if "c" in self.only:
            targets.append(self.start_proxy("c", "this proxy, everything on, memory cache", "memory://"))
        redis_port = None
        if "d" in self.only or ("e" in self.only and plan.workers > 1):
            try:
                redis, redis_port = start_redis(self.helper_cpus)
                self.child(redis)
            except RuntimeError as exc:
                self.notes.append(f"rows (d)/(e) skipped: {exc}")
        if "d" in self.only and redis_port:
            targets.append(
                self.try_proxy(
                    "d", "this proxy, everything on, memory + Redis tier", f"redis://127.0.0.1:{redis_port}/0"
                )
            )
        rows = [self.load(t) for t in targets if t is not None]
        self.mints_at_start = (
            token_calls(self.emulator) - calls_before_start - sum(r.mints_during_load or 0 for r in rows)
        )
        if "e" in self.only and redis_port and plan.workers > 1:
            workers = self.try_proxy(
                "e",
                f"this proxy, {plan.workers} workers (SO_REUSEPORT) + Redis, unpinned",
                f"redis://127.0.0.1:{redis_port}/0",
                workers=plan.workers,
            )
            if workers is not None:
                rows.append(self.load(workers))
                targets.append(workers)
        self.rows = rows
        self.run_paced([t for t in targets if t is not None and t.row.key in "abcd"])
        proxy = next((t for t in targets if t is not None and t.row.key == "c"), None)
        if proxy is not None:
            self.stream(proxy)
            self.access_log_lines = self.count_lines(self.tmp / "proxy-c0.log")

    def try_proxy(self, key: str, name: str, cache_url: str, workers: int = 1) -> Target | None:
        try:
            return self.start_proxy(key, name, cache_url, workers)
        except RuntimeError as exc:
            log = (self.tmp / f"proxy-{key}0.log").read_text(errors="replace")[-600:]
            self.notes.append(f"row ({key}) skipped: {exc}. Last log lines: {log.strip()!r}")
            return None

    def run_paced(self, targets: list[Target]) -> None:
        proxy = next((t.row for t in targets if t.row.key == "c" and t.row.ok), None)
        reference = proxy or next(t.row for t in targets if t.row.ok)
        self.paced_rate = reference.rps / 2
        self.paced_delay_ms = 10
        # rate ~ connections * 1000 / (delay + latency); assume ~1 ms of latency at half load
        self.paced_connections = max(2, round(self.paced_rate * (self.paced_delay_ms + 1) / 1000))
        self.say(
            f"latency at ~50% load: {self.paced_connections} connections, "
            f"{self.paced_delay_ms} ms mean pause -> ~{self.paced_rate:,.0f} req/s offered"
        )
        for target in targets:
            self.paced(target, self.paced_connections, self.paced_delay_ms)

    @staticmethod
    def count_lines(path: Path) -> int:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


# ------------------------------------------------------------------ report
def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=procs.ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip()


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def versions() -> str:
    import aiohttp

    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio loop (uvloop not installed)"
    return f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {loop}"


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def render(bench: Bench, wrk_name: str, elapsed: float) -> str:
    plan, rows = bench.plan, bench.rows
    by_key = {r.key: r for r in rows}
    base = by_key.get("b")
    direct = by_key.get("a")
    pin = (
        f"server under test pinned to CPU {sorted(bench.server_cpus)[0]}, wrk + upstream + emulator to CPU "
        f"{sorted(bench.helper_cpus)[0]} (sched_setaffinity, as taskset)"
        if bench.server_cpus and bench.helper_cpus
        else "unpinned (fewer than 2 CPUs)"
    )
    dirty = len(_git("status", "--porcelain", "--", "proxy").splitlines())
    lines = [
        f"## Benchmark: `python -m tests.bench.proxy_bench{' --quick' if plan.quick else ''}`",
        "",
        f"- when: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}, run took {elapsed:.0f} s; "
        f"commit {_git('rev-parse', '--short', 'HEAD')}"
        + (f" + {dirty} uncommitted file(s) under proxy/" if dirty else ""),
        f"- machine: {machine()}; load average before the run {bench.loadavg}",
        f"- {versions()}; {wrk_name}",
        f"- load: wrk -t{plan.threads} -c{plan.connections}, keep-alive, GET {GET_PATH} "
        f"(~200-byte JSON answer); warm-up {plan.warmup_s:g} s then {plan.rounds} rounds x "
        f"{plan.round_s:g} s, median shown; {pin}",
        f"- route table: {bench.route_source}; proxy access log: JSON at INFO to a file"
        + (f" ({bench.access_log_lines:,} lines written by (c))" if bench.access_log_lines else ""),
        "",
        "| | target | req/s | p50 ms | p99 ms | CPU s / 10k req | peak RSS MiB | req/s vs (b) "
        "| p99 vs (b) | rounds req/s |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        errors = f" **{r.errors} errors**" if r.errors else ""
        lines.append(
            f"| ({r.key}) | {r.name}{errors} | {r.rps:,.0f} | {r.p50:.2f} | {r.p99:.2f} | {r.cpu:.2f} | "
            f"{r.peak_rss_kib / 1024:.1f} | {_ratio(r.rps, base.rps if base else None)} | "
            f"{_ratio(r.p99, base.p99 if base else None)} | "
            + " / ".join(f"{x.rps:,.0f}" for x in r.rounds)
            + " |"
        )
    lines += _paced_section(bench, direct)
    lines += _stream_section(bench)
    lines += _startup_section(bench, rows)
    lines += _targets_section(bench, by_key)
    if bench.notes:
        lines += ["", "Notes:", *(f"- {n}" for n in bench.notes)]
    return "\n".join(lines) + "\n"


def _paced_section(bench: Bench, direct: Row | None) -> list[str]:
    paced = [r for r in bench.rows if r.paced is not None]
    if not paced:
        return []
    out = [
        "",
        f"Latency at ~50 % of (c)'s max throughput: wrk -c{bench.paced_connections}, each connection pausing "
        f"a random 0.5-1.5 x {bench.paced_delay_ms} ms between requests (wrk2 is not in Debian; closed loop, "
        f"{bench.plan.paced_s:g} s after a 1 s warm-up).",
        "",
        "| | target | achieved req/s | p50 ms | p99 ms | added p50 over direct |",
        "|---|---|--:|--:|--:|--:|",
    ]
    base = direct.paced.p50_ms if direct and direct.paced else None
    for r in paced:
        assert r.paced is not None
        added = f"{(r.paced.p50_ms - base) * 1000:+.0f} us" if base is not None and r.key != "a" else "-"
        out.append(
            f"| ({r.key}) | {r.name} | {r.paced.rps:,.0f} | {r.paced.p50_ms:.2f} | {r.paced.p99_ms:.2f} | "
            f"{added} |"
        )
    return out


def _stream_section(bench: Bench) -> list[str]:
    if not bench.streams:
        return []
    out = [
        "",
        f"Streaming through (c) (download GET {DOWNLOAD_PATH}?bytes=N from the upstream; upload POST "
        f"{bench.upload_path}), proxy RSS sampled every 20 ms:",
        "",
        "| direction | bytes | seconds | MiB/s | RSS before MiB | RSS peak MiB | RSS after MiB | complete |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for s in bench.streams:
        out.append(
            f"| {s.direction} | {s.moved:,} | {s.seconds:.1f} | {s.mib_per_s:,.0f} | "
            f"{s.rss_before_kib / 1024:.1f} | {s.rss_peak_kib / 1024:.1f} | {s.rss_after_kib / 1024:.1f} | "
            f"{'yes' if s.ok else f'NO (status {s.status})'} |"
        )
    return out


def _startup_section(bench: Bench, rows: list[Row]) -> list[str]:
    out = ["", "Start-up and token endpoint:", ""]
    for r in rows:
        if r.startup_s is not None:
            out.append(
                f"- ({r.key}) spawn of `python -m proxy run -c FILE` to first `/readyz` 200: "
                f"{r.startup_s * 1000:,.0f} ms"
            )
    during = {r.key: r.mints_during_load for r in rows if r.key in "cde" and r.mints_during_load is not None}
    out.append(
        f"- token-endpoint calls (emulator `/_emulator/stats`): {bench.mints_at_start} at start-up/warm-up "
        f"(one per scope set prefetched or first used); during measured load: "
        + ", ".join(f"({k}) {v}" for k, v in during.items())
    )
    return out


def _targets_section(bench: Bench, by_key: dict[str, Row]) -> list[str]:
    base, direct, proxy = by_key.get("b"), by_key.get("a"), by_key.get("c")
    if not (base and proxy):
        return []
    checks = [
        ("throughput >= 1.0x baseline", proxy.rps / base.rps >= 1.0, f"{proxy.rps / base.rps:.2f}x"),
        ("p99 <= 1.25x baseline", proxy.p99 / base.p99 <= 1.25, f"{proxy.p99 / base.p99:.2f}x"),
    ]
    if proxy.paced and direct and direct.paced:
        added = proxy.paced.p50_ms - direct.paced.p50_ms
        checks.append(("added p50 over direct <= 1 ms at ~50 % load", added <= 1.0, f"{added:.2f} ms"))
    worst = max((r.peak_rss_kib for r in bench.rows if r.key in "cde"), default=0) / 1024
    checks.append(("peak RSS <= 80 MB per process", worst <= 80 * 1e6 / 2**20, f"{worst:.1f} MiB"))
    if bench.streams:
        growth = max(s.rss_peak_kib - s.rss_before_kib for s in bench.streams) / 1024
        flat = growth <= 16 and all(s.ok for s in bench.streams)
        checks.append(("flat memory streaming (peak - before <= 16 MiB)", flat, f"+{growth:.1f} MiB"))
    mints = sum(r.mints_during_load or 0 for r in bench.rows if r.key in "cde")
    checks.append(("zero token-endpoint calls during load", mints == 0, str(mints)))
    out = ["", "Targets (issue 7), (c) against (b) and (a) from this run:", ""]
    out += [f"- [{'x' if ok else ' '}] {what}: {value}" for what, ok, value in checks]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.from_args(args)
    started = time.perf_counter()
    bench = Bench(plan, "a" + args.only)
    bench.loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    try:
        bench.run()
    finally:
        bench.close()
    report = render(bench, wrk_version(bench.wrk.binary), time.perf_counter() - started)
    print(report)
    args.out.write_text(report)
    print(f"(written to {args.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
