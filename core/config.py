"""The YAML config: msgspec Structs, loading with file:line:path errors, env interpolation.

Loading is two passes. The YAML is composed into nodes so that every value keeps its line, `${VAR}`
references are expanded, and the result is converted into the Structs below section by section
(msgspec paths do not name dict keys, so each named source and endpoint is converted on its own
and the path prefixed). Plugin components (`verify:`, `signing:`) are then converted into the
config Struct their plugin registered, with the same error format.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from hookgate.types import INTERNAL_SOURCE, ComponentKind, ComponentRegistry
from hookgate.units import Duration, Size, seconds

NAME_PATTERN = r"^[A-Za-z0-9_-]+$"
# Names become NATS subject tokens and consumer names, so they are restricted to safe characters.
Name = msgspec.Meta(pattern=NAME_PATTERN)

DEFAULT_RETRY_SCHEDULE = ["5s", "5m", "30m", "2h", "5h", "10h", "10h"]


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class TLSFiles(_Base):
    certfile: str
    keyfile: str


class ServerConfig(_Base):
    listen: str = "127.0.0.1:8080"
    tls: TLSFiles | None = None
    max_body: Size = "1MiB"
    api_tokens: list[str] = []
    # How long ingress waits for JetStream to store an event before answering 503.
    publish_timeout: Duration = "5s"
    # On SIGINT/SIGTERM, how long in-flight deliveries may take to finish.
    shutdown_grace: Duration = "10s"


class BrokerTLS(_Base):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class BrokerConfig(_Base):
    url: str | list[str] | None = None
    data_dir: str = ".hookgate"
    token: str | None = None
    user: str | None = None
    password: str | None = None
    creds: str | None = None
    tls: BrokerTLS | None = None
    replicas: int = 1
    retention: Duration = "72h"
    # Providers retry for days; duplicates inside this window are stored and delivered once.
    dedup_window: Duration = "24h"
    # Subjects start with "<prefix>." and streams with "<PREFIX>_".
    prefix: str = msgspec.field(default="hookgate")


class ResponseConfig(_Base):
    status: int = 202
    body: str | None = None
    content_type: str = "application/json"


class SourceConfig(_Base):
    verify: dict[str, Any] | None = None
    auth: list[dict[str, Any]] = []
    event_type: str | None = None
    event_id: str | None = None
    response: ResponseConfig | None = None


class RetryConfig(_Base):
    schedule: list[Duration] = msgspec.field(default_factory=lambda: list(DEFAULT_RETRY_SCHEDULE))
    jitter: float = 0.2


class EndpointConfig(_Base):
    url: str | None = None
    subject: str | None = None
    timeout: Duration = "15s"
    headers: dict[str, str] = {}
    signing: dict[str, Any] | None = None
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    concurrency: int = 10


class RouteConfig(_Base):
    to: list[str]
    name: str | None = None
    from_: list[str] | None = msgspec.field(default=None, name="from")
    types: list[str] | None = None


class Config(_Base):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    sources: dict[str, SourceConfig] = {}
    endpoints: dict[str, EndpointConfig] = {}
    routes: list[RouteConfig] = []


@dataclass(frozen=True)
class Component:
    """A plugin component picked in YAML with `type:`, its config converted to the plugin's Struct."""

    kind: ComponentKind
    type: str
    config: Any


@dataclass
class LoadedConfig:
    """The validated config plus what was resolved against the plugin registry."""

    config: Config
    path: Path
    verifiers: dict[str, Component] = field(default_factory=dict)  # by source name
    signers: dict[str, Component] = field(default_factory=dict)  # by endpoint name


# Keys of the contract that this version does not implement yet. They are refused by name
# rather than ignored, so a config never silently loses a safety setting.
UNSUPPORTED: dict[str, str] = {
    "$.egress": "egress settings (SSRF allowlist, proxy)",
    "$.sources.*.auth": "access rules on sources",
    "$.endpoints.*.auth": "endpoint authentication",
    "$.endpoints.*.rate_limit": "per-endpoint rate limits",
    "$.endpoints.*.circuit_breaker": "circuit breakers",
    "$.endpoints.*.ordered": "ordered delivery",
    "$.endpoints.*.disable_after": "auto-disabling endpoints",
    "$.endpoints.*.retry.exponential": "exponential retry policies",
    "$.routes[*].filter": "route filters",
    "$.routes[*].transform": "route transforms",
    "$.broker.nkey_seed": "NKey authentication",
    "$.log": "log settings",
}


