"""5. The delivery log: what it costs the nats-server per delivery kept, and how fast the API answers.

The log of N deliveries is built straight into a gateway's embedded server with nats-py, from the
records the gateway itself writes, msgspec-encoded as it encodes them, on the subjects
`hookgate.broker.Topology` names, in the order the router and the dispatcher write them:

- per event (one endpoint, so per delivery): the router's `RoutingRecord` on `<p>.log.routed.<key>`;
- per delivery: a `DeliveryCreated` on `<p>.log.deliveries.<endpoint>.<id>`, then one `Attempt` per
  attempt on the same subject;
- per dead delivery: a `DeadLetter` on `<p>.dead.<endpoint>.<id>`, as the dispatcher leaves it.

Of every hundred deliveries, 98 succeeded at the first attempt, one is retrying after one failed
attempt and one is dead after three. The gateway is paused (SIGSTOP) before the records are
published and stays paused, so its server does nothing else. The server's RSS is read before and
4 s after. With GODEBUG=gctrace=1 the server logs every garbage collection; the one Go forces after
2 idle minutes gives the live heap, without the garbage and caches of the busy minute. A control
gateway gets the same messages, byte for byte, on one fixed subject per record kind, so the
difference is what the per-subject index costs.

Meanwhile a third gateway gets the same log and its HTTP API is timed at that size: listing pages,
a status filter that matches 1 row in 100, single deliveries, events (a few real events routed
through the gateway: the synthetic routing records point at no stored event), and a recover job.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import natsops
from phases import (
    ENDPOINT,
    SOURCE,
    TOPOLOGY,
    Context,
    _endpoint_config,
    _source_config,
    _stored_event,
    _wait_count,
)
from procs import (
    HTTP,
    Hookgate,
    Server,
    cpu_seconds,
    free_port,
    hookgate_config,
    paused,
    start_hookgate,
    start_receiver,
)

from hookgate.broker.ids import delivery_id
from hookgate.broker.records import DeadLetter, DeliveryCreated, RoutingRecord, event_key
from hookgate.log.query import encode_cursor
from hookgate.types import Attempt, Delivery, Event

ROUTE = "bench-to-sink"
EVENT_TYPE = "order.created"
TOKEN = "bench-token"  # procs.hookgate_config's API token
# Which delivery of every hundred is dead (three attempts and a dead letter), which is retrying.
EVERY, DEAD_AT, RETRYING_AT = 100, 37, 73
DEAD_ATTEMPTS = 3  # the endpoint's retry schedule below has two delays
EXTRAPOLATE_RATE, EXTRAPOLATE_HOURS = 100, 72  # deliveries/s, the retention
REAL_EVENTS = 5
GCTRACE = {"GODEBUG": "gctrace=1"}  # the embedded nats-server logs each collection and its live heap
GC_WAIT = 150.0  # Go collects an idle heap 2 minutes after the last collection

ROUTED, CREATED, ATTEMPT, DEAD = range(4)
KIND_NAMES = ("routed", "created", "attempt", "dead letter")

_json = msgspec.json.Encoder().encode
_msgpack = msgspec.msgpack.Encoder().encode


def _status(j: int) -> str:
    return {DEAD_AT: "dead", RETRYING_AT: "retrying"}.get(j % EVERY, "succeeded")


class LogRecords:
    """The log records of `n` deliveries, by message index, generated when published.

    `control`: the same messages on one fixed subject per kind, each as long as the real ones.
    """

    def __init__(self, n: int, now: float, *, control: bool) -> None:
        run = uuid.uuid4().hex[:8]
        ms = int(now * 1000)
        self.n = n
        self.now = now
        self.control = control
        self.event_ids = [f"evt_{ms:012x}{run}{j:08x}" for j in range(n)]  # shaped like new_event_id()
        self.delivery_ids = [delivery_id(e, ENDPOINT) for e in self.event_ids]
        self.plan: list[tuple[int, int, int]] = []  # (kind, delivery, attempt number)
        self.first: list[int] = []  # each delivery's first message index
        for j in range(n):
            self.first.append(len(self.plan))
            self.plan += [(ROUTED, j, 0), (CREATED, j, 0)]
            if _status(j) == "dead":
                self.plan += [(ATTEMPT, j, a) for a in range(1, DEAD_ATTEMPTS)]
                self.plan += [(DEAD, j, DEAD_ATTEMPTS), (ATTEMPT, j, DEAD_ATTEMPTS)]
            else:
                self.plan.append((ATTEMPT, j, 1))
        self.first.append(len(self.plan))
        key, dlv = "0" * 24, "dlv_" + "0" * 24
        self._fixed = {
            ROUTED: TOPOLOGY.routed_subject(key),
            CREATED: TOPOLOGY.delivery_log_subject(ENDPOINT, dlv),
            ATTEMPT: TOPOLOGY.delivery_log_subject(ENDPOINT, dlv),
            DEAD: TOPOLOGY.dead_subject(ENDPOINT, dlv),
        }

    def count(self, kind: int) -> int:
        return sum(1 for k, _, _ in self.plan if k == kind)

    def subject(self, i: int) -> str:
        kind, j, _ = self.plan[i]
        if self.control:
            return self._fixed[kind]
        if kind == ROUTED:
            return TOPOLOGY.routed_subject(event_key(self.event_ids[j]))
        if kind == CREATED:
            return TOPOLOGY.delivery_log_subject(ENDPOINT, self.delivery_ids[j])
        if kind == ATTEMPT:
            return TOPOLOGY.delivery_log_subject(ENDPOINT, self.delivery_ids[j])
        return TOPOLOGY.dead_subject(ENDPOINT, self.delivery_ids[j])

    def payload(self, i: int) -> bytes:
        kind, j, number = self.plan[i]
        if kind == ROUTED:
            return _json(
                RoutingRecord(
                    event_id=self.event_ids[j],
                    source=SOURCE,
                    type=EVENT_TYPE,
                    received_at=self._at(j),
                    routes=[ROUTE],
                    endpoints=[ENDPOINT],
                    events_seq=j + 1,
                )
            )
        if kind == CREATED:
            return _json(
                DeliveryCreated(
                    delivery_id=self.delivery_ids[j],
                    event_id=self.event_ids[j],
                    endpoint=ENDPOINT,
                    source=SOURCE,
                    type=EVENT_TYPE,
                    created_at=self.created_at(j),
                    routes=[ROUTE],
                )
            )
        if kind == ATTEMPT:
            return _json(self.attempt(j, number))
        event = _event(self.event_ids[j], self._at(j))
        delivery = Delivery(
            id=self.delivery_ids[j],
            endpoint=ENDPOINT,
            attempt=number,
            event=event,
            created_at=self.created_at(j),
            routes=[ROUTE],
        )
        return _msgpack(DeadLetter(delivery=delivery, last_attempt=self.attempt(j, number)))

    def attempt(self, j: int, number: int) -> Attempt:
        eid, did = self.event_ids[j], self.delivery_ids[j]
        started = self._at(j) + 0.01 + (number - 1) * 1.0
        status = _status(j)
        attempt = Attempt(
            delivery_id=did,
            event_id=eid,
            endpoint=ENDPOINT,
            attempt=number,
            started_at=started,
            latency=0.0123,
            outcome="succeeded",
            status=200,
            request_headers=[
                ("content-type", "application/json"),
                ("x-event-id", eid),
                ("x-event-type", EVENT_TYPE),
                ("hookgate-source", SOURCE),
                ("hookgate-event-id", eid),
                ("webhook-id", eid),
                ("webhook-timestamp", str(int(started))),
                ("hookgate-delivery-id", did),
                ("hookgate-attempt", str(number)),
                ("user-agent", "hookgate"),
            ],
            response_headers=[("content-type", "application/json"), ("content-length", "11")],
            response_body=b'{"ok":true}',
        )
        if status == "succeeded":
            return attempt
        attempt.status = 503 if status == "retrying" else 500
        attempt.error_kind = "http_status"
        attempt.error = f"HTTP {attempt.status}"
        attempt.response_body = b'{"error":"unavailable"}'
        attempt.response_headers = [("content-type", "application/json"), ("content-length", "23")]
        if status == "dead" and number == DEAD_ATTEMPTS:
            attempt.outcome = "dead"
        else:
            attempt.outcome = "retrying"
            attempt.next_attempt_at = self.now + 3600 if status == "retrying" else started + 1.0
        return attempt

    def created_at(self, j: int) -> float:
        return self._at(j) + 0.002

    def _at(self, j: int) -> float:
        """When delivery j's event arrived: the log spans the past n / 100 seconds."""
        return self.now - (self.n - j) / EXTRAPOLATE_RATE


