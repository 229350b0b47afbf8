"""What loading a config gives: the validated Config and the plugin components resolved for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hookgate.config.paths import line_of
from hookgate.config.schema import Config
from hookgate.types import ComponentKind


@dataclass(frozen=True)
class Component:
    """A plugin component picked in YAML with `type:`, its config converted to the plugin's Struct."""

    kind: ComponentKind
    type: str
    config: Any


@dataclass
class LoadedConfig:
    """The validated config plus what was resolved against the plugin registry."""

    config: Config
    path: Path
    verifiers: dict[str, Component] = field(default_factory=dict)  # by source name
    signers: dict[str, Component] = field(default_factory=dict)  # by endpoint name
    access_rules: dict[str, list[Component]] = field(default_factory=dict)  # by source name
    handshakes: dict[str, Component] = field(default_factory=dict)  # by source name
    endpoint_auth: dict[str, Component] = field(default_factory=dict)  # by endpoint name
    transforms: dict[int, Component] = field(default_factory=dict)  # by index into config.routes
    route_positions: list[int] = field(default_factory=list)  # each route's index in the file
    lines: dict[str, int] = field(default_factory=dict)  # key path -> line, as the loader read it

    def line_of(self, path: str) -> int | None:
        """The line of a key path (`$.endpoints.billing.url`), or of its nearest parent."""
        return line_of(self.lines, path)