class ConfigError(Exception):
    """One or more problems in a config file, each with file, line and key path."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path}: {self.message}"


# --- YAML with lines ------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Loader:
    """Turns composed YAML nodes into plain values, recording the line of every key path."""

    def __init__(self, file: str, env: dict[str, str]):
        self.file = file
        self.env = env
        self.lines: dict[str, int] = {}
        self.problems: list[Problem] = []

    def value(self, node: yaml.Node, path: str) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.value(key_node, path + ".<key>")
                child = f"{path}.{key}"
                self.lines[child] = key_node.start_mark.line + 1
                if key in out:
                    self._problem(child, "duplicate key")
                out[key] = self.value(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        if "$" in node.value:
            text = self._interpolate(node.value, path)
            if node.style is None:
                # An unquoted `${PORT}` becomes an int when the variable holds digits.
                return yaml.safe_load(text) if text.strip() else ""
            return text
        return yaml.constructor.SafeConstructor().construct_object(node)

    def _interpolate(self, text: str, path: str) -> str:
        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            self._problem(path, f"environment variable {name} is not set")
            return ""

        return _ENV_REF.sub(replace, text)

    def _problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(self.file, self.line_of(path), path, message))

    def line_of(self, path: str) -> int | None:
        # Walk up the path until a recorded line is found (msgspec may point below a leaf).
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            if cut <= 0:
                break
            path = path[:cut]
        return self.lines.get("$")


# --- conversion -----------------------------------------------------------------------------

_MSGSPEC_PATH = re.compile(r" - at `(\$[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `([^`]+)`")


def _lookup(data: Any, path: str) -> Any:
    for token in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        key, index = token
        try:
            data = data[int(index)] if index else data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _show(value: Any) -> str:
    return msgspec.json.encode(value).decode() if isinstance(value, str | int | float) else repr(value)


class _Converter:
    def __init__(self, loader: _Loader, root: Any):
        self.loader = loader
        self.root = root

    def convert(self, value: Any, type_: Any, path: str) -> Any:
        try:
            return msgspec.convert(value, type_, strict=False)
        except msgspec.ValidationError as exc:
            self._report(str(exc), path)
            return None

    def _report(self, message: str, prefix: str) -> None:
        at = _MSGSPEC_PATH.search(message)
        sub = at.group(1) if at else "$"
        if at:
            message = message[: at.start()]
        path = prefix + sub[1:]
        unknown = _UNKNOWN_FIELD.match(message)
        if unknown:
            path = f"{path}.{unknown.group(1)}"
            message = "unknown key"
        elif "(ms|s|m|h|d)" in message:
            message = f'expected a duration like "5m", got {_show(_lookup(self.root, path))}'
        elif "(B|KiB|MiB" in message:
            message = f'expected a size like "64KiB", got {_show(_lookup(self.root, path))}'
        elif "A-Za-z0-9_-" in message:
            message = "names may use only letters, digits, '-' and '_'"
        else:
            message = message[0].lower() + message[1:]
        self.loader.problems.append(Problem(self.loader.file, self.loader.line_of(path), path, message))


def _glob_paths(data: Any, pattern: str) -> Iterator[str]:
    """Concrete paths in `data` matching a pattern with `*` for a key and `[*]` for an index."""
    parts = re.findall(r"\.([^.\[]+)|(\[\*\])", pattern)

    def walk(node: Any, index: int, path: str) -> Iterator[str]:
        if index == len(parts):
            yield path
            return
        key, star_index = parts[index]
        if star_index:
            if isinstance(node, list):
                for i, item in enumerate(node):
                    yield from walk(item, index + 1, f"{path}[{i}]")
        elif isinstance(node, dict):
            if key == "*":
                for name, child in node.items():
                    yield from walk(child, index + 1, f"{path}.{name}")
            elif key in node:
                yield from walk(node[key], index + 1, f"{path}.{key}")

    yield from walk(data, 0, "$")


def load(
    path: str | os.PathLike[str],
    registry: ComponentRegistry,
    env: dict[str, str] | None = None,
) -> LoadedConfig:
    """Load and validate a config file; raise ConfigError listing every problem found."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(file, None, "$", f"cannot read config: {exc.strerror}")]) from None
    return loads(text, registry, file=file, env=env)


def loads(
    text: str,
    registry: ComponentRegistry,
    *,
    file: str = "<config>",
    env: dict[str, str] | None = None,
) -> LoadedConfig:
    loader = _Loader(file, dict(os.environ) if env is None else env)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem(file, line, "$", f"invalid YAML: {reason}")]) from None
    raw: Any = loader.value(node, "$") if node is not None else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([Problem(file, 1, "$", "expected a mapping at the top level")])

    for pattern, feature in UNSUPPORTED.items():
        for found in _glob_paths(raw, pattern):
            value = _lookup(raw, found)
            if value in (None, [], {}, False):
                continue  # an explicit "off" is harmless
            loader._problem(found, f"not supported yet ({feature} arrive in a later version)")

    conv = _Converter(loader, raw)
    config = _convert_sections(conv, raw)
    loaded = LoadedConfig(config=config, path=Path(file))
    if not loader.problems:
        _check_references(loader, config)
        _resolve_components(conv, loaded, registry)
    if loader.problems:
        raise ConfigError(loader.problems)
    return loaded


