"""``credicorp-proxy emulator``: run the Credicorp emulator until SIGINT/SIGTERM.

The main CLI (``proxy/cli.py``) calls ``add_arguments`` on its sub-parser,
only when ``emulator`` is the command, and ``run`` with the parsed namespace;
``python -m proxy.emulator`` does the same on its own parser.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from proxy.emulator.app import EmulatorServer
from proxy.emulator.state import DEMO_CLIENT, ClientSpec
from proxy.scopes import DEFAULT_AUDIENCE, KNOWN_SCOPES, PARTNER_SCOPES


def parse_client(text: str) -> ClientSpec:
    """``ID:SECRET[:SCOPE,SCOPE...]`` -> ClientSpec (no scopes = every partner scope).

    Scopes themselves contain ``:``, so only the first two colons split; a
    secret therefore cannot contain ``:``.
    """
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ID:SECRET[:SCOPE,SCOPE...]")
    scopes = frozenset(s for s in parts[2].split(",") if s) if len(parts) == 3 else PARTNER_SCOPES
    if unknown := sorted(scopes - KNOWN_SCOPES):
        raise argparse.ArgumentTypeError(f"unknown scopes: {', '.join(unknown)}")
    return ClientSpec(parts[0], (parts[1],), scopes or PARTNER_SCOPES, frozenset({DEFAULT_AUDIENCE}))


def _rate(text: str) -> float | None:
    if text.lower() in ("0", "off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a number of requests per second or 'off'"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError("the rate limit must be at least 1 request/s (or 'off')")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8444, help="port to listen on; 0 = any free port")
    parser.add_argument(
        "--client",
        action="append",
        type=parse_client,
        metavar="ID:SECRET[:SCOPE,SCOPE...]",
        help="a client to provision (repeatable); default cc_client_demo:demo-secret with every scope",
    )
    parser.add_argument(
        "--token-ttl", type=_positive_int, default=3600, metavar="SECONDS", help="token lifetime (3600)"
    )
    parser.add_argument(
        "--rate-limit",
        type=_rate,
        default=10.0,
        metavar="N",
        help="token requests per second per client (10); 'off' disables",
    )
    parser.add_argument(
        "--issuer", default=None, help="fixed issuer URL (default: the URL requests arrive on)"
    )


def _banner(server: EmulatorServer, clients: list[ClientSpec]) -> str:
    first = clients[0]
    scope = "decisions:read" if "decisions:read" in first.scopes else min(first.scopes, default="")
    lines = [f"Credicorp emulator listening on {server.url}"]
    lines += [
        f"  client {c.client_id} / {c.secrets[0]}  scopes: {' '.join(sorted(c.scopes))}" for c in clients
    ]
    lines += [
        f"  discovery: {server.url}/.well-known/openid-configuration",
        f"  control:   {server.url}/_emulator/stats  (test use only: never expose this port)",
        f"  try: curl -s {server.url}/oauth/token -d grant_type=client_credentials"
        f" -d client_id={first.client_id} -d client_secret={first.secrets[0]} -d 'scope={scope}'",
    ]
    return "\n".join(lines)


async def serve(args: argparse.Namespace) -> None:
    """Run until SIGINT or SIGTERM, then close every connection."""
    clients = args.client or [DEMO_CLIENT]
    server = EmulatorServer(
        host=args.host,
        port=args.port,
        clients=clients,
        token_ttl=args.token_ttl,
        rate_limit=args.rate_limit,
        issuer=args.issuer,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        print(_banner(server, clients), flush=True)
        await stop.wait()
    print("emulator stopped", flush=True)


def run(args: argparse.Namespace) -> int:
    """Exit status 0 after a signal; 1 when the address cannot be bound or a client is invalid."""
    try:
        asyncio.run(serve(args))
    except OSError as err:
        print(f"emulator: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"emulator: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.emulator", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
