"""The YAML config: msgspec Structs, loading with file:line:path errors, env interpolation.

Loading has three steps, and every problem found on the way is collected and reported together:

1. The YAML is composed into nodes and turned into plain values by `_Loader`, which records the
   line of every key path and expands `${VAR}` references (so a missing variable has a line).
2. Keys of the contract that are not implemented yet are refused, then the values are converted
   into the Structs below. Each source, endpoint and route is converted on its own, so one bad
   item does not hide the others; when msgspec rejects a value, the value is walked field by field
   to report every problem in it, not only the first.
3. Rules that span fields (references between sections, url xor subject, ...) are checked, and
   plugin components (`verify:`, `signing:`) are converted into the config Struct their plugin
   registered, with the same error format.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, Protocol, TypeVar, Union, get_args, get_origin

import httpx
import msgspec
import yaml

from hookgate.config.filters import FilterError, compile_filter
from hookgate.config.flow import CircuitBreakerConfig, RateLimitConfig
from hookgate.config.sealing import parse_key
from hookgate.observe import tracing
from hookgate.plugin_kit.units import Duration, Size, format_duration, seconds, size_bytes
from hookgate.transport.fields import sendable_value
from hookgate.transport.proxy import parse_proxy
from hookgate.transport.ssrf import EgressGuard
from hookgate.transport.url import parse_url
from hookgate.types import INTERNAL_SOURCE, ComponentKind, ComponentRegistry

# Source and endpoint names become NATS subject tokens and consumer names.
NAME_PATTERN = r"^[A-Za-z0-9_-]+$"
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, description="letters, digits, '-' and '_'")]
# Dot-separated tokens; `(?!\n)` because msgspec's `$` would also match before a final newline.
PREFIX_PATTERN = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*(?!\n)$"
Prefix = Annotated[str, msgspec.Meta(pattern=PREFIX_PATTERN)]

DEFAULT_RETRY_SCHEDULE = ["5s", "5m", "30m", "2h", "5h", "10h", "10h"]
# broker.sync when it is not set: how often the embedded server forces its store to disk.
DEFAULT_SYNC = "1s"


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# Files named in the config (TLS certificates and keys, NATS credentials, the embedded broker's
# store) are relative to the config file's directory, whatever the working directory; `load`
# makes them absolute.
FilePath = Annotated[
    str, msgspec.Meta(min_length=1, description="a file path, absolute or relative to the config file")
]


class TLSFiles(_Base):
    certfile: FilePath
    keyfile: FilePath


class ServerConfig(_Base):
    """The HTTP server: ingress, API, health and metrics on one port."""

    listen: Annotated[
        str, msgspec.Meta(description='host:port, e.g. "127.0.0.1:8080" (port 0: any free port)')
    ] = "127.0.0.1:8080"
    tls: TLSFiles | None = None
    # Larger requests get 413, and are never read past the limit.
    max_body: Size = "1MiB"
    api_tokens: Annotated[
        list[str], msgspec.Meta(description="bearer tokens for /api/v1; empty ones are ignored")
    ] = []
    # How long ingress waits for JetStream to store an event before answering 503.
    publish_timeout: Duration = "5s"
    # On SIGINT/SIGTERM, how long in-flight deliveries may take to finish.
    shutdown_grace: Duration = "10s"
    header_timeout: Annotated[
        Duration,
        msgspec.Meta(
            description="a request's headers must arrive within this long of the connection opening"
            " (or of its first byte after an idle keep-alive); else the connection is closed"
        ),
    ] = "10s"
    body_timeout: Annotated[
        Duration,
        msgspec.Meta(
            description="a request's body must arrive within this long of its headers; else the"
            " connection is closed"
        ),
    ] = "10s"
    max_connections: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            description="open connections at most; past it a new connection closes the one that has"
            " waited longest for its client (never one whose request is being processed), or is"
            " refused if every one is processing",
        ),
    ] = 1024
    backlog: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            description="the listen backlog: connections the kernel queues before they are accepted"
            " (capped by net.core.somaxconn)",
        ),
    ] = 1024
    max_in_flight: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            description="events (webhooks and POST /api/v1/events) being verified and stored, from"
            " the end of their body to their answer; past it, 503 with Retry-After at once",
        ),
    ] = 512
    max_unrouted: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            description="events stored but not yet routed (the router's backlog); past it, 503 with"
            " Retry-After at once; 0: no limit",
        ),
    ] = 100000


class BrokerTLS(_Base):
    ca_file: FilePath | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None


class BrokerConfig(_Base):
    """NATS JetStream: embedded (no url) or an external server or cluster."""

    url: Annotated[
        str | list[str] | None,
        msgspec.Meta(description="external NATS server(s); omitted or empty: an embedded nats-server"),
    ] = None
    data_dir: Annotated[
        str, msgspec.Meta(description="embedded server's storage, relative to the config file")
    ] = ".hookgate"
    token: str | None = None
    user: str | None = None
    password: str | None = None
    creds: Annotated[
        FilePath | None, msgspec.Meta(description="a NATS .creds file (user JWT and seed), as nsc writes it")
    ] = None
    nkey_seed: Annotated[
        FilePath | None,
        msgspec.Meta(description="a file holding a user nkey seed (SU...) alone; not the seed itself"),
    ] = None
    tls: BrokerTLS | None = None
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    # How long events, deliveries and attempts are kept.
    retention: Duration = "72h"
    # Providers retry for days; duplicates inside this window are stored and delivered once.
    dedup_window: Duration = "24h"
    # Subjects start with "<prefix>." and streams with "<PREFIX>_".
    prefix: Prefix = "hookgate"
    sync: Annotated[
        str | None,
        msgspec.Meta(
            description=(
                'embedded broker only: how often JetStream forces stored data to disk, "always" (every '
                'write) or a duration; omitted: "1s". An acknowledged event survives a host crash or '
                "power loss only once synced. An external server's own jetstream.sync_interval applies"
            ),
        ),
    ] = None
    secrets_keys: Annotated[
        str | list[str],
        msgspec.Meta(
            description=(
                "keys that seal API endpoints' documents (secrets included) in KV: each 32 random bytes "
                "in base64 (openssl rand -base64 32); the first seals, all open (rotation: put the new "
                "one first). Empty ones are ignored. None: an embedded broker keeps a generated key in "
                "data_dir; with an external broker, endpoints holding secrets cannot be created"
            )
        ),
    ] = []

    def secrets_key_texts(self) -> list[str]:
        """The configured secrets keys, empty ones left out."""
        keys = [self.secrets_keys] if isinstance(self.secrets_keys, str) else self.secrets_keys
        return [key for key in keys if key.strip()]


class ResponseConfig(_Base):
    """The answer to a provider once its event is stored."""

    # Providers retry anything but 2xx, so only 2xx may be configured.
    status: Annotated[int, msgspec.Meta(ge=200, le=299, description="the status, 2xx only")] = 202
    body: Annotated[str | None, msgspec.Meta(description='the body; omitted: {"id": "<event id>"}')] = None
    content_type: Annotated[str, msgspec.Meta(description="the body's content type")] = "application/json"


class SourceConfig(_Base):
    """A webhook sender, served at POST /webhooks/<name>."""

    verify: Annotated[
        dict[str, Any] | None, msgspec.Meta(description="a signature verifier: {type: <name>, ...options}")
    ] = None
    event_type: Annotated[str | None, msgspec.Meta(description="body.<path> | header.<name> | a literal")] = (
        None
    )
    event_id: Annotated[
        str | None, msgspec.Meta(description="the provider's event id: body.<path> | header.<name>")
    ] = None
    dedup: Annotated[
        Literal["id", "body"],
        msgspec.Meta(
            description="what makes a request a duplicate: id (the event_id, the default) or body (a SHA-256 "
            "of the raw body, for providers that do not sign their delivery id)"
        ),
    ] = "id"
    response: ResponseConfig | None = None
    auth: Annotated[
        list[dict[str, Any]],
        msgspec.Meta(description="access rules, all of which must pass: [{type: <name>, ...options}]"),
    ] = []
    handshake: Annotated[
        dict[str, Any] | None,
        msgspec.Meta(description="a provider handshake answered on GET: {type: <name>, ...options}"),
    ] = None


class ExponentialRetry(_Base):
    """Delays of base, base*factor, base*factor^2, ... capped at max; `attempts` in all."""

    base: Duration = "5s"
    factor: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    max: Duration = "10h"
    attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 8


class RetryConfig(_Base):
    """When a failed delivery is tried again, and when it is given up."""

    schedule: Annotated[
        list[Duration],
        msgspec.Meta(
            description="the delays before each retry, so one more attempt than entries",
            extra_json_schema={"default": DEFAULT_RETRY_SCHEDULE},
        ),
    ] = msgspec.field(default_factory=lambda: list(DEFAULT_RETRY_SCHEDULE))
    exponential: Annotated[
        ExponentialRetry | None, msgspec.Meta(description="computed delays instead of a schedule")
    ] = None
    jitter: Annotated[
        float, msgspec.Meta(ge=0, lt=1, description="each delay varies by up to this share, either way")
    ] = 0.2
    final_statuses: Annotated[
        list[Annotated[int, msgspec.Meta(ge=300, le=599)]],
        msgspec.Meta(description="statuses that end a delivery at once, dead-lettered, e.g. [400, 422]"),
    ] = []

    def delays(self) -> list[float]:
        """Seconds before each retry, without jitter."""
        if self.exponential is not None:
            e = self.exponential
            return [min(seconds(e.base) * e.factor**i, seconds(e.max)) for i in range(e.attempts - 1)]
        return [seconds(d) for d in self.schedule]


class EndpointConfig(_Base):
    """Where events go: an HTTP(S) url or a NATS subject."""

    url: Annotated[str | None, msgspec.Meta(description="http(s) URL to POST each delivery to")] = None
    subject: Annotated[
        str | None, msgspec.Meta(description="or a NATS subject to publish each delivery to")
    ] = None
    timeout: Annotated[Duration, msgspec.Meta(description="for one attempt, connecting included")] = "15s"
    headers: Annotated[dict[str, str], msgspec.Meta(description="added to every request")] = {}
    signing: Annotated[
        dict[str, Any] | None, msgspec.Meta(description="an outgoing signer: {scheme: <name>, ...options}")
    ] = None
    auth: Annotated[
        dict[str, Any] | None,
        msgspec.Meta(description="how hookgate authenticates to the endpoint: {type: <name>, ...options}"),
    ] = None
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    concurrency: Annotated[int, msgspec.Meta(ge=1, description="attempts in flight at once")] = 10
    rate_limit: RateLimitConfig | None = None
    circuit_breaker: CircuitBreakerConfig | None = None
    ordered: Annotated[
        bool,
        msgspec.Meta(
            description="one at a time, in publish order; a failing head retries in place and holds the rest"
        ),
    ] = False
    proxy: Annotated[
        str | None,
        msgspec.Meta(description='a forward proxy for this endpoint; "" goes direct even with egress.proxy'),
    ] = None
    disable_after: Annotated[
        Duration | None,
        msgspec.Meta(description="failing continuously for this long disables it; its deliveries are kept"),
    ] = None


class RouteConfig(_Base):
    """Which events go to which endpoints."""

    to: Annotated[list[str], msgspec.Meta(min_length=1)]
    name: str | None = None
    from_: Annotated[
        Annotated[list[str], msgspec.Meta(min_length=1)] | None,
        msgspec.Meta(description=f'source names or "{INTERNAL_SOURCE}"; omitted: every source'),
    ] = msgspec.field(default=None, name="from")
    types: Annotated[
        Annotated[list[str], msgspec.Meta(min_length=1)] | None,
        msgspec.Meta(description="event type globs; omitted: every type"),
    ] = None
    filter: Annotated[
        dict[str, Any] | None,
        msgspec.Meta(description='Mongo-style conditions on body paths and "headers.<name>"'),
    ] = None
    transform: Annotated[
        dict[str, Any] | None,
        msgspec.Meta(description="reshape events for this route's endpoints: {type: <name>, ...options}"),
    ] = None


class EgressConfig(_Base):
    """Outbound deliveries: the SSRF guard, forward proxies, and the NATS subjects endpoints may use."""

    allow_networks: Annotated[
        list[str],
        msgspec.Meta(description="CIDRs that deliveries may reach although loopback, private or link-local"),
    ] = []
    https_only: Annotated[bool, msgspec.Meta(description="refuse plain http:// endpoints")] = False
    proxy: Annotated[
        str | None,
        msgspec.Meta(description="an HTTP forward proxy for every delivery: http://[user:pass@]host:port"),
    ] = None
    proxies: Annotated[
        list[str],
        msgspec.Meta(
            description="forward proxies that endpoints created through the API may name in `proxy` "
            "(with or without the credentials given here); egress.proxy is allowed too. "
            "YAML endpoints may name any proxy"
        ),
    ] = []
    allow_subjects: Annotated[
        list[str],
        msgspec.Meta(
            description="NATS subject patterns (wildcards * and >) that subject endpoints may publish to "
            "although they start with $ or _INBOX; subjects under broker.prefix stay refused"
        ),
    ] = []


class LogConfig(_Base):
    """How the gateway logs: readable text, or one JSON object per line."""

    format: Literal["text", "json"] = "text"
    level: Annotated[
        Literal["debug", "info", "warning", "error"],
        msgspec.Meta(description="hookgate run --log-level (or HOOKGATE_LOG_LEVEL) overrides it"),
    ] = "info"
    body_excerpt: Annotated[
        Size,
        msgspec.Meta(
            description="how much of an event's body the event log shows; the whole body is always "
            "stored and delivered"
        ),
    ] = "64KiB"


class OpsConfig(_Base):
    """Operational events (endpoint.disabled, endpoint.recovered, delivery.exhausted, delivery.failing)."""

    endpoint: Annotated[
        str | None, msgspec.Meta(description="also deliver operational events to this endpoint")
    ] = None


class TracingConfig(_Base):
    """OpenTelemetry tracing: spans for ingress, publishes and delivery attempts (needs hookgate[otel])."""

    enabled: bool = False
    service_name: Annotated[
        str, msgspec.Meta(min_length=1, description="the service.name resource; OTEL_SERVICE_NAME wins")
    ] = "hookgate"


class Config(_Base):
    """hookgate configuration."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    egress: EgressConfig = msgspec.field(default_factory=EgressConfig)
    ops: OpsConfig = msgspec.field(default_factory=OpsConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)
    sources: dict[Name, SourceConfig] = {}
    endpoints: dict[Name, EndpointConfig] = {}
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
    access_rules: dict[str, list[Component]] = field(default_factory=dict)  # by source name
    handshakes: dict[str, Component] = field(default_factory=dict)  # by source name
    endpoint_auth: dict[str, Component] = field(default_factory=dict)  # by endpoint name
    transforms: dict[int, Component] = field(default_factory=dict)  # by index into config.routes
    route_positions: list[int] = field(default_factory=list)  # each route's index in the file
    lines: dict[str, int] = field(default_factory=dict)  # key path -> line, as the loader read it

    def line_of(self, path: str) -> int | None:
        """The line of a key path (`$.endpoints.billing.url`), or of its nearest parent."""
        return _line_of(self.lines, path)


