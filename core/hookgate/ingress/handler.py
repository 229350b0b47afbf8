"""Webhook ingress: `POST /webhooks/{source}` (and GET/HEAD handshakes).

Order matters and is fixed: size limit, access rules, signature verification on the raw bytes,
handshakes, event type and id extraction, then a durable JetStream publish. Only after JetStream
acknowledged the event does the provider get its 2xx; a duplicate delivery of the same provider
event id is answered 2xx and not stored again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hookgate.broker import Broker
from hookgate.broker.events import store_event
from hookgate.broker.ids import event_id_for, event_id_for_body, new_event_id
from hookgate.config import SourceConfig
from hookgate.config.filters import ParsedBody, is_form, is_missing
from hookgate.ingress.admission import Admission
from hookgate.ingress.asgi import (
    Message,
    Receive,
    Scope,
    Send,
    client_gone,
    header_list,
    read_body_or_answer,
    send_bytes,
    send_error,
    send_unstored,
)
from hookgate.observe.logs import Summary
from hookgate.observe.metrics import Metrics
from hookgate.observe.tracing import OFF, Span, Tracing
from hookgate.plugin_host.builders import credential_headers, event_defaults
from hookgate.plugin_host.hooks import Hooks
from hookgate.transport.fields import TOKEN, sendable
from hookgate.types import (
    AccessRule,
    Event,
    Handshake,
    HandshakeResponse,
    Headers,
    IngressRequest,
    Rejection,
    SourceView,
    Verifier,
    find_header,
)

log = logging.getLogger("hookgate.ingress")

DEFAULT_EVENT_TYPE = "webhook"


class MalformedBody(Exception):
    pass


@dataclass
class Source:
    """A configured source, ready to serve: its config, hook view, and how to read type and id."""

    name: str
    config: SourceConfig
    view: SourceView
    event_type: str | None
    event_id: str | None
    strict_type: bool = False
    strict_id: bool = False
    # Headers the access rules consumed (their credentials): checked here, never stored or sent on.
    consumed: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        name: str,
        config: SourceConfig,
        verifier: Verifier | None = None,
        access_rules: tuple[AccessRule, ...] = (),
        handshake: Handshake | None = None,
    ) -> Source:
        default_type, default_id = event_defaults(verifier)
        return cls(
            name=name,
            config=config,
            view=SourceView(name=name, verifier=verifier, access_rules=access_rules, handshake=handshake),
            event_type=config.event_type or default_type,
            event_id=config.event_id or default_id,
            strict_type=config.event_type is not None,
            strict_id=config.event_id is not None,
            consumed=frozenset().union(*(credential_headers(rule) for rule in access_rules)),
        )

    def stored_headers(self, request: IngressRequest) -> Headers:
        """The request's headers as the event keeps them: without the consumed credentials."""
        if not self.consumed:
            return request.headers
        return [(k, v) for k, v in request.headers if k.lower() not in self.consumed]

    # A selector the user configured must find a readable body (else 400); a verifier's default
    # selector may meet a body it cannot read (a provider's form post) and then yields nothing.
    def select_type(self, request: IngressRequest, body: _Body) -> str | None:
        return _select_or_none(self.event_type, self.strict_type, request, body)

    def select_id(self, request: IngressRequest, body: _Body) -> str | None:
        return _select_or_none(self.event_id, self.strict_id, request, body)


def _select_or_none(spec: str | None, strict: bool, request: IngressRequest, body: _Body) -> str | None:
    if spec is None:
        return None
    try:
        return select(spec, request, body)
    except MalformedBody:
        if strict:
            raise
        return None


class _Body:
    """The request body for `body.` selectors, parsed at most once and only if one needs it.

    Parsing is the route filters' (`ParsedBody`): JSON, or a form body's fields, where a field
    holding JSON (Slack's `payload`) can be reached into. A selector reads one value, by key or
    list index.
    """

    def __init__(self, raw: bytes, content_type: str | None):
        self.parsed = ParsedBody(raw, content_type)
        self.form = is_form(content_type)

    def get(self, path: str) -> Any:
        value = self.parsed.value
        if is_missing(value):
            what = (
                "form body is not valid UTF-8" if self.form else "body is not JSON (or is nested too deeply)"
            )
            raise MalformedBody(f"the {what}")
        for part in path.split("."):
            if isinstance(value, str) and value[:1] in ("{", "["):
                value = self.parsed.inner_json(value)
                if is_missing(value):
                    return None
            if isinstance(value, dict):
                value = value.get(part)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return None
        return value


