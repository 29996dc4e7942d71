"""Admission (core/admission.py) and the coalescing batcher (core/batching.py), on the event loop alone: the
backend is an in-process implementation of the core's port that holds each call until the test releases it (the
same properties on a real Triton: test_load_shedding.py, test_batching.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import grpc
import numpy as np
import pytest

from ner_gateway.core.admission import Admission, AdmissionLimits
from ner_gateway.core.batching import CALL_WEIGHT, Batcher, BatchLimits
from ner_gateway.core.deadline import Deadline
from ner_gateway.core.errors import DeadlineExceeded, InferenceFailed, Overloaded, TooLate
from ner_gateway.core.ports import ServedModel
from ner_gateway.transport.status import status_of

from conftest import wait_for


def test_admission_refuses_past_its_limits_with_a_retry_hint() -> None:
    admission = Admission(AdmissionLimits(max_requests=2, max_windows=10, retry_after_ms=150))
    with admission.request(), admission.request():
        with pytest.raises(Overloaded) as refused, admission.request():
            pass
    assert status_of(refused.value) is grpc.StatusCode.RESOURCE_EXHAUSTED
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


class HeldBackend:
    """The inference port: each call waits until released; its logits echo the input ids (class 0) and the row's
    position in the call (class 1), so each request can check it got its own rows back."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, asyncio.Future[None]]] = []
        self.cancelled = 0

    async def infer(self, model: ServedModel, inputs: Mapping[str, np.ndarray], output: str, deadline: Deadline,
                    request_id: str = "") -> np.ndarray:
        ids = inputs["input_ids"]
        release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.calls.append((ids, release))
        try:
            await release
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        position = np.broadcast_to(np.arange(len(ids))[:, None], ids.shape)
        return np.stack([ids, position], axis=-1).astype(np.float32)

    def model_ready(self, name: str) -> bool:
        return True

    def release(self, call: int, error: Exception | None = None) -> None:
        future = self.calls[call][1]
        future.set_exception(error) if error else future.set_result(None)


def encode(rows: Sequence[Sequence[int]], width: int) -> dict[str, np.ndarray]:
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row
    return {"input_ids": ids}


class Observed:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gone: dict[str, int] = {}

    def call_formed(self, rows: int, tokens: int, waited_s: Sequence[float]) -> None:
        self.calls.append(rows)

    def abandoned(self, stage: str, windows: int) -> None:
        self.gone[stage] = self.gone.get(stage, 0) + windows


def batcher(backend: HeldBackend, observed: Observed | None = None, *, max_rows: int = 32, call_tokens: int = 1000,
            request_tokens: int = 1000, max_calls: int = 1, buckets: tuple[int, ...] = (),
            cancel_calls: bool = True, overlap_rows: int = 1, overlap_wait_s: float = 0.0) -> Batcher:
    limits = BatchLimits(max_rows=max_rows, call_tokens=call_tokens, request_tokens=request_tokens,
                         max_calls=max_calls, buckets=buckets, cancel_calls=cancel_calls, overlap_rows=overlap_rows,
                         overlap_wait_s=overlap_wait_s)
    return Batcher(backend, ServedModel("m", "1", max_rows), "logits", encode, limits, observed)


async def settle() -> None:
    """Let every callback and task that can run, run."""
    for _ in range(5):
        await asyncio.sleep(0)


def send(batcher: Batcher, rows: list[list[int]], timeout_s: float = 10.0) -> asyncio.Task[list[np.ndarray]]:
    deadline = Deadline.after(timeout_s)
    lengths = [len(row) for row in rows]
    return asyncio.ensure_future(batcher.infer(rows, lengths, lengths, deadline))


async def test_requests_that_wait_for_a_call_leave_together_and_each_gets_its_own_rows() -> None:
    backend = HeldBackend()
    queue = batcher(backend)
    first = send(queue, [[1, 2, 3]])
    await settle()
    assert len(backend.calls) == 1  # Triton idle: the first request leaves at once, alone
    others = [send(queue, [[10 * k + 1] * (k + 1), [10 * k + 2]]) for k in range(1, 5)]
    await settle()
    assert len(backend.calls) == 1  # the model's one call is in flight: the others wait in the queue
    backend.release(0)
    await settle()
    assert len(backend.calls) == 2 and backend.calls[1][0].shape == (8, 5)  # 4 requests x 2 windows, one call
    backend.release(1)
    assert [row[:, 0].tolist() for row in await first] == [[1, 2, 3]]
    for k, task in enumerate(others, start=1):
        answer = await task
        assert [row[:, 0].tolist() for row in answer] == [[10 * k + 1] * (k + 1), [10 * k + 2]]


