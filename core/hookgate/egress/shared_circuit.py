"""An endpoint's circuit breaker shared by every process and replica through JetStream KV.

Each process counts the outcomes it sees over the breaker's window (no write per delivery); the
first whose window trips opens the circuit for all of them by storing `circuit.<endpoint>` in the
health bucket, which every process follows with one watch. Once the cooldown is over, the process
that wants to probe claims the probe with compare-and-set, so one probe is out at a time across
all processes; the probe's outcome (closed, or open for another cooldown) is stored the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec
import trio

from hookgate.config.flow import CircuitBreakerConfig
from hookgate.egress.flow import CircuitBreaker, CircuitState, OnChange

log = logging.getLogger("hookgate.flow")


class CircuitRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The value of `circuit.<endpoint>` in the health bucket; times are unix seconds."""

    state: Literal["open", "half_open", "closed"]
    opened_at: float = 0.0  # open and half-open: when it opened
    probe_until: float = 0.0  # half-open: the probe's claim holds until then
    by: str = ""  # the process that stored it


encode_record = msgspec.json.Encoder().encode
_decoder = msgspec.json.Decoder(CircuitRecord)


def decode_record(value: bytes | None) -> CircuitRecord | None:
    if not value:
        return None
    try:
        return _decoder.decode(value)
    except msgspec.DecodeError:
        return None


# Processes on different hosts disagree on the time by this much at most (NTP does far better):
# a cooldown or a claim that ran out by this process's clock is taken as over.
CLOCK_SLACK = 0.25


def give_back_change(process: str, record: CircuitRecord) -> Callable[[bytes | None], bytes | None]:
    """Store `record` in place of this process's claim, only if the claim is still what is stored."""

    def change(current: bytes | None) -> bytes | None:
        stored = decode_record(current)
        if stored is None or stored.state != "half_open" or stored.by != process:
            return None
        return encode_record(record)

    return change


def claim_change(claim: CircuitRecord, cooldown: float) -> Callable[[bytes | None], bytes | None]:
    """The compare-and-set step of claiming the probe: only while nobody else holds a live claim,
    the circuit is not closed, and its cooldown is over (run on the nats loop: pure)."""

    def change(current: bytes | None) -> bytes | None:
        now = time.time() + CLOCK_SLACK
        record = decode_record(current)
        if record is None:
            return encode_record(claim)
        if record.state == "closed":
            return None
        if record.state == "open" and record.opened_at + cooldown > now:
            return None
        if record.state == "half_open" and record.by != claim.by and record.probe_until > now:
            return None
        return encode_record(claim)

    return change


class CircuitShare:
    """What a SharedBreaker needs of the process's shared limits for its endpoint."""

    def __init__(
        self,
        process: str,
        publish: Callable[[CircuitRecord], None],
        claim: Callable[[CircuitRecord, float], Awaitable[CircuitRecord | None]],
        give_back: Callable[[CircuitRecord], None],
    ):
        self.process = process  # this process's id in the records it stores
        self.publish = publish  # store a record, without waiting
        # Claim the probe: None once claimed, else the record that stands in the way.
        self.claim = claim
        # Store this record instead of our claim, if the claim is still there, without waiting.
        self.give_back = give_back


