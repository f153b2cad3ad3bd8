"""Header-bomb attack on the proxy's listeners, and the proxy's memory before and after the fix.

Not a pytest test. Run from the repository root::

    python -m tests.bench.attack_bench compare [--before /work/main] [--connections 50] [--lines 100]

starts the emulator, then for each source tree (``--before``, default the
main checkout, and this one) and each listener (proxy, admin) a fresh
``credicorp-proxy run`` process from that tree, and sends the attack: every
connection a request line, then ``--lines`` header lines of 8 KB and never
the blank line that ends a head. The proxy process's VmRSS
(``/proc/PID/status``) is read before, while the connections are held, and
after they closed; the table shows both trees side by side, with what the
clients were answered.

    python -m tests.bench.attack_bench bomb URL [--connections 50] [--lines 100]

is the attack alone, used by ``tests/test_limits_wire.py`` so that the
attacking clients' own buffers are in another process than the proxy whose
memory the test measures: it prints one JSON report line once everything is
sent (or refused), then holds the connections open until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))  # run as a script: python tests/bench/attack_bench.py

import yaml  # noqa: E402

from tests.bench.procs import free_port, status_kib, wait_http  # noqa: E402
from tests.proxy_fixtures import base_config  # noqa: E402

LINE_BYTES = 8000
READ_ANSWER_S = 1.0
MiB = 1024 * 1024


# ----------------------------------------------------------------- the attack
async def _one_bomb(url: str, lines: int) -> tuple[asyncio.StreamWriter | None, str]:
    """One connection: a request line, ``lines`` 8 KB header lines, no end of head.

    Returns the writer (to hold the connection) and what happened: ``held``
    (everything sent, no answer), an HTTP status the proxy answered with, or
    ``closed`` / ``refused``.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return None, "refused"
    value = b"v" * LINE_BYTES
    try:
        writer.write(b"GET /partner/v1/decisions/dec_demo_001 HTTP/1.1\r\nHost: proxy.test\r\n")
        for i in range(lines):
            writer.write(b"X-Bomb-%d: %s\r\n" % (i, value))
            await writer.drain()
    except ConnectionError:
        pass  # the proxy stopped the attack: what it answered (if anything) is read below
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), READ_ANSWER_S)
        return writer, head.split()[1].decode() if head.startswith(b"HTTP/") else "garbage"
    except TimeoutError:
        return writer, "held"
    except (asyncio.IncompleteReadError, ConnectionError):
        return writer, "closed"


async def header_bomb(
    url: str, connections: int, lines: int
) -> tuple[list[asyncio.StreamWriter], Counter[str]]:
    results = await asyncio.gather(*(_one_bomb(url, lines) for _ in range(connections)))
    return [w for w, _ in results if w is not None], Counter(outcome for _, outcome in results)


def _close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()


async def _bomb_command(args: argparse.Namespace) -> int:
    writers, outcomes = await header_bomb(args.url, args.connections, args.lines)
    print(json.dumps({"outcomes": dict(outcomes)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test is done
    _close_all(writers)
    return 0


# -------------------------------------------------------------- the comparison
def _rss_mib(pid: int) -> float:
    return status_kib(pid, "VmRSS") / 1024


def _start_proxy(tree: Path, emulator_url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port, admin_port = free_port(), free_port()
    raw = base_config(emulator_url) | {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "logging": {"level": "warning", "access_log": False},
    }
    config = workdir / f"config-{port}.yaml"
    config.write_text(yaml.safe_dump(raw))
    # cwd=tree: ``python -m proxy`` imports the package of the tree it runs in.
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(config)],
        cwd=tree, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{admin_port}/healthz")
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"


async def _measure(tree: Path, listener: str, emulator_url: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        proc, proxy_url, admin_url = _start_proxy(tree, emulator_url, Path(workdir))
        try:
            await asyncio.sleep(0.5)  # start-up allocations (the warm-up task) settle
            before = _rss_mib(proc.pid)
            writers, outcomes = await header_bomb(
                proxy_url if listener == "proxy" else admin_url, args.connections, args.lines
            )
            during = _rss_mib(proc.pid)
            _close_all(writers)
            await asyncio.sleep(1.0)
            after = _rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)
    return {"before": before, "during": during, "after": after, "outcomes": dict(outcomes)}


async def _compare_command(args: argparse.Namespace) -> int:
    trees = {"before": Path(args.before).resolve(), "after": ROOT}
    emulator_port = free_port()
    emulator = subprocess.Popen(
        [sys.executable, "-m", "proxy", "emulator", "--port", str(emulator_port)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        emulator_url = f"http://127.0.0.1:{emulator_port}"
        wait_http(emulator_url + "/.well-known/openid-configuration")
        print(
            f"header bomb: {args.connections} connections x {args.lines} header lines of {LINE_BYTES} bytes,"
            " no end of head; proxy process VmRSS in MiB"
        )
        print(f"{'listener':9} {'tree':7} {'before':>7} {'held':>7} {'growth':>7} {'closed':>7}  answers")
        for listener in ("proxy", "admin"):
            for name, tree in trees.items():
                started = time.perf_counter()
                m = await _measure(tree, listener, emulator_url, args)
                print(
                    f"{listener:9} {name:7} {m['before']:7.1f} {m['during']:7.1f}"
                    f" {m['during'] - m['before']:7.1f} {m['after']:7.1f}  {m['outcomes']}"
                    f"  ({time.perf_counter() - started:.1f} s)",
                    flush=True,
                )
    finally:
        emulator.terminate()
        emulator.wait(10)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bomb = sub.add_parser("bomb", help="the attack alone; holds the connections until stdin closes")
    bomb.add_argument("url")
    compare = sub.add_parser("compare", help="proxy RSS under the attack, two source trees side by side")
    compare.add_argument("--before", default="/work/main", help="the source tree to compare with")
    for command in (bomb, compare):
        command.add_argument("--connections", type=int, default=50)
        command.add_argument("--lines", type=int, default=100)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_bomb_command(args) if args.command == "bomb" else _compare_command(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
