"""The ``credicorp-proxy`` command: parse the arguments, run the sub-command, map failures to exit codes.

Every failure a user can cause (a bad config, a port in use, a missing file)
ends in a plain message and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from proxy import commands
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
    parser = argparse.ArgumentParser(
        prog="credicorp-proxy",
        description="Sidecar proxy that calls the Credicorp API with least-privilege OAuth tokens.",
    )
    parser.add_argument("--version", action=_ShowVersion, help="show program's version number and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)
    run = sub.add_parser("run", help="run the proxy")
    _add_config(run, required=False)
    run.set_defaults(func=commands.run)
    check = sub.add_parser("check-config", help="validate a config and print its route table")
    _add_config(check)
    check.add_argument(
        "--strict", action="store_true",
        help="also require every ${VAR} to be set and every file to be readable, as `run` does",
    )
    check.set_defaults(func=commands.check_config)
    explain = sub.add_parser("explain", help="which route a request would match, and its scopes")
    _add_config(explain)
    explain.add_argument("method")
    explain.add_argument("path")
    explain.set_defaults(func=commands.explain)
    demo = sub.add_parser("demo", help="emulator + proxy on localhost, no set-up needed")
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    demo.add_argument("--admin-port", type=int, default=9090)
    demo.add_argument("--emulator-port", type=int, default=8444)
    demo.set_defaults(func=commands.demo)
    emulator = sub.add_parser("emulator", help="run only the Credicorp emulator")
    emulator.add_arguments_when_used(_emulator_arguments)
    emulator.set_defaults(func=commands.emulator)
    flush = sub.add_parser("flush", help="drop every cached token of this client, on every replica")
    _add_config(flush)
    flush.set_defaults(func=commands.flush)
    health = sub.add_parser("healthcheck", help="GET /healthz on the configured admin listener (exit 0/1)")
    _add_config(health, required=False)
    health.set_defaults(func=commands.healthcheck)
    return parser


class _ShowVersion(argparse.Action):
    """``--version`` as argparse's own prints it, but the version is looked up only when asked
    (``proxy.__version__`` costs an ``importlib.metadata`` import: see ``proxy/__init__.py``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from proxy import __version__

        print(f"credicorp-proxy {__version__}")
        parser.exit()


class _CommandParser(argparse.ArgumentParser):
    """A sub-command's parser that can add its arguments when it is first used.

    Why: the emulator declares its own arguments (``proxy.emulator.cli``), and
    importing that module loads the emulator server. Only ``credicorp-proxy
    emulator ...`` (to run it or print its ``--help``) parses with that
    sub-parser, so only then are its arguments added and the emulator loaded.
    """

    _add_deferred: Callable[[argparse.ArgumentParser], None] | None = None

    def add_arguments_when_used(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        self._add_deferred = add

    def parse_known_args(
        self, args: Iterable[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        if self._add_deferred is not None:
            add, self._add_deferred = self._add_deferred, None
            add(self)
        return super().parse_known_args(args, namespace)


def _emulator_arguments(parser: argparse.ArgumentParser) -> None:
    from proxy.emulator import cli as emulator_cli

    emulator_cli.add_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except ConfigError as exc:
        print(f"credicorp-proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # port in use, unreadable file, ...
        print(f"credicorp-proxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
