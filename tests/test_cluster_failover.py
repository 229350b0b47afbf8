"""Failover on a three-node NATS cluster (issue 12): two gateway replicas, separate processes,
under a steady load of signed webhooks and API events. The stream leader of the events stream is
killed with SIGKILL, then one replica; a replica starts again while that node is still down, then
the node. No event answered 2xx is lost, duplicates stay within what at-least-once allows, what a
killed replica held is delivered by the other within ack_wait, and clients only ever see 2xx or
503 with Retry-After.

Run with `-s` to see the figures it measured (docs/external-nats.md, "Failover on a NATS
cluster"). The smaller tests after it each pin a defect it found, on a single nats-server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import pytest
import trio
from nats.js.api import AckPolicy, ConsumerConfig

from hookgate import config as config_mod
from hookgate.broker import Broker, BrokerRefused, Commit, ConsumerSpec, InMsg, OutMsg
from hookgate.broker.pull import PullConsumer, Waiter, take_queued, top_up_due
from hookgate.plugin_host.hooks import Hooks
from tests.cluster_support import Cluster, ClusterNode, GatewayProcess, free_ports
from tests.support import NatsServer, Receiver, base_config, receiver, run_gateway, startup_error
from tests.test_external_nats import documented_permissions, external

SECRET = "cluster-secret"
TOKEN = "test-token"
RATE = 30.0
"""Events sent per second, alternately a signed webhook and an API event."""
LOAD_SECONDS = 24.0
"""The load stops by itself after this long."""
ACK_WAIT = 30.0
"""What a consumer waits before it redelivers a message a dead replica held (egress ACK_WAIT)."""
CONCURRENCY = 10
"""The endpoint's attempts in flight at once, per replica."""
AFTER_RESTART = 4
"""Events sent to the restarted replica alone."""
RECEIVER_SECONDS = 0.2
"""The receiver takes this long to answer, so a replica always has attempts in flight to lose."""


def _config(port: int, urls: list[str], receiver_url: str) -> str:
    return textwrap.dedent(
        f"""\
        server:
          listen: 127.0.0.1:{port}
          workers: 1  # a replica is one process, killed as one
          api_tokens: [{TOKEN}]
          shutdown_grace: 2s
        broker:
          url: [{", ".join(urls)}]
          replicas: 3
        egress:
          allow_networks: [127.0.0.0/8]
        sources:
          prov:
            verify: {{type: hmac, header: X-Sig, secret: {SECRET}}}
            event_id: header.X-Delivery
        endpoints:
          svc: {{url: "{receiver_url}/in", concurrency: {CONCURRENCY}, retry: {{schedule: [200ms, 1s, 2s]}}}}
        routes:
          - {{from: [prov, internal], to: [svc]}}
        """
    )


@dataclass
class Tally:
    """What the clients saw: each event id answered 2xx (and when), every status, every failure."""

    accepted: dict[str, float] = field(default_factory=dict)
    accepted_by: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    unanswered: int = 0  # sent, then the connection broke: stored or not, nobody knows
    refused: int = 0  # no replica took the connection
    no_retry_after: list[int] = field(default_factory=list)
    unavailable_at: list[float] = field(default_factory=list)  # when each 503 was answered
    lists: Counter[int] = field(default_factory=Counter)  # filtered delivery lists
    outstanding: int = 0
    sent: int = 0
    answered: trio.Event = field(default_factory=trio.Event)  # set, and replaced, at each answer

    async def until_outstanding_at_most(self, count: int, timeout: float) -> None:
        """Wait until no more than `count` requests wait for their answer (ingress has caught up)."""
        with trio.fail_after(timeout):
            while self.outstanding > count:
                await self.answered.wait()


@dataclass
class Balancer:
    """Spreads requests over the routable replicas, as a load balancer with a readiness probe
    would: a replica that refuses the connection is skipped for the next one."""

    replicas: dict[str, GatewayProcess]
    routable: list[str]

    def order(self, n: int) -> list[str]:
        names = list(self.routable)
        if not names:
            return []
        start = n % len(names)
        return names[start:] + names[:start]


