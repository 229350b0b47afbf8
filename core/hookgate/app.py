"""The ASGI application: one port for ingress, the API, and health checks."""

from __future__ import annotations

import contextlib
import logging

import trio

from hookgate.api.app import Api
from hookgate.broker import Broker
from hookgate.ingress.asgi import Receive, Scope, Send, send_bytes, send_error, send_json
from hookgate.ingress.handler import Ingress
from hookgate.observe.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("hookgate.http")

WEBHOOKS = "/webhooks/"
# /readyz answers within this, even when the broker does not answer at all (a frozen server), so
# a probe with a 1 s timeout gets a 503 rather than timing out.
READY_DEADLINE = 0.5


class App:
    def __init__(
        self, ingress: Ingress, api: Api, broker: Broker, metrics: Metrics, *, serves_ingress: bool = True
    ):
        self.ingress = ingress
        self.api = api
        self.broker = broker
        self.metrics = metrics
        # False in a delivery process (server.role: delivery): webhooks and the API are not here.
        self.serves_ingress = serves_ingress

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        try:
            if not self.serves_ingress and path.startswith((WEBHOOKS, "/api/")):
                await send_error(
                    send, 404, "not_served", f"{path} is served by ingress processes, not this delivery one"
                )
            elif path.startswith(WEBHOOKS):
                await self.ingress.handle(scope, receive, send, path[len(WEBHOOKS) :].rstrip("/"))
            elif path.startswith("/api/"):
                await self.api.handle(scope, receive, send, path.rstrip("/"))
            elif path == "/healthz":
                await send_json(send, 200, {"status": "ok"})
            elif path == "/metrics":
                await send_bytes(send, 200, self.metrics.render(), CONTENT_TYPE)
            elif path == "/readyz":
                reason = await self._not_ready()
                if reason is None:
                    await send_json(send, 200, {"status": "ready"})
                else:
                    await send_json(send, 503, {"status": "broker unavailable", "reason": reason})
            else:
                await send_error(send, 404, "not_found", f"nothing at {path}")
        except Exception:
            # Never a traceback to the caller: log it here, answer a plain 500.
            log.exception("unhandled error serving %s %s", scope.get("method"), path)
            with contextlib.suppress(Exception):  # the response may have started already
                await send_error(send, 500, "internal_error", "internal error; see the gateway log")

    async def _not_ready(self) -> str | None:
        """Why the gateway is not ready, or None when it is; decided within READY_DEADLINE."""
        if not self.broker.connected:
            return "not connected to the broker"
        with trio.move_on_after(READY_DEADLINE):
            if await self.broker.ready():
                return None
            return "the broker's streams are missing or unreadable"
        return f"the broker did not answer within {READY_DEADLINE}s"


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
