"""Real parts for tests: a nats-server process, HTTP receivers on loopback, an in-process gateway.

Nothing here mocks NATS or HTTP: the gateway under test talks to a real nats-server over TCP and
delivers to real HTTP servers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import nats
import pytest
import trio

from hookgate import config as config_mod
from hookgate import gateway
from hookgate.broker.embedded import find_server_binary
from hookgate.broker.events import decode_event
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import Event

ROOT = Path(__file__).resolve().parent.parent


# --- nats-server --------------------------------------------------------------------------


class NatsServer:
    """A nats-server with JetStream on a random loopback port, data in a temp dir; restartable.

    `config` is nats-server config text (authorization, tls, ...) for the server to load; the
    command line still sets its address, port and store. Its log is `store / "nats-server.log"`.
    """

    def __init__(self, store: Path, config: str = "", scheme: str = "nats"):
        self.store = store
        self.config = config
        self.scheme = scheme
        self.port = -1
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.store / "nats-server.log"

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        for old in self.store.glob("*.ports"):
            old.unlink()
        args = [
            find_server_binary(),
            "-js",
            "-sd",
            str(self.store / "js"),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--ports_file_dir",
            str(self.store),
        ]
        if self.config:
            conf = self.store / "nats-server.conf"
            conf.write_text(self.config)
            args += ["-c", str(conf)]
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        ports = self.store / f"nats-server_{self.process.pid}.ports"
        for _ in range(500):
            if ports.exists() and ports.read_text().strip():
                self.port = int(json.loads(ports.read_text())["nats"][0].rsplit(":", 1)[1])
                return
            if self.process.poll() is not None:
                break
            import time

            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"nats-server did not start: {self.log_file.read_text()[-2000:]}")

    async def freeze(self) -> None:
        """SIGSTOP the server, and return once every one of its threads has stopped: a request
        sent after this gets no answer until `thaw()`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self.process.pid}/task")
        with trio.fail_after(5):
            while not all(_thread_state(t) in ("T", "t") for t in tasks.iterdir()):
                await trio.sleep(0.005)  # the kernel offers no event for a finished group stop

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)
        self.process = None


def _thread_state(task: Path) -> str:
    """A thread's state letter from /proc/<pid>/task/<tid>/stat (after the command's closing paren)."""
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "T"  # a thread that has gone runs nothing


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed) for a server to take, or to be refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- HTTP receiver ------------------------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    # Every header line as it came, lower-cased names: `headers` keeps only the last of a repeat.
    header_lines: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


Behaviour = Callable[["Received", int], "int | float | tuple[int, dict[str, str]] | None"]


@dataclass
class Receiver:
    """A loopback HTTP server that records requests and answers as `respond` says.

    `respond(request, n)` gets the request and how many requests came before it, and returns
    the status to answer, a (status, headers) pair, or a float meaning "hang this many seconds,
    then answer 200".
    """

    respond: Behaviour = field(default=lambda request, n: 200)
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_for(
        self, count: int, timeout: float = 10.0, predicate: Callable[[Received], bool] | None = None
    ) -> list[Received]:
        """Wait until at least `count` (matching) requests arrived; fail after `timeout`."""
        with trio.fail_after(timeout):
            while True:
                matching = [r for r in self.requests if predicate is None or predicate(r)]
                if len(matching) >= count:
                    return matching
                await self._changed.wait()

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            while True:
                request: h11.Request | None = None
                body = bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                received = Received(
                    request.method.decode(),
                    request.target.decode(),
                    {k.decode().lower(): v.decode("latin-1") for k, v in request.headers},
                    bytes(body),
                    trio.current_time(),
                    [(k.decode().lower(), v.decode("latin-1")) for k, v in request.headers],
                )
                n = len(self.requests)
                self.requests.append(received)
                self._changed.set()
                self._changed = trio.Event()
                answer = self.respond(received, n)
                status = 200
                extra: list[tuple[str, str]] = []
                if isinstance(answer, tuple):  # (status, {header: value})
                    status, headers = answer
                    extra = list(headers.items())
                elif isinstance(answer, float):
                    await trio.sleep(answer)
                elif isinstance(answer, int):
                    status = answer
                payload = b'{"ok":true}'
                await stream.send_all(
                    conn.send(
                        h11.Response(
                            status_code=status,
                            headers=[
                                ("content-type", "application/json"),
                                ("content-length", str(len(payload))),
                                *extra,
                            ],
                        )
                    )
                    + conn.send(h11.Data(data=payload))
                    + conn.send(h11.EndOfMessage())
                )
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()


@contextlib.asynccontextmanager
async def receiver(respond: Behaviour | None = None) -> AsyncIterator[Receiver]:
    r = Receiver(respond) if respond is not None else Receiver()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, r._handle, 0, host="127.0.0.1"))
        r.port = listeners[0].socket.getsockname()[1]
        yield r
        nursery.cancel_scope.cancel()


