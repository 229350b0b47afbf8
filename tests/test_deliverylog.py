"""How a delivery's status follows from its last marker and its last attempt."""

from __future__ import annotations

from hookgate.broker.records import DeliveryMarker, derive_status, event_key
from hookgate.types import Attempt


def _attempt(number: int, outcome: str, next_at: float | None = None) -> Attempt:
    return Attempt(
        delivery_id="dlv_1",
        event_id="evt_1",
        endpoint="svc",
        attempt=number,
        started_at=100.0 + number,
        latency=0.5,
        outcome=outcome,  # type: ignore[arg-type]
        next_attempt_at=next_at,
    )


def _marker(state: str, attempts: int) -> DeliveryMarker:
    return DeliveryMarker(delivery_id="dlv_1", endpoint="svc", state=state, at=200.0, attempts=attempts)  # type: ignore[arg-type]


def test_no_record_but_creation_is_pending() -> None:
    derived = derive_status(None, None, disabled=False)
    assert (derived.status, derived.attempts) == ("pending", 0)


def test_attempt_outcomes_map_to_statuses() -> None:
    assert derive_status(None, _attempt(1, "succeeded"), disabled=False).status == "succeeded"
    retrying = derive_status(None, _attempt(2, "retrying", next_at=300.0), disabled=False)
    assert (retrying.status, retrying.attempts, retrying.next_attempt_at) == ("retrying", 2, 300.0)
    assert derive_status(None, _attempt(8, "dead"), disabled=False).status == "dead"
    assert derive_status(None, _attempt(1, "failed"), disabled=False).status == "failed"


def test_delivering_marker_is_superseded_by_the_attempt_it_announced() -> None:
    # The marker for attempt 2 may be stored after attempt 2's record: the numbers decide.
    assert derive_status(_marker("delivering", 2), _attempt(1, "retrying"), disabled=False).status == (
        "delivering"
    )
    assert derive_status(_marker("delivering", 2), _attempt(2, "succeeded"), disabled=False).status == (
        "succeeded"
    )


def test_requeued_marker_wins_over_the_attempt_before_it() -> None:
    requeued = derive_status(_marker("requeued", 3), _attempt(3, "dead"), disabled=False)
    assert (requeued.status, requeued.attempts) == ("pending", 3)
    assert derive_status(_marker("requeued", 3), _attempt(4, "succeeded"), disabled=False).status == (
        "succeeded"
    )


def test_waiting_deliveries_of_a_disabled_endpoint_are_held() -> None:
    assert derive_status(None, None, disabled=True).status == "held"
    assert derive_status(None, _attempt(1, "retrying", 300.0), disabled=True).status == "held"
    assert derive_status(None, _attempt(1, "succeeded"), disabled=True).status == "succeeded"


def test_event_keys_are_subject_tokens() -> None:
    key = event_key("order.1:created@x")
    assert key.isalnum() and key == event_key("order.1:created@x") != event_key("order.2")
