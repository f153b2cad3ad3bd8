"""One configuration value: coerced from YAML or env text to its settings type; the checks keys use.

Coercion accepts strings for numbers and booleans (``${VAR}`` and env values
are always strings). A check is the rule a value must meet on its own (a
range, a choice, a pattern, header names, a usable key file); which key gets
which is declared in ``proxy.config.keys``. A check returns its message (None
when the value is fine) and coercion raises ``ValueError``; either way the
caller records a problem and goes on, so every bad key is reported in one round.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from typing import Any, Final

from proxy.config.addresses import parse_listen
from proxy.settings import ListenAddress
from proxy.tokens.sealing import Keyring, SealingKeyError
from proxy.wording import show


# ------------------------------------------------------------- coercion
def coerce(value: Any, hint: Any, *, from_env: bool = False) -> Any:
    """Coerce a YAML or env value to a settings field type; ``ValueError`` names what was expected.

    Strings are accepted for numbers and booleans because ``${VAR}`` and env
    values are always strings; an empty env value clears an optional key.
    """
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None or (from_env and value == ""):
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return _to_str_tuple(value)
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {show(value)}")
        return value
    convert: Callable[[Any], Any] = _SCALARS.get(hint, _expect_str)
    return convert(value)


def _expect_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {show(value)}")
    return value


def _to_str_tuple(value: Any) -> tuple[str, ...]:
    """A list of strings: a YAML list, or comma-separated text (``${VAR}`` and ``CCP_*`` are text).

    Blank items are dropped, so ``"a, b,"`` is ``("a", "b")`` and an empty variable is an empty list.
    """
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(item.strip() for item in value if item.strip())
    raise ValueError(f"expected a list of strings (or comma-separated text), got {show(value)}")


_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})


def parse_bool(value: object) -> bool:
    """A YAML boolean, or its text from ``${VAR}`` or a ``CCP_`` variable.

    Text accepted: true/false, 1/0, yes/no, on/off, in any case.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {show(value)}")


def _to_number(kind: type[int] | type[float]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and (kind is float or isinstance(value, int)):
            return kind(value)
        try:
            number = kind(value.strip()) if isinstance(value, str) else None
        except ValueError:
            number = None
        if number is None or number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {show(value)}")
        return number

    return convert


def _to_listen(value: Any) -> ListenAddress:
    return parse_listen(_expect_str(value))


_SCALARS: Final[dict[Any, Callable[[Any], Any]]] = {
    bool: parse_bool,
    int: _to_number(int),
    float: _to_number(float),
    str: _expect_str,
    ListenAddress: _to_listen,
}


# ------------------------------------------------------------ value checks
#: A rule one value must meet on its own: the problem's message, or None when the value is fine.
Check = Callable[[Any], str | None]


def in_range(test: Callable[[float], bool], message: str) -> Check:
    return lambda v: None if test(v) else f"{message}, got {v}"


positive: Final = in_range(lambda v: v > 0, "must be > 0")
non_negative: Final = in_range(lambda v: v >= 0, "must be >= 0")


def one_of(choices: typing.Collection[str]) -> Check:
    return lambda v: None if v in choices else f"expected one of {', '.join(sorted(choices))}, got {show(v)}"


def matches(pattern: str, expected: str) -> Check:
    """The whole value matches ``pattern`` (ASCII classes), else ``expected`` is the message."""
    compiled = re.compile(pattern, re.ASCII)
    return lambda v: None if compiled.fullmatch(v) else expected


def not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_names(names: tuple[str, ...]) -> str | None:
    """Each a header name (an RFC 9110 token): a typo with a space or a colon would strip nothing."""
    bad = [name for name in names if not _HEADER_NAME.fullmatch(name)]
    return f"not a header name: {', '.join(show(name) for name in bad)}" if bad else None


def key_file(path: str) -> str | None:
    """A key file that reads but cannot be used fails validation, not start-up with a traceback."""
    try:
        Keyring.from_file(path)
    except SealingKeyError as exc:  # names the file and line, never key material
        return str(exc)
    return None
