"""The asyncio loop nats-py runs on, in a thread of its own, and the crossing into it from trio.

nats-py is asyncio-only, and running it under trio-asyncio measured 5.6x slower than native. So the
client lives on a private asyncio loop in a dedicated thread, and trio code crosses into it with
`NatsLoop.run`. A crossing costs a fraction of a millisecond, so callers batch: every operation of
the bridge takes or returns many messages per crossing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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

    def _start_thread(self) -> None:
        self._thread.start()

    async def _stop_thread(self) -> None:
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

        If trio stops waiting (cancelled) when the coroutine has finished, or finishes anyway,
        its result goes to `abandoned` on the nats loop instead of being lost.
        """
        future = asyncio.run_coroutine_threadsafe(fn(*args), self._loop)
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                self._trio_token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            if abandoned is not None:
                future.add_done_callback(functools.partial(self._hand_over, abandoned))
            raise
        return future.result()

    def _hand_over(
        self, abandoned: Callable[[T], Coroutine[Any, Any, None]], future: concurrent.futures.Future[T]
    ) -> None:
        if not future.cancelled() and future.exception() is None:
            asyncio.run_coroutine_threadsafe(abandoned(future.result()), self._loop)

    def submit(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Start a coroutine function on the nats loop without waiting for it. Calls submitted or
        run from trio start on the nats loop in the order they were made."""
        asyncio.run_coroutine_threadsafe(fn(*args), self._loop)

    def call_in_trio(self, fn: Callable[..., object], *args: object) -> None:
        """Have trio call `fn(*args)` soon; from the nats thread. Nothing happens once trio ended."""
        with contextlib.suppress(trio.RunFinishedError):
            self._trio_token.run_sync_soon(fn, *args)