def select(spec: str, request: IngressRequest, body: _Body) -> str | None:
    """Read a value by selector: `body.<path>`, `header.<name>`, or else the literal itself."""
    if spec.startswith("body."):
        value = body.get(spec[5:])
        if value is None or isinstance(value, dict | list):
            return None
        return str(value)
    if spec.startswith("header."):
        return request.header(spec[7:])
    return spec


class Ingress:
    def __init__(
        self,
        sources: dict[str, Source],
        hooks: Hooks,
        broker: Broker,
        max_body: int,
        metrics: Metrics,
        tracing: Tracing = OFF,
        admission: Admission | None = None,
    ):
        self.sources = sources
        self.hooks = hooks
        self.broker = broker
        self.max_body = max_body
        self.metrics = metrics
        self.tracing = tracing
        self.admission = admission or Admission(2**31, 0, metrics)
        # Anyone can send bad webhooks at any rate: the log gets one line per source and reason
        # per interval (the first with its detail, then a count); /metrics counts each one.
        self.rejections = Summary(log, logging.WARNING)

    async def handle(self, scope: Scope, receive: Receive, send: Send, source_name: str) -> None:
        status = 0

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracing.ingress(scope, source_name) as span:
            try:
                await self._handle(scope, receive, counted_send, source_name, span)
            finally:
                # Unknown source names are folded into one label so callers cannot grow the metric.
                label = source_name if source_name in self.sources else "(unknown)"
                self.metrics.ingress_requests.labels(label, str(status)).inc()
                span.answered(status)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, source_name: str, span: Span) -> None:
        source = self.sources.get(source_name)
        if source is None:
            await send_error(send, 404, "unknown_source", f"no source named {source_name!r}")
            return
        method = scope["method"]
        if method in ("GET", "HEAD"):
            await self._handshake_only(scope, send, source)
            return
        if method != "POST":
            await send_error(send, 405, "method_not_allowed", "webhooks are POSTed")
            return
        body = await read_body_or_answer(scope, receive, send, self.max_body)
        if body is None:
            return
        # An overloaded gateway says so at once, after reading the body (bounded by max_body and
        # body_timeout): an unread body would cost the connection, and a client that reconnects
        # costs more than the read. The slot is held from here to the answer: verifying, and
        # waiting for JetStream. Not while the body arrives, which a slow client can draw out.
        overloaded = self.admission.refusal()
        if overloaded is not None:
            await self.admission.refuse(send, overloaded)
            return
        with self.admission.slot():
            await self._post(scope, send, source, body, span)

    async def _post(self, scope: Scope, send: Send, source: Source, body: bytes, span: Span) -> None:
        request = _request(scope, source.name, body)
        rejection = await self._check(request, source)
        if rejection is not None:
            await self._reject(send, source.name, rejection, span)
            return
        handshake = await self.hooks.call_first("hookgate_handshake", request=request, source=source.view)
        if handshake is not None:
            await _send_handshake(send, handshake)
            return
        try:
            event = _event(request, source, body)
        except MalformedBody as exc:
            await send_error(send, 400, "malformed_body", str(exc))
            return
        # The event id is derived from the provider's id (or the body), so it is the dedup key and
        # is always header-safe (a provider id may hold any bytes).
        span.set("hookgate.event_id", event.id)
        # A client that has gone will not see an answer: storing its event would only make a
        # duplicate of the provider's retry (or, without an id, a second event).
        if client_gone(scope):
            await self.admission.refuse(send, "client_gone")
            return
        if await self._store(send, event, span):
            await self._respond(send, source, event.id)

    async def _reject(self, send: Send, source_name: str, rejection: Rejection, span: Span) -> None:
        code = rejection.code.replace("{", "{{").replace("}", "}}")  # a plugin's, not a template
        self.rejections.note(
            f"{source_name}:{rejection.code}",
            f"source {source_name}: {{count}} more webhook(s) rejected ({code}) since the previous line",
            first=f"rejected webhook for source {source_name}: {rejection.code} ({rejection.message})",
            extra={"source": source_name},
        )
        self.metrics.ingress_rejections.labels(source_name, rejection.code).inc()
        span.set("hookgate.rejection", rejection.code)
        await send_error(send, rejection.status, rejection.code, rejection.message)

    async def _store(self, send: Send, event: Event, span: Span) -> bool:
        """Store the event; False when it could not be (the client has had its 503)."""
        source_name = event.source
        late = self.metrics.events_stored_late.labels(source_name).inc
        result = await store_event(self.broker, event, f"{source_name}:{event.id}", span, stored_late=late)
        if not result.ok:
            log.error(
                "could not store webhook for source %s: %s",
                source_name,
                result.error,
                extra={"source": source_name, "event_id": event.id},
            )
            await send_unstored(send, event.id)
            return False
        (self.metrics.events_duplicate if result.duplicate else self.metrics.events_stored).labels(
            source_name
        ).inc()
        if result.duplicate:
            log.info(
                "duplicate webhook for source %s, event id %s: not stored again",
                source_name,
                event.external_id or event.id,
            )
        return True

    async def _check(self, request: IngressRequest, source: Source) -> Rejection | None:
        rejection = unsendable_header(request.headers)
        if rejection is None:
            rejection = await self.hooks.first_rejection(
                "hookgate_authenticate", request=request, source=source.view
            )
        if rejection is None:
            rejection = await self.hooks.first_rejection(
                "hookgate_verify_signature", request=request, source=source.view
            )
        return rejection

    async def _handshake_only(self, scope: Scope, send: Send, source: Source) -> None:
        request = _request(scope, source.name, b"")
        rejection = await self.hooks.first_rejection(
            "hookgate_authenticate", request=request, source=source.view
        )
        if rejection is not None:
            await send_error(send, rejection.status, rejection.code, rejection.message)
            return
        handshake = await self.hooks.call_first("hookgate_handshake", request=request, source=source.view)
        if handshake is None:
            await send_error(
                send, 405, "method_not_allowed", "this source has no GET handshake; POST webhooks"
            )
            return
        await _send_handshake(send, handshake)

    async def _respond(self, send: Send, source: Source, event_id: str) -> None:
        response = source.config.response
        if response is None:
            await send_bytes(send, 202, b'{"id":"' + event_id.encode() + b'"}')
        elif response.body is None:
            await send_bytes(
                send, response.status, b'{"id":"' + event_id.encode() + b'"}', response.content_type
            )
        else:
            await send_bytes(send, response.status, response.body.encode(), response.content_type)


