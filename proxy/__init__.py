"""credicorp-token-proxy: a sidecar that gives apps least-privilege Credicorp tokens."""

from __future__ import annotations

__version__: str  # the installed distribution's version; looked up on first use, below


def __getattr__(name: str) -> str:
    """``proxy.__version__``, read from the installed package metadata the first time it is asked for.

    Why not at import: ``importlib.metadata`` and the look-up cost about 60 ms,
    a quarter of the image's ``healthcheck``, which runs every few seconds in
    every container and never needs the version. ``--version`` and the
    ``ccp_build_info`` metric ask for it.
    """
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("credicorp-token-proxy")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0+source"
    globals()["__version__"] = found
    return found
