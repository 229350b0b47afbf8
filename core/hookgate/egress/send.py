"""Sending one attempt's request, over HTTP through the endpoint's pool or published to its subject,
and what came back as a `Result`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from hookgate.broker import Broker, OutMsg
from hookgate.egress.request import authorize_and_sign, maybe_await
from hookgate.plugin_host.hooks import Hooks
from hookgate.transport.pool import PooledTransport
from hookgate.transport.ssrf import SsrfRefused
from hookgate.transport.url import Target
from hookgate.types import ErrorKind, Headers, OutgoingRequest

if TYPE_CHECKING:
    from hookgate.egress.endpoint import Endpoint

RESPONSE_EXCERPT = 4096


@dataclass
class Result:
    status: int | None = None
    error_kind: ErrorKind | None = None
    error: str | None = None
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    request_headers: Headers = field(default_factory=list)  # redacted, for the attempt record

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Sender:
    """Sends the requests of one endpoint's worker; keeps the last URL it checked."""

    def __init__(self, endpoint: Endpoint, broker: Broker, hooks: Hooks):
        self.endpoint = endpoint
        self.broker = broker
        self.hooks = hooks
        self._parsed: tuple[str, Target] | None = None  # see _target

    async def send(self, request: OutgoingRequest) -> Result:
        """Over HTTP through the endpoint's pool, or published to its subject."""
        endpoint = self.endpoint
        if endpoint.transport is None:
            return await self._publish_to_subject(request)
        result = await self._post(endpoint.transport, request)
        auth = endpoint.view.auth
        if result.status == 401 and auth is not None and await maybe_await(auth.unauthorized()):
            # Credentials went stale (an expired OAuth2 token): refresh once and resend now.
            await authorize_and_sign(request, endpoint, self.hooks)
            result = await self._post(endpoint.transport, request)
        return result

    def _target(self, url: str) -> Target:
        """`url` parsed and SSRF-checked once; a signing plugin may rewrite it, hence the key."""
        cached = self._parsed
        if cached is None or cached[0] != url:
            cached = self._parsed = (url, self.endpoint.guard.check_url(url))
        return cached[1]

    async def _post(self, transport: PooledTransport, request: OutgoingRequest) -> Result:
        timeout = self.endpoint.timeout
        try:
            target = self._target(request.url)
            # One timeout covers all of it: waiting for a connection, connecting, sending, reading.
            response = await transport.send(
                target, request.headers, request.body, timeout, method=request.method
            )
        except SsrfRefused as exc:
            # Final: retrying cannot make a refused address acceptable.
            return Result(error_kind="ssrf_refused", error=str(exc))
        except httpx.TimeoutException:
            return Result(error_kind="timeout", error=f"no response within {timeout:g}s")
        except httpx.ConnectError as exc:
            kind: ErrorKind = "tls" if "TLS" in str(exc) or "SSL" in str(exc) else "connect"
            return Result(error_kind=kind, error=str(exc) or "connection failed")
        except httpx.HTTPError as exc:
            return Result(error_kind="protocol", error=str(exc) or type(exc).__name__)
        result = Result(
            status=response.status_code,
            headers=response.headers,
            body=response.content[:RESPONSE_EXCERPT],
        )
        if not result.ok:
            result.error_kind = "http_status"
            result.error = f"HTTP {response.status_code}"
        return result

    async def _publish_to_subject(self, request: OutgoingRequest) -> Result:
        headers = {k: v for k, v in request.headers}
        published = await self.broker.publish(OutMsg(request.url, request.body, headers))
        if published.ok:
            return Result(status=200)
        return Result(error_kind="destination", error=published.error)
