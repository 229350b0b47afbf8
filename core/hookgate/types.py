"""Public types shared by the core and plugins: requests, events, deliveries, attempts, components.

Plugins import only this module, `hookgate.hookspecs` and `hookgate.plugin_kit`. Everything here is
a msgspec Struct or a small protocol, so values cross layers typed and encode cheaply.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol, runtime_checkable

import msgspec

Headers = list[tuple[str, str]]


def find_header(headers: Headers, name: str) -> str | None:
    """The first value of a header, matched case-insensitively."""
    name = name.lower()
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


class IngressRequest(msgspec.Struct, kw_only=True):
    """A webhook as it reached `/webhooks/{source}`: raw body bytes, headers with lower-case names."""

    source: str
    method: str
    url: str  # as the provider addressed it: scheme://host[:port]/path?query
    path: str
    query_string: bytes
    headers: Headers
    body: bytes
    client: str | None = None  # peer IP address

    def header(self, name: str) -> str | None:
        return find_header(self.headers, name)


class Rejection(msgspec.Struct, kw_only=True):
    """A refusal of an ingress request; `code` is a stable machine-readable reason."""

    status: int
    code: str
    message: str


class HandshakeResponse(msgspec.Struct, kw_only=True):
    """The answer to a provider handshake (challenge echo, CRC), sent instead of storing an event."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain"


class Event(msgspec.Struct, kw_only=True):
    """An event as stored in the events stream.

    Ingress events keep the provider's body bytes and headers untouched; internal events hold their
    `data` as JSON bytes in `body`.
    """

    id: str
    source: str  # a configured source name, or "internal"
    type: str
    received_at: float  # unix seconds
    body: bytes
    content_type: str = "application/json"
    headers: Headers = []
    to: list[str] | None = None  # explicit endpoints (internal publish with "to")
    # The provider's own id for this event: the dedup key, unless the source has `dedup: body`.
    external_id: str | None = None

    @property
    def internal(self) -> bool:
        return self.source == INTERNAL_SOURCE


INTERNAL_SOURCE = "internal"


class Delivery(msgspec.Struct, kw_only=True):
    """One event on its way to one endpoint. `attempt` is the number of the next attempt."""

    id: str
    endpoint: str
    attempt: int
    event: Event
    created_at: float
    routes: list[str] = []
    # The first attempt of the current series: a replay continues the numbering (so every
    # attempt of a delivery has its own number) but starts the retry schedule afresh.
    series_start: int = 1

    @property
    def attempt_in_series(self) -> int:
        return self.attempt - self.series_start + 1


# internal: the gateway or a plugin failed during the attempt (a bug), not the endpoint.
# shutdown: the attempt was cut off when the gateway stopped (its grace period ran out).
ErrorKind = Literal[
    "timeout",
    "connect",
    "tls",
    "http_status",
    "protocol",
    "destination",
    "ssrf_refused",
    "internal",
    "shutdown",
]
# dead: used up its attempts; failed: a failure that retrying cannot fix (refused by the SSRF guard,
# or a status listed in `retry.final_statuses`). Both leave a dead letter for redrive.
Outcome = Literal["succeeded", "retrying", "dead", "failed", "deferred"]


class Attempt(msgspec.Struct, kw_only=True, tag="attempt", tag_field="record"):
    """The record of one delivery attempt (tagged: it shares a log subject with the creation record)."""

    delivery_id: str
    event_id: str
    endpoint: str
    attempt: int
    started_at: float
    latency: float
    outcome: Outcome
    status: int | None = None
    error_kind: ErrorKind | None = None
    error: str | None = None
    request_headers: Headers = []  # as sent, with credentials and signatures redacted
    response_headers: Headers = []
    response_body: bytes = b""
    next_attempt_at: float | None = None


class OutgoingRequest(msgspec.Struct, kw_only=True):
    """The HTTP request about to be sent for an attempt; signing hooks add headers to it."""

    method: str
    url: str
    headers: Headers
    body: bytes
    delivery_id: str
    event_id: str
    attempt: int
    timestamp: int  # unix seconds, the value of webhook-timestamp

    def set_header(self, name: str, value: str) -> None:
        lowered = name.lower()
        self.headers = [(k, v) for k, v in self.headers if k.lower() != lowered]
        self.headers.append((name, value))


@dataclass(frozen=True)
class SourceView:
    """What hooks see of a configured source: its name and its instantiated components."""

    name: str
    verifier: Verifier | None = None
    access_rules: tuple[AccessRule, ...] = ()
    handshake: Handshake | None = None


@dataclass(frozen=True)
class EndpointView:
    """What hooks see of a configured endpoint."""

    name: str
    url: str | None
    subject: str | None
    signer: Signer | None = None
    auth: EndpointAuth | None = None


# --- Named components: what the YAML picks with `type:` ---------------------------------------


class ComponentKind(StrEnum):
    VERIFIER = "verifier"
    SIGNER = "signer"
    ACCESS_RULE = "access rule"
    HANDSHAKE = "handshake"
    ENDPOINT_AUTH = "endpoint auth"
    TRANSFORM = "transform"


# Components are checked against these protocols when they are built (hence runtime_checkable). What
# a component may offer beyond them is a protocol of its own (EventDefaults, VerifierHandshake,
# CredentialHeaders, PublicKeys), which the core tests with isinstance.