# Keys of the contract that this version does not implement yet. They are refused whatever their
# value rather than ignored, so a config never silently loses a safety setting (an SSRF guard, an
# auth rule) that its author believes is in force.
UNSUPPORTED: dict[str, str] = {}


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
    missing: str | None = None  # the key that is missing at `path`, if that is the problem

    @property
    def at(self) -> str:
        """The path of what is at fault: a missing key's own path (`$.url`), where `path` (and
        the line of a YAML file) is its parent's."""
        return _child(self.path, self.missing) if self.missing is not None else self.path

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path}: {self.message}"


# --- paths ----------------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_LAST_STEP = re.compile(r'(?:\.[^.\[\]]*|\[(?:\d+|"(?:[^"\\]|\\.)*")\])$')


def _child(path: str, key: str) -> str:
    # Keys that could be misread as path syntax (dots, brackets, spaces) are written as ["..."].
    return f"{path}.{key}" if _PLAIN_KEY.fullmatch(key) else f"{path}[{json.dumps(key)}]"


def _parent(path: str) -> str | None:
    match = _LAST_STEP.search(path)
    return path[: match.start()] if match and match.start() > 0 else None


# --- YAML with lines ------------------------------------------------------------------------

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(\}|:-)")
# Aliases can expand a small file exponentially ("billion laughs"); a config never needs this many.
_MAX_NODES = 200_000


