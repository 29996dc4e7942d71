"""Admission and fair shares of Triton (gateway/ner_gateway/core/scheduling.py), on the event loop alone."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ner_gateway.core.scheduling import Admission, AdmissionLimits, FairScheduler, plan_calls
from ner_gateway.errors import DeadlineExceeded, Overloaded


@pytest.mark.parametrize(("lengths", "rows", "tokens", "expected"), [
    ([5, 3, 9, 4], 32, 1000, [[1, 3, 0, 2]]),  # sorted by length, one call
    ([5, 3, 9, 4], 2, 1000, [[1, 3], [0, 2]]),  # max rows
    ([512] * 5, 32, 2048, [[0, 1, 2, 3], [4]]),  # 4 x 512 = 2048 tokens per call
    ([10, 10, 600], 32, 512, [[0, 1], [2]]),  # a window longer than the share still goes, alone
    ([], 32, 512, []),
])
def test_plan_calls(lengths: list[int], rows: int, tokens: int, expected: list[list[int]]) -> None:
    assert plan_calls(lengths, rows, tokens) == expected


def test_admission_refuses_past_its_limits_with_a_retry_hint() -> None:
    admission = Admission(AdmissionLimits(max_requests=2, max_windows=10, retry_after_ms=150))
    with admission.request(), admission.request():
        with pytest.raises(Overloaded) as refused, admission.request():
            pass
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == "requests" and refused.value.retry_after_ms == 150
    assert "retry in 150 ms" in str(refused.value)
    with admission.request():  # places come back when requests end
        pass
    with admission.windows_of(25):  # one request larger than the limit is served when it is alone
        with pytest.raises(Overloaded, match="windows: limit 10"), admission.windows_of(1):
            pass
    with admission.windows_of(6), admission.windows_of(4):
        assert admission.windows == 10
    assert admission.requests == 0 and admission.windows == 0


async def settle() -> None:
    """Let every task that can run, run (a grant wakes its waiter a few loop turns later)."""
    await asyncio.sleep(0.01)


async def _hold(scheduler: FairScheduler, owner: object, tokens: int, release: asyncio.Event, log: list[str],
                name: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with scheduler.call(owner, tokens, deadline):
        log.append(name)
        await release.wait()


async def test_a_large_request_holds_one_share_and_small_calls_overtake_it() -> None:
    scheduler = FairScheduler(capacity_tokens=4096, request_tokens=2048)
    large, small = object(), object()
    release = {name: asyncio.Event() for name in ("L1", "L2", "L3", "S")}
    log: list[str] = []
    tasks = [asyncio.create_task(_hold(scheduler, large, 2048, release[n], log, n)) for n in ("L1", "L2", "L3")]
    await settle()
    assert log == ["L1"] and scheduler.waiting_calls == 2  # the large request's next calls wait for its own
    tasks.append(asyncio.create_task(_hold(scheduler, small, 40, release["S"], log, "S")))
    await settle()
    assert log == ["L1", "S"]  # a small call passes the large request's waiting ones at once
    release["L1"].set()
    await settle()
    assert log == ["L1", "S", "L2"] and scheduler.inflight == 2048 + 40
    for event in release.values():
        event.set()
    await asyncio.gather(*tasks)
    assert log == ["L1", "S", "L2", "L3"] and scheduler.inflight == 0 and scheduler.waiting_calls == 0


async def test_the_least_served_request_goes_first_when_triton_is_full() -> None:
    scheduler = FairScheduler(capacity_tokens=100, request_tokens=100)
    a, b, c = object(), object(), object()
    release = {name: asyncio.Event() for name in ("a1", "a2", "b1", "c1")}
    log: list[str] = []
    tasks = [asyncio.create_task(_hold(scheduler, a, 60, release["a1"], log, "a1"))]
    await settle()
    tasks += [asyncio.create_task(_hold(scheduler, owner, 60, release[name], log, name))
              for owner, name in ((a, "a2"), (b, "b1"), (c, "c1"))]
    await settle()
    assert log == ["a1"]  # full: everyone waits
    release["a1"].set()
    await settle()
    assert log == ["a1", "b1"]  # a2 came first, but b has had nothing yet
    for event in release.values():
        event.set()
    await asyncio.gather(*tasks)
    assert log == ["a1", "b1", "c1", "a2"]  # c has had nothing yet, a has had 60 tokens
    assert scheduler.inflight == 0


async def test_a_call_whose_deadline_passes_while_waiting_is_never_granted() -> None:
    scheduler = FairScheduler(capacity_tokens=100, request_tokens=100)
    release, log = asyncio.Event(), []
    holder = asyncio.create_task(_hold(scheduler, object(), 100, release, log, "holder"))
    await settle()
    with pytest.raises(DeadlineExceeded, match="waiting for the inference server"):
        await _hold(scheduler, object(), 10, asyncio.Event(), log, "late", timeout_s=0.05)
    assert scheduler.waiting_calls == 0
    cancelled = asyncio.create_task(_hold(scheduler, object(), 10, asyncio.Event(), log, "cancelled"))
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    release.set()
    await holder
    assert log == ["holder"] and scheduler.inflight == 0 and scheduler.waiting_calls == 0