def _webhook(n: int) -> tuple[str, str, bytes, dict[str, str]]:
    body = json.dumps({"type": "order.paid", "n": n}).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return "POST", "/webhooks/prov", body, {"X-Sig": signature, "X-Delivery": f"wh-{n}"}


def _api_event(n: int) -> tuple[str, str, bytes, dict[str, str]]:
    body = json.dumps({"type": "order.created", "data": {"n": n}, "id": f"api-{n}"}).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    return "POST", "/api/v1/events", body, headers


async def _send(client: httpx.AsyncClient, balancer: Balancer, tally: Tally, n: int) -> None:
    method, path, body, headers = (_webhook if n % 2 == 0 else _api_event)(n)
    tally.sent += 1
    tally.outstanding += 1
    try:
        for name in balancer.order(n):
            try:
                response = await client.request(
                    method, f"{balancer.replicas[name].url}{path}", content=body, headers=headers
                )
            except httpx.ConnectError:
                continue  # nothing was sent: the next replica gets it
            except httpx.TransportError:
                tally.unanswered += 1
                return
            tally.statuses[response.status_code] += 1
            if response.status_code == 202:
                tally.accepted[response.json()["id"]] = trio.current_time()
                tally.accepted_by[name] += 1
            else:
                tally.unavailable_at.append(trio.current_time())
                if "retry-after" not in response.headers:
                    tally.no_retry_after.append(response.status_code)
            return
        tally.refused += 1
    finally:
        tally.outstanding -= 1
        tally.answered.set()
        tally.answered = trio.Event()


async def _load(client: httpx.AsyncClient, balancer: Balancer, tally: Tally) -> None:
    """RATE events a second for LOAD_SECONDS, each on its own (a slow answer delays no other)."""
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        n = 0
        while (now := trio.current_time()) < start + LOAD_SECONDS:
            nursery.start_soon(_send, client, balancer, tally, n)
            n += 1
            await trio.sleep_until(max(now, start + n / RATE))


