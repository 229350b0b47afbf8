"""The broker's own safety: the embedded server's credentials and file modes, API endpoints'
secrets sealed in KV (and key rotation), and `broker.sync` reaching the embedded server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import stat
from pathlib import Path
from typing import Any

import nats
import pytest
import trio

from hookgate import config as config_mod
from hookgate.config.sealing import key_id, parse_key
from hookgate.plugin_host.hooks import Hooks
from tests.support import SECRETS_KEY, NatsServer, base_config, receiver, run_gateway

AUTH = {"Authorization": "Bearer test-token"}
BUCKET = "KV_HOOKGATE_ENDPOINT_CONFIGS"
BEARER = "endpoint-bearer-token-5e1b"
URL_PASSWORD = "url-pass-c0ffee"
HEADER_KEY = "header-api-key-0d15"
NEW_KEY = "bmV3LWtleS1mb3Itc2VhbGluZy1lbmRwb2ludC1zZWM="
OTHER_KEY = "b3RoZXIta2V5LW5vdC1ldmVyLXVzZWQtdG8tc2VhbCE="


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _run(coro: Any) -> Any:
    return trio.to_thread.run_sync(lambda: asyncio.run(coro))


async def _raw_kv(url: str, nkey_seed_file: str | None = None) -> dict[str, bytes]:
    """Every value in the endpoint documents' bucket, read with a plain nats-py client."""

    async def read() -> dict[str, bytes]:
        nc = await nats.connect(url, nkeys_seed=nkey_seed_file) if nkey_seed_file else await nats.connect(url)
        try:
            jsm = nc.jsm()
            info = await jsm.stream_info(BUCKET)
            out: dict[str, bytes] = {}
            seq = info.state.first_seq
            while info.state.messages and seq <= info.state.last_seq:
                try:
                    msg = await jsm.get_msg(BUCKET, seq=seq, next=True)
                except nats.js.errors.NotFoundError:
                    break
                assert msg.seq is not None and msg.subject is not None
                out[msg.subject.rsplit(".", 1)[1]] = msg.data or b""
                seq = msg.seq + 1
            return out
        finally:
            await nc.close()

    return await _run(read())  # type: ignore[no-any-return]


def _secret_bearing(name: str, url: str) -> dict[str, Any]:
    scheme, rest = url.split("://", 1)
    return {
        "name": name,
        "url": f"{scheme}://hook:{URL_PASSWORD}@{rest}/in",
        "auth": {"type": "bearer", "token": BEARER},
        "headers": {"X-Api-Key": HEADER_KEY},
    }


def _embedded(tmp_path: Path, extra: str = "") -> str:
    return base_config(None, extra, data_dir=tmp_path / "data").replace(
        f'  secrets_keys: ["{SECRETS_KEY}"]\n', ""
    )


# --- the embedded server -----------------------------------------------------------------------


async def test_the_embedded_server_accepts_only_the_gateway_and_its_files_are_the_owners(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    # An older version left a world-readable data directory and pid file behind.
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    (data / "nats-server.pid").write_text("999999999")
    (data / "nats-server.pid").chmod(0o644)
    seeds = []
    for _ in range(2):
        async with run_gateway(tmp_path, _embedded(tmp_path)) as gw:
            url = gw.running.broker_url
            assert isinstance(url, str) and "@" not in url
            seed_file = gw.running.broker_nkey_seed_file
            assert seed_file is not None and Path(seed_file).parent == data
            seeds.append(Path(seed_file).read_text())
            (ports,) = data.glob("nats-server_*.ports")
            files = [
                ports,
                *(
                    data / name
                    for name in (
                        "nats-server.pid",
                        "nats-server.conf",
                        "nats-server.log",
                        "nats-client.nk",
                        "secrets.key",
                    )
                ),
            ]
            modes = {p.name: _mode(p) for p in files}
            dir_mode = _mode(data)
            store_mode = _mode(data / "jetstream")

            # Anyone else on the host can find the port, and is refused.
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await _run(nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0))
            # The server config names the public key alone; the seed is only in the owner's file.
            config = json.loads((data / "nats-server.conf").read_text())
            (user,) = config["authorization"]["users"]
            assert user.keys() == {"nkey"} and user["nkey"].startswith("U")
            assert seeds[-1].strip() not in (data / "nats-server.conf").read_text()
            # With the credentials, a plain client reads the bucket (as the tests below do).
            assert isinstance(await _raw_kv(url, seed_file), dict)
        assert dir_mode == 0o700 and store_mode & 0o077 == 0
        assert modes == dict.fromkeys(modes, 0o600), modes
    assert seeds[0] != seeds[1]  # credentials are made for every start