async def test_a_sentence_overtakes_the_queued_windows_of_a_large_request() -> None:
    backend, observed = HeldBackend(), Observed()
    queue = batcher(backend, observed, max_rows=4, request_tokens=8, max_calls=2)
    large = send(queue, [[7] * 4 for _ in range(6)])  # 6 windows of 4 tokens; its share: 2 windows in flight
    await settle()
    assert [ids.shape for ids, _ in backend.calls] == [(2, 4)]  # its share, though the call had room for 4
    small = send(queue, [[9, 9]])
    await settle()
    assert [ids.shape for ids, _ in backend.calls] == [(2, 4), (1, 2)]  # the second call goes to the sentence
    backend.release(1)
    assert [row[:, 0].tolist() for row in await small] == [[9, 9]]
    assert not backend.calls[0][1].done()  # answered while the large request's first call was still in flight
    await release_all(backend, [large])
    assert len(await large) == 6 and [ids.shape[0] for ids, _ in backend.calls] == [2, 1, 2, 2]
    assert observed.gone == {}


async def release_all(backend: HeldBackend, tasks: list[asyncio.Future]) -> None:  # type: ignore[type-arg]
    """Answer every call, those that the answers let leave included, until ``tasks`` are done."""
    while not all(task.done() for task in tasks):
        for _, future in backend.calls:
            if not future.done():
                future.set_result(None)
        await settle()


async def test_the_expected_wait_follows_the_queue_and_admission_weighs_each_deadline_against_it() -> None:
    """``row_s``: a call's duration per row (the first call's whole, then a moving average). ``expected_wait_s``:
    half the rows in flight over the model's calls, then the first row of each queued request none of whose rows
    has left (the fair order sends those first) and the request's own, over the model's calls but never less than
    the one call of up to ``max_rows`` rows that carries its row. Admission answers a deadline shorter than that
    RESOURCE_EXHAUSTED with the retry hint, one shorter than the model's fastest call so far DEADLINE_EXCEEDED (no
    wait would help), and admits the rest; the refusals end as the queue drains."""
    loop = asyncio.get_running_loop()
    backend = HeldBackend()
    queue = batcher(backend, max_rows=4, max_calls=2)
    admission = Admission(AdmissionLimits(max_requests=100, max_windows=1000, retry_after_ms=150))
    assert queue.expected_wait_s() == 0.0  # nothing measured yet: everything is admitted

    timed = send(queue, [[1], [2]])  # one call of 2 rows, held about 50 ms
    await settle()
    held_from = loop.time()
    await asyncio.sleep(0.05)
    backend.release(0)
    await timed
    held_s = loop.time() - held_from
    assert queue.row_s == pytest.approx(held_s / 2, rel=0.25)
    assert queue.fastest_call_s == pytest.approx(held_s, rel=0.25)

    def expected(unserved: int, in_flight: int) -> float:
        return queue.wait_scale * queue.row_s * (in_flight / 2 / 2 + max((unserved + 1) / 2, min(unserved + 1, 4)))

    large = send(queue, [[7] * 3] * 6)  # 6 rows: 4 in one call, 2 in another; none left queued
    await settle()
    sentences = [send(queue, [[9]]) for _ in range(9)]  # no call free: all 9 queued
    await settle()
    assert [ids.shape[0] for ids, _ in backend.calls[1:]] == [4, 2]
    assert queue.expected_wait_s() == pytest.approx(expected(9, 6))
    queue.row_s, queue.fastest_call_s, queue.wait_scale = 0.01, 0.004, 1.0  # round thresholds from here
    assert queue.expected_wait_s() == pytest.approx(0.065)
    for short_s in (0.05, 0.005):  # a retry later can pass
        with pytest.raises(Overloaded) as refused:
            admission.check_time(Deadline.after(short_s), queue.fastest_call_s, queue.expected_wait_s())
        assert status_of(refused.value) is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (refused.value.reason, refused.value.retry_after_ms) == ("queue", 150)
        assert str(refused.value).startswith("the gateway's queue for this model would take ~65 ms, more than the ")
    admission.check_time(Deadline.after(0.5), queue.fastest_call_s, queue.expected_wait_s())  # admitted
    with pytest.raises(TooLate, match=r"the \d ms left of the deadline are less than this model's fastest call so "
                                      r"far \(~4 ms\)"):
        admission.check_time(Deadline.after(0.003), queue.fastest_call_s, queue.expected_wait_s())

    gone = send(queue, [[5]], timeout_s=0.01)  # queued, then out of time: it no longer counts
    await settle()
    assert queue.expected_wait_s() == pytest.approx(expected(10, 6))
    with pytest.raises(DeadlineExceeded):
        await gone
    assert queue.expected_wait_s() == pytest.approx(expected(9, 6))
    backend.release(1)  # the large request's 4 rows: the sentences' first 4 go
    await settle()
    assert queue.expected_wait_s() == pytest.approx(expected(5, 6))
    await release_all(backend, [large, *sentences])
    assert queue.expected_wait_s() == pytest.approx(queue.wait_scale * queue.row_s)  # idle: one call of its own
    assert queue.fastest_call_s < 0.004  # the calls released at once