class _TooLarge(Exception):
    pass


class _Loader:
    """Turns composed YAML nodes into plain values, recording the line of every key path."""

    def __init__(self, file: str, env: dict[str, str]):
        self.file = file
        self.env = env
        self.lines: dict[str, int] = {}
        self.problems: list[Problem] = []
        # Paths whose value lacks an environment variable: problems reported at or below them
        # would only repeat that one (an empty value is not a duration, not a URL, ...).
        self.unresolved: set[str] = set()
        self._constructor = yaml.constructor.SafeConstructor()
        self._open: set[int] = set()
        self._nodes = 0

    def value(self, node: yaml.Node, path: str) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        self._nodes += 1
        if self._nodes > _MAX_NODES:
            raise _TooLarge
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if id(node) in self._open:
            self._unresolved(path, "an alias refers to a node that contains it")
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.value(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
            out: dict[str, Any] = {}
            self._mapping(node, path, out, merged=False)
            return out
        finally:
            self._open.discard(id(node))

    def _mapping(self, node: yaml.Node, path: str, out: dict[str, Any], *, merged: bool) -> None:
        merges: list[yaml.Node] = []
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(path, "keys must be plain strings", line)
                continue
            # Keys are taken as written: `on:` or `1:` name a source "on" or "1", not True or 1.
            key = key_node.value
            child = _child(path, key)
            if key in seen:
                self.problem(child, "duplicate key", line)
            seen.add(key)
            if merged:
                if key in out:
                    continue  # keys written in the mapping itself win over `<<:` merged ones
                self.lines.setdefault(child, line)
            else:
                self.lines[child] = line
            out[key] = self.value(value_node, child)
        # `<<: *defaults` or `<<: [*a, *b]`: earlier mappings win, as in the YAML merge key spec.
        for merge in merges:
            for source in merge.value if isinstance(merge, yaml.SequenceNode) else [merge]:
                if isinstance(source, yaml.MappingNode) and id(source) not in self._open:
                    self._open.add(id(source))
                    try:
                        self._mapping(source, path, out, merged=True)
                    finally:
                        self._open.discard(id(source))
                else:
                    self.problem(
                        path, "'<<' takes a mapping or a list of mappings", merge.start_mark.line + 1
                    )

    def _scalar(self, node: yaml.ScalarNode, path: str) -> Any:
        if node.tag == _STR_TAG and "$" in node.value:
            text = self._interpolate(node.value, path)
            # Values with references stay strings and are converted to the field's type, as
            # docker compose does: `replicas: ${R}` becomes an int and `token: ${T}` stays a string
            # even when T holds digits. A plain value that expands to nothing is YAML's empty
            # value, null, so `url: ${NATS_URL:-}` means "not set".
            resolved = path not in self.unresolved
            return None if text == "" and node.style is None and resolved else text
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:  # an unknown tag such as `!env`
            self.problem(path, f"invalid value: {exc.problem}")
        except ValueError as exc:  # a tag that does not fit, such as `!!int abc`
            self.problem(path, f"invalid value: {exc}")
        return None

    def _interpolate(self, text: str, path: str) -> str:
        out: list[str] = []
        i = 0
        while (j := text.find("$", i)) >= 0:
            out.append(text[i:j])
            following = text[j + 1 : j + 2]
            if following == "$":  # `$$` is a literal `$`
                out.append("$")
                i = j + 2
                continue
            if following != "{":  # a lone `$` (as in a regex) is kept as it is
                out.append("$")
                i = j + 1
                continue
            match = _REFERENCE.match(text, j)
            end = self._default_end(text, match.end()) if match and match.group(2) == ":-" else None
            if match is None or (match.group(2) == ":-" and end is None):
                self._unresolved(
                    path,
                    f"invalid variable reference in {_show(text)}: write ${{NAME}} or ${{NAME:-default}}, "
                    "and $$ for a literal $",
                )
                return text
            name = match.group(1)
            value = self.env.get(name)
            if end is not None:
                # `:-` as in the shell: the default applies when the variable is unset or empty.
                if not value:
                    value = self._interpolate(text[match.end() : end], path)
                i = end + 1
            else:
                if value is None:
                    self._unresolved(path, f"environment variable {name} is not set")
                    value = ""
                i = match.end()
            out.append(value)
        out.append(text[i:])
        return "".join(out)

    @staticmethod
    def _default_end(text: str, start: int) -> int | None:
        """The index of the `}` closing a default, which may itself hold `${...}` references."""
        depth = 0
        k = start
        while k < len(text):
            if text.startswith("$$", k):
                k += 2
                continue
            if text.startswith("${", k):
                depth += 1
                k += 2
                continue
            if text[k] == "}":
                if depth == 0:
                    return k
                depth -= 1
            k += 1
        return None

    def _unresolved(self, path: str, message: str) -> None:
        """Report a value that cannot be known; problems that would follow from it are not."""
        self.problems.append(Problem(self.file, self.line_of(path), path, message))
        self.unresolved.add(path)

    def lacks_variable(self, path: str) -> bool:
        """Whether a value at or below `path` lacks a variable (a whole-value error may follow from it)."""
        return any(u == path or u.startswith((path + ".", path + "[")) for u in self.unresolved)

    def problem(
        self, path: str, message: str, line: int | None = None, *, missing: str | None = None
    ) -> None:
        """Record a problem, unless it is at or below a value that lacks a variable."""
        at: str | None = path
        while at is not None:
            if at in self.unresolved:
                return
            at = _parent(at)
        self.problems.append(
            Problem(self.file, line if line is not None else self.line_of(path), path, message, missing)
        )

    def line_of(self, path: str) -> int | None:
        return _line_of(self.lines, path)


def _line_of(lines: dict[str, int], path: str) -> int | None:
    # Walk up the path until a recorded line is found (a missing key has its parent's line).
    at: str | None = path
    while at is not None:
        if at in lines:
            return lines[at]
        at = _parent(at)
    return lines.get("$")


# --- conversion -----------------------------------------------------------------------------

_MSGSPEC_PATH = re.compile(r" - at `(\$[^`]*)`$")
_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}
_NO_VALUE = object()
# Annotated strings whose pattern means nothing to a reader: say what is expected instead.
_EXPECTED: list[tuple[Any, str]] = [
    (Duration, 'a duration like "5m"'),
    (Size, 'a size like "64KiB"'),
    (Prefix, 'dot-separated names like "hookgate" (letters, digits, "-" and "_")'),
]


