"""The ingress baseline: a bare ASGI app on hypercorn's trio worker that reads the body and answers 202.

It is served with the same hypercorn settings hookgate uses (no access log, 75 s keep-alive), so
the ratio hookgate / this app is the cost of hookgate's own work: verification, the durable
JetStream publish, and everything around them.

    python bench/baselines.py --port 9001

(The delivery baseline, a bare trio+h11 client posting to the receiver, is `loadgen.py count`.)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

Message = MutableMapping[str, Any]
_BODY = b'{"id":"evt_000000000000000000000000"}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode())]


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    while True:  # read the whole body, as any real ingress must
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 202, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})


async def run(port: int) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("bare.http")
    config.keep_alive_timeout = 75
    stopping = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for _ in signals:
                    stopping.set()
                    return

            nursery.start_soon(watch)
            await serve(app, config, shutdown_trigger=stopping.wait)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run, args.port)


if __name__ == "__main__":
    main()