async def test_the_estimate_learns_how_long_one_row_requests_actually_waited() -> None:
    """``wait_scale``: a moving average of one-row requests' waits against what the queue's formula said when each
    came (what the formula leaves out, such as a busy event loop, shows as a ratio above 1). A request that gives
    up counts only where it had already waited longer than the scale says; requests of several rows never."""
    loop = asyncio.get_running_loop()
    backend = HeldBackend()
    queue = batcher(backend, max_calls=1)
    first = send(queue, [[1]])
    await settle()
    backend.release(0)
    await first
    queue.row_s, queue.wait_scale = 0.01, 1.0  # the formula's numbers from here: round
    sent = loop.time()
    held = send(queue, [[2]])  # alone: its own call, 10 ms; held in flight
    await settle()
    waiting = send(queue, [[3]])  # half the row in flight, then its own call: 1.5 x 10 ms
    await settle()
    await asyncio.sleep(0.06)
    backend.release(1)
    await held
    held_ratio = (loop.time() - sent) / 0.010
    await settle()
    backend.release(2)
    await waiting
    ratio = (loop.time() - sent) / 0.015
    after_held = 1 + CALL_WEIGHT * (held_ratio - 1)
    assert ratio > 4 and queue.wait_scale == pytest.approx(after_held + CALL_WEIGHT * (ratio - after_held), rel=0.1)
    learnt = queue.wait_scale

    quick = send(queue, [[4]], timeout_s=0.001)  # gives up at once: it had not waited longer than the scale says
    with pytest.raises(DeadlineExceeded):
        await quick
    several = send(queue, [[5], [6]])
    await settle()
    backend.release(len(backend.calls) - 1)
    await several
    assert queue.wait_scale == learnt
    queue.wait_scale = 1.0
    queue.row_s = 0.001
    stuck = send(queue, [[7]], timeout_s=0.05)  # a call held past its deadline: it waited 50 ms against ~1.5 ms
    with pytest.raises(DeadlineExceeded):
        await stuck
    assert queue.wait_scale > 1 + CALL_WEIGHT * 20
    await release_all(backend, [])


async def test_a_call_beside_another_waits_for_a_fuller_batch_or_a_bounded_time() -> None:
    """With a call in flight, the next starts once ``overlap_rows`` rows are queued, or when the call ends, or after
    ``overlap_wait_s``: fewer, fuller calls, and no row waits long for one."""
    backend, observed = HeldBackend(), Observed()
    queue = batcher(backend, observed, max_calls=2, overlap_rows=3, overlap_wait_s=3600.0)  # no row gives up here
    first = send(queue, [[1]])
    await settle()
    assert observed.calls == [1]  # nothing in flight: the first call leaves at once
    second = send(queue, [[2]])
    await settle()
    assert observed.calls == [1]  # one row queued: it waits, though the model has room for a second call
    third = send(queue, [[3], [3]])
    await settle()
    assert observed.calls == [1, 3]  # three rows queued: the second call starts beside the first
    late = send(queue, [[4]])
    await settle()
    backend.release(0)
    await settle()
    assert observed.calls == [1, 3]  # one call still in flight: the lone row waits on
    backend.release(1)
    await settle()
    assert observed.calls == [1, 3, 1]  # none in flight: it leaves at once, however few
    await release_all(backend, [first, second, third, late])

    queue = batcher(backend, observed, max_calls=2, overlap_rows=3, overlap_wait_s=0.01)
    holder = send(queue, [[5]])
    await settle()
    lone = send(queue, [[6]])
    await settle()
    assert observed.calls == [1, 3, 1, 1]
    await wait_for(lambda: len(observed.calls) == 5, 5, "the lone row's call")  # it waited 10 ms, then left
    assert not backend.calls[-2][1].done()  # beside the holder's call, still in flight
    await release_all(backend, [holder, lone])


