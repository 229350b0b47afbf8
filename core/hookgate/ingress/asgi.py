"""Small ASGI helpers: reading a bounded body, sending JSON or bytes. No framework on the hot path."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

import msgspec

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_json = msgspec.json.Encoder()
# msgspec raises RecursionError for JSON nested deeper than it decodes; that is the sender's fault.
TOO_DEEP = "the body's JSON is nested too deeply"
T = TypeVar("T")


_AT = re.compile(r" - at `(\$[^`]*)`$")
_FIELD = re.compile(r"^Object (?:missing required|contains unknown) field `(.*)`$")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def with_path(message: str) -> str:
    """msgspec's validation message, always ending with the path of what is at fault.

    msgspec names the object a missing or unknown field belongs to, and names no path at the top
    level: "Object missing required field `type`" becomes "... - at `$.type`".
    """
    found = _AT.search(message)
    path, text = (found.group(1), message[: found.start()]) if found else ("$", message)
    field = _FIELD.match(text)
    if field is not None:
        key = field.group(1)
        path = f"{path}.{key}" if _PLAIN_KEY.fullmatch(key) else f"{path}[{json.dumps(key)}]"
    return f"{text} - at `{path}`"


# The scope key under which the server puts the request's connection (see `server.Connection`).
CONNECTION = "hookgate.connection"


def client_gone(scope: Scope) -> bool:
    """True once the client has closed its connection: nobody will read the answer."""
    connection = scope.get(CONNECTION)
    return connection is not None and bool(connection.peer_closed)


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


def header_list(scope: Scope) -> list[tuple[str, str]]:
    """Request headers as (lower-case name, value) strings; latin-1 keeps any byte sequence."""
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]


def scope_header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body; BodyTooLarge as soon as it would pass `limit` (never reading on)."""
    declared = scope_header(scope, b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: str = "application/json",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    raw_headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
    ]
    if headers:
        raw_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, value: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send_bytes(send, status, _json.encode(value), headers=headers)


async def send_error(send: Send, status: int, code: str, message: str) -> None:
    await send_json(send, status, {"error": code, "message": message})


UNSTORED_RETRY_AFTER = 2
"""Seconds a client is asked to wait before sending an unstored event again: JetStream is back
within seconds after a leader election or a reconnect."""


async def send_unstored(send: Send, event_id: str) -> None:
    """503 for an event the broker did not confirm in time. It may be stored later all the same,
    so the answer names its id: sending it again under that id cannot make a second event."""
    await send_json(
        send,
        503,
        {
            "error": "broker_unavailable",
            "message": "the event could not be stored in time; it may still be stored: retry with "
            "the same id, which is never stored twice",
            "id": event_id,
        },
        headers=[(b"retry-after", str(UNSTORED_RETRY_AFTER).encode())],
    )


async def read_body_or_answer(scope: Scope, receive: Receive, send: Send, limit: int) -> bytes | None:
    """The body, or None once a 413 was sent (too large) or the client went away."""
    try:
        return await read_body(scope, receive, limit)
    except BodyTooLarge:
        await send_error(send, 413, "body_too_large", f"the body is larger than {limit} bytes")
    except ClientGone:
        pass
    return None


async def read_json_or_answer(
    scope: Scope,
    receive: Receive,
    send: Send,
    limit: int,
    decoder: msgspec.json.Decoder[T],
    invalid_code: str,
) -> T | None:
    """The body decoded, or None once the error was answered: 413 too large, 400 not JSON, 422 not
    the expected shape (msgspec's message names the path, such as `$.to`)."""
    body = await read_body_or_answer(scope, receive, send, limit)
    if body is None:
        return None
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        await send_error(send, 422, invalid_code, with_path(str(exc)))
    except msgspec.DecodeError as exc:
        await send_error(send, 400, "malformed_body", f"the body is not valid JSON: {exc}")
    except RecursionError:
        await send_error(send, 400, "malformed_body", TOO_DEEP)
    return None