# --- the gateway in-process ----------------------------------------------------------------


@dataclass
class Gateway:
    running: gateway.Running
    stopping: trio.Event
    http: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.running.url

    async def publish(self, type_: str, data: Any, token: str = "test-token", **extra: Any) -> httpx.Response:
        return await self.http.post(
            f"{self.url}/api/v1/events",
            json={"type": type_, "data": data, **extra},
            headers={"Authorization": f"Bearer {token}"},
        )


def write_config(tmp_path: Path, text: str, name: str = "hookgate.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@contextlib.asynccontextmanager
async def run_gateway(
    tmp_path: Path,
    text: str,
    *,
    plugins: tuple[object, ...] = (),
    env: dict[str, str] | None = None,
    tracer_provider: Any = None,
) -> AsyncIterator[Gateway]:
    """Run the gateway in this trio run on the given YAML; stop it gracefully on exit."""
    path = write_config(tmp_path, text)
    hooks = Hooks(plugins)
    loaded = config_mod.load(path, hooks.registry, env={**os.environ, **(env or {})})
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        running = await nursery.start(
            lambda task_status: gateway.run(
                loaded, hooks, stopping=stopping, task_status=task_status, tracer_provider=tracer_provider
            )
        )
        async with httpx.AsyncClient(timeout=10) as http:
            try:
                yield Gateway(running, stopping, http)
            finally:
                stopping.set()


async def startup_error(directory: Path, text: str, kind: type[BaseException]) -> BaseException:
    """The one error of type `kind` that the gateway stops with at startup on this config."""
    with trio.fail_after(20), pytest.raises(BaseExceptionGroup) as info:
        async with run_gateway(directory, text):
            pass
    matched, _ = info.value.split(kind)
    assert matched is not None, info.value
    leaves: list[BaseException] = []
    pending: list[BaseException] = [matched]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    (error,) = leaves
    return error


# The key tests' gateways seal API endpoints' secrets with (broker.secrets_keys).
SECRETS_KEY = "dGVzdC1vbmx5LWtleS1mb3ItZW5kcG9pbnQtc2VjcmU="


def base_config(nats_url: str | None, extra: str = "", data_dir: Path | None = None) -> str:
    broker = f"url: {nats_url}" if nats_url else f"data_dir: {data_dir}"
    return textwrap.dedent(
        f"""\
            server:
              listen: 127.0.0.1:0
              api_tokens: [test-token]
              publish_timeout: 2s
              shutdown_grace: 2s
            broker:
              {broker}
              secrets_keys: ["{SECRETS_KEY}"]
            egress:
              allow_networks: ["127.0.0.0/8", "::1/128"]   # receivers run on loopback
            """
    ) + textwrap.dedent(extra)


async def stream_messages(nats_url: str, stream: str, subject: str = ">") -> list[Any]:
    """Every message stored in a stream, read with a plain nats-py client (as an operator would)."""

    async def read() -> list[Any]:
        nc = await nats.connect(nats_url)
        try:
            jsm = nc.jsm()
            info = await jsm.stream_info(stream)
            out = []
            seq = info.state.first_seq
            while seq <= info.state.last_seq:
                try:
                    msg = await jsm.get_msg(stream, seq=seq, next=True, subject=subject)
                except nats.js.errors.NotFoundError:
                    break
                out.append(msg)
                assert msg.seq is not None, "a stored message has a sequence"
                seq = msg.seq + 1
            return out
        finally:
            await nc.close()

    import asyncio

    return await trio.to_thread.run_sync(lambda: asyncio.run(read()))


async def stored_events(nats_url: str) -> list[Event]:
    """The events in HOOKGATE_EVENTS, decoded, oldest first."""
    return [decode_event(m.data) for m in await stream_messages(nats_url, "HOOKGATE_EVENTS")]


async def publish_with_nats(url: str, subject: str, data: bytes, msg_id: str) -> int:
    """Publish to JetStream with plain nats-py, as one of our services would; return the stream seq."""

    import asyncio

    async def publish() -> int:
        nc = await nats.connect(url)
        try:
            ack = await nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": msg_id})
            return ack.seq
        finally:
            await nc.close()

    return await trio.to_thread.run_sync(lambda: asyncio.run(publish()))


async def attempt_records(nats_url: str, endpoint: str = "*") -> list[Any]:
    """The attempt records in the delivery log, oldest first (each delivery's subject holds its
    creation record, then its attempts)."""
    msgs = await stream_messages(nats_url, "HOOKGATE_LOG", f"hookgate.log.deliveries.{endpoint}.>")
    return [m for m in msgs if json.loads(m.data).get("record") == "attempt"]


def hookgate_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hookgate.cli", *args]