async def test_the_least_served_request_goes_first() -> None:
    backend = HeldBackend()
    queue = batcher(backend, max_rows=1)  # one row per call: the order of the rows is the order of the calls
    a = send(queue, [[1], [1]])
    await settle()
    b, c = send(queue, [[2]]), send(queue, [[3]])
    await settle()
    for call in range(4):
        backend.release(call)
        await settle()
    await asyncio.gather(a, b, c)
    # a's second window came first, but b and c had had nothing yet.
    assert [int(ids[0, 0]) for ids, _ in backend.calls] == [1, 2, 3, 1]


async def test_a_request_whose_deadline_passes_in_the_queue_is_never_sent() -> None:
    backend, observed = HeldBackend(), Observed()
    queue = batcher(backend, observed)
    holder = send(queue, [[1]])
    await settle()
    with pytest.raises(DeadlineExceeded, match="waiting for the inference server"):
        await send(queue, [[2], [2]], timeout_s=0.05)
    cancelled = send(queue, [[3]])
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    backend.release(0)
    await holder
    await settle()
    assert len(backend.calls) == 1 and queue.queued_requests == 0 and queue.calls_in_flight == 0
    assert observed.gone == {"queued": 3}


async def test_a_shared_call_is_cancelled_only_when_none_of_its_requests_wants_it() -> None:
    backend, observed = HeldBackend(), Observed()
    queue = batcher(backend, observed)
    holder = send(queue, [[1]])
    await settle()
    a, b = send(queue, [[2]]), send(queue, [[3], [3]])
    await settle()
    backend.release(0)
    await holder
    await settle()
    assert backend.calls[1][0].shape == (3, 1)  # a and b share the call
    a.cancel()
    await settle()
    assert backend.cancelled == 0  # b still wants it
    b.cancel()
    await settle()
    assert backend.cancelled == 1 and queue.calls_in_flight == 0
    assert observed.gone == {"in_triton": 3}


async def test_without_cancel_calls_a_call_nobody_wants_runs_to_its_end_and_holds_its_place() -> None:
    """The default (settings.triton_cancel_calls off, for Triton before 2.56): the gateway never cancels a Triton
    call; its requests leave at once, the call keeps its place until Triton answers, then the queue goes on."""
    backend, observed = HeldBackend(), Observed()
    queue = batcher(backend, observed, cancel_calls=False)
    gone = send(queue, [[2], [2]])
    await settle()
    waiting = send(queue, [[5]])
    await settle()
    gone.cancel()
    await settle()
    assert backend.cancelled == 0 and queue.calls_in_flight == 1 and observed.gone == {"in_triton": 2}
    assert len(backend.calls) == 1  # the waiting request's row waits for the place
    backend.release(0)  # Triton answers the call nobody wants: its place goes to the next call
    await settle()
    backend.release(1)
    assert [row.tolist() for row in await waiting] == [[[5.0, 0.0]]]


async def test_a_failed_call_fails_every_request_in_it_and_the_queue_goes_on() -> None:
    backend = HeldBackend()
    queue = batcher(backend)
    holder = send(queue, [[1]])
    await settle()
    a, b = send(queue, [[2]]), send(queue, [[3]])
    await settle()
    backend.release(0)
    await holder
    await settle()
    backend.release(1, InferenceFailed("inference failed"))
    for task in (a, b):
        with pytest.raises(InferenceFailed):
            await task
    after = send(queue, [[4]])
    await settle()
    backend.release(2)
    assert [row[:, 0].tolist() for row in await after] == [[4]]


async def test_with_sequence_buckets_a_call_holds_one_width() -> None:
    backend = HeldBackend()
    queue = batcher(backend, max_calls=1, buckets=(8, 16))
    deadline = Deadline.after(10)
    holder = asyncio.ensure_future(queue.infer([[1]], [1], [8], deadline))
    await settle()
    tasks = [asyncio.ensure_future(queue.infer([[5] * n], [n], [8 if n <= 8 else 16], deadline))
             for n in (3, 12, 5, 14)]
    await settle()
    await release_all(backend, [holder, *tasks])
    # 3 and 5 tokens in one call of width 8, 12 and 14 in one of 16 (the holder went alone).
    assert [ids.shape for ids, _ in backend.calls] == [(1, 8), (2, 8), (2, 16)]
