"""The operator commands (`hookgate deliveries`, `retry`, `recover`, `send`, ...) against a real
gateway on a real nats-server, with loopback receivers.

The CLI is synchronous and the gateway runs in the test's trio loop, so in-process calls run
`hookgate.cli.entry.main` in a worker thread; the connection and error cases run it as a subprocess,
as users do.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from hookgate.cli import client, commands, tables
from hookgate.cli.entry import main
from hookgate.cli.progress import JobProgress
from hookgate.config import ServerConfig, TLSFiles
from tests.support import (
    Gateway,
    NatsServer,
    Received,
    base_config,
    hookgate_command,
    receiver,
    run_gateway,
)
from tests.test_cli import clean_env

AUTH = {"Authorization": "Bearer test-token"}


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def hg(capsys: pytest.CaptureFixture[str], gw: Gateway, *args: str) -> Result:
    """`hookgate ARGS --url <gateway> --token test-token`, in-process (in a thread)."""
    argv = [*args, "--url", gw.url, "--token", "test-token"]
    code = await trio.to_thread.run_sync(lambda: main(argv))
    out, err = capsys.readouterr()
    return Result(code, out, err)


async def hg_process(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """`hookgate ARGS` as a subprocess, with a clean environment plus `env`."""
    done = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            hookgate_command(*args),
            capture_output=True,
            text=True,
            env=clean_env(**(env or {})),
            cwd=cwd,
            timeout=60,
        )
    )
    return Result(done.returncode, done.stdout, done.stderr)


def _config(nats_url: str, ok: str, flaky: str, dead: str) -> str:
    return base_config(
        nats_url,
        f"""
        endpoints:
          ok: {{url: "{ok}/in"}}
          flaky: {{url: "{flaky}/in", retry: {{schedule: [100ms], jitter: 0}}}}
          dead: {{url: "{dead}/in", retry: {{schedule: [100ms], jitter: 0}}}}
        routes:
          - {{from: [internal], types: ["order.*"], to: [ok, flaky, dead]}}
        """,
    )


def _first_attempt_fails(request: Received, n: int) -> int:
    return 500 if request.headers["hookgate-attempt"] == "1" else 200


async def _until(gw: Gateway, path: str, done: Callable[[Any], bool], **params: Any) -> Any:
    """Poll the API until `done` holds: the log is written without waiting on deliveries."""
    with trio.fail_after(15):
        while True:
            response = await gw.http.get(f"{gw.url}/api/v1{path}", params=params, headers=AUTH)
            assert response.status_code == 200, response.text
            if done(response.json()):
                return response.json()
            await trio.sleep(0.05)


def _settled(count: int) -> Callable[[Any], bool]:
    def done(page: Any) -> bool:
        rows = page["data"]
        return len(rows) == count and all(d["status"] in ("succeeded", "dead") for d in rows)

    return done


async def test_deliveries_and_attempts_after_a_mix_of_outcomes(
    tmp_path: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    async with (
        receiver() as ok,
        receiver(_first_attempt_fails) as flaky,
        receiver(lambda r, n: 500) as dead,
        run_gateway(tmp_path, _config(nats_server.url, ok.url, flaky.url, dead.url)) as gw,
    ):
        # `hookgate send`: inline JSON, a file, and stdin.
        (tmp_path / "order.json").write_text('{"n": 1}')
        sent = [
            await hg(capsys, gw, "send", "order.created", "--data", '{"n": 0}', "--id", "order-0"),
            await hg(capsys, gw, "send", "order.created", "--data", f"@{tmp_path / 'order.json'}", "--json"),
        ]
        piped = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                hookgate_command("send", "order.created", "--data", "-", "--id", "order-2", "--url", gw.url),
                input='{"n": 2}',
                capture_output=True,
                text=True,
                env=clean_env(HOOKGATE_API_TOKEN="test-token"),
                timeout=60,
            )
        )
        await ok.wait_for(3)
        rows = (await _until(gw, "/deliveries", _settled(9)))["data"]

        everything = await hg(capsys, gw, "deliveries", "--json", "--all")
        listed = await hg(capsys, gw, "deliveries")
        paged = await hg(capsys, gw, "deliveries", "--limit", "2", "--all", "--json")
        first_page = await hg(capsys, gw, "deliveries", "--limit", "2")
        cursor = re.search(r"--cursor (\S+)", first_page.err)
        assert cursor is not None, first_page.err
        second_page = await hg(capsys, gw, "deliveries", "--limit", "2", "--cursor", cursor.group(1))
        dead_only = await hg(capsys, gw, "deliveries", "--status", "dead,failed", "--json")
        flaky_id = next(d["id"] for d in rows if d["endpoint"] == "flaky" and d["event_id"] == "order-0")
        dead_id = next(d["id"] for d in rows if d["endpoint"] == "dead" and d["event_id"] == "order-0")
        flaky_detail = await hg(capsys, gw, "delivery", flaky_id)
        dead_detail = await hg(capsys, gw, "delivery", dead_id, "--json")
        events = await hg(capsys, gw, "events")
        event = await hg(capsys, gw, "event", "order-2")
        missing = await hg(capsys, gw, "delivery", "dlv_nope")
        bad_since = await hg(capsys, gw, "deliveries", "--since", "yesterday")
        created = await gw.http.post(
            f"{gw.url}/api/v1/endpoints",
            json={"name": "extra", "subject": "orders.extra"},
            headers=AUTH,
        )
        await gw.http.post(f"{gw.url}/api/v1/endpoints/ok/disable", headers=AUTH)
        endpoint_table = await hg(capsys, gw, "endpoints")
        endpoint_json = await hg(capsys, gw, "endpoints", "--json")

    assert [s.code for s in sent] == [0, 0] and piped.returncode == 0, (sent, piped.stderr)
    assert sent[0].out.strip() == "event order-0 accepted (order.created)"
    generated = sent[1].json()["id"]
    assert sorted(r.json()["data"]["n"] for r in ok.requests) == [0, 1, 2]
    assert {r.headers["webhook-id"] for r in ok.requests} == {"order-0", generated, "order-2"}

    assert everything.code == 0 and everything.json()["next"] is None
    assert {(d["endpoint"], d["status"], d["attempts"]) for d in everything.json()["data"]} == {
        ("ok", "succeeded", 1),
        ("flaky", "succeeded", 2),
        ("dead", "dead", 2),
    }

    # The table: a header, then each delivery on exactly one line, with its status and attempts.
    lines = listed.out.splitlines()
    assert lines[0].split() == ["ID", "ENDPOINT", "STATUS", "ATTEMPTS", "CREATED", "LAST", "NEXT", "ATTEMPT"]
    assert len(lines) == 10
    for d in rows:
        matching = [line for line in lines if d["id"] in line]
        assert len(matching) == 1
        assert matching[0].split()[1:4] == [d["endpoint"], d["status"], str(d["attempts"])]
    assert listed.err == ""

    # Pagination: every row exactly once.
    ids = [d["id"] for d in paged.json()["data"]]
    assert len(ids) == 9 and sorted(ids) == sorted(d["id"] for d in rows)
    first_ids = [line.split()[0] for line in first_page.out.splitlines()[1:]]
    second_ids = [line.split()[0] for line in second_page.out.splitlines()[1:]]
    assert len(first_ids) == len(second_ids) == 2 and not set(first_ids) & set(second_ids)
    assert first_ids + second_ids == ids[:4]

    assert [d["endpoint"] for d in dead_only.json()["data"]] == ["dead"] * 3

    attempt_lines = flaky_detail.out.split("ATTEMPT", 1)[1].splitlines()[1:]
    assert [line.split()[0:1] + line.split()[3:5] for line in attempt_lines] == [
        ["1", "retrying", "500"],
        ["2", "succeeded", "200"],
    ]
    assert re.search(r"^status:\s+succeeded$", flaky_detail.out, re.MULTILINE)
    assert "http_status" in attempt_lines[0]
    assert [(a["attempt"], a["outcome"]) for a in dead_detail.json()["attempt_log"]] == [
        (1, "retrying"),
        (2, "dead"),
    ]

    assert events.code == 0 and len(events.out.splitlines()) == 4
    assert re.search(r"^order-2\s+internal\s+order\.created\s+\S+Z\s+ok, flaky, dead$", events.out, re.M)
    assert event.out.rstrip().endswith('body:\n{"n":2}')

    assert missing.code == 1 and missing.out == ""
    assert missing.err.startswith("hookgate: GET /api/v1/deliveries/dlv_nope: 404 not_found: no delivery")
    assert bad_since.code == 1 and "422" in bad_since.err and "yesterday" in bad_since.err
    # The YAML endpoints and the one created through the API, with their state.
    assert created.status_code == 201, created.text
    table_rows = [line.split() for line in endpoint_table.out.splitlines()]
    assert table_rows[0] == ["NAME", "TARGET", "FROM", "STATE"]
    assert [row[0] for row in table_rows[1:]] == ["ok", "flaky", "dead", "extra"]
    assert table_rows[1][-2:] == ["config", "disabled"] and table_rows[2][-2:] == ["config", "enabled"]
    assert table_rows[4] == ["extra", "subject", "orders.extra", "api", "enabled"]
    assert [e["name"] for e in endpoint_json.json()["data"]] == ["ok", "flaky", "dead", "extra"]
    for result in (missing, bad_since):
        assert "Traceback" not in result.err and len(result.err.splitlines()) == 1


async def test_retry_recover_and_redrive(
    tmp_path: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    healthy = False

    def dead_until_healed(request: Received, n: int) -> int:
        return 200 if healthy else 500

    async with (
        receiver() as ok,
        receiver() as flaky,
        receiver(dead_until_healed) as dead,
        run_gateway(tmp_path, _config(nats_server.url, ok.url, flaky.url, dead.url)) as gw,
    ):
        start = time.time()
        for n in ("a", "b", "c"):
            await gw.publish("order.created", {}, id=n, to=["dead"])
        page = await _until(gw, "/deliveries", lambda p: len(p["data"]) == 3, endpoint="dead", status="dead")
        dead_ids = {d["event_id"]: d["id"] for d in page["data"]}
        healthy = True
        before = len(dead.requests)

        retried = await hg(capsys, gw, "retry", dead_ids["a"])
        await dead.wait_for(before + 1)
        await _until(gw, f"/deliveries/{dead_ids['a']}", lambda d: d["status"] == "succeeded")

        recovered = await hg(capsys, gw, "recover", "dead", "--since", f"{start - 1:.3f}")
        await dead.wait_for(before + 3)
        job_id = re.search(r"job (job_\S+)", recovered.err)
        assert job_id is not None, recovered.err
        job = await hg(capsys, gw, "job", job_id.group(1), "--json")
        redriven = await hg(capsys, gw, "redrive", "dead", "--json")
        queued = await hg(capsys, gw, "recover", "dead", "--since", "1h", "--no-wait", "--json")

        # A delivery on its way (held by a disabled endpoint) cannot be retried: 409, explained.
        disabled = await hg(capsys, gw, "endpoint", "disable", "ok")
        await gw.publish("order.created", {}, id="held", to=["ok"])
        held = await _until(gw, "/deliveries", lambda p: len(p["data"]) == 1, endpoint="ok", status="held")
        refused = await hg(capsys, gw, "retry", held["data"][0]["id"])
        enabled = await hg(capsys, gw, "endpoint", "enable", "ok")
        await ok.wait_for(1)

    assert retried.code == 0, retried.err
    assert retried.out.strip() == f"delivery {dead_ids['a']} to dead queued as attempt 3"
    assert dead.requests[before].headers["webhook-id"] == "a"
    assert dead.requests[before].headers["hookgate-attempt"] == "3"

    # The recover waited for its job and reported it; b and c were sent again, a was not.
    assert recovered.code == 0, recovered.err
    assert recovered.out == ""
    final = recovered.err.strip().splitlines()[-1]
    assert re.search(r"\(recover dead\) succeeded; scanned \d+, requeued 2 in \d+s$", final), final
    assert sorted(r.headers["webhook-id"] for r in dead.requests[before + 1 : before + 3]) == ["b", "c"]
    assert job.json()["state"] == "succeeded" and job.json()["requeued"] == 2

    assert redriven.code == 0 and redriven.json()["state"] == "succeeded", redriven.err
    assert redriven.json()["requeued"] == 0  # the recover already took the dead letters
    assert queued.code == 0 and queued.json()["kind"] == "recover"

    assert (disabled.code, disabled.out) == (0, "endpoint ok disabled\n")
    assert refused.code == 1 and "409 delivery_active" in refused.err and "held" in refused.err
    assert "Nothing was queued" in refused.err
    assert (enabled.code, enabled.out) == (0, "endpoint ok enabled\n")


async def test_retry_now_sends_a_waiting_retry_at_once(
    tmp_path: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    text = base_config(
        nats_server.url,
        """
        endpoints:
          later: {url: "http://127.0.0.1:PORT/in", retry: {schedule: [1h], jitter: 0}}
        """,
    )
    async with (
        receiver(lambda r, n: 500 if n == 0 else 200) as later,
        run_gateway(tmp_path, text.replace("PORT", str(later.port))) as gw,
    ):
        await gw.publish("x", {}, id="late", to=["later"])
        page = await _until(gw, "/deliveries", lambda p: [d["status"] for d in p["data"]] == ["retrying"])
        delivery = page["data"][0]["id"]
        plain = await hg(capsys, gw, "retry", delivery)
        now = await hg(capsys, gw, "retry", delivery, "--now")
        await later.wait_for(2)
        await _until(gw, f"/deliveries/{delivery}", lambda d: d["status"] == "succeeded")
        again_now = await hg(capsys, gw, "retry", delivery, "--now")
        again = await hg(capsys, gw, "retry", delivery, "--json")
        await later.wait_for(3)
    assert plain.code == 1 and "409 delivery_active" in plain.err and "--now" in plain.err
    assert (now.code, now.out) == (0, f"delivery {delivery} to later attempt 2 pulled forward: sent now\n")
    assert [r.headers["hookgate-attempt"] for r in later.requests] == ["1", "2", "3"]
    # Delivered by then: --now does not resend it (a double click is safe); a plain retry does.
    assert again_now.code == 1 and "409 not_retrying" in again_now.err
    assert again.code == 0 and again.json()["pulled_forward"] is False and again.json()["attempt"] == 3


async def test_connection_from_flags_env_and_config(tmp_path: Path, nats_server: NatsServer) -> None:
    (tmp_path / "gw").mkdir()  # the gateway's own config there: none in the CLI's working directory
    async with receiver() as rx, run_gateway(tmp_path / "gw", _one_endpoint(nats_server.url, rx.url)) as gw:
        await gw.publish("order.created", {"n": 1}, id="e-1")
        await rx.wait_for(1)
        listen = gw.url.removeprefix("http://")
        # The CLI's config: the gateway's address and token; a secret it does not need is unset.
        config = tmp_path / "cli.yaml"
        config.write_text(
            f"server:\n  listen: {listen}\n  api_tokens: [test-token]\n"
            "sources:\n  acme:\n    verify: {type: hmac, header: X-Sig, secret: '${ACME_SECRET}'}\n"
        )
        from_config = await hg_process("events", "-c", str(config), "--json")
        from_config_env = await hg_process("events", env={"HOOKGATE_CONFIG": str(config)})
        from_env = await hg_process(
            "events", env={"HOOKGATE_URL": gw.url, "HOOKGATE_API_TOKEN": "test-token"}, cwd=tmp_path
        )
        flag_wins = await hg_process(
            "events", "--token", "test-token", env={"HOOKGATE_URL": gw.url, "HOOKGATE_API_TOKEN": "wrong-1"}
        )
        bad_token = await hg_process("events", "--url", gw.url, env={"HOOKGATE_API_TOKEN": "wrong-2"})
        no_token = await hg_process("events", "--url", gw.url, cwd=tmp_path)
    unreachable = await hg_process("deliveries", "--url", gw.url, "--token", "test-token")
    bad_json = await hg_process("send", "x", "--data", "{oops", "--url", "http://127.0.0.1:1", "--token", "t")

    assert from_config.code == 0, from_config.err
    assert [e["id"] for e in from_config.json()["data"]] == ["e-1"]
    assert from_config_env.code == 0 and "e-1" in from_config_env.out, from_config_env.err
    assert from_env.code == 0 and "e-1" in from_env.out, from_env.err
    assert flag_wins.code == 0 and "e-1" in flag_wins.out, flag_wins.err

    assert bad_token.code == 1 and bad_token.out == ""
    assert "403 forbidden" in bad_token.err and "refused the API token" in bad_token.err
    assert "wrong-2" not in bad_token.err
    assert no_token.code == 1 and "no API token" in no_token.err and "hookgate.yaml" in no_token.err
    assert unreachable.code == 1 and f"cannot reach the API at {gw.url}" in unreachable.err
    assert bad_json.code == 1 and bad_json.err.startswith("hookgate: --data is not valid JSON")
    for result in (bad_token, no_token, unreachable, bad_json):
        assert "Traceback" not in result.err and "test-token" not in result.err


def _one_endpoint(nats_url: str, url: str) -> str:
    return base_config(
        nats_url,
        f"""
        endpoints:
          svc: {{url: "{url}/in"}}
        routes:
          - {{from: [internal], to: [svc]}}
        """,
    )


# --- without a gateway ---------------------------------------------------------------------


def test_resolve_prefers_flags_then_env_then_config(tmp_path: Path) -> None:
    config = tmp_path / "hookgate.yaml"
    config.write_text("server:\n  listen: 0.0.0.0:9000\n  api_tokens: ['${TOKEN}', other]\n")
    env = {"TOKEN": "from-config"}
    assert client.resolve(None, None, str(config), env) == client.Target(
        "http://127.0.0.1:9000", "from-config"
    )
    env = {**env, "HOOKGATE_URL": "10.0.0.1:8080/", "HOOKGATE_API_TOKEN": "from-env"}
    assert client.resolve(None, None, str(config), env) == client.Target("http://10.0.0.1:8080", "from-env")
    assert client.resolve("https://gw", "flag", str(config), env) == client.Target("https://gw", "flag")
    # HOOKGATE_CONFIG names the config when -c is not given.
    assert client.resolve(None, "t", None, {"HOOKGATE_CONFIG": str(config), "TOKEN": "x"}).url == (
        "http://127.0.0.1:9000"
    )
    assert "from-config" not in repr(client.resolve(None, None, str(config), {"TOKEN": "from-config"}))


def test_resolve_derives_the_url_from_listen() -> None:
    tls = TLSFiles(certfile="c.pem", keyfile="k.pem")
    assert (
        client._url_from_listen("f", ServerConfig(listen="0.0.0.0:8443", tls=tls)) == "https://127.0.0.1:8443"
    )
    assert client._url_from_listen("f", ServerConfig(listen="[::]:8080")) == "http://[::1]:8080"
    assert client._url_from_listen("f", ServerConfig(listen="gw.internal:80")) == "http://gw.internal:80"
    with pytest.raises(client.ApiError, match="pass --url"):
        client._url_from_listen("f", ServerConfig(listen="127.0.0.1:0"))


def test_resolve_reports_config_problems_and_missing_tokens(tmp_path: Path) -> None:
    config = tmp_path / "hookgate.yaml"
    config.write_text("server:\n  listen: 127.0.0.1:8080\n  api_tokens: ['${UNSET_TOKEN}']\n")
    with pytest.raises(client.ApiError) as raised:
        client.resolve(None, None, str(config), {})
    assert "no API URL" in str(raised.value) and "no API token" in str(raised.value)
    assert f"{config}:3: $.server.api_tokens[0]: environment variable UNSET_TOKEN is not set" in str(
        raised.value
    )
    config.write_text("server:\n  listen: 127.0.0.1:8080\n")
    with pytest.raises(client.ApiError, match=r"no API token: pass --token .*has no server.api_tokens"):
        client.resolve(None, None, str(config), {})


def test_endpoints_table_shows_missing_fields_as_dashes() -> None:
    sample = [
        {"name": "billing", "url": "https://billing.example/hooks", "source": "config", "disabled": False},
        {"name": "audit", "subject": "audit.events", "read_only": False, "disabled": True},
        {"name": "bare"},
    ]
    rows = commands.endpoint_rows({"data": sample, "next": None})
    assert tables.endpoints(rows).splitlines() == [
        "NAME     TARGET                         FROM    STATE",
        "billing  https://billing.example/hooks  config  enabled",
        "audit    subject audit.events           api     disabled",
        "bare     -                              -       -",
    ]
    with pytest.raises(client.ApiError, match="not a list"):
        commands.endpoint_rows({"error": "x"})


async def test_endpoints_from_a_server_without_the_list_is_explained() -> None:
    async with receiver(lambda r, n: 404) as older:
        result = await hg_process("endpoints", "--url", older.url, "--token", "t")
    assert result.code == 1 and "does not list endpoints" in result.err and "404" in result.err
    assert "Traceback" not in result.err and len(result.err.splitlines()) == 1


def test_tables_shorten_times_and_errors() -> None:
    row = {
        "id": "dlv_1",
        "endpoint": "billing",
        "status": "retrying",
        "attempts": 2,
        "created_at": "2026-11-27T04:00:00.123Z",
        "last_status": None,
        "last_error": "connection refused " * 10,
        "next_attempt_at": "2026-11-27T04:05:00.000Z",
    }
    line = tables.deliveries([row]).splitlines()[1]
    assert "2026-11-27T04:00:00Z" in line and "2026-11-27T04:05:00Z" in line
    assert "connection refused" in line and "…" in line and len(line) < 160


def test_progress_redraws_on_a_terminal_and_writes_lines_elsewhere() -> None:
    now = [0.0]
    job = {
        "id": "job_1",
        "kind": "recover",
        "endpoint": "dead",
        "state": "running",
        "scanned": 0,
        "requeued": 0,
    }

    tty = io.StringIO()
    progress = JobProgress(tty, interactive=True, clock=lambda: now[0])
    progress.show(job)
    progress.show({**job, "scanned": 10, "requeued": 4})
    progress.finish({**job, "state": "succeeded", "scanned": 10, "requeued": 4})
    assert tty.getvalue().count("\r") == 3 and tty.getvalue().endswith("requeued 4 in 0s\n")

    log = io.StringIO()
    progress = JobProgress(log, interactive=False, every=5, clock=lambda: now[0])
    progress.show(job)
    now[0] = 1.0
    progress.show({**job, "scanned": 5})  # too soon after the last line
    now[0] = 6.0
    progress.show({**job, "scanned": 5})
    progress.show({**job, "scanned": 5})  # unchanged
    progress.finish({**job, "state": "succeeded", "scanned": 9})
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 3
    assert lines[1].endswith("running; scanned 5, requeued 0")
    assert lines[2].endswith("succeeded; scanned 9, requeued 0 in 6s")
