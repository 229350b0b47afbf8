"""The endpoint model: a configured endpoint, built from its config, ready to deliver to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hookgate.config import EndpointConfig
from hookgate.egress.retry import retry_delay
from hookgate.plugin_kit.units import seconds
from hookgate.transport.pool import PooledTransport
from hookgate.transport.ssrf import EgressGuard
from hookgate.types import EndpointAuth, EndpointView, Signer

if TYPE_CHECKING:
    from hookgate.egress.send import Result


@dataclass
class Endpoint:
    """A configured endpoint, ready to deliver to."""

    name: str
    config: EndpointConfig
    view: EndpointView
    timeout: float
    schedule: list[float]
    jitter: float
    final_statuses: frozenset[int] = frozenset()
    transport: PooledTransport | None = field(default=None, repr=False)
    guard: EgressGuard = field(default_factory=EgressGuard, repr=False)

    @classmethod
    def build(
        cls,
        name: str,
        config: EndpointConfig,
        signer: Signer | None = None,
        guard: EgressGuard | None = None,
        auth: EndpointAuth | None = None,
        proxy: str | None = None,
    ) -> Endpoint:
        guard = guard or EgressGuard()
        ssl_context = auth.ssl_context() if auth is not None else None
        # The guard resolves the host and vets every address; the transport connects to exactly
        # those addresses, so a DNS answer cannot change between the check and the connection.
        transport = (
            PooledTransport(
                max_connections=config.concurrency,
                resolve=guard.resolve,
                ssl_context=ssl_context,
                proxy=proxy,
            )
            if config.url
            else None
        )
        return cls(
            name=name,
            config=config,
            view=EndpointView(name=name, url=config.url, subject=config.subject, signer=signer, auth=auth),
            timeout=seconds(config.timeout),
            schedule=config.retry.delays(),
            final_statuses=frozenset(config.retry.final_statuses),
            jitter=config.retry.jitter,
            transport=transport,
            guard=guard,
        )

    @property
    def max_attempts(self) -> int:
        return len(self.schedule) + 1

    def retry_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The delay before attempt `attempt + 1`, with jitter (so retries of a burst spread out).

        A `Retry-After` from the endpoint lengthens it, but never past the policy's longest delay.
        """
        return retry_delay(self.schedule, self.jitter, attempt, retry_after)

    def is_final(self, result: Result) -> bool:
        """Failures that retrying cannot fix: refused by the SSRF guard, or a configured status."""
        return result.error_kind == "ssrf_refused" or result.status in self.final_statuses
