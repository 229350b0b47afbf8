"""The asyncio loop nats-py runs on, in a thread of its own, and the crossing into it from trio.

nats-py is asyncio-only, and running it under trio-asyncio measured 5.6x slower than native. So the
client lives on a private asyncio loop in a dedicated thread, and trio code crosses into it with
`NatsLoop.run`. A crossing costs a fraction of a millisecond, so callers batch: every operation of
the bridge takes or returns many messages per crossing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class NatsLoop:
    """An asyncio loop in a daemon thread, started and stopped from trio."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats-asyncio", daemon=True)
        self._trio_token = trio.lowlevel.current_trio_token()
        self._handing_over: set[asyncio.Task[None]] = set()

    def start_thread(self) -> None:
        self._thread.start()

    async def stop_thread(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        await trio.to_thread.run_sync(self._thread.join, 5)
        if not self._thread.is_alive():
            self._loop.close()

    async def run(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        *args: Any,
        abandoned: Callable[[T], Coroutine[Any, Any, None]] | None = None,
    ) -> T:
        """Run a coroutine function on the nats loop and wait for it from trio (one crossing).

        If trio stops waiting (cancelled), the coroutine is cancelled; a result it produces anyway
        goes to `abandoned` on the nats loop instead of being lost. Exactly one side gets the
        result: the decision is taken on the nats loop, where the task finishes.
        """
        done = trio.Event()
        started: list[asyncio.Task[T]] = []

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                self._trio_token.run_sync_soon(done.set)

        def start() -> None:
            task = self._loop.create_task(fn(*args))
            task.add_done_callback(wake)
            started.append(task)

        self._loop.call_soon_threadsafe(start)
        try:
            await done.wait()
        except BaseException:
            # Runs after start(): callbacks from one thread run in the order they were scheduled.
            self._loop.call_soon_threadsafe(self._give_up, started, abandoned)
            raise
        return started[0].result()

    def _give_up(
        self, started: list[asyncio.Task[T]], abandoned: Callable[[T], Coroutine[Any, Any, None]] | None
    ) -> None:
        """On the nats loop, for a call trio stopped waiting for: cancel it, and hand over what it
        produced (now, or when it finishes in spite of the cancel)."""
        (task,) = started
        hand_over = functools.partial(self._hand_over, abandoned)
        if task.done():
            hand_over(task)
        else:
            task.cancel()
            task.add_done_callback(hand_over)

    def _hand_over(
        self, abandoned: Callable[[T], Coroutine[Any, Any, None]] | None, task: asyncio.Task[T]
    ) -> None:
        if task.cancelled() or task.exception() is not None or abandoned is None:
            return  # nothing taken, or nobody to give it to (the exception is retrieved above)
        handing = self._loop.create_task(abandoned(task.result()))
        self._handing_over.add(handing)  # a task needs a reference until it is done
        handing.add_done_callback(self._handing_over.discard)

    def submit(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Start a coroutine function on the nats loop without waiting for it. Calls submitted or
        run from trio start on the nats loop in the order they were made."""
        asyncio.run_coroutine_threadsafe(fn(*args), self._loop)

    def call_in_trio(self, fn: Callable[..., object], *args: object) -> None:
        """Have trio call `fn(*args)` soon; from the nats thread. Nothing happens once trio ended."""
        with contextlib.suppress(trio.RunFinishedError):
            self._trio_token.run_sync_soon(fn, *args)
