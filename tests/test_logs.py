"""Structured logs: `log.format: json` writes one JSON object per line carrying event and delivery ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

from hookgate.observe.logs import JsonFormatter, Summary
from tests.support import NatsServer, base_config, receiver, run_gateway


def test_json_formatter_carries_context_fields_and_errors() -> None:
    record = logging.LogRecord("hookgate.x", logging.WARNING, __file__, 1, "failed %s", ("d1",), None)
    record.delivery_id = "dlv_1"
    record.endpoint = "billing"
    line = JsonFormatter().format(record)
    data = json.loads(line)
    assert data["level"] == "warning" and data["logger"] == "hookgate.x"
    assert data["message"] == "failed d1"
    assert data["delivery_id"] == "dlv_1" and data["endpoint"] == "billing"
    assert data["time"].endswith("Z")


async def test_failed_deliveries_log_their_ids(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hookgate")
    async with receiver(lambda request, n: 500 if n == 0 else 200) as rx:
        text = base_config(
            nats_server.url,
            f"""
            log: {{format: json, level: info}}
            endpoints:
              svc: {{url: "{rx.url}/in", retry: {{schedule: [100ms], jitter: 0}}}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            published = await gw.publish("x", {})
            await rx.wait_for(2)
    (failed,) = [r for r in caplog.records if "failed (attempt 1" in r.getMessage()]
    data = json.loads(JsonFormatter().format(failed))
    assert data["event_id"] == published.json()["id"]
    assert data["delivery_id"] == rx.requests[0].headers["hookgate-delivery-id"]
    assert data["endpoint"] == "svc" and data["attempt"] == 1


def test_summary_logs_the_first_at_once_and_then_one_count_per_key_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    summary = Summary(logging.getLogger("hookgate.test"), logging.WARNING)
    with caplog.at_level(logging.WARNING, logger="hookgate.test"):
        for _ in range(1000):
            summary.note("a", "{count} more a", first="first a")
        for _ in range(10):
            summary.note("b", "{count} more b")
        summary.flush()  # an interval ends
        for _ in range(5):
            summary.note("a", "{count} more a", first="first a")  # still quiet: counted only
        summary.flush()
        summary.flush()  # nothing since: no line, and "a" is forgotten
        summary.note("a", "{count} more a", first="first a")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["first a", "1 more b", "999 more a", "9 more b", "5 more a", "first a"]


async def test_summary_run_flushes_every_interval_and_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    summary = Summary(logging.getLogger("hookgate.test"), logging.WARNING, interval=0.05)
    stopping = trio.Event()
    with caplog.at_level(logging.WARNING, logger="hookgate.test"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(summary.run, stopping)
            summary.note("k", "{count} k")
            summary.note("k", "{count} k")
            with trio.fail_after(5):
                while len(caplog.records) < 2:
                    await trio.sleep(0.01)
            summary.note("k", "{count} k")
            stopping.set()
    assert [r.getMessage() for r in caplog.records] == ["1 k", "1 k", "1 k"]