def _annotates(type_: Any, known: Any) -> bool:
    """Whether `type_` is `known`, or `known` with more metadata (a description added to a
    Duration, say: Annotated flattens `Annotated[Duration, Meta(...)]` into one new type)."""
    if type_ == known:
        return True
    if get_origin(type_) is not Annotated or get_origin(known) is not Annotated:
        return False
    base, *metadata = get_args(type_)
    known_base, *known_metadata = get_args(known)
    return bool(base == known_base and all(m in metadata for m in known_metadata))


def _unoptional(type_: Any) -> Any:
    """X for `X | None`; anything else unchanged."""
    if get_origin(type_) in (Union, types.UnionType):
        members = [t for t in get_args(type_) if t is not type(None)]
        if len(members) == 1:
            return members[0]
    return type_


def _bare(type_: Any) -> Any:
    """The type without `| None` and `Annotated[...]` wrappers, to see its structure."""
    while True:
        inner = _unoptional(type_)
        if get_origin(inner) is Annotated:
            inner = get_args(inner)[0]
        if inner is type_:
            return inner
        type_ = inner


def _struct_of(type_: Any) -> type[msgspec.Struct] | None:
    bare = _bare(type_)
    return bare if isinstance(bare, type) and issubclass(bare, msgspec.Struct) else None


def _accepts_none(type_: Any) -> bool:
    if get_origin(type_) is Annotated:
        return _accepts_none(get_args(type_)[0])
    if get_origin(type_) in (Union, types.UnionType):
        return any(_accepts_none(t) for t in get_args(type_))
    return type_ is Any or type_ is None or type_ is type(None)


def _fields(struct: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.encode_name: f for f in msgspec.structs.fields(struct)}


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return str(value)  # dates and timestamps that YAML resolved


def _drop_nulls(value: Any, type_: Any) -> Any:
    """Treat an empty YAML value (null) as "use the default" where the field cannot be null.

    `server:` with nothing under it, or `retry:` with only comments, then mean the defaults, and
    a null source or endpoint (`github:`) is one with every option at its default.
    """
    struct = _struct_of(type_)
    bare = _bare(type_)
    if struct is not None and isinstance(value, dict):
        fields = _fields(struct)
        for key in list(value):
            f = fields.get(key)
            if f is None:
                continue
            if value[key] is None and not f.required and not _accepts_none(f.type):
                del value[key]
            else:
                value[key] = _drop_nulls(value[key], f.type)
    elif get_origin(bare) is dict and isinstance(value, dict):
        item_type = get_args(bare)[1]
        for key, item in value.items():
            if item is None and _struct_of(item_type) is not None and not _accepts_none(item_type):
                value[key] = {}
            else:
                value[key] = _drop_nulls(item, item_type)
    elif get_origin(bare) is list and isinstance(value, list):
        value[:] = [_drop_nulls(item, get_args(bare)[0]) for item in value]
    return value


