"""The plugin manager: loads plugins from the `hookgate` entry points and calls hooks under trio."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from hookgate import hookspecs
from hookgate.types import ComponentRegistry, Rejection

log = logging.getLogger("hookgate.plugins")

# Hooks that only observe: one plugin's failure must not keep the others from seeing the event.
OBSERVERS = frozenset({"hookgate_delivery_outcome"})


@dataclass(frozen=True)
class PluginInfo:
    name: str
    hooks: list[str]
    distribution: str | None


class Hooks:
    """The loaded plugins, the component registry they filled, and trio-friendly hook calls."""

    def __init__(self, extra_plugins: Iterable[object] = (), *, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if load_entry_points:
            self.pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        for plugin in extra_plugins:
            self.pm.register(plugin)
        self.registry = ComponentRegistry()
        for impl in self.pm.hook.hookgate_register_components.get_hookimpls():
            before = set(self.registry.types)
            result = impl.function(registry=self.registry)
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()  # never awaited: say why instead of warning about it
                raise TypeError(
                    f"plugin {impl.plugin_name!r}: hookgate_register_components must be a plain def, "
                    "not async: it runs when the plugins load, before there is an event loop"
                )
            for key in set(self.registry.types) - before:
                ctype = self.registry.types[key]
                self.registry.types[key] = type(ctype)(
                    ctype.kind, ctype.name, ctype.config_type, ctype.factory, impl.plugin_name
                )
        self.hook = self.pm.hook

    def register(self, plugin: object, name: str | None = None) -> None:
        self.pm.register(plugin, name=name)

    async def call(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call every implementation in pluggy's order and return the non-None results.

        Each one runs to completion (awaited, if it is a coroutine) before the next starts, so sync
        and async implementations keep their order. For observer hooks, a failing implementation
        is logged and the others still run; for the rest the exception propagates.
        """
        isolated = hook_name in OBSERVERS
        results: list[Any] = []
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            try:
                result = impl.function(**{k: kwargs[k] for k in impl.argnames})
                if inspect.isawaitable(result):
                    result = await result
            except Exception:
                if not isolated:
                    raise
                log.exception("plugin %r failed in %s", impl.plugin_name, hook_name)
                continue
            if result is not None:
                results.append(result)
        return results

    async def call_first(self, hook_name: str, **kwargs: Any) -> Any:
        """Call implementations in order until one gives a non-None result (awaiting as needed)."""
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            result = impl.function(**{k: kwargs[k] for k in impl.argnames})
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                return result
        return None

    async def first_rejection(self, hook_name: str, **kwargs: Any) -> Rejection | None:
        for result in await self.call(hook_name, **kwargs):
            if isinstance(result, Rejection):
                return result
        return None

    async def chain(self, hook_name: str, value_arg: str, value: Any, **kwargs: Any) -> Any:
        """Pass a value through every implementation in turn; None leaves it unchanged."""
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            args = {value_arg: value, **kwargs}
            result = impl.function(**{k: args[k] for k in impl.argnames})
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                value = result
        return value

    def plugins(self) -> list[PluginInfo]:
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            hooks = sorted(
                caller.name
                for caller in self.pm.get_hookcallers(plugin) or []
                if caller.name.startswith("hookgate_")
            )
            dist = dists.get(id(plugin))
            out.append(PluginInfo(name, hooks, f"{dist.project_name} {dist.version}" if dist else None))
        return sorted(out, key=lambda p: p.name)