def _event(event_id: str, at: float) -> Event:
    stored = msgspec.msgpack.decode(_stored_event(event_id), type=Event)
    return msgspec.structs.replace(stored, received_at=at)


def _config(ctx: Context, name: str, receiver: Server) -> dict[str, Any]:
    endpoint = _endpoint_config(receiver.url, ctx.options.concurrency)
    endpoint["retry"] = {"schedule": ["1s", "1s"]}
    return hookgate_config(
        free_port(),
        ctx.data_dir(name),
        sources={SOURCE: _source_config("unused")},
        endpoints={ENDPOINT: endpoint},
        routes=[{"name": ROUTE, "from": [SOURCE], "to": [ENDPOINT]}],
    )


def delivery_log(ctx: Context) -> dict[str, Any]:
    """Memory per delivery in the log (net of a control on few subjects), then API latency at that size.

    Three gateways: the control and the measured one stay paused after their records are stored,
    so their servers are idle until Go's periodic collection (every 2 minutes) shows the live heap;
    the API is timed meanwhile on a third gateway that holds the same log.
    """
    o = ctx.options
    n = o.log_deliveries
    span = max(EVERY, n // 10)  # the recover job's range: the first tenth of the deliveries
    receiver = start_receiver(ctx.procs, "receiver-log")
    memory: dict[str, dict[str, Any]] = {}
    gateways: dict[str, Hookgate] = {}
    with contextlib.ExitStack() as stack:
        for name in ("control", "log"):
            gw = start_hookgate(
                ctx.procs,
                f"hookgate-log-{name}",
                ctx.work_dir,
                _config(ctx, f"log-{name}", receiver),
                "WARNING",
                env=GCTRACE,
            )
            stack.enter_context(paused(gw.proc.pid))
            gateways[name] = gw
            records = LogRecords(n, time.time(), control=name == "control")
            memory[name] = _measured(gw, records, span)

        hookgate = start_hookgate(
            ctx.procs, "hookgate-log-api", ctx.work_dir, _config(ctx, "log-api", receiver), o.log_level
        )
        records = LogRecords(n, time.time(), control=False)
        nats = natsops.embedded_server(hookgate.data_dir)
        published, window = _publish(nats.url, records, span)
        api, recover = _api(ctx, hookgate, receiver, records, span, window)
        ctx.procs.stop(hookgate.proc)

        for name, gw in gateways.items():
            published_at = memory[name].pop("published_at")
            if not o.quick:  # a quick run does not wait for the idle servers' collection
                memory[name].update(_idle_heap(gw, published_at, memory[name]))
    for gw in gateways.values():
        ctx.procs.stop(gw.proc)
    ctx.procs.stop(receiver.proc)

    built, control = memory["log"], memory["control"]
    subjects = built["log_stream"]["num_subjects"] + built["dead_stream"]["num_subjects"]
    extrapolated = EXTRAPOLATE_RATE * EXTRAPOLATE_HOURS * 3600
    rss = (built["rss_growth"] - control["rss_growth"]) / n
    live = None
    if built.get("idle_live_heap") is not None and control.get("idle_live_heap") is not None:
        live = (built["idle_live_heap"] - control["idle_live_heap"]) / n
    stored = built["log_stream"]["bytes"] + built["dead_stream"]["bytes"]
    return {
        "setup": (
            f"{n:,} deliveries to one endpoint ({len(records.plan):,} records: "
            + ", ".join(f"{records.count(k):,} {name}" for k, name in enumerate(KIND_NAMES))
            + f"; 1 in {EVERY} dead after {DEAD_ATTEMPTS} attempts, 1 in {EVERY} retrying) published with "
            f"nats-py into {TOPOLOGY.log_stream} and {TOPOLOGY.dead_stream} of paused gateways; control: "
            "the same messages on one subject per kind; API timed on a third gateway holding the same log"
        ),
        "deliveries": n,
        "records": len(records.plan),
        "subjects": subjects,
        "subjects_per_delivery": round(subjects / n, 2),
        "log": built,
        "control_few_subjects": control,
        "live_bytes_per_delivery": round(live, 1) if live is not None else None,
        "live_bytes_per_subject": round(live * n / (subjects - 4), 1) if live is not None else None,
        "rss_bytes_per_delivery": round(rss, 1),
        "rss_bytes_per_delivery_raw": round(built["rss_growth"] / n, 1),
        "stored_bytes_per_delivery": round(stored / n, 1),
        "extrapolated_deliveries": extrapolated,
        "extrapolated_live_bytes": round(live * extrapolated) if live is not None else None,
        "extrapolated_rss_bytes": round(rss * extrapolated),
        "extrapolated_note": f"{EXTRAPOLATE_HOURS}h retention at {EXTRAPOLATE_RATE} deliveries/s",
        "api_gateway_publish_per_s": round(published.count / published.seconds, 1),
        "api": api,
        "recover": recover,
    }


def _publish(url: str, records: LogRecords, span: int) -> tuple[natsops.Published, tuple[float, float]]:
    """Publish every record; the creation times (since, until) of the first `span` deliveries, which
    is what a recover's range selects."""
    total = len(records.plan)
    published = natsops.publish_pipelined(url, total, records.subject, records.payload)
    if published.errors:
        raise RuntimeError(f"{published.errors} of {total} log records were not stored")
    return published, (records.created_at(0), records.created_at(span - 1))


def _measured(gw: Hookgate, records: LogRecords, span: int) -> dict[str, Any]:
    """Publish into a paused gateway's server and read its RSS before and after."""
    nats = natsops.embedded_server(gw.data_dir)
    before = natsops.settled_rss(nats.pid, 2.0)
    heap_before = natsops.gc_traces(gw.data_dir / "nats-server.log")
    published, _ = _publish(nats.url, records, span)
    after = natsops.settled_rss(nats.pid, 4.0)
    traces = natsops.gc_traces(gw.data_dir / "nats-server.log")
    return {
        "rss_before": before,
        "rss_after": after,
        "rss_growth": after - before,
        "live_heap_before": heap_before[-1].live_bytes if heap_before else None,
        "collections_after_publishing": len(traces),
        "published": published.count,
        "publish_per_s": round(published.count / published.seconds, 1),
        "published_at": time.monotonic() - 4.0,  # monotonic; popped before reporting
        "log_stream": natsops.stream_numbers(nats.url, TOPOLOGY.log_stream),
        "dead_stream": natsops.stream_numbers(nats.url, TOPOLOGY.dead_stream),
    }


def _idle_heap(gw: Hookgate, published_at: float, measured: dict[str, Any]) -> dict[str, Any]:
    """The live heap found by the idle server's next collection (Go forces one every 2 minutes)."""
    log_file = gw.data_dir / "nats-server.log"
    deadline = published_at + GC_WAIT
    seen = measured["collections_after_publishing"]
    while time.monotonic() < deadline:
        traces = natsops.gc_traces(log_file)
        if len(traces) > seen:
            return {
                "idle_live_heap": traces[seen].live_bytes,
                "idle_collection_after_s": round(time.monotonic() - published_at, 1),
            }
        time.sleep(0.5)
    return {"idle_live_heap": None}


# --- the API at that size ----------------------------------------------------------------------


def _api(
    ctx: Context,
    hookgate: Hookgate,
    receiver: Server,
    records: LogRecords,
    span: int,
    window: tuple[float, float],
) -> tuple[dict[str, Any], dict[str, Any]]:
    reps = 3 if ctx.options.quick else 5
    n = records.n
    client = httpx.Client(
        base_url=hookgate.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=120, trust_env=False
    )
    try:
        _wait_ready(client)
        events = _route_real_events(hookgate, client, receiver)
        nats = natsops.embedded_server(hookgate.data_dir)
        log_stream = natsops.stream_numbers(nats.url, TOPOLOGY.log_stream)
        middle = encode_cursor((log_stream["first_seq"] + log_stream["last_seq"]) // 2)
        listing = f"/api/v1/deliveries?endpoint={ENDPOINT}&limit=50"
        first = client.get(listing).json()
        # Spread over the log: the k-th of `reps` samples sits at (k + 0.5) / reps of it.
        spots = [int((k + 0.5) * n / reps) // EVERY * EVERY for k in range(reps)]
        eids, dids = records.event_ids, records.delivery_ids
        timed: dict[str, Any] = {}
        queries: list[tuple[str, Callable[[int], str]]] = [
            ("list, first page", lambda k: listing),
            ("list, second page (next cursor)", lambda k: f"{listing}&cursor={first['next']}"),
            ("list, page from the middle (cursor)", lambda k: f"{listing}&cursor={middle}"),
            (f"list, status=dead (1 in {EVERY})", lambda k: f"{listing}&status=dead"),
            ("list, deliveries of one event", lambda k: f"/api/v1/deliveries?event={eids[spots[k]]}"),
            ("delivery, succeeded (1 attempt)", lambda k: f"/api/v1/deliveries/{dids[spots[k] + 5]}"),
            (
                f"delivery, dead ({DEAD_ATTEMPTS} attempts)",
                lambda k: f"/api/v1/deliveries/{dids[spots[k] + DEAD_AT]}",
            ),
            ("event (routed by the gateway)", lambda k: f"/api/v1/events/{events[k % len(events)]}"),
        ]
        pids = {"hookgate": hookgate.proc.pid, "nats-server": nats.pid}
        for label, path in queries:
            timed[label] = _timed(client, [path(k) for k in range(reps)], pids)
        recover = _recover(client, receiver, records, span, window)
    finally:
        client.close()
    return timed, recover


def _wait_ready(client: httpx.Client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway was not ready again after being resumed")
        time.sleep(0.1)


def _route_real_events(hookgate: Hookgate, client: httpx.Client, receiver: Server) -> list[str]:
    """A few events through the real router (to the receiver), for the event lookups."""
    run = uuid.uuid4().hex[:12]
    ids = [f"evt_real{run}{i:04d}" for i in range(REAL_EVENTS)]
    nats = natsops.embedded_server(hookgate.data_dir)
    natsops.publish_bulk(
        nats.url, len(ids), lambda i: TOPOLOGY.event_subject(SOURCE), lambda i: _stored_event(ids[i]), None
    )
    _wait_count(receiver, len(ids), timeout=60)  # routed, then delivered: their records are all there
    return ids


def _timed(client: httpx.Client, paths: list[str], pids: dict[str, int]) -> dict[str, Any]:
    """One GET per path: median and max in ms, how many rows the last page held, and the CPU the
    gateway and its server spent per request (where the time goes)."""
    took: list[float] = []
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    body: Any = None
    for path in paths:
        started = time.perf_counter()
        response = client.get(path)
        took.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:200]}")
        body = response.json()
    out: dict[str, Any] = {
        "median_ms": round(statistics.median(took), 1),
        "max_ms": round(max(took), 1),
        "reps": len(took),
        "cpu_ms_per_request": {
            name: round((cpu_seconds(pid) - cpu[name]) * 1000 / len(took), 1) for name, pid in pids.items()
        },
    }
    if isinstance(body, dict) and "data" in body:
        out["rows"] = len(body["data"])
        out["more"] = body["next"] is not None
    return out


def _recover(
    client: httpx.Client, receiver: Server, records: LogRecords, span: int, window: tuple[float, float]
) -> dict[str, Any]:
    """One recover job over the first `span` deliveries' time window: POST to `succeeded`."""
    expected = sum(1 for j in range(span) if _status(j) == "dead")
    HTTP.post(f"{receiver.url}/__reset", timeout=5)
    since, until = window
    started = time.perf_counter()
    response = client.post(
        f"/api/v1/endpoints/{ENDPOINT}/recover", json={"since": f"{since:.6f}", "until": f"{until:.6f}"}
    )
    if response.status_code not in (200, 202):
        raise RuntimeError(f"recover: {response.status_code} {response.text[:200]}")
    job = response.json()
    deadline = time.monotonic() + 120
    while job["state"] == "running":
        if time.monotonic() > deadline:
            raise TimeoutError(f"recover job still running after 120s: {job}")
        time.sleep(0.05)
        job = client.get(f"/api/v1/jobs/{job['id']}").json()
    seconds = time.perf_counter() - started
    delivered = _wait_count(receiver, job["requeued"], timeout=60)["count"] if job["requeued"] else 0
    return {
        "deliveries_in_range": span,
        "dead_in_range": expected,
        "state": job["state"],
        "error": job.get("error"),
        "scanned": job["scanned"],
        "requeued": job["requeued"],
        "skipped": job["skipped"],
        "seconds": round(seconds, 2),
        "delivered_after": delivered,
    }
