"""What the broker shares with nats-py beyond calling its documented methods.

The broker uses no private attribute of nats-py. What remains are conventions between the two, each
checked here so that a nats-py release that changes one fails this file, saying what would break,
rather than the gateway in production. pyproject.toml pins nats-py to the releases it passed on.
"""

from __future__ import annotations

import nats.js.client
from nats.js import JetStreamContext
from nats.js.manager import JetStreamManager

from hookgate import config as config_mod
from hookgate.broker import Broker, Commit, OutMsg
from hookgate.broker import kv as broker_kv
from hookgate.plugin_host.hooks import Hooks
from tests.support import NatsServer, base_config


def test_kv_keys_are_stored_on_the_subjects_the_broker_writes_delete_markers_to() -> None:
    stored_on = nats.js.client.KV_PRE_TEMPLATE.format(bucket="b") + "k"
    assert stored_on == broker_kv.subject("b", "k"), (
        f"nats-py stores KV key 'k' of bucket 'b' on {stored_on!r}: hookgate.broker.kv.delete "
        "publishes its delete markers elsewhere, so deleted endpoints would stay"
    )


def test_the_jetstream_context_manages_streams_and_consumers_too() -> None:
    assert issubclass(JetStreamContext, JetStreamManager), (
        "nats-py's JetStreamContext is no JetStreamManager any more: hookgate.broker.reads.scan "
        "creates and deletes its reading consumer through it"
    )


async def test_a_status_reply_is_read_from_the_status_header(nats_server: NatsServer) -> None:
    # Pull consumers (404/408/409: what a pull request still owes) and PubAcks (503: no stream)
    # read the status line of a reply from the "Status" header nats-py makes of it.
    loaded = config_mod.loads(base_config(nats_server.url), Hooks(()).registry)
    async with Broker.connect(loaded.config.broker, nats_server.url) as broker:
        [results] = await broker.bridge.commit([Commit([OutMsg("nowhere.captured", b"x")])], 2.0)
    assert (results[0].error or "").startswith("no JetStream stream captures this subject"), (
        f"a publish no stream captures answered {results[0]!r}: nats-py no longer reports a reply's "
        "status as the 'Status' header, which PullConsumer and PubAcks read"
    )