def unsendable_header(headers: Headers) -> Rejection | None:
    """A 400 for a header that could never be forwarded (a control character in its value).

    The HTTP server lets such a value through, but no endpoint can be sent it, so an event that
    held it would be acknowledged and then fail every attempt. Refusing it here loses nothing
    that was acknowledged, and the provider learns at once. The message names the header, never
    its value: the value may be a credential.
    """
    for name, value in headers:
        if not sendable(name, value):
            if not TOKEN.fullmatch(name):
                message = "a header name is not an HTTP token; it could not be forwarded"
            else:
                message = f"the value of header {name!r} holds a control character; it could not be forwarded"
            return Rejection(status=400, code="invalid_header", message=message)
    return None


async def _send_handshake(send: Send, handshake: HandshakeResponse) -> None:
    await send_bytes(send, handshake.status, handshake.body, handshake.content_type)


def _event(request: IngressRequest, source: Source, body: bytes) -> Event:
    """The event a webhook makes: its type and provider id picked by the source's selectors, and
    its id derived from the provider's id (or from the body, with `dedup: body`). Raises
    MalformedBody when a selector cannot read the body."""
    parsed = _Body(body, request.header("content-type"))
    event_type = source.select_type(request, parsed)
    external_id = source.select_id(request, parsed)
    if source.config.dedup == "body":
        # The provider's id is kept (external_id) but does not decide: a replay of a signed
        # body under a fresh, unsigned delivery id is a duplicate.
        event_id = event_id_for_body(source.name, body)
    elif external_id:
        event_id = event_id_for(source.name, external_id)
    else:
        event_id = new_event_id()
    return Event(
        id=event_id,
        source=source.name,
        type=event_type or DEFAULT_EVENT_TYPE,
        received_at=time.time(),
        body=body,
        content_type=request.header("content-type") or "application/octet-stream",
        headers=source.stored_headers(request),
        external_id=external_id,
    )


def _request(scope: Scope, source: str, body: bytes) -> IngressRequest:
    headers = header_list(scope)
    host = find_header(headers, "host") or "localhost"
    query = scope.get("query_string", b"")
    raw_path = scope.get("raw_path") or quote(scope["path"]).encode()
    url = f"{scope.get('scheme', 'http')}://{host}{raw_path.decode('latin-1')}"
    if query:
        url += "?" + query.decode("latin-1")
    client = scope.get("client")
    return IngressRequest(
        source=source,
        method=scope["method"],
        url=url,
        path=scope["path"],
        query_string=query,
        headers=headers,
        body=body,
        client=client[0] if client else None,
    )
