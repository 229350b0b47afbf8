"""The JSON Schema of the config, for editors and the reference docs."""

from __future__ import annotations

import inspect
from typing import Any

import msgspec

from hookgate.config.components import COMPONENT_KEYS
from hookgate.config.schema import Config
from hookgate.types import INTERNAL_SOURCE, ComponentKind, ComponentRegistry


def json_schema(registry: ComponentRegistry) -> dict[str, Any]:
    """The JSON Schema of the config, with every registered component's options, for editors."""
    schema = msgspec.json.schema(Config)
    defs = schema["$defs"]
    for kind, field_name, struct in (
        (ComponentKind.VERIFIER, "verify", "SourceConfig"),
        (ComponentKind.ACCESS_RULE, "auth", "SourceConfig"),
        (ComponentKind.HANDSHAKE, "handshake", "SourceConfig"),
        (ComponentKind.SIGNER, "signing", "EndpointConfig"),
        (ComponentKind.ENDPOINT_AUTH, "auth", "EndpointConfig"),
        (ComponentKind.TRANSFORM, "transform", "RouteConfig"),
    ):
        variants = _component_variants(registry, kind, defs)
        prop = defs[struct]["properties"][field_name]
        description = prop.get("description")
        one_of: dict[str, Any] = {"anyOf": variants} if variants else {"type": "object"}
        shape = (
            {"type": "array", "items": one_of}
            if kind is ComponentKind.ACCESS_RULE
            else {"anyOf": [*one_of.get("anyOf", [one_of]), {"type": "null"}]}
        )
        defs[struct]["properties"][field_name] = {
            **shape,
            **({"description": description} if description else {}),
        }
    # The loader refuses this source name; say so to editors too. (msgspec before 0.22 writes no
    # `propertyNames` for a dict's key pattern, hence the setdefault.)
    sources = defs["Config"]["properties"]["sources"]
    sources.setdefault("propertyNames", {})["not"] = {"const": INTERNAL_SOURCE}
    return _clean_descriptions(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "hookgate configuration",
            **schema,
        }
    )


def _component_variants(
    registry: ComponentRegistry, kind: ComponentKind, defs: dict[str, Any]
) -> list[dict[str, Any]]:
    """A `$ref` to each registered component's options, their definitions added to `defs`."""
    key_name = COMPONENT_KEYS[kind]
    variants = []
    for name in registry.names(kind):
        ctype = registry.get(kind, name)
        assert ctype is not None
        (sub,), sub_defs = msgspec.json.schema_components([ctype.config_type], ref_template="#/$defs/{name}")
        defs.update(sub_defs)
        target = sub_defs[sub["$ref"].split("/")[-1]]
        target.setdefault("properties", {})[key_name] = {"const": name}
        required = target.setdefault("required", [])
        if key_name not in required:
            required.append(key_name)
        variants.append(sub)
    return variants


def _clean_descriptions(node: Any) -> Any:
    """Every `description` as `inspect.cleandoc` gives it, in place.

    msgspec copies Struct docstrings into the schema, and its releases differ in how they indent
    the lines after the first (0.23 dedents them, 0.22 did not). Cleaning them here keeps the
    committed schema, and the docs made from it, the same whichever msgspec is installed.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                node[key] = inspect.cleandoc(value)
            else:
                _clean_descriptions(value)
    elif isinstance(node, list):
        for item in node:
            _clean_descriptions(item)
    return node