async def _list_deliveries(
    client: httpx.AsyncClient, balancer: Balancer, tally: Tally, until: trio.Event
) -> None:
    """A filtered delivery list twice a second on a routable replica, as an operator's dashboard."""
    n = 0
    while not until.is_set():
        for name in balancer.order(n)[:1]:
            try:
                response = await client.get(
                    f"{balancer.replicas[name].url}/api/v1/deliveries",
                    params={"endpoint": "svc", "status": "retrying"},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
            except httpx.TransportError:
                continue
            tally.lists[response.status_code] += 1
            if response.status_code != 200 and "retry-after" not in response.headers:
                tally.no_retry_after.append(response.status_code)
        n += 1
        with trio.move_on_after(0.5):
            await until.wait()


def _delivered(rx: Receiver) -> dict[str, list[float]]:
    """Each event id the receiver got, with the time of every copy."""
    seen: dict[str, list[float]] = {}
    for request in rx.requests:
        seen.setdefault(request.headers["webhook-id"], []).append(request.at)
    return seen


async def _first_delivery_accepted_after(rx: Receiver, tally: Tally, moment: float, timeout: float) -> float:
    """Seconds from `moment` until an event accepted after it reaches the receiver."""
    with trio.fail_after(timeout):
        while True:
            delivered = _delivered(rx)
            times = [min(delivered[i]) for i, at in tally.accepted.items() if at > moment and i in delivered]
            if times:
                return max(min(times) - moment, 0.0)
            await rx.wait_for(len(rx.requests) + 1, timeout=timeout)


def _in_flight(rx: Receiver, tally: Tally) -> int:
    """Events a kill may cut short now: requests unanswered, events stored but not delivered
    yet, and the attempts every replica may have made without their acks committed."""
    undelivered = set(tally.accepted) - set(_delivered(rx))
    return tally.outstanding + len(undelivered) + 2 * CONCURRENCY


@dataclass
class Failover:
    """The scenario's parts and what it measured along the way."""

    cluster: Cluster
    rx: Receiver
    client: httpx.AsyncClient
    balancer: Balancer
    tally: Tally = field(default_factory=Tally)
    figures: dict[str, float] = field(default_factory=dict)
    start: float = 0.0
    dup_bound: int = 0
    held: set[str] = field(default_factory=set)

    async def kill_the_events_leader(self) -> ClusterNode:
        """SIGKILL the events stream's leader; return once deliveries flow again."""
        leader = await self.cluster.stream_leader("HOOKGATE_EVENTS")
        self.dup_bound += _in_flight(self.rx, self.tally)
        leader.kill()
        killed = self.figures["leader killed at s"] = trio.current_time() - self.start
        # A follower waits 4-9 s (nats-server's election timeout) before it campaigns.
        self.figures["deliveries resumed after the leader kill, s"] = await _first_delivery_accepted_after(
            self.rx, self.tally, self.start + killed, timeout=30
        )
        return leader

    async def kill_replica(self, name: str) -> float:
        """SIGKILL a replica with what it holds; return once the survivor delivers new events.
        That takes up to ack_wait: what the dead replica held counts against the endpoint
        consumer's max_ack_pending, which all replicas share, until then."""
        self.balancer.routable.remove(name)
        self.dup_bound += _in_flight(self.rx, self.tally)
        self.held = set(self.tally.accepted) - set(_delivered(self.rx))
        self.balancer.replicas[name].kill()
        killed = trio.current_time()
        self.figures["replica killed at s"] = killed - self.start
        self.figures["survivor delivered a new event after s"] = await _first_delivery_accepted_after(
            self.rx, self.tally, killed, timeout=ACK_WAIT + 10
        )
        return killed

    async def restart_replica(self, name: str, killed: float) -> None:
        """Start a replica again, and see it take events (sent to it alone, as the load may be
        over by now)."""
        self.balancer.replicas[name].start()
        await self.balancer.replicas[name].ready()
        self.figures["replica ready again after s"] = trio.current_time() - killed
        taken = self.tally.accepted_by[name]
        alone = Balancer(self.balancer.replicas, [name])
        for n in range(AFTER_RESTART):
            await _send(self.client, alone, self.tally, 100_000 + n)
        assert self.tally.accepted_by[name] == taken + AFTER_RESTART, self.tally.statuses
        self.balancer.routable.append(name)

    async def all_accepted_delivered(self, replica_killed: float) -> dict[str, list[float]]:
        """Wait until every event answered 2xx reached the receiver (what the killed replica
        held comes after ack_wait); what it got, by event id."""
        with trio.fail_after(max(replica_killed + ACK_WAIT + 15 - trio.current_time(), 20)):
            while not set(self.tally.accepted) <= set(delivered := _delivered(self.rx)):
                await self.rx.wait_for(len(self.rx.requests) + 1, timeout=60)
        self.figures["what the killed replica held was delivered within s"] = max(
            (min(delivered[i]) - replica_killed for i in self.held), default=0.0
        )
        self.figures["duration s"] = trio.current_time() - self.start
        return delivered

    def report(self, delivered: dict[str, list[float]], duplicates: int) -> str:
        leader_killed = self.start + self.figures["leader killed at s"]
        if self.tally.unavailable_at:
            self.figures["503s from s after the leader kill"] = min(self.tally.unavailable_at) - leader_killed
            self.figures["503s until s after the leader kill"] = (
                max(self.tally.unavailable_at) - leader_killed
            )
        t = self.tally
        return (
            f"sent {t.sent}, answered 2xx {len(t.accepted)}, delivered {len(delivered)}, "
            f"duplicates {duplicates} (bound {self.dup_bound}), statuses {dict(t.statuses)}, "
            f"unanswered {t.unanswered}, delivery lists {dict(t.lists)}, "
            + ", ".join(f"{k} {v:.1f}" for k, v in self.figures.items())
        )


async def _start_replicas(
    tmp_path: Path, cluster: Cluster, rx: Receiver, replicas: dict[str, GatewayProcess]
) -> float:
    """Start both replicas together on the new cluster; how long until both were ready."""
    began = trio.current_time()
    for name, port in zip(("a", "b"), free_ports(2), strict=True):
        config = tmp_path / f"{name}.yaml"
        config.write_text(_config(port, cluster.urls, rx.url))
        replicas[name] = GatewayProcess(config, port, tmp_path / f"{name}.log")
        replicas[name].start()
    for replica in replicas.values():
        await replica.ready()
    return trio.current_time() - began


@pytest.mark.slow
async def test_a_cluster_loses_no_acknowledged_event_when_its_leader_and_a_replica_are_killed(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path / "cluster")
    replicas: dict[str, GatewayProcess] = {}
    try:
        cluster.start()
        async with (
            receiver(lambda request, n: RECEIVER_SECONDS) as rx,
            httpx.AsyncClient(timeout=15, limits=httpx.Limits(max_connections=400)) as client,
        ):
            both_ready = await _start_replicas(tmp_path, cluster, rx, replicas)
            run = Failover(cluster, rx, client, Balancer(replicas, ["a", "b"]), start=trio.current_time())
            run.figures["both replicas ready on the new cluster after s"] = both_ready
            tally, load_done = run.tally, trio.Event()

            async def load() -> None:
                await _load(client, run.balancer, tally)
                load_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(load)
                nursery.start_soon(_list_deliveries, client, run.balancer, tally, load_done)
                await rx.wait_for(60, timeout=15)
                leader = await run.kill_the_events_leader()
                # Later, once ingress has caught up:
                await tally.until_outstanding_at_most(5, timeout=15)
                replica_killed = await run.kill_replica("a")
                # It starts again while the killed node is still down; then the node comes back.
                assert not leader.running
                await run.restart_replica("a", replica_killed)
                cluster.start_node(leader)
                await load_done.wait()
            delivered = await run.all_accepted_delivered(replica_killed)
    finally:
        for replica in replicas.values():
            replica.kill()
        cluster.stop_all()

    duplicates = sum(len(copies) - 1 for copies in delivered.values())
    print("\n" + run.report(delivered, duplicates))
    assert set(tally.accepted) <= set(delivered)  # no event answered 2xx is lost
    assert duplicates <= run.dup_bound
    assert set(tally.statuses) <= {202, 503}, tally.statuses  # never a 500
    assert set(tally.lists) <= {200, 503}, tally.lists
    assert tally.no_retry_after == []  # every 503 says when to come back
    assert tally.refused == 0  # one replica was always there
    assert run.figures["what the killed replica held was delivered within s"] <= ACK_WAIT + 10
    assert sum(tally.statuses.values()) + tally.unanswered == tally.sent  # every request is counted
    assert len(tally.accepted) >= 0.5 * tally.sent


# --- stream setup: only a change is sent ---------------------------------------------------------


def _without_stream_updates() -> str:
    """The documented permissions without STREAM.UPDATE: a gateway that sends one is refused."""
    block = documented_permissions().replace("$HOOKGATE_NATS_PASSWORD", '"hookgate-pw"')
    return re.sub(r', "\$JS\.API\.STREAM\.UPDATE\.HOOKGATE_[A-Z]+"', "", block)


async def test_a_restart_with_unchanged_streams_sends_them_no_update(tmp_path: Path) -> None:
    # On a new cluster an update that meets another replica's create of the same stream goes
    # unanswered, and both replicas wait out a timeout for every stream (issue 12).
    block = _without_stream_updates()
    assert "STREAM.UPDATE.HOOKGATE" not in block and "STREAM.CREATE.HOOKGATE_LOG" in block
    server = NatsServer(tmp_path / "nats", block)
    server.start()
    try:
        await _start_twice_then_change(tmp_path, server)
    finally:
        server.stop()


async def _start_twice_then_change(tmp_path: Path, server: NatsServer) -> None:
    broker = f"url: {server.url}\nuser: hookgate\npassword: hookgate-pw"
    async with run_gateway(tmp_path, external(broker, "")):
        pass  # creates the streams
    async with run_gateway(tmp_path, external(broker, "")) as gw:
        assert (await gw.http.get(f"{gw.url}/readyz")).status_code == 200
    # A setting that did change is still sent (and here refused, for want of the permission).
    message = str(await startup_error(tmp_path, external(broker + "\nretention: 48h", ""), BrokerRefused))
    assert message.startswith("stream HOOKGATE_EVENTS: the NATS server refused hookgate's user"), message
    assert "$js.api.stream.update.hookgate_events" in message


# --- an event that cannot be stored: 503 with Retry-After ----------------------------------------


async def test_an_event_that_cannot_be_stored_gets_a_503_with_retry_after(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # What a client sees during a leader election that outlasts server.publish_timeout (issue 12).
    extra = f"""
        sources:
          prov: {{verify: {{type: hmac, header: X-Sig, secret: {SECRET}}}, event_id: header.X-Delivery}}
        """
    async with run_gateway(tmp_path, base_config(nats_server.url, extra)) as gw:
        await nats_server.freeze()
        try:
            _, path, body, headers = _webhook(1)
            webhook = await gw.http.post(f"{gw.url}{path}", content=body, headers=headers)
            api = await gw.publish("order.created", {}, id="api-1")
        finally:
            nats_server.thaw()
    for response, event_id in ((webhook, webhook.json()["id"]), (api, "api-1")):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "2"
        assert response.json() == {
            "error": "broker_unavailable",
            "message": "the event could not be stored in time; it may still be stored: retry with the same "
            "id, which is never stored twice",
            "id": event_id,
        }


# --- failed stores are logged once, then counted --------------------------------------------------


async def test_failed_stores_are_one_line_then_a_count_not_a_line_each(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Through a leader election every publisher retries every RETRY_INTERVAL: a line per try was
    # about 1,400 lines per replica in 7 s (issue 12).
    loaded = config_mod.loads(base_config(nats_server.url), Hooks(()).registry)
    with caplog.at_level(logging.WARNING, logger="hookgate.broker"):
        async with Broker.connect(loaded.config.broker, nats_server.url) as broker:
            for n in range(30):
                (result,) = await broker.commit(Commit([OutMsg(f"nowhere.captured.{n}", b"x")]))
                assert not result.ok
    lines = [r.getMessage() for r in caplog.records if "could not store" in r.getMessage()]
    # A cluster electing a stream's leader answers a publish as if no stream captured it.
    no_stream = (
        "no JetStream stream captures this subject (or, on a cluster, its stream is electing a leader)"
    )
    assert lines == [
        f"could not store a message: {no_stream}",
        f"could not store 29 more message(s) in 10s: {no_stream}",
    ]


# --- a pull nobody answered is pulled again -------------------------------------------------------


async def _fetch(consumer: PullConsumer, batch: int, timeout: float) -> list[InMsg]:
    """What NatsBridge.fetch does from trio, here on the consumer's own asyncio loop."""
    if top_up_due(consumer):
        await consumer.top_up()
    if not consumer.queue:
        arrived = asyncio.Event()
        consumer.waiter = Waiter(arrived.set)
        try:
            if not consumer.queue:
                try:
                    async with asyncio.timeout(timeout):
                        await arrived.wait()
                except TimeoutError:
                    consumer.taken_since_top_up = consumer.buffer
        finally:
            consumer.waiter = None
    return take_queued(consumer, batch)


async def test_a_pull_that_nobody_answered_is_sent_again_at_once(nats_server: NatsServer) -> None:
    # While a cluster elects a consumer's leader nobody serves its pulls: the server answers 503
    # (no responders). Counted as still owed, such a pull stopped the consumer for its whole
    # expiry (32 s) after the election was over (issue 12).
    async def scenario() -> list[bytes]:
        nc = await nats.connect(nats_server.url)
        try:
            jsm = nc.jsm()
            await jsm.add_stream(name="S", subjects=["s.>"])
            consumer = PullConsumer(nc, ConsumerSpec("S", "late", None, 30.0, 10), buffer=10)
            await consumer.start()
            await consumer.top_up()  # for a consumer that does not exist yet: nobody serves it
            await nc.flush()
            await jsm.add_consumer("S", ConsumerConfig(durable_name="late", ack_policy=AckPolicy.EXPLICIT))
            await nc.jetstream().publish("s.x", b"hello")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while loop.time() < deadline:
                if got := await _fetch(consumer, 10, 0.5):
                    return [m.data for m in got]
            return []
        finally:
            await nc.close()

    assert await trio.to_thread.run_sync(lambda: asyncio.run(scenario())) == [b"hello"]
