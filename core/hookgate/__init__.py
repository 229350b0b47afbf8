"""hookgate: a webhook gateway on NATS JetStream."""

__version__ = "0.1.0"
