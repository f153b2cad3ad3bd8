"""``wrk`` as the load generator: keep-alive connections, optional pacing, a JSON summary per run.

Pacing (for "latency at 50 % of max throughput"): wrk2 is not in Debian, so
each wrk connection waits a random 0.5-1.5 x ``delay_ms`` after every
response before it sends the next request (wrk's Lua ``delay()`` hook). The
offered rate is then about ``connections * 1000 / (delay_ms + latency)``,
nearly independent of the target's latency; wrk times each request from its
first byte written to the last byte read, so the pause is not in the latency.
This is a closed loop: at 50 % load queueing is small, but unlike wrk2 it does
not correct for coordinated omission.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_LUA = r"""
local pace = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
if pace > 0 then
  local low, high = math.max(1, math.floor(pace / 2)), math.floor(pace * 3 / 2)
  function delay()
    return math.random(low, high)
  end
end
local method = os.getenv("BENCH_METHOD")
if method then
  wrk.method = method
  wrk.body = os.getenv("BENCH_BODY") or ""
  wrk.headers["Content-Type"] = "application/json"
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts and non-2xx/3xx answers

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def ensure_wrk() -> str:
    """The wrk binary; installed from Debian when missing and we are root, else a clear failure."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("wrk is not installed; install it with: sudo apt-get install -y wrk")
    print("wrk not found: apt-get install -y wrk", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "wrk"], env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "wrk"], env=env, check=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is still missing after apt-get install -y wrk")
    return found


def wrk_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).split("[")[0].strip() or "wrk"


class Wrk:
    def __init__(self, binary: str, cpus: set[int] | None) -> None:
        self.binary = binary
        self.cpus = cpus
        self._dir = tempfile.TemporaryDirectory(prefix="ccp-bench-wrk-")
        self.script = Path(self._dir.name) / "report.lua"
        self.script.write_text(_LUA)

    def close(self) -> None:
        self._dir.cleanup()

    def run(
        self,
        url: str,
        *,
        seconds: float,
        connections: int,
        threads: int = 2,
        delay_ms: int = 0,
        method: str | None = None,
        body: str = "",
    ) -> WrkResult:
        threads = max(1, min(threads, connections))
        argv = [
            self.binary,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "--timeout",
            "5s",
            "-s",
            str(self.script),
            url,
        ]
        env = {**os.environ, "BENCH_DELAY_MS": str(delay_ms)}
        if method:
            env.update(BENCH_METHOD=method, BENCH_BODY=body)
        cpus = self.cpus
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env,
            check=False,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            timeout=seconds + 60,
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
        if out.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        data = json.loads(line[len("BENCH ") :])
        errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
        return WrkResult(
            requests=data["requests"],
            seconds=data["duration_us"] / 1e6,
            p50_ms=data["p50_us"] / 1000,
            p99_ms=data["p99_us"] / 1000,
            errors=errors,
        )
