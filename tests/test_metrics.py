"""`GET /metrics`: Prometheus text that parses, with counters matching what happened."""

from __future__ import annotations

from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support import NatsServer, Received, receiver, run_gateway
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
                    if samples.get(backlog) == 3 and samples.get(disabled) == 1:
                        break
                    await trio.sleep(0.2)
            await gw.http.post(f"{gw.url}/api/v1/endpoints/svc/enable", headers=auth)
            await rx.wait_for(3, timeout=15)
            with trio.fail_after(15):
                while True:
                    samples = _samples((await gw.http.get(f"{gw.url}/metrics")).text)
                    if samples.get(backlog) == 0 and samples.get(disabled) == 0:
                        break
                    await trio.sleep(0.2)


async def test_delivery_counters_match_what_the_receivers_saw(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    from tests.support import base_config

    def first_attempt_fails(request: Received, n: int) -> int:
        return 500 if request.headers["hookgate-attempt"] == "1" else 200

    async with (
        receiver() as ok,
        receiver(first_attempt_fails) as flaky,
        receiver(lambda r, n: 500) as dead,
    ):
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              ok: {{url: "{ok.url}/in"}}
              flaky: {{url: "{flaky.url}/in", retry: {{schedule: [100ms], jitter: 0}}}}
              dead: {{url: "{dead.url}/in", retry: {{schedule: [100ms, 100ms], jitter: 0}}}}
            routes:
              - {{from: [internal], to: [ok, flaky, dead]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            for n in range(4):
                assert (await gw.publish("x", {"n": n})).status_code == 202
            await ok.wait_for(4)
            await flaky.wait_for(8)
            await dead.wait_for(12)
            dead_total = ("hookgate_deliveries_total", (("endpoint", "dead"), ("outcome", "dead")))
            with trio.fail_after(10):
                while True:
                    samples = _samples((await gw.http.get(f"{gw.url}/metrics")).text)
                    if samples.get(dead_total) == 4:
                        break
                    await trio.sleep(0.05)

    def attempts(endpoint: str, outcome: str) -> float:
        key = ("hookgate_delivery_attempts_total", (("endpoint", endpoint), ("outcome", outcome)))
        return samples.get(key, 0)

    def deliveries(endpoint: str, outcome: str) -> float:
        return samples.get(("hookgate_deliveries_total", (("endpoint", endpoint), ("outcome", outcome))), 0)

    assert samples[("hookgate_events_stored_total", (("source", "internal"),))] == 4
    # What each receiver saw: every request is one attempt; the 2xx answers are the successes.
    answered_2xx = {
        "ok": len(ok.requests),
        "flaky": sum(1 for r in flaky.requests if r.headers["hookgate-attempt"] != "1"),
        "dead": 0,
    }
    for name, requests in {"ok": ok.requests, "flaky": flaky.requests, "dead": dead.requests}.items():
        total = sum(attempts(name, outcome) for outcome in ("succeeded", "retrying", "failed", "dead"))
        assert total == len(requests), name
        assert attempts(name, "succeeded") == answered_2xx[name] == deliveries(name, "succeeded"), name
    assert attempts("flaky", "retrying") == 4
    assert attempts("dead", "retrying") == 8 and attempts("dead", "dead") == 4
    assert deliveries("dead", "dead") == 4
    assert samples[("hookgate_dead_letters_total", (("endpoint", "dead"),))] == 4
    assert ("hookgate_dead_letters_total", (("endpoint", "ok"),)) not in samples