@runtime_checkable
class Verifier(Protocol):
    """Checks an ingress request's signature on its raw body bytes.

    A verifier usually also has the attributes of `EventDefaults`, and may be a `VerifierHandshake`.
    """

    def verify(self, request: IngressRequest) -> Rejection | None: ...


@runtime_checkable
class EventDefaults(Protocol):
    """Where a verifier's provider puts the event type and id, used unless the source sets them."""

    #: where the event type and id are read by default ("header.X", "body.a.b", or a literal)
    default_event_type: str | None
    default_event_id: str | None


@runtime_checkable
class VerifierHandshake(Protocol):
    """A verifier that also answers its provider's own handshakes (Slack's url_verification,
    GitHub's ping). `handshake` is called only after the signature verified."""

    def handshake(self, request: IngressRequest) -> HandshakeResponse | None: ...


@runtime_checkable
class AccessRule(Protocol):
    """Decides whether a caller may send to a source (`auth:` on a source). Refuse with 403."""

    def check(self, request: IngressRequest) -> Rejection | None: ...


@runtime_checkable
class CredentialHeaders(Protocol):
    """An access rule that names the request headers holding the credential it checks.

    e.g. ("authorization",). The core drops them from the stored event, so they reach no endpoint
    and no log. Leave them out (an empty tuple) when the rule's config asks to forward them
    (`forward_credential: true` on the built-in rules).
    """

    credential_headers: tuple[str, ...]


@runtime_checkable
class Handshake(Protocol):
    """Answers a provider's handshake (`handshake:` on a source), or None if it is not one."""

    def answer(self, request: IngressRequest) -> HandshakeResponse | None: ...


@runtime_checkable
class EndpointAuth(Protocol):
    """Authenticates hookgate to an endpoint (`auth:` on an endpoint): basic, bearer, OAuth2, mTLS.

    `apply` adds credentials to each request (it may be async, e.g. to fetch a token).
    `unauthorized` is called when the endpoint answers 401; return True to have the attempt
    repeated once at once (after refreshing a token), False to let the 401 count as a failure.
    `ssl_context` may return a client-certificate context (mTLS), used for the endpoint's pool.
    """

    def apply(self, request: OutgoingRequest) -> Awaitable[None] | None: ...

    def unauthorized(self) -> Awaitable[bool] | bool: ...

    def ssl_context(self) -> ssl.SSLContext | None: ...


@runtime_checkable
class Transform(Protocol):
    """Reshapes an event for the endpoints of one route (`transform:` on a route).

    Return the changed event (a copy: `msgspec.structs.replace`), the same event to leave it, or
    None to send it to none of that route's endpoints.
    """

    def transform(self, event: Event) -> Event | None: ...


@runtime_checkable
class Signer(Protocol):
    """Signs an outgoing request by adding headers to it."""

    def sign(self, request: OutgoingRequest) -> None: ...


@runtime_checkable
class PublicKeys(Protocol):
    """A signer whose signatures verify with public keys, which `hookgate endpoint-key` prints."""

    def public_keys(self) -> list[str]: ...


# A factory is called with the component's options (an instance of `config_type`); it returns the
# component, which the core checks against the protocol of its kind when it builds it.
@dataclass(frozen=True)
class ComponentType:
    kind: ComponentKind
    name: str
    config_type: type[msgspec.Struct]
    factory: Callable[..., object]
    plugin: str = ""


@dataclass
class ComponentRegistry:
    """Named component types contributed by plugins through `hookgate_register_components`."""

    types: dict[tuple[ComponentKind, str], ComponentType] = field(default_factory=dict)

    def add(
        self,
        kind: ComponentKind,
        name: str,
        config_type: type[msgspec.Struct],
        factory: Callable[..., object],
        plugin: str = "",
    ) -> None:
        key = (kind, name)
        if key in self.types:
            raise ValueError(f"{kind} {name!r} is registered twice")
        self.types[key] = ComponentType(kind, name, config_type, factory, plugin)

    def add_verifier(
        self, name: str, config_type: type[msgspec.Struct], factory: Callable[..., Verifier]
    ) -> None:
        self.add(ComponentKind.VERIFIER, name, config_type, factory)

    def add_signer(
        self, name: str, config_type: type[msgspec.Struct], factory: Callable[..., Signer]
    ) -> None:
        self.add(ComponentKind.SIGNER, name, config_type, factory)

    def add_access_rule(
        self, name: str, config_type: type[msgspec.Struct], factory: Callable[..., AccessRule]
    ) -> None:
        self.add(ComponentKind.ACCESS_RULE, name, config_type, factory)

    def add_handshake(
        self, name: str, config_type: type[msgspec.Struct], factory: Callable[..., Handshake]
    ) -> None:
        self.add(ComponentKind.HANDSHAKE, name, config_type, factory)

    def add_endpoint_auth(
        self, name: str, config_type: type[msgspec.Struct], factory: Callable[..., EndpointAuth]
    ) -> None:
        self.add(ComponentKind.ENDPOINT_AUTH, name, config_type, factory)

    def add_transform(
        self, name: str, config_type: type[msgspec.Struct], factory: Callable[..., Transform]
    ) -> None:
        self.add(ComponentKind.TRANSFORM, name, config_type, factory)

    def get(self, kind: ComponentKind, name: str) -> ComponentType | None:
        return self.types.get((kind, name))

    def names(self, kind: ComponentKind) -> list[str]:
        return sorted(name for k, name in self.types if k == kind)