class _Converter:
    def __init__(self, loader: _Loader):
        self.loader = loader
        # Required keys already suggested for a typo, by path: "missing" would say it twice.
        self.suggested: dict[str, set[str]] = {}

    def convert(self, value: Any, type_: Any, path: str) -> Any:
        """The value converted to `type_`, or None after reporting every problem found in it."""
        try:
            return msgspec.convert(value, type_, strict=False)
        except msgspec.ValidationError as exc:
            if not self._diagnose(value, type_, path) and not self.loader.lacks_variable(path):
                self._report(str(exc), path, type_, value)
            return None

    def _check(self, value: Any, type_: Any, path: str) -> int:
        """How many problems `value` has as a `type_` (each one reported)."""
        try:
            msgspec.convert(value, type_, strict=False)
        except msgspec.ValidationError as exc:
            found = self._diagnose(value, type_, path)
            if not found and not self.loader.lacks_variable(path):
                self._report(str(exc), path, type_, value)
            return found or 1
        return 0

    def _diagnose(self, value: Any, type_: Any, path: str) -> int:
        """Report the problems inside a rejected struct, list or mapping, item by item."""
        struct = _struct_of(type_)
        bare = _bare(type_)
        if struct is not None and isinstance(value, dict):
            fields = _fields(struct)
            found = self.unknown_keys(value, struct, path)
            for key, item in value.items():
                if key in fields:
                    found += self._check(item, fields[key].type, _child(path, key))
            for name, f in fields.items():
                if f.required and name not in value:
                    if name not in self.suggested.get(path, ()):
                        self.loader.problem(path, f"missing required key {_show(name)}", missing=name)
                    found += 1
            return found
        if get_origin(bare) is list and isinstance(value, list):
            item_type = get_args(bare)[0]
            return sum(self._check(item, item_type, f"{path}[{i}]") for i, item in enumerate(value))
        if get_origin(bare) is dict and isinstance(value, dict):
            item_type = get_args(bare)[1]
            return sum(self._check(item, item_type, _child(path, str(k))) for k, item in value.items())
        return 0

    def unknown_keys(self, value: dict[str, Any], struct: type[msgspec.Struct], path: str) -> int:
        """Report keys the struct does not have, with a suggestion for likely typos."""
        fields = _fields(struct)
        unset = [name for name in fields if name not in value]
        found = 0
        for key in value:
            if key not in fields:
                close = difflib.get_close_matches(key, unset, n=1)
                if close:
                    self.suggested.setdefault(path, set()).add(close[0])
                    hint = f'did you mean "{close[0]}"?'
                else:
                    hint = f"expected one of: {', '.join(fields)}"
                self.loader.problem(_child(path, key), f"unknown key; {hint}")
                found += 1
        return found

    def _report(self, message: str, path: str, type_: Any, value: Any) -> None:
        at = _MSGSPEC_PATH.search(message)
        if at:
            message = message[: at.start()]
            if at.group(1) != "$":  # the problem is deeper than the value we know
                path, type_, value = path + at.group(1)[1:], None, _NO_VALUE
        expected = _unoptional(type_)
        got = "" if value is _NO_VALUE else f", got {_show(value)}"
        for known, description in _EXPECTED:
            if _annotates(expected, known):
                self.loader.problem(path, f"expected {description}{got}")
                return
        if get_origin(expected) is Literal:
            options = ", ".join(_show(o) for o in get_args(expected))
            self.loader.problem(path, f"expected one of {options}{got}")
            return
        # msgspec's own words, with its type names spelled out: "expected an integer >= 1, got 0".
        text = re.sub(
            r"`([^`]+)`",
            lambda m: " or ".join(_TYPE_WORDS.get(t, t) for t in m.group(1).split(" | ")),
            message,
        )
        text = text[:1].lower() + text[1:]
        if got and not isinstance(value, dict | list):
            text = re.sub(r", got .*$", "", text) + got
        self.loader.problem(path, text)


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
                    yield node, name, _child(path, name)
                else:
                    yield from walk(node[name], index + 1, _child(path, name))

    yield from walk(data, 0, "$")


# --- loading --------------------------------------------------------------------------------


def load(
    path: str | os.PathLike[str],
    registry: ComponentRegistry,
    env: dict[str, str] | None = None,
) -> LoadedConfig:
    """Load and validate a config file; raise ConfigError listing every problem found.

    The file paths in it are made absolute, relative to the config file's directory.
    """
    file = str(path)
    loaded = loads(_read(path), registry, file=file, env=env)
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
    loader, raw = _parse(_read(path), file, env)
    _drop_nulls(raw, Config)  # as `loads` does, so `server:` left empty means the defaults there too
    server = _Converter(loader).convert(raw.get("server", {}), ServerConfig, "$.server")
    if server is not None:
        _check_server(loader.problem, server)
    problems = [p for p in loader.problems if p.path == "$.server" or p.path.startswith("$.server.")]
    _raise_problems(problems)
    if server is None:
        raise ConfigError([Problem(file, None, "$.server", "cannot be read")])
    return server


def _raise_problems(problems: list[Problem]) -> None:
    """Every problem once, in the order of the file."""
    if problems:
        raise ConfigError(sorted(dict.fromkeys(problems), key=lambda p: p.line or 0))


def _read(path: str | os.PathLike[str]) -> str:
    file = str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(file, None, "$", f"cannot read config: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [Problem(file, None, "$", f"cannot read config: not UTF-8 ({exc.reason})")]
        ) from None


def loads(
    text: str,
    registry: ComponentRegistry,
    *,
    file: str = "<config>",
    env: dict[str, str] | None = None,
) -> LoadedConfig:
    """Validate config text; `file` names it in errors, `env` replaces os.environ for `${VAR}`."""
    loader, raw = _parse(text, file, env)

    for pattern, feature in UNSUPPORTED.items():
        for mapping, key, found in list(_unsupported(raw, pattern)):
            loader.problem(found, f"not supported yet ({feature}); remove it")
            del mapping[key]  # so it is not reported a second time as an unknown key

    for mapping, key, retry_path in _unsupported(raw, "$.endpoints.*.retry"):
        retry = mapping[key]
        if isinstance(retry, dict) and "schedule" in retry and "exponential" in retry:
            loader.problem(f"{retry_path}.exponential", "set either schedule or exponential, not both")

    conv = _Converter(loader)
    _drop_nulls(raw, Config)
    config, valid, route_indexes = _convert_sections(conv, raw)
    declared = {
        key: set(raw[key]) if isinstance(raw.get(key), dict) else set() for key in ("sources", "endpoints")
    }
    loaded = LoadedConfig(config=config, path=Path(file), route_positions=route_indexes, lines=loader.lines)
    _check_rules(loader, config, valid, declared["sources"], declared["endpoints"], route_indexes)
    _resolve_components(conv, loaded, registry)
    _raise_problems(loader.problems)
    return loaded


def _parse(text: str, file: str, env: dict[str, str] | None) -> tuple[_Loader, dict[str, Any]]:
    """The YAML as plain values with variables interpolated; syntax errors raise ConfigError."""
    loader = _Loader(file, dict(os.environ) if env is None else env)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
        reason = problem or str(exc)
        if context and problem and problem.startswith("but "):  # "expected a single document ..."
            reason = f"{context} {problem}"
        reason += f" (column {mark.column + 1})" if mark is not None else ""
        lines = text.splitlines()
        if line is not None and 0 < line <= len(lines) and "${" in lines[line - 1]:
            # `{` is YAML syntax inside [...] and {...}: the commonest cause there.
            reason += '; inside [...] or {...}, quote values that use variables: "${VAR}"'
        raise ConfigError([Problem(file, line, "$", f"invalid YAML: {reason}")]) from None
    try:
        raw: Any = loader.value(node, "$") if node is not None else None
    except _TooLarge:
        raise ConfigError([Problem(file, None, "$", "too many values once aliases are expanded")]) from None
    if raw is None:  # an empty file, or only comments: every default
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([Problem(file, 1, "$", f"expected a mapping of sections, got {_show(raw)}")])
    return loader, raw


