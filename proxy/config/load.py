"""Reading the config's files: the YAML (duplicate keys refused), the route table's file, the packaged table.

A file that cannot be read or parsed is a ``ConfigError`` naming the file and
the line, never a traceback, and never the line's text: PyYAML's snippet would
quote it, secret and all. What the YAML says is then ``proxy.config.parse``'s
business.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from proxy.config.env import ROUTES_FILE_ENV
from proxy.config.parse import parse_config
from proxy.errors import ConfigError
from proxy.settings import Settings
from proxy.wording import show

__all__ = ["load_config", "packaged_routes", "read_yaml"]

PACKAGED_ROUTES: Final = "credicorp-partner-v1.yaml"


class _Loader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys (PyYAML silently keeps the last)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []


def _mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen and key != "<<":
            loader.duplicates.append(f"line {key_node.start_mark.line + 1}: duplicate key {show(key)}")
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: str | Path) -> Any:
    """Parse one YAML file; ``ConfigError`` (never a traceback) when it is missing or malformed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        loader = _Loader(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {_yaml_problem(exc)}"]) from None
    if loader.duplicates:
        raise ConfigError([f"{path}: {d}" for d in loader.duplicates])
    return {} if data is None else data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, without PyYAML's snippet: it quotes the file's line, secret and all."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc).replace("\n", " ")
    parts = []
    if exc.problem_mark is not None:
        parts.append(f"line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}:")
    parts.append(exc.problem or "syntax error")
    if exc.context:
        started = f" at line {exc.context_mark.line + 1}" if exc.context_mark is not None else ""
        parts.append(f"({exc.context}{started})")
    return " ".join(parts)


def packaged_routes() -> list[Any]:
    """The built-in partner/v1 route table (``proxy/data``, a copy of ``config/``)."""
    return list(read_yaml(Path(__file__).parent.parent / "data" / PACKAGED_ROUTES)["routes"])


def _routes_from(path: Path, where: str) -> Any:
    data = read_yaml(path)
    if isinstance(data, Mapping) and "routes" in data:
        return data["routes"]
    if isinstance(data, list):
        return data
    raise ConfigError([f"{where}: {path} holds neither a list of routes nor a mapping with routes:"])


def load_config(
    path: str | None, env: Mapping[str, str] = os.environ, *, check_files: bool = True
) -> Settings:
    """Read ``path`` (None: environment only, built-in route table) and validate it.

    The route table comes from, first found: ``CCP_ROUTES_FILE``; the file's
    ``routes_file`` (relative to the config file); its ``routes``; and only
    when there is no config file at all, the packaged partner/v1 table.
    """
    data = read_yaml(path) if path is not None else {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {show(data)}"])
    raw = dict(data)
    routes_file = env.get(ROUTES_FILE_ENV) or raw.get("routes_file")
    if env.get(ROUTES_FILE_ENV):
        raw["routes"] = _routes_from(Path(env[ROUTES_FILE_ENV]), f"env {ROUTES_FILE_ENV}")
    elif routes_file is not None:
        if not isinstance(routes_file, str) or "routes" in raw:
            raise ConfigError(["routes_file: expected one path, and no routes: beside it"])
        raw["routes"] = _routes_from(Path(str(path)).parent / routes_file, "routes_file")
    elif path is None:
        raw["routes"] = packaged_routes()
    raw.pop("routes_file", None)
    return parse_config(raw, env, check_files=check_files)
