"""The transport-free core: validate -> tokenize (windows) -> infer (Triton) -> merge -> decode -> offsets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from itertools import groupby
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from ner_gateway.core.decoding import decode
from ner_gateway.core.domain import Document, Recognition, RecognizeRequest, StageTimings
from ner_gateway.core.models import ModelRegistry, NerModel
from ner_gateway.core.offsets import convert_entities
from ner_gateway.core.scheduling import Admission, FairScheduler, plan_calls
from ner_gateway.core.tokenization import TextTokens, Window, padded_width
from ner_gateway.errors import InvalidRequest, Overloaded, TooLate, TritonUnavailable
from ner_gateway.observability.metrics import GatewayMetrics
from ner_gateway.observability.tracing import TRACER
from ner_gateway.triton.pool import TritonPool

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int
    max_text_chars: int
    max_request_chars: int
    default_timeout_s: float


class CpuStage(Protocol):
    """Runs one CPU stage of a request: inline, or in the offload pool for large requests."""

    def __call__(self, work: Callable[[], T]) -> Awaitable[T]: ...


@dataclass(frozen=True)
class TritonShares:
    """How much of Triton a model's calls may hold at once: overall and per request (see scheduling)."""

    capacity_tokens: int
    request_tokens: int


@dataclass(frozen=True)
class CpuOffload:
    """Where a large request's CPU stages run: ``executor``, from ``min_chars`` characters on (see settings)."""

    executor: Executor
    min_chars: int


