"""An endpoint's run of failed attempts: operational events, and disabling after `disable_after`."""

from __future__ import annotations

import time

from hookgate.egress.send import Result
from hookgate.egress.state import EndpointStates
from hookgate.plugin_kit.units import rfc3339
from hookgate.types import Attempt


class FailureTracker:
    """Follows one endpoint's outcomes, for its worker. The streak's start is shared with every
    process through the health bucket (`SharedLimits`), so a restart does not reset the clock and
    replicas failing by turns count as one endpoint failing."""

    def __init__(self, states: EndpointStates, endpoint: str, disable_after: float | None):
        self.states = states
        self.limits = states.limits
        self.endpoint = endpoint
        self.disable_after = disable_after

    @property
    def failing_since(self) -> float | None:
        """The start of the current run of failed attempts (unix seconds), on any process."""
        return self.limits.failing_since(self.endpoint)

    async def track(self, result: Result, attempt: Attempt) -> None:
        """Operational events, and disabling after `disable_after` of continuous failure."""
        states = self.states
        name = self.endpoint
        if attempt.outcome in ("dead", "failed"):
            states.emit(
                "delivery.exhausted", name, delivery_id=attempt.delivery_id, event_id=attempt.event_id
            )
        if result.ok:
            self.limits.clear_failing(name)
            return
        now = time.time()
        since = self.limits.failing_since(name)
        if since is None:
            self.limits.mark_failing(name, now)
            states.emit(
                "delivery.failing",
                name,
                delivery_id=attempt.delivery_id,
                event_id=attempt.event_id,
                reason=attempt.error or "",
            )
        elif (
            self.disable_after is not None and now - since >= self.disable_after and not states.disabled(name)
        ):
            await states.set(name, True, f"failing continuously since {rfc3339(since)} ({attempt.error})")