def _convert_sections(conv: _Converter, raw: dict[str, Any]) -> Config:
    sections = {k: v for k, v in raw.items() if k not in ("sources", "endpoints", "routes")}
    config = conv.convert(sections, Config, "$") or Config()
    for key, type_ in (("sources", SourceConfig), ("endpoints", EndpointConfig)):
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            conv.loader._problem(f"$.{key}", "expected a mapping of names")
            continue
        converted: dict[str, Any] = {}
        for name, item in value.items():
            item_path = f"$.{key}.{name}"
            if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
                conv.loader._problem(item_path, "names may use only letters, digits, '-' and '_'")
                continue
            result = conv.convert(item if item is not None else {}, type_, item_path)
            if result is not None:
                converted[name] = result
        setattr(config, key, converted)
    routes = raw.get("routes") or []
    if not isinstance(routes, list):
        conv.loader._problem("$.routes", "expected a list of routes")
    else:
        config.routes = [
            r for i, item in enumerate(routes) if (r := conv.convert(item, RouteConfig, f"$.routes[{i}]"))
        ]
    return config


def _check_references(loader: _Loader, config: Config) -> None:
    if INTERNAL_SOURCE in config.sources:
        loader._problem(
            f"$.sources.{INTERNAL_SOURCE}",
            f"{INTERNAL_SOURCE!r} is reserved for events published by your services",
        )
    try:
        seconds(config.broker.retention)
    except ValueError as exc:
        loader._problem("$.broker.retention", str(exc))
    for name, endpoint in config.endpoints.items():
        path = f"$.endpoints.{name}"
        if (endpoint.url is None) == (endpoint.subject is None):
            loader._problem(path, "set exactly one of url or subject")
        if endpoint.url is not None and not re.match(r"^https?://[^/\s]+", endpoint.url):
            loader._problem(f"{path}.url", f"expected an http:// or https:// URL, got {endpoint.url!r}")
        if endpoint.concurrency < 1:
            loader._problem(f"{path}.concurrency", "must be at least 1")
        if not 0 <= endpoint.retry.jitter < 1:
            loader._problem(f"{path}.retry.jitter", "must be between 0 and 1")
    for i, route in enumerate(config.routes):
        for j, target in enumerate(route.to):
            if target not in config.endpoints:
                loader._problem(f"$.routes[{i}].to[{j}]", f"no endpoint named {target!r}")
        for j, origin in enumerate(route.from_ or []):
            if origin != INTERNAL_SOURCE and origin not in config.sources:
                loader._problem(
                    f"$.routes[{i}].from[{j}]",
                    f"no source named {origin!r} (use {INTERNAL_SOURCE!r} for events from your services)",
                )
    if config.broker.url is None and config.broker.replicas != 1:
        loader._problem("$.broker.replicas", "the embedded broker is a single server: replicas must be 1")


def _resolve_components(conv: _Converter, loaded: LoadedConfig, registry: ComponentRegistry) -> None:
    config = loaded.config
    wanted: list[tuple[ComponentKind, str, dict[str, Any], dict[str, Component]]] = []
    for name, source in config.sources.items():
        if source.verify is not None:
            wanted.append(
                (
                    ComponentKind.VERIFIER,
                    f"$.sources.{name}.verify",
                    source.verify,
                    loaded.verifiers,
                )
            )
    for name, endpoint in config.endpoints.items():
        if endpoint.signing is not None:
            wanted.append(
                (
                    ComponentKind.SIGNER,
                    f"$.endpoints.{name}.signing",
                    endpoint.signing,
                    loaded.signers,
                )
            )
    for kind, path, spec, into in wanted:
        key_name = "scheme" if kind is ComponentKind.SIGNER else "type"
        type_name = spec.get(key_name)
        if not isinstance(type_name, str):
            conv.loader._problem(path, f"missing {key_name!r}: one of {registry.names(kind)}")
            continue
        component_type = registry.get(kind, type_name)
        if component_type is None:
            conv.loader._problem(
                f"{path}.{key_name}",
                f"unknown {kind} {type_name!r}; installed: {', '.join(registry.names(kind)) or 'none'}",
            )
            continue
        options = {k: v for k, v in spec.items() if k != key_name}
        converted = conv.convert(options, component_type.config_type, path)
        if converted is not None:
            into[path.split(".")[2]] = Component(kind, type_name, converted)


def json_schema(registry: ComponentRegistry) -> dict[str, Any]:
    """The JSON Schema of the config, with every registered component's options, for editors."""
    schema = msgspec.json.schema(Config)
    defs = schema.setdefault("$defs", {})
    for kind, field_name, key_name, struct in (
        (ComponentKind.VERIFIER, "verify", "type", "SourceConfig"),
        (ComponentKind.SIGNER, "signing", "scheme", "EndpointConfig"),
    ):
        variants = []
        for name in registry.names(kind):
            ctype = registry.get(kind, name)
            assert ctype is not None
            (sub,), sub_defs = msgspec.json.schema_components(
                [ctype.config_type], ref_template="#/$defs/{name}"
            )
            defs.update(sub_defs)
            target = sub_defs[sub["$ref"].split("/")[-1]]
            target.setdefault("properties", {})[key_name] = {"const": name}
            target.setdefault("required", []).append(key_name)
            variants.append(sub)
        defs[struct]["properties"][field_name] = {"anyOf": [*variants, {"type": "null"}]}
    schema["title"] = "hookgate configuration"
    return schema


Mode = Literal["embedded", "external"]


def broker_mode(config: Config) -> Mode:
    return "embedded" if config.broker.url is None else "external"
