"""The crossing from trio into the nats loop (`hookgate.broker.loop.NatsLoop`), without a server."""

from __future__ import annotations

import threading

import trio

from hookgate.broker.loop import NatsLoop


async def test_a_result_produced_as_trio_gives_up_goes_to_abandoned() -> None:
    # The call finishes on the nats loop only after trio has stopped waiting for it, as when a
    # fetch takes messages in the instant its worker is cancelled. What it took must reach
    # `abandoned` (which hands messages back), not vanish with the cancelled wait.
    entered, release = threading.Event(), threading.Event()
    handed: list[list[str]] = []
    handed_over = trio.Event()
    loop = NatsLoop()

    async def take() -> list[str]:
        entered.set()
        release.wait(10)  # holds the nats loop until trio has given up
        return ["taken"]

    async def hand_back(taken: list[str]) -> None:
        handed.append(taken)
        loop.call_in_trio(handed_over.set)

    loop.start_thread()
    try:
        with trio.CancelScope() as waiting:

            async def give_up_once_entered() -> None:
                await trio.to_thread.run_sync(entered.wait, 10)
                waiting.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(give_up_once_entered)
                await loop.run(take, abandoned=hand_back)
        assert waiting.cancelled_caught
        release.set()
        with trio.fail_after(10):
            await handed_over.wait()
        assert handed == [["taken"]]
    finally:
        release.set()
        await loop.stop_thread()


async def test_a_call_trio_waits_for_returns_its_result_and_abandons_nothing() -> None:
    handed: list[int] = []
    loop = NatsLoop()

    async def answer(value: int) -> int:
        return value * 2

    async def hand_back(value: int) -> None:
        handed.append(value)

    loop.start_thread()
    try:
        assert await loop.run(answer, 21, abandoned=hand_back) == 42
    finally:
        await loop.stop_thread()
    assert handed == []
