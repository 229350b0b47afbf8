"""An endpoint's run of failed attempts: operational events, and disabling after `disable_after`."""

from __future__ import annotations

import time

from hookgate.egress.send import Result
from hookgate.egress.state import EndpointStates
from hookgate.plugin_kit.units import rfc3339
from hookgate.types import Attempt


class FailureTracker:
    """Follows one endpoint's outcomes, for its worker."""

    def __init__(self, states: EndpointStates, endpoint: str, disable_after: float | None):
        self.states = states
        self.endpoint = endpoint
        self.disable_after = disable_after
        self.failing_since: float | None = None  # start of the current run of failed attempts

    async def track(self, result: Result, attempt: Attempt) -> None:
        """Operational events, and disabling after `disable_after` of continuous failure."""
        states = self.states
        name = self.endpoint
        if attempt.outcome in ("dead", "failed"):
            states.emit(
                "delivery.exhausted", name, delivery_id=attempt.delivery_id, event_id=attempt.event_id
            )
        if result.ok:
            self.failing_since = None
            return
        now = time.time()
        if self.failing_since is None:
            self.failing_since = now
            states.emit(
                "delivery.failing",
                name,
                delivery_id=attempt.delivery_id,
                event_id=attempt.event_id,
                reason=attempt.error or "",
            )
        elif (
            self.disable_after is not None
            and now - self.failing_since >= self.disable_after
            and not states.disabled(name)
        ):
            await states.set(
                name, True, f"failing continuously since {rfc3339(self.failing_since)} ({attempt.error})"
            )
