"""The SSRF guard in the delivery path, and route filters in the router, through the real gateway."""

from __future__ import annotations

from pathlib import Path

import msgspec
import trio

from tests.support import NatsServer, attempt_records, base_config, receiver, run_gateway, stream_messages

LOOPBACK_ALLOWED = '  allow_networks: ["127.0.0.0/8", "::1/128"]   # receivers run on loopback\n'


async def _attempts(nats_url: str, count: int) -> list[dict]:
    with trio.fail_after(10):
        while True:
            msgs = await attempt_records(nats_url)
            if len(msgs) >= count:
                return [msgspec.json.decode(m.data) for m in msgs]
            await trio.sleep(0.05)


async def test_private_targets_are_refused_by_default_and_not_retried(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx:
        port = rx.port
        targets = {
            "loopback": f"http://127.0.0.1:{port}/in",
            "named": f"http://localhost:{port}/in",
            "private": "http://10.0.0.1/in",
            "metadata": "http://169.254.169.254/latest/meta-data/",
        }
        endpoints = "".join(
            f"  {name}: {{url: {url}, retry: {{schedule: [100ms, 100ms]}}}}\n"
            for name, url in targets.items()
        )
        text = base_config(
            nats_server.url,
            f"endpoints:\n{endpoints}routes:\n  - {{from: [internal], to: [{', '.join(targets)}]}}\n",
        ).replace(LOOPBACK_ALLOWED, "  allow_networks: []\n")
        async with run_gateway(tmp_path, text) as gw:
            await gw.publish("x", {})
            attempts = await _attempts(nats_server.url, 4)
            dead = await stream_messages(nats_server.url, "HOOKGATE_DEAD")
    assert rx.requests == []
    assert {a["endpoint"] for a in attempts} == set(targets)
    for attempt in attempts:
        assert attempt["error_kind"] == "ssrf_refused", attempt
        assert attempt["outcome"] == "failed" and attempt["attempt"] == 1
        assert "egress.allow_networks" in attempt["error"]
    assert len(dead) == 4


async def test_allowlisted_loopback_targets_are_delivered(tmp_path: Path, nats_server: NatsServer) -> None:
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              loopback: {{url: "http://127.0.0.1:{rx.port}/in"}}
              named: {{url: "http://localhost:{rx.port}/in"}}
            routes:
              - {{from: [internal], to: [loopback, named]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            await gw.publish("x", {})
            got = await rx.wait_for(2)
    assert sorted(r.headers["host"] for r in got) == sorted([f"127.0.0.1:{rx.port}", f"localhost:{rx.port}"])


async def test_route_filters_select_events_by_body_and_headers(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as big, receiver() as eu:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              big: {{url: "{big.url}/in"}}
              eu: {{url: "{eu.url}/in"}}
            routes:
              - name: big-invoices
                from: [internal]
                filter: {{"amount": {{$gte: 1000}}, "lines.sku": {{$in: [A, B]}}}}
                to: [big]
              - name: eu
                from: [internal]
                filter:
                  $or:
                    - {{"customer.country": {{$in: [DE, FR]}}}}
                    - {{"customer.vat": {{$exists: true}}}}
                to: [eu]
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            await gw.publish("invoice", {"n": 1, "amount": 5000, "lines": [{"sku": "Z"}, {"sku": "B"}]})
            await gw.publish("invoice", {"n": 2, "amount": 5000, "lines": [{"sku": "Z"}]})
            await gw.publish("invoice", {"n": 3, "amount": 10, "customer": {"country": "FR"}})
            await gw.publish("invoice", {"n": 4, "amount": "5000", "customer": {"vat": "x"}})
            await big.wait_for(1)
            await eu.wait_for(2)
            with trio.move_on_after(0.5):
                await big.wait_for(2)
    assert [r.json()["data"]["n"] for r in big.requests] == [1]
    assert sorted(r.json()["data"]["n"] for r in eu.requests) == [3, 4]


async def test_deliveries_go_through_the_configured_forward_proxy(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    from tests.test_transport_proxy import proxy_server

    async with receiver() as rx, proxy_server() as proxy:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              proxied: {{url: "http://localhost:{rx.port}/in"}}
              direct: {{url: "http://127.0.0.1:{rx.port}/direct", proxy: ""}}
            routes:
              - {{from: [internal], to: [proxied, direct]}}
            """,
        ).replace("egress:\n", f"egress:\n  proxy: {proxy.url}\n")
        async with run_gateway(tmp_path, text) as gw:
            await gw.publish("x", {})
            got = await rx.wait_for(2)
    assert sorted(r.path for r in got) == ["/direct", "/in"]
    (seen,) = proxy.seen  # only the proxied endpoint went through it, vetted address in the line
    assert seen.line.startswith(f"POST http://127.0.0.1:{rx.port}/in ".encode()) or seen.line.startswith(
        f"POST http://[::1]:{rx.port}/in ".encode()
    )
    assert seen.headers[b"host"] == f"localhost:{rx.port}".encode()


def test_a_bad_proxy_url_is_a_config_error(tmp_path: Path) -> None:
    from hookgate.config import ConfigError, loads
    from hookgate.plugin_host.hooks import Hooks

    try:
        loads("egress:\n  proxy: socks5://user:pw@proxy:1080\n", Hooks().registry, file="h.yaml", env={})
    except ConfigError as exc:
        (problem,) = exc.problems
        assert str(problem).startswith("h.yaml:2: $.egress.proxy: ")
        assert "pw" not in str(problem)
    else:
        raise AssertionError("a socks proxy URL was accepted")
