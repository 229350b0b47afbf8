"""The HTTP server's connection bookkeeping, and the hypercorn internals it relies on."""

from __future__ import annotations

import errno
import inspect
import logging
import math
import resource

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from hookgate.ingress import server as server_mod
from hookgate.ingress.server import Connection, HttpServer, Limits
from hookgate.observe.metrics import Metrics


def test_the_hypercorn_internals_used_are_still_there() -> None:
    # server.py builds these itself; a hypercorn release that changes them must fail here first.
    assert list(inspect.signature(TCPServer.__init__).parameters) == [
        "self",
        "app",
        "config",
        "context",
        "state",
        "stream",
    ]
    assert inspect.iscoroutinefunction(TCPServer.run)
    assert list(inspect.signature(WorkerContext.__init__).parameters) == ["self", "max_requests"]
    assert hasattr(WorkerContext(None), "terminated")
    assert list(inspect.signature(wrap_app).parameters)[:3] == ["app", "wsgi_max_body_size", "mode"]


def _server(max_connections: int = 10) -> HttpServer:
    limits = Limits(max_connections=max_connections, backlog=10, header_timeout=2, body_timeout=5, grace=1)
    return HttpServer(lambda *a: None, HypercornConfig(), limits, Metrics())


async def test_a_connection_deadline_follows_what_it_waits_for() -> None:
    server = _server()
    now = trio.current_time()
    conn = Connection(server, now + 2)
    server.waiting(conn)
    assert conn.scope.deadline == now + 2  # the head
    conn.request_started(has_body=True)
    assert conn.scope.deadline == pytest.approx(trio.current_time() + 5)  # the body
    conn.body_complete()
    assert conn.scope.deadline == math.inf  # being answered: no deadline of ours
    assert conn not in server._waiting  # and never evicted
    conn.request_finished(body_complete=True)
    assert conn.scope.deadline == math.inf  # idle: hypercorn's keep-alive closes it
    assert conn in server._waiting
    conn.bytes_arrived()  # the next request begins
    assert conn.scope.deadline == pytest.approx(trio.current_time() + 2)
    conn.request_started(has_body=False)
    assert conn.scope.deadline == math.inf


async def test_eviction_takes_the_connection_that_waited_longest() -> None:
    server = _server()
    first, second, third = (Connection(server, trio.current_time() + 2) for _ in range(3))
    for conn in (first, second, third):
        server.waiting(conn)
    first.request_started(has_body=False)  # being answered: not evictable
    assert server._evict()
    assert second.scope.cancel_called and not first.scope.cancel_called
    assert server._evict()
    assert third.scope.cancel_called
    assert not server._evict()  # only a busy one is left


async def test_a_keep_alive_connection_in_use_again_is_no_longer_the_longest_waiting() -> None:
    server = _server()
    reused, newer = (Connection(server, trio.current_time() + 2) for _ in range(2))
    server.waiting(reused)
    reused.request_started(has_body=False)
    reused.request_finished(body_complete=True)  # idle, the longest waiting
    server.waiting(newer)
    assert next(iter(server._waiting)) is reused
    reused.bytes_arrived()  # its next request begins
    assert server._evict() and newer.scope.cancel_called and not reused.scope.cancel_called


def test_max_connections_stays_within_the_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert server_mod.fd_capped(10) == 10
    if hard == resource.RLIM_INFINITY:
        return
    try:
        assert server_mod.fd_capped(hard * 2) == hard - server_mod.FD_HEADROOM
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class _ExhaustedListener:
    """A listening socket whose accept fails as a process out of file descriptors sees it."""

    def __init__(self) -> None:
        self.calls = 0

    async def accept(self) -> tuple[object, object]:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EMFILE, "Too many open files")


async def test_accept_failing_with_emfile_is_one_summary_not_a_traceback_each(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server_mod, "ACCEPT_PAUSE", 0.001)
    server = _server()
    listener = _ExhaustedListener()
    with caplog.at_level(logging.WARNING, logger="hookgate.http"):
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(0.2):
                await server._accept_loop(listener, None, nursery, WorkerContext(None))  # type: ignore[arg-type]
        server._limit_log.flush()
    failures = server.metrics.connections_refused.labels("accept_error")._value.get()
    assert failures > 10 and failures in (listener.calls, listener.calls - 1)  # cancelled mid-accept
    lines = [r for r in caplog.records if r.name == "hookgate.http"]
    assert len(lines) == 2 and not any(r.exc_info for r in lines)
    assert "EMFILE" in lines[0].getMessage()
    assert lines[1].getMessage().startswith(f"{int(failures) - 1} connection(s) could not be accepted")


async def test_a_client_that_closes_an_idle_connection_has_it_closed_at_once() -> None:
    server = _server()
    conn = Connection(server, trio.current_time() + 2)
    conn.request_started(has_body=False)
    conn.peer_gone()  # half-closed after its request: the answer is still owed
    assert not conn.scope.cancel_called
    conn.request_finished(body_complete=True)
    assert conn.scope.cancel_called
    idle = Connection(server, trio.current_time() + 2)
    idle.request_started(has_body=False)
    idle.request_finished(body_complete=True)
    idle.peer_gone()
    assert idle.scope.cancel_called
