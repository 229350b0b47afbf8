"""Hook results as pluggy returns them: values, or the coroutines of async implementations."""

from __future__ import annotations

import inspect
from collections.abc import Sequence


async def awaited(results: Sequence[object]) -> list[object]:
    """Each result, in order, awaited if it is awaitable (the coroutine of an async implementation).

    If one raises (or the task is cancelled), the coroutines not yet awaited are closed, so none is
    left to warn that it was never awaited.
    """
    values: list[object] = []
    for i, result in enumerate(results):
        try:
            values.append(await result if inspect.isawaitable(result) else result)
        except BaseException:
            close_awaitables(results[i + 1 :])
            raise
    return values


def close_awaitables(results: Sequence[object]) -> bool:
    """Close the coroutines among `results` without running them; whether there was any awaitable."""
    found = False
    for result in results:
        if inspect.isawaitable(result):
            found = True
            if inspect.iscoroutine(result):
                result.close()
    return found
