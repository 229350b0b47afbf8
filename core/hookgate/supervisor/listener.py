"""The listening socket the supervisor binds once and every serving worker inherits.

One socket, not one per worker with SO_REUSEPORT: connections queued in it wait for any worker,
so a worker that dies or restarts loses none, and TLS is the workers' business (each wraps the
connections it accepts, with the certificate it loaded).
"""

from __future__ import annotations

import os
import socket
from contextlib import suppress


def bind_listener(listen: str, backlog: int) -> socket.socket:
    """Bind and listen on `server.listen` (host:port, or unix:path); the socket is inheritable."""
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        with suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[str, int] = path
    else:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        address = (host, int(port))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def base_url(sock: socket.socket, tls: bool) -> str:
    """The URL the workers serve, for the log (the port bound when the config asked for port 0)."""
    scheme = "https" if tls else "http"
    if sock.family == socket.AF_UNIX:
        return f"{scheme}+unix://{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{scheme}://{host}:{port}"