class SharedBreaker(CircuitBreaker):
    """A CircuitBreaker whose transitions every process sharing the endpoint follows."""

    def __init__(
        self,
        config: CircuitBreakerConfig,
        share: CircuitShare,
        *,
        on_change: OnChange | None = None,
        probe_timeout: float | None = None,
    ):
        super().__init__(config, on_change=on_change, probe_timeout=probe_timeout)
        self.share = share
        self._applying = False  # following another process: store nothing
        self._own_probe = False  # half-open: the probe out is this process's

    def follow(self, record: CircuitRecord | None) -> None:
        """Take on a record another process stored (None: deleted, as good as closed)."""
        self._applying = True
        try:
            self._follow(record)
        finally:
            self._applying = False

    def _follow(self, record: CircuitRecord | None) -> None:
        if record is None or record.state == "closed":
            if self._state is not CircuitState.CLOSED:
                self._own_probe = False
                self._probe_since = None
                self._close()
                self._wake_waiters()
            return
        opened_at = self._local(record.opened_at)
        if record.state == "open":
            # The opening this process knows already (open, or half-open after its cooldown)
            # stays as it is; a different one starts its own cooldown.
            if self._opened_at is None or abs(self._opened_at - opened_at) > 1e-3:
                self._own_probe = False
                self._probe_since = None
                self._opened_at = opened_at
                self._clear_window()
                self._set_state(CircuitState.OPEN)
                self._wake_waiters()
            elif (
                self._state is CircuitState.HALF_OPEN
                and not self._own_probe
                and self._probe_since is not None
            ):
                self._probe_since = None  # the other process gave its probe back: probe again
                self._wake_waiters()
            return
        # half-open: another process holds the probe until `probe_until`.
        self._own_probe = False
        self._opened_at = opened_at
        self._clear_window()
        self._probe_since = self._local(record.probe_until) - self.probe_timeout
        self._set_state(CircuitState.HALF_OPEN)
        self._wake_waiters()

    async def _claim_probe(self) -> bool:
        opened_at = self._opened_at if self._opened_at is not None else self._clock()
        claim = CircuitRecord(
            state="half_open",
            opened_at=self._unix(opened_at),
            probe_until=time.time() + self.probe_timeout,
            by=self.share.process,
        )
        try:
            standing = await self.share.claim(claim, self.cooldown)
        except Exception as exc:
            # Better one probe per process than none: the broker is down or slow.
            log.warning("circuit breaker: cannot claim the probe (%s); probing from here", exc)
            standing = None
        except BaseException:
            self._give_back()  # cancelled: the claim may have been stored all the same
            self._probe_since = None  # and the next caller claims again
            self._wake_waiters()
            raise
        if standing is None:
            self._own_probe = True
            return True
        self.follow(standing)
        if self._state is CircuitState.CLOSED:
            return True  # closed meanwhile by another process's probe: admitted as any request
        if self._state is CircuitState.HALF_OPEN and self._probe_since is None:
            self._probe_since = self._clock()  # our claim lost to a change not yet seen: wait
        return False

    def record(self, success: bool) -> None:
        self._advance(self._clock())
        if self._state is CircuitState.HALF_OPEN and not self._own_probe:
            return  # a request from before the circuit opened; another process's probe decides
        self._own_probe = False
        super().record(success)

    def release(self) -> None:
        self._advance(self._clock())
        if self._state is CircuitState.HALF_OPEN and not self._own_probe:
            return  # the probe out is another process's: only its outcome frees it
        if self._own_probe and self._state is CircuitState.HALF_OPEN:
            self._give_back()  # sent nothing: another process may probe at once
        self._own_probe = False
        super().release()

    def _give_back(self) -> None:
        """Turn this process's claim back into the open circuit it claimed, for the others."""
        local = self._opened_at if self._opened_at is not None else self._clock() - self.cooldown
        opened_at = self._unix(local)
        self.share.give_back(CircuitRecord(state="open", opened_at=opened_at, by=self.share.process))

    def _set_state(self, new: CircuitState) -> None:
        old = self._state
        super()._set_state(new)
        if self._applying or old is new:
            return
        if new is CircuitState.OPEN and self._opened_at is not None:
            opened_at = self._unix(self._opened_at)
            self.share.publish(CircuitRecord(state="open", opened_at=opened_at, by=self.share.process))
        elif new is CircuitState.CLOSED:
            self.share.publish(CircuitRecord(state="closed", by=self.share.process))
        # half-open by time alone: every process gets there by itself.

    def _wake_waiters(self) -> None:
        """Waiters on a probe wake and ask again: the state changed under them."""
        done, self._probe_done = self._probe_done, trio.Event()
        done.set()

    def _local(self, unix: float) -> float:
        return self._clock() + (unix - time.time())

    def _unix(self, local: float) -> float:
        return time.time() + (local - self._clock())
