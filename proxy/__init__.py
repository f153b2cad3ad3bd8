"""credicorp-token-proxy: a sidecar that gives apps least-privilege Credicorp tokens."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("credicorp-token-proxy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
