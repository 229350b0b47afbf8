"""The event store: JetStream through nats-py (the only package that imports it), the embedded
nats-server, and the records and ids kept in the streams.

The rest of the gateway uses the broker through the names exported here.
"""

from hookgate.broker.facade import MIN_SERVER_VERSION, Broker, Topology
from hookgate.broker.kv import Swapped
from hookgate.broker.messages import (
    BrokerRefused,
    BrokerUnavailable,
    Commit,
    ConsumerSpec,
    InMsg,
    KvUpdate,
    OutMsg,
    PubResult,
    StoredMsg,
)
from hookgate.broker.pull import PullConsumer

__all__ = [
    "MIN_SERVER_VERSION",
    "Broker",
    "BrokerRefused",
    "BrokerUnavailable",
    "Commit",
    "ConsumerSpec",
    "InMsg",
    "KvUpdate",
    "OutMsg",
    "PubResult",
    "PullConsumer",
    "StoredMsg",
    "Swapped",
    "Topology",
]
