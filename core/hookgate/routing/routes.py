"""Routes compiled from the config (or from an API endpoint's subscription): which events they match."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from hookgate.config import RouteConfig
from hookgate.config.filters import Filter, ParsedBody, compile_filter
from hookgate.types import Event, Transform


@dataclass(frozen=True)
class CompiledRoute:
    name: str
    sources: frozenset[str] | None
    types: re.Pattern[str] | None
    to: tuple[str, ...]
    filter: Filter | None = None
    transform: Transform | None = None

    @classmethod
    def compile(cls, index: int, route: RouteConfig, transform: Transform | None = None) -> CompiledRoute:
        types = None
        if route.types:
            types = re.compile("|".join(f"(?:{fnmatch.translate(t)})" for t in route.types))
        return cls(
            name=route.name or f"route-{index}",
            sources=frozenset(route.from_) if route.from_ else None,
            types=types,
            to=tuple(route.to),
            filter=compile_filter(route.filter, f"$.routes[{index}].filter") if route.filter else None,
            transform=transform,
        )

    def matches(self, event: Event, body: ParsedBody | None = None) -> bool:
        if self.sources is not None and event.source not in self.sources:
            return False
        if self.types is not None and self.types.match(event.type) is None:
            return False
        return self.filter is None or self.filter.matches(event, body)
