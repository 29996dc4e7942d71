"""Coalesced inference calls: one queue of windows per model, one Triton call for the windows of many requests.

Every request puts its windows (model inputs) in its model's queue and waits. Whenever the model has room (fewer
than ``max_calls`` calls in flight, sized from its instances), the batcher takes queued windows of any requests,
up to ``max_rows`` rows and ``call_tokens`` padded tokens, in fair order: the request that has had the fewest
tokens so far goes first, so a sentence overtakes the next windows of a long document, and no request holds more
than ``request_tokens`` in the inference server at once. One call carries them all; each request gets its rows
back. Triton's own queue stays short, so the order, the deadlines and cancellation are decided here, where they
are exact (the design of text-embeddings-inference's router):

- a request whose deadline passes, whose client cancels or one of whose calls fails leaves the queue at once:
  its windows not yet sent are never sent (counted as abandoned, "queued"); a call already in flight runs on
  for the requests that still want it (its rows of that request count as "in_triton"), and once none does it is
  cancelled (``cancel_calls``) or, by default, runs to its end and its answer is dropped (Triton before 2.56 can
  crash on a cancelled gRPC call);
- results never depend on batch neighbours: each row is padded with attention mask 0, and the model runs rows
  alone where its numerics need it (dynamic int8);
- models with sequence buckets (TensorRT engines) get calls of one bucket each, so each call has one shape.

Calls are formed when a request arrives or a call ends, after the callbacks that are ready run (``call_soon``),
so requests that arrive together go together. The first call always leaves at once; while one is in flight, a
further call starts only with ``overlap_rows`` rows queued (a batch worth a call's fixed cost in the gateway,
Triton's frontend and its stub, ~1.5 ms of CPU on a CPU host) or once the queued rows have waited ``overlap_wait_s``
(a few such costs). A cheap model's call usually ends first, and its successor takes every row that queued
meanwhile: fewer, fuller calls. An expensive model's idle instance waits no longer than ``overlap_wait_s``.
``InputEncoder`` turns a call's rows into the model's input arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, Span

from ner_gateway.core.deadline import Deadline
from ner_gateway.core.errors import ConfigurationError, DeadlineExceeded
from ner_gateway.core.ports import Float32Array, InferenceBackend, Int64Array, ServedModel
from ner_gateway.core.tokenizing import SpecialTokens, TextTokens
from ner_gateway.core.windowing import Window, window_rows
from ner_gateway.observability.tracing import TRACER

CALL_WEIGHT = 0.05  # of the latest call in row_s (after the first, taken whole): follows load within ~20 calls
MAX_WAIT_SCALE = 10.0  # wait_scale's bound: a burst of late answers cannot make it refuse all for long
# Without cancellation (BatchLimits.cancel_calls), a call's timeout in Triton is its requests' latest deadline plus
# this: its requests leave at their own deadlines, and the gateway does not cancel the call (no client timeout)
# unless Triton hangs.
UNCANCELLED_CALL_GRACE_S = 30.0

# Content token ids of the rows and the width to pad them to -> the model's input arrays.
RowEncoder = Callable[[Sequence[Sequence[int]], int], dict[str, Int64Array]]
# Triton input name -> what fills it.
_INPUT_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


class InputEncoder:
    """Rows of content token ids -> the model's right-padded [rows, width] int64 inputs: each row wrapped in the
    tokenizer's special tokens, padding with attention_mask 0 (``artifact.padding``'s rule)."""

    def __init__(self, special: SpecialTokens, input_names: Sequence[str]) -> None:
        unknown = set(input_names) - set(_INPUT_FIELDS)
        if unknown:
            raise ConfigurationError(f"model inputs {sorted(unknown)} cannot be produced by a tokenizer")
        self.special = special
        self.input_names = list(input_names)
        self._needs_type_ids = "token_type_ids" in input_names

    def encode(self, contents: Sequence[Sequence[int]], width: int) -> dict[str, Int64Array]:
        """``width`` is the longest row, or with sequence buckets (a TensorRT engine's profile lengths, which take
        no ragged input) the smallest bucket that holds it, so that calls of one bucket share a shape. Without
        buckets the model pads each length group itself."""
        rows = len(contents)
        ids = np.zeros((rows, width), dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)
        type_ids = np.zeros((rows, width), dtype=np.int64) if self._needs_type_ids else None
        special = self.special
        prefix, suffix = special.prefix_ids, special.suffix_ids
        for row, content in enumerate(contents):
            end = len(prefix) + len(content)
            ids[row, : len(prefix)] = prefix
            ids[row, len(prefix) : end] = content
            ids[row, end : end + len(suffix)] = suffix
            mask[row, : end + len(suffix)] = 1
            if type_ids is not None:
                type_ids[row, : len(prefix)] = special.prefix_types
                type_ids[row, len(prefix) : end] = special.content_type_id
                type_ids[row, end : end + len(suffix)] = special.suffix_types
        by_field = {"ids": ids, "type_ids": type_ids, "attention_mask": mask}
        return {name: by_field[_INPUT_FIELDS[name]] for name in self.input_names}  # type: ignore[misc]

    def windows(self, tokens: Sequence[TextTokens], windows: Sequence[Window], buckets: tuple[int, ...] = ()
                ) -> dict[str, Int64Array]:
        """The inputs of ``windows`` in one array each (what a call of just these windows sends): padded to the widest
        row's own width, as a call pads them."""
        rows = window_rows(tokens, windows, self.special.count, buckets)
        return self.encode(rows.contents, max(rows.widths))


