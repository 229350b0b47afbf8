"""Replays: retry one delivery, recover an endpoint's deliveries in a time range, redrive dead letters.

A replayed delivery goes back on its endpoint's subject with the next attempt number and a fresh
retry schedule (`Delivery.series_start`), and a `requeued` marker goes to the delivery log. The
message id `replay:<delivery>:<attempt>` makes a replay idempotent: two replicas, or a double
click, replaying the same delivery at the same point store it once.

Recover and redrive run as jobs. A job's progress is kept in the log stream under
`<p>.log.jobs.<key>`, where the key is a hash of what it does, so any replica can answer a poll,
and asking for the same job while it runs returns that job instead of starting another one.
Starting is guarded by JetStream's expected-last-subject-sequence, so two replicas cannot both start
it. A job runs on the replica that accepted it; if that replica stops, the job stops updating and
is reported failed after `STALE_AFTER`, and can be asked for again (replays already done are not
repeated: they are no longer in the statuses a recover looks for, and the dead letters are gone).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec
import trio

from hookgate.broker import Broker, Commit, OutMsg
from hookgate.broker.records import (
    ACTIVE,
    DEAD_LETTER_STATUSES,
    RECOVERABLE,
    DeadLetter,
    DeliveryCreated,
    DeliveryMarker,
    dead_letter_decoder,
    entry_decoder,
)
from hookgate.log.query import DeliveryLog, DeliveryState, created_within, stored_by
from hookgate.plugin_kit.units import parse_time, rfc3339
from hookgate.types import Delivery, Event

log = logging.getLogger("hookgate.replay")

# A retry due this soon is left to fire by itself: pulling it forward could race its own firing.
DUE_ANYWAY = 1.0
PROGRESS_EVERY = 1.0
STALE_AFTER = 30.0
CHUNK = 256

_encode_json = msgspec.json.Encoder().encode
_encode = msgspec.msgpack.Encoder().encode


class ReplayError(Exception):
    """A replay that cannot be done; `status` and `code` are what the API answers."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


class Job(msgspec.Struct, kw_only=True):
    id: str
    kind: Literal["recover", "redrive"]
    endpoint: str
    since: str | None = None
    until: str | None = None
    statuses: list[str] = []
    state: Literal["running", "succeeded", "failed"] = "running"
    scanned: int = 0
    requeued: int = 0
    skipped: int = 0  # matched, but could not be replayed (event no longer retained)
    error: str | None = None
    started_at: str
    updated_at: str = ""  # RFC 3339, like the other times
    finished_at: str | None = None


class _StoredJob(Job, kw_only=True):
    """A job as stored: records written before `updated_at` was RFC 3339 hold unix seconds."""

    updated_at: str | float = ""  # type: ignore[assignment]


_job_decoder = msgspec.json.Decoder(_StoredJob)

Rebuild = Callable[[Event, str], Awaitable[Event]]