async def test_api_endpoint_secrets_are_sealed_in_kv_and_shown_once(tmp_path: Path) -> None:
    """No key configured, embedded broker: a key is generated in the data directory."""
    async with receiver() as rx, run_gateway(tmp_path, _embedded(tmp_path)) as gw:
        created = await gw.http.post(
            f"{gw.url}/api/v1/endpoints", json=_secret_bearing("sealed", rx.url), headers=AUTH
        )
        assert created.status_code == 201, created.text
        whsec = created.json()["config"]["signing"]["secret"]
        assert created.json()["config"]["auth"]["token"] == BEARER
        shown = (await gw.http.get(f"{gw.url}/api/v1/endpoints/sealed", headers=AUTH)).text
        listed = (await gw.http.get(f"{gw.url}/api/v1/endpoints", headers=AUTH)).text
        raw = await _raw_kv(str(gw.running.broker_url), gw.running.broker_nkey_seed_file)

        # The stored document opens: a delivery carries the endpoint's credentials.
        patched = await gw.http.patch(
            f"{gw.url}/api/v1/endpoints/sealed", json={"types": ["sealed.*"]}, headers=AUTH
        )
        assert patched.status_code == 200, patched.text
        assert (await gw.publish("sealed.ok", {"n": 1})).status_code == 202
        (request,) = await rx.wait_for(1)
        raw_after_patch = await _raw_kv(str(gw.running.broker_url), gw.running.broker_nkey_seed_file)
    for secret in (whsec, BEARER, URL_PASSWORD, HEADER_KEY):
        assert secret not in shown and secret not in listed
        for value in (raw["sealed"], raw_after_patch["sealed"]):
            assert secret.encode() not in value
    stored = json.loads(raw["sealed"])
    assert stored.keys() == {"revision", "sealed"} and stored["sealed"]["alg"] == "A256GCM"
    generated = parse_key((tmp_path / "data" / "secrets.key").read_text())
    assert stored["sealed"]["kid"] == key_id(generated)
    assert json.loads(raw_after_patch["sealed"])["revision"] == 2
    assert request.headers["authorization"] == f"Bearer {BEARER}"
    assert request.headers["x-api-key"] == HEADER_KEY


def _external(url: str, keys: list[str] | None, extra: str = "") -> str:
    text = base_config(url, extra)
    line = f'  secrets_keys: ["{SECRETS_KEY}"]\n'
    return text.replace(line, "" if keys is None else f"  secrets_keys: {json.dumps(keys)}\n")


async def test_a_key_rotation_keeps_old_endpoints_and_seals_them_again(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "hookgate")
    async with receiver() as rx:
        async with run_gateway(tmp_path, _external(nats_server.url, [SECRETS_KEY])) as gw:
            created = await gw.http.post(
                f"{gw.url}/api/v1/endpoints", json=_secret_bearing("rotated", rx.url), headers=AUTH
            )
            assert created.status_code == 201, created.text
            # An older version stored documents in the clear, secrets included.
            plain = {"revision": 4, "endpoint": {**_secret_bearing("legacy", rx.url), "types": ["legacy"]}}
            broker = gw.running.broker
            await broker.kv_create(
                broker.topology.endpoint_configs_bucket, "legacy", json.dumps(plain).encode()
            )
        before = json.loads((await _raw_kv(nats_server.url))["rotated"])

        # The new key first, the old one after it: the old document opens, and is sealed again.
        async with run_gateway(tmp_path, _external(nats_server.url, [NEW_KEY, SECRETS_KEY])) as gw:
            shown = await gw.http.get(f"{gw.url}/api/v1/endpoints/rotated", headers=AUTH)
            with trio.fail_after(10):
                while json.loads((await _raw_kv(nats_server.url))["rotated"])["sealed"]["kid"] != key_id(
                    parse_key(NEW_KEY)
                ):
                    await trio.sleep(0.05)
            with trio.fail_after(10):
                while "sealed" not in json.loads((await _raw_kv(nats_server.url))["legacy"]):
                    await trio.sleep(0.05)
        after = json.loads((await _raw_kv(nats_server.url))["rotated"])
        legacy = (await _raw_kv(nats_server.url))["legacy"]

        # Then the old key can go.
        async with run_gateway(tmp_path, _external(nats_server.url, [NEW_KEY])) as gw:
            assert (await gw.publish("rotated", {"n": 1})).status_code == 202
            (request,) = await rx.wait_for(1)
            still = await gw.http.get(f"{gw.url}/api/v1/endpoints/rotated", headers=AUTH)
    assert before["sealed"]["kid"] == key_id(parse_key(SECRETS_KEY))
    assert shown.status_code == 200 and shown.json()["revision"] == 1
    assert after["revision"] == 1  # sealing again is not a change of the endpoint
    assert still.status_code == 200 and still.json()["revision"] == 1
    assert request.headers["authorization"] == f"Bearer {BEARER}"
    assert "sealed 2 endpoint document(s) again" in caplog.text
    assert json.loads(legacy)["revision"] == 4 and BEARER.encode() not in legacy


