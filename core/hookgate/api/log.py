"""The delivery log and replays under `/api/v1`: events, deliveries with attempts, retry, recover,
redrive, and the jobs those start. Authentication is done by `hookgate.api.app.Api` before this."""

from __future__ import annotations

import logging
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable

import msgspec

from hookgate.broker import BrokerUnavailable
from hookgate.broker.records import STATUSES
from hookgate.ingress.asgi import Receive, Scope, Send, read_json_or_answer, send_error, send_json
from hookgate.log.query import BadQuery, DeliveryLog
from hookgate.log.replay import Replayer, ReplayError
from hookgate.plugin_kit.units import parse_time

log = logging.getLogger("hookgate.api")

RETRY_AFTER = 2
"""Seconds a client is asked to wait (Retry-After) when the delivery log cannot be read: the
broker is away or JetStream is electing a leader, which takes seconds."""

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")


class RecoverRequest(msgspec.Struct, forbid_unknown_fields=True):
    since: str
    until: str | None = None  # default: now
    status: list[str] | None = None  # default: failed and dead


_recover_decoder = msgspec.json.Decoder(RecoverRequest)


class LogApi:
    def __init__(self, dlog: DeliveryLog, replayer: Replayer, endpoint_exists: Callable[[str], bool]):
        self.dlog = dlog
        self.replayer = replayer
        self.endpoint_exists = endpoint_exists

    async def handle(self, scope: Scope, receive: Receive, send: Send, parts: list[str]) -> bool:
        """Answer if the path is ours (`parts` are the segments after /api/v1); False if not."""
        method = scope["method"]
        shape = tuple(p if i % 2 == 0 else "*" for i, p in enumerate(parts))
        routes: dict[tuple[str, ...], dict[str, Callable[[], Awaitable[None]]]] = {
            ("events",): {"GET": lambda: self._list_events(scope, send)},
            ("events", "*"): {"GET": lambda: self._get_event(send, parts[1])},
            ("deliveries",): {"GET": lambda: self._list_deliveries(scope, send)},
            ("deliveries", "*"): {"GET": lambda: self._get_delivery(send, parts[1])},
            ("deliveries", "*", "retry"): {"POST": lambda: self._retry(scope, send, parts[1])},
            ("endpoints", "*", "recover"): {"POST": lambda: self._recover(scope, receive, send, parts[1])},
            ("endpoints", "*", "redrive"): {"POST": lambda: self._redrive(send, parts[1])},
            ("jobs", "*"): {"GET": lambda: self._get_job(send, parts[1])},
        }
        methods = routes.get(shape)
        if methods is None:
            return False
        if parts[0] in ("deliveries", "endpoints") and len(parts) > 1 and not _TOKEN.fullmatch(parts[1]):
            # Names and delivery ids become NATS subject tokens: '.', '*' or '>' would widen a lookup.
            what = {"deliveries": "delivery", "endpoints": "endpoint"}[parts[0]]
            await send_error(send, 404, "not_found", f"no {what} {parts[1]!r}")
            return True
        handler = methods.get(method)
        try:
            if handler is None:
                allowed = " or ".join(methods)
                await send_error(
                    send, 405, "method_not_allowed", f"use {allowed} on /api/v1/{'/'.join(parts)}"
                )
            else:
                await handler()
        except BadQuery as exc:
            await send_error(send, 422, "invalid_query", str(exc))
        except ReplayError as exc:
            await send_error(send, exc.status, exc.code, str(exc))
        except (BrokerUnavailable, TimeoutError) as exc:
            log.error("the delivery log could not be read: %s", exc)
            await send_json(
                send,
                503,
                {"error": "broker_unavailable", "message": "the delivery log could not be read; retry later"},
                headers=[(b"retry-after", str(RETRY_AFTER).encode())],
            )
        except Exception:
            log.exception("the API failed on %s /api/v1/%s", method, "/".join(parts))
            await send_error(send, 500, "internal_error", "the request failed; see the gateway's log")
        return True

    # --- events and deliveries -----------------------------------------------------------------

    async def _list_events(self, scope: Scope, send: Send) -> None:
        q = _Query(scope, {"source", "since", "until", "cursor", "limit"})
        page = await self.dlog.list_events(
            source=q.name("source"),
            since=q.time("since"),
            until=q.time("until"),
            cursor=q.text("cursor"),
            limit=q.limit(),
        )
        await send_json(send, 200, page)

    async def _get_event(self, send: Send, event_id: str) -> None:
        event = await self.dlog.get_event(event_id)
        if event is None:
            await send_error(
                send, 404, "not_found", f"no event {event_id} (not yet routed, or past retention)"
            )
            return
        await send_json(send, 200, event)

    async def _list_deliveries(self, scope: Scope, send: Send) -> None:
        q = _Query(scope, {"endpoint", "status", "event", "since", "until", "cursor", "limit"})
        statuses = q.list("status")
        unknown = [s for s in statuses or [] if s not in STATUSES]
        if unknown:
            raise BadQuery(f"unknown status {', '.join(unknown)}; expected one of {', '.join(STATUSES)}")
        page = await self.dlog.list_deliveries(
            endpoint=q.name("endpoint"),
            statuses=frozenset(statuses) if statuses else None,
            event_id=q.text("event"),
            since=q.time("since"),
            until=q.time("until"),
            cursor=q.text("cursor"),
            limit=q.limit(),
        )
        await send_json(send, 200, page)

    async def _get_delivery(self, send: Send, delivery_id: str) -> None:
        delivery = await self.dlog.get_delivery(delivery_id)
        if delivery is None:
            await send_error(send, 404, "not_found", f"no delivery {delivery_id} (or it is past retention)")
            return
        await send_json(send, 200, delivery)

    # --- replays -------------------------------------------------------------------------------

    async def _retry(self, scope: Scope, send: Send, delivery_id: str) -> None:
        now = _Query(scope, {"now"}).flag("now")
        state, attempt, pulled_forward = await self.replayer.retry(delivery_id, now=now)
        await send_json(
            send,
            202,
            {
                "delivery": delivery_id,
                "endpoint": state.created.endpoint,
                "attempt": attempt,
                "status": "pending",
                "pulled_forward": pulled_forward,
            },
        )

    async def _recover(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        if not self.endpoint_exists(endpoint):
            await send_error(send, 404, "not_found", f"no endpoint named {endpoint!r}")
            return
        request = await read_json_or_answer(
            scope, receive, send, 64 * 1024, _recover_decoder, "invalid_request"
        )
        if request is None:
            return
        try:
            since = parse_time(request.since)
        except ValueError as exc:
            await send_error(send, 422, "invalid_request", f"{exc} - at `$.since`")
            return
        try:
            until = parse_time(request.until) if request.until else time.time()
        except ValueError as exc:
            await send_error(send, 422, "invalid_request", f"{exc} - at `$.until`")
            return
        if until < since:
            await send_error(send, 422, "invalid_request", "`until` is before `since` - at `$.until`")
            return
        unknown = [s for s in request.status or [] if s not in STATUSES]
        if unknown:
            await send_error(
                send, 422, "invalid_request", f"unknown status {', '.join(unknown)} - at `$.status`"
            )
            return
        job, started = await self.replayer.start_recover(endpoint, since, until, request.status)
        await send_json(send, 202 if started else 200, job)

    async def _redrive(self, send: Send, endpoint: str) -> None:
        if not self.endpoint_exists(endpoint):
            await send_error(send, 404, "not_found", f"no endpoint named {endpoint!r}")
            return
        job, started = await self.replayer.start_redrive(endpoint)
        await send_json(send, 202 if started else 200, job)

    async def _get_job(self, send: Send, job_id: str) -> None:
        job = await self.replayer.job(job_id)
        if job is None:
            await send_error(send, 404, "not_found", f"no job {job_id}")
            return
        await send_json(send, 200, job)


class _Query:
    """The query string, with unknown parameters refused (a typo must not silently widen a query)."""

    def __init__(self, scope: Scope, allowed: set[str]):
        raw = scope.get("query_string", b"").decode("latin-1")
        self.values = urllib.parse.parse_qs(raw, keep_blank_values=False)
        unknown = sorted(set(self.values) - allowed)
        if unknown:
            raise BadQuery(
                f"unknown query parameter {', '.join(unknown)}; expected {', '.join(sorted(allowed))}"
            )

    def text(self, name: str) -> str | None:
        values = self.values.get(name)
        return values[-1] if values else None

    def list(self, name: str) -> list[str] | None:
        """Repeated (`status=a&status=b`) or comma-separated (`status=a,b`)."""
        values = self.values.get(name)
        if not values:
            return None
        return [v for value in values for v in value.split(",") if v]

    def name(self, name: str) -> str | None:
        """An endpoint or source name (letters, digits, '-' and '_', as in the config)."""
        value = self.text(name)
        if value is not None and not _TOKEN.fullmatch(value):
            raise BadQuery(f"{name}: {value!r} is not a name (letters, digits, '-' and '_')")
        return value

    def time(self, name: str) -> float | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            return parse_time(value)
        except ValueError as exc:
            raise BadQuery(f"{name}: {exc}") from None

    def flag(self, name: str) -> bool:
        value = self.text(name)
        if value is None or value in ("false", "0"):
            return False
        if value in ("true", "1"):
            return True
        raise BadQuery(f"{name} must be true or false, got {value!r}")

    def limit(self) -> int:
        value = self.text("limit")
        if value is None:
            return 50
        if not (value.isascii() and value.isdigit()):
            raise BadQuery(f"limit must be a number, got {value!r}")
        return int(value)