@dataclass(frozen=True)
class BatchLimits:
    max_rows: int  # the model's max_batch_size
    call_tokens: int  # padded tokens (rows x widest) per call; one row always fits
    request_tokens: int  # tokens of one request in flight at once; one row always fits
    max_calls: int  # calls in flight for the model
    buckets: tuple[int, ...] = ()  # sequence buckets: a call holds rows of one width
    cancel_calls: bool = False  # cancel a call in flight that no request wants any more; else it runs to its end
    overlap_rows: int = 1  # rows queued before a call starts beside another in flight...
    overlap_wait_s: float = 0.0  # ...or the longest those rows wait for more


class BatchObserver(Protocol):
    """What the batcher reports (metrics: ``observability.metrics.ModelMetrics``)."""

    def call_formed(self, rows: int, tokens: int, waited_s: Sequence[float]) -> None:
        """A call left with ``rows`` rows and ``tokens`` padded tokens; ``waited_s``: each row's time queued."""

    def abandoned(self, stage: str, windows: int) -> None:
        """``windows`` of a request that gave up were never sent (queued) or were in flight (in_triton)."""


class _Unobserved:
    def call_formed(self, rows: int, tokens: int, waited_s: Sequence[float]) -> None:
        pass

    def abandoned(self, stage: str, windows: int) -> None:
        pass


class _Job:
    """One request's windows: what is left to send, what is in flight, and the answers so far."""

    __slots__ = ("calls", "deadline", "done", "inflight", "lengths", "next", "order", "queued_at", "remaining",
                 "request_id", "results", "rows", "seq", "served", "span", "widths")

    def __init__(self, rows: Sequence[Sequence[int]], lengths: Sequence[int], widths: Sequence[int], deadline: Deadline,
                 request_id: str, seq: int, now: float, span: Span | None) -> None:
        self.rows, self.lengths, self.widths = rows, lengths, widths
        # Sorted by width, so that the request's rows that share a call have similar lengths.
        self.order = sorted(range(len(rows)), key=widths.__getitem__) if len(rows) > 1 else [0]
        self.next = 0
        self.served = 0  # tokens sent so far (the fair order)
        self.inflight = 0  # tokens in flight now (the request's share)
        self.deadline = deadline
        self.request_id = request_id
        self.seq = seq
        self.queued_at = now
        self.results: list[Float32Array | None] = [None] * len(rows)
        self.remaining = len(rows)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.calls: set[_Call] = set()
        self.span = span  # the request's triton.infer span, when it is recorded

    def key(self) -> tuple[int, int]:
        return self.served, self.seq

    def __lt__(self, other: _Job) -> bool:
        return self.key() < other.key()