def _convert_sections(conv: _Converter, raw: dict[str, Any]) -> tuple[Config, set[str], list[int]]:
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
        items = raw.get(key, {})
        if not isinstance(items, dict):
            conv.convert(items, dict[str, Any], f"$.{key}")  # reports "expected a mapping"
            continue
        converted: dict[str, Any] = {}
        for name, item in items.items():
            item_path = _child(f"$.{key}", name)
            if not re.fullmatch(NAME_PATTERN, name):
                conv.loader.problem(
                    item_path, "names may use only letters, digits, '-' and '_' (they become NATS subjects)"
                )
            elif key == "sources" and name == INTERNAL_SOURCE:
                conv.loader.problem(
                    item_path, f"{_show(INTERNAL_SOURCE)} is reserved for events published by your services"
                )
            elif (result := conv.convert(item, type_, item_path)) is not None:
                converted[name] = result
        setattr(config, key, converted)
    routes = raw.get("routes", [])
    indexes: list[int] = []
    if not isinstance(routes, list):
        conv.convert(routes, list[RouteConfig], "$.routes")
    else:
        for i, item in enumerate(routes):
            if (route := conv.convert(item, RouteConfig, f"$.routes[{i}]")) is not None:
                config.routes.append(route)
                indexes.append(i)
    return config, valid, indexes


# --- rules that span fields -----------------------------------------------------------------

_LISTEN = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})")
_HTTP_URL = re.compile(r"https?://[^/\s?#]+\S*")
_SUBJECT = re.compile(r"[^\s.*>]+(?:\.[^\s.*>]+)*")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NATS_SCHEMES = ("nats", "tls", "ws", "wss")
_BROKER_AUTH = ("token", "user", "password", "creds", "nkey_seed")
# An nkey seed: "S", its role, and base32 (58 characters in all).
_NKEY_SEED = re.compile(r"S[UAONCX][A-Z2-7]{56}")
# Headers every delivery carries already; a second copy would contradict them.
_OWN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "user-agent",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)


def subject_refusal(subject: str, prefix: str | None, allow: list[str]) -> str | None:
    """Why a subject endpoint may not publish to `subject`, or None if it may.

    Refused: subjects under the gateway's own prefix (they would loop, or write into its streams),
    `$` subjects that name its own streams or buckets (`$KV.HOOKGATE_ENDPOINTS.x`), and, unless a
    pattern in `allow` (egress.allow_subjects) matches, every other `$` subject (the JetStream API,
    KV and object stores, system events) and `_INBOX` subjects (replies to other clients).
    """
    if prefix is not None:
        if subject == prefix or subject.startswith(prefix + "."):
            return f"subjects under {_show(prefix)} are hookgate's own: it would loop"
        own = prefix.upper().replace("-", "_").replace(".", "_") + "_"  # its streams and buckets
        if subject.startswith("$") and any(token.startswith(own) for token in subject.split(".")):
            return f"this subject reaches hookgate's own streams or buckets ({own}*)"
    if any(subject_matches(pattern, subject) for pattern in allow):
        return None
    if subject.startswith("$"):
        return (
            "subjects starting with $ belong to NATS itself (the JetStream API, KV buckets, system "
            "events); list a pattern for it in egress.allow_subjects if it is meant"
        )
    if subject.startswith("_INBOX"):
        return (
            "_INBOX subjects carry replies to other clients' requests; list a pattern for it in "
            "egress.allow_subjects if it is meant"
        )
    return None


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether a NATS subject pattern (`*`: one token, `>`: one or more trailing tokens) matches."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or (token != "*" and token != tokens[i]):
            return False
    return len(tokens) == len(wanted)


def _is_subject_pattern(pattern: str) -> bool:
    tokens = pattern.split(".")
    return (
        all(
            token
            and not any(c.isspace() for c in token)
            and (token in ("*", ">") or not {"*", ">"} & set(token))
            for token in tokens
        )
        and ">" not in tokens[:-1]
    )


def listed_proxy(proxy: str, egress: EgressConfig) -> str | None:
    """The proxy URL from the config (egress.proxies, or egress.proxy) that an API endpoint's `proxy`
    names, or None. It names one by the same host and port, with the same credentials or none (so
    the API never needs a proxy's password); raises ValueError if `proxy` is not a proxy URL."""
    wanted = parse_proxy(proxy)
    for listed in [*egress.proxies, *([egress.proxy] if egress.proxy else [])]:
        try:
            have = parse_proxy(listed)
        except ValueError:
            continue  # reported when the config loaded
        if (have.host, have.port) == (wanted.host, wanted.port) and wanted.authorization in (
            None,
            have.authorization,
        ):
            return listed
    return None


class Report(Protocol):
    def __call__(self, path: str, message: str, *, missing: str | None = None) -> None: ...


def _check_rules(
    loader: _Loader,
    config: Config,
    valid: set[str],
    sources: set[str],
    endpoints: set[str],
    route_indexes: list[int],
) -> None:
    problem = loader.problem
    if "server" in valid:
        _check_server(problem, config.server)
    if "broker" in valid:
        _check_broker(problem, config.broker)
    # When the broker section failed, its defaults stand in: rules that read it would mislead.
    broker = config.broker if "broker" in valid else None
    for name, source in config.sources.items():
        path = _child("$.sources", name)
        for key in ("event_type", "event_id"):
            selector = getattr(source, key)
            if selector in ("body.", "header."):
                problem(f"{path}.{key}", f"{_show(selector)} needs a name after the dot")
    egress = config.egress if "egress" in valid else None
    for name, endpoint in config.endpoints.items():
        _check_endpoint(problem, _child("$.endpoints", name), endpoint, broker, egress)
    route_names: dict[str, int] = {}
    proxies = [("$.egress.proxy", egress.proxy if egress is not None else None)]
    proxies += [(f"$.egress.proxies[{i}]", proxy) for i, proxy in enumerate(egress.proxies if egress else [])]
    proxies += [(f"{_child('$.endpoints', n)}.proxy", e.proxy) for n, e in config.endpoints.items()]
    for proxy_path, proxy in proxies:
        if proxy:
            try:
                parse_proxy(proxy)
            except ValueError as exc:
                problem(proxy_path, str(exc))
    if "ops" in valid and config.ops.endpoint is not None and config.ops.endpoint not in endpoints:
        problem("$.ops.endpoint", f"no endpoint named {_show(config.ops.endpoint)}")
    if "tracing" in valid and config.tracing.enabled and not tracing.available():
        problem("$.tracing.enabled", tracing.INSTALL_HINT)
    if "egress" in valid:
        for i, cidr in enumerate(config.egress.allow_networks):
            try:
                EgressGuard([cidr])
            except ValueError as exc:
                problem(f"$.egress.allow_networks[{i}]", str(exc).removeprefix("egress.allow_networks: "))
        for i, pattern in enumerate(config.egress.allow_subjects):
            if not _is_subject_pattern(pattern):
                problem(
                    f"$.egress.allow_subjects[{i}]",
                    'expected a NATS subject pattern like "$JS.EVENT.ADVISORY.>" (tokens separated by dots; '
                    f'"*" for one token, ">" for the rest), got {_show(pattern)}',
                )
    for i, route in zip(route_indexes, config.routes, strict=True):
        if route.filter is not None:
            try:
                compile_filter(route.filter, f"$.routes[{i}].filter")
            except FilterError as exc:
                for error in exc.errors:
                    problem(error.path, error.message)
        if route.name is not None:
            if route.name in route_names:
                problem(
                    f"$.routes[{i}].name", f"duplicate route name (also $.routes[{route_names[route.name]}])"
                )
            route_names.setdefault(route.name, i)
        for j, target in enumerate(route.to):
            if target not in endpoints:
                known = ", ".join(sorted(endpoints)) or "none"
                problem(f"$.routes[{i}].to[{j}]", f"no endpoint named {_show(target)} (endpoints: {known})")
        for j, origin in enumerate(route.from_ or []):
            if origin != INTERNAL_SOURCE and origin not in sources:
                problem(
                    f"$.routes[{i}].from[{j}]",
                    f"no source named {_show(origin)} "
                    f"(use {_show(INTERNAL_SOURCE)} for events from your services)",
                )


