"""Keep N worker processes running as one gateway, and drain them all on SIGTERM or SIGINT.

Started once, by the supervisor, for every worker: the embedded nats-server (when no broker.url
is set; stopped last), the listening socket, and the directory the workers keep their metrics in.
A worker that dies is restarted after a backoff (doubling from RESTART_BACKOFF to
MAX_RESTART_BACKOFF, back to the start once a worker has run STABLE_AFTER seconds). A worker that
exits before it ever started stops the whole gateway, as a single process would stop: its config
or its broker will not work any better on the next try.

On SIGTERM or SIGINT each worker gets SIGTERM once and drains as a single gateway does; the
supervisor exits when all have exited, and kills any still running `shutdown_grace` +
DRAIN_MARGIN later. A second signal is passed on, and the workers stop without waiting.
"""

from __future__ import annotations

import logging
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from hookgate import gateway
from hookgate.config import LoadedConfig, Role
from hookgate.observe.metrics import process_exited
from hookgate.plugin_kit.units import seconds
from hookgate.supervisor.listener import base_url, bind_listener
from hookgate.supervisor.plan import serving_roles
from hookgate.supervisor.process import Worker, describe_exit, start_worker

log = logging.getLogger("hookgate.supervisor")

RESTART_BACKOFF = 0.5
MAX_RESTART_BACKOFF = 30.0
STABLE_AFTER = 30.0
# Beyond shutdown_grace, for a worker to close its connections and its NATS connection.
DRAIN_MARGIN = 10.0
# How long the workers have to start, as one gateway's start has (consumers, streams, KV).
START_TIMEOUT = 120.0


@dataclass
class _Slot:
    """One worker's place: its role, whether it serves the port, and the process now in it."""

    index: int
    role: Role
    serves_http: bool
    worker: Worker | None = None
    started_once: trio.Event = field(default_factory=trio.Event)


@dataclass
class _Supervisor:
    loaded: LoadedConfig
    log_level: str | None
    listener: socket.socket
    target: gateway.BrokerTarget
    metrics_dir: str
    slots: list[_Slot]
    draining: trio.Event = field(default_factory=trio.Event)
    failure: str | None = None

    def seat(self, slot: _Slot) -> gateway.Seat:
        broker_url = self.target.url if self.loaded.config.broker.url is None else None
        assert broker_url is None or isinstance(broker_url, str)
        return gateway.Seat(
            self.listener.fileno() if slot.serves_http else None, broker_url, self.target.nkey_seed_file
        )

    async def keep_running(self, slot: _Slot) -> None:
        backoff = RESTART_BACKOFF
        while not self.draining.is_set():
            try:
                worker = slot.worker = start_worker(
                    str(self.loaded.path), slot.role, self.seat(slot), self.metrics_dir, self.log_level
                )
            except OSError as exc:  # out of processes or file descriptors
                self.fail(f"cannot start worker {slot.index} ({slot.role}): {exc.strerror or exc}")
                return
            began = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.watch_ready)
                nursery.start_soon(_set_when, worker.ready, slot.started_once)
                code = await worker.wait()
                nursery.cancel_scope.cancel()
            process_exited(self.metrics_dir, worker.pid)
            if self.draining.is_set():
                exited = describe_exit(code)
                log.info("worker %d (%s, pid %d) exited: %s", slot.index, slot.role, worker.pid, exited)
                return
            if not slot.started_once.is_set():
                self.fail(f"worker {slot.index} ({slot.role}) could not start: {describe_exit(code)}")
                return
            if trio.current_time() - began >= STABLE_AFTER:
                backoff = RESTART_BACKOFF
            log.error(
                "worker %d (%s, pid %d) exited: %s; restarting in %.1fs",
                *(slot.index, slot.role, worker.pid, describe_exit(code), backoff),
            )
            with trio.move_on_after(backoff):
                await self.draining.wait()
            backoff = min(backoff * 2, MAX_RESTART_BACKOFF)

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self.drain()

    def drain(self) -> None:
        """Stop accepting on the supervisor's copy of the socket and ask every worker to drain."""
        if self.draining.is_set():
            return
        self.draining.set()
        self.listener.close()
        self.signal_all(signal.SIGTERM)

    def signal_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.worker is not None:
                slot.worker.signal(signum)

    async def follow_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if self.draining.is_set():
                log.warning("second signal: stopping the workers now")
                self.signal_all(signal.SIGTERM)
                continue
            log.info("received %s: draining %d workers", signal.Signals(signum).name, len(self.slots))
            self.drain()

    async def kill_late(self, done: trio.Event) -> None:
        """Kill workers still running shutdown_grace + DRAIN_MARGIN after the drain began."""
        await self.draining.wait()
        grace = seconds(self.loaded.config.server.shutdown_grace) + DRAIN_MARGIN
        with trio.move_on_after(grace):
            await done.wait()
            return
        log.error("workers still running %.0fs after SIGTERM: killing them", grace)
        if self.failure is None:
            self.failure = "workers did not drain in time"
        self.signal_all(signal.SIGKILL)

    async def announce(self) -> None:
        """Log once when every worker has started, or stop the gateway if they never do."""
        with trio.move_on_after(START_TIMEOUT) as waited:
            for slot in self.slots:
                await slot.started_once.wait()
        if waited.cancelled_caught:
            self.fail(f"the workers did not all start within {START_TIMEOUT:.0f}s")
            return
        roles = ", ".join(f"{slot.role}" for slot in self.slots)
        tls = self.loaded.config.server.tls is not None
        log.info(
            "hookgate listening on %s with %d workers (%s; broker %s)",
            *(base_url(self.listener, tls), len(self.slots), roles, self.target.url),
        )


async def _set_when(source: trio.Event, target: trio.Event) -> None:
    await source.wait()
    target.set()


async def supervise(loaded: LoadedConfig, roles: list[Role], log_level: str | None) -> int:
    """Run `roles` as worker processes until signalled; 0 once all drained, else 1."""
    server = loaded.config.server
    gateway.check_server_tls(server)
    serving = serving_roles(roles)
    try:
        listener = bind_listener(server.listen, server.backlog)
    except OSError as exc:
        raise gateway.StartupError(
            f"server.listen: cannot listen on {server.listen}: {exc.strerror or exc}"
        ) from None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="hookgate-metrics-") as metrics_dir,
            trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        ):
            async with gateway.broker_target(loaded, supervised=True) as target:
                slots = [_Slot(i, role, role in serving) for i, role in enumerate(roles)]
                sup = _Supervisor(loaded, log_level, listener, target, metrics_dir, slots)
                await _run(sup, signals)
    finally:
        listener.close()
    if sup.failure is not None:
        log.error("%s", sup.failure)
        return 1
    return 0


async def _run(sup: _Supervisor, signals: AsyncIterator[int]) -> None:
    done = trio.Event()
    async with trio.open_nursery() as outer:
        outer.start_soon(sup.follow_signals, signals)
        outer.start_soon(sup.kill_late, done)
        outer.start_soon(sup.announce)
        async with trio.open_nursery() as nursery:
            for slot in sup.slots:
                nursery.start_soon(sup.keep_running, slot)
        done.set()
        outer.cancel_scope.cancel()
