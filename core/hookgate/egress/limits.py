"""Each endpoint's rate limit, circuit breaker and failing streak, shared by every process and
replica through two JetStream KV buckets, with one watch per process.

- `<prefix>_RATES`, key `<endpoint>`: the endpoint's rate window, leased in blocks of tokens with
  compare-and-set (`hookgate.egress.shared_rate`); never watched.
- `<prefix>_HEALTH`, keys `circuit.<endpoint>` (`hookgate.egress.shared_circuit`) and
  `failing.<endpoint>` (since when every attempt failed, for `disable_after`): followed by every
  process with one watch, written only when they change.

Nothing here is written or read per delivery: a closed circuit and a failing streak are asked in
memory, and a rate limit costs one crossing per lease. Writes go out from one task, latest wish
per key, so a flapping endpoint cannot queue more than one write per key.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import trio

from hookgate.broker import Broker, KvUpdate
from hookgate.config.flow import CircuitBreakerConfig, RateLimitConfig
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.flow import FlowControl, OnChange
from hookgate.egress.shared_circuit import (
    CircuitRecord,
    CircuitShare,
    SharedBreaker,
    claim_change,
    decode_record,
    encode_record,
    give_back_change,
)
from hookgate.egress.shared_rate import LeasedBucket, lease_change, lease_start
from hookgate.egress.watching import cancel_when_set, follow_bucket

log = logging.getLogger("hookgate.flow")

CIRCUIT = "circuit."
FAILING = "failing."
WRITE_RETRY = 1.0  # a write the broker refused is tried again after this (unless replaced)
FLUSH_ON_STOP = 2.0  # how long the last writes may take at shutdown


class FailingRecord(msgspec.Struct, kw_only=True):
    """The value of `failing.<endpoint>`: every attempt failed since then (unix seconds)."""

    since: float
    by: str = ""


_encode = msgspec.json.Encoder().encode
_failing_decoder = msgspec.json.Decoder(FailingRecord)


@dataclass
class LimitStats:
    """What the shared limits cost this process, for the cost figures: crossings into nats-py
    (one per lease, claim or write) and compare-and-set tries (two requests each)."""

    leases: int = 0
    lease_tries: int = 0
    claims: int = 0
    writes: int = 0

    @property
    def crossings(self) -> int:
        return self.leases + self.claims + self.writes


# The flow control of every endpoint with neither a rate limit nor a circuit breaker: it holds
# no state, so one serves them all.
UNLIMITED = FlowControl()

Settings = tuple[RateLimitConfig | None, CircuitBreakerConfig | None, float]


@dataclass
class _Held:
    settings: Settings
    flow: FlowControl


class SharedLimits:
    """One per process: the FlowControl of each endpoint, and the failing streaks, kept in step
    with every other process through KV. `run()` follows the health bucket and stores changes;
    until it runs, everything still works within this process."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self.process = uuid.uuid4().hex[:12]
        self.stats = LimitStats()
        self._flows: dict[str, _Held] = {}
        self._circuits: dict[str, CircuitRecord] = {}  # as stored, by endpoint
        self._failing: dict[str, float] = {}  # endpoint -> since (unix)
        self._writes: dict[str, Callable[[], Awaitable[None]]] = {}  # health key -> latest wish
        self._wake = trio.Event()

    # --- flow control -------------------------------------------------------------------------

    def flow_for(self, endpoint: Endpoint, on_change: OnChange | None = None) -> FlowControl:
        """The endpoint's FlowControl: the same one for as long as its limits' config is the same,
        whichever worker or lane asks. `on_change` (circuit transitions) is the latest caller's."""
        config = endpoint.config
        if config.rate_limit is None and config.circuit_breaker is None:
            self._flows.pop(endpoint.name, None)
            return UNLIMITED  # no state: nothing kept per endpoint, however many there are
        # A probe may be sent twice (a 401 refreshes the token and sends again).
        settings: Settings = (config.rate_limit, config.circuit_breaker, 2 * endpoint.timeout + 5)
        held = self._flows.get(endpoint.name)
        if held is None or held.settings != settings:
            held = _Held(settings, self._build(endpoint.name, settings))
            self._flows[endpoint.name] = held
        if held.flow.breaker is not None:
            held.flow.breaker.on_change = on_change
        return held.flow

    def forget(self, endpoint: str) -> None:
        """The endpoint is gone from this process: drop its FlowControl."""
        self._flows.pop(endpoint, None)

    def remove(self, endpoint: str) -> None:
        """The endpoint was deleted: remove its circuit and failing streak for every process, so
        a new endpoint of the same name starts closed and with its own `disable_after` clock."""
        self.forget(endpoint)
        self._circuits.pop(endpoint, None)
        self._failing.pop(endpoint, None)
        for key in (CIRCUIT + endpoint, FAILING + endpoint):
            self._want(key, functools.partial(self._delete, key))

    def _build(self, name: str, settings: Settings) -> FlowControl:
        rate_limit, circuit_breaker, probe_timeout = settings
        bucket = LeasedBucket(rate_limit, functools.partial(self._lease, name), name) if rate_limit else None
        breaker = None
        if circuit_breaker is not None:
            share = CircuitShare(
                self.process,
                functools.partial(self._publish_circuit, name),
                functools.partial(self._claim, name),
                functools.partial(self._give_back, name),
            )
            breaker = SharedBreaker(circuit_breaker, share, probe_timeout=probe_timeout)
            if name in self._circuits:
                breaker.follow(self._circuits[name])
        return FlowControl.of(bucket, breaker)

    async def _lease(self, name: str, count: int, interval: float) -> float:
        swapped = await self.broker.kv_swap(
            self.broker.topology.rates_bucket, name, lease_change(count, interval)
        )
        self.stats.leases += 1
        self.stats.lease_tries += swapped.tries
        assert swapped.value is not None  # a lease always writes
        return lease_start(swapped.value, count, interval)

    async def _claim(self, name: str, claim: CircuitRecord, cooldown: float) -> CircuitRecord | None:
        bucket = self.broker.topology.health_bucket
        swapped = await self.broker.kv_swap(bucket, CIRCUIT + name, claim_change(claim, cooldown))
        self.stats.claims += 1
        if swapped.written:
            self._circuits[name] = claim
            return None
        return decode_record(swapped.value) or CircuitRecord(state="closed")

    def _publish_circuit(self, name: str, record: CircuitRecord) -> None:
        self._circuits[name] = record
        value = encode_record(record)
        bucket = self.broker.topology.health_bucket
        self._want(CIRCUIT + name, lambda: self.broker.kv_put(bucket, CIRCUIT + name, value))

    def _give_back(self, name: str, record: CircuitRecord) -> None:
        self._circuits[name] = record
        bucket, key = self.broker.topology.health_bucket, CIRCUIT + name
        change = give_back_change(self.process, record)

        async def give_back() -> None:
            await self.broker.kv_swap(bucket, key, change)

        self._want(key, give_back)

    # --- failing streaks ------------------------------------------------------------------------

    def failing_since(self, endpoint: str) -> float | None:
        """Since when every attempt to the endpoint failed, on any process (unix seconds)."""
        return self._failing.get(endpoint)

    def mark_failing(self, endpoint: str, since: float) -> None:
        """An attempt failed: start the streak, unless one is running (here or elsewhere)."""
        if endpoint in self._failing:
            return
        self._failing[endpoint] = since
        value = _encode(FailingRecord(since=since, by=self.process))

        async def create() -> None:
            bucket, key = self.broker.topology.health_bucket, FAILING + endpoint
            swapped = await self.broker.kv_swap(bucket, key, lambda now: value if now is None else None)
            if not swapped.written and swapped.value:  # an earlier streak, from another process
                with contextlib.suppress(msgspec.DecodeError):  # unreadable: as if absent
                    self._failing[endpoint] = _failing_decoder.decode(swapped.value).since

        self._want(FAILING + endpoint, create)

    def clear_failing(self, endpoint: str) -> None:
        """An attempt succeeded: the streak is over, everywhere."""
        if self._failing.pop(endpoint, None) is None:
            return
        self._want(FAILING + endpoint, lambda: self._delete(FAILING + endpoint))

    async def _delete(self, key: str) -> None:
        await self.broker.kv_delete(self.broker.topology.health_bucket, key)

    # --- running ---------------------------------------------------------------------------------

    async def run(
        self, stopping: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the health bucket and store this process's changes until `stopping`; started
        once the current circuits and streaks are known."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_set, stopping, nursery.cancel_scope)
                bucket = self.broker.topology.health_bucket
                await nursery.start(follow_bucket, self.broker, bucket, self._apply, log, "endpoint health")
                nursery.start_soon(self._write_forever)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_ON_STOP):
                await self._write_pending()

    def _want(self, key: str, write: Callable[[], Awaitable[None]]) -> None:
        self._writes[key] = write
        self._wake.set()

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not await self._write_pending():
                await trio.sleep(WRITE_RETRY)
                self._wake.set()  # what failed is still pending

    async def _write_pending(self) -> bool:
        """Store every pending wish; False if any failed. A wish stays pending until it is stored
        (or replaced by a newer one), so a write cut off by a shutdown is made by the last flush."""
        ok = True
        for key, write in list(self._writes.items()):
            try:
                await write()
            except Exception as exc:
                ok = False
                log.warning("could not store %s in the health bucket: %s; trying again", key, exc)
                continue
            self.stats.writes += 1
            if self._writes.get(key) is write:
                del self._writes[key]
        return ok

    def _apply(self, batch: list[KvUpdate], snapshot: bool) -> None:
        if snapshot:
            circuits = {name for name in self._circuits if CIRCUIT + name not in self._writes}
            for name in circuits - {u.key[len(CIRCUIT) :] for u in batch if u.key.startswith(CIRCUIT)}:
                self._follow_circuit(name, None)
            for name in [n for n in self._failing if FAILING + n not in self._writes]:
                del self._failing[name]
        for update in batch:
            if update.key in self._writes:
                continue  # a newer wish of this process is on its way
            if update.key.startswith(CIRCUIT):
                self._follow_circuit(update.key[len(CIRCUIT) :], decode_record(update.value))
            elif update.key.startswith(FAILING):
                self._follow_failing(update.key[len(FAILING) :], update.value)

    def _follow_circuit(self, name: str, record: CircuitRecord | None) -> None:
        if record is None:
            self._circuits.pop(name, None)
        else:
            self._circuits[name] = record
            if record.by == self.process:
                return  # this process's own transition, applied when it was made
        held = self._flows.get(name)
        if held is not None and isinstance(held.flow.breaker, SharedBreaker):
            held.flow.breaker.follow(record)

    def _follow_failing(self, name: str, value: bytes | None) -> None:
        if value is None:
            self._failing.pop(name, None)
            return
        with contextlib.suppress(msgspec.DecodeError):  # unreadable: as if absent
            self._failing[name] = _failing_decoder.decode(value).since