class RecognitionPipeline:
    def __init__(
        self, registry: ModelRegistry, backend: TritonPool, limits: Limits,
        on_triton_unavailable: Callable[[], None] = lambda: None, metrics: GatewayMetrics | None = None,
        offload: CpuOffload | None = None, admission: Admission | None = None,
        shares: TritonShares | None = None,
    ) -> None:
        self.registry = registry
        self.backend = backend
        self.limits = limits
        self.on_triton_unavailable = on_triton_unavailable
        self.metrics = metrics
        self.offload = offload
        self.admission = admission
        self.shares = shares or TritonShares(capacity_tokens=1 << 30, request_tokens=1 << 30)
        self._schedulers: dict[str, FairScheduler] = {}

    def validate(self, request: RecognizeRequest) -> NerModel:
        limits = self.limits
        if not request.texts:
            raise InvalidRequest("texts must hold at least one text")
        if len(request.texts) > limits.max_texts_per_request:
            raise InvalidRequest(f"{len(request.texts)} texts in one request; the limit is "
                                 f"{limits.max_texts_per_request}")
        for index, text in enumerate(request.texts):
            if len(text) > limits.max_text_chars:
                raise InvalidRequest(f"texts[{index}] has {len(text)} characters; the limit is "
                                     f"{limits.max_text_chars}")
        total = sum(map(len, request.texts))
        if total > limits.max_request_chars:
            raise InvalidRequest(f"the texts hold {total} characters in all; the limit per request is "
                                 f"{limits.max_request_chars}")
        return self.registry.get(request.model)

    async def recognize(self, request: RecognizeRequest, timeout_s: float | None = None,
                        on_model: Callable[[str], None] | None = None) -> Recognition:
        """Run one request; ``timeout_s`` is what remains of the caller's deadline (None: the default);
        ``on_model`` hears the model the request resolved to as soon as it is known (the RPC metrics' label).
        Refused at once with Overloaded (RESOURCE_EXHAUSTED) when the gateway already holds all the work it may,
        and with TooLate (DEADLINE_EXCEEDED) when less time is left than a Triton call takes now."""
        try:
            with self.admission.request() if self.admission else contextlib.nullcontext():
                return await self._recognize(request, timeout_s, on_model)
        except (Overloaded, TooLate) as e:
            if self.metrics is not None:
                self.metrics.refused.labels(e.reason).inc()
            raise

    async def _recognize(self, request: RecognizeRequest, timeout_s: float | None,
                         on_model: Callable[[str], None] | None) -> Recognition:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s if timeout_s is not None else self.limits.default_timeout_s)
        # Spans carry sizes and names, never the raw text.
        t_start = time.perf_counter_ns()
        with TRACER.start_as_current_span("validate") as span:
            span.set_attribute("ner.texts", len(request.texts))
            model = self.validate(request)
            span.set_attribute("ner.model", model.name)
        if on_model is not None:
            on_model(model.name)
        if self.admission is not None:
            self.admission.check_time(deadline - loop.time(), self._scheduler(model.name).typical_call_s)
        request_id = request.request_id or uuid.uuid4().hex
        offload = self.offload if self.offload and sum(map(len, request.texts)) >= self.offload.min_chars else None

        async def cpu_stage(work: Callable[[], T]) -> T:
            """A CPU stage: inline for small requests, in the worker pool for large ones (the loop stays free)."""
            return work() if offload is None else await loop.run_in_executor(offload.executor, work)

        t0 = time.perf_counter_ns()
        with TRACER.start_as_current_span("tokenize") as span:
            tokens, windows = await cpu_stage(lambda: self._tokenize(model, request.texts))
            n_tokens = sum(map(len, tokens))
            span.set_attributes({"ner.tokens": n_tokens, "ner.windows": len(windows), "ner.offloaded": bool(offload)})
        # The windows count against the admission limit from here to the answer.
        with self.admission.windows_of(len(windows)) if self.admission else contextlib.nullcontext():
            t1 = time.perf_counter_ns()
            with TRACER.start_as_current_span("triton.infer") as span:
                span.set_attributes({"ner.model": model.name, "ner.model_version": model.served.version,
                                     "ner.windows": len(windows), "ner.request_id": request_id})
                window_logits = await self._infer(model, tokens, windows, deadline, request_id, cpu_stage)
            t2 = time.perf_counter_ns()
            with TRACER.start_as_current_span("decode") as span:
                documents = await cpu_stage(lambda: self._decode(model, request, tokens, windows, window_logits))
                span.set_attributes({"ner.aggregation": request.aggregation.value,
                                     "ner.entities": sum(len(d.entities) for d in documents)})
            t3 = time.perf_counter_ns()
            result = Recognition(
                documents=documents, model=model.name, model_version=model.served.version, request_id=request_id,
                timings=StageTimings((t1 - t0) // 1000, (t2 - t1) // 1000, (t3 - t2) // 1000),
            )
            if self.metrics is not None:
                stages = {"validate": t0 - t_start, "tokenize": t1 - t0, "infer": t2 - t1, "decode": t3 - t2}
                observe_recognition(self.metrics, result, n_tokens, {k: v / 1e9 for k, v in stages.items()})
            return result

    @staticmethod
    def _tokenize(model: NerModel, texts: list[str]) -> tuple[list[TextTokens], list[Window]]:
        tokens = model.tokenizer.tokenize(texts)
        return tokens, model.tokenizer.plan_windows(tokens, model.window_stride)

    @staticmethod
    def _decode(model: NerModel, request: RecognizeRequest, tokens: list[TextTokens], windows: list[Window],
                window_logits: list[npt.NDArray[np.float32]]) -> list[Document]:
        documents = []
        by_text = groupby(zip(windows, window_logits, strict=True), key=lambda pair: pair[0].text)
        for (_, pairs), text, text_tokens in zip(by_text, request.texts, tokens, strict=True):
            text_windows, logits = zip(*pairs, strict=True)
            merged = model.tokenizer.merge(len(text_tokens), list(text_windows), list(logits))
            entities = decode(text, merged, text_tokens.view, model.labels, request.aggregation, request.constrained)
            documents.append(Document(convert_entities(text, entities, request.offset_unit), len(text_windows)))
        return documents

    def _scheduler(self, model: str) -> FairScheduler:
        if model not in self._schedulers:
            self._schedulers[model] = FairScheduler(self.shares.capacity_tokens, self.shares.request_tokens)
        return self._schedulers[model]

    async def _infer(self, model: NerModel, tokens: list[TextTokens], windows: list[Window], deadline: float,
                     request_id: str, cpu_stage: CpuStage) -> list[npt.NDArray[np.float32]]:
        """Logits per window ([its tokens with specials, classes]). The windows of all texts go to Triton in
        calls of at most max_batch_size rows and the request's share of tokens, as the model's scheduler grants
        them; ``cpu_stage`` builds their arrays. Calls not yet sent when the request fails, runs out of time or
        is cancelled are never sent; those in Triton are cancelled."""
        loop = asyncio.get_running_loop()
        specials = model.tokenizer.special_tokens
        buckets = model.sequence_buckets
        lengths = [w.end - w.start + specials for w in windows]
        padded = [padded_width(n, buckets) for n in lengths]
        # Sorted by length, so each call pads (for engines: picks its bucket) for windows of similar length.
        calls = plan_calls(padded, model.served.max_batch_size, self.shares.request_tokens)
        inputs = await cpu_stage(lambda: [model.tokenizer.arrays(tokens, [windows[i] for i in call], buckets)
                                          for call in calls])
        scheduler, owner = self._scheduler(model.name), object()
        state = ["queued"] * len(calls)  # -> "in_triton" -> "done"

        async def run(number: int, arrays: dict[str, npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]:
            async with scheduler.call(owner, next(iter(arrays.values())).size, deadline):
                state[number] = "in_triton"
                result = await self.backend.infer(model.served, arrays, model.manifest.output,
                                                  deadline - loop.time(), request_id)
                state[number] = "done"
                return result

        try:
            async with asyncio.TaskGroup() as group:  # the first failure cancels the other calls
                tasks = [group.create_task(run(n, arrays)) for n, arrays in enumerate(inputs)]
        except BaseExceptionGroup as failed:
            self._count_abandoned(model.name, calls, state)
            error = failed.exceptions[0]
            if isinstance(error, TritonUnavailable):
                self.on_triton_unavailable()
            raise error from None
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed in gRPC
            self._count_abandoned(model.name, calls, state)
            raise
        logits: list[npt.NDArray[np.float32]] = [np.empty(0, np.float32)] * len(windows)
        for call, task in zip(calls, tasks, strict=True):
            result = task.result()
            for row, index in enumerate(call):
                logits[index] = result[row, : lengths[index]]
        return logits

    def _count_abandoned(self, model: str, calls: list[list[int]], state: list[str]) -> None:
        """Windows of a failed request that Triton never ran (queued) or may not finish (in_triton, cancelled)."""
        if self.metrics is None:
            return
        for call, where in zip(calls, state, strict=True):
            if where != "done":
                self.metrics.abandoned_windows.labels(model, where).inc(len(call))


def observe_recognition(metrics: GatewayMetrics, result: Recognition, tokens: int, seconds: dict[str, float]) -> None:
    """The per-request histograms and the label mix of one answered request."""
    model = result.model
    for stage, value in seconds.items():
        metrics.stage_duration.labels(stage, model).observe(value)
    metrics.texts.labels(model).observe(len(result.documents))
    metrics.tokens.labels(model).observe(tokens)
    metrics.windows.labels(model).observe(sum(d.windows for d in result.documents))
    entities = [e for d in result.documents for e in d.entities]
    metrics.entities.labels(model).observe(len(entities))
    for entity in entities:
        metrics.entities_by_label.labels(model, entity.label).inc()