class Replayer:
    def __init__(
        self,
        broker: Broker,
        dlog: DeliveryLog,
        rebuild: Rebuild,
        endpoint_exists: Callable[[str], bool] = lambda name: True,
        endpoint_ordered: Callable[[str], bool] = lambda name: False,
    ):
        self.broker = broker
        self.t = broker.topology
        self.dlog = dlog
        self.rebuild = rebuild  # the event as an endpoint gets it now (its route's transform)
        self.endpoint_exists = endpoint_exists
        self.endpoint_ordered = endpoint_ordered
        self._nursery: trio.Nursery | None = None

    async def run(
        self, stopping: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the nursery jobs run in; jobs still running at shutdown stop (see STALE_AFTER)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await stopping.wait()
            nursery.cancel_scope.cancel()

    # --- one delivery ------------------------------------------------------------------------

    async def retry(self, delivery_id: str, *, now: bool = False) -> tuple[DeliveryState, int, bool]:
        """Re-enqueue one delivery: the attempt number it will be sent with, and whether that was
        a retrying delivery's next attempt pulled forward (`now`) rather than a new series."""
        state = await self.dlog.delivery_state(delivery_id)
        if state is None:
            raise ReplayError(404, "not_found", f"no delivery {delivery_id} (or it is past retention)")
        endpoint = state.created.endpoint
        if not self.endpoint_exists(endpoint):
            raise ReplayError(
                409,
                "endpoint_gone",
                f"delivery {delivery_id} was for endpoint {endpoint!r}, which no longer exists",
            )
        status = state.view.status
        if now and status == "retrying":
            return state, await self._pull_forward(state), True
        if now and status == "held":
            raise ReplayError(
                409,
                "endpoint_disabled",
                f"delivery {delivery_id} is held: endpoint {endpoint!r} is disabled; enable it, and its "
                "deliveries go on where they were",
            )
        if now and status not in ACTIVE:
            # Not a resend: a double click whose first request has been delivered already must
            # not send the delivery again.
            raise ReplayError(
                409,
                "not_retrying",
                f"delivery {delivery_id} is {status}: it has no attempt waiting to be sent now; retry "
                "it without now=true to send it again",
            )
        if status in ACTIVE:
            when = f"; next attempt at {state.view.next_attempt_at}" if state.view.next_attempt_at else ""
            hint = " (now=true sends that attempt at once)" if status == "retrying" else ""
            raise ReplayError(
                409,
                "delivery_active",
                f"delivery {delivery_id} is {status}{when}: it is already on its way{hint}",
            )
        attempt = await self.requeue(state.created, state.view.attempts, "retried through the API")
        return state, attempt, False

    async def _pull_forward(self, state: DeliveryState) -> int:
        """Send a retrying delivery's next attempt now instead of when it is due.

        That attempt waits as a scheduled message on its own subject. It is published to the
        endpoint now and the schedule removed in one step, refused by the server if the schedule
        is gone meanwhile (it fired, or another request or replica pulled it forward first), so
        the attempt is sent once. Its retry series goes on as it was.
        """
        created = state.created
        delivery_id, endpoint = created.delivery_id, created.endpoint
        attempt = state.view.attempts + 1
        subject = self.t.schedule_subject(endpoint, delivery_id, attempt)
        schedule = (await self.broker.last_msgs(self.t.deliveries_stream, [subject])).get(subject)
        if schedule is None and self.endpoint_ordered(endpoint):
            raise ReplayError(
                409,
                "ordered_endpoint",
                f"delivery {delivery_id} is the head of ordered endpoint {endpoint!r}, which retries it "
                "in place: it cannot be pulled forward",
            )
        on_its_way = ReplayError(
            409, "delivery_active", f"delivery {delivery_id}: its attempt {attempt} is being sent already"
        )
        due = Broker.due_at(schedule) if schedule is not None else None
        if schedule is None or (due is not None and due - time.time() < DUE_ANYWAY):
            raise on_its_way
        fired = await self.broker.fire_now(schedule)
        if not fired.ok:
            if "wrong last sequence" in (fired.error or ""):
                raise on_its_way
            raise ReplayError(503, "broker_unavailable", f"the retry could not be stored: {fired.error}")
        marker = DeliveryMarker(
            delivery_id=delivery_id,
            endpoint=endpoint,
            state="requeued",
            at=time.time(),
            attempts=attempt - 1,
            reason="pulled forward through the API",
        )
        stored = await self.broker.publish(
            OutMsg(self.t.marker_subject(endpoint, delivery_id), _encode_json(marker))
        )
        if not stored.ok:  # then the status says `retrying` until the attempt's own record arrives
            log.warning("delivery %s: could not record it was pulled forward: %s", delivery_id, stored.error)
        log.info(
            "delivery %s to %s: attempt %d pulled forward through the API", delivery_id, endpoint, attempt
        )
        return attempt

    async def requeue(self, created: DeliveryCreated, attempts: int, reason: str) -> int:
        """Put a delivery back in line with a fresh retry schedule; returns its next attempt number."""
        dead = await self.dlog.dead_letter(created.endpoint, created.delivery_id)
        if dead is not None:
            delivery = dead.delivery
        else:
            event = await self.dlog.stored_event(created.event_id)
            if event is None:
                raise ReplayError(
                    409,
                    "event_gone",
                    f"event {created.event_id} is no longer retained; delivery {created.delivery_id} "
                    "cannot be replayed",
                )
            delivery = Delivery(
                id=created.delivery_id,
                endpoint=created.endpoint,
                attempt=1,
                event=await self.rebuild(event, created.endpoint),
                created_at=created.created_at,
                routes=created.routes,
            )
        await self._enqueue(delivery, attempts, reason)
        return attempts + 1

    async def _enqueue(self, delivery: Delivery, attempts: int, reason: str) -> None:
        nxt = attempts + 1
        delivery = msgspec.structs.replace(delivery, attempt=nxt, series_start=nxt)
        marker = DeliveryMarker(
            delivery_id=delivery.id,
            endpoint=delivery.endpoint,
            state="requeued",
            at=time.time(),
            attempts=attempts,
            reason=reason,
        )
        results = await self.broker.commit(
            Commit(
                [
                    OutMsg(
                        self.t.delivery_subject(
                            delivery.endpoint, ordered=self.endpoint_ordered(delivery.endpoint)
                        ),
                        _encode(delivery),
                        {"Nats-Msg-Id": f"replay:{delivery.id}:{nxt}"},
                    ),
                    OutMsg(
                        self.t.marker_subject(delivery.endpoint, delivery.id),
                        _encode_json(marker),
                        {"Nats-Msg-Id": f"requeued:{delivery.id}:{nxt}"},
                    ),
                ]
            )
        )
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise ReplayError(503, "broker_unavailable", f"the replay could not be stored: {failed[0]}")
        # Replayed: it is no longer a dead letter (a redrive must not send it again).
        await self.broker.purge_subject(
            self.t.dead_stream, self.t.dead_subject(delivery.endpoint, delivery.id)
        )
        log.info("delivery %s to %s requeued as attempt %d: %s", delivery.id, delivery.endpoint, nxt, reason)

    # --- jobs --------------------------------------------------------------------------------

    async def start_recover(
        self, endpoint: str, since: float, until: float, statuses: list[str] | None
    ) -> tuple[Job, bool]:
        wanted = sorted(statuses or RECOVERABLE)
        job = Job(
            id="",
            kind="recover",
            endpoint=endpoint,
            since=rfc3339(since),
            until=rfc3339(until),
            statuses=wanted,
            started_at="",
        )
        return await self._start(job, lambda j: self._recover(j, since, until, frozenset(wanted)))

    async def start_redrive(self, endpoint: str) -> tuple[Job, bool]:
        job = Job(id="", kind="redrive", endpoint=endpoint, started_at="")
        return await self._start(job, self._redrive)

    async def job(self, job_id: str) -> Job | None:
        key = _job_key(job_id)
        if key is None:
            return None
        msgs, _ = await self.broker.scan(self.t.log_stream, [self.t.job_subject(key)], limit=10_000)
        found = None
        for m in msgs:
            job = _decode_job(m.data)
            if job is not None and job.id == job_id:
                found = job
        return _with_staleness(found) if found is not None else None

    async def _start(self, job: Job, work: Callable[[Job], Awaitable[None]]) -> tuple[Job, bool]:
        """Start the job unless the same one is running: (the job, whether it was started now)."""
        what = f"{job.kind}\0{job.endpoint}\0{job.since}\0{job.until}\0{','.join(job.statuses)}"
        key = hashlib.blake2b(what.encode(), digest_size=10).hexdigest()
        subject = self.t.job_subject(key)
        for _ in range(3):
            last = (await self.broker.last_msgs(self.t.log_stream, [subject])).get(subject)
            current = _decode_job(last.data) if last is not None else None
            if current is not None:
                current = _with_staleness(current)
                if current.state == "running":
                    return current, False
            now = time.time()
            job.id = f"job_{key}_{int(now * 1000):x}"
            job.started_at = job.updated_at = rfc3339(now)
            result = await self.broker.publish(
                OutMsg(
                    subject,
                    _encode_json(job),
                    # Only one replica wins the start: the others see the record it wrote.
                    {"Nats-Expected-Last-Subject-Sequence": str(last.seq if last is not None else 0)},
                )
            )
            if result.ok:
                assert self._nursery is not None, "Replayer.run() holds the jobs' nursery"
                self._nursery.start_soon(self._run_job, job, work)
                return job, True
            if "wrong last sequence" not in (result.error or ""):
                raise ReplayError(503, "broker_unavailable", f"the job could not be stored: {result.error}")
        raise ReplayError(409, "job_conflict", "another replica is starting the same job; poll again")

    async def _run_job(self, job: Job, work: Callable[[Job], Awaitable[None]]) -> None:
        try:
            await work(job)
            job.state = "succeeded"
        except Exception as exc:
            log.exception("%s job %s for %s failed", job.kind, job.id, job.endpoint)
            job.state = "failed"
            job.error = str(exc) or type(exc).__name__
        now = time.time()
        job.finished_at = rfc3339(now)
        await self._save(job, now)
        log.info(
            "%s job %s for %s %s: %d requeued, %d skipped, %d scanned",
            job.kind,
            job.id,
            job.endpoint,
            job.state,
            job.requeued,
            job.skipped,
            job.scanned,
        )

    async def _save(self, job: Job, now: float | None = None) -> None:
        job.updated_at = rfc3339(time.time() if now is None else now)
        key = _job_key(job.id)
        assert key is not None, "ids of started jobs are job_<key>_<time>"
        await self.broker.publish(OutMsg(self.t.job_subject(key), _encode_json(job)))

    async def _recover(self, job: Job, since: float, until: float, statuses: frozenset[str]) -> None:
        if statuses <= DEAD_LETTER_STATUSES:
            # Failed and dead deliveries are exactly the dead letters: read those, not the whole log.
            def wanted(letter: DeadLetter) -> bool:
                outcome = "failed" if letter.last_attempt.outcome == "failed" else "dead"
                return created_within(letter.delivery.created_at, since, until) and outcome in statuses

            await self._replay_dead_letters(job, wanted, since)
            return
        subjects = [self.t.delivery_log_subject(job.endpoint, "*")]
        seq, saved, stop = 0, time.monotonic(), stored_by(until) or until
        while True:
            msgs, more = await self.broker.scan(
                self.t.log_stream,
                subjects,
                start_seq=seq,
                start_time=since if seq == 0 else None,
                limit=CHUNK,
            )
            in_range = [m for m in msgs if m.timestamp <= stop]
            created = []
            for m in in_range:
                try:
                    entry = entry_decoder.decode(m.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if isinstance(entry, DeliveryCreated) and created_within(entry.created_at, since, until):
                    created.append(entry)
            job.scanned += len(created)
            for c, view in zip(created, await self.dlog.delivery_views(created), strict=True):
                if view.status not in statuses:
                    continue
                try:
                    await self.requeue(c, view.attempts, f"recovered by job {job.id}")
                    job.requeued += 1
                except ReplayError as exc:
                    if exc.status != 409:
                        raise
                    job.skipped += 1
            if time.monotonic() - saved >= PROGRESS_EVERY:
                saved = time.monotonic()
                await self._save(job)
            if not msgs or len(in_range) < len(msgs) or not more:
                return
            seq = msgs[-1].seq + 1

    async def _redrive(self, job: Job) -> None:
        await self._replay_dead_letters(job, lambda letter: True)

    async def _replay_dead_letters(
        self, job: Job, wanted: Callable[[DeadLetter], bool], since: float | None = None
    ) -> None:
        """Requeue the endpoint's dead letters that `wanted` picks (each removed once requeued)."""
        subjects = [self.t.dead_subject(job.endpoint, "*")]
        seq, saved = 0, time.monotonic()
        done: set[str] = set()
        while True:
            msgs, more = await self.broker.scan(
                self.t.dead_stream,
                subjects,
                start_seq=seq,
                # A delivery dies after it was created: nothing stored before `since` can match.
                start_time=since if seq == 0 else None,
                limit=CHUNK,
            )
            for m in msgs:
                job.scanned += 1
                try:
                    letter = dead_letter_decoder.decode(m.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    job.skipped += 1
                    continue
                if letter.delivery.id in done or not wanted(letter):
                    continue  # not asked for, or an older dead letter of one already requeued
                done.add(letter.delivery.id)
                await self._enqueue(letter.delivery, letter.last_attempt.attempt, f"{job.kind} job {job.id}")
                job.requeued += 1
            if time.monotonic() - saved >= PROGRESS_EVERY:
                saved = time.monotonic()
                await self._save(job)
            if not msgs or not more:
                return
            seq = msgs[-1].seq + 1


def _job_key(job_id: str) -> str | None:
    """The key in a job id (`job_<key>_<start time>`): its subject in the log stream."""
    parts = job_id.split("_")
    return parts[1] if len(parts) == 3 and parts[0] == "job" and parts[1].isalnum() else None


def _decode_job(data: bytes) -> Job | None:
    try:
        stored = _job_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    fields = msgspec.structs.asdict(stored)
    if not isinstance(stored.updated_at, str):
        fields["updated_at"] = rfc3339(stored.updated_at)
    return Job(**fields)


def _updated(job: Job) -> float:
    try:
        return parse_time(job.updated_at)
    except ValueError:
        return 0.0  # unreadable: as old as can be


def _with_staleness(job: Job) -> Job:
    """A running job whose replica stopped updating it is reported failed."""
    if job.state == "running" and time.time() - _updated(job) > STALE_AFTER:
        return msgspec.structs.replace(
            job, state="failed", error="the replica running it stopped before it finished"
        )
    return job
