"""`GET /metrics`: Prometheus text that parses, with counters matching what happened."""

from __future__ import annotations

from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support import NatsServer, receiver, run_gateway
from tests.test_ingress import acme_config, signed


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_count_requests_rejections_events_and_attempts(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx, run_gateway(tmp_path, acme_config(nats_server.url, rx.url)) as gw:
        for delivery in ("m-1", "m-2", "m-1"):  # the third is a duplicate
            body = f'{{"d": "{delivery}"}}'.encode()
            response = await gw.http.post(
                f"{gw.url}/webhooks/acme", content=body, headers=signed(body, delivery)
            )
            assert response.status_code == 202
        bad = await gw.http.post(
            f"{gw.url}/webhooks/acme", content=b"{}", headers=signed(b"{}", "x", secret="no")
        )
        assert bad.status_code == 401
        await gw.http.post(f"{gw.url}/webhooks/nope", content=b"{}")
        await rx.wait_for(2)
        with trio.fail_after(10):
            while True:
                metrics = await gw.http.get(f"{gw.url}/metrics")
                samples = _samples(metrics.text)
                if (
                    samples.get(
                        (
                            "hookgate_delivery_attempts_total",
                            (("endpoint", "internal"), ("outcome", "succeeded")),
                        )
                    )
                    == 2
                ):
                    break
                await trio.sleep(0.05)
    assert metrics.headers["content-type"].startswith("text/plain")
    assert samples[("hookgate_ingress_requests_total", (("source", "acme"), ("status", "202")))] == 3
    assert samples[("hookgate_ingress_requests_total", (("source", "acme"), ("status", "401")))] == 1
    assert samples[("hookgate_ingress_requests_total", (("source", "(unknown)"), ("status", "404")))] == 1
    assert (
        samples[("hookgate_ingress_rejections_total", (("reason", "invalid_signature"), ("source", "acme")))]
        == 1
    )
    assert samples[("hookgate_events_stored_total", (("source", "acme"),))] == 2
    assert samples[("hookgate_events_duplicate_total", (("source", "acme"),))] == 1
    assert samples[("hookgate_delivery_attempt_seconds_count", (("endpoint", "internal"),))] == 2
    assert len(rx.requests) == 2


async def test_backlog_and_disabled_gauges_follow_the_endpoint(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    from tests.support import base_config

    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in"}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            auth = {"Authorization": "Bearer test-token"}
            assert (
                await gw.http.post(f"{gw.url}/api/v1/endpoints/svc/disable", headers=auth)
            ).status_code == 200
            for n in range(3):
                await gw.publish("x", {"n": n})
            backlog = ("hookgate_endpoint_backlog", (("endpoint", "svc"),))
            disabled = ("hookgate_endpoint_disabled", (("endpoint", "svc"),))
            with trio.fail_after(15):
                while True:
                    samples = _samples((await gw.http.get(f"{gw.url}/metrics")).text)
                    print("DBG1", samples.get(backlog), samples.get(disabled))
                    if samples.get(backlog) == 3 and samples.get(disabled) == 1:
                        break
                    await trio.sleep(0.2)
            await gw.http.post(f"{gw.url}/api/v1/endpoints/svc/enable", headers=auth)
            await rx.wait_for(3, timeout=15)
            with trio.fail_after(15):
                while True:
                    samples = _samples((await gw.http.get(f"{gw.url}/metrics")).text)
                    print("DBG", samples.get(backlog), samples.get(disabled))
                    if samples.get(backlog) == 0 and samples.get(disabled) == 0:
                        break
                    await trio.sleep(0.2)
