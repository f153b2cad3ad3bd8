"""config/README.md's key table: generated from the key declarations, and true to them.

The first test fails while the file is out of date (run ``python -m
proxy.config.reference config/README.md``). The others read the rows back
without the renderer, so a renderer bug cannot make the table and the code
agree on something false: each declared key has exactly one row, its
variable is the one the environment is read from, and its default, read back
through the config's own coercion, is the settings field's default.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.env import env_variables
from proxy.config.keys import KEYS, Key
from proxy.config.reference import BEGIN, END, update
from proxy.config.values import coerce

REFERENCE = Path(__file__).resolve().parent.parent / "config" / "README.md"
BY_PATH = {key.path: key for key in KEYS}


def rows() -> dict[str, list[str]]:
    """Key path -> its row's cells (default, environment, notes), asserting each key has one row."""
    table = REFERENCE.read_text(encoding="utf-8").partition(BEGIN)[2].partition(END)[0]
    found: dict[str, list[str]] = {}
    for line in table.strip().splitlines()[2:]:
        path, *cells = (cell.strip() for cell in line.strip().strip("|").split(" | "))
        assert path.strip("`") not in found, f"two rows for {path}"
        found[path.strip("`")] = cells
    return found


def test_the_table_is_up_to_date() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    assert update(text) == text, "run: python -m proxy.config.reference config/README.md"


def test_every_declared_key_has_one_row_and_every_row_a_key() -> None:
    assert list(rows()) == [key.path for key in KEYS]


@pytest.mark.parametrize("key", KEYS, ids=[key.path for key in KEYS])
def test_each_row_names_the_variable_the_environment_is_read_from(key: Key) -> None:
    environment = rows()[key.path][1]
    if key.path == "routes":
        assert environment == "—" and "CCP_ROUTES" not in env_variables()
    elif key.path == "routes_file":
        assert environment == "`CCP_ROUTES_FILE`"  # read by load_config, not an override
    else:
        assert env_variables()[environment.strip("`")] == key.path


@pytest.mark.parametrize("key", KEYS, ids=[key.path for key in KEYS])
def test_each_row_shows_the_settings_default(key: Key) -> None:
    shown = rows()[key.path][0]
    if key.shown_default is not None:  # words, only where there is no value to show
        assert key.default in (None, "", ()) and shown == key.shown_default
    elif shown == "none":
        assert key.default in (None, ())
    else:
        text = ", ".join(item.strip("`") for item in shown.split(", "))
        assert coerce(text, key.type) == key.default


def test_notes_fit_in_one_table_cell() -> None:
    assert all("|" not in key.doc and "\n" not in key.doc for key in KEYS)


def test_a_file_without_the_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="markers are missing"):
        update("# Configuration\n\nno table here\n")
