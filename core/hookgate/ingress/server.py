"""The HTTP server: hypercorn's protocol layer behind an accept loop and connection limits of ours.

hypercorn's `serve` accepts every connection it can, gives a request head its keep-alive timeout
and a request body no deadline at all, and logs a traceback for every `accept` that fails with
EMFILE. Here the gateway owns the listening sockets and each connection's life, and hands every
connection to hypercorn's `TCPServer` (HTTP/1.1 and HTTP/2 as before):

- **Deadlines.** A request head must be complete within `header_timeout` of the connection
  opening, or of the first byte after an idle keep-alive; its body within `body_timeout` of the
  head. A connection that misses either is closed, with no response (the client is not reading).
  Once the body is in, the request has no deadline of ours (the ingress has `publish_timeout`).
- **A cap.** At most `max_connections` are open. At the cap, a new connection closes the
  connection that has waited longest for its client (idle keep-alive, or a head or body still
  arriving), so stalled clients cannot lock out a health check or a provider; a request whose body
  is in (being processed) is never closed this way. If every connection is processing, the new
  one is closed at once. Both are counted in `/metrics` and logged as one summary line per
  interval.
- **Accept errors.** EMFILE and its kind are counted and logged as one summary per interval, and
  accepting resumes after a short pause.
- **Client gone.** A connection whose client closed it is marked, so ingress can drop a request
  before storing what no client will see acknowledged (`asgi.client_gone`).

hypercorn internals used here, and only here: `hypercorn.trio.tcp_server.TCPServer`,
`hypercorn.trio.worker_context.WorkerContext` and `hypercorn.utils.wrap_app`, unchanged from 0.17
to 0.18. `tests/test_server.py` fails if they change.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import math
import resource
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import repr_socket_addr, wrap_app

from hookgate.ingress.asgi import CONNECTION, Receive, Scope, Send
from hookgate.observe.logs import Summary
from hookgate.observe.metrics import Metrics

log = logging.getLogger("hookgate.http")

# accept() failures that mean "out of resources": pause and retry (as trio's serve_listeners does).
_CAPACITY_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# accept() failures about one connection that went away before it was taken: skip it.
_IGNORED_ERRORS = {
    getattr(errno, name)
    for name in (
        *("EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET"),
        *("EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH"),
    )
    if hasattr(errno, name)
}
ACCEPT_PAUSE = 0.1
# File descriptors kept free beyond max_connections: the broker, outbound pools, log files.
FD_HEADROOM = 256
# An idle keep-alive connection is closed after this long (a load balancer's is usually 60 s).
KEEP_ALIVE_TIMEOUT = 75.0

_current: contextvars.ContextVar[Connection] = contextvars.ContextVar("hookgate_connection")


@dataclass(frozen=True)
class Limits:
    max_connections: int
    backlog: int
    header_timeout: float
    body_timeout: float
    grace: float


class Connection:
    """One client connection: what it waits for, and the deadline by which it must arrive."""

    __slots__ = ("_server", "body_deadline", "busy", "head_deadline", "peer_closed", "reading", "scope")

    def __init__(self, server: HttpServer, head_deadline: float):
        self._server = server
        self.scope = trio.CancelScope(deadline=head_deadline)
        self.head_deadline: float | None = head_deadline  # None: idle, waiting for a next request
        self.body_deadline = math.inf
        self.reading = 0  # requests whose head arrived and whose body is still arriving
        self.busy = 0  # requests whose body is in, being answered
        self.peer_closed = False

    # Called by the stream wrapper and the ASGI wrapper below; each re-arms the deadline.
    def bytes_arrived(self) -> None:
        if self.head_deadline is None and not self.reading and not self.busy:
            self.head_deadline = trio.current_time() + self._server.limits.header_timeout
            # A keep-alive connection in use again is no longer the one that waited longest.
            self._server.waiting(self)
            self._arm()

    def request_started(self, has_body: bool) -> None:
        self.head_deadline = None
        if has_body:
            if not self.reading:
                self.body_deadline = trio.current_time() + self._server.limits.body_timeout
            self.reading += 1
        else:
            self._became_busy()
        self._arm()

    def body_complete(self) -> None:
        self.reading -= 1
        self._became_busy()
        self._arm()

    def request_finished(self, body_complete: bool) -> None:
        if body_complete:
            self.busy -= 1
            if not self.busy:
                self._server.waiting(self)
        else:
            self.reading -= 1
        self._arm()

    def peer_gone(self) -> None:
        """The client closed its side. hypercorn would keep an idle connection open until its
        keep-alive timeout (75 s); a request still being read or answered is finished first."""
        self.peer_closed = True
        self._arm()

    def _became_busy(self) -> None:
        if not self.busy:
            self._server.not_waiting(self)
        self.busy += 1

    def _arm(self) -> None:
        if self.peer_closed and not self.busy and not self.reading:
            self.scope.cancel()  # nothing more can come, and nothing is owed
        elif self.busy:
            self.scope.deadline = math.inf
        elif self.reading:
            self.scope.deadline = self.body_deadline
        elif self.head_deadline is not None:
            self.scope.deadline = self.head_deadline
        else:
            self.scope.deadline = math.inf  # idle: hypercorn's keep-alive timeout closes it


class _Stream:
    """The connection's stream as hypercorn sees it, telling the Connection when bytes or EOF
    arrive. Everything else (send_all, aclose, the socket, TLS methods) is the stream's own."""

    def __init__(self, stream: Any, connection: Connection):
        self._stream = stream
        self._connection = connection

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(max_bytes)
        if data:
            self._connection.bytes_arrived()
        else:
            self._connection.peer_gone()
        return cast(bytes, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


ASGIApp = Callable[[Scope, Receive, Send], Any]


class HttpServer:
    def __init__(self, app: ASGIApp, hc: HypercornConfig, limits: Limits, metrics: Metrics):
        self.hc = hc
        self.metrics = metrics
        self.limits = limits
        self.max_connections = fd_capped(limits.max_connections)
        self._app = app
        # hypercorn types the ASGI 3 callable by its event TypedDicts; ours takes plain mappings.
        self._wrapped = wrap_app(cast(Any, self._asgi), hc.wsgi_max_body_size, "asgi")
        self._waiting: OrderedDict[Connection, None] = OrderedDict()  # longest waiting first
        self.open = 0
        self._limit_log = Summary(log, logging.WARNING)

    # --- what the connections report -----------------------------------------------------------

    def waiting(self, connection: Connection) -> None:
        self._waiting[connection] = None
        self._waiting.move_to_end(connection)

    def not_waiting(self, connection: Connection) -> None:
        self._waiting.pop(connection, None)

    # --- serving -------------------------------------------------------------------------------

    async def serve(self, stopping: trio.Event, task_status: trio.TaskStatus[list[str]]) -> None:
        sockets = self.hc.create_sockets()
        ssl_context = self.hc.create_ssl_context()
        listening = [(s, ssl_context) for s in sockets.secure_sockets]
        listening += [(s, None) for s in sockets.insecure_sockets]
        binds = []
        for sock, tls in listening:
            sock.listen(self.limits.backlog)
            scheme = "https" if tls is not None else "http"
            binds.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")
        context = WorkerContext(None)
        try:
            async with trio.open_nursery() as connections, trio.open_nursery() as summaries:
                summaries.start_soon(self._limit_log.run)
                async with trio.open_nursery() as acceptors:
                    for sock, tls in listening:
                        listener = trio.socket.from_stdlib_socket(sock)
                        acceptors.start_soon(self._accept_loop, listener, tls, connections, context)
                    task_status.started(binds)
                    await stopping.wait()
                    acceptors.cancel_scope.cancel()
                for sock, _ in listening:
                    sock.close()
                # Idle connections close now (hypercorn's keep-alive task sees `terminated`), and
                # so do those still sending a head; requests under way have the grace period.
                await context.terminated.set()
                for conn in list(self._waiting):
                    if not conn.reading:
                        conn.scope.cancel()
                connections.cancel_scope.deadline = trio.current_time() + self.limits.grace
                summaries.cancel_scope.cancel()
        finally:
            self._limit_log.flush()
            for sock, _ in listening:
                sock.close()

    async def _accept_loop(
        self, listener: trio.socket.SocketType, tls: Any, nursery: trio.Nursery, context: WorkerContext
    ) -> None:
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno in _IGNORED_ERRORS:
                    continue
                if exc.errno not in _CAPACITY_ERRORS:
                    raise
                self.metrics.connections_refused.labels("accept_error").inc()
                self._limit_log.note(
                    f"accept failed: {errno.errorcode.get(exc.errno or 0, exc.errno)}",
                    "{count} connection(s) could not be accepted ({key}); "
                    "lower server.max_connections or raise the open-files limit",
                )
                await trio.sleep(ACCEPT_PAUSE)
                continue
            if self.open >= self.max_connections and not self._evict():
                self.metrics.connections_refused.labels("busy").inc()
                self._limit_log.note(
                    "refused",
                    f"{{count}} connection(s) refused: all {self.max_connections} open connections "
                    "(server.max_connections) are processing requests",
                )
                _reset(sock)
                continue
            self.open += 1
            nursery.start_soon(self._connection, sock, tls, context)

    def _evict(self) -> bool:
        """Close the connection that has waited longest for its client; False if none waits."""
        if not self._waiting:
            return False
        victim, _ = self._waiting.popitem(last=False)
        victim.scope.cancel()
        self.metrics.connections_refused.labels("evicted").inc()
        self._limit_log.note(
            "evicted",
            f"{{count}} waiting connection(s) closed to admit new ones: {self.max_connections} "
            "connections open (server.max_connections)",
        )
        return True

    async def _connection(self, sock: trio.socket.SocketType, tls: Any, context: WorkerContext) -> None:
        stream: Any = trio.SocketStream(sock)
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_side=True, https_compatible=True)
        conn = Connection(self, trio.current_time() + self.limits.header_timeout)
        self.waiting(conn)
        # The request tasks hypercorn starts for this connection inherit it (see `_asgi`).
        _current.set(conn)
        self.metrics.connections_open.inc()
        try:
            with conn.scope:
                await TCPServer(self._wrapped, self.hc, context, {}, cast(Any, _Stream(stream, conn)))
        finally:
            self.open -= 1
            self.metrics.connections_open.dec()
            self.not_waiting(conn)
            # A cancelled TCPServer may not have got to closing it.
            await trio.aclose_forcefully(stream)

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        conn = _current.get(None)
        if conn is None or scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        scope[CONNECTION] = conn
        complete = not _has_body(scope)
        conn.request_started(has_body=not complete)

        async def tracked_receive() -> Any:
            nonlocal complete
            message = await receive()
            if not complete and (message["type"] == "http.disconnect" or not message.get("more_body")):
                complete = True
                conn.body_complete()
            return message

        try:
            await self._app(scope, tracked_receive, send)
        finally:
            conn.request_finished(body_complete=complete)


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        name = name.lower()
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
    # HTTP/2 may send a body without either header.
    return bool(scope.get("http_version") == "2" and scope["method"] not in ("GET", "HEAD"))


def _reset(sock: trio.socket.SocketType) -> None:
    """Close at once with a reset: nothing is read, and nothing lingers in TIME_WAIT."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def fd_capped(max_connections: int) -> int:
    """max_connections, within the open-files limit: raise the soft limit towards the hard one if
    needed, and else lower the cap (with a warning) so that accept never fails for want of fds."""
    want = max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(hard, want)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        capped = max(16, soft - FD_HEADROOM)
        log.warning(
            "server.max_connections is %d but the open-files limit is %d: capping connections at %d",
            max_connections,
            soft,
            capped,
        )
        return capped
    return max_connections
