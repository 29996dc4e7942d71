"""Fire-and-forget tasks are held until done, their failures logged, and cancelled on shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from ner_gateway.transport.background import BackgroundTasks


async def test_a_started_task_is_held_until_done() -> None:
    tasks = BackgroundTasks()
    release = asyncio.Event()
    finished: list[str] = []

    async def work() -> None:
        await release.wait()
        finished.append("done")

    tasks.start(work(), name="work")  # no reference kept by the caller
    gc.collect()
    assert tasks.running == 1
    release.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert finished == ["done"] and tasks.running == 0


async def test_a_failure_is_logged_with_the_task_name(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks()

    async def fail() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="ner_gateway.transport.background"):
        tasks.start(fail(), name="health-follows-triton")
        for _ in range(5):
            await asyncio.sleep(0)
    assert tasks.running == 0
    (record,) = caplog.records
    assert record.getMessage() == "background task health-follows-triton failed"
    assert record.exc_info is not None and "boom" in str(record.exc_info[1])


async def test_cancel_all_ends_what_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks()
    started = [tasks.start(asyncio.sleep(60), name=f"sleep-{i}") for i in range(3)]
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="ner_gateway.transport.background"):
        await tasks.cancel_all()
    assert tasks.running == 0 and all(task.cancelled() for task in started)
    assert not caplog.records  # a cancellation is not a failure
