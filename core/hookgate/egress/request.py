"""The outgoing request of one attempt: its body and headers, then credentials and signatures."""

from __future__ import annotations

import inspect
from typing import Any

import msgspec

from hookgate.egress.endpoint import Endpoint
from hookgate.plugin_host.hooks import Hooks
from hookgate.plugin_kit.units import rfc3339
from hookgate.transport.fields import sendable
from hookgate.types import Delivery, Event, Headers, OutgoingRequest

# Not forwarded from the provider's request: they describe the hop, not the event.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
# Set by us on every request; a provider's own values of these are replaced.
OURS = frozenset(
    {"webhook-id", "webhook-timestamp", "webhook-signature", "hookgate-delivery-id", "hookgate-attempt"}
)

_encode_json = msgspec.json.Encoder().encode


def request_body(event: Event) -> tuple[bytes, str]:
    """Ingress events keep their bytes; internal events become a Standard Webhooks payload."""
    if not event.internal:
        return event.body, event.content_type
    head = (
        b'{"type":' + _encode_json(event.type) + b',"timestamp":' + _encode_json(rfc3339(event.received_at))
    )
    return head + b',"data":' + event.body + b"}", "application/json"


def request_headers(
    delivery: Delivery, event: Event, endpoint: Endpoint, content_type: str, ts: int
) -> Headers:
    headers: Headers = []
    if not event.internal:
        headers.extend(
            (k, v)
            for k, v in event.headers
            if k.lower() not in HOP_BY_HOP and k.lower() not in OURS and sendable(k, v)
        )
        headers.append(("hookgate-source", event.source))
        headers.append(("hookgate-event-id", event.id))
    else:
        headers.append(("content-type", content_type))
    headers.extend(endpoint.config.headers.items())
    headers.append(("webhook-id", event.id))
    headers.append(("webhook-timestamp", str(ts)))
    headers.append(("hookgate-delivery-id", delivery.id))
    headers.append(("hookgate-attempt", str(delivery.attempt)))
    if not any(name.lower() == "user-agent" for name, _ in headers):
        headers.append(("user-agent", "hookgate"))  # a provider's own is forwarded as it came
    return headers


def build_request(delivery: Delivery, event: Event, endpoint: Endpoint, ts: int) -> OutgoingRequest:
    """The request for this attempt, before credentials and signatures."""
    body, content_type = request_body(event)
    return OutgoingRequest(
        method="POST",
        url=endpoint.config.url or endpoint.config.subject or "",
        headers=request_headers(delivery, event, endpoint, content_type, ts),
        body=body,
        delivery_id=delivery.id,
        event_id=event.id,
        attempt=delivery.attempt,
        timestamp=ts,
    )


async def authorize_and_sign(request: OutgoingRequest, endpoint: Endpoint, hooks: Hooks) -> None:
    """The endpoint's credentials (its auth plugin), then the `hookgate_sign` plugins."""
    auth = endpoint.view.auth
    if auth is not None:
        await maybe_await(auth.apply(request))
    await hooks.call("hookgate_sign", request=request, endpoint=endpoint.view)


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
