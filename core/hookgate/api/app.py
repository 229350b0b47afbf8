"""The management API under `/api/v1`: bearer tokens for every path, publishing events from our
services, enabling and disabling endpoints. The delivery log and replays (`hookgate.api.log`) and
endpoints through the API (`hookgate.api.endpoints`) are handed the requests they own."""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Container
from typing import TYPE_CHECKING, Annotated

import msgspec

from hookgate.api.log import LogApi
from hookgate.broker import Broker
from hookgate.broker.events import store_event
from hookgate.broker.ids import new_event_id
from hookgate.egress.state import EndpointStates
from hookgate.ingress.admission import Admission
from hookgate.ingress.asgi import (
    Receive,
    Scope,
    Send,
    read_json_or_answer,
    scope_header,
    send_error,
    send_json,
    send_unstored,
)
from hookgate.observe.metrics import Metrics
from hookgate.observe.tracing import NO_SPAN, OFF, Span, Tracing
from hookgate.types import INTERNAL_SOURCE, Event

if TYPE_CHECKING:
    from hookgate.api.endpoints import EndpointApi

log = logging.getLogger("hookgate.api")


# Ids and types travel in NATS headers and subjects, so they are limited to safe characters.
EVENT_ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,256}$"
EventId = Annotated[str, msgspec.Meta(pattern=EVENT_ID_PATTERN)]
EventType = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,256}$")]


class PublishRequest(msgspec.Struct, forbid_unknown_fields=True):
    type: EventType
    data: msgspec.Raw
    id: EventId | None = None
    to: list[str] | None = None


_publish_decoder = msgspec.json.Decoder(PublishRequest)


class Api:
    def __init__(
        self,
        broker: Broker,
        tokens: list[str],
        endpoints: Container[str],  # the catalog, so endpoints created through the API count
        max_body: int,
        states: EndpointStates | None = None,
        log_api: LogApi | None = None,
        metrics: Metrics | None = None,
        tracing: Tracing = OFF,
        endpoint_api: EndpointApi | None = None,
        admission: Admission | None = None,
    ):
        self.broker = broker
        self._tokens = [t.encode() for t in tokens if t]
        self.endpoints = endpoints
        self.max_body = max_body
        self.states = states or EndpointStates(broker)
        self.log_api = log_api
        self.metrics = metrics
        self.tracing = tracing
        self.endpoint_api = endpoint_api
        self.admission = admission

    def _authorized(self, scope: Scope) -> int | None:
        """None when the bearer token is valid, else the status to answer (401 or 403)."""
        header = scope_header(scope, b"authorization")
        scheme, _, credentials = (header or b"").strip().partition(b" ")
        given = credentials.strip()
        # Auth schemes are case-insensitive (RFC 9110, 11.1): "bearer" and "BEARER" are "Bearer".
        if scheme.lower() != b"bearer" or not given:
            return 401
        # Compare against every token, always, so timing says nothing about which one was close.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(given, token)
        return None if matched else 403

    async def handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        denied = self._authorized(scope)
        if denied == 401:
            await send_error(
                send, 401, "unauthorized", "send an API token as 'Authorization: Bearer <token>'"
            )
            return
        if denied == 403:
            await send_error(send, 403, "forbidden", "the API token is not valid")
            return
        if path == "/api/v1/events" and scope["method"] == "POST":
            with self.tracing.publish(scope) as span:
                await self._publish(scope, receive, span.answering(send), span)
            return
        parts = path.split("/")[3:]  # after "", "api", "v1"
        if len(parts) == 3 and parts[0] == "endpoints" and parts[2] in ("enable", "disable"):
            await self._set_endpoint(scope, send, parts[1], parts[2] == "disable")
            return
        if self.log_api is not None and await self.log_api.handle(scope, receive, send, parts):
            return
        if self.endpoint_api is not None and await self.endpoint_api.handle(scope, receive, send, path):
            return
        await send_error(send, 404, "not_found", f"no API resource at {scope['method']} {path}")

    async def _set_endpoint(self, scope: Scope, send: Send, name: str, disable: bool) -> None:
        if scope["method"] != "POST":
            await send_error(send, 405, "method_not_allowed", "POST to enable or disable an endpoint")
            return
        if name not in self.endpoints:
            await send_error(send, 404, "not_found", f"no endpoint named {name!r}")
            return
        try:
            await self.states.set(
                name, disable, "disabled through the API" if disable else "enabled through the API"
            )
        except Exception as exc:
            log.error("could not change the state of endpoint %s: %s", name, exc)
            await send_error(send, 503, "broker_unavailable", "the endpoint state could not be stored")
            return
        await send_json(send, 200, {"endpoint": name, "disabled": disable})

    async def _publish(self, scope: Scope, receive: Receive, send: Send, span: Span = NO_SPAN) -> None:
        request = await read_json_or_answer(
            scope, receive, send, self.max_body, _publish_decoder, "invalid_event"
        )
        if request is None:
            return
        # An Idempotency-Key header is the event's id, as the body's `id` is: a client that
        # retries a 503 with it makes no second event.
        raw_key = scope_header(scope, b"idempotency-key")
        if raw_key is not None:
            key = raw_key.decode("latin-1")
            if not re.fullmatch(EVENT_ID_PATTERN, key):
                await send_error(
                    send,
                    422,
                    "invalid_event",
                    "the Idempotency-Key header must be 1 to 256 letters, digits or _ . : @ -",
                )
                return
            if request.id is not None and request.id != key:
                await send_error(
                    send, 422, "invalid_event", "the Idempotency-Key header and `$.id` name different ids"
                )
                return
            request.id = key
        if self.admission is None:
            await self._publish_admitted(send, request, span)
            return
        # As for webhooks: refused after the body is read, and a slot from there to the answer.
        if (overloaded := self.admission.refusal()) is not None:
            await self.admission.refuse(send, overloaded)
            return
        with self.admission.slot():
            await self._publish_admitted(send, request, span)

    async def _publish_admitted(self, send: Send, request: PublishRequest, span: Span) -> None:
        if request.to is not None:
            unknown = [name for name in request.to if name not in self.endpoints]
            if unknown:
                await send_error(
                    send, 422, "unknown_endpoint", f"no endpoint named {', '.join(unknown)} - at `$.to`"
                )
                return
        event_id = request.id or new_event_id()
        event = Event(
            id=event_id,
            source=INTERNAL_SOURCE,
            type=request.type,
            received_at=time.time(),
            body=bytes(request.data),
            to=request.to,
        )
        span.set("hookgate.event_id", event_id)
        late = self.metrics.events_stored_late.labels(INTERNAL_SOURCE).inc if self.metrics else None
        result = await store_event(
            self.broker, event, f"{INTERNAL_SOURCE}:{event_id}", span, stored_late=late
        )
        if not result.ok:
            log.error("could not store event %s: %s", event_id, result.error)
            await send_unstored(send, event_id)
            return
        if self.metrics is not None and not result.duplicate:
            self.metrics.events_stored.labels(INTERNAL_SOURCE).inc()
        await send_json(send, 202, {"id": event_id})
