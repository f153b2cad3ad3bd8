"""What each ``credicorp-proxy`` sub-command does, once its arguments are parsed.

At the top only what reading a config needs. A command that serves, talks to
Redis or starts the emulator imports that inside its function: the CLI builds
every sub-parser on every start, and ``healthcheck`` (the image's
HEALTHCHECK, every few seconds in every container) must not pay for the
aiohttp server, the Redis client, the metrics or the emulator. The
import-boundary tests (tests/test_import_boundaries.py) keep it so.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from proxy.config import load_config, read_yaml, references
from proxy.config.inspect import render_check, render_explain
from proxy.logs import configure_logging
from proxy.probe import get_healthz
from proxy.redact import mask_url
from proxy.settings import Settings

log = logging.getLogger("proxy.cli")


def _log_warnings(settings: Settings) -> None:
    for warning in settings.warnings:
        log.warning(warning, extra={"event": "config_warning"})


def run(args: argparse.Namespace) -> int:
    from proxy.serve import run_async, serve

    settings = load_config(args.config)
    configure_logging(settings.logging.level)
    _log_warnings(settings)
    return run_async(serve(settings))


def check_config(args: argparse.Namespace) -> int:
    """Validate a config; by default as a template (CI, a laptop), with ``--strict`` as ``run`` would.

    Without ``--strict``, ``${VAR}`` references with no default that are unset
    here and files that do not exist here (a mounted Secret) are listed as
    run-time requirements instead of failing the check.
    """
    if args.strict:
        settings = load_config(args.config)
        print(render_check(settings))
        return 0
    settings, needed = _load_as_template(args.config)
    own_warnings = tuple(w for w in settings.warnings if '"unset-' not in w)  # not about placeholders
    print(render_check(dataclasses.replace(settings, warnings=own_warnings)))
    if needed:
        print("\nmust be set where the proxy runs: " + ", ".join(needed))
    return 0


def _load_as_template(path: str) -> tuple[Settings, list[str]]:
    """The config as it will be where it runs: ``${VAR}``s unset here get placeholders, files are
    not opened. Returns the settings and the variables that must be set there.

    The names come from the parsed values, so a ``${VAR}`` in a YAML comment is not one.
    """
    env = dict(os.environ)
    needed = sorted({n for n in references(read_yaml(path)) if n not in env})
    env.update({name: f"unset-{name}" for name in needed})
    return load_config(path, env, check_files=False), needed


def explain(args: argparse.Namespace) -> int:
    """Which route a request takes. Template mode like ``check-config``: explaining the shipped
    production config on a laptop must not need the pod's secret file or environment."""
    settings, _ = _load_as_template(args.config)
    text, code = render_explain(settings, args.method, args.path)
    print(text)
    return code


def healthcheck(args: argparse.Namespace) -> int:
    """A container HEALTHCHECK: ``GET /healthz`` where the config puts the admin listener.

    It reads ``admin_listen`` the way ``run`` does (file, ``CCP_ADMIN_LISTEN``,
    ``unix:`` paths included), so the check follows the config instead of
    guessing a port. Exit 0 when healthy, 1 otherwise, with the reason on stderr.
    """
    if args.config:
        settings, _ = _load_as_template(args.config)
    else:
        settings = load_config(None, check_files=False)
    address = settings.admin_listen
    try:
        status = get_healthz(address, timeout=4.0)
    except OSError as exc:
        print(f"credicorp-proxy: healthcheck: {address}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"credicorp-proxy: healthcheck: {address}: /healthz answered {status}", file=sys.stderr)
        return 1
    return 0


def flush(args: argparse.Namespace) -> int:
    from proxy.serve import run_async

    settings = load_config(args.config)
    configure_logging(settings.logging.level)
    if settings.cache.url.startswith("memory://"):
        print(
            "cache.url is memory://: tokens live only inside each running proxy; "
            "restart the proxies to drop them.",
            file=sys.stderr,
        )
        return 1
    return run_async(_flush(settings))


async def _flush(settings: Settings) -> int:
    """Drop the client's tokens from Redis and broadcast the drop; non-zero unless all of it worked.

    The cache degrades quietly on Redis errors (right for serving requests),
    so the flush counts the errors it caused: after a leaked secret an
    operator must never read "dropped" when nothing was.
    """
    import time

    from proxy.app import open_shared_cache
    from proxy.metrics import Metrics

    metrics = Metrics()
    cache = open_shared_cache(settings, time.time, metrics)
    assert cache is not None
    try:
        if not await cache.ping():
            where = mask_url(settings.cache.url)
            print(f"flush failed: Redis at {where} is unreachable", file=sys.stderr)
            return 2
        dropped = await cache.purge_all(settings.auth.client_id)
    finally:
        await cache.close()
    failed = sorted(
        sample.labels["op"]
        for sample in next(iter(metrics.redis_errors.collect())).samples
        if sample.name.endswith("_total") and sample.value > 0
    )
    if failed:
        print(
            f"flush incomplete: Redis failed during {', '.join(failed)}; dropped {dropped} token(s) "
            "before that; run it again",
            file=sys.stderr,
        )
        return 2
    print(
        f"dropped {dropped} cached token(s) of {settings.auth.client_id}; "
        "every replica was told to drop its memory copies"
    )
    return 0


def demo(args: argparse.Namespace) -> int:
    from proxy.demo import serve_demo
    from proxy.serve import run_async

    configure_logging("info")
    return run_async(serve_demo(args.port, args.admin_port, args.emulator_port))


def emulator(args: argparse.Namespace) -> int:
    """Only the Credicorp emulator; its arguments and exit codes are the emulator's own."""
    from proxy.emulator import cli as emulator_cli

    return emulator_cli.run(args)