def _check_server(problem: Report, server: ServerConfig) -> None:
    match = _LISTEN.fullmatch(server.listen)
    if not server.listen.startswith(("unix:", "fd://")) and (match is None or int(match.group(1)) > 65535):
        problem("$.server.listen", f'expected host:port like "127.0.0.1:8080", got {_show(server.listen)}')
    if size_bytes(server.max_body) == 0:
        problem("$.server.max_body", "must be more than 0")
    if seconds(server.publish_timeout) == 0:
        problem("$.server.publish_timeout", "must be more than 0")


def _check_broker(problem: Report, broker: BrokerConfig) -> None:
    urls = [broker.url] if isinstance(broker.url, str) else broker.url
    if urls is not None:
        if not urls or not all(urls):
            problem(
                "$.broker.url", "expected a NATS URL or a list of them (omit url for the embedded server)"
            )
        for i, url in enumerate(urls):
            scheme = url.split("://", 1)[0] if "://" in url else None
            if scheme is not None and scheme not in _NATS_SCHEMES:
                where = "$.broker.url" if isinstance(broker.url, str) else f"$.broker.url[{i}]"
                problem(where, f"expected a nats://, tls://, ws:// or wss:// URL, got {_show(url)}")
        # A NATS connection authenticates one way; a second one set would be silently ignored.
        ways = [key for key in ("token", "user", "creds", "nkey_seed") if getattr(broker, key) is not None]
        for key in ways[1:]:
            problem(f"$.broker.{key}", f"set one way to authenticate: {ways[0]} is set already")
    else:
        # These settings only reach an external server; the embedded one would silently ignore them.
        for key in (*_BROKER_AUTH, "tls"):
            if getattr(broker, key) is not None:
                problem(f"$.broker.{key}", "only used with an external broker: set broker.url")
        if broker.replicas != 1:
            problem("$.broker.replicas", "the embedded broker is a single server: replicas must be 1")
        if broker.sync is not None and broker.sync != "always":
            try:
                interval = seconds(broker.sync)
            except ValueError:
                got = _show(broker.sync)
                problem("$.broker.sync", f'expected "always" or a duration like "1s", got {got}')
            else:
                if interval == 0:
                    problem("$.broker.sync", 'must be "always" or more than 0')
    if urls is not None and broker.sync is not None:
        problem(
            "$.broker.sync",
            "only used with the embedded broker: an external server syncs as its own "
            "jetstream.sync_interval says",
        )
    keys = [broker.secrets_keys] if isinstance(broker.secrets_keys, str) else broker.secrets_keys
    for i, key in enumerate(keys):
        if key.strip():
            try:
                parse_key(key)
            except ValueError as exc:
                # Never echoed: it is a secret, or meant to be one.
                where = "$.broker.secrets_keys"
                if not isinstance(broker.secrets_keys, str):
                    where += f"[{i}]"
                problem(where, str(exc))
    if broker.password is not None and broker.user is None:
        problem("$.broker.password", "set user with password")
    if broker.nkey_seed is not None and _NKEY_SEED.fullmatch(broker.nkey_seed.strip()):
        # Never echoed: it is a secret.
        problem(
            "$.broker.nkey_seed",
            "this is a seed itself, not a file: put the seed in a file readable only by hookgate "
            "and give its path",
        )
    if broker.tls is not None and broker.tls.key_file is not None and broker.tls.cert_file is None:
        problem("$.broker.tls.key_file", "set cert_file with key_file")
    retention = seconds(broker.retention)
    if retention == 0:
        problem("$.broker.retention", "must be more than 0")
    elif seconds(broker.dedup_window) > retention:
        # JetStream refuses a duplicate window longer than the stream's max age.
        problem("$.broker.dedup_window", f"must not be longer than broker.retention ({broker.retention})")


def _check_endpoint(
    problem: Report,
    path: str,
    endpoint: EndpointConfig,
    broker: BrokerConfig | None,
    egress: EgressConfig | None = None,
) -> None:
    if (endpoint.url is None) == (endpoint.subject is None):
        problem(path, "set exactly one of url or subject", missing="url" if endpoint.url is None else None)
    if endpoint.url is not None:
        if not _HTTP_URL.fullmatch(endpoint.url):
            problem(f"{path}.url", f"expected an http:// or https:// URL, got {_show(endpoint.url)}")
        else:
            # The transport's own parser: a URL accepted here is one every delivery can be sent to.
            try:
                parse_url(endpoint.url)
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                problem(f"{path}.url", f"not a URL hookgate can send to: {exc}")
    if endpoint.subject is not None:
        if not _SUBJECT.fullmatch(endpoint.subject):
            problem(
                f"{path}.subject",
                'expected a NATS subject like "billing.events" (no spaces or wildcards), '
                f"got {_show(endpoint.subject)}",
            )
        else:
            why = subject_refusal(
                endpoint.subject,
                broker.prefix if broker is not None else None,
                egress.allow_subjects if egress is not None else [],
            )
            if why is not None:
                problem(f"{path}.subject", why)
    if seconds(endpoint.timeout) == 0:
        problem(f"{path}.timeout", "must be more than 0")
    for header, value in endpoint.headers.items():
        if not _HEADER_NAME.fullmatch(header):
            problem(_child(f"{path}.headers", header), "not a valid header name")
        elif header.lower() in _OWN_HEADERS or header.lower().startswith("hookgate-"):
            problem(_child(f"{path}.headers", header), "hookgate sets this header itself")
        elif not sendable_value(value):
            # Not echoed: a header value may be a credential.
            problem(
                _child(f"{path}.headers", header),
                "the value holds a control character or is not ISO-8859-1; it could not be sent",
            )
    # A retry is a scheduled message in a stream whose max age is the retention: a longer delay
    # would expire before it fires, and the delivery would silently stop.
    retention = seconds(broker.retention) if broker is not None else 0
    if retention and endpoint.retry.exponential is not None:
        longest_delay = max(endpoint.retry.delays(), default=0) * (1 + endpoint.retry.jitter)
        if longest_delay >= retention:
            problem(
                f"{path}.retry.exponential.max",
                f"retries up to {format_duration(round(longest_delay))} apart (with jitter) must be shorter "
                f"than broker.retention ({broker.retention if broker else ''}), or they expire before due",
            )
    elif retention and endpoint.retry.schedule:
        delays = [seconds(d) * (1 + endpoint.retry.jitter) for d in endpoint.retry.schedule]
        longest = max(range(len(delays)), key=delays.__getitem__)
        if delays[longest] >= retention:
            problem(
                f"{path}.retry.schedule[{longest}]",
                f"{endpoint.retry.schedule[longest]} (up to {format_duration(round(delays[longest]))} with "
                f"jitter) must be shorter than broker.retention ({broker.retention if broker else ''}), "
                "or the retry expires before it is due",
            )


