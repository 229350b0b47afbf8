"""`/readyz` answers within READY_DEADLINE even when the broker does not answer at all."""

from __future__ import annotations

from pathlib import Path

import trio

from hookgate.app import READY_DEADLINE
from tests.support import NatsServer, base_config, run_gateway


async def test_readyz_answers_503_quickly_while_the_broker_is_frozen(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with run_gateway(tmp_path, base_config(nats_server.url)) as gw:
        assert (await gw.http.get(f"{gw.url}/readyz")).status_code == 200
        assert nats_server.process is not None
        pid = nats_server.process.pid
        await nats_server.freeze()
        try:
            started = trio.current_time()
            frozen = await gw.http.get(f"{gw.url}/readyz", timeout=1)  # a probe's timeout
            elapsed = trio.current_time() - started
        finally:
            nats_server.thaw()
        assert nats_server.process.pid == pid
        assert frozen.status_code == 503, frozen.text
        assert frozen.json()["reason"], frozen.text
        assert elapsed < READY_DEADLINE + 0.3, elapsed
        with trio.fail_after(10):  # ready again once the broker answers
            while (await gw.http.get(f"{gw.url}/readyz")).status_code != 200:
                await trio.sleep(0.05)