class _Call:
    __slots__ = ("entries", "task", "tokens", "wanted", "width")

    def __init__(self, entries: list[tuple[_Job, int]], width: int) -> None:
        self.entries = entries
        self.width = width
        self.tokens = len(entries) * width
        self.wanted: dict[_Job, int] = {}  # the requests still waiting for this call -> their rows in it
        for job, _ in entries:
            self.wanted[job] = self.wanted.get(job, 0) + 1
        self.task: asyncio.Task[None] | None = None


class Batcher:
    """The queue and the calls of one model."""

    def __init__(self, backend: InferenceBackend, model: ServedModel, output: str, encode: RowEncoder,
                 limits: BatchLimits, observer: BatchObserver | None = None) -> None:
        self.backend = backend
        self.model = model
        self.output = output
        self.encode = encode
        self.limits = limits
        self.observer: BatchObserver = observer or _Unobserved()
        self._queue: list[_Job] = []  # heap by (tokens served, arrival): requests with windows left to send
        self._calls: set[_Call] = set()
        self._seq = itertools.count()
        self._scheduled = False
        self._queued_rows = 0  # rows not yet sent, of the requests still waiting
        self._overlap_timer: asyncio.TimerHandle | None = None  # the queued rows' wait for a call beside the others
        self._overlap_due = False  # they waited long enough: the next call starts even if it is small
        # What a request arriving now can expect to wait (expected_wait_s), which admission compares with what is
        # left of its deadline: a moving average of a call's duration per row, the rows in calls in flight, and the
        # requests queued none of whose rows has left yet (the fair order sends each one's first row before a new
        # request's).
        self.row_s = 0.0
        self.fastest_call_s = 0.0  # the shortest call so far: a deadline shorter than that cannot be met
        # How long one-row requests actually waited against what the queue said when they came (a moving average
        # of the ratio): corrects the estimate for what it leaves out, chiefly the event loop's own backlog.
        self.wait_scale = 1.0
        self._unserved = 0

    @property
    def calls_in_flight(self) -> int:
        return len(self._calls)

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    def expected_wait_s(self) -> float:
        """How long a request arriving now waits for its first row's logits: the rest of the calls in flight
        (half, on average, spread over the model's calls), then the first rows of the requests queued before it
        and its own, spread over the model's calls but never less than the one call that carries its row. It
        follows the queue as it is now, so refusals end the moment the queue drains. Rows count alike whatever
        their width, and a request's later rows are not counted: a long document with a short deadline can still
        be admitted and time out."""
        return self.wait_scale * self._queue_wait_s()

    def _queue_wait_s(self) -> float:
        rows = self._unserved + 1
        calls = self.limits.max_calls
        in_flight = sum(len(call.entries) for call in self._calls)  # at most max_calls calls
        return self.row_s * (in_flight / 2 / calls + max(rows / calls, min(rows, self.limits.max_rows)))

    def _waited(self, predicted_s: float, waited_s: float, answered: bool) -> None:
        """A one-row request's wait against the queue's estimate when it came, into ``wait_scale``; one that gave
        up first only where it already waited longer than the estimate says (its full wait is at least that)."""
        if predicted_s <= 0:
            return
        ratio = waited_s / predicted_s
        if answered or ratio > self.wait_scale:
            self.wait_scale = min(MAX_WAIT_SCALE, self.wait_scale + CALL_WEIGHT * (ratio - self.wait_scale))

    def _timed(self, took: float, rows: int, finished: bool) -> None:
        """A call's duration into ``row_s`` and ``fastest_call_s``; one cut short (cancelled, failed) only where
        it already took longer per row than the average, since its full duration is at least that."""
        per_row = took / rows
        if finished:
            self.row_s = self.row_s + CALL_WEIGHT * (per_row - self.row_s) if self.row_s else per_row
            self.fastest_call_s = min(self.fastest_call_s, took) if self.fastest_call_s else took
        elif self.row_s and per_row > self.row_s:
            self.row_s += CALL_WEIGHT * (per_row - self.row_s)

    async def infer(self, rows: Sequence[Sequence[int]], lengths: Sequence[int], widths: Sequence[int],
                    deadline: Deadline, request_id: str = "") -> list[Float32Array]:
        """Logits of each row ([length, classes]): ``rows`` are content token ids, ``lengths`` the rows' lengths
        with special tokens, ``widths`` what each is padded to alone. Raises DeadlineExceeded when ``deadline``
        passes first, and the error of a failed call."""
        loop = asyncio.get_running_loop()
        span = trace.get_current_span()
        job = _Job(rows, lengths, widths, deadline, request_id, next(self._seq), loop.time(),
                   span if span.is_recording() else None)
        predicted_s = self._queue_wait_s() if len(rows) == 1 else 0.0
        heapq.heappush(self._queue, job)
        self._queued_rows += len(rows)
        self._unserved += 1
        self._schedule()
        try:
            async with asyncio.timeout_at(deadline.at):
                await job.done
        except TimeoutError:
            self._abandon(job)
            self._waited(predicted_s, loop.time() - job.queued_at, answered=False)
            raise DeadlineExceeded("deadline exceeded while waiting for the inference server") from None
        except BaseException:
            self._abandon(job)
            raise
        self._waited(predicted_s, loop.time() - job.queued_at, answered=True)
        return job.results  # type: ignore[return-value]  # every row delivered

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        if not self._queued_rows:
            self._end_overlap_wait()
        while len(self._calls) < self.limits.max_calls and self._queue:
            if self._calls and self._queued_rows < self.limits.overlap_rows and not self._overlap_due:
                if self._overlap_timer is None:  # wait for the call in flight, for more rows, or overlap_wait_s
                    self._overlap_timer = asyncio.get_running_loop().call_later(self.limits.overlap_wait_s,
                                                                                self._overlap_waited)
                return
            entries, width = self._next_call()
            if not entries:
                return
            self._launch(entries, width)
            self._end_overlap_wait()

    def _overlap_waited(self) -> None:
        self._overlap_timer = None
        self._overlap_due = True
        self._dispatch()

    def _end_overlap_wait(self) -> None:
        self._overlap_due = False
        if self._overlap_timer is not None:
            self._overlap_timer.cancel()
            self._overlap_timer = None

    def _next_call(self) -> tuple[list[tuple[_Job, int]], int]:
        """Rows for one call, least-served request first; requests held back (their share, another bucket, a
        row too wide for the call) wait for the next call."""
        limits = self.limits
        entries: list[tuple[_Job, int]] = []
        width = 0
        held: list[_Job] = []
        queue = self._queue
        while queue and len(entries) < limits.max_rows:
            job = heapq.heappop(queue)
            if job.done.done():  # gave up (its own handler removes it) or failed
                continue
            index = job.order[job.next]
            row_width = job.widths[index]
            new_width = max(width, row_width)
            over_share = job.inflight and job.inflight + row_width > limits.request_tokens
            too_big = entries and ((limits.buckets and row_width != width)
                                   or (len(entries) + 1) * new_width > limits.call_tokens)
            if over_share or too_big:
                held.append(job)  # follows in a later call: when its own calls return, or in a call of its own
                continue
            entries.append((job, index))
            self._queued_rows -= 1
            if not job.next:
                self._unserved -= 1
            width = new_width
            job.next += 1
            job.served += row_width
            job.inflight += row_width
            if job.next < len(job.order):
                heapq.heappush(queue, job)
        for job in held:
            heapq.heappush(queue, job)
        return entries, width

    def _launch(self, entries: list[tuple[_Job, int]], width: int) -> None:
        call = _Call(entries, width)
        now = asyncio.get_running_loop().time()
        for job in call.wanted:
            job.calls.add(call)
        self.observer.call_formed(len(entries), call.tokens, [now - job.queued_at for job, _ in entries])
        self._calls.add(call)
        call.task = asyncio.get_running_loop().create_task(self._run(call))
        # Released by a done callback: it runs even for a task cancelled before it started (its coroutine's
        # finally would not).
        call.task.add_done_callback(lambda _: self._release(call))

    async def _run(self, call: _Call) -> None:
        jobs = list(call.wanted)
        if not jobs:
            return
        try:
            arrays = self.encode([job.rows[index] for job, index in call.entries], call.width)
            deadline = Deadline.latest(job.deadline for job in jobs)
            if not self.limits.cancel_calls:
                deadline = Deadline(deadline.at + UNCANCELLED_CALL_GRACE_S)
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                with _call_span(jobs, self.model, len(call.entries)):
                    logits = await self.backend.infer(self.model, arrays, self.output, deadline, jobs[0].request_id)
            except BaseException:
                self._timed(loop.time() - started, len(call.entries), finished=False)
                raise
            self._timed(loop.time() - started, len(call.entries), finished=True)
        except asyncio.CancelledError:
            return  # nobody wants it any more (see _abandon)
        except Exception as e:  # every request in it fails with the call's error
            for job in call.wanted:
                if not job.done.done():
                    job.done.set_exception(e)
            return
        for row, (job, index) in enumerate(call.entries):
            if job.done.done():
                continue
            job.results[index] = logits[row, : job.lengths[index]]
            job.remaining -= 1
            if not job.remaining:
                job.done.set_result(None)

    def _release(self, call: _Call) -> None:
        """The call ended (answered, failed or cancelled): its place and its requests' shares go back."""
        self._calls.discard(call)
        for job, index in call.entries:
            job.inflight -= job.widths[index]
            job.calls.discard(call)
        self._schedule()

    def _abandon(self, job: _Job) -> None:
        """The request gave up: its queued windows are never sent, and its calls in flight are cancelled where no
        other request still wants them (with ``cancel_calls``; else they run to their end, answers dropped)."""
        if not job.done.done():
            job.done.cancel()
        queued = len(job.order) - job.next
        if queued and not job.next:
            self._unserved -= 1
        if queued:
            self.observer.abandoned("queued", queued)
            self._queued_rows -= queued
            job.next = len(job.order)
        in_flight = 0
        for call in list(job.calls):
            in_flight += call.wanted.pop(job, 0)
            if not call.wanted and call.task is not None and self.limits.cancel_calls:
                call.task.cancel()
        if in_flight:
            self.observer.abandoned("in_triton", in_flight)
        job.calls.clear()
        self._schedule()  # its share and its place in the queue go to others


def _call_span(jobs: list[_Job], model: ServedModel, rows: int) -> AbstractContextManager[object]:
    """The span of one coalesced call: a child of its first (fairest) request's span, linked to every request's,
    and each request's span linked back to it, so a trace shows the call that served it. Nothing when no request
    is traced."""
    spans = [job.span for job in jobs if job.span is not None]
    if not spans:
        return contextlib.nullcontext()
    call = TRACER.start_span(
        "triton.call", context=trace.set_span_in_context(NonRecordingSpan(spans[0].get_span_context())),
        links=[Link(span.get_span_context()) for span in spans],
        attributes={"ner.model": model.name, "ner.model_version": model.version, "ner.rows": rows,
                    "ner.requests": len(jobs)},
    )
    for span in spans:
        span.add_link(call.get_span_context())
    return trace.use_span(call, end_on_exit=True)
