"""Plugin components (`verify:`, `signing:`, ...) converted into the options Struct of their plugin."""

from __future__ import annotations

from typing import Any

from hookgate.config.convert import Converter, drop_nulls
from hookgate.config.introspect import struct_fields, struct_of
from hookgate.config.loaded import Component, LoadedConfig
from hookgate.config.paths import child
from hookgate.config.problems import show
from hookgate.types import ComponentKind, ComponentRegistry


def resolve_components(conv: Converter, loaded: LoadedConfig, registry: ComponentRegistry) -> None:
    config = loaded.config
    for name, source in config.sources.items():
        base = child("$.sources", name)
        if source.verify is not None:
            verifier = resolve_component(
                conv, registry, ComponentKind.VERIFIER, f"{base}.verify", source.verify
            )
            if verifier is not None:
                loaded.verifiers[name] = verifier
        rules = [
            resolve_component(conv, registry, ComponentKind.ACCESS_RULE, f"{base}.auth[{i}]", spec)
            for i, spec in enumerate(source.auth)
        ]
        loaded.access_rules[name] = [r for r in rules if r is not None]
        if source.handshake is not None:
            handshake = resolve_component(
                conv, registry, ComponentKind.HANDSHAKE, f"{base}.handshake", source.handshake
            )
            if handshake is not None:
                loaded.handshakes[name] = handshake
    for name, endpoint in config.endpoints.items():
        if endpoint.signing is not None:
            path = f"{child('$.endpoints', name)}.signing"
            signer = resolve_component(conv, registry, ComponentKind.SIGNER, path, endpoint.signing)
            if signer is not None:
                loaded.signers[name] = signer
        if endpoint.auth is not None:
            path = f"{child('$.endpoints', name)}.auth"
            auth = resolve_component(conv, registry, ComponentKind.ENDPOINT_AUTH, path, endpoint.auth)
            if auth is not None:
                loaded.endpoint_auth[name] = auth
    for index, route in enumerate(config.routes):
        if route.transform is not None:
            # Routes that failed to convert are not in config.routes; report at the position the
            # route has in the file.
            position = loaded.route_positions[index] if index < len(loaded.route_positions) else index
            path = f"$.routes[{position}].transform"
            transform = resolve_component(conv, registry, ComponentKind.TRANSFORM, path, route.transform)
            if transform is not None:
                loaded.transforms[index] = transform


def resolve_component(
    conv: Converter, registry: ComponentRegistry, kind: ComponentKind, path: str, spec: Any
) -> Component | None:
    """Convert one `{type: name, ...options}` mapping into the options Struct its plugin registered."""
    key = COMPONENT_KEYS[kind]
    installed = ", ".join(registry.names(kind)) or "none"
    if not isinstance(spec, dict):
        conv.loader.problem(path, f"expected a mapping with {show(key)} (installed {kind}s: {installed})")
        return None
    type_name = spec.get(key)
    if type_name is None:
        conv.loader.problem(
            path, f"missing required key {show(key)} (installed {kind}s: {installed})", missing=key
        )
        return None
    component_type = registry.get(kind, type_name) if isinstance(type_name, str) else None
    if component_type is None:
        conv.loader.problem(
            f"{path}.{key}", f"unknown {kind} {show(type_name)} (installed {kind}s: {installed})"
        )
        return None
    options = {k: v for k, v in spec.items() if k != key}
    struct = component_type.config_type
    # Unknown options are refused even if the plugin's Struct would ignore them: a typo in a
    # security setting must not fall back to its default unnoticed.
    unknown = 0
    if struct_of(struct) is not None:
        unknown = conv.unknown_keys(options, struct, path)
        options = {k: v for k, v in options.items() if k in struct_fields(struct)}
    converted = conv.convert(drop_nulls(options, struct), struct, path)
    if converted is None or unknown:
        return None
    return Component(kind, type_name, converted)


# The key that names a component's type, per kind.
COMPONENT_KEYS = {
    ComponentKind.VERIFIER: "type",
    ComponentKind.SIGNER: "scheme",
    ComponentKind.ACCESS_RULE: "type",
    ComponentKind.HANDSHAKE: "type",
    ComponentKind.ENDPOINT_AUTH: "type",
    ComponentKind.TRANSFORM: "type",
}
