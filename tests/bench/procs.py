"""Child processes for the benchmark: spawn pinned, wait until they answer, read /proc, stop.

Only processes this benchmark started are ever signalled, each by its own pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPUS = sorted(os.sched_getaffinity(0))
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin_layout() -> tuple[set[int] | None, set[int] | None]:
    """(CPUs for the load generator and helpers, CPUs for the server under test); None = unpinned."""
    if len(CPUS) < 2:
        return None, None
    return {CPUS[0]}, {CPUS[1]}


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    cpus: set[int] | None = None,
    log: IO[bytes] | None = None,
    env: dict[str, str] | None = None,
) -> Child:
    """Start ``argv`` from the repository root, pinned to ``cpus`` from its first instruction."""

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    out = log if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        list(argv),
        cwd=ROOT,
        stdout=out,
        stderr=out,
        stdin=subprocess.DEVNULL,
        preexec_fn=pin,
        env={**os.environ, **(env or {})},
    )
    return Child(name, proc, log)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def repin(pid: int, cpus: set[int] | None) -> None:
    """Move every thread of a running process to ``cpus`` (all CPUs when None)."""
    target = cpus or set(CPUS)
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), target)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (every thread), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status, e.g. VmRSS or VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def wait_http(url: str, *, timeout: float = 20.0, child: Child | None = None, want: int = 200) -> float:
    """Poll ``url`` until it answers ``want``; returns the seconds it took."""
    started = time.perf_counter()
    while True:
        if child is not None and child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == want:
                    return time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"{url} did not answer {want} within {timeout:.0f} s")
        time.sleep(0.01)
