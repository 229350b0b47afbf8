"""`hookgate.plugin_kit`: the helpers plugin authors may import, and the rule that plugins use only them."""

from __future__ import annotations

import ast
import base64
from pathlib import Path

import pytest

import hookgate.plugin_kit as plugin_kit
from hookgate.plugin_kit import (
    check_secrets,
    constant_time_equal,
    decode_prefixed_base64,
    matches_any,
    secret_keys,
    wire_bytes,
)
from tests.support import ROOT

# What a plugin may import of hookgate (hookspecs.py says so; CONTRIBUTING documents it).
ALLOWED = {"hookgate.hookspecs", "hookgate.types", "hookgate.plugin_kit"}
PLUGIN_FILES = [
    *sorted((ROOT / "plugins" / "hookgate_builtins").glob("*.py")),
    ROOT / "examples" / "hookgate-example-plugin" / "hookgate_example_plugin.py",
]


def hookgate_imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return {m for m in modules if m == "hookgate" or m.startswith("hookgate.")}


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: p.name)
def test_plugins_import_only_hookspecs_types_and_the_plugin_kit(path: Path) -> None:
    assert hookgate_imports(path) <= ALLOWED


def test_the_kit_exports_a_documented_surface() -> None:
    assert sorted(plugin_kit.__all__) == sorted(set(plugin_kit.__all__))
    for name in plugin_kit.__all__:
        value = getattr(plugin_kit, name)
        assert value is not None
        if callable(value) and not isinstance(value, type) and hasattr(value, "__code__"):
            assert value.__doc__, f"plugin_kit.{name} has no docstring"


def test_check_secrets_refuses_no_secret_and_an_empty_one() -> None:
    check_secrets("s3cret")
    check_secrets(["old", "new"])
    with pytest.raises(ValueError, match="at least one secret"):
        check_secrets([])
    with pytest.raises(ValueError, match="must not be empty"):
        check_secrets("")
    with pytest.raises(ValueError, match="must not be empty"):
        check_secrets(["old", ""])


def test_secret_keys_are_the_utf8_bytes_of_each_secret_in_order() -> None:
    assert secret_keys("é") == ["é".encode()]
    assert secret_keys(["a", "b"]) == [b"a", b"b"]


def test_decode_prefixed_base64_takes_the_key_with_or_without_prefix_and_padding() -> None:
    raw = bytes(range(20))
    encoded = base64.b64encode(raw).decode()
    assert decode_prefixed_base64("whsec_" + encoded, "whsec_", "secret") == raw
    assert decode_prefixed_base64(encoded.rstrip("="), "whsec_", "secret") == raw
    with pytest.raises(ValueError) as info:
        decode_prefixed_base64("whsec_not base64!", "whsec_", "secret[1]")
    assert str(info.value) == "secret[1] must be 'whsec_' followed by base64"


def test_matches_any_compares_every_pair() -> None:
    assert matches_any([b"a", b"b"], [b"x", b"b"])
    assert not matches_any([b"a", b"b"], [b"x"])
    assert not matches_any([], [b"x"])
    assert matches_any(iter(["sig"]), ["nope", "sig"])


def test_constant_time_equal() -> None:
    assert constant_time_equal(b"token", b"token")
    assert not constant_time_equal(b"token", b"tokem")


def test_wire_bytes_are_the_latin1_bytes_a_header_arrived_as() -> None:
    assert wire_bytes("caf\xe9") == b"caf\xe9"
    assert wire_bytes("€") == "€".encode()  # not from the wire: its UTF-8
