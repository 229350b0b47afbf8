"""Loading a config file: the three steps the package docstring describes, put together."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hookgate.config.checks import check_rules, check_server
from hookgate.config.components import resolve_components
from hookgate.config.convert import Converter, drop_nulls
from hookgate.config.loaded import LoadedConfig
from hookgate.config.paths import child
from hookgate.config.problems import ConfigError, Problem, show
from hookgate.config.schema import (
    NAME_PATTERN,
    BrokerConfig,
    Config,
    EgressConfig,
    EndpointConfig,
    LogConfig,
    OpsConfig,
    RouteConfig,
    ServerConfig,
    SourceConfig,
    TracingConfig,
)
from hookgate.config.source import parse, read
from hookgate.types import INTERNAL_SOURCE, ComponentRegistry

# Keys of the contract that this version does not implement yet. They are refused whatever their
# value rather than ignored, so a config never silently loses a safety setting (an SSRF guard, an
# auth rule) that its author believes is in force.
UNSUPPORTED: dict[str, str] = {}


def _unsupported(data: Any, pattern: str) -> Iterator[tuple[dict[str, Any], str, str]]:
    """(mapping, key, path) for each key in `data` matching a pattern with `*` and `[*]`."""
    parts = re.findall(r"\.([^.\[]+)|(\[\*\])", pattern)

    def walk(node: Any, index: int, path: str) -> Iterator[tuple[dict[str, Any], str, str]]:
        key, star_index = parts[index]
        last = index == len(parts) - 1
        if star_index:
            if isinstance(node, list):
                for i, item in enumerate(node):
                    yield from walk(item, index + 1, f"{path}[{i}]")
        elif isinstance(node, dict):
            for name in list(node) if key == "*" else [key] if key in node else []:
                if last:
                    yield node, name, child(path, name)
                else:
                    yield from walk(node[name], index + 1, child(path, name))

    yield from walk(data, 0, "$")


def load(
    path: str | os.PathLike[str],
    registry: ComponentRegistry,
    env: dict[str, str] | None = None,
) -> LoadedConfig:
    """Load and validate a config file; raise ConfigError listing every problem found.

    The file paths in it are made absolute, relative to the config file's directory.
    """
    file = str(path)
    loaded = loads(read(path), registry, file=file, env=env)
    resolve_paths(loaded.config, Path(os.path.abspath(path)).parent)
    return loaded


def resolve_paths(config: Config, base: Path) -> None:
    """Make every file path in the config absolute, relative to `base` (the config's directory)."""

    def resolve(value: str) -> str:
        return value if os.path.isabs(value) else os.path.normpath(base / value)

    if config.server.tls is not None:
        config.server.tls.certfile = resolve(config.server.tls.certfile)
        config.server.tls.keyfile = resolve(config.server.tls.keyfile)
    broker = config.broker
    broker.data_dir = resolve(broker.data_dir)
    broker.creds = resolve(broker.creds) if broker.creds is not None else None
    broker.nkey_seed = resolve(broker.nkey_seed) if broker.nkey_seed is not None else None
    if broker.tls is not None:
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(broker.tls, key)
            if value is not None:
                setattr(broker.tls, key, resolve(value))


def load_server(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> ServerConfig:
    """Only the `server` section, checked as `load` checks it, for the command line to find the API.

    Variables used only in other sections need not be set: an operator's shell rarely holds the
    gateway's secrets, and the API's address and token are all the command line needs.
    """
    file = str(path)
    loader, raw = parse(read(path), file, env)
    drop_nulls(raw, Config)  # as `loads` does, so `server:` left empty means the defaults there too
    server = Converter(loader).convert(raw.get("server", {}), ServerConfig, "$.server")
    if server is not None:
        check_server(loader.problem, server)
    problems = [p for p in loader.problems if p.path == "$.server" or p.path.startswith("$.server.")]
    _raise_problems(problems)
    if server is None:
        raise ConfigError([Problem(file, None, "$.server", "cannot be read")])
    return server


def _raise_problems(problems: list[Problem]) -> None:
    """Every problem once, in the order of the file."""
    if problems:
        raise ConfigError(sorted(dict.fromkeys(problems), key=lambda p: p.line or 0))


def loads(
    text: str,
    registry: ComponentRegistry,
    *,
    file: str = "<config>",
    env: dict[str, str] | None = None,
) -> LoadedConfig:
    """Validate config text; `file` names it in errors, `env` replaces os.environ for `${VAR}`."""
    loader, raw = parse(text, file, env)

    for pattern, feature in UNSUPPORTED.items():
        for mapping, key, found in list(_unsupported(raw, pattern)):
            loader.problem(found, f"not supported yet ({feature}); remove it")
            del mapping[key]  # so it is not reported a second time as an unknown key

    for mapping, key, retry_path in _unsupported(raw, "$.endpoints.*.retry"):
        retry = mapping[key]
        if isinstance(retry, dict) and "schedule" in retry and "exponential" in retry:
            loader.problem(f"{retry_path}.exponential", "set either schedule or exponential, not both")

    conv = Converter(loader)
    drop_nulls(raw, Config)
    config, valid, route_indexes = _convert_sections(conv, raw)
    declared = {
        key: set(raw[key]) if isinstance(raw.get(key), dict) else set() for key in ("sources", "endpoints")
    }
    loaded = LoadedConfig(config=config, path=Path(file), route_positions=route_indexes, lines=loader.lines)
    check_rules(loader.problem, config, valid, declared["sources"], declared["endpoints"], route_indexes)
    resolve_components(conv, loaded, registry)
    _raise_problems(loader.problems)
    return loaded


def _convert_sections(conv: Converter, raw: dict[str, Any]) -> tuple[Config, set[str], list[int]]:
    """The Config, with every item that converted; problems are reported as they are found."""
    config = Config()
    conv.unknown_keys(raw, Config, "$")
    # Each section on its own, so that the rules can tell which ones are known to be valid.
    valid = set()
    for key, section_type in (
        ("server", ServerConfig),
        ("broker", BrokerConfig),
        ("egress", EgressConfig),
        ("ops", OpsConfig),
        ("log", LogConfig),
        ("tracing", TracingConfig),
    ):
        if (section := conv.convert(raw.get(key, {}), section_type, f"$.{key}")) is not None:
            setattr(config, key, section)
            valid.add(key)
    named = {"sources": SourceConfig, "endpoints": EndpointConfig}
    for key, type_ in named.items():
        if (converted := _convert_named(conv, raw.get(key, {}), key, type_)) is not None:
            setattr(config, key, converted)
    indexes = _convert_routes(conv, raw.get("routes", []), config.routes)
    return config, valid, indexes


def _convert_named(conv: Converter, items: Any, key: str, type_: type[Any]) -> dict[str, Any] | None:
    """The sources or endpoints (`key`) that converted, by name; None if `items` is no mapping."""
    if not isinstance(items, dict):
        conv.convert(items, dict[str, Any], f"$.{key}")  # reports "expected a mapping"
        return None
    converted: dict[str, Any] = {}
    for name, item in items.items():
        item_path = child(f"$.{key}", name)
        if not re.fullmatch(NAME_PATTERN, name):
            conv.loader.problem(
                item_path, "names may use only letters, digits, '-' and '_' (they become NATS subjects)"
            )
        elif key == "sources" and name == INTERNAL_SOURCE:
            conv.loader.problem(
                item_path, f"{show(INTERNAL_SOURCE)} is reserved for events published by your services"
            )
        elif (result := conv.convert(item, type_, item_path)) is not None:
            converted[name] = result
    return converted


def _convert_routes(conv: Converter, routes: Any, into: list[RouteConfig]) -> list[int]:
    """Append the routes that converted to `into`; return the index in the file of each."""
    indexes: list[int] = []
    if not isinstance(routes, list):
        conv.convert(routes, list[RouteConfig], "$.routes")
    else:
        for i, item in enumerate(routes):
            if (route := conv.convert(item, RouteConfig, f"$.routes[{i}]")) is not None:
                into.append(route)
                indexes.append(i)
    return indexes
