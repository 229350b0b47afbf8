"""The config's msgspec Structs: one per section, with their defaults and descriptions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from hookgate.config.flow import CircuitBreakerConfig, RateLimitConfig
from hookgate.plugin_kit.units import Duration, Size, seconds
from hookgate.types import INTERNAL_SOURCE

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


# What one gateway process runs: ingress (webhooks and the API), delivery (the router and the
# dispatchers), or both. Every role serves /healthz, /readyz and /metrics.
Role = Literal["all", "ingress", "delivery"]
ROLES: tuple[Role, ...] = ("all", "ingress", "delivery")
# More worker processes than this on one host is a typo, not a plan.
MAX_WORKERS = 256


class WorkerCounts(_Base):
    """Worker processes per role, for a host that runs ingress and delivery apart."""

    all: Annotated[int, msgspec.Meta(ge=0, le=MAX_WORKERS)] = 0
    ingress: Annotated[int, msgspec.Meta(ge=0, le=MAX_WORKERS)] = 0
    delivery: Annotated[int, msgspec.Meta(ge=0, le=MAX_WORKERS)] = 0

    def roles(self) -> list[Role]:
        """One role per worker, in the order they are started."""
        counts: list[tuple[Role, int]] = [
            ("all", self.all),
            ("ingress", self.ingress),
            ("delivery", self.delivery),
        ]
        return [role for role, count in counts for _ in range(count)]


class ServerConfig(_Base):
    """The HTTP server: ingress, API, health and metrics on one port."""

    workers: Annotated[
        Annotated[int, msgspec.Meta(ge=1, le=MAX_WORKERS)] | WorkerCounts | None,
        msgspec.Meta(
            description="gateway processes on this host, sharing the port and the embedded"
            " nats-server under one supervisor: a number (each runs server.role), or a number per"
            " role like {ingress: 1, delivery: 1}; omitted: one per core available, half ingress and"
            " half delivery (one core: one process)"
        ),
    ] = None
    role: Annotated[
        Role,
        msgspec.Meta(
            description="what each process runs: all, ingress (webhooks and the API) or delivery"
            " (the router and the dispatchers); each serves /healthz, /readyz and /metrics"
        ),
    ] = "all"

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
