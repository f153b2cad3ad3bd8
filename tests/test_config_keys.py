"""proxy.config.keys: one declaration per key, matched with the settings fields both ways."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from proxy.config.keys import FIELDS, KEYS, SCALARS, SECTIONS, Key, resolve
from proxy.settings import Settings


def test_every_settings_field_is_declared_once_with_its_type_and_default() -> None:
    declared = {key.path: key for key in SCALARS}
    for section, cls in (*SECTIONS.items(), ("", Settings)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if section == "" and f.name in (*SECTIONS, "routes", "warnings"):
                continue
            key = declared.pop(f"{section}.{f.name}" if section else f.name)
            assert (key.type, key.default) == (hints[f.name], f.default), key.path
    assert declared == {}
    assert len(SCALARS) == sum(len(keys) for keys in FIELDS.values())


def test_a_field_without_a_declaration_stops_the_import() -> None:
    with pytest.raises(TypeError, match=r"settings field upstream\.url has no Key"):
        resolve(key for key in SCALARS if key.path != "upstream.url")


def test_a_declaration_without_a_field_stops_the_import() -> None:
    with pytest.raises(TypeError, match=r"Key without a settings field .*: upstream\.retries"):
        resolve((*SCALARS, Key("upstream.retries", "a key nobody reads")))


def test_a_key_declared_twice_stops_the_import() -> None:
    with pytest.raises(TypeError, match=r"cache\.url is declared twice"):
        resolve((*SCALARS, Key("cache.url", "again")))


def test_fields_keep_the_settings_order_that_problems_are_listed_in() -> None:
    assert [key.name for key in FIELDS["upstream"]][:3] == ["url", "timeout_s", "connect_timeout_s"]
    assert [key.name for key in FIELDS[""]] == ["listen", "admin_listen", "shutdown_grace_s", "reuse_port"]


def test_file_keys_are_optional_paths_and_only_they_have_content_checks() -> None:
    files = [key for key in SCALARS if key.names_file]
    assert {key.path for key in files} == {
        "upstream.ca_file",
        "auth.ca_file",
        "auth.client_secret_file",
        "cache.encryption_key_file",
    }
    assert all(key.type == str | None and key.default is None for key in files)
    assert all(key.names_file for key in SCALARS if key.file_check is not None)


def test_env_names_follow_the_key_path() -> None:
    assert {key.path: key.env for key in KEYS if key.path in ("auth.client_id", "listen", "routes_file")} == {
        "auth.client_id": "CCP_AUTH_CLIENT_ID",
        "listen": "CCP_LISTEN",
        "routes_file": "CCP_ROUTES_FILE",
    }
    assert [key.path for key in KEYS if not key.from_env] == ["routes"]
