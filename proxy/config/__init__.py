"""Configuration: YAML + ``${VAR}`` interpolation + ``CCP_*`` overrides -> an immutable ``Settings``."""

from __future__ import annotations

from proxy.config.env import references
from proxy.config.load import load_config, read_yaml
from proxy.config.parse import parse_config

__all__ = ["load_config", "parse_config", "read_yaml", "references"]
