"""The ``credicorp-proxy`` command: parse arguments, load config, hand over to the app.

Every failure a user can cause (a bad config, a port in use, a missing file)
ends in a plain message and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.errors import ConfigError


def _add_config(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``-c FILE``, defaulting to ``$CCP_CONFIG`` (an image can name its file once, in ENV)."""
    default = os.environ.get("CCP_CONFIG") or None
    parser.add_argument(
        "-c",
        "--config",
        required=required and default is None,
        default=default,
        metavar="FILE",
        help="YAML config (default: $CCP_CONFIG; CCP_* environment variables override its keys)",
    )


def build_parser() -> argparse.ArgumentParser:
    from proxy.emulator import cli as emulator_cli

    parser = argparse.ArgumentParser(
        prog="credicorp-proxy",
        description="Sidecar proxy that calls the Credicorp API with least-privilege OAuth tokens.",
    )
    parser.add_argument("--version", action="version", version=f"credicorp-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the proxy")
    _add_config(run, required=False)
    check = sub.add_parser("check-config", help="validate a config and print its route table")
    _add_config(check)
    check.add_argument(
        "--strict", action="store_true",
        help="also require every ${VAR} to be set and every file to be readable, as `run` does",
    )
    explain = sub.add_parser("explain", help="which route a request would match, and its scopes")
    _add_config(explain)
    explain.add_argument("method")
    explain.add_argument("path")
    demo = sub.add_parser("demo", help="emulator + proxy on localhost, no set-up needed")
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    demo.add_argument("--admin-port", type=int, default=9090)
    demo.add_argument("--emulator-port", type=int, default=8444)
    emulator = sub.add_parser("emulator", help="run only the Credicorp emulator")
    emulator_cli.add_arguments(emulator)
    flush = sub.add_parser("flush", help="drop every cached token of this client, on every replica")
    _add_config(flush)
    health = sub.add_parser("healthcheck", help="GET /healthz on the configured admin listener (exit 0/1)")
    _add_config(health, required=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"credicorp-proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # port in use, unreadable file, ...
        print(f"credicorp-proxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from proxy import commands

    if args.command == "emulator":
        from proxy.emulator import cli as emulator_cli

        return emulator_cli.run(args)
    handlers = {
        "run": commands.run,
        "check-config": commands.check_config,
        "explain": commands.explain,
        "demo": commands.demo,
        "flush": commands.flush,
        "healthcheck": commands.healthcheck,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
