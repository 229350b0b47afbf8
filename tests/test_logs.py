"""Structured logs: `log.format: json` writes one JSON object per line carrying event and delivery ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from hookgate.logs import JsonFormatter
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