async def test_a_wrong_or_missing_key_is_a_clear_error(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_gateway(tmp_path, _external(nats_server.url, [SECRETS_KEY])) as gw:
        created = await gw.http.post(
            f"{gw.url}/api/v1/endpoints", json=_secret_bearing("locked", "http://127.0.0.1:9"), headers=AUTH
        )
        assert created.status_code == 201, created.text
    kid = key_id(parse_key(SECRETS_KEY))

    caplog.set_level(logging.INFO, "hookgate")
    async with run_gateway(tmp_path, _external(nats_server.url, [OTHER_KEY])) as gw:
        missing = await gw.http.get(f"{gw.url}/api/v1/endpoints/locked", headers=AUTH)
        patched = await gw.http.patch(
            f"{gw.url}/api/v1/endpoints/locked", json={"timeout": "5s"}, headers=AUTH
        )
        health = await gw.http.get(f"{gw.url}/readyz")
    assert missing.status_code == 404
    assert patched.status_code == 500 and patched.json()["error"] == "secrets_key"
    assert f"sealed with key {kid}, which is not among broker.secrets_keys" in patched.json()["message"]
    assert (
        f"endpoint locked cannot be used on this replica: its stored document is sealed with key {kid}"
        in caplog.text
    )
    assert health.status_code == 200

    # No key at all, external broker: nothing with a secret is stored in the clear.
    async with run_gateway(tmp_path, _external(nats_server.url, None)) as gw:
        refused = await gw.http.post(
            f"{gw.url}/api/v1/endpoints", json={"name": "plain", "url": "http://127.0.0.1:9/in"}, headers=AUTH
        )
        unsigned = await gw.http.post(
            f"{gw.url}/api/v1/endpoints",
            json={"name": "plain", "url": "http://127.0.0.1:9/in", "signing": None},
            headers=AUTH,
        )
        patched = await gw.http.patch(
            f"{gw.url}/api/v1/endpoints/locked", json={"timeout": "5s"}, headers=AUTH
        )
    assert refused.status_code == 403 and refused.json()["error"] == "secrets_key_missing"
    assert "broker.secrets_keys" in refused.json()["message"]
    assert unsigned.status_code == 201, unsigned.text
    assert json.loads((await _raw_kv(nats_server.url))["plain"])["endpoint"]["name"] == "plain"
    assert patched.status_code == 500 and "this gateway has no key" in patched.json()["message"]
    assert "Traceback" not in caplog.text


def test_secrets_keys_and_sync_are_checked_at_load() -> None:
    hooks = Hooks(())

    def problems(broker: str) -> list[str]:
        with pytest.raises(config_mod.ConfigError) as raised:
            config_mod.loads(f"broker:\n{broker}", hooks.registry)
        return [str(p) for p in raised.value.problems]

    (short,) = problems('  secrets_keys: ["c2hvcnQ="]\n')
    assert short.startswith("<config>:2: $.broker.secrets_keys[0]: expected 32 random bytes in base64")
    assert "c2hvcnQ=" not in short
    (not_b64,) = problems("  secrets_keys: 'not base64 at all!'\n")
    assert not_b64.startswith("<config>:2: $.broker.secrets_keys: expected 32 random bytes")
    (external,) = problems("  url: nats://127.0.0.1:4222\n  sync: always\n")
    assert "$.broker.sync: only used with the embedded broker" in external
    (zero,) = problems("  sync: 0s\n")
    assert zero == '<config>:2: $.broker.sync: must be "always" or more than 0'
    (word,) = problems("  sync: sometimes\n")
    assert word == '<config>:2: $.broker.sync: expected "always" or a duration like "1s", got "sometimes"'
    loaded = config_mod.loads(
        'broker:\n  sync: 250ms\n  secrets_keys: ["", "' + NEW_KEY + '"]\n', hooks.registry
    )
    assert loaded.config.broker.secrets_key_texts() == [NEW_KEY]


@pytest.mark.parametrize(("sync", "expected"), [(None, "1000ms"), ("always", "always"), ("2m", "120000ms")])
async def test_broker_sync_reaches_the_embedded_server(
    tmp_path: Path, sync: str | None, expected: str
) -> None:
    text = _embedded(tmp_path)
    if sync is not None:
        text = text.replace("broker:\n", f"broker:\n  sync: {sync}\n")
    async with run_gateway(tmp_path, text) as gw:
        config = json.loads((tmp_path / "data" / "nats-server.conf").read_text())
        # The server runs on that config: it answers the gateway.
        assert (await gw.publish("sync.ok", {})).status_code == 202
    assert config["jetstream"]["sync_interval"] == expected


async def test_events_acknowledged_before_a_sigkill_of_the_embedded_server_are_kept(tmp_path: Path) -> None:
    """A crash of the nats-server process loses nothing it acknowledged, whatever broker.sync says:
    what it stored is in the page cache. (A power loss of the host is what sync is for.)"""
    text = _embedded(tmp_path).replace("broker:\n", "broker:\n  sync: 2m\n")
    async with run_gateway(tmp_path, text) as gw:
        accepted = [
            n for n in range(200) if (await gw.publish("kept", {}, id=f"kept-{n}")).status_code == 202
        ]
        pid = int((tmp_path / "data" / "nats-server.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        # The gateway restarts its server on the same port and store, with the same credentials.
        with trio.fail_after(20):
            while (await gw.publish("after", {})).status_code != 202:
                await trio.sleep(0.1)
        found = [
            n
            for n in accepted
            if (await gw.http.get(f"{gw.url}/api/v1/events/kept-{n}", headers=AUTH)).status_code == 200
        ]
    assert len(accepted) == 200 and found == accepted
