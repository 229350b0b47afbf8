"""TCP connections over trio: opening one through the `resolve` hook, and saying why it failed."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable

import h11
import trio

from hookgate.transport.url import authority

__all__ = ["CONNECTION_LOST", "NETWORK_ERRORS", "READ_SIZE", "Resolver", "open_tcp", "why"]

# `resolve(host, port)`: the addresses that may be connected to for a target (the SSRF guard).
Resolver = Callable[[str, int], Awaitable[list[str]]]
READ_SIZE = 64 * 1024
# Errors meaning "the socket is gone"; everything else from trio/h11 is handled explicitly.
NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
CONNECTION_LOST = (h11.RemoteProtocolError, *NETWORK_ERRORS)


def why(exc: OSError) -> str:
    """Why a connection or lookup failed, said once ("Connection refused").

    trio wraps each address's error in an OSError that repeats the address, with the errors in an
    ExceptionGroup as its cause; the operating system's own words are what the reader needs.
    """
    group = exc.__cause__
    errors = list(group.exceptions) if isinstance(group, BaseExceptionGroup) else [exc]
    reasons: list[str] = []
    for error in errors:
        if isinstance(error, socket.gaierror) or not isinstance(error, OSError):
            reason = str(getattr(error, "strerror", None) or error)
        elif error.errno is not None and error.errno > 0:
            reason = os.strerror(error.errno)
        else:
            reason = str(error)
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) or type(exc).__name__


async def open_tcp(host: str, port: int, resolve: Resolver | None) -> trio.SocketStream:
    """A connection to host:port; an OSError whose message says once what failed and why."""
    where = authority(host, port)
    if resolve is None:
        try:
            return await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise OSError(f"could not connect to {where}: {why(exc)}") from exc
    try:
        addresses = await resolve(host, port)
    except OSError as exc:
        raise OSError(f"could not resolve {host}: {why(exc)}") from exc
    failures: dict[str, str] = {}
    for address in addresses:  # in the resolver's order: it may have vetted them
        try:
            return await trio.open_tcp_stream(address, port)
        except OSError as exc:
            failures[address] = why(exc)
    reasons = set(failures.values())
    if len(reasons) == 1:
        tried = "" if list(failures) == [host] else f" ({', '.join(failures)})"
        raise OSError(f"could not connect to {where}{tried}: {reasons.pop()}")
    each = "; ".join(f"{address}: {reason}" for address, reason in failures.items())
    raise OSError(f"could not connect to {where}: {each or 'no address to connect to'}")