def _resolve_components(conv: _Converter, loaded: LoadedConfig, registry: ComponentRegistry) -> None:
    config = loaded.config
    for name, source in config.sources.items():
        base = _child("$.sources", name)
        if source.verify is not None:
            verifier = _resolve(conv, registry, ComponentKind.VERIFIER, f"{base}.verify", source.verify)
            if verifier is not None:
                loaded.verifiers[name] = verifier
        rules = [
            _resolve(conv, registry, ComponentKind.ACCESS_RULE, f"{base}.auth[{i}]", spec)
            for i, spec in enumerate(source.auth)
        ]
        loaded.access_rules[name] = [r for r in rules if r is not None]
        if source.handshake is not None:
            handshake = _resolve(
                conv, registry, ComponentKind.HANDSHAKE, f"{base}.handshake", source.handshake
            )
            if handshake is not None:
                loaded.handshakes[name] = handshake
    for name, endpoint in config.endpoints.items():
        if endpoint.signing is not None:
            path = f"{_child('$.endpoints', name)}.signing"
            signer = _resolve(conv, registry, ComponentKind.SIGNER, path, endpoint.signing)
            if signer is not None:
                loaded.signers[name] = signer
        if endpoint.auth is not None:
            path = f"{_child('$.endpoints', name)}.auth"
            auth = _resolve(conv, registry, ComponentKind.ENDPOINT_AUTH, path, endpoint.auth)
            if auth is not None:
                loaded.endpoint_auth[name] = auth
    for index, route in enumerate(config.routes):
        if route.transform is not None:
            # Routes that failed to convert are not in config.routes; report at the position the
            # route has in the file.
            position = loaded.route_positions[index] if index < len(loaded.route_positions) else index
            path = f"$.routes[{position}].transform"
            transform = _resolve(conv, registry, ComponentKind.TRANSFORM, path, route.transform)
            if transform is not None:
                loaded.transforms[index] = transform


def _resolve(
    conv: _Converter, registry: ComponentRegistry, kind: ComponentKind, path: str, spec: Any
) -> Component | None:
    """Convert one `{type: name, ...options}` mapping into the options Struct its plugin registered."""
    key = COMPONENT_KEYS[kind]
    installed = ", ".join(registry.names(kind)) or "none"
    if not isinstance(spec, dict):
        conv.loader.problem(path, f"expected a mapping with {_show(key)} (installed {kind}s: {installed})")
        return None
    type_name = spec.get(key)
    if type_name is None:
        conv.loader.problem(
            path, f"missing required key {_show(key)} (installed {kind}s: {installed})", missing=key
        )
        return None
    component_type = registry.get(kind, type_name) if isinstance(type_name, str) else None
    if component_type is None:
        conv.loader.problem(
            f"{path}.{key}", f"unknown {kind} {_show(type_name)} (installed {kind}s: {installed})"
        )
        return None
    options = {k: v for k, v in spec.items() if k != key}
    struct = component_type.config_type
    # Unknown options are refused even if the plugin's Struct would ignore them: a typo in a
    # security setting must not fall back to its default unnoticed.
    unknown = 0
    if _struct_of(struct) is not None:
        unknown = conv.unknown_keys(options, struct, path)
        options = {k: v for k, v in options.items() if k in _fields(struct)}
    converted = conv.convert(_drop_nulls(options, struct), struct, path)
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
        key_name = COMPONENT_KEYS[kind]
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
            required = target.setdefault("required", [])
            if key_name not in required:
                required.append(key_name)
            variants.append(sub)
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


# --- one endpoint from the management API ---------------------------------------------------

EndpointT = TypeVar("EndpointT", bound=EndpointConfig)


@dataclass(frozen=True)
class CheckedEndpoint(Generic[EndpointT]):
    """An endpoint document that passed every check a YAML endpoint passes, with its components."""

    config: EndpointT
    signer: Component | None
    auth: Component | None


def load_endpoint(
    value: Any,
    type_: type[EndpointT],
    registry: ComponentRegistry,
    broker: BrokerConfig,
    egress: EgressConfig | None = None,
) -> CheckedEndpoint[EndpointT]:
    """Check one endpoint given as JSON (not YAML: no `${VAR}` expansion) like the loader checks a
    YAML one, so both report the same problems; paths start at the document (`$.signing.secret`).

    It comes from an API token holder, not the operator: its `proxy` must be one the config lists
    (`listed_proxy`), and its subject is held to `egress.allow_subjects`.

    Raises ConfigError with every problem found.
    """
    egress = egress if egress is not None else EgressConfig()
    file = "<request>"
    loader = _Loader(file, {})
    if not isinstance(value, dict):
        raise ConfigError([Problem(file, None, "$", f"expected a JSON object, got {_show(value)}")])
    value = json.loads(json.dumps(value))  # checking drops nulls in place; the caller's value stays
    retry = value.get("retry")
    if isinstance(retry, dict) and "schedule" in retry and "exponential" in retry:
        loader.problem("$.retry.exponential", "set either schedule or exponential, not both")
    conv = _Converter(loader)
    _drop_nulls(value, type_)
    endpoint = conv.convert(value, type_, "$")
    signer = auth = None
    if endpoint is not None:
        _check_endpoint(loader.problem, "$", endpoint, broker, egress)
        if endpoint.proxy:
            try:
                listed = listed_proxy(endpoint.proxy, egress)
            except ValueError as exc:
                loader.problem("$.proxy", str(exc))
            else:
                if listed is None:
                    allowed = [*egress.proxies, *([egress.proxy] if egress.proxy else [])]
                    addresses = ", ".join(dict.fromkeys(_proxy_address(p) for p in allowed)) or "none"
                    loader.problem(
                        "$.proxy",
                        "an endpoint created through the API may use only a proxy listed in the "
                        f"config's egress.proxies (listed: {addresses}), or none",
                    )
        if endpoint.signing is not None:
            signer = _resolve(conv, registry, ComponentKind.SIGNER, "$.signing", endpoint.signing)
        if endpoint.auth is not None:
            auth = _resolve(conv, registry, ComponentKind.ENDPOINT_AUTH, "$.auth", endpoint.auth)
    if loader.problems or endpoint is None:
        raise ConfigError(list(dict.fromkeys(loader.problems)))
    return CheckedEndpoint(endpoint, signer, auth)


def _proxy_address(url: str) -> str:
    try:
        return parse_proxy(url).address
    except ValueError:
        return "?"
