"""A fast webhook receiver for the benchmarks: trio + h11, one process, answers 200 at once.

It counts requests, remembers when each request carrying an `x-bench-id` (or `webhook-id`) header
arrived (on the system-wide monotonic clock, so another process on this machine can compare), and can start
*paused*: requests are read but not answered until `POST /__release`. That turns a running
gateway's endpoint into a backlog without failing any attempt.

Control requests (never counted): `GET /__stats[?arrivals=1]`, `POST /__pause`, `POST /__release`,
`POST /__reset`.

    python bench/receiver.py --port 9000 [--paused]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import time

import h11
import trio

BENCH_ID = b"x-bench-id"
WEBHOOK_ID = b"webhook-id"
MAX_ARRIVALS = 500_000
_OK = b'{"ok":true}'
_OK_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_OK)).encode())]


class State:
    def __init__(self, paused: bool) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.released_at: float | None = None if paused else time.monotonic()
        self.release = trio.Event()
        if not paused:
            self.release.set()
        self.arrivals: dict[str, float] = {}

    def reset(self) -> None:
        self.count = 0
        self.first = self.last = None
        self.arrivals.clear()

    def stats(self, arrivals: bool) -> bytes:
        out: dict[str, object] = {
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "released_at": self.released_at,
            "now": time.monotonic(),
        }
        if arrivals:
            out["arrivals"] = self.arrivals
        return json.dumps(out).encode()


async def _control(state: State, method: bytes, target: bytes) -> bytes:
    path, _, query = target.partition(b"?")
    if path == b"/__stats":
        return state.stats(b"arrivals=1" in query)
    if path == b"/__pause" and method == b"POST":
        if state.release.is_set():
            state.release = trio.Event()
            state.released_at = None
        return b'{"paused":true}'
    if path == b"/__release" and method == b"POST":
        if not state.release.is_set():
            state.released_at = time.monotonic()
            state.release.set()
        return b'{"released":true}'
    if path == b"/__reset" and method == b"POST":
        state.reset()
        return b'{"reset":true}'
    return b'{"error":"unknown control request"}'


async def _serve_connection(state: State, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    errors = (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError, OSError)
    with contextlib.suppress(*errors):
        while True:
            request: h11.Request | None = None
            arrived = 0.0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                    arrived = time.monotonic()
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            assert request is not None
            if request.target.startswith(b"/__"):
                payload = await _control(state, request.method, request.target)
                headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
            else:
                for name, value in request.headers:
                    # A delivery of an event published with a chosen id carries it as webhook-id.
                    if name in (BENCH_ID, WEBHOOK_ID):
                        if len(state.arrivals) < MAX_ARRIVALS:
                            state.arrivals[value.decode("latin-1")] = arrived
                        break
                if not state.release.is_set():
                    await state.release.wait()
                payload, headers = _OK, _OK_HEADERS
                now = time.monotonic()
                state.count += 1
                if state.first is None:
                    state.first = now
                state.last = now
            await stream.send_all(
                conn.send(h11.Response(status_code=200, headers=headers))
                + conn.send(h11.Data(data=payload))
                + conn.send(h11.EndOfMessage())
            )
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()


async def serve(port: int, paused: bool) -> None:
    state = State(paused)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    listener = trio.SocketListener(sock)

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_connection(state, stream)

    await trio.serve_listeners(handler, [listener])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--paused", action="store_true", help="hold requests until POST /__release")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.port, args.paused)


if __name__ == "__main__":
    main()
