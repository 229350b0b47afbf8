"""httpx's way into the pool: an `httpx.Request` made into the pool's `Call`, and the response
read made into an `httpx.Response`. `PooledTransport.handle_async_request` is these two around
a round trip, which makes the pool an ``httpx.AsyncBaseTransport``, usable via
``httpx.AsyncClient(transport=...)``, with httpx's per-phase timeouts.
"""

from __future__ import annotations

import h11
import httpx

from hookgate.transport.connection import Call
from hookgate.transport.http11 import Received

__all__ = ["httpx_call", "httpx_response"]


async def httpx_call(request: httpx.Request) -> Call:
    """The pool's call for `request`, its body read and the request fully validated by h11.

    Raises httpx.UnsupportedProtocol for a scheme other than http/https and
    httpx.LocalProtocolError for a request h11 will not write.
    """
    scheme = request.url.scheme
    if scheme not in ("http", "https"):
        raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}", request=request)
    host = request.url.raw_host.decode("ascii")
    key = (scheme, host, request.url.port or (443 if scheme == "https" else 80))
    body = await request.aread()
    try:
        event = _h11_request(request, body)
    except h11.LocalProtocolError as exc:
        raise httpx.LocalProtocolError(str(exc), request=request) from exc
    return Call(key, event, None, body, request, request.extensions.get("timeout", {}))


def _h11_request(request: httpx.Request, body: bytes) -> h11.Request:
    """The h11 request for an httpx.Request, fully validated by h11."""
    headers = [
        (name, value)
        for name, value in request.headers.raw
        if name.lower() not in (b"content-length", b"transfer-encoding")
    ]
    if not any(name.lower() == b"host" for name, _ in headers):
        headers.insert(0, (b"Host", request.url.netloc))
    # The gateway always has the full body, so plain Content-Length framing suffices.
    if body or request.method in ("POST", "PUT", "PATCH"):
        headers.append((b"Content-Length", str(len(body)).encode()))
    return h11.Request(method=request.method, target=request.url.raw_path, headers=headers)


def httpx_response(request: httpx.Request, received: Received) -> httpx.Response:
    """The httpx.Response for what the pool read in answer to `request`."""
    head = received.head
    return httpx.Response(
        head.status_code,
        headers=head.headers.raw_items(),
        content=received.content,
        extensions={"http_version": b"HTTP/" + head.http_version, "reason_phrase": head.reason},
        request=request,
    )
