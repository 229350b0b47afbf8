"""The plugin manager: loads plugins from the `hookgate` entry points and calls hooks under trio.

Every hook call goes through pluggy's caller, so wrappers (`wrapper=True`), `firstresult`,
tracing and call monitoring work as pluggy documents them. An `async def` implementation returns a
coroutine, which pluggy takes as its result like any other; the core then awaits the results in
pluggy's order (as datasette does). See "Async implementations and wrappers" in CONTRIBUTING.md.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from hookgate import hookspecs
from hookgate.plugin_host.results import awaited, close_awaitables
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
        self._register_components()
        self.hook = self.pm.hook

    def _register_components(self) -> None:
        # One plugin at a time, so each component type records the plugin that registered it.
        for plugin_name, caller in self._one_by_one("hookgate_register_components"):
            before = set(self.registry.types)
            results = caller(registry=self.registry)
            if close_awaitables(results):
                raise TypeError(
                    f"plugin {plugin_name!r}: hookgate_register_components must be a plain def, "
                    "not async: it runs when the plugins load, before there is an event loop"
                )
            for key in set(self.registry.types) - before:
                self.registry.types[key] = dataclasses.replace(self.registry.types[key], plugin=plugin_name)

    def register(self, plugin: object, name: str | None = None) -> None:
        self.pm.register(plugin, name=name)

    async def call(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call the hook and return the non-None results, each awaited if it is awaitable.

        pluggy runs the implementations in its order; the coroutines of async ones are then awaited
        in that same order. An exception propagates, except for observer hooks: there each
        implementation is called on its own, and a failing one is logged while the others still run.
        """
        if hook_name in OBSERVERS:
            return await self._observe(hook_name, kwargs)
        results = await awaited(self._caller(hook_name)(**kwargs))
        return [result for result in results if result is not None]

    async def call_first(self, hook_name: str, **kwargs: Any) -> Any:
        """Call a `firstresult` hook and return its answer, awaited if it is awaitable.

        pluggy stops at the first implementation that returns something other than None. An async
        implementation always does (its coroutine), so its awaited answer is final, even None.
        """
        (result,) = await awaited([self._caller(hook_name)(**kwargs)])
        return result

    async def first_rejection(self, hook_name: str, **kwargs: Any) -> Rejection | None:
        for result in await self.call(hook_name, **kwargs):
            if isinstance(result, Rejection):
                return result
        return None

    async def chain(self, hook_name: str, value_arg: str, value: Any, **kwargs: Any) -> Any:
        """Pass a value through every implementation in turn; None leaves it unchanged.

        Each implementation is a pluggy call of its own (with the hook's wrappers), awaited before
        the next one is called, since it sees the value the previous one returned.
        """
        for _, caller in self._one_by_one(hook_name):
            for result in await awaited(caller(**{value_arg: value, **kwargs})):
                if result is not None:
                    value = result
        return value

    async def _observe(self, hook_name: str, kwargs: dict[str, Any]) -> list[Any]:
        results: list[Any] = []
        for plugin_name, caller in self._one_by_one(hook_name):
            try:
                results += [result for result in await awaited(caller(**kwargs)) if result is not None]
            except Exception:
                log.exception("plugin %r failed in %s", plugin_name, hook_name)
        return results

    def _caller(self, hook_name: str) -> pluggy.HookCaller:
        caller: pluggy.HookCaller = getattr(self.pm.hook, hook_name)  # pluggy's relay names each hook
        return caller

    def _one_by_one(self, hook_name: str) -> list[tuple[str, pluggy.HookCaller]]:
        """For each implementation, in pluggy's call order, a caller of it alone and the hook's wrappers."""
        impls = [
            impl
            for impl in reversed(self._caller(hook_name).get_hookimpls())
            if not (impl.wrapper or impl.hookwrapper)
        ]
        plugins = [impl.plugin for impl in impls]
        callers = []
        for impl in impls:
            others = [plugin for plugin in plugins if plugin is not impl.plugin]
            callers.append((impl.plugin_name, self.pm.subset_hook_caller(hook_name, others)))
        return callers

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
