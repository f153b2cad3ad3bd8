"""What the environment contributes to the config: ``${VAR}`` interpolation and ``CCP_*`` overrides.

Precedence, per scalar key: ``CCP_<SECTION>_<KEY>`` (``CCP_<KEY>`` at top
level) > the YAML file > the settings field's default. The names come from the
key declarations (``proxy.config.keys``), so a new key gets one too.

``${VAR}`` has one grammar, read here by one pattern: ``${VAR}``,
``${VAR:-default}`` (the default when unset or empty) and ``$${`` for a literal
``${``. Both the interpolation and the template mode of ``check-config``
(``references``: which variables must be set where the proxy runs) use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from proxy.config.keys import ENV_PREFIX, ROUTES_FILE, SCALARS
from proxy.config.report import Report, key_path
from proxy.wording import did_you_mean, show

__all__ = ["ROUTES_FILE_ENV", "env_overrides", "env_variables", "interpolate", "references"]

ROUTES_FILE_ENV: Final = ROUTES_FILE.env
#: CCP_ variables that are not config keys but are still ours (no "unknown variable" warning).
OTHER_ENV: Final = frozenset({ROUTES_FILE_ENV, "CCP_CONFIG"})


# ---------------------------------------------------------- interpolation
_REFERENCE: Final = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)\}|\$\{")
_BODY: Final = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)


def interpolate(value: Any, env: Mapping[str, str], where: str, report: Report, skip: set[str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string value; ``$${`` is a literal ``${``.

    Keys overridden from the environment (``skip``) are not interpolated, so an
    unset variable in a value the operator replaced is not reported.
    """
    if where in skip:
        return value
    if isinstance(value, Mapping):
        return {k: interpolate(v, env, key_path(where, str(k)), report, skip) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, key_path(where, i), report, skip) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        return _REFERENCE.sub(lambda m: _substitute(m, env, where, report), value)
    return value


def _substitute(m: re.Match[str], env: Mapping[str, str], where: str, report: Report) -> str:
    if m.group(0) == "$${":
        return "${"
    body = _BODY.fullmatch(m.group("body") or "")
    if body is None:
        report.problem(where, f"malformed reference {show(m.group(0))}: use ${{VAR}} or ${{VAR:-default}}")
        return m.group(0)
    value, default = env.get(body["name"]), body["default"]
    if default is not None and not value:
        return default
    if value is None:
        report.problem(where, f"environment variable {body['name']} is not set")
        return m.group(0)
    return value


def references(value: Any) -> set[str]:
    """Every variable a parsed YAML tree's string values name without a default (``${VAR}``).

    Values only: a ``${VAR}`` in a YAML comment is not one. ``$${VAR}`` is literal text,
    and a malformed reference names nothing (interpolation reports it).
    """
    return {name for text in _strings(value) for name in _required(text)}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _required(text: str) -> Iterator[str]:
    for m in _REFERENCE.finditer(text):
        body = _BODY.fullmatch(m.group("body") or "") if m.group(0) != "$${" else None
        if body is not None and body["default"] is None:
            yield body["name"]


# --------------------------------------------------------- env overrides
def env_variables() -> dict[str, str]:
    """Every ``CCP_*`` override -> the key path it sets (``CCP_AUTH_METHOD`` -> ``auth.method``)."""
    return {key.env: key.path for key in SCALARS if key.from_env}


def env_overrides(env: Mapping[str, str], report: Report) -> dict[str, tuple[Any, str]]:
    """key path -> (value, where) for every CCP_ variable set; unknown CCP_ names are warned about."""
    known = env_variables()
    found: dict[str, tuple[Any, str]] = {known[n]: (v, f"env {n}") for n, v in env.items() if n in known}
    for name in sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known and n not in OTHER_ENV):
        report.warn(f"env {name}", "not a configuration variable, ignored" + did_you_mean(name, known))
    # The secret source set from the environment replaces the file's, whichever kind that is.
    for one, other in (("client_secret", "client_secret_file"), ("client_secret_file", "client_secret")):
        if found.get(f"auth.{one}", ("",))[0] and f"auth.{other}" not in found:
            found[f"auth.{other}"] = (None, found[f"auth.{one}"][1])
    return found
