"""stop_tasks ends a loop that swallows a cancel (as redis-py's waits can on Python 3.11.2)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from unbroken.aio import stop_tasks


async def _swallows(times: int, seen: list[int]) -> None:
    """A poll loop whose wait turns the first ``times`` cancels into "nothing yet"."""
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            seen.append(1)
            if len(seen) > times:
                raise


def test_a_swallowed_cancel_is_followed_by_another() -> None:
    async def main() -> tuple[bool, int]:
        seen: list[int] = []
        task = asyncio.create_task(_swallows(2, seen))
        await asyncio.sleep(0.02)
        # a single cancel and an await would wait for ever here
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.3)
        assert not done
        ok = await stop_tasks([task], timeout_s=5.0)
        return ok, len(seen)

    ok, cancels = asyncio.run(main())
    assert ok and cancels == 3


def test_a_task_that_never_stops_is_named_and_left(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ok = asyncio.run(asyncio.wait_for(_run_bounded(), timeout=10))
    assert ok is False
    assert "the loop did not stop within 0.3 s: stubborn" in caplog.text


async def _run_bounded() -> bool:
    """A task that ignores every cancel until a flag says stop (set after stop_tasks gave up)."""
    flag = {"stop": False}

    async def stubborn() -> None:
        while not flag["stop"]:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    ok = await stop_tasks([task], timeout_s=0.3, what="the loop")
    flag["stop"] = True
    await task
    return ok


def test_errors_and_finished_tasks_are_dropped() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    async def main() -> bool:
        a = asyncio.create_task(fails())
        b = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0.01)
        return await stop_tasks([a, b], timeout_s=2.0)

    assert asyncio.run(main()) is True
