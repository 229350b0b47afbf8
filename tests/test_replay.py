"""Replay jobs across replicas: one running job per request, stale jobs reported failed, and a
retry of a delivery whose endpoint was deleted refused. On a real nats-server."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from hookgate.broker import OutMsg
from hookgate.log.replay import Job
from hookgate.plugin_kit.units import parse_time, rfc3339
from tests.support import Gateway, NatsServer, base_config, receiver, run_gateway

AUTH = {"Authorization": "Bearer test-token"}
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
RANGE = {"since": "2026-11-27T00:00:00Z", "until": "2026-11-27T01:00:00Z"}


async def _job(gw: Gateway, job_id: str) -> Any:
    response = await gw.http.get(f"{gw.url}/api/v1/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


async def _finished(gw: Gateway, job_id: str) -> Any:
    with trio.fail_after(10):
        while (job := await _job(gw, job_id))["state"] == "running":
            await trio.sleep(0.05)
    return job


async def _pretend_running_elsewhere(gw: Gateway, job: Any, updated_at: float, *, old: bool = False) -> str:
    """Store the job's record as a replica would while running it (the same subject); `old`: as
    replicas did before `updated_at` was RFC 3339, with unix seconds."""
    running = msgspec.structs.replace(
        msgspec.convert(job, Job), id=job["id"].rsplit("_", 1)[0] + "_1", state="running"
    )
    record = {**msgspec.to_builtins(running), "updated_at": updated_at if old else rfc3339(updated_at)}
    broker = gw.running.broker
    key = job["id"].split("_")[1]
    result = await broker.publish(OutMsg(broker.topology.job_subject(key), msgspec.json.encode(record)))
    assert result.ok
    return running.id


async def test_the_same_recover_while_one_runs_returns_that_job(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    text = base_config(
        nats_server.url,
        """
        endpoints:
          svc: {url: "http://127.0.0.1:9/in"}
        """,
    )
    async with run_gateway(tmp_path, text) as gw:
        url = f"{gw.url}/api/v1/endpoints/svc/recover"
        first = await gw.http.post(url, json=RANGE, headers=AUTH)
        done = await _finished(gw, first.json()["id"])
        other = await _pretend_running_elsewhere(gw, done, updated_at=time.time())
        joined = await gw.http.post(url, json=RANGE, headers=AUTH)
        different = await gw.http.post(url, json={**RANGE, "status": ["succeeded"]}, headers=AUTH)
        await _pretend_running_elsewhere(gw, done, updated_at=time.time() - 3600)
        stale = await _job(gw, other)
        await _pretend_running_elsewhere(gw, done, updated_at=time.time(), old=True)
        old_running = await _job(gw, other)
        await _pretend_running_elsewhere(gw, done, updated_at=time.time() - 3600, old=True)
        old_stale = await _job(gw, other)
        restarted = await gw.http.post(url, json=RANGE, headers=AUTH)
        unknown = await gw.http.get(f"{gw.url}/api/v1/jobs/job_nope", headers=AUTH)
    assert first.status_code == 202 and done["state"] == "succeeded" and done["requeued"] == 0
    assert joined.status_code == 200 and joined.json()["id"] == other
    assert different.status_code == 202 and different.json()["id"] != other
    assert stale["state"] == "failed" and "stopped" in stale["error"]
    assert old_running["state"] == "running" and old_stale["state"] == "failed"
    for job in (done, stale, old_running, old_stale):
        # Every time of a job is RFC 3339, also from records that stored unix seconds.
        for key in ("started_at", "updated_at"):
            assert RFC3339.fullmatch(job[key]), (key, job)
    assert done["updated_at"] == done["finished_at"]
    assert abs(parse_time(old_stale["updated_at"]) - (time.time() - 3600)) < 60
    assert restarted.status_code == 202 and restarted.json()["id"] not in (other, first.json()["id"])
    assert unknown.status_code == 404


async def test_retry_of_a_delivery_to_a_deleted_endpoint_is_refused(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver(lambda r, n: 500) as rx:
        text = base_config(nats_server.url, "")
        async with run_gateway(tmp_path, text) as gw:
            created = await gw.http.post(
                f"{gw.url}/api/v1/endpoints",
                json={"name": "tmp", "url": f"{rx.url}/in", "retry": {"schedule": []}},
                headers=AUTH,
            )
            assert created.status_code == 201, created.text
            await gw.publish("x", {}, to=["tmp"])
            await rx.wait_for(1)
            with trio.fail_after(10):
                while True:
                    page = (
                        await gw.http.get(
                            f"{gw.url}/api/v1/deliveries?endpoint=tmp&status=dead", headers=AUTH
                        )
                    ).json()
                    if page["data"]:
                        break
                    await trio.sleep(0.05)
            deleted = await gw.http.delete(f"{gw.url}/api/v1/endpoints/tmp", headers=AUTH)
            retried = await gw.http.post(
                f"{gw.url}/api/v1/deliveries/{page['data'][0]['id']}/retry", headers=AUTH
            )
    assert deleted.status_code == 204
    assert retried.status_code == 409 and retried.json()["error"] == "endpoint_gone"
    assert len(rx.requests) == 1
